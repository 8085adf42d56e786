"""The cuda backend against the numpy backend, on tiny shapes with multi-block launch grids.

Without a GPU these run in Numba's CUDA simulator (tests/conftest.py). The launch configuration
is shrunk so that tiny inputs still spread one feature over several blocks, several features
over one block's columns, and more features than grid rows, which is what large inputs do on a
real GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
import reference as ref
from fastbn import backends

cb = pytest.importorskip("fastbn.backends.cuda")
if cb.unavailable_reason() is not None:
    pytest.skip(f"cuda backend unavailable: {cb.unavailable_reason()}", allow_module_level=True)

from numba import cuda  # noqa: E402  (after the availability check)

DTYPES = [np.float32, np.float64]
# (shape, axis): planar (inner > 1) and channels-last (inner == 1) canonical views.
LAYOUTS = [
    ((4, 3, 5), 1),        # planar: 20 values per feature
    ((3, 2, 2, 3), 1),     # NCHW
    ((9, 3), 1),           # channels-last, C smaller than a block's columns
    ((2, 3, 2, 5), -1),    # NHWC, C larger than a block's columns
]
LAUNCH_CONFIGS = {
    # 8 threads, one value per thread: a feature of 20 values takes 3 blocks; 2 grid rows
    # force the grid-stride loop over features.
    "many-blocks": dict(THREADS_PER_BLOCK=8, MAX_BLOCKS=64, MIN_ELEMENTS_PER_THREAD=1,
                        MAX_GRID_Y=2),
    # One block per feature row of the grid, everything else grid-strided.
    "one-block": dict(THREADS_PER_BLOCK=4, MAX_BLOCKS=1, MIN_ELEMENTS_PER_THREAD=1,
                      MAX_GRID_Y=1),
}


@pytest.fixture(params=sorted(LAUNCH_CONFIGS))
def launch(request, monkeypatch):
    for name, value in LAUNCH_CONFIGS[request.param].items():
        monkeypatch.setattr(cb, name, value)
    return request.param


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel name, grid, block) of every launch."""
    seen = []
    original = cb._launch

    def spy(kernel, grid, block, *args, **kwargs):
        seen.append((kernel.__name__, grid, block))
        return original(kernel, grid, block, *args, **kwargs)

    monkeypatch.setattr(cb, "_launch", spy)
    return seen


def make(shape, dtype, seed=0, offset=3.0, spread=2.0):
    rng = np.random.default_rng(seed)
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


def params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return ((1.0 + 0.5 * rng.standard_normal(C)).astype(dtype),
            (0.3 * rng.standard_normal(C)).astype(dtype))


def host(a):
    return cb.to_host(a)


# ----------------------------------------------------------------------------- vs numpy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_train_forward_and_running_stats_match_numpy(launch, dtype, shape, axis):
    x = make(shape, dtype)
    C = shape[axis]
    gamma, beta = params(C, dtype)
    stats = {name: (np.linspace(-1, 1, C).astype(dtype), np.linspace(0.5, 2, C).astype(dtype))
             for name in ("cuda", "numpy")}
    running_mean, running_var = stats["cuda"]
    y = fastbn.batch_norm(x, running_mean, running_var, gamma, beta, training=True,
                          momentum=0.3, axis=axis, backend="cuda")
    exp_y = fastbn.batch_norm(x, *stats["numpy"], gamma, beta, training=True, momentum=0.3,
                              axis=axis, backend="numpy")
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
    ref.assert_close(y, exp_y, dtype, what="y")
    assert stats["cuda"][0] is running_mean  # host buffers updated in place
    ref.assert_close(running_mean, stats["numpy"][0], dtype, what="running_mean")
    ref.assert_close(running_var, stats["numpy"][1], dtype, what="running_var")

    y2, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend="cuda")
    _, exp_mean, exp_invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis,
                                                        backend="numpy")
    ref.assert_close(y2, exp_y, dtype, what="y (batch_norm_forward)")
    ref.assert_close(mean, exp_mean, dtype, what="mean")
    ref.assert_close(invstd, exp_invstd, dtype, what="invstd")
    assert mean.dtype == invstd.dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_eval_forward_matches_numpy(launch, dtype, shape, axis):
    x = make(shape, dtype)
    C = shape[axis]
    gamma, beta = params(C, dtype)
    running_mean, running_var = np.linspace(2, 4, C).astype(dtype), np.linspace(1, 5, C).astype(dtype)
    y = fastbn.batch_norm(x, running_mean, running_var, gamma, beta, axis=axis, backend="cuda")
    exp_y = fastbn.batch_norm(x, running_mean, running_var, gamma, beta, axis=axis,
                              backend="numpy")
    ref.assert_close(y, exp_y, dtype, what="y")


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_backward_matches_numpy(launch, dtype, shape, axis, batch_stats):
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=5, offset=0.2, spread=1.0)
    C = shape[axis]
    gamma, _ = params(C, dtype)
    if batch_stats:
        _, mean, invstd = fastbn.batch_norm_forward(x, gamma, axis=axis, backend="numpy")
    else:
        mean, invstd = 0.5 + 0.1 * np.arange(C), 1.0 / np.sqrt(1.0 + 0.2 * np.arange(C))
    got = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis, backend="cuda",
                                     batch_stats=batch_stats)
    expected = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis,
                                          backend="numpy", batch_stats=batch_stats)
    for name, a, e in zip(("dx", "dgamma", "dbeta"), got, expected):
        ref.assert_close(a, e, dtype, scale=np.abs(dy).sum(), what=name)
    assert got[0].dtype == dtype


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((9, 3), 1)])
def test_small_launch_config_spreads_each_feature_over_several_blocks(launches, monkeypatch,
                                                                      shape, axis):
    for name, value in LAUNCH_CONFIGS["many-blocks"].items():
        monkeypatch.setattr(cb, name, value)
    x = make(shape, np.float32)
    fastbn.batch_norm_forward(x, axis=axis, backend="cuda")
    (name, grid, block), = [launch for launch in launches if "batch_moments" in launch[0]]
    if name == "batch_moments_planar":
        blocks_per_feature, feature_rows = grid
        assert blocks_per_feature == 3  # 20 values per feature, 8 threads per block
        assert feature_rows == 2 < shape[1]  # grid-strides over the features
        assert block == 8
    else:
        feature_blocks, blocks_per_feature = grid
        assert block == (4, 2)  # 3 features on 4 columns, 2 rows of threads
        assert blocks_per_feature == 2  # 5 wanted, capped by MAX_GRID_Y; rows grid-stride
    (name, grid, block), = [launch for launch in launches if launch[0] == "finalize_moments"]
    assert block == blocks_per_feature  # the second stage merges every block's partial


def test_launch_configuration_is_read_at_launch_time(launches, monkeypatch):
    x = make((4, 3, 5), np.float32)
    monkeypatch.setattr(cb, "THREADS_PER_BLOCK", 8)
    cb.moments(cb.asarray(x, "x"))
    monkeypatch.setattr(cb, "THREADS_PER_BLOCK", 4)
    cb.moments(cb.asarray(x, "x"))
    assert [block for name, _, block in launches if name == "batch_moments_planar"] == [8, 4]


def test_statistics_keep_float64_precision_when_mean_dwarfs_spread(launch):
    # float32 input around 1e4 with unit spread: a float32 accumulator or a float32 shift
    # would lose about three digits here.
    x = (1e4 + make((6, 2, 7), np.float64, offset=0.0, spread=1.0)).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, backend="cuda")
    exp_y, exp_mean, exp_invstd = ref.forward(x)
    np.testing.assert_allclose(mean, exp_mean, rtol=1e-14)
    np.testing.assert_allclose(invstd, exp_invstd, rtol=1e-11)
    np.testing.assert_allclose(y, exp_y, rtol=0, atol=4e-7 * np.abs(exp_y).max())


# ----------------------------------------------------------------------------- device arrays
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((2, 3, 2, 5), -1)])
def test_device_arrays_in_device_arrays_out(launch, shape, axis):
    x = make(shape, np.float32)
    dy = make(shape, np.float32, seed=3)
    C = shape[axis]
    gamma, beta = params(C, np.float32)
    x_dev, dy_dev = cuda.to_device(x), cuda.to_device(dy)
    y, mean, invstd = fastbn.batch_norm_forward(x_dev, cuda.to_device(gamma), beta, axis=axis,
                                                backend="cuda")
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy_dev, x_dev, gamma, mean, invstd,
                                                   axis=axis, backend="cuda")
    for result in (y, mean, invstd, dx, dgamma, dbeta):
        assert cb.is_native(result) and not isinstance(result, np.ndarray)
    exp_y, exp_mean, exp_invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis,
                                                            backend="numpy")
    exp_dx, exp_dgamma, exp_dbeta = fastbn.batch_norm_backward(dy, x, gamma, exp_mean,
                                                               exp_invstd, axis=axis,
                                                               backend="numpy")
    ref.assert_close(host(y), exp_y, np.float32, what="y")
    ref.assert_close(host(dx), exp_dx, np.float32, what="dx")
    ref.assert_close(host(dgamma), exp_dgamma, np.float32, scale=np.abs(dy).sum(), what="dgamma")
    ref.assert_close(host(dbeta), exp_dbeta, np.float32, scale=np.abs(dy).sum(), what="dbeta")


def test_device_running_stats_are_updated_on_the_device():
    x = make((5, 3, 4), np.float32)
    running_mean = cuda.to_device(np.zeros(3, np.float32))
    running_var = cuda.to_device(np.ones(3, np.float32))
    exp_mean, exp_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    for _ in range(2):
        fastbn.batch_norm(cuda.to_device(x), running_mean, running_var, training=True,
                          backend="cuda")
        fastbn.batch_norm(x, exp_mean, exp_var, training=True, backend="numpy")
    ref.assert_close(host(running_mean), exp_mean, np.float32, what="running_mean")
    ref.assert_close(host(running_var), exp_var, np.float32, what="running_var")


def test_moments_and_gradients_are_cast_on_the_device():
    x = cuda.to_device(make((4, 3, 5), np.float32))
    mean, var = fastbn.moments(x, backend="cuda")
    assert cb.is_native(mean) and mean.dtype == var.dtype == np.float32
    exp_mean, exp_var = ref.moments(host(x))
    ref.assert_close(host(mean), exp_mean, np.float32, what="mean")
    ref.assert_close(host(var), exp_var, np.float32, what="var")
    dy64 = make((4, 3, 5), np.float64, seed=2)
    _, m, inv = fastbn.batch_norm_forward(x, backend="cuda")
    dx, _, _ = fastbn.batch_norm_backward(cuda.to_device(dy64), x, None, m, inv, backend="cuda")
    assert dx.dtype == np.float32  # dy is cast to x's dtype, as on the host backends
    exp_dx = ref.backward(dy64.astype(np.float32), host(x))[0]
    ref.assert_close(host(dx), exp_dx, np.float32, what="dx")


@pytest.mark.parametrize("shape,axis", [((3, 2, 5), 1), ((7, 3), -1)])
def test_device_out_arrays_may_alias_the_inputs(shape, axis):
    x, dy = make(shape, np.float32), make(shape, np.float32, seed=4)
    _, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, backend="numpy")
    exp_y = fastbn.batch_norm_forward(x, axis=axis, backend="numpy")[0]
    exp_dx = fastbn.batch_norm_backward(dy, x, None, mean, invstd, axis=axis,
                                        backend="numpy")[0]
    x_dev, dy_dev = cuda.to_device(x), cuda.to_device(dy)
    dx, _, _ = fastbn.batch_norm_backward(dy_dev, x_dev, None, mean, invstd, axis=axis,
                                          backend="cuda", out=dy_dev)
    assert dx is dy_dev
    ref.assert_close(host(dy_dev), exp_dx, np.float32, what="dx written over dy")
    y, _, _ = fastbn.batch_norm_forward(x_dev, axis=axis, backend="cuda", out=x_dev)
    assert y is x_dev
    ref.assert_close(host(x_dev), exp_y, np.float32, what="y written over x")


def test_non_contiguous_device_input_raises_a_clear_error():
    x = cuda.to_device(make((5, 4), np.float32)).T  # a strided view, shape (4, 5)
    with pytest.raises(ValueError, match="needs C-contiguous device arrays.*contiguous"):
        fastbn.batch_norm_forward(x, axis=1, backend="cuda")


BAD_INPUTS = [
    (np.arange(12).reshape(4, 3), "x must be float32 or float64, got dtype int64"),
    (np.ones((4, 3), np.float16), "x must be float32 or float64, got dtype float16"),
]


@pytest.mark.parametrize("bad,message", BAD_INPUTS + [
    (None, "x must be an array of float32 or float64, got None"),
    ("text", "x must be float32 or float64"),
])
def test_host_input_dtype_errors_match_the_host_backends(bad, message):
    with pytest.raises(TypeError) as host_error:
        fastbn.batch_norm_forward(bad, backend="numpy")
    assert message in str(host_error.value)
    with pytest.raises(TypeError) as cuda_error:
        fastbn.batch_norm_forward(bad, backend="cuda")
    assert str(cuda_error.value) == str(host_error.value)


@pytest.mark.parametrize("bad,message", BAD_INPUTS)
def test_device_input_dtype_errors_match_the_host_backends(bad, message):
    with pytest.raises(TypeError) as cuda_error:
        fastbn.batch_norm_forward(cuda.to_device(bad), backend="cuda")
    assert str(cuda_error.value) == message
    with pytest.raises(TypeError, match="gamma must be float32 or float64, got dtype int64"):
        fastbn.batch_norm_forward(cuda.to_device(make((4, 3), np.float32)),
                                  cuda.to_device(np.ones(3, np.int64)), backend="cuda")


@pytest.mark.parametrize("shape,axis,bad_feature", [((6, 3, 4), 1, 2), ((6, 5), 1, 0)])
def test_nonfinite_batch_names_the_feature_and_keeps_running_stats(launch, shape, axis,
                                                                   bad_feature):
    x = make(shape, np.float32)
    index = [0] * len(shape)
    index[axis] = bad_feature
    x[tuple(index)] = np.nan
    running_mean, running_var = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
    with pytest.raises(FloatingPointError, match=rf"for 1 feature\(s\): {bad_feature}$"):
        fastbn.batch_norm(x, running_mean, running_var, training=True, axis=axis,
                          backend="cuda")
    np.testing.assert_array_equal(running_mean, 0.0)
    np.testing.assert_array_equal(running_var, 1.0)


# ----------------------------------------------------------------------------- layers
def test_layer_keeps_state_on_the_device_and_matches_cpu():
    C = 3
    on_gpu = fastbn.BatchNorm2d(C, backend="cuda")
    on_cpu = fastbn.BatchNorm2d(C, backend="cpu")
    gamma_buffer = on_gpu.gamma
    for layer in (on_gpu, on_cpu):
        layer.load_state_dict({"weight": np.array([1.0, 2.0, 0.5]), "bias": np.zeros(C),
                               "running_mean": np.zeros(C), "running_var": np.ones(C)})
    assert on_gpu.gamma is gamma_buffer  # loaded into the existing device buffer
    for step in range(2):
        x, dy = make((2, C, 3, 2), np.float32, seed=step), make((2, C, 3, 2), np.float32, 9)
        ref.assert_close(host(on_gpu(cuda.to_device(x))), on_cpu(x), np.float32, what="y")
        ref.assert_close(host(on_gpu.backward(cuda.to_device(dy))), on_cpu.backward(dy),
                         np.float32, what="dx")
    for name in ("gamma", "beta", "dgamma", "dbeta", "running_mean", "running_var"):
        assert cb.is_native(getattr(on_gpu, name)), name
        ref.assert_close(host(getattr(on_gpu, name)), getattr(on_cpu, name), np.float32,
                         scale=10.0, what=name)
    assert on_gpu.num_batches_tracked == on_cpu.num_batches_tracked == 2
    x = make((2, C, 3, 2), np.float32, seed=7)
    y = on_gpu.eval()(x)  # host input: the slow path copies in and out
    assert isinstance(y, np.ndarray)
    ref.assert_close(y, on_cpu.eval()(x), np.float32, what="eval y")
    for key, value in on_cpu.state_dict().items():
        ref.assert_close(on_gpu.state_dict()[key], value, np.float32, scale=10.0, what=key)


# ----------------------------------------------------------------------------- availability
def test_unavailable_cuda_gives_a_clear_error_and_is_not_listed(monkeypatch):
    monkeypatch.setattr(cb, "unavailable_reason", lambda: "no CUDA GPU was found")
    assert "cuda" not in fastbn.available_backends()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA GPU"):
        fastbn.BatchNorm1d(3, backend="cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fastbn.set_backend("cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        fastbn.batch_norm_forward(make((4, 3), np.float32), backend="cuda")


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    assert cb.unavailable_reason() is None
    monkeypatch.setattr(cb.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cb.cuda, "cuda_error",
                        lambda: RuntimeError("\nCUDA driver library cannot be found.\n"),
                        raising=False)
    assert cb.unavailable_reason() == (
        "no usable NVIDIA driver or GPU (CUDA driver library cannot be found.)")
    monkeypatch.setattr(cb, "cuda", None)
    assert "numba-cuda is not installed" in cb.unavailable_reason()


def test_importing_fastbn_does_not_import_numba_cuda():
    code = ("import sys, numpy, fastbn\n"
            "fastbn.BatchNorm1d(2, backend='numpy')(numpy.ones((3, 2)))\n"
            "print(sorted(m for m in sys.modules if m.startswith('numba.cuda')))")
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"
