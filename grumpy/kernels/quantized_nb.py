"""Compiled kernels for the int8 and bfloat16 inference copies (:mod:`grumpy.quantized`).

The arithmetic is defined in :mod:`grumpy.quantized`; these kernels compute it, and
the NumPy fallback there computes the same thing. In short:

* int8: weights q (R, K) int8 with a float32 scale per row; activations quantized
  per row (per stream and step) to integers in [-127, 127] with their own scale;
  the product of a row pair is the exact integer sum_k q[r, k] a[k], then scaled.
  Here the sums are int32 (exact); MKL and NumPy carry them in float32, where every
  partial sum of K <= 1024 such products stays below 2^24 and is exact in any order
  (longer rows: blocks of 1024 added in float64). So all paths give the same bits.
* bfloat16: weights and activations rounded to bfloat16; the products are exact
  in float32 and summed in float32 (order-dependent, so equal to rounding only).

Quantizing activations is kept out of fastmath: it divides, and 'arcp' could turn
127 / m into a reciprocal and a multiplication, rounding differently from NumPy.

Imported lazily by :mod:`grumpy.quantized`; numba caches by function name, so each
compiled variant (serial, parallel) has a name of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from grumpy.kernels.nb import _FM, _named, planes, sigm32, tanh32

_Q = np.float32(127.0)
_ZERO = np.float32(0.0)


def _bits_to_f32_typer(typingctx, v):
    """The float32 whose bit pattern is the uint32 v (numba has no scalar bit cast)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


_bits_to_f32: Any = intrinsic(_bits_to_f32_typer)  # Any: called with v alone, the typing context is numba's


@njit(inline="always", cache=True)
def bf16_value(bits):
    """A bfloat16 bit pattern (uint16) -> its value as float32 (exact)."""
    return _bits_to_f32(np.uint32(bits) << np.uint32(16))


@njit(cache=True)
def quantize_rows_int8(a, aq, sa):
    """a (N, K) float32 -> aq (N, K) float32 holding integers in [-127, 127], sa (N,) the
    scales: a[n] ≈ sa[n] * aq[n]. Symmetric, per row: m = max |a[n]|, aq = rint(a * (127/m)),
    sa = m / 127. A zero row gets scale 0 and zeros; a NaN makes the row NaN.

    No fastmath (see the module docstring). The maximum is taken over the bit patterns of
    |a| as integers, which order as the values do (a NaN's above infinity's): an integer
    maximum vectorises without fastmath, a float one does not (docs/precision.md)."""
    N, K = a.shape
    bits = a.view(np.uint32)
    for n in range(N):
        row, out, rb = a[n], aq[n], bits[n]
        mb = np.uint32(0)
        for k in range(K):
            v = rb[k] & np.uint32(0x7FFFFFFF)
            mb = v if v > mb else mb
        m = _bits_to_f32(mb)
        inv = _Q / m if m > _ZERO else _ZERO
        sa[n] = m / _Q
        for k in range(K):
            out[k] = np.rint(row[k] * inv)


@njit(cache=True)
def round_rows_bf16(a, out):
    """out (N, K) = a (N, K) float32 rounded to bfloat16 (to nearest, ties to even), as float32."""
    ab = a.reshape(-1).view(np.uint32)
    ob = out.reshape(-1).view(np.uint32)
    for i in range(ab.shape[0]):
        b = ab[i]
        ob[i] = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)


@njit(fastmath=_FM, error_model="numpy", cache=True)
def _dot_int8(q, a):
    """sum_k q[k] a[k] for q int8 and a int16 holding integers in [-127, 127], exact in
    int32 (no overflow below 2^17 terms), as float32: the same value as the float32 and
    MKL paths' exact sums. Written so that LLVM multiplies 16-bit pairs (vpmaddwd),
    a little faster than float32 products with conversions (docs/precision.md)."""
    acc = np.int32(0)
    for k in range(q.shape[0]):
        acc = np.int32(acc + np.int32(np.int16(q[k]) * a[k]))
    return np.float32(acc)


def _products_int8(a, q, out):
    """out (N, R) = a (N, K) @ q (R, K)^T exactly: a int16 holding integers in [-127, 127],
    q int8. Rows of q outer (each row converted once and kept in cache while
    it meets every row of a); one stream is the matrix-vector product of generation."""
    N, K = a.shape
    R = q.shape[0]
    for r in prange(R):
        qr = q[r]
        for n in range(N):
            an = a[n]
            out[n, r] = _dot_int8(qr, an)


def _products_bf16(a, w, out):
    """out (N, R) = a (N, K) @ w (R, K)^T, w bfloat16 bit patterns (uint16), summed in float32."""
    N, K = a.shape
    R = w.shape[0]
    for r in prange(R):
        wr = w[r]
        for n in range(N):
            an = a[n]
            acc = _ZERO
            for k in range(K):
                acc += bf16_value(wr[k]) * an[k]
            out[n, r] = acc


products_int8_serial = njit(fastmath=_FM, error_model="numpy", cache=True)(_named(_products_int8, "_serial"))
products_int8_parallel = njit(fastmath=_FM, error_model="numpy", cache=True, parallel=True)(
    _named(_products_int8, "_parallel"))
products_bf16_serial = njit(fastmath=_FM, error_model="numpy", cache=True)(_named(_products_bf16, "_serial"))
products_bf16_parallel = njit(fastmath=_FM, error_model="numpy", cache=True, parallel=True)(
    _named(_products_bf16, "_parallel"))


@njit(cache=True)
def scale_products(raw, sa, sw, out):
    """out (N, R) = raw (N, R) * (sa[n] * sw[r]), rounding as NumPy does: the scale product
    first, then the result. The scale products go through memory: computed inline, the two
    multiplications came out reordered ((raw * sa) * sw) in some compilations."""
    N, R = raw.shape
    c = np.empty(R, np.float32)
    for n in range(N):
        s = sa[n]
        rn, on = raw[n], out[n]
        for r in range(R):
            c[r] = s * sw[r]
        for r in range(R):
            on[r] = rn[r] * c[r]


def _gates(gi, si, swi, gh, sa, sw, bih, bhh, hp, ho, m):
    """The gate math of one step (reset_after form), as grumpy.kernels.nb's inference
    kernel, with the scales of both products folded in: gi, gh (B, 3H) the raw input and
    recurrent products, scaled here by si[b] * swi[j] and sa[b] * sw[j] (ones for
    bfloat16); hp (B, H) the state in -> ho (B, H) the state out; m (B,) the mask (1 valid,
    0 padding) or (0,). Folding saves two passes over (B, 3H) arrays a step, and every
    compiled path (one stream, batch, MKL or not) calls this kernel: the same bits."""
    B, H = hp.shape
    masked = m.shape[0] > 0
    c_r, c_z, c_n = planes(bih)
    b_r, b_z, b_n = planes(bhh)
    s_r, s_z, s_n = planes(sw)
    t_r, t_z, t_n = planes(swi)
    for b in prange(B):
        mb = m[b] if masked else np.float32(1.0)
        s, u = sa[b], si[b]
        g_r, g_z, g_n = planes(gi[b])
        h_r, h_z, h_n = planes(gh[b])
        hpb, hob = hp[b], ho[b]
        for j in range(H):
            r = sigm32(g_r[j] * (u * t_r[j]) + c_r[j] + h_r[j] * (s * s_r[j]) + b_r[j])
            z = sigm32(g_z[j] * (u * t_z[j]) + c_z[j] + h_z[j] * (s * s_z[j]) + b_z[j])
            n = tanh32(g_n[j] * (u * t_n[j]) + c_n[j] + r * (h_n[j] * (s * s_n[j]) + b_n[j]))
            h = hpb[j]
            hob[j] = h + mb * ((n + z * (h - n)) - h)


gates_serial = njit(fastmath=_FM, error_model="numpy", cache=True)(_named(_gates, "_serial"))
gates_parallel = njit(fastmath=_FM, error_model="numpy", cache=True, parallel=True)(_named(_gates, "_parallel"))
# for the compiled loop: not cached on its own, as grumpy.kernels.nb's _variants explains (a loop
# cached after another process had cached the parallel kernel crashed the next process)
_gates_in_loop = njit(fastmath=_FM, error_model="numpy", cache=False, parallel=True)(
    _named(_gates, "_parallel_in_loop"))


def _step_int8(x, h, qih, sih, qhh, shh, bih, bhh, out, xq, hq, g):
    """One step of one stream, int8, reset_after: x (I,), h (H,) -> out (H,). Scratch:
    xq (1, I), hq (1, H), g (2, 3H). The two matrix-vector products, parallel over rows,
    then the scales and the gate math in one pass; the same arithmetic as the batch path."""
    H = h.shape[0]
    sx = np.empty(1, np.float32)
    sh = np.empty(1, np.float32)
    quantize_rows_int8(x.reshape(1, -1), xq, sx)
    quantize_rows_int8(h.reshape(1, -1), hq, sh)
    gi, gh = g[0], g[1]
    xr, hr = xq[0].astype(np.int16), hq[0].astype(np.int16)
    for r in prange(3 * H):
        gi[r] = _dot_int8(qih[r], xr)
        gh[r] = _dot_int8(qhh[r], hr)
    gates_serial(g[0:1], sx, sih, g[1:2], sh, shh, bih, bhh, h.reshape(1, -1), out.reshape(1, -1),
                 np.empty(0, np.float32))


def _step_bf16(x, h, wih, whh, bih, bhh, out, xq, hq, g):
    """:func:`_step_int8` for bfloat16 weights (uint16 bit patterns)."""
    H = h.shape[0]
    round_rows_bf16(x.reshape(1, -1), xq)
    round_rows_bf16(h.reshape(1, -1), hq)
    I = x.shape[0]
    gi, gh = g[0], g[1]
    xr, hr = xq[0], hq[0]
    for r in prange(3 * H):
        wi, wh = wih[r], whh[r]
        ai = _ZERO
        for k in range(I):
            ai += bf16_value(wi[k]) * xr[k]
        ah = _ZERO
        for k in range(H):
            ah += bf16_value(wh[k]) * hr[k]
        gi[r] = ai
        gh[r] = ah
    ones = np.ones(3 * H, np.float32)
    gates_serial(g[0:1], ones[:1], ones, g[1:2], ones[:1], ones, bih, bhh, h.reshape(1, -1), out.reshape(1, -1),
                 np.empty(0, np.float32))


step_int8_serial = njit(fastmath=_FM, error_model="numpy", cache=True)(_named(_step_int8, "_serial"))
step_int8_parallel = njit(fastmath=_FM, error_model="numpy", cache=True, parallel=True)(
    _named(_step_int8, "_parallel"))
step_bf16_serial = njit(fastmath=_FM, error_model="numpy", cache=True)(_named(_step_bf16, "_serial"))
step_bf16_parallel = njit(fastmath=_FM, error_model="numpy", cache=True, parallel=True)(
    _named(_step_bf16, "_parallel"))


@njit(cache=True)
def to_bf16_bits(a, out):
    """out (N, K) uint16 = the upper halves of a (N, K) float32 that already holds bfloat16
    values (rounded, or small integers): the operand MKL's bfloat16 product reads."""
    ab = a.reshape(-1).view(np.uint32)
    ob = out.reshape(-1)
    for i in range(ab.shape[0]):
        ob[i] = np.uint16(ab[i] >> np.uint32(16))


_RM, _NT, _TR, _PK = 101, 111, 112, 151  # CBLAS: row major, no transpose, transpose, packed


@njit(fastmath=_FM, error_model="numpy", cache=True)
def steps_loop(gemm, w, packed, int8, gi, si, swi, hs, m2, reverse, sw, bih, bhh, aq, a16, sa, gh, parallel):
    """The recurrent steps of one chunk of a sequence, a batch: no Python between steps.

    gemm: a CBLAS-shaped product as a C function pointer, w the address of the recurrent
    weights it reads. ``packed``: MKL's cblas_gemm_bf16bf16f32_compute on the weights it
    packed (bfloat16 bits; int8 values for int8), the state passed as bfloat16 bits (a16);
    else NumPy's own cblas_sgemm (:data:`grumpy.kernels.blas.SGEMM`) on the (3H, H) float32
    values of the quantized weights (:meth:`grumpy.quantized.QMatrix.dense`), the state as
    float32 (aq). Both are exact for int8 with H <= 1024 and float32 sums for bfloat16
    (docs/precision.md). gi (n, B, 3H) the chunk's raw input products, si (n, B) and swi
    (3H,) their scales; hs (n+1, B, H) the chunk's states, h0 at hs[n] (reverse) or hs[0];
    m2 (n, B) the mask or (n, 0). Scratch: aq (B, H) float32, a16 (B, H) uint16, sa (B,)
    (ones for bfloat16), gh (B, 3H). The Python loop's calls, in the same order."""
    n = gi.shape[0]
    B, H = hs.shape[1], hs.shape[2]
    G = 3 * H
    trans = _PK if packed else _TR
    state = a16.ctypes.data if packed else aq.ctypes.data
    for step in range(n):
        t = n - 1 - step if reverse else step
        ip = t + 1 if reverse else t
        io = t if reverse else t + 1
        hp = hs[ip]
        if int8:
            quantize_rows_int8(hp, aq, sa)
        else:
            round_rows_bf16(hp, aq)
        if packed:
            to_bf16_bits(aq, a16)
        gemm(_RM, _NT, trans, B, G, H, np.float32(1.0), state, H, w, H, np.float32(0.0), gh.ctypes.data, G)
        if parallel:
            _gates_in_loop(gi[t], si[t], swi, gh, sa, sw, bih, bhh, hp, hs[io], m2[t])
        else:
            gates_serial(gi[t], si[t], swi, gh, sa, sw, bih, bhh, hp, hs[io], m2[t])
