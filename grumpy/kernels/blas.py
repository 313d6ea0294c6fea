"""The matrix products of grumpy's float32 kernels: Intel MKL when installed, else NumPy.

Each step of a GRU multiplies a small (B, H) state by the same (H, 3H) weights.
A BLAS call packs the weights into its internal layout on every call; at
B = 32 that repacking costs about as much as the arithmetic. MKL can pack a
matrix once and reuse it (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``,
:class:`Packed`), which is faster than NumPy's OpenBLAS on these products.

Once MKL is used, every other float32 product must use it too (:func:`matmul`):
after a call each library's worker threads keep spinning for a while, and two
libraries spinning side by side on two cores starve each other.

The thread pools are why sizes are split three ways. NumPy's OpenBLAS runs
products under 2^18 multiply-adds on the calling thread (its own threshold), so
those stay with NumPy, whose call also costs less. MKL takes everything larger,
on one thread up to :data:`MKL_PARALLEL_MIN` (no pool to wake and leave
spinning) and on all of them above. So NumPy's pool is never woken, whatever
the size. The measurements are in docs/benchmarks.md, "How grumpy is fast".

MKL comes from the ``mkl`` wheel (x86-64), found through its package metadata
and called through ctypes. Without it, or with ``GRUMPY_MKL=0``, :func:`packed`
returns None and :func:`matmul` is ``np.matmul``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

# CBLAS's enumerations (cblas.h), also passed by the compiled loops of grumpy.kernels.nb.
ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162
_F32 = np.dtype(np.float32)
_i, _l, _p = ctypes.c_int, ctypes.c_int64, ctypes.c_size_t  # C int, 64-bit integer, address


def _load() -> Any:
    """libmkl_rt through ctypes, or None (not installed, not loadable, or GRUMPY_MKL=0)."""
    if os.environ.get("GRUMPY_MKL", "1") == "0":
        return None
    try:
        import importlib.metadata as md

        dist = md.distribution("mkl")
        rt = [f for f in dist.files or () if f.name.startswith("libmkl_rt.so") or f.name.startswith("mkl_rt")]
        lib = ctypes.CDLL(os.path.realpath(str(dist.locate_file(rt[0]))))
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.cblas_sgemm.restype = None
        lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
        lib.cblas_sgemm_pack_get_size.argtypes = [i, i, i, i]
        lib.cblas_sgemm_pack.restype = None
        lib.cblas_sgemm_pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
        lib.cblas_sgemm_compute.restype = None
        lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
        lib.MKL_Set_Num_Threads_Local.restype = i
        lib.MKL_Set_Num_Threads_Local.argtypes = [i]
        lib.MKL_Get_Max_Threads.restype = i
        lib.MKL_Get_Max_Threads.argtypes = []
        return lib
    except Exception:  # no wheel, another platform, a broken install: NumPy's BLAS instead
        return None


# Loaded on import, so that threadpoolctl (``grumpy train --threads``, the benchmark)
# sees MKL's thread pool and limits it with NumPy's.
MKL: Any = _load()
# cblas_sgemm_compute as a C function pointer with integer addresses, which numba's
# compiled loops can take as an argument and call (and still be cached), or None.
COMPUTE: Any = None
if MKL is not None:
    COMPUTE = ctypes.CFUNCTYPE(None, _i, _i, _i, _i, _i, _i, _p, _i, _p, _i, ctypes.c_float, _p, _i)(
        ctypes.cast(MKL.cblas_sgemm_compute, ctypes.c_void_p).value or 0)


class NumpyBLAS(NamedTuple):
    """What grumpy calls of the BLAS NumPy itself uses (ctypes functions; None where absent)."""

    sgemm: Any  # cblas_sgemm (64-bit integers) as a C function pointer the compiled loops can call
    sgemv: Any  # cblas_sgemv, the same way: one stream's products (its sgemm with one column is slower)
    get_threads: Any  # () -> the threads its calls use
    set_threads_local: Any  # (n) -> the calling thread's previous count
    run_jobs: Any  # gotoblas_pthread(n, job, records, stride): job(records + i * stride) for i < n on its threads


def _numpy_blas() -> NumpyBLAS | None:
    """The BLAS NumPy itself uses, or None where it cannot be found.

    NumPy's wheels ship OpenBLAS with 64-bit integers and (NumPy 2) a ``scipy_``
    prefix. Loading the library NumPy has loaded gives the same library, so grumpy's
    loops and the caller's own ``a @ b`` share one thread pool instead of competing."""
    import glob

    here = os.path.dirname(np.__file__)
    paths = [p for d in (os.path.join(here, os.pardir, "numpy.libs"), os.path.join(here, ".dylibs"))
             for p in sorted(glob.glob(os.path.join(d, "*openblas*")))]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            fn = getattr(lib, prefix + "cblas_sgemm64_", None)
            fv = getattr(lib, prefix + "cblas_sgemv64_", None)
            if fn is None or fv is None:
                continue
            get = getattr(lib, prefix + "openblas_get_num_threads64_", None)
            set_local = getattr(lib, "openblas_set_num_threads_local", None)
            for f in (get, set_local):
                if f is not None:
                    f.restype = ctypes.c_int
            if set_local is not None:
                set_local.argtypes = [ctypes.c_int]
            jobs = getattr(lib, "gotoblas_pthread", None)
            if jobs is not None:
                jobs.restype = ctypes.c_int
                jobs.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            return NumpyBLAS(SGEMM_TYPE(ctypes.cast(fn, ctypes.c_void_p).value or 0),
                             SGEMV_TYPE(ctypes.cast(fv, ctypes.c_void_p).value or 0), get, set_local, jobs)
    return None


# cblas_sgemm with 64-bit integers: order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc.
SGEMM_TYPE = ctypes.CFUNCTYPE(None, _i, _i, _i, _l, _l, _l, ctypes.c_float, _p, _l, _p, _l, ctypes.c_float, _p, _l)
# cblas_sgemv with 64-bit integers: order, trans, m, n, alpha, a, lda, x, incx, beta, y, incy.
SGEMV_TYPE = ctypes.CFUNCTYPE(None, _i, _i, _l, _l, ctypes.c_float, _p, _l, _p, _l, ctypes.c_float, _p, _l)
# NumPy's own BLAS, and its sgemm and sgemv for the compiled loops (None: not found, or GRUMPY_NUMBA=0).
NUMPY_BLAS = None if os.environ.get("GRUMPY_NUMBA", "1") == "0" else _numpy_blas()
SGEMM: Any = NUMPY_BLAS.sgemm if NUMPY_BLAS is not None else None
SGEMV: Any = NUMPY_BLAS.sgemv if NUMPY_BLAS is not None else None


# Whether grumpy can run its own jobs on the threads of NumPy's BLAS (:func:`run_jobs`): an
# OpenBLAS pthreads build exports ``gotoblas_pthread``. Not beside MKL, whose pool then
# takes grumpy's products: two pools would spin side by side.
POOL = MKL is None and NUMPY_BLAS is not None and None not in (NUMPY_BLAS.run_jobs, NUMPY_BLAS.get_threads)


def pool_threads() -> int:
    """The threads NumPy's BLAS would run grumpy's jobs on now (:func:`run_jobs`): its current
    setting, which ``OPENBLAS_NUM_THREADS`` and threadpoolctl limit; 0 where it lends none
    (another BLAS, an OpenMP build of OpenBLAS, MKL loaded, ``GRUMPY_NUMBA=0``)."""
    return int(NUMPY_BLAS.get_threads()) if POOL and NUMPY_BLAS is not None else 0


def run_jobs(job: int, fields: tuple[int, ...], n: int, total: int) -> None:
    """Runs ``job`` n times at once on the threads of NumPy's own BLAS (the first on the
    calling thread) and returns when all are done. ``job`` is the address of a C function
    taking one pointer (a numba cfunc); job i gets a record of int64 numbers: ``fields``,
    then its share [first, end) of range(total), in n even shares. n is at most
    :func:`pool_threads` as the caller read it (OpenBLAS never drops a thread it made).

    This is OpenBLAS's ``gotoblas_pthread``, its pthreads server's way to run a plain
    function on its pool: the workers that run the caller's own products then run
    grumpy's, and no second pool spins beside them."""
    assert POOL and NUMPY_BLAS is not None and n >= 1
    records = np.array([fields + (total * i // n, total * (i + 1) // n) for i in range(n)], np.int64)
    NUMPY_BLAS.run_jobs(n, job, records.ctypes.data, records.strides[0])


def address(a: np.ndarray) -> int:
    """The address of a's first element, for a job's record (cheaper than ``a.ctypes.data``)."""
    return int(a.__array_interface__["data"][0])


# Products of fewer multiply-adds than this go to NumPy: OpenBLAS's threshold for
# using more than one thread (65536 x GEMM_MULTITHREAD_THRESHOLD 4).
MKL_MIN_MACS = 1 << 18
# From this many multiply-adds on MKL uses all its threads; below, one thread is as fast.
MKL_PARALLEL_MIN = 1 << 21


@contextlib.contextmanager
def _threads(macs: int) -> Iterator[None]:
    """MKL on one thread for a product of fewer than MKL_PARALLEL_MIN multiply-adds."""
    if macs >= MKL_PARALLEL_MIN:
        yield
        return
    with one_thread():
        yield


# NumPy's OpenBLAS (a pthreads build) sets even its "local" thread count for the whole
# process, so concurrent one_thread() blocks share one setting: the first in sets 1 and
# the last out restores the count the first found (per-thread save and restore raced,
# and left the caller's own NumPy on one thread after a shared inference pass).
_ONE_THREAD_LOCK = threading.Lock()
_ONE_THREAD_BLOCKS = 0
_ONE_THREAD_PREV = 0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The BLAS grumpy calls (MKL, else NumPy's) on one thread inside the block: MKL on
    the calling thread only; NumPy's OpenBLAS in the whole process, until the last
    concurrent block ends."""
    if MKL is not None:  # MKL's setting is the calling thread's own
        prev = MKL.MKL_Set_Num_Threads_Local(1)
        try:
            yield
        finally:
            MKL.MKL_Set_Num_Threads_Local(prev)
        return
    if NUMPY_BLAS is None or NUMPY_BLAS.set_threads_local is None:
        yield
        return
    global _ONE_THREAD_BLOCKS, _ONE_THREAD_PREV
    with _ONE_THREAD_LOCK:
        if _ONE_THREAD_BLOCKS == 0:
            _ONE_THREAD_PREV = NUMPY_BLAS.set_threads_local(1)
        _ONE_THREAD_BLOCKS += 1
    try:
        yield
    finally:
        with _ONE_THREAD_LOCK:
            _ONE_THREAD_BLOCKS -= 1
            if _ONE_THREAD_BLOCKS == 0:
                NUMPY_BLAS.set_threads_local(_ONE_THREAD_PREV)


def _operand(a: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(array, transpose flag, leading dimension) describing a 2-D float32 array to CBLAS
    without a copy when its rows or its columns are contiguous; else a contiguous copy."""
    rows, cols = a.shape
    s0, s1 = a.strides
    if s1 == 4 and s0 % 4 == 0 and (rows == 1 or s0 >= 4 * cols):
        return a, NO_TRANS, max(1, cols if rows == 1 else s0 // 4)
    if s0 == 4 and s1 % 4 == 0 and (cols == 1 or s1 >= 4 * rows):
        return a, TRANS, max(1, rows if cols == 1 else s1 // 4)
    a = np.ascontiguousarray(a)
    return a, NO_TRANS, max(1, cols)


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, *, beta: float = 0.0) -> np.ndarray:
    """a (M, K) @ b (K, N) or (K,) [+ beta * out] -> out (M, N) or (M,), like ``np.matmul``.

    float32 goes to MKL when it is loaded (transposed views and row slices need no
    copy); anything else to NumPy. ``out`` must not overlap ``a`` or ``b``."""
    if b.ndim == 1 and a.ndim == 2 and (out is None or out.ndim == 1):
        col = matmul(a, b[:, None], None if out is None else out[:, None], beta=beta)
        return col[:, 0] if out is None else out
    if (MKL is None or a.dtype != _F32 or b.dtype != _F32 or a.ndim != 2 or b.ndim != 2
            or 0 in a.shape or 0 in b.shape or a.shape[1] != b.shape[0]
            or a.shape[0] * a.shape[1] * b.shape[1] < MKL_MIN_MACS):
        return _numpy(a, b, out, beta)  # NumPy also raises the usual errors
    M, K = a.shape
    N = b.shape[1]
    if out is not None and (out.shape != (M, N) or out.dtype != _F32):
        return _numpy(a, b, out, beta)
    if out is None:
        out = np.empty((M, N), _F32)
        beta = 0.0
    c = out
    column = N == 1 and (M == 1 or c.strides[0] == 4)
    if not column and not (c.strides[1] == 4 and c.strides[0] % 4 == 0 and (M == 1 or c.strides[0] >= 4 * N)):
        c = np.empty((M, N), _F32)  # rows not contiguous: CBLAS cannot write there
        if beta:
            c[...] = out
    with _threads(M * N * K):
        _sgemm(a, b, c, beta)
    if c is not out:
        out[...] = c
    return out


def _sgemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float) -> None:
    """c = a @ b + beta * c by cblas_sgemm; c's rows contiguous (or one column)."""
    M, K = a.shape
    N = b.shape[1]
    ldc = 1 if N == 1 and (M == 1 or c.strides[0] == 4) else (N if M == 1 else c.strides[0] // 4)
    A, ta, lda = _operand(a)
    Bm, tb, ldb = _operand(b)
    MKL.cblas_sgemm(ROW_MAJOR, ta, tb, M, N, K, 1.0, A.ctypes.data, lda, Bm.ctypes.data, ldb, beta,
                    c.ctypes.data, ldc)


def column_sums(a: np.ndarray) -> np.ndarray:
    """a (M, N) summed over its rows -> (N,), as ones (1, M) @ a: the bias gradients.

    NumPy's a.sum(0) adds row after row in the array's precision (no pairwise
    summation along axis 0); through BLAS it is both faster and closer to the
    float64 sum (docs/benchmarks.md)."""
    return matmul(np.ones((1, a.shape[0]), a.dtype), a)[0]


def _numpy(a: np.ndarray, b: np.ndarray, out: np.ndarray | None, beta: float) -> np.ndarray:
    if out is None or not beta:
        return np.matmul(a, b, out=out)
    out += a @ b
    return out


# Spare pack buffers by size, for the next Packed. MKL asks megabytes for each packed
# matrix however small, and a fresh allocation that large costs page faults on every
# call (docs/benchmarks.md). A buffer is either spare or one live Packed's, so
# concurrent callers never share one. Only what MKL writes becomes resident memory.
_SPARE: dict[int, list[np.ndarray]] = {}
_SPARE_LOCK = threading.Lock()
_SPARE_MAX = 4  # buffers kept in all (a shared inference pass holds two at a time)


def _take_buffer(size: int) -> np.ndarray:
    """A 64-byte aligned buffer of ``size`` bytes (as MKL's own allocator gives), spare or new."""
    with _SPARE_LOCK:
        spare = _SPARE.get(size)
        if spare:
            return spare.pop()
    raw = np.empty(size + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off : off + size]


def _give_buffer(buf: np.ndarray) -> None:
    with _SPARE_LOCK:
        if sum(len(v) for v in _SPARE.values()) >= _SPARE_MAX:
            _SPARE.clear()  # sizes have changed: keep only the latest
        if _SPARE_MAX > 0:
            _SPARE.setdefault(buf.size, []).append(buf)


class Packed:
    """``w`` packed once by MKL for products ``a @ w.T`` (``trans=True``, w (N, K)) or
    ``a @ w`` (w (K, N)), with a (m, K) float32 rows contiguous -> out (m, N).

    A snapshot of w: build a new one after w changes. ``ptr`` and :data:`COMPUTE`
    let compiled loops call the product themselves (see :mod:`grumpy.kernels.nb`),
    inside ``with p.threads():``."""

    def __init__(self, w: np.ndarray, m: int, trans: bool, serial: bool = False) -> None:
        """``serial``: packed on one thread, for products on one thread (the shares of
        :func:`run_each`); MKL advises packing with the thread count that computes."""
        w = np.ascontiguousarray(w, _F32)
        self.n, self.k = w.shape if trans else w.shape[::-1]
        self.m = m
        self.serial = serial
        size = MKL.cblas_sgemm_pack_get_size(B_MATRIX, m, self.n, self.k)
        self._buf = _take_buffer(size)
        weakref.finalize(self, _give_buffer, self._buf)
        self.ptr = self._buf.ctypes.data
        with self.threads():  # small: packing on the calling thread too, no pool to wake
            MKL.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS if trans else NO_TRANS, m, self.n, self.k, 1.0,
                                 w.ctypes.data, w.shape[1], self.ptr)

    def threads(self) -> contextlib.AbstractContextManager[None]:
        """MKL on one thread while products of this size run, if they are small or
        the products are one share of a batch run by :func:`run_each`."""
        return one_thread() if self.serial else _threads(self.m * self.n * self.k)

    def __call__(self, a: np.ndarray, out: np.ndarray, beta: float = 0.0) -> np.ndarray:
        """out (m, N) = a (m, K) @ op(w) + beta * out; rows of both contiguous, float32."""
        with self.threads():
            MKL.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, self.m, self.n, self.k, a.ctypes.data,
                                    max(self.k, a.strides[0] // 4), self.ptr, self.k, beta,
                                    out.ctypes.data, max(self.n, out.strides[0] // 4))
        return out


def packed(w: np.ndarray, m: int, trans: bool) -> Packed | None:
    """A :class:`Packed` for 2-D float32 w when MKL is loaded, else None."""
    if MKL is None or w.dtype != _F32 or w.ndim != 2 or m < 1 or 0 in w.shape:
        return None
    return Packed(w, m, trans)


def cores() -> int:
    """The threads the BLAS grumpy calls would use (all cores, unless limited, e.g. by
    threadpoolctl); 1 where grumpy cannot set that BLAS's threads (:func:`one_thread`)."""
    if MKL is not None:
        return max(1, MKL.MKL_Get_Max_Threads())
    if NUMPY_BLAS is None or NUMPY_BLAS.set_threads_local is None or NUMPY_BLAS.get_threads is None:
        return 1
    return max(1, NUMPY_BLAS.get_threads())


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PID = 0  # a forked child has none of its parent's threads: it needs its own pool


def _task(fn: Callable[[], Any]) -> Any:
    with one_thread():
        return fn()


def run_each(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """Call each of fns on its own thread (the first on the calling one), the BLAS on one
    thread inside each (:func:`one_thread`), and return their results once all are done.

    This is how inference shares a batch's rows among the cores: one thread per share,
    each through the whole sequence, with no synchronisation per step. Parallel
    products and gate kernels inside each step meet at barriers every step, and at
    B=128, H=64 a step is too small to split at all, which left one core idle.
    The pool's threads wait on a queue, without spinning, between calls."""
    global _POOL, _POOL_SIZE, _POOL_PID
    if len(fns) - 1 > _POOL_SIZE or (_POOL is not None and _POOL_PID != os.getpid()):
        _POOL = ThreadPoolExecutor(len(fns) - 1, thread_name_prefix="grumpy")
        _POOL_SIZE, _POOL_PID = len(fns) - 1, os.getpid()
    futures = [_POOL.submit(_task, f) for f in fns[1:]] if _POOL is not None else []
    try:
        first = [_task(fns[0])]
    finally:
        rest = [f.result() for f in futures]  # waits for all, and raises the first error
    return first + rest


def blas_threads(n: int | None) -> contextlib.AbstractContextManager[Any]:
    """A context in which every BLAS this process has loaded (NumPy's, scipy's, MKL)
    uses at most ``n`` threads (threadpoolctl); ``None`` changes nothing. Importing
    this module has loaded MKL, so threadpoolctl sees and limits it too."""
    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")
