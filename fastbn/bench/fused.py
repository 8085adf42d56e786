"""The fused section's registry: batch norm + ReLU (+ residual add), issue 13.

``{operation: {implementation: setup}}`` as in :mod:`fastbn.bench.registry`, cpu backend:

* ``bn-relu-step`` / ``bn-add-relu-step``: a training forward ``relu(bn(x) [+ z])`` and its
  backward (dx, dgamma, dbeta [, dz]);
* ``bn-relu-eval`` / ``bn-add-relu-eval``: the eval forward.

Implementations: ``fused`` (fastbn's ``activation="relu"`` / ``residual=`` passes), ``unfused``
(fastbn batch norm, then the NumPy ReLU, add and mask a NumPy training loop writes) and
``torch`` (``relu(bn(x) [+ z])`` with autograd). The roofline counts the fused passes
(:data:`fastbn.bench.roofline.FUSED_STREAMS`).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

import fastbn

from .cases import EPS, CASES, Case, Inputs
from .registry import Setup, torch_tensors, torch_threads, torch_unavailable

OPERATIONS: tuple[str, ...] = ("bn-relu-step", "bn-relu-eval", "bn-add-relu-step",
                               "bn-add-relu-eval")
IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "fused": ("fastbn fused", "fastbn batch_norm_forward/backward/batch_norm with "
                              "activation='relu' (and residual=), backend 'cpu'"),
    "unfused": ("fastbn + NumPy", "fastbn batch norm (backend 'cpu'), then np.maximum, + z "
                                  "and dy * (y > 0) in NumPy"),
    "torch": ("PyTorch", "relu(F.batch_norm(x) [+ z]) with autograd, Numba's thread count"),
}
CANDIDATE = "fused"
DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
DEFAULT_CASES: tuple[Case, ...] = (CASES["nchw-256x64x56x56"], CASES["nhwc-256x56x56x64"],
                                   CASES["nchw-64x256x14x14"])


def fused_api_missing() -> str | None:
    """Why fastbn cannot run the fused passes yet (None once issue 13's API is there)."""
    wanted = {"batch_norm_forward": {"residual", "activation"},
              "batch_norm": {"residual", "activation"},
              "batch_norm_backward": {"residual", "activation"}}
    for function, names in wanted.items():
        missing = names - set(inspect.signature(getattr(fastbn, function)).parameters)
        if missing:
            return (f"fastbn.{function} has no {', '.join(sorted(missing))} argument "
                    "(the fused API of issue 13 is not in this fastbn)")
    return None


def unavailable_reason(implementation: str) -> str | None:
    if implementation == "torch":
        return torch_unavailable("cpu")
    return fused_api_missing() if implementation == "fused" else None


def _with_residual(operation: str) -> bool:
    return operation.startswith("bn-add-relu")


# ----------------------------------------------------------------------------- fused
def _fused_step(residual: bool):
    def setup(inputs: Inputs):
        a, axis = inputs, inputs.case.axis
        z = inputs.residual if residual else None

        def body():
            y, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, eps=EPS,
                                                        axis=axis, residual=z,
                                                        activation="relu", backend="cpu")
            # the ReLU mask: recomputed from beta, or read from y when a residual was added
            mask_source = {"y": y} if residual else {"beta": a.beta}
            grads = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, mean, invstd, axis=axis,
                                               activation="relu", residual=residual,
                                               backend="cpu", **mask_source)
            return (y, *grads)
        return body
    return setup


def _fused_eval(residual: bool):
    def setup(inputs: Inputs):
        a = inputs
        z = inputs.residual if residual else None
        return lambda: (fastbn.batch_norm(a.x, a.running_mean, a.running_var, a.gamma, a.beta,
                                          training=False, eps=EPS, axis=a.case.axis,
                                          residual=z, activation="relu", backend="cpu"),)
    return setup


# ----------------------------------------------------------------------------- unfused
def _unfused_step(residual: bool):
    def setup(inputs: Inputs):
        a, axis = inputs, inputs.case.axis
        z = inputs.residual if residual else None

        def body():
            y, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, eps=EPS,
                                                        axis=axis, backend="cpu")
            if z is not None:
                y = y + z
            out = np.maximum(y, 0)
            grad = a.dy * (out > 0)
            grads = fastbn.batch_norm_backward(grad, a.x, a.gamma, mean, invstd, axis=axis,
                                               backend="cpu")
            return (out, *grads, grad) if z is not None else (out, *grads)
        return body
    return setup


def _unfused_eval(residual: bool):
    def setup(inputs: Inputs):
        a = inputs
        z = inputs.residual if residual else None

        def body():
            y = fastbn.batch_norm(a.x, a.running_mean, a.running_var, a.gamma, a.beta,
                                  training=False, eps=EPS, axis=a.case.axis, backend="cpu")
            return (np.maximum(y + z if z is not None else y, 0),)
        return body
    return setup


# ----------------------------------------------------------------------------- torch
def _torch_inputs(inputs: Inputs, residual: bool) -> tuple[dict[str, Any], Any]:
    """The tensors (feature axis at dim 1) and the residual tensor, or None."""
    import torch
    torch.set_num_threads(torch_threads())
    z = (torch.movedim(torch.from_numpy(inputs.residual), inputs.case.axis, 1) if residual
         else None)
    return torch_tensors(inputs, "cpu"), z


def _torch_step(residual: bool):
    def setup(inputs: Inputs):
        import torch
        import torch.nn.functional as F
        t, z = _torch_inputs(inputs, residual)
        x = t["x"].detach().requires_grad_(True)
        gamma = t["gamma"].detach().clone().requires_grad_(True)
        beta = t["beta"].detach().clone().requires_grad_(True)
        z = None if z is None else z.requires_grad_(True)
        wanted = (x, gamma, beta, z) if residual else (x, gamma, beta)

        def body():
            y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)
            out = F.relu(y + z if z is not None else y)
            grads = torch.autograd.grad(out, wanted, t["dy"])
            axis = inputs.case.axis
            moved = [torch.movedim(g, 1, axis) if g.dim() > 1 else g for g in grads]
            return (torch.movedim(out, 1, axis), *moved)
        return body
    return setup


def _torch_eval(residual: bool):
    def setup(inputs: Inputs):
        import torch
        import torch.nn.functional as F
        t, z = _torch_inputs(inputs, residual)

        def body():
            with torch.no_grad():
                y = F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["gamma"],
                                 t["beta"], training=False, eps=EPS)
                out = F.relu(y + z if z is not None else y)
            return (torch.movedim(out, 1, inputs.case.axis),)
        return body
    return setup


_MAKERS: dict[str, dict[str, Any]] = {
    "fused": {"step": _fused_step, "eval": _fused_eval},
    "unfused": {"step": _unfused_step, "eval": _unfused_eval},
    "torch": {"step": _torch_step, "eval": _torch_eval},
}
REGISTRY: dict[str, dict[str, Setup]] = {
    op: {impl: makers[op.rsplit("-", 1)[1]](_with_residual(op))
         for impl, makers in _MAKERS.items()}
    for op in OPERATIONS}
