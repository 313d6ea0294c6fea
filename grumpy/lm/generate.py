"""Using a trained character model: its loss on a text, and text sampled from it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from grumpy.lm.data import Vocab, eval_windows
from grumpy.lm.model import LN2, CharModel, nll, sample_next


def estimate_loss(model: CharModel, ids: np.ndarray, *, batch_size: int = 32, seq_len: int = 100) -> float:
    """Mean loss (nats/char) of predicting every character of ``ids`` (N,) from the ones before it.

    The text is cut into ``batch_size`` contiguous streams read in windows of
    ``seq_len`` with the state carried, so every prediction (bar the first
    few of each stream) sees a long context. Dropout is off while evaluating.
    """
    total, count = loss_sums(model, ids, batch_size=batch_size, seq_len=seq_len)
    if count == 0:
        raise ValueError("estimate_loss: need at least two characters")
    return total / count


def loss_sums(model: CharModel, ids: np.ndarray, *, batch_size: int = 32, seq_len: int = 100,
              share: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(sum of the losses in nats, number of predictions) of :func:`estimate_loss`'s
    streams, or with ``share`` (rank, size) of that rank's share of them: streams
    [b*rank//size, b*(rank+1)//size) and, for the last rank, the leftover, so the
    ranks' sums add up to the whole (training over MPI, :mod:`grumpy.lm.distributed`)."""
    rank, size = share
    b = min(batch_size, len(ids) - 1)
    b0, b1 = b * rank // size, b * (rank + 1) // size
    was_training = model.gru.training
    model.eval()
    total, count = 0.0, 0
    h: np.ndarray | None = None
    try:
        for x, y, reset in eval_windows(ids, batch_size, seq_len):
            if x.shape[1] == b:
                x, y = x[:, b0:b1], y[:, b0:b1]
            elif b1 < b:  # the leftover continues stream b - 1, another rank's
                continue
            if x.shape[1] == 0:  # more ranks than streams
                continue
            if reset or h is None:
                h = model.init_state(x.shape[1])
            elif x.shape[1] != h.shape[1]:  # the leftover continues the last stream
                h = np.ascontiguousarray(h[:, -1:])
            logits, h = model.forward(np.ascontiguousarray(x), h, grad=False)
            total += nll(logits, y, reduction="sum")
            count += y.size
    finally:
        model.train(was_training)
    return total, count


def evaluate(
    model: CharModel | str | os.PathLike[str],
    text: str,
    *,
    vocab: str | None = None,
    batch_size: int = 32,
    seq_len: int = 100,
) -> dict[str, Any]:
    """Loss of ``model`` (a CharModel or its :func:`grumpy.quantize` copy, with ``vocab``; or a
    checkpoint path) over ``text``.

    Returns {"loss_nats", "bits_per_char", "chars"} where chars is the number
    of characters predicted (len(text) - 1). Characters outside the
    vocabulary raise ValueError listing them.
    """
    if isinstance(model, (str, os.PathLike)):
        from grumpy.lm.checkpoint import load_model  # safetensors only when a file is read

        model, meta = load_model(model)
        vocab = meta["vocab"]
    if vocab is None:
        raise ValueError("evaluate: pass vocab with a CharModel")
    v = Vocab(vocab)
    if len(text) < 2:
        raise ValueError(f"evaluate: need at least 2 characters of text, got {len(text)}")
    ids = v.encode(text)
    loss = estimate_loss(model, ids, batch_size=batch_size, seq_len=seq_len)
    return {"loss_nats": loss, "bits_per_char": loss / LN2, "chars": int(len(ids) - 1)}


def sample(
    model: CharModel,
    vocab: str,
    *,
    prime: str = "",
    length: int = 500,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield ``length`` generated characters, one at a time, continuing ``prime``.

    temperature 0 is greedy. Without a prime the model starts from a zero state
    and a newline (or the first vocabulary character if the text had none).
    A prime with characters outside the vocabulary raises ValueError listing them.
    """
    v = Vocab(vocab)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected an integer >= 0, got {length!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive integer, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    bad = v.missing(prime)
    if bad:
        raise ValueError(f"prime: characters not in the model's vocabulary: {' '.join(repr(c) for c in bad)}")
    return _sample_iter(model, v, prime, int(length), float(temperature), top_k, top_p, seed)


def _sample_iter(model: CharModel, v: Vocab, prime: str, length: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int | None) -> Iterator[str]:
    rng = np.random.default_rng(seed)
    start = prime or ("\n" if "\n" in v else v.chars[0])
    was_training = model.gru.training
    model.eval()
    try:
        logits, h_n = model.forward(v.encode(start)[:, None], grad=False)
        last, h = logits[-1, 0], h_n[:, 0]
        step = model.stepper()  # the lean one-character path: no cache, weights prepared once
        for _ in range(length):
            i = sample_next(last, rng, temperature=temperature, top_k=top_k, top_p=top_p)
            yield v.chars[i]
            last, h = step(i, h)
    finally:
        model.train(was_training)
