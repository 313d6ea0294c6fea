"""The fast path: one direction of one layer over a whole sequence, and one step.

The arithmetic is that of :mod:`grumpy.cell` (tested against it), arranged for
speed. :func:`gru_sequence_forward` and :func:`gru_sequence_backward` are checks
and one dispatch: :func:`grumpy.kernels.route.choose` picks the route (NumPy
loop, compiled loop, packed products, per-step products, shared batch) from the
dtype, gate form, batch, width and whether gradients are needed, and the
backward takes the route its forward took.

==================  ==========================================================
``route``           the decision and every threshold
``common``          the cache, the state array's views, buffers
``numpy_loops``     the ``numpy`` route
``compiled_loops``  the compiled routes
``nb``              the numba kernels they call (gates fused, time loops)
``blas``            matrix products: MKL (packed weights) when installed, else NumPy
``panels``          grumpy's own float32 products on weights packed once (AVX-512)
``pool``            grumpy's parallel work as jobs on the threads of NumPy's own BLAS
``step``            one step for generation, and the ``step`` route
==================  ==========================================================
"""

from __future__ import annotations

import numpy as np

from grumpy.kernels import compiled_loops, numpy_loops
from grumpy.kernels.common import SeqCache, state_views
from grumpy.kernels.compiled_loops import linear
from grumpy.kernels.route import ROUTES, Route, choose, use_compiled
from grumpy.kernels.step import GRUStep, gru_step, steps_forward

__all__ = [
    "ROUTES", "GRUStep", "Route", "SeqCache", "choose", "gru_sequence_backward", "gru_sequence_forward",
    "gru_step", "linear", "state_views", "use_compiled",
]


def gru_sequence_forward(
    x: np.ndarray,
    h0: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None,
    bias_hh: np.ndarray | None,
    *,
    reset_after: bool = True,
    reverse: bool = False,
    mask: np.ndarray | None = None,
    keep_cache: bool = True,
    workspace: dict[str, np.ndarray] | None = None,
    route: str | Route | None = None,
) -> tuple[np.ndarray, np.ndarray, SeqCache | None]:
    """x (T, B, I), h0 (B, H) -> output (T, B, H), h_last (B, H), cache.

    ``mask`` (T, B, 1): 1 for valid steps, 0 for padding (the state is kept and the
    output is zero). With ``keep_cache=False`` (inference) the cache is None and
    the gates live in per-step buffers instead of (T, B, 3H) arrays.
    ``workspace``: a dict in which the compiled routes keep their large buffers for
    the next call (the cache refers to them, so a cache is good only until the next
    forward with the same workspace). ``route``: None to let grumpy choose, or one
    of :data:`ROUTES` (see :mod:`grumpy.kernels.route`).
    """
    T, B, _ = x.shape
    H = h0.shape[-1]
    if not isinstance(route, Route):
        route = choose(x.dtype, reset_after, B, H, grad=keep_cache, kind=route, T=T if mask is None else None)
    if route.kind == "step":
        out, h_last = steps_forward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, mask)
        return out, h_last, None
    if route.kind == "numpy":
        return numpy_loops.forward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, reverse, mask,
                                   keep_cache)
    return compiled_loops.forward(route, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, mask,
                                  keep_cache, workspace)


def gru_sequence_backward(
    d_output: np.ndarray,
    d_h_last: np.ndarray | None,
    cache: SeqCache,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    *,
    bias: bool = True,
    consume: bool = False,
    need_dx: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """d_output (T, B, H), d_h_last (B, H) or None -> dx (T, B, I) (None without
    ``need_dx``), dh0 (B, H), grads, along the route the forward took.

    grads holds ``weight_ih``, ``weight_hh`` and, with ``bias``, ``bias_ih`` and
    ``bias_hh``, each the sum over all steps. ``consume=True`` lets the compiled
    routes overwrite the cache's buffers with gradients: faster and lighter, but
    the cache cannot be used again.
    """
    if cache.route.kind == "numpy":
        return numpy_loops.backward(d_output, d_h_last, cache, weight_ih, weight_hh, bias, need_dx)
    return compiled_loops.backward(d_output, d_h_last, cache, weight_ih, weight_hh, bias, consume, need_dx)
