"""The cpu backend module and its kernels against the float64 reference (tests/reference.py).

Every contract function on both layouts (planar: inner > 1, channels-last: inner == 1), run
three ways: serially (small inputs), threaded with chunks and blocks shrunk so that every
thread sees many of them, and serially split into 7 per-thread partials (what a forked child
does), so the merges of partials are exercised beyond the machine's thread count.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from fastbn.backends import cpu, cpu_kernels
from fastbn.backends.half import float_to_half, half_to_float

# (shape3 of the canonical view): planar and channels-last, with odd sizes; the last has rows
# long enough for the channels-last trips of several rows (cpu_kernels.reduce_trip_rows).
SHAPES3 = [(5, 3, 37), (2, 4, 1000), (300, 5, 1), (9, 129, 1), (11, 1030, 1)]
DTYPES = [np.float64, np.float32, np.float16]
# The type the statistics and gradient sums are accumulated in: float16's in float32 parts of
# at most cpu_kernels.FLOAT32_SUM_TERMS terms, added in float64.
SUMMED_IN = {np.float64: np.float64, np.float32: np.float64, np.float16: np.float32}
EPS = 1e-5


@pytest.fixture(params=["serial", "threaded", "partials"])
def mode(request, monkeypatch):
    """How the kernels run: see the module docstring."""
    if request.param in ("threaded", "partials"):
        monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
        monkeypatch.setattr(cpu_kernels, "PLANAR_CHUNK", 16)
        monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", 8)
        monkeypatch.setattr(cpu_kernels, "MIN_BLOCK_ROWS", 1)
    if request.param == "partials":
        monkeypatch.setattr(cpu, "_forked_child", True)
        monkeypatch.setattr(cpu.numba, "get_num_threads", lambda: 7)
    return request.param


def _inputs(shape3, dtype, seed=0, offset=3.0, spread=2.0):
    rng = np.random.default_rng(seed)
    C = shape3[1]
    x = ref.random_array(shape3, dtype, seed, offset, spread)
    dy = ref.random_array(shape3, dtype, seed + 1)
    return x, dy, rng.uniform(0.5, 2.0, C), rng.standard_normal(C)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("shape3", SHAPES3)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(mode, shape3, dtype):
    x, _, _, _ = _inputs(shape3, dtype)
    mean, var = cpu.moments(x)
    expected_mean, expected_var = ref.moments(x, 1)
    assert mean.dtype == var.dtype == np.float64 and mean.shape == (shape3[1],)
    ref.assert_close(mean, expected_mean, SUMMED_IN[dtype], what="mean")
    ref.assert_close(var, expected_var, SUMMED_IN[dtype], what="var")


@pytest.mark.parametrize("shape3", SHAPES3)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", ["plain", "relu", "residual", "residual+relu"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_forward_and_backward_match_reference(mode, shape3, dtype, fused, batch_stats):
    x, dy, gamma, beta = _inputs(shape3, dtype)
    residual = ref.random_array(shape3, dtype, seed=9) if "residual" in fused else None
    relu = "relu" in fused
    mean, var = ref.moments(x, 1)
    if not batch_stats:
        var = var * 1.5 + 0.1  # running statistics, unlike the batch's
    y3, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, residual, relu)
    expected_y, _, expected_invstd = ref.forward_fused(x, gamma, beta, EPS, 1, residual, relu,
                                                       mean, var)
    assert y3.dtype == dtype and y3.shape == shape3
    ref.assert_close(y3, expected_y, dtype, what="y")
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-15)

    y_for_mask = y3 if residual is not None else None  # without a residual: recomputed
    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, relu, y_for_mask)
    expected = ref.backward_fused(dy, x, gamma, beta, EPS, 1, residual, relu,
                                  None if batch_stats else mean, None if batch_stats else var)
    scale = np.abs(_f64(dy)).sum() / shape3[1]
    ref.assert_close(dgamma, expected[1], dtype, scale, what="dgamma")
    ref.assert_close(dbeta, expected[2], dtype, scale, what="dbeta")
    dresidual = cpu.empty(shape3, x.dtype) if residual is not None else None
    dx3 = cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma, dbeta,
                                   shape3[0] * shape3[2], batch_stats, None, relu, y_for_mask,
                                   dresidual)
    assert dx3.dtype == dtype and dx3.shape == shape3
    ref.assert_close(dx3, expected[0], dtype, what="dx")
    if dresidual is not None:
        np.testing.assert_array_equal(_f64(dresidual), expected[3])  # g itself: dy or 0


@pytest.mark.parametrize("shape3", SHAPES3 + [(64, 16, 64), (3, 2, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", ["plain", "relu", "residual+relu"])
def test_whole_passes_give_their_steps(mode, shape3, dtype, fused):
    """cpu.forward_train / cpu.backward (one compiled call: cpu_kernels.whole_pass) against the
    separate step calls, run the same way (serial, threaded, or in 7 serial partials). To a
    few units of rounding, not bitwise: inlined into the whole pass, a fast-math sum may be
    vectorized in another order (at HEAD 76b91f0 about one case in six differed in the last
    bits, depending on the data). Numba inlines them in the code it caches, not in the process
    that compiles (see test_compiling_and_caching_processes_agree_to_rounding)."""
    x, dy, gamma, beta = _inputs(shape3, dtype)
    residual = ref.random_array(shape3, dtype, seed=9) if "residual" in fused else None
    relu = "relu" in fused
    C = shape3[1]
    running = [np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)]
    y3, mean, var, invstd, status = cpu.forward_train(x, gamma, beta, EPS, *running, 0.25,
                                                      None, residual, relu)
    assert status == cpu_kernels.FORWARD_DONE
    step_mean, step_var = cpu.moments(x)
    step_running = [np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)]
    assert cpu.update_running_stats(*step_running, step_mean, step_var,
                                    shape3[0] * shape3[2], 0.25)
    step_y3, step_invstd = cpu.normalize(x, step_mean, step_var, gamma, beta, EPS, None,
                                         residual, relu)
    summed_in = SUMMED_IN[dtype]
    for got, expected, rounding in zip(
            (y3, mean, var, invstd, *running),
            (step_y3, step_mean, step_var, step_invstd, *step_running),
            (dtype, summed_in, summed_in, summed_in, np.float32, np.float32)):
        ref.assert_same_to_rounding(got, expected, rounding)

    y_for_mask = y3 if residual is not None else None
    count = shape3[0] * shape3[2]
    dresidual, step_dresidual = (np.empty_like(x), np.empty_like(x)) if residual is not None \
        else (None, None)
    dx3, dgamma, dbeta = cpu.backward(dy, x, gamma, beta, mean, invstd, count, True, None,
                                      relu, y_for_mask, dresidual)
    step_dgamma, step_dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, relu,
                                                  y_for_mask)
    step_dx3 = cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, step_dgamma,
                                        step_dbeta, count, True, None, relu, y_for_mask,
                                        step_dresidual)
    ref.assert_same_to_rounding(dx3, step_dx3, dtype, what="dx")
    sum_abs_dy = np.abs(_f64(dy)).sum(axis=(0, 2)).max()
    ref.assert_same_to_rounding(dgamma, step_dgamma, summed_in, sum_abs_dy, what="dgamma")
    ref.assert_same_to_rounding(dbeta, step_dbeta, summed_in, sum_abs_dy, what="dbeta")
    if dresidual is not None:  # dy where y > 0, else 0: the same y, so bitwise
        np.testing.assert_array_equal(dresidual, step_dresidual)


@pytest.mark.parametrize("shape3", SHAPES3)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_matches_unfused_composition(mode, shape3, dtype):
    """relu(bn(x) + r) fused against bn, then + r and ReLU; gradients against the unfused
    backward given the masked dy."""
    x, dy, gamma, beta = _inputs(shape3, dtype)
    residual = ref.random_array(shape3, dtype, seed=4)
    mean, var = cpu.moments(x)
    y_fused, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, residual, True)
    y_plain, _ = cpu.normalize(x, mean, var, gamma, beta, EPS)
    unfused = np.maximum(y_plain + residual, 0)  # in dtype: two more roundings than fused
    tol = 4 * np.finfo(dtype).eps
    np.testing.assert_allclose(y_fused, unfused, rtol=0, atol=tol * np.abs(_f64(unfused)).max())

    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, True, y_fused)
    masked = np.where(y_fused > 0, dy, 0).astype(dtype)
    plain_dgamma, plain_dbeta = cpu.backward_reduce(masked, x, gamma, beta, mean, invstd)
    np.testing.assert_allclose(dgamma, plain_dgamma, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dbeta, plain_dbeta, rtol=1e-13, atol=1e-13)
    count = shape3[0] * shape3[2]
    dresidual = np.empty_like(x)
    dx = cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma, dbeta, count, True,
                                  None, True, y_fused, dresidual)
    plain_dx = cpu.backward_elementwise(masked, x, gamma, beta, mean, invstd, dgamma, dbeta,
                                        count, True)
    # Equal up to how the compiler associates the float64 sum (fast-math 'reassoc').
    np.testing.assert_allclose(dx, plain_dx, rtol=tol, atol=tol * np.abs(_f64(plain_dx)).max())
    np.testing.assert_array_equal(dresidual, masked)


@pytest.mark.parametrize("shape3", SHAPES3)
@pytest.mark.parametrize("dtype", DTYPES)
def test_recomputed_relu_mask_agrees_bitwise_with_the_forward(mode, shape3, dtype):
    """Without y, the backward recomputes y > 0 from x: it must be exactly the forward's y > 0,
    also where y is tiny (beta puts many values near 0) and exactly 0 (ties)."""
    x, dy, gamma, _ = _inputs(shape3, dtype)
    mean, var = ref.moments(x, 1)
    beta = np.zeros(shape3[1])
    y3, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, None, True)
    for y_given in (y3, None):
        dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, True, y_given)
        dresidual = np.empty_like(x)
        cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma, dbeta, 1, True, None,
                                 True, y_given, dresidual)
        np.testing.assert_array_equal(dresidual, np.where(y3 > 0, dy, 0).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape3", [(3, 2, 4), (12, 2, 1)])
def test_relu_ties_have_zero_gradient(mode, dtype, shape3):
    """Values exactly at the mean normalize to exactly 0: threshold_backward gives 0 there."""
    values = np.array([-2.0, -1.0, 0.0, 0.0, 1.0, 2.0] * 2)  # mean exactly 0
    rows = np.stack([values, 3.0 * values[::-1]], axis=1)  # (12 values, 2 features)
    outer, features, inner = shape3
    x = np.ascontiguousarray(rows.reshape(outer, inner, features).transpose(0, 2, 1))
    x = x.astype(dtype)
    dy = np.ones_like(x)
    mean, var = ref.moments(x, 1)  # exactly 0 and 10/3 (sums of small integers)
    y3, invstd = cpu.normalize(x, mean, var, None, None, EPS, None, None, True)
    assert np.count_nonzero(y3 == 0) == np.count_nonzero(_f64(x) <= 0)
    for y_given in (y3, None):
        dgamma, dbeta = cpu.backward_reduce(dy, x, None, None, mean, invstd, True, y_given)
        np.testing.assert_array_equal(dbeta, np.count_nonzero(_f64(y3) > 0, axis=(0, 2)))
        dresidual = np.empty_like(x)
        cpu.backward_elementwise(dy, x, None, None, mean, invstd, dgamma, dbeta, x.size // 2,
                                 True, None, True, y_given, dresidual)
        np.testing.assert_array_equal(dresidual, (_f64(x) > 0).astype(dtype))


# (20, 1030, 1): channels-last rows in several blocks of cpu_kernels.RESIDUAL_BLOCK_BYTES, the
# last one partial, so dx overwrites dy block by block after each block's residual gradient
@pytest.mark.parametrize("shape3", [(7, 3, 50), (200, 3, 1), (20, 1030, 1)])
def test_outputs_may_alias_inputs(mode, shape3):
    x, dy, gamma, beta = _inputs(shape3, np.float32)
    residual = ref.random_array(shape3, np.float32, seed=3)
    mean, var = cpu.moments(x)
    expected_y, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, residual, True)
    over_x, over_residual = x.copy(), residual.copy()
    assert cpu.normalize(over_x, mean, var, gamma, beta, EPS, over_x, residual, True)[0] is over_x
    cpu.normalize(x, mean, var, gamma, beta, EPS, over_residual, over_residual, True)
    np.testing.assert_array_equal(over_x, expected_y)
    np.testing.assert_array_equal(over_residual, expected_y)

    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, True, expected_y)
    args = (gamma, beta, mean, invstd, dgamma, dbeta, x.size // shape3[1], True)
    expected_dx = cpu.backward_elementwise(dy, x, *args, None, True, expected_y)
    for target in ("dy", "x"):
        dy_copy, x_copy = dy.copy(), x.copy()
        out = dy_copy if target == "dy" else x_copy
        dresidual = np.empty_like(x)
        cpu.backward_elementwise(dy_copy, x_copy, *args, out, True, expected_y, dresidual)
        np.testing.assert_array_equal(out, expected_dx, err_msg=target)
        np.testing.assert_array_equal(dresidual, np.where(expected_y > 0, dy, 0))


@pytest.mark.parametrize("shape3", [(4, 3, 3000), (4000, 3, 1)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float16_within_two_ulp_including_large_offsets(mode, shape3, offset):
    """float16 in and out, |mean|/std up to 1e3: sums in float32 parts about the mean (so
    the large offset does not cancel in them), coefficients in float64."""
    x, dy, gamma, beta = _inputs(shape3, np.float16, seed=2, offset=offset, spread=1.0)
    mean, var = cpu.moments(x)
    expected_mean, expected_var = ref.moments(x, 1)
    std = np.sqrt(expected_var)
    np.testing.assert_array_less(np.abs(mean - expected_mean), 1e-5 * std)
    np.testing.assert_allclose(var, expected_var, rtol=1e-5)
    y3, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, None, True)
    expected_y, _, _ = ref.forward_fused(x, gamma, beta, EPS, 1, None, True)
    ref.assert_close(y3, expected_y, np.float16, what="y")
    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, True)
    dx = cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma, dbeta,
                                  shape3[0] * shape3[2], True, None, True)
    expected = ref.backward_fused(dy, x, gamma, beta, EPS, 1, None, True)
    assert dx.dtype == np.float16
    ref.assert_close(dx, expected[0], np.float16, what="dx")
    scale = np.abs(_f64(dy)).sum() / shape3[1]
    ref.assert_close(dgamma, expected[1], np.float32, scale, what="dgamma")


@pytest.mark.parametrize("shape3", [(4, 3, 300), (300, 5, 1)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float16_elementwise_passes_compute_in_float32(mode, shape3, offset):
    """float16's y is x*scale + shift in float32 with the float64 coefficients rounded to
    float32, ReLU'd and rounded once to float16, bit for bit; dx is its float32 formula
    rounded once (half an ulp of float16), give or take the float32 rounding of its three
    terms, which fast-math may add in another order."""
    x, dy, gamma, beta = _inputs(shape3, np.float16, seed=5, offset=offset, spread=1.0)
    mean, var = cpu.moments(x)
    y3, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, None, True)
    per_feature = (1, shape3[1], 1)

    def single(a):
        return np.asarray(a).astype(np.float32).reshape(per_feature)

    scale = gamma * invstd
    shift = beta - mean * scale
    x32 = x.astype(np.float32)
    value = x32 * single(scale) + single(shift)
    np.testing.assert_array_equal(y3, np.maximum(value, 0).astype(np.float16))

    count = shape3[0] * shape3[2]
    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, True)
    dx = cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma, dbeta, count,
                                  True, None, True)
    x_scale = -scale * invstd * dgamma / count
    dx_shift = -scale * dbeta / count - x_scale * mean
    g = np.where(value > 2.0 ** -25, dy.astype(np.float32), np.float32(0))
    terms = (g * single(scale), x32 * single(x_scale), single(dx_shift))
    expected = _f64(terms[0] + terms[1] + terms[2])
    half_ulp = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float64) / 2
    reordering = 4 * 2.0 ** -24 * sum(np.abs(_f64(term)) for term in terms)
    assert (np.abs(_f64(dx) - expected) <= half_ulp + reordering).all()


def test_every_half_decodes_exactly():
    bits = np.arange(1 << 16, dtype=np.uint16)
    expected = bits.view(np.float16).astype(np.float64)
    decoded = np.array([half_to_float(b) for b in bits])
    np.testing.assert_array_equal(decoded, expected)  # NaN == NaN here, signs of zero too
    assert np.array_equal(np.signbit(decoded), np.signbit(expected))


def test_rounding_to_half_is_nearest_even_everywhere():
    """Every finite half, every midpoint between neighbours (ties), just off the midpoints, the
    overflow threshold, subnormals, infinities and NaN, against NumPy's float64 -> float16."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    finite = np.unique(halves[np.isfinite(halves)])
    midpoints = (finite[1:] + finite[:-1]) / 2
    values = np.concatenate([finite, midpoints, np.nextafter(midpoints, np.inf),
                             np.nextafter(midpoints, -np.inf),
                             [65519.99, 65520.0, -65520.0, 1e300, 2.0**-25, 2.0**-26, 1e-300,
                              -0.0, np.inf, -np.inf, np.nan]])
    encoded = np.array([float_to_half(v) for v in values], dtype=np.uint16)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(encoded[~nan], expected[~nan])
    assert np.isnan(encoded[nan].view(np.float16)).all()


@settings(max_examples=25, deadline=None)
@given(outer=st.integers(1, 6), features=st.integers(1, 5), inner=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), relu=st.booleans())
def test_random_shapes_against_reference(outer, features, inner, dtype, relu):
    shape3 = (outer, features, inner)
    if outer * inner < 2:
        return  # one value per feature: no batch statistics
    x, dy, gamma, beta = _inputs(shape3, dtype, seed=outer * 100 + inner)
    mean, var = cpu.moments(x)
    y3, invstd = cpu.normalize(x, mean, var, gamma, beta, EPS, None, None, relu)
    ref.assert_close(y3, ref.forward_fused(x, gamma, beta, EPS, 1, None, relu)[0], dtype,
                     what="y")
    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma, beta, mean, invstd, relu)
    dx = cpu.backward_elementwise(dy, x, gamma, beta, mean, invstd, dgamma, dbeta,
                                  outer * inner, True, None, relu)
    ref.assert_close(dx, ref.backward_fused(dy, x, gamma, beta, EPS, 1, None, relu)[0], dtype,
                     what="dx")


@pytest.mark.parametrize("running_dtype", [np.float32, np.float64])
def test_update_running_stats(running_dtype):
    running_mean = np.full(3, 0.5, running_dtype)
    running_var = np.full(3, 2.0, running_dtype)
    mean, var = np.array([1.0, -2.0, 3.0]), np.array([1.0, 4.0, 0.5])
    assert cpu.update_running_stats(running_mean, running_var, mean, var, 5, 0.1) is True
    np.testing.assert_array_equal(running_mean, (0.9 * 0.5 + 0.1 * mean).astype(running_dtype))
    np.testing.assert_array_equal(running_var,
                                  (0.9 * 2.0 + 0.1 * var * (5 / 4)).astype(running_dtype))
    assert cpu.update_running_stats(None, running_var, mean, var, 5, 0.1) is True
    assert cpu.update_running_stats(running_mean, None, mean, var, 5, 0.1) is True


@pytest.mark.parametrize("bad", ["var", "mean", "nan"])
def test_update_running_stats_refuses_what_its_dtype_cannot_hold(bad):
    """float32 running_var with a batch var of 1e39 (finite in float64): nothing is written,
    not even the running mean, whose update would fit."""
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    if bad == "var":
        var[1] = 1e39
    elif bad == "mean":
        mean[2] = -1e40
    else:
        var[0] = np.nan
    assert cpu.update_running_stats(running_mean, running_var, mean, var, 8, 0.5) is False
    np.testing.assert_array_equal(running_mean, 0.0)
    np.testing.assert_array_equal(running_var, 1.0)
    wide_mean, wide_var = np.zeros(3), np.ones(3)
    fits = bad != "nan"  # 1e39 and -1e40 are finite in float64
    assert cpu.update_running_stats(wide_mean, wide_var, mean, var, 8, 0.5) is fits


INHERITED_FASTMATH_SCRIPT = """
import numpy as np
from fastbn.backends import cpu_kernels as k

x = np.random.default_rng(0).standard_normal((5, 3, 1))
# compiles the checks first, as callees of a fast-math whole pass
k.SERIAL["forward_train_channels_last"](x, None, None, 1e-5, np.zeros(3), np.ones(3), 0.1,
                                        None, False, 8, np.empty_like(x), np.empty((3, 3)))
mean, var = np.array([1.0, 2.0, 3.0]), np.array([np.nan, 1.0, 1.0])
print(k.nonfinite_count(mean, var), k.update_running_stats(np.zeros(3), np.ones(3), mean, var,
                                                           8, 0.5))
"""


def test_checks_compiled_first_by_a_fast_math_caller_still_see_nan(tmp_path):
    """Numba compiles a callee whose fastmath is unset with its caller's flags, and direct
    calls then reuse that compilation; the checks set fastmath=False, so NaN is seen whoever
    compiles them first (a fresh cache directory makes this process compile them)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", INHERITED_FASTMATH_SCRIPT], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["1", "False"]


WHOLE_PASS_SCRIPT = """
import sys
import numpy as np
from fastbn.backends import cpu_kernels as k

x = np.random.default_rng(1).standard_normal((24, 7, 1)) * 3 + 5
stats, moments = np.empty((3, 7)), np.empty((2, 7))
rows = k.channels_last_block_rows(7, 8)
k.SERIAL["forward_train_channels_last"](x, None, None, 1e-5, None, None, 0.1, None, False, rows,
                                        np.empty_like(x), stats)
k.SERIAL["batch_moments_channels_last"](x, rows, moments[0], moments[1])
sys.stdout.write(np.concatenate([stats[:2], moments]).tobytes().hex())
"""


def test_compiling_and_caching_processes_agree_to_rounding(tmp_path):
    """docs/api.md, Determinism: processes that load the kernels from Numba's cache give
    bitwise the same results; the process that compiled them agrees with them to rounding
    (it runs a whole pass as calls of its steps, the cached code has them inlined), and so does
    a whole pass with its steps (measured: bitwise in the compiling process, not after)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def run():
        done = subprocess.run([sys.executable, "-c", WHOLE_PASS_SCRIPT], capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        values = np.frombuffer(bytes.fromhex(done.stdout), np.float64).reshape(4, 7)
        return values[:2], values[2:]  # (mean, var) of the whole pass, then of the step

    compiled_whole, compiled_steps = run()  # compiles into the empty cache
    cached_whole, cached_steps = run()
    again_whole, again_steps = run()
    assert np.array_equal(cached_whole, again_whole) and np.array_equal(cached_steps,
                                                                        again_steps)
    for got, expected, what in ((compiled_whole, cached_whole, "whole pass"),
                                (compiled_steps, cached_steps, "steps"),
                                (compiled_whole, compiled_steps, "compiled"),
                                (cached_whole, cached_steps, "cached")):
        ref.assert_same_to_rounding(got, expected, np.float64, what=what)


def test_nonfinite_features():
    mean = np.array([0.0, np.nan, 1.0, 2.0])
    var = np.array([1.0, 1.0, np.inf, 1.0])
    bad = cpu.nonfinite_features(mean, var)
    assert bad.dtype == np.int64 and bad.tolist() == [1, 2]
    assert cpu.nonfinite_features(np.zeros(3), np.ones(3)).tolist() == []


def test_kernel_table_lists_the_kernels_in_file_order():
    """The table at the top of cpu_kernels.py names every kernel, in definition order."""
    table = cpu_kernels.__doc__.split("\n=")[2]  # between the header's rule and the last
    listed = [line.split("``")[1] for line in table.splitlines() if line.startswith("``")]
    source = open(cpu_kernels.__file__).read()
    assert listed and all(hasattr(cpu_kernels, name) for name in listed)
    assert listed == sorted(listed, key=lambda name: source.index(f"\ndef {name}("))


FORK_SCRIPT = """
import multiprocessing as mp
import numpy as np
from fastbn.backends import cpu

def step(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 8, 4096)).astype(np.float64) * 3 + 1   # threaded size
    dy = rng.standard_normal(x.shape)
    rows = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(-1, 8, 1)
    out = []
    for x3, dy3 in ((x, dy), (rows, np.ascontiguousarray(dy.transpose(0, 2, 1)).reshape(-1, 8, 1))):
        mean, var = cpu.moments(x3)
        y, invstd = cpu.normalize(x3, mean, var, None, None, 1e-5, None, None, True)
        dgamma, dbeta = cpu.backward_reduce(dy3, x3, None, None, mean, invstd, True)
        dx = cpu.backward_elementwise(dy3, x3, None, None, mean, invstd, dgamma, dbeta,
                                      x3.shape[0] * x3.shape[2], True, None, True)
        out += [mean, var, y, dgamma, dbeta, dx]
    return out

def child(parent):
    same = all(np.array_equal(a, b) for a, b in zip(parent, step(0)))
    raise SystemExit(0 if same else 3)

if __name__ == "__main__":
    import numba
    parent = step(0)                      # the threaded kernels run here first
    codes = []
    for _ in range(2):
        process = mp.get_context("fork").Process(target=child, args=(parent,))
        process.start()
        process.join(300)
        codes.append(process.exitcode)
    print(numba.threading_layer(), *codes)
"""


def test_forked_child_gets_the_same_results():
    """A child forked after the threaded kernels ran (GNU OpenMP aborts a forked child's
    parallel region) computes serially, in the parent's partials: bitwise the same."""
    run = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    layer, *exit_codes = run.stdout.split()
    assert exit_codes == ["0", "0"], f"{layer} layer; child exit codes {exit_codes} (3: differ)"


@pytest.mark.parametrize("shape3", [(4, 3, 20), (30, 3, 1)])
def test_float32_vectors_as_a_float32_layer_passes_them(shape3):
    """Eval with float32 running statistics and parameters: widened, not computed in float32."""
    x, dy, gamma, beta = _inputs(shape3, np.float64)
    running_mean = np.array([3.1, 2.9, 3.05], np.float32)
    running_var = np.array([4.2, 3.9, 4.01], np.float32)
    gamma32, beta32 = gamma.astype(np.float32), beta.astype(np.float32)
    y3, invstd = cpu.normalize(x, running_mean, running_var, gamma32, beta32, EPS)
    expected, _, expected_invstd = ref.forward(x, gamma32, beta32, EPS, 1, running_mean,
                                               running_var)
    ref.assert_close(y3, expected, np.float64, what="y")
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-15)
    dgamma, dbeta = cpu.backward_reduce(dy, x, gamma32, beta32, running_mean, invstd)
    dx = cpu.backward_elementwise(dy, x, gamma32, beta32, running_mean, invstd, dgamma, dbeta,
                                  shape3[0] * shape3[2], False)
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(dy, x, gamma32, EPS, 1, running_mean,
                                                 running_var)
    ref.assert_close(dx, exp_dx, np.float64, what="dx")
    scale = np.abs(dy).sum() / shape3[1]
    ref.assert_close(dgamma, exp_dgamma, np.float64, scale, what="dgamma")
    ref.assert_close(dbeta, exp_dbeta, np.float64, scale, what="dbeta")
