"""Array handling and per-feature bookkeeping shared by the two host backends (numpy, cpu).

These touch only arrays of shape ``(C,)`` or reshape without copying, so they cost nothing next
to a pass over the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import host_float_array


def unavailable_reason() -> str | None:
    return None


def asarray(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "__cuda_array_interface__"):
        raise TypeError(f"{name} is a GPU array; use backend='cuda' (or copy it to the host)")
    return host_float_array(x, name)


def canonical(x: np.ndarray, shape3: tuple[int, int, int]) -> np.ndarray:
    # A view for C-contiguous input; non-contiguous and Fortran-ordered input is copied once.
    return np.ascontiguousarray(x).reshape(shape3)


def output_view(out: Any, shape3: tuple[int, int, int], name: str) -> np.ndarray:
    """The canonical view of a caller's output array, which results are written through."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return out.reshape(shape3)


def to_output(y: np.ndarray, like: Any) -> np.ndarray:
    return y


def astype(a: np.ndarray, dtype: Any) -> np.ndarray:
    return a if a.dtype == dtype else a.astype(dtype)


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (which the caller may keep and modify)."""
    return np.array(a, copy=True)


def per_feature(value: Any, num_features: int, fill: float) -> np.ndarray:
    """``value`` as a float64 vector of length C, or a constant vector where it is None."""
    if value is None:
        return np.full(num_features, fill)
    return np.asarray(value, dtype=np.float64)


def unbiased(var: np.ndarray, count: int) -> np.ndarray:
    return var * (count / (count - 1))


def update_running_stats(running_mean: np.ndarray | None, running_var: np.ndarray | None,
                         mean: np.ndarray, var: np.ndarray, count: int, momentum: float) -> None:
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += (momentum * mean).astype(running_mean.dtype)
    if running_var is not None:
        running_var *= 1.0 - momentum
        running_var += (momentum * unbiased(var, count)).astype(running_var.dtype)


def nonfinite_features(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))


def backward_coefficients(gamma: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                          sum_dy: np.ndarray, sum_dy_xmu: np.ndarray, count: int,
                          batch_stats: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature ``(k1, k2, k3)`` with ``dx = k1*dy + k2*x + k3``.

    With batch statistics, mean and invstd depend on x, which adds the two reduction terms:
    ``dx = gamma*invstd * (dy - mean(dy) - (x-mean)*invstd**2 * mean(dy*(x-mean)))``.
    With running statistics they are constants and ``dx = gamma*invstd*dy``.
    """
    k1 = gamma * invstd
    if not batch_stats:
        return k1, np.zeros_like(k1), np.zeros_like(k1)
    k2 = -k1 * invstd * invstd * (sum_dy_xmu / count)
    k3 = -k1 * (sum_dy / count) - k2 * mean
    return k1, k2, k3
