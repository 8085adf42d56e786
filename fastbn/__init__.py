"""fastbn: fast, numerically careful batch normalization for NumPy code.

Layers (``BatchNorm``, ``BatchNorm1d/2d/3d``), a functional API (``batch_norm``,
``batch_norm_forward``, ``batch_norm_backward``, ``moments``) and three backends: ``"numpy"``
(the textbook reference), ``"cpu"`` (Numba) and ``"cuda"`` (Numba CUDA).
"""

from .backends import available_backends, get_backend, set_backend
from .folding import fold_conv, fold_linear
from .functional import batch_norm, batch_norm_backward, batch_norm_forward, moments
from .gradcheck import GradcheckResult, gradcheck, gradcheck_functional
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "batch_norm", "batch_norm_forward", "batch_norm_backward", "moments",
    "set_backend", "get_backend", "available_backends",
    "gradcheck", "gradcheck_functional", "GradcheckResult", "fold_linear", "fold_conv",
]
