"""fastbn.gradcheck: analytic dx, dgamma, dbeta of every layer kind against finite differences."""

import numpy as np
import pytest

import fastbn
from fastbn.backends.numpy_backend import backward_elementwise as numpy_backward_elementwise

HOST_BACKENDS = ["numpy", "cpu"]
# (layer class, input shape, feature axis): NC, NCL, NCHW, NHWC, NCDHW, and the course (C, m).
LAYOUTS = [
    (fastbn.BatchNorm1d, (8, 4), 1),
    (fastbn.BatchNorm1d, (8, 4), -1),
    (fastbn.BatchNorm1d, (3, 4, 5), 1),
    (fastbn.BatchNorm2d, (2, 3, 4, 5), 1),
    (fastbn.BatchNorm2d, (2, 4, 5, 3), -1),
    (fastbn.BatchNorm3d, (2, 3, 2, 3, 2), 1),
    (fastbn.BatchNorm, (4, 9), 0),
]


def make_layer(cls, shape, axis, backend, affine=True, seed=0, **kw):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    layer = cls(C, axis=axis, backend=backend, affine=affine, **kw)
    if affine:
        layer.gamma[...] = 1.0 + 0.5 * rng.standard_normal(C)
        layer.beta[...] = 0.3 * rng.standard_normal(C)
    x = 2.0 + 1.5 * rng.standard_normal(shape)
    return layer, x


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("cls,shape,axis", LAYOUTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_gradients_pass(backend, cls, shape, axis, mode):
    layer, x = make_layer(cls, shape, axis, backend)
    layer.forward(x.astype(np.float32))  # non-trivial running statistics for eval mode
    if mode == "eval":
        layer.eval()
    before = layer.state_dict()
    gamma_object = layer.gamma
    result = fastbn.gradcheck(layer, x)
    assert result.passed, str(result)
    assert set(result.errors) == {"x", "gamma", "beta"}
    # the layer is left as it was: running stats, counter, parameter objects and dtypes
    assert_same_state(before, layer.state_dict())
    assert layer.gamma is gamma_object and layer.gamma.dtype == np.float64  # the default
    assert layer.training == (mode == "train")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_affine_false_and_no_running_stats(backend):
    layer, x = make_layer(fastbn.BatchNorm2d, (2, 3, 3, 4), 1, backend, affine=False,
                          track_running_stats=False)
    layer.eval()  # without running stats eval still uses batch statistics
    result = fastbn.gradcheck(layer, x)
    assert result.passed, str(result)
    assert set(result.errors) == {"x"}


def test_momentum_none_counter_restored():
    layer, x = make_layer(fastbn.BatchNorm1d, (6, 3), 1, "cpu", momentum=None)
    layer.forward(x)
    before = layer.state_dict()
    assert fastbn.gradcheck(layer, x).passed
    assert_same_state(before, layer.state_dict())
    assert layer.num_batches_tracked == 1


def test_given_upstream_gradient_and_saved_input_kept():
    layer, x = make_layer(fastbn.BatchNorm1d, (6, 3), 1, "numpy")
    dy = np.random.default_rng(5).standard_normal(x.shape)
    x_user = x[::-1].copy()
    layer.forward(x_user)
    dx_before = layer.backward(dy)
    result = fastbn.gradcheck(layer, x, dy)
    assert result.passed, str(result)
    # backward still refers to the caller's last forward, not to gradcheck's
    np.testing.assert_array_equal(layer.backward(dy), dx_before)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,axis", [((7, 4), 1), ((3, 4, 5), 1), ((5, 6), 0),
                                        ((2, 3, 3, 4), -1)])
def test_functional_gradients_pass(backend, shape, axis):
    rng = np.random.default_rng(1)
    C = shape[axis]
    x = 1.0 + rng.standard_normal(shape)
    gamma, beta = 1.0 + 0.3 * rng.standard_normal(C), rng.standard_normal(C)
    result = fastbn.gradcheck_functional(x, gamma, beta, axis=axis, backend=backend)
    assert result.passed, str(result)
    result = fastbn.gradcheck_functional(x, gamma, None, axis=axis, backend=backend,
                                         running_mean=rng.standard_normal(C),
                                         running_var=0.5 + rng.random(C))
    assert result.passed, str(result)
    assert set(result.errors) == {"x", "gamma"}


class MeanOnlyBatchNorm(fastbn.BatchNorm1d):
    """A classic mistake: dx ignores how the variance depends on x."""

    def backward(self, dy):
        saved_input, mean, invstd = self._saved[:3]
        dx = super().backward(dy)
        gamma = np.asarray(self.gamma, dtype=np.float64)
        x_hat = (saved_input.original - mean) * invstd
        missing = gamma * invstd * x_hat * np.mean(dy * x_hat, axis=0)
        return dx + missing  # drops the variance term the correct backward subtracts


class WrongBetaBatchNorm(fastbn.BatchNorm1d):
    def backward(self, dy):
        dx = super().backward(dy)
        self.dbeta[...] *= 2.0
        return dx


@pytest.mark.parametrize("cls,bad", [(MeanOnlyBatchNorm, "x"), (WrongBetaBatchNorm, "beta")])
def test_wrong_gradient_fails(cls, bad):
    layer, x = make_layer(cls, (8, 4), 1, "numpy")
    result = fastbn.gradcheck(layer, x)
    assert not result.passed and not result
    assert result.errors[bad] > 1e-2
    assert "FAILED" in str(result)


def test_wrong_eval_gradient_fails(monkeypatch):
    # eval-mode backward that wrongly keeps the batch-statistics terms
    import fastbn.backends.numpy_backend as nb
    monkeypatch.setattr(nb, "backward_elementwise",
                        lambda *args: numpy_backward_elementwise(*args[:9], True, *args[10:]))
    layer, x = make_layer(fastbn.BatchNorm1d, (8, 4), 1, "numpy")
    layer.forward(x)
    layer.eval()
    result = fastbn.gradcheck(layer, x)
    assert not result.passed
    assert result.errors["x"] > 1e-2


def test_relative_error_handles_zeros_and_nan():
    from fastbn.gradcheck import relative_error
    assert relative_error(np.zeros(3), np.zeros(3))[0] == 0.0
    assert relative_error(np.array([1.0, np.nan]), np.array([1.0, 2.0]))[0] == np.inf
    err, where = relative_error(np.array([1.0, 2.0, 3.3]), np.array([1.0, 2.0, 3.0]))
    assert where == (2,) and err == pytest.approx(0.3 / 3.3)


def test_rejects_non_layer():
    with pytest.raises(TypeError, match="BatchNorm"):
        fastbn.gradcheck(object(), np.zeros((3, 2)))


@pytest.mark.skipif("cuda" not in fastbn.available_backends(), reason="no cuda backend")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_layer(mode):
    # Tiny on purpose: without a GPU this runs in Numba's CUDA simulator.
    layer, x = make_layer(fastbn.BatchNorm1d, (4, 2), 1, "cuda")
    layer.forward(x.astype(np.float32))
    if mode == "eval":
        layer.eval()
    before, gamma_object = layer.state_dict(), layer.gamma
    result = fastbn.gradcheck(layer, x)
    assert result.passed, str(result)
    assert_same_state(before, layer.state_dict())
    assert layer.gamma is gamma_object
