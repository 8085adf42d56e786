"""One pipeline per pass, called alike by the functional API and by the layers.

Every pass runs the same steps in the same order, and only this module calls the backends:

    prepare      validate x once per (shape, dtype, axis, ...) and take its canonical
                 (outer, C, inner) view
    statistics   backend.moments; under MPI merged across ranks (fastbn.distributed)
    checks       more than one value per feature, finite statistics, running statistics that
                 stay finite in their dtype: all before anything is written
    update       backend.update_running_stats (all or nothing)
    kernel       backend.normalize / backward_reduce + backward_elementwise

In one process, statistics, checks, update and kernel are one call, ``backend.forward_train``
(and ``backend.backward`` for both backward passes), which runs exactly these steps
(``backends/composed.py``) and lets the cpu backend run them as one compiled call, where at
training sizes each call's overhead costs as much as its work. Under MPI the pipeline runs the
steps itself, merging the statistics (and the gradient sums) across ranks in between.

The functional API validates its arguments and calls these functions; a layer holds its state
(parameters, gradients, buffers, what the backward needs) and calls the same functions. Backends
know nothing about either (``fastbn/backends/contract.py``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from . import _checks
from .backends import load
from .backends.contract import NONFINITE_STATISTICS, RUNNING_OVERFLOW

# Validation learned per (shape, dtype, axis, num_features, ndims, allow_empty): the canonical
# shape. A hit skips every check on x's structure (the key is what they depend on).
_LAYOUTS: dict[tuple, tuple[int, int, int]] = {}
_LAYOUTS_MAX = 4096


class Input:
    """An input seen by a backend: its canonical view and how to hand results back."""

    __slots__ = ("backend", "original", "array", "shape3", "x3", "count")

    def __init__(self, backend: ModuleType, original: Any, array: Any,
                 shape3: tuple[int, int, int]) -> None:
        self.backend = backend
        self.original = original
        self.array = array
        self.shape3 = shape3
        self.x3 = backend.canonical(array, shape3)
        #: Values per feature in this input.
        self.count = shape3[0] * shape3[2]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def restore(self, y3: Any) -> Any:
        """A canonical result in x's shape and array kind."""
        return self.backend.to_output(y3.reshape(self.array.shape), self.original)

    def fresh_x3(self) -> Any:
        """x's canonical view as x is now (a copy is taken again where the layout needs one),
        so a backward reads x the same way whatever its memory layout."""
        if type(self.array) is np.ndarray and self.array.flags.c_contiguous:
            return self.x3  # a view of x, so x as it is now
        return self.backend.canonical(self.array, self.shape3)

    def __reduce__(self):
        # Backends are modules, which do not pickle: keep the name and look it up again.
        return (_restore_input, (self.backend.NAME, self.array, self.shape3))


def _restore_input(backend_name: str, array: Any, shape3: tuple[int, int, int]) -> Input:
    return Input(load(backend_name), array, array, shape3)


def prepare(x: Any, axis: int, backend: ModuleType, num_features: int | None = None,
            ndims: tuple[int, ...] | None = None, name: str = "x",
            allow_empty: bool = False) -> Input:
    """Validate ``x`` and build its canonical view on ``backend`` (raises before any work)."""
    array = backend.asarray(x, name)
    key = (array.shape, array.dtype, axis, num_features, ndims, allow_empty)
    shape3 = _LAYOUTS.get(key)
    if shape3 is None:
        _checks.check_float_dtype(array.dtype, name)
        shape = tuple(array.shape)
        _checks.check_ndims(shape, ndims)
        shape3 = _checks.feature_layout(shape, axis, num_features, name, allow_empty)
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[key] = shape3
    return Input(backend, x, array, shape3)


def prepare_like(a: Any, like: Input, name: str) -> Any:
    """The canonical view of an array that must match ``like`` in shape, cast to its dtype
    (a gradient ``dy``, a residual)."""
    backend = like.backend
    array = backend.asarray(a, name)
    if array.shape != like.array.shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)} but the forward input had "
                         f"shape {tuple(like.array.shape)}")
    if array.dtype != like.array.dtype:
        _checks.check_float_dtype(array.dtype, name)
        array = backend.astype(array, like.array.dtype)
    return backend.canonical(array, like.shape3)


def output_view(out: Any, inp: Input, name: str = "out", allowed_aliases: tuple = ()) -> Any:
    """The canonical view of a caller's ``out=`` array, or None to allocate a new one.

    ``out`` may be exactly one of ``allowed_aliases`` (x itself, dy itself: every element is
    read before it is written); any other overlap with them is refused.
    """
    if out is None:
        return None
    if not hasattr(out, "shape"):
        raise TypeError(f"{name} is written in place, so it must be a NumPy array (or a device "
                        f"array on the cuda backend), got {_checks.describe(out)}")
    shape = tuple(out.shape)
    if shape != inp.shape:
        raise ValueError(f"{name} has shape {shape} but x has shape {inp.shape}")
    if getattr(out, "dtype", None) != inp.array.dtype:
        raise TypeError(f"{name} must have x's dtype {inp.array.dtype}, "
                        f"got {getattr(out, 'dtype', None)}")
    out3 = inp.backend.output_view(out, inp.shape3, name)
    if isinstance(out, np.ndarray):
        for other_name, other in allowed_aliases:
            if isinstance(other, np.ndarray) and np.may_share_memory(out, other):
                exact = (out.__array_interface__["data"][0] == other.__array_interface__["data"][0]
                         and out.strides == other.strides and out.shape == other.shape)
                if not exact and np.shares_memory(out, other):
                    raise ValueError(f"{name} overlaps {other_name} partially; pass {name}="
                                     f"{other_name} itself (in place) or a separate array")
    return out3


# ----------------------------------------------------------------------------- statistics
def _empty_statistics(inp: Input) -> tuple[Any, Any]:
    zeros = np.zeros(inp.shape3[1])
    return inp.backend.asarray(zeros, "mean"), inp.backend.asarray(zeros.copy(), "var")


def local_moments(inp: Input) -> tuple[Any, Any]:
    """Per-feature float64 mean and biased variance of this input (zeros for an empty shard)."""
    if inp.count == 0:
        return _empty_statistics(inp)
    return inp.backend.moments(inp.x3)


def batch_statistics(inp: Input, comm: Any = None) -> tuple[Any, Any, int]:
    """``(mean, var, count)`` of the training batch (the union of every rank's under MPI),
    checked: more than one value per feature, and finite."""
    backend = inp.backend
    if comm is None:
        _checks.check_training_count(inp.shape, inp.count)
        mean, var = backend.moments(inp.x3)
        count = inp.count
    else:
        from . import distributed
        mean, var = local_moments(inp)
        count, mean, var = distributed.merge_moments(comm, inp.count, backend.to_host(mean),
                                                     backend.to_host(var))
        _checks.check_training_count(inp.shape, count)
        mean, var = backend.asarray(mean, "mean"), backend.asarray(var, "var")
    bad = backend.nonfinite_features(mean, var)
    if len(bad):
        raise _nonfinite_error(inp, bad, comm)
    return mean, var, count


def _nonfinite_error(inp: Input, bad: np.ndarray, comm: Any) -> FloatingPointError:
    shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    where = "on some rank's input" if comm is not None else "in the input"
    x = inp.backend.to_host(inp.x3) if inp.count else np.zeros(0)
    if comm is not None or not np.all(np.isfinite(x)):
        cause = f"NaN or Inf {where}"
    else:
        accumulated = "float64" if inp.backend.NAME != "numpy" else \
            f"{np.result_type(x.dtype, np.float32)} (the numpy backend computes in x's dtype)"
        cause = (f"the input is finite but its spread overflows {accumulated} "
                 f"(largest |x| = {np.max(np.abs(x)):.3g})")
    return FloatingPointError(f"batch statistics are not finite ({cause}) for {len(bad)} "
                              f"feature(s): {shown}")


def update_running(inp: Input, running_mean: Any, running_var: Any, mean: Any, var: Any,
                   count: int, factor: float) -> None:
    """Update the running statistics from the batch's, or raise leaving them untouched."""
    if running_mean is None and running_var is None:
        return
    if inp.backend.update_running_stats(running_mean, running_var, mean, var, count, factor):
        return
    raise _overflow_error(inp, running_mean, running_var, mean, var)


def _overflow_error(inp: Input, running_mean: Any, running_var: Any, mean: Any,
                    var: Any) -> FloatingPointError:
    dtype = (running_var if running_var is not None else running_mean).dtype
    return FloatingPointError(
        f"the batch statistics overflow the running statistics' dtype {dtype} (the updated "
        f"running_mean or running_var would be infinite; largest batch variance "
        f"{float(np.max(inp.backend.to_host(var))):.3g}, largest |mean| "
        f"{float(np.max(np.abs(inp.backend.to_host(mean)))):.3g}); running statistics "
        "left unchanged. Rescale the input or keep running statistics in float64")


# ----------------------------------------------------------------------------- passes
def normalize(inp: Input, mean: Any, var: Any, gamma: Any, beta: Any, eps: float,
              out3: Any = None, residual3: Any = None, relu: bool = False) -> tuple[Any, Any]:
    """``(y3, invstd)``: the fused elementwise pass (an empty shard writes nothing)."""
    if inp.count == 0:
        y3 = out3 if out3 is not None else inp.backend.empty(inp.shape3, inp.array.dtype)
        invstd = inp.backend.asarray(1.0 / np.sqrt(inp.backend.to_host(var) + eps), "invstd")
        return y3, invstd
    return inp.backend.normalize(inp.x3, mean, var, gamma, beta, eps, out3, residual3, relu)


def forward_train(inp: Input, gamma: Any, beta: Any, eps: float, out3: Any = None,
                  running_mean: Any = None, running_var: Any = None, factor: float = 0.0,
                  residual3: Any = None, relu: bool = False, comm: Any = None
                  ) -> tuple[Any, Any, Any, int]:
    """Training forward: ``(y3, mean, invstd, count)`` with ``count`` the batch's values per
    feature (every rank's under MPI). Running statistics are updated with weight ``factor``."""
    if comm is None:
        # One backend call (the backend runs the steps below, fused where it can).
        _checks.check_training_count(inp.shape, inp.count)
        y3, mean, var, invstd, status = inp.backend.forward_train(
            inp.x3, gamma, beta, eps, running_mean, running_var, factor, out3, residual3, relu)
        if status == NONFINITE_STATISTICS:
            raise _nonfinite_error(inp, inp.backend.nonfinite_features(mean, var), None)
        if status == RUNNING_OVERFLOW:
            raise _overflow_error(inp, running_mean, running_var, mean, var)
        return y3, mean, invstd, inp.count
    mean, var, count = batch_statistics(inp, comm)
    update_running(inp, running_mean, running_var, mean, var, count, factor)
    y3, invstd = normalize(inp, mean, var, gamma, beta, eps, out3, residual3, relu)
    return y3, mean, invstd, count


def backward(inp: Input, dy3: Any, gamma: Any, beta: Any, mean: Any, invstd: Any,
             batch_stats: bool, count: int, out3: Any = None, relu: bool = False,
             y3: Any = None, want_dresidual: bool = False, comm: Any = None
             ) -> tuple[Any, Any, Any, Any]:
    """``(dx3, dgamma, dbeta, dresidual3)``; dgamma/dbeta are this input's contributions
    (under MPI their sum over ranks is the whole batch's gradient). ``dresidual3`` is None
    unless ``want_dresidual`` and ``relu`` (without ReLU the residual's gradient is dy)."""
    backend = inp.backend
    x3 = inp.fresh_x3()
    dresidual3 = backend.empty(inp.shape3, inp.array.dtype) if (want_dresidual and relu) else None
    if comm is None and inp.count:
        dx3, dgamma, dbeta = backend.backward(dy3, x3, gamma, beta, mean, invstd, count,
                                              batch_stats, out3, relu, y3, dresidual3)
        return dx3, dgamma, dbeta, dresidual3
    if inp.count:
        dgamma, dbeta = backend.backward_reduce(dy3, x3, gamma, beta, mean, invstd, relu, y3)
    else:
        dgamma, dbeta = _empty_statistics(inp)
    total_dgamma, total_dbeta = dgamma, dbeta
    if comm is not None and batch_stats:
        from . import distributed
        count, total_dgamma, total_dbeta = distributed.allreduce_sums(
            comm, inp.count, backend.to_host(dgamma), backend.to_host(dbeta))
        total_dgamma = backend.asarray(total_dgamma, "dgamma")
        total_dbeta = backend.asarray(total_dbeta, "dbeta")
    if inp.count == 0:
        dx3 = out3 if out3 is not None else backend.empty(inp.shape3, inp.array.dtype)
    else:
        dx3 = backend.backward_elementwise(dy3, x3, gamma, beta, mean, invstd, total_dgamma,
                                           total_dbeta, count, batch_stats, out3, relu, y3,
                                           dresidual3)
    return dx3, dgamma, dbeta, dresidual3
