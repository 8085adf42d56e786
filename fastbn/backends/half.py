"""float16 for Numba's CPU target, which has no float16 type (``NotImplementedError: float16``).

The cpu backend hands float16 arrays to its kernels viewed as ``uint16`` (the same bytes), and
the kernels convert each element with :func:`widen` (load) and :func:`narrow` (store). For
``uint16`` arrays these are :func:`half_to_float32` (binary16 bits to float32, exact: every half
is a float32) and :func:`float_to_half` / :func:`float32_to_half` (float64 or float32 to the
nearest half, ties to even, rounded once, with subnormals, infinities and NaN); for float32 and
float64 arrays the plain conversions to and from float64. The choice is made at compile time
from the array's type.

A widened float16 is a float32, so that the kernels can compute float16 data in float32
(:func:`elementwise_coefficients`, :func:`elementwise_float`): met with a float64 it is
promoted exactly, so whatever stays in float64 computes as before.

Two implementations of the half conversions, picked once at import (:data:`HARDWARE`):

* Hardware (x86 with F16C): LLVM's own ``half`` type, written in IR with
  ``numba.extending.intrinsic``. Widening is ``bitcast i16 -> half``, ``fpext`` to float, then to
  double, all exact; narrowing ends in ``fptrunc float -> half``. LLVM lowers them to
  ``vcvtph2ps`` / ``vcvtps2ph`` and vectorizes the kernels' loops, so a float16 pass costs no
  more than a float32 pass (measured 0.6-0.9x of its time: it moves half the bytes).
* Software (any other target): exact bit-level conversions, branchy, with ldexp/frexp/rint; they
  do not vectorize (a float16 pass takes 20-30x a float32 pass's time). They are the fallback
  because without F16C LLVM lowers ``half`` conversions to calls into compiler-rt
  (``__extendhfsf2``, ``__truncsfhf2``), which Numba's JIT does not provide: on x86-64 with F16C
  turned off (``NUMBA_CPU_FEATURES``) the process aborts with ``LLVM ERROR: Symbol not found``.

Narrowing in hardware goes float64 -> float32 -> half, and two round-to-nearest steps would
round twice: a float64 just above a half midpoint can round to the float32 midpoint itself,
which then ties to even, the wrong way. So the first step rounds to odd instead
(:func:`round_to_odd_float32`): the float64's significand is cut to float32's 24 bits and the
last kept bit set if any cut bit was, after which ``fptrunc`` to float is exact. That is exact
overall because float32 has at least 2 bits more than half (24 >= 11 + 2): every half and every
midpoint between two halves (12 bits) is an even point of the 24-bit grid; a value on the grid
stays itself, and one between two grid points goes to the odd one of them, never a midpoint
and on the same side of every midpoint as the value, so the final nearest-even step
(``fptrunc float -> half``, ``vcvtps2ph``) gives what rounding the float64 directly gives. At the
ends of float32's range: from 2**128 up ``fptrunc`` gives infinity, as half does (from 65520),
and below float32's normals (2**-126) it rounds again, to something that rounds to zero in half
as the value does (anything under 2**-25).

Both implementations are ``@njit`` functions compiled without fast-math flags and not inlined
at Numba's level (``inline="always"`` would compile them with the calling kernel's flags); LLVM
inlines them, and keeps each instruction's own flags when it does, so the sign of zero and NaN
survive inside fast-math kernels.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from llvmlite.binding import get_host_cpu_features
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic, overload

HALF_EXPONENT_MASK = 0x7C00
HALF_QUIET_NAN = 0x7E00
HALF_SIGN = 0x8000
# Halves at or above this magnitude round to infinity: 65504 (the largest half) plus half its
# ulp of 32 is a tie, and ties go to the even neighbour, infinity.
HALF_OVERFLOW = 65520.0
HALF_MIN_NORMAL = 2.0 ** -14


# ----------------------------------------------------------------------------- software
@njit(cache=True)
def half_to_float_software(bits):
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
def half_to_float32_software(bits):
    """float32 value of the binary16 number with the bits ``bits``: exact."""
    return np.float32(half_to_float_software(bits))


@njit(cache=True)
def float32_to_half_software(value):
    """The binary16 bits (uint16) of ``value`` (float32), rounded once (float32 to float64 is
    exact)."""
    return float_to_half_software(np.float64(value))


@njit(cache=True)
def float_to_half_software(value):
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


# ----------------------------------------------------------------------------- hardware
@intrinsic
def _half_bits_to_float32(typingctx, bits):
    """float32 value of the half with the bits ``bits`` (uint16): ``fpext``, exact."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_half_bits(typingctx, value):
    """The bits (uint16) of the half nearest to ``value`` (float32), ties to even."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _float64_bits(typingctx, value):
    """The bits of a float64, as int64."""
    if value != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 with the bits ``bits`` (int64)."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


# The 29 low significand bits of a float64 that a float32 does not have (52 - 23).
_BELOW_FLOAT32 = np.int64((1 << 29) - 1)


@njit(cache=True, inline="always")
def half_to_float_hardware(bits):
    """float64 value of the binary16 number with the bits ``bits`` (an integer < 2**16)."""
    return np.float64(_half_bits_to_float32(np.uint16(bits)))


@njit(cache=True, inline="always")
def half_to_float32_hardware(bits):
    """float32 value of the binary16 number with the bits ``bits`` (uint16): exact."""
    return _half_bits_to_float32(np.uint16(bits))


@njit(cache=True, inline="always")
def float32_to_half_hardware(value):
    """The binary16 bits (uint16) of ``value`` (float32) rounded to nearest, ties to even."""
    return _float32_to_half_bits(np.float32(value))


@njit(cache=True, inline="always")
def round_to_odd_float32(value):
    """``value`` (float64) rounded to float32 precision by round-to-odd, as a float64.

    The significand is cut to float32's 24 bits (toward zero: clearing bits of a
    sign-magnitude number), and the last kept bit is set if any cut bit was. Integer
    arithmetic only, no branch and no compare, so that the loops calling it vectorize.
    Zeros, infinities and NaN (whose significand stays non-zero) keep their kind and sign.
    Rounding to the nearest float32 and stepping back where that went away from zero gives
    the same, but its back conversion and compares made a float16 store loop 1.5-2x slower.
    """
    bits = _float64_bits(value)
    # (cut bits) + 2**29 - 1 carries into bit 29, float32's last bit, exactly when they are
    # not all zero; the carry is or-ed in and the cut bits cleared.
    return _float64_from_bits((bits | ((bits & _BELOW_FLOAT32) + _BELOW_FLOAT32))
                              & ~_BELOW_FLOAT32)


@njit(cache=True, inline="always")
def float_to_half_hardware(value):
    """The binary16 bits (uint16) of ``value`` (float64) rounded to nearest, ties to even."""
    return _float32_to_half_bits(np.float32(round_to_odd_float32(np.float64(value))))


# ----------------------------------------------------------------------------- choice
def target_has_f16c() -> bool:
    """Whether the CPU that Numba compiles for has F16C (its features, as Numba picks them)."""
    features = config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features().flatten()
    # "-f16c" in the list means absent: look for the enabled flag, not the name.
    return "+f16c" in features.split(",")


#: Whether the kernels use the hardware conversions (else the software ones). Numba's cache
#: keys compiled code on the CPU's name and features, so a cache never mixes the two.
HARDWARE = target_has_f16c()

if HARDWARE:
    half_to_float = half_to_float_hardware
    half_to_float32 = half_to_float32_hardware
    float_to_half = float_to_half_hardware
    float32_to_half = float32_to_half_hardware
else:
    half_to_float = half_to_float_software
    half_to_float32 = half_to_float32_software
    float_to_half = float_to_half_software
    float32_to_half = float32_to_half_software


def widen(element):
    """Value of one loaded element: float32 for float16 (given as its uint16 bits), else
    float64."""
    if isinstance(element, np.uint16):
        return np.float32(half_to_float(element))
    return float(element)


def narrow(value, like):
    """``value`` (float64, or float32) rounded once to the element type of the array ``like``."""
    return float_to_half(value) if like.dtype == np.uint16 else like.dtype.type(value)


@overload(widen, inline="always")
def _widen(element):
    if element == types.uint16:
        return lambda element: half_to_float32(element)
    # np.float64, not float(): Numba types float() of a float32 as float32.
    return lambda element: np.float64(element)


@overload(narrow, inline="always")
def _narrow(value, like):
    kind = like.dtype
    if kind == types.uint16:
        if value == types.float32:
            return lambda value, like: float32_to_half(value)
        return lambda value, like: float_to_half(value)
    if kind == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


# ----------------------------------------------------------------------------- arithmetic
def elementwise_coefficients(coefficients, like):
    """The float64 per-feature ``coefficients`` in the type the kernels compute the elements
    of ``like`` in: float32 for float16, so that a float16 element costs 8-wide float32
    arithmetic instead of twice as many 4-wide float64 instructions (in float64 the float16
    passes were bound by the arithmetic: side by side at (802816, 64), scale-shift 20 -> 14 ms,
    backward elementwise with ReLU 32 -> 17 ms); the array itself otherwise."""
    return coefficients.astype(np.float32) if like.dtype == np.uint16 else coefficients


def elementwise_float(value, like):
    """The float64 ``value`` in the type the elements of ``like`` are computed in (as
    :func:`elementwise_coefficients`)."""
    return np.float32(value) if like.dtype == np.uint16 else value


def zero_of(value):
    """0 of ``value``'s float type (a literal 0.0 would promote a float32 to float64)."""
    return type(value)(0.0)


@overload(elementwise_coefficients, inline="always")
def _elementwise_coefficients(coefficients, like):
    if like.dtype == types.uint16:
        return lambda coefficients, like: coefficients.astype(np.float32)
    return lambda coefficients, like: coefficients


@overload(elementwise_float, inline="always")
def _elementwise_float(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: np.float32(value)
    return lambda value, like: value


@overload(zero_of, inline="always")
def _zero_of(value):
    if value == types.float32:
        return lambda value: np.float32(0.0)
    return lambda value: 0.0


def kernel_view(a: np.ndarray) -> np.ndarray:
    """``a`` as the kernels take it: float16 viewed as its uint16 bits, else ``a`` itself."""
    return a.view(np.uint16) if a.dtype == np.float16 else a
