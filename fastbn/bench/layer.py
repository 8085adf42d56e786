"""The layer section's registry: small training batches through the layer API (issue 9).

``{operation: {implementation: setup}}`` as in :mod:`fastbn.bench.registry`, over
:data:`~fastbn.bench.cases.LAYER_CASES`, cpu backend:

* ``train-step``: one training forward and its backward (dx, dgamma, dbeta) through
  ``fastbn.BatchNorm1d/2d``, PyTorch's ``nn.BatchNorm1d/2d`` with autograd (``x`` requires
  grad, as inside a network), and the CS231n-style NumPy layer of
  :mod:`fastbn.bench.numpy_layer`;
* ``eval-forward``: the layers in eval mode (PyTorch under ``torch.no_grad()``);
* ``functional-eval``: ``fastbn.batch_norm(..., training=False)`` against ``F.batch_norm``.

Each body returns its outputs so the smoke test can check that all implementations agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fastbn

from .cases import EPS, MOMENTUM, Inputs
from .numpy_layer import layer_functions
from .registry import Setup, torch_threads, torch_unavailable

OPERATIONS: tuple[str, ...] = ("train-step", "eval-forward", "functional-eval")
# implementation -> (label, description)
IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "fastbn": ("fastbn", "fastbn.BatchNorm1d/2d (backend 'cpu'); fastbn.batch_norm for "
                         "functional-eval"),
    "torch": ("PyTorch", "torch.nn.BatchNorm1d/2d with autograd, Numba's thread count "
                         "(eval under torch.no_grad()); F.batch_norm for functional-eval"),
    "numpy-layer": ("NumPy layer", "CS231n-style batchnorm_forward + batchnorm_backward_alt "
                                   "(fastbn/bench/numpy_layer.py)"),
}
CANDIDATE = "fastbn"


def unavailable_reason(implementation: str) -> str | None:
    return torch_unavailable("cpu") if implementation == "torch" else None


# ----------------------------------------------------------------------------- fastbn
def _fastbn_layer(inputs: Inputs, training: bool) -> Any:
    layer_class = fastbn.BatchNorm1d if inputs.x.ndim == 2 else fastbn.BatchNorm2d
    bn = layer_class(inputs.case.num_features, eps=EPS, momentum=MOMENTUM,
                     dtype=inputs.gamma.dtype, backend="cpu")
    bn.params["gamma"][...] = inputs.gamma
    bn.params["beta"][...] = inputs.beta
    bn.running_mean[...] = inputs.running_mean
    bn.running_var[...] = inputs.running_var
    return bn.train(training)


def _fastbn_train_step(inputs: Inputs):
    bn = _fastbn_layer(inputs, training=True)
    x, dy = inputs.x, inputs.dy

    def body():
        y = bn.forward(x)
        dx = bn.backward(dy)
        return y, dx, bn.grads["gamma"], bn.grads["beta"]
    return body


def _fastbn_eval(inputs: Inputs):
    bn = _fastbn_layer(inputs, training=False)
    x = inputs.x
    return lambda: (bn.forward(x),)


def _fastbn_functional_eval(inputs: Inputs):
    a = inputs

    def body():
        return (fastbn.batch_norm(a.x, a.running_mean, a.running_var, a.gamma, a.beta,
                                  training=False, eps=EPS, axis=1, backend="cpu"),)
    return body


# ----------------------------------------------------------------------------- torch
def _torch_layer(inputs: Inputs, training: bool) -> Any:
    import torch
    torch.set_num_threads(torch_threads())
    layer_class = torch.nn.BatchNorm1d if inputs.x.ndim == 2 else torch.nn.BatchNorm2d
    bn = layer_class(inputs.case.num_features, eps=EPS, momentum=MOMENTUM,
                     dtype=getattr(torch, inputs.gamma.dtype.name))
    with torch.no_grad():
        for tensor, value in ((bn.weight, inputs.gamma), (bn.bias, inputs.beta),
                              (bn.running_mean, inputs.running_mean),
                              (bn.running_var, inputs.running_var)):
            tensor.copy_(torch.from_numpy(value))
    return bn.train(training)


def _torch_train_step(inputs: Inputs):
    import torch
    bn = _torch_layer(inputs, training=True)
    x = torch.from_numpy(inputs.x).requires_grad_(True)
    dy = torch.from_numpy(inputs.dy)
    wanted = (x, bn.weight, bn.bias)

    def body():
        y = bn(x)
        return (y, *torch.autograd.grad(y, wanted, dy))
    return body


def _torch_eval(inputs: Inputs):
    import torch
    bn = _torch_layer(inputs, training=False)
    x = torch.from_numpy(inputs.x)

    def body():
        with torch.no_grad():
            return (bn(x),)
    return body


def _torch_functional_eval(inputs: Inputs):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(torch_threads())
    t = {name: torch.from_numpy(getattr(inputs, name))
         for name in ("x", "gamma", "beta", "running_mean", "running_var")}

    def body():
        return (F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["gamma"],
                             t["beta"], training=False, eps=EPS),)
    return body


# ----------------------------------------------------------------------------- NumPy layer
def _bn_param(inputs: Inputs, mode: str) -> dict[str, Any]:
    return {"mode": mode, "eps": EPS, "momentum": 1.0 - MOMENTUM,
            "running_mean": inputs.running_mean.copy(), "running_var": inputs.running_var.copy()}


def _numpy_train_step(inputs: Inputs):
    forward, backward = layer_functions(inputs.x.ndim)
    bn_param = _bn_param(inputs, "train")
    x, dy, gamma, beta = inputs.x, inputs.dy, inputs.gamma, inputs.beta

    def body():
        y, cache = forward(x, gamma, beta, bn_param)
        return (y, *backward(dy, cache))
    return body


def _numpy_eval(inputs: Inputs):
    forward, _ = layer_functions(inputs.x.ndim)
    bn_param = _bn_param(inputs, "test")
    x, gamma, beta = inputs.x, inputs.gamma, inputs.beta
    return lambda: (forward(x, gamma, beta, bn_param)[0],)


def _numpy_functional_eval(inputs: Inputs):
    # The course's eval is its layer's test mode, broadcast over the feature axis 1.
    shape = [1] * inputs.x.ndim
    shape[1] = inputs.case.num_features
    mean, var = inputs.running_mean.reshape(shape), inputs.running_var.reshape(shape)
    gamma, beta = inputs.gamma.reshape(shape), inputs.beta.reshape(shape)
    x = inputs.x
    return lambda: (gamma * (x - mean) / np.sqrt(var + EPS) + beta,)


REGISTRY: dict[str, dict[str, Setup]] = {
    "train-step": {"fastbn": _fastbn_train_step, "torch": _torch_train_step,
                   "numpy-layer": _numpy_train_step},
    "eval-forward": {"fastbn": _fastbn_eval, "torch": _torch_eval, "numpy-layer": _numpy_eval},
    "functional-eval": {"fastbn": _fastbn_functional_eval, "torch": _torch_functional_eval,
                        "numpy-layer": _numpy_functional_eval},
}
