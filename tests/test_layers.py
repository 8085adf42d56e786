"""The layer API: modes, running statistics, params/grads, state dicts, PyTorch parity."""

from pathlib import Path

import numpy as np
import pytest

import fastbn
import reference as ref

BACKENDS = ref.backends()
TORCH_CASE = Path(__file__).parent / "data" / "torch_batchnorm2d.npz"


def make(shape, seed=0, dtype=np.float32):
    return ref.random_array(shape, dtype, seed, offset=1.0, spread=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_cls,shape,axis", [
    (fastbn.BatchNorm1d, (8, 3), 1),
    (fastbn.BatchNorm1d, (4, 3, 5), 1),
    (fastbn.BatchNorm2d, (2, 3, 4, 5), 1),
    (fastbn.BatchNorm2d, (2, 4, 5, 3), -1),
    (fastbn.BatchNorm3d, (2, 3, 2, 3, 2), 1),
    (fastbn.BatchNorm, (3, 7), 0),
])
def test_train_forward_backward_and_running_stats(backend, layer_cls, shape, axis):
    C = shape[axis]
    bn = layer_cls(C, axis=axis, momentum=0.2, backend=backend)
    bn.gamma[...] = np.linspace(0.5, 2.0, C)
    bn.beta[...] = np.linspace(-1.0, 1.0, C)
    x = make(shape)
    dy = make(shape, seed=1)
    y = bn(x)
    ref.assert_close(y, ref.forward(x, bn.gamma, bn.beta, axis=axis)[0], np.float32)
    dx = bn.backward(dy)
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(dy, x, bn.gamma, axis=axis)
    ref.assert_close(dx, exp_dx, np.float32, what="dx")
    ref.assert_close(bn.dgamma, exp_dgamma, np.float32, scale=x.size, what="dgamma")
    ref.assert_close(bn.dbeta, exp_dbeta, np.float32, scale=x.size, what="dbeta")
    assert bn.grads["gamma"] is bn.dgamma and bn.params["gamma"] is bn.gamma
    mean, var = ref.moments(x, axis)
    n = x.size // C
    ref.assert_close(bn.running_mean, 0.2 * mean, np.float32)
    ref.assert_close(bn.running_var, 0.8 + 0.2 * var * n / (n - 1), np.float32)
    assert bn.num_batches_tracked == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_uses_running_stats_and_backward_treats_them_as_constants(backend):
    bn = fastbn.BatchNorm2d(3, backend=backend, dtype=np.float64)
    for seed in range(3):
        bn(make((4, 3, 2, 2), seed, np.float64))
    frozen = bn.state_dict()
    bn.eval()
    assert not bn.training
    x = make((2, 3, 2, 2), 9, np.float64)
    y = bn(x)
    expected = ref.forward(x, bn.gamma, bn.beta, mean=bn.running_mean, var=bn.running_var)[0]
    ref.assert_close(y, expected, np.float64)
    dy = make(x.shape, 10, np.float64)
    dx = bn.backward(dy)
    exp = ref.backward(dy, x, bn.gamma, mean=bn.running_mean, var=bn.running_var)
    ref.assert_close(dx, exp[0], np.float64)
    ref.assert_close(bn.dgamma, exp[1], np.float64)
    for key, value in frozen.items():  # eval never touches the buffers
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    assert bn.train() is bn and bn.training


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_is_a_cumulative_average(backend):
    bn = fastbn.BatchNorm1d(2, momentum=None, backend=backend, dtype=np.float64)
    batches = [make((6, 2), seed, np.float64) for seed in range(4)]
    for x in batches:
        bn(x)
    n = 6
    means = [ref.moments(x)[0] for x in batches]
    vars_ = [ref.moments(x)[1] * n / (n - 1) for x in batches]
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean(vars_, axis=0), rtol=1e-12)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_track_running_stats_false_always_uses_batch_stats(backend):
    bn = fastbn.BatchNorm1d(3, track_running_stats=False, backend=backend).eval()
    assert bn.running_mean is None and bn.num_batches_tracked is None
    x = make((10, 3))
    ref.assert_close(bn(x), ref.forward(x)[0], np.float32)
    assert set(bn.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_false_has_no_parameters(backend):
    bn = fastbn.BatchNorm1d(3, affine=False, backend=backend)
    assert bn.gamma is None and bn.params == {} and bn.grads == {}
    x, dy = make((10, 3)), make((10, 3), 1)
    ref.assert_close(bn(x), ref.forward(x)[0], np.float32)
    ref.assert_close(bn.backward(dy), ref.backward(dy, x)[0], np.float32)
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_sgd_step_through_params_and_grads_updates_the_layer():
    bn = fastbn.BatchNorm1d(3)
    bn(make((10, 3)))
    bn.backward(make((10, 3), 1))
    gamma_before = bn.gamma.copy()
    for name, p in bn.params.items():
        p -= 0.1 * bn.grads[name]
    np.testing.assert_allclose(bn.gamma, gamma_before - 0.1 * bn.dgamma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend):
    source = fastbn.BatchNorm2d(3, backend=backend)
    source.gamma[...] = [1.0, 2.0, 3.0]
    source(make((4, 3, 2, 2)))
    target = fastbn.BatchNorm2d(3, backend=backend)
    gamma_ref = target.params["gamma"]
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    assert target.params["gamma"] is gamma_ref  # loaded in place
    x = make((2, 3, 2, 2), 5)
    np.testing.assert_array_equal(source.eval()(x), target.eval()(x))


def test_state_dict_is_a_copy():
    bn = fastbn.BatchNorm1d(2)
    state = bn.state_dict()
    state["weight"][...] = 7.0
    np.testing.assert_array_equal(bn.gamma, [1.0, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pytorch_state_dict_loads_and_matches_pytorch_outputs(backend):
    """A torch.nn.BatchNorm2d state dict, exported with .numpy(), saved with torch's outputs."""
    case = np.load(TORCH_CASE)
    state = {k[len("state."):]: case[k] for k in case.files if k.startswith("state.")}
    bn = fastbn.BatchNorm2d(4, backend=backend)
    bn.load_state_dict(state)
    assert bn.num_batches_tracked == int(case["state.num_batches_tracked"])
    ref.assert_close(bn.eval()(case["x"]), case["y_eval"], np.float32, what="eval")
    ref.assert_close(bn.train()(case["x"]), case["y_train"], np.float32, what="train")
    ref.assert_close(bn.running_mean, case["running_mean_after"], np.float32)
    ref.assert_close(bn.running_var, case["running_var_after"], np.float32)
    dx = bn.backward(case["dy"])
    ref.assert_close(dx, case["dx"], np.float32, what="dx")
    ref.assert_close(bn.dgamma, case["dweight"], np.float32, scale=case["x"].size, what="dgamma")
    ref.assert_close(bn.dbeta, case["dbias"], np.float32, scale=case["x"].size, what="dbeta")


def test_against_live_pytorch_when_installed():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tbn = torch.nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-1, 1)
    bn = fastbn.BatchNorm2d(3, momentum=0.3)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    for seed in range(3):
        x = make((4, 3, 5, 5), seed)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = tbn(xt)
        ref.assert_close(bn(x), yt.detach().numpy(), np.float32)
    dy = make(x.shape, 7)
    yt.backward(torch.from_numpy(dy))
    ref.assert_close(bn.backward(dy), xt.grad.numpy(), np.float32)
    for key, value in tbn.state_dict().items():
        ref.assert_close(bn.state_dict()[key], value.numpy(), np.float32, what=key)
    tbn.eval()
    x = make((2, 3, 5, 5), 11)
    ref.assert_close(bn.eval()(x), tbn(torch.from_numpy(x)).detach().numpy(), np.float32)
