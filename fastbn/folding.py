"""Fold an inference-mode batch-norm layer into the linear or convolution layer before it.

In eval mode batch norm is a fixed per-feature affine map,
``bn(z) = gamma * (z - running_mean) / sqrt(running_var + eps) + beta = scale * z + shift``,
so a linear layer followed by it is again one linear layer: every output feature's weights are
multiplied by ``scale`` and its bias becomes ``scale * (b - running_mean) + beta``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _checks
from .layers import BatchNorm


def bn_scale_shift(bn: BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """The eval-mode affine map of ``bn`` as float64 ``(scale, shift)`` of shape (C,).

    Raises
    ------
    TypeError
        ``bn`` is not a fastbn BatchNorm layer.
    ValueError
        ``bn`` has ``track_running_stats=False``: it always normalizes with the statistics of
        the batch it is given, which no fixed weights can reproduce.
    """
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a fastbn BatchNorm layer, got {type(bn).__name__}")
    if not bn.track_running_stats:
        raise ValueError("cannot fold a BatchNorm with track_running_stats=False: it normalizes "
                         "with each batch's own statistics even in eval mode, so it is not a "
                         "fixed affine map")
    state = bn.state_dict()  # host copies, whatever the backend
    invstd = 1.0 / np.sqrt(state["running_var"].astype(np.float64) + bn.eps)
    gamma = state["weight"].astype(np.float64) if bn.affine else 1.0
    beta = state["bias"].astype(np.float64) if bn.affine else 0.0
    scale = gamma * invstd
    shift = beta - state["running_mean"].astype(np.float64) * scale
    return np.broadcast_to(scale, (bn.num_features,)).copy(), \
        np.broadcast_to(shift, (bn.num_features,)).copy()


def _fold(W: Any, b: Any, bn: BatchNorm, out_axis: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    W = _checks.host_input_array(W, "W")
    if W.ndim < 2:
        raise ValueError(f"W must have at least 2 dimensions, got shape {W.shape}")
    out_axis = _checks.normalize_axis(out_axis, W.ndim)
    out_features = W.shape[out_axis]
    scale, shift = bn_scale_shift(bn)
    if out_features != bn.num_features:
        raise ValueError(f"{what} has {out_features} output features (W.shape[{out_axis}] of "
                         f"{W.shape}) but bn has num_features={bn.num_features}")
    if b is None:
        b64 = np.zeros(out_features)
        dtype = W.dtype
    else:
        b = _checks.host_input_array(b, "b")
        if b.shape != (out_features,):
            raise ValueError(f"b must have shape ({out_features},), got {b.shape}")
        b64 = b.astype(np.float64)
        dtype = np.result_type(W.dtype, b.dtype)
    broadcast = [1] * W.ndim
    broadcast[out_axis] = out_features
    W_folded = (W.astype(np.float64) * scale.reshape(broadcast)).astype(dtype)
    b_folded = (scale * b64 + shift).astype(dtype)
    return W_folded, b_folded


def _output_axis(shape: tuple[int, ...], candidates: tuple[int, ...], bn: BatchNorm,
                 what: str, keyword: str) -> int:
    """The one axis among ``candidates`` with ``bn.num_features`` entries, or a clear error."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a fastbn BatchNorm layer, got {type(bn).__name__}")
    num_features = bn.num_features
    matching = sorted({a % len(shape) for a in candidates if shape[a] == num_features})
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise ValueError(f"{what} weight of shape {shape} has no axis of {num_features} output "
                         f"features (axes {list(candidates)}) to match bn.num_features")
    raise ValueError(f"{what} weight of shape {shape} has {num_features} entries along axes "
                     f"{matching}, so its layout is ambiguous: pass {keyword}")


def fold_linear(W: Any, b: Any, bn: BatchNorm,
                layout: Literal["in_out", "out_in"] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one linear layer equal to ``bn(linear(x))`` with ``bn`` in eval mode.

    Parameters
    ----------
    W : array of shape (in_features, out_features) or (out_features, in_features)
        ``"in_out"`` is the CS231n convention ``y = x @ W + b``; ``"out_in"`` is PyTorch's
        ``nn.Linear`` and the column-major course convention ``Z = W @ X + b``. The layout is
        found from which axis has ``bn.num_features`` entries.
    b : array of shape (out_features,) or None
        None for a bias-free linear layer (the usual choice before batch norm).
    bn : BatchNorm
        The layer after the linear one, ``num_features == out_features``. Its running
        statistics are used whatever its ``training`` flag says: the folded layer equals the
        pair with ``bn.eval()``.
    layout : {"in_out", "out_in"} or None
        Needed only for a square W (both axes have num_features entries).

    Returns
    -------
    W_folded : array of W's shape
    b_folded : array of shape (out_features,)
        In ``result_type(W, b)`` (W's dtype when b is None); computed in float64.

    Raises
    ------
    TypeError
        W or b is not a real array, or bn is not a BatchNorm layer.
    ValueError
        Shapes do not match, an unknown layout, a square W without ``layout``, or
        ``bn.track_running_stats`` is False.
    """
    if layout not in (None, "in_out", "out_in"):
        raise ValueError(f"layout must be 'in_out', 'out_in' or None, got {layout!r}")
    W_array = _checks.host_input_array(W, "W")
    if W_array.ndim != 2:
        raise ValueError(f"a linear weight must be 2-D, got shape {W_array.shape}")
    if layout is None:
        out_axis = _output_axis(W_array.shape, (1, 0), bn, "the linear layer's",
                                "layout='in_out' (x @ W) or layout='out_in' (W @ x)")
    else:
        out_axis = 1 if layout == "in_out" else 0
    return _fold(W_array, b, bn, out_axis=out_axis, what="the linear layer")


def fold_conv(W: Any, b: Any, bn: BatchNorm, out_axis: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    Works for any kernel size (1x1 included), 1-D/2-D/3-D and grouped convolutions: batch norm
    scales each output channel, whatever its kernel looks like.

    Parameters
    ----------
    W : array of float32 or float64
        PyTorch's and CS231n's ``(out_channels, in_channels / groups, *kernel)`` e.g.
        ``(C_out, C_in, kH, kW)``, or HWIO ``(kH, kW, C_in, C_out)``: the output axis is the
        first or last one, whichever has ``bn.num_features`` entries.
    b : array of shape (out_channels,) or None
    bn : BatchNorm
        Normalizing the convolution's output channels (``num_features == out_channels``);
        its running statistics are used whatever its ``training`` flag says.
    out_axis : int or None
        The axis of W that indexes output channels; needed only when both the first and the
        last axis have ``num_features`` entries.

    Returns
    -------
    W_folded : array of W's shape
    b_folded : array of shape (out_channels,)
        In ``result_type(W, b)`` (W's dtype when b is None).

    Raises
    ------
    TypeError, ValueError
        As :func:`fold_linear`.
    """
    if out_axis is None:
        W_array = _checks.host_input_array(W, "W")
        if W_array.ndim < 2:
            raise ValueError(f"W must have at least 2 dimensions, got shape {W_array.shape}")
        out_axis = _output_axis(W_array.shape, (0, -1), bn, "the convolution's",
                                "out_axis=0 (OIHW) or out_axis=-1 (HWIO)")
    return _fold(W, b, bn, out_axis=out_axis, what="the convolution")
