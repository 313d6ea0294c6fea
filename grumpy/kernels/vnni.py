"""The int8 products on AVX-512 VNNI: ``vpdpbusd``, 64 multiply-adds of unsigned by signed
bytes per instruction, summed exactly in int32 (docs/precision.md, "How the int8
products are fast").

The arithmetic is :mod:`grumpy.quantized`'s: the exact integer sum over k of q[r, k] a[k],
weights q int8 and activations a integers in [-127, 127]. ``vpdpbusd`` wants one operand
unsigned, so the activations go in as u = a + 128 (bytes 1..255) and each sum starts from
-128 * sum_k q[r, k], which takes the offset back out: the same integer, so the same bits
as the portable kernels and NumPy (the sum converted to float32 once, exactly for K <= 1040
and rounded once to nearest beyond, as the other paths' float64 block sums round).

Layout, the one oneDNN and fbgemm use for this instruction: the weights padded to a
multiple of 64 rows and 4 columns and packed as (R / 64, K / 4, 64, 4), so one panel of 64
rows is four 16-lane vectors per group of 4 columns. For each activation row the kernel
broadcasts 4 bytes and accumulates into the panel's four vectors: each lane is one output,
with no horizontal sums. Four activation rows are in flight at a time (16 accumulators).

Only compiled where the CPU (as numba targets it) has AVX-512 VNNI: :func:`available`.
Imported lazily by :mod:`grumpy.quantized`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from grumpy.kernels.nb import _named
from grumpy.kernels.quantized_nb import gates_serial, quantize_rows_int8

PANEL = 64  # weight rows per panel: four 16-lane int32 vectors
_ROWS = 4  # activation rows in flight

_I32, _F32 = ir.IntType(32), ir.FloatType()
_V16, _VF = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
_VB = ir.VectorType(ir.IntType(1), 16)

_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI: the host's features, unless numba
    is told to target another CPU (NUMBA_CPU_NAME), when only NUMBA_CPU_FEATURES counts."""
    global _AVAILABLE
    if _AVAILABLE is None:
        from llvmlite import binding
        from numba.core import config

        name, feats = getattr(config, "CPU_NAME", None), getattr(config, "CPU_FEATURES", None) or ""
        if name not in (None, "host"):
            _AVAILABLE = "+avx512vnni" in feats.split(",")
        else:
            _AVAILABLE = bool(binding.get_host_cpu_features().get("avx512vnni", False))
    return _AVAILABLE


def pack(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q (R, K) int8 -> (packed weights (R' / 64, K' / 4, 64, 4) int8, the sums' starting
    values (R',) int32 = -128 * the rows' sums), R', K' the sizes padded with zeros to
    multiples of 64 and 4."""
    R, K = q.shape
    Rp, Kp = -(-R // PANEL) * PANEL, -(-K // 4) * 4
    qp = np.zeros((Rp, Kp), np.int8)
    qp[:R, :K] = q
    packed = np.ascontiguousarray(qp.reshape(Rp // PANEL, PANEL, Kp // 4, 4).transpose(0, 2, 1, 3))
    return packed, np.int32(-128) * qp.sum(axis=1, dtype=np.int32)


def activations(N: int, K: int) -> np.ndarray:
    """Scratch for N rows of K activations as the kernel reads them (uint8, K padded to a
    multiple of 4; the padding meets zero weights)."""
    return np.zeros((N, -(-K // 4) * 4), np.uint8)


def _splat(builder: ir.IRBuilder, v: Any) -> Any:
    """A 16-lane vector of the i32 value v."""
    one = builder.insert_element(ir.Constant(_V16, None), v, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(_V16, None), ir.Constant(_V16, [0] * 16))


def _panel_typer(typingctx: Any, wp: Any, start: Any, u: Any, out: Any, p: Any) -> Any:
    """out[n, 64p : 64p + 64] = float32(start[r] + sum_k u[n, k] q[r, k]) for every row n of
    u (N, K') uint8 (:func:`offset_rows`), the panel's columns past out's width left alone.
    Reads only the outer strides: wp as :func:`pack` gives it, and rows of u and out
    contiguous (as :func:`activations` and a fresh float32 array give them)."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        w = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[1])(context, builder, args[1])
        a = context.make_array(sig.args[2])(context, builder, args[2])
        o = context.make_array(sig.args[3])(context, builder, args[3])
        p = args[4]
        K4 = cgutils.unpack_tuple(builder, w.shape, 4)[1]
        w_stride = cgutils.unpack_tuple(builder, w.strides, 4)[0]
        N = cgutils.unpack_tuple(builder, a.shape, 2)[0]
        a_stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
        R = cgutils.unpack_tuple(builder, o.shape, 2)[1]
        o_stride = cgutils.unpack_tuple(builder, o.strides, 2)[0]
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]),
                                             "llvm.x86.avx512.vpdpbusd.512")
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_VF, ir.PointerType(), _I32, _VB]),
            "llvm.masked.store.v16f32.p0")

        def vec_at(addr: Any) -> Any:  # unaligned loads: NumPy's arrays are 16-byte aligned
            return builder.load(builder.inttoptr(addr, _V16.as_pointer()), align=1)

        r0 = builder.mul(p, i64(PANEL))
        w_base = builder.add(builder.ptrtoint(w.data, i64), builder.mul(p, w_stride))
        s_base = builder.add(builder.ptrtoint(s.data, i64), builder.mul(r0, i64(4)))
        a_base, o_base = builder.ptrtoint(a.data, i64), builder.ptrtoint(o.data, i64)
        lanes = ir.Constant(_V16, list(range(16)))
        width = _splat(builder, builder.trunc(R, _I32))

        def rows(n0: Any, m: int) -> None:
            """Activation rows n0 .. n0 + m - 1 against the panel."""
            acc = [[cgutils.alloca_once(builder, _V16) for _ in range(4)] for _ in range(m)]
            first = [vec_at(builder.add(s_base, i64(64 * v))) for v in range(4)]
            for j in range(m):
                for v in range(4):
                    builder.store(first[v], acc[j][v])
            with cgutils.for_range(builder, K4) as loop:
                k4 = loop.index
                wk = builder.add(w_base, builder.mul(k4, i64(4 * PANEL)))
                wv = [vec_at(builder.add(wk, i64(64 * v))) for v in range(4)]
                for j in range(m):
                    at = builder.add(builder.add(a_base, builder.mul(builder.add(n0, i64(j)), a_stride)),
                                     builder.mul(k4, i64(4)))
                    u4 = _splat(builder, builder.load(builder.inttoptr(at, _I32.as_pointer()), align=1))
                    for v in range(4):
                        builder.store(builder.call(dot, [builder.load(acc[j][v]), u4, wv[v]]), acc[j][v])
            for j in range(m):
                row = builder.add(o_base, builder.mul(builder.add(n0, i64(j)), o_stride))
                for v in range(4):
                    c0 = builder.add(r0, i64(16 * v))
                    inside = builder.icmp_signed("<", builder.add(_splat(builder, builder.trunc(c0, _I32)), lanes),
                                                 width)
                    out_ptr = builder.inttoptr(builder.add(row, builder.mul(c0, i64(4))), ir.PointerType())
                    builder.call(store, [builder.sitofp(builder.load(acc[j][v]), _VF), out_ptr, _I32(4), inside])

        full = builder.mul(builder.udiv(N, i64(_ROWS)), i64(_ROWS))
        with cgutils.for_range_slice(builder, i64(0), full, i64(_ROWS)) as (n0, _):
            rows(n0, _ROWS)
        with cgutils.for_range_slice(builder, full, N, i64(1)) as (n0, _):
            rows(n0, 1)
        return context.get_dummy_value()

    return types.void(wp, start, u, out, p), codegen


_panel: Any = intrinsic(_panel_typer)  # Any: called without the typing context


def _products(wp, start, u, out):
    """out (N, R) float32 = the exact int8 products of u (N, K') uint8 (activations + 128)
    with the packed weights (:func:`pack`), one panel of 64 output columns at a time."""
    for p in prange(wp.shape[0]):
        _panel(wp, start, u, out, p)


products_serial = njit(cache=True)(_named(_products, "_serial"))
products_parallel = njit(cache=True, parallel=True)(_named(_products, "_parallel"))


@njit(cache=True)
def offset_rows(aq, u):
    """u[n, :K] = aq (N, K) float32 holding integers in [-127, 127], plus 128, as uint8."""
    N, K = aq.shape
    for n in range(N):
        a, un = aq[n], u[n]
        for k in range(K):
            un[k] = np.uint8(np.int32(a[k]) + 128)


def _step(x, h, wi, ti, wh, th, sih, shh, bih, bhh, out, xq, hq, xu, hu, g):
    """One step of one stream, int8, reset_after, as quantized_nb's step computes it: x (I,),
    h (H,) -> out (H,). wi, wh the packed weights and ti, th their sums' starting values
    (:func:`pack`); scratch xq (1, I), hq (1, H) float32, xu, hu from :func:`activations`,
    g (2, 3H). Both products have 3H rows, so the same panels: each iteration takes panel p
    of both, and the cores share the recurrent weights evenly (their shares then stay in
    their own caches; numba hands each core one contiguous run of iterations)."""
    sx = np.empty(1, np.float32)
    sh = np.empty(1, np.float32)
    quantize_rows_int8(x.reshape(1, -1), xq, sx)
    quantize_rows_int8(h.reshape(1, -1), hq, sh)
    offset_rows(xq, xu)
    offset_rows(hq, hu)
    gi, gh = g[0:1], g[1:2]
    for p in prange(wh.shape[0]):
        _panel(wi, ti, xu, gi, p)
        _panel(wh, th, hu, gh, p)
    gates_serial(gi, sx, sih, gh, sh, shh, bih, bhh, h.reshape(1, -1), out.reshape(1, -1), np.empty(0, np.float32))


step_serial = njit(cache=True)(_named(_step, "_serial"))
step_parallel = njit(cache=True, parallel=True)(_named(_step, "_parallel"))
