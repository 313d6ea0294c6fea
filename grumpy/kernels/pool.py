"""grumpy's compiled work as jobs on the threads of NumPy's own BLAS.

OpenBLAS's worker threads spin for about 0.1 s after each of its calls. A second pool
beside them (numba's, on TBB) then waits for a core whenever the caller's NumPy code
has just run a product, and the caller's products wait while grumpy's pool spins.
Running grumpy's parallel work on OpenBLAS's own workers (:func:`grumpy.kernels.blas.run_jobs`)
leaves one pool: the worker that spins after the caller's product picks up grumpy's
job at once (docs/benchmarks.md, "The panels run on OpenBLAS's own threads").

A job is a numba ``cfunc`` taking the address of one record, a row of int64 numbers:
the arrays' addresses and sizes, and the job's share of the work. Here: the fused gate
kernels of :mod:`grumpy.kernels.nb` on a block of the batch's rows, and the ``shared``
route's inference, each thread a block of rows through a run of steps (the products'
jobs are in :mod:`grumpy.kernels.panels`). Imported lazily, like the other compiled kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import carray, cfunc, njit, types

from grumpy.kernels import blas, nb, panels
from grumpy.kernels.nb import f32_at

# The gate kernels' jobs. A record (blas.run_jobs): kind, H, whether masked, the addresses
# of the kernel's arrays in its argument order (a batch's arrays C-contiguous (B, width),
# the biases (3H,), the mask (B,)), then the job's rows [b0, b1).
KINDS = ("forward", "infer", "backward")
_ARRAYS = 8
_B0 = 3 + _ARRAYS
_WIDTHS = {  # each argument's width in units of H: 3 for (B, 3H), 1 for (B, H); -3 the biases, 0 the mask
    "forward": (3, 3, -3, -3, 1, 1, 1, 0),
    "infer": (3, 3, -3, -3, 1, 1, 0),
    "backward": (1, 1, 3, 1, 0, 1),
}


@njit(inline="always")
def _rows(r, i, width, b0, b1):
    """Rows [b0, b1) of the record's array i, C-contiguous (B, width)."""
    return carray(f32_at(r[3 + i] + 4 * b0 * width), (b1 - b0, width))


@njit(inline="always")
def _vector(r, i, n):
    return carray(f32_at(r[3 + i]), n)


def _run_gates(record):
    r = carray(record, _B0 + 2, types.int64)  # type: ignore[call-overload]
    kind, H, masked, b0, b1 = r[0], r[1], r[2], r[_B0], r[_B0 + 1]
    G = 3 * H
    m_at = 4 if kind == 2 else 7 if kind == 0 else 6
    m = carray(f32_at(r[3 + m_at] + 4 * b0), b1 - b0 if masked else 0)
    if kind == 2:
        nb.gates_backward_serial(_rows(r, 0, H, b0, b1), _rows(r, 1, H, b0, b1), _rows(r, 2, G, b0, b1),
                                 _rows(r, 3, H, b0, b1), m, _rows(r, 5, H, b0, b1))
        return
    g, gh, bih, bhh = _rows(r, 0, G, b0, b1), _rows(r, 1, G, b0, b1), _vector(r, 2, G), _vector(r, 3, G)
    hp, ho = _rows(r, 4, H, b0, b1), _rows(r, 5, H, b0, b1)
    if kind == 0:
        nb.gates_forward_serial(g, gh, bih, bhh, hp, ho, _rows(r, 6, H, b0, b1), m)
    else:
        nb.gates_infer_serial(g, gh, bih, bhh, hp, ho, m)


@functools.cache
def _gates_job() -> int:
    """The address of :func:`_run_gates` compiled as a C function (on first use)."""
    address: Any = cfunc(types.void(types.voidptr), cache=True)(_run_gates).address
    return int(address)


def fused_gates(kind: str, parallel: bool) -> Callable[..., None]:
    """The gate kernel ``nb.gates_<kind>_*`` for the ``steps`` route: with ``parallel``, on
    every thread NumPy's BLAS would use now, as jobs on that library's threads, or where
    it lends none on numba's (TBB); else on the calling thread. Called with the kernel's
    own arguments, each step; arrays that are not C-contiguous take the serial kernel."""
    serial = getattr(nb, f"gates_{kind}_serial")
    if not parallel:
        return serial
    if not blas.POOL:
        return getattr(nb, f"gates_{kind}_parallel")
    code, widths, job = KINDS.index(kind), _WIDTHS[kind], _gates_job()
    lead, mask_at = widths.index(1), widths.index(0)

    def run(*arrays: np.ndarray) -> None:
        B, H = arrays[lead].shape
        n = min(blas.pool_threads(), B)
        if n <= 1 or not all(a.flags.c_contiguous for a in arrays):
            serial(*arrays)
            return
        addresses = tuple(blas.address(a) for a in arrays) + (0,) * (_ARRAYS - len(arrays))
        blas.run_jobs(job, (code, H, int(arrays[mask_at].shape[0] > 0)) + addresses, n, B)

    return run


# The shared route's inference on the pool: each job takes a block of the batch's rows
# through a run of steps, its products grumpy's own (panels) on W_hh packed once, with
# no synchronisation per step (the rows of a GRU batch never meet). A record: wp, P, H,
# g (n, B, 3H) the run's input projections, n, B, b_ih, b_hh, hs (T + 1, B, H), T, m2
# (T, B) or none, lo (the run's first step), reverse, gh (B, 3H) scratch, then [b0, b1).
_SHARE = 15


@njit(inline="always")
def _at(addr, shape):
    return carray(f32_at(addr), shape)


def _run_share(record):
    r = carray(record, _SHARE + 2, types.int64)  # type: ignore[call-overload]
    P, H, n, B, T, lo, reverse, b0, b1 = r[1], r[2], r[4], r[5], r[9], r[12], r[13], r[15], r[16]
    wp, g, gh = _at(r[0], (P, H, panels.PANEL)), _at(r[3], (n, B, 3 * H)), _at(r[14], (B, 3 * H))
    bih, bhh, hs = _at(r[6], 3 * H), _at(r[7], 3 * H), _at(r[8], (T + 1, B, H))
    m2 = _at(r[10], (T, B if r[11] else 0))
    for s in range(n):
        t = lo + (n - 1 - s if reverse else s)
        ip, io = (t + 1, t) if reverse else (t, t + 1)
        for p in range(P):
            panels._tile(wp, hs[ip], gh, p, b0, b1)
        nb.gates_infer_serial(g[t - lo, b0:b1], gh[b0:b1], bih, bhh, hs[ip, b0:b1], hs[io, b0:b1],
                              m2[t, b0:b1])


@functools.cache
def _share_job() -> int:
    """The address of :func:`_run_share` compiled as a C function (on first use)."""
    address: Any = cfunc(types.void(types.voidptr), cache=True)(_run_share).address
    return int(address)


def shared_steps(wp: np.ndarray, g: np.ndarray, bih: np.ndarray, bhh: np.ndarray, hs: np.ndarray,
                 m2: np.ndarray, lo: int, reverse: bool, gh: np.ndarray) -> None:
    """Inference steps lo .. lo + n - 1 (in time order; run backwards with ``reverse``):
    g (n, B, 3H) their input projections without b_ih, hs (T + 1, B, H) the states (those
    entering the run already in place), m2 (T, B) the mask or (T, 0), wp W_hh packed by
    :func:`grumpy.kernels.panels.pack`, gh (B, 3H) scratch; all C-contiguous float32. The
    batch's rows are shared among the threads of NumPy's BLAS, at least 8 rows each."""
    n, B, _ = g.shape
    T, H = hs.shape[0] - 1, hs.shape[2]
    jobs = max(1, min(blas.pool_threads(), B // 8))
    fields = (blas.address(wp), wp.shape[0], H, blas.address(g), n, B, blas.address(bih), blas.address(bhh),
              blas.address(hs), T, blas.address(m2), int(m2.shape[1] > 0), lo, int(reverse), blas.address(gh))
    blas.run_jobs(_share_job(), fields, jobs, B)
