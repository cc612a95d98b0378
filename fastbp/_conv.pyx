# Design
# ------
# Kernels of book 1's Convolution and Pooling layers (chapter 7) on NCHW float32/float64 buffers.
#
# * Convolution is im2col + GEMM, as the book computes it, but one sample at a time and with each sample's column
#   matrix transposed: colT_n[(c, dy, dx), (i, j)] = x_padded[n, c, i*stride + dy, j*stride + dx] (the book's
#   col[(n, i, j), (c, dy, dx)] for that sample, transposed), built from a zero-padded copy of the sample by the
#   vectorised per-sample kernels of _conv.h (no bounds tests in the copy loops).  One GEMM per sample,
#   out_n (FN, OH*OW) = b + W2 @ colT_n (W2 = W.reshape(FN, -1)), writes the output straight in NCHW (the book's
#   single GEMM gives (N*OH*OW, FN) rows that it then transposes).
#   The column matrix is never stored for the whole batch: each block of samples owns one sample-sized buffer
#   (L2-sized: 451 KB for DeepConvNet's second layer on the AVX2 path) that is filled and consumed by the GEMM
#   while in cache, and backward recomputes it from x (the forward's input) instead of reading a batch-sized
#   matrix (45 MB for that layer) back from memory.  Backward: dW = sum_n dout_n @ colT_n^T and, per sample,
#   dcolT_n = W2^T @ dout_n (into the same buffer) added back into dx by the adjoint of the padded im2col while it
#   is still in cache.  No transposed copy of anything but dout_n is made (none at all for K < 64: _dW_im2col).
# * The "wide" layout, for stride 1 with >= 8 input channels and rows >= 6 (fw - 1) long, on the AVX-512 path
#   (_use_wide; DeepConvNet's layers 2-4), needs no column matrix at all.  In the zero-padded sample xp (C, Hp,
#   Wp), tap (dy, dx) of output (i, j) reads xp[c, (i + dy) * Wp + j + dx]: if output rows are computed Wp long
#   instead of OW (columns OW .. Wp-1 are garbage), every tap reads xp at one constant offset dy*Wp + dx, a
#   (C, OH*Wp) matrix with row stride Hp*Wp that BLAS reads in place.  Forward: out_wide (FN, OH*Wp) = sum over
#   taps of Wr[tap] (FN, C) @ that matrix, then b + its valid columns.  dW's tap rows = that matrix @ dout_n^T
#   widened with zero rows at the garbage columns; dx: xp = 0, per tap xp[offset] += Wr[tap]^T @ dout_n widened
#   with zero columns, then xp's interior (each cell receives its sums in tap order, as col2im adds them).
#   (fw - 1) / OW more products (7 % at 28 wide, 25 % at 8: those take im2col), no im2col/col2im passes:
#   measured 1.2-1.4x at 28 wide, 1.0-1.1x at 14-16 against the im2col way (AVX-512 EPYC, 2 threads, loaded
#   machine; on the AVX2 path, whose BLAS kernels run the taps' short products worse, 0.9-0.97x: im2col there).
#   An inf or NaN in W or in a sample of x would meet a zero in a garbage column (0 * inf = NaN) where the book
#   has no product at all, so a call with such weights, and such a sample's dW, take the im2col way: non-finite
#   values spread exactly as in the book.
#   `im2col` / `col2im` (the book's layout, for fastbp.util) are kept as separate kernels.
# * Samples are cut into blocks whose size depends on N only (sample_block), run by fastbp's thread driver
#   (_threads.parallel_blocks); the GEMMs inside a block run single-threaded (fastbp._gemm's rule inside a
#   parallel region).  dW and db are reduced per block into partials (db in double) that are added in block
#   order, so the gradients have the same bits for any thread count.
# * Max pooling lives in _pool.pyx / _pool.h.
# * The `def` wrappers check ndim, dtype, shape, layout, writability, overlap and BLAS's 32-bit dimensions, then
#   run `noexcept nogil` kernels that touch only the validated buffers.
from libc.string cimport memset
cimport numpy as cnp
from fastbp._validate cimport ftype as _ftype, same_type as _same, shape_of as _s, window_geometry

cnp.import_array()

cdef extern from "_conv.h" nogil:
    void fb_conv_pad_f32(long C, long H, long W, long pad, const float *x, float *xp) noexcept
    void fb_conv_pad_f64(long C, long H, long W, long pad, const double *x, double *xp) noexcept
    int fb_conv_nonfinite_f32(long n, const float *p) noexcept
    int fb_conv_nonfinite_f64(long n, const double *p) noexcept
    void fb_conv_im2col_f32(long C, long Hp, long Wp, long fh, long fw, long s, long oh, long ow,
                            const float *xp, float *colT) noexcept
    void fb_conv_im2col_f64(long C, long Hp, long Wp, long fh, long fw, long s, long oh, long ow,
                            const double *xp, double *colT) noexcept
    void fb_conv_col2im_f32(long C, long H, long W, long fh, long fw, long s, long pad, long oh, long ow,
                            const float *colT, float *xp, float *dx) noexcept
    void fb_conv_col2im_f64(long C, long H, long W, long fh, long fw, long s, long pad, long oh, long ow,
                            const double *colT, double *xp, double *dx) noexcept
    void fb_conv_transpose_f32(long FN, long P, const float *d, float *dT) noexcept
    void fb_conv_transpose_f64(long FN, long P, const double *d, double *dT) noexcept
    void fb_conv_rowsums_f32(long FN, long P, const float *d, double *acc) noexcept
    void fb_conv_rowsums_f64(long FN, long P, const double *d, double *acc) noexcept
    void fb_conv_fill_f32(long FN, long P, const float *b, float *out) noexcept
    void fb_conv_fill_f64(long FN, long P, const double *b, double *out) noexcept
    void fb_conv_unwiden_f32(long FN, long oh, long ow, long Wp, const float *wide, const float *b,
                             float *out) noexcept
    void fb_conv_unwiden_f64(long FN, long oh, long ow, long Wp, const double *wide, const double *b,
                             double *out) noexcept
    void fb_conv_widen_f32(long FN, long oh, long ow, long Wp, const float *d, float *wide, float *wideT) noexcept
    void fb_conv_widen_f64(long FN, long oh, long ow, long Wp, const double *d, double *wide,
                           double *wideT) noexcept
    void fb_conv_unpad_f32(long C, long H, long W, long pad, const float *xp, float *dx) noexcept
    void fb_conv_unpad_f64(long C, long H, long W, long pad, const double *xp, double *dx) noexcept

include "_simd_query.pxi"

from fastbp._typedefs cimport floating
from fastbp._gemm cimport gemm, check_blas_dims, FB_NOTRANS, FB_TRANS
from fastbp._threads cimport parallel_blocks, parallel_blocks_nt, even_block, num_threads


# ---------------------------------------------------------------------------------------------------------------
# validation (Python level)
# ---------------------------------------------------------------------------------------------------------------
cdef _contig(cnp.ndarray a, str name, bint out):
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous")
    if out and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} is read-only")


cdef _shape(cnp.ndarray a, tuple shape, str name):
    if _s(a) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_s(a)}")


cdef _no_overlap(cnp.ndarray out, cnp.ndarray a, str oname, str aname):
    """Both are C-contiguous here: their byte ranges must not meet."""
    cdef char *o0 = <char*>cnp.PyArray_DATA(out)
    cdef char *a0 = <char*>cnp.PyArray_DATA(a)
    cdef char *o1 = o0 + cnp.PyArray_NBYTES(out)
    cdef char *a1 = a0 + cnp.PyArray_NBYTES(a)
    if o0 < a1 and a0 < o1:
        raise ValueError(f"{oname} overlaps {aname} in memory: outputs must not share memory with inputs")


def output_size(Py_ssize_t H, Py_ssize_t W, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad):
    """(OH, OW) = ((H + 2 pad - fh) // stride + 1, (W + 2 pad - fw) // stride + 1), with the checks."""
    cdef Py_ssize_t oh, ow
    window_geometry("filter", H, W, fh, fw, stride, pad, &oh, &ow)
    return oh, ow


# ---------------------------------------------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------------------------------------------
cdef void _im2col(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                  Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t s, Py_ssize_t pad, Py_ssize_t oh, Py_ssize_t ow,
                  const floating *x,      # IN  (N, C, H, W)
                  floating *col           # OUT (N*oh*ow, C*fh*fw), rows lo*oh*ow .. hi*oh*ow
                  ) noexcept nogil:
    """col[(n,i,j), (c,dy,dx)] = x[n, c, i*s+dy-pad, j*s+dx-pad] (0 outside) for samples n in [lo, hi)."""
    cdef Py_ssize_t n, i, j, c, dy, dx, y, x0, k = C * fh * fw
    cdef const floating *src
    cdef floating *dst
    cdef bint inside
    for n in range(lo, hi):
        dst = col + n * oh * ow * k
        for i in range(oh):
            for j in range(ow):
                x0 = j * s - pad
                inside = x0 >= 0 and x0 + fw <= W
                for c in range(C):
                    src = x + (n * C + c) * H * W
                    for dy in range(fh):
                        y = i * s + dy - pad
                        if y < 0 or y >= H:
                            for dx in range(fw):
                                dst[dx] = 0
                        elif inside:
                            for dx in range(fw):
                                dst[dx] = src[y * W + x0 + dx]
                        else:
                            for dx in range(fw):
                                dst[dx] = src[y * W + x0 + dx] if 0 <= x0 + dx < W else 0
                        dst += fw


cdef void _col2im(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                  Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t s, Py_ssize_t pad, Py_ssize_t oh, Py_ssize_t ow,
                  const floating *col,    # IN  (N*oh*ow, C*fh*fw)
                  floating *x             # OUT (N, C, H, W), samples lo .. hi-1 overwritten
                  ) noexcept nogil:
    """x[n, c, y, x] = sum of the col entries read from there by im2col (padding entries dropped)."""
    cdef Py_ssize_t n, i, j, c, dy, dx, y, x0, k = C * fh * fw
    cdef const floating *src
    cdef floating *dst
    cdef bint inside
    for n in range(lo, hi):
        memset(x + n * C * H * W, 0, <size_t>(C * H * W) * sizeof(floating))
        src = col + n * oh * ow * k
        for i in range(oh):
            for j in range(ow):
                x0 = j * s - pad
                inside = x0 >= 0 and x0 + fw <= W
                for c in range(C):
                    dst = x + (n * C + c) * H * W
                    for dy in range(fh):
                        y = i * s + dy - pad
                        if 0 <= y < H:
                            if inside:
                                for dx in range(fw):
                                    dst[y * W + x0 + dx] += src[dx]
                            else:
                                for dx in range(fw):
                                    if 0 <= x0 + dx < W:
                                        dst[y * W + x0 + dx] += src[dx]
                        src += fw


cdef _check_im2col(x, col, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, bint forward,
                   Py_ssize_t *dims):
    """Checks shared by im2col/col2im; dims = N, C, H, W, OH, OW."""
    cdef int t = _ftype(x, "x" if forward else "dx")
    _same(t, col, "col")
    cdef cnp.ndarray X = <cnp.ndarray>x, K = <cnp.ndarray>col
    if cnp.PyArray_NDIM(X) != 4:
        raise ValueError(f"{'x' if forward else 'dx'} must be 4-D (N, C, H, W), got shape {_s(X)}")
    cdef Py_ssize_t N = _s(X)[0], C = _s(X)[1], H = _s(X)[2], W = _s(X)[3], oh, ow
    window_geometry("filter", H, W, fh, fw, stride, pad, &oh, &ow)
    _shape(K, (N * oh * ow, C * fh * fw), "col")
    _contig(X, "x" if forward else "dx", not forward)
    _contig(K, "col", forward)
    if forward:
        _no_overlap(K, X, "col", "x")
    else:
        _no_overlap(X, K, "dx", "col")
    dims[0] = N; dims[1] = C; dims[2] = H; dims[3] = W; dims[4] = oh; dims[5] = ow
    return t


ctypedef struct ColCtx:
    int t
    Py_ssize_t C, H, W, fh, fw, s, pad, oh, ow
    void *x
    void *col
    bint forward


cdef void _col_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef ColCtx *c = <ColCtx*>ctx
    if c.forward:
        if c.t == 0:
            _im2col(lo, hi, c.C, c.H, c.W, c.fh, c.fw, c.s, c.pad, c.oh, c.ow, <float*>c.x, <float*>c.col)
        else:
            _im2col(lo, hi, c.C, c.H, c.W, c.fh, c.fw, c.s, c.pad, c.oh, c.ow, <double*>c.x, <double*>c.col)
    else:
        if c.t == 0:
            _col2im(lo, hi, c.C, c.H, c.W, c.fh, c.fw, c.s, c.pad, c.oh, c.ow, <float*>c.col, <float*>c.x)
        else:
            _col2im(lo, hi, c.C, c.H, c.W, c.fh, c.fw, c.s, c.pad, c.oh, c.ow, <double*>c.col, <double*>c.x)


cdef _run_col(x, col, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, bint forward):
    cdef Py_ssize_t d[6]
    cdef ColCtx c
    c.t = _check_im2col(x, col, fh, fw, stride, pad, forward, d)
    c.C = d[1]; c.H = d[2]; c.W = d[3]; c.oh = d[4]; c.ow = d[5]
    c.fh = fh; c.fw = fw; c.s = stride; c.pad = pad; c.forward = forward
    c.x = cnp.PyArray_DATA(<cnp.ndarray>x)
    c.col = cnp.PyArray_DATA(<cnp.ndarray>col)
    cdef Py_ssize_t per = d[1] * d[2] * d[3] + d[4] * d[5] * d[1] * fh * fw
    with nogil:
        parallel_blocks(d[0], even_block(d[0], 1 + (1 << 16) // (per if per > 0 else 1)), _col_block, &c)


def im2col(x, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, col):
    """col[(n,i,j), (c,dy,dx)] = x_padded[n, c, i*stride+dy, j*stride+dx];  x (N,C,H,W), col (N*OH*OW, C*fh*fw)."""
    _run_col(x, col, fh, fw, stride, pad, True)
    return col


def col2im(col, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, dx):
    """dx (N,C,H,W) = the adjoint of im2col applied to col (N*OH*OW, C*fh*fw): entries summed where they came from."""
    _run_col(dx, col, fh, fw, stride, pad, False)
    return dx


# ---------------------------------------------------------------------------------------------------------------
# Blocks of samples
# ---------------------------------------------------------------------------------------------------------------
# A batch is cut into at most this many blocks of samples.  The thread driver hands the blocks out statically
# (contiguous runs of blocks per thread), so the count should divide among the threads: 100 samples make 20
# blocks of 5, 50 per thread on 2 threads (16 gave 15 blocks of 7: 56 samples on one thread, 44 on the other).
cdef Py_ssize_t SAMPLE_BLOCKS = 20
cdef double CONV_PARALLEL_MIN = 1 << 18   # N*OH*OW*K*FN multiply-adds below this: the blocks run on one thread


def sample_block(Py_ssize_t n):
    """(samples per block, number of blocks) for a batch of n: depends on n only, never on the thread count."""
    cdef Py_ssize_t b = (n + SAMPLE_BLOCKS - 1) // SAMPLE_BLOCKS if n > 0 else 1
    return b, (n + b - 1) // b if n > 0 else 0


# ---------------------------------------------------------------------------------------------------------------
# Convolution: im2col + one GEMM per sample, straight into NCHW
# ---------------------------------------------------------------------------------------------------------------
ctypedef struct ConvCtx:
    int t                       # 0 float32, 1 float64
    bint wide                   # the stride-1 "wide" algorithm (no column matrix), else im2col
    bint dw_nt                  # im2col's dW as dout_n @ colT^T into (FN, K) partials (short K), else (K, FN)
    Py_ssize_t C, H, W, fh, fw, s, pad, oh, ow, FN, K, P, Hp, Wp, Pw, ntap
    Py_ssize_t ncol, nxp, ndT   # per-block scratch sizes (elements) of col, xpad, dT
    void *x                     # IN  (N, C, H, W)
    void *W2                    # IN  (FN, K)
    void *Wr                    # scratch (fh*fw, FN, C): W2's taps side by side (wide only)
    void *b                     # IN  (FN,)
    void *col                   # scratch (nblocks, ncol): one sample's column matrix (K, P) (im2col), or its
    #                             output / dout in the wide layout (FN, Pw)
    void *xp                    # scratch (nblocks, nxp): one sample zero-padded (C, Hp, Wp) (+ fw slack if wide)
    void *out                   # OUT (N, FN, P)
    void *dout                  # IN  (N, FN, P)
    void *dW_part               # OUT (nblocks, K, FN) per-block partial weight gradients, transposed
    void *dT                    # scratch (nblocks, ndT): one sample's dout transposed, (P, FN) or wide (Pw, FN)
    double *db_part             # OUT (nblocks, FN)
    void *dx                    # OUT (N, C, H, W) or NULL


cdef inline int _conv_threads(Py_ssize_t N, ConvCtx *c) noexcept nogil:
    """Threads for a convolution's blocks: one for small work (the fork/join would cost more), else all."""
    return 1 if <double>N * c.P * c.K * c.FN < CONV_PARALLEL_MIN else num_threads()


cdef inline void _pad_sample(ConvCtx *c, Py_ssize_t n, floating *xp) noexcept nogil:
    """xp = x_n zero-padded (C, Hp, Wp), then fw zeros of slack (read by the wide layout's last tap)."""
    cdef const floating *xn = <floating*>c.x + n * c.C * c.H * c.W
    cdef Py_ssize_t i, end = c.C * c.Hp * c.Wp
    if floating is float:
        fb_conv_pad_f32(c.C, c.H, c.W, c.pad, xn, xp)
    else:
        fb_conv_pad_f64(c.C, c.H, c.W, c.pad, xn, xp)
    for i in range(c.nxp - end):
        xp[end + i] = 0


cdef inline int _nonfinite(Py_ssize_t n, const floating *p) noexcept nogil:
    if floating is float:
        return fb_conv_nonfinite_f32(n, p)
    else:
        return fb_conv_nonfinite_f64(n, p)


cdef inline void _colT_of(ConvCtx *c, Py_ssize_t n, floating *xp, floating *col) noexcept nogil:
    """col (K, P) = im2col(x_n)^T, through the zero-padded copy xp of x_n (x_n itself when pad == 0)."""
    cdef const floating *xn = <floating*>c.x + n * c.C * c.H * c.W
    if c.pad > 0:
        _pad_sample(c, n, xp)
        xn = xp
    if floating is float:
        fb_conv_im2col_f32(c.C, c.Hp, c.Wp, c.fh, c.fw, c.s, c.oh, c.ow, xn, col)
    else:
        fb_conv_im2col_f64(c.C, c.Hp, c.Wp, c.fh, c.fw, c.s, c.oh, c.ow, xn, col)


cdef void _conv_fwd_range(ConvCtx *c, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j, floating *x) noexcept nogil:
    """Block j = samples lo .. hi-1.  im2col: col = im2col(x_n)^T (K, P) in the block's cache-sized buffer,
    out_n (FN, P) = b + W2 @ col.  Wide: xp = x_n padded, wide (FN, Pw) = sum over taps (dy, dx) of
    Wr[tap] (FN, C) @ xp[:, dy*Wp + dx :] (C, Pw; row stride Hp*Wp), out_n = b + wide's valid columns."""
    cdef floating *col = <floating*>c.col + j * c.ncol
    cdef floating *xp = <floating*>c.xp + j * c.nxp
    cdef floating *out = <floating*>c.out
    cdef const floating *b = <floating*>c.b
    cdef const floating *Wr = <floating*>c.Wr
    cdef Py_ssize_t n, t, P = c.P, K = c.K, FN = c.FN, C = c.C, HW = c.Hp * c.Wp
    cdef floating *o
    for n in range(lo, hi):
        o = out + n * FN * P
        if c.wide:
            _pad_sample(c, n, xp)
            for t in range(c.ntap):
                gemm(FB_NOTRANS, FB_NOTRANS, FN, c.Pw, C, <floating>1, Wr + t * FN * C, C,
                     xp + (t // c.fw) * c.Wp + t % c.fw, HW, <floating>(0 if t == 0 else 1), col, c.Pw)
            if floating is float:
                fb_conv_unwiden_f32(FN, c.oh, c.ow, c.Wp, col, b, o)
            else:
                fb_conv_unwiden_f64(FN, c.oh, c.ow, c.Wp, col, b, o)
            continue
        _colT_of(c, n, xp, col)
        if floating is float:
            fb_conv_fill_f32(FN, P, b, o)
        else:
            fb_conv_fill_f64(FN, P, b, o)
        gemm(FB_NOTRANS, FB_NOTRANS, FN, P, K, <floating>1, <floating*>c.W2, K, col, P, <floating>1, o, P)


cdef void _conv_fwd_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef ConvCtx *c = <ConvCtx*>ctx
    if c.t == 0:
        _conv_fwd_range(c, lo, hi, j, <float*>c.x)
    else:
        _conv_fwd_range(c, lo, hi, j, <double*>c.x)


cdef void _conv_bwd_range(ConvCtx *c, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j, floating *dout) noexcept nogil:
    """Block j = samples lo .. hi-1: partial db, and dW^T (K, FN) = sum over the block's samples, in order, of
    im2col(x_n)^T @ dout_n^T -- im2col: the column matrix recomputed in the block's cache-sized buffer (cheaper
    than reading a stored batch-sized one back from memory) times dout_n transposed (1/K its size; the
    (NoTrans, NoTrans) product measured 1.4x faster than (NoTrans, Trans), which OpenBLAS packs); wide: per tap,
    xp[:, dy*Wp + dx :] (C, Pw) @ dout_n's wide transpose (Pw, FN, zero rows at the garbage columns) into the
    tap's rows of dW^T.  If dx is wanted: im2col: dcol = W2^T @ dout_n (same buffer), dx_n = col2im(dcol); wide:
    xp = 0, then per tap xp[:, dy*Wp + dx :] += Wr[tap]^T (C, FN) @ dout_n wide (FN, Pw, zero garbage columns),
    dx_n = xp's interior (the adds per cell in tap order, as col2im makes them)."""
    cdef Py_ssize_t n, f, t, P = c.P, K = c.K, FN = c.FN, C = c.C, HW = c.Hp * c.Wp, off
    cdef floating *dWp = <floating*>c.dW_part + j * FN * K
    cdef double *dbp = c.db_part + j * FN
    cdef floating *dT = <floating*>c.dT + j * c.ndT
    cdef floating *col = <floating*>c.col + j * c.ncol
    cdef floating *xp = <floating*>c.xp + j * c.nxp
    cdef const floating *Wr = <floating*>c.Wr
    cdef floating *dx
    cdef const floating *d
    for f in range(FN):
        dbp[f] = 0
    for n in range(lo, hi):
        d = dout + n * FN * P
        if floating is float:
            fb_conv_rowsums_f32(FN, P, d, dbp)
        else:
            fb_conv_rowsums_f64(FN, P, d, dbp)
        dx = <floating*>c.dx + n * C * c.H * c.W if c.dx != NULL else NULL
        if c.wide:
            _pad_sample(c, n, xp)
            if _nonfinite(c.C * c.Hp * c.Wp, xp):
                # an inf or NaN in x_n: the garbage columns would turn it into NaN where the book's dW has
                # none (0 * inf), so this sample's dW takes the im2col way
                _dW_im2col(c, n, d, xp, col, dT, dWp, n == lo)
                if floating is float:
                    fb_conv_widen_f32(FN, c.oh, c.ow, c.Wp, d, col if dx != NULL else NULL, NULL)
                else:
                    fb_conv_widen_f64(FN, c.oh, c.ow, c.Wp, d, col if dx != NULL else NULL, NULL)
            else:
                if floating is float:
                    fb_conv_widen_f32(FN, c.oh, c.ow, c.Wp, d, col if dx != NULL else NULL, dT)
                else:
                    fb_conv_widen_f64(FN, c.oh, c.ow, c.Wp, d, col if dx != NULL else NULL, dT)
                for t in range(c.ntap):
                    off = (t // c.fw) * c.Wp + t % c.fw
                    gemm(FB_NOTRANS, FB_NOTRANS, C, FN, c.Pw, <floating>1, xp + off, HW, dT, FN,
                         <floating>(0 if n == lo else 1), dWp + t * FN, c.ntap * FN)
            if dx != NULL:
                memset(xp, 0, <size_t>c.nxp * sizeof(floating))
                for t in range(c.ntap):
                    off = (t // c.fw) * c.Wp + t % c.fw
                    gemm(FB_TRANS, FB_NOTRANS, C, c.Pw, FN, <floating>1, Wr + t * FN * C, C, col, c.Pw,
                         <floating>1, xp + off, HW)
                if floating is float:
                    fb_conv_unpad_f32(C, c.H, c.W, c.pad, xp, dx)
                else:
                    fb_conv_unpad_f64(C, c.H, c.W, c.pad, xp, dx)
            continue
        _dW_im2col(c, n, d, xp, col, dT, dWp, n == lo)
        if dx != NULL:
            gemm(FB_TRANS, FB_NOTRANS, K, P, FN, <floating>1, <floating*>c.W2, K, d, P, <floating>0, col, P)
            if floating is float:
                fb_conv_col2im_f32(C, c.H, c.W, c.fh, c.fw, c.s, c.pad, c.oh, c.ow, col, xp, dx)
            else:
                fb_conv_col2im_f64(C, c.H, c.W, c.fh, c.fw, c.s, c.pad, c.oh, c.ow, col, xp, dx)


cdef void _dW_im2col(ConvCtx *c, Py_ssize_t n, const floating *d, floating *xp, floating *col, floating *dT,
                     floating *dWp, bint first) noexcept nogil:
    """dWp (K, FN) (+)= im2col(x_n)^T (K, P) @ dout_n^T (P, FN) (= when first); with c.dw_nt (short K), dWp (FN, K)
    (+)= dout_n (FN, P) @ im2col(x_n)^T^T, no transposed copy of dout_n: measured 1.6x (K = 25, SimpleConvNet) and
    2.7x (K = 9) faster than the transpose + (NoTrans, NoTrans) product, which wins from K = 144 on."""
    _colT_of(c, n, xp, col)
    if c.dw_nt:
        gemm(FB_NOTRANS, FB_TRANS, c.FN, c.K, c.P, <floating>1, d, c.P, col, c.P, <floating>(0 if first else 1),
             dWp, c.K)
        return
    if floating is float:
        fb_conv_transpose_f32(c.FN, c.P, d, dT)
    else:
        fb_conv_transpose_f64(c.FN, c.P, d, dT)
    gemm(FB_NOTRANS, FB_NOTRANS, c.K, c.FN, c.P, <floating>1, col, c.P, dT, c.FN, <floating>(0 if first else 1),
         dWp, c.FN)


cdef void _conv_bwd_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef ConvCtx *c = <ConvCtx*>ctx
    if c.t == 0:
        _conv_bwd_range(c, lo, hi, j, <float*>c.dout)
    else:
        _conv_bwd_range(c, lo, hi, j, <double*>c.dout)


cdef bint _conv_taps(ConvCtx *c, floating *Wr) noexcept nogil:
    """Wr[tap, f, c] = W2[f, c*fh*fw + tap]: each tap's (FN, C) weight matrix, for the wide layout.  Returns
    whether every weight is finite."""
    cdef const floating *W2 = <floating*>c.W2
    cdef Py_ssize_t t, f, ch
    cdef floating v
    cdef bint ok = True
    for t in range(c.ntap):
        for f in range(c.FN):
            for ch in range(c.C):
                v = W2[f * c.K + ch * c.ntap + t]
                ok = ok and v - v == 0
                Wr[(t * c.FN + f) * c.C + ch] = v
    return ok


cdef void _conv_reduce(Py_ssize_t nblocks, Py_ssize_t rows, Py_ssize_t cols, bint transposed,
                       const floating *dW_part, Py_ssize_t FN, const double *db_part, floating *dW,
                       floating *db) noexcept nogil:
    """dW, db = the per-block partials added in block order, in double.  A partial is (rows, cols): dW^T (K, FN)
    when transposed, else dW (FN, K).  Each sum runs over the blocks in order; 64 columns at a time are summed side
    by side (vector adds, not one dependent chain)."""
    cdef Py_ssize_t j, i, r, k, c0, c1
    cdef double acc[64]
    cdef const floating *row
    for r in range(rows):
        c0 = 0
        while c0 < cols:
            c1 = c0 + 64 if c0 + 64 < cols else cols
            for k in range(c1 - c0):
                acc[k] = 0
            for j in range(nblocks):
                row = dW_part + (j * rows + r) * cols + c0
                for k in range(c1 - c0):
                    acc[k] += row[k]
            if transposed:
                for k in range(c1 - c0):
                    dW[(c0 + k) * rows + r] = <floating>acc[k]
            else:
                for k in range(c1 - c0):
                    dW[r * cols + c0 + k] = <floating>acc[k]
            c0 = c1
    for i in range(FN):
        acc[0] = 0
        for j in range(nblocks):
            acc[0] += db_part[j * FN + i]
        db[i] = <floating>acc[0]


cdef Py_ssize_t DW_NT_MAX_K = 64   # im2col's dW without transposing dout below this K (see _dW_im2col)
cdef int CONV_ALGO = 0   # 0 auto, 1 wide whenever stride is 1, 2 always im2col (tests and benchmarks)


def _set_conv_algorithm(str name):
    """For tests and benchmarks: 'auto' (the default; see _use_wide), 'wide' (every stride-1 convolution) or
    'im2col' (every convolution).  Returns the previous setting."""
    global CONV_ALGO
    names = ("auto", "wide", "im2col")
    if name not in names:
        raise ValueError(f"algorithm must be one of {names}, got {name!r}")
    old = names[CONV_ALGO]
    CONV_ALGO = names.index(name)
    return old


cdef bint _use_wide(Py_ssize_t C, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t ow) noexcept:
    """The wide layout for stride 1 with at least 8 input channels (fewer: each tap's GEMM has too short an inner
    dimension -- C = 1 would be rank-1 updates; measured 0.5x of im2col at C = 1, 0.8x at C = 3-4, even at 8) and
    rows long enough that the fw - 1 garbage columns per row cost little (at most 1/6 more products: measured
    0.9x of im2col for 8x8 outputs, 1.0-1.1x at 14-16, 1.2-1.4x at 28; AVX-512 EPYC, 2 threads, loaded), on the
    AVX-512 path only: its BLAS (OpenBLAS's SkylakeX small-matrix kernels) runs the taps' short products well,
    the AVX2 path's Haswell kernels do not (measured 0.9-0.97x of im2col at 14-28 wide, 0.7-0.8x at 8)."""
    if stride != 1 or CONV_ALGO == 2:
        return False
    if CONV_ALGO == 1:
        return True
    return C >= 8 and 6 * (fw - 1) <= ow and fb_simd_level() == 2


cdef _conv_dims(tuple x_shape, W2, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, ConvCtx *c,
                str xname):
    """Fill c's geometry, algorithm and scratch sizes from the input shape (N, C, H, W) and W2 (FN, C*fh*fw);
    returns N."""
    cdef cnp.ndarray A = <cnp.ndarray>W2
    if len(x_shape) != 4:
        raise ValueError(f"{xname} must be 4-D (N, C, H, W), got shape {x_shape}")
    if cnp.PyArray_NDIM(A) != 2:
        raise ValueError(f"W2 must be 2-D (FN, C*FH*FW), got shape {_s(A)}")
    window_geometry("filter", x_shape[2], x_shape[3], fh, fw, stride, pad, &c.oh, &c.ow)
    c.FN = A.shape[0]
    _fill_dims(c, x_shape[1], x_shape[2], x_shape[3], fh, fw, stride, pad)
    _shape(A, (c.FN, c.K), "W2")
    _contig(A, "W2", False)
    check_blas_dims(c.FN, c.P, c.K)
    if c.wide:
        check_blas_dims(c.FN, c.Pw, c.K, c.Hp * c.Wp, c.ntap * c.FN, c.Hp * c.Wp)
    return x_shape[0]


cdef void _fill_dims(ConvCtx *c, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t fh, Py_ssize_t fw,
                     Py_ssize_t stride, Py_ssize_t pad) noexcept:
    """c.oh, c.ow and c.FN set: the rest of the geometry, the algorithm and the per-block scratch sizes."""
    c.C = C; c.H = H; c.W = W
    c.fh = fh; c.fw = fw; c.s = stride; c.pad = pad
    c.Hp = H + 2 * pad; c.Wp = W + 2 * pad
    c.K = C * fh * fw
    c.P = c.oh * c.ow
    c.ntap = fh * fw
    c.wide = _use_wide(C, fw, stride, c.ow)
    c.Pw = c.oh * c.Wp
    # the wide layout's buffers can also take the im2col way (non-finite input): untouched pages cost nothing
    c.ncol = c.K * c.P
    c.nxp = C * c.Hp * c.Wp
    c.ndT = c.P * c.FN
    if c.wide:
        c.ncol = max(c.ncol, c.FN * c.Pw)
        c.nxp += fw
        c.ndT = c.Pw * c.FN


def conv_scratch_shapes(tuple x_shape, Py_ssize_t fn, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride,
                        Py_ssize_t pad):
    """Shapes of conv_forward/conv_backward's scratch buffers for input x_shape (N, C, H, W) and fn filters, as a
    dict: 'col', 'xpad', 'dT' (nblocks, size) (one sample's worth per block of samples), 'wr' (K*FN,),
    'dW_part' (nblocks, K, FN), 'db_part' (nblocks, FN) (float64); nblocks = sample_block(N)[1]."""
    cdef ConvCtx c
    if len(x_shape) != 4:
        raise ValueError(f"x_shape must be 4-D (N, C, H, W), got {x_shape}")
    N, C, H, W = x_shape
    window_geometry("filter", H, W, fh, fw, stride, pad, &c.oh, &c.ow)
    c.FN = fn
    _fill_dims(&c, C, H, W, fh, fw, stride, pad)
    nb = sample_block(N)[1]
    return {"col": (nb, c.ncol), "xpad": (nb, c.nxp), "dT": (nb, c.ndT), "wr": (c.K * fn,),
            "dW_part": (nb, c.K, fn), "db_part": (nb, fn)}


def conv_algorithm(tuple x_shape, Py_ssize_t fn, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad):
    """'wide' or 'im2col': the way conv_forward/conv_backward take for this geometry (finite weights)."""
    cdef ConvCtx c
    if len(x_shape) != 4:
        raise ValueError(f"x_shape must be 4-D (N, C, H, W), got {x_shape}")
    window_geometry("filter", x_shape[2], x_shape[3], fh, fw, stride, pad, &c.oh, &c.ow)
    c.FN = fn
    _fill_dims(&c, x_shape[1], x_shape[2], x_shape[3], fh, fw, stride, pad)
    return "wide" if c.wide else "im2col"


cdef list _check_scratch(ConvCtx *c, Py_ssize_t nb, col, xpad, wr):
    _same(c.t, col, "col"); _same(c.t, xpad, "xpad"); _same(c.t, wr, "wr")
    cdef cnp.ndarray COL = <cnp.ndarray>col, XP = <cnp.ndarray>xpad, WR = <cnp.ndarray>wr
    _shape(COL, (nb, c.ncol), "col"); _contig(COL, "col", True)
    _shape(XP, (nb, c.nxp), "xpad"); _contig(XP, "xpad", True)
    _shape(WR, (c.K * c.FN,), "wr"); _contig(WR, "wr", True)
    c.col = cnp.PyArray_DATA(COL); c.xp = cnp.PyArray_DATA(XP); c.Wr = cnp.PyArray_DATA(WR)
    return [(COL, "col"), (XP, "xpad"), (WR, "wr")]


cdef void _prepare_taps(ConvCtx *c) noexcept nogil:
    """Wide layout: the weights by tap; an inf or NaN among them sends the call the im2col way (the garbage
    columns would spread NaN (0 * inf) to cells the book's col2im leaves alone)."""
    cdef bint ok = True
    if c.wide:
        if c.t == 0:
            ok = _conv_taps(c, <float*>c.Wr)
        else:
            ok = _conv_taps(c, <double*>c.Wr)
        c.wide = ok


def conv_forward(x, W2, b, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, col, xpad, wr, out):
    """out[n] (FN, OH, OW) = b + W2 @ im2col(x_n)^T;  x (N,C,H,W), W2 (FN, C*fh*fw).  Scratch (shapes from
    conv_scratch_shapes): col and xpad hold one sample's column matrix (or wide output) and padded copy per block
    of samples, built and used while in cache; wr the weights by tap."""
    cdef ConvCtx c
    c.t = _ftype(x, "x")
    _same(c.t, W2, "W2"); _same(c.t, b, "b"); _same(c.t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x, A = <cnp.ndarray>W2, B = <cnp.ndarray>b, Out = <cnp.ndarray>out
    cdef Py_ssize_t N = _conv_dims(_s(X), W2, fh, fw, stride, pad, &c, "x")
    cdef Py_ssize_t blk, nb
    blk, nb = sample_block(N)
    _contig(X, "x", False)
    _shape(B, (c.FN,), "b"); _contig(B, "b", False)
    _shape(Out, (N, c.FN, c.oh, c.ow), "out"); _contig(Out, "out", True)
    cdef list outs = _check_scratch(&c, nb, col, xpad, wr) + [(Out, "out")]
    cdef Py_ssize_t i, k
    for i in range(len(outs)):
        for a, nm in ((X, "x"), (A, "W2"), (B, "b")):
            _no_overlap(outs[i][0], a, outs[i][1], nm)
        for k in range(i):
            _no_overlap(outs[i][0], outs[k][0], outs[i][1], outs[k][1])
    c.x = cnp.PyArray_DATA(X); c.W2 = cnp.PyArray_DATA(A); c.b = cnp.PyArray_DATA(B)
    c.out = cnp.PyArray_DATA(Out)
    with nogil:
        _prepare_taps(&c)
        parallel_blocks_nt(N, blk, _conv_fwd_block, &c, _conv_threads(N, &c))
    return out


def conv_backward(dout, x, W2, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
                  dW2, db, dx, dW_part, db_part, col, xpad, dT, wr):
    """db = sum of dout over (N, OH, OW); dW2 (FN, K) = sum_n dout_n @ im2col(x_n) (the columns recomputed from
    x, the forward's input); dx (x's shape) = col2im(W2^T @ dout_n) unless dx is None.  Scratch (shapes from
    conv_scratch_shapes): dW_part, db_part float64, col, xpad, dT, wr.  The partials are added in block order, so
    the result has the same bits for any thread count.  Returns dx."""
    cdef ConvCtx c
    c.t = _ftype(dout, "dout")
    _same(c.t, x, "x"); _same(c.t, W2, "W2"); _same(c.t, dW2, "dW2"); _same(c.t, db, "db")
    _same(c.t, dW_part, "dW_part"); _same(c.t, dT, "dT")
    cdef cnp.ndarray D = <cnp.ndarray>dout, X = <cnp.ndarray>x, A = <cnp.ndarray>W2
    cdef cnp.ndarray G = <cnp.ndarray>dW2, GB = <cnp.ndarray>db, WP = <cnp.ndarray>dW_part, BP, DX
    cdef cnp.ndarray TT = <cnp.ndarray>dT
    cdef Py_ssize_t N = _conv_dims(_s(X), W2, fh, fw, stride, pad, &c, "x")
    cdef Py_ssize_t blk, nb
    blk, nb = sample_block(N)
    _contig(X, "x", False)
    _shape(D, (N, c.FN, c.oh, c.ow), "dout"); _contig(D, "dout", False)
    _shape(G, (c.FN, c.K), "dW2"); _contig(G, "dW2", True)
    _shape(GB, (c.FN,), "db"); _contig(GB, "db", True)
    _shape(WP, (nb, c.K, c.FN), "dW_part"); _contig(WP, "dW_part", True)
    _shape(TT, (nb, c.ndT), "dT"); _contig(TT, "dT", True)
    if not cnp.PyArray_Check(db_part) or cnp.PyArray_TYPE(<cnp.ndarray>db_part) != cnp.NPY_FLOAT64:
        raise TypeError("db_part must be a float64 array")
    BP = <cnp.ndarray>db_part
    _shape(BP, (nb, c.FN), "db_part"); _contig(BP, "db_part", True)
    cdef list outs = [(G, "dW2"), (GB, "db"), (WP, "dW_part"), (BP, "db_part"), (TT, "dT")]
    outs += _check_scratch(&c, nb, col, xpad, wr)
    c.dx = NULL
    if dx is not None:
        _same(c.t, dx, "dx")
        DX = <cnp.ndarray>dx
        _shape(DX, _s(X), "dx"); _contig(DX, "dx", True)
        outs.append((DX, "dx"))
        c.dx = cnp.PyArray_DATA(DX)
    cdef Py_ssize_t i, k
    for i in range(len(outs)):
        for a, nm in ((D, "dout"), (X, "x"), (A, "W2")):
            _no_overlap(outs[i][0], a, outs[i][1], nm)
        for k in range(i):
            _no_overlap(outs[i][0], outs[k][0], outs[i][1], outs[k][1])
    c.dout = cnp.PyArray_DATA(D); c.x = cnp.PyArray_DATA(X); c.W2 = cnp.PyArray_DATA(A)
    c.dW_part = cnp.PyArray_DATA(WP); c.db_part = <double*>cnp.PyArray_DATA(BP); c.dT = cnp.PyArray_DATA(TT)
    cdef void *pg = cnp.PyArray_DATA(G)
    cdef void *pgb = cnp.PyArray_DATA(GB)
    cdef Py_ssize_t rows, cols
    with nogil:
        _prepare_taps(&c)
        c.dw_nt = not c.wide and c.K < DW_NT_MAX_K
        rows, cols = (c.FN, c.K) if c.dw_nt else (c.K, c.FN)
        parallel_blocks_nt(N, blk, _conv_bwd_block, &c, _conv_threads(N, &c))
        if c.t == 0:
            _conv_reduce(nb, rows, cols, not c.dw_nt, <float*>c.dW_part, c.FN, c.db_part, <float*>pg, <float*>pgb)
        else:
            _conv_reduce(nb, rows, cols, not c.dw_nt, <double*>c.dW_part, c.FN, c.db_part, <double*>pg,
                         <double*>pgb)
    return dx
