"""Every bad input raises a clear error and changes nothing."""

import copy

import numpy as np
import pytest

import fastbn
import reference as ref

BACKENDS = ref.backends()


def trained_layer(backend, cls=fastbn.BatchNorm2d, C=3, shape=(4, 3, 2, 2)):
    bn = cls(C, backend=backend)
    bn.gamma[...] = np.arange(1, C + 1)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    return bn


def snapshot(bn):
    state = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    grads = {k: np.array(v, copy=True) for k, v in bn.grads.items()}
    return state, grads, bn._saved


def assert_unchanged(bn, before):
    state, grads, saved = snapshot(bn)
    assert state.keys() == before[0].keys()
    for key in state:
        np.testing.assert_array_equal(state[key], before[0][key], err_msg=key)
    for key in grads:
        np.testing.assert_array_equal(grads[key], before[1][key], err_msg=key)
    assert saved is before[2]


def good(shape=(4, 3, 2, 2)):
    return ref.random_array(shape, np.float32, seed=1, offset=0.0, spread=1.0)


BAD_FORWARD = [
    ("wrong features", good((4, 5, 2, 2)), ValueError, "expected 3 features along axis 1"),
    ("3-D into BatchNorm2d", good((4, 3, 2)), ValueError, r"expected 4D input \(got 3D input\)"),
    ("5-D into BatchNorm2d", good((4, 3, 2, 2, 2)), ValueError, "expected 4D input"),
    ("one value per feature", good((1, 3, 1, 1)), ValueError,
     "Expected more than 1 value per channel when training"),
    ("empty batch", good((0, 3, 2, 2)), ValueError, "empty"),
    ("complex", np.ones((4, 3, 2, 2), dtype=np.complex64), TypeError, "got dtype complex64"),
    ("longdouble", np.ones((4, 3, 2, 2), dtype=np.longdouble), TypeError,
     "float16, float32 or float64"),
    ("string", "not an array", TypeError, "got dtype <U12"),
    ("object", np.array([object()] * 4).reshape(1, 4), TypeError, "got dtype object"),
    ("None", None, TypeError, "got None"),
    ("ragged", [[1.0, 2.0], [3.0]], TypeError, "array of real numbers"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,x,error,message", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_input_raises_and_changes_nothing(backend, case, x, error, message):
    bn = trained_layer(backend)
    before = snapshot(bn)
    with pytest.raises(error, match=message):
        bn(x)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x,message", [
    (np.ones(3, np.float32), "at least 2 dimensions"),
    (np.float32(1.0), "at least 2 dimensions"),
])
def test_too_few_dims(backend, x, message):
    bn = trained_layer(backend, fastbn.BatchNorm, C=3)
    before = snapshot(bn)
    with pytest.raises(ValueError, match=message):
        bn(x)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_batch_raises_naming_features_and_keeps_running_stats(backend, bad):
    bn = trained_layer(backend, C=4, shape=(3, 4, 2, 2))
    before = snapshot(bn)
    x = good((3, 4, 2, 2))
    x[1, 2, 0, 1] = bad
    x[0, 0, 1, 1] = bad
    with pytest.raises(FloatingPointError, match=r"for 2 feature\(s\): 0, 2"):
        bn(x)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_feature_is_fine_in_eval(backend):
    bn = trained_layer(backend).eval()
    assert bn(good((1, 3, 1, 1))).shape == (1, 3, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_before_forward(backend):
    bn = fastbn.BatchNorm1d(3, backend=backend)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bn.backward(np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(bn.dgamma, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dy,error,message", [
    (np.ones((4, 3, 2, 3), np.float32), ValueError, r"dy has shape \(4, 3, 2, 3\) but the forward"),
    (np.ones((4, 3, 2, 2), np.complex64), TypeError, "dy must be float16, float32 or float64"),
    (None, TypeError, "dy must be an array of real numbers, got None"),
])
def test_bad_dy_raises_and_changes_nothing(backend, dy, error, message):
    bn = trained_layer(backend)
    before = snapshot(bn)
    with pytest.raises(error, match=message):
        bn.backward(dy)
    assert_unchanged(bn, before)


@pytest.mark.parametrize("mutate,error,message", [
    (lambda s: s.pop("running_var"), ValueError, r"missing keys \['running_var'\]"),
    (lambda s: s.__setitem__("extra", np.zeros(3)), ValueError, r"unexpected keys \['extra'\]"),
    (lambda s: s.__setitem__("weight", np.ones(4)), ValueError,
     r"state\['weight'\] must have shape \(3,\)"),
    (lambda s: s.__setitem__("running_var", np.array([1.0, -0.5, 1.0])), ValueError,
     "negative variances at features \\[1\\]"),
    (lambda s: s.__setitem__("bias", np.array([0.0, np.nan, 0.0])), ValueError, "NaN or Inf"),
    (lambda s: s.__setitem__("num_batches_tracked", np.array(-1)), ValueError, "non-negative"),
    (lambda s: s.__setitem__("num_batches_tracked", np.array(1.5)), ValueError, "integer"),
])
def test_load_state_dict_is_all_or_nothing(mutate, error, message):
    bn = trained_layer("cpu")
    state = copy.deepcopy(bn.state_dict())
    for key in state:
        if key != "num_batches_tracked":
            state[key] = state[key] + 10.0  # every valid entry differs, so partial loads show
    mutate(state)
    before = snapshot(bn)
    with pytest.raises(error, match=message):
        bn.load_state_dict(state)
    assert_unchanged(bn, before)


def test_load_state_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="state must be a mapping"):
        fastbn.BatchNorm1d(2).load_state_dict([("weight", np.ones(2))])


@pytest.mark.parametrize("kwargs,error,message", [
    ({"num_features": 0}, ValueError, "num_features must be positive"),
    ({"num_features": 2.5}, TypeError, "num_features must be an integer"),
    ({"num_features": 3, "eps": -1.0}, ValueError, "eps must be a finite number >= 0"),
    ({"num_features": 3, "momentum": 1.5}, ValueError, r"momentum must lie in \[0, 1\]"),
    ({"num_features": 3, "momentum": "fast"}, TypeError, "momentum must be a number or None"),
    ({"num_features": 3, "dtype": np.int32}, TypeError, "dtype must be float32 or float64"),
    ({"num_features": 3, "backend": "tpu"}, ValueError, "unknown backend 'tpu'"),
    ({"num_features": 3, "axis": "last"}, TypeError, "axis must be an integer"),
])
def test_bad_layer_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastbn.BatchNorm(**kwargs)


def test_axis_out_of_range():
    bn = fastbn.BatchNorm(3, axis=4)
    with pytest.raises(ValueError, match="axis 4 is out of range for a 4-D input"):
        bn(good())


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_batch_norm_errors_leave_running_stats(backend):
    x = good((4, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\), got \(4,\)"):
        fastbn.batch_norm(x, rm, np.ones(4, np.float32), training=True, backend=backend)
    with pytest.raises(ValueError, match="eval mode needs running_mean and running_var"):
        fastbn.batch_norm(x, None, None, training=False, backend=backend)
    with pytest.raises(ValueError, match="momentum must lie in"):
        fastbn.batch_norm(x, rm, rv, training=True, momentum=-0.1, backend=backend)
    with pytest.raises(TypeError, match="running_mean must be float32 or float64"):
        fastbn.batch_norm(x, np.zeros(3, np.int64), rv, training=True, backend=backend)
    x[0, 1] = np.nan
    with pytest.raises(FloatingPointError, match=r"feature\(s\): 1"):
        fastbn.batch_norm(x, rm, rv, training=True, backend=backend)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_parameter_shapes(backend):
    x = good((4, 3))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\), got \(2,\)"):
        fastbn.batch_norm_forward(x, np.ones(2), None, backend=backend)
    with pytest.raises(ValueError, match=r"invstd must have shape \(3,\)"):
        fastbn.batch_norm_backward(x, x, None, np.zeros(3), np.ones(5), backend=backend)
