# Design
# ------
# The optimizers' parameter updates (the book's SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam): one fused,
# in-place pass over each parameter array and its state arrays.  The def wrapper validates dtype, shape, memory
# order, writability and overlap of every operand, then the `noexcept nogil` kernel runs the formulas of
# _optim.h over contiguous blocks spread over fastbp's threads (elementwise: no reduction, so the result does
# not depend on the thread count).
cimport numpy as cnp
from fastbp._typedefs cimport floating
from fastbp._threads cimport parallel_blocks_nt, even_block, num_threads
from fastbp._validate cimport ftype, same_type, check_same_shape, check_no_overlap

cnp.import_array()

cdef extern from "_optim.h" nogil:
    void fb_opt_f32(int kind, long n, float *p, const float *g, float *s1, float *s2, float lr, float a, float b,
                    float eps) noexcept
    void fb_opt_f64(int kind, long n, double *p, const double *g, double *s1, double *s2, double lr, double a,
                    double b, double eps) noexcept

include "_simd_query.pxi"


cdef enum:
    OPT_SGD = 0
    OPT_MOMENTUM = 1
    OPT_NESTEROV = 2
    OPT_ADAGRAD = 3
    OPT_RMSPROP = 4
    OPT_ADAM = 5

# Elements per thread below which a fork/join costs more than it saves.  Low enough that a weight matrix of the
# book's networks (784 x 50 = 39200) is updated in one contiguous block per thread: the caller's first block is the
# rows its pieces of that layer's products read and write (_gemm: contiguous runs; _threads: block 0 is the
# caller's), so the update reads the gradient and writes the weights in the cache of the core that uses them.
# The converse: when no parallel region ran since the optimizer's previous step (a small batch: every product of
# the step below GEMM_PARALLEL_MIN, all on the caller), the gradients and the weights are in the caller's cache, and
# a worker updating half of them would pull that half to its core and the next forward would pull it back (the
# book's TwoLayerNet at batch 1: a 15 us gradient and a 5 us update took 45 us per step).  The optimizers then pass
# serial=True (fastbp.optimizer, _Optimizer.update), honoured up to LOCAL_MAX elements: a larger array does not stay
# in one core's cache anyway, and its update is bandwidth-bound (book 2's CBOW, two 10000 x 100 embeddings updated
# by Adam after a gradient that opens no region: 1.8-1.9 ms per step split, 2.18 ms on the caller).  The update is
# elementwise: the same bits either way.
cdef Py_ssize_t MIN_BLOCK = 1 << 13
cdef Py_ssize_t LOCAL_MAX = 1 << 16

ctypedef struct _opt_ctx:
    int kind
    void *p              # OUT (in place)
    const void *g        # IN
    void *s1             # OUT (in place), NULL for SGD
    void *s2             # OUT (in place), Adam only
    double lr
    double a
    double b
    double eps


cdef inline void _opt_range(const _opt_ctx *x, Py_ssize_t lo, Py_ssize_t hi, floating *p, const floating *g,
                            floating *s1, floating *s2) noexcept nogil:
    """One optimizer step over elements [lo, hi) (the formulas are in _optim.h's FB_OPT)."""
    if floating is float:
        fb_opt_f32(x.kind, hi - lo, p + lo, g + lo, NULL if s1 == NULL else s1 + lo, NULL if s2 == NULL else s2 + lo,
                   <float>x.lr, <float>x.a, <float>x.b, <float>x.eps)
    else:
        fb_opt_f64(x.kind, hi - lo, p + lo, g + lo, NULL if s1 == NULL else s1 + lo, NULL if s2 == NULL else s2 + lo,
                   x.lr, x.a, x.b, x.eps)


cdef void _opt_block_f(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _opt_ctx *x = <_opt_ctx*>ctx
    _opt_range[float](x, lo, hi, <float*>x.p, <const float*>x.g, <float*>x.s1, <float*>x.s2)


cdef void _opt_block_d(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _opt_ctx *x = <_opt_ctx*>ctx
    _opt_range[double](x, lo, hi, <double*>x.p, <const double*>x.g, <double*>x.s1, <double*>x.s2)


cdef inline bint _contig_like(cnp.ndarray a, bint c_order):
    return cnp.PyArray_IS_C_CONTIGUOUS(a) if c_order else cnp.PyArray_IS_F_CONTIGUOUS(a)


def optimizer_update(int kind, param, grad, state1, state2, double lr, double a=0, double b=0,
                     double eps=1e-7, bint serial=False):
    """In-place update of `param` by optimizer `kind` (0 SGD, 1 Momentum, 2 Nesterov, 3 AdaGrad, 4 RMSprop,
    5 Adam); state arrays as that optimizer needs (None otherwise).  All arrays: one shape, one float dtype,
    one memory order (all C- or all F-contiguous), param and states writeable.  `serial`: on the calling thread
    only, for arrays of up to LOCAL_MAX elements (they are in its cache, see MIN_BLOCK)."""
    if kind < OPT_SGD or kind > OPT_ADAM:
        raise ValueError(f"unknown optimizer kind {kind}")
    cdef int t = ftype(param, "param")
    same_type(t, grad, "grad")
    cdef cnp.ndarray P = <cnp.ndarray>param, G = <cnp.ndarray>grad, S1 = None, S2 = None
    check_same_shape(G, P, "grad", "param")
    if not cnp.PyArray_ISWRITEABLE(P):
        raise ValueError("param is read-only: the update is made in place")
    cdef bint c_order = cnp.PyArray_IS_C_CONTIGUOUS(P)
    if not c_order and not cnp.PyArray_IS_F_CONTIGUOUS(P):
        raise ValueError("param must be contiguous (C or Fortran order)")
    if not _contig_like(G, c_order):
        raise ValueError("grad must be contiguous in the same memory order as param")
    if kind != OPT_SGD:
        if state1 is None:
            raise ValueError("this optimizer needs a state array")
        same_type(t, state1, "state1")
        S1 = <cnp.ndarray>state1
        check_same_shape(S1, P, "state1", "param")
        if not cnp.PyArray_ISWRITEABLE(S1) or not _contig_like(S1, c_order):
            raise ValueError("state1 must be writeable and contiguous in the same memory order as param")
    if kind == OPT_ADAM:
        if state2 is None:
            raise ValueError("Adam needs two state arrays")
        same_type(t, state2, "state2")
        S2 = <cnp.ndarray>state2
        check_same_shape(S2, P, "state2", "param")
        if not cnp.PyArray_ISWRITEABLE(S2) or not _contig_like(S2, c_order):
            raise ValueError("state2 must be writeable and contiguous in the same memory order as param")
    check_no_overlap(P, G, "param", "grad")
    check_no_overlap(S1, G, "state1", "grad"); check_no_overlap(S1, P, "state1", "param")
    check_no_overlap(S2, G, "state2", "grad"); check_no_overlap(S2, P, "state2", "param")
    check_no_overlap(S2, S1, "state2", "state1")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(P)
    cdef _opt_ctx ctx
    ctx.kind = kind
    ctx.p = cnp.PyArray_DATA(P)
    ctx.g = cnp.PyArray_DATA(G)
    ctx.s1 = NULL if S1 is None else cnp.PyArray_DATA(S1)
    ctx.s2 = NULL if S2 is None else cnp.PyArray_DATA(S2)
    ctx.lr = lr
    ctx.a = a
    ctx.b = b
    ctx.eps = eps
    with nogil:
        parallel_blocks_nt(n, even_block(n, MIN_BLOCK), _opt_block_f if t == 0 else _opt_block_d, &ctx,
                           1 if serial and n <= LOCAL_MAX else num_threads())
    return param
