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
The code is :mod:`grumpy.kernels.panels`' (its float32 and bfloat16 kernels share it),
with int32 accumulators that start from those offsets.

Only compiled where the CPU (as numba targets it) has AVX-512 VNNI: :func:`available`.
Imported lazily by :mod:`grumpy.quantized`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from grumpy.kernels.nb import _named
from grumpy.kernels.panels import PANEL, has_feature, tile_int8
from grumpy.kernels.quantized_nb import gates_serial, quantize_rows_int8


def available() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI (:func:`panels.has_feature`)."""
    return has_feature("avx512vnni")


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


def _products(wp, start, u, out):
    """out (N, R) float32 = the exact int8 products of u (N, K') uint8 (activations + 128)
    with the packed weights (:func:`pack`), one panel of 64 output columns at a time."""
    N = u.shape[0]
    for p in prange(wp.shape[0]):
        tile_int8(wp, start, u, out, p, 0, N)


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
        tile_int8(wi, ti, xu, gi, p, 0, 1)
        tile_int8(wh, th, hu, gh, p, 0, 1)
    gates_serial(gi, sx, sih, gh, sh, shh, bih, bhh, h.reshape(1, -1), out.reshape(1, -1), np.empty(0, np.float32))


step_serial = njit(cache=True)(_named(_step, "_serial"))
step_parallel = njit(cache=True, parallel=True)(_named(_step, "_parallel"))
