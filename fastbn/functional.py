"""Functional batch normalization: pure functions over arrays, any backend, any feature axis."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import _checks
from .backends import resolve

ArrayLike = Any


@dataclass(frozen=True)
class Prepared:
    """An input seen by a backend: its canonical ``(outer, C, inner)`` view and how to undo it."""

    backend: ModuleType
    original: Any
    array: Any
    x3: Any

    @property
    def count(self) -> int:
        return self.x3.shape[0] * self.x3.shape[2]

    @property
    def num_features(self) -> int:
        return self.x3.shape[1]

    def restore(self, y3: Any) -> Any:
        return self.backend.to_output(y3.reshape(self.array.shape), self.original)


def prepare(x: ArrayLike, axis: int, backend: ModuleType, num_features: int | None = None,
            ndims: tuple[int, ...] | None = None, name: str = "x") -> Prepared:
    """Validate ``x`` and build its canonical view on ``backend`` (raises before any work)."""
    array = backend.asarray(x, name)
    _checks.check_float_dtype(array.dtype, name)
    if ndims is not None and len(array.shape) not in ndims:
        expected = " or ".join(f"{n}D" for n in ndims)
        raise ValueError(f"expected {expected} input (got {len(array.shape)}D input)")
    shape3 = _checks.feature_layout(tuple(array.shape), axis, num_features, name)
    return Prepared(backend, x, array, backend.canonical(array, shape3))


def prepare_like(dy: ArrayLike, like: Prepared, name: str = "dy") -> Any:
    """The canonical view of a gradient that must match ``like`` in shape; cast to its dtype."""
    array = like.backend.asarray(dy, name)
    _checks.check_float_dtype(array.dtype, name)
    if tuple(array.shape) != tuple(like.array.shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)} but the forward input had shape "
                         f"{tuple(like.array.shape)}")
    array = like.backend.astype(array, like.array.dtype)
    return like.backend.canonical(array, like.x3.shape)


def output_view(out: Any, prepared: Prepared, name: str = "out") -> Any:
    """The canonical view of a caller's output array, or None to allocate a new one."""
    if out is None:
        return None
    shape = tuple(getattr(out, "shape", ()))
    if shape != tuple(prepared.array.shape):
        raise ValueError(f"{name} has shape {shape} but x has shape {tuple(prepared.array.shape)}")
    if getattr(out, "dtype", None) != prepared.array.dtype:
        raise TypeError(f"{name} must have x's dtype {prepared.array.dtype}, "
                        f"got {getattr(out, 'dtype', None)}")
    return prepared.backend.output_view(out, prepared.x3.shape, name)


def _check_params(prepared: Prepared, **params: Any) -> None:
    for name, value in params.items():
        if value is not None:
            _checks.check_per_feature(value, prepared.num_features, name)
            _checks.check_float_dtype(value.dtype, name)


def batch_statistics(prepared: Prepared) -> tuple[Any, Any]:
    """Per-feature mean and biased variance of a training batch, checked to be finite."""
    _checks.check_training_count(tuple(prepared.array.shape), prepared.count)
    mean, var = prepared.backend.moments(prepared.x3)
    bad = prepared.backend.nonfinite_features(mean, var)
    if len(bad):
        shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise FloatingPointError(f"batch statistics are not finite (NaN or Inf in the input) "
                                 f"for {len(bad)} feature(s): {shown}")
    return mean, var


def moments(x: ArrayLike, axis: int = 1, backend: str | None = None) -> tuple[Any, Any]:
    """Per-feature mean and biased variance.

    Parameters
    ----------
    x : array of float32 or float64, at least 2-D
    axis : int
        The feature axis; every other axis is reduced.
    backend : {"numpy", "cpu", "cuda"} or None

    Returns
    -------
    mean, var : arrays of shape (C,) in x's dtype
        The cpu and cuda backends accumulate in float64 (one pass over memory, chunks merged
        with Chan's formula); the naive ``"numpy"`` backend computes in x's dtype.
    """
    prepared = prepare(x, axis, resolve(backend, like=x))
    mean, var = prepared.backend.moments(prepared.x3)
    dtype = prepared.array.dtype
    return (prepared.backend.to_output(prepared.backend.astype(mean, dtype), x),
            prepared.backend.to_output(prepared.backend.astype(var, dtype), x))


def batch_norm_forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None,
                       eps: float = 1e-5, axis: int = 1, backend: str | None = None,
                       out: Any = None) -> tuple[Any, Any, Any]:
    """Training-mode forward with batch statistics, returning what the backward needs.

    Parameters
    ----------
    x : array of float32 or float64, shape (..., C, ...) with C along ``axis``
    gamma, beta : arrays of shape (C,), or None for 1 and 0
    eps : float
        Added to the variance inside the square root.
    out : array like x, optional
        Where to write y (C-contiguous; may be x itself). Reusing one saves the page faults
        of a fresh output, which cost about one extra pass over memory.

    Returns
    -------
    y : array like x (same shape and dtype); ``out`` when given
    mean, invstd : float64 arrays of shape (C,)
        Batch mean and ``1 / sqrt(var + eps)`` (biased variance).
    """
    eps = _checks.check_eps(eps)
    prepared = prepare(x, axis, resolve(backend, like=x))
    _check_params(prepared, gamma=gamma, beta=beta)
    out3 = output_view(out, prepared)
    mean, var = batch_statistics(prepared)
    y3, invstd = prepared.backend.normalize(prepared.x3, mean, var, gamma, beta, eps, out3)
    to_output = prepared.backend.to_output
    y = prepared.restore(y3) if out is None else out
    return y, to_output(mean, x), to_output(invstd, x)


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, gamma: ArrayLike | None, mean: ArrayLike,
                        invstd: ArrayLike, axis: int = 1, backend: str | None = None,
                        batch_stats: bool = True, out: Any = None) -> tuple[Any, Any, Any]:
    """Gradients of batch normalization.

    Parameters
    ----------
    dy : array like x
        Gradient of the loss with respect to the output y.
    x : array of float32 or float64
        The forward input.
    gamma : array of shape (C,) or None
    mean, invstd : arrays of shape (C,)
        As returned by :func:`batch_norm_forward` (or running statistics, with
        ``batch_stats=False``).
    batch_stats : bool
        True when the forward normalized with the batch's own statistics (training), so the
        gradient flows through mean and variance; False for fixed (running) statistics.
    out : array like x, optional
        Where to write dx (C-contiguous; may be dy itself).

    Returns
    -------
    dx : array like x; ``out`` when given
    dgamma, dbeta : float64 arrays of shape (C,)
    """
    prepared = prepare(x, axis, resolve(backend, like=x))
    _check_params(prepared, gamma=gamma, mean=mean, invstd=invstd)
    dy3 = prepare_like(dy, prepared)
    out3 = output_view(out, prepared)
    dx3, dgamma, dbeta = prepared.backend.backward(dy3, prepared.x3, gamma, mean, invstd,
                                                   bool(batch_stats), out3)
    to_output = prepared.backend.to_output
    dx = prepared.restore(dx3) if out is None else out
    return dx, to_output(dgamma, x), to_output(dbeta, x)


def batch_norm(x: ArrayLike, running_mean: ArrayLike | None, running_var: ArrayLike | None,
               gamma: ArrayLike | None = None, beta: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
               backend: str | None = None, out: Any = None) -> Any:
    """Batch normalization as ``torch.nn.functional.batch_norm``.

    In training mode normalizes with the batch statistics and updates ``running_mean`` and
    ``running_var`` in place (``(1 - momentum) * old + momentum * batch``, unbiased variance);
    in eval mode normalizes with the running statistics.

    Parameters
    ----------
    x : array of float32 or float64, features along ``axis``
    running_mean, running_var : arrays of shape (C,) or None
        Required in eval mode; may be None in training mode.
    gamma, beta : arrays of shape (C,) or None
    out : array like x, optional
        Where to write y (C-contiguous; may be x itself).

    Returns
    -------
    y : array like x; ``out`` when given
    """
    eps = _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum, allow_none=False)
    prepared = prepare(x, axis, resolve(backend, like=x))
    _check_params(prepared, running_mean=running_mean, running_var=running_var,
                  gamma=gamma, beta=beta)
    out3 = output_view(out, prepared)
    if training:
        mean, var = batch_statistics(prepared)
    elif running_mean is None or running_var is None:
        raise ValueError("eval mode needs running_mean and running_var "
                         "(pass training=True to use batch statistics)")
    else:
        mean, var = running_mean, running_var
    y3, _ = prepared.backend.normalize(prepared.x3, mean, var, gamma, beta, eps, out3)
    if training:
        prepared.backend.update_running_stats(running_mean, running_var, mean, var,
                                              prepared.count, momentum)
    return prepared.restore(y3) if out is None else out
