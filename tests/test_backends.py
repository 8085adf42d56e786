"""Backend selection, thread safety and the Numba cache."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
from fastbn import backends
from fastbn.backends import numpy_backend


@pytest.fixture(autouse=True)
def no_global_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    yield
    fastbn.set_backend(None)


@pytest.fixture
def numpy_calls(monkeypatch):
    """Count calls into the numpy backend."""
    calls = []
    original = numpy_backend.normalize

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(numpy_backend, "normalize", spy)
    return calls


def test_available_backends_always_include_numpy_and_cpu():
    names = fastbn.available_backends()
    assert names[:2] == ["numpy", "cpu"]


def test_default_is_cpu_then_environment_then_set_backend(monkeypatch):
    assert fastbn.get_backend() == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "numpy")
    assert fastbn.get_backend() == "numpy"
    fastbn.set_backend("cpu")
    assert fastbn.get_backend() == "cpu"
    fastbn.set_backend(None)
    assert fastbn.get_backend() == "numpy"


def test_per_call_beats_layer_beats_global(numpy_calls):
    x = np.random.default_rng(0).standard_normal((6, 2))
    fastbn.set_backend("numpy")
    fastbn.batch_norm_forward(x)
    assert len(numpy_calls) == 1
    fastbn.batch_norm_forward(x, backend="cpu")
    assert len(numpy_calls) == 1
    fastbn.BatchNorm1d(2, backend="cpu")(x)
    assert len(numpy_calls) == 1
    fastbn.set_backend("cpu")
    fastbn.BatchNorm1d(2, backend="numpy")(x)
    assert len(numpy_calls) == 2


def test_environment_variable_selects_backend(monkeypatch, numpy_calls):
    monkeypatch.setenv(backends.ENV_VAR, "numpy")
    fastbn.BatchNorm1d(2)(np.ones((4, 2)))
    assert len(numpy_calls) == 1


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastbn.set_backend("gpu")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastbn.moments(np.ones((2, 2)), backend="fast")
    monkeypatch.setenv(backends.ENV_VAR, "metal")
    with pytest.raises(ValueError, match=r"unknown backend 'metal' from \$FASTBN_BACKEND"):
        fastbn.moments(np.ones((2, 2)))


def test_gpu_arrays_are_refused_by_host_backends():
    class FakeGpuArray:
        __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f4", "data": (0, False),
                                    "version": 3}
        shape = (2, 2)

    with pytest.raises(TypeError, match="is a GPU array; use backend='cuda'"):
        fastbn.moments(FakeGpuArray(), backend="cpu")


def test_concurrent_calls_from_python_threads():
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((16, 8, 32, 32)).astype(np.float32) for _ in range(6)]
    expected = [fastbn.batch_norm_forward(x)[0] for x in inputs]
    results = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                y, _, _ = fastbn.batch_norm_forward(inputs[i])
                fastbn.batch_norm_backward(inputs[i], inputs[i], None, *fastbn.moments(inputs[i]))
            results[i] = y
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


CONCURRENT_SCRIPT = """
import threading, numba, numpy as np, fastbn
x = np.random.default_rng(0).standard_normal((64, 8, 512)).astype(np.float32)  # parallel
want = fastbn.batch_norm_forward(x)[0]
bad = []
def work():
    for _ in range(20):
        if not np.array_equal(fastbn.batch_norm_forward(x)[0], want):
            bad.append(1)
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print(numba.threading_layer(), len(bad))
"""


def test_workqueue_threading_layer_survives_concurrent_calls():
    """workqueue aborts the process on concurrent parallel launches unless they are guarded."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    out = subprocess.run([sys.executable, "-c", CONCURRENT_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["workqueue", "0"]


CACHE_SCRIPT = """
import numpy as np, fastbn
from fastbn.backends import cpu_kernels
for shape, axis in [((4, 3, 5), 1), ((6, 3), -1)]:
    x = np.ones(shape, np.float32); x[0] = 2
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis)
    fastbn.batch_norm_backward(x, x, None, mean, invstd, axis=axis)
kernels = [v for v in vars(cpu_kernels).values() if hasattr(v, "stats")]
kernels += list(cpu_kernels.SERIAL.values())
print(sum(sum(k.stats.cache_misses.values()) for k in kernels),
      sum(sum(k.stats.cache_hits.values()) for k in kernels))
"""


def test_second_process_loads_kernels_from_the_numba_cache():
    runs = [subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    misses, hits = map(int, runs[1].stdout.split())
    # Small inputs make one compiled call per pass (forward_train_*_serial, backward_*_serial,
    # each with its callees linked in): two layouts x two passes, all from the cache.
    assert misses == 0 and hits >= 4, runs[1].stdout
