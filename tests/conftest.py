"""Shared test helpers: ONE tolerance table per dtype and ``assert_close``.

Test modules import them with ``from fastbp_tests import TOL, assert_close, tol``: this module registers itself
under that name, because ``import conftest`` is ambiguous when pytest also loads ``benchmarks/conftest.py``.

``TOL[dtype]`` is how close a result computed in ``dtype`` must be to the float64 truth (or to the other
implementation): ``rtol`` relative to the expected value, ``atol`` relative to ``max(1, max|expected|)`` (so a
result that is a sum of large terms is allowed the rounding of those terms).  ``NUM_TOL`` is for numerical
derivatives (finite differences) against exact ones, looser by the step's truncation and rounding error.
"""

import os
import sys

import numpy as np

sys.modules.setdefault("fastbp_tests", sys.modules[__name__])

#: The books' trained pickles and datasets (shared/data/book beside the project root, as on the developers' machines
#: and in CI; FASTBP_BOOK_DATA points elsewhere).  Tests that need a file skip when it is absent.
BOOK_DATA = os.environ.get("FASTBP_BOOK_DATA") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "data", "book")
)

F16, F32, F64 = np.float16, np.float32, np.float64

TOL = {
    F16: {"rtol": 1e-2, "atol": 1e-2},
    F32: {"rtol": 1e-4, "atol": 1e-5},
    F64: {"rtol": 1e-10, "atol": 1e-12},
}
NUM_TOL = {F32: {"rtol": 2e-2, "atol": 2e-2}, F64: {"rtol": 1e-7, "atol": 1e-8}}


def tol(dtype):
    """The TOL entry of `dtype` (any dtype-like: np.float32, 'f4', np.dtype('>f8'), an array's dtype)."""
    return TOL[np.dtype(dtype).type]


def assert_close(actual, expected, dtype=None, err_msg=""):
    """|actual - expected| <= rtol |expected| + atol max(1, max|expected|) with the tolerances of `dtype`
    (default: actual's dtype).  Shapes must match exactly; NaN matches NaN and infinities match themselves."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape} {err_msg}"
    t = tol(dtype if dtype is not None else actual.dtype)
    finite = np.abs(expected[np.isfinite(expected)].astype(F64))
    scale = max(1.0, float(np.max(finite, initial=0.0)))
    np.testing.assert_allclose(
        actual.astype(F64), expected.astype(F64), rtol=t["rtol"], atol=t["atol"] * scale, err_msg=err_msg
    )


def num_grad(f, x, h):
    """Central differences (f(x + h) - f(x - h)) / 2h of the scalar f() wrt every entry of x (perturbed in place,
    restored), as float64."""
    g = np.zeros(x.shape, F64)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g
