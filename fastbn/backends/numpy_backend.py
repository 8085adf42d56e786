"""The ``"numpy"`` backend: batch normalization written like the textbook (and CS231n) formulas.

It is the readable reference and the benchmark baseline, so it is deliberately naive: whole-array
NumPy expressions in the input's dtype (float16 computed in float32, as NumPy's own float16
reductions do), with the temporaries they imply, and ReLU / residual composed after the batch
norm as separate passes.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from . import composed
from .host import (asarray, astype, canonical, nonfinite_features, output_view, to_host, to_output,
                   unavailable_reason)

NAME = "numpy"
_REDUCE = (0, 2)  # every axis of (outer, C, inner) but the features
__all__ = ["NAME", "unavailable_reason", "asarray", "canonical", "output_view", "empty",
           "astype", "to_output", "to_host", "moments", "nonfinite_features", "update_running_stats",
           "normalize", "backward_reduce", "backward_elementwise", "forward_train", "backward"]


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _column(v, dtype: np.dtype) -> np.ndarray:
    return np.asarray(v).astype(dtype, copy=False)[None, :, None]


def _per_feature(value, features: int, fill: float) -> np.ndarray:
    return np.full(features, fill) if value is None else np.asarray(value, dtype=np.float64)


def _written(result: np.ndarray, out3: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    if out3 is None:
        return result.astype(dtype, copy=False)
    out3[...] = result
    return out3


def empty(shape3, dtype) -> np.ndarray:
    return np.empty(shape3, dtype)


def moments(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x3 = x3.astype(_compute_dtype(x3.dtype), copy=False)
    # NaN/Inf input is reported by the pipeline's non-finite check, not by a NumPy warning.
    with np.errstate(invalid="ignore", over="ignore"):
        mean = x3.mean(axis=_REDUCE, keepdims=True)
        var = ((x3 - mean) ** 2).mean(axis=_REDUCE)
    return mean.ravel().astype(np.float64), var.astype(np.float64)


def update_running_stats(running_mean, running_var, mean, var, count, momentum) -> bool:
    new = {}
    with np.errstate(over="ignore", invalid="ignore"):
        if running_mean is not None:
            new["mean"] = ((1.0 - momentum) * running_mean + momentum * np.asarray(mean)
                           ).astype(running_mean.dtype)
        if running_var is not None:
            unbiased = np.asarray(var) * (count / (count - 1))
            new["var"] = ((1.0 - momentum) * running_var + momentum * unbiased
                          ).astype(running_var.dtype)
    if not all(np.all(np.isfinite(v)) for v in new.values()):
        return False
    if running_mean is not None:
        running_mean[...] = new["mean"]
    if running_var is not None:
        running_var[...] = new["var"]
    return True


def _x_hat(x3, mean, invstd, dtype):
    return (x3.astype(dtype, copy=False) - _column(mean, dtype)) * _column(invstd, dtype)


def _batch_norm(x3, mean, invstd, gamma, beta, dtype):
    C = x3.shape[1]
    return (_column(_per_feature(gamma, C, 1.0), dtype) * _x_hat(x3, mean, invstd, dtype)
            + _column(_per_feature(beta, C, 0.0), dtype))


def normalize(x3, mean, var, gamma, beta, eps, out3=None, residual3=None, relu=False):
    dtype = _compute_dtype(x3.dtype)
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    y = _batch_norm(x3, mean, invstd, gamma, beta, dtype)
    if residual3 is not None:
        y = y + residual3.astype(dtype, copy=False)
    if relu:
        y = np.maximum(y, 0)
    return _written(y, out3, x3.dtype), invstd


def _upstream(dy3, x3, gamma, beta, mean, invstd, relu, y3, dtype):
    """dy masked by the ReLU's derivative (1 where the output is > 0, else 0)."""
    dy = dy3.astype(dtype, copy=False)
    if not relu:
        return dy
    if y3 is None:  # recompute the forward output, rounded to x's dtype as the forward stored it
        y3 = np.maximum(_batch_norm(x3, mean, invstd, gamma, beta, dtype).astype(x3.dtype), 0)
    return dy * (y3 > 0)


def backward_reduce(dy3, x3, gamma, beta, mean, invstd, relu=False, y3=None):
    dtype = _compute_dtype(x3.dtype)
    g = _upstream(dy3, x3, gamma, beta, mean, invstd, relu, y3, dtype)
    dbeta = g.sum(axis=_REDUCE, dtype=np.float64)
    dgamma = (g * _x_hat(x3, mean, invstd, dtype)).sum(axis=_REDUCE, dtype=np.float64)
    return dgamma, dbeta


def backward_elementwise(dy3, x3, gamma, beta, mean, invstd, dgamma, dbeta, count, batch_stats,
                         out3=None, relu=False, y3=None, dresidual3=None):
    dtype = _compute_dtype(x3.dtype)
    C = x3.shape[1]
    g = _upstream(dy3, x3, gamma, beta, mean, invstd, relu, y3, dtype)
    if dresidual3 is not None:
        dresidual3[...] = g
    dx_hat = g * _column(_per_feature(gamma, C, 1.0), dtype)
    inv = _column(invstd, dtype)
    if batch_stats:
        # The textbook form, with the whole batch's sums of dx_hat and dx_hat * x_hat.
        gamma64 = _per_feature(gamma, C, 1.0)
        sum_dx_hat = _column(gamma64 * np.asarray(dbeta), dtype)
        sum_dx_hat_x_hat = _column(gamma64 * np.asarray(dgamma), dtype)
        dx = (inv / count) * (count * dx_hat - sum_dx_hat
                              - _x_hat(x3, mean, invstd, dtype) * sum_dx_hat_x_hat)
    else:
        dx = dx_hat * inv
    return _written(dx, out3, x3.dtype)


# Whole passes: the textbook steps one after the other.
forward_train = functools.partial(composed.forward_train, sys.modules[__name__])
backward = functools.partial(composed.backward, sys.modules[__name__])
