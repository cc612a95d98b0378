# Design
# ------
# Max pooling kernels of book 1's Pooling layer (chapter 7) on NCHW float32/float64 buffers, with an optional
# fused ReLU (fastbp's own nets pool the convolution output and apply the ReLU to the 4x smaller result:
# relu(maxpool(x)) == maxpool(relu(x)), one pass over the big tensor instead of three).
#
# * Direct pooling (no column matrix): each output reads its window once and keeps the window position of the
#   first maximum (the book's np.argmax over the zero-padded window: padding counts as 0, the first NaN wins as in
#   np.argmax/np.max).  The book's 2x2 stride-2 case runs the vectorised kernels of _pool.h on the SIMD path of
#   the CPU (AVX-512 / AVX2 / baseline, FASTBP_DISABLE_CPU_FEATURES as everywhere); any other geometry runs the
#   exact scalar rule here.
# * arg_max holds the window position dy*pw + dx of each output (int32, NCHW order: the layer builds the book's
#   (N*OH*OW*C,) order from it on access), or -1 with the fused ReLU where the window's maximum is <= 0: the
#   output is 0 there and no gradient flows back (the book's Relu mask would zero it).
# * Backward of the 2x2 stride-2 case writes each window's four cells once (dout at the kept position, zeros
#   elsewhere): dx is written in one pass with no memset.  Other geometries zero the plane and add dout at the
#   kept positions (overlapping windows add up, like the book's col2im).
# * Planes are spread over fastbp's threads in even blocks; no reduction, so the bits never depend on the thread
#   count.  The `def` wrappers check ndim, dtype, shape, layout, writability and overlap, then run `noexcept
#   nogil` kernels that touch only the validated buffers.
from libc.string cimport memset
from libc.stdint cimport int32_t
cimport numpy as cnp
from fastbp._typedefs cimport floating
from fastbp._threads cimport parallel_blocks, even_block
from fastbp._validate cimport ftype as _ftype, same_type as _same, shape_of as _s, window_geometry

cnp.import_array()

cdef extern from "_pool.h" nogil:
    void fb_pool2_fwd_f32(long np, long H, long W, const float *x, float *out, int32_t *arg, int relu) noexcept
    void fb_pool2_fwd_f64(long np, long H, long W, const double *x, double *out, int32_t *arg, int relu) noexcept
    void fb_pool2_bwd_f32(long np, long H, long W, const float *dout, const int32_t *arg, float *dx,
                          int *bad) noexcept
    void fb_pool2_bwd_f64(long np, long H, long W, const double *dout, const int32_t *arg, double *dx,
                          int *bad) noexcept

include "_simd_query.pxi"


# ---------------------------------------------------------------------------------------------------------------
# generic geometry: the exact rule, one output at a time
# ---------------------------------------------------------------------------------------------------------------
cdef inline void _pool_row(Py_ssize_t i, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t s,
                           Py_ssize_t pad, Py_ssize_t ow, bint relu,
                           const floating *p,   # IN  (H, W) plane
                           floating *out,       # OUT (ow,) output row i
                           int32_t *arg         # OUT (ow,)
                           ) noexcept nogil:
    """Output row i of one plane: strict > (first maximum wins), the first NaN wins, padding 0; relu: max <= 0
    gives out 0, arg -1."""
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
        if relu and best <= 0:
            best = 0
            best_k = -1
        out[j] = best
        arg[j] = <int32_t>best_k


cdef void _pool_fwd(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                    Py_ssize_t s, Py_ssize_t pad, Py_ssize_t oh, Py_ssize_t ow, bint relu,
                    const floating *x,      # IN  (N*C, H, W)
                    floating *out,          # OUT (N*C, oh, ow)
                    int32_t *arg            # OUT (N*C, oh, ow): dy*pw + dx of the window's first maximum, or -1
                    ) noexcept nogil:
    """out = max over the zero-padded window (relu: max(.., 0)), arg = its first position, planes lo .. hi-1."""
    cdef Py_ssize_t q, i
    if ph == 2 and pw == 2 and s == 2 and pad == 0:
        if floating is float:
            fb_pool2_fwd_f32(hi - lo, H, W, x + lo * H * W, out + lo * oh * ow, arg + lo * oh * ow, relu)
        else:
            fb_pool2_fwd_f64(hi - lo, H, W, x + lo * H * W, out + lo * oh * ow, arg + lo * oh * ow, relu)
        return
    for q in range(lo, hi):
        for i in range(oh):
            _pool_row(i, H, W, ph, pw, s, pad, ow, relu, x + q * H * W, out + (q * oh + i) * ow,
                      arg + (q * oh + i) * ow)


cdef int _pool_bwd(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                   Py_ssize_t s, Py_ssize_t pad, Py_ssize_t oh, Py_ssize_t ow,
                   const floating *dout,   # IN  (N*C, oh, ow)
                   const int32_t *arg,     # IN  (N*C, oh, ow): generic geometry: checked to be in [-1, ph*pw)
                   floating *dx            # OUT (N*C, H, W), planes lo .. hi-1 overwritten
                   ) noexcept nogil:
    """dx = 0, then dx[window position arg] += dout for every output (arg -1 and padding positions dropped).
    Returns nonzero if an arg entry is outside [-1, 4) (2x2 stride 2: checked here, nothing written out of
    bounds either way)."""
    cdef Py_ssize_t q, i, j, y, xx, k
    cdef floating *p
    cdef int bad = 0
    if ph == 2 and pw == 2 and s == 2 and pad == 0:
        if floating is float:
            fb_pool2_bwd_f32(hi - lo, H, W, dout + lo * oh * ow, arg + lo * oh * ow, dx + lo * H * W, &bad)
        else:
            fb_pool2_bwd_f64(hi - lo, H, W, dout + lo * oh * ow, arg + lo * oh * ow, dx + lo * H * W, &bad)
        return bad
    for q in range(lo, hi):
        p = dx + q * H * W
        memset(p, 0, <size_t>(H * W) * sizeof(floating))
        for i in range(oh):
            for j in range(ow):
                k = arg[(q * oh + i) * ow + j]
                if k < 0:
                    continue
                y = i * s - pad + k // pw
                xx = j * s - pad + k % pw
                if 0 <= y < H and 0 <= xx < W:
                    p[y * W + xx] += dout[(q * oh + i) * ow + j]
    return 0


# ---------------------------------------------------------------------------------------------------------------
# validation and the thread driver
# ---------------------------------------------------------------------------------------------------------------
cdef _contig(cnp.ndarray a, str name, bint out):
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous")
    if out and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} is read-only")


cdef _no_overlap(cnp.ndarray out, cnp.ndarray a, str oname, str aname):
    """Both are C-contiguous here: their byte ranges must not meet."""
    cdef char *o0 = <char*>cnp.PyArray_DATA(out)
    cdef char *a0 = <char*>cnp.PyArray_DATA(a)
    if o0 < a0 + cnp.PyArray_NBYTES(a) and a0 < o0 + cnp.PyArray_NBYTES(out):
        raise ValueError(f"{oname} overlaps {aname} in memory: outputs must not share memory with inputs")


def output_size(Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad):
    """(OH, OW) = ((H + 2 pad - ph) // stride + 1, (W + 2 pad - pw) // stride + 1), with the checks."""
    cdef Py_ssize_t oh, ow
    window_geometry("pool window", H, W, ph, pw, stride, pad, &oh, &ow)
    return oh, ow


cdef _check_pool(x, out, arg, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, bint forward,
                 Py_ssize_t *dims):
    """dims = N*C, H, W, OH, OW.  `x` is the input (forward) or dx (backward); `out` is out or dout."""
    cdef str xn = "x" if forward else "dx", on = "out" if forward else "dout"
    cdef int t = _ftype(x, xn)
    _same(t, out, on)
    if not cnp.PyArray_Check(arg) or cnp.PyArray_TYPE(<cnp.ndarray>arg) != cnp.NPY_INT32 \
            or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>arg):
        raise TypeError(f"arg_max must be a native int32 array, got {getattr(arg, 'dtype', type(arg).__name__)}")
    cdef cnp.ndarray X = <cnp.ndarray>x, Out = <cnp.ndarray>out, A = <cnp.ndarray>arg
    if cnp.PyArray_NDIM(X) != 4:
        raise ValueError(f"{xn} must be 4-D (N, C, H, W), got shape {_s(X)}")
    cdef Py_ssize_t N = _s(X)[0], C = _s(X)[1], H = _s(X)[2], W = _s(X)[3], oh, ow
    window_geometry("pool window", H, W, ph, pw, stride, pad, &oh, &ow)
    if _s(Out) != (N, C, oh, ow):
        raise ValueError(f"{on} must have shape {(N, C, oh, ow)}, got {_s(Out)}")
    if _s(A) != (N, C, oh, ow):
        raise ValueError(f"arg_max must have shape {(N, C, oh, ow)}, got {_s(A)}")
    _contig(X, xn, not forward)
    _contig(Out, on, forward)
    _contig(A, "arg_max", forward)
    if forward:
        _no_overlap(Out, X, "out", "x")
        _no_overlap(A, X, "arg_max", "x")
        _no_overlap(A, Out, "arg_max", "out")
    else:
        _no_overlap(X, Out, "dx", "dout")
        _no_overlap(X, A, "dx", "arg_max")
    dims[0] = N * C; dims[1] = H; dims[2] = W; dims[3] = oh; dims[4] = ow
    return t


ctypedef struct PoolCtx:
    int t
    Py_ssize_t H, W, ph, pw, s, pad, oh, ow
    void *x          # forward: x; backward: dx
    void *out        # forward: out; backward: dout
    int32_t *arg
    bint forward
    bint relu
    int bad[64]      # backward, 2x2 stride 2: an out-of-range arg entry seen by block j (j < 64; later ones: 63)


cdef void _pool_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef PoolCtx *c = <PoolCtx*>ctx
    cdef int b
    if c.forward:
        if c.t == 0:
            _pool_fwd(lo, hi, c.H, c.W, c.ph, c.pw, c.s, c.pad, c.oh, c.ow, c.relu, <float*>c.x, <float*>c.out,
                      c.arg)
        else:
            _pool_fwd(lo, hi, c.H, c.W, c.ph, c.pw, c.s, c.pad, c.oh, c.ow, c.relu, <double*>c.x, <double*>c.out,
                      c.arg)
    else:
        if c.t == 0:
            b = _pool_bwd(lo, hi, c.H, c.W, c.ph, c.pw, c.s, c.pad, c.oh, c.ow, <float*>c.out, c.arg, <float*>c.x)
        else:
            b = _pool_bwd(lo, hi, c.H, c.W, c.ph, c.pw, c.s, c.pad, c.oh, c.ow, <double*>c.out, c.arg,
                          <double*>c.x)
        if b:
            c.bad[j if j < 64 else 63] = 1


cdef _run_pool(x, out, arg, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, bint forward,
               bint relu):
    cdef Py_ssize_t d[5]
    cdef PoolCtx c
    c.t = _check_pool(x, out, arg, ph, pw, stride, pad, forward, d)
    c.H = d[1]; c.W = d[2]; c.oh = d[3]; c.ow = d[4]
    c.ph = ph; c.pw = pw; c.s = stride; c.pad = pad; c.forward = forward; c.relu = relu
    c.x = cnp.PyArray_DATA(<cnp.ndarray>x)
    c.out = cnp.PyArray_DATA(<cnp.ndarray>out)
    c.arg = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>arg)
    memset(c.bad, 0, sizeof(c.bad))
    cdef Py_ssize_t i, bad = -1, m = d[0] * d[3] * d[4], plane = d[1] * d[2] + d[3] * d[4]
    cdef int32_t lim = <int32_t>(ph * pw)
    cdef bint two = ph == 2 and pw == 2 and stride == 2 and pad == 0
    if not forward and not two:
        with nogil:
            for i in range(m):
                if c.arg[i] < -1 or c.arg[i] >= lim:
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"arg_max entry {c.arg[bad]} is out of range [-1, {lim})")
    with nogil:
        parallel_blocks(d[0], even_block(d[0], 1 + (1 << 16) // (plane if plane > 0 else 1)), _pool_block, &c)
    cdef Py_ssize_t j
    for j in range(64):
        if c.bad[j]:   # (dx is not valid then)
            for i in range(m):
                if c.arg[i] < -1 or c.arg[i] >= lim:
                    raise ValueError(f"arg_max entry {c.arg[i]} is out of range [-1, {lim})")


def maxpool_forward(x, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, out, arg_max,
                    bint relu=False):
    """out[n, c, i, j] = max of x's zero-padded (ph, pw) window at (i*stride, j*stride); arg_max = its position
    dy*pw + dx (the first maximum; the first NaN).  relu: out = max(out, 0) and arg_max = -1 where out <= 0."""
    _run_pool(x, out, arg_max, ph, pw, stride, pad, True, relu)
    return out


def maxpool_backward(dout, arg_max, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t stride, Py_ssize_t pad, dx):
    """dx = 0; dx[n, c, window (i, j) at arg_max] += dout[n, c, i, j];  arg_max entries must be in [-1, ph*pw)
    (-1: nothing flows back)."""
    _run_pool(dx, dout, arg_max, ph, pw, stride, pad, False, False)
    return dx
