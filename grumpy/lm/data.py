"""Text in, integer windows out: vocabulary, corpus loading, the train/validation
split, and truncated-BPTT batches.

Batching follows char-rnn: the training text is cut into B contiguous streams,
and each step takes the next window of T characters from every stream, so the
hidden state at the end of one window is the right starting state for the next
(carried across windows, reset when an epoch starts over).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from grumpy._util import check_positive_int, reading

SHIPPED_CORPUS = "shakespeare.txt.gz"


class Vocab:
    """The characters of a text, in a fixed order: index i <-> ``chars[i]``."""

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"vocab: expected a non-empty string of characters, got {chars!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("vocab: characters must be distinct")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """The sorted set of characters in ``text``."""
        if not text:
            raise ValueError("vocab: cannot build a vocabulary from empty text")
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, c: str) -> bool:
        return c in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"Vocab({self.chars!r})"

    def missing(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the vocabulary, sorted."""
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str) -> np.ndarray:
        """str of length N -> int32 array (N,). Unknown characters raise ValueError listing them."""
        bad = self.missing(text)
        if bad:
            shown = ", ".join(repr(c) for c in bad[:20]) + (" ..." if len(bad) > 20 else "")
            raise ValueError(f"{len(bad)} character(s) not in the vocabulary: {shown}")
        # A lookup table maps the whole text in one NumPy call, not a Python loop over it.
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if codes.size and codes.max() < 65536:
            table = np.full(65536, -1, dtype=np.int32)
            for c, i in self._index.items():
                if ord(c) < 65536:
                    table[ord(c)] = i
            return table[codes]
        return np.array([self._index[c] for c in text], dtype=np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def decode_utf8(raw: bytes, name: str) -> str:
    """bytes -> str, or ValueError saying UTF-8 was expected and at which byte offset it failed."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{name}: looks like a binary file (NUL byte at byte offset {nul}); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{name}: not valid UTF-8 text (UTF-8 expected; decoding failed at byte offset {e.start}: "
            f"{e.reason})"
        ) from None
    # Windows line endings would add '\r' to the vocabulary for no benefit.
    return text.replace("\r\n", "\n")


def load_text(path: str | os.PathLike[str] | None = None) -> str:
    """Read a UTF-8 text file; ``None`` reads the Shakespeare corpus shipped with grumpy.

    Raises ValueError for a missing or unreadable file, a binary or non-UTF-8
    file (naming the byte offset where decoding failed), or an empty file.
    """
    if path is None:
        from importlib.resources import files

        raw = gzip.decompress(files("grumpy").joinpath("corpus").joinpath(SHIPPED_CORPUS).read_bytes())
        return raw.decode("utf-8")
    name = os.fspath(path)
    with reading(name, "a text file"), open(name, "rb") as f:
        raw = f.read()
    text = decode_utf8(raw, name)
    if not text:
        raise ValueError(f"{name}: the file is empty")
    return text


def text_digest(text: str) -> str:
    """A short fingerprint of a text, stored in checkpoints to notice a different corpus on resume."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_text(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A contiguous split: the first (1 - val_fraction) of ``ids`` for training, the rest for validation.

    Contiguous rather than random so that validation text is text the model has
    not seen, not sentences interleaved with training ones.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    n_train = int(round(len(ids) * (1.0 - val_fraction)))
    return ids[:n_train], ids[n_train:]


def min_text_length(batch_size: int, seq_len: int, val_fraction: float = 0.1) -> int:
    """The shortest text whose training split holds one window per stream and whose
    validation split has at least two characters (one prediction)."""
    need = batch_size * seq_len + 1
    n = need
    while True:
        tr = int(round(n * (1.0 - val_fraction)))
        va = n - tr
        if tr >= need and va >= 2:
            return n
        n += 1


@dataclass
class Position:
    """Where the batcher is: ``epoch`` (0-based) and ``offset``, the characters
    already consumed in each stream during this epoch."""

    epoch: int = 0
    offset: int = 0


class StreamBatcher:
    """B parallel streams over ``ids``, served as windows of T steps.

    Each epoch starts the streams at a small shift in [0, T) drawn from
    (seed, epoch), so window boundaries fall in different places each epoch;
    the shift is a pure function of the epoch, so the position alone
    (epoch, offset) is enough to resume exactly.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.B = check_positive_int("batch_size", batch_size)
        self.T = check_positive_int("seq_len", seq_len)
        self.ids = np.asarray(ids)
        self.seed = int(seed)
        if len(self.ids) < self.B * self.T + 1:
            raise ValueError(
                f"text too short: {len(self.ids)} characters, need at least batch_size * seq_len + 1 = "
                f"{self.B * self.T + 1}"
            )
        self.pos = Position()
        self._layout_epoch = -1
        self._x = self._y = np.empty((0, 0), np.int32)

    def _layout(self, epoch: int) -> None:
        if epoch == self._layout_epoch:
            return
        N = len(self.ids)
        max_shift = min(self.T, N - 1 - self.B * self.T)  # keep at least one full window
        shift = int(np.random.default_rng([self.seed, epoch]).integers(0, max_shift + 1)) if epoch else 0
        L = (N - 1 - shift) // self.B
        base = shift + np.arange(self.B)[:, None] * L
        self._x = np.ascontiguousarray(self.ids[base + np.arange(L)].T)  # (L, B), time-major
        self._y = np.ascontiguousarray(self.ids[base + 1 + np.arange(L)].T)
        self._layout_epoch = epoch

    @property
    def windows_per_epoch(self) -> int:
        self._layout(self.pos.epoch)
        return len(self._x) // self.T

    def next(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(x (T, B), y (T, B), new_epoch): new_epoch is True when this window
        starts an epoch, so the caller resets the hidden state."""
        self._layout(self.pos.epoch)
        if self.pos.offset + self.T > len(self._x):
            self.pos = Position(self.pos.epoch + 1, 0)
            self._layout(self.pos.epoch)
        o = self.pos.offset
        x, y = self._x[o : o + self.T], self._y[o : o + self.T]
        new_epoch = o == 0
        self.pos = Position(self.pos.epoch, o + self.T)
        return x, y, new_epoch


def eval_windows(ids: np.ndarray, batch_size: int, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
    """Cover every prediction in ``ids`` once: (x (t, b), y (t, b), reset) windows.

    The N - 1 predictions are cut into b = min(batch_size, N - 1) streams of
    L characters, evaluated in windows of ``seq_len`` with the state carried;
    the few left over (fewer than b) continue the last stream alone, so no
    character is skipped. ``reset`` is True for the first window of a
    batch layout (zero the state); the leftover window is flagged as a
    continuation of stream b - 1.
    """
    n_pred = len(ids) - 1
    if n_pred < 1:
        return
    b = min(batch_size, n_pred)
    L = n_pred // b
    base = np.arange(b)[:, None] * L
    x_all = ids[base + np.arange(L)].T
    y_all = ids[base + 1 + np.arange(L)].T
    for o in range(0, L, seq_len):
        yield x_all[o : o + seq_len], y_all[o : o + seq_len], o == 0
    rest = n_pred - b * L
    if rest:
        s = b * L
        yield ids[s : s + rest, None], ids[s + 1 : s + 1 + rest, None], False
