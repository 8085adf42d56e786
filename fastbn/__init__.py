"""fastbn: fast, numerically careful batch normalization for NumPy code.

Layers (``BatchNorm``, ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` over MPI), a functional API
(``batch_norm``, ``batch_norm_forward``, ``batch_norm_backward``, ``moments``) and three
backends: ``"numpy"`` (the textbook reference), ``"cpu"`` (Numba) and ``"cuda"`` (Numba CUDA).
"""

from importlib import metadata as _metadata

from .backends import available_backends, get_backend, set_backend
from .folding import fold_conv, fold_linear
from .functional import batch_norm, batch_norm_backward, batch_norm_forward, moments
from .gradcheck import GradcheckResult, gradcheck, gradcheck_functional
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, IncompatibleKeys

try:
    __version__ = _metadata.version("fastbn")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "IncompatibleKeys",
    "batch_norm", "batch_norm_forward", "batch_norm_backward", "moments",
    "set_backend", "get_backend", "available_backends",
    "gradcheck", "gradcheck_functional", "GradcheckResult", "fold_linear", "fold_conv",
]


def __getattr__(name: str):
    # SyncBatchNorm lives with the MPI code, which is imported only when asked for, so that
    # importing fastbn never imports mpi4py.
    if name == "SyncBatchNorm":
        from .distributed import SyncBatchNorm
        return SyncBatchNorm
    raise AttributeError(f"module 'fastbn' has no attribute {name!r}")
