# Design
# ------
# Kernels of book 1's Convolution and Pooling layers (chapter 7) on NCHW float32/float64 buffers.
#
# * Convolution is im2col + GEMM, as the book computes it: `im2col` writes the book's column matrix
#   col[(n, i, j), (c, dy, dx)] = x_padded[n, c, i*stride + dy, j*stride + dx] (zeros in the padding), a GEMM with
#   W.reshape(FN, -1) gives the output, and `col2im` adds a column matrix back into an image (its adjoint).
#   `rows_to_nchw` / `nchw_to_rows` move the GEMM's (N*OH*OW, FN) rows to NCHW and back (adding the bias on the way
#   out, summing the bias gradient on the way back), so the layer's results have the book's layout in one pass.
# * Max pooling is direct (no column matrix): each output reads its window of the input once and keeps the
#   window position of the first maximum (the book's `np.argmax` over the zero-padded window: padding counts as
#   0, a NaN wins as it does in np.argmax/np.max); backward zeroes each sample's dx and adds dout at the kept
#   positions (overlapping windows add up, like the book's col2im).
# * Every kernel is a `noexcept nogil` function over a range [lo, hi) of samples (or rows), so the work can be cut
#   into blocks of samples that touch disjoint memory; the `def` wrappers check ndim, dtype, shape, layout,
#   writability and overlap, and then run the kernel.  Reductions (the bias gradient) accumulate in double in a
#   fixed order (sample by sample), so results do not depend on how the work is cut.
cimport cython
from libc.string cimport memset, memcpy
from libc.stdint cimport int32_t
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    /* 2x2 stride-2 max pooling of one output row, branch-free so that it vectorises: the max of each row pair,
       then of the two (strict >, so the first maximum wins ties).  NaN: a NaN at the window's first cell wins
       here as in np.argmax; a NaN elsewhere is not taken, so the function returns nonzero when the row has one
       and the caller redoes that row with the exact rule. */
    #define FB_POOL2(NAME, T)                                                                                 \
    static int NAME(long ow, const T *restrict r0, const T *restrict r1, T *restrict out,                     \
                    int32_t *restrict arg) {                                                                  \
        long j;                                                                                               \
        int nan = 0;                                                                                          \
        _Pragma("omp simd reduction(|:nan)")                                                                  \
        for (j = 0; j < ow; j++) {                                                                            \
            T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];                             \
            T m1 = b > a ? b : a, m2 = d > c ? d : c;                                                         \
            int32_t k1 = b > a ? 1 : 0, k2 = d > c ? 3 : 2;                                                   \
            out[j] = m2 > m1 ? m2 : m1;                                                                       \
            arg[j] = m2 > m1 ? k2 : k1;                                                                       \
            nan |= (b != b) | (c != c) | (d != d);                                                            \
        }                                                                                                     \
        return nan;                                                                                           \
    }
    FB_POOL2(fb_pool2_f32, float)
    FB_POOL2(fb_pool2_f64, double)
    /* its backward: every cell of the row's windows written once (dout at the kept position, else 0) */
    #define FB_POOL2B(NAME, T)                                                                                \
    static void NAME(long ow, const T *restrict g, const int32_t *restrict arg, T *restrict r0, T *restrict r1) {                                 \
        long j;                                                                                               \
        _Pragma("omp simd")                                                                                   \
        for (j = 0; j < ow; j++) {                                                                            \
            T v = g[j];                                                                                       \
            int32_t k = arg[j];                                                                               \
            r0[2 * j] = k == 0 ? v : (T)0; r0[2 * j + 1] = k == 1 ? v : (T)0;                                 \
            r1[2 * j] = k == 2 ? v : (T)0; r1[2 * j + 1] = k == 3 ? v : (T)0;                                 \
        }                                                                                                     \
    }
    FB_POOL2B(fb_pool2b_f32, float)
    FB_POOL2B(fb_pool2b_f64, double)
    """
    int fb_pool2_f32(long ow, const float *r0, const float *r1, float *out, int32_t *arg) noexcept nogil
    int fb_pool2_f64(long ow, const double *r0, const double *r1, double *out, int32_t *arg) noexcept nogil
    void fb_pool2b_f32(long ow, const float *g, const int32_t *arg, float *r0, float *r1) noexcept nogil
    void fb_pool2b_f64(long ow, const double *g, const int32_t *arg, double *r0, double *r1) noexcept nogil

ctypedef fused floating:
    float
    double


# ---------------------------------------------------------------------------------------------------------------
# validation (Python level)
# ---------------------------------------------------------------------------------------------------------------
cdef inline object _s(cnp.ndarray a):
    return (<object>a).shape


cdef int _ftype(object a, str name) except -1:
    """0 for native float32, 1 for native float64; TypeError otherwise."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        if t == cnp.NPY_FLOAT32:
            return 0
        if t == cnp.NPY_FLOAT64:
            return 1
    raise TypeError(f"{name} must be native float32 or float64, got {a.dtype}")


cdef _same(int t, object a, str name):
    if _ftype(a, name) != t:
        raise TypeError(f"{name} must have dtype {'float64' if t else 'float32'} like the other operands, "
                        f"got {a.dtype}")


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


cdef _geometry(Py_ssize_t H, Py_ssize_t W, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad,
               Py_ssize_t *oh, Py_ssize_t *ow):
    if fh < 1 or fw < 1:
        raise ValueError(f"filter size must be >= 1, got ({fh}, {fw})")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if fh > H + 2 * pad or fw > W + 2 * pad:
        raise ValueError(f"filter ({fh}, {fw}) is larger than the padded input ({H + 2 * pad}, {W + 2 * pad})")
    oh[0] = (H + 2 * pad - fh) // stride + 1
    ow[0] = (W + 2 * pad - fw) // stride + 1


def output_size(Py_ssize_t H, Py_ssize_t W, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad):
    """(OH, OW) = ((H + 2 pad - fh) // stride + 1, (W + 2 pad - fw) // stride + 1), with the checks."""
    cdef Py_ssize_t oh, ow
    _geometry(H, W, fh, fw, stride, pad, &oh, &ow)
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
    _geometry(H, W, fh, fw, stride, pad, &oh, &ow)
    _shape(K, (N * oh * ow, C * fh * fw), "col")
    _contig(X, "x" if forward else "dx", not forward)
    _contig(K, "col", forward)
    if forward:
        _no_overlap(K, X, "col", "x")
    else:
        _no_overlap(X, K, "dx", "col")
    dims[0] = N; dims[1] = C; dims[2] = H; dims[3] = W; dims[4] = oh; dims[5] = ow
    return t


def im2col(x, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, col):
    """col[(n,i,j), (c,dy,dx)] = x_padded[n, c, i*stride+dy, j*stride+dx];  x (N,C,H,W), col (N*OH*OW, C*fh*fw)."""
    cdef Py_ssize_t d[6]
    cdef int t = _check_im2col(x, col, fh, fw, stride, pad, True, d)
    cdef void *xp = cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef void *cp = cnp.PyArray_DATA(<cnp.ndarray>col)
    with nogil:
        if t == 0:
            _im2col[float](0, d[0], d[1], d[2], d[3], fh, fw, stride, pad, d[4], d[5], <float*>xp, <float*>cp)
        else:
            _im2col[double](0, d[0], d[1], d[2], d[3], fh, fw, stride, pad, d[4], d[5], <double*>xp, <double*>cp)
    return col


def col2im(col, Py_ssize_t fh, Py_ssize_t fw, Py_ssize_t stride, Py_ssize_t pad, dx):
    """dx (N,C,H,W) = the adjoint of im2col applied to col (N*OH*OW, C*fh*fw): entries summed where they came from."""
    cdef Py_ssize_t d[6]
    cdef int t = _check_im2col(dx, col, fh, fw, stride, pad, False, d)
    cdef void *xp = cnp.PyArray_DATA(<cnp.ndarray>dx)
    cdef void *cp = cnp.PyArray_DATA(<cnp.ndarray>col)
    with nogil:
        if t == 0:
            _col2im[float](0, d[0], d[1], d[2], d[3], fh, fw, stride, pad, d[4], d[5], <float*>cp, <float*>xp)
        else:
            _col2im[double](0, d[0], d[1], d[2], d[3], fh, fw, stride, pad, d[4], d[5], <double*>cp, <double*>xp)
    return dx


# ---------------------------------------------------------------------------------------------------------------
# GEMM rows <-> NCHW
# ---------------------------------------------------------------------------------------------------------------
cdef void _rows_to_nchw(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t P, Py_ssize_t F,
                        const floating *rows,   # IN  (N*P, F)
                        const floating *b,      # IN  (F,) or NULL
                        floating *out           # OUT (N, F, P)
                        ) noexcept nogil:
    """out[n, f, p] = rows[n*P + p, f] + b[f] for n in [lo, hi) (tiles of 32 positions)."""
    cdef Py_ssize_t n, f, p, p0, p1
    cdef const floating *r
    cdef floating *o
    cdef floating bf
    for n in range(lo, hi):
        r = rows + n * P * F
        o = out + n * F * P
        p0 = 0
        while p0 < P:
            p1 = p0 + 32 if p0 + 32 < P else P
            for f in range(F):
                bf = b[f] if b != NULL else 0
                for p in range(p0, p1):
                    o[f * P + p] = r[p * F + f] + bf
            p0 = p1


cdef void _nchw_to_rows(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t P, Py_ssize_t F,
                        const floating *d,      # IN  (N, F, P)
                        floating *rows,         # OUT (N*P, F)
                        double *db              # OUT (F,) accumulated (+=) in sample order, or NULL
                        ) noexcept nogil:
    """rows[n*P + p, f] = d[n, f, p];  db[f] += sum over n in [lo, hi), p of d[n, f, p]."""
    cdef Py_ssize_t n, f, p, p0, p1
    cdef const floating *s
    cdef floating *r
    cdef double acc
    for n in range(lo, hi):
        s = d + n * F * P
        r = rows + n * P * F
        if db != NULL:
            for f in range(F):
                acc = 0
                for p in range(P):
                    acc += s[f * P + p]
                db[f] += acc
        p0 = 0
        while p0 < P:
            p1 = p0 + 32 if p0 + 32 < P else P
            for f in range(F):
                for p in range(p0, p1):
                    r[p * F + f] = s[f * P + p]
            p0 = p1


def rows_to_nchw(rows, b, out):
    """out (N, F, OH, OW)[n, f] = rows (N*OH*OW, F)[n-th block, f] + b[f] (b may be None)."""
    cdef int t = _ftype(rows, "rows")
    _same(t, out, "out")
    cdef cnp.ndarray R = <cnp.ndarray>rows, O = <cnp.ndarray>out, B = None
    if cnp.PyArray_NDIM(O) != 4:
        raise ValueError(f"out must be 4-D (N, F, OH, OW), got shape {_s(O)}")
    cdef Py_ssize_t N = _s(O)[0], F = _s(O)[1], P = _s(O)[2] * _s(O)[3]
    _shape(R, (N * P, F), "rows")
    _contig(R, "rows", False)
    _contig(O, "out", True)
    _no_overlap(O, R, "out", "rows")
    cdef void *bp = NULL
    if b is not None:
        _same(t, b, "b")
        B = <cnp.ndarray>b
        _shape(B, (F,), "b")
        _contig(B, "b", False)
        _no_overlap(O, B, "out", "b")
        bp = cnp.PyArray_DATA(B)
    cdef void *rp = cnp.PyArray_DATA(R)
    cdef void *op = cnp.PyArray_DATA(O)
    with nogil:
        if t == 0:
            _rows_to_nchw[float](0, N, P, F, <float*>rp, <float*>bp, <float*>op)
        else:
            _rows_to_nchw[double](0, N, P, F, <double*>rp, <double*>bp, <double*>op)
    return out


def nchw_to_rows(d, rows, db):
    """rows (N*OH*OW, F) = d (N, F, OH, OW) moved to rows;  db[f] = sum of d[:, f] (accumulated in double)."""
    cdef int t = _ftype(d, "dout")
    _same(t, rows, "rows")
    cdef cnp.ndarray D = <cnp.ndarray>d, R = <cnp.ndarray>rows, G = None
    if cnp.PyArray_NDIM(D) != 4:
        raise ValueError(f"dout must be 4-D (N, F, OH, OW), got shape {_s(D)}")
    cdef Py_ssize_t N = _s(D)[0], F = _s(D)[1], P = _s(D)[2] * _s(D)[3], f
    _shape(R, (N * P, F), "rows")
    _contig(D, "dout", False)
    _contig(R, "rows", True)
    _no_overlap(R, D, "rows", "dout")
    if db is not None:
        _same(t, db, "db")
        G = <cnp.ndarray>db
        _shape(G, (F,), "db")
        _contig(G, "db", True)
        _no_overlap(G, D, "db", "dout")
        _no_overlap(G, R, "db", "rows")
    cdef double[::1] acc = np.zeros(F if db is not None else 0, np.float64)
    cdef double *ap = &acc[0] if db is not None and F > 0 else NULL
    cdef void *dp = cnp.PyArray_DATA(D)
    cdef void *rp = cnp.PyArray_DATA(R)
    with nogil:
        if t == 0:
            _nchw_to_rows[float](0, N, P, F, <float*>dp, <float*>rp, ap)
        else:
            _nchw_to_rows[double](0, N, P, F, <double*>dp, <double*>rp, ap)
    if ap != NULL:
        if t == 0:
            for f in range(F):
                (<float*>cnp.PyArray_DATA(G))[f] = <float>acc[f]
        else:
            for f in range(F):
                (<double*>cnp.PyArray_DATA(G))[f] = acc[f]
    elif db is not None:
        G[...] = 0
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------------------------------------------
cdef inline void _pool_row(Py_ssize_t i, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t s,
                           Py_ssize_t pad, Py_ssize_t ow,
                           const floating *p,   # IN  (H, W) plane
                           floating *out,       # OUT (ow,) output row i
                           int32_t *arg         # OUT (ow,)
                           ) noexcept nogil:
    """Output row i of one plane, the exact rule: strict > (first maximum wins), the first NaN wins, padding 0."""
    cdef Py_ssize_t j, dy, dx, y, xx, y0 = i * s - pad, x0, best_k
    cdef floating best, v
    for j in range(ow):
        x0 = j * s - pad
        best_k = -1
        best = 0
        for dy in range(ph):
            y = y0 + dy
            for dx in range(pw):
                xx = x0 + dx
                v = p[y * W + xx] if (0 <= y < H and 0 <= xx < W) else 0
                if best_k < 0 or ((v > best or v != v) and best == best):
                    best = v
                    best_k = dy * pw + dx
        out[j] = best
        arg[j] = <int32_t>best_k


cdef void _pool_fwd(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                    Py_ssize_t s, Py_ssize_t pad, Py_ssize_t oh, Py_ssize_t ow,
                    const floating *x,      # IN  (N*C, H, W)
                    floating *out,          # OUT (N*C, oh, ow)
                    int32_t *arg            # OUT (N*C, oh, ow): dy*pw + dx of the window's first maximum
                    ) noexcept nogil:
    """out = max over the zero-padded window, arg = its first position (a NaN wins), planes lo .. hi-1."""
    cdef Py_ssize_t q, i
    cdef const floating *p
    cdef int nan
    cdef bint two = ph == 2 and pw == 2 and s == 2 and pad == 0
    for q in range(lo, hi):
        p = x + q * H * W
        for i in range(oh):
            if two:      # the book's 2x2 stride-2 pooling: two input rows per output row, vectorised
                if floating is float:
                    nan = fb_pool2_f32(ow, p + 2 * i * W, p + (2 * i + 1) * W, out + (q * oh + i) * ow,
                                       arg + (q * oh + i) * ow)
                else:
                    nan = fb_pool2_f64(ow, p + 2 * i * W, p + (2 * i + 1) * W, out + (q * oh + i) * ow,
                                       arg + (q * oh + i) * ow)
                if not nan:
                    continue
            _pool_row(i, H, W, ph, pw, s, pad, ow, p, out + (q * oh + i) * ow, arg + (q * oh + i) * ow)


cdef void _pool_bwd(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                    Py_ssize_t s, Py_ssize_t pad, Py_ssize_t oh, Py_ssize_t ow,
                    const floating *dout,   # IN  (N*C, oh, ow)
                    const int32_t *arg,     # IN  (N*C, oh, ow), each in [0, ph*pw)
                    floating *dx            # OUT (N*C, H, W), planes lo .. hi-1 overwritten
                    ) noexcept nogil:
    """dx = 0, then dx[window position arg] += dout for every output (padding positions dropped)."""
    cdef Py_ssize_t q, i, j, y, xx, k
    cdef floating *p
    for q in range(lo, hi):
        p = dx + q * H * W
        if ph == 2 and pw == 2 and s == 2 and pad == 0:
            # disjoint windows: write every window cell once (no zeroing pass), then the uncovered edge
            for i in range(oh):
                if floating is float:
                    fb_pool2b_f32(ow, dout + (q * oh + i) * ow, arg + (q * oh + i) * ow, p + 2 * i * W,
                                  p + (2 * i + 1) * W)
                else:
                    fb_pool2b_f64(ow, dout + (q * oh + i) * ow, arg + (q * oh + i) * ow, p + 2 * i * W,
                                  p + (2 * i + 1) * W)
                if 2 * ow < W:
                    p[(2 * i) * W + W - 1] = 0
                    p[(2 * i + 1) * W + W - 1] = 0
            if 2 * oh < H:
                memset(p + (H - 1) * W, 0, <size_t>W * sizeof(floating))
            continue
        memset(p, 0, <size_t>(H * W) * sizeof(floating))
        for i in range(oh):
            for j in range(ow):
                k = arg[(q * oh + i) * ow + j]
                y = i * s - pad + k // pw
                xx = j * s - pad + k % pw
                if 0 <= y < H and 0 <= xx < W:
                    p[y * W + xx] += dout[(q * oh + i) * ow + j]


cdef _check_pool(x, out, arg, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, bint forward,
                 Py_ssize_t *dims):
    """dims = N*C, H, W, OH, OW.  `x` is the input (forward) or dx (backward); `out` is out or dout."""
    cdef str xn = "x" if forward else "dx", on = "out" if forward else "dout"
    cdef int t = _ftype(x, xn)
    _same(t, out, on)
    if not cnp.PyArray_Check(arg) or cnp.PyArray_TYPE(<cnp.ndarray>arg) != cnp.NPY_INT32 \
            or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>arg):
        raise TypeError(f"arg_max must be a native int32 array, got {getattr(arg, 'dtype', type(arg).__name__)}")
    cdef cnp.ndarray X = <cnp.ndarray>x, O = <cnp.ndarray>out, A = <cnp.ndarray>arg
    if cnp.PyArray_NDIM(X) != 4:
        raise ValueError(f"{xn} must be 4-D (N, C, H, W), got shape {_s(X)}")
    cdef Py_ssize_t N = _s(X)[0], C = _s(X)[1], H = _s(X)[2], W = _s(X)[3], oh, ow
    _geometry(H, W, ph, pw, stride, pad, &oh, &ow)
    _shape(O, (N, C, oh, ow), on)
    _shape(A, (N, C, oh, ow), "arg_max")
    _contig(X, xn, not forward)
    _contig(O, on, forward)
    _contig(A, "arg_max", forward)
    if forward:
        _no_overlap(O, X, "out", "x")
        _no_overlap(A, X, "arg_max", "x")
        _no_overlap(A, O, "arg_max", "out")
    else:
        _no_overlap(X, O, "dx", "dout")
        _no_overlap(X, A, "dx", "arg_max")
    dims[0] = N * C; dims[1] = H; dims[2] = W; dims[3] = oh; dims[4] = ow
    return t


def maxpool_forward(x, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, out, arg_max):
    """out[n, c, i, j] = max of x's zero-padded (ph, pw) window at (i*stride, j*stride); arg_max = its position."""
    cdef Py_ssize_t d[5]
    cdef int t = _check_pool(x, out, arg_max, ph, pw, stride, pad, True, d)
    cdef void *xp = cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef void *op = cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef int32_t *ap = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>arg_max)
    with nogil:
        if t == 0:
            _pool_fwd[float](0, d[0], d[1], d[2], ph, pw, stride, pad, d[3], d[4], <float*>xp, <float*>op, ap)
        else:
            _pool_fwd[double](0, d[0], d[1], d[2], ph, pw, stride, pad, d[3], d[4], <double*>xp, <double*>op, ap)
    return out


def maxpool_backward(dout, arg_max, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, dx):
    """dx = 0; dx[n, c, window (i, j) at arg_max] += dout[n, c, i, j];  arg_max entries must be in [0, ph*pw)."""
    cdef Py_ssize_t d[5]
    cdef int t = _check_pool(dx, dout, arg_max, ph, pw, stride, pad, False, d)
    cdef int32_t *ap = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>arg_max)
    cdef Py_ssize_t i, bad = -1, m = d[0] * d[3] * d[4]
    cdef int32_t lim = <int32_t>(ph * pw)
    with nogil:
        for i in range(m):
            if ap[i] < 0 or ap[i] >= lim:
                bad = i
                break
    if bad >= 0:
        raise ValueError(f"arg_max entry {ap[bad]} is out of range [0, {lim})")
    cdef void *gp = cnp.PyArray_DATA(<cnp.ndarray>dout)
    cdef void *xp = cnp.PyArray_DATA(<cnp.ndarray>dx)
    with nogil:
        if t == 0:
            _pool_bwd[float](0, d[0], d[1], d[2], ph, pw, stride, pad, d[3], d[4], <float*>gp, ap, <float*>xp)
        else:
            _pool_bwd[double](0, d[0], d[1], d[2], ph, pw, stride, pad, d[3], d[4], <double*>gp, ap, <double*>xp)
    return dx
