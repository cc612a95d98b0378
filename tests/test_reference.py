"""Tests for fastbp.reference: book numbers, numerical derivatives, contracts, validation, shapes."""

import math
import warnings

import numpy as np
import pytest
from fastbp_tests import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbp import reference as R
from fastbp.gradient import numerical_gradient_5pt, relative_error

DTYPES = [np.float32, np.float64]
NUM_MAX_REL = 1e-7  # backprop vs 5-point numerical derivative, float64


def rng(seed=0):
    return np.random.default_rng(seed)


def away_from_zero(r, shape, lo=0.2, hi=2.0):
    """Values with |v| in [lo, hi] and random sign (keeps ReLU perturbations off the kink)."""
    return r.uniform(lo, hi, shape) * r.choice([-1.0, 1.0], shape)


def numeric_wrt(f, arr):
    """5-point numerical gradient of the scalar f() with respect to arr (perturbed in place)."""
    return numerical_gradient_5pt(lambda _: f(), arr)


def lse_loss_oracle(x, labels):
    """Pure-Python mean(logsumexp(x_i) - x_i[t_i]) with math.fsum (independent of NumPy)."""
    rows = []
    for row, t in zip(np.asarray(x, dtype=np.float64).tolist(), labels):
        m = max(row)
        rows.append(m + math.log(math.fsum(math.exp(v - m) for v in row)) - row[t])
    return math.fsum(rows) / len(rows)


# ------------------------------------------------------------------------------------------
# book 1, chapter 5: the apple examples
# ------------------------------------------------------------------------------------------


def test_buy_apple_book_numbers():
    apple, apple_num, tax = 100, 2, 1.1
    mul_apple_layer, mul_tax_layer = R.MulLayer(), R.MulLayer()
    apple_price = mul_apple_layer.forward(apple, apple_num)
    price = mul_tax_layer.forward(apple_price, tax)
    assert price == pytest.approx(220)

    dapple_price, dtax = mul_tax_layer.backward(1)
    dapple, dapple_num = mul_apple_layer.backward(dapple_price)
    assert (dapple, dapple_num, dtax) == (pytest.approx(2.2), pytest.approx(110), pytest.approx(200))


def test_buy_apple_orange_book_numbers():
    apple, apple_num, orange, orange_num, tax = 100, 2, 150, 3, 1.1
    mul_apple, mul_orange, add, mul_tax = R.MulLayer(), R.MulLayer(), R.AddLayer(), R.MulLayer()
    apple_price = mul_apple(apple, apple_num)
    orange_price = mul_orange(orange, orange_num)
    all_price = add(apple_price, orange_price)
    price = mul_tax(all_price, tax)
    assert price == pytest.approx(715)

    dall_price, dtax = mul_tax.backward(1)
    dapple_price, dorange_price = add.backward(dall_price)
    dorange, dorange_num = mul_orange.backward(dorange_price)
    dapple, dapple_num = mul_apple.backward(dapple_price)
    got = (dapple_num, dapple, dorange, dorange_num, dtax)
    assert got == tuple(pytest.approx(v) for v in (110, 2.2, 3.3, 165, 650))


# ------------------------------------------------------------------------------------------
# backward vs numerical derivatives (float64, 5-point stencil, one element at a time)
# ------------------------------------------------------------------------------------------


def check_layer_numerically(forward, backward, inputs, dout):
    """Compare backward(dout) with d(sum(forward() * dout))/d(each array in inputs)."""
    out = forward()
    assert np.shape(out) == dout.shape
    analytic = backward(dout.copy())

    def f():
        return float(np.sum(np.asarray(forward(), dtype=np.float64) * dout))

    for name, arr in inputs.items():
        num = numeric_wrt(f, arr)
        err = relative_error(analytic[name], num)
        assert err <= NUM_MAX_REL, f"{name}: relative error {err:.3g}"


def test_relu_numerical():
    r = rng(1)
    x = away_from_zero(r, (4, 7))
    dout = r.standard_normal((4, 7))
    layer = R.Relu()
    check_layer_numerically(lambda: layer.forward(x), lambda d: {"x": layer.backward(d)}, {"x": x}, dout)


def test_sigmoid_numerical():
    r = rng(2)
    x = r.uniform(-5, 5, (3, 5))
    dout = r.standard_normal((3, 5))
    layer = R.Sigmoid()
    check_layer_numerically(lambda: layer.forward(x), lambda d: {"x": layer.backward(d)}, {"x": x}, dout)


@pytest.mark.parametrize("x_shape", [(4, 6), (3, 2, 3), (2, 1, 2, 3), (5, 1)])
def test_affine_numerical(x_shape):
    r = rng(3)
    x = r.standard_normal(x_shape)
    d = int(np.prod(x_shape[1:]))
    W, b = r.standard_normal((d, 5)), r.standard_normal(5)
    dout = r.standard_normal((x_shape[0], 5))
    layer = R.Affine(W, b)

    def backward(dd):
        dx = layer.backward(dd)
        assert dx.shape == x_shape
        return {"x": dx, "W": layer.dW, "b": layer.db}

    check_layer_numerically(lambda: layer.forward(x), backward, {"x": x, "W": W, "b": b}, dout)


def test_matmul_numerical():
    r = rng(4)
    x, W = r.standard_normal((3, 4)), r.standard_normal((4, 6))
    dout = r.standard_normal((3, 6))
    layer = R.MatMul(W)

    def backward(dd):
        dx = layer.backward(dd)
        return {"x": dx, "W": layer.grads[0]}

    check_layer_numerically(lambda: layer.forward(x), backward, {"x": x, "W": W}, dout)


@pytest.mark.parametrize("target", ["labels", "onehot"])
@pytest.mark.parametrize("dout", [1.0, 0.37])
def test_softmax_with_loss_numerical(target, dout):
    r = rng(5)
    x = r.standard_normal((5, 4)) * 2
    labels = np.array([0, 3, 1, 1, 2])
    t = labels if target == "labels" else np.eye(4)[labels]
    layer = R.SoftmaxWithLoss()
    layer.forward(x, t)
    dx = layer.backward(dout)
    num = numeric_wrt(lambda: dout * layer.forward(x, t), x)
    assert relative_error(dx, num) <= NUM_MAX_REL


@pytest.mark.parametrize("target", ["labels", "onehot"])
def test_softmax_with_loss_single_sample_numerical(target):
    x = np.array([0.3, -1.2, 2.0, 0.5])
    t = 2 if target == "labels" else np.eye(4)[2]
    layer = R.SoftmaxWithLoss()
    layer.forward(x, t)
    dx = layer.backward()
    assert dx.shape == (4,) and layer.y.shape == (4,)
    num = numeric_wrt(lambda: layer.forward(x, t), x)
    assert relative_error(dx, num) <= NUM_MAX_REL


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 3), (4, 1)), ((3,), ())])
@pytest.mark.parametrize("cls", [R.MulLayer, R.AddLayer])
def test_mul_add_numerical_with_broadcasting(cls, shapes):
    r = rng(6)
    x, y = (np.asarray(r.standard_normal(s)) for s in shapes)
    layer = cls()
    out = layer.forward(x, y)
    dout = r.standard_normal(np.shape(out))

    def backward(dd):
        dx, dy = layer.backward(dd)
        assert np.shape(dx) == x.shape and np.shape(dy) == y.shape
        return {"x": dx, "y": dy}

    check_layer_numerically(lambda: layer.forward(x, y), backward, {"x": x, "y": y}, dout)


def test_repeat_and_sum_numerical():
    r = rng(7)
    x = r.standard_normal((1, 5))
    rep = R.Repeat(7)
    dout = r.standard_normal((7, 5))
    check_layer_numerically(lambda: rep.forward(x), lambda d: {"x": rep.backward(d)}, {"x": x}, dout)

    x = r.standard_normal((6, 3))
    sm = R.Sum()
    dout = r.standard_normal((1, 3))
    check_layer_numerically(lambda: sm.forward(x), lambda d: {"x": sm.backward(d)}, {"x": x}, dout)


def test_repeat_sum_values():
    x = np.arange(4.0).reshape(1, 4)
    out = R.Repeat(3).forward(x)
    np.testing.assert_array_equal(out, np.vstack([x, x, x]))
    s = R.Sum()
    np.testing.assert_array_equal(s.forward(out), 3 * x)
    np.testing.assert_array_equal(s.backward(np.ones((1, 4))), np.ones((3, 4)))


# ------------------------------------------------------------------------------------------
# float32 vs float64 and dtype rules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["Relu", "Sigmoid", "Affine", "MatMul"])
def test_float32_matches_float64(name, dtype):
    r = rng(8)
    x64 = away_from_zero(r, (6, 5))
    W64, b64 = r.standard_normal((5, 3)), r.standard_normal(3)
    dout64 = r.standard_normal((6, 3) if name in ("Affine", "MatMul") else (6, 5))
    params = {"Affine": (W64, b64), "MatMul": (W64,)}.get(name, ())

    def run(dt):
        layer = getattr(R, name)(*[p.astype(dt) for p in params])
        out = layer.forward(x64.astype(dt))
        dx = layer.backward(dout64.astype(dt))
        return layer, out, dx

    layer, out, dx = run(dtype)
    _, out64, dx64 = run(np.float64)
    assert out.dtype == dtype and dx.dtype == dtype
    np.testing.assert_allclose(out, out64, **TOL[dtype])
    np.testing.assert_allclose(dx, dx64, **TOL[dtype])
    for g in layer.grads:
        assert g.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["labels", "onehot"])
def test_softmax_with_loss_dtypes(dtype, target):
    r = rng(9)
    x = (r.standard_normal((8, 5)) * 3).astype(dtype)
    labels = r.integers(0, 5, 8)
    t = labels if target == "labels" else np.eye(5, dtype=dtype)[labels]
    layer = R.SoftmaxWithLoss()
    loss = layer.forward(x, t)
    assert isinstance(loss, float)
    assert layer.y.dtype == dtype
    assert loss == pytest.approx(lse_loss_oracle(x, labels), rel=TOL[dtype]["rtol"])
    dx = layer.backward()
    assert dx.dtype == dtype
    expected = (layer.y.astype(np.float64) - np.eye(5)[labels]) / 8
    np.testing.assert_allclose(dx, expected, **TOL[dtype])


def test_mixed_dtypes_follow_result_type():
    r = rng(10)
    x32 = r.standard_normal((4, 3)).astype(np.float32)
    W64, b64 = r.standard_normal((3, 2)), r.standard_normal(2)
    layer = R.Affine(W64, b64)
    out = layer.forward(x32)
    assert out.dtype == np.result_type(x32, W64, b64) == np.float64
    np.testing.assert_allclose(out, x32.astype(np.float64) @ W64 + b64, **TOL[np.float64])
    layer.backward(np.ones((4, 2)))
    assert layer.dW.dtype == np.float64

    # float32 weights with float64 data: computed in float64, written into the float32 grads in place (book 2)
    W32, b32 = W64.astype(np.float32), b64.astype(np.float32)
    layer = R.Affine(W32, b32)
    kept = list(layer.grads)
    out = layer.forward(x32.astype(np.float64))
    assert out.dtype == np.float64
    layer.backward(np.ones((4, 2)))
    assert layer.dW.dtype == np.float32 and layer.grads[0] is layer.dW is kept[0] and layer.db is kept[1]
    np.testing.assert_allclose(layer.dW, x32.astype(np.float64).T @ np.ones((4, 2)), **TOL[np.float32])

    # int images promote with float weights; labels do not change the logits dtype
    assert R.Affine(W32, b32).forward(np.ones((2, 3), dtype=np.uint8)).dtype == np.float32
    sl = R.SoftmaxWithLoss()
    sl.forward(x32, np.array([0, 1, 0, 1], dtype=np.int64))
    assert sl.y.dtype == np.float32 and sl.backward().dtype == np.float32
    sl.forward(x32, np.eye(3)[[0, 1, 0, 1]])  # float64 one-hot with float32 logits
    assert sl.backward().dtype == np.result_type(np.float32, np.float64)


# ------------------------------------------------------------------------------------------
# in-place contracts and no mutation of inputs
# ------------------------------------------------------------------------------------------


def test_affine_keeps_references_and_sees_inplace_updates():
    r = rng(11)
    W, b = r.standard_normal((3, 2)), r.standard_normal(2)
    layer = R.Affine(W, b)
    assert layer.W is W and layer.b is b and layer.params[0] is W and layer.params[1] is b
    x = r.standard_normal((4, 3))
    out1 = layer.forward(x)
    W -= 0.5
    b += 1.0
    out2 = layer.forward(x)
    np.testing.assert_allclose(out2, x @ W + b, **TOL[np.float64])
    assert not np.allclose(out1, out2)

    # book-1 style reassignment goes to params as well
    W2 = r.standard_normal((3, 2))
    layer.W = W2
    assert layer.params[0] is W2
    np.testing.assert_allclose(layer.forward(x), x @ W2 + b, **TOL[np.float64])


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_grads_written_in_place(dtype):
    r = rng(12)
    W, b = r.standard_normal((3, 2)).astype(dtype), r.standard_normal(2).astype(dtype)
    layer = R.Affine(W, b)
    g0, g1 = layer.grads
    assert g0.shape == W.shape and g0.dtype == dtype and not g0.any()
    assert layer.dW is g0 and layer.db is g1
    for seed in range(2):
        x = rng(seed).standard_normal((5, 3)).astype(dtype)
        dout = rng(seed + 10).standard_normal((5, 2)).astype(dtype)
        layer.forward(x)
        layer.backward(dout)
        assert layer.grads[0] is g0 and layer.grads[1] is g1 and layer.dW is g0
        np.testing.assert_allclose(g0, x.T.astype(np.float64) @ dout, **TOL[dtype])
        np.testing.assert_allclose(g1, dout.astype(np.float64).sum(axis=0), **TOL[dtype])


def test_matmul_grads_written_in_place():
    W = rng(13).standard_normal((4, 2))
    layer = R.MatMul(W)
    g = layer.grads[0]
    x = rng(14).standard_normal((3, 4))
    layer.forward(x)
    layer.backward(np.ones((3, 2)))
    assert layer.grads[0] is g and layer.dW is g and layer.W is W
    np.testing.assert_allclose(g, x.T @ np.ones((3, 2)), **TOL[np.float64])


def test_relu_backward_does_not_modify_dout():
    x = np.array([[-1.0, 2.0], [3.0, -4.0]])
    dout = np.array([[10.0, 20.0], [30.0, 40.0]])
    dout_copy = dout.copy()
    layer = R.Relu()
    out = layer.forward(x)
    np.testing.assert_array_equal(out, [[0, 2], [3, 0]])
    np.testing.assert_array_equal(layer.mask, [[True, False], [False, True]])
    dx = layer.backward(dout)
    np.testing.assert_array_equal(dx, [[0, 20], [30, 0]])
    np.testing.assert_array_equal(dout, dout_copy)
    assert not np.shares_memory(dx, dout)
    assert not np.shares_memory(out, x)


LAYER_CASES = {
    "Relu": lambda r: (R.Relu(), (away_from_zero(r, (3, 4)),), None),
    "Sigmoid": lambda r: (R.Sigmoid(), (r.standard_normal((3, 4)),), None),
    "Affine": lambda r: (
        R.Affine(r.standard_normal((4, 2)), r.standard_normal(2)),
        (r.standard_normal((3, 2, 2)),),
        None,
    ),
    "MatMul": lambda r: (R.MatMul(r.standard_normal((4, 2))), (r.standard_normal((3, 4)),), None),
    "Mul": lambda r: (R.MulLayer(), (r.standard_normal((3, 4)), r.standard_normal(4)), None),
    "Add": lambda r: (R.AddLayer(), (r.standard_normal((3, 4)), r.standard_normal((3, 1))), None),
    "Repeat": lambda r: (R.Repeat(3), (r.standard_normal((1, 4)),), None),
    "Sum": lambda r: (R.Sum(), (r.standard_normal((3, 4)),), None),
    "SoftmaxWithLoss": lambda r: (R.SoftmaxWithLoss(), (r.standard_normal((3, 4)),), np.array([0, 3, 1])),
    "SoftmaxWithLoss-onehot": lambda r: (R.SoftmaxWithLoss(), (r.standard_normal((3, 4)),), np.eye(4)[[0, 3, 1]]),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_no_input_is_mutated(case):
    r = rng(15)
    layer, inputs, t = LAYER_CASES[case](r)
    params_before = [p.copy() for p in layer.params]
    inputs_before = [a.copy() for a in inputs]
    if t is not None:
        t_before = t.copy()
        layer(*inputs, t)  # __call__ is forward
        dout = 1.0
    else:
        out = layer(*inputs)
        dout = r.standard_normal(np.shape(out))
    dout_before = np.copy(dout)
    grads = layer.backward(dout)
    for a, a0 in zip(inputs, inputs_before):
        np.testing.assert_array_equal(a, a0)
    for p, p0 in zip(layer.params, params_before):
        np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(dout, dout_before)
    if t is not None:
        np.testing.assert_array_equal(t, t_before)
        assert layer.t is t  # targets kept as given
    for g in grads if isinstance(grads, tuple) else (grads,):
        for a in inputs + (np.asarray(dout),):
            assert not np.shares_memory(g, a)


# ------------------------------------------------------------------------------------------
# numerics: sigmoid range, softmax extremes, NaN, empty batch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_no_overflow_warnings(dtype):
    x = np.array([-1e4, -1000.0, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1000.0, 1e4], dtype=dtype)
    layer = R.Sigmoid()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
    assert out.dtype == dtype and np.all(np.isfinite(out)) and np.all(np.isfinite(dx))
    expected = np.array([1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in x.astype(float)])
    np.testing.assert_allclose(out, expected, **TOL[dtype])
    np.testing.assert_allclose(out + out[::-1], 1.0, **TOL[dtype])  # symmetry
    assert out[5] == 0.5


def test_sigmoid_int_input_and_scalar():
    layer = R.Sigmoid()
    out = layer.forward(np.array([0, 1, -2]))
    assert out.dtype == np.float64
    assert float(R.Sigmoid().forward(0.0)) == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_with_loss_extreme_logits_exact(dtype):
    x = np.array([[1e30, -1e30], [-1e30, 1e30], [1e30, 1e30]], dtype=dtype)
    layer = R.SoftmaxWithLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = layer.forward(x, np.array([1, 1, 0]))
        dx = layer.backward()
    rows = [float(dtype(1e30)) * 2, 0.0, math.log(2.0)]
    assert math.isfinite(loss)
    assert loss == pytest.approx(sum(rows) / 3, rel=TOL[dtype]["rtol"])
    np.testing.assert_allclose(layer.y, [[1, 0], [0, 1], [0.5, 0.5]], **TOL[dtype])
    np.testing.assert_allclose(dx, np.array([[1, -1], [0, 0], [-0.5, 0.5]]) / 3, **TOL[dtype])
    # one-hot form gives the same finite value
    assert R.SoftmaxWithLoss().forward(x, np.eye(2)[[1, 1, 0]]) == pytest.approx(loss, rel=1e-12)


def test_softmax_with_loss_large_loss_not_capped():
    # the book's log(y + 1e-7) would cap this at 16.1; the exact loss is 1000
    x = np.array([[0.0, 1000.0]])
    assert R.SoftmaxWithLoss().forward(x, np.array([0])) == pytest.approx(1000.0, rel=1e-12)


def test_nan_propagates():
    x = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]])
    sl = R.SoftmaxWithLoss()
    assert math.isnan(sl.forward(x, np.array([0, 1])))
    dx = sl.backward()
    assert np.all(np.isnan(dx[0])) and np.all(np.isfinite(dx[1]))
    assert np.isnan(R.Sigmoid().forward(np.array([np.nan]))[0])
    assert np.isnan(R.Relu().forward(np.array([np.nan]))[0])
    aff = R.Affine(np.ones((2, 2)), np.zeros(2))
    assert np.all(np.isnan(aff.forward(np.array([[np.nan, 1.0]]))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["labels", "onehot"])
def test_softmax_with_loss_empty_batch(dtype, target):
    x = np.zeros((0, 4), dtype=dtype)
    t = np.zeros(0, dtype=int) if target == "labels" else np.zeros((0, 4), dtype=dtype)
    layer = R.SoftmaxWithLoss()
    with pytest.warns(RuntimeWarning, match="empty batch"):
        loss = layer.forward(x, t)
    assert math.isnan(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx = layer.backward()
    assert dx.shape == (0, 4)


def test_affine_empty_batch():
    layer = R.Affine(np.ones((6, 2)), np.zeros(2))
    x = np.zeros((0, 2, 3))
    assert layer.forward(x).shape == (0, 2)
    dx = layer.backward(np.zeros((0, 2)))
    assert dx.shape == (0, 2, 3)
    np.testing.assert_array_equal(layer.dW, np.zeros((6, 2)))


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def test_affine_validation_messages():
    W, b = np.ones((3, 2)), np.zeros(2)
    with pytest.raises(ValueError, match=r"W must be 2-D.*got shape \(3,\)"):
        R.Affine(np.ones(3), b)
    with pytest.raises(ValueError, match=r"b must have shape \(2,\).*got \(3,\)"):
        R.Affine(W, np.zeros(3))
    layer = R.Affine(W, b)
    with pytest.raises(RuntimeError, match="backward called before"):
        layer.backward(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"x of shape \(4, 5\) has 5 features.*expects 3"):
        layer.forward(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"1-D x is read as N samples"):
        layer.forward(np.ones(3))
    layer.forward(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"dout must have the forward output's shape \(4, 2\), got \(4, 3\)"):
        layer.backward(np.ones((4, 3)))
    with pytest.raises(TypeError, match="dtype"):
        layer.forward(np.array([["a", "b", "c"]]))


def test_matmul_validation_messages():
    with pytest.raises(ValueError, match="W must be 2-D"):
        R.MatMul(np.ones((2, 2, 2)))
    layer = R.MatMul(np.ones((3, 2)))
    with pytest.raises(RuntimeError, match="before"):
        layer.backward(np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        layer.forward(np.ones(3))
    with pytest.raises(ValueError, match=r"4 columns.*expects 3"):
        layer.forward(np.ones((2, 4)))


@pytest.mark.parametrize("cls", [R.Relu, R.Sigmoid, R.Sum])
def test_elementwise_validation(cls):
    layer = cls()
    with pytest.raises(RuntimeError, match=f"{cls.__name__}.backward called before"):
        layer.backward(np.ones(3))
    layer.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dout must have the forward output's shape"):
        layer.backward(np.ones((3, 2)))


def test_mul_add_repeat_validation():
    for cls in (R.MulLayer, R.AddLayer):
        layer = cls()
        with pytest.raises(RuntimeError, match="before"):
            layer.backward(1.0)
        layer.forward(np.ones(3), 2.0)
        with pytest.raises(ValueError, match=r"shape \(3,\), got \(4,\)"):
            layer.backward(np.ones(4))
    with pytest.raises(ValueError, match="non-negative integer"):
        R.Repeat(-1)
    with pytest.raises(ValueError, match=r"shape \(1, \.\.\.\), got \(2, 3\)"):
        R.Repeat(2).forward(np.ones((2, 3)))


@pytest.mark.parametrize(
    "x, t, exc, match",
    [
        (np.zeros((3, 4)), np.array([0, 1, 4]), ValueError, r"label 4 out of range for C=4"),
        (np.zeros((3, 4)), np.array([0, -1, 2]), ValueError, r"labels must be >= 0, got -1"),
        (np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]), TypeError, r"labels must be integers, got dtype float64"),
        (np.zeros((3, 4)), np.array([0, 1]), ValueError, r"expected 3 label\(s\).*got 2"),
        (np.zeros((3, 4)), np.zeros((3, 5)), ValueError, r"one-hot width mismatch: logits have C=4"),
        (np.zeros((3, 4)), np.zeros((2, 4)), ValueError, r"expected 3 one-hot row\(s\).*got 2"),
        (
            np.zeros((2, 3, 4)),
            np.zeros((2, 3), dtype=int),
            ValueError,
            r"1-D \(C,\) or 2-D \(N, C\), got shape \(2, 3, 4\)",
        ),
        (np.zeros(()), np.array(0), ValueError, r"1-D \(C,\) or 2-D"),
        (np.zeros((3, 0)), np.zeros(3, dtype=int), ValueError, r"at least one class"),
        (np.zeros(4), np.array(4), ValueError, r"label 4 out of range"),
        (np.zeros(4), np.zeros(5), ValueError, r"one-hot width mismatch"),
        (np.zeros((3, 4)), np.zeros((3, 4, 1)), ValueError, r"t must be integer labels of shape \(3,\)"),
    ],
)
def test_softmax_with_loss_validation(x, t, exc, match):
    with pytest.raises(exc, match=match):
        R.SoftmaxWithLoss().forward(x, t)


def test_softmax_with_loss_backward_validation():
    layer = R.SoftmaxWithLoss()
    with pytest.raises(RuntimeError, match="before"):
        layer.backward()
    layer.forward(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"dout must be a scalar.*got shape \(2,\)"):
        layer.backward(np.ones(2))


def test_softmax_with_loss_dout_scales_and_book_semantics():
    r = rng(16)
    x = r.standard_normal((4, 3))
    t = np.array([2, 0, 1, 1])
    layer = R.SoftmaxWithLoss()
    loss = layer.forward(x, t)
    assert layer.loss == loss
    d1 = layer.backward()
    np.testing.assert_allclose(layer.backward(2.5), 2.5 * d1, **TOL[np.float64])
    # agrees with the book's log(y + 1e-7) loss up to ~1e-7 on ordinary logits
    book = -np.mean(np.log(layer.y[np.arange(4), t] + 1e-7))
    assert abs(loss - book) < 1e-6


# ------------------------------------------------------------------------------------------
# hypothesis: shapes (batch 1, odd sizes, C in {1, 2, 1000})
# ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 7),
    c=st.sampled_from([1, 2, 3, 7, 1000]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    onehot=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_softmax_with_loss_shapes_hypothesis(n, c, seed, scale, onehot, dtype):
    r = rng(seed)
    x = (r.standard_normal((n, c)) * scale).astype(dtype)
    labels = r.integers(0, c, n)
    t = np.eye(c, dtype=dtype)[labels] if onehot else labels
    layer = R.SoftmaxWithLoss()
    loss = layer.forward(x, t)
    assert loss >= 0
    assert loss == pytest.approx(lse_loss_oracle(x, labels), rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"])
    np.testing.assert_allclose(layer.y.sum(axis=1), 1.0, **TOL[dtype])
    dx = layer.backward()
    assert dx.shape == (n, c) and dx.dtype == dtype
    np.testing.assert_allclose(dx.sum(axis=1), 0.0, atol=10 * TOL[dtype]["atol"])
    if c == 1:
        assert loss == 0 and not dx.any()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    rest=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    h=st.sampled_from([1, 2, 5, 9]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_affine_shapes_hypothesis(n, rest, h, seed, dtype):
    r = rng(seed)
    x_shape = (n, *rest)
    d = int(np.prod(rest, dtype=int))
    x = r.standard_normal(x_shape).astype(dtype)
    W, b = r.standard_normal((d, h)).astype(dtype), r.standard_normal(h).astype(dtype)
    dout = r.standard_normal((n, h)).astype(dtype)
    layer = R.Affine(W, b)
    out = layer.forward(x)
    assert out.shape == (n, h) and out.dtype == dtype
    x2 = x.reshape(n, d).astype(np.float64)
    np.testing.assert_allclose(out, np.einsum("nd,dh->nh", x2, W.astype(np.float64)) + b, **TOL[dtype])
    dx = layer.backward(dout)
    assert dx.shape == x_shape
    np.testing.assert_allclose(dx.reshape(n, d), np.einsum("nh,dh->nd", dout, W.astype(np.float64)), **TOL[dtype])
    np.testing.assert_allclose(layer.dW, np.einsum("nd,nh->dh", x2, dout.astype(np.float64)), **TOL[dtype])
    np.testing.assert_allclose(layer.db, dout.astype(np.float64).sum(axis=0), **TOL[dtype])


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_relu_sigmoid_shapes_hypothesis(shape, seed, dtype):
    r = rng(seed)
    x = (r.standard_normal(shape) * 10).astype(dtype)
    dout = r.standard_normal(shape).astype(dtype)
    relu, sig = R.Relu(), R.Sigmoid()
    np.testing.assert_array_equal(relu.forward(x), np.where(x > 0, x, 0))
    np.testing.assert_array_equal(relu.backward(dout), np.where(x > 0, dout, 0))
    out = sig.forward(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert np.all((out >= 0) & (out <= 1))
    expected = np.array([1 / (1 + math.exp(-v)) for v in x.astype(float).ravel()]).reshape(shape)
    np.testing.assert_allclose(out, expected, **TOL[dtype])
    np.testing.assert_allclose(sig.backward(dout), dout * expected * (1 - expected), **TOL[dtype])
