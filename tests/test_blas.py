"""grumpy.kernels.blas: MKL's products against NumPy's, every layout the kernels pass, and
the kernels with MKL against the kernels without it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import grumpy.kernels as K
from grumpy.kernels import blas as _blas
from grumpy.kernels.blas import matmul
from grumpy.kernels import gru_sequence_backward, gru_sequence_forward

needs_mkl = pytest.mark.skipif(_blas.MKL is None, reason="MKL not installed (or GRUMPY_MKL=0)")
needs_numpy_blas_threads = pytest.mark.skipif(
    _blas.MKL is not None or _blas.NUMPY_BLAS is None or _blas.NUMPY_BLAS.set_threads_local is None
    or _blas.NUMPY_BLAS.get_threads is None,
    reason="one_thread() sets NumPy's OpenBLAS only without MKL, where its thread controls are found")

# (M, K, N): NumPy's side (< 2^18 multiply-adds), MKL on one thread, MKL on all of them
SIZES = [(5, 7, 3), (64, 64, 96), (128, 256, 128), (1, 1024, 512), (512, 1024, 1)]


def _layouts(a: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as C-contiguous, F-contiguous (a transposed view), a slice of wider
    rows, and every other column of a wider array (no unit stride: must be copied)."""
    M, K = a.shape
    wide = np.zeros((M, K + 5), a.dtype)
    wide[:, 2 : 2 + K] = a
    spaced = np.zeros((M, 2 * K), a.dtype)
    spaced[:, ::2] = a
    return {"C": a, "F": np.asfortranarray(a), "rows": wide[:, 2 : 2 + K], "strided": spaced[:, ::2]}


@pytest.mark.parametrize("M,K,N", SIZES)
@pytest.mark.parametrize("la", ["C", "F", "rows", "strided"])
@pytest.mark.parametrize("lb", ["C", "F", "rows"])
def test_matmul_matches_float64(M: int, K: int, N: int, la: str, lb: str) -> None:
    rng = np.random.default_rng(M * 7 + K + N)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-5 * np.sqrt(K) * np.abs(a).max() * np.abs(b).max()
    A, B = _layouts(a)[la], _layouts(b)[lb]
    got = matmul(A, B)
    assert got.shape == (M, N) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
    # into a given output, accumulating, also into a non-contiguous one
    for out in (np.ones((M, N), np.float32), np.ones((N, M), np.float32).T, np.ones((M, 2 * N), np.float32)[:, ::2]):
        r = matmul(A, B, out, beta=1.0)
        assert r is out
        np.testing.assert_allclose(out, ref + 1, atol=tol, rtol=0)
    out = np.full((M, N), np.nan, np.float32)  # beta=0 must not read the output (NaN * 0 is NaN)
    matmul(A, B, out)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("M,K", [(7, 5), (3072, 1024), (1, 300)])
def test_matmul_matrix_vector(M: int, K: int) -> None:
    rng = np.random.default_rng(M + K)
    a = rng.standard_normal((M, K)).astype(np.float32)
    v = rng.standard_normal(K).astype(np.float32)
    ref = a.astype(np.float64) @ v
    tol = 1e-5 * np.sqrt(K) * np.abs(a).max() * np.abs(v).max()
    np.testing.assert_allclose(matmul(a, v), ref, atol=tol, rtol=0)
    out = np.ones(2 * M, np.float32)[::2]
    matmul(a, v, out, beta=1.0)
    np.testing.assert_allclose(out, ref + 1, atol=tol, rtol=0)


def test_matmul_other_dtypes_and_errors_are_numpys() -> None:
    a = np.arange(6.0).reshape(2, 3)
    b = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(matmul(a, b), a @ b)  # float64: NumPy, exactly
    with pytest.raises(ValueError):
        matmul(np.ones((300, 300), np.float32), np.ones((200, 300), np.float32))


@needs_mkl
@pytest.mark.parametrize("B,H", [(4, 8), (32, 256), (128, 512)])
@pytest.mark.parametrize("trans", [True, False])
def test_packed(B: int, H: int, trans: bool) -> None:
    rng = np.random.default_rng(B + H)
    w = rng.standard_normal((3 * H, H) if trans else (H, 3 * H)).astype(np.float32)
    p = _blas.packed(w, B, trans=trans)
    assert p is not None
    a = rng.standard_normal((B, H)).astype(np.float32)
    ref = a.astype(np.float64) @ (w.T if trans else w).astype(np.float64)
    tol = 1e-5 * np.sqrt(H) * np.abs(a).max() * np.abs(w).max()
    out = np.full((B, 3 * H), np.nan, np.float32)
    np.testing.assert_allclose(p(a, out), ref, atol=tol, rtol=0)
    out[...] = 1
    p(a, out, beta=1.0)
    np.testing.assert_allclose(out, ref + 1, atol=tol, rtol=0)
    w[...] = 0  # a snapshot: later changes to w do not reach the packed copy
    np.testing.assert_allclose(p(a, out), ref, atol=tol, rtol=0)


@needs_mkl
def test_packed_buffers_are_reused_but_never_shared() -> None:
    # A released pack's buffer serves the next pack of its size (no fresh 9 MB and its
    # page faults every call), but two live packs never share one.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((16, 32)).astype(np.float32)
    w1, w2, w3 = (rng.standard_normal((96, 32)).astype(np.float32) for _ in range(3))
    p1 = _blas.Packed(w1, 16, trans=True)
    first = p1.ptr
    del p1
    p2 = _blas.Packed(w2, 16, trans=True)
    p3 = _blas.Packed(w3, 16, trans=True)
    assert first in (p2.ptr, p3.ptr) and p2.ptr != p3.ptr
    out = np.empty((16, 96), np.float32)
    for p, w in ((p2, w2), (p3, w3)):
        np.testing.assert_allclose(p(a, out), a @ w.T, rtol=1e-5, atol=1e-4)


def test_packed_is_none_without_mkl_or_for_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _blas.packed(np.ones((6, 2)), 3, trans=True) is None
    monkeypatch.setattr(_blas, "MKL", None)
    assert _blas.packed(np.ones((6, 2), np.float32), 3, trans=True) is None
    a = np.ones((600, 600), np.float32)
    np.testing.assert_array_equal(matmul(a, a), a @ a)


@needs_mkl
@pytest.mark.parametrize("B,H,masked", [(1, 512, False), (1, 256, True), (32, 256, True), (64, 128, False), (4, 16, False)])
def test_kernels_with_and_without_mkl_agree(monkeypatch: pytest.MonkeyPatch, B: int, H: int, masked: bool) -> None:
    """The per-step packed products and MKL's other products give the NumPy path's results."""
    rng = np.random.default_rng(B * H)
    T, I = 6, 20
    k = 1 / np.sqrt(H)
    w_ih, w_hh = (rng.uniform(-k, k, s).astype(np.float32) for s in ((3 * H, I), (3 * H, H)))
    b_ih, b_hh = (rng.uniform(-k, k, 3 * H).astype(np.float32) for _ in range(2))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.uniform(-1, 1, (B, H)).astype(np.float32)
    mask = (np.arange(T)[:, None] < rng.integers(1, T + 1, B)[None]).astype(np.float32)[..., None] if masked else None
    d_out = rng.standard_normal((T, B, H)).astype(np.float32)

    def run() -> list[np.ndarray]:
        out, h_last, cache = gru_sequence_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask=mask)
        dx, dh0, g = gru_sequence_backward(d_out, None, cache, w_ih, w_hh)
        inf, _, _ = gru_sequence_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask=mask, keep_cache=False)
        return [np.array(out), h_last, inf, dx, dh0, *g.values()]

    with_mkl = run()
    monkeypatch.setattr(_blas, "MKL", None)
    without = run()
    for a, b in zip(with_mkl, without):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * max(1.0, float(np.abs(b).max())))


def test_grumpy_mkl_0_switches_it_off() -> None:
    code = "from grumpy.kernels import blas; print(blas.MKL is None)"
    env = {**os.environ, "GRUMPY_MKL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("M,N", [(7, 5), (3000, 700)])
def test_column_sums_at_least_as_accurate_as_numpys(M: int, N: int) -> None:
    rng = np.random.default_rng(M)
    a = (rng.standard_normal((M, N)) * 1e-3 + 2e-4).astype(np.float32)
    truth = a.astype(np.float64).sum(0)
    got = _blas.column_sums(a)
    assert got.shape == (N,) and got.dtype == np.float32
    err = np.abs(got - truth).max()
    # the floor, one unit roundoff of the columns' absolute sums, is what any order of a short
    # sum reaches (7 rows: the BLAS's order may lose to NumPy's by a rounding or two, as on
    # AMD Zen's OpenBLAS kernels); for 3000 rows NumPy's row-after-row sum is well above it
    floor = float(np.finfo(np.float32).eps * np.abs(a).astype(np.float64).sum(0).max())
    assert err <= max(np.abs(a.sum(0) - truth).max(), floor)
    np.testing.assert_allclose(_blas.column_sums(a.astype(np.float64)), truth, rtol=1e-12)


@needs_mkl
def test_run_each_returns_in_order_raises_and_restores_threads():
    before = _blas.cores()
    seen = []

    def work(i):
        seen.append(_blas.cores())  # MKL on one thread inside each share
        return i * i

    assert _blas.run_each([lambda i=i: work(i) for i in range(3)]) == [0, 1, 4]
    assert seen == [1, 1, 1]
    assert _blas.cores() == before

    def boom():
        raise ValueError("share 1 failed")

    with pytest.raises(ValueError, match="share 1 failed"):
        _blas.run_each([lambda: None, boom])
    assert _blas.cores() == before


@pytest.mark.parametrize("B", [64, 67, 129])
def test_shared_inference_matches_training_forward(B):
    # Rows never meet in a GRU: sharing them among threads changes nothing but where
    # the input projections are rounded (step by step), with even and uneven shares,
    # reversed and masked. A share's products have fewer rows, which some BLAS kernels sum
    # in another order (OpenBLAS on AMD Zen: a few 1e-7 after 7 steps), so float32 rounding:
    # the suite's float32 tolerance, far below what a wrong share or step would give.
    rng = np.random.default_rng(B)
    T, I, H = 7, 5, 24
    w_ih = rng.standard_normal((3 * H, I)).astype(np.float32) * 0.3
    w_hh = rng.standard_normal((3 * H, H)).astype(np.float32) * 0.3
    b_ih, b_hh = (rng.standard_normal(3 * H).astype(np.float32) for _ in range(2))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    mask = (rng.random((T, B, 1)) > 0.3).astype(np.float32)
    edges = [B * i // 3 for i in range(4)]
    shared = K.Route("shared", shares=tuple(zip(edges[:-1], edges[1:])))  # three shares, even or not
    for reverse in (False, True):
        for m in (None, mask):
            want = K.gru_sequence_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=reverse, mask=m)
            got = K.gru_sequence_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=reverse, mask=m, keep_cache=False,
                                         route=shared)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


@needs_mkl
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_run_each_works_in_a_forked_child():
    # The pool's threads are the parent's: a forked child that reused the pool would
    # wait forever for a thread it does not have.
    assert _blas.run_each([lambda: 1, lambda: 2]) == [1, 2]  # the parent's pool exists
    code = (
        "import os, sys\n"
        "from grumpy.kernels import blas as _blas\n"
        "_blas.run_each([lambda: 1, lambda: 2])\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if _blas.run_each([lambda: 3, lambda: 4]) == [3, 4] else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_numpy_blas_threads
def test_concurrent_one_thread_blocks_give_numpys_threads_back():
    # NumPy's OpenBLAS sets even its "local" thread count for the whole process. Two blocks
    # that overlap, the first out before the second, once left the process on one thread:
    # the second had saved the first's 1 as the count to restore.
    import threading

    before = _blas.NUMPY_BLAS.get_threads()
    first_in, inside, first_out = threading.Event(), threading.Barrier(2), threading.Event()
    seen: list[int] = []

    def block(first: bool) -> None:
        if not first:
            first_in.wait()
        with _blas.one_thread():
            first_in.set()
            inside.wait()
            seen.append(_blas.NUMPY_BLAS.get_threads())
            if not first:
                first_out.wait()
        if first:
            first_out.set()

    threads = [threading.Thread(target=block, args=(f,)) for f in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [1, 1]
    assert _blas.NUMPY_BLAS.get_threads() == before


@needs_numpy_blas_threads
def test_a_shared_inference_pass_leaves_numpys_threads_as_it_found_them():
    rng = np.random.default_rng(0)
    T, B, I, H = 5, 8, 3, 16
    w_ih, w_hh = (rng.standard_normal((3 * H, n)).astype(np.float32) for n in (I, H))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    before = _blas.NUMPY_BLAS.get_threads()
    for _ in range(5):
        K.gru_sequence_forward(x, h0, w_ih, w_hh, None, None, keep_cache=False,
                               route=K.Route("shared", shares=((0, 3), (3, 8))))
        assert _blas.NUMPY_BLAS.get_threads() == before
