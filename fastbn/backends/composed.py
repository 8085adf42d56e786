"""Whole passes composed from a backend's step operations (``contract.Backend``).

These define the contract's ``forward_train`` and ``backward``: the numpy and cuda backends use
them as they are; the cpu backend runs the same steps in one compiled call
(``cpu_kernels.whole_pass``), where the Python between separate calls would cost as much as
the work at training sizes.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .contract import FORWARD_DONE, NONFINITE_STATISTICS, RUNNING_OVERFLOW


def forward_train(backend: ModuleType, x3: Any, gamma: Any, beta: Any, eps: float,
                  running_mean: Any, running_var: Any, momentum: float, out3: Any = None,
                  residual3: Any = None, relu: bool = False) -> tuple[Any, Any, Any, Any, int]:
    """``(y3, mean, var, invstd, status)``: statistics, finite check, running update (all or
    nothing), then the fused elementwise pass; nothing is written after a failed check."""
    mean, var = backend.moments(x3)
    if len(backend.nonfinite_features(mean, var)):
        return None, mean, var, None, NONFINITE_STATISTICS
    count = x3.shape[0] * x3.shape[2]
    if not backend.update_running_stats(running_mean, running_var, mean, var, count, momentum):
        return None, mean, var, None, RUNNING_OVERFLOW
    y3, invstd = backend.normalize(x3, mean, var, gamma, beta, eps, out3, residual3, relu)
    return y3, mean, var, invstd, FORWARD_DONE


def backward(backend: ModuleType, dy3: Any, x3: Any, gamma: Any, beta: Any, mean: Any,
             invstd: Any, count: int, batch_stats: bool, out3: Any = None, relu: bool = False,
             y3: Any = None, dresidual3: Any = None) -> tuple[Any, Any, Any]:
    """``(dx3, dgamma, dbeta)``: the reduction pass, then the elementwise pass with its sums."""
    dgamma, dbeta = backend.backward_reduce(dy3, x3, gamma, beta, mean, invstd, relu, y3)
    dx3 = backend.backward_elementwise(dy3, x3, gamma, beta, mean, invstd, dgamma, dbeta, count,
                                       batch_stats, out3, relu, y3, dresidual3)
    return dx3, dgamma, dbeta
