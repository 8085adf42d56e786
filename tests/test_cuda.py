"""The cuda backend module against the float64 NumPy reference, on tiny shapes.

Without a GPU these run in Numba's CUDA simulator (tests/conftest.py). The launch configuration
is shrunk so that tiny inputs still spread one feature over several blocks, several features
over one block's columns, and more features than grid rows, which is what large inputs do on a
real GPU. The backend is called through its contract functions directly (the pipeline that
validates arguments is tested elsewhere).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref
from fastbn import backends
from fastbn.backends import feature_math

cb = pytest.importorskip("fastbn.backends.cuda")
if cb.unavailable_reason() is not None:
    pytest.skip(f"cuda backend unavailable: {cb.unavailable_reason()}", allow_module_level=True)

from numba import cuda  # noqa: E402  (after the availability check)

DTYPES = [np.float16, np.float32, np.float64]
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
EPS = 1e-5


@pytest.fixture(params=sorted(LAUNCH_CONFIGS))
def launch(request, monkeypatch):
    for name, value in LAUNCH_CONFIGS[request.param].items():
        monkeypatch.setattr(cb, name, value)
    return request.param


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel name, grid, block, stream) of every launch."""
    seen = []
    original = cb._launch

    def spy(kernel, grid, block, stream, *args, **kwargs):
        seen.append((kernel.__name__, grid, block, stream))
        return original(kernel, grid, block, stream, *args, **kwargs)

    monkeypatch.setattr(cb, "_launch", spy)
    return seen


make = ref.random_array  # the tests' one input maker: offset 3, spread 2


def params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return ((1.0 + 0.5 * rng.standard_normal(C)).astype(dtype),
            (0.3 * rng.standard_normal(C)).astype(dtype))


def shape3(shape, axis):
    axis %= len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def device3(a, axis):
    return cb.canonical(cb.asarray(a, "x"), shape3(a.shape, axis))


def host(a, shape=None):
    out = cb.to_host(a)
    return out if shape is None else out.reshape(shape)


def assert_close(actual, expected, dtype, scale=1.0, what=""):
    """ref.assert_close, and for float16 2 ulp of float16 at the output scale."""
    if np.dtype(dtype) != np.float16:
        return ref.assert_close(actual, expected, dtype, scale=scale, what=what)
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    bound = 2 * float(np.spacing(np.float16(max(np.abs(expected).max(initial=0.0), scale))))
    err = np.abs(actual - expected).max(initial=0.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > 2 ulp of float16 ({bound:.3g})"


def fused_reference(x, axis, gamma, beta, residual, relu, dy):
    """y = act(bn(x) + residual) and its gradients, composed from the float64 reference."""
    y, mean, invstd = ref.forward(x, gamma, beta, EPS, axis)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    g = np.asarray(dy, np.float64) * (y > 0) if relu else np.asarray(dy, np.float64)
    dx, dgamma, dbeta = ref.backward(g, x, gamma, EPS, axis)
    return y, mean, invstd, dx, dgamma, dbeta, g


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_moments_match_the_reference(launch, dtype, shape, axis):
    x = make(shape, dtype)
    mean, var = cb.moments(device3(x, axis))
    exp_mean, exp_var = ref.moments(x, axis)
    assert mean.dtype == var.dtype == np.float64 and mean.shape == (shape[axis],)
    np.testing.assert_allclose(host(mean), exp_mean, rtol=1e-13)
    np.testing.assert_allclose(host(var), exp_var, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_statistics_keep_float64_precision_when_mean_dwarfs_spread(launch, dtype):
    # |mean|/std = 1e3 (float16) and 1e4 (float32): a float32 (let alone float16) accumulator
    # or deviation loses several digits here.
    offset = 1e3 if dtype == np.float16 else 1e4
    x = (offset + make((6, 2, 7), np.float64, offset=0.0, spread=1.0)).astype(dtype)
    mean, var = cb.moments(device3(x, 1))
    exp_mean, exp_var = ref.moments(x, 1)
    np.testing.assert_allclose(host(mean), exp_mean, rtol=1e-14)
    np.testing.assert_allclose(host(var), exp_var, rtol=1e-10)
    y, invstd = cb.normalize(device3(x, 1), mean, var, None, None, EPS)
    exp_y = ref.forward(x, eps=EPS)[0]
    assert_close(host(y, x.shape), exp_y, dtype, what="y")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator computes NaN in NumPy
def test_nonfinite_features_names_the_features(launch):
    x = make((6, 3, 4), np.float32)
    x[0, 2, 1] = np.nan
    x[1, 0, 0] = np.inf
    mean, var = cb.moments(device3(x, 1))
    np.testing.assert_array_equal(cb.nonfinite_features(mean, var), [0, 2])


# ----------------------------------------------------------------------------- running stats
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_running_stats_matches_the_formula_on_device_and_host(dtype):
    C, count, momentum = 4, 10, 0.3
    mean, var = np.linspace(-1, 2, C), np.linspace(0.5, 3, C)
    old_mean, old_var = np.linspace(0, 1, C).astype(dtype), np.linspace(1, 2, C).astype(dtype)
    expected_mean = feature_math.running_average(old_mean.astype(np.float64), mean, momentum)
    expected_var = feature_math.running_average(
        old_var.astype(np.float64), feature_math.unbiased_variance(var, count), momentum)
    device_mean, device_var = cuda.to_device(old_mean), cuda.to_device(old_var)
    dm, dv = cuda.to_device(mean), cuda.to_device(var)
    cb.nonfinite_features(dm, dv)
    assert cb.update_running_stats(device_mean, device_var, dm, dv, count, momentum) is True
    host_mean, host_var = old_mean.copy(), old_var.copy()
    assert cb.update_running_stats(host_mean, host_var, mean, var, count, momentum) is True
    for got in (host(device_mean), host_mean):
        np.testing.assert_array_equal(got, expected_mean.astype(dtype))
    for got in (host(device_var), host_var):
        np.testing.assert_array_equal(got, expected_var.astype(dtype))
    only_var = cuda.to_device(old_var)
    assert cb.update_running_stats(None, only_var, dm, dv, count, momentum) is True
    np.testing.assert_array_equal(host(only_var), expected_var.astype(dtype))


@pytest.fixture
def status_reads(monkeypatch):
    """Count update_running_stats' read-backs of its device status word."""
    reads = []
    original = cb._workspace
    wrapped = set()

    def spy(kind, *args, **kwargs):
        array = original(kind, *args, **kwargs)
        if kind == "status" and id(array) not in wrapped:
            wrapped.add(id(array))
            copy = array.copy_to_host
            monkeypatch.setattr(array, "copy_to_host",
                                lambda *a, **kw: reads.append(1) or copy(*a, **kw), raising=False)
        return array

    monkeypatch.setattr(cb, "_workspace", spy)
    return reads


def test_update_running_stats_is_all_or_nothing_and_reads_back_only_near_overflow(
        status_reads):
    count, momentum = 5, 0.1
    big = float(np.finfo(np.float32).max)
    start = np.array([1.0, 2.0, 3.0], np.float32)
    cases = [
        # (batch var, expected result): var 10 fits; 4e39 * 0.1 overflows float32 -> nothing
        # written; 2e39 exceeds float32 but its running average (about 2e38) fits.
        (np.array([10.0, 10.0, 10.0]), True),
        (np.array([10.0, 4e39, 10.0]), False),
        (np.array([10.0, 2e39, 10.0]), True),
    ]
    for batch_var, expected in cases:
        running_var = cuda.to_device(start)
        running_mean = cuda.to_device(np.zeros(3, np.float32))
        mean, var = cuda.to_device(np.zeros(3)), cuda.to_device(batch_var)
        cb.nonfinite_features(mean, var)
        reads_before = len(status_reads)
        result = cb.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        assert result is expected, batch_var
        exceeds = np.abs(batch_var * count / (count - 1)).max() > big
        assert len(status_reads) - reads_before == (1 if exceeds else 0)
        new_var = host(running_var)
        if expected:
            np.testing.assert_allclose(new_var, (1 - momentum) * start
                                       + momentum * batch_var * count / (count - 1), rtol=1e-6)
            assert np.isfinite(new_var).all()
        else:
            np.testing.assert_array_equal(new_var, start)
            np.testing.assert_array_equal(host(running_mean), 0.0)
    host_var = start.copy()
    assert cb.update_running_stats(None, host_var, np.zeros(3), np.array([1.0, 4e39, 1.0]),
                                   count, momentum) is False
    np.testing.assert_array_equal(host_var, start)


def test_overflow_limit_is_where_rounding_gives_infinity():
    for dtype in (np.float16, np.float32):
        limit = cb.overflow_limit(dtype)
        with np.errstate(over="ignore"):
            assert np.isinf(np.array(limit).astype(dtype))
        assert np.isfinite(np.array(np.nextafter(limit, 0.0)).astype(dtype))
    assert cb.overflow_limit(np.float64) == np.inf


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, False), (True, True),
                                                (False, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_normalize_matches_the_reference(launch, dtype, shape, axis, relu, with_residual):
    x = make(shape, dtype)
    C = shape[axis]
    gamma, beta = params(C, dtype)
    residual = make(shape, dtype, seed=7, offset=0.0, spread=1.0) if with_residual else None
    exp_y, exp_mean, exp_invstd, *_ = fused_reference(x, axis, gamma, beta, residual, relu,
                                                      np.ones(shape))
    x3 = device3(x, axis)
    mean, var = cb.moments(x3)
    y3, invstd = cb.normalize(x3, mean, var, cuda.to_device(gamma), beta, EPS,
                              residual3=None if residual is None else device3(residual, axis),
                              relu=relu)
    assert y3.dtype == dtype and invstd.dtype == np.float64
    assert_close(host(y3, shape), exp_y, dtype, what="y")
    np.testing.assert_allclose(host(invstd), exp_invstd, rtol=1e-12)
    if relu:
        assert (host(y3) >= 0).all()


@pytest.mark.parametrize("shape,axis", [((3, 2, 5), 1), ((7, 3), -1)])
def test_normalize_out_may_be_x_or_the_residual(shape, axis):
    x = make(shape, np.float32)
    residual = make(shape, np.float32, seed=2)
    exp_y = fused_reference(x, axis, None, None, residual, True, np.ones(shape))[0]
    mean, var = ref.moments(x, axis)
    for target in ("x", "residual"):
        x3, r3 = device3(x, axis), device3(residual, axis)
        out3 = x3 if target == "x" else r3
        y3, _ = cb.normalize(x3, mean, var, None, None, EPS, out3=out3, residual3=r3, relu=True)
        assert y3 is out3
        assert_close(host(out3, shape), exp_y, np.float32, what=f"y written over {target}")


def test_normalize_into_a_numpy_out_array():
    x = make((3, 2, 5), np.float64)
    out = np.empty_like(x)
    mean, var = ref.moments(x)
    y, _ = cb.normalize(device3(x, 1), mean, var, None, None, EPS, out3=out)
    assert y is out
    assert_close(out, ref.forward(x, eps=EPS)[0], np.float64, what="y")


# ----------------------------------------------------------------------------- backward
# With a residual the mask of act(bn(x) + residual) needs y (the pipeline passes y3).
@pytest.mark.parametrize("mask_from,with_residual", [
    ("none", False), ("recomputed", False), ("y", False), ("none", True), ("y", True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_backward_matches_the_reference(launch, dtype, shape, axis, mask_from, with_residual):
    relu = mask_from != "none"
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=5, offset=0.2, spread=1.0)
    C = shape[axis]
    gamma, beta = params(C, dtype)
    residual = make(shape, dtype, seed=7, offset=0.0, spread=1.0) if with_residual else None
    x3, dy3 = device3(x, axis), device3(dy, axis)
    mean, var = cb.moments(x3)
    y3, invstd = cb.normalize(x3, mean, var, gamma, beta, EPS,
                              residual3=None if residual is None else device3(residual, axis),
                              relu=relu)
    # The oracle's mask is the stored forward output's (rounded to dtype) sign.
    y_stored = host(y3, shape).astype(np.float64)
    g = dy.astype(np.float64) * (y_stored > 0) if relu else dy.astype(np.float64)
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(g, x, gamma, EPS, axis)
    given_y = y3 if mask_from == "y" else None
    dgamma, dbeta = cb.backward_reduce(dy3, x3, gamma, beta, mean, invstd, relu=relu, y3=given_y)
    dres3 = cb.empty(x3.shape, dtype) if with_residual else None
    dx3 = cb.backward_elementwise(dy3, x3, gamma, beta, mean, invstd, dgamma, dbeta,
                                  x3.shape[0] * x3.shape[2], True, relu=relu, y3=given_y,
                                  dresidual3=dres3)
    scale = np.abs(dy).astype(np.float64).sum()
    assert_close(host(dgamma), exp_dgamma, dtype, scale=scale, what="dgamma")
    assert_close(host(dbeta), exp_dbeta, dtype, scale=scale, what="dbeta")
    assert dx3.dtype == dtype
    assert_close(host(dx3, shape), exp_dx, dtype, what="dx")
    if with_residual:
        assert_close(host(dres3, shape), g, dtype, what="dresidual")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((9, 3), 1)])
def test_backward_with_fixed_statistics(dtype, shape, axis):
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=5)
    C = shape[axis]
    gamma, _ = params(C, dtype)
    mean, var = 0.5 + 0.1 * np.arange(C), 1.0 + 0.2 * np.arange(C)
    invstd = 1.0 / np.sqrt(var + EPS)
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(dy, x, gamma, EPS, axis, mean=mean, var=var)
    x3, dy3 = device3(x, axis), device3(dy, axis)
    dgamma, dbeta = cb.backward_reduce(dy3, x3, gamma, None, mean, invstd)
    dx3 = cb.backward_elementwise(dy3, x3, gamma, None, mean, invstd, dgamma, dbeta,
                                  x3.shape[0] * x3.shape[2], False, out3=dy3)
    assert dx3 is dy3
    assert_close(host(dx3, shape), exp_dx, dtype, what="dx written over dy")
    assert_close(host(dgamma), exp_dgamma, dtype, scale=np.abs(dy).sum(), what="dgamma")
    assert_close(host(dbeta), exp_dbeta, dtype, scale=np.abs(dy).sum(), what="dbeta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_relu_ties_get_no_gradient_whether_the_mask_is_recomputed_or_read(dtype, axis):
    # Per feature the values -1, 0, 1 (mean exactly 0): x = 0 normalizes to exactly 0.
    base = np.array([-1.0, 0.0, 1.0, 0.0, -1.0, 1.0])
    x = np.stack([base, 2 * base], axis=1).astype(dtype).reshape(3, 2, 2)
    x = x if axis == 1 else np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dy = np.ones_like(x)
    x3, dy3 = device3(x, axis), device3(dy, axis)
    mean, var = cb.moments(x3)
    y3, invstd = cb.normalize(x3, mean, var, None, None, EPS, relu=True)
    ties = host(x3) == 0
    assert ties.sum() == 4 and (host(y3)[ties] == 0).all()
    for given_y in (None, y3):
        dres3 = cb.empty(x3.shape, dtype)
        dgamma, dbeta = cb.backward_reduce(dy3, x3, None, None, mean, invstd, relu=True,
                                           y3=given_y)
        cb.backward_elementwise(dy3, x3, None, None, mean, invstd, dgamma, dbeta, 6, True,
                                relu=True, y3=given_y, dresidual3=dres3)
        g = host(dres3)
        np.testing.assert_array_equal(g, (host(x3) > 0).astype(dtype))
        np.testing.assert_array_equal(host(dbeta), [2.0, 2.0])


def test_recomputed_relu_mask_matches_the_stored_float16_output_near_zero():
    # Mean exactly 0, std 2.8: float16's smallest subnormal (6e-8) normalizes to 2.1e-8, below
    # half that subnormal, so the forward stores 0 there; the recomputed mask must agree.
    tiny = float(np.finfo(np.float16).smallest_subnormal)
    x = np.array([[-4.0], [4.0], [tiny], [-tiny]], np.float16).repeat(2, axis=1)
    x3 = device3(x, 1)
    mean, var = cb.moments(x3)
    y3, invstd = cb.normalize(x3, mean, var, None, None, EPS, relu=True)
    positive = (host(y3, x.shape) > 0).sum(axis=0)
    np.testing.assert_array_equal(positive, [1, 1])
    dy3 = device3(np.ones_like(x), 1)
    for given_y in (None, y3):
        dgamma, dbeta = cb.backward_reduce(dy3, x3, None, None, mean, invstd, relu=True,
                                           y3=given_y)
        np.testing.assert_array_equal(host(dbeta), positive)


# ----------------------------------------------------------------------------- launches
def test_launch_counts_per_pass(launches):
    x = make((4, 3, 5), np.float32)
    x3 = device3(x, 1)
    running = cuda.to_device(np.zeros(3, np.float32)), cuda.to_device(np.ones(3, np.float32))
    mean, var = cb.moments(x3)
    cb.nonfinite_features(mean, var)
    cb.update_running_stats(*running, mean, var, 20, 0.1)
    y3, invstd = cb.normalize(x3, mean, var, None, None, EPS)
    assert [name for name, *_ in launches] == [
        "batch_moments_planar", "update_running_stats", "scale_shift_planar"]
    launches.clear()
    dgamma, dbeta = cb.backward_reduce(x3, x3, None, None, mean, invstd)
    cb.backward_elementwise(x3, x3, None, None, mean, invstd, dgamma, dbeta, 20, True)
    assert [name for name, *_ in launches] == ["backward_reduce_planar",
                                               "backward_elementwise_planar"]


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((9, 3), 1)])
def test_small_launch_config_spreads_each_feature_over_several_blocks(launches, monkeypatch,
                                                                      shape, axis):
    for name, value in LAUNCH_CONFIGS["many-blocks"].items():
        monkeypatch.setattr(cb, name, value)
    x3 = device3(make(shape, np.float32), axis)
    mean, var = cb.moments(x3)
    cb.backward_reduce(x3, x3, None, None, mean, cb.normalize(x3, mean, var, None, None, 0)[1])
    (name, grid, block, _), = [launch for launch in launches if "batch_moments" in launch[0]]
    if name == "batch_moments_planar":
        blocks_per_feature, feature_rows = grid
        assert blocks_per_feature == 3  # 20 values per feature, 8 threads per block
        assert feature_rows == 2 < shape[1]  # grid-strides over the features
        assert block == 8
    else:
        feature_blocks, blocks_per_feature = grid
        assert block == (4, 2)  # 3 features on 4 columns, 2 rows of threads
        assert blocks_per_feature == 2  # 5 wanted, capped by MAX_GRID_Y; rows grid-stride
    for stage_two in ("merge_block_partials", "merge_gradient_partials"):
        (_, _, block, _), = [launch for launch in launches if launch[0] == stage_two]
        assert block == blocks_per_feature  # the second stage merges every block's partial


def test_launch_configuration_is_read_at_launch_time(launches, monkeypatch):
    x3 = device3(make((4, 3, 5), np.float32), 1)
    monkeypatch.setattr(cb, "THREADS_PER_BLOCK", 8)
    cb.moments(x3)
    monkeypatch.setattr(cb, "THREADS_PER_BLOCK", 4)
    cb.moments(x3)
    assert [block for name, _, block, _ in launches if name == "batch_moments_planar"] == [8, 4]


def test_scratch_space_is_reused_across_calls(monkeypatch, launch):
    x3 = device3(make((4, 3, 5), np.float32), 1)
    dy3 = device3(make((4, 3, 5), np.float32, seed=3), 1)
    running_mean = cuda.to_device(np.zeros(3))

    def one_step():
        mean, var = cb.moments(x3)
        cb.nonfinite_features(mean, var)
        cb.update_running_stats(running_mean, None, mean, var, 20, 0.1)
        _, invstd = cb.normalize(x3, mean, var, None, None, EPS)
        dgamma, dbeta = cb.backward_reduce(dy3, x3, None, None, mean, invstd)
        cb.backward_elementwise(dy3, x3, None, None, mean, invstd, dgamma, dbeta, 20, True)

    one_step()
    allocations = []
    for allocator in ("device_array", "pinned_array"):
        original = getattr(cuda, allocator)
        monkeypatch.setattr(cuda, allocator, lambda *a, _o=original, _n=allocator, **kw:
                            allocations.append((_n, a[0])) or _o(*a, **kw))
    one_step()
    # Only the results the caller keeps: (mean, var), y, invstd, (dgamma, dbeta), dx.
    assert sorted(shape for _, shape in allocations) == sorted(
        [(2, 3), (4, 3, 5), (3,), (2, 3), (4, 3, 5)])


@pytest.fixture
def host_waits(monkeypatch):
    """Record every way the backend can wait for the device: copies to the host and stream
    or device synchronization."""
    waits = []
    array_type = type(cuda.to_device(np.ones(1)))
    for owner, name in ((array_type, "copy_to_host"), (type(cuda.stream()), "synchronize"),
                        (cuda, "synchronize")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **kw:
                            waits.append(_n) or _o(*a, **kw))
    return waits


def test_only_the_training_nan_check_waits_for_the_device(host_waits):
    x3 = device3(make((4, 3, 5), np.float32), 1)
    dy3 = device3(make((4, 3, 5), np.float32, seed=3), 1)
    running = cuda.to_device(np.zeros(3, np.float32)), cuda.to_device(np.ones(3, np.float32))
    gamma, beta = (cuda.to_device(p) for p in params(3, np.float32))
    mean, var = cb.moments(x3)
    assert cb.nonfinite_features(mean, var).size == 0
    # Two asynchronous copies into pinned memory, then the one wait for them.
    assert host_waits == ["copy_to_host", "copy_to_host", "synchronize"]
    host_waits.clear()
    assert cb.update_running_stats(*running, mean, var, 20, 0.1)
    y3, invstd = cb.normalize(x3, mean, var, gamma, beta, EPS, relu=True)
    cb.normalize(x3, *running, gamma, beta, EPS)  # eval
    dgamma, dbeta = cb.backward_reduce(dy3, x3, gamma, beta, mean, invstd, relu=True)
    cb.backward_elementwise(dy3, x3, gamma, beta, mean, invstd, dgamma, dbeta, 20, True,
                            relu=True)
    assert host_waits == []


# ----------------------------------------------------------------------------- streams
def test_kernels_run_on_the_use_stream_stream_and_outputs_carry_it(launches):
    stream = cuda.stream()
    x3 = device3(make((4, 3, 5), np.float32), 1)
    with cb.use_stream(stream) as active:
        assert active is stream
        mean, var = cb.moments(x3)
        y3, invstd = cb.normalize(x3, mean, var, None, None, EPS)
        dx3 = cb.backward_elementwise(x3, x3, None, None, mean, invstd,
                                      *cb.backward_reduce(x3, x3, None, None, mean, invstd),
                                      20, True)
        empty = cb.empty((2, 3, 4), np.float32)
    assert launches and all(s is stream for *_, s in launches)
    for result in (mean, y3, invstd, dx3, empty):
        assert result.stream is stream
    launches.clear()
    cb.moments(x3)
    assert launches[0][3] == 0  # outside the block: the input's (default) stream


def test_kernels_run_on_the_input_arrays_stream(launches):
    stream = cuda.stream()
    x = cuda.device_array((4, 3, 5), np.float32, stream=stream)
    x.copy_to_device(make((4, 3, 5), np.float32), stream=stream)
    x3 = cb.canonical(cb.asarray(x, "x"), (4, 3, 5))
    assert x3.stream is stream  # reshaping keeps the stream
    mean, var = cb.moments(x3)
    y3, _ = cb.normalize(x3, mean, var, None, None, EPS)
    assert [s for *_, s in launches] == [stream, stream]
    assert y3.stream is stream and mean.stream is stream


def test_scratch_space_is_not_shared_between_streams():
    a, b = cuda.stream(), cuda.stream()
    first = cb._workspace("moments", (3, 2, 4), np.float64, a)
    assert cb._workspace("moments", (3, 2, 4), np.float64, a) is first
    assert cb._workspace("moments", (3, 2, 4), np.float64, b) is not first


def test_stream_handles_of_frameworks_become_numba_streams(monkeypatch):
    made = []
    monkeypatch.setattr(cb.cuda, "external_stream", lambda handle: made.append(handle) or handle)

    class TorchStream:
        cuda_stream = 1234

    class ProtocolStream:
        def __cuda_stream__(self):
            return (0, 99)

    assert cb.as_numba_stream(TorchStream()) == 1234
    assert cb.as_numba_stream(ProtocolStream()) == 99
    assert cb.as_numba_stream(0) == 0 and cb.as_numba_stream(None) == 0
    numba_stream = cuda.stream()
    assert cb.as_numba_stream(numba_stream) is numba_stream
    assert made == [1234, 99]


# ----------------------------------------------------------------------------- devices
def test_arrays_of_one_call_on_different_gpus_raise(monkeypatch):
    x3 = device3(make((4, 3, 5), np.float32), 1)
    other = device3(make((4, 3, 5), np.float32), 1)
    monkeypatch.setattr(cb, "_device_id", lambda a: 1 if a is other else 0)
    with pytest.raises(ValueError, match=r"must be on one GPU; got arrays on GPUs \[0, 1\]"):
        cb.backward_reduce(other, x3, None, None, np.zeros(3), np.ones(3))


def test_calls_run_on_the_gpu_holding_their_arrays(monkeypatch):
    x3 = device3(make((4, 3, 5), np.float32), 1)
    entered = []
    monkeypatch.setattr(cb, "_device_id", lambda a: 1)
    monkeypatch.setattr(cb, "_on_device", lambda ordinal: entered.append(ordinal)
                        or cb.contextlib.nullcontext())
    cb.moments(x3)
    assert entered == [1]


def test_the_gpu_of_a_framework_array_is_read_from_its_device():
    class Device:
        index = 1

    class TorchLike:
        device = Device()
        __cuda_array_interface__ = {"data": (0, False)}

    assert cb._pointer_device(TorchLike()) == 1


# ----------------------------------------------------------------------------- interop
def test_outputs_come_back_as_the_callers_array_type(monkeypatch):
    wrapped = []
    monkeypatch.setitem(cb.FRAMEWORK_OUTPUT, "cupy", lambda y, like: wrapped.append(y) or "cupy")

    class CupyLike:
        __module__ = "cupy._core.core"
        __cuda_array_interface__ = {}

    y = cuda.to_device(np.ones(3))
    assert cb.to_output(y, CupyLike()) == "cupy" and wrapped == [y]
    assert cb.to_output(y, cuda.to_device(np.ones(3))) is y
    back = cb.to_output(y, np.ones(3))
    assert isinstance(back, np.ndarray) and (back == 1).all()
    host_array = np.ones(3)
    assert cb.to_output(host_array, CupyLike()) is host_array


def test_is_device_array_is_the_one_gpu_test():
    assert cb.is_device_array is backends.is_device_array
    assert cb.is_device_array(cuda.to_device(np.ones(2)))
    assert not cb.is_device_array(np.ones(2))
    assert not hasattr(cb, "is_native") and not hasattr(cb, "_is_device")


def test_torch_tensors_that_require_grad_are_used_through_a_detached_view():
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3).requires_grad_()
    x3 = cb.canonical(cb.asarray(t, "x"), (4, 3, 1))
    np.testing.assert_array_equal(host(x3, (4, 3)), t.detach().numpy())
    np.testing.assert_array_equal(cb.to_host(t), t.detach().numpy())


def test_non_contiguous_device_input_is_copied_with_a_warning():
    x = make((5, 4), np.float32)
    view = cuda.to_device(x).T  # a strided view, shape (4, 5)
    with pytest.warns(cb.NonContiguousCopyWarning, match="non-contiguous.*copied"):
        x3 = cb.canonical(view, (4, 5, 1))
    assert x3.is_c_contiguous()
    np.testing.assert_array_equal(host(x3, (4, 5)), x.T)
    nchw = make((2, 3, 4, 5), np.float32)
    channels_last = cuda.to_device(np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)))
    nchw_view = channels_last.transpose((0, 3, 1, 2))  # torch's channels_last memory format
    with pytest.warns(cb.NonContiguousCopyWarning):
        x3 = cb.canonical(nchw_view, (2, 3, 20))
    np.testing.assert_array_equal(host(x3, nchw.shape), nchw)


@pytest.mark.parametrize("target", [np.float16, np.float32, np.float64])
def test_astype_converts_on_the_device_rounding_once(target):
    x = make((3, 4, 2), np.float64)
    got = cb.astype(cuda.to_device(x), target)
    assert got.dtype == target and got.shape == x.shape
    np.testing.assert_array_equal(host(got), x.astype(target))
    same = cuda.to_device(x.astype(target))
    assert cb.astype(same, target) is same
    strided = cb.astype(cuda.to_device(x).transpose((2, 0, 1))[::2], target)
    np.testing.assert_array_equal(host(strided), x.transpose((2, 0, 1))[::2].astype(target))


def test_device_views_that_do_not_merge_into_three_axes_raise():
    x = cuda.to_device(make((4, 6, 5), np.float32))[:, ::2, :].transpose((2, 0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="cannot view a device array"):
            cb.canonical(x, (20, 3, 1))  # rows of (5, 4) with strides (4, 120): no merge


# ----------------------------------------------------------------------------- availability
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


def test_unavailable_cuda_is_not_listed(monkeypatch):
    monkeypatch.setattr(cb, "unavailable_reason", lambda: "no CUDA GPU was found")
    monkeypatch.delitem(backends._loaded, "cuda", raising=False)  # load() caches availability
    assert "cuda" not in backends.available_backends()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA GPU"):
        backends.load("cuda")


def test_importing_fastbn_does_not_import_numba_cuda():
    code = ("import sys, numpy, fastbn\n"
            "fastbn.BatchNorm1d(2, backend='numpy')(numpy.ones((3, 2)))\n"
            "print(sorted(m for m in sys.modules if m.startswith('numba.cuda')))")
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- properties
@st.composite
def inputs(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    dtype = draw(st.sampled_from(DTYPES))
    assume(math.prod(shape) // shape[axis] > 1)  # batch statistics need two values
    offset = draw(st.sampled_from([0.0, 3.0, 100.0]))
    return shape, axis, dtype, offset, draw(st.booleans())


@settings(max_examples=25, deadline=None)
@given(inputs())
def test_training_step_matches_the_reference_for_any_layout(case):
    shape, axis, dtype, offset, relu = case
    x = make(shape, dtype, offset=offset)
    dy = make(shape, dtype, seed=4, offset=0.0, spread=1.0)
    gamma, beta = params(shape[axis], dtype)
    x3, dy3 = device3(x, axis), device3(dy, axis)
    mean, var = cb.moments(x3)
    y3, invstd = cb.normalize(x3, mean, var, gamma, beta, EPS, relu=relu)
    exp_y = fused_reference(x, axis, gamma, beta, None, relu, dy)[0]
    assert_close(host(y3, shape), exp_y, dtype, scale=2.0, what="y")
    y_stored = host(y3, shape).astype(np.float64)
    g = dy.astype(np.float64) * (y_stored > 0) if relu else dy.astype(np.float64)
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(g, x, gamma, EPS, axis)
    dgamma, dbeta = cb.backward_reduce(dy3, x3, gamma, beta, mean, invstd, relu=relu)
    dx3 = cb.backward_elementwise(dy3, x3, gamma, beta, mean, invstd, dgamma, dbeta,
                                  x3.shape[0] * x3.shape[2], True, relu=relu)
    scale = np.abs(dy).astype(np.float64).sum()
    assert_close(host(dbeta), exp_dbeta, dtype, scale=scale, what="dbeta")
    assert_close(host(dgamma), exp_dgamma, dtype, scale=scale, what="dgamma")
    assert_close(host(dx3, shape), exp_dx, dtype, scale=2.0, what="dx")
