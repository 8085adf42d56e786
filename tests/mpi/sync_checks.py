"""SyncBatchNorm and the functional ``comm=`` API checked on every rank of a real MPI job.

Run as ``mpiexec -n K python -m mpi4py tests/mpi/sync_checks.py [CHECK ...]`` (K = 1, 2, 3, ...;
``tests/test_distributed.py`` does). ``-m mpi4py`` turns an exception on any rank into an abort
of the whole job, so a failing rank cannot leave the others waiting in a collective.

Every rank builds the same global batch from a seed, keeps its own shard of the samples (shards
of unequal sizes; some checks give a rank an empty shard) and compares what it computes with
``BatchNorm`` on the whole concatenated batch (float64, tolerance 1e-10 relative to the
magnitude of the expected values). After each check, rank 0 prints
``PASS <check> ranks 0,1,...,K-1 of K`` once every rank has passed it.
"""

from __future__ import annotations

import copy
import pickle
import sys
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import SyncBatchNorm

TOLERANCE = 1e-10
BACKENDS = ("numpy", "cpu", "cuda")  # cuda (slow in Numba's simulator) only when named
NUM_FEATURES = 4


@dataclass(frozen=True)
class Layout:
    """An input layout: full-batch shape for ``n`` samples, feature axis, sample axis."""

    name: str
    axis: int
    sample_axis: int
    ndims: int

    def shape(self, samples: int) -> tuple[int, ...]:
        C = NUM_FEATURES
        return {"nchw": (samples, C, 3, 5), "nhwc": (samples, 3, 2, C), "nc": (samples, C),
                "cm": (C, samples)}[self.name]


LAYOUTS = (Layout("nchw", 1, 0, 4),   # planar
           Layout("nhwc", -1, 0, 4),  # channels-last
           Layout("nc", 1, 0, 2),     # channels-last, 2-D
           Layout("cm", 0, 1, 2))     # the course layout (C, m): planar, samples on axis 1

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


class CountingComm:
    """A communicator that records the name of every method call that may communicate."""

    def __init__(self, comm: MPI.Comm) -> None:
        self._comm = comm
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        attribute = getattr(self._comm, name)
        if not callable(attribute) or name.startswith(("Get_", "Is_")):
            return attribute

        def counted(*args, **kwargs):
            self.calls.append(name)
            return attribute(*args, **kwargs)
        return counted


# ---------------------------------------------------------------------- helpers
def unequal_sizes(step: int) -> list[int]:
    """Samples per rank: all different, in a different order at each step."""
    sizes = [3 + 2 * rank for rank in range(SIZE)]
    return sizes if step % 2 == 0 else sizes[::-1]


def global_batch(layout: Layout, sizes: list[int], seed: int) -> np.ndarray:
    """The same float64 batch on every rank; features far from zero mean, unequal scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(layout.shape(sum(sizes)))
    per_feature = [1] * x.ndim
    per_feature[layout.axis] = NUM_FEATURES
    offsets = np.array([100.0, -3.0, 0.0, 7.5]).reshape(per_feature)
    scales = np.array([0.01, 1.0, 5.0, 2.0]).reshape(per_feature)
    return x * scales + offsets


def my_shard(a: np.ndarray, layout: Layout, sizes: list[int]) -> np.ndarray:
    """This rank's samples: rank r holds the r-th run of ``sizes[r]`` samples."""
    start = sum(sizes[:RANK])
    index = [slice(None)] * a.ndim
    index[layout.sample_axis] = slice(start, start + sizes[RANK])
    return a[tuple(index)]


def host(a) -> np.ndarray:
    """A float64 NumPy copy of ``a`` (a layer of backend "cuda" keeps its arrays on the GPU)."""
    return np.array(a.copy_to_host() if hasattr(a, "copy_to_host") else a, dtype=np.float64)


def assert_close(actual, expected, what: str) -> None:
    actual, expected = host(actual), host(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = TOLERANCE * max(np.abs(expected).max(initial=0.0), 1.0)
    error = np.abs(actual - expected).max(initial=0.0)
    assert error <= bound, f"rank {RANK}: {what}: max abs error {error:.3g} > {bound:.3g}"


def assert_same_on_every_rank(a, what: str) -> None:
    """Bitwise equality of ``a`` across ranks."""
    a = host(a)
    everyone = np.empty((SIZE,) + a.shape)
    COMM.Allgather(a, everyone)
    for rank, other in enumerate(everyone):
        assert np.array_equal(other, a), f"rank {RANK}: {what} differs from rank {rank}'s"


def summed_over_ranks(a) -> np.ndarray:
    total = np.empty(np.shape(a))
    COMM.Allreduce(host(a), total, op=MPI.SUM)
    return total


def expect_error(error_type, call, what: str):
    try:
        call()
    except error_type as error:
        return error
    raise AssertionError(f"rank {RANK}: {what}: no {error_type.__name__} raised")


def layer_pair(layout: Layout, backend: str, comm) -> tuple[fastbn.BatchNorm, SyncBatchNorm]:
    """A full-batch reference layer and a synchronized one with equal, non-trivial params."""
    reference = fastbn.BatchNorm(NUM_FEATURES, axis=layout.axis, dtype=np.float64,
                                 backend=backend)
    sync = SyncBatchNorm(NUM_FEATURES, axis=layout.axis, dtype=np.float64, backend=backend,
                         comm=comm)
    for layer in (reference, sync):
        set_params(layer, [1.5, -0.5, 2.0, 0.25], [0.1, 0.2, -0.3, 4.0])
    return reference, sync


def set_params(layer, gamma, beta) -> None:
    """Assign gamma and beta on any backend (through the state dict)."""
    state = layer.state_dict()
    state["weight"], state["bias"] = np.asarray(gamma), np.asarray(beta)
    layer.load_state_dict(state)


def assert_same_running_stats(reference, sync, what: str) -> None:
    assert_close(sync.running_mean, reference.running_mean, f"{what}: running_mean")
    assert_close(sync.running_var, reference.running_var, f"{what}: running_var")
    assert sync.num_batches_tracked == reference.num_batches_tracked, what
    assert_same_on_every_rank(sync.running_mean, f"{what}: running_mean")
    assert_same_on_every_rank(sync.running_var, f"{what}: running_var")


def training_step(reference, sync, layout: Layout, sizes: list[int], seed: int,
                  what: str) -> None:
    """One forward/backward of both layers, compared, then the same SGD step on both."""
    x = global_batch(layout, sizes, seed)
    dy = np.random.default_rng(seed + 1).standard_normal(x.shape)
    y = sync.forward(my_shard(x, layout, sizes))
    assert_close(y, my_shard(reference.forward(x), layout, sizes), f"{what}: y")
    dx = sync.backward(my_shard(dy, layout, sizes))
    assert_close(dx, my_shard(reference.backward(dy), layout, sizes), f"{what}: dx")
    dgamma, dbeta = summed_over_ranks(sync.dgamma), summed_over_ranks(sync.dbeta)
    assert_close(dgamma, reference.dgamma, f"{what}: dgamma summed over ranks")
    assert_close(dbeta, reference.dbeta, f"{what}: dbeta summed over ranks")
    assert_same_running_stats(reference, sync, what)
    for layer, (d_gamma, d_beta) in ((reference, (reference.dgamma, reference.dbeta)),
                                      (sync, (dgamma, dbeta))):
        set_params(layer, host(layer.gamma) - 0.1 * host(d_gamma),
                   host(layer.beta) - 0.1 * host(d_beta))


# ---------------------------------------------------------------------- checks
def check_layer(backend: str) -> None:
    """Unequal shards, two training steps, then eval (which must communicate nothing)."""
    for layout in LAYOUTS:
        what = f"{backend} {layout.name}"
        counting = CountingComm(COMM)
        reference, sync = layer_pair(layout, backend, counting)
        for step in range(2):
            counting.calls.clear()
            training_step(reference, sync, layout, unequal_sizes(step), seed=10 * step,
                          what=f"{what} step {step}")
            assert counting.calls == ["Allgather", "Allreduce"], \
                f"{what}: a training step made the calls {counting.calls}"
        counting.calls.clear()
        reference.eval()
        sync.eval()
        sizes = unequal_sizes(0)
        x = global_batch(layout, sizes, seed=99)
        y = sync.forward(my_shard(x, layout, sizes))
        assert_close(y, my_shard(reference.forward(x), layout, sizes), f"{what}: eval y")
        dy = np.ones_like(x)
        dx = sync.backward(my_shard(dy, layout, sizes))
        assert_close(dx, my_shard(reference.backward(dy), layout, sizes), f"{what}: eval dx")
        assert counting.calls == [], f"{what}: eval made the calls {counting.calls}"
        assert_same_running_stats(reference, sync, f"{what} after eval")


def check_empty_shard(backend: str) -> None:
    """A rank with no samples takes part and returns empty arrays; the count check is global."""
    if SIZE > 1:
        for layout in LAYOUTS[:2]:
            what = f"{backend} {layout.name}"
            reference, sync = layer_pair(layout, backend, COMM)
            for step, empty_rank in enumerate((0, SIZE - 1)):
                sizes = unequal_sizes(step)
                sizes[empty_rank] = 0
                training_step(reference, sync, layout, sizes, seed=step,
                              what=f"{what}, rank {empty_rank} empty")
            if RANK == SIZE - 1:
                assert np.all(sync.dgamma == 0) and np.all(sync.dbeta == 0), what
    for layout in LAYOUTS[2:]:  # one value per feature per sample
        what = f"{backend} {layout.name}"
        reference, sync = layer_pair(layout, backend, COMM)
        if SIZE > 1:  # each rank holds at most one value per feature, the batch two: no error
            training_step(reference, sync, layout, [1, 1] + [0] * (SIZE - 2), seed=5,
                          what=f"{what}, 1+1 samples")
        before = (sync.running_mean.copy(), sync.running_var.copy(), sync.num_batches_tracked)
        for sizes in ([0] * SIZE, [1] + [0] * (SIZE - 1)):  # 0 and 1 value per feature in all
            x = my_shard(global_batch(layout, sizes, seed=7), layout, sizes)
            error = expect_error(ValueError, lambda: sync.forward(x),
                                 f"{what}: batch of {sum(sizes)}")
            assert "value" in str(error), f"rank {RANK}: {what}: {error}"
        assert np.array_equal(sync.running_mean, before[0]), what
        assert np.array_equal(sync.running_var, before[1]), what
        assert sync.num_batches_tracked == before[2], what


def check_relu_residual(backend: str) -> None:
    """The fused ReLU with a residual: y, dx and dresidual of the shard, summed dgamma/dbeta."""
    for layout in LAYOUTS[:2]:
        what = f"{backend} {layout.name} relu+residual"
        reference, sync = layer_pair(layout, backend, COMM)
        reference.activation = sync.activation = "relu"
        sizes = unequal_sizes(0)
        x = global_batch(layout, sizes, seed=21)
        residual = np.random.default_rng(22).standard_normal(x.shape) * 3.0
        dy = np.random.default_rng(23).standard_normal(x.shape)
        y = sync.forward(my_shard(x, layout, sizes), my_shard(residual, layout, sizes))
        y_ref = reference.forward(x, residual)
        assert_close(y, my_shard(y_ref, layout, sizes), f"{what}: y")
        dx, dresidual = sync.backward(my_shard(dy, layout, sizes))
        dx_ref, dresidual_ref = reference.backward(dy)
        assert_close(dx, my_shard(dx_ref, layout, sizes), f"{what}: dx")
        assert_close(dresidual, my_shard(dresidual_ref, layout, sizes), f"{what}: dresidual")
        assert_close(summed_over_ranks(sync.dgamma), reference.dgamma, f"{what}: dgamma")
        assert_close(summed_over_ranks(sync.dbeta), reference.dbeta, f"{what}: dbeta")


def check_eval_batch_stats(backend: str) -> None:
    """track_running_stats=False in eval: each rank's own batch statistics, nothing sent."""
    layout = LAYOUTS[0]
    counting = CountingComm(COMM)
    sync = SyncBatchNorm(NUM_FEATURES, axis=layout.axis, dtype=np.float64, backend=backend,
                         track_running_stats=False, comm=counting).eval()
    local = fastbn.BatchNorm(NUM_FEATURES, axis=layout.axis, dtype=np.float64, backend=backend,
                             track_running_stats=False).eval()
    sizes = unequal_sizes(0)
    x = my_shard(global_batch(layout, sizes, seed=31), layout, sizes)
    dy = np.sin(x)
    assert_close(sync.forward(x), local.forward(x), f"{backend} eval batch-stats y")
    assert_close(sync.backward(dy), local.backward(dy), f"{backend} eval batch-stats dx")
    assert counting.calls == [], f"{backend}: eval made the calls {counting.calls}"


def check_functional(backend: str) -> None:
    """moments, batch_norm_forward/backward and batch_norm(training=True) with comm=."""
    for layout in LAYOUTS:
        what = f"{backend} {layout.name}"
        sizes = unequal_sizes(0)
        x = global_batch(layout, sizes, seed=3)
        dy = np.random.default_rng(4).standard_normal(x.shape)
        x_mine, dy_mine = my_shard(x, layout, sizes), my_shard(dy, layout, sizes)
        gamma = np.array([2.0, 1.0, -1.0, 0.5])
        beta = np.array([0.0, 1.0, 2.0, 3.0])
        common = dict(axis=layout.axis, backend=backend)

        mean, var = fastbn.moments(x_mine, comm=COMM, **common)
        expected_mean, expected_var = fastbn.moments(x, **common)
        assert_close(mean, expected_mean, f"{what}: moments mean")
        assert_close(var, expected_var, f"{what}: moments var")
        assert_same_on_every_rank(mean, f"{what}: moments mean")
        assert_same_on_every_rank(var, f"{what}: moments var")

        y, mean, invstd = fastbn.batch_norm_forward(x_mine, gamma, beta, comm=COMM, **common)
        y_ref, mean_ref, invstd_ref = fastbn.batch_norm_forward(x, gamma, beta, **common)
        assert_close(y, my_shard(y_ref, layout, sizes), f"{what}: batch_norm_forward y")
        assert_close(mean, mean_ref, f"{what}: batch_norm_forward mean")
        assert_close(invstd, invstd_ref, f"{what}: batch_norm_forward invstd")
        assert_same_on_every_rank(invstd, f"{what}: batch_norm_forward invstd")

        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy_mine, x_mine, gamma, mean, invstd,
                                                       comm=COMM, **common)
        dx_ref, dgamma_ref, dbeta_ref = fastbn.batch_norm_backward(dy, x, gamma, mean_ref,
                                                                   invstd_ref, **common)
        assert_close(dx, my_shard(dx_ref, layout, sizes), f"{what}: batch_norm_backward dx")
        assert_close(summed_over_ranks(dgamma), dgamma_ref, f"{what}: summed dgamma")
        assert_close(summed_over_ranks(dbeta), dbeta_ref, f"{what}: summed dbeta")

        running = (np.zeros(NUM_FEATURES), np.ones(NUM_FEATURES))
        running_ref = (np.zeros(NUM_FEATURES), np.ones(NUM_FEATURES))
        y = fastbn.batch_norm(x_mine, *running, gamma, beta, training=True, comm=COMM, **common)
        y_ref = fastbn.batch_norm(x, *running_ref, gamma, beta, training=True, **common)
        assert_close(y, my_shard(y_ref, layout, sizes), f"{what}: batch_norm(training) y")
        for name, value, expected in zip(("running_mean", "running_var"), running, running_ref):
            assert_close(value, expected, f"{what}: batch_norm {name}")
            assert_same_on_every_rank(value, f"{what}: batch_norm {name}")
        counting = CountingComm(COMM)
        y = fastbn.batch_norm(x_mine, *running, gamma, beta, training=False, comm=counting,
                              **common)
        y_ref = fastbn.batch_norm(x, *running_ref, gamma, beta, training=False, **common)
        assert_close(y, my_shard(y_ref, layout, sizes), f"{what}: batch_norm(eval) y")
        assert counting.calls == [], f"{what}: eval batch_norm made the calls {counting.calls}"


def check_nonfinite(backend: str) -> None:
    """NaN or Inf on the last rank only: FloatingPointError on every rank, nothing updated."""
    layout = LAYOUTS[0]
    for bad_value in (np.nan, np.inf):
        what = f"{backend} {bad_value}"
        reference, sync = layer_pair(layout, backend, COMM)
        training_step(reference, sync, layout, unequal_sizes(0), seed=0, what=f"{what} before")
        before = (sync.running_mean.copy(), sync.running_var.copy(), sync.num_batches_tracked)
        sizes = unequal_sizes(1)
        x = my_shard(global_batch(layout, sizes, seed=1), layout, sizes).copy()
        if RANK == SIZE - 1:
            x[0, 1, 0, 0] = bad_value
        expect_error(FloatingPointError, lambda: sync.forward(x), f"{what}: layer forward")
        assert np.array_equal(sync.running_mean, before[0]), f"{what}: running_mean changed"
        assert np.array_equal(sync.running_var, before[1]), f"{what}: running_var changed"
        assert sync.num_batches_tracked == before[2], f"{what}: num_batches_tracked changed"

        running = (np.zeros(NUM_FEATURES), np.ones(NUM_FEATURES))
        expect_error(FloatingPointError,
                     lambda: fastbn.batch_norm(x, *running, training=True, backend=backend,
                                               comm=COMM), f"{what}: functional batch_norm")
        assert np.array_equal(running[0], np.zeros(NUM_FEATURES)), what
        assert np.array_equal(running[1], np.ones(NUM_FEATURES)), what
        expect_error(FloatingPointError,
                     lambda: fastbn.batch_norm_forward(x, backend=backend, comm=COMM),
                     f"{what}: batch_norm_forward")
        # the collectives are still matched on every rank: training goes on in step
        training_step(reference, sync, layout, unequal_sizes(1), seed=2, what=f"{what} after")


def check_pickle(backend: str) -> None:
    """A pickled or deep-copied SyncBatchNorm comes back on COMM_WORLD and trains in sync."""
    layout = LAYOUTS[0]
    reference, sync = layer_pair(layout, backend, COMM.Dup())
    training_step(reference, sync, layout, unequal_sizes(0), seed=0, what=f"{backend} pickle")
    for restored in (pickle.loads(pickle.dumps(sync)), copy.deepcopy(sync)):
        assert restored.comm is MPI.COMM_WORLD, f"rank {RANK}: comm {restored.comm}"
        twin = fastbn.BatchNorm(NUM_FEATURES, axis=layout.axis, dtype=np.float64,
                                backend=backend)
        twin.load_state_dict(reference.state_dict())
        training_step(twin, restored, layout, unequal_sizes(1), seed=1,
                      what=f"{backend} restored")


CHECKS = {f"{name}_{backend}": (lambda check=check, backend=backend: check(backend))
          for backend in BACKENDS
          for name, check in (("layer", check_layer), ("empty_shard", check_empty_shard),
                              ("relu_residual", check_relu_residual),
                              ("functional", check_functional),
                              ("nonfinite", check_nonfinite), ("pickle", check_pickle),
                              ("eval_batch_stats", check_eval_batch_stats))}
#: The checks run when none is named: all but the cuda ones.
DEFAULT_CHECKS = [name for name in CHECKS if not name.endswith("_cuda")]


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; choose from {sorted(CHECKS)}")
    for name in names or DEFAULT_CHECKS:
        CHECKS[name]()
        # rank 0 reports for all: lines written by several ranks can interleave mid-line
        passed = COMM.gather(RANK, root=0)
        if RANK == 0:
            print(f"PASS {name} ranks {','.join(map(str, passed))} of {SIZE}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
