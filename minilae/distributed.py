"""Data parallelism: R processes (ranks), each with the whole model and a shard of every batch.

The gradient, the GGN diagonal and the log-likelihood of a batch are sums over its images, so
a batch split over R ranks gives the one-process value once each rank's partial sum is added
up across ranks (an *all-reduce*); every rank then takes the same optimiser step:

  g = sum_r g_r,   G = sum_r G_r,   g_r, G_r = the sums over rank r's shard x_r of the batch.

Per step the online LAE all-reduces g and G (2 P numbers, P parameters) plus a few scalars.

The communicator is chosen once per process (:func:`init`) and asked for with :func:`current`:

  * :class:`SingleProcess` (the default): rank 0 of 1, every operation the identity, so the
    one-process arithmetic is exactly the code without this module;
  * :class:`MPICommunicator`: MPI through ``mpi4py`` (``mpiexec -n R python -m minilae.train``).
    Host arrays are all-reduced in place through mpi4py's buffer interface; backend arrays
    (the guard, CuPy) go through the host explicitly (``to_numpy``, then ``asarray``);
  * :class:`NCCLCommunicator`: MPI for ranks, broadcasts and host arrays, CuPy's NCCL
    communicator (``cupyx.distributed``) for CuPy arrays, one GPU per rank (unmeasured: written
    for GPU machines, never run on one here).

This is the only module that imports mpi4py or cupyx; both are imported when a communicator
is made, never on the one-process path.
"""
from __future__ import annotations

import numbers
import os

import numpy as np  # host side: the MPI buffers

from .backend import asarray, to_numpy

__all__ = ["SingleProcess", "MPICommunicator", "NCCLCommunicator", "KINDS", "INSTALL", "init", "current", "use",
           "launched_ranks", "shard", "DistributedError"]

KINDS = ("mpi", "nccl")
INSTALL = "pip install 'minilae[mpi]'"
"""Installs mpi4py and an MPI runtime (the MPICH wheel)."""

# the world size an MPI launcher announces to its processes (MPICH/Intel MPI hydra and Open MPI)
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
    """A communicator that cannot be made here (no mpi4py, no GPU for NCCL) or ranks that disagree."""


def shard(n, rank, size):
    """slice of rank's share of n items: contiguous, sizes differing by at most one, in rank order."""
    if n < size:
        raise ValueError(f"{n} item(s) cannot be split over {size} ranks: every rank needs at least one")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class SingleProcess:
    """One process: rank 0 of 1; all-reduce, broadcast and barrier do nothing."""

    kind = None
    rank, size = 0, 1

    @property
    def is_root(self):
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    def shard(self, n):
        """This rank's slice of n items (see :func:`shard`)."""
        return shard(n, self.rank, self.size)

    def allreduce_sum(self, a):
        """sum_r a_r over the ranks: here a itself (a backend array, a host array or a number)."""
        return a

    def mean(self, stats, n):
        """{k: sum_r n_r v_r / sum_r n_r}: per-item means of this rank's n items averaged over all items."""
        return dict(stats)

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        return obj

    def barrier(self):
        """Wait until every rank is here."""

    def check_identical(self, a, what):
        """Raise DistributedError unless a (host or backend array) is bit-identical on every rank."""

    def abort(self, status):
        """End every rank with this exit status (an MPI job whose ranks stopped apart would hang)."""


class MPICommunicator(SingleProcess):
    """MPI (mpi4py, COMM_WORLD): host arrays all-reduced in place, backend arrays through the host."""

    kind = "mpi"

    def __init__(self):
        try:
            from mpi4py import MPI  # noqa: PLC0415 - the only mpi4py import in the library
        except ImportError as err:
            raise DistributedError(f"MPI needs mpi4py and an MPI runtime: {INSTALL}") from err
        self._mpi, self._comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()

    def allreduce_sum(self, a):
        """sum_r a_r; a host array is overwritten with the sum, a backend array is copied to the host and back."""
        if isinstance(a, numbers.Number):
            return self._comm.allreduce(a, op=self._mpi.SUM)
        host = isinstance(a, np.ndarray)
        buf = np.ascontiguousarray(a if host else to_numpy(a))
        self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        if host:
            return buf
        return asarray(buf, dtype=a.dtype)

    def mean(self, stats, n):
        """{k: sum_r n_r v_r / sum_r n_r} with one all-reduce of len(stats) + 1 numbers."""
        keys = list(stats)  # the same order on every rank: the same code made the dict
        buf = self.allreduce_sum(np.array([float(n)] + [stats[k] * n for k in keys]))
        return {k: float(buf[i + 1] / buf[0]) for i, k in enumerate(keys)}

    def broadcast(self, obj):
        """Rank 0's obj (any picklable object) on every rank."""
        return self._comm.bcast(obj, root=0)

    def barrier(self):
        """MPI_Barrier."""
        self._comm.Barrier()

    def check_identical(self, a, what):
        """Compare a's bytes (on the host) with rank 0's: ranks that took different steps are a bug."""
        mine = np.ascontiguousarray(to_numpy(a)).tobytes()
        if not all(self._comm.allgather(mine == self.broadcast(mine))):
            raise DistributedError(f"{what} differs between the {self.size} ranks: they no longer run one "
                                   "computation (an all-reduce that was not the same on every rank)")

    def abort(self, status):
        """MPI_Abort: the launcher ends every rank."""
        self._comm.Abort(int(status))


class NCCLCommunicator(MPICommunicator):
    """MPI for ranks, broadcasts and host arrays; NCCL (cupyx.distributed) all-reduces CuPy arrays on the GPUs.

    Rank r uses GPU r mod (GPUs on its machine). Unmeasured: no GPU machine ran it.
    """

    kind = "nccl"

    def __init__(self):
        super().__init__()
        try:
            import cupy  # noqa: PLC0415 - only for NCCL, on GPU machines
            from cupyx import distributed as cupy_distributed  # noqa: PLC0415
        except ImportError as err:
            raise DistributedError(f"--distributed nccl needs CuPy: pip install 'minilae[gpu]' ({err})") from err
        local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", self.rank)))
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
        self._nccl = cupy_distributed.init_process_group(self.size, self.rank, use_mpi=True)

    def allreduce_sum(self, a):
        """sum_r a_r: a CuPy array in place through NCCL, anything else through MPI."""
        if type(a).__module__.split(".")[0] == "cupy":
            self._nccl.all_reduce(a, a, "sum")
            return a
        return super().allreduce_sum(a)


_state = {"comm": SingleProcess()}


def launched_ranks():
    """The number of ranks an MPI launcher (mpiexec) started this process with; 1 outside one."""
    for name in _LAUNCHER_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def init(kind=None):
    """Make and select the communicator: kind 'mpi' or 'nccl', or None: MPI under an mpiexec of > 1 rank, else
    one process. Returns it."""
    if kind not in (None,) + KINDS:
        raise ValueError(f"unknown communicator {kind!r}; choose one of {', '.join(KINDS)}")
    if kind is None and launched_ranks() > 1:
        try:
            return use(MPICommunicator())
        except DistributedError as err:
            raise DistributedError(f"started by mpiexec with {launched_ranks()} ranks, but {err}") from None
    return use({None: SingleProcess, "mpi": MPICommunicator, "nccl": NCCLCommunicator}[kind]())


def use(comm):
    """Select comm as the current communicator; returns it."""
    _state["comm"] = comm
    return comm


def current():
    """The communicator of this process (SingleProcess unless :func:`init` or :func:`use` chose another)."""
    return _state["comm"]
