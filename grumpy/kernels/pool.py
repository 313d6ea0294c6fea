"""grumpy's compiled work as jobs on the threads of NumPy's own BLAS.

OpenBLAS's worker threads spin for about 0.1 s after each of its calls. A second pool
beside them (numba's, on TBB) then waits for a core whenever the caller's NumPy code
has just run a product, and the caller's products wait while grumpy's pool spins.
Running grumpy's parallel work on OpenBLAS's own workers (:func:`grumpy.kernels.blas.run_jobs`)
leaves one pool: the worker that spins after the caller's product picks up grumpy's
job at once (docs/benchmarks.md, "The panels run on OpenBLAS's own threads").

A job is a numba ``cfunc`` taking the address of one record, a row of int64 numbers:
the arrays' addresses and sizes, and the job's share of the work. Here: the fused gate
kernels of :mod:`grumpy.kernels.nb` on a block of the batch's rows (the products' jobs
are in :mod:`grumpy.kernels.panels`). Imported lazily, like the other compiled kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from grumpy.kernels import blas, nb


def _address_typer(typingctx: Any, addr: Any) -> Any:
    """A float32 pointer from an integer address: a job's record carries its arrays' addresses."""
    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return types.CPointer(types.float32)(types.int64), codegen


f32_at: Any = intrinsic(_address_typer)

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
