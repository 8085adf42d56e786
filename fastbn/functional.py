"""Functional batch normalization: pure functions over arrays, any backend, any feature axis.

Each function validates its arguments (all of them, before anything is computed or written)
and runs the pass's pipeline (``fastbn/_pipeline.py``), the same one the layers run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks, _pipeline
from .backends import resolve

ArrayLike = Any


def _result_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of returned per-feature statistics: x's, with float16 widened to float32."""
    return dtype if dtype in _checks.STATE_DTYPES else np.dtype(np.float32)


def moments(x: ArrayLike, axis: int = 1, backend: str | None = None,
            comm: Any = None) -> tuple[Any, Any]:
    """Per-feature mean and biased variance.

    Parameters
    ----------
    x : array (float16/32/64; integer and bool arrays are computed in float64), at least 2-D
    axis : int
        The feature axis; every other axis is reduced.
    backend : {"numpy", "cpu", "cuda"} or None
    comm : mpi4py communicator, optional
        Statistics of the union of every rank's ``x`` (a rank may pass an empty shard).

    Returns
    -------
    mean, var : arrays of shape (C,) in x's dtype (float32 for float16 x)
        The cpu and cuda backends accumulate in float64 (one pass over memory, chunks merged
        with Chan's formula); the naive ``"numpy"`` backend computes in x's dtype.
    """
    inp = _pipeline.prepare(x, axis, resolve(backend, like=x), allow_empty=comm is not None)
    if comm is None:
        mean, var = inp.backend.moments(inp.x3)
    else:
        from . import distributed
        mean, var = _pipeline.local_moments(inp)
        _, mean, var = distributed.merge_moments(comm, inp.count, inp.backend.to_host(mean),
                                                 inp.backend.to_host(var))
        mean, var = inp.backend.asarray(mean, "mean"), inp.backend.asarray(var, "var")
    dtype = _result_dtype(inp.array.dtype)
    backend = inp.backend
    return (backend.to_output(backend.astype(mean, dtype), x),
            backend.to_output(backend.astype(var, dtype), x))


def _residual_view(residual: ArrayLike | None, inp: _pipeline.Input) -> Any:
    return None if residual is None else _pipeline.prepare_like(residual, inp, "residual")


def batch_norm_forward(x: ArrayLike, gamma: ArrayLike | None = None,
                       beta: ArrayLike | None = None, eps: float = 1e-5, axis: int = 1,
                       backend: str | None = None, out: Any = None, *,
                       running_mean: Any = None, running_var: Any = None,
                       momentum: float = 0.1, residual: ArrayLike | None = None,
                       activation: str | None = None, comm: Any = None) -> tuple[Any, Any, Any]:
    """Training-mode forward with batch statistics, returning what the backward needs.

    Computes ``act(gamma * (x - mean) * invstd + beta + residual)``.

    Parameters
    ----------
    x : array (float16/32/64; integer and bool arrays are computed in float64)
        Shape (..., C, ...) with C along ``axis``.
    gamma, beta : arrays of shape (C,), or None for 1 and 0
    eps : float
        Added to the variance inside the square root.
    out : array like x, optional
        Where to write y (C-contiguous; may be x or the residual itself, not a partial overlap).
        Reusing one saves the page faults of a fresh output.
    running_mean, running_var : NumPy arrays of shape (C,), optional
        Updated in place in the same call, as CS231n's ``bn_param``:
        ``(1 - momentum) * running + momentum * batch`` (unbiased variance for running_var).
    momentum : float in [0, 1]
    residual : array like x, optional
        Added after the affine map, before the activation (a ResNet shortcut).
    activation : None or "relu"
    comm : mpi4py communicator, optional
        Normalize with the statistics of every rank's batch (see docs/distributed.md).

    Returns
    -------
    y : array like x (same shape and dtype); ``out`` when given
    mean, invstd : float64 arrays of shape (C,)
        Batch mean and ``1 / sqrt(var + eps)`` (biased variance).
    """
    eps = _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum, allow_none=False)
    relu = _checks.check_activation(activation)
    inp = _pipeline.prepare(x, axis, resolve(backend, like=x), allow_empty=comm is not None)
    C = inp.shape3[1]
    gamma = _checks.per_feature_input(gamma, C, "gamma")
    beta = _checks.per_feature_input(beta, C, "beta")
    running_mean = _checks.writable_per_feature(running_mean, C, "running_mean")
    running_var = _checks.writable_per_feature(running_var, C, "running_var")
    residual3 = _residual_view(residual, inp)
    out3 = _pipeline.output_view(out, inp, allowed_aliases=(("x", x), ("residual", residual)))
    y3, mean, invstd, _ = _pipeline.forward_train(inp, gamma, beta, eps, out3, running_mean,
                                                  running_var, momentum, residual3, relu, comm)
    to_output = inp.backend.to_output
    return (inp.restore(y3) if out is None else out), to_output(mean, x), to_output(invstd, x)


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, gamma: ArrayLike | None, mean: ArrayLike,
                        invstd: ArrayLike, axis: int = 1, backend: str | None = None,
                        batch_stats: bool = True, out: Any = None, *,
                        beta: ArrayLike | None = None, activation: str | None = None,
                        residual: bool = False, y: ArrayLike | None = None,
                        comm: Any = None) -> tuple[Any, ...]:
    """Gradients of batch normalization (and of a fused ReLU / residual add).

    Parameters
    ----------
    dy : array like x
        Gradient of the loss with respect to the forward's output.
    x : array
        The forward input.
    gamma : array of shape (C,) or None
    mean, invstd : arrays of shape (C,)
        As returned by :func:`batch_norm_forward` (or running statistics' mean and
        ``1/sqrt(running_var + eps)``, with ``batch_stats=False``).
    batch_stats : bool
        True when the forward normalized with the batch's own statistics (training), so the
        gradient flows through mean and variance; False for fixed (running) statistics.
    out : array like x, optional
        Where to write dx (C-contiguous; may be dy or x itself).
    beta : array of shape (C,) or None
        With ``activation="relu"`` and no residual: the forward's beta, from which the ReLU's
        mask is recomputed (no extra pass over memory).
    activation : None or "relu"
        The forward's activation.
    residual : bool
        True when the forward added a residual: its gradient is returned too.
    y : array like x, optional
        The forward's output. Needed with ``activation="relu"`` and ``residual=True`` (the mask
        depends on the residual, so it is read from y); optional otherwise.
    comm : mpi4py communicator, optional
        As in the forward: dx uses the whole batch's sums.

    Returns
    -------
    dx : array like x; ``out`` when given
    dgamma, dbeta : float64 arrays of shape (C,)
        This input's contributions (under MPI, their sum over ranks is the batch's gradient).
    dresidual : array like x, only when ``residual=True``
        The gradient of the residual: ``dy`` masked by the ReLU (``dy`` itself without one).
    """
    relu = _checks.check_activation(activation)
    for name, value in (("mean", mean), ("invstd", invstd)):
        if value is None:
            raise TypeError(f"{name} is required: pass the {name} returned by "
                            "batch_norm_forward (or the running statistics' with "
                            "batch_stats=False)")
    if relu and residual and y is None:
        raise ValueError("activation='relu' with residual=True needs y=, the forward's output: "
                         "the ReLU's mask depends on the residual")
    inp = _pipeline.prepare(x, axis, resolve(backend, like=x), allow_empty=comm is not None)
    C = inp.shape3[1]
    gamma = _checks.per_feature_input(gamma, C, "gamma")
    beta = _checks.per_feature_input(beta, C, "beta")
    mean = _checks.per_feature_input(mean, C, "mean")
    invstd = _checks.per_feature_input(invstd, C, "invstd")
    dy3 = _pipeline.prepare_like(dy, inp, "dy")
    y3 = None if y is None else _pipeline.prepare_like(y, inp, "y")
    out3 = _pipeline.output_view(out, inp, allowed_aliases=(("x", x), ("dy", dy)))
    dx3, dgamma, dbeta, dresidual3 = _pipeline.backward(
        inp, dy3, gamma, beta, mean, invstd, bool(batch_stats), inp.count, out3, relu, y3,
        want_dresidual=bool(residual), comm=comm)
    to_output = inp.backend.to_output
    dx = inp.restore(dx3) if out is None else out
    if not residual:
        return dx, to_output(dgamma, x), to_output(dbeta, x)
    dresidual = inp.restore(dresidual3 if dresidual3 is not None else dy3)
    return dx, to_output(dgamma, x), to_output(dbeta, x), dresidual


def batch_norm(x: ArrayLike, running_mean: Any, running_var: Any,
               gamma: ArrayLike | None = None, beta: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, axis: int = 1,
               backend: str | None = None, out: Any = None, *,
               residual: ArrayLike | None = None, activation: str | None = None,
               comm: Any = None) -> Any:
    """Batch normalization as ``torch.nn.functional.batch_norm``.

    In training mode normalizes with the batch statistics and updates ``running_mean`` and
    ``running_var`` in place (``(1 - momentum) * old + momentum * batch``, unbiased variance);
    in eval mode normalizes with the running statistics.

    Parameters
    ----------
    x : array, features along ``axis``
    running_mean, running_var : NumPy arrays of shape (C,) or None
        Required in eval mode; may be None in training mode. Updated in place, so lists are
        refused.
    gamma, beta : arrays of shape (C,) or None
    out : array like x, optional
        Where to write y (C-contiguous; may be x itself).
    residual, activation : as in :func:`batch_norm_forward`
    comm : mpi4py communicator, optional
        Training mode only: the statistics of every rank's batch. Eval communicates nothing.

    Returns
    -------
    y : array like x; ``out`` when given
    """
    eps = _checks.check_eps(eps)
    momentum = _checks.check_momentum(momentum, allow_none=False)
    relu = _checks.check_activation(activation)
    training = bool(training)
    inp = _pipeline.prepare(x, axis, resolve(backend, like=x),
                            allow_empty=training and comm is not None)
    C = inp.shape3[1]
    running_mean = _checks.writable_per_feature(running_mean, C, "running_mean")
    running_var = _checks.writable_per_feature(running_var, C, "running_var")
    gamma = _checks.per_feature_input(gamma, C, "gamma")
    beta = _checks.per_feature_input(beta, C, "beta")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode needs running_mean and running_var "
                         "(pass training=True to use batch statistics)")
    residual3 = _residual_view(residual, inp)
    out3 = _pipeline.output_view(out, inp, allowed_aliases=(("x", x), ("residual", residual)))
    if training:
        y3 = _pipeline.forward_train(inp, gamma, beta, eps, out3, running_mean, running_var,
                                     momentum, residual3, relu, comm)[0]
    else:
        y3 = _pipeline.normalize(inp, running_mean, running_var, gamma, beta, eps, out3,
                                 residual3, relu)[0]
    return inp.restore(y3) if out is None else out
