"""fold_linear / fold_conv: the folded layer equals linear (or conv) followed by BN in eval mode."""

import numpy as np
import pytest

import fastbn


def trained_bn(C, dtype, affine=True, seed=0, ndim=2):
    """A BN layer with non-trivial running statistics and parameters."""
    rng = np.random.default_rng(seed)
    bn = fastbn.BatchNorm1d(C, affine=affine, dtype=dtype) if ndim == 2 else \
        fastbn.BatchNorm2d(C, affine=affine, dtype=dtype)
    shape = (16, C) if ndim == 2 else (4, C, 3, 3)
    for _ in range(3):
        bn.forward((rng.standard_normal(shape) * 3 + 5).astype(dtype))
    if affine:
        bn.gamma[...] = rng.uniform(0.5, 2.0, C)
        bn.beta[...] = rng.standard_normal(C)
    return bn.eval()


TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_fold_linear_matches_pair(dtype, with_bias, affine, layout):
    rng = np.random.default_rng(1)
    d_in, d_out = 7, 5
    W = rng.standard_normal((d_in, d_out)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype) if with_bias else None
    bn = trained_bn(d_out, dtype, affine)
    x = rng.standard_normal((11, d_in)).astype(dtype)
    z = x @ W + (b if b is not None else 0)
    expected = bn.forward(z)
    W_given = W if layout == "in_out" else np.ascontiguousarray(W.T)
    Wf, bf = fastbn.fold_linear(W_given, b, bn, layout=layout)
    found = fastbn.fold_linear(W_given, b, bn)  # 7 inputs, 5 outputs: the layout is unambiguous
    np.testing.assert_array_equal(found[0], Wf)
    np.testing.assert_array_equal(found[1], bf)
    assert Wf.shape == W_given.shape and bf.shape == (d_out,)
    assert Wf.dtype == dtype and bf.dtype == dtype
    folded = x @ (Wf if layout == "in_out" else Wf.T) + bf
    np.testing.assert_allclose(folded, expected, **TOL[dtype])
    # the inputs are not modified
    np.testing.assert_array_equal(W_given, W if layout == "in_out" else W.T)


def test_fold_ignores_training_flag():
    bn = trained_bn(4, np.float64)
    W = np.eye(4)  # square: the layout must be named
    folded_eval = fastbn.fold_linear(W, None, bn, layout="in_out")
    bn.train()
    folded_train = fastbn.fold_linear(W, None, bn, layout="in_out")
    np.testing.assert_array_equal(folded_eval[0], folded_train[0])
    np.testing.assert_array_equal(folded_eval[1], folded_train[1])


def conv2d(x, W, b):
    """Direct 'valid' cross-correlation, NCHW x OIHW, as the reference the folding must match."""
    N, C, H, Wd = x.shape
    O, _, kh, kw = W.shape
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    y = np.einsum("nchwij,ocij->nohw", patches, W)
    return y + (b[None, :, None, None] if b is not None else 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_conv_matches_pair(dtype, kernel, with_bias, affine):
    rng = np.random.default_rng(2)
    c_in, c_out = 3, 4
    W = rng.standard_normal((c_out, c_in, kernel, kernel)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if with_bias else None
    bn = trained_bn(c_out, dtype, affine, ndim=4)
    x = rng.standard_normal((2, c_in, 6, 5)).astype(dtype)
    expected = bn.forward(conv2d(x, W, b).astype(dtype))
    Wf, bf = fastbn.fold_conv(W, b, bn)
    assert Wf.shape == W.shape and Wf.dtype == dtype and bf.dtype == dtype
    np.testing.assert_allclose(conv2d(x, Wf, bf), expected, **TOL[dtype])


def test_fold_conv_hwio_layout():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 3, 3, 3))
    bn = trained_bn(4, np.float64, ndim=4)
    Wf, bf = fastbn.fold_conv(W, None, bn)
    Wf_hwio, bf_hwio = fastbn.fold_conv(np.transpose(W, (2, 3, 1, 0)), None, bn, out_axis=-1)
    found_hwio = fastbn.fold_conv(np.transpose(W, (2, 3, 1, 0)), None, bn)
    np.testing.assert_array_equal(found_hwio[0], Wf_hwio)
    np.testing.assert_allclose(np.transpose(Wf_hwio, (3, 2, 0, 1)), Wf, rtol=1e-15)
    np.testing.assert_array_equal(bf, bf_hwio)


def test_errors():
    bn = trained_bn(5, np.float64)
    with pytest.raises(ValueError, match="track_running_stats"):
        fastbn.fold_linear(np.ones((3, 5)), None, fastbn.BatchNorm1d(5, track_running_stats=False))
    with pytest.raises(ValueError, match="no axis of 5 output features"):
        fastbn.fold_linear(np.ones((4, 3)), None, bn)
    with pytest.raises(ValueError, match="num_features=5"):
        fastbn.fold_linear(np.ones((5, 3)), None, bn, layout="in_out")
    with pytest.raises(ValueError, match="ambiguous: pass layout="):
        fastbn.fold_linear(np.ones((5, 5)), None, bn)
    with pytest.raises(ValueError, match="ambiguous: pass out_axis="):
        fastbn.fold_conv(np.ones((5, 3, 5, 5)), None, bn)
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        fastbn.fold_linear(np.ones((3, 5)), np.ones(3), bn)
    with pytest.raises(ValueError, match="layout"):
        fastbn.fold_linear(np.ones((3, 5)), None, bn, layout="oi")
    with pytest.raises(ValueError, match="2-D"):
        fastbn.fold_linear(np.ones((5, 3, 1, 1)), None, bn)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        fastbn.fold_linear(np.ones((3, 5), dtype=np.complex64), None, bn)
    with pytest.raises(TypeError, match="BatchNorm"):
        fastbn.fold_conv(np.ones((5, 3, 1, 1)), None, object())
