"""Shared pieces of the GRU tests: random problems, a scalar loss, error measures."""

from __future__ import annotations

import numpy as np

import grumpy


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|: a tensor-wise relative error that is stable near zeros."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def numeric_grad(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f() w.r.t. every entry of a (perturbed in place, then restored)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        fp = f()
        a[i] = old - eps
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def make_problem(
    *, T=4, B=3, I=3, H=2, num_layers=1, bidirectional=False, bias=True, reset_after=True,
    batch_first=False, with_lengths=False, dtype=np.float64, seed=0,
):
    """A GRU and random x, h0, lengths and loss weights (w_out, w_hn) for L = Σ out·w_out + Σ h_n·w_hn."""
    rng = np.random.default_rng(seed)
    gru = grumpy.GRU(I, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                     reset_after=reset_after, dtype=dtype, seed=seed)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    h0 = rng.standard_normal((num_layers * D, B, H)).astype(dtype) * 0.5
    lengths = rng.integers(1, T + 1, size=B) if with_lengths else None
    if with_lengths:
        lengths[0] = T  # the longest sequence spans the whole window, as with packing
    out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
    w_out = rng.standard_normal(out_shape).astype(dtype)
    w_hn = rng.standard_normal(h0.shape).astype(dtype)
    return gru, x, h0, lengths, w_out, w_hn


def loss_of(gru, x, h0, lengths, w_out, w_hn) -> float:
    out, h_n = gru.forward(x, h0, lengths=lengths)
    return float((out * w_out).sum() + (h_n * w_hn).sum())


# The option grid both the finite-difference and the PyTorch tests run over.
GRID = [
    dict(reset_after=ra, bias=bias, num_layers=L, bidirectional=bi, with_lengths=ln, batch_first=bf)
    for ra in (True, False)
    for bias in (True, False)
    for L in (1, 2, 3)
    for bi in (False, True)
    for ln, bf in ((False, False), (True, False), (True, True))
    if not (L == 3 and not bias)  # three layers add nothing new once bias=False is covered at 1-2
]


def grid_id(c: dict) -> str:
    return "-".join([
        "after" if c["reset_after"] else "before", "bias" if c["bias"] else "nobias", f"L{c['num_layers']}",
        "bi" if c["bidirectional"] else "uni", "len" if c["with_lengths"] else "full",
        "bf" if c["batch_first"] else "tm",
    ])
