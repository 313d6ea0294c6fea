"""The compiled GRU time loops (float32, reset_after=True), used when numba is installed.

At small sizes a NumPy time loop spends its time in Python (a dozen array calls
per step at about a microsecond each); at large sizes in several passes over
memory for the gate math. Compiling the whole time loop removes both: each
step is one BLAS call for the recurrent product and one fused pass over the
gates, parallel over the batch when the batch is large.

numba's own tanh is a scalar libm call (tens of nanoseconds per element), so
the gates use a rational approximation that vectorises: tanh(x) ≈ x P(x²)/Q(x²)
on |x| ≤ 9 (beyond which float32 tanh rounds to ±1), fitted for grumpy to a
maximum relative error of 3.3e-7 (at most 6 ulp) in float32. float64 never
comes here: it keeps NumPy's correctly rounded tanh.

Imported lazily (:func:`grumpy.kernels.route.compiled_kernels`), so ``import grumpy``
needs NumPy only.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.extending import intrinsic

from grumpy.kernels.blas import NO_TRANS as _NT
from grumpy.kernels.blas import PACKED as _PK
from grumpy.kernels.blas import ROW_MAJOR as _RM
from grumpy.kernels.blas import TRANS as _TR

_P0, _P1, _P2, _P3, _P4 = (np.float32(c) for c in (9.99999992e-01, 1.33968640e-01, 3.51427694e-03,
                                                    2.09118331e-05, 1.37653380e-08))
_Q1, _Q2, _Q3, _Q4 = (np.float32(c) for c in (4.67301883e-01, 2.59483958e-02, 3.31599052e-04, 7.94650036e-07))
_LIM = np.float32(9.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
# The one-stream step reads only an input's nonzero columns of W_ih when at most 1 in this
# many entries is nonzero (the gathered loop does not vectorise; a dense one does).
SPARSE_FRACTION = 4


# fastmath without 'nnan'/'ninf': LLVM may reassociate and fuse, but may not assume
# values are finite, or a NaN from a diverging run would come out as a finite number.
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(inline="always", fastmath=_FM, error_model="numpy", cache=True)
def tanh32(x):
    # Selects, not min/max (they vectorise); written so that NaN, which compares
    # false, passes through instead of being clamped to a finite value.
    x = _LIM if x > _LIM else x
    x = -_LIM if x < -_LIM else x
    s = x * x
    p = (((_P4 * s + _P3) * s + _P2) * s + _P1) * s + _P0
    q = (((_Q4 * s + _Q3) * s + _Q2) * s + _Q1) * s + _ONE
    t = x * p / q
    # The fit overshoots 1 by up to 3e-7 near the clamp; GRU states must stay in [-1, 1].
    t = _ONE if t > _ONE else t
    return -_ONE if t < -_ONE else t


@njit(inline="always", fastmath=_FM, error_model="numpy", cache=True)
def sigm32(x):
    return _HALF + _HALF * tanh32(_HALF * x)


@njit(inline="always", cache=True)
def planes(v):
    """v (3H,) -> its r, z and n parts, three 1-d views."""
    H = v.shape[0] // 3
    return v[:H], v[H : 2 * H], v[2 * H :]


@njit(inline="always", fastmath=_FM, error_model="numpy", cache=True)
def gates(a_ir, a_iz, a_in, a_hr, a_hz, a_hn):
    """The README's equations for one unit, from the pre-activations
    a_i* = W_i* x + b_i* (input side) and a_h* = W_h* h + b_h* (hidden side):
    r = σ(a_ir + a_hr), z = σ(a_iz + a_hz), n = tanh(a_in + r a_hn)."""
    r = sigm32(a_ir + a_hr)
    z = sigm32(a_iz + a_hz)
    n = tanh32(a_in + r * a_hn)
    return r, z, n


@njit(inline="always", fastmath=_FM, error_model="numpy", cache=True)
def blend(z, n, h, m):
    """The new state h' = (1 − z) n + z h, written n + z (h − n) (the same in exact
    arithmetic, one multiply fewer), kept at h where the mask m is 0 (padding):
    h + m (h' − h)."""
    return h + m * ((n + z * (h - n)) - h)


def _gates_forward(g, gh, bih, bhh, hp, ho, hn, m):
    """One step's gate math, fused and in place: g (B, 3H) holds the input projections
    W_ih x (without b_ih) on entry and [r, z, n] on exit; gh (B, 3H) = h W_hh^T; bih,
    bhh (3H,) the biases; hp (B, H) the state in -> ho (B, H) the state out; hn (B, H)
    = W_hn h + b_hn; m (B,) the mask (1 valid, 0 padding) or (0,) for none.

    b_ih is added here rather than over the whole (T, B, 3H) projection, a pass that
    read and wrote T·B·3H floats.

    Each row is cut into its r, z, n planes before the loop: with one 1-d view per
    operand LLVM vectorises the single fused loop, which indexing g[b, H + j] does not
    (docs/benchmarks.md, "How grumpy is fast", has the figures behind these kernels)."""
    B, H = hp.shape
    masked = m.shape[0] > 0
    b_ir, b_iz, b_in = planes(bih)
    b_hr, b_hz, b_hn = planes(bhh)
    for b in prange(B):
        mb = m[b] if masked else _ONE
        g_r, g_z, g_n = planes(g[b])
        h_r, h_z, h_n = planes(gh[b])
        hpb, hob, hnb = hp[b], ho[b], hn[b]
        for j in range(H):
            a_hn = h_n[j] + b_hn[j]
            r, z, n = gates(g_r[j] + b_ir[j], g_z[j] + b_iz[j], g_n[j] + b_in[j],
                            h_r[j] + b_hr[j], h_z[j] + b_hz[j], a_hn)
            g_r[j], g_z[j], g_n[j], hnb[j] = r, z, n, a_hn
            hob[j] = blend(z, n, hpb[j], mb)


def _gates_backward(do, hp, g, hn, m, dh):
    """One step backward, fused and in place: do (B, H) the output's gradient; dh (B, H)
    dL/dh' in, replaced by the direct part of dL/dh (through z and padding); g (B, 3H)
    [r, z, n] in, replaced by [da_r, da_z, r ⊙ da_n] (the hidden side); hn (B, H) in,
    replaced by da_n. Planes as in the forward; reading and writing the same arrays
    lets LLVM vectorise without the overlap checks that separate outputs would fail."""
    B, H = hp.shape
    masked = m.shape[0] > 0
    for b in prange(B):
        mb = m[b] if masked else _ONE
        g_r, g_z, g_n = planes(g[b])
        hnb, hpb, dob, dhb = hn[b], hp[b], do[b], dh[b]
        for j in range(H):
            r, z, n, a = g_r[j], g_z[j], g_n[j], hnb[j]
            tot = dhb[j] + dob[j] * mb
            dm = tot * mb  # the part of dL/dh' that flows through the cell
            dan = dm * (_ONE - z) * (_ONE - n * n)
            hnb[j] = dan
            g_n[j] = dan * r
            g_r[j] = dan * a * r * (_ONE - r)
            g_z[j] = dm * (hpb[j] - n) * z * (_ONE - z)
            dhb[j] = (tot - dm) + dm * z


def _gates_infer(g, gh, bih, bhh, hp, ho, m):
    """:func:`_gates_forward` for inference: only the new state is written (the gates
    and W_hn h are not kept), so less memory is written. g holds the input projections
    without b_ih, which is added here rather than in a separate pass."""
    B, H = hp.shape
    masked = m.shape[0] > 0
    b_ir, b_iz, b_in = planes(bih)
    b_hr, b_hz, b_hn = planes(bhh)
    for b in prange(B):
        mb = m[b] if masked else _ONE
        g_r, g_z, g_n = planes(g[b])
        h_r, h_z, h_n = planes(gh[b])
        hpb, hob = hp[b], ho[b]
        for j in range(H):
            r, z, n = gates(g_r[j] + b_ir[j], g_z[j] + b_iz[j], g_n[j] + b_in[j],
                            h_r[j] + b_hr[j], h_z[j] + b_hz[j], h_n[j] + b_hn[j])
            hob[j] = blend(z, n, hpb[j], mb)


def _named(f, suffix):
    """A copy of f named f + suffix. numba names its cache files after the function and
    keys them by signature, not by options: a serial and a parallel compilation of one
    function shared one entry, so one could load the other's code (a parallel kernel
    inside a loop compiled as serial crashed a fresh process)."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__doc__ = f.__doc__
    return g


def _variants(f):
    """f compiled three ways: serial, parallel (called from Python), and parallel for
    the compiled loops. The last is not cached on its own: a loop cached in one process
    that had called a parallel kernel loaded from another process's cache crashed the
    next process that loaded the loop (numba links the parallel kernel's code into
    the loop; tests/test_kernels_compiled.py reproduces the sequence)."""
    return (njit(fastmath=_FM, error_model="numpy", cache=True)(_named(f, "_serial")),
            njit(fastmath=_FM, error_model="numpy", cache=True, parallel=True)(_named(f, "_parallel")),
            njit(fastmath=_FM, error_model="numpy", cache=False, parallel=True)(_named(f, "_parallel_in_loop")))


gates_forward_serial, gates_forward_parallel, _gates_forward_in_loop = _variants(_gates_forward)
gates_infer_serial, gates_infer_parallel, _gates_infer_in_loop = _variants(_gates_infer)
gates_backward_serial, gates_backward_parallel, _gates_backward_in_loop = _variants(_gates_backward)


@njit(fastmath=_FM, error_model="numpy", cache=True, nogil=True)
def forward_loop(sgemm, sgemv, x, wih, gates, whh, bih, bhh, hs, hn_all, mask, reverse, gh, parallel, b0, b1):
    """The whole time loop for the batch rows b0:b1 (see :func:`_gates_forward` for the
    arrays; mask (T, B) or (T, 0)); hs (T+1, B, H) holds h0 on entry.

    ``sgemm`` and ``sgemv`` are NumPy's own cblas_sgemm and cblas_sgemv (64-bit integers,
    :data:`grumpy.kernels.blas.SGEMM`, ``SGEMV``); wih the (3H, I) weights as they are. whh
    is W_hh (3H, H) for a loop over one stream (W_hh h by sgemv on its contiguous rows:
    OpenBLAS's sgemm with one column ran at a third of its sgemv's rate at H = 256) and
    W_hh^T (H, 3H) for a batch: gh = h W_hh^T as sgemm of two untransposed operands, which
    OpenBLAS ran at twice the rate of the transposed form at B=32, H=64 (a share of one
    row of a batch: sgemv on the transpose).
    ``wih`` empty (0, 0): gates (T, B, 3H) hold the input projections. Else (inference,
    one share of a batch) x (T, B, I) times W_ih^T is computed step by step into gates
    (1, b1-b0, 3H) while the rows are in cache. An empty hn_all (0, B, H) means inference
    (:func:`_gates_infer`). The gate kernels add ``bih``; ``parallel`` picks the ones that
    use all cores. No GIL: one thread per core can run a share of the rows through the
    whole sequence (the rows of a GRU batch never meet)."""
    T = hs.shape[0] - 1
    H = hs.shape[2]
    G = 3 * H
    I = x.shape[2]
    n = b1 - b0
    keep = hn_all.shape[0] > 0
    stepwise = wih.shape[0] > 0
    one_stream = whh.shape[0] == G  # W_hh as it is, else its transpose
    for step in range(T):
        t = T - 1 - step if reverse else step
        ip = t + 1 if reverse else t
        io = t if reverse else t + 1
        g = gates[0] if stepwise else gates[t, b0:b1]
        if stepwise:
            sgemm(_RM, _NT, _TR, n, G, I, _ONE, x[t, b0:b1].ctypes.data, I, wih.ctypes.data, I, _ZERO,
                  g.ctypes.data, G)
        hp, ho, m = hs[ip, b0:b1], hs[io, b0:b1], mask[t, b0:b1]
        if one_stream:
            sgemv(_RM, _NT, G, H, _ONE, whh.ctypes.data, H, hp.ctypes.data, 1, _ZERO, gh.ctypes.data, 1)
        elif n == 1:
            sgemv(_RM, _TR, H, G, _ONE, whh.ctypes.data, G, hp.ctypes.data, 1, _ZERO, gh.ctypes.data, 1)
        else:
            sgemm(_RM, _NT, _NT, n, G, H, _ONE, hp.ctypes.data, H, whh.ctypes.data, G, _ZERO, gh.ctypes.data, G)
        if keep and parallel:
            _gates_forward_in_loop(g, gh, bih, bhh, hp, ho, hn_all[t, b0:b1], m)
        elif keep:
            gates_forward_serial(g, gh, bih, bhh, hp, ho, hn_all[t, b0:b1], m)
        elif parallel:
            _gates_infer_in_loop(g, gh, bih, bhh, hp, ho, m)
        else:
            gates_infer_serial(g, gh, bih, bhh, hp, ho, m)


@njit(fastmath=_FM, error_model="numpy", cache=True)
def backward_loop(sgemm, sgemv, d_output, hs, gates, hn_all, mask, reverse, whh, dh, parallel):
    """The whole backward time loop; dh (B, H) enters as dL/dh_last and leaves as
    dL/dh0; gates and hn_all are replaced as in :func:`_gates_backward`; dh += dgh W_hh
    through ``sgemm`` (one row: ``sgemv``) as in :func:`forward_loop`."""
    T, B, G = gates.shape
    H = G // 3
    for step in range(T):
        t = step if reverse else T - 1 - step
        ip = t + 1 if reverse else t
        if parallel:
            _gates_backward_in_loop(d_output[t], hs[ip], gates[t], hn_all[t], mask[t], dh)
        else:
            gates_backward_serial(d_output[t], hs[ip], gates[t], hn_all[t], mask[t], dh)
        g = gates[t]
        if B == 1:  # dh^T += W_hh^T dgh^T, reading W_hh's rows in order
            sgemv(_RM, _TR, G, H, _ONE, whh.ctypes.data, H, g.ctypes.data, 1, _ONE, dh.ctypes.data, 1)
        else:
            sgemm(_RM, _NT, _NT, B, H, G, _ONE, g.ctypes.data, G, whh.ctypes.data, H, _ONE, dh.ctypes.data, H)


@njit(inline="always", cache=True)
def nonzeros(v, nz):
    """nz[:m] = the indices of v's nonzero entries, in order; returns m. NaN counts as nonzero."""
    m = 0
    for k in range(v.shape[0]):
        if v[k] != _ZERO:
            nz[m] = k
            m += 1
    return m


def _step(x, h, w_ih, w_hh, b_ih, b_hh, out):
    """One step for one stream: x (I,), h (H,) -> out (H,). Matrix-vector products
    row by row (contiguous, vectorised), the gates fused in the same pass. An input
    that is mostly zeros (a one-hot character) reads only its nonzero columns of W_ih:
    at H=256 that is 200 KB less a step, and W_hh (768 KB) then stays in L2. (So an
    infinite or NaN weight facing a zero input does not make the output NaN here.)"""
    H = h.shape[0]
    I = x.shape[0]
    nz = np.empty(I, np.int64)
    m = nonzeros(x, nz)
    sparse = SPARSE_FRACTION * m <= I
    for j in range(H):
        ar = b_ih[j] + b_hh[j]
        az = b_ih[H + j] + b_hh[H + j]
        an = b_ih[2 * H + j]
        hn = b_hh[2 * H + j]
        if sparse:
            for q in range(m):
                k = nz[q]
                xk = x[k]
                ar += w_ih[j, k] * xk
                az += w_ih[H + j, k] * xk
                an += w_ih[2 * H + j, k] * xk
        else:
            for k in range(I):
                xk = x[k]
                ar += w_ih[j, k] * xk
                az += w_ih[H + j, k] * xk
                an += w_ih[2 * H + j, k] * xk
        for k in range(H):
            hk = h[k]
            ar += w_hh[j, k] * hk
            az += w_hh[H + j, k] * hk
            hn += w_hh[2 * H + j, k] * hk
        r, z, n = gates(ar, az, an, _ZERO, _ZERO, hn)  # ar, az hold both sides' sums
        out[j] = blend(z, n, h[j], _ONE)


step_serial = njit(fastmath=_FM, error_model="numpy", cache=True)(_step)



@njit(fastmath=_FM, error_model="numpy", cache=True)
def step_gates(gi, gh, b_ih, b_hh, h, out):
    """The gate math of one step for one stream, given gi = W_ih x and gh = W_hh h (3H,)."""
    a_ir, a_iz, a_in = planes(gi)
    a_hr, a_hz, a_hn = planes(gh)
    b_ir, b_iz, b_in = planes(b_ih)
    b_hr, b_hz, b_hn = planes(b_hh)
    for j in range(h.shape[0]):
        r, z, n = gates(a_ir[j] + b_ir[j], a_iz[j] + b_iz[j], a_in[j] + b_in[j],
                        a_hr[j] + b_hr[j], a_hz[j] + b_hz[j], a_hn[j] + b_hn[j])
        out[j] = blend(z, n, h[j], _ONE)


@njit(cache=True)
def transpose(a, out):
    """out (C, R) = a (R, C) transposed, in 16 x 16 tiles (cache-friendly, unlike NumPy's
    strided copy). Serial: a parallel version lost beside BLAS's spinning threads, and
    its start-up cost dominated small matrices."""
    R, C = a.shape
    for j0 in range((C + 15) // 16):
        for i0 in range(0, R, 16):
            for j in range(j0 * 16, min(C, j0 * 16 + 16)):
                for i in range(i0, min(R, i0 + 16)):
                    out[j, i] = a[i, j]


@njit(inline="always", fastmath=_FM, error_model="numpy", cache=True)
def _add_rows(w, v, nz, a):
    """a (N,) += sum over k of v[k] w[k], w (K, N): only the rows v's nonzero entries
    select (a one-hot input reads one row), four at a time."""
    m = nonzeros(v, nz)
    q = 0
    while q + 4 <= m:
        k0, k1, k2, k3 = nz[q], nz[q + 1], nz[q + 2], nz[q + 3]
        v0, v1, v2, v3 = v[k0], v[k1], v[k2], v[k3]
        w0, w1, w2, w3 = w[k0], w[k1], w[k2], w[k3]
        for j in range(a.shape[0]):
            a[j] += v0 * w0[j] + v1 * w1[j] + v2 * w2[j] + v3 * w3[j]
        q += 4
    while q < m:
        vk, wk = v[nz[q]], w[nz[q]]
        for j in range(a.shape[0]):
            a[j] += vk * wk[j]
        q += 1


@njit(fastmath=_FM, error_model="numpy", cache=True)
def step_transposed(x, h, wih_t, whh_t, b_ih, b_hh, acc, out):
    """One step for one stream from transposed weights: x (I,), h (H,), wih_t (I, 3H),
    whh_t (H, 3H), acc (2, 3H) scratch -> out (H,). The products are sums of weight
    rows scaled by x_k and h_k (:func:`_add_rows`): long contiguous loops with no
    reductions, which vectorise better than row dot products on some CPUs (:func:`step_serial`)."""
    H = h.shape[0]
    gi, gh = acc[0], acc[1]
    gi[:] = b_ih
    gh[:] = b_hh
    nz = np.empty(max(x.shape[0], H), np.int64)
    _add_rows(wih_t, x, nz, gi)
    _add_rows(whh_t, h, nz, gh)
    a_ir, a_iz, a_in = planes(gi)  # the biases are in already
    a_hr, a_hz, a_hn = planes(gh)
    for j in range(H):
        r, z, n = gates(a_ir[j], a_iz[j], a_in[j], a_hr[j], a_hz[j], a_hn[j])
        out[j] = blend(z, n, h[j], _ONE)


def _address_typer(typingctx, addr):
    """A float32 pointer from an integer address: a job's record carries its arrays' addresses."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(nbtypes.CPointer(nbtypes.float32)))

    return nbtypes.CPointer(nbtypes.float32)(nbtypes.int64), codegen


f32_at: Any = intrinsic(_address_typer)

# e^x for float32. NumPy's float32 exp runs at about 4 ns an element on an AVX2 CPU
# without AVX-512 (docs/benchmarks.md) and was most of the loss's time; this one
# vectorises. x = k ln2 + r with |r| <= ln2/2 (Cody and Waite's two-part ln2, so k ln2
# is exact), e^r by its Taylor polynomial to r^7 (truncation error below 4e-9), and 2^k
# built from its bits. Compiled without 'reassoc', which would merge the two parts of ln2.
_EXACT = {"nsz", "arcp", "contract", "afn"}
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_MAX, _EXP_MIN = np.float32(88.72283), np.float32(-87.33654)  # e^x: the largest float32; the smallest normal
_E2, _E3, _E4, _E5, _E6, _E7 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 8))
_F127 = np.float32(127.0)


def _f32_from_bits_typer(typingctx, bits):
    """The float32 whose bits are the int32 ``bits``: a bitcast, which LLVM vectorises."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return nbtypes.float32(nbtypes.int32), codegen


_f32_from_bits: Any = intrinsic(_f32_from_bits_typer)  # Any: called without the typing context


@njit(inline="always", fastmath=_EXACT, error_model="numpy", cache=True)
def exp32(x):
    """e^x within 1.3 ulp (tests/test_kernels_compiled.py), 0 below the normal floats
    (e^-87.34), inf above the largest; NaN passes through (selects, not min/max)."""
    c = _EXP_MAX if x > _EXP_MAX else x
    c = _EXP_MIN if c < _EXP_MIN else c
    # k = round(c / ln2), by truncation of a positive number (float -> int32 vectorises);
    # from 0 for a NaN, whose conversion to an integer LLVM leaves undefined (r stays NaN)
    k = np.float32(np.int32((c if c == c else _ZERO) * _LOG2E + np.float32(126.5))) - np.float32(126.0)
    r = (c - k * _LN2_HI) - k * _LN2_LO
    p = ((((((_E7 * r + _E6) * r + _E5) * r + _E4) * r + _E3) * r + _E2) * r + _ONE) * r + _ONE
    big = k > _F127  # 2^128 is no float32: 2 p 2^127 instead
    p = p + p if big else p
    k = _F127 if big else k
    e = p * _f32_from_bits(np.int32((k + _F127) * np.float32(8388608.0)))  # 2^k: exponent field k + 127
    e = _ZERO if x < _EXP_MIN else e
    return np.float32(np.inf) if x > _EXP_MAX else e


@njit(inline="always", fastmath=_FM, error_model="numpy", cache=True)
def row_max(zi):
    """The largest of zi (V,), NaN if zi[0] is NaN (a later NaN makes the loss NaN through
    e^(z - max)). Four running maxima: one chain of compare-and-select ran at a quarter of
    the rate (selects are not reassociated, so LLVM does not split the chain itself)."""
    V = zi.shape[0]
    m0 = m1 = m2 = m3 = zi[0]
    j = 1
    while j + 4 <= V:
        a, b, c, d = zi[j], zi[j + 1], zi[j + 2], zi[j + 3]
        m0 = a if a > m0 else m0
        m1 = b if b > m1 else m1
        m2 = c if c > m2 else m2
        m3 = d if d > m3 else m3
        j += 4
    while j < V:
        m0 = zi[j] if zi[j] > m0 else m0
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@njit(fastmath=_EXACT, error_model="numpy", cache=True)
def exp_inplace(a):
    """a (n,) = e^a, by :func:`exp32`: a function of its own, compiled without
    'reassoc' (which would merge the two parts of ln2)."""
    for i in range(a.shape[0]):
        a[i] = exp32(a[i])


@njit(fastmath=_FM, error_model="numpy", cache=True)
def _shift_rows(z, out, m):
    """m (N,) the maxima of z's rows (N, V), out (N, V) = z - m."""
    for i in range(z.shape[0]):
        zi, oi = z[i], out[i]
        mi = row_max(zi)
        m[i] = mi
        for j in range(zi.shape[0]):
            oi[j] = zi[j] - mi


@njit(fastmath=_FM, error_model="numpy", cache=True)
def _row_sums(e, s):
    """s (N,) = e (N, V) summed along its rows."""
    for i in range(e.shape[0]):
        ei = e[i]
        acc = ei[0] * 0
        for j in range(ei.shape[0]):
            acc += ei[j]
        s[i] = acc


@njit(fastmath=_FM, error_model="numpy", cache=True)
def shifted_exp_sums(z, m, s, e):
    """The passes of log-sum-exp along the rows of z (N, V): m (N,) the rows' maxima, s (N,)
    the sums of e^(z - m), and e^(z - m) itself into e (R, V), R rows at a time: R = N keeps
    it all (the gradient's softmax), fewer rows are a scratch for the loss alone. NumPy's
    reductions along short rows (V = 65) and its float32 exp cost most of a loss's time."""
    N, R = z.shape[0], e.shape[0]
    for i0 in range(0, N, R):
        k = min(R, N - i0)
        # each pass a function of its own: written inline, the passes ran 10% slower
        _shift_rows(z[i0:i0 + k], e[:k], m[i0:i0 + k])
        exp_inplace(e[:k].reshape(-1))  # the block as one loop: no remainder after each short row
        _row_sums(e[:k], s[i0:i0 + k])


@njit(fastmath=_FM, error_model="numpy", cache=True)
def softmax_gradient(e, s, t, scale):
    """In place, e (N, V) = e^(z - max) with row sums s (N,) -> (softmax(z) - onehot(t)) * scale:
    the cross-entropy's gradient for targets t (N,), scale 1/N for the mean."""
    for i in range(e.shape[0]):
        ei = e[i]
        f = scale / s[i]
        for j in range(ei.shape[0]):
            ei[j] *= f
        ei[t[i]] -= scale


# The time loops with MKL's packed product (grumpy.kernels.blas): ``gemm`` is
# cblas_sgemm_compute (a C function pointer: numba calls it directly, and caches the
# loop), ``wh``/``wi`` the addresses of the packed weights. No Python between steps:
# at small sizes the calls of a Python loop are a good part of a step. The forward
# loop runs the batch rows b0:b1 only and releases the GIL, so that one thread per core
# can run a share of the batch through the whole sequence, with no synchronisation per
# step (the rows of a GRU batch never meet). Slicing rows inside keeps the arrays
# contiguous for numba; a strided view passed in compiled to unvectorised gate loops.


@njit(fastmath=_FM, error_model="numpy", cache=True, nogil=True)
def forward_loop_packed(gemm, wh, wi, x, gates, bih, bhh, hs, hn_all, mask, reverse, gh, parallel, b0, b1):
    """:func:`forward_loop` for rows b0:b1 with gh = h @ W_hh^T from the packed W_hh.

    ``wi`` 0: gates (T, B, 3H) hold the input projections W_ih x. Else (inference)
    x (T, B, I) times the packed W_ih is computed step by step into gates (1, b1-b0, 3H),
    while its rows are in cache. An empty hn_all (0, B, H) means inference:
    :func:`_gates_infer`, which keeps neither the gates nor W_hn h. The gate kernels
    add ``bih`` themselves. ``parallel`` picks the gate kernels that use all cores."""
    T = hs.shape[0] - 1
    H = hs.shape[2]
    G = 3 * H
    I = x.shape[2]
    n = b1 - b0
    keep = hn_all.shape[0] > 0
    for step in range(T):
        t = T - 1 - step if reverse else step
        ip = t + 1 if reverse else t
        io = t if reverse else t + 1
        g = gates[0] if wi != 0 else gates[t, b0:b1]
        if wi != 0:
            gemm(_RM, _NT, _PK, n, G, I, x[t, b0:b1].ctypes.data, I, wi, I, np.float32(0.0), g.ctypes.data, G)
        hp, ho, m = hs[ip, b0:b1], hs[io, b0:b1], mask[t, b0:b1]
        gemm(_RM, _NT, _PK, n, G, H, hp.ctypes.data, H, wh, H, np.float32(0.0), gh.ctypes.data, G)
        if keep and parallel:
            _gates_forward_in_loop(g, gh, bih, bhh, hp, ho, hn_all[t, b0:b1], m)
        elif keep:
            gates_forward_serial(g, gh, bih, bhh, hp, ho, hn_all[t, b0:b1], m)
        elif parallel:
            _gates_infer_in_loop(g, gh, bih, bhh, hp, ho, m)
        else:
            gates_infer_serial(g, gh, bih, bhh, hp, ho, m)


@njit(fastmath=_FM, error_model="numpy", cache=True)
def backward_loop_packed(gemm, w, d_output, hs, gates, hn_all, mask, reverse, dh, parallel):
    """:func:`backward_loop` with dh += dgh @ W_hh from the packed W_hh."""
    T, B, G = gates.shape
    H = dh.shape[1]
    for step in range(T):
        t = step if reverse else T - 1 - step
        ip = t + 1 if reverse else t
        if parallel:
            _gates_backward_in_loop(d_output[t], hs[ip], gates[t], hn_all[t], mask[t], dh)
        else:
            gates_backward_serial(d_output[t], hs[ip], gates[t], hn_all[t], mask[t], dh)
        gemm(_RM, _NT, _PK, B, H, G, gates[t].ctypes.data, G, w, G, np.float32(1.0), dh.ctypes.data, H)
