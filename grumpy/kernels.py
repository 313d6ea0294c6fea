"""Fast GRU kernels: one direction of one layer over a whole sequence.

The arithmetic is that of :mod:`grumpy.cell` (tested against it), arranged for
speed:

* the input projections of all T steps are one matrix product before the loop;
* each step does one recurrent product (two for reset_after=False, where the
  reset gate must act before the product) and the gate math in place, in
  buffers allocated once per call;
* the backward pass does one product per step for the state gradient and
  gets the weight gradients as single products over all steps at the end.

Time is always indexed in the input's order. The states live in one array
``hs`` of shape (T+1, B, H): for the forward direction ``hs[0]`` is h0 and
``hs[t+1]`` the state after step t; for the reverse direction ``hs[T]`` is h0
and ``hs[t]`` the state after step t. Either way the states entering and
leaving all steps are plain views of ``hs``, so no per-step copies are needed.

``mask`` (T, B, 1), 1 for valid steps and 0 for padding, implements variable
lengths: a padded step leaves the state unchanged and outputs zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import os

import numpy as np

from grumpy import _blas
from grumpy._blas import column_sums, matmul
from grumpy._util import sigmoid

_NB = None  # grumpy._nbkernels once imported; False when numba is missing or disabled
# Use the parallel (both cores) gate kernels from this many batch x hidden elements
# per step on. Below it a second thread pool beside BLAS's (whose threads spin
# between the step's products) oversubscribed two cores: -4..-11% at B=128, H=256,
# +6..9% at B=128, H=1024 (A/B in child processes). GRUMPY_PARALLEL_MIN overrides.
PARALLEL_MIN = int(os.environ.get("GRUMPY_PARALLEL_MIN", 1 << 16))
# Without MKL's packed product (see _use_packed): up to this many multiply-adds per
# step (B * H * 3H) the whole time loop runs compiled (numba calling scipy's BLAS);
# above it the loop is Python's and the products NumPy's, whose BLAS measured up to
# 1.6x faster on large products than the one numba calls. With MKL the loop is
# compiled at every size, except for one stream above this size.
LOOP_MAX_MACS = int(os.environ.get("GRUMPY_LOOP_MAX_MACS", 1 << 19))
# With MKL, inference shares a batch among the cores (:func:`grumpy._blas.run_each`)
# when each share gets at least this many rows. In-process A/B, shared against not, at
# B=128: 0.60x the time at H=64, 0.90x at 256, 0.71x at 1024; at 32 rows a share it
# measured 0.98-1.31x and at 16 0.80-1.49x, so smaller batches use all cores in each
# step instead. Training measured no gain: 0.96-1.10x, and again 1.0-1.15x for the
# whole step with per-share input products and per-share backward loops, although its
# forward alone ran 0.7-0.87x; putting MKL's OpenMP workers to sleep after the large
# products (kmp_set_blocktime 0) made it 1.07-1.12x slower still. GRUMPY_SHARE_MIN_ROWS
# overrides.
SHARE_MIN_ROWS = int(os.environ.get("GRUMPY_SHARE_MIN_ROWS", 64))


def _numba():  # type: ignore[no-untyped-def]
    """The compiled kernels module, or None (numba not installed, or GRUMPY_NUMBA=0)."""
    global _NB
    if _NB is None:
        _NB = False
        if os.environ.get("GRUMPY_NUMBA", "1") != "0":
            try:
                from grumpy import _nbkernels

                _NB = _nbkernels
            except ImportError:
                pass
    return _NB or None


def use_compiled(dtype: np.dtype, reset_after: bool) -> bool:
    """Whether the compiled (numba) path runs for this dtype and GRU variant."""
    return np.dtype(dtype) == np.float32 and reset_after and _numba() is not None


def _mask2(mask: np.ndarray | None, T: int, dt: np.dtype) -> np.ndarray:
    """mask (T, B, 1) -> (T, B) for the compiled kernels; (T, 0) stands for no mask."""
    if mask is None:
        return np.empty((T, 0), dt)
    return np.ascontiguousarray(mask[..., 0], dt)



class SeqCache(NamedTuple):
    x: np.ndarray  # (T, B, I) input
    hs: np.ndarray  # (T+1, B, H) states, see module docstring
    gates: np.ndarray  # (T, B, 3H) activations r, z, n
    hn: np.ndarray | None  # (T, B, H) W_hn h + b_hn (reset_after only)
    mask: np.ndarray | None  # (T, B, 1)
    reverse: bool
    reset_after: bool


def _scratch(workspace: dict[str, np.ndarray] | None, name: str, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    """An uninitialised array, reused from ``workspace`` when one of that shape is there.

    Fresh memory is expensive here: its page faults made the input product of a
    training step 6x slower (39 against 6 ms at T=100, B=128, H=256)."""
    if workspace is None:
        return np.empty(shape, dt)
    a = workspace.get(name)
    if a is None or a.shape != shape or a.dtype != dt:
        a = workspace[name] = np.empty(shape, dt)
    return a


def _transposed(w: np.ndarray) -> np.ndarray:
    """A contiguous copy of w.T; compiled and tiled for large float32 matrices (NumPy's
    strided copy took 17.6 ms for a (3072, 1024) matrix, the compiled one 4.9 ms)."""
    nb = _numba()
    if nb is None or w.dtype != np.float32 or w.ndim != 2 or w.size < 1 << 18:
        return np.ascontiguousarray(w.T)
    out = np.empty(w.shape[::-1], w.dtype)
    nb.transpose(np.ascontiguousarray(w), out)
    return out


def _use_packed(B: int, H: int, per_step: bool) -> bool:
    """Whether the recurrent products go to MKL's packed product (when MKL is there).

    Batches: always. One stream: inside the compiled loop from H = 128 on (7.3 against
    12.6 us per step for scipy's BLAS at H=256; at H=64 the benchmark measured no gain).
    One stream at large H takes the ordinary product (:func:`grumpy._blas.matmul`):
    packing measured no faster for a matrix-vector product (286 against 284 us at
    H=1024), and a step that reads the whole W_hh once gains nothing from it."""
    return B > 1 or (not per_step and H >= 128)


_NO_X = np.empty((0, 0, 0), np.float32)  # the compiled forward's x when the gates hold the input projections


def _shares(B: int) -> list[tuple[int, int]] | None:
    """The rows (b0, b1) of each core's share of a batch of B, or None (not shared)."""
    n = min(_blas.cores(), B // max(1, SHARE_MIN_ROWS))
    if _blas.MKL is None or n < 2:
        return None
    edges = [B * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _biases(
    bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, H: int, dt: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(b_ih, b_hh), zeros (3H,) for a missing one: the compiled kernels always add both."""
    zeros = np.zeros(3 * H, dt)
    return (bias_ih if bias_ih is not None else zeros), (bias_hh if bias_hh is not None else zeros)


def state_views(hs: np.ndarray, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(states entering each step, states leaving each step), both (T, B, H) in time order."""
    return (hs[1:], hs[:-1]) if reverse else (hs[:-1], hs[1:])


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
) -> tuple[np.ndarray, np.ndarray, SeqCache | None]:
    """x (T, B, I), h0 (B, H) -> output (T, B, H), h_last (B, H), cache.

    With ``keep_cache=False`` (inference) the cache is None and the gate
    activations live in per-step buffers instead of (T, B, 3H) arrays.
    ``workspace``: a dict in which the compiled path keeps its large buffers
    for the next call (the cache refers to them, so a cache is good only until
    the next forward with the same workspace).
    """
    T, B, _ = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    compiled = use_compiled(dt, reset_after)
    per_step = B * H * 3 * H > LOOP_MAX_MACS  # else the compiled path runs the whole loop compiled
    shares = _shares(B) if compiled and not keep_cache else None
    if shares is not None:
        return _forward_inference_shared(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, mask, shares)
    # MKL's packed product when available; else a contiguous transposed copy: products on
    # a transposed view run up to 2x slower. One stream at large sizes uses W_hh itself
    # (matrix-vector products on its rows).
    pk = _blas.packed(weight_hh, B, trans=True) if compiled and _use_packed(B, H, per_step) else None
    whh_t = None if compiled and (pk is not None or (per_step and B == 1)) else _transposed(weight_hh)
    if not keep_cache and compiled and (per_step or pk is not None):
        return _forward_inference(x, h0, weight_ih, weight_hh, whh_t, pk, bias_ih, bias_hh, reverse, mask)

    if compiled:  # the gates overwrite the input projections in place: one (T, B, 3H) array less
        gi = _scratch(workspace, "gates", (T, B, 3 * H), dt)
        matmul(x.reshape(T * B, -1), weight_ih.T, gi.reshape(T * B, 3 * H))
    else:
        gi = matmul(x.reshape(T * B, -1), weight_ih.T).reshape(T, B, 3 * H)
    if bias_ih is not None and not compiled:  # the compiled gate kernels add it themselves
        gi += bias_ih
    if not reset_after and bias_hh is not None:
        gi[..., 2 * H :] += bias_hh[2 * H :]  # b_hn sits outside the product: fold it in once

    if compiled:
        nb = _numba()
        hs = np.empty((T + 1, B, H), dt)
        hs[T if reverse else 0] = h0
        gates = gi
        hn_all = _scratch(workspace, "hn", (T, B, H), dt)
        bih, bhh = _biases(bias_ih, bias_hh, H, dt)
        m2 = _mask2(mask, T, dt)
        gh = np.empty((B, 3 * H), dt)
        if pk is not None:
            with pk.threads():
                nb.forward_loop_packed(_blas.COMPUTE, pk.ptr, 0, _NO_X, gates, bih, bhh, hs, hn_all, m2, reverse,
                                       gh, B * H >= PARALLEL_MIN, 0, B)
        elif not per_step:
            nb.forward_loop(gates, whh_t, bih, bhh, hs, hn_all, m2, reverse, gh)
        else:
            fused = nb.gates_forward_parallel if B * H >= PARALLEL_MIN else nb.gates_forward_serial
            whh = np.ascontiguousarray(weight_hh)
            for t in range(T - 1, -1, -1) if reverse else range(T):
                ip, io = (t + 1, t) if reverse else (t, t + 1)
                if B == 1:  # W h on contiguous rows: measured 1.3x faster than h W^T here
                    matmul(whh, hs[ip, 0], gh[0])
                else:
                    matmul(hs[ip], whh_t, gh)
                fused(gates[t], gh, bih, bhh, hs[ip], hs[io], hn_all[t], m2[t])
        _, h_out = state_views(hs, reverse)
        # A view of the states, not a copy (52 MB at T=100, B=128, H=1024, and its page
        # faults). Read-only, so that writing into it, which would corrupt the cache the
        # backward pass reads, raises instead of silently giving wrong gradients.
        if mask is not None:
            output = h_out * mask
        else:
            output = h_out.view()
            output.flags.writeable = not keep_cache
        h_last = hs[0 if reverse else T].copy()
        cache = SeqCache(x, hs, gates, hn_all, mask, reverse, reset_after) if keep_cache else None
        return output, h_last, cache
    w_rz_t = whh_t[:, : 2 * H] if not reset_after else None
    w_n_t = np.ascontiguousarray(whh_t[:, 2 * H :]) if not reset_after else None
    b_rz = bias_hh[: 2 * H] if bias_hh is not None else None

    hs = np.empty((T + 1, B, H), dt)
    hs[T if reverse else 0] = h0
    Tc = T if keep_cache else 1  # without a cache, one step's gates are all we need
    gates = np.empty((Tc, B, 3 * H), dt)
    hn_all = np.empty((Tc, B, H), dt) if reset_after else None
    gh = np.empty((B, 3 * H), dt)
    tmp = np.empty((B, H), dt)

    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h_prev = hs[t + 1] if reverse else hs[t]
        h_new = hs[t] if reverse else hs[t + 1]
        tc = t if keep_cache else 0
        g = gates[tc]
        r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        if reset_after:
            matmul(h_prev, whh_t, gh)
            if bias_hh is not None:
                gh += bias_hh
            np.add(gi[t, :, : 2 * H], gh[:, : 2 * H], out=g[:, : 2 * H])
            sigmoid(g[:, : 2 * H], out=g[:, : 2 * H])
            hn_all[tc] = gh[:, 2 * H :]
            np.multiply(r, hn_all[tc], out=n)
        else:
            matmul(h_prev, w_rz_t, gh[:, : 2 * H])
            if b_rz is not None:
                gh[:, : 2 * H] += b_rz
            np.add(gi[t, :, : 2 * H], gh[:, : 2 * H], out=g[:, : 2 * H])
            sigmoid(g[:, : 2 * H], out=g[:, : 2 * H])
            np.multiply(r, h_prev, out=tmp)
            matmul(tmp, w_n_t, n)
        n += gi[t, :, 2 * H :]
        np.tanh(n, out=n)
        # h' = (1 − z) n + z h = n + z (h − n)
        np.subtract(h_prev, n, out=tmp)
        tmp *= z
        np.add(n, tmp, out=h_new)
        if mask is not None:
            # padded steps keep the previous state: h' = h + m (h' − h)
            np.subtract(h_new, h_prev, out=tmp)
            tmp *= mask[t]
            np.add(h_prev, tmp, out=h_new)

    _, h_out = state_views(hs, reverse)
    if mask is not None:
        output = h_out * mask
    else:
        output = h_out.copy() if keep_cache else h_out  # nothing else refers to hs then
    h_last = hs[0 if reverse else T].copy()
    cache = SeqCache(x, hs, gates, hn_all, mask, reverse, reset_after) if keep_cache else None
    return output, h_last, cache


# Inference computes the input projections this many bytes' worth of steps at a
# time: its memory no longer grows as T * B * 3H (157 MB at T=100, B=128, H=1024).
# Smaller chunks measured slower at H=64 (more, smaller products); larger ones no faster.
_INFER_CHUNK_BYTES = 1 << 23


def _forward_inference(
    x: np.ndarray, h0: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray, whh_t: np.ndarray | None,
    pk: _blas.Packed | None, bias_ih: np.ndarray | None, bias_hh: np.ndarray | None, reverse: bool, mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, None]:
    """The compiled path's forward without a cache (float32, reset_after, large sizes):
    the same arithmetic, step by step, with per-step buffers."""
    nb = _numba()
    T, B, I = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    chunk = max(1, min(T, _INFER_CHUNK_BYTES // (B * 3 * H * dt.itemsize)))
    gbuf = np.empty((chunk, B, 3 * H), dt)
    hs = np.empty((T + 1, B, H), dt)
    hs[T if reverse else 0] = h0
    gh = np.empty((B, 3 * H), dt)
    bih, bhh = _biases(bias_ih, bias_hh, H, dt)
    m2 = _mask2(mask, T, dt)
    fused = nb.gates_infer_parallel if B * H >= PARALLEL_MIN else nb.gates_infer_serial
    no_hn = np.empty((0, B, H), dt)  # tells the compiled loop to keep nothing
    w_ih_t = weight_ih.T
    whh = np.ascontiguousarray(weight_hh) if B == 1 else None
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    for c0 in range(0, T, chunk):
        ts = order[c0 : c0 + chunk]
        lo, n = min(ts), len(ts)
        g = gbuf[:n]
        matmul(x[lo : lo + n].reshape(n * B, I), w_ih_t, g.reshape(n * B, 3 * H))
        if pk is not None:  # states lo .. lo + n: those entering and leaving this chunk's steps
            with pk.threads():
                nb.forward_loop_packed(_blas.COMPUTE, pk.ptr, 0, _NO_X, g, bih, bhh, hs[lo : lo + n + 1], no_hn,
                                       m2[lo : lo + n], reverse, gh, B * H >= PARALLEL_MIN, 0, B)
            continue
        for t in ts:
            ip, io = (t + 1, t) if reverse else (t, t + 1)
            if B == 1:
                matmul(whh, hs[ip, 0], gh[0])
            else:
                matmul(hs[ip], whh_t, gh)
            fused(g[t - lo], gh, bih, bhh, hs[ip], hs[io], m2[t])
    _, h_out = state_views(hs, reverse)
    output = h_out * mask if mask is not None else h_out
    return output, hs[0 if reverse else T].copy(), None


def _forward_inference_shared(
    x: np.ndarray, h0: np.ndarray, weight_ih: np.ndarray, weight_hh: np.ndarray, bias_ih: np.ndarray | None,
    bias_hh: np.ndarray | None, reverse: bool, mask: np.ndarray | None, shares: list[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray, None]:
    """:func:`_forward_inference` with the batch shared among the cores (MKL): each share
    of rows runs the whole sequence on its own thread, input projections included, step
    by step, while its rows are in cache. Nothing of size T is kept but the states."""
    nb = _numba()
    T, B, _ = x.shape
    H = h0.shape[-1]
    dt = x.dtype
    rows = max(b1 - b0 for b0, b1 in shares)
    wh = _blas.Packed(weight_hh, rows, trans=True, serial=True)
    wi = _blas.Packed(weight_ih, rows, trans=True, serial=True)
    x = np.ascontiguousarray(x)
    hs = np.empty((T + 1, B, H), dt)
    hs[T if reverse else 0] = h0
    bih, bhh = _biases(bias_ih, bias_hh, H, dt)
    m2 = _mask2(mask, T, dt)
    no_hn = np.empty((0, B, H), dt)

    def share(b0: int, b1: int) -> None:
        g = np.empty((1, b1 - b0, 3 * H), dt)
        gh = np.empty((b1 - b0, 3 * H), dt)
        nb.forward_loop_packed(_blas.COMPUTE, wh.ptr, wi.ptr, x, g, bih, bhh, hs, no_hn, m2, reverse, gh,
                               False, b0, b1)

    _blas.run_each([lambda b0=b0, b1=b1: share(b0, b1) for b0, b1 in shares])
    _, h_out = state_views(hs, reverse)
    output = h_out * mask if mask is not None else h_out
    return output, hs[0 if reverse else T].copy(), None


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
    ``need_dx``), dh0 (B, H), grads.

    grads holds ``weight_ih``, ``weight_hh`` and, with ``bias``, ``bias_ih`` and
    ``bias_hh``, each the sum over all steps. ``consume=True`` lets the compiled
    path overwrite the cache's buffers with gradients: faster and lighter, but
    the cache cannot be used again.
    """
    x, hs, gates, hn_all, mask, reverse, reset_after = cache
    T, B, _ = x.shape
    H = hs.shape[-1]
    dt = x.dtype
    h_in, _ = state_views(hs, reverse)
    if use_compiled(dt, reset_after):
        return _backward_compiled(d_output, d_h_last, cache, weight_ih, weight_hh, bias=bias, consume=consume,
                                  need_dx=need_dx)

    # dG: gradients of the gate pre-activations on the input side [a_r, a_z, a_n];
    # for reset_after the hidden side differs in its n part, r ⊙ da_n, kept in d_hn.
    dG = np.empty((T, B, 3 * H), dt)
    d_hn = np.empty((T, B, H), dt) if reset_after else None
    w_hn = weight_hh[2 * H :]
    w_rz = weight_hh[: 2 * H]
    gbuf = np.empty((B, 3 * H), dt)  # the hidden-side gradient of one step
    dh = np.zeros((B, H), dt) if d_h_last is None else np.array(d_h_last, dt)
    dm = np.empty((B, H), dt)
    tmp = np.empty((B, H), dt)

    steps = range(T) if reverse else range(T - 1, -1, -1)
    for t in steps:
        g = gates[t]
        r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
        h_prev = h_in[t]
        d_out = d_output[t]
        # dm: the part of dL/dh' that flows through the cell; what stays in dh from here
        # on is dL/dh_prev, starting with the direct path through z ⊙ h in h' = (1 − z) n + z h.
        if mask is not None:
            dh += d_out * mask[t]
            np.multiply(dh, mask[t], out=dm)
            dh -= dm  # the part that skips a padded step
            np.multiply(dm, z, out=tmp)
            dh += tmp
        else:
            np.add(dh, d_out, out=dm)
            np.multiply(dm, z, out=dh)
        da_r, da_z, da_n = dG[t, :, :H], dG[t, :, H : 2 * H], dG[t, :, 2 * H :]
        # da_z = dm (h − n) z (1 − z)
        np.subtract(h_prev, n, out=da_z)
        da_z *= dm
        np.subtract(1.0, z, out=tmp)
        tmp *= z
        da_z *= tmp
        # da_n = dm (1 − z) (1 − n²)
        np.subtract(1.0, z, out=da_n)
        da_n *= dm
        np.multiply(n, n, out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        da_n *= tmp
        if reset_after:
            # a_n = gi_n + r ⊙ hn: dr = da_n ⊙ hn, d(hn) = da_n ⊙ r
            np.multiply(da_n, hn_all[t], out=da_r)
            np.multiply(da_n, r, out=d_hn[t])
        else:
            # a_n = gi_n + W_hn (r ⊙ h): d(r ⊙ h) = da_n W_hn
            d_rh = matmul(da_n, w_hn)
            np.multiply(d_rh, h_prev, out=da_r)
            d_rh *= r
            dh += d_rh
        np.subtract(1.0, r, out=tmp)
        tmp *= r
        da_r *= tmp
        if reset_after:
            gbuf[:, : 2 * H] = dG[t, :, : 2 * H]
            gbuf[:, 2 * H :] = d_hn[t]
            matmul(gbuf, weight_hh, dh, beta=1.0)
        else:
            matmul(dG[t, :, : 2 * H], w_rz, dh, beta=1.0)

    dG2 = dG.reshape(T * B, 3 * H)
    x2 = x.reshape(T * B, -1)
    h2 = h_in.reshape(T * B, H)
    dx = matmul(dG2, weight_ih).reshape(x.shape) if need_dx else None
    grads = {"weight_ih": matmul(dG2.T, x2)}
    if reset_after:
        dhn2 = d_hn.reshape(T * B, H)
        grads["weight_hh"] = np.concatenate([matmul(dG2[:, : 2 * H].T, h2), matmul(dhn2.T, h2)])
    else:
        rh = (gates[..., :H] * h_in).reshape(T * B, H)
        grads["weight_hh"] = np.concatenate([matmul(dG2[:, : 2 * H].T, h2), matmul(dG2[:, 2 * H :].T, rh)])
    if bias:
        db = column_sums(dG2)
        grads["bias_ih"] = db
        if reset_after:
            grads["bias_hh"] = np.concatenate([db[: 2 * H], column_sums(d_hn.reshape(T * B, H))])
        else:
            grads["bias_hh"] = db.copy()
    return dx, dh, grads


def _backward_compiled(
    d_output: np.ndarray,
    d_h_last: np.ndarray | None,
    cache: SeqCache,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    *,
    bias: bool,
    consume: bool,
    need_dx: bool,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """:func:`gru_sequence_backward` through the compiled time loop (float32, reset_after)."""
    nb = _numba()
    x, hs, gates, hn_all, mask, reverse, _ = cache
    T, B, _ = x.shape
    H = hs.shape[-1]
    dt = x.dtype
    h_in, _ = state_views(hs, reverse)
    # The gradients overwrite the gates and hn: dgh = [da_r, da_z, r ⊙ da_n] (the hidden
    # side), da_n. In place saves 4·T·B·H floats and a stream of memory per step.
    dgh, da_n = (gates, hn_all) if consume else (gates.copy(), hn_all.copy())
    dh = np.zeros((B, H), dt) if d_h_last is None else np.array(d_h_last, dt)
    m2 = _mask2(mask, T, dt)
    d_output = np.ascontiguousarray(d_output, dt)
    whh = np.ascontiguousarray(weight_hh)
    pk = _blas.packed(whh, B, trans=False) if _use_packed(B, H, B * H * 3 * H > LOOP_MAX_MACS) else None
    if pk is not None:
        with pk.threads():
            nb.backward_loop_packed(_blas.COMPUTE, pk.ptr, d_output, hs, dgh, da_n, m2, reverse, dh,
                                    B * H >= PARALLEL_MIN)
    elif B * H * 3 * H <= LOOP_MAX_MACS:
        nb.backward_loop(d_output, hs, dgh, da_n, m2, reverse, whh, dh, np.empty((B, H), dt))
    else:
        fused = nb.gates_backward_parallel if B * H >= PARALLEL_MIN else nb.gates_backward_serial
        # Also for one stream: d W_hh reads W_hh's rows in order, and measured faster
        # (210 against 250 us at H=1024) than a product with a transposed copy.
        for t in range(T) if reverse else range(T - 1, -1, -1):
            fused(d_output[t], hs[t + 1 if reverse else t], dgh[t], da_n[t], m2[t], dh)
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
        # As (x^T dG)^T and (h^T dG)^T: MKL measured 29 against 41 ms and 300 against
        # 315 ms for these products at T*B=12800, H=1024 (the transposes are views).
        "weight_ih": np.concatenate([matmul(x2.T, dgh2[:, : 2 * H]).T, matmul(x2.T, dan2).T]),
        "weight_hh": matmul(h2.T, dgh2).T,
    }
    if bias:
        db_hh = column_sums(dgh2)
        grads["bias_ih"] = np.concatenate([db_hh[: 2 * H], column_sums(dan2)])
        grads["bias_hh"] = db_hh
    return dx, dh, grads


# From this hidden size on, the single-stream step takes its matrix-vector products
# from BLAS (all cores; at H=1024 the step streams 12 MB of weights); below it one
# compiled pass does everything on one core, without BLAS's call and thread costs.
STEP_BLAS_MIN = int(os.environ.get("GRUMPY_STEP_BLAS_MIN", 512))


def gru_step(
    x: np.ndarray,
    h: np.ndarray,
    weight_ih: np.ndarray,
    weight_hh: np.ndarray,
    bias_ih: np.ndarray | None = None,
    bias_hh: np.ndarray | None = None,
    *,
    reset_after: bool = True,
) -> np.ndarray:
    """One GRU step without a cache, for generation: x (I,) or (B, I), h (H,) or (B, H)
    -> the new state, shaped like h.

    A single float32 stream (x 1-d) runs one compiled pass: the three gates'
    matrix-vector products and the gate math fused, no temporaries; anything else
    goes through the reference :func:`grumpy.cell.gru_cell_forward`.
    """
    from grumpy.cell import gru_cell_forward

    x = np.asarray(x)
    h = np.asarray(h)
    H = h.shape[-1]
    dt = h.dtype
    if x.ndim == 1 and h.ndim == 1 and x.dtype == dt and weight_hh.dtype == dt and use_compiled(dt, reset_after):
        nb = _numba()
        out = np.empty(H, dt)
        b_ih, b_hh = _biases(bias_ih, bias_hh, H, dt)
        if H >= STEP_BLAS_MIN:
            # Large: the weights stream from memory; BLAS's matrix-vector products
            # (all cores) then one fused pass over the gates.
            nb.step_gates(matmul(weight_ih, x), matmul(weight_hh, h), b_ih, b_hh, np.ascontiguousarray(h), out)
            return out
        nb.step_serial(
            np.ascontiguousarray(x), np.ascontiguousarray(h),
            np.ascontiguousarray(weight_ih), np.ascontiguousarray(weight_hh), b_ih, b_hh, out,
        )
        return out
    h_new, _ = gru_cell_forward(
        x.reshape(-1, x.shape[-1]), h.reshape(-1, H), weight_ih, weight_hh, bias_ih, bias_hh,
        reset_after=reset_after,
    )
    return h_new.reshape(h.shape)


class GRUStep:
    """One GRU layer prepared for generation, one stream and one step per call:
    ``step(x, h)`` with x (I,), h (H,) -> the new state (H,), the same function as
    :func:`gru_step`.

    For float32 below ``STEP_BLAS_MIN`` it keeps transposed copies of the weights
    for the compiled step (2.3x faster than :func:`gru_step`'s at H=256), so it
    is a snapshot: build a new one after the weights change.
    """

    def __init__(
        self,
        weight_ih: np.ndarray,
        weight_hh: np.ndarray,
        bias_ih: np.ndarray | None = None,
        bias_hh: np.ndarray | None = None,
        *,
        reset_after: bool = True,
    ) -> None:
        self.args = (weight_ih, weight_hh, bias_ih, bias_hh)
        self.reset_after = reset_after
        H = weight_hh.shape[-1]
        dt = weight_hh.dtype
        self._fast = (
            use_compiled(dt, reset_after) and H < STEP_BLAS_MIN and weight_ih.dtype == dt
            and weight_ih.ndim == weight_hh.ndim == 2
        )
        if self._fast:
            b_ih, b_hh = _biases(bias_ih, bias_hh, H, dt)
            self._prepared = (
                np.ascontiguousarray(weight_ih.T), np.ascontiguousarray(weight_hh.T),
                np.ascontiguousarray(b_ih, dt), np.ascontiguousarray(b_hh, dt),
                np.empty((2, 3 * H), dt),
            )

    def __call__(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        h = np.asarray(h)
        w_ih, w_hh = self.args[:2]
        if (self._fast and x.shape == (w_ih.shape[1],) and h.shape == (w_hh.shape[1],)
                and x.dtype == h.dtype == w_hh.dtype):
            out = np.empty_like(h)
            _numba().step_transposed(np.ascontiguousarray(x), np.ascontiguousarray(h), *self._prepared, out)
            return out
        return gru_step(x, h, *self.args, reset_after=self.reset_after)
