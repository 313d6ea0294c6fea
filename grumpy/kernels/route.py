"""The fast path's one decision: which loop runs one direction of one layer.

:func:`choose` is the only place that looks at sizes; forward and backward take
the same :class:`Route` (the backward reads it from the forward's cache). Every
threshold is a constant here; the measurements behind each are in
docs/benchmarks.md, "How grumpy is fast". A route can also be named explicitly
(``gru_sequence_forward(..., route="steps")``, ``GRU(..., route="steps")``): the
tests run every route against the reference :class:`grumpy.GRUCell` that way.

The routes, from the most general to the most specialised:

========  ====================================================================
numpy     the NumPy loop: any dtype, both gate forms (the only one for float64
          and ``reset_after=False``)
loop      the whole time loop compiled (numba), each step's product by the BLAS
          NumPy itself uses (one thread pool with the caller's own NumPy code):
          small batches, and one stream at any H (its ``sgemv``)
packed    with the opt-in MKL: the whole time loop compiled, each step's recurrent
          product on weights MKL packed once per call
steps     a Python loop over the steps: one matrix product and one compiled gate
          kernel per step (without MKL, batches of more than LOOP_MAX_MACS
          multiply-adds a step; with MKL, one stream at large H; and where
          NumPy's BLAS cannot be called from compiled code). The products are
          grumpy's own on weights packed once (``panels``: AVX-512), or else BLAS's;
          its parallel work (products and gate kernels) runs on the threads of
          NumPy's own BLAS (grumpy.kernels.pool)
shared    inference only: each core takes a share of the batch's rows through
          the whole sequence, no synchronisation per step: with MKL, BLAS on one
          thread in each; where NumPy's BLAS lends its threads (``panels``), as jobs on
          them with grumpy's products, for H < PANELS_MIN_H (NumPy's OpenBLAS on
          Python threads only when named)
step      inference only, chosen for one step of one stream (T = 1, B = 1, every
          step valid: a user's generation loop calling ``forward``): the generation
          step :func:`grumpy.kernels.gru_step` at each step, none of the loops' set-up
========  ====================================================================
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from grumpy.kernels import blas

_F32 = np.dtype(np.float32)

ROUTES = ("numpy", "loop", "packed", "steps", "shared", "step")

# Gate kernels use all cores from this many batch x hidden elements per step, on numba's
# threads (TBB). Measured beside NumPy's OpenBLAS, whose threads spin for about 100 ms
# after each call of its own: inference at H=1024, B=128 (2^17) ran at 28.6k tokens/s
# against 39.1k on the calling thread; at B=256 (2^18) 50.0k against 48.4k.
PARALLEL_MIN = 1 << 18
# The same on the ``steps`` route where its gate kernels run as jobs on NumPy's BLAS
# threads (grumpy.kernels.pool), which wait for no other pool: training at H=1024,
# B=128 ran 17.9k -> 18.8k tokens/s (medians of 3 alternated runs), inference level.
PARALLEL_MIN_POOL = 1 << 17
# Without MKL's packed product the whole loop is compiled up to this many multiply-adds per
# step (B * H * 3H), and for one stream at any size; above, each step's product is NumPy's
# (or MKL's) call from Python.
LOOP_MAX_MACS = 1 << 19
# One stream takes the packed product from this H on, when the whole loop is compiled.
PACKED_MIN_H = 128
# Inference shares a batch among the cores when each share gets at least this many rows.
SHARE_MIN_ROWS = 64
# Inference without a cache computes the input projections this many bytes of steps at a time.
INFER_CHUNK_BYTES = 1 << 23
# The ``steps`` route takes grumpy's products on packed weights (grumpy.kernels.panels) from
# this H: there OpenBLAS spends about half of each step's product repacking W_hh (12 MB).
# At H=512 its own two threads won beside a caller's products (docs/benchmarks.md).
PANELS_MIN_H = 1024
# Generation, one stream: from this H the step's matrix-vector products go to BLAS.
STEP_BLAS_MIN = 512
# Reduced precision (grumpy.quantized): the compiled int8 / bfloat16 products and the
# one-stream step use all cores from this many multiply-adds.
QUANT_PARALLEL_MIN = 1 << 18
# Reduced precision with MKL: input products with rows shorter than this use MKL's float32
# product on a float32 copy of the quantized values (at most 3H x 128 x 4 bytes), faster
# there than its bfloat16 product, which suits long rows.
QUANT_DENSE_K = 128
# The loss alone (grumpy.lm.model.nll): e^(z - max) this many rows at a time (33 KB at V = 65, in L2).
LOSS_ROWS = 128

_LOADED: dict[str, ModuleType | None] = {}  # compiled-kernel modules once imported; None when unavailable
_LOAD_LOCK = threading.RLock()


def compiled_kernels(name: str = "nb") -> ModuleType | None:
    """grumpy.kernels.<name> (numba kernels: ``nb``, ``quantized_nb``), imported on first
    use, or None: numba missing, or GRUMPY_NUMBA=0."""
    if name not in _LOADED:
        # Under a lock, and recorded only once imported: a thread that found the name
        # recorded while another was still importing once took the kernels for missing.
        with _LOAD_LOCK:
            if name not in _LOADED:
                module = None
                if os.environ.get("GRUMPY_NUMBA", "1") != "0":
                    try:
                        module = importlib.import_module(f"grumpy.kernels.{name}")
                    except ImportError:
                        pass
                _LOADED[name] = module
    return _LOADED[name]


_TBB: bool | None = None


def parallel_gates_ok() -> bool:
    """Whether the gate kernels may use numba's own threads: only where numba runs them
    on TBB. Without TBB numba takes GNU OpenMP, whose threads spin between parallel
    regions; beside the BLAS's threads, on two cores, a step then ran about 50x
    slower (docs/benchmarks.md). Elsewhere the gate kernels run on the calling thread."""
    global _TBB
    if _TBB is None:
        try:
            from numba.np.ufunc import parallel

            # numba's own check loads libtbb the way numba will (by name, through the
            # interpreter's library path); importing tbbpool alone failed where that
            # succeeded, so the check once said no TBB where numba then ran on it.
            parallel._check_tbb_version_compatible()
            import numba.np.ufunc.tbbpool  # noqa: F401

            _TBB = True
        except Exception:  # ImportError, or a numba without that check: no TBB assumed
            _TBB = False
    return _TBB


def panels_ok() -> bool:
    """Whether the ``steps`` route's products may be grumpy's own (grumpy.kernels.panels):
    where numba targets AVX-512 (elsewhere its 16-lane vectors are split and spill) and
    the products can run on NumPy's BLAS's own threads (one pool with the caller's
    products) or else on TBB's (whose workers sleep when idle; see :func:`parallel_gates_ok`)."""
    k = compiled_kernels("panels")
    return k is not None and k.available() and (blas.POOL or parallel_gates_ok())


def use_compiled(dtype: np.dtype, reset_after: bool) -> bool:
    """Whether the compiled kernels can run this dtype and gate form (float32, reset_after)."""
    return reset_after and _F32 == dtype and compiled_kernels() is not None


@dataclass(frozen=True)
class Route:
    """How one direction of one layer runs; see the module docstring for the kinds.

    ``parallel``: the gate kernels use all cores. ``shares``: for ``shared``, the
    rows (b0, b1) each core takes. ``chunk_bytes``: inference without a cache
    computes the input projections this many bytes' worth of steps at a time.
    ``panels``: for ``steps``, the forward's products are :mod:`grumpy.kernels.panels`'
    on weights packed once per call, on all cores, instead of BLAS's; for ``shared``, the
    shares run on the threads of NumPy's BLAS with those products (grumpy.kernels.pool)."""

    kind: str
    parallel: bool = False
    shares: tuple[tuple[int, int], ...] = ()
    chunk_bytes: int = INFER_CHUNK_BYTES
    panels: bool = False


_STEP = Route("step")  # Routes are frozen: the one generation route is shared


def _even_shares(B: int, n: int) -> tuple[tuple[int, int], ...]:
    edges = [B * i // n for i in range(n + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


def choose(dtype: np.dtype, reset_after: bool, B: int, H: int, *, grad: bool, kind: str | None = None,
           T: int | None = None) -> Route:
    """The route for a batch of B sequences of width H; ``grad``: a cache is kept for
    the backward pass; ``T``: the number of steps when every step is valid (None with a
    mask). ``kind`` names one explicitly (ValueError if it cannot run here)."""
    if kind is not None:
        return _named(kind, dtype, reset_after, B, H, grad)
    if not use_compiled(dtype, reset_after):
        return Route("numpy")
    if not grad and T == 1 and B == 1:  # one step of one stream: the loops' set-up would dominate
        return _STEP
    n_shares = min(blas.cores(), B // SHARE_MIN_ROWS)
    # Shares only with MKL: NumPy's OpenBLAS sets its thread count for the whole process
    # (blas.one_thread), and its shares measured slower than ``steps`` at 6 of 8 sizes.
    if not grad and blas.MKL is not None and n_shares >= 2:
        return Route("shared", shares=_even_shares(B, n_shares))
    whole_loop = B * H * 3 * H <= LOOP_MAX_MACS
    # Inference of a batch below PANELS_MIN_H, where NumPy's BLAS lends its threads: each
    # takes a share of the rows through the steps, grumpy's products on W_hh packed once
    # (grumpy.kernels.pool.shared_steps), nothing synchronised per step.
    if not grad and B > 1 and not whole_loop and H < PANELS_MIN_H and blas.POOL and panels_ok():
        return Route("shared", panels=True)
    # With the opt-in MKL, packing pays for any batch; for one stream only inside the compiled
    # loop (a step that reads the whole W_hh once for a matrix-vector product gains nothing).
    if blas.MKL is not None and (B > 1 or (whole_loop and H >= PACKED_MIN_H)):
        return Route("packed", _parallel("packed", B, H))
    # One stream (without MKL): the compiled loop at any H, its products NumPy's own sgemv.
    # Larger batches' products from Python: NumPy's own call measured faster than the same
    # library's sgemm called from the compiled loop.
    if blas.SGEMM is not None and (whole_loop or (B == 1 and blas.MKL is None)):
        return Route("loop")
    return Route("steps", _parallel("steps", B, H), panels=_panels(B, H))


def _named(kind: str, dtype: np.dtype, reset_after: bool, B: int, H: int, grad: bool) -> Route:
    if kind not in ROUTES:
        raise ValueError(f"route: expected one of {', '.join(ROUTES)}, got {kind!r}")
    if kind == "numpy":
        return Route("numpy")
    if not use_compiled(dtype, reset_after):
        raise ValueError(f"route {kind!r}: needs numba, float32 and reset_after=True "
                         f"(got {np.dtype(dtype)}, reset_after={reset_after})")
    if kind in ("shared", "step") and grad:
        raise ValueError(f"route {kind!r}: inference only (grad=False)")
    if kind == "packed" and blas.MKL is None:
        raise ValueError("route 'packed': needs MKL's packed product, which is not loaded")
    if blas.SGEMM is None and (kind == "loop" or (kind == "shared" and blas.MKL is None)):
        raise ValueError(f"route {kind!r}: needs NumPy's BLAS (OpenBLAS), which was not found")
    if kind == "shared":
        return Route("shared", shares=_even_shares(B, max(1, min(blas.cores(), B))))
    if kind == "step":
        return _STEP
    return Route(kind, _parallel(kind, B, H), panels=kind == "steps" and _panels(B, H))


def _parallel(kind: str, B: int, H: int) -> bool:
    """Whether the gate kernels use all cores: on the ``steps`` route, where NumPy's BLAS
    lends its threads (grumpy.kernels.pool), from PARALLEL_MIN_POOL elements a step;
    otherwise from PARALLEL_MIN, on numba's threads where they run on TBB
    (:func:`parallel_gates_ok`)."""
    if kind == "steps" and blas.POOL:
        return B * H >= PARALLEL_MIN_POOL
    return B * H >= PARALLEL_MIN and parallel_gates_ok()


def _panels(B: int, H: int) -> bool:
    """Whether the ``steps`` route's products are grumpy's on weights packed once per call
    (a batch at large H, where OpenBLAS repacks W_hh at every step's call)."""
    return B > 1 and H >= PANELS_MIN_H and panels_ok()
