"""Synchronized batch normalization over MPI (mpi4py): statistics of every rank's batch.

In data-parallel training each process (rank) holds a shard of the batch. ``SyncBatchNorm``
normalizes each shard with the statistics of the union of all shards, so the result is that of
``BatchNorm`` on the concatenated batch. Per training step it communicates two small messages,
whatever the size of the activations:

* forward: one ``Allgather`` of ``3 * C`` float64 values per rank (count, mean and M2 of every
  feature), merged on every rank with Chan's formula in rank order, so every rank holds bitwise
  the same global mean and variance;
* backward: one ``Allreduce`` (sum) of ``2 * C + 1`` float64 values (Σdy·x̂ and Σdy of every
  feature, and the count), from which each rank computes dx of its own shard.

Eval mode communicates nothing. The collectives go through host memory (NumPy buffers) for
every backend, including ``"cuda"``: the per-feature vectors are tiny, so a CUDA-aware MPI would
save nothing worth its setup.

mpi4py is optional (``pip install 'fastbn[mpi]'``): importing this module does not import it;
the functions below do, through :func:`require_mpi`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends.feature_math import chan_merge
from .layers import BatchNorm

Comm = Any  # an mpi4py.MPI.Comm (not imported here: mpi4py is optional)


def require_mpi() -> Any:
    """The ``mpi4py.MPI`` module; ImportError naming the ``mpi`` extra when mpi4py is missing."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError("fastbn's synchronized batch norm (SyncBatchNorm, comm=) needs mpi4py: "
                          "pip install 'fastbn[mpi]'") from error
    return MPI


def default_comm() -> Comm:
    """``MPI.COMM_WORLD``: every process of the job."""
    return require_mpi().COMM_WORLD


def _host_vectors(**vectors: Any) -> list[np.ndarray]:
    """The arguments as C-contiguous float64 NumPy vectors of one length (copied off a GPU
    where they are Numba device arrays: the collectives go through host memory)."""
    host = []
    for name, a in vectors.items():
        if hasattr(a, "copy_to_host"):  # a Numba device array (backend "cuda")
            a = a.copy_to_host()
        a = np.ascontiguousarray(a, dtype=np.float64)
        expected = host[0].shape if host else a.shape
        if a.ndim != 1 or a.shape != expected:
            raise ValueError(f"{name} must be a vector of shape {expected}, got {a.shape}")
        host.append(a)
    return host


def _check_count(count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    return int(count)


def merge_moments(comm: Comm, count: int, mean: Any, var: Any
                  ) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-feature moments of the union of every rank's batch.

    Collective: every rank of ``comm`` must call it. One ``Allgather`` of ``3 * C`` float64
    values per rank: ``count`` (repeated per feature), ``mean`` and ``M2 = var * count``. Every
    rank merges all ranks' moments with ``feature_math.chan_merge`` in rank order, so every rank
    gets bitwise identical results whatever order the messages arrive in.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    count : int
        Values per feature in this rank's shard; may be 0 (an empty shard, whose ``mean`` and
        ``var`` are then ignored).
    mean, var : arrays of shape (C,)
        This rank's per-feature mean and biased variance (any float dtype; host or Numba device
        arrays).

    Returns
    -------
    count : int
        The global number of values per feature.
    mean, var : float64 NumPy arrays of shape (C,)
        The global mean and biased variance (zeros where the global count is 0: the caller
        rejects a batch with too few values before using them).
    """
    MPI = require_mpi()
    count = _check_count(count)
    mean, var = _host_vectors(mean=mean, var=var)
    num_features = len(mean)
    local = np.zeros((3, num_features), dtype=np.float64)
    if count:  # an empty shard sends zeros, whatever its backend made of 0 / 0
        local[0] = count
        local[1] = mean
        local[2] = var * count
    gathered = np.empty((comm.Get_size(), 3, num_features), dtype=np.float64)
    comm.Allgather([local, MPI.DOUBLE], [gathered, MPI.DOUBLE])
    total, merged_mean, merged_m2 = 0.0, np.zeros(num_features), np.zeros(num_features)
    with np.errstate(all="ignore"):  # NaN/Inf propagate silently: the caller checks them
        for rank_count, rank_mean, rank_m2 in gathered:  # rank order, the same on every rank
            total, merged_mean, merged_m2 = chan_merge(total, merged_mean, merged_m2,
                                                       float(rank_count[0]), rank_mean, rank_m2)
        if total == 0.0:
            return 0, np.zeros(num_features), np.zeros(num_features)
        return int(total), merged_mean, merged_m2 / total


def allreduce_sums(comm: Comm, count: int, dgamma: Any, dbeta: Any
                   ) -> tuple[int, np.ndarray, np.ndarray]:
    """Whole-batch sums of the backward's per-feature reductions.

    Collective: one ``Allreduce`` (sum) of ``2 * C + 1`` float64 values, ``dgamma``, ``dbeta``
    and ``count``. The backward's coefficients need sums over the whole batch.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    count : int
        Values per feature in this rank's shard (may be 0).
    dgamma, dbeta : arrays of shape (C,)
        This rank's ``Σ dy * (x - mean) * invstd`` and ``Σ dy`` per feature.

    Returns
    -------
    count : int
        The global number of values per feature.
    dgamma, dbeta : float64 NumPy arrays of shape (C,)
        The sums over every rank.
    """
    MPI = require_mpi()
    count = _check_count(count)
    dgamma, dbeta = _host_vectors(dgamma=dgamma, dbeta=dbeta)
    num_features = len(dgamma)
    local = np.concatenate([dgamma, dbeta, [float(count)]])
    total = np.empty_like(local)
    comm.Allreduce([local, MPI.DOUBLE], [total, MPI.DOUBLE], op=MPI.SUM)
    return int(total[-1]), total[:num_features], total[num_features:-1]


class SyncBatchNorm(BatchNorm):
    """Batch norm whose training statistics are those of the union of every rank's batch.

    The layer API of :class:`fastbn.BatchNorm` (any input rank and feature axis, train/eval,
    ``params``/``grads``, state dicts, ``activation``), with one more argument, ``comm``.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The ranks whose batches are normalized together; None means ``MPI.COMM_WORLD``.
        Every rank of ``comm`` must call ``forward`` (and ``backward``) in training mode
        together, each with its own shard (which may be empty); eval mode communicates
        nothing.

    Notes
    -----
    * Running statistics are updated from the global count and variance, so they (and
      ``num_batches_tracked``) are identical on every rank.
    * After ``backward``, ``dgamma``/``dbeta`` are this rank's contributions: their sum over
      ranks is the gradient of the whole batch, which is what a data-parallel gradient
      allreduce (sum, or mean with the loss scaled accordingly) expects. ``dx`` is that of this
      rank's shard, computed with the whole batch's sums.
    * Pickling and ``copy.deepcopy`` drop the communicator (it belongs to a process) and
      re-attach ``MPI.COMM_WORLD`` when restored; assign ``layer.comm`` to use another.
    """

    def __init__(self, num_features: int, axis: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype: Any = None,
                 backend: str | None = None, comm: Comm | None = None,
                 activation: str | None = None) -> None:
        options = {} if dtype is None else {"dtype": dtype}  # None: BatchNorm's default dtype
        super().__init__(num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, backend=backend,
                         activation=activation, **options)
        self.comm = default_comm() if comm is None else comm

    def __getstate__(self) -> dict[str, Any]:
        # the communicator is in the layer's attributes and in what a forward saved for the
        # backward; both get a placeholder that unpickles to itself
        return {key: _replace_comm(value, self.comm, _DETACHED_COMM)
                for key, value in super().__getstate__().items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        comm = default_comm()
        state = {key: _replace_comm(value, _DETACHED_COMM, comm) for key, value in state.items()}
        restore = getattr(super(), "__setstate__", None)
        if restore is not None:
            restore(state)
        else:
            self.__dict__.update(state)


class _DetachedComm:
    """Stands in for the communicator in a pickled or copied SyncBatchNorm."""

    def __reduce__(self) -> str:
        return "_DETACHED_COMM"  # pickled by name: it unpickles (and copies) to itself

    def __repr__(self) -> str:
        return "<communicator detached by pickling>"


_DETACHED_COMM = _DetachedComm()


def _replace_comm(value: Any, old: Any, new: Any) -> Any:
    """``value`` with ``old`` replaced by ``new``, also among a tuple's items."""
    if value is old:
        return new
    if type(value) is tuple:
        return tuple(new if item is old else item for item in value)
    return value
