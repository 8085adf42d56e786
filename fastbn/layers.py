"""Batch-normalization layers for NumPy training code (PyTorch semantics, CS231n-style API).

A layer keeps three kinds of state apart: learnable parameters (``gamma``, ``beta``), their
gradients (``dgamma``, ``dbeta``), and buffers (``running_mean``, ``running_var``,
``num_batches_tracked``), plus what its backward needs from the last forward. It computes
nothing itself: every pass runs the pipeline of ``fastbn/_pipeline.py``, as the functional API
does.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from . import _checks, _pipeline
from .backends import BACKEND_NAMES, is_device_array, load, resolve

ArrayLike = Any


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` did not match (PyTorch's return value)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


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
        Dtype of parameters, gradients and buffers; float64 by default, as NumPy's. Outputs have
        the input's dtype, and statistics are accumulated in float64 either way, so a float32
        network runs at full speed with float64 parameters; pass ``dtype=np.float32`` to keep
        float32 state (as PyTorch does).
    backend : {"numpy", "cpu", "cuda"} or None
        None follows ``fastbn.set_backend`` / ``FASTBN_BACKEND`` / the input's array type.
    activation : None or "relu"
        Fuse a ReLU after the normalization (and after the residual, when forward gets one).

    Notes
    -----
    Like CS231n's cache, the layer keeps a reference to the last forward's input for the
    backward, and the backward reads it as it is then (for every memory layout): modifying x in
    place between forward and backward changes dx. Pass a copy if you must modify it.
    """

    #: Input dimensionalities the layer accepts (None: any with at least 2).
    ndims: tuple[int, ...] | None = None
    #: An mpi4py communicator whose ranks share batch statistics (``SyncBatchNorm``).
    comm: Any = None

    def __init__(self, num_features: int, axis: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype: Any = np.float64,
                 backend: str | None = None, activation: str | None = None) -> None:
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
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _checks.check_state_dtype(dtype, "dtype")
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
        self._saved: tuple | None = None

    # ------------------------------------------------------------------ hyper-parameters
    # Validated on every assignment, so a call never runs with an eps or momentum that the
    # constructor would have refused.
    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = _checks.check_eps(value)

    @property
    def momentum(self) -> float | None:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        self._momentum = _checks.check_momentum(value, allow_none=True)

    @property
    def activation(self) -> str | None:
        return "relu" if self._relu else None

    @activation.setter
    def activation(self, value: str | None) -> None:
        self._relu = _checks.check_activation(value)

    # ------------------------------------------------------------------ storage
    def _store(self, host_array: np.ndarray) -> Any:
        """Parameters and buffers live where the layer's backend computes (device for cuda)."""
        if self.backend is None:
            return host_array
        return load(self.backend).asarray(host_array, "parameter")

    def _to_host(self, a: Any) -> np.ndarray:
        return load(self.backend or ("cuda" if is_device_array(a) else "numpy")).to_host(a)

    def _assign(self, name: str, value: Any) -> None:
        """Overwrite a parameter, gradient or buffer in place, so references taken through
        ``params``/``grads`` stay live (a device value is copied on the device)."""
        current = getattr(self, name)
        if isinstance(current, np.ndarray):
            if isinstance(value, np.ndarray) or not is_device_array(value):
                current[...] = value
            else:
                current[...] = load("cuda").to_host(value)
        elif hasattr(current, "copy_to_device"):  # a Numba device array (backend "cuda")
            if is_device_array(value) and value.dtype == current.dtype:
                # On the stream the value was computed on, so the copy stays in order with it.
                current.copy_to_device(value, stream=getattr(value, "stream", 0))
            else:
                host = value if isinstance(value, np.ndarray) else load("cuda").to_host(value)
                current.copy_to_device(np.ascontiguousarray(host, dtype=current.dtype))
        else:
            setattr(self, name, self._store(np.asarray(value, dtype=self.dtype)))

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "BatchNorm":
        """Use batch statistics (and update the running ones). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Use the running statistics. Returns self."""
        return self.train(False)

    # ------------------------------------------------------------------ passes
    def forward(self, x: ArrayLike, residual: ArrayLike | None = None) -> Any:
        """Normalize ``x`` (features along ``self.axis``); returns an array like ``x``.

        Parameters
        ----------
        x : array (float16/32/64; integer and bool arrays are computed in float64)
        residual : array like x, optional
            Added after the normalization, before the activation (a ResNet shortcut).
        """
        inp = _pipeline.prepare(x, self.axis, resolve(self.backend, like=x), self.num_features,
                                self.ndims, allow_empty=self.comm is not None and self.training)
        residual3 = None if residual is None else \
            _pipeline.prepare_like(residual, inp, "residual")
        relu = self._relu
        if self.training or not self.track_running_stats:
            tracking = self.training and self.track_running_stats
            factor = 0.0
            if tracking:
                factor = (1.0 / (self.num_batches_tracked + 1) if self._momentum is None
                          else self._momentum)
            y3, mean, invstd, count = _pipeline.forward_train(
                inp, self.gamma, self.beta, self._eps, None,
                self.running_mean if tracking else None, self.running_var if tracking else None,
                factor, residual3, relu, self.comm if self.training else None)
            if tracking:
                self.num_batches_tracked += 1
            batch_stats = True
        else:
            mean = self.running_mean
            y3, invstd = _pipeline.normalize(inp, mean, self.running_var, self.gamma, self.beta,
                                             self._eps, None, residual3, relu)
            count, batch_stats = inp.count, False
        # With a residual the ReLU's mask cannot be recomputed from x: keep y for it.
        self._saved = (inp, mean, invstd, batch_stats, count,
                       y3 if (relu and residual is not None) else None, residual is not None,
                       self.comm if self.training else None)
        return inp.restore(y3)

    __call__ = forward

    def backward(self, dy: ArrayLike) -> Any:
        """Gradient with respect to the last forward's input; sets ``dgamma`` and ``dbeta``.

        Parameters
        ----------
        dy : array of the forward output's shape

        Returns
        -------
        dx : array like the forward's x, or ``(dx, dresidual)`` when the forward had a residual
        """
        if self._saved is None:
            raise RuntimeError("backward called before forward: there is no saved input")
        inp, mean, invstd, batch_stats, count, y3, had_residual, comm = self._saved
        dy3 = _pipeline.prepare_like(dy, inp, "dy")
        dx3, dgamma, dbeta, dresidual3 = _pipeline.backward(
            inp, dy3, self.gamma, self.beta, mean, invstd, batch_stats, count, None, self._relu,
            y3, had_residual, comm)
        if self.affine:
            self._assign("dgamma", dgamma)
            self._assign("dbeta", dbeta)
        dx = inp.restore(dx3)
        if not had_residual:
            return dx
        return dx, inp.restore(dresidual3 if dresidual3 is not None else dy3)

    # ------------------------------------------------------------------ dicts
    @property
    def params(self) -> dict[str, Any]:
        """Learnable parameters by name (the layer's own arrays: update them in place)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    @property
    def grads(self) -> dict[str, Any]:
        """Gradients from the last backward, keyed like :attr:`params`."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (as PyTorch)."""
        if self.track_running_stats:
            self._assign("running_mean", np.zeros(self.num_features, self.dtype))
            self._assign("running_var", np.ones(self.num_features, self.dtype))
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Running statistics reset, gamma 1 and beta 0, gradients 0 (as PyTorch)."""
        self.reset_running_stats()
        if self.affine:
            for name, fill in (("gamma", 1.0), ("beta", 0.0), ("dgamma", 0.0), ("dbeta", 0.0)):
                self._assign(name, np.full(self.num_features, fill, self.dtype))

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

    def _state_keys(self) -> tuple[list[str], set[str]]:
        vectors = (["weight", "bias"] if self.affine else []) + \
                  (["running_mean", "running_var"] if self.track_running_stats else [])
        return vectors, set(vectors) | ({"num_batches_tracked"} if self.track_running_stats
                                        else set())

    def _checked_vector(self, key: str, value: Any) -> np.ndarray:
        value = np.asarray(value)
        if value.shape != (self.num_features,):
            raise ValueError(f"state[{key!r}] must have shape ({self.num_features},), "
                             f"got {value.shape}")
        if value.dtype.kind not in "fiu":
            raise TypeError(f"state[{key!r}] must be real numbers, got dtype {value.dtype}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"state[{key!r}] contains NaN or Inf")
        with np.errstate(over="ignore"):
            cast = value.astype(self.dtype)
        if not np.all(np.isfinite(cast)):
            raise ValueError(f"state[{key!r}] has values beyond the range of the layer's dtype "
                             f"{self.dtype} (largest |value| {np.max(np.abs(value)):.3g})")
        return cast

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load a state dict (ours, or PyTorch's converted with ``.numpy()``), all or nothing.

        Parameters
        ----------
        state : mapping of name to array
        strict : bool
            True: missing or unexpected keys raise ValueError. False: load the keys that
            match and report the others.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, as PyTorch returns.

        Raises ValueError for wrong shapes, non-finite values, values that overflow the layer's
        dtype, negative variances and a ``num_batches_tracked`` that is not a non-negative
        int64; nothing is changed unless every entry is valid.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {_checks.describe(state)}")
        vectors, allowed = self._state_keys()
        missing = [k for k in vectors if k not in state]
        unexpected = sorted(set(state) - allowed)
        if strict and (missing or unexpected):
            raise ValueError(f"state dict does not match the layer: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        loaded = {key: self._checked_vector(key, state[key]) for key in vectors if key in state}
        if "running_var" in loaded and np.any(loaded["running_var"] < 0):
            raise ValueError("state['running_var'] has negative variances at features "
                             f"{np.flatnonzero(loaded['running_var'] < 0).tolist()}")
        batches = self.num_batches_tracked
        if "num_batches_tracked" in state and self.track_running_stats:
            batches = _checks.check_batch_count(state["num_batches_tracked"])
        for key, attribute in (("weight", "gamma"), ("bias", "beta"),
                               ("running_mean", "running_mean"), ("running_var", "running_var")):
            if key in loaded:
                self._assign(attribute, loaded[key])
        if self.track_running_stats:
            self.num_batches_tracked = batches
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}, "
                f"backend={self.backend!r}, activation={self.activation!r})")


class BatchNorm1d(BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` input (features on axis 1)."""

    ndims = (2, 3)


class BatchNorm2d(BatchNorm):
    """Batch norm over ``(N, C, H, W)`` input (or NHWC with ``axis=-1``)."""

    ndims = (4,)


class BatchNorm3d(BatchNorm):
    """Batch norm over ``(N, C, D, H, W)`` input (or NDHWC with ``axis=-1``)."""

    ndims = (5,)
