"""fastbp's BLAS plumbing: the vectorised exp, GEMM splitting over threads, GEMV for one row, threading modes."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from fastbp import _blas
from fastbp import _kernels as K

TOL = {np.float32: dict(rtol=2e-5, atol=2e-4), np.float64: dict(rtol=1e-12, atol=1e-10)}


@pytest.mark.parametrize("dtype,lo,max_ulp", [(np.float32, -87.3, 2.0), (np.float64, -708.0, 3.0)])
def test_vectorised_exp_is_within_a_few_ulp(dtype, lo, max_ulp):
    x = np.linspace(lo, 0.0, 400_001).astype(dtype)
    got = K._exp_kernel(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(dtype)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= max_ulp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vectorised_exp_special_values(dtype):
    x = np.array([np.nan, -np.inf, -1e30, 0.0, -0.0, -800.0], dtype=dtype)
    got = K._exp_kernel(x)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], np.array([0, 0, 1, 1, 0], dtype=dtype))


def _op(a, t):
    return a.T if t else a


def _layouts(a, rng):
    """The same matrix as C, Fortran and a strided view."""
    big = np.zeros((a.shape[0], a.shape[1] * 2 + 1), a.dtype)
    big[:, ::2][:, : a.shape[1]] = a
    strided = big[:, ::2][:, : a.shape[1]]
    return {"C": np.ascontiguousarray(a), "F": np.asfortranarray(a), "strided": strided}


# (m, k, n) above the parallel threshold (2**19 multiply-adds), chosen so each split direction is taken:
# op(B) smallest -> split M; op(A) smallest -> split N; C smallest -> split K.
SPLIT_SHAPES = {"M": (784, 100, 50), "N": (50, 100, 784), "K": (60, 2000, 50), "K-large": (30, 12000, 50)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", sorted(SPLIT_SHAPES))
def test_split_gemm_matches_numpy_for_every_layout_and_transpose(dtype, which):
    m, k, n = SPLIT_SHAPES[which]
    rng = np.random.default_rng(3)
    _blas.ensure_loaded()  # (it sets the thread count and piece size that are saved here)
    old, old_small = K._get_gemm_threads(), K._get_small_mnk()
    try:
        for threads, small in itertools.product((1, 2, 3), (old_small, 0.0, 250_000.0)):
            K._set_gemm_threads(threads)
            K._set_small_mnk(small)  # small pieces (several per thread) and one piece per thread
            for ta, tb in itertools.product([False, True], repeat=2):
                A = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
                B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
                C0 = rng.standard_normal((m, n)).astype(dtype)
                want = 0.5 * (_op(A, ta).astype(np.float64) @ _op(B, tb).astype(np.float64)) + 2.0 * C0
                for la, lb in (("C", "C"), ("F", "strided"), ("strided", "F")):
                    C = C0.copy()
                    K.gemm(_layouts(A, rng)[la], _layouts(B, rng)[lb], C, trans_a=ta, trans_b=tb, alpha=0.5, beta=2.0)
                    np.testing.assert_allclose(C, want, **TOL[dtype])
    finally:
        K._set_gemm_threads(old)
        K._set_small_mnk(old_small)


def test_split_gemm_is_deterministic_for_a_thread_count():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((60, 2000)).astype(np.float32)
    B = rng.standard_normal((2000, 50)).astype(np.float32)
    outs = []
    for _ in range(3):
        C = np.empty((60, 50), np.float32)
        outs.append(K.gemm(A, B, C).copy())
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


_OWN_BLAS = _blas.info()["blas"] == "own"
_needs_own = pytest.mark.skipif(not _OWN_BLAS, reason="FASTBP_BLAS=numpy: NumPy's OpenBLAS, no split or pieces")


@_needs_own
def test_small_matrix_pieces_are_aimed_for_on_skylakex_cores_only():
    core = _blas.info()["corename"].lower()
    expected = _blas.SMALL_MATRIX_MNK if core in _blas.SMALL_MATRIX_CORES else 0
    assert K._get_small_mnk() == expected
    with pytest.raises(ValueError, match="must be >= 0"):
        K._set_small_mnk(-1)


def test_gemm_thread_count_must_be_positive():
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        K._set_gemm_threads(0)
    with pytest.raises(ValueError, match="must be >= 1, got -2"):
        _blas.set_num_threads(-2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_row_products_take_gemv_with_every_transpose_and_stride(dtype):
    rng = np.random.default_rng(5)
    for ta, tb, k, n in itertools.product([False, True], [False, True], [1, 7, 300], [1, 5, 4096]):
        A = rng.standard_normal((k, 1) if ta else (1, k)).astype(dtype)
        B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
        for lay in ("C", "F", "strided"):
            a, b = _layouts(A, rng)[lay], _layouts(B, rng)[lay]
            C = np.full((1, n), np.nan, dtype)
            K.gemm(a, b, C, trans_a=ta, trans_b=tb, alpha=0.5)
            want = 0.5 * (_op(A, ta).astype(np.float64) @ _op(B, tb).astype(np.float64))
            np.testing.assert_allclose(C, want, **TOL[dtype])


@_needs_own
def test_info_reports_the_threading_mode():
    info = _blas.info()
    assert info["threading"] in _blas.THREADING_MODES
    assert info["num_threads"] >= 1
    if K.build_info()["openmp"]:
        assert info["threading"] == os.environ.get("FASTBP_BLAS_THREADING", "split")


_MODE_SCRIPT = r"""
import numpy as np
from fastbp import _blas
from fastbp.nets import MultiLayerNet
info = _blas.info()
np.random.seed(0)
net = MultiLayerNet(784, [256, 256], 10, dtype=np.float32)
ref = MultiLayerNet(784, [256, 256], 10, dtype=np.float32, backend="reference")
for k in net.params:
    ref.params[k][...] = net.params[k]
rng = np.random.default_rng(1)
x = rng.random((128, 784)).astype(np.float32)
t = rng.integers(0, 10, 128)
g, r = net.gradient(x, t), ref.gradient(x, t)
worst = max(float(np.max(np.abs(g[k] - r[k])) / (np.max(np.abs(r[k])) + 1e-30)) for k in r)
print(info["threading"], worst)
"""


@pytest.mark.parametrize("mode", ["split", "callback", "openblas"])
def test_every_threading_mode_computes_the_same_gradients(mode):
    env = dict(os.environ, FASTBP_BLAS_THREADING=mode, FASTBP_BLAS="own")  # the threading modes of fastbp's copy
    r = subprocess.run([sys.executable, "-c", _MODE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got_mode, worst = r.stdout.split()
    expected = mode if K.build_info()["openmp"] else "openblas"
    assert got_mode == expected
    assert float(worst) < 1e-4


def test_unknown_threading_mode_is_refused():
    env = dict(os.environ, FASTBP_BLAS_THREADING="turbo")
    r = subprocess.run(
        [sys.executable, "-c", "from fastbp import _blas; _blas.ensure_loaded()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "FASTBP_BLAS_THREADING must be one of" in r.stderr and "'turbo'" in r.stderr


_FORK_SCRIPT = r"""
import multiprocessing as mp
import numpy as np
from fastbp import _kernels as K
from fastbp.nets import TwoLayerNet
rng = np.random.default_rng(0)
a = rng.random((300, 800)).astype(np.float32)
b = rng.random((800, 300)).astype(np.float32)
c = np.empty((300, 300), np.float32)
K.gemm(a, b, c)                                   # the parent's OpenMP team is running now
x = rng.standard_normal((1000, 1000)).astype(np.float32)
K.relu_forward(x, np.empty_like(x), np.empty(x.shape, bool))

def work(i):
    cc = np.empty((300, 300), np.float32)
    K.gemm(a, b, cc)
    out, mask = np.empty_like(x), np.empty(x.shape, bool)
    K.relu_forward(x, out, mask)
    net = TwoLayerNet(784, 50, 10, dtype=np.float32)
    net.gradient(rng.random((100, 784)).astype(np.float32), np.arange(100) % 10)
    return bool(np.allclose(cc, c, rtol=1e-5)) and bool(np.array_equal(out, np.maximum(x, 0))), \
        K.build_info()["forked_child"], K._get_gemm_threads()

with mp.get_context("fork").Pool(2) as pool:
    print(pool.map(work, range(4)))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_do_not_hang_and_run_single_threaded():
    r = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([(True, True, 1)] * 4)


def _poison_heap():
    """Fill and free a few MB so that memory malloc hands out next holds 1e30, not zeros."""
    junk = np.full(300_000, 1e30)
    del junk


@pytest.mark.parametrize("threads", [16, 48, 64])
def test_k_split_with_more_threads_than_filled_pieces_is_exact(threads):
    # Issue 7 item 1: K = 225 over 16 threads is cut into chunks of 15, so only 15 pieces hold rows; the 16th
    # thread's scratch was allocated, never written and still summed into C (values like 1e30).
    import fastbp.layers as L

    rng = np.random.default_rng(0)
    x = rng.standard_normal((225, 100))
    W = rng.standard_normal((100, 100))
    d = rng.standard_normal((225, 100))
    _blas.ensure_loaded()
    old, old_small = K._get_gemm_threads(), K._get_small_mnk()
    try:
        K._set_gemm_threads(threads)
        for small in (old_small, 0.0):
            K._set_small_mnk(small)
            for _ in range(4):
                _poison_heap()
                a = L.Affine(W, np.zeros(100))
                a.forward(x)
                a.backward(d)
                np.testing.assert_allclose(a.dW, x.T @ d, **TOL[np.float64])
                _poison_heap()
                C = np.empty((100, 100))
                K.gemm(x, d, C, trans_a=True)
                np.testing.assert_allclose(C, x.T @ d, **TOL[np.float64])
                _poison_heap()
                C32 = np.empty((100, 100), np.float32)
                K.gemm(x.astype(np.float32), d.astype(np.float32), C32, trans_a=True)
                np.testing.assert_allclose(C32, x.T @ d, **TOL[np.float32])
    finally:
        K._set_gemm_threads(old)
        K._set_small_mnk(old_small)


# ---------------------------------------------------------------------------------------------------------------
# Dimensions near 2**31 (issue 7 item 5): piece arithmetic in Py_ssize_t, clear refusal of what BLAS cannot take
# ---------------------------------------------------------------------------------------------------------------
from fastbp import _gemm  # noqa: E402


def _check_plan(m, n, k, ta, tb, threads, small):
    split, nt, bounds = _gemm._gemm_plan(m, n, k, ta, tb, threads, small)
    lim = {"M": m, "N": n, "K": k}[split]
    assert bounds[0][0] == 0 and bounds[-1][1] == lim
    assert all(lo < hi for lo, hi in bounds), "every piece holds at least one row/column"
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "pieces tile the dimension"
    assert 1 <= nt <= min(threads, len(bounds)) or (nt == 1 and len(bounds) == 1)
    return split, nt, bounds


@pytest.mark.parametrize("threads", [2, 3, 16, 64])
def test_gemm_pieces_of_a_dimension_near_2_31_are_not_empty(threads):
    # (size + pieces - 1) overflowed int for size 2**31 - 1: every piece was empty and C stayed 0.  Split N here
    # (op(A) is the smallest operand): the shape of MatMul with W (1, 2**31 - 1) and a batch of 4.
    split, nt, bounds = _check_plan(4, 2**31 - 1, 1, False, False, threads, 0.0)
    assert split == "N" and nt == threads and len(bounds) == threads
    split, nt, bounds = _check_plan(2**31 - 1, 4, 1, False, False, threads, 1e6)
    assert split == "M" and len(bounds) == threads
    split, nt, bounds = _check_plan(3, 2, 2**31 - 1, True, False, threads, 0.0)
    assert split == "K" and len(bounds) == threads
    # the arithmetic itself is 64-bit: sizes BLAS could never take still cut correctly
    _check_plan(2, 2**40 + 3, 5, False, True, threads, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_refuses_dimensions_blas_32_bit_interface_cannot_take(dtype):
    from numpy.lib.stride_tricks import as_strided

    big = 2**31
    z = np.zeros(1, dtype)
    a = as_strided(z, shape=(2, big), strides=(0, 0))  # virtual: no memory behind the 2**31 columns
    b = as_strided(z, shape=(big, 3), strides=(0, 0))
    with pytest.raises(ValueError, match=r"(?s)dimension k = 2147483648 is >= 2\*\*31"):
        K.gemm(a, b, np.zeros((2, 3), dtype))
    with pytest.raises(ValueError, match=r"dimension k = 2147483648"):
        K.affine_forward(a, b, np.zeros(3, dtype), np.zeros((2, 3), dtype))
    with pytest.raises(ValueError, match=r"dimension m = 2147483648"):
        K.gemm(b, np.zeros((3, 2), dtype), as_strided(z, shape=(big, 2), strides=(0, 0)))
    with pytest.raises(ValueError, match=r"dimension n = 2147483648"):
        _gemm.check_blas_dims(1, big, 1)
    with pytest.raises(ValueError, match=r"ldc = 2147483648"):
        _gemm.check_blas_dims(1, 1, 1, 1, 1, big)
    _gemm.check_blas_dims(big - 1, big - 1, big - 1, big - 1, big - 1, big - 1)  # the largest BLAS takes


# ---------------------------------------------------------------------------------------------------------------
# Property: every split of a product (issue 7 "Done when")
# ---------------------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_PRIMES = [p for p in range(2, 300) if all(p % q for q in range(2, int(p**0.5) + 1))]
_DIM = st.one_of(st.sampled_from([0, 1, 1, 2, 3]), st.sampled_from(_PRIMES))


def _layout(a, kind):
    if kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":  # unit stride inside rows, a gap between rows: read in place
        big = np.zeros((a.shape[0], a.shape[1] + 3), a.dtype)
        big[:, : a.shape[1]] = a
        return big[:, : a.shape[1]]
    return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]  # "reversed": negative strides, copied for BLAS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=_DIM,
    n=_DIM,
    k=_DIM,
    ta=st.booleans(),
    tb=st.booleans(),
    la=st.sampled_from(["C", "F", "strided", "reversed"]),
    lb=st.sampled_from(["C", "F", "strided", "reversed"]),
    threads=st.integers(1, 64),
    small=st.sampled_from([0.0, 1e6, 3.0, 16.0]),
    dtype=st.sampled_from([np.float32, np.float64]),
    beta=st.sampled_from([0.0, 1.0, -0.5]),
    seed=st.integers(0, 2**16),
)
def test_every_gemm_split_matches_numpy(m, n, k, ta, tb, la, lb, threads, small, dtype, beta, seed):
    # small = 3 or 16 aims pieces at mnk / 3 or mnk / 16 multiply-adds, so even tiny products are cut along M, N
    # or K into pieces of one row/column; 1e6 is the SkylakeX setting; 0 means one piece per thread past 2**19.
    mnk = m * n * k
    small_mnk = small if small in (0.0, 1e6) else max(1.0, mnk / small)
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    C0 = rng.standard_normal((m, n)).astype(dtype)
    opA, opB = _op(A, ta).astype(np.float64), _op(B, tb).astype(np.float64)
    want = 0.75 * (opA @ opB) + beta * C0
    bound = np.abs(0.75) * (np.abs(opA) @ np.abs(opB)) + abs(beta) * np.abs(C0)
    eps = np.finfo(dtype).eps
    if m and n and k:
        _check_plan(m, n, k, ta, tb, threads, small_mnk)
    old, old_small = K._get_gemm_threads(), K._get_small_mnk()
    try:
        K._set_gemm_threads(threads)
        K._set_small_mnk(small_mnk)
        C = C0.copy()
        K.gemm(_layout(A, la), _layout(B, lb), C, trans_a=ta, trans_b=tb, alpha=0.75, beta=beta)
    finally:
        K._set_gemm_threads(old)
        K._set_small_mnk(old_small)
    err = np.abs(C.astype(np.float64) - want)
    assert np.all(err <= 2 * (k + 2) * eps * bound + np.finfo(dtype).tiny), (
        f"max error {err.max()} for split "
        f"{_gemm._gemm_plan(max(m, 1), max(n, 1), max(k, 1), ta, tb, threads, small_mnk)}"
    )


@pytest.mark.parametrize("threads", [1, 3, 16, 64])
@pytest.mark.parametrize("mkn", [(60, 2000, 50), (784, 100, 50), (50, 100, 784), (1, 300, 7)])
def test_gemm_called_inside_a_parallel_region_runs_single_threaded_and_right(threads, mkn):
    # a kernel's block calling the split GEMM (as convolution and recurrent kernels do): the GEMM must not open a
    # nested team, and a K split's scratch must still be written and summed
    m, k, n = mkn
    rng = np.random.default_rng(m + k)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    old, old_small = K._get_gemm_threads(), K._get_small_mnk()
    try:
        K._set_gemm_threads(threads)
        for small in (old_small, 0.0):
            K._set_small_mnk(small)
            _poison_heap()
            out = _gemm._gemm_in_blocks(a, b, 6)
            for c in out:
                np.testing.assert_allclose(c, a @ b, **TOL[np.float64])
    finally:
        K._set_gemm_threads(old)
        K._set_small_mnk(old_small)


# ---------------------------------------------------------------------------------------------------------------
# The route of the largest products to OpenBLAS's own threads (jobs on fastbp's team through the threads callback)
# ---------------------------------------------------------------------------------------------------------------
def _blas_threaded(min_mnk):
    """Point the route at OpenBLAS's openblas_set_num_threads with threshold min_mnk; returns the old threshold."""
    import ctypes

    old = _gemm._get_blas_threaded_min()
    lib = _blas.ensure_loaded()["lib"]
    setter = ctypes.cast(lib.scipy_openblas_set_num_threads, ctypes.c_void_p).value
    _gemm._set_blas_threaded(setter, min_mnk, _blas._usable_cpus())
    return old


_ROUTE_ON = K.build_info()["openmp"] and _blas.info()["threading"] == "split"


def test_blas_threaded_route_is_taken_only_for_large_products_on_several_threads():
    if not _ROUTE_ON:
        assert _gemm._get_blas_threaded_min() == 0 or _blas.info()["threading"] != "split"
        pytest.skip("no OpenMP or not the split mode: the route is off")
    d = _gemm._blas_threaded_min_dim()
    old = _blas_threaded(2.0 * d**3)
    try:
        cpus = _blas._usable_cpus()
        assert _gemm._gemm_route(2 * d, d, d, 2) == min(2, cpus)
        assert _gemm._gemm_route(2 * d - 1, d, d, 2) == 0  # below the threshold: split into pieces
        assert _gemm._gemm_route(2 * d, d, d, 1) == 0  # one thread: one plain call
        assert _gemm._gemm_route(d - 1, 100 * d, d, 4) == 0  # a dimension below the minimum (tall-skinny)
        assert _gemm._gemm_route(d, d, 100 * d - 1, 4) == min(4, cpus)
        assert _gemm._gemm_route(2 * d, d, d, 64) == min(64, cpus)  # never more OpenBLAS threads than CPUs
        _blas_threaded(0.0)
        assert _gemm._gemm_route(10 * d, 10 * d, 10 * d, 2) == 0  # 0: off
    finally:
        _blas_threaded(old)
    assert _blas.info()["blas_threaded_min"] == old


@pytest.mark.parametrize("threads", [1, 2, 3, 16, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_threaded_route_matches_numpy_for_every_transpose(threads, dtype):
    if not _ROUTE_ON:
        pytest.skip("no OpenMP or not the split mode: the route is off")
    rng = np.random.default_rng(threads)
    d = _gemm._blas_threaded_min_dim()
    m, n, k = d + 3, d, d + 75
    old, old_t = _blas_threaded(1.0), K._get_gemm_threads()
    try:
        K._set_gemm_threads(threads)
        assert _gemm._gemm_route(m, n, k, threads) == (min(threads, _blas._usable_cpus()) if threads > 1 else 0)
        for ta, tb in itertools.product([False, True], repeat=2):
            A = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
            B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
            C0 = rng.standard_normal((m, n)).astype(dtype)
            want = 0.5 * (_op(A, ta).astype(np.float64) @ _op(B, tb).astype(np.float64)) - 2.0 * C0
            outs = []
            for _ in range(2):
                C = C0.copy()
                K.gemm(A, B, C, trans_a=ta, trans_b=tb, alpha=0.5, beta=-2.0)
                outs.append(C)
            np.testing.assert_allclose(outs[0], want, **TOL[dtype])
            assert np.array_equal(outs[0], outs[1])  # reproducible for a thread count
        # inside a parallel region the route is not taken (no nested team): still right
        a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
        prods, route = _gemm._gemm_in_blocks(a, b, 4, with_route=True)
        for c in prods:
            np.testing.assert_allclose(c, a @ b, **TOL[np.float64])
        # in a block of a region (the pool's or an OpenMP team's) the route is never taken; where the driver runs
        # the blocks on the caller (one thread), there is no region and the route may be
        from fastbp import _threads

        _, inside = _threads._in_region_seen(4)
        assert all(r == 0 for r, i in zip(route.tolist(), inside) if i)
        if _threads._get_num_threads() > 1:
            assert all(inside) and route.tolist() == [0, 0, 0, 0]
    finally:
        K._set_gemm_threads(old_t)
        _blas_threaded(old)


def test_blas_threaded_min_setting_is_checked():
    assert _blas.env_blas_threaded_min({}) == _blas.BLAS_THREADED_MNK == 0  # off unless asked for
    assert _blas.env_blas_threaded_min({"FASTBP_BLAS_THREADED_MIN": "0"}) == 0.0
    assert _blas.env_blas_threaded_min({"FASTBP_BLAS_THREADED_MIN": " 1e8 "}) == 1e8
    for bad in ("-1", "lots", "nan", "inf"):
        with pytest.raises(ValueError, match="FASTBP_BLAS_THREADED_MIN must be a number of multiply-adds >= 0"):
            _blas.env_blas_threaded_min({"FASTBP_BLAS_THREADED_MIN": bad})
    with pytest.raises(ValueError, match="threaded-BLAS size must be >= 0"):
        _gemm._set_blas_threaded(0, -1.0, 1)
    with pytest.raises(ValueError, match="max_threads must be >= 1"):
        _gemm._set_blas_threaded(0, 1.0, 0)


# ---------------------------------------------------------------------------------------------------------------
# float32 data into float64 weights: the conversion done inside the product (dgemm_from_f32, affine_forward xk=)
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=_DIM,
    m=_DIM,
    d=_DIM,
    lx=st.sampled_from(["C", "F", "strided", "reversed"]),
    lw=st.sampled_from(["C", "F"]),
    threads=st.integers(1, 64),
    small=st.sampled_from([0.0, 1e6, 3.0, 16.0]),
    seed=st.integers(0, 2**16),
)
def test_affine_forward_converting_float32_inside_the_product(n, m, d, lx, lw, threads, small, seed):
    rng = np.random.default_rng(seed)
    x = _layout(rng.standard_normal((n, d)).astype(np.float32), lx)
    W = _layout(rng.standard_normal((d, m)), lw)
    b = rng.standard_normal(m)
    x64 = np.ascontiguousarray(x, np.float64)
    old, old_small = K._get_gemm_threads(), K._get_small_mnk()
    try:
        K._set_gemm_threads(threads)
        K._set_small_mnk(small if small in (0.0, 1e6) else max(1.0, n * m * d / small))
        want = K.affine_forward(x64, W, b, np.full((n, m), np.nan))
        xk = np.full((n, d), np.nan)
        got = K.affine_forward(x, W, b, np.full((n, m), np.nan), xk=xk)
        xk2 = np.full((n, d), np.nan)
        again = K.affine_forward(x, W, b, np.full((n, m), np.nan), xk=xk2)
    finally:
        K._set_gemm_threads(old)
        K._set_small_mnk(old_small)
    assert np.array_equal(xk, x64) and np.array_equal(xk2, x64), "xk is x converted, every element written"
    assert np.array_equal(got, again), "the same bits from one call to the next"
    if threads == 1:
        assert np.array_equal(got, want), "one thread: the very pieces of the product on a converted copy"
    # more threads: a K split is cut at whole cache lines instead, so the sums may group differently
    bound = np.abs(x64) @ np.abs(W) + np.abs(b)
    assert np.all(np.abs(got - want) <= 4 * (d + 2) * np.finfo(np.float64).eps * bound)


@pytest.mark.parametrize("threads", [2, 3, 16, 64])
@pytest.mark.parametrize("mnk", [(100, 50, 784), (128, 100, 784), (256, 1024, 784), (7, 5, 1001), (3, 2, 9)])
def test_k_split_of_a_converted_operand_cuts_at_whole_cache_lines(threads, mnk):
    m, n, k = mnk
    for small in (0.0, 1e6):
        split, nt, bounds = _check_plan(m, n, k, False, False, threads, small)
        got = _gemm._gemm_plan(m, n, k, False, False, threads, small, 8)
        if split != "K" or nt == 1:
            assert got == (split, nt, bounds), "only a K split over several threads is re-cut"
            continue
        asplit, ant, abounds = got
        assert asplit == "K" and abounds[0][0] == 0 and abounds[-1][1] == k
        assert all(a[1] == b[0] for a, b in zip(abounds, abounds[1:])) and all(lo < hi for lo, hi in abounds)
        assert all(lo % 8 == 0 for lo, _ in abounds), abounds

        # the threads' shares stay about as even as before (thread i: pieces i * P // t up to (i + 1) * P // t)
        def most(bs, t):
            return max(sum(hi - lo for lo, hi in bs[i * len(bs) // t : (i + 1) * len(bs) // t]) for i in range(t))

        assert most(abounds, ant) <= most(bounds, nt) + 8 * max(1, len(abounds) // ant + 1)


def test_affine_forward_xk_is_checked():
    x = np.ones((4, 3), np.float32)
    W, b, out, xk = np.ones((3, 2)), np.ones(2), np.empty((4, 2)), np.empty((4, 3))
    with pytest.raises(TypeError, match="x must be float32 when xk is given"):
        K.affine_forward(x.astype(np.float64), W, b, out, xk=xk)
    with pytest.raises(TypeError, match="W must have dtype float64"):
        K.affine_forward(x, W.astype(np.float32), b, out, xk=xk)
    with pytest.raises(TypeError, match="xk must have dtype float64"):
        K.affine_forward(x, W, b, out, xk=xk.astype(np.float32))
    with pytest.raises(ValueError, match=r"xk must have shape \(4, 3\)"):
        K.affine_forward(x, W, b, out, xk=np.empty((3, 4)))
    with pytest.raises(ValueError, match="xk must be C-contiguous"):
        K.affine_forward(x, W, b, out, xk=np.empty((3, 4)).T)
    buf = np.empty(4 * 3 * 2 + 8)
    with pytest.raises(ValueError, match="overlap|share"):
        K.affine_forward(x, W, b, buf[:8].reshape(4, 2), xk=buf[6:18].reshape(4, 3))
