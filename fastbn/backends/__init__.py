"""Backend registry and selection.

A backend is a module that computes batch normalization on the *canonical view* of an input:
a C-contiguous array of shape ``(outer, C, inner)`` whose middle axis holds the features
(NCHW -> ``(N, C, H*W)``, NHWC -> ``(N*H*W, C, 1)``). Every backend module provides the same
functions, so the functional layer can call any of them without knowing what runs underneath:

``asarray(x, name)``
    Convert an input to the backend's array type (no copy when it already is one).
``canonical(x, shape3)``
    The ``(outer, C, inner)`` view of ``x`` (a contiguous copy only where a view is impossible).
``astype(a, dtype)``
    ``a`` converted to ``dtype`` (``a`` itself when it already has it); device arrays have no
    ``.astype`` method, so the functional layer casts through the backend.
``to_output(y, like)``
    Hand a result back in the kind of array the caller passed (``like``).
``to_host(a)``
    A NumPy copy of a backend array.
``moments(x3) -> (mean, var)``
    Per-feature mean and biased variance, shape ``(C,)``, returned as float64 (accumulated in
    float64 by cpu and cuda; the naive numpy backend computes in x's dtype).
``output_view(out, shape3, name)``
    The canonical view of a caller-supplied output array (``out=``), checked to be writeable
    and contiguous so results land in it.
``normalize(x3, mean, var, gamma, beta, eps, out3=None) -> (y3, invstd)``
    ``y = (x - mean) * invstd * gamma + beta`` as one multiply-add per element, written to
    ``out3`` when given (it may be ``x3`` itself).
``update_running_stats(running_mean, running_var, mean, var, count, momentum)``
    Exponentially weighted update in place, with the unbiased variance.
``backward(dy3, x3, gamma, mean, invstd, batch_stats, out3=None) -> (dx3, dgamma, dbeta)``
    One reduction pass and one elementwise pass; ``dx`` written to ``out3`` when given.
``nonfinite_features(mean, var) -> numpy.ndarray``
    Indices of features whose statistics are NaN or infinite.

Backends know nothing about layers; the layer and the functional API know nothing about kernels.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

BACKEND_NAMES = ("numpy", "cpu", "cuda")
ENV_VAR = "FASTBN_BACKEND"

_MODULES = {
    "numpy": "fastbn.backends.numpy_backend",
    "cpu": "fastbn.backends.cpu",
    "cuda": "fastbn.backends.cuda",
}
_global_backend: str | None = None


def _check_name(name: Any, source: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r} from {source}; choose one of {BACKEND_NAMES}")
    return name


def load(name: str) -> ModuleType:
    """Import and return the backend module ``name``, raising if it cannot run here."""
    _check_name(name, "the caller")
    module = importlib.import_module(_MODULES[name])
    problem = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    if problem:
        raise RuntimeError(f"backend {name!r} is not available: {problem}")
    return module


def set_backend(name: str | None) -> None:
    """Set the global default backend (``None`` restores automatic selection).

    Parameters
    ----------
    name : {"numpy", "cpu", "cuda"} or None
    """
    global _global_backend
    if name is not None:
        load(name)  # fail now, not at the first forward pass
    _global_backend = name


def get_backend() -> str:
    """Name of the backend used when a call and its layer name none: set_backend, then
    the ``FASTBN_BACKEND`` environment variable, then ``"cpu"``."""
    if _global_backend is not None:
        return _global_backend
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return _check_name(from_env.strip().lower(), f"${ENV_VAR}")
    return "cpu"


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    names = []
    for name in BACKEND_NAMES:
        try:
            load(name)
        except (ImportError, RuntimeError):
            continue
        names.append(name)
    return names


def is_gpu_array(x: Any) -> bool:
    return hasattr(x, "__cuda_array_interface__")


def resolve(*choices: str | None, like: Any = None) -> ModuleType:
    """The backend module for a call: the first explicit choice (call, then layer), then the
    global/environment choice, else ``"cuda"`` for GPU arrays and ``"cpu"`` otherwise."""
    for choice in choices:
        if choice is not None:
            return load(_check_name(choice, "the backend argument"))
    if _global_backend is None and not os.environ.get(ENV_VAR) and is_gpu_array(like):
        return load("cuda")
    return load(get_backend())
