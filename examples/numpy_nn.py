"""Small NumPy building blocks for the training example, in the course convention.

Every layer has ``forward(x)``, ``backward(dout) -> dx``, ``params`` / ``grads`` dicts of arrays
(updated in place by the optimizers) and ``train()`` / ``eval()``, which is also the interface of
``fastbn.BatchNorm1d``, so fastbn layers drop in between these ones unchanged.

Shapes: activations are ``(N, D)`` with the batch on axis 0; a linear layer computes
``x @ W + b`` with ``W`` of shape ``(D_in, D_out)``.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import numpy as np
from scipy.special import logsumexp, softmax


class Layer(Protocol):
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]

    def forward(self, x: np.ndarray) -> np.ndarray: ...
    def backward(self, dout: np.ndarray) -> np.ndarray: ...
    def train(self, mode: bool = True) -> Any: ...


class Linear:
    """``y = x @ W + b`` with He-normal initial weights (suited to a following ReLU).

    Parameters
    ----------
    bias : bool
        False drops ``b``: before batch norm it is cancelled by the mean subtraction.
    """

    def __init__(self, d_in: int, d_out: int, rng: np.random.Generator, bias: bool = True,
                 dtype: Any = np.float32) -> None:
        W = rng.standard_normal((d_in, d_out)) * np.sqrt(2.0 / d_in)
        self.params = {"W": W.astype(dtype)}
        self.grads = {"W": np.zeros_like(self.params["W"])}
        if bias:
            self.params["b"] = np.zeros(d_out, dtype)
            self.grads["b"] = np.zeros(d_out, dtype)
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        y = x @ self.params["W"]
        if "b" in self.params:
            y += self.params["b"]
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.grads["W"][...] = self._x.T @ dout
        if "b" in self.params:
            self.grads["b"][...] = dout.sum(axis=0)
        return dout @ self.params["W"].T

    def train(self, mode: bool = True) -> "Linear":
        return self


class ReLU:
    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return x * self._mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * self._mask

    def train(self, mode: bool = True) -> "ReLU":
        return self


class Sequential:
    """Layers applied in order; ``backward`` runs them in reverse."""

    def __init__(self, layers: Iterable[Layer]) -> None:
        self.layers = list(layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def train(self, mode: bool = True) -> "Sequential":
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(parameter, gradient) pairs of every layer, the arrays themselves."""
        return [(layer.params[name], layer.grads[name])
                for layer in self.layers for name in layer.params]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of integer ``labels`` (N,) under ``softmax(logits)`` (N, K), and its
    gradient with respect to the logits, ``softmax(logits) - onehot(labels)``. SciPy's
    ``logsumexp`` and ``softmax`` shift by the row maximum, so exp cannot overflow."""
    log_probs = logits - logsumexp(logits, axis=1, keepdims=True)
    n = logits.shape[0]
    loss = -float(log_probs[np.arange(n), labels].mean())
    dlogits = softmax(logits, axis=1)
    dlogits[np.arange(n), labels] -= 1.0
    return loss, (dlogits / n).astype(logits.dtype, copy=False)


class SGDMomentum:
    """``v = mu * v - lr * g; p += v`` (the course's momentum update)."""

    def __init__(self, parameters: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 momentum: float = 0.9) -> None:
        self.parameters = parameters
        self.lr = lr
        self.momentum = momentum
        self.velocity = [np.zeros_like(p) for p, _ in parameters]

    def step(self) -> None:
        for (param, grad), v in zip(self.parameters, self.velocity):
            v *= self.momentum
            v -= self.lr * grad
            param += v


class Adam:
    """Adam (Kingma & Ba) with bias correction."""

    def __init__(self, parameters: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.parameters = parameters
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p, _ in parameters]
        self.v = [np.zeros_like(p) for p, _ in parameters]
        self.t = 0

    def step(self) -> None:
        self.t += 1
        correction1 = 1.0 - self.beta1 ** self.t
        correction2 = 1.0 - self.beta2 ** self.t
        for (param, grad), m, v in zip(self.parameters, self.m, self.v):
            m *= self.beta1
            m += (1.0 - self.beta1) * grad
            v *= self.beta2
            v += (1.0 - self.beta2) * grad * grad
            param -= (self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)
                      ).astype(param.dtype, copy=False)
