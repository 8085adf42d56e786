"""Per-feature math shared by the cpu and cuda kernels, written once as plain scalar functions.

Each function takes and returns float64 scalars. ``cpu_kernels`` compiles them with
``numba.njit(inline="always")`` and ``cuda_kernels`` with ``cuda.jit(device=True)``, so both
backends compute every coefficient with the same statements (see docs/math.md for the
derivations). They are also plain Python, which is how the tests check them. ``relu_floor`` is
the one per-dtype constant among them: both backends compute it here and hand it to their
kernels.
"""

from __future__ import annotations

import math

import numpy as np


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel update: (count, mean, M2) of the union of two disjoint sets.

    M2 is the sum of squared deviations from the mean. Either set may be empty (count 0).
    """
    count = count_a + count_b
    if count_b == 0.0:
        return count_a, mean_a, m2_a
    delta = mean_b - mean_a
    ratio = count_b / count
    return count, mean_a + delta * ratio, m2_a + m2_b + delta * delta * count_a * ratio


def inverse_std(var, eps):
    """``1 / sqrt(var + eps)``: eps inside the square root, as PyTorch."""
    return 1.0 / math.sqrt(var + eps)


def affine_scale(gamma, invstd):
    """``scale`` of the forward's affine map ``y = x * scale + shift``."""
    return gamma * invstd


def affine_shift(beta, mean, scale):
    """``shift = beta - mean * scale``, computed in float64: in the input's dtype it cancels
    when ``|mean| >> std``."""
    return beta - mean * scale


def backward_dy_scale(gamma, invstd):
    """Coefficient of dy in ``dx = dy * dy_scale + x * x_scale + dx_shift``."""
    return gamma * invstd


def backward_x_scale(dy_scale, invstd, dgamma, count, batch_stats):
    """Coefficient of x: the gradient through the batch variance (0 with fixed statistics).

    From ``dx = gamma*invstd * (dy - dbeta/n - xhat * dgamma/n)`` with ``xhat = (x-mean)*invstd``.
    """
    if not batch_stats:
        return 0.0
    return -dy_scale * invstd * dgamma / count


def backward_dx_shift(dy_scale, x_scale, mean, dbeta, count, batch_stats):
    """Constant term: the gradient through the batch mean, and x_scale's ``-mean`` part."""
    if not batch_stats:
        return 0.0
    return -dy_scale * dbeta / count - x_scale * mean


def unbiased_variance(var, count):
    """Bessel's correction ``var * n / (n - 1)`` (running statistics use it, as PyTorch)."""
    return var * (count / (count - 1.0))


def running_average(running, batch, momentum):
    """``(1 - momentum) * running + momentum * batch``."""
    return (1.0 - momentum) * running + momentum * batch


def relu_floor(dtype) -> float:
    """The largest float64 that rounds to 0 in ``dtype``: half its smallest subnormal (a tie,
    which goes to the even 0). ``value > relu_floor(dtype)`` is ``value rounded to dtype > 0``,
    so a backward recomputing the forward's ReLU mask needs no rounding (not compiled: the
    kernels take it as a constant)."""
    return float(np.finfo(dtype).smallest_subnormal) / 2.0
