"""Data-parallel training over MPI: the ranks of one training run, as a :class:`Team`.

Every rank holds the whole model and takes a share of the batch's streams: rank r
of N owns streams [r*B/N, (r+1)*B/N) of exactly the layout one process uses
(:func:`columns`). A step is a local forward and backward pass, then the gradients
(and the loss) are packed into one flat buffer (:func:`pack`) and averaged by one
in-place Allreduce (:meth:`Team.average_gradients`); clipping and the optimiser then
run identically on every rank. Everything a rank decides alone (Ctrl-C, the clock)
is agreed on before each step (:meth:`Team.agree_to_stop`), and set-up errors are
agreed on too (:meth:`Team.agree`), so the ranks never wait for one another in vain.

``Team(None)`` is one process alone: every collective is the identity, so
:func:`grumpy.lm.loop.train` reads the same with and without MPI. mpi4py is imported
only when a communicator is given (``pip install -e ".[mpi]"``); docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

import numpy as np

from grumpy.kernels.blas import blas_threads

T = TypeVar("T")

INSTALL_HINT = 'install the mpi extra (pip install -e ".[mpi]": mpi4py and MPICH from their wheels)'
LAUNCH_HINT = "launch with: mpiexec -n N python -m mpi4py -m grumpy train [TEXT_FILE] --distributed ..."


class AgreedError(ValueError):
    """Bad input that every rank raises together (so none waits for the others)."""


def world() -> Any:
    """mpi4py's COMM_WORLD for ``--distributed``: a ValueError (a usage error) without
    mpi4py, or with a single process (outside ``mpiexec``, or ``mpiexec -n 1``)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--distributed: needs mpi4py ({e}); {INSTALL_HINT}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        MPI.Finalize()  # so that `mpiexec -n 1 python -m mpi4py` exits with the usage error, not an abort
        raise ValueError(f"--distributed: this is one process, not an MPI job of several ranks; {LAUNCH_HINT} "
                         "with N >= 2 (on one process, leave out --distributed)")
    return comm


def shard(batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """The streams [b0, b1) of ``batch_size`` that ``rank`` of ``size`` owns; ValueError
    naming both numbers when the batch does not divide evenly."""
    if batch_size % size:
        raise ValueError(f"--batch-size {batch_size}: not divisible by the {size} ranks; the global batch is "
                         f"shared evenly, so pass a multiple of {size}")
    b = batch_size // size
    return rank * b, (rank + 1) * b


def columns(a: np.ndarray, b0: int, b1: int) -> np.ndarray:
    """Streams [b0, b1) of ``a`` (axis 1: (T, B) windows, (L, B, H) states), contiguous."""
    return np.ascontiguousarray(a[:, b0:b1])


def flat_size(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(a.size for a in arrays.values())


def pack(arrays: Mapping[str, np.ndarray], buf: np.ndarray, extra: tuple[float, ...] = ()) -> np.ndarray:
    """Copy every array (in the mapping's order), then ``extra`` numbers, into ``buf`` (1-D)."""
    o = 0
    for a in arrays.values():
        buf[o : o + a.size] = a.reshape(-1)
        o += a.size
    buf[o : o + len(extra)] = extra
    return buf


def unpack(buf: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Copy ``buf`` back into the arrays (in place) and return what follows them."""
    o = 0
    for a in arrays.values():
        a[...] = buf[o : o + a.size].reshape(a.shape)
        o += a.size
    return buf[o:]


def cores_per_rank(local_ranks: int) -> int:
    """This rank's share of the cores: those the launcher bound it to, when it bound
    it to fewer than the machine has; else the machine's cores // ranks on it."""
    n = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        mine = n
    return max(1, mine if mine < n else n // max(1, local_ranks))


@contextlib.contextmanager
def thread_limit(n: int | None, compiled: bool = False) -> Iterator[None]:
    """BLAS on at most ``n`` threads (None: unchanged), and with ``compiled`` numba's
    gate kernels too (this thread's setting, restored on leaving)."""
    numba: Any = None
    if compiled and n is not None:
        with contextlib.suppress(ImportError):
            import numba
    old = numba.get_num_threads() if numba is not None else None
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with blas_threads(n):
            yield
    finally:
        if numba is not None:
            numba.set_num_threads(old)


class Team:
    """The ranks of one training run over an mpi4py communicator ``comm``; ``Team()``
    is one process alone, where every collective below is the identity.

    What is used of mpi4py is small: the communicator's Get_rank, Get_size, Allreduce
    (in place, SUM and MAX), Bcast, Gather, allgather and Split_type, and the module's
    constants; ``mpi`` stands in for the module (the tests' in-process ranks)."""

    def __init__(self, comm: Any = None, mpi: Any = None) -> None:
        self.comm = comm
        self.rank = 0 if comm is None else int(comm.Get_rank())
        self.size = 1 if comm is None else int(comm.Get_size())
        self._mpi: Any = mpi
        self._buf: np.ndarray | None = None  # the flat gradient buffer, kept between steps
        if comm is not None and mpi is None:
            from mpi4py import MPI  # only here: the core never needs it

            self._mpi = MPI

    @property
    def root(self) -> bool:
        """Rank 0: the one that prints, shows the bar and writes files."""
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.comm is None or self.size == 1

    def streams(self, batch_size: int) -> tuple[int, int]:
        """This rank's streams [b0, b1) of the global batch."""
        return shard(batch_size, self.rank, self.size)

    # -- the collectives (each a single MPI call; the identity alone) -----------------

    def _reduce(self, buf: np.ndarray, op: str) -> np.ndarray:
        if not self.alone:
            self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=getattr(self._mpi, op))
        return buf

    def broadcast(self, buf: np.ndarray) -> np.ndarray:
        """Rank 0's ``buf`` on every rank, in place."""
        if not self.alone:
            self.comm.Bcast(buf, root=0)
        return buf

    def allgather(self, obj: T) -> list[T]:
        """Every rank's small Python object, in rank order (pickled by mpi4py: strings, numbers)."""
        return [obj] if self.alone else list(self.comm.allgather(obj))

    # -- what training needs ---------------------------------------------------------

    def agree(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, where a ValueError on any rank raises :class:`AgreedError` on
        every rank, with the first failing rank's message (named when it is not rank 0)."""
        try:
            result, err = fn(*args), None
        except ValueError as e:
            result, err = None, str(e)
        errors = self.allgather(err)
        for r, msg in enumerate(errors):
            if msg is not None:
                raise AgreedError(msg if r == 0 else f"rank {r}: {msg}")
        return cast(T, result)  # not None: no rank failed

    def same_everywhere(self, fingerprint: str, what: str) -> None:
        """ValueError on every rank unless every rank's ``fingerprint`` equals rank 0's."""
        prints = self.allgather(fingerprint)
        for r, p in enumerate(prints):
            if p != prints[0]:
                raise AgreedError(f"rank {r} read {what} different from rank 0's ({p} on rank {r}; "
                                  f"{prints[0]} on rank 0); every rank must read the same files")

    def broadcast_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Rank 0's parameters on every rank (one Bcast of one flat buffer)."""
        if self.alone:
            return
        dtype = next(iter(params.values())).dtype
        buf = pack(params, np.empty(flat_size(params), dtype))
        unpack(self.broadcast(buf), params)

    def average_gradients(self, grads: Mapping[str, np.ndarray], loss: float) -> float:
        """Average ``grads`` (in place) and ``loss`` over the ranks with one in-place
        Allreduce of one flat buffer; returns the mean loss. A non-finite loss or
        gradient on any rank makes the mean non-finite on every rank."""
        if self.alone:
            return loss
        n = flat_size(grads) + 1
        dtype = next(iter(grads.values())).dtype
        if self._buf is None or self._buf.size != n or self._buf.dtype != dtype:
            self._buf = np.empty(n, dtype)
        buf = pack(grads, self._buf, (loss,))
        self._reduce(buf, "SUM")
        buf /= self.size
        return float(unpack(buf, grads)[0])

    def agree_to_stop(self, stop: bool, elapsed: float, eval_s: float) -> tuple[bool, float, float]:
        """One tiny Allreduce (max) before each step: whether any rank was told to stop
        (Ctrl-C), and one clock for all, so the learning rate and the time budget agree."""
        if self.alone:
            return stop, elapsed, eval_s
        v = self._reduce(np.array([float(stop), elapsed, eval_s]), "MAX")
        return bool(v[0]), float(v[1]), float(v[2])

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        """The sums over the ranks (evaluation's losses and counts)."""
        if self.alone:
            return values
        return tuple(float(v) for v in self._reduce(np.array(values, np.float64), "SUM"))

    def gather_streams(self, h: np.ndarray) -> np.ndarray | None:
        """Every rank's carried state (L, b, H) joined along the streams into (L, N*b, H)
        on rank 0 (None on the others): a checkpoint holds the whole batch's state."""
        if self.alone:
            return h
        h = np.ascontiguousarray(h)
        parts = np.empty((self.size, *h.shape), h.dtype) if self.root else None
        self.comm.Gather(h, parts, root=0)
        if parts is None:
            return None
        L, b, H = h.shape
        return np.ascontiguousarray(parts.transpose(1, 0, 2, 3).reshape(L, self.size * b, H))

    def check_identical(self, params: Mapping[str, np.ndarray]) -> None:
        """RuntimeError on every rank unless all ranks hold bit-identical parameters."""
        if self.alone:
            return
        dtype = next(iter(params.values())).dtype
        mine = pack(params, np.empty(flat_size(params), dtype))
        ref = self.broadcast(mine.copy())
        differ = self._reduce(np.array([0.0 if mine.tobytes() == ref.tobytes() else 1.0]), "MAX")
        if differ[0]:
            raise RuntimeError("the ranks' parameters are no longer bit-identical (a rank computed differently); "
                               "stopping")

    def threads(self, requested: int | None) -> int | None:
        """Threads for this rank: ``requested``, or alone BLAS's own default (None),
        or with several ranks the cores per rank on this node."""
        if requested is not None or self.alone:
            return requested
        local = self.comm.Split_type(self._mpi.COMM_TYPE_SHARED)
        try:
            return cores_per_rank(int(local.Get_size()))
        finally:
            local.Free()

    def finalize(self) -> None:
        """End MPI cleanly (every rank together), so an agreed exit code is not an abort."""
        if self._mpi is not None and not self._mpi.Is_finalized():
            self._mpi.Finalize()
