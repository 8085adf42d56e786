"""Fitting into NumPy training code (issue 9) and the fused layer API (issue 13)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import fastbn
import reference as ref

BACKENDS = ref.backends()
HOST_BACKENDS = [b for b in BACKENDS if b != "cuda"]


def _x(shape=(16, 4), seed=0, dtype=np.float64):
    return ref.random_array(shape, dtype, seed, offset=1.0, spread=2.0)


def _step(bn, x, dy):
    """One training step: forward, backward, SGD on the layer's own arrays."""
    y = bn(x)
    dx = bn.backward(dy)
    for name, p in bn.params.items():
        p -= 0.1 * bn.grads[name]
    return y, dx


# ----------------------------------------------------------------------------- pickle, copy
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("point", ["new", "after forward", "after backward", "eval"])
@pytest.mark.parametrize("clone", ["pickle", "deepcopy"])
def test_checkpoint_resumes_bitwise(backend, point, clone):
    bn = fastbn.BatchNorm2d(3, backend=backend, momentum=None)
    x, dy = _x((4, 3, 2, 2)), _x((4, 3, 2, 2), 1)
    if point != "new":
        bn(x)
    if point in ("after backward", "eval"):
        bn.backward(dy)
    if point == "eval":
        bn.eval()
    copied = pickle.loads(pickle.dumps(bn)) if clone == "pickle" else copy.deepcopy(bn)
    assert copied.training == bn.training
    if point == "after forward":  # the saved input travels with the copy
        np.testing.assert_array_equal(copied.backward(dy), bn.backward(dy))
    bn.train()
    copied.train()
    for seed in range(3):
        xs, dys = _x((4, 3, 2, 2), 10 + seed), _x((4, 3, 2, 2), 20 + seed)
        expected, got = _step(bn, xs, dys), _step(copied, xs, dys)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(copied.state_dict()[key], value)
    copied.gamma[...] = 7.0  # independent
    assert not np.any(bn.gamma == 7.0)


# ----------------------------------------------------------------------------- dtypes
def test_state_is_float64_by_default_and_float32_on_request():
    assert fastbn.BatchNorm1d(3).gamma.dtype == np.float64
    assert fastbn.BatchNorm1d(3).running_var.dtype == np.float64
    bn32 = fastbn.BatchNorm1d(3, dtype=np.float32)
    assert {a.dtype for a in (bn32.gamma, bn32.beta, bn32.dgamma, bn32.running_mean)} == \
        {np.dtype(np.float32)}
    y = bn32(_x((8, 3), dtype=np.float32))
    assert y.dtype == np.float32 and bn32.running_mean.dtype == np.float32


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float64_network_gets_float64_gradients(backend):
    bn = fastbn.BatchNorm1d(5, backend=backend)
    result = fastbn.gradcheck(bn, _x((12, 5)))
    assert result.passed and max(result.errors.values()) < 1e-7, str(result)


# ----------------------------------------------------------------------------- one-call forward
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_training_forward_updates_running_stats_in_the_same_call(backend):
    x = _x((10, 4))
    rm, rv = np.zeros(4), np.ones(4)
    y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv,
                                                momentum=0.3, backend=backend)
    expected_mean, expected_var = ref.moments(x)
    ref.assert_close(rm, 0.3 * expected_mean, np.float64)
    ref.assert_close(rv, 0.7 + 0.3 * expected_var * 10 / 9, np.float64)
    ref.assert_close(y, ref.forward(x)[0], np.float64)


# ----------------------------------------------------------------------------- state dicts
def test_load_state_dict_strict_false_loads_what_matches():
    source = fastbn.BatchNorm1d(3)
    source(_x((8, 3)))
    state = source.state_dict()
    del state["running_var"]
    state["extra"] = np.zeros(3)
    target = fastbn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="missing keys"):
        target.load_state_dict(state)
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["running_var"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(target.running_mean, source.running_mean)
    np.testing.assert_array_equal(target.running_var, 1.0)
    assert target.num_batches_tracked == 1
    bad = dict(state, weight=np.array([1.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="NaN"):  # still all or nothing for bad values
        fastbn.BatchNorm1d(3).load_state_dict(bad, strict=False)


def test_reset_running_stats_and_parameters_in_place():
    bn = fastbn.BatchNorm1d(3)
    gamma, running_var = bn.gamma, bn.running_var
    _step(bn, _x((8, 3)), _x((8, 3), 1))
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    assert bn.num_batches_tracked == 0 and bn.running_var is running_var
    assert not np.all(bn.gamma == 1.0)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.gamma, 1.0)
    np.testing.assert_array_equal(bn.beta, 0.0)
    np.testing.assert_array_equal(bn.dgamma, 0.0)
    assert bn.gamma is gamma


# ----------------------------------------------------------------------------- array-likes
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("make", [lambda a: a.astype(np.int64), lambda a: a.astype(np.int8),
                                  lambda a: a > 0, lambda a: a.astype(np.int64).tolist()],
                         ids=["int64", "int8", "bool", "nested list"])
def test_integer_bool_and_list_inputs_compute_in_float64(backend, make):
    values = np.round(_x((8, 3)) * 3)
    x = make(values)
    y = fastbn.BatchNorm1d(3, backend=backend)(x)
    assert y.dtype == np.float64
    ref.assert_close(y, ref.forward(np.asarray(x, dtype=np.float64))[0], np.float64)
    mean, var = fastbn.moments(x, backend=backend)
    assert mean.dtype == np.float64


@pytest.mark.parametrize("x,dtype_name", [(np.ones((4, 3), np.complex128), "complex128"),
                                          (np.array([["a", "b"], ["c", "d"]]), "<U1"),
                                          (np.array([[object(), object()]] * 2), "object")])
def test_complex_string_object_inputs_name_their_dtype(x, dtype_name):
    with pytest.raises(TypeError, match=f"got dtype {dtype_name}"):
        fastbn.BatchNorm(x.shape[1])(x)


# ----------------------------------------------------------------------------- fused layer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis,shape", [(1, (4, 3, 2, 3)), (-1, (4, 2, 3, 3)), (1, (12, 3))])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_layer_matches_the_composition(backend, axis, shape, with_residual, training):
    C = shape[axis]
    x, dy = _x(shape), _x(shape, 1)
    residual = _x(shape, 2) if with_residual else None
    fused = fastbn.BatchNorm(C, axis=axis, backend=backend, activation="relu")
    plain = fastbn.BatchNorm(C, axis=axis, backend=backend)
    for layer in (fused, plain):
        layer.gamma[...] = np.linspace(0.5, 2.0, C)
        layer(_x(shape, 3))  # non-trivial running statistics
        layer.train(training)
    y = fused.forward(x, residual)
    z = plain.forward(x) + (residual if with_residual else 0.0)
    ref.assert_close(y, np.maximum(z, 0.0), np.float64)
    grads = fused.backward(dy)
    upstream = dy * (z > 0)
    ref.assert_close(grads[0] if with_residual else grads, plain.backward(upstream), np.float64)
    ref.assert_close(fused.dgamma, plain.dgamma, np.float64)
    ref.assert_close(fused.dbeta, plain.dbeta, np.float64)
    if with_residual:
        ref.assert_close(grads[1], upstream, np.float64)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_gradcheck_on_the_fused_layer(backend, with_residual):
    x = _x((6, 3, 2, 2))
    bn = fastbn.BatchNorm2d(3, backend=backend, activation="relu")
    residual = _x((6, 3, 2, 2), 5) if with_residual else None
    result = fastbn.gradcheck(bn, x, residual=residual)
    assert result.passed, str(result)
    assert ("residual" in result.errors) == with_residual


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_fused_backward_signature(backend):
    x, dy, z = _x((8, 3)), _x((8, 3), 1), _x((8, 3), 2)
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.1, -0.2, 0.3])
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, residual=z, activation="relu",
                                                backend=backend)
    dx, dgamma, dbeta, dz = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, beta=beta,
                                                       activation="relu", residual=True, y=y,
                                                       backend=backend)
    expected = ref.backward_fused(dy, x, gamma, beta, residual=z, relu=True)
    for got, want in zip((dx, dgamma, dbeta, dz), expected):
        ref.assert_close(got, want, np.float64, scale=8)
    with pytest.raises(ValueError, match="needs y="):
        fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, activation="relu", residual=True,
                                   backend=backend)
    y2, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, activation="relu",
                                                 backend=backend)
    dx2, _, _ = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, beta=beta,
                                           activation="relu", backend=backend)
    ref.assert_close(dx2, ref.backward_fused(dy, x, gamma, beta, relu=True)[0], np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float16_layer_within_two_ulp_of_float64(backend, offset):
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((64, 4, 3, 3)) + offset  # |mean| / std = 1e3 breaks fp16 sums
    x = x64.astype(np.float16)
    bn = fastbn.BatchNorm2d(4, dtype=np.float32, backend=backend)
    y = bn(x)
    assert y.dtype == np.float16 and bn.running_mean.dtype == np.float32
    expected = ref.forward(x.astype(np.float64))[0]
    ref.assert_close(y, expected, np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    dx = bn.backward(dy)
    assert dx.dtype == np.float16
    ref.assert_close(dx, ref.backward(dy, x.astype(np.float64))[0], np.float16)
