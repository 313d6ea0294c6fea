"""int8 and bfloat16 inference copies of a GRU stack or a character model.

``grumpy.quantize(gru_or_model, "int8" | "bfloat16")`` returns an inference-only copy
with the same ``forward(x, h0=None, lengths=None) -> (out, h_n)`` and the streaming
``step(x_t, h) -> (out_t, h)`` of :class:`grumpy.GRUStream`. float32 stays the default
everywhere else and stays exact against PyTorch; these copies are an explicit choice.

The arithmetic, for every matrix product W a (W: (R, K) weights, a: (K,) one stream's
input or state at one step):

* ``int8``: each row of W is stored as int8 q[r] with a float32 scale s[r]
  (symmetric: s[r] = max|W[r]| / 127, q[r] = rint(W[r] * 127 / max|W[r]|)). The
  activation a is quantized the same way, per stream and step (s_a = max|a| / 127), so the
  product is an exact integer sum_k q[r, k] q_a[k] times s_a * s[r]. Weights
  take a quarter of float32's memory. Integer products make the results the same
  on every path: VNNI's, the compiled matrix-vector product of one stream, MKL's
  bfloat16 matrix product for batches (small integers are exact in bfloat16,
  their products and sums exact in float32, see :mod:`grumpy.kernels.quantized_nb`) and the
  pure-NumPy fallback all give the same bits for the products.
* ``bfloat16``: W and a are rounded to bfloat16 (to nearest even), their products
  summed in float32 (what AVX512-BF16 and AMX compute); weights take half of
  float32's memory. The sums' order differs between paths: equal to rounding.

Biases, the gate math and the state stay float32 (the state must not drift); the
character model's embedding and output layer stay float32 too (small next to the
GRU's weights). A float64 stack gives a float32 copy.

Paths: int8 on a CPU with AVX-512 VNNI runs its products on that instruction, one
stream and batches alike (:mod:`grumpy.kernels.vnni`); bfloat16 batches on a CPU with
AVX512-BF16 on ``vdpbf16ps`` (:mod:`grumpy.kernels.panels`). Otherwise one stream runs
compiled (numba) kernels that read the int8 or bfloat16 weights directly, which is what
makes generation faster (the step is bound by reading the weights); batches use MKL's
bfloat16 matrix product (AVX512-BF16 or AMX where the CPU has them) when MKL is loaded,
else NumPy's float32 product on the quantized values. ``GRUMPY_QUANT_BACKEND=numpy|numba``
forces a path (tests use it; ``numba`` is the portable compiled path, without VNNI).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Literal

import numpy as np

from grumpy.kernels.route import INFER_CHUNK_BYTES, PARALLEL_MIN, QUANT_DENSE_K, QUANT_PARALLEL_MIN, parallel_gates_ok
from grumpy.layers import GRU, lengths_mask
from grumpy.stream import StreamState, check_streamable

Precision = Literal["int8", "bfloat16"]
PRECISIONS = ("int8", "bfloat16")
_F32 = np.dtype(np.float32)
_BLOCK = 1024  # int8 products are exact in float32 up to this many terms (see grumpy.kernels.quantized_nb)
# "auto": VNNI for int8 where the CPU has it, MKL for batches, numba, then NumPy;
# "numba" (the portable compiled kernels) or "numpy" forces one.
_BACKEND = os.environ.get("GRUMPY_QUANT_BACKEND", "auto")


# -- the number formats -----------------------------------------------------------


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    b = np.ascontiguousarray(a, _F32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> their float32 values (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w (R, K) -> q (R, K) int8 in [-127, 127], scale (R,) float32 with w ≈ scale[:, None] * q.
    Symmetric per row; an all-zero row gets scale 0."""
    w = np.asarray(w, _F32)
    m = np.abs(w).max(axis=1)
    inv = np.divide(np.float32(127.0), m, out=np.zeros_like(m), where=m > 0)
    q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
    return q, (m / np.float32(127.0)).astype(_F32)


# -- backends -----------------------------------------------------------------------


def _numba() -> Any:
    """grumpy.kernels.quantized_nb, or None when numba is missing, disabled (GRUMPY_NUMBA=0) or not wanted."""
    from grumpy.kernels.route import compiled_kernels

    return compiled_kernels("quantized_nb") if _BACKEND != "numpy" else None


class _Mkl:
    """MKL's bfloat16 matrix products (cblas_gemm_bf16bf16f32 and its packed form) via ctypes."""

    def __init__(self, lib: Any) -> None:
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self.gemm = lib.cblas_gemm_bf16bf16f32
        self.gemm.restype, self.gemm.argtypes = None, [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        self.size = lib.cblas_gemm_bf16bf16f32_pack_get_size
        self.size.restype, self.size.argtypes = ctypes.c_size_t, [i, i, i, i]
        self.pack = lib.cblas_gemm_bf16bf16f32_pack
        self.pack.restype, self.pack.argtypes = None, [i, i, i, i, i, i, p, i, p]
        self.compute = lib.cblas_gemm_bf16bf16f32_compute
        self.compute.restype, self.compute.argtypes = None, [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        # the same function as a C pointer with integer addresses, for the compiled time loop
        z = ctypes.c_size_t
        self.compute_ptr = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, f, z, i, z, i, f, z, i)(
            ctypes.cast(self.compute, ctypes.c_void_p).value or 0)


def _vnni(precision: str) -> Any:
    """grumpy.kernels.vnni where ``precision`` is int8 and its products can run on AVX-512
    VNNI (numba, a CPU with it, backend "auto"), else None: the portable paths' integers."""
    if precision != "int8" or _BACKEND != "auto" or _numba() is None:
        return None
    from grumpy.kernels.route import compiled_kernels

    k = compiled_kernels("vnni")
    return k if k is not None and k.available() else None


def _bf16_panels(precision: str) -> Any:
    """grumpy.kernels.panels where ``precision`` is bfloat16 and its products can run on
    AVX512-BF16 (numba, a CPU with it, backend "auto"), else None."""
    if precision != "bfloat16" or _BACKEND != "auto" or _numba() is None:
        return None
    from grumpy.kernels.route import compiled_kernels

    k = compiled_kernels("panels")
    return k if k is not None and k.bf16_available() else None


_MKL: Any = None  # an _Mkl once looked up; False when MKL or its bfloat16 products are missing
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162


def _mkl() -> _Mkl | None:
    global _MKL
    if _MKL is None:
        from grumpy.kernels import blas as _blas

        try:
            _MKL = _Mkl(_blas.MKL) if _blas.MKL is not None else False
        except AttributeError:  # an MKL without bfloat16 products
            _MKL = False
    return _MKL if _BACKEND == "auto" and _MKL else None


class QMatrix:
    """One weight matrix (R, K) in int8 or bfloat16, and its product with activations.

    ``self(a)``: a (N, K) float32, N streams -> (N, R) float32, the product defined in
    the module docstring (activations quantized here, per row)."""

    def __init__(self, w: np.ndarray, precision: Precision) -> None:
        self.precision = precision
        w = np.asarray(w, _F32)
        self.shape = w.shape
        if precision == "int8":
            self.data, self.scale = quantize_int8(w)
        else:
            self.data, self.scale = bf16_bits(w), np.ones(w.shape[0], _F32)
        self._dense: np.ndarray | None = None  # float32 values of data (NumPy fallback)
        self._bits: np.ndarray | None = None  # bfloat16 bits of data (MKL)
        self._pack: tuple[int, np.ndarray] | None = None  # (rows, MKL's packed weights)
        self._vnni: tuple[np.ndarray, np.ndarray] | None = None  # (int8 weights, sums' starts) packed for VNNI
        self._panels: np.ndarray | None = None  # bfloat16 weights packed for AVX512-BF16

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (self.scale.nbytes if self.precision == "int8" else 0))

    def rows(self, r0: int, r1: int) -> QMatrix:
        """Rows r0:r1 (per-row scales make a row slice a matrix of its own)."""
        out = QMatrix.__new__(QMatrix)
        out.precision, out.shape = self.precision, (r1 - r0, self.shape[1])
        out.data, out.scale = self.data[r0:r1], self.scale[r0:r1]
        out._dense = out._bits = None
        out._pack = out._vnni = out._panels = None
        return out

    def dense(self) -> np.ndarray:
        """The weights as float32 values: q (unscaled) for int8, the bfloat16 values for bfloat16."""
        if self._dense is None:
            self._dense = self.data.astype(_F32) if self.precision == "int8" else bf16_values(self.data)
        return self._dense

    def vnni_packed(self, k: Any) -> tuple[np.ndarray, np.ndarray]:
        """The int8 weights packed for the VNNI kernel (:func:`grumpy.kernels.vnni.pack`), kept:
        a copy the size of the weights."""
        if self._vnni is None:
            self._vnni = k.pack(self.data)
        return self._vnni

    def panels_packed(self, k: Any) -> np.ndarray:
        """The bfloat16 weights packed for the AVX512-BF16 kernel (:func:`grumpy.kernels.panels.pack_bf16`),
        kept: a copy the size of the weights."""
        if self._panels is None:
            self._panels = k.pack_bf16(self.data)
        return self._panels

    def quantize_activations(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """a (N, K) float32 -> (its quantized values as float32 (N, K), per-row scales (N,) or None)."""
        nb = _numba()
        aq = np.empty_like(a)
        if self.precision == "bfloat16":
            if nb is not None:
                nb.round_rows_bf16(a, aq)
            else:
                aq = bf16_values(bf16_bits(a))
            return aq, None
        sa = np.empty(a.shape[0], _F32)
        if nb is not None:
            nb.quantize_rows_int8(a, aq, sa)
        else:
            m = np.abs(a).max(axis=1)
            inv = np.divide(np.float32(127.0), m, out=np.zeros_like(m), where=m > 0)
            np.rint(a * inv[:, None], out=aq)
            sa = m / np.float32(127.0)
        return aq, sa

    def products(self, aq: np.ndarray, pack: bool = False) -> np.ndarray:
        """aq (N, K) quantized activations -> (N, R) raw products (before the scales).
        ``pack``: keep the weights packed by MKL for products with N rows (the recurrent
        product, the same N at every step), faster at large H (docs/precision.md)."""
        N, K = aq.shape
        R = self.shape[0]
        out = np.empty((N, R), _F32)
        k = _vnni(self.precision)
        pk = _bf16_panels(self.precision) if N > 1 else None
        mkl = _mkl() if N > 1 else None
        nb = _numba()
        if pk is not None:
            # batches in bfloat16 on vdpbf16ps: twice float32's multiply-adds an instruction
            a16 = pk.bf16_rows(N, K)
            pk.to_bf16_rows(aq, a16)
            big = N * R * K >= QUANT_PARALLEL_MIN and parallel_gates_ok()
            (pk.products_bf16_parallel if big else pk.products_bf16_serial)(self.panels_packed(pk), a16, out)
        elif k is not None:
            u = k.activations(N, K)
            k.offset_rows(aq, u)
            # batches on the calling thread unless numba's threads sleep when idle (TBB): the
            # serial kernel already outruns NumPy's float32 product on both cores
            big = N * R * K >= QUANT_PARALLEL_MIN and (N == 1 or parallel_gates_ok())
            (k.products_parallel if big else k.products_serial)(*self.vnni_packed(k), u, out)
        elif mkl is not None and not pack and K < QUANT_DENSE_K:
            # short rows (a layer's input, e.g. 65 one-hot characters): MKL's float32 product
            # on the quantized values, faster than its bfloat16 product for short rows (which
            # suits long ones); exact for int8, the same float32 sums for bfloat16
            from grumpy.kernels import blas as _blas

            _blas.matmul(aq, self.dense().T, out)
        elif mkl is not None:
            from grumpy.kernels import blas as _blas

            a16 = np.empty((N, K), np.uint16)
            if nb is not None:
                nb.to_bf16_bits(aq, a16)
            else:
                a16[...] = aq.view(np.uint32) >> np.uint32(16)
            w16 = self._mkl_bits()
            with _blas._threads(N * R * K):
                if pack and (self.precision == "bfloat16" or K <= _BLOCK):
                    mkl.compute(_ROW_MAJOR, _NO_TRANS, _PACKED, N, R, K, 1.0, a16.ctypes.data, K,
                                self._packed(mkl, N), K, 0.0, out.ctypes.data, R)
                else:
                    self._blocks(lambda k0, k1, c: mkl.gemm(_ROW_MAJOR, _NO_TRANS, _TRANS, N, R, k1 - k0, 1.0,
                                                            a16[:, k0:].ctypes.data, K, w16[:, k0:].ctypes.data, K,
                                                            0.0, c.ctypes.data, R), K, out)
        elif nb is not None and (N == 1 or _BACKEND == "numba"):
            big = N * R * K >= QUANT_PARALLEL_MIN
            if self.precision == "int8":
                (nb.products_int8_parallel if big else nb.products_int8_serial)(aq.astype(np.int16), self.data, out)
            else:
                (nb.products_bf16_parallel if big else nb.products_bf16_serial)(aq, self.data, out)
        else:
            # NumPy's float32 product on the float32 values of the quantized numbers (a copy
            # kept, 4 bytes a weight): batches without MKL, many times faster there than the
            # compiled loops over int8 or bfloat16, and the same numbers: integer sums exact
            # below 2^24 for int8 (hence the blocks), float32 sums for bfloat16
            w = self.dense()
            self._blocks(lambda k0, k1, c: np.matmul(aq[:, k0:k1], w[:, k0:k1].T, out=c), K, out)
        return out

    def _mkl_bits(self) -> np.ndarray:
        """The weights as bfloat16 bit patterns (R, K) for MKL: int8 values are exact in bfloat16."""
        if self._bits is None:
            self._bits = np.ascontiguousarray(self.data if self.precision == "bfloat16" else bf16_bits(self.dense()))
        return self._bits

    def _packed(self, mkl: _Mkl, N: int) -> int:
        """The address of the weights packed by MKL for N-row products (one packing kept)."""
        if self._pack is None or self._pack[0] != N:
            R, K = self.shape
            size = mkl.size(_B_MATRIX, N, R, K)
            raw = np.empty(size + 64, np.uint8)
            buf = raw[-raw.ctypes.data % 64 :][:size]  # 64-byte aligned, as MKL's allocator gives
            mkl.pack(_ROW_MAJOR, _B_MATRIX, _TRANS, N, R, K, self._mkl_bits().ctypes.data, K, buf.ctypes.data)
            self._pack = (N, buf)
        return int(self._pack[1].ctypes.data)

    def _blocks(self, product: Any, K: int, out: np.ndarray) -> None:
        """out = the sum over K in blocks: one block for bfloat16 and for int8 with K <= 1024;
        longer int8 rows add exact float32 block sums in float64, as the compiled kernel does."""
        if self.precision == "bfloat16" or K <= _BLOCK:
            product(0, K, out)
            return
        total = np.zeros(out.shape, np.float64)
        for k0 in range(0, K, _BLOCK):
            product(k0, min(K, k0 + _BLOCK), out)
            total += out
        out[...] = total

    def raw(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """a (N, K) float32 -> (the raw products (N, R), the activations' scales (N,), ones
        for bfloat16): the product is raw * (scales[:, None] * self.scale[None, :])."""
        aq, sa = self.quantize_activations(np.ascontiguousarray(a, _F32))
        return self.products(aq), np.ones(a.shape[0], _F32) if sa is None else sa

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """a (N, K) float32 -> the product (N, R), scaled."""
        a = np.ascontiguousarray(a, _F32)
        aq, sa = self.quantize_activations(a)
        raw = self.products(aq)
        if sa is None:
            return raw
        nb = _numba()
        if nb is not None:
            nb.scale_products(raw, sa, self.scale, raw)
        else:
            raw *= sa[:, None] * self.scale[None, :]
        return raw


# -- the GRU stack --------------------------------------------------------------------


def _gates_numpy(gi: np.ndarray, gh: np.ndarray, b_ih: np.ndarray, b_hh: np.ndarray, hp: np.ndarray,
                 ho: np.ndarray, m: np.ndarray | None) -> None:
    """The reset_after gate math in NumPy: gi, gh (B, 3H) products without biases, hp -> ho (B, H)."""
    from grumpy._util import sigmoid

    H = hp.shape[1]
    a = gi + b_ih
    e = gh + b_hh
    rz = sigmoid(a[:, : 2 * H] + e[:, : 2 * H])
    r, z = rz[:, :H], rz[:, H:]
    n = np.tanh(a[:, 2 * H :] + r * e[:, 2 * H :])
    h = n + z * (hp - n)
    ho[...] = h if m is None else hp + m[:, None] * (h - hp)


class _Cell:
    """One direction of one layer: quantized weights, float32 biases."""

    def __init__(self, p: dict[str, np.ndarray], sfx: str, H: int, precision: Precision, reset_after: bool) -> None:
        self.w_ih = QMatrix(p["weight_ih" + sfx], precision)
        self.w_hh = QMatrix(p["weight_hh" + sfx], precision)
        zeros = np.zeros(3 * H, _F32)
        self.b_ih = np.array(p.get("bias_ih" + sfx, zeros), _F32)  # copies: a snapshot, as the weights
        self.b_hh = np.array(p.get("bias_hh" + sfx, zeros), _F32)
        self.H = H
        self.reset_after = reset_after
        self._scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # the one-stream step's
        self._vnni_scratch: tuple[np.ndarray, np.ndarray] | None = None  # its activations (VNNI)
        if not reset_after:  # W_hn acts on r ⊙ h: a second product after the gates r, z
            self.w_rz, self.w_n = self.w_hh.rows(0, 2 * H), self.w_hh.rows(2 * H, 3 * H)

    def step(self, gi: tuple[np.ndarray, np.ndarray] | None, x: np.ndarray, hp: np.ndarray, ho: np.ndarray,
             m: np.ndarray | None, serial: bool = False) -> None:
        """ho (B, H) = the state after one step from hp (B, H); gi the input products as
        (raw (B, 3H), scales (B,)) (see :meth:`QMatrix.raw`), or None to compute them from
        x (B, I) here; m (B,) the mask or None. ``serial``: one stream on the calling
        thread only (see :meth:`sequence`)."""
        B, H = hp.shape
        nb = _numba()
        if nb is not None and self.reset_after and B == 1 and m is None:
            self._fused_step(nb, x[0], hp[0], ho[0], serial)
            return
        gi_raw, si = self.w_ih.raw(x) if gi is None else gi
        if nb is None or not self.reset_after:
            a = gi_raw * (si[:, None] * self.w_ih.scale[None, :])
            if not self.reset_after:
                self._step_reset_before(a, hp, ho, m)
                return
            gh, sa = self.w_hh.raw(hp)
            _gates_numpy(a, gh * (sa[:, None] * self.w_hh.scale[None, :]), self.b_ih, self.b_hh, hp, ho, m)
            return
        aq, sa_ = self.w_hh.quantize_activations(hp)
        gh = self.w_hh.products(aq, pack=True)
        sa = np.ones(B, _F32) if sa_ is None else sa_
        gates = nb.gates_parallel if B * H >= PARALLEL_MIN and parallel_gates_ok() else nb.gates_serial
        gates(gi_raw, si, self.w_ih.scale, gh, sa, self.w_hh.scale, self.b_ih, self.b_hh, hp, ho,
              np.empty(0, _F32) if m is None else m)

    def _fused_step(self, nb: Any, x: np.ndarray, h: np.ndarray, out: np.ndarray, serial: bool) -> None:
        """One stream: one compiled call for both products and the gates."""
        H, I = self.H, x.shape[0]
        big = not serial and 3 * H * (H + I) >= QUANT_PARALLEL_MIN
        if self._scratch is None:  # kept: fresh arrays cost a noticeable share of a small step
            self._scratch = (np.empty((2, 3 * H), _F32), np.empty((1, I), _F32), np.empty((1, H), _F32))
        g, xq, hq = self._scratch
        x, h = np.ascontiguousarray(x, _F32), np.ascontiguousarray(h, _F32)
        k = _vnni(self.w_ih.precision)
        if k is not None:
            if self._vnni_scratch is None:
                self._vnni_scratch = (k.activations(1, I), k.activations(1, H))
            xu, hu = self._vnni_scratch
            (wi, ti), (wh, th) = self.w_ih.vnni_packed(k), self.w_hh.vnni_packed(k)
            (k.step_parallel if big else k.step_serial)(x, h, wi, ti, wh, th, self.w_ih.scale, self.w_hh.scale,
                                                         self.b_ih, self.b_hh, out, xq, hq, xu, hu, g)
        elif self.w_ih.precision == "int8":
            fn = nb.step_int8_parallel if big else nb.step_int8_serial
            fn(x, h, self.w_ih.data, self.w_ih.scale, self.w_hh.data, self.w_hh.scale, self.b_ih, self.b_hh, out,
               xq, hq, g)
        else:
            fn = nb.step_bf16_parallel if big else nb.step_bf16_serial
            fn(x, h, self.w_ih.data, self.w_hh.data, self.b_ih, self.b_hh, out, xq, hq, g)

    def _step_reset_before(self, gi: np.ndarray, hp: np.ndarray, ho: np.ndarray, m: np.ndarray | None) -> None:
        """Cho et al.'s form: n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn), in NumPy."""
        from grumpy._util import sigmoid

        H = self.H
        a = gi + self.b_ih
        rz = sigmoid(a[:, : 2 * H] + self.w_rz(hp) + self.b_hh[: 2 * H])
        r, z = rz[:, :H], rz[:, H:]
        n = np.tanh(a[:, 2 * H :] + self.w_n(r * hp) + self.b_hh[2 * H :])
        h = n + z * (hp - n)
        ho[...] = h if m is None else hp + m[:, None] * (h - hp)

    def sequence(self, x: np.ndarray, h0: np.ndarray, reverse: bool, mask: np.ndarray | None) -> tuple[
            np.ndarray, np.ndarray]:
        """x (T, B, I), h0 (B, H), mask (T, B) or None -> output (T, B, H), h_last (B, H)."""
        T, B, I = x.shape
        H = self.H
        hs = np.empty((T + 1, B, H), _F32)  # as grumpy.kernels: hs[t + 1] after step t (forward)
        hs[T if reverse else 0] = h0
        order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
        nb = _numba()
        one = B == 1 and self.reset_after and nb is not None
        # (int8 rows longer than 1024 need the blocked sums of the Python loop's products)
        exact = self.w_hh.precision == "bfloat16" or H <= _BLOCK
        # (int8 on VNNI and bfloat16 on AVX512-BF16: the products above, on weights packed
        # once; faster than MKL's bfloat16 loop, and than NumPy's sgemm repacking them each step)
        own = _vnni(self.w_hh.precision) is not None or _bf16_panels(self.w_hh.precision) is not None
        compiled = B > 1 and self.reset_after and nb is not None and exact and not own and _BACKEND == "auto"
        loop = self._compiled_loop(nb, _mkl(), B, mask, T) if compiled else None
        chunk = max(1, min(T, INFER_CHUNK_BYTES // (B * 3 * H * 4)))
        for c0 in range(0, T, chunk):
            ts = order[c0 : c0 + chunk]
            lo, n = min(ts), len(ts)
            # the input products of a chunk of steps at once (one stream: inside each step)
            gi = si = None
            if not one:  # raw products and their scales, folded into the gate kernel
                raw, sc = self.w_ih.raw(x[lo : lo + n].reshape(n * B, I))
                gi, si = raw.reshape(n, B, 3 * H), sc.reshape(n, B)
            if loop is not None and gi is not None and si is not None:
                loop(gi, si, hs[lo : lo + n + 1], lo, n, reverse)
                continue
            for t in ts:
                ip, io = (t + 1, t) if reverse else (t, t + 1)
                m = None if mask is None else mask[t]
                if one and m is not None and m[0] == 0:  # a padded step of one stream: the state stays
                    hs[io] = hs[ip]
                    continue
                g = None if gi is None or si is None else (gi[t - lo], si[t - lo])
                # One stream on the calling thread: a sequence sits between the caller's
                # products (its head), after which NumPy's BLAS threads spin for a while and
                # numba's would share the cores with them, 3.3x slower a step than serial
                # (docs/precision.md); a single step() between vector products keeps both.
                self.step(g, x[t], hs[ip], hs[io], None if one else m, serial=one)
        out = hs[:T] if reverse else hs[1:]
        if mask is not None:
            out = out * mask[..., None]
        return out, hs[0 if reverse else T].copy()


    def _compiled_loop(self, nb: Any, mkl: _Mkl | None, B: int, mask: np.ndarray | None, T: int) -> Any:
        """The recurrent steps of a batch in one compiled call per chunk: MKL's packed
        bfloat16 product through a C pointer, else NumPy's own sgemm on the float32 values
        of the quantized weights; the Python loop's arithmetic, without Python between
        steps. None where neither product can be called from compiled code."""
        from grumpy.kernels import blas as _blas

        if mkl is None and _blas.SGEMM is None:
            return None
        H = self.H
        w = self.w_hh
        m2 = np.empty((T, 0), _F32) if mask is None else np.ascontiguousarray(mask, _F32)
        aq, a16 = np.empty((B, H), _F32), np.empty((B, H), np.uint16)
        sa, gh = np.ones(B, _F32), np.empty((B, 3 * H), _F32)
        int8 = w.precision == "int8"
        parallel = B * H >= PARALLEL_MIN and parallel_gates_ok()

        # MKL's packed bfloat16 product, else NumPy's sgemm on the float32 values (kept by w)
        gemm, ptr = (mkl.compute_ptr, w._packed(mkl, B)) if mkl is not None else (_blas.SGEMM, w.dense().ctypes.data)

        def run(gi: np.ndarray, si: np.ndarray, hs: np.ndarray, lo: int, n: int, reverse: bool) -> None:
            with _blas._threads(B * 3 * H * H):
                nb.steps_loop(gemm, ptr, mkl is not None, int8, gi, si, self.w_ih.scale, hs, m2[lo : lo + n],
                              reverse, w.scale, self.b_ih, self.b_hh, aq, a16, sa, gh, parallel)

        return run


class QuantizedGRU(StreamState):
    """An inference-only int8 or bfloat16 copy of a :class:`grumpy.GRU` (see the module
    docstring for the arithmetic). ``forward(x, h0, lengths=)`` as ``GRU.forward``, and
    for unidirectional stacks the streaming ``step`` / ``initial_state`` / ``reset`` of
    :class:`grumpy.GRUStream`. Always float32 in and out."""

    training = False

    def __init__(self, gru: GRU, precision: Precision) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected 'int8' or 'bfloat16', got {precision!r}")
        if not isinstance(gru, GRU):
            raise ValueError(f"quantize: expected a grumpy.GRU or a character model, got {type(gru).__name__}")
        self.precision = precision
        self.input_size, self.hidden_size, self.num_layers = gru.input_size, gru.hidden_size, gru.num_layers
        self.bidirectional, self.batch_first, self.reset_after = gru.bidirectional, gru.batch_first, gru.reset_after
        self.bias = gru.bias
        self.dtype = _F32
        D = 2 if self.bidirectional else 1
        self.num_directions = D
        self.cells = [
            _Cell(gru.params, f"_l{k}{('', '_reverse')[d]}", self.hidden_size, precision, self.reset_after)
            for k in range(self.num_layers) for d in range(D)
        ]

    @property
    def nbytes(self) -> int:
        """Bytes of weights (quantized matrices, their scales and the float32 biases)."""
        return sum(c.w_ih.nbytes + c.w_hh.nbytes + c.b_ih.nbytes + c.b_hh.nbytes for c in self.cells)

    def eval(self) -> QuantizedGRU:
        return self

    def train(self, mode: bool = True) -> QuantizedGRU:
        if mode:
            raise ValueError("a quantized GRU is for inference only; train the float32 GRU and quantize it again")
        return self

    def forward(self, x: np.ndarray, h0: np.ndarray | None = None, *, lengths: Any = None,
                grad: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """x (T, B, I), or (B, T, I) with batch_first; h0 (L*D, B, H) or None for zeros;
        lengths (B,) or None -> output (T, B, D*H) (or (B, T, D*H)), h_n (L*D, B, H).
        ``grad`` is accepted for ``GRU.forward``'s signature and must be False."""
        if grad:
            raise ValueError("a quantized GRU has no backward: call forward(..., grad=False)")
        x = np.asarray(x)
        lay = "(B, T, I)" if self.batch_first else "(T, B, I)"
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x: expected a 3-d array {lay} with I={self.input_size}, got shape {x.shape}")
        if self.batch_first:
            x = x.transpose(1, 0, 2)
        x = np.ascontiguousarray(x, _F32)
        T, B, _ = x.shape
        D, H = self.num_directions, self.hidden_size
        LD = self.num_layers * D
        if h0 is None:
            h0 = np.zeros((LD, B, H), _F32)
        h0 = np.asarray(h0)
        if h0.shape != (LD, B, H):
            raise ValueError(f"h0: expected shape {(LD, B, H)} (num_layers * D, B, H), got {h0.shape}")
        mask = None if lengths is None else lengths_mask(lengths, T, B, _F32)[..., 0]
        h_n = np.empty((LD, B, H), _F32)
        inp = x
        for k in range(self.num_layers):
            outs = []
            for d in range(D):
                out, h_n[k * D + d] = self.cells[k * D + d].sequence(inp, h0[k * D + d], d == 1, mask)
                outs.append(out)
            inp = outs[0] if D == 1 else np.ascontiguousarray(np.concatenate(outs, axis=-1))
        if self.batch_first:
            inp = np.ascontiguousarray(inp.transpose(1, 0, 2))
        return inp, h_n

    __call__ = forward

    def step(self, x_t: np.ndarray, h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One step of B streams (unidirectional only): x_t (B, I), h (num_layers, B, H) or
        None -> (out_t (B, H), the new h (num_layers, B, H))."""
        check_streamable(self)
        x, h = self._check_step(x_t, h)
        h_new = np.empty_like(h)
        for k, cell in enumerate(self.cells):
            cell.step(None, x, h[k], h_new[k], None)
            x = h_new[k]
        return h_new[-1].copy(), h_new

    def __repr__(self) -> str:
        return (f"QuantizedGRU({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"precision={self.precision!r}, bidirectional={self.bidirectional}, "
                f"reset_after={self.reset_after})")


# -- the character model ----------------------------------------------------------------


class QuantizedCharModel(StreamState):
    """An inference-only int8 or bfloat16 copy of a ``grumpy.lm.CharModel``: the GRU
    stack quantized, the embedding and output layer kept in float32.

    ``forward(idx, h0, lengths=)``: idx (T, B) ints -> logits (T, B, V), h_n (L, B, H).
    ``step(ids, h)``: ids (B,) -> logits (B, V), h (L, B, H); ``step(i, h)`` with an int and
    h (L, H) -> logits (V,), h (L, H), as ``CharModel.step``. ``init_state``, ``eval``,
    ``stepper`` and ``gru.training`` as CharModel has them, so evaluation and sampling
    code written for CharModel runs unchanged."""

    def __init__(self, model: Any, precision: Precision) -> None:
        self.config = model.config
        self.precision = precision
        p = model.params
        self.gru = QuantizedGRU(model.gru, precision)
        self.embedding = np.asarray(p["embedding.weight"], _F32).copy() if "embedding.weight" in p else None
        self.head_weight = np.asarray(p["head.weight"], _F32).copy()
        self.head_bias = np.asarray(p["head.bias"], _F32).copy()
        self.num_layers, self.hidden_size = self.gru.num_layers, self.gru.hidden_size
        self.input_size = self.gru.input_size
        self.dtype = _F32

    def eval(self) -> QuantizedCharModel:
        return self

    def train(self, mode: bool = True) -> QuantizedCharModel:
        self.gru.train(mode)
        return self

    def init_state(self, batch_size: int) -> np.ndarray:
        """Zeros (L, B, H)."""
        return self.initial_state(batch_size)

    def _embed(self, idx: np.ndarray) -> np.ndarray:
        if self.embedding is not None:
            return self.embedding[idx]
        x = np.zeros(idx.shape + (self.config.vocab_size,), _F32)
        np.put_along_axis(x, idx[..., None], 1.0, axis=-1)
        return x

    def _logits(self, out: np.ndarray) -> np.ndarray:
        from grumpy.kernels import linear

        flat = out.reshape(-1, out.shape[-1])
        return (linear(flat, self.head_weight) + self.head_bias).reshape(out.shape[:-1] + (-1,))

    def forward(self, idx: np.ndarray, h0: np.ndarray | None = None, *, lengths: Any = None,
                grad: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """idx (T, B) ints in [0, V), h0 (L, B, H) or None -> logits (T, B, V), h_n (L, B, H)."""
        idx = np.asarray(idx)
        V = self.config.vocab_size
        if idx.ndim != 2 or idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= V)):
            raise ValueError(f"idx: expected a (T, B) integer array with values in [0, {V}), got shape {idx.shape}")
        out, h_n = self.gru.forward(self._embed(idx), h0, lengths=lengths, grad=grad)
        return self._logits(out), h_n

    __call__ = forward

    def step(self, ids: Any, h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ids (B,) ints, h (L, B, H) or None -> logits (B, V), h (L, B, H); or one stream
        as CharModel.step: an int and h (L, H) -> logits (V,), h (L, H)."""
        if np.ndim(ids) == 0:
            hb = None if h is None else np.asarray(h)[:, None]
            logits, h_new = self.step(np.array([int(ids)]), hb)
            return logits[0], h_new[:, 0]
        ids = np.asarray(ids)
        out, h_new = self.gru.step(self._embed(ids), h)
        return self._logits(out), h_new

    def stepper(self) -> Any:
        """:meth:`step` for one stream (CharModel's interface: nothing to prepare here)."""
        return self.step


def quantize(obj: Any, precision: Precision) -> QuantizedGRU | QuantizedCharModel:
    """An inference-only int8 or bfloat16 copy of a ``grumpy.GRU`` or a
    ``grumpy.lm.CharModel`` (see the module docstring for what each computes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected 'int8' or 'bfloat16', got {precision!r}")
    if isinstance(obj, GRU):
        return QuantizedGRU(obj, precision)
    # A character model is recognised by what it has, not by importing grumpy.lm (the library
    # imports nothing above it, docs/architecture.md): a GRU, a config and a head.
    if isinstance(getattr(obj, "gru", None), GRU) and hasattr(obj, "config") and "head.weight" in getattr(
            obj, "params", {}):
        return QuantizedCharModel(obj, precision)
    raise ValueError(f"quantize: expected a grumpy.GRU or a character model, got {type(obj).__name__}")
