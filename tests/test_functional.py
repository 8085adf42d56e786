"""Functional API on every backend against the float64 reference."""

import numpy as np
import pytest

import fastbn
import reference as ref

BACKENDS = ref.backends()
DTYPES = [np.float32, np.float64]
# (shape, axis): planar (inner > 1) and channels-last (inner == 1) views, 2-D to 5-D, the
# course layout (C, m) with axis=0, and a row long enough to be cut into several chunks.
LAYOUTS = [
    ((6, 4), 1),
    ((6, 4), -1),
    ((5, 7), 0),
    ((4, 3, 5), 1),
    ((3, 2, 5, 6), 1),
    ((3, 5, 6, 2), -1),
    ((2, 3, 2, 3, 4), 1),
    ((2, 2, 3, 3, 4), -1),
    ((2, 3, 4, 5), 2),
    ((2, 3, 4500), 1),
]


make = ref.random_array  # offset 3, spread 2: statistics away from zero


def affine(C, seed=1):
    rng = np.random.default_rng(seed)
    return 1.0 + 0.5 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_moments(backend, dtype, shape, axis):
    x = make(shape, dtype)
    mean, var = fastbn.moments(x, axis=axis, backend=backend)
    exp_mean, exp_var = ref.moments(x, axis)
    assert mean.dtype == dtype and var.dtype == dtype
    ref.assert_close(mean, exp_mean, dtype, what="mean")
    ref.assert_close(var, exp_var, dtype, what="var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("with_affine", [True, False])
def test_forward_train(backend, dtype, shape, axis, with_affine):
    x = make(shape, dtype)
    C = shape[axis]
    gamma, beta = affine(C) if with_affine else (None, None)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis,
                                                backend=backend)
    exp_y, exp_mean, exp_invstd = ref.forward(x, gamma, beta, eps=1e-3, axis=axis)
    assert y.shape == x.shape and y.dtype == dtype
    ref.assert_close(y, exp_y, dtype, what="y")
    ref.assert_close(mean, exp_mean, dtype, what="mean")
    ref.assert_close(invstd, exp_invstd, dtype, what="invstd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("batch_stats", [True, False])
def test_backward(backend, dtype, shape, axis, batch_stats):
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=5, offset=0.2, spread=1.0)
    C = shape[axis]
    gamma, _ = affine(C)
    if batch_stats:
        _, mean, invstd = ref.forward(x, eps=1e-3, axis=axis)
        expected = ref.backward(dy, x, gamma, eps=1e-3, axis=axis)
    else:
        mean, var = 0.5 + np.arange(C) * 0.1, 1.0 + np.arange(C) * 0.2
        invstd = 1 / np.sqrt(var + 1e-3)
        expected = ref.backward(dy, x, gamma, eps=1e-3, axis=axis, mean=mean, var=var)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis,
                                                   backend=backend, batch_stats=batch_stats)
    assert dx.shape == x.shape and dx.dtype == dtype
    m = x.size // C
    ref.assert_close(dx, expected[0], dtype, what="dx")
    ref.assert_close(dgamma, expected[1], dtype, scale=m, what="dgamma")
    ref.assert_close(dbeta, expected[2], dtype, scale=m, what="dbeta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((12, 4), -1)])
def test_batch_norm_train_updates_running_stats_like_pytorch(backend, dtype, shape, axis):
    x = make(shape, dtype)
    C = shape[axis]
    gamma, beta = affine(C)
    running_mean = np.full(C, 0.5, dtype)
    running_var = np.full(C, 2.0, dtype)
    y = fastbn.batch_norm(x, running_mean, running_var, gamma, beta, training=True,
                          momentum=0.25, eps=1e-4, axis=axis, backend=backend)
    mean, var = ref.moments(x, axis)
    n = x.size // C
    ref.assert_close(y, ref.forward(x, gamma, beta, eps=1e-4, axis=axis)[0], dtype)
    ref.assert_close(running_mean, 0.75 * 0.5 + 0.25 * mean, dtype)
    ref.assert_close(running_var, 0.75 * 2.0 + 0.25 * var * n / (n - 1), dtype)
    assert running_mean.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((12, 4), -1), ((4, 9), 0)])
def test_batch_norm_eval_uses_running_stats(backend, dtype, shape, axis):
    x = make(shape, dtype)
    C = shape[axis]
    gamma, beta = affine(C)
    running_mean = np.linspace(-1, 1, C).astype(dtype)
    running_var = np.linspace(0.5, 3, C).astype(dtype)
    before = running_mean.copy(), running_var.copy()
    y = fastbn.batch_norm(x, running_mean, running_var, gamma, beta, training=False,
                          eps=1e-5, axis=axis, backend=backend)
    expected = ref.forward(x, gamma, beta, eps=1e-5, axis=axis, mean=running_mean,
                           var=running_var)[0]
    ref.assert_close(y, expected, dtype)
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_without_running_stats(backend):
    x = make((6, 3), np.float64)
    y = fastbn.batch_norm(x, None, None, training=True, backend=backend)
    ref.assert_close(y, ref.forward(x)[0], np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["F", "strided", "list"])
def test_non_contiguous_and_array_like_inputs(backend, order):
    base = make((4, 3, 6, 5), np.float64)
    if order == "F":
        x = np.asfortranarray(base)
    elif order == "strided":
        x = make((8, 3, 6, 10), np.float64)[::2, :, :, ::2]
    else:
        x = base.tolist()
    before = np.array(x, copy=True)
    y, _, _ = fastbn.batch_norm_forward(x, backend=backend)
    ref.assert_close(y, ref.forward(np.asarray(x))[0], np.float64)
    np.testing.assert_array_equal(np.asarray(x), before)  # the input is never modified


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_finite_differences(backend, dtype):
    """dx, dgamma, dbeta from the kernels against central differences of the float64 loss."""
    rng = np.random.default_rng(3)
    shape, axis = (3, 2, 4), 1
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma, beta = affine(2)
    eps = 1e-3

    def loss(x_, gamma_, beta_):
        return float((ref.forward(x_, gamma_, beta_, eps=eps, axis=axis)[0] * dy).sum())

    def central(f, v, h=1e-6):
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            old = v[i]
            v[i] = old + h
            up = f()
            v[i] = old - h
            down = f()
            v[i] = old
            g[i] = (up - down) / (2 * h)
        return g

    num_dx = central(lambda: loss(x, gamma, beta), x)
    num_dgamma = central(lambda: loss(x, gamma, beta), gamma)
    num_dbeta = central(lambda: loss(x, gamma, beta), beta)
    xc = x.astype(dtype)
    _, mean, invstd = fastbn.batch_norm_forward(xc, gamma, beta, eps=eps, backend=backend)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy.astype(dtype), xc, gamma, mean, invstd,
                                                   backend=backend)
    tol = 1e-6 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(dx, num_dx, atol=tol, rtol=tol)
    np.testing.assert_allclose(dgamma, num_dgamma, atol=tol, rtol=tol)
    np.testing.assert_allclose(dbeta, num_dbeta, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtype_dy_is_cast_to_input_dtype(backend):
    x = make((5, 3), np.float32)
    dy = make((5, 3), np.float64, seed=2)
    _, mean, invstd = fastbn.batch_norm_forward(x, backend=backend)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, None, mean, invstd, backend=backend)
    assert dx.dtype == np.float32
    ref.assert_close(dx, ref.backward(dy.astype(np.float32), x)[0], np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", [((3, 2, 5), 1), ((7, 3), -1)])
def test_out_arrays_receive_results_and_may_alias_inputs(backend, shape, axis):
    x = make(shape, np.float32)
    dy = make(shape, np.float32, seed=4)
    y_new, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, backend=backend)
    dx_new, _, _ = fastbn.batch_norm_backward(dy, x, None, mean, invstd, axis=axis,
                                              backend=backend)
    out = np.empty_like(x)
    y, _, _ = fastbn.batch_norm_forward(x, axis=axis, backend=backend, out=out)
    assert y is out
    np.testing.assert_array_equal(out, y_new)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, None, mean, invstd, axis=axis,
                                          backend=backend, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dy, dx_new)
    rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
    in_place = x.copy()
    assert fastbn.batch_norm(in_place, rm, rv, training=True, axis=axis, backend=backend,
                             out=in_place) is in_place
    np.testing.assert_array_equal(in_place, y_new)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_arrays(backend):
    x = make((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"out has shape \(4, 4\) but x has shape \(4, 3\)"):
        fastbn.batch_norm_forward(x, backend=backend, out=np.empty((4, 4), np.float32))
    with pytest.raises(TypeError, match="out must have x's dtype float32, got float64"):
        fastbn.batch_norm_forward(x, backend=backend, out=np.empty((4, 3)))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises((TypeError, ValueError), match="out must be"):
        fastbn.batch_norm(x, rm, rv, training=True, backend=backend,
                          out=np.empty((3, 4), np.float32).T)
    np.testing.assert_array_equal(rm, 0.0)  # rejected before the running stats moved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_cpu_parallel_path_matches_reference(monkeypatch, dtype, shape, axis):
    """Small inputs run serially; force the threaded kernels on the same cases."""
    from fastbn.backends import cpu

    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    x = make(shape, dtype)
    dy = make(shape, dtype, seed=5)
    C = shape[axis]
    gamma, beta = affine(C)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend="cpu")
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis,
                                                   backend="cpu")
    ref.assert_close(y, ref.forward(x, gamma, beta, axis=axis)[0], dtype, what="y")
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(dy, x, gamma, axis=axis)
    ref.assert_close(dx, exp_dx, dtype, what="dx")
    ref.assert_close(dgamma, exp_dgamma, dtype, scale=x.size, what="dgamma")
    ref.assert_close(dbeta, exp_dbeta, dtype, scale=x.size, what="dbeta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((100, 4096), 1), ((4, 5, 6, 2000), -1), ((6, 4, 9000), 1)])
def test_cpu_threaded_kernels_on_many_blocks(dtype, shape, axis):
    """Large enough for the threaded kernels, with many chunks/blocks per thread to merge."""
    x = make(shape, dtype, offset=100.0)
    dy = make(shape, dtype, seed=5)
    y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, backend="cpu")
    exp_y, exp_mean, exp_invstd = ref.forward(x, axis=axis)
    ref.assert_close(mean, exp_mean, dtype, what="mean")
    ref.assert_close(invstd, exp_invstd, dtype, what="invstd")
    ref.assert_close(y, exp_y, dtype, what="y")
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, None, mean, invstd, axis=axis,
                                                   backend="cpu")
    exp_dx, exp_dgamma, exp_dbeta = ref.backward(dy, x, axis=axis)
    ref.assert_close(dx, exp_dx, dtype, what="dx")
    ref.assert_close(dgamma, exp_dgamma, dtype, scale=x.size, what="dgamma")
    ref.assert_close(dbeta, exp_dbeta, dtype, scale=x.size, what="dbeta")
