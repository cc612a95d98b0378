"""The def wrappers of fastbp._kernels called directly: results vs NumPy over layouts, transposes, empty dimensions
and dtypes; validation (TypeError for dtypes, ValueError for shapes/read-only/non-contiguous outputs); the OpenMP
paths on large arrays; float32 sums accumulated in double; fastbp._blas.info()."""

import itertools
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.special
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbp import _blas
from fastbp import _kernels as K

F16, F32, F64 = np.float16, np.float32, np.float64
DTYPES = [F32, F64]
with_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])

# Kernel results vs float64 NumPy: per dtype; `atol` is relative to max(1, max|expected|).
TOL = {F32: dict(rtol=1e-4, atol=1e-5), F64: dict(rtol=1e-11, atol=1e-12)}
PARALLEL_MIN = K.build_info()["parallel_min"]


def assert_close(actual, expected, dtype, err_msg=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    t = TOL[np.dtype(dtype).type]
    scale = max(1.0, float(np.max(np.abs(expected.astype(F64)), initial=0.0)))
    np.testing.assert_allclose(
        actual.astype(F64), expected.astype(F64), rtol=t["rtol"], atol=t["atol"] * scale, err_msg=err_msg
    )


# 2-D operand layouts: C; Fortran; a leading dimension larger than the row (rows2) or column (cols2); every axis
# strided (BLAS cannot read it: the wrapper must copy); negative strides; read-only.
OPERAND_LAYOUTS = ["C", "F", "rows2", "cols2", "strided", "reversed", "readonly"]


def operand(a, kind):
    """A fresh array equal to `a` laid out as `kind`; gaps hold NaN so a misread shows."""
    a = np.asarray(a)
    if kind == "C":
        out = np.array(a, order="C")
    elif kind == "F":
        out = np.array(a, order="F")
    elif kind == "rows2":
        big = np.full((2 * a.shape[0],) + a.shape[1:], np.nan, a.dtype)
        out = big[::2]
        out[...] = a
    elif kind == "cols2":  # column-major with a leading dimension of 2 * rows
        big = np.full((2 * a.shape[0], a.shape[1]), np.nan, a.dtype, order="F")
        out = big[::2]
        out[...] = a
    elif kind == "strided":
        big = np.full(tuple(2 * s for s in a.shape), np.nan, a.dtype)
        out = big[(slice(None, None, 2),) * a.ndim]
        out[...] = a
    elif kind == "reversed":
        flip = (slice(None, None, -1),) * a.ndim
        out = np.ascontiguousarray(a[flip])[flip]
    elif kind == "readonly":
        out = np.array(a, order="C")
        out.setflags(write=False)
    else:
        raise AssertionError(kind)
    assert np.array_equal(out, a)
    return out


# ---------------------------------------------------------------------------------------------------------------
# gemm
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("la", OPERAND_LAYOUTS)
@pytest.mark.parametrize("lb", OPERAND_LAYOUTS)
@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
@with_dtypes
def test_gemm_layouts_and_transposes(dtype, ta, tb, la, lb):
    m, k, n = 5, 7, 3
    rng = np.random.default_rng(1234)
    a0 = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b0 = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    a, b = operand(a0, la), operand(b0, lb)
    opa = (a0.T if ta else a0).astype(F64)
    opb = (b0.T if tb else b0).astype(F64)
    out = np.full((m, n), np.nan, dtype)  # beta = 0: C is never read, NaN must not leak
    assert K.gemm(a, b, out, trans_a=ta, trans_b=tb) is out
    assert_close(out, opa @ opb, dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    out = c0.copy()
    K.gemm(a, b, out, trans_a=ta, trans_b=tb, alpha=0.5, beta=2.0)
    assert_close(out, 0.5 * opa @ opb + 2.0 * c0.astype(F64), dtype)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


@pytest.mark.parametrize("mkn", [(1, 1, 1), (1, 9, 1), (9, 1, 9), (1, 4096, 2), (257, 3, 129)])
@with_dtypes
def test_gemm_thin_shapes(dtype, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(7)
    for la, lb in itertools.product(["C", "F", "rows2", "cols2"], repeat=2):
        a0 = rng.standard_normal((m, k)).astype(dtype)
        b0 = rng.standard_normal((k, n)).astype(dtype)
        out = np.full((m, n), np.nan, dtype)
        K.gemm(operand(a0, la), operand(b0, lb), out)
        assert_close(out, a0.astype(F64) @ b0.astype(F64), dtype, f"{la} {lb}")


@pytest.mark.parametrize("m,k,n", [s for s in itertools.product([0, 3], [0, 4], [0, 2]) if 0 in s])
@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
@with_dtypes
def test_gemm_zero_sized(dtype, m, k, n, ta, tb):
    for la in ("C", "F", "rows2"):
        a = operand(np.ones((k, m) if ta else (m, k), dtype), la)
        b = operand(np.ones((n, k) if tb else (k, n), dtype), la)
        out = np.full((m, n), np.nan, dtype)
        K.gemm(a, b, out, trans_a=ta, trans_b=tb)
        assert np.array_equal(out, np.zeros((m, n)))  # k = 0: an empty sum is 0
        out = np.full((m, n), 3.0, dtype)
        K.gemm(a, b, out, trans_a=ta, trans_b=tb, beta=2.0)
        assert np.array_equal(out, np.full((m, n), 6.0))


def _gemm_args(dtype=F64):
    return np.ones((3, 4), dtype), np.ones((4, 2), dtype), np.zeros((3, 2), dtype)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [F16, np.int64, np.int32, ">f8", "other-float", "list"])
def test_gemm_wrong_dtype_is_type_error(which, bad):
    args = list(_gemm_args(F64))
    a = args[which]
    if bad == "other-float":
        args[which] = a.astype(F32)
    elif bad == "list":
        args[which] = a.tolist()
    else:
        args[which] = a.astype(bad)
    # the message names the operand, or (when the first operand sets the dtype) both dtypes
    name = ("a", "b", "out")[which]
    match = r"float32.*float64|float64.*float32" if bad == "other-float" and which == 0 else rf"\b{name}\b"
    with pytest.raises(TypeError, match=match):
        K.gemm(*args)


def test_gemm_wrong_shapes_are_value_errors():
    a, b, out = _gemm_args()
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b4\b)(?=.*\b5\b)"):
        K.gemm(a, np.ones((5, 2)), out)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        K.gemm(a, b, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        K.gemm(np.ones(4), b, out)
    with pytest.raises(ValueError, match="2-D"):
        K.gemm(a, b, np.zeros((3, 2, 1)))
    with pytest.raises(ValueError):  # trans_a makes op(a) (4, 3): inner dims 3 vs 4
        K.gemm(a, b, out, trans_a=True)


def test_gemm_read_only_non_contiguous_or_overlapping_out_is_value_error():
    a, b, out = _gemm_args()
    ro = out.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.gemm(a, b, ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.gemm(a, b, np.zeros((3, 2), order="F"))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.gemm(a, b, np.zeros((6, 2))[::2])
    sq = np.ones((3, 3))
    with pytest.raises(ValueError, match="overlap"):
        K.gemm(sq, np.eye(3), sq)


# ---------------------------------------------------------------------------------------------------------------
# affine_forward / affine_backward / bias_backward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lx", OPERAND_LAYOUTS)
@pytest.mark.parametrize("lw", OPERAND_LAYOUTS)
@with_dtypes
def test_affine_forward_layouts(dtype, lx, lw):
    rng = np.random.default_rng(5)
    n, d, m = 4, 7, 3
    x0, W0, b0 = (rng.standard_normal(s).astype(dtype) for s in ((n, d), (d, m), (m,)))
    for lb in ("C", "strided", "reversed", "readonly"):
        x, W, b = operand(x0, lx), operand(W0, lw), operand(b0, lb)
        out = np.full((n, m), np.nan, dtype)
        assert K.affine_forward(x, W, b, out) is out
        assert_close(out, x0.astype(F64) @ W0.astype(F64) + b0, dtype, f"b {lb}")
        assert np.array_equal(x, x0) and np.array_equal(W, W0) and np.array_equal(b, b0)


@pytest.mark.parametrize("lx", OPERAND_LAYOUTS)
@pytest.mark.parametrize("lw", OPERAND_LAYOUTS)
@with_dtypes
def test_affine_backward_layouts(dtype, lx, lw):
    rng = np.random.default_rng(6)
    n, d, m = 4, 7, 3
    x0, W0, dout0 = (rng.standard_normal(s).astype(dtype) for s in ((n, d), (d, m), (n, m)))
    x64, W64, dout64 = x0.astype(F64), W0.astype(F64), dout0.astype(F64)
    for ld in ("C", "F", "strided", "readonly"):
        x, W, dout = operand(x0, lx), operand(W0, lw), operand(dout0, ld)
        dx, dW, db = np.full((n, d), np.nan, dtype), np.full((d, m), np.nan, dtype), np.full(m, np.nan, dtype)
        K.affine_backward(dout, x, W, dx, dW, db)
        assert_close(dx, dout64 @ W64.T, dtype, f"dx, dout {ld}")
        assert_close(dW, x64.T @ dout64, dtype, f"dW, dout {ld}")
        assert_close(db, dout64.sum(0), dtype, f"db, dout {ld}")
        dW2, db2 = np.full((d, m), np.nan, dtype), np.full(m, np.nan, dtype)
        assert K.affine_backward(dout, x, W, None, dW2, db2) is None
        assert np.array_equal(dW2, dW) and np.array_equal(db2, db)
        assert np.array_equal(x, x0) and np.array_equal(W, W0) and np.array_equal(dout, dout0)


ZERO_DIMS = [s for s in itertools.product([0, 3], [0, 4], [0, 2]) if 0 in s]


@pytest.mark.parametrize("n,d,m", ZERO_DIMS)
@with_dtypes
def test_affine_zero_sized(dtype, n, d, m):
    rng = np.random.default_rng(8)
    x, W, b, dout = (rng.standard_normal(s).astype(dtype) for s in ((n, d), (d, m), (m,), (n, m)))
    out = np.full((n, m), np.nan, dtype)
    K.affine_forward(x, W, b, out)
    assert np.array_equal(out, x.astype(F64) @ W + b)  # D = 0: every row is b
    dx, dW, db = np.full((n, d), np.nan, dtype), np.full((d, m), np.nan, dtype), np.full(m, np.nan, dtype)
    K.affine_backward(dout, x, W, dx, dW, db)
    assert np.array_equal(dx, np.zeros((n, d)) if m == 0 else dout.astype(F64) @ W.T)
    assert np.array_equal(dW, np.zeros((d, m)) if n == 0 else x.astype(F64).T @ dout)
    assert np.array_equal(db, np.zeros(m) if n == 0 else dout.astype(F64).sum(0))
    db = np.full(m, np.nan, dtype)
    K.bias_backward(dout, db)
    assert np.array_equal(db, np.zeros(m) if n == 0 else dout.astype(F64).sum(0))


def _affine_fwd_args(dtype=F64):
    return np.ones((3, 4), dtype), np.ones((4, 2), dtype), np.ones(2, dtype), np.zeros((3, 2), dtype)


@pytest.mark.parametrize("which,name", [(0, "x"), (1, "W"), (2, "b"), (3, "out")])
@pytest.mark.parametrize("bad", [np.float16, np.int64, ">f8", "other-float", "list"])
def test_affine_forward_wrong_dtype_is_type_error(which, name, bad):
    args = list(_affine_fwd_args())
    a = args[which]
    args[which] = a.astype(F32) if bad == "other-float" else a.tolist() if bad == "list" else a.astype(bad)
    match = r"float32.*float64|float64.*float32" if bad == "other-float" and which == 0 else rf"\b{name}\b"
    with pytest.raises(TypeError, match=match):
        K.affine_forward(*args)


def test_affine_forward_bad_shapes_and_outputs_are_value_errors():
    x, W, b, out = _affine_fwd_args()
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b4\b)(?=.*\b5\b)"):
        K.affine_forward(x, np.ones((5, 2)), b, out)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b2\b)(?=.*\b3\b)"):
        K.affine_forward(x, W, np.ones(3), out)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 3\)"):
        K.affine_forward(x, W, b, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        K.affine_forward(np.ones(4), W, b, out)
    with pytest.raises(ValueError, match="1-D"):
        K.affine_forward(x, W, np.ones((1, 2)), out)
    ro = out.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.affine_forward(x, W, b, ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.affine_forward(x, W, b, np.zeros((3, 2), order="F"))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.affine_forward(x, W, b, np.zeros((3, 4))[:, ::2])


def _affine_bwd_args(dtype=F64):
    n, d, m = 3, 4, 2
    return [
        np.ones((n, m), dtype),
        np.ones((n, d), dtype),
        np.ones((d, m), dtype),
        np.zeros((n, d), dtype),
        np.zeros((d, m), dtype),
        np.zeros(m, dtype),
    ]


BWD_NAMES = ["dout", "x", "W", "dx", "dW", "db"]


@pytest.mark.parametrize("which", range(6), ids=BWD_NAMES)
@pytest.mark.parametrize("bad", [np.float16, np.int64, ">f8", "other-float"])
def test_affine_backward_wrong_dtype_is_type_error(which, bad):
    args = _affine_bwd_args()
    args[which] = args[which].astype(F32 if bad == "other-float" else bad)
    match = r"float32.*float64|float64.*float32" if bad == "other-float" and which == 0 else rf"\b{BWD_NAMES[which]}\b"
    with pytest.raises(TypeError, match=match):
        K.affine_backward(*args)


@pytest.mark.parametrize("which", [0, 3, 4, 5], ids=["dout", "dx", "dW", "db"])
def test_affine_backward_wrong_shape_is_value_error(which):
    args = _affine_bwd_args()
    a = args[which]
    args[which] = np.zeros(a.shape[:-1] + (a.shape[-1] + 1,))
    with pytest.raises(ValueError, match=BWD_NAMES[which]):
        K.affine_backward(*args)


@pytest.mark.parametrize("which", [3, 4, 5], ids=["dx", "dW", "db"])
@pytest.mark.parametrize("problem", ["read-only", "non-contiguous"])
def test_affine_backward_bad_outputs_are_value_errors(which, problem):
    args = _affine_bwd_args()
    a = args[which]
    if problem == "read-only":
        a = a.copy()
        a.setflags(write=False)
        match = "read-only"
    else:
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],))
        a = big[..., ::2]
        match = "contiguous"
    args[which] = a
    with pytest.raises(ValueError, match=match):
        K.affine_backward(*args)


def _refuse_or_right(call, results, wants, what):
    """call() raises a ValueError about the overlap, or leaves `results` equal to `wants`."""
    try:
        call()
    except ValueError as e:
        assert any(w in str(e) for w in ("overlap", "share", "alias")), e
        return
    for name, got, want in zip(("first", "second", "third"), results(), wants):
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{what}: {name} result silently wrong")


@pytest.mark.parametrize("target", ["x", "W"])
def test_affine_forward_out_aliasing_an_input(target):
    """out overlapping x or W: a ValueError (as gemm gives) or the right answer, never a silently wrong one."""
    rng = np.random.default_rng(9)
    x, W, b = rng.standard_normal((3, 3)), rng.standard_normal((3, 3)), rng.standard_normal(3)
    want = x @ W + b
    out = x if target == "x" else W
    _refuse_or_right(lambda: K.affine_forward(x, W, b, out), lambda: [out], [want], f"affine_forward out is {target}")


@pytest.mark.parametrize("target", ["x", "dout"])
def test_affine_backward_dx_aliasing_an_input(target):
    rng = np.random.default_rng(10)
    x, W, dout = rng.standard_normal((3, 3)), rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    want = (dout @ W.T, x.T @ dout, dout.sum(0))
    dx = x if target == "x" else dout
    dW, db = np.zeros((3, 3)), np.zeros(3)
    _refuse_or_right(
        lambda: K.affine_backward(dout, x, W, dx, dW, db),
        lambda: [dx, dW, db],
        want,
        f"affine_backward dx is {target} (dx, dW, db)",
    )


def test_bias_backward_accumulates_float32_in_double():
    n = 1_000_000
    dout = np.full((n, 3), 0.1, F32)
    want = F64(F32(0.1)) * n  # 100000.0015 -> 100000.0 in float32
    naive = np.cumsum(dout[:, 0], dtype=F32)[-1]  # what a float32 running sum gives (about 100958)
    rtol = 1e-6
    assert abs(naive - want) > rtol * want  # the tolerance does separate the two
    db = np.full(3, np.nan, F32)
    assert K.bias_backward(dout, db) is db
    np.testing.assert_allclose(db, want, rtol=rtol)
    # the same accumulation inside affine_backward
    x = np.ones((n, 1), F32)
    W = np.ones((1, 3), F32)
    dW, db2 = np.zeros((1, 3), F32), np.full(3, np.nan, F32)
    K.affine_backward(dout, x, W, None, dW, db2)
    np.testing.assert_allclose(db2, want, rtol=rtol)


@with_dtypes
def test_bias_backward_layouts_and_errors(dtype):
    rng = np.random.default_rng(11)
    d0 = rng.standard_normal((5, 4)).astype(dtype)
    for lay in ("C", "F", "strided", "reversed", "readonly"):
        db = np.full(4, np.nan, dtype)
        K.bias_backward(operand(d0, lay), db)
        assert_close(db, d0.astype(F64).sum(0), dtype, lay)
    with pytest.raises(TypeError, match="db"):
        K.bias_backward(d0, np.zeros(4, F16))
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b4\b)(?=.*\b3\b)"):
        K.bias_backward(d0, np.zeros(3, dtype))
    ro = np.zeros(4, dtype)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.bias_backward(d0, ro)


# ---------------------------------------------------------------------------------------------------------------
# elementwise kernels: small and large (the OpenMP path)
# ---------------------------------------------------------------------------------------------------------------
SIZES = [0, 1, 7, 1000, 4 * PARALLEL_MIN + 13]  # the last is past every threading threshold


@pytest.mark.parametrize("size", SIZES)
@with_dtypes
def test_relu_kernels(dtype, size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size).astype(dtype)
    x[::97] = 0.0
    x[5::101] = np.nan
    out, mask = np.full(size, np.nan, dtype), np.zeros(size, bool)
    assert K.relu_forward(x, out, mask) is out
    assert np.array_equal(mask, x <= 0)
    assert np.array_equal(out, np.where(x <= 0, 0, x), equal_nan=True)
    dout = rng.standard_normal(size).astype(dtype)
    keep = dout.copy()
    dx = np.full(size, np.nan, dtype)
    assert K.relu_backward(dout, mask, dx) is dx
    assert np.array_equal(dx, np.where(mask, 0, dout))
    assert np.array_equal(dout, keep)


@pytest.mark.parametrize("size", SIZES)
@with_dtypes
def test_relu_inplace_kernels_equal_the_masked_ones(dtype, size):
    """The ReLU fastbp's nets fuse into an Affine's output: in place, no mask; its backward from that output."""
    rng = np.random.default_rng(size + 7)
    x = rng.standard_normal(size).astype(dtype)
    x[::97] = 0.0
    x[3::89] = -0.0
    x[5::101] = np.nan
    out, mask = np.empty(size, dtype), np.empty(size, bool)
    K.relu_forward(x, out, mask)
    y = x.copy()
    assert K.relu_inplace(y) is y
    assert np.array_equal(y, out, equal_nan=True) and not np.signbit(y[~np.isnan(y)]).any()
    dout = rng.standard_normal(size).astype(dtype)
    dx = np.empty(size, dtype)
    K.relu_backward(dout, mask, dx)
    d = dout.copy()
    assert K.relu_mask_inplace(y, d) is d
    assert np.array_equal(d, dx)  # y <= 0 exactly where the mask (x <= 0) is set, NaN included
    with pytest.raises(ValueError, match="read-only"):
        ro = y.copy()
        ro.setflags(write=False)
        K.relu_inplace(ro)
    with pytest.raises(ValueError, match="shape"):
        K.relu_mask_inplace(y, np.empty(size + 1, dtype))
    with pytest.raises(TypeError):
        K.relu_mask_inplace(y.astype(F16), d)


@pytest.mark.parametrize("size", SIZES)
@with_dtypes
def test_sigmoid_kernels(dtype, size):
    rng = np.random.default_rng(size + 1)
    x = (rng.standard_normal(size) * 20).astype(dtype)
    special = np.arange(0, size, 89)
    x[special] = np.resize(np.array([1e4, -1e4, 0.0, 88.0, -88.0, 700.0, -700.0]), special.size)
    y64 = scipy.special.expit(x.astype(F64))
    out = np.full(size, np.nan, dtype)
    assert K.sigmoid_forward(x, out) is out
    assert_close(out, y64, dtype)
    assert np.all((out >= 0) & (out <= 1))
    dout = rng.standard_normal(size).astype(dtype)
    dx = np.full(size, np.nan, dtype)
    assert K.sigmoid_backward(dout, out, dx) is dx
    assert_close(dx, dout.astype(F64) * (1 - out.astype(F64)) * out, dtype)


@with_dtypes
def test_sigmoid_kernel_extremes(dtype):
    x = np.array([1e4, -1e4, 0.0, 40.0, -40.0, np.inf, -np.inf, np.nan], dtype)
    out = np.empty_like(x)
    K.sigmoid_forward(x, out)
    assert out[0] == 1 and out[1] == 0 and out[2] == 0.5 and out[5] == 1 and out[6] == 0 and np.isnan(out[7])
    assert_close(out[3:5], scipy.special.expit(x[3:5].astype(F64)), dtype)


@pytest.mark.parametrize("shape", [(2, 3), (4, 1, 5)])
@with_dtypes
def test_elementwise_kernels_nd(dtype, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    out, mask = np.empty(shape, dtype), np.empty(shape, bool)
    K.relu_forward(x, out, mask)
    assert np.array_equal(out, np.maximum(x, 0))
    K.sigmoid_forward(x, out)
    assert_close(out, 1 / (1 + np.exp(-x.astype(F64))), dtype)


def test_elementwise_kernels_validate():
    x = np.ones((3, 4))
    out, mask = np.zeros((3, 4)), np.zeros((3, 4), bool)
    for bad in (np.float16, np.int64, ">f8", F32):
        with pytest.raises(TypeError):
            K.relu_forward(x.astype(bad), out, mask)
        with pytest.raises(TypeError):
            K.sigmoid_forward(x, out.astype(bad))
        with pytest.raises(TypeError):
            K.sigmoid_backward(x, x, out.astype(bad))
    with pytest.raises(TypeError, match="mask"):
        K.relu_forward(x, out, mask.astype(np.uint8))
    with pytest.raises(TypeError, match="mask"):
        K.relu_backward(x, mask.astype(np.int8), out)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)|\(4, 3\).*\(3, 4\)"):
        K.relu_forward(x, np.zeros((4, 3)), mask)
    with pytest.raises(ValueError, match="mask"):
        K.relu_forward(x, out, np.zeros((3, 5), bool))
    with pytest.raises(ValueError, match="mask"):
        K.relu_backward(x, np.zeros((3, 5), bool), out)
    with pytest.raises(ValueError, match="contiguous"):
        K.relu_forward(np.ones((3, 8))[:, ::2], out, mask)
    with pytest.raises(ValueError, match="contiguous"):
        K.sigmoid_forward(x, np.zeros((3, 8))[:, ::2])
    with pytest.raises(ValueError, match="contiguous"):
        K.relu_backward(x, mask, np.zeros((4, 3)).T)
    ro = np.zeros((3, 4))
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.relu_forward(x, ro, mask)
    with pytest.raises(ValueError, match="read-only"):
        K.sigmoid_backward(x, x, ro)
    romask = mask.copy()
    romask.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.relu_forward(x, out, romask)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        K.sigmoid_backward(x, np.ones((4, 3)), out)


# ---------------------------------------------------------------------------------------------------------------
# softmax_cross_entropy and scale_into
# ---------------------------------------------------------------------------------------------------------------
def _softmax_truth(x, labels=None, onehot=None):
    x = x.astype(F64)
    mx = x.max(axis=1, keepdims=True)
    e = np.exp(x - mx)
    s = e.sum(axis=1, keepdims=True)
    y = e / s
    lse = np.log(s) + mx
    t = np.eye(x.shape[1])[labels] if onehot is None else onehot.astype(F64)
    return float(np.sum(t * (lse - x))), y, t


@pytest.mark.parametrize("n,c", [(1, 1), (1, 5), (7, 3), (100, 10), (5, 63), (5, 64), (4, 1000), (1100, 1000)])
@pytest.mark.parametrize("target", ["labels", "onehot"])
@with_dtypes
def test_softmax_cross_entropy(dtype, n, c, target):
    rng = np.random.default_rng(n * c)
    x = (rng.standard_normal((n, c)) * 5).astype(dtype)
    labels = rng.integers(0, c, n)
    t = labels.astype(np.int64) if target == "labels" else np.eye(c, dtype=dtype)[labels]
    want_loss, want_y, t64 = _softmax_truth(x, labels)
    scale = 1.0 / n
    y, g = np.full((n, c), np.nan, dtype), np.full((n, c), np.nan, dtype)
    loss = K.softmax_cross_entropy(x, t, y, g, scale)
    assert isinstance(loss, float)
    assert loss == pytest.approx(want_loss / n, rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"])  # the mean
    assert_close(y, want_y, dtype)
    assert_close(g, scale * (want_y - t64), dtype)
    # grad=None computes only y and the loss; repeated calls are bit-for-bit the same (threads or not)
    y2 = np.full((n, c), np.nan, dtype)
    for _ in range(3):
        assert K.softmax_cross_entropy(x, t, y2, None, scale) == loss
        assert np.array_equal(y2, y)


@with_dtypes
def test_softmax_cross_entropy_extremes(dtype):
    big = float(dtype(1e30))
    x = np.array([[1e30, -1e30], [-1e30, 1e30], [0.0, 0.0]], dtype)
    y, g = np.empty_like(x), np.empty_like(x)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = K.softmax_cross_entropy(x, np.array([1, 1, 0]), y, g, 1.0)
    assert loss == 2 * big / 3  # the mean; + log(2) from the last row vanishes next to 2e30
    assert_close(g, np.array([[1, -1], [0, 0], [-0.5, 0.5]]), dtype)
    assert_close(y, np.array([[1, 0], [0, 1], [0.5, 0.5]]), dtype)
    nan = x.copy()
    nan[1, 0] = np.nan
    assert np.isnan(K.softmax_cross_entropy(nan, np.array([1, 1, 0]), y, g, 1.0))


@pytest.mark.parametrize("c", [10, 63, 64, 200])  # rows shorter than 64 take plain loops, longer ones simd ones
@pytest.mark.parametrize("target", ["labels", "onehot"])
@with_dtypes
def test_softmax_cross_entropy_nan_anywhere_in_a_row_makes_that_row_nan(dtype, c, target):
    rng = np.random.default_rng(c)
    n = 4
    labels = rng.integers(0, c, n)
    t = labels.astype(np.int64) if target == "labels" else np.eye(c, dtype=dtype)[labels]
    for col in (0, 1, c // 2, c - 1):  # the max loop starts from column 0: a NaN there and one it skips
        x = rng.standard_normal((n, c)).astype(dtype)
        x[2, col] = np.nan
        y, g = np.empty_like(x), np.empty_like(x)
        assert np.isnan(K.softmax_cross_entropy(x, t, y, g, 1.0 / n))
        assert np.isnan(y[2]).all() and np.isnan(g[2]).all()
        rest = [0, 1, 3]
        assert np.isfinite(y[rest]).all() and np.isfinite(g[rest]).all()
        _, want_y, t64 = _softmax_truth(x[rest], labels[rest])
        assert_close(y[rest], want_y, dtype)
        assert_close(g[rest], (want_y - t64) / n, dtype)


@pytest.mark.parametrize("bad", [-1, 3, 4, 2**62, -(2**63), 2**63 - 1])
@pytest.mark.parametrize("n", [1, 5, 40000])
def test_softmax_cross_entropy_bad_labels_are_value_errors(bad, n):
    x = np.zeros((n, 3))
    t = np.zeros(n, np.int64)
    t[n // 2] = bad
    with pytest.raises(ValueError, match=r"(?s)(?=.*" + str(bad).replace("-", r"\-") + r")(?=.*\[0, 2\])"):
        K.softmax_cross_entropy(x, t, np.zeros((n, 3)), np.zeros((n, 3)), 1.0)
    with pytest.raises(ValueError):
        K.softmax_cross_entropy(x, t, np.zeros((n, 3)), None, 1.0)


def test_softmax_cross_entropy_validates():
    x, y, g = np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 3))
    t = np.array([0, 1, 2, 0])
    with pytest.raises(TypeError, match="int64"):
        K.softmax_cross_entropy(x, t.astype(np.int32), y, g, 1.0)
    with pytest.raises(TypeError, match="int64"):
        K.softmax_cross_entropy(x, t.astype(">i8"), y, g, 1.0)
    with pytest.raises(TypeError, match="t"):
        K.softmax_cross_entropy(x, [0, 1, 2, 0], y, g, 1.0)
    with pytest.raises(TypeError):
        K.softmax_cross_entropy(x, np.eye(3, dtype=F32)[t], y, g, 1.0)  # one-hot of another dtype
    with pytest.raises(TypeError):
        K.softmax_cross_entropy(x.astype(F32), t, y, g, 1.0)
    with pytest.raises(TypeError):
        K.softmax_cross_entropy(x.astype(np.float16), t, y.astype(np.float16), None, 1.0)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b4\b)(?=.*\b3\b)"):
        K.softmax_cross_entropy(x, t[:3], y, g, 1.0)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        K.softmax_cross_entropy(x, np.eye(4)[t], y, g, 1.0)
    with pytest.raises(ValueError, match="y"):
        K.softmax_cross_entropy(x, t, np.zeros((4, 4)), g, 1.0)
    with pytest.raises(ValueError, match="grad"):
        K.softmax_cross_entropy(x, t, y, np.zeros((3, 3)), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        K.softmax_cross_entropy(np.zeros(3), np.array([0]), np.zeros(3), None, 1.0)
    with pytest.raises(ValueError):
        K.softmax_cross_entropy(x, np.zeros((4, 3, 1)), y, g, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        K.softmax_cross_entropy(np.zeros((4, 6))[:, ::2], t, y, g, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        K.softmax_cross_entropy(x, np.zeros(8, np.int64)[::2], y, g, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        K.softmax_cross_entropy(x, t, np.zeros((3, 4)).T, g, 1.0)
    ro = np.zeros((4, 3))
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.softmax_cross_entropy(x, t, ro, g, 1.0)
    with pytest.raises(ValueError, match="read-only"):
        K.softmax_cross_entropy(x, t, y, ro, 1.0)
    with pytest.raises(ValueError, match=r"class"):
        K.softmax_cross_entropy(np.zeros((4, 0)), t, np.zeros((4, 0)), None, 1.0)


@with_dtypes
def test_softmax_cross_entropy_empty_batch(dtype):
    for c in (0, 3):
        x = np.zeros((0, c), dtype)
        assert K.softmax_cross_entropy(x, np.zeros(0, np.int64), x.copy(), x.copy(), 1.0) == 0.0
        assert K.softmax_cross_entropy(x, np.zeros((0, c), dtype), x.copy(), None, 1.0) == 0.0


@pytest.mark.parametrize("alias", ["y", "grad"])
def test_softmax_cross_entropy_outputs_aliasing_x(alias):
    """y or grad overlapping x: a ValueError or the right answer, never a silently wrong loss."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 5))
    t = np.array([0, 4, 2, 2])
    want_loss, want_y, t64 = _softmax_truth(x, t)
    y = x if alias == "y" else np.zeros_like(x)
    g = x if alias == "grad" else np.zeros_like(x)
    loss = []
    _refuse_or_right(
        lambda: loss.append(K.softmax_cross_entropy(x, t, y, g, 1.0)),
        lambda: [np.array(loss[0]), y] + ([g] if alias == "grad" else []),
        [want_loss / 4, want_y, want_y - t64],
        f"softmax_cross_entropy {alias} is x (loss, y, grad)",
    )


@with_dtypes
def test_scale_into(dtype):
    rng = np.random.default_rng(13)
    src = rng.standard_normal((3, 4)).astype(dtype)
    dst = np.full((3, 4), np.nan, dtype)
    assert K.scale_into(src, 2.5, dst) is dst
    assert_close(dst, 2.5 * src.astype(F64), dtype)
    with pytest.raises(TypeError):
        K.scale_into(src, 2.0, np.zeros((3, 4), np.float16))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        K.scale_into(src, 2.0, np.zeros((4, 3), dtype))
    ro = np.zeros((3, 4), dtype)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.scale_into(src, 2.0, ro)
    with pytest.raises(ValueError, match="contiguous"):
        K.scale_into(np.zeros((3, 8), dtype)[:, ::2], 2.0, dst)


# ---------------------------------------------------------------------------------------------------------------
# optimizer_update: one step of each optimizer vs the book's formulas in NumPy
# ---------------------------------------------------------------------------------------------------------------
SGD, MOMENTUM, NESTEROV, ADAGRAD, RMSPROP, ADAM = range(6)
EPS = 1e-7


def _numpy_step(kind, p, g, s1, s2, lr, a, b):
    """(param, state1, state2) after one step, in float64 (the book's common/optimizer.py formulas)."""
    p, g = p.astype(F64), g.astype(F64)
    s1 = None if s1 is None else s1.astype(F64)
    s2 = None if s2 is None else s2.astype(F64)
    if kind == SGD:
        p = p - lr * g
    elif kind == MOMENTUM:
        s1 = a * s1 - lr * g
        p = p + s1
    elif kind == NESTEROV:
        s1 = a * s1 - lr * g
        p = p + a * a * s1 - (1 + a) * lr * g
    elif kind == ADAGRAD:
        s1 = s1 + g * g
        p = p - lr * g / (np.sqrt(s1) + EPS)
    elif kind == RMSPROP:
        s1 = a * s1 + (1 - a) * g * g
        p = p - lr * g / (np.sqrt(s1) + EPS)
    elif kind == ADAM:
        s1 = s1 + (1 - a) * (g - s1)
        s2 = s2 + (1 - b) * (g * g - s2)
        p = p - lr * s1 / (np.sqrt(s2) + EPS)
    return p, s1, s2


OPT_PARAMS = {
    SGD: (0.1, 0, 0),
    MOMENTUM: (0.1, 0.9, 0),
    NESTEROV: (0.1, 0.9, 0),
    ADAGRAD: (0.1, 0, 0),
    RMSPROP: (0.01, 0.99, 0),
    ADAM: (0.001 * np.sqrt(1 - 0.999) / (1 - 0.9), 0.9, 0.999),
}


@pytest.mark.parametrize("kind", range(6), ids=["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"])
@pytest.mark.parametrize(
    "shape,order", [((3, 5), "C"), ((3, 5), "F"), ((7,), "C"), ((4 * PARALLEL_MIN + 3,), "C"), ((0, 4), "C")]
)
@with_dtypes
def test_optimizer_update_one_step(dtype, kind, shape, order):
    rng = np.random.default_rng(kind)
    p0 = np.asarray(rng.standard_normal(shape), dtype, order=order)
    g = np.asarray(rng.standard_normal(shape), dtype, order=order)
    s10 = np.asarray(np.abs(rng.standard_normal(shape)) * 0.1, dtype, order=order) if kind != SGD else None
    s20 = np.asarray(np.abs(rng.standard_normal(shape)) * 0.1, dtype, order=order) if kind == ADAM else None
    lr, a, b = OPT_PARAMS[kind]
    want = _numpy_step(kind, p0, g, s10, s20, lr, a, b)
    p = p0.copy(order="K")
    s1 = None if s10 is None else s10.copy(order="K")
    s2 = None if s20 is None else s20.copy(order="K")
    gk = g.copy(order="K")
    assert K.optimizer_update(kind, p, g, s1, s2, lr, a, b, EPS) is p
    assert_close(p, want[0], dtype, "param")
    if s1 is not None:
        assert_close(s1, want[1], dtype, "state1")
    if s2 is not None:
        assert_close(s2, want[2], dtype, "state2")
    assert np.array_equal(g, gk)


def test_optimizer_update_validates():
    p, g, s = np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4))
    for kind in (-1, 6):
        with pytest.raises(ValueError, match=str(kind)):
            K.optimizer_update(kind, p, g, s, s, 0.1)
    with pytest.raises(TypeError, match="grad"):
        K.optimizer_update(SGD, p, g.astype(F32), None, None, 0.1)
    with pytest.raises(TypeError, match="param"):
        K.optimizer_update(SGD, p.astype(np.float16), g, None, None, 0.1)
    with pytest.raises(TypeError, match="state1"):
        K.optimizer_update(MOMENTUM, p, g, s.astype(F32), None, 0.1, 0.9)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        K.optimizer_update(SGD, p, np.zeros((4, 3)), None, None, 0.1)
    with pytest.raises(ValueError, match="state"):
        K.optimizer_update(MOMENTUM, p, g, None, None, 0.1, 0.9)
    with pytest.raises(ValueError, match="Adam"):
        K.optimizer_update(ADAM, p, g, s, None, 0.1, 0.9, 0.999)
    ro = p.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        K.optimizer_update(SGD, ro, g, None, None, 0.1)
    with pytest.raises(ValueError, match="state1"):
        K.optimizer_update(MOMENTUM, p, g, ro, None, 0.1, 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        K.optimizer_update(SGD, np.zeros((3, 8))[:, ::2], g, None, None, 0.1)
    with pytest.raises(ValueError, match="grad"):
        K.optimizer_update(SGD, p, np.zeros((3, 4), order="F"), None, None, 0.1)
    with pytest.raises(ValueError, match="state2"):
        K.optimizer_update(ADAM, p, g, s.copy(), np.zeros((3, 4), order="F"), 0.1, 0.9, 0.999)


# ---------------------------------------------------------------------------------------------------------------
# which BLAS
# ---------------------------------------------------------------------------------------------------------------
def test_blas_info_reports_corename_and_library():
    info = _blas.info()
    assert isinstance(info["corename"], str) and info["corename"].strip()
    assert os.path.isfile(info["library"]) and "openblas" in os.path.basename(info["library"]).lower()
    assert info["num_threads"] >= 1
    assert "OpenBLAS" in info["config"]
    if info["requested_coretype"] is not None:  # a kernel type fastbp asked for is the one in use
        assert info["corename"].lower() == info["requested_coretype"].lower()


def test_build_info():
    bi = K.build_info()
    assert isinstance(bi["openmp"], bool) and bi["openmp_max_threads"] >= 1 and bi["parallel_min"] > 0


def test_softmax_cross_entropy_loss_reproducible_with_many_openmp_threads():
    """Identical calls give a bit-identical loss however many OpenMP threads split the rows (here 8, forced by
    OMP_NUM_THREADS in a child process: on a 2-core machine two partial sums always add up the same way)."""
    code = """
import numpy as np
from fastbp import _kernels as K
assert K.build_info()["openmp_max_threads"] == 8 or not K.build_info()["openmp"]
rng = np.random.default_rng(0)
bad = []
for dt in (np.float32, np.float64):
    x = (rng.standard_normal((1100, 1000)) * 5).astype(dt)
    t = rng.integers(0, 1000, 1100)
    y, g = np.empty_like(x), np.empty_like(x)
    losses = {K.softmax_cross_entropy(x, t, y, g, 1 / 1100) for _ in range(40)}
    if len(losses) != 1:
        bad.append((dt.__name__, sorted(losses)))
assert not bad, f"loss differs between identical calls: {bad}"
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(K.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="8", PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# softmax cross-entropy accuracy where the max dominates (issue 7 item 7) and ignore_label / scale (issue 8)
# ---------------------------------------------------------------------------------------------------------------
@with_dtypes
@pytest.mark.parametrize("c,margin", [(2, 12.0), (2, 15.0), (1000, 30.0), (10, 20.0)])
def test_softmax_target_gradient_and_loss_exact_when_the_max_dominates(dtype, c, margin):
    # y_t - 1 cancels in float32 (0 at C=1000, margin 30, so the row did not sum to 0); log(sum) of 1 + tiny lost
    # digits in float64.  Both now come from the sum of the other exponentials, in double.
    n = 3
    x = np.zeros((n, c), dtype)
    t = np.array([c - 1, 0, c // 2], np.int64)
    x[np.arange(n), t] = margin
    y, g = np.empty_like(x), np.empty_like(x)
    loss = K.softmax_cross_entropy(x, t, y, g, 0.5)
    others = (c - 1) * np.exp(-margin)  # exact, in float64
    want_loss = np.log1p(others)
    want_gt = -0.5 * others / (1 + others)
    rel = 1e-5 if dtype == F32 else 1e-12
    assert abs(loss - want_loss) <= rel * want_loss
    np.testing.assert_allclose(g[np.arange(n), t], want_gt, rtol=rel)
    # every gradient row sums to 0 up to rounding of its own entries
    assert np.all(np.abs(g.astype(F64).sum(axis=1)) <= 10 * rel * abs(want_gt))


def test_softmax_float32_loss_beyond_float32_range_is_finite():
    # +-3e38 logits: the exact loss 6e38 is finite in double (the kernel's loss type), not in float32
    x = np.array([[3e38, -3e38], [-3e38, 3e38]], F32)
    y, g = np.empty_like(x), np.empty_like(x)
    with np.errstate(over="raise", invalid="raise"):
        loss = K.softmax_cross_entropy(x, np.array([1, 1]), y, g, 1.0)
    assert np.isfinite(loss) and loss == pytest.approx(3e38, rel=1e-6)  # mean of 6e38 and 0
    np.testing.assert_array_equal(y, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(g, [[1, -1], [0, 0]])


def _ignore_truth(x, t, ignore, dout=1.0):
    """Book 2's TimeSoftmaxWithLoss on (N, C) rows: mean over rows whose label != ignore."""
    x = x.astype(F64)
    mx = x.max(axis=1, keepdims=True)
    e = np.exp(x - mx)
    y = e / e.sum(axis=1, keepdims=True)
    valid = t != ignore
    nv = int(valid.sum())
    tt = np.where(valid, t, 0)
    rows = -np.log(y[np.arange(len(t)), tt]) * valid
    loss = rows.sum() / nv if nv else 0.0
    g = y.copy()
    g[np.arange(len(t)), tt] -= 1
    g *= valid[:, None] * (dout / nv if nv else 0.0)
    return loss, y, g


@with_dtypes
@pytest.mark.parametrize("n,c", [(1, 3), (7, 5), (64, 10), (1100, 1000)])
def test_softmax_ignore_label_rows_add_nothing(dtype, n, c):
    rng = np.random.default_rng(n + c)
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.3] = -1
    t[0] = -1
    nv = int((t != -1).sum())
    want_loss, want_y, want_g = _ignore_truth(x, t, -1, dout=2.0)
    y, g = np.full_like(x, np.nan), np.full_like(x, np.nan)
    loss = K.softmax_cross_entropy(x, t, y, g, 2.0 / nv if nv else 0.0, ignore_label=-1)
    assert loss == pytest.approx(want_loss, rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"])
    assert_close(y, want_y, dtype)
    assert_close(g, want_g, dtype)
    assert np.all(g[t == -1] == 0)
    # without ignore_label the same -1 is an out-of-range label
    with pytest.raises(ValueError, match="out of range"):
        K.softmax_cross_entropy(x, t, y, g, 1.0)


@with_dtypes
def test_softmax_ignore_label_every_row_ignored_gives_zero(dtype):
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    t = np.full(4, 7, np.int64)  # any int64 value can be the ignored label, even one in [0, C)
    y, g = np.empty_like(x), np.full_like(x, np.nan)
    assert K.softmax_cross_entropy(x, t, y, g, 1.0, ignore_label=7) == 0.0
    assert np.all(g == 0)
    assert_close(y, _softmax_truth(x, np.zeros(4, int))[1], dtype)
    t = np.array([0, 1, 1, 2])
    assert K.softmax_cross_entropy(x, t, y, g, 1.0, ignore_label=1) == pytest.approx(
        _ignore_truth(x, t, 1)[0], rel=TOL[dtype]["rtol"]
    )


def test_softmax_ignore_label_gradient_is_the_derivative_of_the_mean_loss():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4))
    t = np.array([1, -1, 3, 0, -1, 2])
    nv = 4
    y, g = np.empty_like(x), np.empty_like(x)
    K.softmax_cross_entropy(x, t, y, g, 1.0 / nv, ignore_label=-1)
    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (
            K.softmax_cross_entropy(xp, t, y.copy(), None, 1.0, ignore_label=-1)
            - K.softmax_cross_entropy(xm, t, y.copy(), None, 1.0, ignore_label=-1)
        ) / (2 * h)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)


def test_softmax_ignore_label_validation():
    x, y, g = np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"(?s)(?=.*-2)(?=.*ignore_label -1)"):
        K.softmax_cross_entropy(x, np.array([0, -2, 1]), y, g, 1.0, ignore_label=-1)
    with pytest.raises(ValueError, match="one-hot"):
        K.softmax_cross_entropy(x, np.eye(4)[[0, 1, 2]], y, g, 1.0, ignore_label=-1)
    for bad in (1.5, "x", True):
        with pytest.raises(TypeError, match="ignore_label"):
            K.softmax_cross_entropy(x, np.array([0, 1, 2]), y, g, 1.0, ignore_label=bad)
    with pytest.raises(ValueError, match="int64"):
        K.softmax_cross_entropy(x, np.array([0, 1, 2]), y, g, 1.0, ignore_label=2**63)
    # np.integer ignore labels work like int
    assert K.softmax_cross_entropy(x, np.array([0, -1, 1]), y, g, 1.0, ignore_label=np.int32(-1)) == pytest.approx(
        np.log(4)
    )


# ---------------------------------------------------------------------------------------------------------------
# The thread driver (fastbp._threads) and FASTBP_NUM_THREADS
# ---------------------------------------------------------------------------------------------------------------
from fastbp import _threads as T  # noqa: E402


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
@pytest.mark.parametrize("block", [1, 3, 64, 100_003, 200_000])
@pytest.mark.parametrize("nthreads", [0, 1, 3, 16, 64])
def test_parallel_blocks_cover_every_element_once_with_fixed_boundaries(n, block, nthreads):
    # boundaries j*block depend on n and block only, whatever the team (0: fastbp's thread count)
    assert T._block_owners(n, block, nthreads) == [i // block for i in range(n)]


def test_reduce_blocks_adds_partials_in_block_order():
    # 1e16 + 1 rounds back to 1e16: in block order the sum is 0, in any other order it is 1
    assert T._reduce_blocks([1e16, 1.0, -1e16], 3, 1) == [0.0]
    rng = np.random.default_rng(0)
    parts = rng.standard_normal((7, 5)) * 10.0 ** rng.integers(-8, 8, (7, 5))
    want = [0.0] * 5
    for row in parts:
        want = [w + p for w, p in zip(want, row)]
    assert T._reduce_blocks(parts.ravel().tolist(), 7, 5) == want
    assert T._reduce_blocks([], 0, 3) == [0.0, 0.0, 0.0]


_NUM_THREADS_SCRIPT = """
from fastbp import _blas, _threads, _kernels
print(_threads._get_num_threads(), _blas.get_num_threads(), len(set(_threads._block_threads(256))),
      _kernels.build_info()["num_threads"], _kernels.build_info()["openmp_max_threads"])
"""


@pytest.mark.skipif(not K.build_info()["openmp"], reason="a build without OpenMP runs one thread")
@pytest.mark.parametrize("value", ["1", "3", "16", "64", ""])
def test_fastbp_num_threads_sets_the_team_of_every_kernel(value):
    """FASTBP_NUM_THREADS is read by the library: GEMM splits and parallel_blocks teams have that many threads
    (so CI's runs under 1, 3, 16 and 64 threads really test those thread counts on a 2-core machine)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(K.__file__)))
    env = dict(os.environ, PYTHONPATH=root, FASTBP_NUM_THREADS=value, FASTBP_BLAS_THREADING="split", FASTBP_BLAS="own")
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run(
        [sys.executable, "-c", _NUM_THREADS_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = r.stdout.split()
    want = value or got[4]  # unset: OpenMP's default
    assert got[:4] == [want] * 4


@with_dtypes
@pytest.mark.parametrize("n,m", [(100, 50), (9000, 1000), (1_500_003, 3), (3, 70_000)])
def test_bias_backward_same_bits_for_every_thread_count(dtype, n, m):
    # fixed row blocks summed over threads, partials added in block order (the deterministic reducer)
    rng = np.random.default_rng(n + m)
    dout = (rng.standard_normal((n, m)) * 10.0 ** rng.integers(-3, 4, (n, m))).astype(dtype)
    old = T._get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3, 16, 64):
            T._set_num_threads(threads)
            got.append(K.bias_backward(dout, np.full(m, np.nan, dtype)).copy())
    finally:
        T._set_num_threads(old)
    for g in got[1:]:
        assert np.array_equal(g, got[0])
    want = dout.astype(F64).sum(axis=0)
    np.testing.assert_allclose(
        got[0], want, rtol=1e-12 if dtype == F64 else 1e-6, atol=1e-12 * np.abs(dout).astype(F64).sum(axis=0).max()
    )


# ---------------------------------------------------------------------------------------------------------------
# fastbp's worker pool (issue 11 item 1): any thread may run any block, results never depend on who ran it
# ---------------------------------------------------------------------------------------------------------------
def test_pool_regions_from_several_python_threads_at_once_are_right():
    # one region at a time runs on the pool; a region opened meanwhile by another thread runs on that thread:
    # every product and every deterministic reduction is still right, and the reductions keep their bits
    import threading

    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((300, 500)), rng.standard_normal((500, 200))
    want = a @ b
    dout = rng.standard_normal((20_000, 30)).astype(np.float32)
    db_want = np.empty(30, np.float32)
    K.bias_backward(dout, db_want)
    errors = []

    def work():
        try:
            out = np.empty((300, 200))
            db = np.empty(30, np.float32)
            for _ in range(20):
                K.gemm(a, b, out)
                K.bias_backward(dout, db)
                np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-10)
                assert np.array_equal(db, db_want)
        except Exception as e:  # reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_region_counts_and_pool_info():
    T.reset_region_counts()
    a = np.ones((400, 400))
    out = np.empty((400, 400))
    K.gemm(a, a, out)  # 64e6 multiply-adds: split over the threads when there are several
    c = T.region_counts()
    info = T.pool_info()
    assert info["pool"] in ("fastbp", "openmp") and info["spin_us"] >= 0 and info["wake_min_macs"] >= 0
    if K._get_gemm_threads() > 1:
        assert c == {"opened": 1, "serial": 0}
    else:
        assert c["opened"] == 0
    T.reset_region_counts()
    assert T.region_counts() == {"opened": 0, "serial": 0}


def test_no_region_since_a_reading():
    mark = T.regions_opened()
    assert T.no_region_since(mark) and not T.no_region_since(-1)
    K.gemm(np.ones((2, 2)), np.ones((2, 2)), np.empty((2, 2)))  # far too small to split: no region
    assert T.no_region_since(mark)
    a = np.ones((400, 400))
    K.gemm(a, a, np.empty((400, 400)))  # split when there are several threads
    assert T.no_region_since(mark) == (K._get_gemm_threads() == 1)
    for bad in ("1", 1.5, None):
        with pytest.raises(TypeError):
            T.no_region_since(bad)


_TIME_KEYS = ("caller_block_us", "caller_wait_us", "worker_block_us", "worker_start_us")


def test_pool_info_says_where_the_regions_time_went():
    # the caller's blocks, its wait for the workers' blocks, the workers' blocks and their start delays: totals that
    # only grow, a worker block counted wherever a region was helped; counted only while pool_stats is on
    a = np.ones((400, 400))
    out = np.empty((400, 400))
    assert T.pool_stats() is False and T.pool_info()["stats"] is False  # off by default
    for bad in ("yes", 2, 1.0, [True]):
        with pytest.raises(TypeError, match="on must be True, False or None"):
            T.pool_stats(bad)
    assert T.pool_stats() is False  # a refused switch changes nothing
    off = T.pool_info()
    for _ in range(5):
        K.gemm(a, a, out)
    assert all(T.pool_info()[k] == off[k] for k in (*_TIME_KEYS, "worker_blocks"))
    assert T.pool_stats(True) is False
    try:
        assert T.pool_info()["stats"] is True
        before = T.pool_info()
        assert all(before[k] >= 0 for k in _TIME_KEYS) and before["worker_blocks"] >= 0
        t0 = time.perf_counter()
        for _ in range(20):
            K.gemm(a, a, out)
        wall_us = (time.perf_counter() - t0) * 1e6
        after = T.pool_info()
    finally:
        assert T.pool_stats(False) is True
    grew = {k: after[k] - before[k] for k in (*_TIME_KEYS, "worker_blocks", "worker_starts", "regions", "helped")}
    assert all(v >= 0 for v in grew.values()), grew
    if grew["regions"] == 0:  # one thread, or OpenMP regions: the pool ran nothing
        assert grew == dict.fromkeys(grew, 0)
        return
    assert 0 < grew["caller_block_us"] + grew["caller_wait_us"] <= wall_us
    assert grew["worker_blocks"] >= grew["worker_starts"] >= grew["helped"]
    # (bounded by the workers the pool has: in FASTBP_BLAS_THREADING=callback mode OpenBLAS's jobs run on it while
    # fastbp's own GEMM split uses one thread)
    workers = after["workers"]
    if grew["worker_blocks"]:
        assert 0 < grew["worker_block_us"] <= wall_us * workers
        # each worker's first block of a region starts within that region
        assert 0 < grew["worker_starts"] <= grew["regions"] * workers
        assert 0 <= grew["worker_start_us"] <= wall_us * workers
    else:
        assert grew["worker_block_us"] == grew["worker_start_us"] == grew["worker_starts"] == 0


def test_in_region_is_true_in_every_block_of_a_region_and_false_outside():
    # a kernel (the GEMM route to OpenBLAS's threads, say) asks in_region() before it opens a team of its own:
    # it must see the pool's blocks as inside a region, on the caller and on the workers alike
    outside, inside = T._in_region_seen(16)
    assert outside is False
    if K.build_info()["num_threads"] > 1:
        assert inside == [True] * 16
    else:  # one thread: the blocks run serially on the caller, no region
        assert inside == [False] * 16


# ---------------------------------------------------------------------------------------------------------------
# fc_relu_gradient: a fully connected ReLU network's forward and backward in one call
# ---------------------------------------------------------------------------------------------------------------
def _fc_operands(dtype, sizes, n, target, seed=0):
    rng = np.random.default_rng(seed)
    Ws = [rng.standard_normal((a, b)).astype(dtype) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.standard_normal(b).astype(dtype) for b in sizes[1:]]
    x = rng.standard_normal((n, sizes[0])).astype(dtype)
    c = sizes[-1]
    labels = rng.integers(0, c, n)
    t = labels if target == "labels" else np.eye(c, dtype=dtype)[labels]
    return x, t, Ws, bs


def _fc_outputs(dtype, sizes, n, fill=np.nan):
    L = len(sizes) - 1
    outs = [np.full((n, m), fill, dtype) for m in sizes[1:]]
    dxs = [None] + [np.full((n, d), fill, dtype) for d in sizes[1:-1]]
    dWs = [np.full((d, m), fill, dtype) for d, m in zip(sizes[:-1], sizes[1:])]
    dbs = [np.full(m, fill, dtype) for m in sizes[1:]]
    y = np.full((n, sizes[-1]), fill, dtype)
    g = np.full((n, sizes[-1]), fill, dtype)
    assert len(outs) == L
    return outs, dxs, dWs, dbs, y, g


def _fc_by_kernels(x, t, Ws, bs, dtype):
    """The same network through the single kernels, as fastbp.nets' layer path calls them."""
    n = x.shape[0]
    L = len(Ws)
    outs, dxs, dWs, dbs = [], [None] * L, [], []
    a = x
    for k in range(L):
        out = np.empty((n, Ws[k].shape[1]), dtype)
        K.affine_forward(a, Ws[k], bs[k], out)
        if k + 1 < L:
            K.relu_inplace(out)
        outs.append(out)
        a = out
    y = np.empty_like(outs[-1])
    g = np.empty_like(outs[-1])
    loss = K.softmax_cross_entropy(outs[-1], t, y, g, 1.0 / n)
    d = g
    dWs = [np.empty(W.shape, dtype) for W in Ws]
    dbs = [np.empty(W.shape[1], dtype) for W in Ws]
    for k in range(L - 1, -1, -1):
        dx = np.empty((n, Ws[k].shape[0]), dtype) if k > 0 else None
        K.affine_backward(d, x if k == 0 else outs[k - 1], Ws[k], dx, dWs[k], dbs[k])
        if k > 0:
            K.relu_mask_inplace(outs[k - 1], dx)
            dxs[k] = dx
            d = dx
    return loss, outs, dxs, dWs, dbs, y, g


@with_dtypes
@pytest.mark.parametrize(
    "sizes", [(12, 4), (12, 8, 4), (30, 9, 7, 5), (784, 50, 10)], ids=lambda s: "-".join(map(str, s))
)
@pytest.mark.parametrize("target", ["labels", "one-hot"])
@pytest.mark.parametrize("layout", ["C", "F", "rows2"])
def test_fc_relu_gradient_is_the_single_kernels_bit_for_bit(dtype, sizes, target, layout):
    n = 100 if sizes[0] == 784 else 7
    x, t, Ws, bs = _fc_operands(dtype, sizes, n, target)
    x[0] = -np.abs(x[0])  # a row with every pre-activation of the first layer negative-leaning
    x = operand(x, layout)
    Ws = [operand(W, layout) for W in Ws]  # the same operands for both: a layout is a BLAS transpose flag
    want = _fc_by_kernels(x, t, Ws, bs, dtype)
    outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
    loss = K.fc_relu_gradient(x, t, Ws, bs, outs, dxs, dWs, dbs, y, g)
    assert loss == want[0]
    for got_list, want_list in zip((outs, dxs, dWs, dbs), want[1:5]):
        for got_a, want_a in zip(got_list, want_list):
            if want_a is None:
                assert got_a is None
            else:
                assert np.array_equal(got_a, want_a)
    assert np.array_equal(y, want[5]) and np.array_equal(g, want[6])


@with_dtypes
def test_fc_relu_gradient_matches_numpy(dtype):
    sizes, n = (10, 6, 5, 3), 8
    x, t, Ws, bs = _fc_operands(dtype, sizes, n, "labels", seed=4)
    outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
    loss = K.fc_relu_gradient(x, t, Ws, bs, outs, dxs, dWs, dbs, y, g)
    X, W = x.astype(F64), [w.astype(F64) for w in Ws]
    h1 = np.maximum(X @ W[0] + bs[0], 0)
    h2 = np.maximum(h1 @ W[1] + bs[1], 0)
    s = h2 @ W[2] + bs[2]
    p = scipy.special.softmax(s, axis=1)
    assert_close(loss, -np.mean(np.log(p[np.arange(n), t])), dtype)
    d3 = (p - np.eye(3)[t]) / n
    assert_close(g, d3, dtype)
    assert_close(dWs[2], h2.T @ d3, dtype)
    d2 = (d3 @ W[2].T) * (h2 > 0)
    assert_close(dxs[2], d2, dtype)
    assert_close(dWs[1], h1.T @ d2, dtype)
    d1 = (d2 @ W[1].T) * (h1 > 0)
    assert_close(dbs[0], d1.sum(0), dtype)
    assert_close(dWs[0], X.T @ d1, dtype)


def test_fc_relu_gradient_validates_before_writing():
    dtype, sizes, n = F32, (6, 5, 3), 4
    x, t, Ws, bs = _fc_operands(dtype, sizes, n, "labels")

    def call(**change):
        outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
        args = dict(x=x, t=t, Ws=Ws, bs=bs, outs=outs, dxs=dxs, dWs=dWs, dbs=dbs, y=y, g=g)
        for k, v in change.items():
            args[k] = v(args) if callable(v) else v
        try:
            K.fc_relu_gradient(**args)
        finally:  # nothing written when it raises
            for a in [args["y"], args["g"]] + args["outs"] + args["dWs"] + args["dbs"] + args["dxs"][1:]:
                if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size and a is not x:
                    assert np.isnan(a).all() or not np.isnan(a).any()

    call()  # the valid call
    with pytest.raises(ValueError, match="dxs\\[0\\] must be None"):
        call(dxs=lambda a: [np.empty((n, 6), dtype)] + a["dxs"][1:])
    with pytest.raises(ValueError, match="Ws\\[1\\] must have 5 rows"):
        call(Ws=[Ws[0], np.ones((4, 3), dtype)])
    with pytest.raises(TypeError, match="bs\\[0\\]"):
        call(bs=[bs[0].astype(F64), bs[1]])
    with pytest.raises(ValueError, match="one entry per layer"):
        call(bs=bs[:1])
    with pytest.raises(ValueError, match="at least one row"):
        call(x=x[:0])
    with pytest.raises(ValueError, match="label 3 at index 2 is out of range"):
        call(t=np.array([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="outs\\[1\\] overlaps y"):
        call(y=lambda a: a["outs"][1])
    with pytest.raises(ValueError, match="dWs\\[0\\] overlaps Ws\\[0\\]"):
        call(dWs=lambda a: [Ws[0], a["dWs"][1]])
    with pytest.raises(ValueError, match="g overlaps x"):
        buf = np.zeros(6 + n * 6, dtype)
        call(x=buf[6:].reshape(n, 6), g=buf[: n * 3].reshape(n, 3))
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty((n, 3), dtype)
        ro.setflags(write=False)
        call(g=ro)
    with pytest.raises(TypeError, match="labels must be native int64"):
        call(t=t.astype(np.int32))
    # nothing written by a call that failed on its labels (the check comes before any kernel)
    outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
    with pytest.raises(ValueError):
        K.fc_relu_gradient(x, np.array([0, 1, -1, 2]), Ws, bs, outs, dxs, dWs, dbs, y, g)
    for a in outs + dWs + dbs + [dxs[1], y, g]:
        assert np.isnan(a).all()


def test_fc_relu_gradient_names_the_operands_of_any_layer():
    # the first 16 layers' names are made once, deeper ones when needed: every layer's messages name its operands
    dtype, n = F64, 3
    sizes = (4,) * 19 + (3,)  # 19 layers
    x, t, Ws, bs = _fc_operands(dtype, sizes, n, "labels")
    outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
    loss = K.fc_relu_gradient(x, t, Ws, bs, outs, dxs, dWs, dbs, y, g)
    want = _fc_by_kernels(x, t, Ws, bs, dtype)
    assert loss == want[0] and all(np.array_equal(a, b) for a, b in zip(dWs, want[3]))
    for k in (0, 15, 16, 18):
        bad = list(Ws)
        bad[k] = np.ones((5, sizes[k + 1]), dtype)
        outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
        with pytest.raises(ValueError, match=f"Ws\\[{k}\\] must have 4 rows"):
            K.fc_relu_gradient(x, t, bad, bs, outs, dxs, dWs, dbs, y, g)
        for name, pos in (("bs", 3), ("outs", 4), ("dWs", 6), ("dbs", 7)):
            args = [x, t, list(Ws), list(bs), *_fc_outputs(dtype, sizes, n)]  # fc_relu_gradient's argument order
            args[pos][k] = np.empty(7, dtype)  # a wrong shape for each of them
            with pytest.raises(ValueError, match=f"^{name}\\[{k}\\] "):
                K.fc_relu_gradient(*args)
    outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
    dxs[17] = dWs[17]
    with pytest.raises(ValueError, match="dxs\\[17\\] must have shape|dxs\\[17\\] overlaps dWs\\[17\\]"):
        K.fc_relu_gradient(x, t, Ws, bs, outs, dxs, dWs, dbs, y, g)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    sizes=st.lists(st.integers(1, 20), min_size=2, max_size=5),
    n=st.sampled_from([1, 2, 5, 63, 64, 65, 130]),
    target=st.sampled_from(["labels", "one-hot"]),
    lx=st.sampled_from(["C", "F", "rows2", "cols2", "strided", "reversed", "readonly"]),
    lw=st.sampled_from(["C", "F", "rows2", "cols2", "strided", "reversed", "readonly"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fc_relu_gradient_is_the_single_kernels_over_shapes_and_layouts(dtype, sizes, n, target, lx, lw, seed):
    # depths 1..4, widths 1..20 (C = 1 included), batches on both sides of the 64-row scratch, every operand
    # layout for x and the weights (BLAS transposes, copies for the strided ones): the same bits as the single
    # kernels on the same operands
    x, t, Ws, bs = _fc_operands(dtype, sizes, n, target, seed=seed)
    x = operand(x, lx)
    Ws = [operand(W, lw) for W in Ws]
    want = _fc_by_kernels(x, t, Ws, bs, dtype)
    outs, dxs, dWs, dbs, y, g = _fc_outputs(dtype, sizes, n)
    loss = K.fc_relu_gradient(x, t, Ws, bs, outs, dxs, dWs, dbs, y, g)
    assert loss == want[0] or (np.isnan(loss) and np.isnan(want[0]))
    for got_list, want_list in zip((outs, dxs, dWs, dbs), want[1:5]):
        for got_a, want_a in zip(got_list, want_list):
            assert (got_a is None) == (want_a is None)
            if want_a is not None:
                assert np.array_equal(got_a, want_a)
    assert np.array_equal(y, want[5]) and np.array_equal(g, want[6])
