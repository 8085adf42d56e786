"""Numerical robustness: large offsets, constant features, and the textbook identities."""

import numpy as np
import pytest

import fastbn
import reference as ref

BACKENDS = ref.backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", [((8, 3, 40, 40), 1), ((4000, 3), -1), ((3, 9000), 0)])
def test_float32_variance_with_large_offset(backend, shape, axis):
    """Offset 1e4, std 1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    x = (1e4 + np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    _, var = fastbn.moments(x, axis=axis, backend=backend)
    _, exact = ref.moments(x, axis)
    np.testing.assert_allclose(var, exact, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", [((6, 2, 5, 5), 1), ((50, 2), -1)])
def test_constant_feature_at_1e7_normalizes_to_beta(backend, shape, axis):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    index = [slice(None)] * x.ndim
    index[axis] = 0
    x[tuple(index)] = 1e7
    gamma = np.array([1.5, 1.0])
    beta = np.array([0.25, 0.0])
    y, _, _ = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend=backend)
    np.testing.assert_allclose(y[tuple(index)], 0.25, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_sqrt_var_beta_mean_recovers_input(backend):
    x = (5.0 + 3.0 * np.random.default_rng(2).standard_normal((16, 4, 3))).astype(np.float64)
    mean, var = fastbn.moments(x, backend=backend)
    eps = 1e-5
    y, _, _ = fastbn.batch_norm_forward(x, np.sqrt(var + eps), mean, eps=eps, backend=backend)
    np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_before_batch_norm_has_no_effect_in_training(backend, dtype):
    x = np.random.default_rng(3).standard_normal((32, 5)).astype(dtype)
    bias = np.array([3.0, -2.0, 100.0, 0.5, 7.0], dtype)
    y, _, _ = fastbn.batch_norm_forward(x, backend=backend)
    y_bias, _, _ = fastbn.batch_norm_forward(x + bias, backend=backend)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y_bias, y, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_are_merged_exactly_across_chunks_and_threads(backend):
    """Rows of very different scale in one feature: every chunk merge must be exact."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal((1, 1, 5000)) * 1e-3 + 1e3,
                        rng.standard_normal((1, 1, 5000)) * 10 - 50], axis=2)
    x = np.repeat(x, 3, axis=1)
    mean, var = fastbn.moments(x, backend=backend)
    exp_mean, exp_var = ref.moments(x)
    np.testing.assert_allclose(mean, exp_mean, rtol=1e-13)
    np.testing.assert_allclose(var, exp_var, rtol=1e-12)
