"""Small shared pieces: stable activations, argument checks, initialisers."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def sigmoid(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """σ(a) = 1 / (1 + e^−a), computed as (1 + tanh(a/2)) / 2.

    The identity is exact; the tanh form cannot overflow for any finite input
    (e^−a does for a < −88 in float32) and costs one transcendental per element.
    """
    out = np.multiply(a, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


def check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype: expected numpy.float32 or numpy.float64, got {dtype!r}") from e
    if dt not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: expected numpy.float32 or numpy.float64, got {dt}")
    return dt


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_probability(name: str, value: Any) -> float:
    """A dropout-like rate: a number in [0, 1) (1 would drop everything), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


def uniform_init(rng: np.random.Generator, shape: tuple[int, ...], hidden_size: int, dtype: np.dtype) -> np.ndarray:
    """PyTorch's default for recurrent layers: U(−1/√H, 1/√H)."""
    k = 1.0 / np.sqrt(hidden_size)
    return rng.uniform(-k, k, size=shape).astype(dtype)


def dropout_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float, dtype: np.dtype) -> np.ndarray:
    """An inverted-dropout mask: 0 with probability p, else 1 / (1 - p). Drawn in float32:
    a third of the time of float64 draws, which cost a tenth of a training step (docs/lm.md)."""
    keep = 1.0 - p
    return np.multiply(rng.random(shape, dtype=np.float32) < keep, np.dtype(dtype).type(1.0 / keep), dtype=dtype)


def orthogonal_blocks(rng: np.random.Generator, n_blocks: int, hidden_size: int, dtype: np.dtype) -> np.ndarray:
    """n_blocks stacked random orthogonal (H, H) matrices: (n_blocks * H, H)."""
    blocks = []
    for _ in range(n_blocks):
        q, r = np.linalg.qr(rng.standard_normal((hidden_size, hidden_size)))
        # Fixing the signs by diag(r) makes q Haar-distributed rather than biased by QR.
        blocks.append(q * np.sign(np.diag(r)))
    return np.concatenate(blocks).astype(dtype)


@contextlib.contextmanager
def reading(name: str, expected: str) -> Iterator[None]:
    """Turn the OS's errors on opening or reading ``name`` into one-line ValueErrors
    that name the file and say what was ``expected`` (e.g. "a text file")."""
    try:
        yield
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: is a directory, expected {expected}") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read ({e.strerror or e})") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves either the
    old file or the new one: temporary file in the same directory, flush, fsync,
    rename over the target, fsync the directory."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
