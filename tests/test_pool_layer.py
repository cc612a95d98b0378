"""Max pooling kernels (fastbp._pool) and the fused ReLU + max pooling of fastbp's own convolutional networks.

The 2x2 stride-2 kernels (AVX-512 / AVX2 / baseline, see _pool.h) against the book's rule written in NumPy
(np.argmax over each window: the first maximum, the first NaN) on random, tied and NaN inputs, every row length
around the vector widths, odd sizes; the fused ReLU (out = max(maxpool(x), 0), arg -1 where nothing flows back)
against Relu then Pooling; the nets' fused path against the same nets layer by layer and against the reference
backend (loss, gradients, the layers' book attributes).  `.ci/run` runs this file under every thread count and
SIMD path."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastbp import _kernels, _pool
from fastbp import layers as F
from fastbp import reference as R
from fastbp.nets import DeepConvNet, SimpleConvNet

DTYPES = (np.float32, np.float64)


def _windows(x):
    """(N, C, OH, OW, 4) 2x2 stride-2 windows in the book's order (top-left, top-right, bottom-left, ...)."""
    n, c, h, w = x.shape
    oh, ow = h // 2, w // 2
    v = x[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2)
    return v.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, 4)


def book_pool2(x, relu=False):
    """The book's Pooling(2, 2, 2) (np.argmax / np.max over each window) after the book's Relu if `relu`."""
    if relu:
        x = np.where(x <= 0, x.dtype.type(0), x)
    win = _windows(x)
    with np.errstate(invalid="ignore"):
        arg = np.argmax(win, axis=-1)
    return np.take_along_axis(win, arg[..., None], -1)[..., 0], arg


def book_pool2_backward(x, dout, relu=False):
    """dx of the book's Relu -> Pooling(2, 2, 2) for input x."""
    _, arg = book_pool2(x, relu)
    n, c, h, w = x.shape
    oh, ow = h // 2, w // 2
    dwin = np.zeros((n, c, oh, ow, 4), dout.dtype)
    np.put_along_axis(dwin, arg[..., None], dout[..., None], -1)
    dx = np.zeros_like(x, dtype=dout.dtype)
    dx[:, :, : 2 * oh, : 2 * ow] = (
        dwin.reshape(n, c, oh, ow, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * oh, 2 * ow)
    )
    if relu:
        dx[x <= 0] = 0
    return dx


def _inputs(shape, dtype, seed):
    """Random, tied (few distinct values, many zeros) and NaN-laden inputs."""
    rng = np.random.default_rng(seed)
    rnd = rng.standard_normal(shape).astype(dtype)
    tied = rng.integers(-2, 3, shape).astype(dtype)
    nan = rng.standard_normal(shape).astype(dtype)
    nan[rng.random(shape) < 0.1] = np.nan
    nan[rng.random(shape) < 0.05] = -np.inf
    return {"random": rnd, "tied": tied, "nan": nan}


# every row length around the vector widths (16/8 f32, 8/4 f64 outputs), odd heights and widths
SHAPES = [(2, 3, 24, 24), (1, 2, 5, 7), (2, 1, 4, 34), (1, 1, 6, 66), (3, 2, 2, 2), (1, 1, 9, 19), (1, 2, 3, 3)]


@pytest.mark.parametrize("relu", [False, True], ids=["pool", "relu-pool"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool2_kernels_follow_the_books_rule(shape, dtype, relu):
    oh, ow = shape[2] // 2, shape[3] // 2
    for kind, x in _inputs(shape, dtype, sum(shape)).items():
        out = np.full(shape[:2] + (oh, ow), 7, dtype)
        arg = np.full(out.shape, 9, np.int32)
        _pool.maxpool_forward(x, 2, 2, 2, 0, out, arg, relu)
        want, want_arg = book_pool2(x, relu)
        np.testing.assert_array_equal(out, want, err_msg=kind)
        if relu:  # -1 exactly where the window's max is <= 0 (the book's Relu zeroes its gradient)
            dead = np.nan_to_num(book_pool2(x)[0], nan=1.0) <= 0
            np.testing.assert_array_equal(arg < 0, dead, err_msg=kind)
            np.testing.assert_array_equal(np.maximum(arg, 0), want_arg, err_msg=kind)
        else:
            np.testing.assert_array_equal(arg, want_arg, err_msg=kind)
        dout = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
        dx = np.full(shape, 7, dtype)  # every cell must be written, the odd last row/column too
        _pool.maxpool_backward(dout, arg, 2, 2, 2, 0, dx)
        np.testing.assert_array_equal(dx, book_pool2_backward(x, dout, relu), err_msg=kind)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_fused_into_any_pooling_geometry(dtype):
    """The exact kernel (overlapping windows, padding) with the fused ReLU == Relu then Pooling."""
    x = _inputs((2, 3, 7, 8), dtype, 5)["tied"]
    for ph, pw, s, pad in [(3, 3, 2, 1), (2, 2, 1, 0), (2, 3, 2, 1)]:
        f, r, rr = F.Pooling(ph, pw, s, pad), R.Pooling(ph, pw, s, pad), R.Relu()
        out = f._forward_relu(x)
        np.testing.assert_array_equal(out, r.forward(rr.forward(x)))
        np.testing.assert_array_equal(f.arg_max, r.arg_max)
        d = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        # overlapping windows add up in another order than the book's col2im: rounding apart
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(f.backward(d), rr.backward(r.backward(d)), rtol=tol, atol=tol)


def test_backward_rejects_out_of_range_positions_and_takes_minus_one():
    for ph, s in ((2, 2), (3, 1)):
        x = np.zeros((1, 2, 6, 6), np.float32)
        oh = (6 - ph) // s + 1
        dout = np.ones((1, 2, oh, oh), np.float32)
        for bad in (ph * ph, -2):
            arg = np.zeros(dout.shape, np.int32)
            arg[0, 1, -1, -1] = bad
            with pytest.raises(ValueError, match="out of range"):
                _pool.maxpool_backward(dout, arg, ph, ph, s, 0, x)
        arg = np.full(dout.shape, -1, np.int32)
        x[...] = 5
        _pool.maxpool_backward(dout, arg, ph, ph, s, 0, x)
        assert not x.any()


def test_pool_module_runs_the_path_of_the_other_kernels():
    assert _pool.simd_info() == _kernels.simd_info()
    _pool._simd_count(True)
    x = np.ones((1, 1, 4, 4), np.float32)
    _pool.maxpool_forward(x, 2, 2, 2, 0, np.empty((1, 1, 2, 2), np.float32), np.empty((1, 1, 2, 2), np.int32))
    counts = _pool._simd_count(False)
    assert counts[_pool.simd_info()["path"]] == 1 and sum(counts.values()) == 1


# ---------------------------------------------------------------------------------------------------------------
# the networks' fused ReLU + pooling
# ---------------------------------------------------------------------------------------------------------------
def _digits(n, tied):
    d = np.load(__file__.rsplit("/tests/", 1)[0] + "/fastbp/data/mnist-5k.npz")
    x = (d["images"][:n] / 255).reshape(n, 1, 28, 28)
    if tied:  # a few grey levels: the convolution outputs tie in whole regions (blank ones give the bias)
        x = np.round(x * 2) / 2
    return x, d["labels"][:n]


def _nets(cls, dtype, **kw):
    np.random.seed(4)
    fused = cls(dtype=dtype, **kw)
    plain = cls(dtype=dtype, **kw)
    plain._fuse_relu_pool = False
    ref = cls(dtype=dtype, backend="reference", **kw)
    for k in fused.params:
        plain.params[k][...] = fused.params[k]
        ref.params[k][...] = fused.params[k]
    return fused, plain, ref


@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_simpleconvnet_fused_equals_layer_by_layer_and_the_reference(dtype, tied):
    fused, plain, ref = _nets(SimpleConvNet, dtype)
    x, t = _digits(6, tied)
    x = x.astype(dtype)
    for net in (fused, plain, ref):  # biases of both signs: live and dead windows, ties among positive values
        net.params["b1"][...] = np.linspace(-0.02, 0.02, 30).astype(dtype)
    losses = [net.loss(x, t) for net in (fused, plain, ref)]
    assert losses[0] == losses[1]
    np.testing.assert_allclose(losses[0], losses[2], rtol=1e-5 if dtype == np.float32 else 1e-12)
    grads = [{k: np.array(v) for k, v in net.gradient(x, t).items()} for net in (fused, plain, ref)]
    for k in grads[2]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k], err_msg=k)
        scale = np.max(np.abs(grads[2][k])) + 1e-30
        tol = 1e-5 if dtype == np.float32 else 1e-11
        assert np.max(np.abs(grads[0][k] - grads[2][k])) <= tol * scale, k
    assert 0 in fused.layers["Pool1"].arg_max  # the dead windows are there
    # the layers' book attributes are those of the layer-by-layer pass after a fused one (the same convolution
    # output: the reference's rounds differently, so a value near 0 may change sign)
    for name, attr in (("Relu1", "mask"), ("Pool1", "arg_max")):
        np.testing.assert_array_equal(getattr(fused.layers[name], attr), getattr(plain.layers[name], attr))
        assert getattr(fused.layers[name], attr).shape == getattr(ref.layers[name], attr).shape
    # and a user calling the layers directly gets the book's Relu backward
    d = np.ones(fused.layers["Conv1"]._out_shape, dtype)
    np.testing.assert_array_equal(fused.layers["Relu1"].backward(d), plain.layers["Relu1"].backward(d))


def test_deepconvnet_fused_equals_layer_by_layer():
    fused, plain, _ = _nets(DeepConvNet, np.float64)
    x, t = _digits(3, True)
    for net in (fused, plain):
        np.random.seed(2)  # the same dropout masks
        net.loss(x, t)
    np.random.seed(2)
    gf = {k: np.array(v) for k, v in fused.gradient(x, t).items()}
    np.random.seed(2)
    gp = plain.gradient(x, t)
    assert len(fused._fused) == 3 and not plain._fused
    for k in gp:
        np.testing.assert_array_equal(gf[k], gp[k], err_msg=k)


def test_fused_step_allocates_no_numpy_array():
    import tracemalloc

    net, _, _ = _nets(SimpleConvNet, np.float32)
    x, t = _digits(8, False)
    x = x.astype(np.float32)
    for _ in range(3):
        net.gradient(x, t)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        net.gradient(x, t)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 4096  # Python objects only (no 6 kB array of this batch)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 20),
    ph=st.integers(1, 3),
    pw=st.integers(1, 3),
    s=st.integers(1, 3),
    p=st.integers(0, 1),
    tied=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_fused_relu_pooling_equals_relu_then_pooling_for_any_geometry(n, c, h, w, ph, pw, s, p, tied, dtype):
    assume(ph <= h + 2 * p and pw <= w + 2 * p)
    rng = np.random.default_rng(n * 1000 + h * 30 + w)
    x = (rng.integers(-2, 3, (n, c, h, w)) if tied else rng.standard_normal((n, c, h, w))).astype(dtype)
    f, r, rr = F.Pooling(ph, pw, s, p), R.Pooling(ph, pw, s, p), R.Relu()
    out = f._forward_relu(x)
    np.testing.assert_array_equal(out, r.forward(rr.forward(x)))
    np.testing.assert_array_equal(f.arg_max, r.arg_max)
    d = rng.standard_normal(out.shape).astype(dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-14  # overlapping windows add in another order than col2im
    np.testing.assert_allclose(f.backward(d), rr.backward(r.backward(d)), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_bits_do_not_depend_on_the_thread_count(dtype):
    from fastbp import _threads

    old = _threads._get_num_threads()
    x = _inputs((40, 16, 24, 24), dtype, 9)["random"]  # big enough for several blocks
    results = []
    try:
        for nt in (1, 3, 4):
            _threads._set_num_threads(nt)
            got = []
            for relu in (False, True):
                f = F.Pooling(2, 2, 2)
                out = f._forward_relu(x) if relu else f.forward(x)
                got += [out.copy(), f.arg_max.copy(), f.backward(np.ones_like(out)).copy()]
            g = F.Pooling(3, 3, 2, 1)
            out = g._forward_relu(x)
            got += [out.copy(), g.backward(np.ones_like(out)).copy()]
            results.append(got)
    finally:
        _threads._set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
