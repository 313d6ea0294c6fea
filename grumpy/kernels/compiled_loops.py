"""The compiled routes (``loop``, ``packed``, ``steps``, ``shared``): float32, reset_after.

The same arithmetic as :mod:`grumpy.kernels.numpy_loops` (tested against it and
against :mod:`grumpy.cell`), with the gate math of each step fused into one
compiled pass (:mod:`grumpy.kernels.nb`) and, on the ``loop`` and ``packed``
routes, the whole time loop compiled. The gates overwrite the input projections
in place (one (T, B, 3H) array less), and the gate kernels add b_ih themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from grumpy.kernels import blas
from grumpy.kernels.blas import column_sums, matmul
from grumpy.kernels.common import SeqCache, biases, mask2, new_states, outputs, scratch, state_views, time_steps
from grumpy.kernels.route import Route, compiled_kernels

_NO_X = np.empty((0, 0, 0), np.float32)  # the packed loop's x when the gates hold the input projections


def _nb() -> Any:
    nb = compiled_kernels()
    assert nb is not None, "a compiled route was chosen without numba"
    return nb


def _pool() -> Any:
    pool = compiled_kernels("pool")
    assert pool is not None, "a compiled route was chosen without numba"
    return pool


def transposed(w: np.ndarray) -> np.ndarray:
    """A contiguous copy of w.T, by the compiled tiled transpose for large float32 matrices
    (NumPy's strided copy is several times slower there)."""
    nb = compiled_kernels()
    if nb is None or w.dtype != np.float32 or w.ndim != 2 or w.size < 1 << 18:
        return np.ascontiguousarray(w.T)
    out = np.empty(w.shape[::-1], w.dtype)
    nb.transpose(np.ascontiguousarray(w), out)
    return out


def _panels() -> Any:
    k = compiled_kernels("panels")
    assert k is not None, "route.panels was chosen without the panel kernels"
    return k


def _panel_product(w: np.ndarray) -> Callable[[np.ndarray, np.ndarray], Any]:
    """out (N, R) = a (N, K) w^T by grumpy.kernels.panels, w (R, K) packed now, once."""
    k = _panels()
    wp = k.pack(w)
    # rows of a must be contiguous for the kernel: a no-op for the states and a contiguous x
    return lambda a, out: k.products(wp, np.ascontiguousarray(a), out)


def linear(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out (N, R) = x (N, K) w^T, w (R, K): a linear layer's product (a model's head), by
    :func:`grumpy.kernels.blas.matmul`. (It ran on the panel kernels at K >= 1024 while
    they ran on numba's threads, to keep NumPy's pool asleep between passes; since they
    run on that pool, BLAS is faster there: 1.3 against 2.0 ms at 3200 x 1024 x 65.)"""
    return matmul(x, w.T, out)


def _input_product(route: Route, weight_ih: np.ndarray) -> Callable[[np.ndarray, np.ndarray], Any]:
    """gates (N, 3H) = x (N, I) W_ih^T, N = steps x batch: the route's product (the
    ``shared`` route's input product is BLAS's, one per chunk)."""
    if route.panels and route.kind == "steps":
        return _panel_product(weight_ih)
    return lambda x2, g2: matmul(x2, weight_ih.T, g2)


def _recurrent_product(route: Route, weight_hh: np.ndarray, B: int) -> Callable[[np.ndarray, np.ndarray], Any]:
    """gh (B, 3H) = h (B, H) W_hh^T, for the ``steps`` route."""
    if route.panels:
        return _panel_product(weight_hh)
    if B == 1:  # one stream: W_hh h on W_hh's contiguous rows, faster than h W_hh^T
        whh = np.ascontiguousarray(weight_hh)
        return lambda h, gh: matmul(whh, h[0], gh[0])
    whh_t = transposed(weight_hh)
    return lambda h, gh: matmul(h, whh_t, gh)


class _Loop:
    """The compiled time loop over whichever product the route takes: NumPy's own sgemm
    on the weights as they are (``loop``, ``shared`` without MKL), or MKL's on weights it
    packed once (``packed``, ``shared`` with MKL). Called for a range of steps (a chunk)
    and a range of rows (a share); ``stepwise`` loops compute the input projections
    step by step from x (inference shares)."""

    def __init__(self, route: Route, weight_ih: np.ndarray, weight_hh: np.ndarray, rows: int, stepwise: bool) -> None:
        self.parallel = route.parallel
        self.mkl = route.kind == "packed" or (route.kind == "shared" and blas.MKL is not None)
        serial = route.kind == "shared"  # one share per thread: products on that thread
        if self.mkl:
            self.wh = blas.Packed(weight_hh, rows, trans=True, serial=serial)
            self.wi = blas.Packed(weight_ih, rows, trans=True, serial=serial) if stepwise else None
        else:
            # one stream: W_hh's rows for sgemv; a batch: W_hh^T for sgemm (see nb.forward_loop)
            self.whh = np.ascontiguousarray(weight_hh) if rows == 1 else transposed(weight_hh)
            self.wih = np.ascontiguousarray(weight_ih) if stepwise else _NO_W

    def __call__(self, x: np.ndarray, gates: np.ndarray, bih: np.ndarray, bhh: np.ndarray, hs: np.ndarray,
                 hn_all: np.ndarray, m2: np.ndarray, reverse: bool, b0: int, b1: int) -> None:
        nb = _nb()
        gh = np.empty((b1 - b0, gates.shape[2]), gates.dtype)
        if self.mkl:
            with self.wh.threads():
                nb.forward_loop_packed(blas.COMPUTE, self.wh.ptr, self.wi.ptr if self.wi else 0, x, gates, bih, bhh,
                                       hs, hn_all, m2, reverse, gh, self.parallel, b0, b1)
        else:
            nb.forward_loop(blas.SGEMM, blas.SGEMV, x, self.wih, gates, self.whh, bih, bhh, hs, hn_all, m2, reverse, gh,
                            self.parallel, b0, b1)


_NO_W = np.empty((0, 0), np.float32)  # the loop's W_ih when the gates hold the input projections


def forward(
    route: Route, x: np.ndarray, h0: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray,
    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, reverse: bool, mask: np.ndarray | None,
    keep_cache: bool, workspace: dict[str, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, SeqCache | None]:
    """See :func:`grumpy.kernels.gru_sequence_forward`."""
    if route.kind == "shared" and not route.panels:
        return _forward_shared(route, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, mask)
    if not keep_cache or route.kind == "shared":  # the shared route on the pool keeps no cache either
        return _forward_inference(route, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, mask)
    T, B, _ = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    gates = scratch(workspace, "gates", (T, B, 3 * H), dt)
    _input_product(route, weight_ih)(x.reshape(T * B, -1), gates.reshape(T * B, 3 * H))
    hs = new_states(h0, T, reverse)
    hn_all = scratch(workspace, "hn", (T, B, H), dt)
    bih, bhh = biases(bias_ih, bias_hh, H, dt)
    m2 = mask2(mask, T, dt)
    if route.kind == "steps":
        fused = _pool().fused_gates("forward", route.parallel)
        product = _recurrent_product(route, weight_hh, B)
        h_in, h_out = state_views(hs, reverse)
        gh = np.empty((B, 3 * H), dt)
        for t in time_steps(T, reverse):
            product(h_in[t], gh)
            fused(gates[t], gh, bih, bhh, h_in[t], h_out[t], hn_all[t], m2[t])
    else:
        _Loop(route, weight_ih, weight_hh, B, stepwise=False)(_NO_X, gates, bih, bhh, hs, hn_all, m2, reverse, 0, B)
    _, h_out = state_views(hs, reverse)
    # A view of the states, not a copy (T·B·H floats, and their page faults). Read-only, so
    # that writing into it, which would corrupt the cache the backward pass reads,
    # raises instead of silently giving wrong gradients.
    if mask is not None:
        output = h_out * mask
    else:
        output = h_out.view()
        output.flags.writeable = False
    return output, hs[0 if reverse else T].copy(), SeqCache(x, hs, gates, hn_all, mask, reverse, True, route)


def _forward_inference(
    route: Route, x: np.ndarray, h0: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray,
    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, reverse: bool, mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, None]:
    """The forward without a cache, input projections a chunk of steps at a time:
    memory no longer grows as T * B * 3H, and the gate kernels keep only the state. Each
    chunk's steps run in the compiled loop, step by step from Python (``steps``), or, for
    the ``shared`` route on the pool, as blocks of the batch's rows on the threads of
    NumPy's BLAS (:func:`grumpy.kernels.pool.shared_steps`: grumpy's products on W_hh
    packed once, nothing synchronised per step)."""
    T, B, I = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    chunk = max(1, min(T, route.chunk_bytes // (B * 3 * H * dt.itemsize)))
    gbuf = np.empty((chunk, B, 3 * H), dt)
    hs = new_states(h0, T, reverse)
    bih, bhh = biases(bias_ih, bias_hh, H, dt)
    m2 = mask2(mask, T, dt)
    no_hn = np.empty((0, B, H), dt)  # tells the compiled loop to keep nothing
    loop = _Loop(route, weight_ih, weight_hh, B, stepwise=False) if route.kind in ("loop", "packed") else None
    product = _recurrent_product(route, weight_hh, B) if route.kind == "steps" else None
    shared = _panels().pack(np.ascontiguousarray(weight_hh)) if route.kind == "shared" else None
    project = _input_product(route, weight_ih)
    fused = _pool().fused_gates("infer", route.parallel)
    gh = np.empty((B, 3 * H), dt)
    order = list(time_steps(T, reverse))
    for c0 in range(0, T, chunk):
        ts = order[c0 : c0 + chunk]
        lo, n = min(ts), len(ts)
        g = gbuf[:n]
        project(x[lo : lo + n].reshape(n * B, I), g.reshape(n * B, 3 * H))
        if loop is not None:  # states lo .. lo + n: those entering and leaving this chunk's steps
            loop(_NO_X, g, bih, bhh, hs[lo : lo + n + 1], no_hn, m2[lo : lo + n], reverse, 0, B)
            continue
        if shared is not None:
            _pool().shared_steps(shared, g, bih, bhh, hs, m2, lo, reverse, gh)
            continue
        assert product is not None
        for t in ts:
            ip, io = (t + 1, t) if reverse else (t, t + 1)
            product(hs[ip], gh)
            fused(g[t - lo], gh, bih, bhh, hs[ip], hs[io], m2[t])
    out, h_last = outputs(hs, mask, reverse)
    return out, h_last, None


def _forward_shared(
    route: Route, x: np.ndarray, h0: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray,
    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, reverse: bool, mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, None]:
    """Inference with the batch shared among the cores: each share of rows runs the whole
    sequence on its own thread (:func:`grumpy.kernels.blas.run_each`, BLAS on one thread
    inside each), input projections included, step by step while its rows are in cache.
    Nothing of size T is kept but the states, and nothing synchronises until the end
    (the rows of a GRU batch never meet)."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    loop = _Loop(route, weight_ih, weight_hh, max(b1 - b0 for b0, b1 in route.shares), stepwise=True)
    x = np.ascontiguousarray(x)
    hs = new_states(h0, T, reverse)
    bih, bhh = biases(bias_ih, bias_hh, H, dt)
    m2 = mask2(mask, T, dt)
    no_hn = np.empty((0, B, H), dt)

    def share(b0: int, b1: int) -> None:
        loop(x, np.empty((1, b1 - b0, 3 * H), dt), bih, bhh, hs, no_hn, m2, reverse, b0, b1)

    blas.run_each([partial(share, b0, b1) for b0, b1 in route.shares])
    out, h_last = outputs(hs, mask, reverse)
    return out, h_last, None


def backward(
    d_output: np.ndarray, d_h_last: np.ndarray | None, cache: SeqCache, weight_ih: np.ndarray,
    weight_hh: np.ndarray, bias: bool, consume: bool, need_dx: bool,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """See :func:`grumpy.kernels.gru_sequence_backward`."""
    nb = _nb()
    x, hs, gates, hn_all, mask, reverse, _, route = cache
    assert hn_all is not None
    T, B, _ = x.shape
    H = hs.shape[-1]
    dt = x.dtype
    h_in, _ = state_views(hs, reverse)
    # The gradients overwrite the gates and hn: dgh = [da_r, da_z, r ⊙ da_n] (the hidden
    # side), da_n. In place saves 4·T·B·H floats and a stream of memory per step.
    dgh, da_n = (gates, hn_all) if consume else (gates.copy(), hn_all.copy())
    dh = np.zeros((B, H), dt) if d_h_last is None else np.array(d_h_last, dt, order="C")
    m2 = mask2(mask, T, dt)
    d_output = np.ascontiguousarray(d_output, dt)
    whh = np.ascontiguousarray(weight_hh)
    if route.kind == "packed":
        pk = blas.Packed(whh, B, trans=False)
        with pk.threads():
            nb.backward_loop_packed(blas.COMPUTE, pk.ptr, d_output, hs, dgh, da_n, m2, reverse, dh, route.parallel)
    elif route.kind == "loop":
        nb.backward_loop(blas.SGEMM, blas.SGEMV, d_output, hs, dgh, da_n, m2, reverse, whh, dh, route.parallel)
    else:
        fused = _pool().fused_gates("backward", route.parallel)
        # Also for one stream: d W_hh reads W_hh's rows in order (faster than a transposed copy).
        for t in time_steps(T, reverse, backward=True):
            fused(d_output[t], h_in[t], dgh[t], da_n[t], m2[t], dh)
            matmul(dgh[t], whh, dh, beta=1.0)

    dgh2 = dgh.reshape(T * B, 3 * H)
    dan2 = da_n.reshape(T * B, H)
    x2 = x.reshape(T * B, -1)
    h2 = h_in.reshape(T * B, H)
    dx = None
    if need_dx:
        dx = matmul(dgh2[:, : 2 * H], weight_ih[: 2 * H])
        matmul(dan2, weight_ih[2 * H :], dx, beta=1.0)
        dx = dx.reshape(x.shape)
    grads = {
        # As (x^T dG)^T and (h^T dG)^T, the transposes views: MKL runs these faster
        # than dG^T x (docs/benchmarks.md, "How grumpy is fast").
        "weight_ih": np.concatenate([matmul(x2.T, dgh2[:, : 2 * H]).T, matmul(x2.T, dan2).T]),
        "weight_hh": matmul(h2.T, dgh2).T,
    }
    if bias:
        db_hh = column_sums(dgh2)
        grads["bias_ih"] = np.concatenate([db_hh[: 2 * H], column_sums(dan2)])
        grads["bias_hh"] = db_hh
    return dx, dh, grads
