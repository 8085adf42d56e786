"""Array handling shared by the two host backends (numpy, cpu): NumPy arrays in, NumPy out.

These touch only arrays of shape ``(C,)`` or reshape without copying, so they cost nothing next
to a pass over the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import host_input_array


def unavailable_reason() -> str | None:
    return None


def asarray(x: Any, name: str) -> np.ndarray:
    if type(x) is np.ndarray:  # the common case, first
        return host_input_array(x, name)
    if hasattr(x, "__cuda_array_interface__") or getattr(x, "__cuda_ndarray__", False):
        raise TypeError(f"{name} is a GPU array; use backend='cuda' (or copy it to the host)")
    return host_input_array(x, name)


def canonical(x: np.ndarray, shape3: tuple[int, int, int]) -> np.ndarray:
    # A view for C-contiguous input; non-contiguous and Fortran-ordered input is copied once.
    return np.ascontiguousarray(x).reshape(shape3)


def output_view(out: Any, shape3: tuple[int, int, int], name: str) -> np.ndarray:
    """The canonical view of a caller's output array, which results are written through."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} is written in place, so it must be a NumPy array, "
                        f"got {type(out).__name__}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return out.reshape(shape3)


def astype(a: np.ndarray, dtype: Any) -> np.ndarray:
    return a.astype(dtype, copy=False)


def to_output(y: np.ndarray, like: Any) -> np.ndarray:
    return y


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (which the caller may keep and modify)."""
    return np.array(a, copy=True)


def nonfinite_features(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
