"""The float32 products of the ``steps`` route on weights packed once per call: out = a W^T.

A BLAS call packs both operands into its own layout on every call. Each step of a GRU
multiplies a small (B, H) state by the same (3H, H) weights, so at B = 32 OpenBLAS
spends about half of each step's product repacking W_hh (12.6 MB at H = 1024). Here the
weights are packed once per sequence and each step reads them as they lie
(docs/benchmarks.md, "How grumpy is fast": 480 against 230 GFLOP/s at B = 32, H = 1024).

Layout, the one :mod:`grumpy.kernels.vnni` uses for int8: the weights padded to a
multiple of 64 rows and packed as (R / 64, K, 64), so column k of a panel of 64 rows is
four 16-lane vectors. For each row of a, the kernel broadcasts a[n, k] and adds its
products with the panel's four vectors into four accumulators: each lane is one output,
no horizontal sums. Four rows of a are in flight (16 accumulators, in registers).

The sums run in k's order, one fused multiply-add each, so every output is the same
float32 number whichever tile or thread computes it. Only chosen where numba's target
CPU has AVX-512 (:func:`available`); elsewhere the 16-lane vectors would be split in
two and the accumulators spill, and the route keeps BLAS (grumpy.kernels.route).

The same kernel for bfloat16 (grumpy.quantized's batches): ``vdpbf16ps`` of AVX512-BF16
multiplies 32 pairs of bfloat16 numbers exactly and adds them, two to each float32 lane,
so the panels hold pairs of columns, (R / 64, K / 2, 64, 2), and a row's pair of
activations is broadcast as one 32-bit number. Twice the multiply-adds of float32 per
instruction (:func:`bf16_available`, :func:`pack_bf16`, ``products_bf16_*``).
Imported lazily, like the other compiled kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from grumpy.kernels import blas
from grumpy.kernels.nb import _named, f32_at
from grumpy.kernels.route import parallel_gates_ok

PANEL = 64  # weight rows per panel: four 16-lane vectors
_ROWS = 4  # rows of a in flight
TILES = 8  # a product is split into at least this many tiles, so that both cores stay busy

class _BFloat(ir.types.Type):
    """LLVM's bfloat, which llvmlite's IR builder does not name: the intrinsic's operand type."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


_I32, _F32 = ir.IntType(32), ir.FloatType()
_VF, _VI = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)
_VBF = ir.VectorType(_BFloat(), 32)
_VB = ir.VectorType(ir.IntType(1), 16)

_FEATURES: dict[str, bool] = {}


def has_feature(feature: str) -> bool:
    """Whether numba compiles for a CPU with this feature: the host's, unless numba is told
    to target another CPU (NUMBA_CPU_NAME), when only NUMBA_CPU_FEATURES counts."""
    if feature not in _FEATURES:
        from llvmlite import binding
        from numba.core import config

        name, feats = getattr(config, "CPU_NAME", None), getattr(config, "CPU_FEATURES", None) or ""
        if name not in (None, "host"):
            _FEATURES[feature] = "+" + feature in feats.split(",")
        else:
            _FEATURES[feature] = bool(binding.get_host_cpu_features().get(feature, False))
    return _FEATURES[feature]


def available() -> bool:
    """Whether the float32 kernels run at their speed here: AVX-512."""
    return has_feature("avx512f")


def bf16_available() -> bool:
    """Whether the bfloat16 kernels run here at their speed: AVX512-BF16 without AMX. On an
    Intel Xeon with AMX (Emerald Rapids, 2026-11-26) the instruction ran at a quarter of
    Zen 5's rate, slower than float32's product on the rounded values (docs/precision.md)."""
    return has_feature("avx512f") and has_feature("avx512bf16") and not has_feature("amx-bf16")


def pack(w: np.ndarray) -> np.ndarray:
    """w (R, K) float32 -> (R' / 64, K, 64), R' = R rounded up to a multiple of 64 (zero rows)."""
    R, K = w.shape
    Rp = -(-R // PANEL) * PANEL
    wp = np.zeros((Rp, K), np.float32)
    wp[:R] = w
    return np.ascontiguousarray(wp.reshape(Rp // PANEL, PANEL, K).transpose(0, 2, 1))


def pack_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (R, K) uint16 -> (R' / 64, K' / 2, 64, 2), R' and K' rounded up
    to multiples of 64 and 2 (zeros): each lane of a panel's vector holds two columns."""
    R, K = bits.shape
    Rp, Kp = -(-R // PANEL) * PANEL, -(-K // 2) * 2
    wp = np.zeros((Rp, Kp), np.uint16)
    wp[:R, :K] = bits
    return np.ascontiguousarray(wp.reshape(Rp // PANEL, PANEL, Kp // 2, 2).transpose(0, 2, 1, 3))


def bf16_rows(N: int, K: int) -> np.ndarray:
    """Scratch for N rows of K bfloat16 activations as the kernel reads them (uint16, K
    padded to an even count; the padding meets zero weights)."""
    return np.zeros((N, -(-K // 2) * 2), np.uint16)


def _splat(builder: ir.IRBuilder, v: Any, vec: ir.VectorType) -> Any:
    """A 16-lane vector of the scalar v."""
    one = builder.insert_element(ir.Constant(vec, None), v, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(_VI, [0] * 16))


# Per kind: the instruction, its accumulator, and the alignment its operands may assume.
# int8 is grumpy.kernels.vnni's: unsigned activation bytes by signed weight bytes, into
# int32 sums that start from the rows' offsets (vnni.pack) and become float32 at the store.
_KINDS = {
    "float32": ("llvm.fma.v16f32", _VF, 4),
    "bfloat16": ("llvm.x86.avx512bf16.dpbf16ps.512", _VF, 2),
    "int8": ("llvm.x86.avx512.vpdpbusd.512", _VI, 1),
}


def _tile_typer(kind: str) -> Any:
    """The typer of one tile's kernel: out[n, 64p : 64p + 64] = sum_k a[n, k] w[64p + j, k]
    for n in [n0, n1), the panel's columns past out's width left alone. Reads only the outer
    strides: wp as :func:`pack` (:func:`pack_bf16`, ``vnni.pack``) gives it, and rows of a
    (float32 (N, K), bfloat16 bits (N, K'), offset bytes (N, K')) and of out (N, R)
    contiguous. Every kind steps through 4 bytes of a row of a and 256 of the panel at a
    time (a column, a pair of columns, four columns). int8 takes the sums' starts too."""

    if kind == "int8":
        def typer(typingctx: Any, wp: Any, start: Any, a: Any, out: Any, p: Any, n0: Any, n1: Any) -> Any:
            return types.void(wp, start, a, out, p, n0, n1), lambda *args: _codegen(kind, *args)
    else:
        def typer(typingctx: Any, wp: Any, a: Any, out: Any, p: Any, n0: Any, n1: Any) -> Any:  # type: ignore[misc]
            return types.void(wp, a, out, p, n0, n1), lambda *args: _codegen(kind, *args)

    typer.__name__ = typer.__qualname__ = f"_tile_{kind}"  # numba names intrinsics by these
    return typer


def _codegen(kind: str, context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
    """The tile's code (see :func:`_tile_typer`)."""
    name, acc_t, align = _KINDS[kind]
    i64 = ir.IntType(64)
    first = 2 if kind == "int8" else 1  # where a's argument is
    w = context.make_array(sig.args[0])(context, builder, args[0])
    a = context.make_array(sig.args[first])(context, builder, args[first])
    o = context.make_array(sig.args[first + 1])(context, builder, args[first + 1])
    p, n_start, n_end = args[first + 2], args[first + 3], args[first + 4]
    K = cgutils.unpack_tuple(builder, w.shape, sig.args[0].ndim)[1]  # steps of 4 bytes of a row of a
    w_stride = cgutils.unpack_tuple(builder, w.strides, sig.args[0].ndim)[0]
    a_stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
    R = cgutils.unpack_tuple(builder, o.shape, 2)[1]
    o_stride = cgutils.unpack_tuple(builder, o.strides, 2)[0]
    operand = {"float32": _VF, "bfloat16": _VBF, "int8": _VI}[kind]
    op = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_t, [acc_t, operand, operand]), name)
    store = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_VF, ir.PointerType(), _I32, _VB]),
        "llvm.masked.store.v16f32.p0")

    def load(addr: Any, t: Any) -> Any:  # NumPy's arrays are 16-byte aligned, not 64
        return builder.load(builder.inttoptr(addr, t.as_pointer()), align=align)

    def vec_at(addr: Any) -> Any:
        v = load(addr, _VF if kind == "float32" else _VI)
        return builder.bitcast(v, _VBF) if kind == "bfloat16" else v

    def broadcast(addr: Any) -> Any:  # one float32, a pair of bfloat16 or four bytes, as 32 bits
        if kind == "float32":
            return _splat(builder, load(addr, _F32), _VF)
        v = _splat(builder, load(addr, _I32), _VI)
        return builder.bitcast(v, _VBF) if kind == "bfloat16" else v

    def step(acc: Any, ak: Any, wv: Any) -> Any:
        return builder.call(op, [ak, wv, acc] if kind == "float32" else [acc, ak, wv])

    r0 = builder.mul(p, i64(PANEL))
    w_base = builder.add(builder.ptrtoint(w.data, i64), builder.mul(p, w_stride))
    a_base, o_base = builder.ptrtoint(a.data, i64), builder.ptrtoint(o.data, i64)
    if kind == "int8":
        s = context.make_array(sig.args[1])(context, builder, args[1])
        s_base = builder.add(builder.ptrtoint(s.data, i64), builder.mul(r0, i64(4)))
    lanes = ir.Constant(_VI, list(range(16)))
    width = _splat(builder, builder.trunc(R, _I32), _VI)

    def rows(n0: Any, m: int) -> None:
        """Rows n0 .. n0 + m - 1 of a against the panel."""
        acc = [[cgutils.alloca_once(builder, acc_t) for _ in range(4)] for _ in range(m)]
        start = ([load(builder.add(s_base, i64(64 * v)), _VI) for v in range(4)] if kind == "int8"
                 else [ir.Constant(_VF, [0.0] * 16)] * 4)
        for j in range(m):
            for v in range(4):
                builder.store(start[v], acc[j][v])
        with cgutils.for_range(builder, K) as loop:
            k = loop.index
            wk = builder.add(w_base, builder.mul(k, i64(4 * PANEL)))
            wv = [vec_at(builder.add(wk, i64(64 * v))) for v in range(4)]
            for j in range(m):
                at = builder.add(builder.add(a_base, builder.mul(builder.add(n0, i64(j)), a_stride)),
                                 builder.mul(k, i64(4)))
                ak = broadcast(at)
                for v in range(4):
                    builder.store(step(builder.load(acc[j][v]), ak, wv[v]), acc[j][v])
        for j in range(m):
            row = builder.add(o_base, builder.mul(builder.add(n0, i64(j)), o_stride))
            for v in range(4):
                c0 = builder.add(r0, i64(16 * v))
                inside = builder.icmp_signed("<", builder.add(_splat(builder, builder.trunc(c0, _I32), _VI), lanes),
                                             width)
                out_ptr = builder.inttoptr(builder.add(row, builder.mul(c0, i64(4))), ir.PointerType())
                total = builder.load(acc[j][v])
                total = builder.sitofp(total, _VF) if kind == "int8" else total
                builder.call(store, [total, out_ptr, _I32(4), inside])

    full = builder.add(n_start, builder.mul(builder.udiv(builder.sub(n_end, n_start), i64(_ROWS)), i64(_ROWS)))
    with cgutils.for_range_slice(builder, n_start, full, i64(_ROWS)) as (n0, _):
        rows(n0, _ROWS)
    left = builder.sub(n_end, full)
    for m in range(1, _ROWS):  # the last 1 to 3 rows together: one pass over the panel
        with builder.if_then(builder.icmp_unsigned("==", left, i64(m))):
            rows(full, m)
    return context.get_dummy_value()


_tile: Any = intrinsic(_tile_typer("float32"))  # Any: called without the typing context
_tile_bf16: Any = intrinsic(_tile_typer("bfloat16"))
tile_int8: Any = intrinsic(_tile_typer("int8"))  # grumpy.kernels.vnni's


@njit(inline="always", cache=True)
def _blocks(P, N):
    """Blocks of rows each panel is cut into: enough for at least TILES tiles (a few
    panels, small H, still keep every core busy), each block a multiple of _ROWS rows."""
    return min(max(1, -(-TILES // P)), -(-N // _ROWS))


@njit(inline="always", cache=True)
def _rows_of(b, blocks, N):
    """Rows [n0, n1) of block b of ``blocks``, starting at multiples of _ROWS."""
    groups = -(-N // _ROWS)
    return min(N, _ROWS * (groups * b // blocks)), min(N, _ROWS * (groups * (b + 1) // blocks))


def _products(wp, a, out):
    """out (N, R) = a (N, K) W^T, W packed by :func:`pack`, in tiles of one panel and a
    block of rows (:func:`_blocks`)."""
    P, N = wp.shape[0], a.shape[0]
    blocks = _blocks(P, N)
    for t in prange(P * blocks):
        n0, n1 = _rows_of(t % blocks, blocks, N)
        _tile(wp, a, out, t // blocks, n0, n1)


def _products_bf16(wp, a, out):
    """:func:`_products` for bfloat16: wp from :func:`pack_bf16`, a (N, K') bit patterns."""
    P, N = wp.shape[0], a.shape[0]
    blocks = _blocks(P, N)
    for t in prange(P * blocks):
        n0, n1 = _rows_of(t % blocks, blocks, N)
        _tile_bf16(wp, a, out, t // blocks, n0, n1)


@njit(cache=True)
def to_bf16_rows(a, out):
    """out[n, :K] = the bit patterns of a (N, K) float32 that already holds bfloat16 values
    (their upper halves), out from :func:`bf16_rows`."""
    N, K = a.shape
    for n in range(N):
        an, on = a[n].view(np.uint32), out[n]
        for k in range(K):
            on[k] = np.uint16(an[k] >> np.uint32(16))


products_serial = njit(cache=True)(_named(_products, "_serial"))
products_parallel = njit(cache=True, parallel=True)(_named(_products, "_parallel"))
products_bf16_serial = njit(cache=True)(_named(_products_bf16, "_serial"))
products_bf16_parallel = njit(cache=True, parallel=True)(_named(_products_bf16, "_parallel"))


# A job's record (int64): the addresses and sizes of wp (P, K, 64), a (N, K) with lda
# floats a row, out (N, R) with ldo, and the job's tiles [t0, t1) (blas.run_jobs).
_FIELDS = ("wp", "P", "K", "a", "lda", "N", "out", "ldo", "R", "t0", "t1")


def _run_job(record):
    """Tiles t0 .. t1 - 1 of :func:`_products`, from a record: a C function, so that the
    threads of NumPy's BLAS can run it (:func:`products`)."""
    wp_at, P, K, a_at, lda, N, out_at, ldo, R, t0, t1 = carray(record, len(_FIELDS), types.int64)  # type: ignore[call-overload]
    wp = carray(f32_at(wp_at), (P, K, PANEL))
    a = carray(f32_at(a_at), (N, lda))[:, :K]
    out = carray(f32_at(out_at), (N, ldo))[:, :R]
    blocks = _blocks(P, N)
    for t in range(t0, t1):
        n0, n1 = _rows_of(t % blocks, blocks, N)
        _tile(wp, a, out, t // blocks, n0, n1)


@functools.cache
def _job() -> int:
    """The address of :func:`_run_job` compiled as a C function (on first use, not on import)."""
    address: Any = cfunc(types.void(types.voidptr), cache=True)(_run_job).address
    return int(address)


def products(wp: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """out (N, R) = a (N, K) W^T, W packed by :func:`pack`, on every thread NumPy's BLAS
    would use now, and on that library's own threads (:func:`grumpy.kernels.blas.run_jobs`):
    the caller's NumPy products and these then share one pool, so neither waits for a core
    while the other's threads spin (docs/benchmarks.md, "The panels run on OpenBLAS's own
    threads"). Where that BLAS lends no threads, numba's (on TBB) or the calling thread.
    Rows of a and out must be contiguous (unit column stride)."""
    if a.strides[1] != 4 or out.strides[1] != 4 or not wp.flags.c_contiguous:
        raise ValueError(f"panels.products: rows of a and out must be contiguous and wp C-contiguous "
                         f"(strides {a.strides}, {out.strides})")
    P, K, _ = wp.shape
    N, R = out.shape
    tiles = P * _blocks(P, N)
    n = min(blas.pool_threads(), tiles)
    if n > 1:
        lda, ldo = (a.strides[0] // 4, out.strides[0] // 4) if N > 1 else (K, R)  # one row: any stride
        blas.run_jobs(_job(), (blas.address(wp), P, K, blas.address(a), lda, N, blas.address(out), ldo, R), n, tiles)
    elif not blas.POOL and parallel_gates_ok():
        products_parallel(wp, a, out)
    else:
        products_serial(wp, a, out)
