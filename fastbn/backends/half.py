"""float16 for Numba's CPU target, which has no float16 type (``NotImplementedError: float16``).

The cpu backend hands float16 arrays to its kernels viewed as ``uint16`` (the same bytes) and
converts each element with the exact bit-level functions below: :func:`half_to_float` widens
the IEEE binary16 bits to float64 (exact: every half is a float64), :func:`float_to_half`
rounds a float64 to the nearest half, ties to even, in one step (going through float32 would
round twice), with subnormals, infinities and NaN.

:func:`widen` and :func:`narrow` are what the kernels call on every element: for float32 and
float64 arrays they are the plain conversions, for ``uint16`` arrays the half conversions, the
choice made once at compile time from the array's type.

The conversions are compiled without fast-math flags (not inlined at Numba's level), so the
sign of zero and the NaN test survive inside fast-math kernels.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

HALF_EXPONENT_MASK = 0x7C00
HALF_QUIET_NAN = 0x7E00
HALF_SIGN = 0x8000
# Halves at or above this magnitude round to infinity: 65504 (the largest half) plus half its
# ulp of 32 is a tie, and ties go to the even neighbour, infinity.
HALF_OVERFLOW = 65520.0
HALF_MIN_NORMAL = 2.0 ** -14


@njit(cache=True)
def half_to_float(bits):
    """float64 value of the binary16 number with the bits ``bits`` (an integer < 2**16)."""
    bits = np.int64(bits)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0x1F:
        magnitude = math.inf if mantissa == 0 else math.nan
    elif exponent == 0:
        magnitude = math.ldexp(float(mantissa), -24)           # subnormal or zero
    else:
        magnitude = math.ldexp(float(mantissa + 1024), exponent - 25)
    return -magnitude if bits & HALF_SIGN else magnitude


@njit(cache=True)
def float_to_half(value):
    """The binary16 bits (uint16) of ``value`` (float64) rounded to nearest, ties to even."""
    if value != value:
        return np.uint16(HALF_QUIET_NAN)
    sign = HALF_SIGN if math.copysign(1.0, value) < 0.0 else 0
    magnitude = abs(value)
    if magnitude >= HALF_OVERFLOW:
        return np.uint16(sign | HALF_EXPONENT_MASK)
    if magnitude < HALF_MIN_NORMAL:
        # Units of the subnormal spacing 2**-24; 1024 of them is the smallest normal, which
        # the bits below encode correctly as well.
        return np.uint16(sign | np.int64(np.rint(magnitude * 16777216.0)))
    fraction, exponent = math.frexp(magnitude)                 # magnitude = fraction * 2**exp
    significand = np.int64(np.rint(fraction * 2048.0))         # in [1024, 2048]; 2048 carries
    return np.uint16(sign | (((exponent + 14) << 10) + significand - 1024))


def widen(element):
    """float64 value of one loaded element (float16 given as its uint16 bits)."""
    return half_to_float(element) if isinstance(element, np.uint16) else float(element)


def narrow(value, like):
    """``value`` (float64) rounded once to the element type of the array ``like``."""
    return float_to_half(value) if like.dtype == np.uint16 else like.dtype.type(value)


@overload(widen, inline="always")
def _widen(element):
    if element == types.uint16:
        return lambda element: half_to_float(element)
    # np.float64, not float(): Numba types float() of a float32 as float32.
    return lambda element: np.float64(element)


@overload(narrow, inline="always")
def _narrow(value, like):
    kind = like.dtype
    if kind == types.uint16:
        return lambda value, like: float_to_half(value)
    if kind == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


def kernel_view(a: np.ndarray) -> np.ndarray:
    """``a`` as the kernels take it: float16 viewed as its uint16 bits, else ``a`` itself."""
    return a.view(np.uint16) if a.dtype == np.float16 else a
