"""The ``"numpy"`` backend: batch normalization written like the textbook (and CS231n) formulas.

It is the readable reference and the benchmark baseline, so it is deliberately naive: whole-array
NumPy expressions in the input's dtype, with the temporaries they imply.
"""

from __future__ import annotations

import numpy as np

from .host import (asarray, astype, canonical, nonfinite_features, output_view,  # noqa: F401
                   per_feature, to_host, to_output, unavailable_reason, update_running_stats)

NAME = "numpy"
_REDUCE = (0, 2)  # every axis of (outer, C, inner) but the features


def _column(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return v.astype(dtype, copy=False)[None, :, None]


def moments(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # NaN/Inf input is reported by the caller's non-finite check, not by a NumPy warning.
    with np.errstate(invalid="ignore", over="ignore"):
        mean = x3.mean(axis=_REDUCE, keepdims=True)
        var = ((x3 - mean) ** 2).mean(axis=_REDUCE)
    return mean.ravel().astype(np.float64), var.astype(np.float64)


def _written(result: np.ndarray, out3: np.ndarray | None) -> np.ndarray:
    if out3 is None:
        return result
    out3[...] = result
    return out3


def normalize(x3, mean, var, gamma, beta, eps, out3=None):
    C, dtype = x3.shape[1], x3.dtype
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    x_hat = (x3 - _column(np.asarray(mean), dtype)) * _column(invstd, dtype)
    y = _column(per_feature(gamma, C, 1.0), dtype) * x_hat + _column(per_feature(beta, C, 0.0), dtype)
    return _written(y, out3), invstd


def backward(dy3, x3, gamma, mean, invstd, batch_stats, out3=None):
    C, dtype = x3.shape[1], x3.dtype
    n = x3.shape[0] * x3.shape[2]
    gamma = per_feature(gamma, C, 1.0)
    x_hat = (x3 - _column(np.asarray(mean), dtype)) * _column(np.asarray(invstd), dtype)
    dbeta = dy3.sum(axis=_REDUCE, dtype=np.float64)
    dgamma = (dy3 * x_hat).sum(axis=_REDUCE, dtype=np.float64)
    dx_hat = dy3 * _column(gamma, dtype)
    if batch_stats:
        dx = (_column(np.asarray(invstd), dtype) / n) * (
            n * dx_hat
            - dx_hat.sum(axis=_REDUCE, keepdims=True)
            - x_hat * (dx_hat * x_hat).sum(axis=_REDUCE, keepdims=True))
    else:
        dx = dx_hat * _column(np.asarray(invstd), dtype)
    return _written(dx.astype(dtype, copy=False), out3), dgamma, dbeta
