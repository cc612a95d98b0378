"""Tests for fastbp.gradient: numerical_gradient (book semantics), relative_error, gradient checks."""

from collections import OrderedDict

import numpy as np
import pytest
from fastbp_tests import NUM_TOL

from fastbp import reference as R
from fastbp.gradient import (
    GradientCheckError,
    gradient_check,
    gradient_check_layer,
    gradient_check_model,
    numerical_gradient,
    numerical_gradient_5pt,
    relative_error,
)

DTYPES = [np.float32, np.float64]
# central differences with h = 1e-4: O(h^2) truncation, O(eps/h) rounding


def rng(seed=0):
    return np.random.default_rng(seed)


def away_from_zero(r, shape, lo=0.2, hi=2.0):
    return r.uniform(lo, hi, shape) * r.choice([-1.0, 1.0], shape)


# ------------------------------------------------------------------------------------------
# numerical_gradient
# ------------------------------------------------------------------------------------------


def test_book_function_2_example():
    def function_2(x):
        return x[0] ** 2 + x[1] ** 2

    np.testing.assert_allclose(numerical_gradient(function_2, np.array([3.0, 4.0])), [6.0, 8.0], rtol=1e-9)
    np.testing.assert_allclose(numerical_gradient(function_2, np.array([0.0, 2.0])), [0.0, 4.0], atol=1e-9)
    np.testing.assert_allclose(numerical_gradient(function_2, np.array([3.0, 0.0])), [6.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 2)])
def test_matches_analytic_gradients(shape, dtype):
    r = rng(1)
    x = r.uniform(-1.5, 1.5, shape).astype(dtype)
    a = r.standard_normal(shape)

    def f(z):
        z = z.astype(np.float64)
        return np.sum(np.sin(z) * a) + 0.5 * np.sum(z**3)

    expected = np.cos(x.astype(np.float64)) * a + 1.5 * x.astype(np.float64) ** 2
    grad = numerical_gradient(f, x)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    np.testing.assert_allclose(grad, expected, **NUM_TOL[dtype])


def test_five_point_is_more_accurate():
    x = np.array([0.3, -0.7, 1.1])

    def f(z):
        return np.sum(np.exp(z))

    err3 = np.max(np.abs(numerical_gradient(f, x.copy(), h=1e-2) - np.exp(x)))
    err5 = np.max(np.abs(numerical_gradient_5pt(f, x.copy(), h=1e-2) - np.exp(x)))
    err5b = np.max(np.abs(numerical_gradient(f, x.copy(), h=1e-2, order=4) - np.exp(x)))
    assert err5 == err5b
    assert err5 < err3 / 1e3
    np.testing.assert_allclose(numerical_gradient_5pt(f, x), np.exp(x), rtol=1e-11)


def test_zero_when_function_is_locally_constant():
    x = np.array([-1.0, -2.0, 3.0])
    g2 = numerical_gradient(lambda z: np.sum(np.maximum(z, 0)), x)
    g4 = numerical_gradient_5pt(lambda z: np.sum(np.maximum(z, 0)), x)
    np.testing.assert_array_equal(g2[:2], 0.0)
    np.testing.assert_array_equal(g4[:2], 0.0)


@pytest.mark.parametrize("order", [2, 4])
def test_x_restored_exactly_and_f_gets_x(order):
    x = np.array([[0.1, 1 / 3, -0.0], [1e-300, -7.25e10, np.pi]])
    before = x.copy()
    seen = []

    def f(z):
        seen.append(z is x)
        return float(np.sum(z * z))

    numerical_gradient(f, x, order=order)
    assert all(seen) and len(seen) == x.size * order
    assert x.tobytes() == before.tobytes()  # bit-for-bit, including -0.0


def test_x_restored_when_f_raises():
    x = np.array([1.0, 2.0, 3.0])
    before = x.copy()
    calls = []

    def f(z):
        calls.append(1)
        if len(calls) == 4:
            raise ZeroDivisionError("boom")
        return float(z.sum())

    with pytest.raises(ZeroDivisionError):
        numerical_gradient(f, x)
    assert x.tobytes() == before.tobytes()


def test_noncontiguous_view_is_perturbed_in_place():
    base = np.arange(12.0).reshape(3, 4)
    view = base[:, ::2]
    before = base.copy()
    grad = numerical_gradient(lambda z: float(np.sum(z**2)), view)
    np.testing.assert_allclose(grad, 2 * view, rtol=1e-7)
    np.testing.assert_array_equal(base, before)


def test_empty_array():
    grad = numerical_gradient(lambda z: 0.0, np.zeros((0, 3)))
    assert grad.shape == (0, 3)


def test_numerical_gradient_validation():
    with pytest.raises(TypeError, match="must be a NumPy array.*got list"):
        numerical_gradient(lambda z: 0.0, [1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point array, got dtype int64"):
        numerical_gradient(lambda z: 0.0, np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="order must be 2 or 4, got 3"):
        numerical_gradient(lambda z: 0.0, np.ones(2), order=3)
    with pytest.raises(ValueError, match="h must be a positive finite number"):
        numerical_gradient(lambda z: 0.0, np.ones(2), h=0.0)
    with pytest.raises(ValueError, match=r"f must return a scalar, got an array of shape \(2,\)"):
        numerical_gradient(lambda z: z * 2, np.ones(2))
    ro = np.ones(2)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        numerical_gradient(lambda z: 0.0, ro)


# ------------------------------------------------------------------------------------------
# relative_error
# ------------------------------------------------------------------------------------------


def test_relative_error_definition():
    a = np.array([1.0, -2.0, 0.0, 0.0])
    n = np.array([1.1, -2.0, 0.0, 1e-3])
    # elementwise |a-n|/max(|a|,|n|): 0.1/1.1, 0, 0 (0/tiny), 1
    assert relative_error(a, n) == 1.0
    assert relative_error(a[:2], n[:2]) == pytest.approx(0.1 / 1.1)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(a, n, floor=1.0) == pytest.approx(0.1 / 1.1)
    assert relative_error(np.zeros(0), np.zeros(0)) == 0.0
    assert np.isnan(relative_error(np.array([np.nan]), np.array([1.0])))
    with pytest.raises(ValueError, match=r"shapes differ: \(2,\) vs \(3,\)"):
        relative_error(np.ones(2), np.ones(3))


# ------------------------------------------------------------------------------------------
# gradient_check_layer on correct layers
# ------------------------------------------------------------------------------------------


def layer_cases(dtype):
    r = rng(2)
    W = r.standard_normal((6, 4)).astype(dtype)
    b = r.standard_normal(4).astype(dtype)
    return {
        "Affine": (R.Affine(W, b), r.standard_normal((3, 2, 3)).astype(dtype), {"x", "W", "b"}),
        "MatMul": (R.MatMul(W.copy()), r.standard_normal((3, 6)).astype(dtype), {"x", "W"}),
        "Relu": (R.Relu(), away_from_zero(r, (3, 5)).astype(dtype), {"x"}),
        "Sigmoid": (R.Sigmoid(), r.standard_normal((3, 5)).astype(dtype), {"x"}),
        "Repeat": (R.Repeat(4), r.standard_normal((1, 5)).astype(dtype), {"x"}),
        "Sum": (R.Sum(), r.standard_normal((4, 5)).astype(dtype), {"x"}),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["Affine", "MatMul", "Relu", "Sigmoid", "Repeat", "Sum"])
def test_gradient_check_layer_passes(name, dtype):
    layer, x, keys = layer_cases(dtype)[name]
    x_before = x.copy()
    params_before = [p.copy() for p in layer.params]
    errors = gradient_check_layer(layer, x)
    assert set(errors) == keys
    limit = 1e-5 if dtype == np.float64 else 5e-2
    assert max(errors.values()) <= limit
    np.testing.assert_array_equal(x, x_before)  # x copied, never written
    for p, p0 in zip(layer.params, params_before):  # params restored exactly
        assert p.tobytes() == p0.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["labels", "onehot"])
def test_gradient_check_loss_layer(dtype, target):
    r = rng(3)
    x = r.standard_normal((4, 5)).astype(dtype)
    labels = np.array([0, 4, 2, 2])
    t = labels if target == "labels" else np.eye(5, dtype=dtype)[labels]
    errors = gradient_check_layer(R.SoftmaxWithLoss(), x, t=t, dout=0.5)
    assert set(errors) == {"x"}
    assert errors["x"] <= (1e-5 if dtype == np.float64 else 5e-2)


def test_gradient_check_five_point_is_tighter():
    layer, x, _ = layer_cases(np.float64)["Affine"]
    e2 = gradient_check_layer(layer, x, order=2)
    e4 = gradient_check_layer(layer, x, order=4, h=1e-3, floor=0)
    assert max(e4.values()) < 1e-8 and max(e4.values()) < max(e2.values())


def test_gradient_check_multi_input_layer():
    r = rng(4)
    x, y = r.standard_normal((3, 4)), r.standard_normal(4)
    errors = gradient_check_layer(R.MulLayer(), (x, y))
    assert set(errors) == {"x0", "x1"} and max(errors.values()) < 1e-7


def test_gradient_check_leaves_layer_state_at_base_point():
    layer, x, _ = layer_cases(np.float64)["Affine"]
    gradient_check_layer(layer, x)
    np.testing.assert_array_equal(layer.x, x.reshape(3, 6))


def test_gradient_check_book1_style_layer():
    """A layer with only book-1 attributes W/b/dW/db (no params list)."""

    class Book1Affine:
        def __init__(self, W, b):
            self.W, self.b = W, b

        def forward(self, x):
            self.x = x
            return x @ self.W + self.b

        def backward(self, dout):
            self.dW = self.x.T @ dout
            self.db = dout.sum(axis=0)
            return dout @ self.W.T

    r = rng(5)
    layer = Book1Affine(r.standard_normal((3, 2)), r.standard_normal(2))
    errors = gradient_check_layer(layer, r.standard_normal((4, 3)))
    assert set(errors) == {"x", "W", "b"} and max(errors.values()) < 1e-7


# ------------------------------------------------------------------------------------------
# the check can fail: deliberately wrong backward passes
# ------------------------------------------------------------------------------------------


class WrongBiasAffine(R.Affine):
    def backward(self, dout):
        dx = super().backward(dout)
        self.db[...] = 2 * self.db  # bug: doubled bias gradient
        return dx


class WrongSigmoid(R.Sigmoid):
    def backward(self, dout):
        return dout * self.out  # bug: forgot (1 - out)


class UnaveragedSoftmaxWithLoss(R.SoftmaxWithLoss):
    def backward(self, dout=1):
        return super().backward(dout) * self.y.shape[0]  # bug: forgot / N


class WrongShapeAffine(R.Affine):
    def backward(self, dout):
        return super().backward(dout).reshape(-1)  # bug: flattened dx


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_bias_gradient_is_caught(dtype):
    r = rng(6)
    layer = WrongBiasAffine(r.standard_normal((3, 2)).astype(dtype), r.standard_normal(2).astype(dtype))
    x = r.standard_normal((4, 3)).astype(dtype)
    with pytest.raises(GradientCheckError, match=r"worst is 'b' with relative error 0\.5") as info:
        gradient_check_layer(layer, x)
    assert isinstance(info.value, AssertionError)
    assert info.value.worst == "b"
    assert info.value.errors["b"] == pytest.approx(0.5, rel=1e-2)
    limit = 1e-5 if dtype == np.float64 else 5e-2
    assert info.value.errors["W"] <= limit and info.value.errors["x"] <= limit
    # report-only mode returns the same numbers
    errors = gradient_check_layer(layer, x, raise_on_failure=False)
    assert errors["b"] == pytest.approx(0.5, rel=1e-2)


def test_wrong_sigmoid_and_loss_are_caught():
    r = rng(7)
    with pytest.raises(GradientCheckError, match="'x'"):
        gradient_check_layer(WrongSigmoid(), r.standard_normal((3, 4)))
    with pytest.raises(GradientCheckError, match="'x'"):
        gradient_check_layer(UnaveragedSoftmaxWithLoss(), r.standard_normal((5, 3)), t=np.array([0, 1, 2, 0, 1]))
    with pytest.raises(GradientCheckError, match=r"shape \(12,\), expected \(4, 3\)"):
        gradient_check_layer(WrongShapeAffine(np.ones((3, 2)), np.zeros(2)), r.standard_normal((4, 3)))


def test_nan_gradient_fails_the_check():
    class NanRelu(R.Relu):
        def backward(self, dout):
            dx = super().backward(dout)
            dx[0, 0] = np.nan
            return dx

    x = away_from_zero(rng(12), (2, 3))
    with pytest.raises(GradientCheckError, match="worst is 'x' with relative error nan"):
        gradient_check_layer(NanRelu(), x)


def test_threshold_argument():
    r = rng(8)
    layer = R.Sigmoid()
    x = r.standard_normal((3, 4))
    errors = gradient_check_layer(layer, x)
    worst = max(errors.values())
    assert worst > 0
    with pytest.raises(GradientCheckError):
        gradient_check_layer(layer, x, threshold=worst / 10)
    assert gradient_check_layer(layer, x, threshold=worst * 10) == errors


def test_gradient_check_layer_validation():
    with pytest.raises(ValueError, match=r"dout must have the forward output's shape \(3, 4\), got \(4, 3\)"):
        gradient_check_layer(R.Sigmoid(), np.ones((3, 4)), dout=np.ones((4, 3)))
    with pytest.raises(ValueError, match="must be a scalar"):
        gradient_check_layer(R.SoftmaxWithLoss(), np.ones((2, 3)), t=np.array([0, 1]), dout=np.ones(2))


# ------------------------------------------------------------------------------------------
# models: book-1 TwoLayerNet API and book-2 params/grads lists
# ------------------------------------------------------------------------------------------


class TwoLayerNet:
    """The book-1 chapter-5 network on fastbp.reference layers."""

    def __init__(self, input_size, hidden_size, output_size, dtype=np.float64, seed=0, bug=False):
        r = rng(seed)
        self.params = {
            "W1": (0.5 * r.standard_normal((input_size, hidden_size))).astype(dtype),
            "b1": (0.1 * r.standard_normal(hidden_size)).astype(dtype),
            "W2": (0.5 * r.standard_normal((hidden_size, output_size))).astype(dtype),
            "b2": (0.1 * r.standard_normal(output_size)).astype(dtype),
        }
        self.layers = OrderedDict()
        self.layers["Affine1"] = R.Affine(self.params["W1"], self.params["b1"])
        self.layers["Sigmoid"] = R.Sigmoid()
        self.layers["Affine2"] = R.Affine(self.params["W2"], self.params["b2"])
        self.lastLayer = R.SoftmaxWithLoss()
        self.bug = bug

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        return self.lastLayer.forward(self.predict(x), t)

    def gradient(self, x, t):
        self.loss(x, t)
        dout = self.lastLayer.backward(1)
        for layer in reversed(list(self.layers.values())):
            dout = layer.backward(dout)
        grads = {
            "W1": self.layers["Affine1"].dW,
            "b1": self.layers["Affine1"].db,
            "W2": self.layers["Affine2"].dW,
            "b2": self.layers["Affine2"].db,
        }
        if self.bug:
            grads["b2"] = grads["b2"] + 0.1
        return grads


class Book2Net:
    """Book-2 style: params/grads lists, forward(x, t) -> loss, backward(dout=1)."""

    def __init__(self, seed=0):
        r = rng(seed)
        self.layers = [
            R.Affine(r.standard_normal((4, 5)), r.standard_normal(5)),
            R.Sigmoid(),
            R.MatMul(r.standard_normal((5, 3))),
        ]
        self.loss_layer = R.SoftmaxWithLoss()
        self.params, self.grads = [], []
        for layer in self.layers:
            self.params += layer.params
            self.grads += layer.grads

    def forward(self, x, t):
        for layer in self.layers:
            x = layer.forward(x)
        return self.loss_layer.forward(x, t)

    def backward(self, dout=1):
        dout = self.loss_layer.backward(dout)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_check_model_book1(dtype):
    r = rng(9)
    net = TwoLayerNet(6, 5, 3, dtype=dtype)
    x = r.random((4, 6)).astype(dtype)
    t = np.eye(3, dtype=dtype)[[0, 2, 1, 1]]
    before = {k: v.copy() for k, v in net.params.items()}
    errors = gradient_check_model(net, x, t)
    assert set(errors) == {"W1", "b1", "W2", "b2"}
    assert max(errors.values()) <= (1e-5 if dtype == np.float64 else 5e-2)
    for k, v in net.params.items():
        assert v.tobytes() == before[k].tobytes()
    assert gradient_check(net, x, t) == errors  # dispatcher picks the model check
    assert set(gradient_check_model(net, x, t, keys=["b2"])) == {"b2"}


def test_gradient_check_model_book1_bug_is_caught():
    r = rng(10)
    net = TwoLayerNet(6, 5, 3, bug=True)
    x, t = r.random((4, 6)), np.array([0, 2, 1, 1])
    with pytest.raises(GradientCheckError, match=r"worst is 'b2'") as info:
        gradient_check_model(net, x, t)
    assert info.value.errors["W1"] <= 1e-5
    errors = gradient_check_model(net, x, t, raise_on_failure=False)
    assert errors["b2"] > 1e-2


def test_gradient_check_model_book2():
    r = rng(11)
    net = Book2Net()
    x, t = r.standard_normal((5, 4)), np.array([0, 1, 2, 1, 0])
    errors = gradient_check_model(net, x, t)
    assert set(errors) == {"params[0]", "params[1]", "params[2]"}
    assert max(errors.values()) <= 1e-5
    assert set(gradient_check_model(net, x, t, keys=["params[2]"])) == {"params[2]"}
    with pytest.raises(KeyError, match="unknown parameter"):
        gradient_check_model(net, x, t, keys=["nope"])


def test_gradient_check_model_validation():
    class NoAPI:
        params = {"W": np.ones(2)}

    with pytest.raises(TypeError, match="loss\\(x, t\\) and gradient\\(x, t\\)"):
        gradient_check_model(NoAPI(), np.ones(2), np.ones(2))
    with pytest.raises(TypeError, match="params dict .* or a params list"):
        gradient_check_model(object(), np.ones(2), np.ones(2))
    net = TwoLayerNet(2, 2, 2)
    with pytest.raises(KeyError, match="unknown parameter"):
        gradient_check_model(net, np.ones((1, 2)), np.array([0]), keys=["W9"])
    with pytest.raises(ValueError, match="needs targets t"):
        gradient_check(net, np.ones((1, 2)))
