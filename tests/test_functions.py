"""Tests for fastbp.functions: the book's numbers, stability, book semantics of cross_entropy_error."""

import math
import warnings

import numpy as np
import pytest
from fastbp_tests import TOL
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbp import functions as F
from fastbp import reference as R
from fastbp.gradient import numerical_gradient_5pt

DTYPES = [np.float32, np.float64]

# book 1, section 4.2.2
Y_BOOK = np.array([0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0])
Y_BOOK_WRONG = np.array([0.1, 0.05, 0.1, 0.0, 0.05, 0.1, 0.0, 0.6, 0.0, 0.0])
T_BOOK = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0])


def rng(seed=0):
    return np.random.default_rng(seed)


def py_sigmoid(v):
    return 1 / (1 + math.exp(-v)) if v > -700 else 0.0


def py_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = math.fsum(e)
    return [v / s for v in e]


# ------------------------------------------------------------------------------------------
# the book's numbers
# ------------------------------------------------------------------------------------------


def test_book_numbers():
    np.testing.assert_array_equal(F.step_function(np.array([-1.0, 1.0, 2.0])), [0, 1, 1])
    assert F.step_function(np.array([-1.0, 1.0])).dtype.kind == "i"
    np.testing.assert_allclose(F.sigmoid(np.array([-1.0, 1.0, 2.0])), [0.26894142, 0.73105858, 0.88079708], rtol=1e-7)
    np.testing.assert_allclose(F.softmax(np.array([0.3, 2.9, 4.0])), [0.01821127, 0.24519181, 0.73659691], rtol=1e-6)
    assert F.cross_entropy_error(Y_BOOK, T_BOOK) == pytest.approx(0.510825457099338, rel=1e-12)
    assert F.cross_entropy_error(Y_BOOK_WRONG, T_BOOK) == pytest.approx(2.302584092994546, rel=1e-12)
    np.testing.assert_array_equal(F.relu(np.array([-2.0, 0.0, 3.0])), [0.0, 0.0, 3.0])
    x = np.array([1.0, -3.0])
    assert F.identity_function(x) is x


# ------------------------------------------------------------------------------------------
# sigmoid / relu and their gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_stable_and_exact(dtype):
    x = np.array([-1e4, -800.0, -88.0, -30.0, -1.0, 0.0, 1.0, 30.0, 88.0, 800.0, 1e4], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.sigmoid(x)
        g = F.sigmoid_grad(x)
    assert y.dtype == dtype and g.dtype == dtype
    np.testing.assert_allclose(y, [py_sigmoid(v) for v in x.astype(float)], **TOL[dtype])
    assert np.all(np.isfinite(g)) and np.all(g >= 0)
    assert np.isnan(F.sigmoid(np.array([np.nan], dtype=dtype))[0])
    assert F.sigmoid(np.array(0)).dtype == np.float64


def test_sigmoid_matches_the_layers():
    from fastbp import layers as L

    x = rng(1).standard_normal((4, 5)) * 20
    np.testing.assert_array_equal(F.sigmoid(x), L.Sigmoid().forward(x))  # the same kernel
    np.testing.assert_allclose(F.sigmoid(x), R.Sigmoid().forward(x), rtol=1e-15, atol=0)
    np.testing.assert_array_equal(F.sigmoid(np.asfortranarray(x)), F.sigmoid(x))
    assert F.sigmoid(np.float64(3.0)).shape == ()


def test_sigmoid_grad_numerical():
    x = rng(2).uniform(-4, 4, 7)
    a = rng(3).standard_normal(7)
    num = numerical_gradient_5pt(lambda z: float(np.sum(F.sigmoid(z) * a)), x.copy())
    np.testing.assert_allclose(F.sigmoid_grad(x) * a, num, rtol=1e-8, atol=1e-12)


def test_relu_grad_book_convention():
    x = np.array([-1.5, 0.0, 2.0])
    np.testing.assert_array_equal(F.relu_grad(x), [0.0, 1.0, 1.0])  # 1 at x == 0 as in the book
    assert F.relu_grad(x.astype(np.float32)).dtype == np.float32
    x_before = x.copy()
    F.relu(x)
    F.relu_grad(x)
    np.testing.assert_array_equal(x, x_before)


# ------------------------------------------------------------------------------------------
# softmax
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_and_stability(dtype):
    x = np.array([[1000.0, 1001.0, 1002.0], [1e30, -1e30, 0.0], [-5.0, 0.0, 5.0]], dtype=dtype)
    x_before = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.softmax(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(x, x_before)
    for row, expected in zip(y, map(py_softmax, x.astype(float).tolist())):
        np.testing.assert_allclose(row, expected, **TOL[dtype])
    np.testing.assert_allclose(y.sum(axis=1), 1.0, **TOL[dtype])
    # shift invariance and 1-D == one row
    np.testing.assert_allclose(F.softmax(x[2] + 100), y[2], **TOL[dtype])
    np.testing.assert_allclose(F.softmax(x[0]), y[0], **TOL[dtype])


def test_softmax_validation():
    with pytest.raises(ValueError, match=r"1-D \(C,\) or 2-D \(N, C\), got shape \(2, 2, 2\)"):
        F.softmax(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="at least one class"):
        F.softmax(np.zeros((3, 0)))
    with pytest.raises(TypeError, match="dtype"):
        F.softmax(np.array(["a", "b"]))


# ------------------------------------------------------------------------------------------
# cross_entropy_error and softmax_loss: the book's semantics (+1e-7 included)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_error_labels_onehot_batch(dtype):
    r = rng(4)
    y = F.softmax(r.standard_normal((6, 4)).astype(dtype))
    labels = r.integers(0, 4, 6)
    onehot = np.eye(4, dtype=dtype)[labels]
    e_labels = F.cross_entropy_error(y, labels)
    e_onehot = F.cross_entropy_error(y, onehot)
    assert e_labels == e_onehot
    expected = -sum(math.log(float(y[i, t]) + 1e-7) for i, t in enumerate(labels)) / 6
    assert float(e_labels) == pytest.approx(expected, rel=TOL[dtype]["rtol"])
    # 1-D y: one sample, scalar label or one-hot
    assert F.cross_entropy_error(y[1], labels[1]) == pytest.approx(
        -math.log(float(y[1, labels[1]]) + 1e-7), rel=TOL[dtype]["rtol"]
    )
    assert F.cross_entropy_error(y[1], onehot[1]) == F.cross_entropy_error(y[1], labels[1])


def test_cross_entropy_error_keeps_book_delta():
    y = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert F.cross_entropy_error(y, np.array([0, 1])) == pytest.approx(-math.log(1 + 1e-7), rel=1e-12)
    assert F.cross_entropy_error(y, np.array([1, 0])) == pytest.approx(-math.log(1e-7), rel=1e-12)


def test_cross_entropy_error_validation():
    y = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"label 4 out of range for C=4"):
        F.cross_entropy_error(y, np.array([0, 1, 4]))
    with pytest.raises(ValueError, match=r"label -1 out of range"):
        F.cross_entropy_error(y, np.array([0, -1, 2]))
    with pytest.raises(TypeError, match=r"labels must be integers, got dtype float64"):
        F.cross_entropy_error(y, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"3 label\(s\) of shape \(3,\).*got shape \(2,\)"):
        F.cross_entropy_error(y, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"one-hot t must have shape \(3, 4\) like y, got \(4, 3\)"):
        F.cross_entropy_error(y, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"1-D \(C,\) or 2-D"):
        F.cross_entropy_error(np.zeros((2, 2, 2)), np.zeros(2, dtype=int))


def test_cross_entropy_error_empty_batch():
    with pytest.warns(RuntimeWarning, match="empty batch"):
        e = F.cross_entropy_error(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert np.isnan(e)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_loss_is_book_composition(dtype):
    r = rng(5)
    X = (r.standard_normal((5, 3)) * 2).astype(dtype)
    t = np.array([0, 2, 1, 1, 0])
    loss = F.softmax_loss(X, t)
    assert loss == F.cross_entropy_error(F.softmax(X), t)
    # below the exact loss of SoftmaxWithLoss by about mean(1e-7 / y_t): the book's +1e-7
    exact = R.SoftmaxWithLoss().forward(X, t)
    y_t = F.softmax(X.astype(np.float64))[np.arange(5), t]
    gap = np.mean(np.log(y_t + 1e-7) - np.log(y_t))
    tol = dict(rel=1e-3, abs=0) if dtype == np.float64 else dict(rel=0.5, abs=1e-6)
    assert exact - float(loss) == pytest.approx(gap, **tol)
    # but capped at -log(1e-7) when a probability underflows, unlike the exact layer
    big = np.array([[0.0, 1000.0]])
    assert F.softmax_loss(big, np.array([0])) == pytest.approx(-math.log(1e-7))
    assert R.SoftmaxWithLoss().forward(big, np.array([0])) == pytest.approx(1000.0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.sampled_from([1, 2, 5, 1000]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_softmax_cross_entropy_shapes_hypothesis(n, c, seed, dtype):
    r = rng(seed)
    x = (r.standard_normal((n, c)) * 5).astype(dtype)
    y = F.softmax(x)
    assert y.shape == (n, c) and y.dtype == dtype
    np.testing.assert_allclose(y.sum(axis=1), 1.0, **TOL[dtype])
    assert np.all(y >= 0)
    for row, expected in zip(y, map(py_softmax, x.astype(float).tolist())):
        np.testing.assert_allclose(row, expected, **TOL[dtype])
    labels = r.integers(0, c, n)
    e = float(F.cross_entropy_error(y, labels))
    expected = -math.fsum(math.log(float(y[i, t]) + 1e-7) for i, t in enumerate(labels)) / n
    assert e == pytest.approx(expected, rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"])
    assert -1e-6 <= e <= -math.log(1e-7) + 1e-6


@pytest.mark.parametrize("dt", [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.float16])
def test_sigmoid_promotes_like_np_exp_and_agrees_with_the_layers(dt):
    """One promotion rule (np.exp's) for functions.sigmoid, reference.Sigmoid and layers.Sigmoid (issue 8: on main
    functions.sigmoid gave float64 for int16 where the layers gave float32)."""
    import fastbp.layers as FL

    x = (np.arange(-6, 6) % 3).astype(dt) if dt is not np.bool_ else np.array([True, False, True])
    want_dt = np.exp(x).dtype
    got = F.sigmoid(x)
    assert got.dtype == want_dt
    for layer in (R.Sigmoid(), FL.Sigmoid()):
        out = layer.forward(x)
        assert out.dtype == want_dt, type(layer).__module__
        np.testing.assert_allclose(
            out.astype(np.float64), got.astype(np.float64), rtol=1e-3 if want_dt == np.float16 else 1e-6
        )
    np.testing.assert_allclose(
        got.astype(np.float64),
        1 / (1 + np.exp(-x.astype(np.float64))),
        **TOL[np.float16 if want_dt == np.float16 else np.float32],
    )
