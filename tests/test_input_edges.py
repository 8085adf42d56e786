"""The edges of the input contract (issue 15): no half-done state, no silent Inf.

Each test failed before its fix; each runs on every backend it applies to.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
import reference as ref
from fastbn.backends.buffers import POOL

BACKENDS = ref.backends()
HOST_BACKENDS = [b for b in BACKENDS if b != "cuda"]


def _x(shape=(8, 4), seed=0, dtype=np.float64):
    return ref.random_array(shape, dtype, seed, offset=1.0, spread=2.0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_batch_norm_validates_every_buffer_before_writing(backend):
    rm, rv = np.zeros(4), np.ones(4)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is updated in place but is read-only"):
        fastbn.batch_norm(_x(), rm, rv, training=True, backend=backend)
    np.testing.assert_array_equal(rm, 0.0)  # not updated before the failure


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("missing", ["mean", "invstd"])
def test_backward_requires_mean_and_invstd(backend, missing):
    x = _x()
    y, mean, invstd = fastbn.batch_norm_forward(x, backend=backend)
    args = {"mean": mean, "invstd": invstd, missing: None}
    with pytest.raises(TypeError, match=f"{missing} is required"):
        fastbn.batch_norm_backward(np.ones_like(x), x, None, args["mean"], args["invstd"],
                                   backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_overflowing_their_dtype_are_refused(backend):
    bn = fastbn.BatchNorm1d(4, dtype=np.float32, backend=backend)
    x = (_x((16, 4)) * 1e20).astype(np.float32)  # var ~1e40: finite in float64, not float32
    before = bn.state_dict()
    # cpu/cuda: the float64 statistics are fine, the float32 running_var is not; the numpy
    # backend's float32 statistics overflow first. Either way: a clear error, nothing changed.
    message = ("overflows float32" if backend == "numpy"
               else "overflow the running statistics' dtype float32")
    with pytest.raises(FloatingPointError, match=message):
        bn(x)
    after = bn.state_dict()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    bn.load_state_dict(after)  # still a loadable state


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_finite_input_whose_statistics_overflow_is_not_called_nan(backend):
    x = _x((16, 3)) * 1e200  # squares overflow float64
    with pytest.raises(FloatingPointError, match="the input is finite but its spread overflows"):
        fastbn.batch_norm_forward(x, backend=backend)
    x[0, 1] = np.inf
    with pytest.raises(FloatingPointError, match="NaN or Inf in the input"):
        fastbn.batch_norm_forward(x, backend=backend)


def test_numpy_backend_float32_overflow_names_its_dtype():
    x = (_x((16, 3)) * 1e25).astype(np.float32)
    with pytest.raises(FloatingPointError, match="overflows float32 .the numpy backend"):
        fastbn.batch_norm_forward(x, backend="numpy")


@pytest.mark.parametrize("key,value", [("weight", 1e300), ("running_var", 1e39),
                                       ("running_mean", -1e39)])
def test_load_state_dict_refuses_values_beyond_the_layer_dtype(key, value):
    bn = fastbn.BatchNorm1d(3, dtype=np.float32)
    state = bn.state_dict()
    state[key] = np.full(3, value)
    with pytest.raises(ValueError, match=rf"state\['{key}'\] has values beyond the range"):
        bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.state_dict()[key], fastbn.BatchNorm1d(3).state_dict()[key])


@pytest.mark.parametrize("count", [np.uint64(2**63), np.uint64(2**64 - 1)])
def test_num_batches_tracked_must_fit_int64(count):
    bn = fastbn.BatchNorm1d(3)
    state = bn.state_dict()
    state["num_batches_tracked"] = np.array(count)
    with pytest.raises(ValueError, match="fits an int64"):
        bn.load_state_dict(state)
    assert bn.num_batches_tracked == 0
    state["num_batches_tracked"] = np.array(2**63 - 1, dtype=np.uint64)
    bn.load_state_dict(state)
    assert bn.state_dict()["num_batches_tracked"] == 2**63 - 1


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("offset", [1, -1])
def test_partly_overlapping_out_is_refused(backend, offset):
    buffer = np.random.default_rng(0).standard_normal(8 * 4 + 1)
    x = buffer[1:].reshape(8, 4) if offset == -1 else buffer[:-1].reshape(8, 4)
    out = buffer[:-1].reshape(8, 4) if offset == -1 else buffer[1:].reshape(8, 4)
    before = buffer.copy()
    with pytest.raises(ValueError, match="out overlaps x partially"):
        fastbn.batch_norm_forward(x, out=out, backend=backend)
    np.testing.assert_array_equal(buffer, before)
    dy = x.copy()
    with pytest.raises(ValueError, match="out overlaps x partially"):
        fastbn.batch_norm_backward(dy, x, None, np.zeros(4), np.ones(4), out=out, backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_exactly_x_is_in_place(backend):
    x = _x()
    expected = ref.forward(x)[0]
    y, _, _ = fastbn.batch_norm_forward(x, out=x, backend=backend)
    assert y is x
    ref.assert_close(x, expected, np.float64)


@pytest.mark.parametrize("attribute,value,error,message", [
    ("momentum", 5.0, ValueError, r"momentum must lie in \[0, 1\]"),
    ("momentum", "fast", TypeError, "momentum must be a number or None"),
    ("eps", -10, ValueError, "eps must be a finite number >= 0"),
    ("eps", float("nan"), ValueError, "eps must be a finite number"),
    ("activation", "tanh", ValueError, "activation must be None or 'relu'"),
])
def test_hyper_parameters_are_validated_on_assignment(attribute, value, error, message):
    bn = fastbn.BatchNorm1d(3)
    before = getattr(bn, attribute)
    with pytest.raises(error, match=message):
        setattr(bn, attribute, value)
    assert getattr(bn, attribute) == before or (before != before)
    bn.momentum = None  # still accepted
    bn.eps = 1e-3
    assert bn.eps == 1e-3


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_per_feature_lists_are_accepted_where_read(backend):
    x = _x()
    gamma, beta = [1.0, 2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 0.5]
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, backend=backend)
    ref.assert_close(y, ref.forward(x, gamma, beta)[0], np.float64)
    dx, _, _ = fastbn.batch_norm_backward(np.ones_like(x), x, gamma, list(mean), list(invstd),
                                          backend=backend)
    ref.assert_close(dx, ref.backward(np.ones_like(x), x, gamma)[0], np.float64)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_per_feature_lists_are_refused_where_written(backend):
    x = _x()
    with pytest.raises(TypeError, match="running_mean is updated in place, so it must be a NumPy"):
        fastbn.batch_norm(x, [0.0] * 4, np.ones(4), training=True, backend=backend)
    with pytest.raises(TypeError, match="out is written in place, so it must be a NumPy array"):
        fastbn.batch_norm_forward(x, out=x.tolist(), backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("order", ["C", "F"])
def test_backward_reads_x_as_it_is_then_for_every_layout(backend, order):
    # One documented behaviour (docs/api.md): the layer keeps a reference to x, like CS231n's
    # cache, and the backward reads x as it is when the backward runs.
    x = np.asarray(_x((6, 3)), order=order)
    original = x.copy()
    bn = fastbn.BatchNorm1d(3, backend=backend)
    bn(x)
    x *= 2.0
    dy = _x((6, 3), 1)
    dx = bn.backward(dy)
    _, mean, invstd = fastbn.batch_norm_forward(original, backend=backend)
    expected, _, _ = fastbn.batch_norm_backward(dy, np.ascontiguousarray(x), bn.gamma, mean,
                                                invstd, backend=backend)
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)


def test_setting_max_idle_bytes_trims_the_pool():
    previous = POOL.max_idle_bytes
    try:
        POOL.max_idle_bytes = 1 << 30
        a = POOL.empty((1 << 21,), np.float32)  # 8 MiB, pooled
        del a
        assert POOL.idle_bytes() >= 8 << 20
        POOL.max_idle_bytes = 0
        assert POOL.idle_bytes() == 0
    finally:
        POOL.max_idle_bytes = previous
