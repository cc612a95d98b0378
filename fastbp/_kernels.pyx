# Design
# ------
# The four hot paths fastbp was founded on: affine forward/backward with the bias reduction, the ReLU and sigmoid
# masks, and the stable softmax cross-entropy.  Each public `def` is a thin wrapper: it checks ndim, shapes,
# dtypes, layout and writability of the NumPy arrays it is given with C-level macros (cheap enough for batch-1
# work; the helpers are in _validate.pxd), raises a ValueError/TypeError naming expected vs actual, and then calls
# a `noexcept nogil` kernel on raw pointers.  Kernels only touch memory the wrapper has validated, so they never
# index out of bounds.
#
# * Element types: float32 and float64 through the fused type `floating` (_typedefs.pxd); the wrappers dispatch
#   on the dtype number once.  Reductions over float32 data accumulate in double.
# * Matrix products: the split GEMM of _gemm.pyx (BLAS function table, transposes instead of `.T` copies).
# * Elementwise kernels work on contiguous buffers; large ones are cut into blocks over fastbp's threads by
#   _threads.parallel_blocks (serial in a build without OpenMP or a forked child).
# * Outputs are always written into arrays handed in by the caller (`out=`-style), so the layer classes decide
#   what to allocate and what to reuse.
# * The other kernel modules' Python-level names that used to live here (gemm, optimizer_update, the threading
#   switches) are re-exported at the bottom, so `fastbp._kernels.X` keeps working.
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t, uint8_t
cimport numpy as cnp
import numpy as np
from fastbp._typedefs cimport floating
from fastbp._threads cimport block_fn, parallel_blocks, even_block, reduce_blocks_d
from fastbp._gemm cimport (gemm as split_gemm, dgemm_from_f32, flip_trans, blas_operand, check_blas_dims,
                           FB_NOTRANS)
from fastbp._validate cimport (shape_of, dtype_of, ftype, same_type, check_ndim, check_out, check_contig,
                               check_shape2, check_same_shape, check_no_overlap, extent)

cnp.import_array()

# Elementwise work below this many elements stays on one thread: the fork/join costs more than it saves.  Blocks
# are at least PARALLEL_MIN / 2 elements (so at least PARALLEL_MIN elements are split in two).
cdef Py_ssize_t PARALLEL_MIN = 1 << 17
cdef Py_ssize_t MIN_BLOCK = PARALLEL_MIN // 2
# Column sums read memory once per element (bandwidth-bound): their row blocks are much larger.
cdef Py_ssize_t COLSUM_BLOCK = 1 << 22


include "_simd_query.pxi"


def build_info():
    """Compile-time facts about the kernels: OpenMP use and thread counts (1 in a forked child), PARALLEL_MIN."""
    from fastbp import _threads
    info = _threads.build_info()
    info["parallel_min"] = PARALLEL_MIN
    return info


cdef extern from "_simd.h" nogil:
    void fb_softmax_block_f32(const float *x, float *y, float *g, long rows, long c, float scale,
                              const float *onehot, const int64_t *labels, int has_ignore, int64_t ignore,
                              double *rowloss) noexcept
    void fb_softmax_block_f64(const double *x, double *y, double *g, long rows, long c, double scale,
                              const double *onehot, const int64_t *labels, int has_ignore, int64_t ignore,
                              double *rowloss) noexcept
    void fb_relu_forward_f32(long n, const float *x, float *out, uint8_t *mask) noexcept
    void fb_relu_forward_f64(long n, const double *x, double *out, uint8_t *mask) noexcept
    void fb_relu_backward_f32(long n, const float *dout, const uint8_t *mask, float *dx) noexcept
    void fb_relu_backward_f64(long n, const double *dout, const uint8_t *mask, double *dx) noexcept
    void fb_relu_inplace_f32(long n, float *x) noexcept
    void fb_relu_inplace_f64(long n, double *x) noexcept
    void fb_relu_mask_inplace_f32(long n, const float *y, float *d) noexcept
    void fb_relu_mask_inplace_f64(long n, const double *y, double *d) noexcept
    void fb_colsum_f32(long n, long m, const float *dout, float *db, double *acc) noexcept
    void fb_colsum_f64(long n, long m, const double *dout, double *db, double *acc) noexcept
    void fb_sigmoid_f32(long n, const float *x, float *out) noexcept
    void fb_sigmoid_f64(long n, const double *x, double *out) noexcept
    float fb_expf(float x) noexcept
    double fb_exp(double x) noexcept


# ---------------------------------------------------------------------------------------------------------------
# Affine
# ---------------------------------------------------------------------------------------------------------------
cdef void _affine_forward(int tx, Py_ssize_t ldx, int tw, Py_ssize_t ldw, Py_ssize_t n, Py_ssize_t d, Py_ssize_t m,
                          const floating *x, const floating *w, const floating *b, floating *out) noexcept nogil:
    """out[n, m] = x[n, d] @ w[d, m] + b[m]: bias broadcast, then one GEMM with beta = 1."""
    _bias_rows(n, m, b, out)
    split_gemm(tx, tw, n, m, d, <floating>1, x, ldx, w, ldw, <floating>1, out, m if m > 1 else 1)


cdef inline void _bias_rows(Py_ssize_t n, Py_ssize_t m, const floating *b, floating *out) noexcept nogil:
    """out[i, :] = b for every row i."""
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(m):
            out[i * m + j] = b[j]


def affine_forward(x, W, b, out, xk=None):
    """out = x @ W + b for x (N, D), W (D, M), b (M,) of one float dtype; out (N, M) C-contiguous; returns out.

    With `xk` (N, D) float64 C-contiguous: x is float32, W, b and out float64, and xk receives x converted to
    float64 (what the backward pass reads) -- converted inside the product, by the thread that reads each part."""
    cdef int t = ftype(x, "x")
    cdef cnp.ndarray X = <cnp.ndarray>x, Wa = <cnp.ndarray>W, B = <cnp.ndarray>b, Out = <cnp.ndarray>out
    cdef cnp.ndarray XK = None
    if xk is None:
        same_type(t, W, "W"); same_type(t, b, "b"); same_type(t, out, "out")
    else:
        if t != 0:
            raise TypeError(f"x must be float32 when xk is given (xk receives its float64 copy), got {dtype_of(x)}")
        same_type(1, W, "W"); same_type(1, b, "b"); same_type(1, out, "out"); same_type(1, xk, "xk")
        XK = <cnp.ndarray>xk
    check_ndim(X, 2, "x"); check_ndim(Wa, 2, "W"); check_ndim(B, 1, "b"); check_ndim(Out, 2, "out")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), d = cnp.PyArray_DIM(X, 1), m = cnp.PyArray_DIM(Wa, 1)
    if cnp.PyArray_DIM(Wa, 0) != d:
        raise ValueError(f"x has {d} features per sample but W has {cnp.PyArray_DIM(Wa, 0)} rows "
                         f"(x {shape_of(X)}, W {shape_of(Wa)})")
    if cnp.PyArray_DIM(B, 0) != m:
        raise ValueError(f"b must have length {m} (the columns of W {shape_of(Wa)}), got {cnp.PyArray_DIM(B, 0)}")
    check_shape2(Out, n, m, "out")
    check_out(Out, "out")
    check_blas_dims(n, m, d)
    check_no_overlap(Out, X, "out", "x"); check_no_overlap(Out, Wa, "out", "W"); check_no_overlap(Out, B, "out", "b")
    if XK is not None:
        check_ndim(XK, 2, "xk"); check_shape2(XK, n, d, "xk"); check_out(XK, "xk")
        check_no_overlap(XK, X, "xk", "x"); check_no_overlap(XK, Wa, "xk", "W")
        check_no_overlap(XK, B, "xk", "b"); check_no_overlap(XK, Out, "xk", "out")
    if not cnp.PyArray_IS_C_CONTIGUOUS(B):
        B = np.ascontiguousarray(B)
    cdef int tx, tw
    cdef Py_ssize_t ldx, ldw, s0, s1
    Wa = blas_operand(Wa, &tw, &ldw)
    if XK is not None:
        if cnp.PyArray_STRIDE(X, 0) % 4 or cnp.PyArray_STRIDE(X, 1) % 4:
            X = np.ascontiguousarray(X)  # (a view with byte strides that are not whole float32 elements)
        s0 = cnp.PyArray_STRIDE(X, 0) // 4
        s1 = cnp.PyArray_STRIDE(X, 1) // 4
        with nogil:
            _bias_rows[double](n, m, <double*>cnp.PyArray_DATA(B), <double*>cnp.PyArray_DATA(Out))
            dgemm_from_f32(tw, n, m, d, 1.0, <float*>cnp.PyArray_DATA(X), s0, s1, <double*>cnp.PyArray_DATA(XK),
                           <double*>cnp.PyArray_DATA(Wa), ldw, 1.0, <double*>cnp.PyArray_DATA(Out),
                           m if m > 1 else 1)
        return out
    X = blas_operand(X, &tx, &ldx)
    with nogil:
        if t == 0:
            _affine_forward[float](tx, ldx, tw, ldw, n, d, m, <float*>cnp.PyArray_DATA(X),
                                   <float*>cnp.PyArray_DATA(Wa), <float*>cnp.PyArray_DATA(B),
                                   <float*>cnp.PyArray_DATA(Out))
        else:
            _affine_forward[double](tx, ldx, tw, ldw, n, d, m, <double*>cnp.PyArray_DATA(X),
                                    <double*>cnp.PyArray_DATA(Wa), <double*>cnp.PyArray_DATA(B),
                                    <double*>cnp.PyArray_DATA(Out))
    return out


ctypedef struct _colsum_ctx:
    Py_ssize_t m
    const void *dout       # IN  (n, m)
    void *rows             # OUT scratch: each block's sums cast to the dtype (fb_colsum writes them; unused)
    double *partials       # OUT each block's column sums, in double (nblocks, m)


cdef void _colsum_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _colsum_ctx *c = <_colsum_ctx*>ctx
    fb_colsum_f32(hi - lo, c.m, <const float*>c.dout + lo * c.m, <float*>c.rows + j * c.m, c.partials + j * c.m)


cdef void _colsum_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _colsum_ctx *c = <_colsum_ctx*>ctx
    fb_colsum_f64(hi - lo, c.m, <const double*>c.dout + lo * c.m, <double*>c.rows + j * c.m, c.partials + j * c.m)


cdef int _bias_backward(Py_ssize_t n, Py_ssize_t m, const floating *dout, floating *db) noexcept nogil:
    """db[j] = sum_i dout[i, j], accumulated in double.  The rows are cut into blocks of a fixed size (at least
    COLSUM_BLOCK elements, from n and m only), summed over fastbp's threads, and the blocks' partial sums added in
    block order (reduce_blocks_d): the same bits for any thread count.  -1 if out of memory."""
    cdef Py_ssize_t i, mm = m if m > 0 else 1
    cdef Py_ssize_t block = (COLSUM_BLOCK + mm - 1) // mm
    cdef Py_ssize_t nb = (n + block - 1) // block if n > 0 else 1
    cdef double *acc
    cdef _colsum_ctx c
    if nb <= 1:
        acc = <double*>malloc(mm * sizeof(double))
        if acc == NULL:
            return -1
        if floating is float:
            fb_colsum_f32(n, m, dout, db, acc)
        else:
            fb_colsum_f64(n, m, dout, db, acc)
        free(acc)
        return 0
    c.m = m
    c.dout = dout
    c.partials = <double*>malloc(<size_t>(nb + 1) * mm * sizeof(double))
    c.rows = malloc(<size_t>nb * mm * sizeof(floating))
    if c.partials == NULL or c.rows == NULL:
        free(c.partials)
        free(c.rows)
        return -1
    if floating is float:
        parallel_blocks(n, block, _colsum_f32, &c)
    else:
        parallel_blocks(n, block, _colsum_f64, &c)
    acc = c.partials + nb * mm
    reduce_blocks_d(c.partials, nb, m, acc)
    for i in range(m):
        db[i] = <floating>acc[i]
    free(c.partials)
    free(c.rows)
    return 0


cdef int _affine_backward(int tx, Py_ssize_t ldx, int tw, Py_ssize_t ldw, Py_ssize_t n, Py_ssize_t d, Py_ssize_t m,
                          const floating *dout, const floating *x, const floating *w,
                          floating *dx, floating *dw, floating *db) noexcept nogil:
    """dx = dout @ W.T (skipped when dx is NULL), dW = x.T @ dout, db = sum_rows(dout).  -1 if out of memory."""
    cdef Py_ssize_t ldd = m if m > 1 else 1
    if dx != NULL:
        split_gemm(FB_NOTRANS, flip_trans(tw), n, d, m, <floating>1, dout, ldd, w, ldw, <floating>0, dx,
                   d if d > 1 else 1)
    split_gemm(flip_trans(tx), FB_NOTRANS, d, m, n, <floating>1, x, ldx, dout, ldd, <floating>0, dw, ldd)
    return _bias_backward(n, m, dout, db)


def affine_backward(dout, x, W, dx, dW, db):
    """dx = dout @ W.T (dx may be None to skip it), dW = x.T @ dout, db = dout.sum(0); all written in place."""
    cdef int t = ftype(dout, "dout")
    same_type(t, x, "x"); same_type(t, W, "W"); same_type(t, dW, "dW"); same_type(t, db, "db")
    cdef cnp.ndarray D = <cnp.ndarray>dout, X = <cnp.ndarray>x, Wa = <cnp.ndarray>W
    cdef cnp.ndarray DW = <cnp.ndarray>dW, DB = <cnp.ndarray>db, DX = None
    check_ndim(X, 2, "x"); check_ndim(Wa, 2, "W"); check_ndim(D, 2, "dout")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), d = cnp.PyArray_DIM(X, 1), m = cnp.PyArray_DIM(Wa, 1)
    if cnp.PyArray_DIM(Wa, 0) != d:
        raise ValueError(f"x has {d} features per sample but W has {cnp.PyArray_DIM(Wa, 0)} rows")
    if cnp.PyArray_DIM(D, 0) != n or cnp.PyArray_DIM(D, 1) != m:
        raise ValueError(f"dout must have shape ({n}, {m}) (the forward output), got {shape_of(D)}")
    check_ndim(DW, 2, "dW"); check_shape2(DW, d, m, "dW"); check_out(DW, "dW")
    check_ndim(DB, 1, "db")
    if cnp.PyArray_DIM(DB, 0) != m:
        raise ValueError(f"db must have length {m}, got {cnp.PyArray_DIM(DB, 0)}")
    check_out(DB, "db")
    if dx is not None:
        same_type(t, dx, "dx")
        DX = <cnp.ndarray>dx
        check_ndim(DX, 2, "dx"); check_shape2(DX, n, d, "dx"); check_out(DX, "dx")
    check_blas_dims(n, m, d)
    for o, oname in ((DX, "dx"), (DW, "dW"), (DB, "db")):
        for i, iname in ((D, "dout"), (X, "x"), (Wa, "W")):
            check_no_overlap(o, i, oname, iname)
    check_no_overlap(DW, DB, "dW", "db"); check_no_overlap(DX, DW, "dx", "dW"); check_no_overlap(DX, DB, "dx", "db")
    if not cnp.PyArray_IS_C_CONTIGUOUS(D):
        D = np.ascontiguousarray(D)
    cdef int tx, tw, rc
    cdef Py_ssize_t ldx, ldw
    X = blas_operand(X, &tx, &ldx)
    Wa = blas_operand(Wa, &tw, &ldw)
    cdef void *dxp = NULL if DX is None else cnp.PyArray_DATA(DX)
    with nogil:
        if t == 0:
            rc = _affine_backward[float](tx, ldx, tw, ldw, n, d, m, <float*>cnp.PyArray_DATA(D),
                                         <float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(Wa),
                                         <float*>dxp, <float*>cnp.PyArray_DATA(DW), <float*>cnp.PyArray_DATA(DB))
        else:
            rc = _affine_backward[double](tx, ldx, tw, ldw, n, d, m, <double*>cnp.PyArray_DATA(D),
                                          <double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(Wa),
                                          <double*>dxp, <double*>cnp.PyArray_DATA(DW),
                                          <double*>cnp.PyArray_DATA(DB))
    if rc != 0:
        raise MemoryError()
    return dx


def bias_backward(dout, db):
    """db = dout.sum(axis=0) for C-contiguous dout (N, M), accumulated in double; returns db."""
    cdef int t = ftype(dout, "dout")
    same_type(t, db, "db")
    cdef cnp.ndarray D = <cnp.ndarray>dout, DB = <cnp.ndarray>db
    check_ndim(D, 2, "dout"); check_ndim(DB, 1, "db"); check_out(DB, "db")
    cdef Py_ssize_t n = cnp.PyArray_DIM(D, 0), m = cnp.PyArray_DIM(D, 1)
    if cnp.PyArray_DIM(DB, 0) != m:
        raise ValueError(f"db must have length {m}, got {cnp.PyArray_DIM(DB, 0)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(D):
        D = np.ascontiguousarray(D)
    cdef int rc
    with nogil:
        if t == 0:
            rc = _bias_backward[float](n, m, <float*>cnp.PyArray_DATA(D), <float*>cnp.PyArray_DATA(DB))
        else:
            rc = _bias_backward[double](n, m, <double*>cnp.PyArray_DATA(D), <double*>cnp.PyArray_DATA(DB))
    if rc != 0:
        raise MemoryError()
    return db


# ---------------------------------------------------------------------------------------------------------------
# Elementwise: ReLU and sigmoid (contiguous blocks over fastbp's threads; no reduction)
# ---------------------------------------------------------------------------------------------------------------
ctypedef struct _ew_ctx:
    const void *a        # IN  x (forward) or dout (backward)
    const void *b        # IN  mask / y (backward), unused in forward
    void *out            # OUT out (forward) or dx (backward)
    uint8_t *mask        # OUT mask (ReLU forward)


cdef void _ew_blocks(int t, Py_ssize_t n, Py_ssize_t min_block, block_fn f32, block_fn f64, const void *a,
                     const void *b, void *out, uint8_t *mask) noexcept nogil:
    """One elementwise kernel over n validated elements (f32 or f64 by the type code t), in blocks of at least
    min_block."""
    cdef _ew_ctx c
    c.a = a
    c.b = b
    c.out = out
    c.mask = mask
    parallel_blocks(n, even_block(n, min_block), f32 if t == 0 else f64, &c)


cdef void _run_ew(int t, Py_ssize_t n, Py_ssize_t min_block, block_fn f32, block_fn f64, const void *a,
                  const void *b, void *out, uint8_t *mask) noexcept:
    """_ew_blocks without the GIL."""
    with nogil:
        _ew_blocks(t, n, min_block, f32, f64, a, b, out, mask)


cdef void _relu_f_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_forward_f32(hi - lo, <const float*>c.a + lo, <float*>c.out + lo, c.mask + lo)


cdef void _relu_f_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_forward_f64(hi - lo, <const double*>c.a + lo, <double*>c.out + lo, c.mask + lo)


cdef void _relu_b_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_backward_f32(hi - lo, <const float*>c.a + lo, <const uint8_t*>c.b + lo, <float*>c.out + lo)


cdef void _relu_b_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_backward_f64(hi - lo, <const double*>c.a + lo, <const uint8_t*>c.b + lo, <double*>c.out + lo)


cdef void _sigmoid_f_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_sigmoid_f32(hi - lo, <const float*>c.a + lo, <float*>c.out + lo)


cdef void _sigmoid_f_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_sigmoid_f64(hi - lo, <const double*>c.a + lo, <double*>c.out + lo)


cdef inline void _sigmoid_b(Py_ssize_t lo, Py_ssize_t hi, const floating *dout, const floating *y,
                            floating *dx) noexcept nogil:
    """dx = dout * (1 - y) * y over [lo, hi)."""
    cdef Py_ssize_t i
    for i in range(lo, hi):
        dx[i] = dout[i] * (1 - y[i]) * y[i]


cdef void _sigmoid_b_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    _sigmoid_b[float](lo, hi, <const float*>c.a, <const float*>c.b, <float*>c.out)


cdef void _sigmoid_b_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    _sigmoid_b[double](lo, hi, <const double*>c.a, <const double*>c.b, <double*>c.out)


cdef inline _check_mask(object mask, cnp.ndarray ref):
    if not cnp.PyArray_Check(mask) or cnp.PyArray_TYPE(<cnp.ndarray>mask) != cnp.NPY_BOOL:
        got = type(mask).__name__ if not cnp.PyArray_Check(mask) else (<cnp.ndarray>mask).dtype
        raise TypeError(f"mask must be a numpy bool array, got {got}")
    check_same_shape(<cnp.ndarray>mask, ref, "mask", "x")


def relu_forward(x, out, mask):
    """out = max(x, 0), mask = (x <= 0); all C-contiguous of one shape; returns out."""
    cdef int t = ftype(x, "x")
    same_type(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x, Out = <cnp.ndarray>out
    check_contig(X, "x"); check_same_shape(Out, X, "out", "x"); check_out(Out, "out")
    _check_mask(mask, X); check_out(<cnp.ndarray>mask, "mask")
    check_no_overlap(Out, X, "out", "x", True); check_no_overlap(mask, X, "mask", "x")
    check_no_overlap(mask, Out, "mask", "out")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(X)
    # mask = x <= 0; out = 0 where mask else x (NaN passes through with mask False)
    _run_ew(t, n, MIN_BLOCK, _relu_f_f32, _relu_f_f64, cnp.PyArray_DATA(X), NULL,
            cnp.PyArray_DATA(Out), <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>mask))
    return out


def relu_backward(dout, mask, dx):
    """dx = where(mask, 0, dout); dout is only read; returns dx."""
    cdef int t = ftype(dout, "dout")
    same_type(t, dx, "dx")
    cdef cnp.ndarray D = <cnp.ndarray>dout, DX = <cnp.ndarray>dx
    check_contig(D, "dout"); _check_mask(mask, D)
    check_contig(<cnp.ndarray>mask, "mask")
    check_same_shape(DX, D, "dx", "dout"); check_out(DX, "dx")
    check_no_overlap(DX, D, "dx", "dout", True); check_no_overlap(DX, mask, "dx", "mask")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(D)
    _run_ew(t, n, MIN_BLOCK, _relu_b_f32, _relu_b_f64, cnp.PyArray_DATA(D), cnp.PyArray_DATA(<cnp.ndarray>mask),
            cnp.PyArray_DATA(DX), NULL)
    return dx


cdef void _relu_ip_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_inplace_f32(hi - lo, <float*>c.out + lo)


cdef void _relu_ip_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_inplace_f64(hi - lo, <double*>c.out + lo)


cdef void _relu_mask_ip_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_mask_inplace_f32(hi - lo, <const float*>c.b + lo, <float*>c.out + lo)


cdef void _relu_mask_ip_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _ew_ctx *c = <_ew_ctx*>ctx
    fb_relu_mask_inplace_f64(hi - lo, <const double*>c.b + lo, <double*>c.out + lo)


def relu_inplace(x):
    """x = max(x, 0) in place, no mask (NaN stays NaN): the ReLU fastbp's nets fuse into an Affine's output;
    returns x."""
    cdef int t = ftype(x, "x")
    cdef cnp.ndarray X = <cnp.ndarray>x
    check_contig(X, "x"); check_out(X, "x")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(X)
    _run_ew(t, n, MIN_BLOCK, _relu_ip_f32, _relu_ip_f64, NULL, NULL,
            cnp.PyArray_DATA(X), NULL)
    return x


def relu_mask_inplace(y, d):
    """d = where(y <= 0, 0, d) in place, y the output of relu_inplace (y <= 0 exactly where its input was <= 0,
    the book's Relu.mask): the fused ReLU's backward; returns d."""
    cdef int t = ftype(d, "d")
    same_type(t, y, "y")
    cdef cnp.ndarray Y = <cnp.ndarray>y, D = <cnp.ndarray>d
    check_contig(Y, "y"); check_contig(D, "d"); check_same_shape(D, Y, "d", "y"); check_out(D, "d")
    check_no_overlap(D, Y, "d", "y")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(D)
    _run_ew(t, n, MIN_BLOCK, _relu_mask_ip_f32, _relu_mask_ip_f64, NULL, cnp.PyArray_DATA(Y),
            cnp.PyArray_DATA(D), NULL)
    return d


def sigmoid_forward(x, out):
    """out = 1 / (1 + exp(-x)), stable for any finite x; returns out."""
    cdef int t = ftype(x, "x")
    same_type(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x, Out = <cnp.ndarray>out
    check_contig(X, "x"); check_same_shape(Out, X, "out", "x"); check_out(Out, "out")
    check_no_overlap(Out, X, "out", "x", True)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(X)
    # the exponential costs: blocks 4x larger than the other elementwise kernels'
    _run_ew(t, n, 4 * MIN_BLOCK, _sigmoid_f_f32, _sigmoid_f_f64, cnp.PyArray_DATA(X), NULL,
            cnp.PyArray_DATA(Out), NULL)
    return out


def sigmoid_backward(dout, y, dx):
    """dx = dout * (1 - y) * y where y is the forward output; returns dx."""
    cdef int t = ftype(dout, "dout")
    same_type(t, y, "y"); same_type(t, dx, "dx")
    cdef cnp.ndarray D = <cnp.ndarray>dout, Y = <cnp.ndarray>y, DX = <cnp.ndarray>dx
    check_contig(D, "dout"); check_contig(Y, "y")
    check_same_shape(D, Y, "dout", "the forward output")
    check_same_shape(DX, D, "dx", "dout"); check_out(DX, "dx")
    check_no_overlap(DX, D, "dx", "dout", True); check_no_overlap(DX, Y, "dx", "y", True)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(D)
    _run_ew(t, n, MIN_BLOCK, _sigmoid_b_f32, _sigmoid_b_f64, cnp.PyArray_DATA(D), cnp.PyArray_DATA(Y),
            cnp.PyArray_DATA(DX), NULL)
    return dx


# ---------------------------------------------------------------------------------------------------------------
# Softmax with cross-entropy loss
# ---------------------------------------------------------------------------------------------------------------
ctypedef struct _sm_ctx:
    Py_ssize_t c
    const void *x          # IN  logits (n, c)
    const int64_t *t       # IN  labels (n,), or NULL
    int has_ignore         # IN  rows labelled `ignore` add no loss and get a zero gradient row
    int64_t ignore
    const void *onehot     # IN  targets (n, c), or NULL
    void *y                # OUT softmax (n, c)
    void *g                # OUT scale * (y - target) (n, c), or NULL
    double scale
    double *rows           # OUT loss of each row (n,)


cdef inline void _softmax_block(const _sm_ctx *s, Py_ssize_t lo, Py_ssize_t hi, const floating *x,
                                const floating *onehot, floating *y, floating *g) noexcept nogil:
    cdef Py_ssize_t off = lo * s.c
    if floating is float:
        fb_softmax_block_f32(x + off, y + off, NULL if g == NULL else g + off, hi - lo, s.c, <float>s.scale,
                             NULL if onehot == NULL else onehot + off, NULL if s.t == NULL else s.t + lo,
                             s.has_ignore, s.ignore, s.rows + lo)
    else:
        fb_softmax_block_f64(x + off, y + off, NULL if g == NULL else g + off, hi - lo, s.c, s.scale,
                             NULL if onehot == NULL else onehot + off, NULL if s.t == NULL else s.t + lo,
                             s.has_ignore, s.ignore, s.rows + lo)


cdef void _softmax_rows_f32(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _sm_ctx *s = <_sm_ctx*>ctx
    _softmax_block[float](s, lo, hi, <const float*>s.x, <const float*>s.onehot, <float*>s.y, <float*>s.g)


cdef void _softmax_rows_f64(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _sm_ctx *s = <_sm_ctx*>ctx
    _softmax_block[double](s, lo, hi, <const double*>s.x, <const double*>s.onehot, <double*>s.y, <double*>s.g)


cdef double _softmax_ce(int ft, Py_ssize_t n, _sm_ctx *s) noexcept nogil:
    """y = softmax(x) row-wise; rows[i] = lse(x_i) - x_i[t_i] (or sum_j t_ij (lse - x_ij)); g = scale * (y - t).

    Row blocks go to threads; returns sum(rows) added in row order, so the loss does not depend on the thread
    count."""
    cdef Py_ssize_t i
    cdef double loss = 0
    # about PARALLEL_MIN * 4 elements per block: the exponentials and the row sums cost
    cdef Py_ssize_t min_rows = (4 * PARALLEL_MIN) // s.c if s.c > 0 else n
    parallel_blocks(n, even_block(n, min_rows if min_rows > 0 else 1),
                    _softmax_rows_f32 if ft == 0 else _softmax_rows_f64, s)
    for i in range(n):
        loss += s.rows[i]
    return loss


cdef Py_ssize_t _first_bad_label(Py_ssize_t n, const int64_t *t, int64_t c, bint has_ignore, int64_t ignore,
                                 Py_ssize_t *nignored) noexcept nogil:
    """Index of the first label outside [0, c) that is not `ignore` (-1 if none); counts the ignored labels."""
    cdef Py_ssize_t i, k = 0
    for i in range(n):
        if has_ignore and t[i] == ignore:
            k += 1
        elif t[i] < 0 or t[i] >= c:
            return i
    nignored[0] = k
    return -1


cdef int _check_labels(cnp.ndarray T, cnp.ndarray X, Py_ssize_t n, Py_ssize_t c, bint has_ignore, int64_t ignore,
                       Py_ssize_t *nignored) except -1:
    """Labels T (N,) for logits X (N, C): native int64, one per row, each in [0, C) or equal to `ignore` (with
    has_ignore, counted in nignored); TypeError/ValueError naming the first that is not."""
    cdef Py_ssize_t bad
    if cnp.PyArray_TYPE(T) != cnp.NPY_INT64 or not cnp.PyArray_ISNOTSWAPPED(T):
        raise TypeError(f"labels must be native int64 here, got {dtype_of(T)}")
    if cnp.PyArray_DIM(T, 0) != n:
        raise ValueError(f"expected {n} labels (one per row of x {shape_of(X)}), got {cnp.PyArray_DIM(T, 0)}")
    cdef const int64_t *t = <const int64_t*>cnp.PyArray_DATA(T)
    with nogil:
        bad = _first_bad_label(n, t, c, has_ignore, ignore, nignored)
    if bad >= 0:
        raise ValueError(f"label {T[bad]} at index {bad} is out of range: labels must be in [0, {c - 1}]"
                         + (f" or equal ignore_label {ignore}" if has_ignore else ""))
    return 0


def softmax_cross_entropy(x, t, y, grad, double scale, ignore_label=None):
    """y = softmax(x) row-wise; grad = scale * (y - onehot(t)) (grad may be None); returns the mean row loss.

    x, y, grad: C-contiguous (N, C) of one float dtype.  t: int64 labels (N,) with 0 <= t < C, or a one-hot /
    probability matrix (N, C) of x's dtype.  The row loss is the exact log-sum-exp form lse(x) - x[t], computed
    and returned in double (so float32 logits such as +-3e38, whose loss 6e38 is beyond float32, give a finite
    loss).  With integer labels, rows whose label == ignore_label (book 2's -1) add no loss and get a zero
    gradient row (y is still their softmax); the mean divides by the number of other rows (0 rows -> 0.0).
    `scale` multiplies the gradient: pass dout / (number of rows counted).
    """
    cdef int ft = ftype(x, "x")
    same_type(ft, y, "y")
    cdef cnp.ndarray X = <cnp.ndarray>x, Y = <cnp.ndarray>y, G = None, T
    check_ndim(X, 2, "x"); check_contig(X, "x")
    check_same_shape(Y, X, "y", "x"); check_out(Y, "y")
    if grad is not None:
        same_type(ft, grad, "grad")
        G = <cnp.ndarray>grad
        check_same_shape(G, X, "grad", "x"); check_out(G, "grad")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), c = cnp.PyArray_DIM(X, 1)
    if n > 0 and c == 0:
        raise ValueError(f"x must have at least one class column, got shape {shape_of(X)}")
    if not cnp.PyArray_Check(t):
        raise TypeError(f"t must be a numpy.ndarray, got {type(t).__name__}")
    T = <cnp.ndarray>t
    check_contig(T, "t")
    check_no_overlap(Y, X, "y", "x"); check_no_overlap(Y, T, "y", "t")
    check_no_overlap(G, X, "grad", "x"); check_no_overlap(G, T, "grad", "t"); check_no_overlap(G, Y, "grad", "y")
    cdef void *gp = NULL if G is None else cnp.PyArray_DATA(G)
    cdef double small[64]
    cdef double *rows = &small[0]
    if n > 64:
        rows = <double*>malloc(n * sizeof(double))
    if rows == NULL:
        raise MemoryError()
    try:
        return _softmax_ce_dispatch(ft, X, T, Y, gp, n, c, scale, rows, ignore_label)
    finally:
        if rows != &small[0]:
            free(rows)


cdef double _softmax_ce_dispatch(int ft, cnp.ndarray X, cnp.ndarray T, cnp.ndarray Y, void *gp, Py_ssize_t n,
                                 Py_ssize_t c, double scale, double *rows, object ignore_label) except? -1.0:
    cdef Py_ssize_t nignored = 0
    cdef double loss
    cdef _sm_ctx s
    s.c = c
    s.x = cnp.PyArray_DATA(X)
    s.t = NULL
    s.onehot = NULL
    s.y = cnp.PyArray_DATA(Y)
    s.g = gp
    s.scale = scale
    s.rows = rows
    s.has_ignore = ignore_label is not None
    s.ignore = 0
    if s.has_ignore:
        if cnp.PyArray_NDIM(T) != 1:
            raise ValueError("ignore_label applies to integer labels t (N,), not to one-hot targets")
        if isinstance(ignore_label, (bool, np.bool_)) or not isinstance(ignore_label, (int, np.integer)):
            raise TypeError(f"ignore_label must be an int or None, got {type(ignore_label).__name__}")
        if not -2**63 <= ignore_label < 2**63:
            raise ValueError(f"ignore_label must fit int64, got {ignore_label}")
        s.ignore = ignore_label
    if cnp.PyArray_NDIM(T) == 1:
        _check_labels(T, X, n, c, s.has_ignore, s.ignore, &nignored)
        s.t = <const int64_t*>cnp.PyArray_DATA(T)
    elif cnp.PyArray_NDIM(T) == 2:
        same_type(ft, T, "t (one-hot)")
        check_same_shape(T, X, "t (one-hot)", "x")
        s.onehot = cnp.PyArray_DATA(T)
    else:
        raise ValueError(f"t must be labels (N,) or one-hot (N, C), got {cnp.PyArray_NDIM(T)}-D shape {shape_of(T)}")
    with nogil:
        loss = _softmax_ce(ft, n, &s)
    return loss / (n - nignored) if n > nignored else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Fused: the gradient of a fully connected ReLU network (fastbp's TwoLayerNet / MultiLayerNet) in one call
# ---------------------------------------------------------------------------------------------------------------
# A network of L Affine layers with a ReLU after every one but the last, and softmax cross-entropy on the logits:
# forward, loss and backward as the layer-by-layer path of fastbp.nets runs them (affine_forward, relu_inplace on
# the Affine's output, ..., softmax_cross_entropy, affine_backward, relu_mask_inplace on its dx, ..., the first
# layer's affine_backward without dx): the same kernels on the same operands in the same order, so the same bits.
# What it saves is the Python between the kernels (the layer methods, the wrappers' argument parsing and their
# checks, one wrapper call per kernel): 3-5 us per step of fastbp's TwoLayerNet 784-50-10 (~3 % at batch 100, ~15 %
# at batch 1).  Every operand is checked before anything is written, outputs against each other and against the
# inputs in one pass.
ctypedef struct _fc_layer:
    Py_ssize_t d, m        # W is (d, m)
    int tw                 # W's BLAS transpose flag and leading dimension (any strided layout, see blas_operand)
    Py_ssize_t ldw
    const void *w          # IN  W (d, m)
    const void *b          # IN  b (m,)
    void *out              # OUT relu(in @ W + b) (n, m); the last layer: the logits, no ReLU
    void *dx               # OUT dout @ W.T masked by the previous layer's ReLU (n, d); NULL for the first layer
    void *dw               # OUT in.T @ dout (d, m)
    void *db               # OUT dout summed over the rows (m,)


cdef int _fc_run(Py_ssize_t n, int tx, Py_ssize_t ldx, const floating *x, _fc_layer *L, Py_ssize_t nl,
                 _sm_ctx *s, double *loss) noexcept nogil:
    """Forward, softmax cross-entropy (s: targets, y, g, scale filled in) and backward; loss = the rows' summed
    loss.  -1 if out of memory (the bias reduction's scratch)."""
    cdef int t = 0 if floating is float else 1
    cdef Py_ssize_t k
    cdef const floating *a = x
    cdef int ta = tx
    cdef Py_ssize_t lda = ldx
    for k in range(nl):
        _affine_forward(ta, lda, L[k].tw, L[k].ldw, n, L[k].d, L[k].m, a, <const floating*>L[k].w,
                        <const floating*>L[k].b, <floating*>L[k].out)
        if k + 1 < nl:
            _ew_blocks(t, n * L[k].m, MIN_BLOCK, _relu_ip_f32, _relu_ip_f64, NULL, NULL, L[k].out, NULL)
        a = <const floating*>L[k].out
        ta = FB_NOTRANS
        lda = L[k].m if L[k].m > 1 else 1
    s.x = L[nl - 1].out
    loss[0] = _softmax_ce(t, n, s)
    cdef floating *d = <floating*>s.g
    for k in range(nl - 1, -1, -1):
        if k == 0:
            a, ta, lda = x, tx, ldx
        else:
            a, ta, lda = <const floating*>L[k - 1].out, FB_NOTRANS, (L[k].d if L[k].d > 1 else 1)
        if _affine_backward(ta, lda, L[k].tw, L[k].ldw, n, L[k].d, L[k].m, d, a, <const floating*>L[k].w,
                            <floating*>L[k].dx, <floating*>L[k].dw, <floating*>L[k].db) != 0:
            return -1
        if k > 0:
            _ew_blocks(t, n * L[k].d, MIN_BLOCK, _relu_mask_ip_f32, _relu_mask_ip_f64, NULL, L[k - 1].out,
                       L[k].dx, NULL)
            d = <floating*>L[k].dx
    return 0


cdef _fc_check_disjoint(list outs, list out_names, list ins, list in_names):
    """ValueError naming the first pair when two outputs share memory or an output shares memory with an input
    (None entries skipped); the extents are compared in C, names are only built for the error."""
    cdef Py_ssize_t no = len(outs), ni = len(ins), i, j
    cdef char **ol = <char**>malloc(2 * (no + ni) * sizeof(char*))
    if ol == NULL:
        raise MemoryError()
    cdef char **oh = ol + no
    cdef char **il = ol + 2 * no
    cdef char **ih = il + ni
    cdef Py_ssize_t bad_i = -1, bad_j = -1
    cdef bint bad_in = False
    try:
        for i in range(no):
            if outs[i] is None:
                ol[i] = oh[i] = NULL
            else:
                extent(<cnp.ndarray>outs[i], &ol[i], &oh[i])
        for i in range(ni):
            if ins[i] is None:
                il[i] = ih[i] = NULL
            else:
                extent(<cnp.ndarray>ins[i], &il[i], &ih[i])
        for i in range(no):
            if bad_i >= 0:
                break
            for j in range(i + 1, no):
                if ol[i] < oh[j] and ol[j] < oh[i]:
                    bad_i, bad_j = i, j
                    break
            if bad_i >= 0:
                break
            for j in range(ni):
                if ol[i] < ih[j] and il[j] < oh[i]:
                    bad_i, bad_j, bad_in = i, j, True
                    break
    finally:
        free(ol)
    if bad_i >= 0:
        other = in_names[bad_j] if bad_in else out_names[bad_j]
        raise ValueError(f"{out_names[bad_i]} overlaps {other} in memory: outputs must not share memory with "
                         f"inputs or with each other")


def _fc_layer_names(Py_ssize_t k):
    """The names fc_relu_gradient's messages give layer k's operands: Ws[k], bs[k], outs[k], dxs[k], dWs[k], dbs[k]."""
    return tuple(f"{stem}[{k}]" for stem in ("Ws", "bs", "outs", "dxs", "dWs", "dbs"))


# made once: formatting them at every call (~16 f-strings per layer) cost ~1-2 us of a 784-50-10 step
_FC_NAMES = tuple(_fc_layer_names(k) for k in range(16))


def fc_relu_gradient(x, t, list Ws, list bs, list outs, list dxs, list dWs, list dbs, y, g):
    """(Affine -> ReLU) x (L - 1) -> Affine -> softmax cross-entropy, forward and backward; returns the mean loss.

    The same bits as affine_forward, relu_inplace, ..., softmax_cross_entropy (scale 1 / N), affine_backward,
    relu_mask_inplace, ... called layer by layer, the first layer's dx not computed.
    # IN  x (N, D_0) any strided layout; t int64 labels (N,) in [0, C) or one-hot rows (N, C) of x's dtype;
    #     Ws[k] (D_k, D_k+1) any strided layout, bs[k] (D_k+1,); one float dtype throughout
    # OUT outs[k] (N, D_k+1): relu(in_k @ W_k + b_k), the last one the logits (no ReLU); y, g (N, C):
    #     softmax and (y - onehot(t)) / N; dxs[k] (N, D_k) for k >= 1 (dxs[0] must be None): the gradient reaching
    #     layer k - 1's output, masked by its ReLU; dWs[k] (D_k, D_k+1), dbs[k] (D_k+1,)
    All outputs C-contiguous, writeable, disjoint from each other and from the inputs; N >= 1, C >= 1.
    """
    cdef Py_ssize_t nl = len(Ws), k
    if nl < 1:
        raise ValueError("the network needs at least one Affine layer, got none")
    if len(bs) != nl or len(outs) != nl or len(dxs) != nl or len(dWs) != nl or len(dbs) != nl:
        raise ValueError(f"Ws, bs, outs, dxs, dWs and dbs must have one entry per layer ({nl}), got lengths "
                         f"{len(bs)}, {len(outs)}, {len(dxs)}, {len(dWs)}, {len(dbs)}")
    cdef int ft = ftype(x, "x")
    cdef cnp.ndarray X = <cnp.ndarray>x, Wl, Bl, A
    check_ndim(X, 2, "x")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), dprev = cnp.PyArray_DIM(X, 1), m
    if n < 1:
        raise ValueError(f"x must have at least one row, got shape {shape_of(X)}")
    cdef _fc_layer *L = <_fc_layer*>malloc(nl * sizeof(_fc_layer))
    if L == NULL:
        raise MemoryError()
    cdef double small[64]
    cdef double *rows = &small[0]
    cdef _sm_ctx s
    cdef int tx, rc
    cdef Py_ssize_t ldx, c, nignored = 0
    cdef double loss = 0
    cdef cnp.ndarray T
    keep = []   # operands converted for BLAS (blas_operand, a contiguous bias): alive until the kernels are done
    try:
        out_arrays, out_names, in_arrays, in_names = [], [], [X], ["x"]
        for k in range(nl):
            # each list entry is read once, into a local that the checks, the overlap pass and the kernel all use
            w_obj, b_obj, o_obj, dx_obj, dw_obj, db_obj = Ws[k], bs[k], outs[k], dxs[k], dWs[k], dbs[k]
            w_nm, b_nm, o_nm, dx_nm, dw_nm, db_nm = _FC_NAMES[k] if k < 16 else _fc_layer_names(k)
            same_type(ft, w_obj, w_nm)
            Wl = <cnp.ndarray>w_obj
            check_ndim(Wl, 2, w_nm)
            if cnp.PyArray_DIM(Wl, 0) != dprev:
                raise ValueError(f"{w_nm} must have {dprev} rows (the columns of its input), got shape "
                                 f"{shape_of(Wl)}")
            m = cnp.PyArray_DIM(Wl, 1)
            same_type(ft, b_obj, b_nm)
            Bl = <cnp.ndarray>b_obj
            if cnp.PyArray_NDIM(Bl) != 1 or cnp.PyArray_DIM(Bl, 0) != m:
                raise ValueError(f"{b_nm} must have shape ({m},), got {shape_of(Bl)}")
            for arr, name, r, cc in ((o_obj, o_nm, n, m), (dw_obj, dw_nm, dprev, m)):
                same_type(ft, arr, name)
                A = <cnp.ndarray>arr
                check_ndim(A, 2, name); check_shape2(A, r, cc, name); check_out(A, name)
            same_type(ft, db_obj, db_nm)
            A = <cnp.ndarray>db_obj
            if cnp.PyArray_NDIM(A) != 1 or cnp.PyArray_DIM(A, 0) != m:
                raise ValueError(f"{db_nm} must have shape ({m},), got {shape_of(A)}")
            check_out(A, db_nm)
            if k == 0:
                if dx_obj is not None:
                    raise ValueError("dxs[0] must be None: the first layer's dx is not computed")
            else:
                same_type(ft, dx_obj, dx_nm)
                A = <cnp.ndarray>dx_obj
                check_ndim(A, 2, dx_nm); check_shape2(A, n, dprev, dx_nm); check_out(A, dx_nm)
            check_blas_dims(n, m, dprev)
            out_arrays += [o_obj, dx_obj, dw_obj, db_obj]
            out_names += [o_nm, dx_nm, dw_nm, db_nm]
            in_arrays += [Wl, Bl]
            in_names += [w_nm, b_nm]
            if not cnp.PyArray_IS_C_CONTIGUOUS(Bl):
                Bl = np.ascontiguousarray(Bl)
            Wl = blas_operand(Wl, &L[k].tw, &L[k].ldw)
            keep += [Wl, Bl]
            L[k].d = dprev
            L[k].m = m
            L[k].w = cnp.PyArray_DATA(Wl)
            L[k].b = cnp.PyArray_DATA(Bl)
            L[k].out = cnp.PyArray_DATA(<cnp.ndarray>o_obj)
            L[k].dx = NULL if k == 0 else cnp.PyArray_DATA(<cnp.ndarray>dx_obj)
            L[k].dw = cnp.PyArray_DATA(<cnp.ndarray>dw_obj)
            L[k].db = cnp.PyArray_DATA(<cnp.ndarray>db_obj)
            dprev = m
        c = dprev
        if c < 1:
            raise ValueError("the last layer must have at least one output (class) column, got 0")
        for arr, name in ((y, "y"), (g, "g")):
            same_type(ft, arr, name)
            A = <cnp.ndarray>arr
            check_ndim(A, 2, name); check_shape2(A, n, c, name); check_out(A, name)
        out_arrays += [y, g]
        out_names += ["y", "g"]
        if not cnp.PyArray_Check(t):
            raise TypeError(f"t must be a numpy.ndarray, got {type(t).__name__}")
        T = <cnp.ndarray>t
        check_contig(T, "t")
        in_arrays.append(T)
        in_names.append("t")
        _fc_check_disjoint(out_arrays, out_names, in_arrays, in_names)
        s.c = c
        s.t = NULL
        s.onehot = NULL
        s.has_ignore = 0
        s.ignore = 0
        s.y = cnp.PyArray_DATA(<cnp.ndarray>y)
        s.g = cnp.PyArray_DATA(<cnp.ndarray>g)
        s.scale = 1.0 / n
        if cnp.PyArray_NDIM(T) == 1:
            _check_labels(T, X, n, c, False, 0, &nignored)
            s.t = <const int64_t*>cnp.PyArray_DATA(T)
        elif cnp.PyArray_NDIM(T) == 2:
            same_type(ft, T, "t (one-hot)")
            check_shape2(T, n, c, "t (one-hot)")
            s.onehot = cnp.PyArray_DATA(T)
        else:
            raise ValueError(f"t must be labels (N,) or one-hot (N, C), got {cnp.PyArray_NDIM(T)}-D shape "
                             f"{shape_of(T)}")
        if n > 64:
            rows = <double*>malloc(n * sizeof(double))
            if rows == NULL:
                raise MemoryError()
        s.rows = rows
        X = blas_operand(X, &tx, &ldx)
        keep.append(X)
        with nogil:
            if ft == 0:
                rc = _fc_run[float](n, tx, ldx, <const float*>cnp.PyArray_DATA(X), L, nl, &s, &loss)
            else:
                rc = _fc_run[double](n, tx, ldx, <const double*>cnp.PyArray_DATA(X), L, nl, &s, &loss)
        if rc != 0:
            raise MemoryError()
    finally:
        free(L)
        if rows != &small[0]:
            free(rows)
    return loss / n


def scale_into(src, double alpha, dst):
    """dst = alpha * src for C-contiguous arrays of one shape and float dtype; returns dst."""
    cdef int t = ftype(src, "src")
    same_type(t, dst, "dst")
    cdef cnp.ndarray S = <cnp.ndarray>src, D = <cnp.ndarray>dst
    check_contig(S, "src"); check_same_shape(D, S, "dst", "src"); check_out(D, "dst")
    check_no_overlap(D, S, "dst", "src", True)
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(S)
    cdef float *sf
    cdef float *df
    cdef double *sd
    cdef double *dd
    cdef float af = <float>alpha
    with nogil:
        if t == 0:
            sf = <float*>cnp.PyArray_DATA(S); df = <float*>cnp.PyArray_DATA(D)
            for i in range(n):
                df[i] = af * sf[i]
        else:
            sd = <double*>cnp.PyArray_DATA(S); dd = <double*>cnp.PyArray_DATA(D)
            for i in range(n):
                dd[i] = alpha * sd[i]
    return dst


def _exp_kernel(x):
    """The kernels' vectorisable exp on a copy of x (float32 or float64, values <= 0): for accuracy tests."""
    cdef int t = ftype(x, "x")
    cdef cnp.ndarray X = np.ascontiguousarray(x)
    cdef cnp.ndarray out = np.empty_like(X)
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(X)
    cdef float *xf
    cdef float *of
    cdef double *xd
    cdef double *od
    if t == 0:
        xf = <float*>cnp.PyArray_DATA(X); of = <float*>cnp.PyArray_DATA(out)
        for i in range(n):
            of[i] = fb_expf(xf[i])
    else:
        xd = <double*>cnp.PyArray_DATA(X); od = <double*>cnp.PyArray_DATA(out)
        for i in range(n):
            od[i] = fb_exp(xd[i])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Names that moved to the other kernel modules, re-exported so `fastbp._kernels.X` keeps working
# ---------------------------------------------------------------------------------------------------------------
# (deliberately unused here: `# no-cython-lint` keeps cython-lint's unused-import check off these lines only)
from fastbp._gemm import gemm_py as gemm  # no-cython-lint
from fastbp._gemm import _set_gemm, _set_gemm_threads, _get_gemm_threads  # no-cython-lint
from fastbp._gemm import _set_small_mnk, _get_small_mnk, _blas_threads_callback  # no-cython-lint
from fastbp._threads import _after_fork_in_child  # no-cython-lint
from fastbp._optim import optimizer_update  # no-cython-lint
