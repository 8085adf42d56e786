"""Every backend against the contract of fastbn/backends/contract.py, with one set of tests.

Each available backend (numpy, cpu, and cuda — in Numba's simulator without a GPU) runs the
same cases on its canonical views, compared with the float64 reference in tests/reference.py.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import reference as ref
from fastbn.backends import composed, contract, load

BACKENDS = ref.backends()
# (shape, axis): planar (inner > 1) and channels-last (inner == 1) canonical views.
LAYOUTS = [((5, 3, 7), 1), ((4, 3, 2, 3), 1), ((13, 4), 1), ((2, 3, 2, 5), -1), ((3, 6), 0)]
DTYPES = [np.float64, np.float32, np.float16]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return load(request.param)


def _shape3(shape, axis):
    axis %= len(shape)
    return (int(np.prod(shape[:axis])), shape[axis], int(np.prod(shape[axis + 1:])))


def _view(backend, a, shape3):
    return backend.canonical(backend.asarray(a, "a"), shape3)


def _host(backend, a):
    return np.asarray(backend.to_host(a), dtype=np.float64)


def _data(shape, axis, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + offset).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, C)
    beta = rng.standard_normal(C)
    return x, gamma, beta


def _statistics_dtype(backend, dtype):
    """The naive numpy backend accumulates in x's dtype (float16 in float32), the cpu backend
    float16 in float32 (sums of a few hundred terms, added in float64); the others in
    float64."""
    if backend.NAME == "numpy" or (backend.NAME == "cpu" and dtype == np.float16):
        return np.float32 if dtype == np.float16 else dtype
    return np.float64


def test_module_has_every_operation(backend):
    assert contract.conforms(backend) == []
    assert isinstance(backend, contract.Backend)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(backend, shape, axis, dtype):
    x, _, _ = _data(shape, axis, dtype)
    mean, var = backend.moments(_view(backend, x, _shape3(shape, axis)))
    expected_mean, expected_var = ref.moments(x, axis)
    assert backend.to_host(mean).dtype == np.float64
    tol = _statistics_dtype(backend, dtype)
    ref.assert_close(_host(backend, mean), expected_mean, tol, what="mean")
    ref.assert_close(_host(backend, var), expected_var, tol, what="var")


def test_moments_propagate_nonfinite(backend):
    x = np.ones((6, 3, 2))
    x[1, 2, 0] = np.nan
    mean, var = backend.moments(_view(backend, x, x.shape))
    bad = backend.nonfinite_features(mean, var)
    assert isinstance(bad, np.ndarray) and bad.tolist() == [2]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", ["plain", "relu", "residual", "residual+relu"])
def test_normalize(backend, shape, axis, dtype, fused):
    x, gamma, beta = _data(shape, axis, dtype)
    residual = np.random.default_rng(5).standard_normal(shape).astype(dtype) \
        if "residual" in fused else None
    relu = "relu" in fused
    shape3 = _shape3(shape, axis)
    mean, var = ref.moments(x, axis)
    y3, invstd = backend.normalize(_view(backend, x, shape3), backend.asarray(mean, "m"),
                                   backend.asarray(var, "v"), gamma, beta, 1e-5, None,
                                   None if residual is None else _view(backend, residual, shape3),
                                   relu)
    expected, _, expected_invstd = ref.forward_fused(x, gamma, beta, 1e-5, axis, residual, relu,
                                                     mean, var)
    assert backend.to_host(y3).dtype == dtype
    ref.assert_close(_host(backend, y3).reshape(shape), expected, dtype,
                     what="y")
    ref.assert_close(_host(backend, invstd), expected_invstd, np.float64, what="invstd")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normalize_in_place_and_defaults(backend, dtype):
    shape, axis = (4, 3, 5), 1
    x, _, _ = _data(shape, axis, dtype)
    mean, var = ref.moments(x, axis)
    expected, _, _ = ref.forward(x, None, None, 1e-5, axis, mean, var)
    x3 = _view(backend, x, shape)
    y3, _ = backend.normalize(x3, backend.asarray(mean, "m"), backend.asarray(var, "v"), None,
                              None, 1e-5, x3)
    ref.assert_close(_host(backend, x3), expected, dtype, what="y written over x")
    ref.assert_close(_host(backend, y3), expected, dtype, what="returned y")


@pytest.mark.parametrize("running_dtype", [np.float32, np.float64])
def test_update_running_stats(backend, running_dtype):
    C = 4
    running_mean = backend.asarray(np.full(C, 0.5, running_dtype), "rm")
    running_var = backend.asarray(np.full(C, 2.0, running_dtype), "rv")
    mean, var = np.arange(C, dtype=np.float64), np.arange(1, C + 1, dtype=np.float64)
    assert backend.update_running_stats(running_mean, running_var, backend.asarray(mean, "m"),
                                        backend.asarray(var, "v"), 10, 0.25) is True
    ref.assert_close(_host(backend, running_mean), 0.75 * 0.5 + 0.25 * mean, running_dtype)
    ref.assert_close(_host(backend, running_var), 0.75 * 2.0 + 0.25 * var * 10 / 9,
                     running_dtype)


def test_update_running_stats_refuses_overflow_and_writes_nothing(backend):
    running_mean = backend.asarray(np.zeros(3, np.float32), "rm")
    running_var = backend.asarray(np.ones(3, np.float32), "rv")
    mean = np.array([1.0, 2.0, 3.0])
    var = np.array([1.0, 1e40, 1.0])  # finite in float64, not in float32
    ok = backend.update_running_stats(running_mean, running_var, backend.asarray(mean, "m"),
                                      backend.asarray(var, "v"), 8, 0.5)
    assert ok is False
    np.testing.assert_array_equal(backend.to_host(running_mean), np.zeros(3))
    np.testing.assert_array_equal(backend.to_host(running_var), np.ones(3))


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("fused", ["plain", "relu", "residual+relu"])
def test_backward(backend, shape, axis, dtype, batch_stats, fused):
    x, gamma, beta = _data(shape, axis, dtype)
    rng = np.random.default_rng(7)
    dy = rng.standard_normal(shape).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype) if "residual" in fused else None
    relu = "relu" in fused
    shape3 = _shape3(shape, axis)
    mean, var = ref.moments(x, axis)
    if not batch_stats:
        var = var * 1.5 + 0.1  # running statistics differ from the batch's
    invstd = 1.0 / np.sqrt(var + 1e-5)
    y = None
    if residual is not None:
        y, _, _ = ref.forward_fused(x, gamma, beta, 1e-5, axis, residual, relu, mean, var)
        y = y.astype(dtype)
    expected = ref.backward_fused(dy, x, gamma, beta, 1e-5, axis, residual, relu,
                                  None if batch_stats else mean, None if batch_stats else var)
    x3, dy3 = _view(backend, x, shape3), _view(backend, dy, shape3)
    y3 = None if y is None else _view(backend, y, shape3)
    m, s = backend.asarray(mean, "mean"), backend.asarray(invstd, "invstd")
    dgamma, dbeta = backend.backward_reduce(dy3, x3, gamma, beta, m, s, relu, y3)
    tol = dtype
    scale = np.abs(dy.astype(np.float64)).sum() / shape3[1]
    ref.assert_close(_host(backend, dgamma), expected[1], tol, scale, what="dgamma")
    ref.assert_close(_host(backend, dbeta), expected[2], tol, scale, what="dbeta")
    count = shape3[0] * shape3[2]
    dresidual3 = backend.empty(shape3, np.dtype(dtype)) if residual is not None else None
    dx3 = backend.backward_elementwise(dy3, x3, gamma, beta, m, s, dgamma, dbeta, count,
                                       batch_stats, None, relu, y3, dresidual3)
    assert backend.to_host(dx3).dtype == dtype
    ref.assert_close(_host(backend, dx3).reshape(shape), expected[0], tol, what="dx")
    if dresidual3 is not None:
        ref.assert_close(_host(backend, dresidual3).reshape(shape), expected[3], tol,
                         what="dresidual")


def test_relu_ties_get_zero_gradient(backend):
    # Each feature holds values symmetric about its mean, so x == mean normalizes to exactly 0.
    x = np.array([[-1.0, 2.0], [0.0, 3.0], [1.0, 4.0]])
    mean, var = ref.moments(x, 1)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    dy = np.ones_like(x)
    x3, dy3 = _view(backend, x, (3, 2, 1)), _view(backend, dy, (3, 2, 1))
    m, s = backend.asarray(mean, "m"), backend.asarray(invstd, "s")
    dgamma, dbeta = backend.backward_reduce(dy3, x3, None, None, m, s, True, None)
    np.testing.assert_array_equal(_host(backend, dbeta), [1.0, 1.0])  # only x > mean passes


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_elementwise_in_place(backend, dtype):
    shape = (6, 2, 3)
    x, gamma, beta = _data(shape, 1, dtype)
    dy = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    mean, var = ref.moments(x, 1)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    expected = ref.backward(dy, x, gamma, 1e-5, 1)
    x3, dy3 = _view(backend, x, shape), _view(backend, dy, shape)
    m, s = backend.asarray(mean, "m"), backend.asarray(invstd, "s")
    dgamma, dbeta = backend.backward_reduce(dy3, x3, gamma, beta, m, s)
    backend.backward_elementwise(dy3, x3, gamma, beta, m, s, dgamma, dbeta, 6 * 3, True, dy3)
    ref.assert_close(_host(backend, dy3), expected[0], dtype, what="dx written over dy")


def test_output_view_refuses_read_only(backend):
    if backend.NAME == "cuda":
        pytest.skip("device arrays have no read-only flag")
    out = np.zeros((2, 3, 4))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        backend.output_view(out, (2, 3, 4), "out")


def test_empty_and_to_host(backend):
    a = backend.empty((2, 3, 4), np.dtype(np.float32))
    host = backend.to_host(a)
    assert isinstance(host, np.ndarray) and host.shape == (2, 3, 4) and host.dtype == np.float32


# ----------------------------------------------------------------------------- whole passes
def _assert_same_pass(results, dtypes):
    """The whole pass against its composed steps. Not bitwise: where the cpu backend fuses the
    steps into one call, LLVM may vectorize a reassociated float64 reduction in another order."""
    for got, composed_result, dtype in zip(*results, dtypes):
        ref.assert_same_to_rounding(got, composed_result, dtype)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", ["plain", "relu", "residual+relu"])
def test_forward_train_is_its_composition(backend, shape, axis, dtype, fused):
    """The whole pass gives what its steps give, to rounding (the cpu backend fuses them)."""
    x, gamma, beta = _data(shape, axis, dtype)
    shape3 = _shape3(shape, axis)
    residual = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    residual3 = _view(backend, residual, shape3) if "residual" in fused else None
    x3 = _view(backend, x, shape3)
    results = []
    for run in (backend.forward_train, partial(composed.forward_train, backend)):
        running = [backend.asarray(np.full(shape3[1], v, np.float32), "r") for v in (0.5, 2.0)]
        y3, mean, var, invstd, status = run(x3, gamma, beta, 1e-5, *running, 0.25, None,
                                            residual3, "relu" in fused)
        assert status == contract.FORWARD_DONE
        results.append([_host(backend, a) for a in (y3, mean, var, invstd, *running)])
    _assert_same_pass(results, [dtype, np.float64, np.float64, np.float64, np.float32,
                                np.float32])
    expected_mean, expected_var = ref.moments(x, axis)
    ref.assert_close(results[0][1], expected_mean, _statistics_dtype(backend, dtype), what="mean")


@pytest.mark.parametrize("shape,axis", [((5, 3, 7), 1), ((13, 4), 1)])
def test_forward_train_reports_and_writes_nothing(backend, shape, axis):
    x, gamma, beta = _data(shape, axis, np.float64)
    shape3 = _shape3(shape, axis)
    running_mean = backend.asarray(np.zeros(shape3[1], np.float32), "rm")
    running_var = backend.asarray(np.ones(shape3[1], np.float32), "rv")
    out = np.full(shape, 7.0)
    out3 = backend.output_view(backend.asarray(out, "out"), shape3, "out")
    nan_x = x.copy()
    nan_x.flat[1] = np.nan
    huge_x = x * 1e22  # finite statistics in float64, an overflowing float32 running variance
    for data, status in ((nan_x, contract.NONFINITE_STATISTICS),
                         (huge_x, contract.RUNNING_OVERFLOW)):
        result = backend.forward_train(_view(backend, data, shape3), gamma, beta, 1e-5,
                                       running_mean, running_var, 0.5, out3)
        assert result[4] == status
        np.testing.assert_array_equal(backend.to_host(running_mean), 0.0)
        np.testing.assert_array_equal(backend.to_host(running_var), 1.0)
        np.testing.assert_array_equal(backend.to_host(out3).reshape(shape), 7.0)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", ["plain", "relu", "residual+relu"])
def test_backward_is_its_composition(backend, shape, axis, dtype, fused):
    x, gamma, beta = _data(shape, axis, dtype)
    shape3 = _shape3(shape, axis)
    dy = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    x3, dy3 = _view(backend, x, shape3), _view(backend, dy, shape3)
    mean, var = ref.moments(x, axis)
    m, s = backend.asarray(mean, "mean"), backend.asarray(1.0 / np.sqrt(var + 1e-5), "invstd")
    relu, with_residual = "relu" in fused, "residual" in fused
    y3 = _view(backend, np.maximum(x, 3.0).astype(dtype), shape3) if with_residual else None
    results = []
    for run in (backend.backward, partial(composed.backward, backend)):
        dresidual3 = backend.empty(shape3, np.dtype(dtype)) if with_residual else None
        dx3, dgamma, dbeta = run(dy3, x3, gamma, beta, m, s, shape3[0] * shape3[2], True,
                                 None, relu, y3, dresidual3)
        arrays = (dx3, dgamma, dbeta) + ((dresidual3,) if with_residual else ())
        results.append([_host(backend, a) for a in arrays])
    _assert_same_pass(results, [dtype, np.float64, np.float64, dtype])
