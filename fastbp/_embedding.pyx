# Design
# ------
# Book 2's Embedding: a gather (out[i] = W[idx[i]]) and, for the backward, a scatter-add into a zeroed gradient
# (dW[...] = 0; dW[idx[i]] += dout[i] -- the book's np.add.at).  The scatter is deterministic and parallel:
#
#   1. per destination row, the list of its source positions in index order (head[V], next[n], built back to
#      front) -- O(n) plus one memset of V entries, serial, small;
#   2. the V destination rows are cut into fixed blocks of ROW_BLOCK rows that _threads.parallel_blocks spreads
#      over fastbp's threads; each block writes whole rows of dW: zero for a row no index hits, else the sum of
#      its source rows IN INDEX ORDER (accumulated in double for float32, then rounded once).
#
# No atomics, no per-thread partial matrices: each row is written by exactly one thread with the same sum order
# whatever the thread count, so the result is bitwise independent of FASTBP_NUM_THREADS.  The zeroing is part
# of the same pass (dW is written once).  An optional per-row scale (dW[idx[i]] += s[i] * src[i]) serves
# EmbeddingDot's backward without materialising s * h.
#
# Indices: int32 or int64 (book 2 uses int32), any shape, validated 0 <= idx < V before any kernel runs.
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport int64_t, int32_t
cimport numpy as cnp
from fastbp._validate cimport ftype as _ftype
from fastbp._typedefs cimport floating
from fastbp._threads cimport parallel_blocks, even_block

cnp.import_array()

include "_simd_query.pxi"

cdef extern from "_embedding.h" nogil:
    void fb_zero_f32(float *p, long n) noexcept
    void fb_zero_f64(double *p, long n) noexcept


cdef inline void _zero(floating *p, Py_ssize_t n) noexcept nogil:
    if floating is float:
        fb_zero_f32(p, n)
    else:
        fb_zero_f64(p, n)


ctypedef fused index_t:
    int32_t
    int64_t

# Elements written below which one block does the whole pass.  Both passes are memory-bound: measured on the
# 2-core EPYC, the 10000 x 100 float32 scatter of 700 rows takes 104 us on one thread and 96 us on two (and far
# more when the machine is loaded and a woken thread waits for a core), so only large passes are split.
cdef Py_ssize_t PARALLEL_MIN = 1 << 22
cdef Py_ssize_t ROW_BLOCK = 256             # destination rows per block of the scatter (fixed: any thread count)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
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


cdef tuple _table(object W, str name, object idx, bint out):
    """(ft, it, V, D, n) of a (V, D) table `W` (C-contiguous; writable when out) and the n indices `idx` into it:
    the float and index types and sizes the other operands are checked against."""
    cdef int ft = _ftype(W, name), it = _itype(idx, "idx")
    cdef cnp.ndarray Wa = <cnp.ndarray>W
    if cnp.PyArray_NDIM(Wa) != 2:
        raise ValueError(f"{name} must be 2-D (V, D), got shape {(<object>Wa).shape}")
    _check_2d(Wa, name, Wa.shape[0], Wa.shape[1], out)
    return ft, it, Wa.shape[0], Wa.shape[1], cnp.PyArray_SIZE(<cnp.ndarray>idx)


cdef cnp.ndarray _like(object a, str name, int ft, object W, str W_name):
    """a as an ndarray of the table's float type ft (TypeError naming both dtypes otherwise)."""
    if _ftype(a, name) != ft:
        raise TypeError(f"{name} must have {W_name}'s dtype {W.dtype}, got {a.dtype}")
    return <cnp.ndarray>a


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
ctypedef struct _gather_ctx:
    const void *w
    const void *idx
    void *out
    Py_ssize_t row_bytes
    bint i64


cdef void _gather_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _gather_ctx *g = <_gather_ctx*>ctx
    cdef Py_ssize_t i, r
    for i in range(lo, hi):
        r = (<const int64_t*>g.idx)[i] if g.i64 else (<const int32_t*>g.idx)[i]
        memcpy(<char*>g.out + i * g.row_bytes, <const char*>g.w + r * g.row_bytes, g.row_bytes)


cdef void _gather(const void *w, Py_ssize_t row_bytes, const void *idx, bint i64, Py_ssize_t n,
                  void *out) noexcept nogil:
    """out[i] = W[idx[i]] (rows of row_bytes bytes); blocks of rows over the threads (elementwise: no order)."""
    cdef _gather_ctx g
    g.w = w
    g.idx = idx
    g.out = out
    g.row_bytes = row_bytes
    g.i64 = i64
    parallel_blocks(n, even_block(n, PARALLEL_MIN // (row_bytes // 4 + 1) + 1), _gather_block, &g)


def gather(W, idx, out):
    """out[i] = W[idx.flat[i]] for W (V, D) (rows C-contiguous), idx int32/int64 any shape, out (idx.size, D)."""
    cdef int ft, it
    cdef Py_ssize_t V, D, n
    ft, it, V, D, n = _table(W, "W", idx, False)
    cdef cnp.ndarray Wa = <cnp.ndarray>W, Idx = <cnp.ndarray>idx, Out = _like(out, "out", ft, W, "W")
    _check_2d(Out, "out", n, D, True)
    if _overlap(Out, Wa) or _overlap(Out, Idx):
        raise ValueError("out overlaps W or idx")
    _check_indices(Idx, it, V)
    with nogil:
        _gather(cnp.PyArray_DATA(Wa), D * cnp.PyArray_ITEMSIZE(Wa), cnp.PyArray_DATA(Idx), it == 1, n,
                cnp.PyArray_DATA(Out))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Deterministic scatter-add
# ---------------------------------------------------------------------------------------------------------------
cdef inline void _rows(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t D, const floating *src, const floating *scale,
                       const int64_t *head, const int64_t *nxt, floating *dw, double *acc) noexcept nogil:
    """dW rows lo..hi-1: zero (runs of empty rows in one pass), or the in-order sum of the source rows listed
    for them (head[r] -> nxt[...] -> ... -> -1, in index order)."""
    cdef Py_ssize_t r = lo, r0, j
    cdef int64_t i
    cdef double s
    cdef const floating *row
    cdef floating *dst
    while r < hi:
        if head[r] < 0:
            r0 = r
            while r < hi and head[r] < 0:
                r += 1
            _zero(dw + r0 * D, (r - r0) * D)
            continue
        dst = dw + r * D
        i = head[r]
        if nxt[i] < 0 and scale == NULL:
            memcpy(dst, src + i * D, D * sizeof(floating))
            r += 1
            continue
        for j in range(D):
            acc[j] = 0.0
        while i >= 0:
            row = src + i * D
            if scale == NULL:
                for j in range(D):
                    acc[j] += row[j]
            else:
                s = scale[i]
                for j in range(D):
                    acc[j] += s * row[j]
            i = nxt[i]
        for j in range(D):
            dst[j] = <floating>acc[j]
        r += 1


ctypedef struct _scatter_ctx:
    const void *src
    const void *scale
    const int64_t *head
    const int64_t *nxt
    void *dw
    Py_ssize_t D
    int failed


cdef inline void _scatter_block(const floating *like, _scatter_ctx *g, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """One block of the scatter with its own double accumulator row (`like` only picks the float type)."""
    cdef double *acc = <double*>malloc((g.D if g.D > 0 else 1) * sizeof(double))
    if acc == NULL:
        g.failed = 1
        return
    _rows(lo, hi, g.D, <const floating*>g.src, <const floating*>g.scale, g.head, g.nxt, <floating*>g.dw, acc)
    free(acc)


# parallel_blocks takes one plain C callback per float type: these two name the type and do nothing else
cdef void _scatter_block_f(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    _scatter_block(<const float*>NULL, <_scatter_ctx*>ctx, lo, hi)


cdef void _scatter_block_d(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    _scatter_block(<const double*>NULL, <_scatter_ctx*>ctx, lo, hi)


cdef int _scatter(const floating *src, const floating *scale, Py_ssize_t n, Py_ssize_t D, const index_t *idx,
                  Py_ssize_t V, floating *dw) noexcept nogil:
    """dW = 0; dW[idx[i]] += (scale[i] *) src[i] in index order.  Returns -1 when out of memory."""
    cdef int64_t *head = <int64_t*>malloc((V if V > 0 else 1) * sizeof(int64_t))
    cdef int64_t *nxt = <int64_t*>malloc((n if n > 0 else 1) * sizeof(int64_t))
    cdef Py_ssize_t i, block
    cdef int rc = 0
    cdef _scatter_ctx g
    if head == NULL or nxt == NULL:
        rc = -1
    else:
        # per destination row, the list of its source positions in index order (built back to front)
        memset(head, 0xFF, V * sizeof(int64_t))          # all -1
        for i in range(n - 1, -1, -1):
            nxt[i] = head[idx[i]]
            head[idx[i]] = i
        g.src = src
        g.scale = scale
        g.head = head
        g.nxt = nxt
        g.dw = dw
        g.D = D
        g.failed = 0
        # a fixed block of rows (any thread count); the whole pass in one block when it is small
        block = ROW_BLOCK if (V + n) * D >= PARALLEL_MIN else V
        if floating is float:
            parallel_blocks(V, block, _scatter_block_f, &g)
        else:
            parallel_blocks(V, block, _scatter_block_d, &g)
        if g.failed:
            rc = -1
    free(head)
    free(nxt)
    return rc


def scatter_add(src, idx, dW, scale=None):
    """dW[...] = 0, then dW[idx.flat[i]] += src[i] (times scale.flat[i] when given) for i in index order.

    src (n, D), idx int32/int64 with n entries, dW (V, D) C-contiguous and writable, scale (n,) or None; one
    float dtype.  Duplicate indices are summed in index order (in double for float32), so the result does not
    depend on the thread count.  Returns dW."""
    cdef int ft, it
    cdef Py_ssize_t V, D, n
    ft, it, V, D, n = _table(dW, "dW", idx, True)
    cdef cnp.ndarray DW = <cnp.ndarray>dW, Idx = <cnp.ndarray>idx, S = _like(src, "src", ft, dW, "dW"), SC = None
    _check_2d(S, "src", n, D, False)
    if scale is not None:
        SC = _like(scale, "scale", ft, dW, "dW")
        if cnp.PyArray_SIZE(SC) != n or not cnp.PyArray_IS_C_CONTIGUOUS(SC):
            raise ValueError(f"scale must be C-contiguous with {n} entries, got shape {(<object>SC).shape}")
        if _overlap(DW, SC):
            raise ValueError("dW overlaps scale")
    if _overlap(DW, S) or _overlap(DW, Idx):
        raise ValueError("dW overlaps src or idx")
    _check_indices(Idx, it, V)
    cdef int rc
    cdef void *sp = NULL if SC is None else cnp.PyArray_DATA(SC)
    with nogil:
        if ft == 0:
            if it == 0:
                rc = _scatter[float, int32_t](<float*>cnp.PyArray_DATA(S), <float*>sp, n, D,
                                              <int32_t*>cnp.PyArray_DATA(Idx), V, <float*>cnp.PyArray_DATA(DW))
            else:
                rc = _scatter[float, int64_t](<float*>cnp.PyArray_DATA(S), <float*>sp, n, D,
                                              <int64_t*>cnp.PyArray_DATA(Idx), V, <float*>cnp.PyArray_DATA(DW))
        else:
            if it == 0:
                rc = _scatter[double, int32_t](<double*>cnp.PyArray_DATA(S), <double*>sp, n, D,
                                               <int32_t*>cnp.PyArray_DATA(Idx), V, <double*>cnp.PyArray_DATA(DW))
            else:
                rc = _scatter[double, int64_t](<double*>cnp.PyArray_DATA(S), <double*>sp, n, D,
                                               <int64_t*>cnp.PyArray_DATA(Idx), V, <double*>cnp.PyArray_DATA(DW))
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


cdef void _rowdot_pass(bint back, const floating *w, Py_ssize_t D, const index_t *idx, Py_ssize_t n,
                       Py_ssize_t k, const floating *a, floating *o) noexcept nogil:
    if back:
        _rowdot_back(w, D, idx, n, k, a, o)
    else:
        _rowdot(w, D, idx, n, k, a, o)


cdef _rowdot_call(bint back, object W, object idx, object a, str a_name, object out, str out_name):
    """Validate and run rowdot (back=False: a = h (n, D), out (n, k)) or rowdot_backward (back=True:
    a = dscore (n, k), out = dh (n, D)); W (V, D), idx (n, k) int32/int64; one float dtype."""
    cdef int ft = _ftype(W, "W"), it = _itype(idx, "idx")
    cdef cnp.ndarray Wa = <cnp.ndarray>W, Idx = <cnp.ndarray>idx, A, Out
    if cnp.PyArray_NDIM(Wa) != 2 or cnp.PyArray_NDIM(Idx) != 2:
        raise ValueError(f"W must be (V, D) and idx (n, k), got {(<object>Wa).shape} and {(<object>Idx).shape}")
    cdef Py_ssize_t V = Wa.shape[0], D = Wa.shape[1], n = Idx.shape[0], k = Idx.shape[1]
    _check_2d(Wa, "W", V, D, False)
    if _ftype(a, a_name) != ft or _ftype(out, out_name) != ft:
        raise TypeError(f"W, {a_name} and {out_name} must share one float dtype")
    A = <cnp.ndarray>a
    Out = <cnp.ndarray>out
    _check_2d(A, a_name, n, k if back else D, False)
    _check_2d(Out, out_name, n, D if back else k, True)
    if _overlap(Out, Wa) or _overlap(Out, A) or _overlap(Out, Idx):
        raise ValueError(f"{out_name} overlaps an input")
    _check_indices(Idx, it, V)
    # one call per (float type, index type): the run-time types pick a fused specialisation only by branching
    with nogil:
        if ft == 0:
            if it == 0:
                _rowdot_pass[float, int32_t](back, <float*>cnp.PyArray_DATA(Wa), D, <int32_t*>cnp.PyArray_DATA(Idx),
                                             n, k, <float*>cnp.PyArray_DATA(A), <float*>cnp.PyArray_DATA(Out))
            else:
                _rowdot_pass[float, int64_t](back, <float*>cnp.PyArray_DATA(Wa), D, <int64_t*>cnp.PyArray_DATA(Idx),
                                             n, k, <float*>cnp.PyArray_DATA(A), <float*>cnp.PyArray_DATA(Out))
        else:
            if it == 0:
                _rowdot_pass[double, int32_t](back, <double*>cnp.PyArray_DATA(Wa), D,
                                              <int32_t*>cnp.PyArray_DATA(Idx), n, k, <double*>cnp.PyArray_DATA(A),
                                              <double*>cnp.PyArray_DATA(Out))
            else:
                _rowdot_pass[double, int64_t](back, <double*>cnp.PyArray_DATA(Wa), D,
                                              <int64_t*>cnp.PyArray_DATA(Idx), n, k, <double*>cnp.PyArray_DATA(A),
                                              <double*>cnp.PyArray_DATA(Out))
    return out


def rowdot(W, idx, h, out):
    """out[i, j] = W[idx[i, j]] . h[i]: W (V, D), idx (n, k) int32/int64, h (n, D), out (n, k); returns out."""
    return _rowdot_call(False, W, idx, h, "h", out, "out")


def rowdot_backward(W, idx, dscore, dh):
    """dh[i] = sum_j dscore[i, j] W[idx[i, j]]: W (V, D), idx (n, k), dscore (n, k), dh (n, D); returns dh."""
    return _rowdot_call(True, W, idx, dscore, "dscore", dh, "dh")


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


ctypedef struct _sq_ctx:
    const void *a
    Py_ssize_t n
    double *partials


cdef void _sq_block_f(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _sq_ctx *g = <_sq_ctx*>ctx
    g.partials[j] = _block_sq[float](<const float*>g.a, lo, hi)


cdef void _sq_block_d(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _sq_ctx *g = <_sq_ctx*>ctx
    g.partials[j] = _block_sq[double](<const double*>g.a, lo, hi)


cdef double _sum_sq(const floating *a, Py_ssize_t n, double *partials) noexcept nogil:
    """Partials of fixed blocks of SQ_BLOCK elements (any thread count), added in block order."""
    cdef Py_ssize_t nb = (n + SQ_BLOCK - 1) // SQ_BLOCK, j
    cdef double s = 0
    cdef _sq_ctx g
    g.a = a
    g.n = n
    g.partials = partials
    if floating is float:
        parallel_blocks(n, SQ_BLOCK, _sq_block_f, &g)
    else:
        parallel_blocks(n, SQ_BLOCK, _sq_block_d, &g)
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
