"""Input validation shared by the functional API and the layers.

Everything here runs before any state changes, so a bad call raises and leaves nothing touched.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Dtypes fastbn computes in (outputs have the input's dtype).
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Dtypes of parameters and buffers (float16 inputs keep float32 or float64 state).
STATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64_MAX = np.iinfo(np.int64).max


def describe(x: Any) -> str:
    return "None" if x is None else type(x).__name__


def check_state_dtype(dtype: Any, name: str) -> np.dtype:
    """Raise TypeError unless ``dtype`` is float32 or float64 (parameters and buffers)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from exc
    if dtype not in STATE_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {dtype}")
    return dtype


def check_float_dtype(dtype: Any, name: str) -> np.dtype:
    """Raise TypeError unless ``dtype`` is float16, float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64 (or an integer/bool "
                        f"array, computed in float64), got dtype {dtype}")
    return dtype


def host_input_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a NumPy float array: float16/32/64 kept, integer and bool arrays and nested
    lists of them converted to float64 (as NumPy's reductions do); anything else TypeError."""
    if type(x) is np.ndarray and x.dtype in FLOAT_DTYPES:
        return x
    if x is None:
        raise TypeError(f"{name} must be an array of real numbers, got None")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of real numbers, got {describe(x)} "
                        f"that NumPy cannot convert ({exc})") from exc
    if arr.dtype.kind in "iub":
        return arr.astype(np.float64)
    check_float_dtype(arr.dtype, name)
    return arr


def per_feature_input(value: Any, num_features: int, name: str) -> np.ndarray | None:
    """A read-only per-feature argument (gamma, beta, mean, invstd): None, or an array-like of
    shape ``(num_features,)`` of real numbers, returned as a float32/float64 ndarray."""
    if value is None or (type(value) is np.ndarray and value.dtype in STATE_DTYPES
                         and value.shape == (num_features,)):
        return value
    if hasattr(value, "__cuda_array_interface__") or getattr(value, "__cuda_ndarray__", False):
        return value  # a device vector: the cuda backend checks it
    arr = host_input_array(value, name)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    check_per_feature(arr, num_features, name)
    return arr


def writable_per_feature(value: Any, num_features: int, name: str) -> Any:
    """A per-feature array fastbn writes in place (running_mean, running_var): None, or a
    writeable float32/float64 ndarray (or device array) of shape ``(num_features,)``."""
    if value is None:
        return None
    if (type(value) is np.ndarray and value.shape == (num_features,)
            and value.dtype in STATE_DTYPES and value.flags.writeable):
        return value  # the common case, checked first: this runs on every call
    if hasattr(value, "__cuda_array_interface__") or getattr(value, "__cuda_ndarray__", False):
        check_per_feature(value, num_features, name)
        check_state_dtype(value.dtype, name)
        return value
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} is updated in place, so it must be a NumPy array "
                        f"(np.asarray(...) it first), got {describe(value)}")
    check_per_feature(value, num_features, name)
    check_state_dtype(value.dtype, name)
    if not value.flags.writeable:
        raise ValueError(f"{name} is updated in place but is read-only")
    return value


def normalize_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an integer, got {describe(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D input")
    return int(axis) % ndim


def feature_layout(shape: tuple[int, ...], axis: int, num_features: int | None = None,
                   name: str = "x", allow_empty: bool = False) -> tuple[int, int, int]:
    """The canonical ``(outer, C, inner)`` shape of an input whose features lie along ``axis``.

    Raises ValueError for inputs with fewer than 2 dimensions, the wrong number of features,
    or no values at all (``allow_empty``: a data-parallel shard may hold no samples).
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
    if features == 0 or (outer * inner == 0 and not allow_empty):
        raise ValueError(f"{name} is empty (shape {tuple(shape)}): batch norm needs at least "
                         "one value per feature")
    return outer, features, inner


def check_ndims(shape: tuple[int, ...], ndims: tuple[int, ...] | None) -> None:
    if ndims is not None and len(shape) not in ndims:
        expected = " or ".join(f"{n}D" for n in ndims)
        raise ValueError(f"expected {expected} input (got {len(shape)}D input)")


def check_training_count(shape: tuple[int, ...], count: int) -> None:
    """PyTorch's rule: batch statistics need more than one value per feature."""
    if count <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}")


def check_per_feature(value: Any, num_features: int, name: str) -> None:
    """Raise ValueError unless ``value`` (array with .shape) has shape ``(num_features,)``."""
    shape = tuple(getattr(value, "shape", ()))
    if shape != (num_features,):
        raise ValueError(f"{name} must have shape ({num_features},), got {shape}")


def check_eps(eps: Any) -> float:
    if type(eps) is float and 0.0 <= eps < math.inf:
        return eps  # the common case, without NumPy's scalar machinery
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a number, got {describe(eps)}")
    if not eps >= 0 or not np.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


def check_momentum(momentum: Any, allow_none: bool) -> float | None:
    if momentum is None and allow_none:
        return None
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum must be a number{' or None' if allow_none else ''}, "
                        f"got {describe(momentum)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    return float(momentum)


def check_activation(activation: Any) -> bool:
    """True for ``"relu"``, False for None; anything else raises."""
    if activation is None:
        return False
    if activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def check_batch_count(value: Any) -> int:
    """A ``num_batches_tracked`` value: a non-negative integer that fits an int64."""
    count = np.asarray(value)
    if count.shape != () or count.dtype.kind not in "iu" or int(count) < 0 \
            or int(count) > _INT64_MAX:
        raise ValueError("num_batches_tracked must be a non-negative integer scalar that fits "
                         f"an int64, got {value!r}")
    return int(count)
