"""Batch-normalization layers for NumPy training code (PyTorch semantics, CS231n-style API).

A layer keeps three kinds of state apart: learnable parameters (``gamma``, ``beta``), their
gradients (``dgamma``, ``dbeta``), and buffers (``running_mean``, ``running_var``,
``num_batches_tracked``). It computes nothing itself: every pass goes through the functional
core, which hands the arithmetic to a backend.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import _checks
from .backends import BACKEND_NAMES, load, resolve
from .functional import Prepared, batch_statistics, prepare, prepare_like

ArrayLike = Any


class BatchNorm:
    """Batch normalization over every axis but the feature axis.

    Parameters
    ----------
    num_features : int
        C, the length of the feature axis.
    axis : int
        The feature axis of the input (1 for NCHW, -1 for channels-last/NHWC, 0 for the course
        layout ``(C, m)``).
    eps : float
        Added to the variance inside the square root.
    momentum : float or None
        Weight of the batch in the running statistics; None for a cumulative average.
    affine : bool
        Learn ``gamma`` and ``beta``.
    track_running_stats : bool
        Keep running statistics and use them in eval mode; if False, always use the batch's.
    dtype : float32 or float64
        Dtype of parameters and buffers. Outputs have the input's dtype.
    backend : {"numpy", "cpu", "cuda"} or None
        None follows ``fastbn.set_backend`` / ``FASTBN_BACKEND`` / the input's array type.
    """

    #: Input dimensionalities the layer accepts (None: any with at least 2).
    ndims: tuple[int, ...] | None = None

    def __init__(self, num_features: int, axis: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype: Any = np.float32,
                 backend: str | None = None) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an integer, got {_checks.describe(num_features)}")
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an integer, got {_checks.describe(axis)}")
        if backend is not None and backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_NAMES}")
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_momentum(momentum, allow_none=True)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _checks.check_float_dtype(dtype, "dtype")
        self.backend = backend
        self.training = True
        C = self.num_features
        self.gamma = self._store(np.ones(C, self.dtype)) if affine else None
        self.beta = self._store(np.zeros(C, self.dtype)) if affine else None
        self.dgamma = self._store(np.zeros(C, self.dtype)) if affine else None
        self.dbeta = self._store(np.zeros(C, self.dtype)) if affine else None
        if track_running_stats:
            self.running_mean = self._store(np.zeros(C, self.dtype))
            self.running_var = self._store(np.ones(C, self.dtype))
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self._saved: tuple[Prepared, Any, Any, bool] | None = None

    # ------------------------------------------------------------------ storage
    def _store(self, host_array: np.ndarray) -> Any:
        """Parameters and buffers live where the layer's backend computes (device for cuda)."""
        if self.backend is None:
            return host_array
        return load(self.backend).asarray(host_array, "parameter")

    def _to_host(self, a: Any) -> np.ndarray:
        return load(self.backend or "numpy").to_host(a)

    def _assign(self, name: str, host_value: np.ndarray) -> None:
        """Overwrite a parameter, gradient or buffer, in place where it is a NumPy or Numba
        device array so references taken through ``params``/``grads`` stay live."""
        current = getattr(self, name)
        if isinstance(current, np.ndarray):
            current[...] = host_value
        elif hasattr(current, "copy_to_device"):  # a Numba device array (backend "cuda")
            current.copy_to_device(np.ascontiguousarray(host_value, dtype=current.dtype))
        else:
            setattr(self, name, self._store(host_value.astype(self.dtype)))

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "BatchNorm":
        """Use batch statistics (and update the running ones). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Use the running statistics. Returns self."""
        return self.train(False)

    # ------------------------------------------------------------------ passes
    def forward(self, x: ArrayLike) -> Any:
        """Normalize ``x`` (features along ``self.axis``); returns an array like ``x``."""
        prepared = prepare(x, self.axis, resolve(self.backend, like=x), self.num_features,
                           self.ndims)
        backend = prepared.backend
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            mean, var = batch_statistics(prepared)  # raises before anything changes
        else:
            mean, var = self.running_mean, self.running_var
        y3, invstd = backend.normalize(prepared.x3, mean, var, self.gamma, self.beta, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            factor = (1.0 / self.num_batches_tracked if self.momentum is None
                      else self.momentum)
            backend.update_running_stats(self.running_mean, self.running_var, mean, var,
                                         prepared.count, factor)
        self._saved = (prepared, mean, invstd, batch_stats)
        return prepared.restore(y3)

    __call__ = forward

    def backward(self, dy: ArrayLike) -> Any:
        """Gradient with respect to the last forward's input; sets ``dgamma`` and ``dbeta``.

        Parameters
        ----------
        dy : array of the forward output's shape
        """
        if self._saved is None:
            raise RuntimeError("backward called before forward: there is no saved input")
        prepared, mean, invstd, batch_stats = self._saved
        dy3 = prepare_like(dy, prepared)
        dx3, dgamma, dbeta = prepared.backend.backward(dy3, prepared.x3, self.gamma, mean,
                                                       invstd, batch_stats)
        if self.affine:
            self._assign("dgamma", prepared.backend.to_host(dgamma))
            self._assign("dbeta", prepared.backend.to_host(dbeta))
        return prepared.restore(dx3)

    # ------------------------------------------------------------------ dicts
    @property
    def params(self) -> dict[str, Any]:
        """Learnable parameters by name (the layer's own arrays: update them in place)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    @property
    def grads(self) -> dict[str, Any]:
        """Gradients from the last backward, keyed like :attr:`params`."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """NumPy copies under PyTorch's names: weight, bias, running_mean, running_var,
        num_batches_tracked."""
        state = {}
        if self.affine:
            state["weight"] = self._to_host(self.gamma)
            state["bias"] = self._to_host(self.beta)
        if self.track_running_stats:
            state["running_mean"] = self._to_host(self.running_mean)
            state["running_var"] = self._to_host(self.running_var)
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state dict (ours, or PyTorch's converted with ``.numpy()``), all or nothing.

        Raises ValueError for missing or unexpected keys, wrong shapes, non-finite values and
        negative variances; nothing is changed unless every entry is valid.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {_checks.describe(state)}")
        vectors = (["weight", "bias"] if self.affine else []) + \
                  (["running_mean", "running_var"] if self.track_running_stats else [])
        allowed = set(vectors) | ({"num_batches_tracked"} if self.track_running_stats else set())
        missing = [k for k in vectors if k not in state]
        unexpected = sorted(set(state) - allowed)
        if missing or unexpected:
            raise ValueError(f"state dict does not match the layer: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        loaded = {}
        for key in vectors:
            value = np.asarray(state[key])
            if value.shape != (self.num_features,):
                raise ValueError(f"state[{key!r}] must have shape ({self.num_features},), "
                                 f"got {value.shape}")
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state[{key!r}] must be real numbers, got dtype {value.dtype}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"state[{key!r}] contains NaN or Inf")
            loaded[key] = value.astype(self.dtype)
        if "running_var" in loaded and np.any(loaded["running_var"] < 0):
            raise ValueError("state['running_var'] has negative variances at features "
                             f"{np.flatnonzero(loaded['running_var'] < 0).tolist()}")
        batches = self.num_batches_tracked
        if "num_batches_tracked" in state:
            count = np.asarray(state["num_batches_tracked"])
            if count.shape != () or count.dtype.kind not in "iu" or count < 0:
                raise ValueError("state['num_batches_tracked'] must be a non-negative integer "
                                 f"scalar, got {count!r}")
            batches = int(count)
        for key, attribute in (("weight", "gamma"), ("bias", "beta"),
                               ("running_mean", "running_mean"), ("running_var", "running_var")):
            if key in loaded:
                self._assign(attribute, loaded[key])
        if self.track_running_stats:
            self.num_batches_tracked = batches

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}, "
                f"backend={self.backend!r})")


class BatchNorm1d(BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` input (features on axis 1)."""

    ndims = (2, 3)


class BatchNorm2d(BatchNorm):
    """Batch norm over ``(N, C, H, W)`` input (or NHWC with ``axis=-1``)."""

    ndims = (4,)


class BatchNorm3d(BatchNorm):
    """Batch norm over ``(N, C, D, H, W)`` input (or NDHWC with ``axis=-1``)."""

    ndims = (5,)
