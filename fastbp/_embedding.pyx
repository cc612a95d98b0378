# Design
# ------
# Book 2's Embedding: a gather (out[i] = W[idx[i]]) and, for the backward, a scatter-add into a zeroed gradient
# (dW[...] = 0; dW[idx[i]] += dout[i] -- the book's np.add.at).  The scatter is deterministic and parallel:
#
#   1. a stable counting sort of the n indices by destination row (counts over the V rows, prefix sums, then
#      the positions in index order) -- O(n + V), serial, small;
#   2. the V destination rows are cut into blocks that go to the OpenMP threads; each thread writes whole rows
#      of dW: zero for a row no index hits, else the sum of its source rows IN INDEX ORDER (accumulated in double
#      for float32, then rounded once).
#
# No atomics, no per-thread partial matrices: each row is written by exactly one thread with the same sum order
# whatever the thread count, so the result is bitwise independent of FASTBP_NUM_THREADS.  The zeroing is part
# of the same pass (dW is written once).  An optional per-row scale (dW[idx[i]] += s[i] * src[i]) serves
# EmbeddingDot's backward without materialising s * h.
#
# Indices: int32 or int64 (book 2 uses int32), any shape, validated 0 <= idx < V before any kernel runs.
cimport cython
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport int64_t, int32_t
cimport numpy as cnp
import numpy as np
import os as _os

cnp.import_array()

ctypedef fused floating:
    float
    double

ctypedef fused index_t:
    int32_t
    int64_t

cdef extern from *:
    """
    #if FASTBP_OPENMP
    #include <omp.h>
    static int fb_emb_omp_threads(void) { return omp_get_max_threads(); }
    #else
    static int fb_emb_omp_threads(void) { return 1; }
    #endif
    """
    int fb_emb_omp_threads() noexcept nogil

# GNU OpenMP cannot start a team in a child forked from a process whose team ran: run serially there.
cdef int _omp_ok = 1
cdef int _nthreads_override = 0
cdef Py_ssize_t PARALLEL_MIN = 1 << 16      # elements written below which one thread does the whole pass
cdef Py_ssize_t MAX_THREADS = 256


def _after_fork_in_child():
    global _omp_ok
    _omp_ok = 0


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)


cdef int _num_threads() noexcept nogil:
    """fastbp's thread count: FASTBP_NUM_THREADS if set (installed by _set_num_threads), else OpenMP's."""
    if not _omp_ok:
        return 1
    if _nthreads_override > 0:
        return _nthreads_override
    return fb_emb_omp_threads()


def _set_num_threads(int n):
    """Set the thread count the kernels use (0: OpenMP's default)."""
    global _nthreads_override
    if n < 0:
        raise ValueError(f"thread count must be >= 0, got {n}")
    _nthreads_override = n if n <= MAX_THREADS else MAX_THREADS


_env = _os.environ.get("FASTBP_NUM_THREADS", "").strip()
if _env.isdigit() and int(_env) > 0:
    _set_num_threads(int(_env))


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
cdef int _ftype(object a, str name) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray A = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(A)
    if cnp.PyArray_ISNOTSWAPPED(A):
        if t == cnp.NPY_FLOAT32:
            return 0
        if t == cnp.NPY_FLOAT64:
            return 1
    raise TypeError(f"{name} must be native float32 or float64, got {A.dtype}")


cdef int _itype(object a, str name) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray A = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(A)
    if not cnp.PyArray_IS_C_CONTIGUOUS(A):
        raise ValueError(f"{name} must be C-contiguous")
    if cnp.PyArray_ISNOTSWAPPED(A):
        if t == cnp.NPY_INT32:
            return 0
        if t == cnp.NPY_INT64:
            return 1
    raise TypeError(f"{name} must be native int32 or int64 indices, got {A.dtype}")


cdef _check_2d(cnp.ndarray a, str name, Py_ssize_t r, Py_ssize_t c, bint out):
    if cnp.PyArray_NDIM(a) != 2 or a.shape[0] != r or a.shape[1] != c:
        raise ValueError(f"{name} must have shape ({r}, {c}), got {(<object>a).shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous")
    if out and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} must be writable")


cdef bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef char *la = <char*>cnp.PyArray_DATA(a)
    cdef char *lb = <char*>cnp.PyArray_DATA(b)
    cdef char *ha = la + cnp.PyArray_NBYTES(a)
    cdef char *hb = lb + cnp.PyArray_NBYTES(b)
    return la < hb and lb < ha and la != ha and lb != hb


cdef Py_ssize_t _first_bad(const index_t *idx, Py_ssize_t n, Py_ssize_t V) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if idx[i] < 0 or idx[i] >= V:
            return i
    return -1


cdef _check_indices(cnp.ndarray I, int it, Py_ssize_t V):
    cdef Py_ssize_t n = cnp.PyArray_SIZE(I), bad
    with nogil:
        if it == 0:
            bad = _first_bad[int32_t](<int32_t*>cnp.PyArray_DATA(I), n, V)
        else:
            bad = _first_bad[int64_t](<int64_t*>cnp.PyArray_DATA(I), n, V)
    if bad >= 0:
        raise IndexError(f"index {I.reshape(-1)[bad]} at flat position {bad} is out of range for {V} rows "
                         f"(valid: 0 .. {V - 1})")


# ---------------------------------------------------------------------------------------------------------------
# Gather
# ---------------------------------------------------------------------------------------------------------------
cdef void _gather(const floating *w, Py_ssize_t D, const index_t *idx, Py_ssize_t n, floating *out) noexcept nogil:
    cdef Py_ssize_t i, k, lo, hi, chunk
    cdef int nt = 1
    if n * D >= PARALLEL_MIN:
        nt = _num_threads()
    if nt > n:
        nt = <int>n
    if nt <= 1:
        for i in range(n):
            memcpy(out + i * D, w + idx[i] * D, D * sizeof(floating))
        return
    chunk = (n + nt - 1) // nt
    for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
        lo = k * chunk
        hi = lo + chunk if lo + chunk < n else n
        for i in range(lo, hi):
            memcpy(out + i * D, w + idx[i] * D, D * sizeof(floating))


def gather(W, idx, out):
    """out[i] = W[idx.flat[i]] for W (V, D) (rows C-contiguous), idx int32/int64 any shape, out (idx.size, D)."""
    cdef int ft = _ftype(W, "W"), it = _itype(idx, "idx")
    cdef cnp.ndarray Wa = <cnp.ndarray>W, I = <cnp.ndarray>idx, O
    if cnp.PyArray_NDIM(Wa) != 2:
        raise ValueError(f"W must be 2-D (V, D), got shape {(<object>Wa).shape}")
    cdef Py_ssize_t V = Wa.shape[0], D = Wa.shape[1], n = cnp.PyArray_SIZE(I)
    _check_2d(Wa, "W", V, D, False)
    if _ftype(out, "out") != ft:
        raise TypeError(f"out must have W's dtype {Wa.dtype}, got {out.dtype}")
    O = <cnp.ndarray>out
    _check_2d(O, "out", n, D, True)
    if _overlap(O, Wa) or _overlap(O, I):
        raise ValueError("out overlaps W or idx")
    _check_indices(I, it, V)
    with nogil:
        if ft == 0:
            if it == 0:
                _gather[float, int32_t](<float*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(I), n,
                                        <float*>cnp.PyArray_DATA(O))
            else:
                _gather[float, int64_t](<float*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(I), n,
                                        <float*>cnp.PyArray_DATA(O))
        else:
            if it == 0:
                _gather[double, int32_t](<double*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(I), n,
                                         <double*>cnp.PyArray_DATA(O))
            else:
                _gather[double, int64_t](<double*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(I), n,
                                         <double*>cnp.PyArray_DATA(O))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Deterministic scatter-add
# ---------------------------------------------------------------------------------------------------------------
cdef inline void _rows(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t D, const floating *src, const floating *scale,
                       const int64_t *start, const int64_t *order, floating *dw, double *acc) noexcept nogil:
    """dW rows lo..hi-1: zero, or the in-order sum of the source rows sorted into them."""
    cdef Py_ssize_t r, p, j, i
    cdef double s
    cdef const floating *row
    cdef floating *dst
    for r in range(lo, hi):
        dst = dw + r * D
        if start[r] == start[r + 1]:
            memset(dst, 0, D * sizeof(floating))
            continue
        if floating is double:
            if start[r + 1] - start[r] == 1 and scale == NULL:
                memcpy(dst, src + order[start[r]] * D, D * sizeof(double))
                continue
        for j in range(D):
            acc[j] = 0.0
        for p in range(start[r], start[r + 1]):
            i = order[p]
            row = src + i * D
            if scale == NULL:
                for j in range(D):
                    acc[j] += row[j]
            else:
                s = scale[i]
                for j in range(D):
                    acc[j] += s * row[j]
        for j in range(D):
            dst[j] = <floating>acc[j]


cdef int _scatter(const floating *src, const floating *scale, Py_ssize_t n, Py_ssize_t D, const index_t *idx,
                  Py_ssize_t V, floating *dw) noexcept nogil:
    """dW = 0; dW[idx[i]] += (scale[i] *) src[i] in index order.  Returns -1 when out of memory."""
    cdef int64_t *start = <int64_t*>malloc((V + 1) * sizeof(int64_t))
    cdef int64_t *order = <int64_t*>malloc((n if n > 0 else 1) * sizeof(int64_t))
    cdef int64_t *fill = <int64_t*>malloc((V if V > 0 else 1) * sizeof(int64_t))
    cdef double *acc = NULL
    cdef Py_ssize_t i, r, k, lo, hi, chunk
    cdef int nt = 1, rc = 0
    if start == NULL or order == NULL or fill == NULL:
        rc = -1
    else:
        # stable counting sort of positions by destination row
        memset(start, 0, (V + 1) * sizeof(int64_t))
        for i in range(n):
            start[idx[i] + 1] += 1
        for r in range(V):
            start[r + 1] += start[r]
        memcpy(fill, start, V * sizeof(int64_t))
        for i in range(n):
            order[fill[idx[i]]] = i
            fill[idx[i]] += 1
        if V * D + n * D >= PARALLEL_MIN:
            nt = _num_threads()
        if nt > V:
            nt = <int>V
        if nt < 1:
            nt = 1
        acc = <double*>malloc(nt * (D if D > 0 else 1) * sizeof(double))
        if acc == NULL:
            rc = -1
        elif nt == 1:
            _rows(0, V, D, src, scale, start, order, dw, acc)
        else:
            chunk = (V + nt - 1) // nt
            for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
                lo = k * chunk
                hi = lo + chunk if lo + chunk < V else V
                if lo < hi:
                    _rows(lo, hi, D, src, scale, start, order, dw, acc + k * D)
    free(start)
    free(order)
    free(fill)
    free(acc)
    return rc


def scatter_add(src, idx, dW, scale=None):
    """dW[...] = 0, then dW[idx.flat[i]] += src[i] (times scale.flat[i] when given) for i in index order.

    src (n, D), idx int32/int64 with n entries, dW (V, D) C-contiguous and writable, scale (n,) or None; one
    float dtype.  Duplicate indices are summed in index order (in double for float32), so the result does not
    depend on the thread count.  Returns dW."""
    cdef int ft = _ftype(dW, "dW"), it = _itype(idx, "idx")
    cdef cnp.ndarray DW = <cnp.ndarray>dW, I = <cnp.ndarray>idx, S, SC = None
    if cnp.PyArray_NDIM(DW) != 2:
        raise ValueError(f"dW must be 2-D (V, D), got shape {(<object>DW).shape}")
    cdef Py_ssize_t V = DW.shape[0], D = DW.shape[1], n = cnp.PyArray_SIZE(I)
    _check_2d(DW, "dW", V, D, True)
    if _ftype(src, "src") != ft:
        raise TypeError(f"src must have dW's dtype {DW.dtype}, got {src.dtype}")
    S = <cnp.ndarray>src
    _check_2d(S, "src", n, D, False)
    if scale is not None:
        if _ftype(scale, "scale") != ft:
            raise TypeError(f"scale must have dW's dtype {DW.dtype}, got {scale.dtype}")
        SC = <cnp.ndarray>scale
        if cnp.PyArray_SIZE(SC) != n or not cnp.PyArray_IS_C_CONTIGUOUS(SC):
            raise ValueError(f"scale must be C-contiguous with {n} entries, got shape {(<object>SC).shape}")
        if _overlap(DW, SC):
            raise ValueError("dW overlaps scale")
    if _overlap(DW, S) or _overlap(DW, I):
        raise ValueError("dW overlaps src or idx")
    _check_indices(I, it, V)
    cdef int rc
    cdef void *sp = NULL if SC is None else cnp.PyArray_DATA(SC)
    with nogil:
        if ft == 0:
            if it == 0:
                rc = _scatter[float, int32_t](<float*>cnp.PyArray_DATA(S), <float*>sp, n, D,
                                              <int32_t*>cnp.PyArray_DATA(I), V, <float*>cnp.PyArray_DATA(DW))
            else:
                rc = _scatter[float, int64_t](<float*>cnp.PyArray_DATA(S), <float*>sp, n, D,
                                              <int64_t*>cnp.PyArray_DATA(I), V, <float*>cnp.PyArray_DATA(DW))
        else:
            if it == 0:
                rc = _scatter[double, int32_t](<double*>cnp.PyArray_DATA(S), <double*>sp, n, D,
                                               <int32_t*>cnp.PyArray_DATA(I), V, <double*>cnp.PyArray_DATA(DW))
            else:
                rc = _scatter[double, int64_t](<double*>cnp.PyArray_DATA(S), <double*>sp, n, D,
                                               <int64_t*>cnp.PyArray_DATA(I), V, <double*>cnp.PyArray_DATA(DW))
    if rc != 0:
        raise MemoryError()
    return dW


# ---------------------------------------------------------------------------------------------------------------
# Row dot products (EmbeddingDot)
# ---------------------------------------------------------------------------------------------------------------
cdef void _rowdot(const floating *w, Py_ssize_t D, const index_t *idx, Py_ssize_t n, Py_ssize_t k,
                  const floating *h, floating *out) noexcept nogil:
    """out[i, j] = W[idx[i, j]] . h[i] for idx (n, k), h (n, D): accumulated in double."""
    cdef Py_ssize_t i, j, d
    cdef double s
    cdef const floating *wr
    cdef const floating *hr
    for i in range(n):
        hr = h + i * D
        for j in range(k):
            wr = w + idx[i * k + j] * D
            s = 0.0
            for d in range(D):
                s += <double>wr[d] * hr[d]
            out[i * k + j] = <floating>s


cdef void _rowdot_back(const floating *w, Py_ssize_t D, const index_t *idx, Py_ssize_t n, Py_ssize_t k,
                       const floating *ds, floating *dh) noexcept nogil:
    """dh[i] = sum_j ds[i, j] W[idx[i, j]] (in j order, accumulated in double)."""
    cdef Py_ssize_t i, j, d
    cdef double s
    cdef const floating *wr
    cdef double acc[512]
    cdef Py_ssize_t d0, d1
    for i in range(n):
        d0 = 0
        while d0 < D:
            d1 = d0 + 512 if d0 + 512 < D else D
            for d in range(d0, d1):
                acc[d - d0] = 0.0
            for j in range(k):
                s = ds[i * k + j]
                wr = w + idx[i * k + j] * D
                for d in range(d0, d1):
                    acc[d - d0] += s * wr[d]
            for d in range(d0, d1):
                dh[i * D + d] = <floating>acc[d - d0]
            d0 = d1


def rowdot(W, idx, h, out):
    """out[i, j] = W[idx[i, j]] . h[i]: W (V, D), idx (n, k) int32/int64, h (n, D), out (n, k); returns out."""
    cdef int ft = _ftype(W, "W"), it = _itype(idx, "idx")
    cdef cnp.ndarray Wa = <cnp.ndarray>W, I = <cnp.ndarray>idx, Hh, O
    if cnp.PyArray_NDIM(Wa) != 2 or cnp.PyArray_NDIM(I) != 2:
        raise ValueError(f"W must be (V, D) and idx (n, k), got {(<object>Wa).shape} and {(<object>I).shape}")
    cdef Py_ssize_t V = Wa.shape[0], D = Wa.shape[1], n = I.shape[0], k = I.shape[1]
    _check_2d(Wa, "W", V, D, False)
    if _ftype(h, "h") != ft or _ftype(out, "out") != ft:
        raise TypeError("W, h and out must share one float dtype")
    Hh = <cnp.ndarray>h
    O = <cnp.ndarray>out
    _check_2d(Hh, "h", n, D, False)
    _check_2d(O, "out", n, k, True)
    if _overlap(O, Wa) or _overlap(O, Hh) or _overlap(O, I):
        raise ValueError("out overlaps an input")
    _check_indices(I, it, V)
    with nogil:
        if ft == 0:
            if it == 0:
                _rowdot[float, int32_t](<float*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(I), n, k,
                                        <float*>cnp.PyArray_DATA(Hh), <float*>cnp.PyArray_DATA(O))
            else:
                _rowdot[float, int64_t](<float*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(I), n, k,
                                        <float*>cnp.PyArray_DATA(Hh), <float*>cnp.PyArray_DATA(O))
        else:
            if it == 0:
                _rowdot[double, int32_t](<double*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(I), n, k,
                                         <double*>cnp.PyArray_DATA(Hh), <double*>cnp.PyArray_DATA(O))
            else:
                _rowdot[double, int64_t](<double*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(I), n, k,
                                         <double*>cnp.PyArray_DATA(Hh), <double*>cnp.PyArray_DATA(O))
    return out


def rowdot_backward(W, idx, dscore, dh):
    """dh[i] = sum_j dscore[i, j] W[idx[i, j]]: W (V, D), idx (n, k), dscore (n, k), dh (n, D); returns dh."""
    cdef int ft = _ftype(W, "W"), it = _itype(idx, "idx")
    cdef cnp.ndarray Wa = <cnp.ndarray>W, I = <cnp.ndarray>idx, DS, DH
    if cnp.PyArray_NDIM(Wa) != 2 or cnp.PyArray_NDIM(I) != 2:
        raise ValueError(f"W must be (V, D) and idx (n, k), got {(<object>Wa).shape} and {(<object>I).shape}")
    cdef Py_ssize_t V = Wa.shape[0], D = Wa.shape[1], n = I.shape[0], k = I.shape[1]
    _check_2d(Wa, "W", V, D, False)
    if _ftype(dscore, "dscore") != ft or _ftype(dh, "dh") != ft:
        raise TypeError("W, dscore and dh must share one float dtype")
    DS = <cnp.ndarray>dscore
    DH = <cnp.ndarray>dh
    _check_2d(DS, "dscore", n, k, False)
    _check_2d(DH, "dh", n, D, True)
    if _overlap(DH, Wa) or _overlap(DH, DS) or _overlap(DH, I):
        raise ValueError("dh overlaps an input")
    _check_indices(I, it, V)
    with nogil:
        if ft == 0:
            if it == 0:
                _rowdot_back[float, int32_t](<float*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(I), n, k,
                                             <float*>cnp.PyArray_DATA(DS), <float*>cnp.PyArray_DATA(DH))
            else:
                _rowdot_back[float, int64_t](<float*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(I), n, k,
                                             <float*>cnp.PyArray_DATA(DS), <float*>cnp.PyArray_DATA(DH))
        else:
            if it == 0:
                _rowdot_back[double, int32_t](<double*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(I), n,
                                              k, <double*>cnp.PyArray_DATA(DS), <double*>cnp.PyArray_DATA(DH))
            else:
                _rowdot_back[double, int64_t](<double*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(I), n,
                                              k, <double*>cnp.PyArray_DATA(DS), <double*>cnp.PyArray_DATA(DH))
    return dh


# ---------------------------------------------------------------------------------------------------------------
# Sum of squares (book 2's clip_grads): fixed blocks, partials in double added in block order
# ---------------------------------------------------------------------------------------------------------------
cdef Py_ssize_t SQ_BLOCK = 1 << 15


cdef double _block_sq(const floating *a, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = lo
    while i + 4 <= hi:
        s0 += <double>a[i] * a[i]
        s1 += <double>a[i + 1] * a[i + 1]
        s2 += <double>a[i + 2] * a[i + 2]
        s3 += <double>a[i + 3] * a[i + 3]
        i += 4
    while i < hi:
        s0 += <double>a[i] * a[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef double _sum_sq(const floating *a, Py_ssize_t n, double *partials) noexcept nogil:
    cdef Py_ssize_t nb = (n + SQ_BLOCK - 1) // SQ_BLOCK, j
    cdef int nt = 1
    cdef double s = 0
    if nb > 1:
        nt = _num_threads()
    if nt > 1:
        for j in prange(nb, nogil=True, schedule="static", num_threads=nt):
            partials[j] = _block_sq(a, j * SQ_BLOCK, (j + 1) * SQ_BLOCK if (j + 1) * SQ_BLOCK < n else n)
    else:
        for j in range(nb):
            partials[j] = _block_sq(a, j * SQ_BLOCK, (j + 1) * SQ_BLOCK if (j + 1) * SQ_BLOCK < n else n)
    for j in range(nb):
        s += partials[j]
    return s


def sum_squares(a):
    """sum(a**2) over a C- or F-contiguous float32/float64 array, accumulated in double in fixed blocks added in
    order (the same bits for any thread count)."""
    cdef int ft = _ftype(a, "a")
    cdef cnp.ndarray A = <cnp.ndarray>a
    if not (cnp.PyArray_IS_C_CONTIGUOUS(A) or cnp.PyArray_IS_F_CONTIGUOUS(A)):
        raise ValueError("a must be contiguous")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(A)
    cdef Py_ssize_t nb = (n + SQ_BLOCK - 1) // SQ_BLOCK
    cdef double *partials = <double*>malloc((nb if nb > 0 else 1) * sizeof(double))
    cdef double s
    if partials == NULL:
        raise MemoryError()
    with nogil:
        if ft == 0:
            s = _sum_sq[float](<float*>cnp.PyArray_DATA(A), n, partials)
        else:
            s = _sum_sq[double](<double*>cnp.PyArray_DATA(A), n, partials)
    free(partials)
    return s
