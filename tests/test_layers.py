"""Gradient checks and conformance tests of the layers: fastbp.layers (Cython kernels) and fastbp.reference (NumPy).

Every case runs over both modules and both float dtypes where it applies.  Backward passes are checked against an
independent 5-point finite difference written here (and, as a cross-check, against fastbp.gradient); the fast
layers are checked against the reference and against float64 NumPy formulas over shapes, memory layouts and dtypes.
"""

import math
import threading
import warnings
import zlib

import numpy as np
import pytest
import scipy.special
from fastbp_tests import TOL, assert_close
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastbp.layers as FL
import fastbp.reference as REF
from fastbp import gradient as G

F16, F32, F64 = np.float16, np.float32, np.float64
DTYPES = [F32, F64]
MODULES = [pytest.param(FL, id="layers"), pytest.param(REF, id="reference")]
with_modules = pytest.mark.parametrize("M", MODULES)
with_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])

# Layer results vs float64 NumPy formulas / vs each other: conftest's TOL per dtype (`atol` relative to
# max(1, max|expected|)).
# Backward vs numerical derivatives: max elementwise relative error, and the denominator floor as a fraction of the
# largest numerical gradient entry (so an entry that happens to be ~0 is compared absolutely).
GRAD_TOL = {F64: 1e-7, F32: 3e-5}
GRAD_FLOOR = {F64: 1e-6, F32: 1e-3}
FD_H = 1e-3  # 5-point stencil step in float64: truncation O(h^4), rounding O(eps/h)

HYP = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)


def _key(dtype):
    return np.dtype(dtype).type


def narrowest(*dtypes):
    """The least precise of the dtypes (the tolerance of a result stored in it)."""
    return min((np.dtype(d) for d in dtypes), key=lambda d: d.itemsize).type


def _assert_unchanged(arrays, copies, what=""):
    for i, (a, c) in enumerate(zip(arrays, copies)):
        a = np.asarray(a)
        assert a.dtype == c.dtype and a.shape == c.shape, f"{what} argument {i} changed dtype/shape"
        assert np.array_equal(a, c, equal_nan=a.dtype.kind == "f"), f"{what} argument {i} was modified"


# ---------------------------------------------------------------------------------------------------------------
# memory layouts
# ---------------------------------------------------------------------------------------------------------------
LAYOUTS = ["C", "F", "rows2", "strided", "reversed", "readonly", "readonly_F"]


def _fill_for(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return True
    return np.iinfo(dtype).max  # an out-of-range label if a kernel reads a gap


def lay(a, kind):
    """A fresh array equal to `a` in the memory layout `kind` (gaps of strided layouts hold NaN / max int)."""
    a = np.asarray(a)
    nd = a.ndim
    if kind == "C":
        out = np.array(a, order="C", copy=True)
    elif kind == "F":
        out = np.array(a, order="F", copy=True)
    elif kind == "rows2":  # axis 0 step 2: a BLAS operand with a leading dimension > columns
        if nd == 0:
            return np.array(a, copy=True)
        big = np.full((2 * a.shape[0],) + a.shape[1:], _fill_for(a.dtype), a.dtype)
        out = big[::2]
        out[...] = a
    elif kind == "strided":  # every axis step 2: needs a copy before any BLAS call
        big = np.full(tuple(2 * s for s in a.shape), _fill_for(a.dtype), a.dtype)
        out = big[(slice(None, None, 2),) * nd]
        out[...] = a
    elif kind == "reversed":  # negative strides
        flip = (slice(None, None, -1),) * nd
        out = np.ascontiguousarray(a[flip])[flip]
    elif kind == "readonly":
        out = np.array(a, order="C", copy=True)
        out.setflags(write=False)
    elif kind == "readonly_F":
        out = np.array(a, order="F", copy=True)
        out.setflags(write=False)
    else:
        raise AssertionError(kind)
    assert np.array_equal(out, a, equal_nan=a.dtype.kind == "f")
    return out


# ---------------------------------------------------------------------------------------------------------------
# gradient checks: an independent finite difference
# ---------------------------------------------------------------------------------------------------------------
def fd5(f, a, h=FD_H):
    """d f / d a by the 5-point stencil, perturbing a (float64) in place one element at a time and restoring it."""
    assert a.dtype == F64 and a.flags.writeable
    g = np.zeros(a.shape, F64)
    for idx in np.ndindex(*a.shape):
        v = float(a[idx])
        vals = []
        for s in (-2, -1, 1, 2):
            a[idx] = v + s * h
            vals.append(float(f()))
        a[idx] = v
        # differences first: f(x+h) - f(x-h) is exactly 0 where f does not depend on the element
        g[idx] = (8.0 * (vals[2] - vals[1]) - (vals[3] - vals[0])) / (12.0 * h)
    return g


def rel_err(analytic, numeric, floor_frac):
    """max |a - n| / max(|a|, |n|, floor_frac * max|n|)."""
    a = np.asarray(analytic, F64)
    n = np.asarray(numeric, F64)
    assert a.shape == n.shape, f"gradient shape {a.shape} != {n.shape}"
    floor = max(floor_frac * float(np.max(np.abs(n), initial=0.0)), np.finfo(F64).tiny)
    return float(np.max(np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), floor), initial=0.0))


def _dot(out, dout64):
    """sum(out * dout) correctly rounded (math.fsum): np.sum's rounding may depend on the buffer's alignment."""
    return math.fsum((np.asarray(out, F64) * dout64).ravel().tolist())


def _data(rng, shape, away=0.0, scale=1.0):
    """Standard normal * scale, |values| >= away, exactly representable in float32 (both dtypes see one point)."""
    a = rng.standard_normal(shape) * scale
    if away:
        a = np.where(a >= 0, a + away, a - away)
    return a.astype(F32).astype(F64)


def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


# Each case builder (module, dtype) -> (arrays, objective, analytic, check):
#   arrays: {name: the very array the layer reads (inputs and parameters)}; perturbing one in place changes the
#           objective (parameters are held by reference, inputs are re-read by `objective`);
#   objective(): float, sum(forward(...) * dout) or the loss; analytic(): {name: gradient from backward};
#   check(**kw): fastbp.gradient.gradient_check_layer on the same layer (an independent second opinion).
def _case_affine(M, dt, xshape):
    rng = _rng(f"affine{xshape}")
    m = 3
    d = int(np.prod(xshape[1:]))
    x, W, b = _data(rng, xshape).astype(dt), _data(rng, (d, m)).astype(dt), _data(rng, (m,)).astype(dt)
    dout = _data(rng, (xshape[0], m))
    layer = M.Affine(W, b)
    arrays = {"x": x, "W": W, "b": b}

    def objective():
        return _dot(layer.forward(arrays["x"]), dout)

    def analytic():
        layer.forward(arrays["x"])
        dx = layer.backward(dout.astype(dt))
        return {"x": dx, "W": layer.dW, "b": layer.db}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, x, dout.astype(dt), **kw)


def _case_matmul(M, dt):
    rng = _rng("matmul")
    x, W = _data(rng, (4, 5)).astype(dt), _data(rng, (5, 3)).astype(dt)
    dout = _data(rng, (4, 3))
    layer = M.MatMul(W)
    arrays = {"x": x, "W": W}

    def objective():
        return _dot(layer.forward(arrays["x"]), dout)

    def analytic():
        layer.forward(arrays["x"])
        dx = layer.backward(dout.astype(dt))
        return {"x": dx, "W": layer.grads[0]}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, x, dout.astype(dt), **kw)


def _case_unary(M, dt, cls, away=0.0, scale=1.0):
    rng = _rng(cls)
    x = _data(rng, (4, 6), away=away, scale=scale).astype(dt)
    dout = _data(rng, (4, 6))
    layer = getattr(M, cls)()
    arrays = {"x": x}

    def objective():
        return _dot(layer.forward(arrays["x"]), dout)

    def analytic():
        layer.forward(arrays["x"])
        return {"x": layer.backward(dout.astype(dt))}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, x, dout.astype(dt), **kw)


def _case_softmax(M, dt, kind):
    rng = _rng(f"softmax{kind}")
    if kind == "single":
        x = _data(rng, (6,), scale=2.0).astype(dt)
        t = 4
    else:
        x = _data(rng, (5, 4), scale=2.0).astype(dt)
        labels = np.array([0, 3, 1, 3, 2])
        t = labels if kind == "labels" else np.eye(4, dtype=dt)[labels]
    layer = M.SoftmaxWithLoss()
    arrays = {"x": x}

    def objective():
        return layer.forward(arrays["x"], t)

    def analytic():
        layer.forward(arrays["x"], t)
        return {"x": layer.backward(1)}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, x, t=t, **kw)


def _case_repeat(M, dt):
    rng = _rng("repeat")
    x = _data(rng, (1, 5)).astype(dt)
    dout = _data(rng, (4, 5))
    layer = M.Repeat(4)
    arrays = {"x": x}

    def objective():
        return _dot(layer.forward(arrays["x"]), dout)

    def analytic():
        layer.forward(arrays["x"])
        return {"x": layer.backward(dout.astype(dt))}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, x, dout.astype(dt), **kw)


def _case_sum(M, dt):
    rng = _rng("sum")
    x = _data(rng, (4, 5)).astype(dt)
    dout = _data(rng, (1, 5))
    layer = M.Sum()
    arrays = {"x": x}

    def objective():
        return _dot(layer.forward(arrays["x"]), dout)

    def analytic():
        layer.forward(arrays["x"])
        return {"x": layer.backward(dout.astype(dt))}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, x, dout.astype(dt), **kw)


def _case_binary(M, dt, cls, yshape):
    rng = _rng(f"{cls}{yshape}")
    x, y = _data(rng, (3, 4)).astype(dt), _data(rng, yshape).astype(dt)
    dout = _data(rng, (3, 4))
    layer = getattr(M, cls)()
    arrays = {"x": x, "y": y}

    def objective():
        return _dot(layer.forward(arrays["x"], arrays["y"]), dout)

    def analytic():
        layer.forward(arrays["x"], arrays["y"])
        dx, dy = layer.backward(dout.astype(dt))
        return {"x": dx, "y": dy}

    return arrays, objective, analytic, lambda **kw: G.gradient_check_layer(layer, (x, y), dout.astype(dt), **kw)


GRAD_CASES = {
    "Affine-2d": lambda M, dt: _case_affine(M, dt, (4, 5)),
    "Affine-4d": lambda M, dt: _case_affine(M, dt, (2, 2, 3, 2)),
    "MatMul": _case_matmul,
    "Relu": lambda M, dt: _case_unary(M, dt, "Relu", away=0.05),  # |x| >= 0.05 > 2h: away from the kink
    "Sigmoid": lambda M, dt: _case_unary(M, dt, "Sigmoid", scale=2.0),
    "SoftmaxWithLoss-labels": lambda M, dt: _case_softmax(M, dt, "labels"),
    "SoftmaxWithLoss-onehot": lambda M, dt: _case_softmax(M, dt, "onehot"),
    "SoftmaxWithLoss-single": lambda M, dt: _case_softmax(M, dt, "single"),
    "Repeat": _case_repeat,
    "Sum": _case_sum,
    "MulLayer": lambda M, dt: _case_binary(M, dt, "MulLayer", (3, 4)),
    "MulLayer-broadcast": lambda M, dt: _case_binary(M, dt, "MulLayer", (1, 4)),
    "AddLayer": lambda M, dt: _case_binary(M, dt, "AddLayer", (3, 4)),
    "AddLayer-broadcast": lambda M, dt: _case_binary(M, dt, "AddLayer", (1, 4)),
}


def gradient_errors(M, case, dtype):
    """{name: max relative error of the dtype's backward vs the float64 5-point numerical derivative}."""
    _, _, analytic, _ = GRAD_CASES[case](M, dtype)
    grads = analytic()
    for name, g in grads.items():
        assert np.asarray(g).dtype == dtype, f"{case}: d{name} has dtype {np.asarray(g).dtype}, not {dtype}"
    grads = {k: np.array(v, F64) for k, v in grads.items()}
    arrays64, objective64, _, _ = GRAD_CASES[case](M, F64)
    errors = {}
    for name, arr in arrays64.items():
        before = arr.copy()
        num = fd5(objective64, arr)
        assert np.array_equal(arr, before)
        errors[name] = rel_err(grads[name], num, GRAD_FLOOR[dtype])
    return errors


@pytest.mark.parametrize("case", list(GRAD_CASES))
@with_modules
def test_backward_matches_numerical_derivative_float64(M, case):
    errors = gradient_errors(M, case, F64)
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL[F64]}
    assert not bad, f"{case}: max relative error {bad} > {GRAD_TOL[F64]}"


@pytest.mark.parametrize("case", list(GRAD_CASES))
@with_modules
def test_backward_float32_matches_float64_numerical_derivative(M, case):
    errors = gradient_errors(M, case, F32)
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL[F32]}
    assert not bad, f"{case}: float32 backward vs float64 numerics, max relative error {bad} > {GRAD_TOL[F32]}"


@pytest.mark.parametrize("case", list(GRAD_CASES))
@with_modules
def test_gradient_py_agrees(M, case):
    """fastbp.gradient's own check (5-point) passes at the same threshold and leaves the inputs unchanged."""
    arrays, _, _, check = GRAD_CASES[case](M, F64)
    copies = {k: v.copy() for k, v in arrays.items()}
    errors = check(order=4, threshold=GRAD_TOL[F64])
    assert errors and all(e <= GRAD_TOL[F64] for e in errors.values()), errors
    for k in arrays:
        assert np.array_equal(arrays[k], copies[k])


# ---------------------------------------------------------------------------------------------------------------
# the book's numbers (book 1, chapter 5)
# ---------------------------------------------------------------------------------------------------------------
@with_dtypes
@with_modules
def test_book_buy_apple(M, dtype):
    apple, apple_num, tax = dtype(100), dtype(2), dtype(1.1)
    mul_apple, mul_tax = M.MulLayer(), M.MulLayer()
    price = mul_tax.forward(mul_apple.forward(apple, apple_num), tax)
    rel = TOL[dtype]["rtol"]
    assert price == pytest.approx(220, rel=rel)
    dapple_price, dtax = mul_tax.backward(dtype(1))
    dapple, dapple_num = mul_apple.backward(dapple_price)
    assert (dapple, dapple_num, dtax) == pytest.approx((2.2, 110, 200), rel=rel)


@with_dtypes
@with_modules
def test_book_buy_apple_orange(M, dtype):
    apple, apple_num, orange, orange_num, tax = dtype(100), dtype(2), dtype(150), dtype(3), dtype(1.1)
    mul_apple, mul_orange, add, mul_tax = M.MulLayer(), M.MulLayer(), M.AddLayer(), M.MulLayer()
    apple_price = mul_apple.forward(apple, apple_num)
    orange_price = mul_orange.forward(orange, orange_num)
    price = mul_tax.forward(add.forward(apple_price, orange_price), tax)
    rel = TOL[dtype]["rtol"]
    assert price == pytest.approx(715, rel=rel)
    dall, dtax = mul_tax.backward(dtype(1))
    dapple_price, dorange_price = add.backward(dall)
    dorange, dorange_num = mul_orange.backward(dorange_price)
    dapple, dapple_num = mul_apple.backward(dapple_price)
    assert (dapple_num, dapple, dorange, dorange_num, dtax) == pytest.approx((110, 2.2, 3.3, 165, 650), rel=rel)


# ---------------------------------------------------------------------------------------------------------------
# fastbp.layers vs fastbp.reference vs float64 NumPy, over shapes, layouts and dtypes
# ---------------------------------------------------------------------------------------------------------------
WIDTHS = [1, 2, 3, 7, 1000, 4096]
SPLIT = {1: (1, 1, 1), 2: (2, 1, 1), 3: (1, 3, 1), 7: (1, 1, 7), 1000: (10, 10, 10), 4096: (4, 32, 32)}
layouts = st.sampled_from(LAYOUTS)
float_dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**32 - 1)
widths = st.tuples(st.sampled_from(WIDTHS), st.sampled_from(WIDTHS)).filter(lambda dm: dm[0] * dm[1] <= 1 << 18)


@with_dtypes
@HYP
@given(
    n=st.sampled_from([1, 2, 3, 5, 8]),
    dm=widths,
    x4d=st.booleans(),
    w_dt=float_dtypes,
    b_dt=float_dtypes,
    lx=layouts,
    lw=layouts,
    lb=layouts,
    ld=layouts,
    seed=seeds,
)
def test_affine_matches_reference(dtype, n, dm, x4d, w_dt, b_dt, lx, lw, lb, ld, seed):
    d, m = dm
    event(f"d={d}, m={m}")
    event(f"layouts x={lx} W={lw}")
    rng = np.random.default_rng(seed)
    xshape = (n,) + SPLIT[d] if x4d else (n, d)
    x0 = rng.standard_normal(xshape).astype(dtype)
    W0 = rng.standard_normal((d, m)).astype(w_dt)
    b0 = rng.standard_normal(m).astype(b_dt)
    rt = np.result_type(x0, W0, b0)  # NumPy's promotion: float32 x with float64 W computes in float64
    pt = np.result_type(x0, W0)  # x @ W + b: the product may be rounded to x @ W's dtype, as NumPy does
    dout0 = rng.standard_normal((n, m)).astype(rt)
    x64, W64, dout64 = x0.reshape(n, d).astype(F64), W0.astype(F64), dout0.astype(F64)
    want = {
        "out": x64 @ W64 + b0.astype(F64),
        "dx": (dout64 @ W64.T).reshape(xshape),
        "dW": x64.T @ dout64,
        "db": dout64.sum(0),
    }
    tol = {"out": pt, "dx": rt, "dW": narrowest(rt, w_dt), "db": narrowest(rt, b_dt)}
    got = {}
    for M in (FL, REF):
        x, W, b, dout = lay(x0, lx), lay(W0, lw), lay(b0, lb), lay(dout0, ld)
        copies = [a.copy() for a in (x, W, b, dout)]
        layer = M.Affine(W, b)
        out = layer.forward(x)
        assert out.dtype == rt and out.shape == (n, m), (M.__name__, out.dtype, out.shape)
        got[M] = {"out": np.array(out)}
        dx = layer.backward(dout)
        assert dx.dtype == rt and dx.shape == xshape, (M.__name__, dx.dtype, dx.shape)
        # the grads arrays keep the dtype they were created with (book 2's grads[0][...] = dW)
        assert layer.dW.dtype == W0.dtype and layer.db.dtype == b0.dtype
        got[M].update(dx=np.array(dx), dW=np.array(layer.dW), db=np.array(layer.db))
        _assert_unchanged([x, W, b, dout], copies, f"{M.__name__}.Affine")
        for k in want:
            assert_close(got[M][k], want[k], tol[k], f"{M.__name__} {k}")
    for k in want:
        assert_close(got[FL][k], got[REF][k], tol[k], f"layers vs reference {k}")


@with_dtypes
@HYP
@given(n=st.sampled_from([1, 2, 3, 5, 8]), dm=widths, w_dt=float_dtypes, lx=layouts, lw=layouts, ld=layouts, seed=seeds)
def test_matmul_matches_reference(dtype, n, dm, w_dt, lx, lw, ld, seed):
    d, m = dm
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, d)).astype(dtype)
    W0 = rng.standard_normal((d, m)).astype(w_dt)
    rt = np.result_type(x0, W0)
    dout0 = rng.standard_normal((n, m)).astype(rt)
    x64, W64, dout64 = x0.astype(F64), W0.astype(F64), dout0.astype(F64)
    want = {"out": x64 @ W64, "dx": dout64 @ W64.T, "dW": x64.T @ dout64}
    got = {}
    for M in (FL, REF):
        x, W, dout = lay(x0, lx), lay(W0, lw), lay(dout0, ld)
        copies = [a.copy() for a in (x, W, dout)]
        layer = M.MatMul(W)
        assert layer.params[0] is W
        out = layer.forward(x)
        assert out.dtype == rt
        dx = layer.backward(dout)
        assert dx.dtype == rt and layer.grads[0].dtype == W0.dtype
        got[M] = {"out": np.array(out), "dx": np.array(dx), "dW": np.array(layer.grads[0])}
        _assert_unchanged([x, W, dout], copies, f"{M.__name__}.MatMul")
        for k in want:
            assert_close(got[M][k], want[k], narrowest(rt, w_dt) if k == "dW" else rt, f"{M.__name__} {k}")
    for k in want:
        assert_close(got[FL][k], got[REF][k], narrowest(rt, w_dt) if k == "dW" else rt, f"layers vs reference {k}")


shapes = st.one_of(
    st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple),
    st.tuples(st.sampled_from([1, 3]), st.sampled_from([1000, 4096])),
)
SPECIALS = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30]


def _with_specials(rng, a, p=0.1):
    mask = rng.random(a.shape) < p
    a[mask] = rng.choice(SPECIALS, size=int(mask.sum()))
    return a


@with_dtypes
@HYP
@given(shape=shapes, lx=layouts, ld=layouts, seed=seeds)
def test_relu_matches_reference(dtype, shape, lx, ld, seed):
    rng = np.random.default_rng(seed)
    x0 = _with_specials(rng, rng.standard_normal(shape)).astype(dtype)
    dout0 = rng.standard_normal(shape).astype(dtype)
    want_mask = x0 <= 0
    want_out = np.where(want_mask, dtype(0), x0)
    want_dx = np.where(want_mask, dtype(0), dout0)
    got = {}
    for M in (FL, REF):
        x, dout = lay(x0, lx), lay(dout0, ld)
        copies = [x.copy(), dout.copy()]
        layer = M.Relu()
        out = layer.forward(x)
        assert out.dtype == dtype and np.array_equal(out, want_out, equal_nan=True)
        assert np.array_equal(np.asarray(layer.mask), want_mask)
        dx = layer.backward(dout)
        assert dx.dtype == dtype and np.array_equal(dx, want_dx)
        assert not np.shares_memory(dx, dout)
        _assert_unchanged([x, dout], copies, f"{M.__name__}.Relu")
        got[M] = (np.array(out), np.array(dx))
    assert np.array_equal(got[FL][0], got[REF][0], equal_nan=True)
    assert np.array_equal(got[FL][1], got[REF][1])


@with_dtypes
@HYP
@given(shape=shapes, scale=st.sampled_from([1.0, 10.0, 1e3, 1e4]), lx=layouts, ld=layouts, seed=seeds)
def test_sigmoid_matches_reference(dtype, shape, scale, lx, ld, seed):
    rng = np.random.default_rng(seed)
    x0 = _with_specials(rng, rng.standard_normal(shape) * scale).astype(dtype)
    dout0 = rng.standard_normal(shape).astype(dtype)
    y64 = scipy.special.expit(x0.astype(F64))
    want_dx = dout0.astype(F64) * (1 - y64) * y64
    got = {}
    for M in (FL, REF):
        x, dout = lay(x0, lx), lay(dout0, ld)
        copies = [x.copy(), dout.copy()]
        layer = M.Sigmoid()
        with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
            warnings.simplefilter("error")
            out = layer.forward(x)
            dx = layer.backward(dout)
        assert out.dtype == dtype and dx.dtype == dtype
        assert_close(out, y64, dtype, f"{M.__name__} out")
        assert_close(dx, want_dx, dtype, f"{M.__name__} dx")
        _assert_unchanged([x, dout], copies, f"{M.__name__}.Sigmoid")
        got[M] = (np.array(out), np.array(dx))
    assert_close(got[FL][0], got[REF][0], dtype)
    assert_close(got[FL][1], got[REF][1], dtype)


TARGET_KINDS = ["int64", "int32", "uint8", "onehot32", "onehot64"]


def _softmax_truth(x64, labels, dout):
    mx = x64.max(axis=1, keepdims=True)
    lse = (np.log(np.exp(x64 - mx).sum(axis=1, keepdims=True)) + mx)[:, 0]
    n = x64.shape[0]
    loss = float(np.mean(lse - x64[np.arange(n), labels]))
    y = scipy.special.softmax(x64, axis=1)
    dx = y.copy()
    dx[np.arange(n), labels] -= 1
    return loss, y, dx * (dout / n)


@with_dtypes
@HYP
@given(
    n=st.sampled_from([1, 2, 3, 5, 8]),
    c=st.sampled_from([1, 2, 3, 10, 1000]),
    kind=st.sampled_from(TARGET_KINDS),
    scale=st.sampled_from([1.0, 10.0, 100.0]),
    dout=st.sampled_from([1, 0.5, 3.0]),
    lx=layouts,
    lt=layouts,
    seed=seeds,
)
def test_softmax_with_loss_matches_reference(dtype, n, c, kind, scale, dout, lx, lt, seed):
    rng = np.random.default_rng(seed)
    x0 = (rng.standard_normal((n, c)) * scale).astype(dtype)
    labels = rng.integers(0, min(c, 256), n)
    if kind.startswith("onehot"):
        t0 = np.eye(c, dtype=F32 if kind == "onehot32" else F64)[labels]
        rt = np.result_type(x0, t0)  # dx = y - t
    else:
        t0 = labels.astype(kind)
        rt = np.dtype(dtype)
    want_loss, want_y, want_dx = _softmax_truth(x0.astype(F64), labels, dout)
    got = {}
    for M in (FL, REF):
        x, t = lay(x0, lx), lay(t0, lt)
        copies = [x.copy(), t.copy()]
        layer = M.SoftmaxWithLoss()
        loss = layer.forward(x, t)
        assert isinstance(loss, float)
        assert layer.loss == loss
        assert np.asarray(layer.y).shape == (n, c)
        dx = layer.backward(dout)
        assert dx.dtype == rt and dx.shape == (n, c), (M.__name__, dx.dtype, dx.shape)
        assert_close(loss, want_loss, dtype, f"{M.__name__} loss")
        assert_close(layer.y, want_y, dtype, f"{M.__name__} y")
        assert_close(dx, want_dx, dtype, f"{M.__name__} dx")
        _assert_unchanged([x, t], copies, f"{M.__name__}.SoftmaxWithLoss")
        got[M] = (loss, np.array(layer.y), np.array(dx))
    assert_close(got[FL][0], got[REF][0], dtype, "loss")
    assert_close(got[FL][1], got[REF][1], dtype, "y")
    assert_close(got[FL][2], got[REF][2], dtype, "dx")


@with_dtypes
@with_modules
def test_softmax_with_loss_single_sample_forms_agree(M, dtype):
    """A 1-D sample takes a scalar label, a 0-D array label or a 1-D one-hot; all give the 2-D batch-of-one loss."""
    x = np.array([0.3, -1.2, 2.0, 0.7], dtype)
    batch = M.SoftmaxWithLoss()
    want = batch.forward(x.reshape(1, -1), np.array([2]))
    want_dx = batch.backward().reshape(-1)
    for t in (2, np.int64(2), np.array(2), np.eye(4, dtype=dtype)[2]):
        layer = M.SoftmaxWithLoss()
        assert layer.forward(x, t) == pytest.approx(want, rel=TOL[dtype]["rtol"])
        assert np.asarray(layer.y).shape == (4,)
        dx = layer.backward()
        assert dx.shape == (4,)
        assert_close(dx, want_dx, dtype)


@pytest.mark.parametrize("form", ["label-array-(1,)", "int-one-hot-(C,)"])
@with_modules
def test_softmax_with_loss_single_sample_book_forms(M, form):
    """The book's cross_entropy_error also takes, for 1-D logits, a label array of shape (1,) and an int one-hot."""
    x = np.array([0.3, -1.2, 2.0, 0.7])
    want = M.SoftmaxWithLoss().forward(x, 2)
    t = np.array([2]) if form == "label-array-(1,)" else np.eye(4, dtype=np.int64)[2]
    layer = M.SoftmaxWithLoss()
    assert layer.forward(x, t) == pytest.approx(want, rel=1e-12)
    assert layer.backward().shape == (4,)


@with_modules
def test_affine_1d_input_is_read_like_the_book(M):
    """The book's Affine reshapes x to (x.shape[0], -1): a 1-D x of length N is N samples of one feature."""
    W = np.array([[1.0, -2.0, 0.5]])
    b = np.array([0.1, 0.2, 0.3])
    x = np.arange(5.0)
    layer = M.Affine(W, b)
    out = layer.forward(x)
    assert out.shape == (5, 3)
    assert_close(out, x[:, None] @ W + b, F64)
    dx = layer.backward(np.ones((5, 3)))
    assert dx.shape == (5,)
    assert_close(dx, np.full(5, W.sum()), F64)


# ---------------------------------------------------------------------------------------------------------------
# byte order, float16 and integer inputs: NumPy's rules or TypeError, never a silently wrong answer
# ---------------------------------------------------------------------------------------------------------------
def _run_affine(M, conv):
    rng = _rng("byteorder-affine")
    x, W, b, dout = (conv(rng.standard_normal(s)) for s in ((4, 5), (5, 3), (3,), (4, 3)))
    layer = M.Affine(W, b)
    out = layer.forward(x)
    dx = layer.backward(dout)
    return out, dx, layer.dW, layer.db


def _run_matmul(M, conv):
    rng = _rng("byteorder-matmul")
    x, W, dout = (conv(rng.standard_normal(s)) for s in ((4, 5), (5, 3), (4, 3)))
    layer = M.MatMul(W)
    out = layer.forward(x)
    return out, layer.backward(dout), layer.grads[0]


def _run_unary(cls):
    def run(M, conv):
        rng = _rng("byteorder-" + cls)
        x, dout = conv(rng.standard_normal((4, 5)) * 3), conv(rng.standard_normal((4, 5)))
        layer = getattr(M, cls)()
        out = layer.forward(x)
        return out, layer.backward(dout)

    return run


def _run_softmax(target):
    def run(M, conv):
        rng = _rng("byteorder-softmax")
        x = conv(rng.standard_normal((4, 5)) * 3)
        labels = np.array([0, 4, 2, 2])
        fdt = conv(np.zeros(1)).dtype
        ldt = np.dtype(np.int64 if fdt.itemsize == 8 else np.int32)
        t = labels.astype(ldt if fdt.isnative else ldt.newbyteorder())
        if target == "onehot":
            t = conv(np.eye(5)[labels])
        layer = M.SoftmaxWithLoss()
        loss = layer.forward(x, t)
        return np.array(loss), layer.y, layer.backward()

    return run


BYTEORDER_CASES = {
    "Affine": _run_affine,
    "MatMul": _run_matmul,
    "Relu": _run_unary("Relu"),
    "Sigmoid": _run_unary("Sigmoid"),
    "SoftmaxWithLoss-labels": _run_softmax("labels"),
    "SoftmaxWithLoss-onehot": _run_softmax("onehot"),
}


@pytest.mark.parametrize("case", list(BYTEORDER_CASES))
@pytest.mark.parametrize("swapped", [">f8", ">f4"])
@with_modules
def test_non_native_byte_order(M, case, swapped):
    run = BYTEORDER_CASES[case]
    native = swapped.replace(">", "<") if np.little_endian else swapped.replace(">", "=")
    want = run(M, lambda a: np.asarray(a, native))
    try:
        got = run(M, lambda a: np.asarray(a, swapped))
    except TypeError as e:
        assert "float" in str(e) or ">" in str(e), e  # an explicit refusal is acceptable
        return
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.dtype.kind == "f" and g.dtype.itemsize == np.asarray(w).dtype.itemsize, (g.dtype, w.dtype)
        assert_close(g, w, np.dtype(native).type)


def _numpy_rule_cases():
    """(name, x dtype, param dtype or None): the layer's answer must equal NumPy's formula's, or be a TypeError."""
    return [
        ("Affine", F16, F64),
        ("Affine", np.int32, F64),
        ("Affine", np.int64, F32),
        ("Affine", np.uint8, F64),
        ("Affine", F16, F16),
        ("Affine", np.int64, np.int64),
        ("MatMul", F16, F64),
        ("MatMul", np.int32, F64),
        ("MatMul", F16, F16),
        ("MatMul", np.int64, np.int64),
        ("Relu", F16, None),
        ("Relu", np.int32, None),
        ("Relu", np.int64, None),
        ("Sigmoid", F16, None),
        ("Sigmoid", np.int32, None),
        ("Sigmoid", np.int64, None),
        ("Sigmoid", np.int16, None),
        ("SoftmaxWithLoss", F16, None),
        ("SoftmaxWithLoss", np.int32, None),
        ("SoftmaxWithLoss", np.int64, None),
    ]


@pytest.mark.parametrize(
    "name,x_dt,p_dt",
    _numpy_rule_cases(),
    ids=[f"{n}-{np.dtype(a).name}-{np.dtype(b).name if b else 'none'}" for n, a, b in _numpy_rule_cases()],
)
@with_modules
def test_float16_and_integer_inputs_follow_numpy(M, name, x_dt, p_dt):
    rng = _rng(f"rules-{name}")
    x = (rng.standard_normal((4, 5)) * 3).astype(x_dt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if name in ("Affine", "MatMul"):
                W = (rng.standard_normal((5, 3)) * 3).astype(p_dt)
                b = (rng.standard_normal(3) * 3).astype(p_dt)
                layer = M.Affine(W, b) if name == "Affine" else M.MatMul(W)
                got = layer.forward(x)
                want = x @ W + b if name == "Affine" else x @ W  # NumPy's own dtype and value
            elif name == "Relu":
                got = M.Relu().forward(x)
                want = np.maximum(x, 0)
            elif name == "Sigmoid":
                got = M.Sigmoid().forward(x)
                want = 1 / (1 + np.exp(-x))  # the book's formula in NumPy
            else:
                labels = np.array([0, 4, 2, 2])
                layer = M.SoftmaxWithLoss()
                loss = layer.forward(x, labels)
                got = layer.y
                e = np.exp(x - x.max(axis=1, keepdims=True))
                want = e / e.sum(axis=1, keepdims=True)
                truth, _, _ = _softmax_truth(x.astype(F64), labels, 1.0)
                assert loss == pytest.approx(truth, rel=TOL[_key(want.dtype)]["rtol"])
    except TypeError as e:  # issue 7 item 13: the docstring promises NumPy's answer, never a TypeError
        raise AssertionError(f"{M.__name__}.{name} raised TypeError for {np.dtype(x_dt)} input: {e}") from e
    got = np.asarray(got)
    assert got.dtype == want.dtype, f"{name}: result dtype {got.dtype}, NumPy gives {want.dtype}"
    if want.dtype.kind in "iu":
        assert np.array_equal(got, want)
    else:
        assert_close(got, want, want.dtype)


# ---------------------------------------------------------------------------------------------------------------
# in-place contracts
# ---------------------------------------------------------------------------------------------------------------
@with_dtypes
@with_modules
def test_affine_keeps_references_to_W_and_b(M, dtype):
    rng = _rng("refs")
    W, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    layer = M.Affine(W, b)
    assert layer.W is W and layer.params[0] is W
    assert layer.b is b and layer.params[1] is b


@with_dtypes
@with_modules
def test_affine_sees_in_place_updates_of_W_and_b(M, dtype):
    rng = _rng("sgd")
    W, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    x, dout = rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal((4, 3)).astype(dtype)
    layer = M.Affine(W, b)
    out1 = np.array(layer.forward(x))
    layer.backward(dout)
    W -= dtype(0.1) * layer.dW
    b -= dtype(0.1) * layer.db
    out2 = np.array(layer.forward(x))
    assert not np.allclose(out1, out2)
    assert_close(out2, x.astype(F64) @ W.astype(F64) + b, dtype)
    b[...] = 0
    assert_close(layer.forward(x), x.astype(F64) @ W.astype(F64), dtype)


@with_modules
def test_affine_sees_numerical_gradient_perturbations(M):
    rng = _rng("numgrad")
    W, b = rng.standard_normal((5, 3)), rng.standard_normal(3)
    x, dout = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    layer = M.Affine(W, b)
    layer.forward(x)
    layer.backward(dout)
    dW, db = layer.dW.copy(), layer.db.copy()
    f = lambda _: float(np.sum(layer.forward(x) * dout))  # noqa: E731
    assert rel_err(G.numerical_gradient(f, W), dW, GRAD_FLOOR[F64]) <= GRAD_TOL[F64]
    assert rel_err(G.numerical_gradient(f, b), db, GRAD_FLOOR[F64]) <= GRAD_TOL[F64]


@with_dtypes
@with_modules
def test_affine_grads_are_dW_db_and_stable_across_backwards(M, dtype):
    rng = _rng("grads")
    W, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    x = rng.standard_normal((4, 5)).astype(dtype)
    layer = M.Affine(W, b)
    layer.forward(x)
    layer.backward(rng.standard_normal((4, 3)).astype(dtype))
    assert layer.grads[0] is layer.dW and layer.grads[1] is layer.db
    dW, db = layer.dW, layer.db
    x2 = rng.standard_normal((2, 5)).astype(dtype)
    dout2 = rng.standard_normal((2, 3)).astype(dtype)
    layer.forward(x2)
    layer.backward(dout2)
    assert layer.dW is dW and layer.db is db and layer.grads[0] is dW and layer.grads[1] is db
    assert_close(dW, x2.astype(F64).T @ dout2, dtype)
    assert_close(db, dout2.astype(F64).sum(0), dtype)


@with_dtypes
@with_modules
def test_matmul_grads_written_in_place(M, dtype):
    rng = _rng("mm-grads")
    W = rng.standard_normal((5, 3)).astype(dtype)
    layer = M.MatMul(W)
    g = layer.grads[0]
    for n in (4, 2):
        x, dout = rng.standard_normal((n, 5)).astype(dtype), rng.standard_normal((n, 3)).astype(dtype)
        layer.forward(x)
        layer.backward(dout)
        assert layer.grads[0] is g
        assert_close(g, x.astype(F64).T @ dout, dtype)


@with_dtypes
@with_modules
def test_relu_backward_leaves_dout_alone(M, dtype):
    rng = _rng("relu-dout")
    x = rng.standard_normal((6, 7)).astype(dtype)
    dout = rng.standard_normal((6, 7)).astype(dtype)
    keep = dout.copy()
    layer = M.Relu()
    layer.forward(x)
    dx = layer.backward(dout)
    assert np.array_equal(dout, keep)
    assert not np.shares_memory(dx, dout)
    assert np.array_equal(dx, np.where(x <= 0, 0, keep))


def _all_layers_forward_backward(M, dtype):
    """(name, callable running forward+backward, the arrays handed in) for every layer."""
    rng = _rng("nomodify")
    a = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    x4, W, b, dout = a(2, 3, 2, 2), a(12, 5), a(5), a(2, 5)
    x2, dout2 = a(4, 6), a(4, 6)
    labels, onehot = np.array([1, 0, 5, 3]), np.eye(6, dtype=dtype)[[1, 0, 5, 3]]
    xr, doutr, xs, douts = a(1, 6), a(3, 6), a(3, 6), a(1, 6)
    xm, ym = a(3, 4), a(1, 4)
    douta = a(3, 4)

    def affine():
        layer = M.Affine(W, b)
        layer.forward(x4)
        layer.backward(dout)

    def matmul():
        layer = M.MatMul(W)
        layer.forward(x4.reshape(2, -1))
        layer.backward(dout)

    def unary(cls):
        def run():
            layer = getattr(M, cls)()
            layer.forward(x2)
            layer.backward(dout2)

        return run

    def softmax(t):
        def run():
            layer = M.SoftmaxWithLoss()
            layer.forward(x2, t)
            layer.backward(2.0)

        return run

    def repeat():
        layer = M.Repeat(3)
        layer.forward(xr)
        layer.backward(doutr)

    def sum_():
        layer = M.Sum()
        layer.forward(xs)
        layer.backward(douts)

    def binary(cls):
        def run():
            layer = getattr(M, cls)()
            layer.forward(xm, ym)
            layer.backward(douta)

        return run

    return [
        ("Affine", affine, [x4, W, b, dout]),
        ("MatMul", matmul, [x4, W, dout]),
        ("Relu", unary("Relu"), [x2, dout2]),
        ("Sigmoid", unary("Sigmoid"), [x2, dout2]),
        ("SoftmaxWithLoss-labels", softmax(labels), [x2, labels]),
        ("SoftmaxWithLoss-onehot", softmax(onehot), [x2, onehot]),
        ("Repeat", repeat, [xr, doutr]),
        ("Sum", sum_, [xs, douts]),
        ("MulLayer", binary("MulLayer"), [xm, ym, douta]),
        ("AddLayer", binary("AddLayer"), [xm, ym, douta]),
    ]


@with_dtypes
@with_modules
def test_no_layer_modifies_its_arguments(M, dtype):
    for name, run, arrays in _all_layers_forward_backward(M, dtype):
        copies = [a.copy() for a in arrays]
        run()
        _assert_unchanged(arrays, copies, name)


def _reuse_cases(dtype):
    rng = _rng("reuse")
    a = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    W, b = a(6, 4), a(4)
    return {
        "Affine": (lambda: FL.Affine(W, b, reuse=True), lambda: REF.Affine(W, b), lambda: (a(3, 6),), (3, 4)),
        "MatMul": (lambda: FL.MatMul(W, reuse=True), lambda: REF.MatMul(W), lambda: (a(3, 6),), (3, 4)),
        "Relu": (lambda: FL.Relu(reuse=True), REF.Relu, lambda: (a(3, 6),), (3, 6)),
        "Sigmoid": (lambda: FL.Sigmoid(reuse=True), REF.Sigmoid, lambda: (a(3, 6),), (3, 6)),
    }


def _data_ptr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("name", ["Affine", "MatMul", "Relu", "Sigmoid"])
@with_dtypes
def test_reuse_returns_the_same_buffers_with_correct_results(name, dtype):
    make, make_ref, inputs, out_shape = _reuse_cases(dtype)[name]
    rng = _rng("reuse-dout")
    layer = make()
    assert layer.reuse
    outs, dxs = [], []
    for _ in range(3):
        args = inputs()
        dout = rng.standard_normal(out_shape).astype(dtype)
        out = layer.forward(*args)
        ref = make_ref()
        assert_close(out, ref.forward(*args), dtype)
        dx = layer.backward(dout)
        assert_close(dx, ref.backward(dout), dtype)
        assert not np.shares_memory(dx, dout)
        outs.append(out)
        dxs.append(dx)
    assert outs[0] is outs[1] is outs[2]
    # dx may come back as a fresh view (reshaped to the input's shape) but of the same workspace memory
    assert _data_ptr(dxs[0]) == _data_ptr(dxs[1]) == _data_ptr(dxs[2])
    # a new shape gets a new buffer, still correct
    args = (rng.standard_normal((5, 6)).astype(dtype),)
    out = layer.forward(*args)
    assert out.shape[0] == 5 and out is not outs[0]
    assert_close(out, make_ref().forward(*args), dtype)


@with_dtypes
def test_reuse_softmax_with_loss(dtype):
    rng = _rng("reuse-softmax")
    layer = FL.SoftmaxWithLoss(reuse=True)
    ys, dxs = [], []
    for dout in (1, 2.5, 2.5):
        x = rng.standard_normal((4, 7)).astype(dtype)
        t = rng.integers(0, 7, 4)
        ref = REF.SoftmaxWithLoss()
        assert layer.forward(x, t) == pytest.approx(ref.forward(x, t), rel=TOL[dtype]["rtol"])
        assert_close(layer.y, ref.y, dtype)
        ys.append(layer.y)
        dx = layer.backward(dout)
        assert_close(dx, ref.backward(dout), dtype)
        dxs.append(dx)
    assert ys[0] is ys[1] is ys[2]
    assert _data_ptr(dxs[1]) == _data_ptr(dxs[2])


@with_dtypes
def test_affine_need_dx_false_still_computes_dW_db(dtype):
    rng = _rng("need-dx")
    W, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    x, dout = rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal((4, 3)).astype(dtype)
    layer = FL.Affine(W, b, need_dx=False)
    layer.forward(x)
    assert layer.backward(dout) is None
    assert_close(layer.dW, x.astype(F64).T @ dout, dtype)
    assert_close(layer.db, dout.astype(F64).sum(0), dtype)


@with_modules
@with_dtypes
@pytest.mark.parametrize("x_dtype", ["same", "f32", "f64"], ids=["x-same", "x-f32", "x-f64"])
def test_affine_backward_need_dx_keyword_skips_dx_only(M, dtype, x_dtype):
    # common API (fastbp extension): backward(dout, need_dx=False) writes dW/db exactly as the default call and
    # returns None; mixed dtypes take the layer's conversion path, N-D input the reshape path
    rng = _rng("need-dx-kw")
    W, b = rng.standard_normal((6, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    xd = dtype if x_dtype == "same" else {"f32": np.float32, "f64": np.float64}[x_dtype]
    x = rng.standard_normal((4, 2, 3)).astype(xd)
    dout = rng.standard_normal((4, 3)).astype(np.result_type(xd, dtype))
    full, skip = M.Affine(W, b), M.Affine(W, b)
    full.forward(x)
    skip.forward(x)
    dx = full.backward(dout)
    assert dx.shape == x.shape
    assert skip.backward(dout, need_dx=False) is None
    np.testing.assert_array_equal(skip.dW, full.dW)
    np.testing.assert_array_equal(skip.db, full.db)
    assert skip.grads[0] is skip.dW and skip.dW.dtype == W.dtype
    # the default still returns dx after a skipped call
    np.testing.assert_array_equal(skip.backward(dout), dx)


@with_modules
def test_affine_need_dx_keyword_before_forward_raises_like_the_default(M):
    with pytest.raises(RuntimeError, match="before Affine.forward") as a:
        M.Affine(np.ones((2, 2)), np.zeros(2)).backward(np.ones((1, 2)), need_dx=False)
    with pytest.raises(RuntimeError) as b:
        M.Affine(np.ones((2, 2)), np.zeros(2)).backward(np.ones((1, 2)))
    assert str(a.value) == str(b.value)


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear exception naming what was expected and what came
# ---------------------------------------------------------------------------------------------------------------
def names(*parts):
    """A regex that matches when every part occurs in the message (any order)."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in parts)


def esc(s):
    import re

    return re.escape(str(s))


@with_modules
def test_affine_width_mismatch(M):
    layer = M.Affine(np.ones((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=names(esc((2, 4)), esc((3, 2)))):
        layer.forward(np.ones((2, 4)))
    with pytest.raises(ValueError, match=names(esc((2, 2, 2)), esc((3, 2)))):
        layer.forward(np.ones((2, 2, 2)))


@with_modules
def test_affine_bias_length(M):
    with pytest.raises(ValueError, match=names(esc("(2,)"), esc("(3,)"))):
        M.Affine(np.ones((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match=names(esc("(2,)"), esc("(1, 2)"))):
        M.Affine(np.ones((3, 2)), np.zeros((1, 2)))


@pytest.mark.parametrize("shape", [(3,), (3, 2, 1), ()])
@with_modules
def test_affine_W_not_2d(M, shape):
    W = np.ones(shape)
    with pytest.raises(ValueError, match=names("2-D", esc(shape))):
        M.Affine(W, np.zeros(2))


@with_modules
def test_matmul_bad_shapes(M):
    with pytest.raises(ValueError, match=names("2-D", esc((3,)))):
        M.MatMul(np.ones(3))
    layer = M.MatMul(np.ones((3, 2)))
    with pytest.raises(ValueError, match=names(r"\b4\b", r"\b3\b")):  # 4 columns came, 3 expected
        layer.forward(np.ones((2, 4)))


def _forwarded(M, name):
    """(layer after one forward, shape of its expected dout)."""
    if name == "Affine":
        layer = M.Affine(np.ones((3, 2)), np.zeros(2))
        layer.forward(np.ones((4, 3)))
        return layer, (4, 2)
    if name == "MatMul":
        layer = M.MatMul(np.ones((3, 2)))
        layer.forward(np.ones((4, 3)))
        return layer, (4, 2)
    layer = getattr(M, name)()
    layer.forward(np.ones((4, 3)))
    return layer, (4, 3)


@pytest.mark.parametrize("name", ["Affine", "MatMul", "Relu", "Sigmoid"])
@with_modules
def test_dout_shape_mismatch(M, name):
    layer, shape = _forwarded(M, name)
    bad = (shape[0] + 1, shape[1])
    with pytest.raises(ValueError, match=names(esc(shape), esc(bad))):
        layer.backward(np.ones(bad))
    bad = (shape[0] * shape[1],)
    with pytest.raises(ValueError, match=names(esc(shape), esc(bad))):
        layer.backward(np.ones(bad))


@with_modules
def test_softmax_backward_needs_scalar_dout(M):
    layer = M.SoftmaxWithLoss()
    layer.forward(np.ones((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match=names("scalar", esc((2, 3)))):
        layer.backward(np.ones((2, 3)))


BEFORE = {
    "Affine": lambda M: M.Affine(np.ones((3, 2)), np.zeros(2)).backward(np.ones((1, 2))),
    "MatMul": lambda M: M.MatMul(np.ones((3, 2))).backward(np.ones((1, 2))),
    "Relu": lambda M: M.Relu().backward(np.ones((1, 2))),
    "Sigmoid": lambda M: M.Sigmoid().backward(np.ones((1, 2))),
    "SoftmaxWithLoss": lambda M: M.SoftmaxWithLoss().backward(),
    "MulLayer": lambda M: M.MulLayer().backward(np.ones(2)),
    "AddLayer": lambda M: M.AddLayer().backward(np.ones(2)),
    "Repeat": lambda M: M.Repeat(2).backward(np.ones((2, 2))),
    "Sum": lambda M: M.Sum().backward(np.ones((1, 2))),
}


@pytest.mark.parametrize("name", list(BEFORE))
@with_modules
def test_backward_before_forward(M, name):
    with pytest.raises((ValueError, RuntimeError), match=names(name, "before", "forward")):
        BEFORE[name](M)


@pytest.mark.parametrize("name", list(BEFORE))
def test_backward_before_forward_same_exception_class_in_both_modules(name):
    """A drop-in replacement raises what the reference raises (code catching one must catch the other)."""
    kinds = []
    for M in (FL, REF):
        with pytest.raises(Exception) as info:
            BEFORE[name](M)
        kinds.append(type(info.value))
    assert kinds[0] is kinds[1], f"fastbp.layers raises {kinds[0].__name__}, fastbp.reference {kinds[1].__name__}"


LOGITS = np.array([[0.5, 1.0, -1.0, 2.0], [0.0, 0.1, 0.2, 0.3], [3.0, -3.0, 0.0, 1.0]])


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
@with_modules
def test_softmax_label_out_of_range(M, label_dtype):
    with pytest.raises(ValueError, match=names(r"\b4\b", esc("[0, 3]"))):
        M.SoftmaxWithLoss().forward(LOGITS, np.array([0, 4, 1], label_dtype))
    with pytest.raises(ValueError, match=names(r"\b200\b", esc("[0, 3]"))):
        M.SoftmaxWithLoss().forward(LOGITS, np.array([200, 0, 1], label_dtype))


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.int8])
@with_modules
def test_softmax_negative_label(M, label_dtype):
    with pytest.raises(ValueError, match=names("-1", r"(\[0, 3\]|>= ?0)")):
        M.SoftmaxWithLoss().forward(LOGITS, np.array([0, -1, 1], label_dtype))


@with_modules
def test_softmax_label_out_of_range_single_sample(M):
    with pytest.raises(ValueError, match=names(r"\b4\b", esc("[0, 3]"))):
        M.SoftmaxWithLoss().forward(LOGITS[0], 4)
    with pytest.raises(ValueError, match=names("-2", r"(\[0, 3\]|>= ?0)")):
        M.SoftmaxWithLoss().forward(LOGITS[0], -2)


@with_modules
def test_softmax_wrong_label_count(M):
    with pytest.raises(ValueError, match=names(r"expected 3 label", r"\b2\b")):
        M.SoftmaxWithLoss().forward(LOGITS, np.array([0, 1]))
    with pytest.raises(ValueError, match=names(r"expected 3 label", r"\b4\b")):
        M.SoftmaxWithLoss().forward(LOGITS, np.array([0, 1, 2, 3]))


@pytest.mark.parametrize("t_dtype", [F32, F64])
@with_modules
def test_softmax_one_hot_width_mismatch(M, t_dtype):
    with pytest.raises(ValueError, match=names(esc((3, 4)), esc((3, 5)))):
        M.SoftmaxWithLoss().forward(LOGITS, np.eye(5, dtype=t_dtype)[[0, 1, 2]])
    with pytest.raises(ValueError, match=names(esc((3, 4)), esc((2, 4)))):
        M.SoftmaxWithLoss().forward(LOGITS, np.eye(4, dtype=t_dtype)[[0, 1]])


@pytest.mark.parametrize("t_dtype", [F32, F64])
@with_modules
def test_softmax_float_labels(M, t_dtype):
    with pytest.raises(TypeError, match=names("integer", np.dtype(t_dtype).name)):
        M.SoftmaxWithLoss().forward(LOGITS, np.array([0, 1, 2], t_dtype))


@pytest.mark.parametrize("shape", [(), (2, 3, 4)])
@with_modules
def test_softmax_logits_not_1d_or_2d(M, shape):
    x = np.ones(shape)
    t = np.zeros(shape[:-1], np.int64) if shape else 0
    with pytest.raises(ValueError, match=names("1-D", "2-D", esc(shape))):
        M.SoftmaxWithLoss().forward(x, t)


# ---------------------------------------------------------------------------------------------------------------
# NaN, extreme values, empty batches
# ---------------------------------------------------------------------------------------------------------------
@with_dtypes
@with_modules
def test_nan_logit_gives_nan_loss(M, dtype):
    x = LOGITS.astype(dtype)
    for pos in [(1, 0), (1, 2)]:
        xx = x.copy()
        xx[pos] = np.nan
        for t in (np.array([0, 1, 2]), np.eye(4, dtype=dtype)[[0, 1, 2]]):
            assert np.isnan(M.SoftmaxWithLoss().forward(xx, t))


@with_dtypes
@with_modules
def test_nan_in_affine_input_gives_nan_rows_only(M, dtype):
    rng = _rng("nan-affine")
    W, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    x = rng.standard_normal((4, 5)).astype(dtype)
    x[2, 3] = np.nan
    out = M.Affine(W, b).forward(x)
    assert np.all(np.isnan(out[2]))
    rows = [0, 1, 3]
    assert np.all(np.isfinite(out[rows]))
    assert_close(out[rows], x[rows].astype(F64) @ W.astype(F64) + b, dtype)


@with_dtypes
@with_modules
def test_extreme_finite_logits_give_exact_losses(M, dtype):
    big = float(dtype(1e30))  # float32(1e30) is not 1e30: the exact loss is 2 * big
    x = np.array([[1e30, -1e30]], dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        assert M.SoftmaxWithLoss().forward(x, np.array([1])) == 2 * big
        assert M.SoftmaxWithLoss().forward(x, np.array([0])) == 0.0
        assert M.SoftmaxWithLoss().forward(x, np.eye(2, dtype=dtype)[[1]]) == 2 * big
        assert M.SoftmaxWithLoss().forward(x[0], 1) == 2 * big
        layer = M.SoftmaxWithLoss()
        assert layer.forward(np.array([[-1e30, 1e30], [1e30, -1e30]], dtype), np.array([0, 0])) == big
        dx = layer.backward()
    assert np.all(np.isfinite(dx))
    assert_close(dx, np.array([[-0.5, 0.5], [0.0, 0.0]]), dtype)


@with_dtypes
@with_modules
def test_sigmoid_saturates_without_warnings(M, dtype):
    x = np.array([[1e4, -1e4, 800.0, -800.0, 0.0]], dtype)
    layer = M.Sigmoid()
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        out = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
    assert np.array_equal(out, np.array([[1, 0, 1, 0, 0.5]], dtype))
    assert np.array_equal(dx, np.array([[0, 0, 0, 0, 0.25]], dtype))


@with_dtypes
@with_modules
def test_affine_empty_batch(M, dtype):
    rng = _rng("empty")
    W, b = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    layer = M.Affine(W, b)
    layer.forward(rng.standard_normal((4, 5)).astype(dtype))
    layer.backward(rng.standard_normal((4, 3)).astype(dtype))  # dW/db hold non-zero values now
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out = layer.forward(np.empty((0, 5), dtype))
        assert out.shape == (0, 3) and out.dtype == dtype
        dx = layer.backward(np.empty((0, 3), dtype))
    assert dx.shape == (0, 5)
    assert np.array_equal(layer.dW, np.zeros((5, 3))) and np.array_equal(layer.db, np.zeros(3))
    out = layer.forward(np.empty((0, 5, 1, 1), dtype))
    assert out.shape == (0, 3)
    assert layer.backward(np.empty((0, 3), dtype)).shape == (0, 5, 1, 1)


@with_dtypes
@with_modules
def test_softmax_empty_batch_is_nan_with_warning(M, dtype):
    layer = M.SoftmaxWithLoss()
    for t in (np.empty(0, np.int64), np.empty((0, 4), dtype)):
        with np.errstate(all="raise"), pytest.warns(RuntimeWarning, match="(?i)empty"):
            loss = layer.forward(np.empty((0, 4), dtype), t)
        assert np.isnan(loss)
        with warnings.catch_warnings(), np.errstate(all="raise"):
            warnings.simplefilter("error")
            dx = layer.backward()
        assert dx.shape == (0, 4)


@with_dtypes
@with_modules
def test_elementwise_layers_empty_input(M, dtype):
    for cls in ("Relu", "Sigmoid"):
        layer = getattr(M, cls)()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = layer.forward(np.empty((0, 3), dtype))
            dx = layer.backward(np.empty((0, 3), dtype))
        assert out.shape == dx.shape == (0, 3)


# ---------------------------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------------------------
def _train_stack(M, dtype, kwargs, data, steps=3):
    """Affine-Relu-Affine-SoftmaxWithLoss with own weight copies; a few SGD steps; every result of every step."""
    x, t, W1, b1, W2, b2 = data
    W1, b1, W2, b2 = (np.array(a, dtype) for a in (W1, b1, W2, b2))
    a1, relu, a2, loss = (
        M.Affine(W1, b1, **kwargs),
        M.Relu(**kwargs),
        M.Affine(W2, b2, **kwargs),
        M.SoftmaxWithLoss(**kwargs),
    )
    xs = x.astype(dtype)
    record = []
    for _ in range(steps):
        L = loss.forward(a2.forward(relu.forward(a1.forward(xs))), t)
        dx = a1.backward(relu.backward(a2.backward(loss.backward())))
        record += [np.array(L), np.array(dx), a1.dW.copy(), a1.db.copy(), a2.dW.copy(), a2.db.copy()]
        for p, g in ((W1, a1.dW), (b1, a1.db), (W2, a2.dW), (b2, a2.db)):
            p -= dtype(0.1) * g
    return record


@pytest.mark.parametrize(
    "M,kwargs", [(FL, {}), (FL, {"reuse": True}), (REF, {})], ids=["layers", "layers-reuse", "reference"]
)
@with_dtypes
def test_threads_give_bit_identical_results(M, kwargs, dtype):
    rng = _rng("threads")
    data = (
        rng.standard_normal((100, 784)),
        rng.integers(0, 10, 100),
        rng.standard_normal((784, 50)) * 0.05,
        np.zeros(50),
        rng.standard_normal((50, 10)) * 0.05,
        np.zeros(10),
    )
    want = _train_stack(M, dtype, kwargs, data)
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            results[i] = _train_stack(M, dtype, kwargs, data)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, got in enumerate(results):
        assert len(got) == len(want)
        for j, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and np.array_equal(g, w), f"thread {i}, result {j} differs"


# ---------------------------------------------------------------------------------------------------------------
# issue 7 regressions (each of these failed on main before the fix)
# ---------------------------------------------------------------------------------------------------------------
def _spiral(rs, n=100, cls=3):
    """Book 2's dataset/spiral.py (N=100 points per class, 3 classes, int one-hot targets), drawn from `rs`."""
    x = np.zeros((n * cls, 2))
    t = np.zeros((n * cls, cls), dtype=np.int64)
    for j in range(cls):
        for i in range(n):
            rate = i / n
            theta = j * 4.0 + 4.0 * rate + rs.randn() * 0.2
            x[n * j + i] = (rate * np.sin(theta), rate * np.cos(theta))
            t[n * j + i, j] = 1
    return x, t


class _Book2TwoLayerNet:
    """Book 2's ch01/two_layer_net.py: Affine -> Sigmoid -> Affine -> SoftmaxWithLoss, params/grads lists."""

    def __init__(self, M, rs, dtype, hidden=10):
        W1, b1 = (0.01 * rs.randn(2, hidden)).astype(dtype), np.zeros(hidden, dtype)
        W2, b2 = (0.01 * rs.randn(hidden, 3)).astype(dtype), np.zeros(3, dtype)
        self.layers = [M.Affine(W1, b1), M.Sigmoid(), M.Affine(W2, b2)]
        self.loss_layer = M.SoftmaxWithLoss()
        self.params, self.grads = [], []
        for layer in self.layers:  # the book collects them once, parameterless layers included
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


def _book2_train(M, data_dtype, param_dtype, epochs=300, batch=30, lr=1.0):
    """Book 2's ch01/train.py with its Trainer loop written out; every step's loss."""
    rs = np.random.RandomState(1984)  # spiral.load_data() seeds 1984; the weights and shuffles follow
    x, t = _spiral(rs)
    x = x.astype(data_dtype)
    model = _Book2TwoLayerNet(M, rs, param_dtype)
    kept = [g for g in model.grads]
    losses = []
    iters = len(x) // batch
    for _ in range(epochs):
        idx = rs.permutation(np.arange(len(x)))
        x, t = x[idx], t[idx]
        for i in range(iters):
            bx, bt = x[i * batch : (i + 1) * batch], t[i * batch : (i + 1) * batch]
            losses.append(float(model.forward(bx, bt)))
            model.backward()
            for p, g in zip(model.params, model.grads):  # common/optimizer.py SGD.update
                p -= lr * g
    return np.array(losses), model, kept


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_book2_ch01_spiral_training_matches_reference_step_for_step(dtype):
    """Issue 8: book 2's chapter 1 end to end (needs params/grads on Sigmoid and SoftmaxWithLoss)."""
    fast, model, kept = _book2_train(FL, dtype, dtype)
    ref, _, _ = _book2_train(REF, dtype, dtype)
    assert len(fast) == 3000
    assert all(a is b for a, b in zip(model.grads, kept))
    # float32 losses drift apart by rounding over 3000 steps of lr 1.0 (measured: 1.6e-5 at most); float64 ones
    # stay within 1e-14
    np.testing.assert_allclose(fast, ref, rtol=1e-11 if dtype is F64 else 2e-4, atol=0)
    final = fast[-10:].mean()  # the book's last printout averages the last epoch's 10 losses
    assert 0.05 < final < 0.3, final
    assert fast[:10].mean() > 1.0  # it starts at ln(3) = 1.0986


@with_modules
def test_book2_grads_lists_updated_in_place_with_mixed_dtypes(M):
    """Issue 7 item 2: float64 data and dout into float32 layers; book 2 keeps its own list of the grads."""
    losses, model, kept = _book2_train(M, F64, F32, epochs=100)
    assert all(a is b for a, b in zip(model.grads, kept))
    assert all(g.dtype == F32 for g in model.grads)
    assert losses[-10:].mean() < 0.7 * losses[:10].mean(), (losses[:10].mean(), losses[-10:].mean())


@pytest.mark.parametrize("name", ["Affine", "MatMul"])
@pytest.mark.parametrize("case", ["f64-data", "f64-dout", "strided-grads", "F-order-W"])
@with_modules
def test_grads_written_in_place_whatever_comes_in(M, name, case):
    """Issue 7 item 2: grads[0]/grads[1] are the same arrays after backward, holding the new gradient."""
    rng = _rng(f"inplace-{name}-{case}")
    W = rng.standard_normal((5, 3)).astype(F32)
    b = rng.standard_normal(3).astype(F32)
    if case == "F-order-W":
        W = np.asfortranarray(W)
    layer = M.Affine(W, b) if name == "Affine" else M.MatMul(W)
    if case == "strided-grads":  # grads living in a bigger buffer (a view with strides)
        big = np.zeros((10, 6), F32)
        layer.grads[0] = big[::2, ::2]
        if name == "Affine":
            layer.grads[1] = np.zeros(6, F32)[::2]
    kept = list(layer.grads)
    for step in range(2):
        x = rng.standard_normal((4, 5))
        x = x if case == "f64-data" else x.astype(F32)
        dout = rng.standard_normal((4, 3))
        dout = dout if case in ("f64-data", "f64-dout") else dout.astype(F32)
        layer.forward(x)
        layer.backward(dout)
        assert all(g is k for g, k in zip(layer.grads, kept)), f"step {step}: a grads array was replaced"
        assert layer.dW is layer.grads[0]
        assert layer.grads[0].dtype == F32
        assert_close(kept[0], x.astype(F64).T @ dout.astype(F64), F32)
        if name == "Affine":
            assert layer.db is layer.grads[1]
            assert_close(kept[1], dout.astype(F64).sum(0), F32)
    if case == "strided-grads":
        assert_close(big[::2, ::2], kept[0], F32)
        assert not big[1::2].any()


@pytest.mark.parametrize("name", ["Affine", "MatMul"])
@with_modules
def test_read_only_grads_raise_instead_of_being_replaced(M, name):
    W = np.ones((3, 2))
    layer = M.Affine(W, np.zeros(2)) if name == "Affine" else M.MatMul(W)
    layer.grads[0].setflags(write=False)
    kept = layer.grads[0]
    layer.forward(np.ones((4, 3)))
    with pytest.raises(ValueError, match="read-only"):
        layer.backward(np.ones((4, 2)))
    assert layer.grads[0] is kept


@pytest.mark.parametrize("onehot", [False, True])  # one-hot rows of the logits' dtype: the kernel's path too
@pytest.mark.parametrize("reuse", [False, True])
@with_dtypes
def test_softmax_backward_returns_a_new_array_each_call(dtype, reuse, onehot):
    """Issue 7 item 6: without reuse the caller may scale the returned gradient in place."""
    rng = _rng("softmax-new")
    x = rng.standard_normal((4, 5)).astype(dtype)
    t = np.array([0, 3, 1, 4])
    if onehot:
        t = np.eye(5, dtype=dtype)[t]
    ref = REF.SoftmaxWithLoss()
    ref.forward(x, t)
    want = ref.backward()
    layer = FL.SoftmaxWithLoss(reuse=reuse)
    layer.forward(x, t)
    d1 = layer.backward()
    assert_close(d1, want, dtype)
    if reuse:
        assert layer.backward() is d1  # the workspace contract
        return
    d1 *= 10  # the book's callers do this (e.g. dout * loss scaling)
    d2 = layer.backward()
    assert d2 is not d1 and not np.shares_memory(d1, d2)
    assert_close(d2, want, dtype)
    d3 = layer.backward(2.0)
    assert not np.shares_memory(d3, d2)
    assert_close(d3, 2 * want, dtype)
    assert_close(layer.backward(1), want, dtype)


@with_dtypes
def test_softmax_one_hot_rows_of_the_logits_dtype_go_straight_to_the_kernel(dtype, monkeypatch):
    """The book's ch05 feeds float64 one-hot rows into a float64 net: no conversion, no NumPy validation pass,
    the same numbers as the general path (the one taken by rows of another dtype or layout)."""
    rng = _rng("softmax-onehot-fast")
    x = rng.standard_normal((100, 10)).astype(dtype)
    t = np.eye(10, dtype=dtype)[rng.integers(0, 10, 100)]
    general = FL.SoftmaxWithLoss()
    want = general.forward(x, np.asfortranarray(t))  # F-order rows: the general path
    want_dx = general.backward()
    layer = FL.SoftmaxWithLoss(reuse=True)
    monkeypatch.setattr(layer, "_forward_any", lambda *a: pytest.fail("took the general path"))
    assert layer.forward(x, t) == want
    assert layer.t is t
    assert np.array_equal(layer.y, general.y)
    assert np.array_equal(layer.backward(), want_dx)


@pytest.mark.parametrize("name", ["Affine", "MatMul", "Relu", "Sigmoid"])
@with_dtypes
def test_reuse_layer_fed_its_own_output(name, dtype):
    """Issue 7 item 12: a reuse=True layer fed its previous output (square W) computes into another buffer."""
    rng = _rng(f"own-output-{name}")
    W = rng.standard_normal((5, 5)).astype(dtype) * 0.5
    b = rng.standard_normal(5).astype(dtype)
    make = {
        "Affine": lambda M, **k: M.Affine(W, b, **k),
        "MatMul": lambda M, **k: M.MatMul(W, **k),
        "Relu": lambda M, **k: M.Relu(**k),
        "Sigmoid": lambda M, **k: M.Sigmoid(**k),
    }[name]
    layer, ref = make(FL, reuse=True), make(REF)
    x = rng.standard_normal((4, 5)).astype(dtype)
    out = layer.forward(x)
    want = ref.forward(ref.forward(x))
    out2 = layer.forward(out)  # its own buffer as input
    assert_close(out2, want, dtype)
    assert_close(layer.forward(out2), ref.forward(want), dtype)  # and back again
    d = rng.standard_normal((4, 5)).astype(dtype)
    dx = layer.backward(d)
    want_dx = ref.backward(d)
    dx2 = layer.backward(dx)  # its own dx as dout
    assert_close(dx2, ref.backward(want_dx), dtype)


@pytest.mark.parametrize("dt", [F16, np.int32, np.int64, np.int8, np.uint8, np.bool_])
@pytest.mark.parametrize(
    "name", ["Affine", "MatMul", "Relu", "Sigmoid", "SoftmaxWithLoss", "MulLayer", "AddLayer", "Repeat", "Sum"]
)
def test_every_layer_gives_numpys_answer_for_non_kernel_dtypes(name, dt):
    """Issue 7 item 13: float16 and integer inputs give the reference's (NumPy's) answer for every layer, forward
    and backward, dtype included -- no TypeError."""
    rng = _rng(f"f16-{name}-{np.dtype(dt).name}")
    raw = lambda *s: rng.standard_normal(s) * 3  # noqa: E731
    x = raw(4, 5).astype(dt)
    W, b, y = raw(5, 3).astype(dt), raw(3).astype(dt), raw(1, 5).astype(dt)

    def run(M):
        if name in ("Affine", "MatMul"):
            layer = M.Affine(W, b) if name == "Affine" else M.MatMul(W)
            out = layer.forward(x)
            dx = layer.backward(np.ones(out.shape, out.dtype))
            return [out, dx] + [np.array(g) for g in layer.grads]
        if name == "SoftmaxWithLoss":
            layer = M.SoftmaxWithLoss()
            loss = layer.forward(x, np.array([0, 4, 2, 2]))
            return [np.array(loss), layer.y, layer.backward()]
        if name in ("MulLayer", "AddLayer"):
            layer = getattr(M, name)()
            out = layer.forward(x, y)
            return [out, *layer.backward(np.ones(out.shape, out.dtype))]
        layer = M.Repeat(4) if name == "Repeat" else getattr(M, name)()
        xin = x[:1] if name == "Repeat" else x
        out = layer.forward(xin)
        return [out, layer.backward(np.ones(out.shape, out.dtype))]

    if dt is np.bool_ and name in ("Affine", "MatMul"):
        pytest.skip("bool @ bool is logical, not arithmetic")
    want = run(REF)
    got = run(FL)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype, f"{name} result {i}: dtype {g.dtype}, NumPy/reference gives {w.dtype}"
        if w.dtype.kind == "f":
            assert_close(g, w, w.dtype if w.dtype.itemsize >= 4 else F16)
        else:
            assert np.array_equal(g, w)


@with_modules
def test_gradient_check_layer_with_integer_input_checks_something(M):
    """Issue 7 item 14: never an empty result: integer x is checked in float64, or the check raises."""
    x = np.array([[3, -2, 1], [-4, 5, 2]])
    errors = G.gradient_check_layer(M.Relu(), x)
    assert set(errors) == {"x"} and errors["x"] < 1e-7
    errors = G.gradient_check_layer(M.Sigmoid(), x.astype(np.int16))
    assert set(errors) == {"x"}
    with pytest.raises(ValueError, match="nothing to check"):
        G.gradient_check_model(_NoParams(), np.ones((2, 3)), np.array([0, 1]))


class _NoParams:
    """A book-2 style model without parameters: a gradient check of it compares nothing."""

    params, grads = [], []

    def forward(self, x, t):
        return float(np.sum(x))

    def backward(self, dout=1):
        return None


TARGET_FORMS = {
    # name: (logits shape, targets) -- the forms the book's cross_entropy_error accepts
    "labels-(N,)": ((3, 4), np.array([1, 0, 3])),
    "labels-(N,1)": ((3, 4), np.array([[1], [0], [3]])),
    "one-hot-int": ((3, 4), np.eye(4, dtype=np.int64)[[1, 0, 3]]),
    "one-hot-bool": ((3, 4), np.eye(4, dtype=bool)[[1, 0, 3]]),
    "one-hot-float": ((3, 4), np.eye(4)[[1, 0, 3]]),
    "ch07-(1,1)": ((1, 4), np.array([1]).reshape((1, 1))),
    "batch1-scalar": ((1, 4), np.int64(1)),
    "single-scalar": ((4,), 1),
    "single-(1,)": ((4,), np.array([1])),
    "single-(1,1)": ((4,), np.array([[1]])),
    "single-one-hot": ((4,), np.array([0, 1, 0, 0])),
    "single-one-hot-bool": ((4,), np.array([0, 1, 0, 0], bool)),
    "single-one-hot-(1,C)": ((4,), np.array([[0, 1, 0, 0]])),
}


@pytest.mark.parametrize("form", list(TARGET_FORMS))
@with_dtypes
@with_modules
def test_softmax_accepts_every_target_form_of_the_book(M, dtype, form):
    """Issue 7 item 15: labels (N,), (N, 1), one-hot int/bool/float, single samples, the ch07 (1, 1) case."""
    shape, t = TARGET_FORMS[form]
    rng = _rng(f"forms-{form}")
    x = rng.standard_normal(shape).astype(dtype)
    layer = M.SoftmaxWithLoss()
    loss = layer.forward(x, t)
    x2 = x.reshape(-1, shape[-1]).astype(F64)
    n = x2.shape[0]
    y = np.exp(x2 - x2.max(1, keepdims=True))
    y /= y.sum(1, keepdims=True)
    ta = np.asarray(t)
    # the book's rule: t.size == y.size is one-hot (argmax), else labels (one per row)
    labels = ta.reshape(n, -1).argmax(1) if ta.size == x2.size else ta.reshape(n)
    # the exact loss (the book's -log(y + 1e-7) differs from it by about 1e-7 / y)
    assert loss == pytest.approx(-np.mean(np.log(y[np.arange(n), labels])), rel=TOL[dtype]["rtol"])
    want = (y - np.eye(shape[-1])[labels]) / n
    dx = layer.backward()
    # float (probability) rows promote like NumPy's y - t; integer and bool rows are read in the logits' dtype
    assert dx.shape == x.shape and dx.dtype == (np.result_type(dtype, ta.dtype) if ta.dtype.kind == "f" else dtype)
    assert_close(dx.reshape(want.shape), want, dtype)


def test_book_ch07_gradient_check_target():
    """The book's ch07/gradient_check.py passes t = np.array([1]).reshape((1, 1)) with a batch of one."""
    rng = _rng("ch07")
    W = rng.standard_normal((6, 10)) * 0.1
    b = np.zeros(10)
    x = rng.standard_normal((1, 6))
    t = np.array([1]).reshape((1, 1))
    affine, loss = FL.Affine(W, b), FL.SoftmaxWithLoss()

    def f(_):
        return loss.forward(affine.forward(x), t)

    f(None)
    affine.backward(loss.backward())
    dW = affine.dW.copy()
    assert rel_err(dW, G.numerical_gradient(f, W), GRAD_FLOOR[F64]) <= GRAD_TOL[F64]


# ---------------------------------------------------------------------------------------------------------------
# issue 8: book 2's interface on every layer, the layers built on the reference
# ---------------------------------------------------------------------------------------------------------------
CONSTRUCT = {
    "Affine": lambda M: M.Affine(np.ones((3, 2)), np.zeros(2)),
    "MatMul": lambda M: M.MatMul(np.ones((3, 2))),
    "Repeat": lambda M: M.Repeat(2),
    "BatchNormalization": lambda M: M.BatchNormalization(np.ones(3), np.zeros(3)),
    "Convolution": lambda M: M.Convolution(np.ones((2, 1, 3, 3)), np.zeros(2)),
    "Pooling": lambda M: M.Pooling(2, 2),
    "Embedding": lambda M: M.Embedding(np.ones((5, 3))),
}


def _all_layer_names():
    return sorted(set(FL.__all__) | set(REF.__all__))


@pytest.mark.parametrize("name", _all_layer_names())
def test_every_layer_has_book2_params_and_grads(name):
    """Every class of fastbp.layers.__all__ and fastbp.reference.__all__ has params and grads lists of matching
    arrays (empty where it has no parameters), as book 2's models collect them once."""
    for M in (FL, REF):
        if name not in M.__all__:
            continue
        cls = getattr(M, name)
        try:
            layer = CONSTRUCT[name](M) if name in CONSTRUCT else cls()
        except TypeError as e:
            pytest.fail(f"{M.__name__}.{name}() needs arguments: add a constructor to CONSTRUCT ({e})")
        assert isinstance(layer.params, list) and isinstance(layer.grads, list), (M.__name__, name)
        assert len(layer.params) == len(layer.grads), (M.__name__, name)
        for p, g in zip(layer.params, layer.grads):
            assert isinstance(g, np.ndarray) and g.shape == np.shape(p), (M.__name__, name)
        assert callable(layer) and callable(layer.forward) and callable(layer.backward)


@pytest.mark.parametrize("name", sorted(FL.__all__))
def test_fast_layers_subclass_the_reference(name):
    cls = getattr(FL, name)
    ref = getattr(REF, name, None)
    assert ref is not None, f"fastbp.layers.{name} has no fastbp.reference counterpart"
    assert issubclass(cls, ref), f"fastbp.layers.{name} does not subclass fastbp.reference.{name}"


def test_overlap_is_a_genuine_error_not_swallowed():
    """The fast path is a flags check, not a kernel call inside try/except: an overlap raises at once."""
    W = np.ones((4, 4))
    layer = FL.Affine(W, np.zeros(4))
    layer.forward(np.ones((2, 4)))
    layer.grads[0] = W  # grads aliasing the weights: the kernel would write W while reading it
    with pytest.raises(ValueError, match="overlap"):
        layer.backward(np.ones((2, 4)))


@pytest.mark.parametrize("M", [FL, REF], ids=["layers", "reference"])
def test_separate_instances_in_threads_give_the_single_thread_results(M):
    """Issue 7 item 16: an instance is not thread-safe (documented); separate instances used concurrently are."""
    assert "thread-safe" in (M.__doc__ or "")
    n_threads = 6
    want = _book2_train(M, F32, F32, epochs=3)[0]
    want64 = _book2_train(M, F64, F32, epochs=3)[0]
    results, errors = [None] * n_threads, []
    barrier = threading.Barrier(n_threads)

    def work(i):
        try:
            barrier.wait()
            results[i] = _book2_train(M, F32 if i % 2 == 0 else F64, F32, epochs=3)[0]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, got in enumerate(results):
        assert np.array_equal(got, want if i % 2 == 0 else want64), f"thread {i} differs"


def test_workspace_contract():
    """fastbp._workspace.Workspace (also fastbp.layers._Workspace): results new per call unless reuse, scratch
    always reused, a layer's own previous output never used as its next output buffer."""
    from fastbp._workspace import Workspace

    assert FL._Workspace is Workspace
    ws = Workspace(reuse=False)
    assert ws.result("out", (2, 3), F32) is not ws.result("out", (2, 3), F32)
    s = ws.scratch("x", (2, 3), F32)
    assert ws.scratch("x", (2, 3), F32) is s and ws.scratch("x", (3, 2), F32) is not s
    f = ws.scratch("g", (4, 5), F64, order="F")
    assert f.flags.f_contiguous and ws.scratch("g", (4, 5), F64, order="F") is f
    assert ws.scratch("g", (4, 5), F64).flags.c_contiguous
    ws.reuse = True
    a = ws.result("out", (2, 3), F32)
    assert ws.result("out", (2, 3), F32) is a
    b = ws.result("out", (2, 3), F32, src=a)  # fed its own output: the other buffer
    assert b is not a and not np.shares_memory(a, b)
    assert ws.result("out", (2, 3), F32, src=b) is a  # and back
    assert ws.result("out", (2, 3), F32, src=a[:1]) is b
    x = np.arange(6.0).reshape(2, 3)
    assert ws.as_dtype("c", x, F64) is x
    c = ws.as_dtype("c", x.T, F64)
    assert c.flags.c_contiguous and np.array_equal(c, x.T) and ws.as_dtype("c", x.T, F64) is c
    assert ws.cast("d", x, F64) is x and ws.cast("d", x, F32).dtype == F32


@pytest.mark.parametrize("threads", [1, 2, 3, 16, 64])
@pytest.mark.parametrize("n,d,m", [(100, 784, 50), (128, 784, 100), (5, 13, 3)])
def test_affine_float32_images_into_float64_weights_convert_inside_the_product(threads, n, d, m):
    # book 1 feeds float32 images into float64 weights: the kernel writes the float64 copy of x (what backward
    # reads) inside the product, into a private 64-byte aligned buffer kept from call to call
    from fastbp import _kernels as K

    rng = np.random.default_rng(n + d)
    x = rng.random((n, d)).astype(F32)
    W, b, dout = rng.standard_normal((d, m)) * 0.1, rng.standard_normal(m), rng.standard_normal((n, m))
    old = K._get_gemm_threads()
    try:
        K._set_gemm_threads(threads)
        layer = FL.Affine(W, b)
        out = layer.forward(x)
        xk = layer._xk
        assert xk.dtype == F64 and xk.ctypes.data % 64 == 0 and not np.shares_memory(xk, x)
        assert np.array_equal(xk, x.astype(F64))
        out2 = layer.forward(x)
        assert layer._xk is xk and out2 is not out and np.array_equal(out, out2)
        dx = layer.backward(dout)
    finally:
        K._set_gemm_threads(old)
    ref = REF.Affine(W, b)
    assert_close(out, ref.forward(x), F64, "out")
    assert_close(dx, ref.backward(dout), F64, "dx")
    assert_close(layer.dW, ref.dW, F64, "dW")
    assert_close(layer.db, ref.db, F64, "db")
