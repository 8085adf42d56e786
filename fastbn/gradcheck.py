"""Finite-difference checks of batch-norm gradients (dx, dgamma, dbeta).

The loss is ``L = sum(y * dy)`` for a fixed upstream gradient ``dy``, so ``dL/dy = dy`` and the
analytic gradients from one backward call are exactly what central differences of ``L`` estimate.
Everything runs in float64. The default step, 1e-5, balances the relative truncation error of a
central difference (about (step / std(x))**2 for batch norm, whose derivatives scale with 1/std)
against rounding (about 1e-16 * |L| / step); on inputs whose per-feature spread is of order 1 the
worst relative errors of correct gradients are about 1e-7, and a wrong term gives errors of order
1. Inputs with a much smaller spread need a proportionally smaller step.

scipy.optimize.check_grad / approx_fprime use one-sided differences on a flat vector of
parameters, which costs accuracy and would copy the parameters on every call, so the loop here
perturbs each value in place and puts it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .functional import batch_norm, batch_norm_backward, batch_norm_forward
from .layers import BatchNorm

DEFAULT_STEP = 1e-5
DEFAULT_TOLERANCE = 1e-5
#: An element's error is measured against max(|analytic|, |numeric|, FLOOR * tensor scale):
#: gradient entries that are essentially zero are judged against the tensor's own size, not
#: against rounding noise, which would make any relative measure meaningless there.
RELATIVE_FLOOR = 1e-3
#: Seed of the default upstream gradient. Deliberately not 0: an input drawn with
#: default_rng(0).standard_normal makes dy proportional to x_hat, where dx is ~0 and the check
#: would compare rounding noise.
DEFAULT_SEED = 20_241_123


@dataclass(frozen=True)
class GradcheckResult:
    """Outcome of a gradient check.

    Attributes
    ----------
    errors : dict of str to float
        Worst relative error per checked tensor (keys among ``"x"``, ``"gamma"``, ``"beta"``).
    worst_index : dict of str to tuple of int
        Where in each tensor the worst error occurs.
    tolerance : float
        The bound every error must stay below for :attr:`passed`.
    analytic, numeric : dict of str to float64 ndarray
        The gradients that were compared, for inspection.
    """

    errors: dict[str, float]
    worst_index: dict[str, tuple[int, ...]]
    tolerance: float
    analytic: dict[str, np.ndarray] = field(repr=False)
    numeric: dict[str, np.ndarray] = field(repr=False)

    @property
    def passed(self) -> bool:
        """True when every tensor's worst relative error is at most ``tolerance``."""
        return all(err <= self.tolerance for err in self.errors.values())

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        lines = [f"gradcheck {'passed' if self.passed else 'FAILED'} "
                 f"(tolerance {self.tolerance:.1e})"]
        for name, err in self.errors.items():
            lines.append(f"  d{name:<6} worst relative error {err:.2e} at {self.worst_index[name]}")
        return "\n".join(lines)


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """Worst elementwise relative error and its index.

    ``|a - n| / max(|a|, |n|, RELATIVE_FLOOR * max(|n|))``; 0 when both are exactly zero.
    """
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise ValueError(f"analytic gradient has shape {analytic.shape}, numeric {numeric.shape}")
    scale = RELATIVE_FLOOR * float(np.max(np.abs(numeric), initial=0.0))
    denominator = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), scale)
    diff = np.abs(analytic - numeric)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(denominator > 0, diff / np.where(denominator > 0, denominator, 1.0), 0.0)
    # a NaN or Inf gradient must fail, not pass
    rel = np.where(np.isfinite(analytic) & np.isfinite(numeric) & np.isfinite(rel), rel, np.inf)
    if rel.size == 0:
        return 0.0, ()
    worst = np.unravel_index(int(np.argmax(rel)), rel.shape)
    return float(rel[worst]), tuple(int(i) for i in worst)


def central_differences(loss: Callable[[], float], values: np.ndarray, step: float) -> np.ndarray:
    """dL/dvalues by central differences, perturbing ``values`` (float64) in place.

    Every perturbed element is restored to its exact original value before the next one.
    """
    grad = np.empty_like(values, dtype=np.float64)
    flat_values = values.reshape(-1)  # a view: values must be contiguous
    flat_grad = grad.reshape(-1)
    for i in range(flat_values.size):
        original = flat_values[i]
        try:
            flat_values[i] = original + step
            plus = loss()
            flat_values[i] = original - step
            minus = loss()
        finally:
            flat_values[i] = original
        flat_grad[i] = (plus - minus) / (2.0 * step)
    return grad


def _host(a: Any) -> np.ndarray:
    if hasattr(a, "copy_to_host"):
        return np.asarray(a.copy_to_host(), dtype=np.float64)
    return np.asarray(a, dtype=np.float64)


def _upstream(dy: Any, shape: tuple[int, ...], seed: int) -> np.ndarray:
    if dy is None:
        return np.random.default_rng(seed).standard_normal(shape)
    dy = np.array(_host(dy), dtype=np.float64)
    if dy.shape != shape:
        raise ValueError(f"dy has shape {dy.shape} but the output has shape {shape}")
    return dy


def _compare(analytic: dict[str, np.ndarray], numeric: dict[str, np.ndarray],
             tolerance: float) -> GradcheckResult:
    errors, where = {}, {}
    for name in numeric:
        errors[name], where[name] = relative_error(analytic[name], numeric[name])
    return GradcheckResult(errors, where, float(tolerance), analytic, numeric)


def gradcheck(layer: BatchNorm, x: Any, dy: Any = None, *, residual: Any = None,
              step: float = DEFAULT_STEP, tolerance: float = DEFAULT_TOLERANCE,
              seed: int = DEFAULT_SEED) -> GradcheckResult:
    """Compare a layer's backward with central finite differences, in float64.

    The check runs the layer itself (its backend, mode, axis and any overridden methods), with
    its parameters temporarily replaced by float64 copies. Afterwards the layer is as it was:
    parameters, gradients, running statistics, ``num_batches_tracked`` and the saved forward
    input are all restored, even if the check raises.

    Parameters
    ----------
    layer : BatchNorm (or a subclass)
        In training mode the gradient flows through the batch statistics; in eval mode (with
        running statistics) it does not. Both are checked as they are.
    x : array of float32 or float64, a valid input for ``layer``
        Converted to float64.
    dy : array of x's shape, or None
        Upstream gradient; None draws a standard normal one from ``seed``.
    residual : array of x's shape, or None
        Passed to ``layer.forward`` (a fused residual add); its gradient is checked too.
    step : float
        Central-difference step for every perturbed value.
    tolerance : float
        Largest worst-case relative error (see :func:`relative_error`) that passes.

    Returns
    -------
    GradcheckResult
        Errors for ``"x"``, with ``affine=True`` for ``"gamma"`` and ``"beta"``, and with a
        residual for ``"residual"``.
        ``2 * (x.size + 2 * C)`` forward passes are run, so keep ``x`` small.
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer must be a fastbn BatchNorm layer, got {type(layer).__name__}")
    x64 = np.ascontiguousarray(_host(x), dtype=np.float64).copy()
    r64 = None if residual is None else np.ascontiguousarray(_host(residual),
                                                             dtype=np.float64).copy()
    inputs = (x64,) if r64 is None else (x64, r64)
    attributes = ("gamma", "beta", "dgamma", "dbeta")
    saved_attributes = {name: getattr(layer, name) for name in attributes}
    saved_state = layer.state_dict()
    saved_forward = layer._saved
    params: dict[str, np.ndarray] = {}
    if layer.affine:
        params = {"gamma": np.ascontiguousarray(_host(layer.gamma)).copy(),
                  "beta": np.ascontiguousarray(_host(layer.beta)).copy()}
    try:
        def install() -> None:
            # On host backends _store returns the array itself, so in-place perturbations are
            # seen directly; a device backend gets a fresh upload of the perturbed values.
            for name, values in params.items():
                setattr(layer, name, layer._store(values))

        for name in ("dgamma", "dbeta") if layer.affine else ():
            setattr(layer, name, layer._store(np.zeros(layer.num_features)))
        install()
        y = _host(layer.forward(*inputs))
        upstream = _upstream(dy, y.shape, seed)
        gradients = layer.backward(upstream)
        if r64 is None:
            analytic = {"x": _host(gradients)}
        else:
            analytic = {"x": _host(gradients[0]), "residual": _host(gradients[1])}
        if layer.affine:
            analytic["gamma"] = _host(layer.dgamma)
            analytic["beta"] = _host(layer.dbeta)

        host_params = all(isinstance(getattr(layer, n), np.ndarray) for n in params)

        def loss() -> float:
            if not host_params:
                install()
            return float(np.sum(_host(layer.forward(*inputs)) * upstream))

        numeric = {"x": central_differences(loss, x64, step)}
        if r64 is not None:
            numeric["residual"] = central_differences(loss, r64, step)
        for name, values in params.items():
            numeric[name] = central_differences(loss, values, step)
    finally:
        for name, value in saved_attributes.items():
            setattr(layer, name, value)
        layer.load_state_dict(saved_state)
        layer._saved = saved_forward
    return _compare(analytic, numeric, tolerance)


def gradcheck_functional(x: Any, gamma: Any = None, beta: Any = None, dy: Any = None, *,
                         eps: float = 1e-5, axis: int = 1, backend: str | None = None,
                         running_mean: Any = None, running_var: Any = None,
                         step: float = DEFAULT_STEP, tolerance: float = DEFAULT_TOLERANCE,
                         seed: int = DEFAULT_SEED) -> GradcheckResult:
    """Check :func:`fastbn.batch_norm_backward` against central differences, in float64.

    Without running statistics the forward is :func:`fastbn.batch_norm_forward` (batch
    statistics, ``batch_stats=True``); with ``running_mean`` and ``running_var`` it is
    :func:`fastbn.batch_norm` in eval mode and the backward gets ``batch_stats=False``.

    Parameters
    ----------
    x : array of float32 or float64, features along ``axis``
    gamma, beta : arrays of shape (C,) or None
        None means 1 and 0, and that tensor is not checked.
    dy : array of x's shape, or None (standard normal from ``seed``)
    running_mean, running_var : arrays of shape (C,), both or neither

    Returns
    -------
    GradcheckResult
        Errors for ``"x"`` and each of ``"gamma"``, ``"beta"`` that was given.
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    x64 = np.ascontiguousarray(_host(x), dtype=np.float64).copy()
    params = {name: np.ascontiguousarray(_host(v)).copy()
              for name, v in (("gamma", gamma), ("beta", beta)) if v is not None}
    g = params.get("gamma")
    b = params.get("beta")
    eval_mode = running_mean is not None
    if eval_mode:
        rm = _host(running_mean).copy()
        rv = _host(running_var).copy()

        def forward() -> tuple[Any, Any, Any]:
            y = batch_norm(x64, rm, rv, g, b, training=False, eps=eps, axis=axis,
                           backend=backend)
            return y, rm, 1.0 / np.sqrt(rv + eps)
    else:
        def forward() -> tuple[Any, Any, Any]:
            return batch_norm_forward(x64, g, b, eps=eps, axis=axis, backend=backend)

    y, mean, invstd = forward()
    upstream = _upstream(dy, _host(y).shape, seed)
    dx, dgamma, dbeta = batch_norm_backward(upstream, x64, g, mean, invstd, axis=axis,
                                            backend=backend, batch_stats=not eval_mode)
    analytic = {"x": _host(dx), "gamma": _host(dgamma), "beta": _host(dbeta)}

    def loss() -> float:
        return float(np.sum(_host(forward()[0]) * upstream))

    numeric = {"x": central_differences(loss, x64, step)}
    for name, values in params.items():
        numeric[name] = central_differences(loss, values, step)
    return _compare({k: analytic[k] for k in numeric}, numeric, tolerance)
