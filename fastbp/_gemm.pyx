# Design
# ------
# Matrix products for every fastbp kernel module: the BLAS function table and the split GEMM.
#
# * The BLAS is fastbp's own copy of OpenBLAS (package scipy-openblas32; fastbp/_blas.py says why a separate
#   copy).  Its cblas_?gemm / cblas_?gemv entry points live in one struct of function pointers, filled when this
#   module is imported (the last statement below calls fastbp._blas.ensure_loaded, which calls _set_gemm), so no
#   kernel ever tests for a NULL pointer.
# * Sizes are Py_ssize_t everywhere; only the leaf BLAS call narrows them to int, after the def wrappers checked
#   with check_blas_dims that each one is below 2**31 (the 32-bit interface).
# * Any 2-D operand with one unit stride is passed with a leading dimension and a transpose flag (blas_operand):
#   no `.T` copies are made.
# * Threads: with OpenMP, OpenBLAS runs single-threaded and a large product is cut into independent pieces, each
#   a single-threaded BLAS call, handed out in contiguous runs to fastbp's threads through _threads.parallel_blocks
#   (piece arithmetic below).  Opt-in (FASTBP_BLAS_THREADED_MIN), the largest products are instead one OpenBLAS
#   call that OpenBLAS threads itself, its jobs running on fastbp's OpenMP team through the threads callback
#   (_threads.h): OpenBLAS's threads share one packed copy of the operand they all read, where independent pieces
#   each pack their own (see "OpenBLAS's own threads": faster on an idle machine only, so off by default).
cimport numpy as cnp
from libc.stdlib cimport malloc, free
from libc.stdint cimport intptr_t
from fastbp._typedefs cimport floating
from fastbp._threads cimport parallel_blocks, parallel_blocks_macs, threads_usable, in_region
from fastbp._validate cimport ftype, same_type, check_ndim, check_out, check_shape2, check_no_overlap
import numpy as np
# re-exported: fastbp._blas reads them here (no-cython-lint marks the deliberate unused imports)
from fastbp._threads import build_info, _blas_threads_callback  # no-cython-lint

cnp.import_array()

cdef extern from *:
    """
    #include <pthread.h>
    /* OpenBLAS's thread count is one global: the threaded calls of several Python threads take turns */
    static pthread_mutex_t fb_gemm_blas_lock = PTHREAD_MUTEX_INITIALIZER;
    static void fb_gemm_lock(void) { pthread_mutex_lock(&fb_gemm_blas_lock); }
    static void fb_gemm_unlock(void) { pthread_mutex_unlock(&fb_gemm_blas_lock); }
    """
    void fb_gemm_lock() noexcept nogil
    void fb_gemm_unlock() noexcept nogil

ctypedef void (*set_threads_fn)(int n) noexcept nogil

cdef blas_table _blas


def _set_gemm(intptr_t sgemm_address, intptr_t dgemm_address, intptr_t sgemv_address,
              intptr_t dgemv_address):
    """Install the cblas_?gemm / cblas_?gemv entry points (addresses from fastbp._blas)."""
    if sgemm_address == 0 or dgemm_address == 0 or sgemv_address == 0 or dgemv_address == 0:
        raise ValueError("null BLAS address")
    _blas.sgemv = <sgemv_fn>sgemv_address
    _blas.dgemv = <dgemv_fn>dgemv_address
    _blas.sgemm = <sgemm_fn>sgemm_address
    _blas.dgemm = <dgemm_fn>dgemm_address


cdef inline void _blas_call(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                            const floating *a, Py_ssize_t lda, const floating *b, Py_ssize_t ldb, floating beta,
                            floating *c, Py_ssize_t ldc) noexcept nogil:
    """One BLAS call, m, n, k >= 1 (all <= FB_INT_MAX).  A single row of C (batch 1) is a matrix-vector product:
    GEMV reads op(B) once, where OpenBLAS's GEMM with m = 1 is several times slower on wide layers."""
    cdef int incx
    if m == 1:
        # c = alpha * op(B)^T a + beta * c; op(A)'s one row is contiguous (NoTrans) or strided by lda (Trans)
        incx = 1 if ta == FB_NOTRANS else <int>lda
        if floating is float:
            if tb == FB_NOTRANS:
                _blas.sgemv(FB_ROWMAJOR, FB_TRANS, <int>k, <int>n, alpha, b, <int>ldb, a, incx, beta, c, 1)
            else:
                _blas.sgemv(FB_ROWMAJOR, FB_NOTRANS, <int>n, <int>k, alpha, b, <int>ldb, a, incx, beta, c, 1)
        else:
            if tb == FB_NOTRANS:
                _blas.dgemv(FB_ROWMAJOR, FB_TRANS, <int>k, <int>n, alpha, b, <int>ldb, a, incx, beta, c, 1)
            else:
                _blas.dgemv(FB_ROWMAJOR, FB_NOTRANS, <int>n, <int>k, alpha, b, <int>ldb, a, incx, beta, c, 1)
        return
    if floating is float:
        _blas.sgemm(FB_ROWMAJOR, ta, tb, <int>m, <int>n, <int>k, alpha, a, <int>lda, b, <int>ldb, beta, c, <int>ldc)
    else:
        _blas.dgemm(FB_ROWMAJOR, ta, tb, <int>m, <int>n, <int>k, alpha, a, <int>lda, b, <int>ldb, beta, c, <int>ldc)


# ---------------------------------------------------------------------------------------------------------------
# Splitting a product over threads
# ---------------------------------------------------------------------------------------------------------------
# A large product is cut into pieces, each a single-threaded BLAS call, handed out to the threads in contiguous runs:
#   split M (rows of C)     - every piece packs all of op(B): chosen when op(B) is the smallest operand,
#   split N (columns of C)  - every piece packs all of op(A): chosen when op(A) is the smallest,
#   split K (inner dim)     - nothing is packed twice, but the pieces of threads 1.. accumulate into scratch that is
#                             then added to C in thread order: chosen when C is the smallest.
# How many pieces: one per thread for a product of at least GEMM_PARALLEL_MIN multiply-adds; but where OpenBLAS
# has a "small matrix" kernel (its SkylakeX family; fastbp._blas sets _small_mnk), a product of up to
# SMALL_SPLIT_MAX pieces is cut into pieces of at most _small_mnk multiply-adds, which that kernel runs without
# packing.  Measured single-threaded at 100 x K x 50: sgemm 205 GFLOP/s up to M*N*K = 10^6, 170 above; dgemm 113
# vs 73.  OpenBLAS does not use that kernel for row-major (NoTrans, Trans), so those keep one piece per thread.
# Every piece holds at least one row/column (so every thread that owns K-split scratch writes it), and the pieces
# depend only on the sizes and the thread count, never on the team OpenMP actually forms: results are
# reproducible for a given thread count.
cdef int _gemm_nthreads = 1
cdef double GEMM_PARALLEL_MIN = 1 << 19      # m * n * k below this: one thread
cdef Py_ssize_t CV_K_ALIGN = 8               # dgemm_from_f32's K pieces: 8 doubles = one 64-byte cache line
cdef double _small_mnk = 0                   # 0: no small-matrix kernel to aim for
cdef Py_ssize_t SMALL_SPLIT_MAX = 16         # at most this many small pieces; bigger products split per thread

cdef enum:
    SPLIT_M = 0
    SPLIT_N = 1
    SPLIT_K = 2

ctypedef struct gemm_plan:
    int split             # SPLIT_M / SPLIT_N / SPLIT_K
    int nt                # threads (thread t runs pieces t, t + nt, ...)
    Py_ssize_t lim        # the size of the split dimension
    Py_ssize_t pieces     # non-empty pieces of `chunk` rows/columns (the last one may be shorter)
    Py_ssize_t chunk


def _set_gemm_threads(int n):
    """Threads fastbp splits a large GEMM over (1 = one thread, or OpenBLAS's own threading in its modes)."""
    global _gemm_nthreads
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    _gemm_nthreads = n


def _get_gemm_threads():
    """Threads a large GEMM is split over (1 in a forked child or a build without OpenMP)."""
    return _gemm_nthreads if threads_usable() else 1


def _set_small_mnk(double mnk):
    """Largest m*n*k that OpenBLAS's small-matrix kernel takes (0: none); GEMMs are cut into pieces that size."""
    global _small_mnk
    if mnk < 0:
        raise ValueError(f"small-matrix size must be >= 0, got {mnk}")
    _small_mnk = mnk


def _get_small_mnk():
    return _small_mnk


# ---------------------------------------------------------------------------------------------------------------
# OpenBLAS's own threads for the largest products
# ---------------------------------------------------------------------------------------------------------------
# Independent pieces each pack the operand they share (split N: all of op(A)); OpenBLAS's threaded driver packs
# it once, each thread a slice, and synchronises its threads around the shared buffer.  Measured on the 2-core
# AVX-512 EPYC (the products of the MultiLayerNet 784-1024-1024-10 batch-256 step, one after the other, while the
# 2048^3 sgemm reached its idle 197-203 GFLOP/s): the eight products took 16.6 ms as pieces, 13.4 ms threaded by
# OpenBLAS on fastbp's team (13.0 ms on OpenBLAS's own pthreads); the 256x1024x1024 ones with a transposed operand
# ran at 131-146 GFLOP/s as pieces, 174-199 threaded by OpenBLAS.  OpenBLAS's threads wait for each other, so on
# a machine whose cores are busy with other work they lose far more than independent pieces do (measured on the
# loaded machine: 74 ms against 40 ms for the same products; with only 15 % of the CPUs used by other processes,
# `fastbp bench` timed them at 21.5 ms against 19.9 ms; on the AVX2 path (OpenBLAS's Haswell core, 28 % foreign
# use) 48.6 ms against 24.7 ms, and its 2048^3 sgemm at 104 GFLOP/s against NumPy's own threaded OpenBLAS at 200).
# So the route is off by default (_blas.BLAS_THREADED_MNK = 0) and FASTBP_BLAS_THREADED_MIN=<multiply-adds> turns it
# on for machines that are known to be idle (_blas.BLAS_THREADED_SUGGESTED = 1e8 is what the benchmarks compare
# with: `fastbp bench` prints the MultiLayerNet step's GEMMs both ways).  Products of at least _blas_threaded_min
# multiply-adds whose three dimensions are all at least BLAS_THREADED_MIN_DIM (the shapes measured; tall-skinny
# products such as im2col's keep their pieces), called from outside any parallel region on more than one thread,
# take this route: OpenBLAS's thread count (a global of the library, 1 otherwise) is raised to
# min(threads, _blas_max_threads) for the call, under a lock so that two Python threads take turns (a GEMM that
# another Python thread runs meanwhile as pieces may then see OpenBLAS threaded: its pieces still compute the same
# product, the callback running any nested jobs on threads of their own, only slower).  Results:
# OpenBLAS's threaded driver may block K differently from its single-threaded one, so a product agrees across
# thread counts to rounding (as the pieces already do), and is reproducible for a given thread count.
cdef set_threads_fn _blas_set_threads = NULL   # OpenBLAS's openblas_set_num_threads (NULL: route off)
cdef double _blas_threaded_min = 0             # m * n * k from which OpenBLAS threads a product itself; 0: never
cdef int _blas_max_threads = 1                 # at most this many OpenBLAS threads (the CPUs fastbp may use)
cdef Py_ssize_t BLAS_THREADED_MIN_DIM = 128    # and only when m, n and k are all at least this


def _set_blas_threaded(intptr_t set_threads_address, double min_mnk, int max_threads):
    """Route products of at least min_mnk multiply-adds to OpenBLAS's own threads (its jobs on fastbp's team
    through the threads callback, which the caller installed), on at most max_threads threads; set_threads_address
    is OpenBLAS's openblas_set_num_threads.  A zero address or min_mnk turns the route off."""
    global _blas_set_threads, _blas_threaded_min, _blas_max_threads
    if min_mnk < 0:
        raise ValueError(f"threaded-BLAS size must be >= 0, got {min_mnk}")
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    _blas_threaded_min = 0     # off while the pointer changes
    _blas_set_threads = <set_threads_fn>set_threads_address
    _blas_max_threads = max_threads
    _blas_threaded_min = min_mnk if set_threads_address != 0 else 0


def _get_blas_threaded_min():
    """Multiply-adds from which a product runs on OpenBLAS's own threads (0: never)."""
    return _blas_threaded_min


cdef inline int _blas_threads_for(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int nt) noexcept nogil:
    """OpenBLAS threads for this product on the route above, or 0 when it is split into pieces instead."""
    if nt <= 1 or _blas_threaded_min <= 0 or <double>m * n * k < _blas_threaded_min:
        return 0
    if m < BLAS_THREADED_MIN_DIM or n < BLAS_THREADED_MIN_DIM or k < BLAS_THREADED_MIN_DIM:
        return 0
    if in_region():   # inside a block of the pool's or an OpenMP team's region: pieces, run serially
        return 0
    return nt if nt < _blas_max_threads else _blas_max_threads


def _gemm_route(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int threads):
    """For tests: OpenBLAS threads a product of m x n x k (m, n, k >= 1) gets at `threads` threads on the route to
    OpenBLAS's own threading, or 0 when it is split into pieces (see _gemm_plan)."""
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"m, n, k must be >= 1, got {m}, {n}, {k}")
    return _blas_threads_for(m, n, k, threads)


def _blas_threaded_min_dim():
    """The smallest m, n and k a product on OpenBLAS's own threads has."""
    return BLAS_THREADED_MIN_DIM


cdef Py_ssize_t _thread_load(Py_ssize_t lim, Py_ssize_t chunk, int nt) noexcept nogil:
    """The most rows/columns one thread gets when the pieces of `chunk` (the last one short) are dealt to nt
    threads in contiguous runs (thread t: pieces t * P // nt up to (t + 1) * P // nt, see _gemm_thread)."""
    cdef Py_ssize_t pieces = (lim - 1) // chunk + 1
    cdef Py_ssize_t t, lo, hi, most = 0
    for t in range(nt):
        lo = t * pieces // nt * chunk
        hi = (t + 1) * pieces // nt * chunk
        if hi > lim:
            hi = lim
        if hi - lo > most:
            most = hi - lo
    return most


cdef Py_ssize_t _aligned_chunk(Py_ssize_t lim, Py_ssize_t chunk, Py_ssize_t align, int nt) noexcept nogil:
    """`chunk` rounded down or up to a multiple of `align` (at least align), whichever gives the threads the
    more even share of lim."""
    cdef Py_ssize_t up = (chunk + align - 1) // align * align
    cdef Py_ssize_t down = chunk // align * align
    if down < align or _thread_load(lim, up, nt) <= _thread_load(lim, down, nt):
        return up
    return down


cdef void _make_plan(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int nt, double small,
                     gemm_plan *p, Py_ssize_t k_align=1) noexcept nogil:
    """Choose the split direction, the pieces and the threads of a product with m, n, k >= 1 (see above).  A K
    split cuts K at multiples of `k_align` (dgemm_from_f32: the pieces that fill A's columns then write whole
    cache lines of its rows, never a line another thread writes too)."""
    cdef double sa = <double>m * k, sb = <double>k * n, sc = <double>m * n * 2   # K split: scratch written + read
    cdef double other, mnk = <double>m * n * k
    cdef Py_ssize_t lim, pieces = 1, chunk
    if sb <= sa and sb <= sc:
        p.split = SPLIT_M
        lim = m
        other = sb
    elif sa <= sb and sa <= sc:
        p.split = SPLIT_N
        lim = n
        other = sa
    else:
        p.split = SPLIT_K
        lim = k
        other = sc / 2
    if nt < 1:
        nt = 1
    if (small > 0 and mnk > small and not (ta == FB_NOTRANS and tb == FB_TRANS)
            and mnk <= small * SMALL_SPLIT_MAX):
        pieces = <Py_ssize_t>((mnk + small - 1) // small)
        if pieces % nt:
            pieces += nt - pieces % nt
        chunk = (lim - 1) // pieces + 1
        while <double>chunk * other > small and pieces < lim:
            pieces += nt
            chunk = (lim - 1) // pieces + 1
    elif nt > 1 and mnk >= GEMM_PARALLEL_MIN:
        pieces = nt
    else:
        nt = 1
    if pieces > lim:
        pieces = lim
    if pieces < 1:
        pieces = 1
    # Every piece non-empty: with chunk = ceil(lim / pieces), only ceil(lim / chunk) pieces hold any of the lim
    # rows/columns (lim = 225 in 16 pieces: chunk 15, so 15 pieces).  Then with nt <= pieces every thread owns at
    # least one piece (its run t * P // nt .. (t + 1) * P // nt is not empty) and writes its K-split scratch,
    # which is summed into C.  (lim - 1) // x + 1 is ceil(lim / x) without overflow.
    chunk = (lim - 1) // pieces + 1
    if p.split == SPLIT_K and k_align > 1 and pieces > 1 and nt > 1:
        chunk = _aligned_chunk(lim, chunk, k_align, nt)
    pieces = (lim - 1) // chunk + 1
    if nt > pieces:
        nt = <int>pieces
    p.nt = nt
    p.lim = lim
    p.pieces = pieces
    p.chunk = chunk


def _gemm_plan(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, bint trans_a=False, bint trans_b=False, int threads=1,
               double small_mnk=0, Py_ssize_t k_align=1):
    """For tests: how a product with m, n, k >= 1 is cut: (split 'M'/'N'/'K', threads, [(lo, hi) per piece])."""
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"m, n, k must be >= 1, got {m}, {n}, {k}")
    cdef gemm_plan p
    _make_plan(FB_TRANS if trans_a else FB_NOTRANS, FB_TRANS if trans_b else FB_NOTRANS, m, n, k, threads,
               small_mnk, &p, k_align)
    bounds = [(q * p.chunk, min(p.lim, (q + 1) * p.chunk)) for q in range(p.pieces)]
    return "MNK"[p.split], p.nt, bounds


cdef inline void _gemm_piece(const gemm_plan *p, Py_ssize_t q, bint first, int ta, int tb, Py_ssize_t m,
                             Py_ssize_t n, Py_ssize_t k, floating alpha, const floating *a, Py_ssize_t lda,
                             const floating *b, Py_ssize_t ldb, floating beta, floating *c,
                             Py_ssize_t ldc) noexcept nogil:
    """Piece q of the plan.  For K, `c` is the destination of this thread (C or its scratch) and `first` says
    whether beta applies (else beta = 1: the piece accumulates onto the thread's earlier pieces)."""
    cdef Py_ssize_t lo = q * p.chunk
    cdef Py_ssize_t hi = lo + p.chunk if p.lim - lo > p.chunk else p.lim
    if lo >= hi:
        return
    if p.split == SPLIT_M:
        _blas_call(ta, tb, hi - lo, n, k, alpha, a + (lo * lda if ta == FB_NOTRANS else lo), lda, b, ldb,
                   beta, c + lo * ldc, ldc)
    elif p.split == SPLIT_N:
        _blas_call(ta, tb, m, hi - lo, k, alpha, a, lda, b + (lo if tb == FB_NOTRANS else lo * ldb), ldb,
                   beta, c + lo, ldc)
    else:
        _blas_call(ta, tb, m, n, hi - lo, alpha, a + (lo if ta == FB_NOTRANS else lo * lda), lda,
                   b + (lo * ldb if tb == FB_NOTRANS else lo), ldb, beta if first else <floating>1, c, ldc)


cdef inline void _convert_a(const a_source *cv, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                            Py_ssize_t k) noexcept nogil:
    """cv.dst[i, j] = cv.src[i, j] for rows [r0, r1) and columns [c0, c1) (dst C-contiguous with k columns)."""
    cdef Py_ssize_t i, j
    cdef const float *s
    cdef double *d
    for i in range(r0, r1):
        s = cv.src + i * cv.s0
        d = cv.dst + i * k
        if cv.s1 == 1:
            for j in range(c0, c1):
                d[j] = s[j]
        else:
            for j in range(c0, c1):
                d[j] = s[j * cv.s1]


cdef inline void _gemm_thread(const gemm_plan *p, Py_ssize_t t, int ta, int tb, Py_ssize_t m, Py_ssize_t n,
                              Py_ssize_t k, floating alpha, const floating *a, Py_ssize_t lda, const floating *b,
                              Py_ssize_t ldb, floating beta, floating *c, Py_ssize_t ldc,
                              floating *scratch, const a_source *cv) noexcept nogil:
    """Thread t's pieces, one contiguous run: t * P // nt up to (t + 1) * P // nt of the P pieces (K split: into C
    for thread 0, else into its scratch), so a thread's rows of a weight matrix are one range, the same in the
    forward product (K split) and the weight gradient (M split) of a layer, and the same range an elementwise
    update of the matrix cut into nt blocks gives that thread (a region's block 0 is always the caller's).  With
    `cv` (double only, op(A) = A, split M or K), each piece first fills the rows (M) or columns (K) of A it reads."""
    cdef Py_ssize_t q = t * p.pieces // p.nt
    cdef Py_ssize_t q_end = (t + 1) * p.pieces // p.nt
    cdef bint first = True
    cdef floating *dst = c
    cdef Py_ssize_t ld = ldc
    cdef floating b0 = beta
    cdef Py_ssize_t lo, hi
    if p.split == SPLIT_K and t > 0:
        dst = scratch + (t - 1) * m * n
        ld = n
        b0 = 0
    while q < q_end:
        if floating is double:
            if cv != NULL:
                lo = q * p.chunk
                hi = lo + p.chunk if p.lim - lo > p.chunk else p.lim
                if p.split == SPLIT_M:
                    _convert_a(cv, lo, hi, 0, k, k)
                else:
                    _convert_a(cv, 0, m, lo, hi, k)
        _gemm_piece(p, q, first, ta, tb, m, n, k, alpha, a, lda, b, ldb, b0, dst, ld)
        first = False
        q += 1


ctypedef struct _gemm_ctx:
    const gemm_plan *plan
    int ta
    int tb
    Py_ssize_t m
    Py_ssize_t n
    Py_ssize_t k
    double alpha
    double beta
    const void *a
    Py_ssize_t lda
    const void *b
    Py_ssize_t ldb
    void *c
    Py_ssize_t ldc
    void *scratch
    const a_source *cv


cdef void _gemm_threads_f(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _gemm_ctx *x = <_gemm_ctx*>ctx
    cdef Py_ssize_t t
    for t in range(lo, hi):
        _gemm_thread[float](x.plan, t, x.ta, x.tb, x.m, x.n, x.k, <float>x.alpha, <const float*>x.a, x.lda,
                            <const float*>x.b, x.ldb, <float>x.beta, <float*>x.c, x.ldc, <float*>x.scratch, NULL)


cdef void _gemm_threads_d(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _gemm_ctx *x = <_gemm_ctx*>ctx
    cdef Py_ssize_t t
    for t in range(lo, hi):
        _gemm_thread[double](x.plan, t, x.ta, x.tb, x.m, x.n, x.k, x.alpha, <const double*>x.a, x.lda,
                             <const double*>x.b, x.ldb, x.beta, <double*>x.c, x.ldc, <double*>x.scratch, x.cv)


cdef inline void _gemm_split(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                             const floating *a, Py_ssize_t lda, const floating *b, Py_ssize_t ldb, floating beta,
                             floating *c, Py_ssize_t ldc, const a_source *cv) noexcept nogil:
    """C = alpha op(A) op(B) + beta C for any m, n, k >= 0 (BLAS rejects empty operands), split over threads.
    `cv` (double only; op(A) = A, lda = k): A is first filled from float32 data, by the pieces that read it when
    the product is split over M or K (see dgemm_from_f32), else all of it here, before the product."""
    cdef Py_ssize_t i, j, t
    cdef int nt, bt
    cdef gemm_plan p
    cdef _gemm_ctx ctx
    cdef floating *scratch = NULL
    cdef floating *src
    if floating is double:
        if cv != NULL and (m == 0 or n == 0 or k == 0):
            _convert_a(cv, 0, m, 0, k, k)
            cv = NULL
    if m == 0 or n == 0:
        return
    if k == 0:
        # op(A) @ op(B) is all zeros: C = beta * C
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    # inside a block of a region the product runs on this thread alone, planned for one thread: its pieces (and
    # so its bits) do not depend on the thread count, which lets a kernel's blocks promise the same results
    nt = _gemm_nthreads if threads_usable() and not in_region() else 1
    bt = _blas_threads_for(m, n, k, nt)
    if bt > 1:
        if floating is double:
            if cv != NULL:
                _convert_a(cv, 0, m, 0, k, k)
        fb_gemm_lock()
        _blas_set_threads(bt)
        _blas_call(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        _blas_set_threads(1)
        fb_gemm_unlock()
        return
    _make_plan(ta, tb, m, n, k, nt, _small_mnk, &p, CV_K_ALIGN if cv != NULL else 1)
    if floating is double:
        if cv != NULL and (p.pieces <= 1 or p.split == SPLIT_N):
            _convert_a(cv, 0, m, 0, k, k)
            cv = NULL
    if p.pieces <= 1:
        _blas_call(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    if p.split == SPLIT_K and p.nt > 1:
        scratch = <floating*>malloc(<size_t>(p.nt - 1) * <size_t>m * <size_t>n * sizeof(floating))
        if scratch == NULL:
            p.nt = 1
    if p.nt <= 1:
        _gemm_thread(&p, 0, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, NULL, cv)
        return
    ctx.plan = &p
    ctx.ta = ta
    ctx.tb = tb
    ctx.m = m
    ctx.n = n
    ctx.k = k
    ctx.alpha = alpha
    ctx.beta = beta
    ctx.a = a
    ctx.lda = lda
    ctx.b = b
    ctx.ldb = ldb
    ctx.c = c
    ctx.ldc = ldc
    ctx.scratch = scratch
    ctx.cv = cv
    # one block per thread: block t runs thread t's pieces (on OpenMP thread t: static schedule)
    if floating is float:
        parallel_blocks_macs(p.nt, 1, _gemm_threads_f, &ctx, p.nt, <double>m * n * k)
    else:
        parallel_blocks_macs(p.nt, 1, _gemm_threads_d, &ctx, p.nt, <double>m * n * k)
    if p.split == SPLIT_K:
        for t in range(1, p.nt):
            src = scratch + (t - 1) * m * n
            for i in range(m):
                for j in range(n):
                    c[i * ldc + j] += src[i * n + j]
        free(scratch)


cdef void sgemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, float alpha,
                const float *a, Py_ssize_t lda, const float *b, Py_ssize_t ldb, float beta,
                float *c, Py_ssize_t ldc) noexcept nogil:
    _gemm_split[float](ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, NULL)


cdef void dgemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, double alpha,
                const double *a, Py_ssize_t lda, const double *b, Py_ssize_t ldb, double beta,
                double *c, Py_ssize_t ldc) noexcept nogil:
    _gemm_split[double](ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, NULL)


cdef void dgemm_from_f32(int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, double alpha,
                         const float *src, Py_ssize_t s0, Py_ssize_t s1, double *a,
                         const double *b, Py_ssize_t ldb, double beta, double *c, Py_ssize_t ldc) noexcept nogil:
    cdef a_source cv
    cv.src = src
    cv.s0 = s0
    cv.s1 = s1
    cv.dst = a
    _gemm_split[double](FB_NOTRANS, tb, m, n, k, alpha, a, k if k > 1 else 1, b, ldb, beta, c, ldc, &cv)


# ---------------------------------------------------------------------------------------------------------------
# Validation for def wrappers
# ---------------------------------------------------------------------------------------------------------------
cpdef check_blas_dims(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, Py_ssize_t lda=1, Py_ssize_t ldb=1,
                      Py_ssize_t ldc=1):
    """ValueError naming the first of m, n, k, lda, ldb, ldc that BLAS's 32-bit interface cannot take (>= 2**31)."""
    for name, v in (("m", m), ("n", n), ("k", k), ("lda", lda), ("ldb", ldb), ("ldc", ldc)):
        if v > FB_INT_MAX:
            raise ValueError(f"matrix product dimension {name} = {v} is >= 2**31: BLAS's 32-bit interface "
                             f"(fastbp's scipy-openblas32) takes at most 2**31 - 1")


cdef int _blas_layout(cnp.ndarray a, int *trans, Py_ssize_t *ld) except -1:
    """Describe a 2-D operand to row-major CBLAS: (trans, ld).  Returns 0, or 1 if it needs a contiguous copy."""
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(a)
    cdef Py_ssize_t r = cnp.PyArray_DIM(a, 0), c = cnp.PyArray_DIM(a, 1)
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(a, 0), s1 = cnp.PyArray_STRIDE(a, 1), lead
    if s0 % isz or s1 % isz:
        return 1
    s0 //= isz
    s1 //= isz
    # row-major: unit column stride (irrelevant for one column), row stride >= columns (irrelevant for one row)
    if (s1 == 1 or c <= 1) and (r <= 1 or s0 >= c):
        lead = s0 if r > 1 else c
        trans[0] = FB_NOTRANS
    # column-major: the row-major transpose of a (c, r) matrix
    elif (s0 == 1 or r <= 1) and (c <= 1 or s1 >= r):
        lead = s1 if c > 1 else r
        trans[0] = FB_TRANS
    else:
        return 1
    if lead < 1:
        lead = 1
    if lead > FB_INT_MAX:
        return 1
    ld[0] = lead
    return 0


cdef cnp.ndarray blas_operand(cnp.ndarray a, int *trans, Py_ssize_t *ld):
    """Return `a` itself when BLAS can read it in place, else one C-contiguous copy of it."""
    if _blas_layout(a, trans, ld) == 0:
        return a
    a = np.ascontiguousarray(a)
    _blas_layout(a, trans, ld)
    return a


def gemm_py(a, b, out, bint trans_a=False, bint trans_b=False, double alpha=1.0, double beta=0.0):
    """out = alpha * op(a) @ op(b) + beta * out  (op = transpose when trans_* is true); returns out."""
    cdef int t = ftype(a, "a")
    same_type(t, b, "b")
    same_type(t, out, "out")
    cdef cnp.ndarray A = <cnp.ndarray>a, B = <cnp.ndarray>b, C = <cnp.ndarray>out
    check_ndim(A, 2, "a"); check_ndim(B, 2, "b"); check_ndim(C, 2, "out")
    cdef Py_ssize_t m = cnp.PyArray_DIM(A, 1 if trans_a else 0)
    cdef Py_ssize_t k = cnp.PyArray_DIM(A, 0 if trans_a else 1)
    cdef Py_ssize_t kb = cnp.PyArray_DIM(B, 1 if trans_b else 0)
    cdef Py_ssize_t n = cnp.PyArray_DIM(B, 0 if trans_b else 1)
    if k != kb:
        raise ValueError(f"inner dimensions differ: op(a) is ({m}, {k}), op(b) is ({kb}, {n})")
    check_shape2(C, m, n, "out")
    check_blas_dims(m, n, k)
    check_out(C, "out")
    check_no_overlap(C, A, "out", "a")
    check_no_overlap(C, B, "out", "b")
    cdef int ta, tb
    cdef Py_ssize_t lda, ldb
    A = blas_operand(A, &ta, &lda)
    B = blas_operand(B, &tb, &ldb)
    if trans_a:
        ta = flip_trans(ta)
    if trans_b:
        tb = flip_trans(tb)
    cdef Py_ssize_t ldc = n if n > 1 else 1
    with nogil:
        if t == 0:
            sgemm(ta, tb, m, n, k, <float>alpha, <float*>cnp.PyArray_DATA(A), lda,
                  <float*>cnp.PyArray_DATA(B), ldb, <float>beta, <float*>cnp.PyArray_DATA(C), ldc)
        else:
            dgemm(ta, tb, m, n, k, alpha, <double*>cnp.PyArray_DATA(A), lda,
                  <double*>cnp.PyArray_DATA(B), ldb, beta, <double*>cnp.PyArray_DATA(C), ldc)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Test hook: GEMMs run from inside a parallel region (each block of parallel_blocks computes one product)
# ---------------------------------------------------------------------------------------------------------------
ctypedef struct _nested_ctx:
    Py_ssize_t m
    Py_ssize_t n
    Py_ssize_t k
    const double *a
    const double *b
    double *c            # OUT nblocks products of (m, n), one after the other
    int *route           # OUT per block: OpenBLAS threads the route would give this product there (0: pieces)


cdef void _nested_block(void *ctx, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t j) noexcept nogil:
    cdef _nested_ctx *x = <_nested_ctx*>ctx
    x.route[j] = _blas_threads_for(x.m, x.n, x.k, 2)
    dgemm(FB_NOTRANS, FB_NOTRANS, x.m, x.n, x.k, 1.0, x.a, x.k, x.b, x.n, 0.0, x.c + j * x.m * x.n, x.n)


def _gemm_in_blocks(double[:, ::1] a, double[:, ::1] b, Py_ssize_t nblocks, bint with_route=False):
    """For tests: nblocks copies of a @ b, each computed by dgemm inside one block of parallel_blocks (and with
    `with_route`, also what the route to OpenBLAS's own threads gave each block: 0 = not taken)."""
    if a.shape[1] != b.shape[0] or a.shape[0] < 1 or a.shape[1] < 1 or b.shape[1] < 1 or nblocks < 1:
        raise ValueError("need a (m, k) and b (k, n) with m, n, k >= 1 and nblocks >= 1")
    check_blas_dims(a.shape[0], b.shape[1], a.shape[1])
    out = np.empty((nblocks, a.shape[0], b.shape[1]))
    cdef double[:, :, ::1] o = out
    route = np.zeros(nblocks, dtype=np.intc)
    cdef int[::1] r = route
    cdef _nested_ctx ctx
    ctx.route = &r[0]
    ctx.m = a.shape[0]
    ctx.n = b.shape[1]
    ctx.k = a.shape[1]
    ctx.a = &a[0, 0]
    ctx.b = &b[0, 0]
    ctx.c = &o[0, 0, 0]
    with nogil:
        parallel_blocks(nblocks, 1, _nested_block, &ctx)
    return (out, route) if with_route else out


# Load the function table now (fastbp._blas finds the library, picks its kernels and threading, and calls
# _set_gemm above): every kernel may then call the BLAS without checking.
from fastbp import _blas as _blas_loader
_blas_loader.ensure_loaded()
