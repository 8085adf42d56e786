"""Synchronized batch norm over MPI (fastbn.distributed).

In-process: the two collectives on ``MPI.COMM_SELF`` and on a scripted communicator standing in
for several ranks, the ImportError without mpi4py, pickling. Through real processes: the
scripts in ``tests/mpi/`` run under ``mpiexec -n 1, 2, 3`` and assert on every rank that
SyncBatchNorm and the functional ``comm=`` API match ``BatchNorm`` on the concatenated batch.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastbn
from fastbn import distributed
from fastbn.backends.feature_math import chan_merge

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = ROOT / "tests" / "mpi"
RANK_COUNTS = (1, 2, 3)
LAUNCH_TIMEOUT_S = 600  # cold Numba caches compile the cpu kernels in every rank


def mpiexec_path() -> str | None:
    """mpiexec on PATH, or next to this Python (where the mpich wheel installs it)."""
    beside_python = Path(sys.executable).with_name("mpiexec")
    return shutil.which("mpiexec") or (str(beside_python) if beside_python.exists() else None)


def mpi_or_skip():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'fastbn[mpi]')")
    return distributed.require_mpi()


def launch(script: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python -m mpi4py script args`` with this worktree's fastbn.

    The job runs in its own process group, killed whole if it outlives the timeout, so a hang
    fails the test instead of the test run.
    """
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'fastbn[mpi]')")
    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec is not on PATH (pip install 'fastbn[mpi]' brings MPICH's)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(script), *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{script.name} on {ranks} ranks ran over {LAUNCH_TIMEOUT_S} s "
                        f"(a deadlock?)\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# ---------------------------------------------------------------------- without mpi4py
def test_importing_fastbn_does_not_import_mpi4py():
    code = ("import sys, fastbn, fastbn.distributed; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` raise ImportError
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    for call in (distributed.require_mpi, distributed.default_comm,
                 lambda: distributed.SyncBatchNorm(3),
                 lambda: distributed.merge_moments(None, 2, np.zeros(3), np.ones(3)),
                 lambda: distributed.allreduce_sums(None, 2, np.zeros(3), np.ones(3))):
        with pytest.raises(ImportError, match=re.escape("pip install 'fastbn[mpi]'")):
            call()


# ---------------------------------------------------------------------- the collectives
class ScriptedComm:
    """Stands in for rank ``rank`` of a job whose other ranks sent ``rows`` (one (3, C) block
    per rank, in rank order): Allgather returns them, Allreduce sums them."""

    def __init__(self, rows: list[np.ndarray]) -> None:
        self.rows = rows
        self.sent: list[np.ndarray] = []

    def Get_size(self) -> int:
        return len(self.rows)

    def Allgather(self, send, receive) -> None:
        self.sent.append(np.array(send[0]))
        receive[0][...] = np.stack(self.rows)

    def Allreduce(self, send, receive, op=None) -> None:
        self.sent.append(np.array(send[0]))
        receive[0][...] = np.sum(self.rows, axis=0)


def shard_rows(shard: np.ndarray) -> np.ndarray:
    """What a rank holding ``shard`` (m, C) sends in merge_moments."""
    m, C = shard.shape
    if m == 0:
        return np.zeros((3, C))
    mean = shard.mean(axis=0)
    return np.stack([np.full(C, float(m)), mean, ((shard - mean) ** 2).sum(axis=0)])


@pytest.mark.parametrize("sizes", [(5,), (3, 7), (4, 0, 9), (0, 6, 1, 2), (8, 3, 0)])
def test_merge_moments_merges_in_rank_order(sizes):
    mpi_or_skip()
    rng = np.random.default_rng(len(sizes))
    shards = [rng.standard_normal((m, 3)) * [1e-3, 1.0, 10.0] + [1e2, 0.0, -5.0] for m in sizes]
    rows = [shard_rows(s) for s in shards]
    comm = ScriptedComm(rows)
    mine = shards[-1]
    # an empty shard's mean/var are whatever its backend made of 0/0: they must be ignored
    local_mean, local_var = (mine.mean(0), mine.var(0)) if len(mine) else (np.full(3, np.nan),) * 2
    count, mean, var = distributed.merge_moments(comm, len(mine), local_mean, local_var)
    whole = np.concatenate(shards)
    assert count == len(whole)
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-13, atol=0)
    np.testing.assert_allclose(var, whole.var(axis=0), rtol=1e-10, atol=0)
    sent = comm.sent[0]
    assert sent.dtype == np.float64 and sent.shape == (3, 3)  # 3*C values per rank
    np.testing.assert_allclose(sent, rows[-1], rtol=1e-14, atol=0)
    expected = (0.0, np.zeros(3), np.zeros(3))  # the same statements, in rank order
    for row in rows:
        expected = chan_merge(*expected, float(row[0, 0]), row[1], row[2])
    assert np.array_equal(mean, expected[1]) and np.array_equal(var, expected[2] / expected[0])


def test_merge_moments_of_an_empty_batch_is_count_zero():
    mpi_or_skip()
    comm = ScriptedComm([np.zeros((3, 2)), np.zeros((3, 2))])
    count, mean, var = distributed.merge_moments(comm, 0, np.full(2, np.nan), np.full(2, np.nan))
    assert count == 0 and np.array_equal(mean, [0.0, 0.0]) and np.array_equal(var, [0.0, 0.0])


def test_merge_moments_propagates_nonfinite_statistics():
    mpi_or_skip()
    bad = np.array([[np.nan, 1.0], [2.0, np.inf]])
    with np.errstate(invalid="ignore"):
        rows = [shard_rows(np.ones((3, 2))), shard_rows(bad)]
        local_mean, local_var = bad.mean(0), bad.var(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN/Inf propagate without a warning
        _, mean, var = distributed.merge_moments(ScriptedComm(rows), 2, local_mean, local_var)
    assert np.isnan(mean[0]) and not np.isfinite(var[1])


def test_collectives_on_comm_self():
    MPI = mpi_or_skip()
    x = np.random.default_rng(0).standard_normal((10, 4)) + 3.0
    count, mean, var = distributed.merge_moments(MPI.COMM_SELF, 10, x.mean(0), x.var(0))
    assert count == 10
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-15)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-14)
    dgamma, dbeta = np.arange(4.0), -np.arange(4.0, dtype=np.float32)
    count, total_dgamma, total_dbeta = distributed.allreduce_sums(MPI.COMM_SELF, 10, dgamma,
                                                                  dbeta)
    assert count == 10 and total_dgamma.dtype == np.float64 and total_dbeta.dtype == np.float64
    assert np.array_equal(total_dgamma, dgamma) and np.array_equal(total_dbeta, dbeta)


def test_allreduce_sums_sends_two_c_plus_one_values():
    mpi_or_skip()
    comm = ScriptedComm([np.array([1.0, 2.0, 10.0, 20.0, 5.0]),
                         np.array([0.5, -1.0, 1.0, 2.0, 3.0])])
    count, dgamma, dbeta = distributed.allreduce_sums(comm, 3, np.array([0.5, -1.0]),
                                                      np.array([1.0, 2.0]))
    assert comm.sent[0].tolist() == [0.5, -1.0, 1.0, 2.0, 3.0]
    assert count == 8 and dgamma.tolist() == [1.5, 1.0] and dbeta.tolist() == [11.0, 22.0]


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_collectives_reject_bad_counts(bad):
    MPI = mpi_or_skip()
    with pytest.raises(ValueError, match="count"):
        distributed.merge_moments(MPI.COMM_SELF, bad, np.zeros(2), np.ones(2))


def test_collectives_reject_mismatched_vectors():
    MPI = mpi_or_skip()
    with pytest.raises(ValueError, match="var"):
        distributed.merge_moments(MPI.COMM_SELF, 4, np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="dgamma"):
        distributed.allreduce_sums(MPI.COMM_SELF, 4, np.zeros((3, 1)), np.ones(3))


# ---------------------------------------------------------------------- the layer
def test_sync_batchnorm_defaults_and_comm():
    MPI = mpi_or_skip()
    layer = distributed.SyncBatchNorm(5)
    assert layer.comm is MPI.COMM_WORLD
    assert layer.dtype == fastbn.BatchNorm(5).dtype
    assert isinstance(layer, fastbn.BatchNorm) and fastbn.SyncBatchNorm is distributed.SyncBatchNorm
    layer = distributed.SyncBatchNorm(5, axis=-1, dtype=np.float64, comm=MPI.COMM_SELF)
    assert layer.comm is MPI.COMM_SELF and layer.axis == -1
    assert layer.gamma.dtype == np.float64


def test_pickle_and_deepcopy_reattach_comm_world():
    MPI = mpi_or_skip()
    layer = distributed.SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    layer.gamma[...] = [1.0, 2.0, 3.0]
    layer.running_var[...] = [4.0, 5.0, 6.0]
    for restored in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert restored.comm is MPI.COMM_WORLD
        assert np.array_equal(restored.gamma, layer.gamma)
        assert np.array_equal(restored.running_var, layer.running_var)
        assert restored.gamma is not layer.gamma
    assert layer.comm is MPI.COMM_SELF


def test_pickled_layer_keeps_the_pending_backward():
    MPI = mpi_or_skip()
    x = np.random.default_rng(1).standard_normal((6, 3, 2))
    layer = distributed.SyncBatchNorm(3, dtype=np.float64, backend="numpy", comm=MPI.COMM_SELF)
    layer.forward(x)
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.comm is MPI.COMM_WORLD
    dy = np.cos(x)
    assert np.array_equal(restored.backward(dy), layer.backward(dy))
    assert np.array_equal(restored.dgamma, layer.dgamma)


def test_state_dicts_move_between_sync_and_plain_layers():
    MPI = mpi_or_skip()
    sync = distributed.SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    sync.running_mean[...] = [1.0, 2.0, 3.0]
    sync.num_batches_tracked = 4
    plain = fastbn.BatchNorm(3, dtype=np.float64)
    plain.load_state_dict(sync.state_dict())
    back = distributed.SyncBatchNorm(3, dtype=np.float64, comm=MPI.COMM_SELF)
    back.load_state_dict(plain.state_dict())
    assert sorted(back.state_dict()) == sorted(sync.state_dict())
    for key, value in sync.state_dict().items():
        assert np.array_equal(back.state_dict()[key], value), key


# ---------------------------------------------------------------------- real MPI jobs
CHECKS = [f"{name}_{backend}" for backend in ("numpy", "cpu")
          for name in ("layer", "empty_shard", "relu_residual", "functional", "nonfinite",
                       "pickle", "eval_batch_stats")]
_jobs: dict[int, subprocess.CompletedProcess] = {}


def sync_checks_job(ranks: int) -> subprocess.CompletedProcess:
    """All checks of tests/mpi/sync_checks.py in one job per rank count (each job pays the
    start-up of its processes once)."""
    if ranks not in _jobs:
        _jobs[ranks] = launch(MPI_SCRIPTS / "sync_checks.py", ranks)
    return _jobs[ranks]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_sync_batchnorm_under_mpiexec(ranks, check):
    job = sync_checks_job(ranks)
    expected = f"PASS {check} ranks {','.join(map(str, range(ranks)))} of {ranks}"
    assert expected in job.stdout.splitlines(), (
        f"no '{expected}' (exit status {job.returncode})\n{job.stdout[-2000:]}\n"
        f"{job.stderr[-4000:]}")


def test_sync_batchnorm_on_cuda_arrays_under_mpiexec():
    """The cuda backend copies the per-feature vectors to the host around the collectives
    (in Numba's simulator without a GPU: slow, so one check on 2 ranks)."""
    if "cuda" not in fastbn.available_backends():
        pytest.skip("the cuda backend cannot run here")
    job = launch(MPI_SCRIPTS / "sync_checks.py", 2, "layer_cuda")
    assert job.returncode == 0, job.stderr[-4000:]
    assert "PASS layer_cuda ranks 0,1 of 2" in job.stdout.splitlines()


def test_sync_checks_job_exits_cleanly():
    for ranks in RANK_COUNTS:
        job = sync_checks_job(ranks)
        assert job.returncode == 0, job.stderr[-4000:]


def test_data_parallel_example_matches_single_process_training(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "curves.json"
    job = launch(ROOT / "examples" / "train_data_parallel.py", 2, "--steps", "6",
                 "--backend", "numpy", "--json", str(out))
    assert job.returncode == 0, job.stderr[-4000:]
    assert "parameters bitwise identical on every rank: True" in job.stdout
    curves = json.loads(out.read_text())
    parallel, single = curves["data_parallel"]["step_loss"], curves["single_process"]["step_loss"]
    assert curves["ranks"] == 2 and len(parallel) == len(single) == 6
    assert single[-1] < single[0]  # it trains
    # float32 training: the shards' sums are added in another order than the full batch's
    np.testing.assert_allclose(parallel, single, rtol=1e-5, atol=0)


def test_step_benchmark_counts_the_bytes_of_two_collectives(tmp_path):
    out = tmp_path / "mpi_step.json"
    job = launch(ROOT / "bench" / "mpi_step.py", 2, "--quick", "--repeats", "2",
                 "--backend", "numpy", "--out", str(out))
    assert job.returncode == 0, job.stderr[-4000:]
    assert "SyncBatchNorm step" in job.stdout
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        C = row["global_shape"][1]
        # Allgather: 3*C float64 out, 3*C per rank in; Allreduce: 2*C+1 each way
        assert row["bytes_sent_per_rank_per_step"] == 8 * (3 * C + 2 * C + 1)
        assert row["bytes_received_per_rank_per_step"] == 8 * (2 * 3 * C + 2 * C + 1)
        assert row["BatchNorm_median_s"] > 0 and row["SyncBatchNorm_median_s"] > 0
