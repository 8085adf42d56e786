"""The float16 conversions of the cpu backend (``fastbn.backends.half``).

Both implementations, hardware (F16C) and software, against NumPy and against each other:
called from Python as njit functions and inside jitted loops over arrays (where LLVM inlines
and vectorizes them, and where a fast-math caller could change them).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from numba import njit, types

from fastbn.backends import half

needs_f16c = pytest.mark.skipif(not half.target_has_f16c(),
                                reason="the hardware conversions need F16C: without it "
                                "LLVM calls __extendhfsf2, absent from the JIT")

WIDEN = [pytest.param(half.half_to_float_software, id="software"),
         pytest.param(half.half_to_float_hardware, id="hardware", marks=needs_f16c)]
NARROW = [pytest.param(half.float_to_half_software, id="software"),
          pytest.param(half.float_to_half_hardware, id="hardware", marks=needs_f16c)]
KERNEL_FASTMATH = {"reassoc", "nsz", "arcp"}
ALL_BITS = np.arange(1 << 16, dtype=np.uint16)


def convert_loop(convert, fastmath=False):
    """A jitted ``out[i] = convert(values[i])`` over arrays, compiled with ``fastmath``."""
    @njit(fastmath=fastmath)
    def loop(values, out):
        for i in range(values.size):
            out[i] = convert(values[i])
    return loop


def widened(convert, bits, in_loop):
    if in_loop:
        out = np.empty(bits.size)
        convert_loop(convert)(bits, out)
        return out
    return np.array([convert(b) for b in bits])


def narrowed(convert, values, in_loop):
    if in_loop:
        out = np.empty(values.size, np.uint16)
        convert_loop(convert)(values, out)
        return out
    return np.array([convert(v) for v in values], dtype=np.uint16)


def numpy_half_bits(values):
    """NumPy's float64 -> float16 (rounded directly, to nearest even), as bits."""
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float16).view(np.uint16)


def assert_same_halves(got, expected):
    """Equal bits, except that any NaN matches any NaN, and a NaN produced must be quiet."""
    got_nan = np.isnan(got.view(np.float16))
    expected_nan = np.isnan(expected.view(np.float16))
    np.testing.assert_array_equal(got_nan, expected_nan)
    np.testing.assert_array_equal(got[~got_nan], expected[~expected_nan])
    assert (got[got_nan] & 0x0200).all(), "NaN not quiet"


def structured_values():
    """Every finite half, every midpoint between neighbours (ties), one float64 ulp either side
    of each, and the edges: overflow threshold, float32 range, subnormals, zeros, inf, NaN."""
    halves = ALL_BITS.view(np.float16).astype(np.float64)
    finite = np.unique(halves[np.isfinite(halves)])
    midpoints = (finite[1:] + finite[:-1]) / 2
    edges = [65519.99, 65520.0, np.nextafter(65520.0, 0.0), 65536.0, 1e300, 3.5e38, 3.4e38,
             np.finfo(np.float32).max, 2.0 ** 128, 2.0 ** -25, 2.0 ** -26, 2.0 ** -24 * 1.5,
             np.nextafter(2.0 ** -25, 1.0), np.nextafter(2.0 ** -25, 0.0), 2.0 ** -149,
             2.0 ** -150, 2.0 ** -160, 1e-300, 5e-324, 0.0, np.inf, np.nan]
    # NaNs whose payload lies only in the bits that float32 drops (signalling, and quiet)
    payload_nans = np.array([0x7FF0000000000001, 0x7FF8000000000001], np.uint64)
    edges = np.concatenate([edges, payload_nans.view(np.float64)])
    return np.concatenate([finite, midpoints, np.nextafter(midpoints, np.inf),
                           np.nextafter(midpoints, -np.inf), edges, -edges])


def random_values(n=200_000, seed=0):
    """float64 values with exponents spread over the whole range: random bit patterns (NaNs
    with payloads included), and random significands scaled into half's own range."""
    rng = np.random.default_rng(seed)
    anywhere = rng.integers(0, 2 ** 64, n, dtype=np.uint64).view(np.float64)
    near = np.ldexp(rng.uniform(-2.0, 2.0, n), rng.integers(-30, 18, n))
    return np.concatenate([anywhere, near])


# ----------------------------------------------------------------------------- widen
@pytest.mark.parametrize("in_loop", [False, True], ids=["python", "loop"])
@pytest.mark.parametrize("convert", WIDEN)
def test_every_half_widens_exactly(convert, in_loop):
    expected = ALL_BITS.view(np.float16).astype(np.float64)
    got = widened(convert, ALL_BITS, in_loop)
    np.testing.assert_array_equal(got, expected)  # NaN matches NaN here
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))


@needs_f16c
def test_widen_implementations_agree():
    hardware = widened(half.half_to_float_hardware, ALL_BITS, True)
    software = widened(half.half_to_float_software, ALL_BITS, True)
    np.testing.assert_array_equal(hardware, software)
    np.testing.assert_array_equal(np.signbit(hardware), np.signbit(software))


WIDEN_FLOAT32 = [pytest.param(half.half_to_float32_software, id="software"),
                 pytest.param(half.half_to_float32_hardware, id="hardware", marks=needs_f16c)]
NARROW_FLOAT32 = [pytest.param(half.float32_to_half_software, id="software"),
                  pytest.param(half.float32_to_half_hardware, id="hardware", marks=needs_f16c)]


@pytest.mark.parametrize("convert", WIDEN_FLOAT32)
def test_every_half_widens_exactly_to_float32(convert):
    @njit
    def loop(bits, out):
        for i in range(bits.size):
            out[i] = convert(bits[i])

    out = np.empty(ALL_BITS.size, np.float32)
    loop(ALL_BITS, out)
    expected = ALL_BITS.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))


@pytest.mark.parametrize("convert", NARROW_FLOAT32)
def test_float32_narrows_once_to_nearest_even(convert):
    """Every float32 near a half (ties and their neighbours included) rounds as NumPy's float32
    -> float16 does."""
    values = structured_values()
    with np.errstate(over="ignore", invalid="ignore"):
        singles = np.concatenate([values.astype(np.float32),
                                  random_values().astype(np.float32)])
        singles = np.concatenate([singles, np.nextafter(singles, np.float32(np.inf)),
                                  np.nextafter(singles, np.float32(-np.inf))])
    got = np.empty(singles.size, np.uint16)
    convert_loop(convert)(singles, got)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = singles.astype(np.float16).view(np.uint16)
    assert_same_halves(got, expected)


def test_kernel_helpers_keep_float32_arithmetic():
    """``widen`` of a half is a float32, ``narrow`` of a float32 rounds it once, and
    ``elementwise_coefficients``/``zero_of`` give float32 for float16 (float64 otherwise)."""
    @njit
    def typed(bits, value, like16, like64, coefficients):
        return (half.widen(bits), half.narrow(value, like16),
                half.elementwise_coefficients(coefficients, like16),
                half.elementwise_coefficients(coefficients, like64),
                half.zero_of(value), half.zero_of(np.float64(value)))

    like16, like64 = np.zeros(1, np.uint16), np.zeros(1)
    coefficients = np.array([0.1, -3.0])
    value = np.float32(1.0 + 2.0 ** -11)                 # a tie: to even, 1.0
    widened_bits, narrowed_bits, c16, c64, zero32, zero64 = typed(
        np.uint16(0x3C01), value, like16, like64, coefficients)
    assert np.float32(widened_bits) == np.float32(1.0 + 2.0 ** -10)
    assert narrowed_bits == 0x3C00
    assert c16.dtype == np.float32 and np.array_equal(c16, coefficients.astype(np.float32))
    assert c64.dtype == np.float64
    np.testing.assert_array_equal(c64, coefficients)
    assert zero32 == 0.0 and zero64 == 0.0
    assert typed.nopython_signatures[0].return_type.types[0] == types.float32
    assert typed.nopython_signatures[0].return_type.types[4] == types.float32
    assert typed.nopython_signatures[0].return_type.types[5] == types.float64


# ----------------------------------------------------------------------------- narrow
@pytest.mark.parametrize("in_loop", [False, True], ids=["python", "loop"])
@pytest.mark.parametrize("convert", NARROW)
def test_narrow_rounds_once_to_nearest_even(convert, in_loop):
    values = structured_values()
    assert_same_halves(narrowed(convert, values, in_loop), numpy_half_bits(values))


@pytest.mark.parametrize("convert", NARROW)
def test_narrow_random_values_across_the_exponent_range(convert):
    values = random_values()
    assert_same_halves(narrowed(convert, values, True), numpy_half_bits(values))
    some = values[::100]
    assert_same_halves(narrowed(convert, some, False), numpy_half_bits(some))


@needs_f16c
def test_narrow_implementations_agree():
    values = np.concatenate([structured_values(), random_values(seed=1)])
    hardware = narrowed(half.float_to_half_hardware, values, True)
    software = narrowed(half.float_to_half_software, values, True)
    assert_same_halves(hardware, software)


@needs_f16c
def test_round_to_odd_is_needed():
    """Just above a half midpoint, the nearest float32 is the midpoint itself: rounding to
    nearest twice would tie to even, down; once, the value rounds up."""
    value = np.nextafter(1.0 + 2.0 ** -11, 2.0)      # midpoint of 1 and 1 + 2**-10, plus a bit
    assert np.float64(np.float32(value)) == 1.0 + 2.0 ** -11
    assert half.float_to_half_hardware(value) == 0x3C01 == numpy_half_bits(np.array([value]))[0]


@needs_f16c
def test_round_to_odd_float32():
    """In float32's normal range: float32 values stay; any other goes to its float32 neighbour
    toward zero with the last bit set (the odd one of its two neighbours)."""
    rng = np.random.default_rng(2)
    significands = rng.uniform(1.0, 2.0, 20_000) * rng.choice([-1.0, 1.0], 20_000)
    values = np.ldexp(significands, rng.integers(-126, 128, 20_000))
    values = np.concatenate([values, values.astype(np.float32).astype(np.float64)])
    rounded = np.array([half.round_to_odd_float32(v) for v in values])
    single = rounded.astype(np.float32)
    np.testing.assert_array_equal(single.astype(np.float64), rounded)   # a float32 exactly
    nearest = values.astype(np.float32)
    exact = nearest.astype(np.float64) == values
    np.testing.assert_array_equal(rounded[exact], values[exact])
    away = np.abs(nearest.astype(np.float64)) > np.abs(values)
    toward_zero = np.where(away, np.nextafter(nearest, np.float32(0)), nearest)
    np.testing.assert_array_equal(single[~exact].view(np.uint32),
                                  toward_zero[~exact].view(np.uint32) | 1)


def test_narrow_edges():
    nan_bits = half.float_to_half(np.nan)
    assert nan_bits & 0x7C00 == 0x7C00 and nan_bits & 0x0200
    assert half.float_to_half(-0.0) == 0x8000
    assert half.float_to_half(np.inf) == 0x7C00 and half.float_to_half(-np.inf) == 0xFC00
    assert half.float_to_half(65520.0) == 0x7C00          # the tie goes to infinity
    assert half.float_to_half(65519.99) == 0x7BFF         # 65504
    assert half.float_to_half(-1e300) == 0xFC00
    assert half.float_to_half(-1e-300) == 0x8000
    assert half.float_to_half(2.0 ** -24) == 0x0001       # smallest subnormal
    assert half.float_to_half(2.0 ** -25) == 0x0000       # tie to even: zero
    assert half.float_to_half(3 * 2.0 ** -26) == 0x0001


# ----------------------------------------------------------------------------- fast-math
def kernel_helpers_loop(fastmath):
    """``widen``/``narrow`` as the kernels call them, in a loop compiled with ``fastmath``."""
    @njit(fastmath=fastmath)
    def loop(values, bits, back):
        for i in range(values.size):
            bits[i] = half.narrow(values[i], bits)
            back[i] = half.widen(bits[i])
    return loop


def implementation_loop(narrow, widen, fastmath):
    """Separate fast-math loops over one implementation's narrow and widen."""
    narrow_loop, widen_loop = convert_loop(narrow, fastmath), convert_loop(widen, fastmath)

    def loop(values, bits, back):
        narrow_loop(values, bits)
        widen_loop(bits, back)
    return loop


ROUND_TRIPS = [
    pytest.param(kernel_helpers_loop, id="widen-narrow"),
    pytest.param(lambda fm: implementation_loop(half.float_to_half_software,
                                                half.half_to_float_software, fm), id="software"),
    pytest.param(lambda fm: implementation_loop(half.float_to_half_hardware,
                                                half.half_to_float_hardware, fm), id="hardware",
                 marks=needs_f16c),
]


@pytest.mark.parametrize("make_loop", ROUND_TRIPS)
@pytest.mark.parametrize("fastmath", [KERNEL_FASTMATH, KERNEL_FASTMATH | {"contract"}],
                         ids=["kernel", "statistics"])
def test_signed_zero_and_nan_survive_fastmath_loops(make_loop, fastmath):
    values = np.array([-0.0, np.nan, 0.0, -np.nan, -1.0])
    bits = np.empty(values.size, np.uint16)
    back = np.empty(values.size)
    make_loop(fastmath)(values, bits, back)
    assert_same_halves(bits, numpy_half_bits(values))
    np.testing.assert_array_equal(back, values)           # NaN matches NaN here
    np.testing.assert_array_equal(np.signbit(back[[0, 2, 4]]), [True, False, True])


# ----------------------------------------------------------------------------- the choice
def test_public_names_are_the_chosen_implementation():
    if half.HARDWARE:
        assert half.half_to_float is half.half_to_float_hardware
        assert half.float_to_half is half.float_to_half_hardware
    else:
        assert half.half_to_float is half.half_to_float_software
        assert half.float_to_half is half.float_to_half_software


def test_f16c_is_read_from_the_enabled_flag(monkeypatch):
    monkeypatch.setattr(half.config, "CPU_FEATURES", "+avx,-f16c,+sse2")
    assert not half.target_has_f16c()
    monkeypatch.setattr(half.config, "CPU_FEATURES", "+avx,+f16c")
    assert half.target_has_f16c()


@pytest.mark.skipif(not half.HARDWARE, reason="the kernels use the software conversions")
def test_half_loops_vectorize_with_f16c():
    """The conversions of a kernel-like loop are vector instructions (ymm or zmm registers)."""
    @njit(fastmath=KERNEL_FASTMATH)
    def scale_shift(x, y, scale, shift):
        for i in range(x.size):
            y[i] = half.narrow(half.widen(x[i]) * scale + shift, y)

    x = np.ones(1000, np.float16).view(np.uint16)
    y = np.empty_like(x)
    scale_shift(x, y, 2.0, 1.0)
    scale_shift(x, y, np.float32(2.0), np.float32(1.0))
    assert (y.view(np.float16) == 3.0).all()
    for signature in scale_shift.signatures:
        asm = scale_shift.inspect_asm(signature)
        assert re.search(r"vcvtph2ps\s+[^\n]*%[yz]mm", asm)
        assert re.search(r"vcvtps2ph\s+\$\d+, %[yz]mm", asm)
    # float32 coefficients (the elementwise passes'): 8-wide float32 arithmetic, no float64
    asm = scale_shift.inspect_asm(scale_shift.signatures[1])
    assert re.search(r"vmulps\s+[^\n]*%[yz]mm", asm)
    assert not re.search(r"vcvtps2pd", asm)
