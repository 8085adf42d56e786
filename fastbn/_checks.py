"""Input validation shared by the functional API and the layers.

Everything here runs before any state changes, so a bad call raises and leaves nothing touched.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def describe(x: Any) -> str:
    return "None" if x is None else type(x).__name__


def check_float_dtype(dtype: Any, name: str) -> np.dtype:
    """Raise TypeError unless ``dtype`` is float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {dtype}")
    return dtype


def host_float_array(x: Any, name: str) -> np.ndarray:
    """``np.asarray(x)`` for a float32/float64 array-like, with a clear error otherwise."""
    if x is None:
        raise TypeError(f"{name} must be an array of float32 or float64, got None")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of float32 or float64, got {describe(x)}") from exc
    check_float_dtype(arr.dtype, name)
    return arr


def normalize_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an integer, got {describe(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D input")
    return int(axis) % ndim


def feature_layout(shape: tuple[int, ...], axis: int, num_features: int | None = None,
                   name: str = "x") -> tuple[int, int, int]:
    """The canonical ``(outer, C, inner)`` shape of an input whose features lie along ``axis``.

    Raises ValueError for inputs with fewer than 2 dimensions, the wrong number of features,
    or no values at all.
    """
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and features), "
                         f"got {ndim}-D input of shape {tuple(shape)}")
    axis = normalize_axis(axis, ndim)
    features = shape[axis]
    if num_features is not None and features != num_features:
        raise ValueError(f"expected {num_features} features along axis {axis} of {name}, "
                         f"got {features} (input shape {tuple(shape)})")
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    if features == 0 or outer * inner == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)}): batch norm needs at least "
                         "one value per feature")
    return outer, features, inner


def check_training_count(shape: tuple[int, ...], count: int) -> None:
    """PyTorch's rule: batch statistics need more than one value per feature."""
    if count <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}")


def check_per_feature(value: Any, num_features: int, name: str) -> None:
    """Raise ValueError unless ``value`` (array-like with .shape) has shape ``(num_features,)``."""
    shape = tuple(getattr(value, "shape", ()))
    if shape != (num_features,):
        raise ValueError(f"{name} must have shape ({num_features},), got {shape}")


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a number, got {describe(eps)}")
    if not eps >= 0 or not np.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


def check_momentum(momentum: Any, allow_none: bool) -> float | None:
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum must be a number{' or None' if allow_none else ''}, "
                        f"got {describe(momentum)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    return float(momentum)
