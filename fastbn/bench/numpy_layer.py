"""The CS231n-style NumPy batch-norm layer: the baseline of the layer section.

This is the layer NumPy users write themselves (CS231n assignment 2): ``batchnorm_forward`` with
a ``bn_param`` dict holding the mode and the running statistics, a ``cache`` tuple for the
backward, and ``batchnorm_backward_alt``, the simplified closed-form gradient. The spatial
variants move the channels last and reuse the 2-D functions, as the assignment does. Written
plainly on purpose: it is what fastbn has to beat, not a tuned implementation.

Note the course's running-average convention: ``running = momentum * running + (1 - momentum) *
batch`` with momentum 0.9 (PyTorch's 0.1), and the biased batch variance in the running
statistics (PyTorch keeps the unbiased one).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Cache = tuple[Any, ...]


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      bn_param: dict[str, Any]) -> tuple[np.ndarray, Cache | None]:
    """Batch norm of ``x`` of shape (N, D) over N; returns ``(out, cache)``.

    ``bn_param``: ``mode`` ("train" or "test"), ``eps``, ``momentum``, and ``running_mean`` /
    ``running_var`` of shape (D,), created on the first call and updated in train mode.
    """
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    D = x.shape[1]
    running_mean = bn_param.get("running_mean", np.zeros(D, dtype=x.dtype))
    running_var = bn_param.get("running_var", np.zeros(D, dtype=x.dtype))
    cache = None
    if mode == "train":
        sample_mean = x.mean(axis=0)
        sample_var = x.var(axis=0)
        std = np.sqrt(sample_var + eps)
        x_hat = (x - sample_mean) / std
        out = gamma * x_hat + beta
        cache = (x_hat, gamma, std)
        running_mean = momentum * running_mean + (1 - momentum) * sample_mean
        running_var = momentum * running_var + (1 - momentum) * sample_var
    elif mode == "test":
        out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
    else:
        raise ValueError(f"invalid forward batchnorm mode {mode!r}")
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def batchnorm_backward_alt(dout: np.ndarray, cache: Cache
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`batchnorm_forward` in train mode, from the
    simplified expression ``dx = gamma / std * (dout - mean(dout) - x_hat * mean(dout*x_hat))``."""
    x_hat, gamma, std = cache
    N = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx = (gamma / (N * std)) * (N * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def _to_rows(x: np.ndarray) -> np.ndarray:
    N, C, H, W = x.shape
    return x.transpose(0, 2, 3, 1).reshape(-1, C)


def _from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    N, C, H, W = shape
    return rows.reshape(N, H, W, C).transpose(0, 3, 1, 2)


def spatial_batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                              bn_param: dict[str, Any]) -> tuple[np.ndarray, Cache | None]:
    """Batch norm of NCHW ``x`` over N, H, W: channels moved last, then the 2-D layer."""
    out, cache = batchnorm_forward(_to_rows(x), gamma, beta, bn_param)
    return _from_rows(out, x.shape), cache


def spatial_batchnorm_backward(dout: np.ndarray, cache: Cache
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`spatial_batchnorm_forward` (via :func:`batchnorm_backward_alt`)."""
    dx, dgamma, dbeta = batchnorm_backward_alt(_to_rows(dout), cache)
    return _from_rows(dx, dout.shape), dgamma, dbeta


def layer_functions(ndim: int):
    """The (forward, backward) pair for inputs of ``ndim`` dimensions (2: (N, D); 4: NCHW)."""
    if ndim == 2:
        return batchnorm_forward, batchnorm_backward_alt
    if ndim == 4:
        return spatial_batchnorm_forward, spatial_batchnorm_backward
    raise ValueError(f"the CS231n layer takes 2-D or 4-D input, got {ndim}-D")
