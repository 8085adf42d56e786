"""Backend registry and selection.

A backend is a module that computes batch normalization on the canonical ``(outer, C, inner)``
view of an input; ``contract.py`` lists its functions (a ``typing.Protocol``) and
``tests/test_backend_contract.py`` checks every backend against it. Backends know nothing about
layers; the layers and the functional API reach them only through ``fastbn/_pipeline.py``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import numpy as np

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


_loaded: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """Import and return the backend module ``name``, raising if it cannot run here."""
    _check_name(name, "the caller")
    module = importlib.import_module(_MODULES[name])
    problem = module.unavailable_reason()
    if problem:
        raise RuntimeError(f"backend {name!r} is not available: {problem}")
    _loaded[name] = module
    return module


# os.environ.get costs about a microsecond (it encodes the key and decodes the value), as much
# as a small kernel; CPython keeps the encoded mapping behind it, where a lookup is a dict get.
_ENVIRON_BYTES = getattr(os.environ, "_data", None)
_ENV_KEY = os.fsencode(ENV_VAR)


def _environ_has_choice() -> bool:
    if isinstance(_ENVIRON_BYTES, dict):
        return bool(_ENVIRON_BYTES.get(_ENV_KEY))
    return bool(os.environ.get(ENV_VAR))


def _cached(name: str) -> ModuleType:
    # The per-call path: a backend that loaded once stays usable for the process.
    module = _loaded.get(name)
    return module if module is not None else load(name)


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
    """The configured default backend's name.

    This is what a call uses when neither the call nor its layer names a backend and the input
    is not a GPU array: the name given to :func:`set_backend`, else the ``FASTBN_BACKEND``
    environment variable, else ``"cpu"``. (GPU arrays go to ``"cuda"`` unless one of the first
    two is set.)
    """
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


def is_device_array(x: Any) -> bool:
    """Whether ``x`` lives in GPU memory (``__cuda_array_interface__``: CuPy, PyTorch CUDA
    tensors, Numba device arrays; ``__cuda_ndarray__``: the CUDA simulator's arrays)."""
    if getattr(x, "__cuda_ndarray__", False):
        return True
    try:
        return hasattr(x, "__cuda_array_interface__")
    except RuntimeError:  # torch refuses the interface of a CUDA tensor that requires grad
        return True


def resolve(*choices: str | None, like: Any = None) -> ModuleType:
    """The backend module for a call: the first explicit choice (call, then layer), then the
    global/environment choice, else ``"cuda"`` for GPU arrays and ``"cpu"`` otherwise."""
    for choice in choices:
        if choice is not None:
            module = _loaded.get(choice)
            return module if module is not None else load(_check_name(choice,
                                                                       "the backend argument"))
    if _global_backend is not None:
        return _cached(_global_backend)
    if _environ_has_choice():
        return _cached(get_backend())
    if type(like) is not np.ndarray and is_device_array(like):
        return _cached("cuda")
    return _cached("cpu")
