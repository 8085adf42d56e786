"""Plain float64 NumPy references: the one place the tests' expected values come from.

Written independently of fastbn's canonical view: the feature axis is moved last and the rest
flattened, so a mistake in the (outer, C, inner) bookkeeping cannot cancel out.
"""

from __future__ import annotations

import numpy as np

import fastbn


def backends() -> list[str]:
    """Every backend that runs here (cuda in the simulator when there is no GPU)."""
    return fastbn.available_backends()


def random_array(shape, dtype=np.float64, seed=0, offset=3.0, spread=2.0):
    """``offset + spread * N(0, 1)`` of ``shape`` in ``dtype``: the tests' one input maker."""
    rng = np.random.default_rng(seed)
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


def as_rows(x, axis):
    """(m, C) float64 view of x with features along axis."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1])


def from_rows(rows, shape, axis):
    moved = np.moveaxis(np.empty(shape), axis, -1).shape
    return np.moveaxis(rows.reshape(moved), -1, axis)


def moments(x, axis=1):
    rows = as_rows(x, axis)
    mean = rows.mean(axis=0)
    return mean, ((rows - mean) ** 2).mean(axis=0)


def forward(x, gamma=None, beta=None, eps=1e-5, axis=1, mean=None, var=None):
    """y and the statistics used; batch statistics unless mean and var are given."""
    rows = as_rows(x, axis)
    C = rows.shape[1]
    if mean is None:
        mean, var = moments(x, axis)
    gamma = np.ones(C) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(C) if beta is None else np.asarray(beta, np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    y = (rows - mean) * invstd * gamma + beta
    return from_rows(y, np.shape(x), axis), np.asarray(mean, np.float64), invstd


def backward(dy, x, gamma=None, eps=1e-5, axis=1, mean=None, var=None):
    """dx, dgamma, dbeta; through the batch statistics unless mean and var are given."""
    rows = as_rows(x, axis)
    g = as_rows(dy, axis)
    m, C = rows.shape
    gamma = np.ones(C) if gamma is None else np.asarray(gamma, np.float64)
    batch = mean is None
    if batch:
        mean, var = moments(x, axis)
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    x_hat = (rows - mean) * invstd
    dbeta = g.sum(axis=0)
    dgamma = (g * x_hat).sum(axis=0)
    if batch:
        dx = gamma * invstd * (g - dbeta / m - x_hat * dgamma / m)
    else:
        dx = gamma * invstd * g
    return from_rows(dx, np.shape(x), axis), dgamma, dbeta


def assert_close(actual, expected, dtype, scale=1.0, what=""):
    """Tolerance by dtype, relative to the magnitude of the expected values."""
    # float16: 2 ulp at the output's scale (10 mantissa bits).
    tol = {np.dtype(np.float16): 2 * 2.0**-10, np.dtype(np.float32): 2e-5,
           np.dtype(np.float64): 1e-10}[np.dtype(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    bound = tol * max(scale, np.abs(expected).max(initial=0.0), 1.0)
    err = np.abs(actual - expected).max(initial=0.0)
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_same_to_rounding(actual, expected, dtype, scale=0.0, ulps=4, what=""):
    """Equal to ``ulps`` units of rounding of ``dtype`` at the values' scale (or ``scale``, when
    larger): what two compilations of the same float64 sums, reassociated in different orders by
    fast-math, may give. Far tighter than ``assert_close``'s accuracy against the reference."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    bound = ulps * np.finfo(dtype).eps * max(scale, np.abs(expected).max(initial=0.0))
    err = np.abs(actual - expected).max(initial=0.0)
    assert err <= bound, f"{what}: max abs difference {err:.3g} > {bound:.3g}"


def forward_fused(x, gamma=None, beta=None, eps=1e-5, axis=1, residual=None, relu=False,
                  mean=None, var=None):
    """act(bn(x) + residual) in float64, and the statistics used."""
    y, mean, invstd = forward(x, gamma, beta, eps, axis, mean, var)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    return y, mean, invstd


def backward_fused(dy, x, gamma=None, beta=None, eps=1e-5, axis=1, residual=None, relu=False,
                   mean=None, var=None):
    """dx, dgamma, dbeta, dresidual of act(bn(x) + residual); the ReLU's gradient is 0 where
    its input is <= 0 (PyTorch's threshold_backward)."""
    g = np.asarray(dy, np.float64)
    if relu:
        y, _, _ = forward_fused(x, gamma, beta, eps, axis, residual, False, mean, var)
        g = g * (y > 0)
    dx, dgamma, dbeta = backward(g, x, gamma, eps, axis, mean, var)
    return dx, dgamma, dbeta, g
