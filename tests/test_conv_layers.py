"""Book 1, chapters 6-7: Convolution, Pooling, BatchNormalization, Dropout, and fastbp.util's im2col/col2im.

fastbp.layers against fastbp.reference (float32/float64), both against numerical derivatives (float64) and
against direct definitions (a naive convolution, a naive max pool), the book's attributes and in-place
contracts, the mask the book's Dropout draws, and bad inputs.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbp import _conv, _norm, _pool, util
from fastbp import layers as F
from fastbp import reference as R
from fastbp.gradient import gradient_check_layer

DTYPES = [np.float32, np.float64]
MODULES = [F, R]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}

# (N, C, H, W, FN, FH, FW, stride, pad): odd sizes, stride 1/2/3, padding, non-square, C = 1 and 3, batch 1
CONV_CASES = [
    (2, 1, 5, 5, 2, 3, 3, 1, 0),
    (1, 3, 7, 6, 4, 3, 2, 2, 1),
    (3, 3, 8, 9, 2, 2, 3, 3, 2),
    (2, 2, 6, 7, 3, 1, 1, 1, 0),
    (1, 1, 4, 4, 1, 4, 4, 1, 0),
    (2, 3, 5, 4, 2, 5, 3, 2, 1),
]
POOL_CASES = [  # (N, C, H, W, ph, pw, stride, pad)
    (2, 3, 6, 6, 2, 2, 2, 0),
    (1, 2, 7, 5, 2, 2, 2, 0),
    (2, 1, 7, 7, 3, 3, 2, 1),
    (1, 3, 5, 6, 2, 3, 1, 0),
    (2, 2, 6, 5, 3, 2, 3, 2),
]


def _rng(seed=0):
    return np.random.default_rng(seed)


def naive_conv(x, W, b, stride, pad):
    """out[n, f, i, j] = sum W[f] * padded-window + b[f], by explicit loops."""
    n, c, h, w = x.shape
    fn, _, fh, fw = W.shape
    xp = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    oh = (h + 2 * pad - fh) // stride + 1
    ow = (w + 2 * pad - fw) // stride + 1
    out = np.empty((n, fn, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * stride : i * stride + fh, j * stride : j * stride + fw]
            out[:, :, i, j] = np.tensordot(win, W, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def naive_pool(x, ph, pw, stride, pad):
    xp = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    n, c, h, w = x.shape
    oh = (h + 2 * pad - ph) // stride + 1
    ow = (w + 2 * pad - pw) // stride + 1
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = xp[:, :, i * stride : i * stride + ph, j * stride : j * stride + pw].max(axis=(2, 3))
    return out


def _distinct(shape, seed=0):
    """Values 0.01 apart and none within 0.005 of 0: no ties, no kink within a numerical-derivative step."""
    size = int(np.prod(shape))
    return ((_rng(seed).permutation(size) - size / 2 + 0.5) * 0.01).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_util_im2col_col2im_match_the_book_algorithm(case, dtype):
    n, c, h, w, _, fh, fw, s, p = case
    x = _rng().standard_normal((n, c, h, w)).astype(dtype)
    col = util.im2col(x, fh, fw, s, p)
    assert col.dtype == dtype
    np.testing.assert_array_equal(col, R.im2col_np(x, fh, fw, s, p))
    back = util.col2im(col, x.shape, fh, fw, s, p)
    np.testing.assert_allclose(back, R.col2im_np(col, x.shape, fh, fw, s, p), **TOL[dtype])
    # col2im is im2col's adjoint: <im2col(x), y> == <x, col2im(y)>
    y = _rng(1).standard_normal(col.shape)
    lhs = np.vdot(util.im2col(x.astype(np.float64), fh, fw, s, p), y)
    rhs = np.vdot(x.astype(np.float64), util.col2im(y, x.shape, fh, fw, s, p))
    assert abs(lhs - rhs) <= 1e-10 * (1 + abs(lhs))


def test_util_book_values():
    assert util.conv_output_size(28, 5) == 24
    assert util.conv_output_size(28, 5, stride=2) == 12.5  # the book's true division
    x = np.arange(2 * 1 * 3 * 3).reshape(2, 1, 3, 3)  # integer input -> float64 like the book
    col = util.im2col(x, 2, 2)
    assert col.dtype == np.float64 and col.shape == (8, 4)
    np.testing.assert_array_equal(col[0], [0, 1, 3, 4])
    np.testing.assert_array_equal(col[7], [13, 14, 16, 17])
    np.testing.assert_array_equal(util.col2im(np.ones((8, 4)), x.shape, 2, 2)[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(filter_h=8), "larger than the padded input"),
        (dict(stride=0), "stride"),
        (dict(pad=-1), "pad"),
    ],
)
def test_util_bad_geometry(bad, match):
    args = dict(filter_h=3, filter_w=3, stride=1, pad=0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        util.im2col(np.zeros((1, 1, 5, 5)), **args)
    with pytest.raises(ValueError, match="4-D"):
        util.im2col(np.zeros((5, 5)), 3, 3)


def test_kernels_reject_bad_buffers():
    x = np.zeros((1, 1, 5, 5), np.float32)
    with pytest.raises(TypeError, match="dtype float32"):
        _conv.im2col(x, 3, 3, 1, 0, np.zeros((9, 9)))
    with pytest.raises(ValueError, match="shape"):
        _conv.im2col(x, 3, 3, 1, 0, np.zeros((8, 9), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _conv.im2col(x, 3, 3, 1, 0, np.zeros((9, 18), np.float32)[:, ::2])
    ro = np.zeros((9, 9), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _conv.im2col(x, 3, 3, 1, 0, ro)
    buf = np.zeros(200, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        _conv.im2col(buf[:25].reshape(1, 1, 5, 5), 3, 3, 1, 0, buf[20:101].reshape(9, 9))
    out = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(TypeError, match="int32"):
        _pool.maxpool_forward(x[:, :, :4, :4].copy(), 2, 2, 2, 0, out, np.zeros((1, 1, 2, 2), np.int64))
    with pytest.raises(ValueError, match="out of range"):
        _pool.maxpool_backward(out, np.full((1, 1, 2, 2), 4, np.int32), 2, 2, 2, 0, np.zeros((1, 1, 4, 4), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------------------
def _conv_data(case, dtype, seed=0):
    n, c, h, w, fn, fh, fw, s, p = case
    rng = _rng(seed)
    return (
        rng.standard_normal((n, c, h, w)).astype(dtype),
        rng.standard_normal((fn, c, fh, fw)).astype(dtype),
        rng.standard_normal(fn).astype(dtype),
        s,
        p,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_forward_is_the_convolution(case, mod, dtype):
    x, W, b, s, p = _conv_data(case, dtype)
    layer = mod.Convolution(W, b, stride=s, pad=p)
    out = layer.forward(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(
        out,
        naive_conv(x.astype(np.float64), W.astype(np.float64), b.astype(np.float64), s, p),
        rtol=1e-4 if dtype == np.float32 else 1e-11,
        atol=1e-4 if dtype == np.float32 else 1e-11,
    )
    # the book's attributes
    assert layer.x is x or np.array_equal(layer.x, x)
    np.testing.assert_array_equal(layer.col, R.im2col_np(x, W.shape[2], W.shape[3], s, p))
    np.testing.assert_array_equal(layer.col_W, W.reshape(W.shape[0], -1).T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_fastbp_matches_reference(case, dtype):
    x, W, b, s, p = _conv_data(case, dtype)
    f, r = F.Convolution(W, b, s, p), R.Convolution(W.copy(), b.copy(), s, p)
    of, orf = f.forward(x), r.forward(x)
    np.testing.assert_allclose(of, orf, **TOL[dtype])
    dout = _rng(2).standard_normal(of.shape).astype(dtype)
    dxf, dxr = f.backward(dout), r.backward(dout)
    assert dxf.dtype == dtype and dxf.shape == x.shape
    np.testing.assert_allclose(dxf, dxr, **TOL[dtype])
    for gf, gr in zip(f.grads, r.grads):
        assert gf.dtype == dtype
        np.testing.assert_allclose(gf, gr, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_gradients_match_numerical(case, mod):
    x, W, b, s, p = _conv_data(case, np.float64, seed=3)
    errors = gradient_check_layer(mod.Convolution(W, b, stride=s, pad=p), x)
    assert set(errors) == {"x", "W", "b"}


def test_convolution_keeps_references_and_writes_grads_in_place():
    x, W, b, s, p = _conv_data(CONV_CASES[1], np.float64)
    layer = F.Convolution(W, b, s, p)
    assert layer.params[0] is W and layer.params[1] is b and layer.W is W
    dW, db = layer.grads
    out1 = layer.forward(x).copy()
    layer.backward(np.ones_like(out1))
    assert layer.grads[0] is dW and layer.grads[1] is db and layer.dW is dW
    W += 1.0  # the book's in-place update is seen at the next forward
    out2 = layer.forward(x)
    assert not np.allclose(out1, out2)
    np.testing.assert_allclose(out2, R.Convolution(W, b, s, p).forward(x), rtol=1e-12, atol=1e-12)
    newW = W * 2  # the book's load_params rebinds layer.W
    layer.W = newW
    assert layer.params[0] is newW
    np.testing.assert_allclose(layer.forward(x), R.Convolution(newW, b, s, p).forward(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
def test_convolution_promotes_like_numpy(mod):
    x, W, b, s, p = _conv_data(CONV_CASES[0], np.float32)
    W64, b64 = W.astype(np.float64), b.astype(np.float64)
    layer = mod.Convolution(W64, b64, s, p)  # the book: float32 images, float64 weights -> float64
    out = layer.forward(x)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, naive_conv(x.astype(np.float64), W64, b64, s, p), rtol=1e-11, atol=1e-11)
    dx = layer.backward(np.ones_like(out))
    assert dx.dtype == np.float64 and layer.dW.dtype == np.float64
    # integer images are promoted too
    xi = (x * 10).astype(np.int16)
    np.testing.assert_allclose(
        mod.Convolution(W64, b64, s, p).forward(xi),
        naive_conv(xi.astype(np.float64), W64, b64, s, p),
        rtol=1e-11,
        atol=1e-10,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_convolution_float32_grads_of_a_float64_layer_are_converted_in_place(dtype):
    x, W, b, s, p = _conv_data(CONV_CASES[1], dtype)
    layer = F.Convolution(W, b, s, p)
    g32 = np.zeros(W.shape, np.float32)
    layer.grads[0] = g32  # book 2: grads created once, written in place
    out = layer.forward(x)
    layer.backward(np.ones_like(out))
    assert layer.grads[0] is g32
    ref = R.Convolution(W, b, s, p)
    ref.backward(np.ones_like(ref.forward(x)))
    np.testing.assert_allclose(g32, ref.dW, rtol=1e-5, atol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    fn=st.integers(1, 3),
    fh=st.integers(1, 4),
    fw=st.integers(1, 4),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    layout=st.sampled_from(["C", "F", "strided", "negative"]),
    dtype=st.sampled_from(DTYPES),
)
def test_convolution_any_shape_and_layout(n, c, h, w, fn, fh, fw, s, p, layout, dtype):
    if fh > h + 2 * p or fw > w + 2 * p:
        with pytest.raises(ValueError, match="larger than the padded input"):
            F.Convolution(np.zeros((fn, c, fh, fw)), np.zeros(fn), s, p).forward(np.zeros((n, c, h, w)))
        return
    rng = _rng(n * 1000 + h * 10 + w)
    base = rng.standard_normal((n, c, h, 2 * w)).astype(dtype)
    x = {
        "C": np.ascontiguousarray(base[..., :w]),
        "F": np.asfortranarray(base[..., :w]),
        "strided": base[..., ::2],
        "negative": base[..., ::-2],
    }[layout]
    W = rng.standard_normal((fn, c, fh, fw)).astype(dtype)
    b = rng.standard_normal(fn).astype(dtype)
    f, r = F.Convolution(W, b, s, p), R.Convolution(W, b, s, p)
    of = f.forward(x)
    np.testing.assert_allclose(of, r.forward(np.ascontiguousarray(x)), **TOL[dtype])
    d = rng.standard_normal(of.shape).astype(dtype)
    np.testing.assert_allclose(f.backward(d[..., ::-1][..., ::-1]), r.backward(d), **TOL[dtype])
    np.testing.assert_allclose(f.dW, r.dW, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
def test_convolution_bad_inputs(mod):
    W, b = np.zeros((2, 3, 3, 3)), np.zeros(2)
    with pytest.raises(ValueError, match="4-D"):
        mod.Convolution(np.zeros((2, 27)), b)
    with pytest.raises(ValueError, match="b must have shape"):
        mod.Convolution(W, np.zeros(3))
    with pytest.raises(ValueError, match="stride"):
        mod.Convolution(W, b, stride=0)
    with pytest.raises(ValueError, match="pad"):
        mod.Convolution(W, b, pad=-1)
    layer = mod.Convolution(W, b)
    with pytest.raises(RuntimeError, match="before"):
        layer.backward(np.zeros((1, 2, 1, 1)))
    with pytest.raises(ValueError, match="channels"):
        layer.forward(np.zeros((1, 2, 5, 5)))
    with pytest.raises(ValueError, match="larger than the padded input"):
        layer.forward(np.zeros((1, 3, 2, 5)))
    with pytest.raises(ValueError, match="4-D"):
        layer.forward(np.zeros((3, 5, 5)))
    out = layer.forward(np.zeros((1, 3, 5, 5)))
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.zeros((1, 2, 3, 4)))
    assert out.shape == (1, 2, 3, 3)


# ---------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_pooling_matches_definition_reference_and_book_arg_max(case, dtype):
    n, c, h, w, ph, pw, s, p = case
    x = _rng().standard_normal((n, c, h, w)).astype(dtype)
    f, r = F.Pooling(ph, pw, s, p), R.Pooling(ph, pw, s, p)
    of = f.forward(x)
    np.testing.assert_array_equal(of, naive_pool(x, ph, pw, s, p))
    np.testing.assert_array_equal(of, r.forward(x))
    assert f.arg_max.dtype == r.arg_max.dtype and f.arg_max.shape == r.arg_max.shape
    np.testing.assert_array_equal(f.arg_max, r.arg_max)
    d = _rng(1).standard_normal(of.shape).astype(dtype)
    dxf = f.backward(d)
    assert dxf.dtype == dtype
    np.testing.assert_allclose(dxf, r.backward(d), **TOL[dtype])


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pooling_gradient_matches_numerical(case, mod):
    n, c, h, w, ph, pw, s, p = case
    gradient_check_layer(mod.Pooling(ph, pw, s, p), _distinct((n, c, h, w)))


def test_pooling_ties_padding_and_nan_like_the_book():
    x = np.array([[[[1.0, 1.0, -3.0], [0.5, 1.0, -1.0], [-2.0, -5.0, -4.0]]]])
    for pad in (0, 1):
        f, r = F.Pooling(2, 2, 1, pad), R.Pooling(2, 2, 1, pad)
        np.testing.assert_array_equal(f.forward(x), r.forward(x))  # padding counts as 0 (the book's im2col)
        np.testing.assert_array_equal(f.arg_max, r.arg_max)  # first maximum wins ties
    xn = x.copy()
    xn[0, 0, 1, 1] = np.nan
    f, r = F.Pooling(2, 2, 1), R.Pooling(2, 2, 1)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(f.forward(xn), r.forward(xn))
    np.testing.assert_array_equal(f.arg_max, r.arg_max)
    # the vectorised 2x2 stride-2 path: a NaN in any cell of a window, ties, -inf
    x4 = _rng().standard_normal((2, 3, 4, 6))
    x4[0, 0, 0, 1] = x4[0, 1, 1, 0] = x4[0, 2, 1, 1] = x4[1, 0, 0, 0] = np.nan
    x4[1, 1, 0, 2] = x4[1, 1, 1, 3] = 5.0
    x4[1, 2] = -np.inf
    for dtype in DTYPES:
        f, r = F.Pooling(2, 2, 2), R.Pooling(2, 2, 2)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(f.forward(x4.astype(dtype)), r.forward(x4.astype(dtype)))
        np.testing.assert_array_equal(f.arg_max, r.arg_max)


def test_pooling_bad_inputs_and_default_stride():
    assert R.Pooling(2, 2).stride == 1 and F.Pooling(2, 2).stride == 1  # the book's default
    for mod in MODULES:
        with pytest.raises(ValueError, match="pool_h"):
            mod.Pooling(0, 2)
        layer = mod.Pooling(3, 3, 2)
        with pytest.raises(ValueError, match="larger than the padded input"):
            layer.forward(np.zeros((1, 1, 2, 5)))
        with pytest.raises(RuntimeError, match="before"):
            layer.backward(np.zeros((1, 1, 1, 1)))
        layer.forward(np.zeros((1, 1, 5, 5)))
        with pytest.raises(ValueError, match="shape"):
            layer.backward(np.zeros((1, 1, 3, 3)))


def test_pooling_reuse_workspaces():
    x = _rng().standard_normal((2, 3, 6, 6))
    layer = F.Pooling(2, 2, 2, reuse=True)
    o1 = layer.forward(x)
    d1 = layer.backward(np.ones_like(o1))
    o2 = layer.forward(x * 2)
    assert o2 is o1 and layer.backward(np.ones_like(o1)) is d1
    fresh = F.Pooling(2, 2, 2)
    assert fresh.forward(x) is not fresh.forward(x)


# ---------------------------------------------------------------------------------------------------------------
# BatchNormalization
# ---------------------------------------------------------------------------------------------------------------
def _bn_data(shape, dtype, seed=0):
    rng = _rng(seed)
    d = int(np.prod(shape[1:]))
    return (
        rng.standard_normal(shape).astype(dtype) * 2 + 1,
        (1 + 0.1 * rng.standard_normal(d)).astype(dtype),
        (0.1 * rng.standard_normal(d)).astype(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (1, 4), (4, 2, 3, 3)])
def test_batchnorm_fastbp_matches_reference(shape, dtype):
    x, g, b = _bn_data(shape, dtype)
    f, r = F.BatchNormalization(g, b, momentum=0.8), R.BatchNormalization(g.copy(), b.copy(), momentum=0.8)
    for step in range(2):
        xs = x * (step + 1)
        of, orf = f.forward(xs), r.forward(xs)
        assert of.dtype == dtype and of.shape == shape
        np.testing.assert_allclose(
            of, orf, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4 if dtype == np.float32 else 1e-10
        )
        d = _rng(5 + step).standard_normal(shape).astype(dtype)
        tol = dict(rtol=1e-3, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(f.backward(d), r.backward(d), **tol)
        np.testing.assert_allclose(f.dgamma, r.dgamma, **tol)
        np.testing.assert_allclose(f.dbeta, r.dbeta, **tol)
        for name in ("running_mean", "running_var", "xc", "xn", "std"):
            np.testing.assert_allclose(getattr(f, name), getattr(r, name), **tol)
        assert f.running_mean.dtype == np.float64 and f.batch_size == shape[0]
    np.testing.assert_allclose(
        f.forward(x, train_flg=False),
        r.forward(x, train_flg=False),
        rtol=1e-4 if dtype == np.float32 else 1e-10,
        atol=1e-4 if dtype == np.float32 else 1e-10,
    )


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 2, 3), (1, 3)])
def test_batchnorm_gradients_match_numerical(shape, mod):
    x, g, b = _bn_data(shape, np.float64, seed=4)
    errors = gradient_check_layer(mod.BatchNormalization(g, b), x)
    assert set(errors) == {"x", "gamma", "beta"}


def test_batchnorm_running_stats_like_the_book():
    x, g, b = _bn_data((8, 3), np.float64)
    layer = F.BatchNormalization(g, b)  # momentum 0.9, stats start at zeros
    layer.forward(x)
    np.testing.assert_allclose(layer.running_mean, 0.1 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.1 * x.var(0), rtol=1e-12)
    out = layer.forward(x, train_flg=False)
    np.testing.assert_allclose(out, g * (x - layer.running_mean) / np.sqrt(layer.running_var + 1e-6) + b, rtol=1e-12)
    rm = np.ones(3)
    given = F.BatchNormalization(g, b, running_mean=rm, running_var=np.ones(3))
    given.forward(x)
    np.testing.assert_array_equal(rm, 1)  # like the book: the caller's array is not written
    np.testing.assert_allclose(given.running_mean, 0.9 + 0.1 * x.mean(0), rtol=1e-12)
    inplace = F.BatchNormalization(g, b, running_mean=rm, running_var=np.ones(3), reuse=True)
    inplace.forward(x)
    assert inplace.running_mean is rm  # reuse=True: updated in place (documented)
    np.testing.assert_allclose(rm, 0.9 + 0.1 * x.mean(0), rtol=1e-12)


def test_batchnorm_grads_in_place_and_bad_inputs():
    x, g, b = _bn_data((5, 4), np.float64)
    layer = F.BatchNormalization(g, b)
    dg, db = layer.grads
    layer.forward(x)
    layer.backward(np.ones_like(x))
    assert layer.grads[0] is dg and layer.dgamma is dg and layer.dbeta is db and layer.gamma is g
    for mod in MODULES:
        with pytest.raises(ValueError, match="gamma and beta"):
            mod.BatchNormalization(np.ones(3), np.zeros(4))
        layer = mod.BatchNormalization(np.ones(4), np.zeros(4))
        with pytest.raises(RuntimeError, match="before"):
            layer.backward(np.ones((2, 4)))
        with pytest.raises(ValueError, match="features"):
            layer.forward(np.ones((2, 5)))
        with pytest.raises(ValueError, match="non-empty|at least one"):
            layer.forward(np.ones((0, 4)))
        layer.forward(np.ones((2, 4)) * np.arange(2)[:, None])
        with pytest.raises(ValueError, match="shape"):
            layer.backward(np.ones((3, 4)))


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(100, 50), (3, 2, 5, 5), (7,)])
def test_dropout_draws_the_books_mask_under_np_random_seed(shape, dtype):
    x = _rng().standard_normal(shape).astype(dtype)
    np.random.seed(42)
    book_mask = np.random.rand(*x.shape) > 0.3  # the book's own line
    after = np.random.rand()
    np.random.seed(42)
    layer = F.Dropout(0.3)
    out = layer.forward(x)
    np.testing.assert_array_equal(layer.mask, book_mask)
    assert np.random.rand() == after  # the global generator advanced exactly as the book's
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, x * book_mask)
    d = _rng(1).standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(layer.backward(d), d * book_mask)
    np.testing.assert_array_equal(layer.forward(x, train_flg=False), x * (1.0 - 0.3))
    assert layer.forward(x, False).dtype == dtype


class _Seeded:
    """A Dropout whose every forward draws the same mask (for numerical derivatives)."""

    def __init__(self, layer):
        self.layer = layer
        self.params, self.grads = [], []

    def forward(self, x):
        np.random.seed(7)
        return self.layer.forward(x)

    def backward(self, dout):
        return self.layer.backward(dout)


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
def test_dropout_gradient_matches_numerical(mod):
    gradient_check_layer(_Seeded(mod.Dropout(0.4)), _rng().standard_normal((4, 6)))


def test_dropout_bad_inputs_and_reuse():
    for mod in MODULES:
        with pytest.raises(ValueError, match="dropout_ratio"):
            mod.Dropout(1.5)
        with pytest.raises(RuntimeError, match="before"):
            mod.Dropout().backward(np.ones(3))
        layer = mod.Dropout()
        layer.forward(np.ones((2, 3)))
        with pytest.raises(ValueError, match="shape"):
            layer.backward(np.ones((3, 2)))
    layer = F.Dropout(0.5, reuse=True)
    o1 = layer.forward(np.ones((4, 4)))
    assert layer.forward(np.ones((4, 4))) is o1
    assert _norm.dropout_backward is not None


def test_layers_export_the_book_names():
    for name in ("Dropout", "BatchNormalization", "Convolution", "Pooling"):
        assert name in F.__all__ and name in R.__all__
        assert issubclass(getattr(F, name), getattr(R, name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype, conv_algo):
    """Blocks of samples depend on N only and the partial gradients are added in block order: same bits."""
    from fastbp import _threads, _kernels

    old, old_gemm = _threads._get_num_threads(), _kernels._get_gemm_threads()
    rng = _rng(9)
    x = rng.standard_normal((21, 3, 16, 16)).astype(dtype)  # big enough for the blocks to run in parallel
    W = rng.standard_normal((8, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    W2 = rng.standard_normal((8, 8, 3, 3)).astype(dtype)  # 8 -> 8 channels, 16 wide: wide on the AVX-512 path
    # per-sample products above the GEMM's parallel size (784 x 16 x 72): cut into pieces by thread count unless
    # the GEMM inside a block plans for one thread (found on the AVX2 path, where no small-matrix pieces are used)
    x3 = rng.standard_normal((2, 8, 28, 28)).astype(dtype)
    W3, b3 = (0.1 * rng.standard_normal((16, 8, 3, 3))).astype(dtype), rng.standard_normal(16).astype(dtype)
    results = []
    try:
        for nt in (1, 3, 4, 16, 64):
            _threads._set_num_threads(nt)
            _kernels._set_gemm_threads(nt)  # the GEMMs inside the blocks too (FASTBP_NUM_THREADS sets both)
            conv, conv2, pool = F.Convolution(W, b, 1, 1), F.Convolution(W2, b, 1, 1), F.Pooling(2, 2, 2)
            out = conv.forward(x)
            out2 = conv2.forward(out)
            p = pool.forward(out2)
            dx2 = conv2.backward(pool.backward(np.ones_like(p)))
            dx = conv.backward(dx2)
            conv3 = F.Convolution(W3, b3, 1, 1)
            out3 = conv3.forward(x3)
            dx3 = conv3.backward(np.sin(out3))
            results.append([a.copy() for a in (out, out2, p, dx2, dx, conv.dW, conv.db, conv2.dW, conv2.db)])
            results[-1] += [out3.copy(), dx3.copy(), conv3.dW.copy(), conv3.db.copy()]
    finally:
        _threads._set_num_threads(old)
        _kernels._set_gemm_threads(old_gemm)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            np.testing.assert_array_equal(a, c)


def _layout(base, w, layout):
    return {
        "C": np.ascontiguousarray(base[..., :w]),
        "F": np.asfortranarray(base[..., :w]),
        "strided": base[..., ::2],
        "negative": base[..., ::-2],
    }[layout]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    ph=st.integers(1, 3),
    pw=st.integers(1, 3),
    s=st.integers(1, 3),
    p=st.integers(0, 1),
    layout=st.sampled_from(["C", "F", "strided", "negative"]),
    dtype=st.sampled_from(DTYPES),
)
def test_pooling_any_shape_and_layout(n, c, h, w, ph, pw, s, p, layout, dtype):
    if ph > h + 2 * p or pw > w + 2 * p:
        with pytest.raises(ValueError, match="larger than the padded input"):
            F.Pooling(ph, pw, s, p).forward(np.zeros((n, c, h, w), dtype))
        return
    x = _layout(_rng(h * 31 + w).standard_normal((n, c, h, 2 * w)).astype(dtype), w, layout)
    f, r = F.Pooling(ph, pw, s, p), R.Pooling(ph, pw, s, p)
    of = f.forward(x)
    np.testing.assert_array_equal(of, r.forward(np.ascontiguousarray(x)))
    np.testing.assert_array_equal(f.arg_max, r.arg_max)
    d = _layout(_rng(5).standard_normal(of.shape[:3] + (2 * of.shape[3],)).astype(dtype), of.shape[3], layout)
    np.testing.assert_allclose(f.backward(d), r.backward(np.ascontiguousarray(d)), **TOL[dtype])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    shape=st.sampled_from([(4,), (7,), (2, 2, 3), (1, 3, 3)]),
    layout=st.sampled_from(["C", "F", "strided", "negative"]),
    dtype=st.sampled_from(DTYPES),
    train=st.booleans(),
)
def test_batchnorm_and_dropout_any_shape_and_layout(n, shape, layout, dtype, train):
    last = shape[-1]
    x = _layout(_rng(n).standard_normal((n,) + shape[:-1] + (2 * last,)).astype(dtype), last, layout)
    d = int(np.prod(shape))
    g = (1 + 0.1 * _rng(1).standard_normal(d)).astype(dtype)
    b = (0.1 * _rng(2).standard_normal(d)).astype(dtype)
    f, r = F.BatchNormalization(g, b), R.BatchNormalization(g.copy(), b.copy())
    f.running_mean, f.running_var = np.full(d, 0.5), np.full(d, 2.0)
    r.running_mean, r.running_var = np.full(d, 0.5), np.full(d, 2.0)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(f.forward(x, train), r.forward(np.ascontiguousarray(x), train), **tol)
    if train:
        dout = _layout(_rng(3).standard_normal((n,) + shape[:-1] + (2 * last,)).astype(dtype), last, layout)
        np.testing.assert_allclose(f.backward(dout), r.backward(np.ascontiguousarray(dout)), **tol)
        np.testing.assert_allclose(f.dgamma, r.dgamma, **tol)
    np.random.seed(n)
    fd = F.Dropout(0.3)
    od = fd.forward(x, train)
    np.random.seed(n)
    rd = R.Dropout(0.3)
    np.testing.assert_array_equal(od, rd.forward(np.ascontiguousarray(x), train))
    if train:
        np.testing.assert_array_equal(fd.backward(x), rd.backward(np.ascontiguousarray(x)))


# ---------------------------------------------------------------------------------------------------------------
# Convolution: both kernel ways (im2col, and the stride-1 "wide" layout), need_dx, non-finite inputs
# ---------------------------------------------------------------------------------------------------------------
# (N, C, H, W, FN, FH, FW, stride, pad) where "auto" takes the wide layout (stride 1, C >= 8, rows >= 12), plus
# small stride-1 shapes that only the forced "wide" setting sends that way
WIDE_CASES = [
    (2, 8, 12, 13, 3, 3, 3, 1, 1),
    (3, 9, 14, 12, 4, 3, 2, 1, 0),
    (1, 8, 12, 14, 2, 5, 5, 1, 2),
    (2, 2, 5, 6, 3, 3, 3, 1, 1),
    (1, 3, 4, 5, 2, 2, 3, 1, 2),
]


@pytest.fixture(params=["auto", "wide", "im2col"])
def conv_algo(request):
    old = _conv._set_conv_algorithm(request.param)
    yield request.param
    _conv._set_conv_algorithm(old)


def test_conv_algorithm_choice():
    """On the AVX-512 path, DeepConvNet's layers 2-4 (16-32 channels, 14-28 wide) take the wide layout; one input
    channel, 8x8 outputs (a quarter more products) and stride 2 take im2col; on the other paths, everything."""
    deep = [((100, 1, 28, 28), 16, 1), ((100, 16, 28, 28), 16, 1), ((100, 16, 14, 14), 32, 1)]
    deep += [((100, 32, 14, 14), 32, 2), ((100, 32, 8, 8), 64, 1), ((100, 64, 8, 8), 64, 1)]
    got = [_conv.conv_algorithm(shape, fn, 3, 3, 1, pad) for shape, fn, pad in deep]
    wide = "wide" if _conv.simd_info()["path"] == "avx512" else "im2col"
    assert got == ["im2col", wide, wide, wide, "im2col", "im2col"]
    assert _conv.conv_algorithm((100, 1, 28, 28), 30, 5, 5, 1, 0) == "im2col"  # SimpleConvNet
    assert _conv.conv_algorithm((100, 16, 28, 28), 16, 3, 3, 2, 1) == "im2col"
    old = _conv._set_conv_algorithm("wide")
    try:
        assert _conv.conv_algorithm((100, 1, 28, 28), 16, 3, 3, 1, 1) == "wide"
        assert _conv.conv_algorithm((100, 16, 28, 28), 16, 3, 3, 2, 1) == "im2col"
    finally:
        _conv._set_conv_algorithm(old)
    with pytest.raises(ValueError, match="algorithm"):
        _conv._set_conv_algorithm("winograd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES + WIDE_CASES)
def test_convolution_each_way_matches_reference(case, dtype, conv_algo):
    x, W, b, s, p = _conv_data(case, dtype, seed=4)
    f, r = F.Convolution(W, b, s, p), R.Convolution(W.copy(), b.copy(), s, p)
    of, orf = f.forward(x), r.forward(x)
    np.testing.assert_allclose(of, orf, **TOL[dtype])
    np.testing.assert_array_equal(f.col, r.col)  # built from x on first read: the book's values
    dout = _rng(5).standard_normal(of.shape).astype(dtype)
    np.testing.assert_allclose(f.backward(dout), r.backward(dout), **TOL[dtype])
    loose = dict(rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)
    np.testing.assert_allclose(f.dW, r.dW, **loose)
    np.testing.assert_allclose(f.db, r.db, **loose)
    # need_dx=False: the same gradient bits, no dx
    dW, db = f.dW.copy(), f.db.copy()
    assert f.backward(dout, need_dx=False) is None
    np.testing.assert_array_equal(f.dW, dW)
    np.testing.assert_array_equal(f.db, db)


@pytest.mark.parametrize("case", [(2, 8, 5, 6, 2, 3, 3, 1, 1), (1, 3, 4, 5, 2, 2, 3, 1, 2)])
def test_convolution_each_way_gradients_match_numerical(case, conv_algo):
    x, W, b, s, p = _conv_data(case, np.float64, seed=6)
    errors = gradient_check_layer(F.Convolution(W, b, stride=s, pad=p), x)
    assert set(errors) == {"x", "W", "b"}


@pytest.mark.parametrize("mod", MODULES, ids=["fastbp", "reference"])
def test_convolution_need_dx_keyword(mod):
    """backward(dout, need_dx=False) (a fastbp extension) writes dW, db in place as usual and returns None;
    the constructor's need_dx=False makes that the default."""
    x, W, b, s, p = _conv_data(WIDE_CASES[0], np.float64)
    layer = mod.Convolution(W, b, s, p)
    dW, db = layer.grads
    out = layer.forward(x)
    d = _rng(7).standard_normal(out.shape)
    dx = layer.backward(d).copy()
    want_dW, want_db = dW.copy(), db.copy()
    dW[...] = 0
    db[...] = 0
    assert layer.backward(d, need_dx=False) is None
    assert layer.grads[0] is dW and layer.grads[1] is db
    np.testing.assert_array_equal(dW, want_dW)
    np.testing.assert_array_equal(db, want_db)
    np.testing.assert_array_equal(layer.backward(d), dx)  # the keyword does not stick
    if mod is F:
        quiet = F.Convolution(W, b, s, p, need_dx=False)
        quiet.forward(x)
        assert quiet.backward(d) is None
        np.testing.assert_array_equal(quiet.dW, want_dW)


@pytest.mark.parametrize("dtype", DTYPES)
def test_convolution_non_finite_like_the_book(dtype, conv_algo):
    """An inf or NaN in x or W spreads exactly as in the book's im2col + GEMM + col2im: the wide layout's
    garbage columns would multiply it by 0 (NaN) in cells the book leaves finite, so such a sample's dW (and a
    call with such a weight) takes the im2col way."""
    case = WIDE_CASES[0]
    x, W, b, s, p = _conv_data(case, dtype, seed=8)
    d = _rng(9).standard_normal((case[0], case[4], case[2], case[3])).astype(dtype)
    for what, value in (("x", np.inf), ("x", np.nan), ("W", -np.inf), ("W", np.nan)):
        xx, WW = x.copy(), W.copy()
        if what == "x":
            xx[1, 2, 3, 0] = value  # a left-edge pixel: the garbage columns of tap dx = 2 read it
        else:
            WW[1, 2, 0, 2] = value
        f, r = F.Convolution(WW, b, s, p), R.Convolution(WW.copy(), b.copy(), s, p)
        with np.errstate(invalid="ignore", over="ignore"):
            pairs = [(f.forward(xx), r.forward(xx)), (f.backward(d), r.backward(d)), (f.dW, r.dW), (f.db, r.db)]
        for got, want in pairs:
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
            fin = np.isfinite(want)
            np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4 if dtype == np.float32 else 1e-11, atol=1e-4)


@pytest.mark.parametrize("net_name", ["SimpleConvNet", "DeepConvNet"])
def test_convnets_gradient_skips_only_the_first_layers_dx(net_name):
    """fastbp's own nets call the first convolution's backward with need_dx=False (the images' gradient is never
    used); every other layer, and the book's structure (reference or module backend), computes dx as the book."""
    from fastbp import nets

    cls = getattr(nets, net_name)
    small = {"input_dim": (1, 12, 12)} if net_name == "SimpleConvNet" else {}
    x = _rng(10).random((2, 1, 28, 28) if net_name == "DeepConvNet" else (2, 1, 12, 12))
    t = np.array([3, 7])
    grads = {}
    for backend in ("fastbp", "reference", F):
        np.random.seed(3)
        net = cls(backend=backend, **small)
        layers = net._layer_list()
        calls = []
        for i, layer in enumerate(layers):

            def spy(dout, _orig=layer.backward, _i=i, **kw):
                calls.append((_i, kw.get("need_dx", True)))
                return _orig(dout, **kw)

            layer.backward = spy
        np.random.seed(4)
        key = backend if isinstance(backend, str) else "module"
        grads[key] = {k: np.array(v) for k, v in net.gradient(x, t).items()}
        skipped = [i for i, need in calls if not need]
        assert skipped == ([0] if backend == "fastbp" else [])
        # fastbp's own nets run each ReLU that feeds a Pooling inside that Pooling (tests/test_pool_layer.py)
        fused = net._fused
        assert bool(fused) == (backend == "fastbp")
        assert sorted(i for i, _ in calls) == [i for i in range(len(layers)) if i not in fused]
    for k, want in grads["reference"].items():
        np.testing.assert_allclose(grads["fastbp"][k], want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads["module"][k], want, rtol=1e-10, atol=1e-12)


_CONV_PATH_PROBE = r"""
import json, numpy as np
from fastbp import _conv, layers as F, reference as R
rng = np.random.default_rng(0)
_conv._simd_count(True)
worst = 0.0
for algo in ("wide", "im2col"):
    _conv._set_conv_algorithm(algo)
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((3, 8, 9, 10)).astype(dt)
        W = rng.standard_normal((4, 8, 3, 3)).astype(dt)
        b = rng.standard_normal(4).astype(dt)
        f, r = F.Convolution(W, b, 1, 1), R.Convolution(W, b, 1, 1)
        d = rng.standard_normal((3, 4, 9, 10)).astype(dt)
        pairs = [(f.forward(x), r.forward(x)), (f.backward(d), r.backward(d)), (f.dW, r.dW)]
        for got, want in pairs:
            worst = max(worst, float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
_conv._set_conv_algorithm("auto")
auto = _conv.conv_algorithm((100, 16, 28, 28), 16, 3, 3, 1, 1)
print(json.dumps({"counts": _conv._simd_count(False), "path": _conv.simd_info()["path"], "worst": worst,
                  "auto": auto}))
"""


@pytest.mark.parametrize("disabled,path", [(None, "avx512"), ("AVX512F", "avx2"), ("AVX", "baseline")])
def test_conv_kernels_run_the_chosen_simd_path(disabled, path):
    """_conv.h's kernels (padded copy, im2col/col2im, the wide layout's widen/unwiden) are dispatched like the
    rest: FASTBP_DISABLE_CPU_FEATURES moves them, and every path gives the reference's numbers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastbp import _kernels

    order = ["baseline", "avx2", "avx512"]
    if order.index(path) > order.index(_kernels.simd_info()["cpu"]):
        pytest.skip(f"this CPU (or build) has no {path} path")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "FASTBP_DISABLE_CPU_FEATURES")}
    if disabled is not None:
        env["FASTBP_DISABLE_CPU_FEATURES"] = disabled
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _CONV_PATH_PROBE], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["path"] == path
    assert got["counts"][path] > 0 and all(n == 0 for p, n in got["counts"].items() if p != path), got["counts"]
    assert got["worst"] < 1e-5
    assert got["auto"] == ("wide" if path == "avx512" else "im2col")  # the wide layout pays off with AVX-512's BLAS
