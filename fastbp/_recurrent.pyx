# Design
# ------
# The time loops of book 2's recurrent layers (RNN, LSTM, GRU over a whole (N, T) sequence), with no Python call
# per time step.  The layer (fastbp/time_layers.py) computes the input projection of ALL steps with one GEMM
# (A = xs @ Wx + b, shape (N, T, G*H)) and, after the backward loop, the weight gradients with one GEMM each
# (dWx = xs^T dA, dWh = hprev^T dA, db = colsum dA, dxs = dA Wx^T).  The loops here do what must be sequential:
#
#   forward,  per step t:  A_t += h_{t-1} @ Wh   (one GEMM, written in place into A's rows of step t)
#                          one fused gate kernel (fastbp/_recurrent.h): activations, cell update, h_t
#   backward, per step t (T-1 .. 0): one fused gate-backward kernel -> dA_t;  dh_{t-1} = dA_t @ Wh^T (one GEMM)
#
# (the book's GRU needs two GEMMs per step each way, because its candidate reads (r * h) @ Whh).  Every operand
# is a C-contiguous buffer; step t of an (N, T, K) buffer is read in place with leading dimension T*K, so nothing
# is copied per step.  float32 and float64 through the fused type `floating`.
#
# GEMM: a per-step product below SERIAL_MNK multiply-adds (the Rnnlm's 20 x 100 x 400) is ONE BLAS call on the
# calling thread (the leaf cblas_?gemm of fastbp's OpenBLAS, whose addresses fastbp._blas hands out): splitting
# it over threads opened ~140 parallel regions per Rnnlm step, and at 2 threads on the loaded 2-core EPYC made
# the LSTM's forward+backward 21-23 ms against 9 ms on one thread.  Those products give the same bits for any
# thread count.  Larger per-step products (BetterRnnlm's 20 x 650 x 2600) go through fastbp._gemm's `gemm`,
# which splits them over fastbp's threads (there 2 threads win: 316-365 ms vs 367-385 ms); across thread counts
# they are as close as the split GEMM's results.  The loops add no thread-dependent order of their own.
cimport numpy as cnp
from fastbp._typedefs cimport floating
from fastbp._validate cimport ftype as _ftype
from libc.stdint cimport intptr_t
from fastbp._gemm cimport gemm as fb_gemm, FB_NOTRANS, FB_TRANS, FB_INT_MAX, FB_ROWMAJOR, sgemm_fn, dgemm_fn
from fastbp import _blas as _blas_py

cnp.import_array()

# per-step products below this many multiply-adds: one BLAS call on the calling thread (see the Design note)
cdef double SERIAL_MNK = 4e6
cdef sgemm_fn _leaf_sgemm = NULL
cdef dgemm_fn _leaf_dgemm = NULL


def _set_leaf_gemm(intptr_t sgemm_address, intptr_t dgemm_address):
    """Install the leaf cblas_sgemm / cblas_dgemm of fastbp's OpenBLAS (done at import)."""
    global _leaf_sgemm, _leaf_dgemm
    if sgemm_address == 0 or dgemm_address == 0:
        raise ValueError("null BLAS address")
    _leaf_sgemm = <sgemm_fn>sgemm_address
    _leaf_dgemm = <dgemm_fn>dgemm_address


def _serial_mnk():
    """For tests: per-step products below this many multiply-adds run as one BLAS call on the calling thread."""
    return SERIAL_MNK


def _set_serial_mnk(double mnk):
    """For tests and A/B timings: set SERIAL_MNK (0: every per-step product through the split GEMM)."""
    global SERIAL_MNK
    if not mnk >= 0:
        raise ValueError(f"mnk must be >= 0, got {mnk}")
    SERIAL_MNK = mnk


include "_simd_query.pxi"


cdef enum:
    NoTrans = FB_NOTRANS
    Trans = FB_TRANS
    INT_MAX = FB_INT_MAX

cdef extern from "_recurrent.h" nogil:
    void fb_lstm_fwd_f32(long N, long H, float *a, long lda, const float *cprev, long ldcp, float *c, long ldc,
                         float *h, long ldh) noexcept
    void fb_lstm_fwd_f64(long N, long H, double *a, long lda, const double *cprev, long ldcp, double *c, long ldc,
                         double *h, long ldh) noexcept
    void fb_lstm_bwd_f32(long N, long H, const float *gates, long ldg, const float *c, long ldc,
                         const float *cprev, long ldcp, const float *dhs, long ldd, const float *dhn,
                         float *dc, float *da, long ldda) noexcept
    void fb_lstm_bwd_f64(long N, long H, const double *gates, long ldg, const double *c, long ldc,
                         const double *cprev, long ldcp, const double *dhs, long ldd, const double *dhn,
                         double *dc, double *da, long ldda) noexcept
    void fb_rnn_fwd_f32(long N, long H, const float *a, long lda, float *h, long ldh) noexcept
    void fb_rnn_fwd_f64(long N, long H, const double *a, long lda, double *h, long ldh) noexcept
    void fb_rnn_bwd_f32(long N, long H, const float *h, long ldh, const float *dhs, long ldd, const float *dhn,
                        float *da, long ldda) noexcept
    void fb_rnn_bwd_f64(long N, long H, const double *h, long ldh, const double *dhs, long ldd,
                        const double *dhn, double *da, long ldda) noexcept
    void fb_gru_fwd1_f32(long N, long H, float *a, long lda, const float *b, const float *hp, long ldhp,
                         float *rh, long ldrh) noexcept
    void fb_gru_fwd1_f64(long N, long H, double *a, long lda, const double *b, const double *hp, long ldhp,
                         double *rh, long ldrh) noexcept
    void fb_gru_fwd2_f32(long N, long H, float *a, long lda, const float *q, const float *hp, long ldhp,
                         float *h, long ldh) noexcept
    void fb_gru_fwd2_f64(long N, long H, double *a, long lda, const double *q, const double *hp, long ldhp,
                         double *h, long ldh) noexcept
    void fb_gru_bwd1_f32(long N, long H, const float *g, long ldg, const float *hp, long ldhp, const float *dhs,
                         long ldd, const float *dhn, float *acc, float *da, long ldda) noexcept
    void fb_gru_bwd1_f64(long N, long H, const double *g, long ldg, const double *hp, long ldhp,
                         const double *dhs, long ldd, const double *dhn, double *acc, double *da,
                         long ldda) noexcept
    void fb_gru_bwd2_f32(long N, long H, const float *g, long ldg, const float *hp, long ldhp, const float *dhr,
                         float *acc, float *da, long ldda) noexcept
    void fb_gru_bwd2_f64(long N, long H, const double *g, long ldg, const double *hp, long ldhp,
                         const double *dhr, double *acc, double *da, long ldda) noexcept


cdef inline void _gemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                       const floating *a, Py_ssize_t lda, const floating *b, Py_ssize_t ldb, floating beta,
                       floating *c, Py_ssize_t ldc) noexcept nogil:
    """Row-major C[m, n] = alpha op(A) op(B) + beta C: one leaf BLAS call below SERIAL_MNK, else fastbp._gemm's
    split GEMM (dims validated below 2**31 by the wrappers; k >= 1 and leading dims >= n or k there)."""
    if m == 0 or n == 0:
        return
    if k > 0 and <double>m * <double>n * <double>k < SERIAL_MNK:
        if floating is float:
            _leaf_sgemm(FB_ROWMAJOR, ta, tb, <int>m, <int>n, <int>k, alpha, a, <int>lda, b, <int>ldb, beta, c,
                        <int>ldc)
        else:
            _leaf_dgemm(FB_ROWMAJOR, ta, tb, <int>m, <int>n, <int>k, alpha, a, <int>lda, b, <int>ldb, beta, c,
                        <int>ldc)
        return
    fb_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


# ---------------------------------------------------------------------------------------------------------------
# Validation (once per call, Python level)
# ---------------------------------------------------------------------------------------------------------------
cdef cnp.ndarray _arr(object a, str name, int ft, tuple shape, bint out):
    """a as a C-contiguous ndarray of float type ft and exactly `shape` (writable when out)."""
    if _ftype(a, name) != ft:
        raise TypeError(f"{name} must be {'float32' if ft == 0 else 'float64'} like the first operand, "
                        f"got {(<cnp.ndarray>a).dtype}")
    cdef cnp.ndarray A = <cnp.ndarray>a
    if (<object>A).shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {(<object>A).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(A):
        raise ValueError(f"{name} must be C-contiguous")
    if out and not cnp.PyArray_ISWRITEABLE(A):
        raise ValueError(f"{name} must be writable")
    return A


cdef void _extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    lo[0] = <char*>cnp.PyArray_DATA(a)
    hi[0] = lo[0] + n * cnp.PyArray_ITEMSIZE(a)


cdef _disjoint(list arrays, list names):
    """ValueError when two of the (C-contiguous) buffers overlap: outputs must not alias anything."""
    cdef Py_ssize_t i, j
    cdef char *lo1
    cdef char *hi1
    cdef char *lo2
    cdef char *hi2
    for i in range(len(arrays)):
        _extent(<cnp.ndarray>arrays[i], &lo1, &hi1)
        if lo1 == hi1:
            continue
        for j in range(i + 1, len(arrays)):
            _extent(<cnp.ndarray>arrays[j], &lo2, &hi2)
            if lo2 != hi2 and lo1 < hi2 and lo2 < hi1:
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory")


cdef _dims(Py_ssize_t N, Py_ssize_t T, Py_ssize_t K):
    if N * T * K >= INT_MAX or T * K >= INT_MAX:
        raise ValueError(f"sequence buffer (N={N}, T={T}, {K}) is too large for BLAS's 32-bit dimensions")


cdef inline void *_p(cnp.ndarray a) noexcept:
    return cnp.PyArray_DATA(a)


cdef tuple _sequence(object a, str name, Py_ssize_t G, bint out):
    """(a, ft, N, T, H) for the first operand of a call, an (N, T, G*H) sequence buffer: it fixes the float type
    and the sizes every other operand is checked against."""
    cdef int ft = _ftype(a, name)
    cdef cnp.ndarray A = <cnp.ndarray>a
    if A.ndim != 3 or A.shape[2] % G:
        raise ValueError(f"{name} must be (N, T, {'' if G == 1 else G}H), got shape {(<object>A).shape}")
    cdef Py_ssize_t N = A.shape[0], T = A.shape[1], H = A.shape[2] // G
    return _arr(a, name, ft, (N, T, G * H), out), ft, N, T, H


cdef inline const floating *_step_before(const floating *seq, const floating *first, Py_ssize_t t, Py_ssize_t T,
                                         Py_ssize_t H, Py_ssize_t *ld) noexcept nogil:
    """Rows of step t - 1 of the (N, T, H) buffer seq (leading dimension *ld = T*H), or the (N, H) initial
    state `first` (*ld = H) at t = 0: the state every cell's step t reads."""
    if t > 0:
        ld[0] = T * H
        return seq + (t - 1) * H
    ld[0] = H
    return first


# The float32 / float64 branches below (`if floating is float: fb_..._f32(...) else: fb_..._f64(...)` and
# `if ft == 0: _loop[float](<float*>...) else: _loop[double](<double*>...)`) are one call spelled out per dtype on
# purpose: the C kernels in _recurrent.h have one name per type, and the run-time float type picks a fused
# specialisation only through an explicit branch.


# ---------------------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------------------
cdef void _lstm_fwd(Py_ssize_t N, Py_ssize_t T, Py_ssize_t H, floating *a, const floating *wh, const floating *h0,
                    const floating *c0, floating *hs, floating *cs) noexcept nogil:
    cdef Py_ssize_t t, G = 4 * H, ldh, ldc
    cdef const floating *hp
    cdef const floating *cp
    for t in range(T):
        hp = _step_before(hs, h0, t, T, H, &ldh)
        cp = _step_before(cs, c0, t, T, H, &ldc)
        _gemm(NoTrans, NoTrans, N, G, H, <floating>1, hp, ldh, wh, G, <floating>1, a + t * G, T * G)
        if floating is float:
            fb_lstm_fwd_f32(N, H, a + t * G, T * G, cp, ldc, cs + t * H, T * H, hs + t * H, T * H)
        else:
            fb_lstm_fwd_f64(N, H, a + t * G, T * G, cp, ldc, cs + t * H, T * H, hs + t * H, T * H)


def lstm_forward(A, Wh, h0, c0, hs, cs):
    """Whole-sequence LSTM forward.  A (N, T, 4H): in xs Wx + b, out the activated gates [f|g|i|o];
    Wh (H, 4H); h0, c0 (N, H); hs, cs (N, T, H) out: h_t and c_t (c_t = f c_{t-1} + g i, h_t = o tanh c_t)."""
    cdef cnp.ndarray Aa
    cdef int ft
    cdef Py_ssize_t N, T, H
    Aa, ft, N, T, H = _sequence(A, "A", 4, True)
    cdef cnp.ndarray W = _arr(Wh, "Wh", ft, (H, 4 * H), False)
    cdef cnp.ndarray H0 = _arr(h0, "h0", ft, (N, H), False), C0 = _arr(c0, "c0", ft, (N, H), False)
    cdef cnp.ndarray HS = _arr(hs, "hs", ft, (N, T, H), True), CS = _arr(cs, "cs", ft, (N, T, H), True)
    _disjoint([Aa, HS, CS, W, H0, C0], ["A", "hs", "cs", "Wh", "h0", "c0"])
    _dims(N, T, 4 * H)
    with nogil:
        if ft == 0:
            _lstm_fwd[float](N, T, H, <float*>cnp.PyArray_DATA(Aa), <float*>cnp.PyArray_DATA(W),
                             <float*>cnp.PyArray_DATA(H0), <float*>cnp.PyArray_DATA(C0),
                             <float*>cnp.PyArray_DATA(HS), <float*>cnp.PyArray_DATA(CS))
        else:
            _lstm_fwd[double](N, T, H, <double*>cnp.PyArray_DATA(Aa), <double*>cnp.PyArray_DATA(W),
                              <double*>cnp.PyArray_DATA(H0), <double*>cnp.PyArray_DATA(C0),
                              <double*>cnp.PyArray_DATA(HS), <double*>cnp.PyArray_DATA(CS))


cdef void _lstm_bwd(Py_ssize_t N, Py_ssize_t T, Py_ssize_t H, const floating *dhs, const floating *g,
                    const floating *cs, const floating *c0, const floating *wh, floating *dh, floating *dc,
                    floating *da) noexcept nogil:
    cdef Py_ssize_t t, G = 4 * H, ldcp
    cdef const floating *cp
    for t in range(T - 1, -1, -1):
        cp = _step_before(cs, c0, t, T, H, &ldcp)
        if floating is float:
            fb_lstm_bwd_f32(N, H, g + t * G, T * G, cs + t * H, T * H, cp, ldcp, dhs + t * H, T * H, dh, dc,
                            da + t * G, T * G)
        else:
            fb_lstm_bwd_f64(N, H, g + t * G, T * G, cs + t * H, T * H, cp, ldcp, dhs + t * H, T * H, dh, dc,
                            da + t * G, T * G)
        # dh_{t-1} = dA_t @ Wh^T
        _gemm(NoTrans, Trans, N, H, G, <floating>1, da + t * G, T * G, wh, G, <floating>0, dh, H)


def lstm_backward(dhs, gates, cs, c0, Wh, dh, dc, dA):
    """Whole-sequence LSTM backward.  dhs (N, T, H) upstream gradients; gates, cs from lstm_forward; c0 (N, H);
    dh, dc (N, H): in the gradients flowing into the last step (zeros in the book), out dh0 and dc0;
    dA (N, T, 4H) out: gradient of the gate pre-activations."""
    cdef cnp.ndarray D
    cdef int ft
    cdef Py_ssize_t N, T, H
    D, ft, N, T, H = _sequence(dhs, "dhs", 1, False)
    cdef cnp.ndarray Gt = _arr(gates, "gates", ft, (N, T, 4 * H), False)
    cdef cnp.ndarray CS = _arr(cs, "cs", ft, (N, T, H), False), C0 = _arr(c0, "c0", ft, (N, H), False)
    cdef cnp.ndarray W = _arr(Wh, "Wh", ft, (H, 4 * H), False)
    cdef cnp.ndarray DH = _arr(dh, "dh", ft, (N, H), True), DC = _arr(dc, "dc", ft, (N, H), True)
    cdef cnp.ndarray DA = _arr(dA, "dA", ft, (N, T, 4 * H), True)
    _disjoint([DH, DC, DA, D, Gt, CS, C0, W], ["dh", "dc", "dA", "dhs", "gates", "cs", "c0", "Wh"])
    _dims(N, T, 4 * H)
    with nogil:
        if ft == 0:
            _lstm_bwd[float](N, T, H, <float*>cnp.PyArray_DATA(D), <float*>cnp.PyArray_DATA(Gt),
                             <float*>cnp.PyArray_DATA(CS), <float*>cnp.PyArray_DATA(C0),
                             <float*>cnp.PyArray_DATA(W), <float*>cnp.PyArray_DATA(DH), <float*>cnp.PyArray_DATA(DC),
                             <float*>cnp.PyArray_DATA(DA))
        else:
            _lstm_bwd[double](N, T, H, <double*>cnp.PyArray_DATA(D), <double*>cnp.PyArray_DATA(Gt),
                              <double*>cnp.PyArray_DATA(CS), <double*>cnp.PyArray_DATA(C0),
                              <double*>cnp.PyArray_DATA(W), <double*>cnp.PyArray_DATA(DH),
                              <double*>cnp.PyArray_DATA(DC), <double*>cnp.PyArray_DATA(DA))


# ---------------------------------------------------------------------------------------------------------------
# RNN (tanh)
# ---------------------------------------------------------------------------------------------------------------
cdef void _rnn_fwd(Py_ssize_t N, Py_ssize_t T, Py_ssize_t H, floating *a, const floating *wh, const floating *h0,
                   floating *hs) noexcept nogil:
    cdef Py_ssize_t t, ldh
    cdef const floating *hp
    for t in range(T):
        hp = _step_before(hs, h0, t, T, H, &ldh)
        _gemm(NoTrans, NoTrans, N, H, H, <floating>1, hp, ldh, wh, H, <floating>1, a + t * H, T * H)
        if floating is float:
            fb_rnn_fwd_f32(N, H, a + t * H, T * H, hs + t * H, T * H)
        else:
            fb_rnn_fwd_f64(N, H, a + t * H, T * H, hs + t * H, T * H)


def rnn_forward(A, Wh, h0, hs):
    """Whole-sequence RNN forward: A (N, T, H) in xs Wx + b (overwritten with the pre-activations);
    Wh (H, H); h0 (N, H); hs (N, T, H) out: h_t = tanh(A_t + h_{t-1} Wh)."""
    cdef cnp.ndarray Aa
    cdef int ft
    cdef Py_ssize_t N, T, H
    Aa, ft, N, T, H = _sequence(A, "A", 1, True)
    cdef cnp.ndarray W = _arr(Wh, "Wh", ft, (H, H), False), H0 = _arr(h0, "h0", ft, (N, H), False)
    cdef cnp.ndarray HS = _arr(hs, "hs", ft, (N, T, H), True)
    _disjoint([Aa, HS, W, H0], ["A", "hs", "Wh", "h0"])
    _dims(N, T, H)
    with nogil:
        if ft == 0:
            _rnn_fwd[float](N, T, H, <float*>cnp.PyArray_DATA(Aa), <float*>cnp.PyArray_DATA(W),
                            <float*>cnp.PyArray_DATA(H0), <float*>cnp.PyArray_DATA(HS))
        else:
            _rnn_fwd[double](N, T, H, <double*>cnp.PyArray_DATA(Aa), <double*>cnp.PyArray_DATA(W),
                             <double*>cnp.PyArray_DATA(H0), <double*>cnp.PyArray_DATA(HS))


cdef void _rnn_bwd(Py_ssize_t N, Py_ssize_t T, Py_ssize_t H, const floating *dhs, const floating *hs,
                   const floating *wh, floating *dh, floating *da) noexcept nogil:
    cdef Py_ssize_t t
    for t in range(T - 1, -1, -1):
        if floating is float:
            fb_rnn_bwd_f32(N, H, hs + t * H, T * H, dhs + t * H, T * H, dh, da + t * H, T * H)
        else:
            fb_rnn_bwd_f64(N, H, hs + t * H, T * H, dhs + t * H, T * H, dh, da + t * H, T * H)
        _gemm(NoTrans, Trans, N, H, H, <floating>1, da + t * H, T * H, wh, H, <floating>0, dh, H)


def rnn_backward(dhs, hs, Wh, dh, dA):
    """Whole-sequence RNN backward: dA_t = (dhs_t + dh_t) (1 - h_t^2), dh_{t-1} = dA_t Wh^T.
    dh (N, H): in the gradient into the last step, out dh0.  dA (N, T, H) out."""
    cdef cnp.ndarray D
    cdef int ft
    cdef Py_ssize_t N, T, H
    D, ft, N, T, H = _sequence(dhs, "dhs", 1, False)
    cdef cnp.ndarray HS = _arr(hs, "hs", ft, (N, T, H), False), W = _arr(Wh, "Wh", ft, (H, H), False)
    cdef cnp.ndarray DH = _arr(dh, "dh", ft, (N, H), True), DA = _arr(dA, "dA", ft, (N, T, H), True)
    _disjoint([DH, DA, D, HS, W], ["dh", "dA", "dhs", "hs", "Wh"])
    _dims(N, T, H)
    with nogil:
        if ft == 0:
            _rnn_bwd[float](N, T, H, <float*>cnp.PyArray_DATA(D), <float*>cnp.PyArray_DATA(HS),
                            <float*>cnp.PyArray_DATA(W), <float*>cnp.PyArray_DATA(DH), <float*>cnp.PyArray_DATA(DA))
        else:
            _rnn_bwd[double](N, T, H, <double*>cnp.PyArray_DATA(D), <double*>cnp.PyArray_DATA(HS),
                             <double*>cnp.PyArray_DATA(W), <double*>cnp.PyArray_DATA(DH),
                             <double*>cnp.PyArray_DATA(DA))


# ---------------------------------------------------------------------------------------------------------------
# GRU (the book's: no bias, h~ = tanh(x Wxh + (r h) Whh), h = (1 - z) h + z h~)
# ---------------------------------------------------------------------------------------------------------------
cdef void _gru_fwd(Py_ssize_t N, Py_ssize_t T, Py_ssize_t H, floating *a, const floating *wh, const floating *h0,
                   floating *hs, floating *rhs, floating *work) noexcept nogil:
    # work: (N, 2H) for h Wh[:, :2H], then its first N*H entries for (r h) Wh[:, 2H:]
    cdef Py_ssize_t t, G = 3 * H, ldh
    cdef const floating *hp
    for t in range(T):
        hp = _step_before(hs, h0, t, T, H, &ldh)
        _gemm(NoTrans, NoTrans, N, 2 * H, H, <floating>1, hp, ldh, wh, G, <floating>0, work, 2 * H)
        if floating is float:
            fb_gru_fwd1_f32(N, H, a + t * G, T * G, work, hp, ldh, rhs + t * H, T * H)
        else:
            fb_gru_fwd1_f64(N, H, a + t * G, T * G, work, hp, ldh, rhs + t * H, T * H)
        _gemm(NoTrans, NoTrans, N, H, H, <floating>1, rhs + t * H, T * H, wh + 2 * H, G, <floating>0, work, H)
        if floating is float:
            fb_gru_fwd2_f32(N, H, a + t * G, T * G, work, hp, ldh, hs + t * H, T * H)
        else:
            fb_gru_fwd2_f64(N, H, a + t * G, T * G, work, hp, ldh, hs + t * H, T * H)


def gru_forward(A, Wh, h0, hs, rhs, work):
    """Whole-sequence GRU forward.  A (N, T, 3H): in xs Wx, out the gates [z|r|h~]; Wh (H, 3H); h0 (N, H);
    hs (N, T, H) out; rhs (N, T, H) out: r_t h_{t-1} (read by the backward); work (N, 2H) scratch."""
    cdef cnp.ndarray Aa
    cdef int ft
    cdef Py_ssize_t N, T, H
    Aa, ft, N, T, H = _sequence(A, "A", 3, True)
    cdef cnp.ndarray W = _arr(Wh, "Wh", ft, (H, 3 * H), False), H0 = _arr(h0, "h0", ft, (N, H), False)
    cdef cnp.ndarray HS = _arr(hs, "hs", ft, (N, T, H), True), RH = _arr(rhs, "rhs", ft, (N, T, H), True)
    cdef cnp.ndarray WK = _arr(work, "work", ft, (N, 2 * H), True)
    _disjoint([Aa, HS, RH, WK, W, H0], ["A", "hs", "rhs", "work", "Wh", "h0"])
    _dims(N, T, 3 * H)
    with nogil:
        if ft == 0:
            _gru_fwd[float](N, T, H, <float*>cnp.PyArray_DATA(Aa), <float*>cnp.PyArray_DATA(W),
                            <float*>cnp.PyArray_DATA(H0), <float*>cnp.PyArray_DATA(HS),
                            <float*>cnp.PyArray_DATA(RH), <float*>cnp.PyArray_DATA(WK))
        else:
            _gru_fwd[double](N, T, H, <double*>cnp.PyArray_DATA(Aa), <double*>cnp.PyArray_DATA(W),
                             <double*>cnp.PyArray_DATA(H0), <double*>cnp.PyArray_DATA(HS),
                             <double*>cnp.PyArray_DATA(RH), <double*>cnp.PyArray_DATA(WK))


cdef void _gru_bwd(Py_ssize_t N, Py_ssize_t T, Py_ssize_t H, const floating *dhs, const floating *g,
                   const floating *hs, const floating *h0, const floating *wh, floating *dh, floating *da,
                   floating *acc, floating *dhr) noexcept nogil:
    cdef Py_ssize_t t, G = 3 * H, ldhp
    cdef const floating *hp
    for t in range(T - 1, -1, -1):
        hp = _step_before(hs, h0, t, T, H, &ldhp)
        if floating is float:
            fb_gru_bwd1_f32(N, H, g + t * G, T * G, hp, ldhp, dhs + t * H, T * H, dh, acc, da + t * G, T * G)
        else:
            fb_gru_bwd1_f64(N, H, g + t * G, T * G, hp, ldhp, dhs + t * H, T * H, dh, acc, da + t * G, T * G)
        # dhr = da_h @ Whh^T
        _gemm(NoTrans, Trans, N, H, H, <floating>1, da + t * G + 2 * H, T * G, wh + 2 * H, G, <floating>0, dhr, H)
        if floating is float:
            fb_gru_bwd2_f32(N, H, g + t * G, T * G, hp, ldhp, dhr, acc, da + t * G, T * G)
        else:
            fb_gru_bwd2_f64(N, H, g + t * G, T * G, hp, ldhp, dhr, acc, da + t * G, T * G)
        # acc += [da_z | da_r] @ [Whz | Whr]^T ; then dh = acc
        _gemm(NoTrans, Trans, N, H, 2 * H, <floating>1, da + t * G, T * G, wh, G, <floating>1, acc, H)
        _copy(N * H, acc, dh)


cdef inline void _copy(Py_ssize_t n, const floating *src, floating *dst) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


def gru_backward(dhs, gates, hs, h0, Wh, dh, dA, work):
    """Whole-sequence GRU backward (the book's formulas).  dh (N, H): in the gradient into the last step,
    out dh0; dA (N, T, 3H) out: gradients of the pre-activations [z|r|h~]; work (N, 2H) scratch."""
    cdef cnp.ndarray D
    cdef int ft
    cdef Py_ssize_t N, T, H
    D, ft, N, T, H = _sequence(dhs, "dhs", 1, False)
    cdef cnp.ndarray Gt = _arr(gates, "gates", ft, (N, T, 3 * H), False)
    cdef cnp.ndarray HS = _arr(hs, "hs", ft, (N, T, H), False), H0 = _arr(h0, "h0", ft, (N, H), False)
    cdef cnp.ndarray W = _arr(Wh, "Wh", ft, (H, 3 * H), False)
    cdef cnp.ndarray DH = _arr(dh, "dh", ft, (N, H), True), DA = _arr(dA, "dA", ft, (N, T, 3 * H), True)
    cdef cnp.ndarray WK = _arr(work, "work", ft, (N, 2 * H), True)
    _disjoint([DH, DA, WK, D, Gt, HS, H0, W], ["dh", "dA", "work", "dhs", "gates", "hs", "h0", "Wh"])
    _dims(N, T, 3 * H)
    with nogil:
        if ft == 0:
            _gru_bwd[float](N, T, H, <float*>cnp.PyArray_DATA(D), <float*>cnp.PyArray_DATA(Gt),
                            <float*>cnp.PyArray_DATA(HS), <float*>cnp.PyArray_DATA(H0),
                            <float*>cnp.PyArray_DATA(W), <float*>cnp.PyArray_DATA(DH), <float*>cnp.PyArray_DATA(DA),
                            <float*>cnp.PyArray_DATA(WK),
                            <float*>cnp.PyArray_DATA(WK) + N * H)
        else:
            _gru_bwd[double](N, T, H, <double*>cnp.PyArray_DATA(D), <double*>cnp.PyArray_DATA(Gt),
                             <double*>cnp.PyArray_DATA(HS), <double*>cnp.PyArray_DATA(H0),
                             <double*>cnp.PyArray_DATA(W), <double*>cnp.PyArray_DATA(DH), <double*>cnp.PyArray_DATA(DA),
                             <double*>cnp.PyArray_DATA(WK),
                             <double*>cnp.PyArray_DATA(WK) + N * H)


def _install_leaf_gemm():
    import ctypes
    lib = _blas_py.ensure_loaded()["lib"]
    _set_leaf_gemm(*[ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for name in ("scipy_cblas_sgemm", "scipy_cblas_dgemm")])


_install_leaf_gemm()
