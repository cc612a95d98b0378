# Design
# ------
# Every hot loop of fastbp lives in this file.  Each public `def` is a thin wrapper: it checks ndim, shapes,
# dtypes, layout and writability of the NumPy arrays it is given with C-level macros (cheap enough for batch-1
# work), raises a ValueError/TypeError naming expected vs actual, and then calls a `noexcept nogil` kernel on raw
# pointers.  Kernels only touch memory the wrapper has validated, so they never index out of bounds.
#
# * Element types: float32 and float64 through the fused type `floating`; the wrappers dispatch on the dtype
#   number once.  Reductions over float32 data accumulate in double.
# * Matrix products go through a real BLAS: fastbp's own copy of OpenBLAS (package scipy-openblas32), whose
#   cblas_?gemm entry points are handed to this module as function pointers by fastbp/_blas.py (see there why a
#   separate copy).  Any 2-D operand with one unit stride is passed with a leading dimension and a transpose flag:
#   no `.T` copies are made.
# * Elementwise kernels work on contiguous buffers; large ones are split over OpenMP threads when the build has
#   OpenMP (prange degrades to a serial loop otherwise).
# * Outputs are always written into arrays handed in by the caller (`out=`-style), so the layer classes decide
#   what to allocate and what to reuse.
cimport cython
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.stdint cimport int64_t, int32_t, uint8_t, intptr_t
cimport numpy as cnp
import numpy as np

cnp.import_array()

ctypedef fused floating:
    float
    double

cdef extern from *:
    """
    #include <pthread.h>
    #include <stddef.h>
    /* GNU OpenMP cannot start a parallel region in a child forked from a process whose OpenMP threads were
       running (the child hangs), so after a fork fastbp runs single-threaded in the child: fb_omp_ok = 0. */
    static int fb_omp_ok = 1;
    #if FASTBP_OPENMP
    #include <omp.h>
    static int fastbp_max_threads(void) { return fb_omp_ok ? omp_get_max_threads() : 1; }
    #else
    static int fastbp_max_threads(void) { return 1; }
    #endif

    /* OpenBLAS's caller-managed threading (openblas_set_threads_callback_function): OpenBLAS hands us its
       `numjobs` parallel jobs and we run them on fastbp's OpenMP team, so the elementwise kernels and the GEMMs
       share one pool of worker threads instead of two pools spinning against each other on the same cores.
       The jobs of a level-3 call wait for each other, so they must all run at once: when an OpenMP team of
       numjobs threads cannot be had (called inside a parallel region, dynamic teams, a thread limit), the jobs
       run on freshly created threads instead. */
    typedef void (*fb_dojob_t)(int thread_num, void *jobdata, int dojob_data);
    typedef struct { fb_dojob_t dojob; void *job; int thread_num; int data; } fb_job_t;
    static void *fb_job_main(void *arg) {
        fb_job_t *j = (fb_job_t *)arg;
        j->dojob(j->thread_num, j->job, j->data);
        return NULL;
    }
    static int fb_run_jobs_on_pthreads(fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
        pthread_t tids[64];
        fb_job_t jobs[64];
        int i, started = 0;
        if (numjobs > 64) return -1;
        for (i = 1; i < numjobs; i++) {
            jobs[i].dojob = dojob; jobs[i].job = (char *)jobdata + (size_t)i * elsize;
            jobs[i].thread_num = i; jobs[i].data = data;
            if (pthread_create(&tids[i], NULL, fb_job_main, &jobs[i]) != 0) break;
            started = i;
        }
        if (started != numjobs - 1) {            /* could not start them all: run the rest here, in order */
            for (i = started + 1; i < numjobs; i++) dojob(i, (char *)jobdata + (size_t)i * elsize, data);
        }
        dojob(0, jobdata, data);
        for (i = 1; i <= started; i++) pthread_join(tids[i], NULL);
        return 0;
    }
    static void fb_blas_threads(int sync, fb_dojob_t dojob, int numjobs, size_t elsize, void *jobdata, int data) {
        (void)sync;
        if (numjobs <= 1) {
            if (numjobs == 1) dojob(0, jobdata, data);
            return;
        }
    #if FASTBP_OPENMP
        if (fb_omp_ok && !omp_in_parallel() && !omp_get_dynamic() && omp_get_thread_limit() >= numjobs
                && numjobs <= 64) {
            #pragma omp parallel num_threads(numjobs)
            {
                int t = omp_get_thread_num(), nt = omp_get_num_threads(), i;
                for (i = t; i < numjobs; i += nt)
                    dojob(t, (char *)jobdata + (size_t)i * elsize, data);
            }
            return;
        }
    #endif
        if (fb_run_jobs_on_pthreads(dojob, numjobs, elsize, jobdata, data) != 0) {
            int i;       /* more than 64 jobs (never with OpenBLAS's MAX_THREADS here): serial, last resort */
            for (i = 0; i < numjobs; i++) dojob(i, (char *)jobdata + (size_t)i * elsize, data);
        }
    }
    static void *fb_blas_threads_address(void) { return (void *)fb_blas_threads; }
    """
    int fastbp_max_threads() noexcept nogil
    int FASTBP_OPENMP
    int fb_omp_ok
    void *fb_blas_threads_address() noexcept

# ---------------------------------------------------------------------------------------------------------------
# BLAS
# ---------------------------------------------------------------------------------------------------------------
ctypedef void (*sgemm_ptr)(int order, int transa, int transb, int m, int n, int k, float alpha,
                           const float *a, int lda, const float *b, int ldb, float beta,
                           float *c, int ldc) noexcept nogil
ctypedef void (*dgemm_ptr)(int order, int transa, int transb, int m, int n, int k, double alpha,
                           const double *a, int lda, const double *b, int ldb, double beta,
                           double *c, int ldc) noexcept nogil

ctypedef void (*sgemv_ptr)(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                           const float *x, int incx, float beta, float *y, int incy) noexcept nogil
ctypedef void (*dgemv_ptr)(int order, int trans, int m, int n, double alpha, const double *a, int lda,
                           const double *x, int incx, double beta, double *y, int incy) noexcept nogil

cdef sgemm_ptr _sgemm = NULL
cdef dgemm_ptr _dgemm = NULL
cdef sgemv_ptr _sgemv = NULL
cdef dgemv_ptr _dgemv = NULL
cdef enum:
    RowMajor = 101
    NoTrans = 111
    Trans = 112
    INT_MAX = 2147483647

# Elementwise work below this many elements stays on one thread: the fork/join costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN = 1 << 17


def _set_gemm(intptr_t sgemm_address, intptr_t dgemm_address, intptr_t sgemv_address,
              intptr_t dgemv_address):
    """Install the cblas_?gemm / cblas_?gemv entry points (addresses from fastbp._blas)."""
    global _sgemm, _dgemm, _sgemv, _dgemv
    if sgemm_address == 0 or dgemm_address == 0 or sgemv_address == 0 or dgemv_address == 0:
        raise ValueError("null BLAS address")
    _sgemv = <sgemv_ptr>sgemv_address
    _dgemv = <dgemv_ptr>dgemv_address
    _sgemm = <sgemm_ptr>sgemm_address
    _dgemm = <dgemm_ptr>dgemm_address


def _after_fork_in_child():
    """Called in a forked child (os.register_at_fork): no OpenMP parallel region from now on."""
    global fb_omp_ok
    fb_omp_ok = 0


import os as _os
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)


def _blas_threads_callback():
    """Address of the OpenBLAS threads callback that runs BLAS jobs on fastbp's OpenMP team (0 without OpenMP)."""
    return <intptr_t>fb_blas_threads_address() if FASTBP_OPENMP else 0


def build_info():
    """Compile-time facts about this extension: OpenMP use and the OpenMP thread count (1 in a forked child)."""
    return {"openmp": bool(FASTBP_OPENMP), "openmp_max_threads": fastbp_max_threads(),
            "parallel_min": PARALLEL_MIN, "forked_child": not fb_omp_ok}


cdef inline void _gemm(int ta, int tb, int m, int n, int k, floating alpha, const floating *a, int lda,
                       const floating *b, int ldb, floating beta, floating *c, int ldc) noexcept nogil:
    """C[m, n] = alpha * op(A) @ op(B) + beta * C, all row-major with leading dimensions.

    A single row of C (batch 1) is a matrix-vector product: GEMV reads op(B) once, where OpenBLAS's GEMM with
    m = 1 is several times slower on wide layers."""
    if m == 1:
        # c = alpha * op(B)^T a + beta * c; op(A)'s one row is contiguous (NoTrans) or strided by lda (Trans)
        if floating is float:
            if tb == NoTrans:
                _sgemv(RowMajor, Trans, k, n, alpha, b, ldb, a, 1 if ta == NoTrans else lda, beta, c, 1)
            else:
                _sgemv(RowMajor, NoTrans, n, k, alpha, b, ldb, a, 1 if ta == NoTrans else lda, beta, c, 1)
        else:
            if tb == NoTrans:
                _dgemv(RowMajor, Trans, k, n, alpha, b, ldb, a, 1 if ta == NoTrans else lda, beta, c, 1)
            else:
                _dgemv(RowMajor, NoTrans, n, k, alpha, b, ldb, a, 1 if ta == NoTrans else lda, beta, c, 1)
        return
    if floating is float:
        _sgemm(RowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    else:
        _dgemm(RowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers (Python level, called once per wrapper call)
# ---------------------------------------------------------------------------------------------------------------
cdef inline object _shp(object a):
    return (<object>a).shape


cdef inline object _dt(object a):
    return (<object>a).dtype


cdef inline int _ftype(object a, str name) except -1:
    """0 for float32, 1 for float64 native arrays; TypeError otherwise."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t == cnp.NPY_FLOAT32 and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        return 0
    if t == cnp.NPY_FLOAT64 and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        return 1
    raise TypeError(f"{name} must be native float32 or float64, got {_dt(a)}")


cdef inline _same_type(int expected, object a, str name):
    cdef int t = _ftype(a, name)
    if t != expected:
        raise TypeError(f"{name} must have dtype {'float64' if expected else 'float32'} like the other "
                        f"operands, got {_dt(a)}")


cdef inline _check_ndim(cnp.ndarray a, int nd, str name):
    if cnp.PyArray_NDIM(a) != nd:
        raise ValueError(f"{name} must be {nd}-D, got {cnp.PyArray_NDIM(a)}-D array of shape {_shp(a)}")


cdef inline _check_out(cnp.ndarray a, str name):
    """Outputs must be writeable and C-contiguous (fastbp allocates them so)."""
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} is read-only")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous")


cdef inline _check_contig(cnp.ndarray a, str name):
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")


cdef inline _check_shape2(cnp.ndarray a, Py_ssize_t r, Py_ssize_t c, str name):
    if cnp.PyArray_DIM(a, 0) != r or cnp.PyArray_DIM(a, 1) != c:
        raise ValueError(f"{name} must have shape ({r}, {c}), got {_shp(a)}")


cdef inline _check_same_shape(cnp.ndarray a, cnp.ndarray ref, str name, str refname):
    cdef int nd = cnp.PyArray_NDIM(ref)
    cdef int i
    if cnp.PyArray_NDIM(a) != nd:
        raise ValueError(f"{name} must have the shape of {refname} {_shp(ref)}, got {_shp(a)}")
    for i in range(nd):
        if cnp.PyArray_DIM(a, i) != cnp.PyArray_DIM(ref, i):
            raise ValueError(f"{name} must have the shape of {refname} {_shp(ref)}, got {_shp(a)}")


cdef inline _check_int_dims(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c):
    if a > INT_MAX or b > INT_MAX or c > INT_MAX:
        raise ValueError("matrix dimension exceeds the 32-bit BLAS interface (2**31 - 1)")


cdef inline void _extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    """Byte range [lo, hi) spanned by `a` (lo == hi when it is empty)."""
    cdef int i, nd = cnp.PyArray_NDIM(a)
    cdef Py_ssize_t d, s
    cdef char *l = <char*>cnp.PyArray_DATA(a)
    cdef char *h = l
    for i in range(nd):
        d = cnp.PyArray_DIM(a, i)
        if d == 0:
            lo[0] = l
            hi[0] = l
            return
        s = cnp.PyArray_STRIDE(a, i) * (d - 1)
        if s > 0:
            h += s
        else:
            l += s
    lo[0] = l
    hi[0] = h + cnp.PyArray_ITEMSIZE(a)


cdef inline _check_no_overlap(object out, object inp, str outname, str inname, bint allow_same=False):
    """ValueError when the output's memory range meets an input's (identical arrays allowed for pointwise kernels)."""
    if out is None or inp is None:
        return
    cdef cnp.ndarray o = <cnp.ndarray>out, a = <cnp.ndarray>inp
    cdef char *olo
    cdef char *ohi
    cdef char *alo
    cdef char *ahi
    _extent(o, &olo, &ohi)
    _extent(a, &alo, &ahi)
    if olo < ahi and alo < ohi:
        if allow_same and cnp.PyArray_DATA(o) == cnp.PyArray_DATA(a) and cnp.PyArray_SIZE(o) == cnp.PyArray_SIZE(a) \
                and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_IS_C_CONTIGUOUS(o):
            return
        raise ValueError(f"{outname} overlaps {inname} in memory: outputs must not share memory with inputs")


cdef int _blas_layout(cnp.ndarray a, int *trans, int *ld) except -1:
    """Describe a 2-D operand to row-major CBLAS: (trans, ld).  Returns 0, or 1 if it needs a contiguous copy."""
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(a)
    cdef Py_ssize_t r = cnp.PyArray_DIM(a, 0), c = cnp.PyArray_DIM(a, 1)
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(a, 0), s1 = cnp.PyArray_STRIDE(a, 1), l
    if s0 % isz or s1 % isz:
        return 1
    s0 //= isz
    s1 //= isz
    # row-major: unit column stride (irrelevant for one column), row stride >= columns (irrelevant for one row)
    if (s1 == 1 or c <= 1) and (r <= 1 or s0 >= c):
        l = s0 if r > 1 else c
        trans[0] = NoTrans
    # column-major: the row-major transpose of a (c, r) matrix
    elif (s0 == 1 or r <= 1) and (c <= 1 or s1 >= r):
        l = s1 if c > 1 else r
        trans[0] = Trans
    else:
        return 1
    if l < 1:
        l = 1
    if l > INT_MAX:
        return 1
    ld[0] = <int>l
    return 0


cdef inline int _flip(int t) noexcept nogil:
    return Trans if t == NoTrans else NoTrans


cdef cnp.ndarray _blas_operand(cnp.ndarray a, int *trans, int *ld):
    """Return `a` itself when BLAS can read it in place, else one C-contiguous copy of it."""
    if _blas_layout(a, trans, ld) == 0:
        return a
    a = np.ascontiguousarray(a)
    _blas_layout(a, trans, ld)
    return a


def _require_blas():
    if _sgemm == NULL:
        from fastbp import _blas
        _blas.ensure_loaded()


# ---------------------------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------------------------
def gemm(a, b, out, bint trans_a=False, bint trans_b=False, double alpha=1.0, double beta=0.0):
    """out = alpha * op(a) @ op(b) + beta * out  (op = transpose when trans_* is true); returns out."""
    if _sgemm == NULL:
        _require_blas()
    cdef int t = _ftype(a, "a")
    _same_type(t, b, "b")
    _same_type(t, out, "out")
    cdef cnp.ndarray A = <cnp.ndarray>a, B = <cnp.ndarray>b, C = <cnp.ndarray>out
    _check_ndim(A, 2, "a"); _check_ndim(B, 2, "b"); _check_ndim(C, 2, "out")
    _check_out(C, "out")
    cdef Py_ssize_t m = cnp.PyArray_DIM(A, 1 if trans_a else 0)
    cdef Py_ssize_t k = cnp.PyArray_DIM(A, 0 if trans_a else 1)
    cdef Py_ssize_t kb = cnp.PyArray_DIM(B, 1 if trans_b else 0)
    cdef Py_ssize_t n = cnp.PyArray_DIM(B, 0 if trans_b else 1)
    if k != kb:
        raise ValueError(f"inner dimensions differ: op(a) is ({m}, {k}), op(b) is ({kb}, {n})")
    _check_shape2(C, m, n, "out")
    _check_int_dims(m, n, k)
    _check_no_overlap(C, A, "out", "a")
    _check_no_overlap(C, B, "out", "b")
    cdef int ta, tb, lda, ldb
    A = _blas_operand(A, &ta, &lda)
    B = _blas_operand(B, &tb, &ldb)
    if trans_a:
        ta = _flip(ta)
    if trans_b:
        tb = _flip(tb)
    cdef int ldc = <int>(n if n > 1 else 1)
    with nogil:
        if t == 0:
            _gemm_safe[float](ta, tb, <int>m, <int>n, <int>k, <float>alpha, <float*>cnp.PyArray_DATA(A), lda,
                              <float*>cnp.PyArray_DATA(B), ldb, <float>beta, <float*>cnp.PyArray_DATA(C), ldc)
        else:
            _gemm_safe[double](ta, tb, <int>m, <int>n, <int>k, alpha, <double*>cnp.PyArray_DATA(A), lda,
                               <double*>cnp.PyArray_DATA(B), ldb, beta, <double*>cnp.PyArray_DATA(C), ldc)
    return out


# GEMM threading and piece sizes.  With OpenMP, fastbp's OpenBLAS runs single-threaded and fastbp cuts a product
# into independent pieces, each a single-threaded BLAS call, handed out round-robin to its OpenMP threads:
#   split M (rows of C)     - every piece packs all of op(B): chosen when op(B) is the smallest operand,
#   split N (columns of C)  - every piece packs all of op(A): chosen when op(A) is the smallest,
#   split K (inner dim)     - nothing is packed twice, but the pieces of threads 1.. accumulate into scratch that is
#                             then added to C in thread order: chosen when C is the smallest.
# How many pieces: one per thread for a product of at least GEMM_PARALLEL_MIN multiply-adds; but where OpenBLAS
# has a "small matrix" kernel (its SkylakeX family; fastbp._blas sets _small_mnk), a product of up to
# SMALL_SPLIT_MAX pieces is cut into pieces of at most _small_mnk multiply-adds, which that kernel runs without
# packing.  Measured single-threaded at 100 x K x 50: sgemm 205 GFLOP/s up to M*N*K = 10^6, 170 above; dgemm 113
# vs 73.  OpenBLAS does not use that kernel for row-major (NoTrans, Trans), so those keep one piece per thread.
# The pieces depend only on the sizes and the thread count, never on the team OpenMP actually forms, so results
# are reproducible.
cdef int _gemm_nthreads = 1
cdef double GEMM_PARALLEL_MIN = 1 << 19      # m * n * k below this: one thread
cdef double _small_mnk = 0                   # 0: no small-matrix kernel to aim for
cdef int SMALL_SPLIT_MAX = 16                # at most this many small pieces; bigger products split per thread


def _set_gemm_threads(int n):
    """Threads fastbp splits a large GEMM over (1 = one thread, or OpenBLAS's own threading in its modes)."""
    global _gemm_nthreads
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    _gemm_nthreads = n


def _get_gemm_threads():
    """Threads a large GEMM is split over (1 in a forked child, see _after_fork_in_child)."""
    return _gemm_nthreads if fb_omp_ok else 1


def _set_small_mnk(double mnk):
    """Largest m*n*k that OpenBLAS's small-matrix kernel takes (0: none); GEMMs are cut into pieces that size."""
    global _small_mnk
    if mnk < 0:
        raise ValueError(f"small-matrix size must be >= 0, got {mnk}")
    _small_mnk = mnk


def _get_small_mnk():
    return _small_mnk


cdef inline void _gemm_piece(int split, int q, int pieces, bint first, int ta, int tb, int m, int n, int k,
                             floating alpha, const floating *a, int lda, const floating *b, int ldb,
                             floating beta, floating *c, int ldc) noexcept nogil:
    """Piece q of `pieces` of C = alpha op(A) op(B) + beta C split along M (0), N (1) or K (2).  For K, `c` is
    the destination of this thread (C or its scratch) and `first` says whether beta applies (else beta = 1)."""
    cdef int size = m if split == 0 else (n if split == 1 else k)
    cdef int chunk = (size + pieces - 1) // pieces
    cdef int lo = q * chunk
    cdef int hi = lo + chunk
    if hi > size:
        hi = size
    if lo >= hi:
        return
    if split == 0:
        _gemm(ta, tb, hi - lo, n, k, alpha, a + (<Py_ssize_t>lo * lda if ta == NoTrans else lo), lda, b, ldb,
              beta, c + <Py_ssize_t>lo * ldc, ldc)
    elif split == 1:
        _gemm(ta, tb, m, hi - lo, k, alpha, a, lda, b + (lo if tb == NoTrans else <Py_ssize_t>lo * ldb), ldb,
              beta, c + lo, ldc)
    else:
        _gemm(ta, tb, m, n, hi - lo, alpha, a + (lo if ta == NoTrans else <Py_ssize_t>lo * lda), lda,
              b + (<Py_ssize_t>lo * ldb if tb == NoTrans else lo), ldb, beta if first else <floating>1, c, ldc)


cdef inline void _gemm_thread(int split, int t, int nt, int pieces, int ta, int tb, int m, int n, int k,
                              floating alpha, const floating *a, int lda, const floating *b, int ldb,
                              floating beta, floating *c, int ldc, floating *scratch) noexcept nogil:
    """The pieces t, t + nt, ... of thread t (K split: into C for thread 0, else into its scratch)."""
    cdef int q
    cdef bint first = True
    cdef floating *dst = c
    cdef int ld = ldc
    cdef floating b0 = beta
    if split == 2 and t > 0:
        dst = scratch + <Py_ssize_t>(t - 1) * m * n
        ld = n
        b0 = 0
    q = t
    while q < pieces:
        _gemm_piece(split, q, pieces, first, ta, tb, m, n, k, alpha, a, lda, b, ldb, b0, dst, ld)
        first = False
        q += nt


cdef inline void _gemm_safe(int ta, int tb, int m, int n, int k, floating alpha, const floating *a, int lda,
                            const floating *b, int ldb, floating beta, floating *c, int ldc) noexcept nogil:
    """_gemm that handles empty dimensions itself (BLAS rejects zero leading dimensions) and cuts products into
    pieces over fastbp's threads (see above)."""
    cdef Py_ssize_t i, j
    cdef int nt = _gemm_nthreads if fb_omp_ok else 1, t, split, lim, pieces = 1, chunk
    cdef double sa, sb, sc, other, mnk = <double>m * n * k
    cdef floating *scratch = NULL
    if m == 0 or n == 0:
        return
    if k == 0:
        # op(A) @ op(B) is all zeros: C = beta * C
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    sa = <double>m * k
    sb = <double>k * n
    sc = <double>m * n * 2          # K split: scratch written and read back
    if sb <= sa and sb <= sc:
        split = 0
        lim = m
        other = sb
    elif sa <= sb and sa <= sc:
        split = 1
        lim = n
        other = sa
    else:
        split = 2
        lim = k
        other = sc / 2
    if (_small_mnk > 0 and mnk > _small_mnk and not (ta == NoTrans and tb == Trans)
            and mnk <= _small_mnk * SMALL_SPLIT_MAX):
        pieces = <int>((mnk + _small_mnk - 1) // _small_mnk)
        if pieces % nt:
            pieces += nt - pieces % nt
        chunk = (lim + pieces - 1) // pieces
        while chunk * other > _small_mnk and pieces < lim:
            pieces += nt
            chunk = (lim + pieces - 1) // pieces
    elif nt > 1 and mnk >= GEMM_PARALLEL_MIN:
        pieces = nt
    else:
        nt = 1
    if pieces > lim:
        pieces = lim
    # Every piece non-empty: with chunk = ceil(lim / pieces), only ceil(lim / chunk) pieces hold any of the lim
    # rows/columns (lim = 225 in 16 pieces: chunk 15, so 15 pieces).  Then every thread t < nt owns piece t and
    # writes its K-split scratch, which is summed into C whether or not a thread was given work.
    if pieces > 1:
        chunk = (lim + pieces - 1) // pieces
        pieces = (lim + chunk - 1) // chunk
    if nt > pieces:
        nt = pieces
    if pieces <= 1:
        _gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return
    if split == 2 and nt > 1:
        scratch = <floating*>malloc(<size_t>(nt - 1) * m * n * sizeof(floating))
        if scratch == NULL:
            nt = 1
    if nt <= 1:
        _gemm_thread(split, 0, 1, pieces, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, NULL)
        return
    for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
        _gemm_thread(split, t, nt, pieces, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, scratch)
    if split == 2:
        for t in range(1, nt):
            for i in range(m):
                for j in range(n):
                    c[i * ldc + j] += scratch[(t - 1) * <Py_ssize_t>m * n + i * n + j]
        free(scratch)


# ---------------------------------------------------------------------------------------------------------------
# Affine
# ---------------------------------------------------------------------------------------------------------------
cdef void _affine_forward(int tx, int ldx, int tw, int ldw, Py_ssize_t n, Py_ssize_t d, Py_ssize_t m,
                          const floating *x, const floating *w, const floating *b, floating *out) noexcept nogil:
    """out[n, m] = x[n, d] @ w[d, m] + b[m]: bias broadcast, then one GEMM with beta = 1."""
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(m):
            out[i * m + j] = b[j]
    _gemm_safe(tx, tw, <int>n, <int>m, <int>d, <floating>1, x, ldx, w, ldw, <floating>1, out, <int>(m if m > 1 else 1))


def affine_forward(x, W, b, out):
    """out = x @ W + b for x (N, D), W (D, M), b (M,) of one float dtype; out (N, M) C-contiguous; returns out."""
    if _sgemm == NULL:
        _require_blas()
    cdef int t = _ftype(x, "x")
    _same_type(t, W, "W"); _same_type(t, b, "b"); _same_type(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x, Wa = <cnp.ndarray>W, B = <cnp.ndarray>b, O = <cnp.ndarray>out
    _check_ndim(X, 2, "x"); _check_ndim(Wa, 2, "W"); _check_ndim(B, 1, "b"); _check_ndim(O, 2, "out")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), d = cnp.PyArray_DIM(X, 1), m = cnp.PyArray_DIM(Wa, 1)
    if cnp.PyArray_DIM(Wa, 0) != d:
        raise ValueError(f"x has {d} features per sample but W has {cnp.PyArray_DIM(Wa, 0)} rows "
                         f"(x {_shp(X)}, W {_shp(Wa)})")
    if cnp.PyArray_DIM(B, 0) != m:
        raise ValueError(f"b must have length {m} (the columns of W {_shp(Wa)}), got {cnp.PyArray_DIM(B, 0)}")
    _check_shape2(O, n, m, "out")
    _check_out(O, "out")
    _check_int_dims(n, d, m)
    _check_no_overlap(O, X, "out", "x"); _check_no_overlap(O, Wa, "out", "W"); _check_no_overlap(O, B, "out", "b")
    if not cnp.PyArray_IS_C_CONTIGUOUS(B):
        B = np.ascontiguousarray(B)
    cdef int tx, ldx, tw, ldw
    X = _blas_operand(X, &tx, &ldx)
    Wa = _blas_operand(Wa, &tw, &ldw)
    with nogil:
        if t == 0:
            _affine_forward[float](tx, ldx, tw, ldw, n, d, m, <float*>cnp.PyArray_DATA(X),
                                   <float*>cnp.PyArray_DATA(Wa), <float*>cnp.PyArray_DATA(B),
                                   <float*>cnp.PyArray_DATA(O))
        else:
            _affine_forward[double](tx, ldx, tw, ldw, n, d, m, <double*>cnp.PyArray_DATA(X),
                                    <double*>cnp.PyArray_DATA(Wa), <double*>cnp.PyArray_DATA(B),
                                    <double*>cnp.PyArray_DATA(O))
    return out


cdef inline void _bias_backward(Py_ssize_t n, Py_ssize_t m, const floating *dout, floating *db,
                                double *acc) noexcept nogil:
    """db[j] = sum_i dout[i, j], accumulated in double (acc is an m-long scratch row)."""
    if floating is float:
        fb_colsum_f32(n, m, dout, db, acc)
    else:
        fb_colsum_f64(n, m, dout, db, acc)


cdef int _affine_backward(int tx, int ldx, int tw, int ldw, Py_ssize_t n, Py_ssize_t d, Py_ssize_t m,
                          const floating *dout, const floating *x, const floating *w,
                          floating *dx, floating *dw, floating *db) noexcept nogil:
    """dx = dout @ W.T (skipped when dx is NULL), dW = x.T @ dout, db = sum_rows(dout).  -1 if out of memory."""
    cdef double *acc
    cdef int ldd = <int>(m if m > 1 else 1)
    if dx != NULL:
        _gemm_safe(NoTrans, _flip(tw), <int>n, <int>d, <int>m, <floating>1, dout, ldd, w, ldw,
                   <floating>0, dx, <int>(d if d > 1 else 1))
    _gemm_safe(_flip(tx), NoTrans, <int>d, <int>m, <int>n, <floating>1, x, ldx, dout, ldd,
               <floating>0, dw, ldd)
    acc = <double*>malloc((m if m > 0 else 1) * sizeof(double))
    if acc == NULL:
        return -1
    _bias_backward(n, m, dout, db, acc)
    free(acc)
    return 0


def affine_backward(dout, x, W, dx, dW, db):
    """dx = dout @ W.T (dx may be None to skip it), dW = x.T @ dout, db = dout.sum(0); all written in place."""
    if _sgemm == NULL:
        _require_blas()
    cdef int t = _ftype(dout, "dout")
    _same_type(t, x, "x"); _same_type(t, W, "W"); _same_type(t, dW, "dW"); _same_type(t, db, "db")
    cdef cnp.ndarray D = <cnp.ndarray>dout, X = <cnp.ndarray>x, Wa = <cnp.ndarray>W
    cdef cnp.ndarray DW = <cnp.ndarray>dW, DB = <cnp.ndarray>db, DX = None
    _check_ndim(X, 2, "x"); _check_ndim(Wa, 2, "W"); _check_ndim(D, 2, "dout")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), d = cnp.PyArray_DIM(X, 1), m = cnp.PyArray_DIM(Wa, 1)
    if cnp.PyArray_DIM(Wa, 0) != d:
        raise ValueError(f"x has {d} features per sample but W has {cnp.PyArray_DIM(Wa, 0)} rows")
    if cnp.PyArray_DIM(D, 0) != n or cnp.PyArray_DIM(D, 1) != m:
        raise ValueError(f"dout must have shape ({n}, {m}) (the forward output), got {_shp(D)}")
    _check_ndim(DW, 2, "dW"); _check_shape2(DW, d, m, "dW"); _check_out(DW, "dW")
    _check_ndim(DB, 1, "db")
    if cnp.PyArray_DIM(DB, 0) != m:
        raise ValueError(f"db must have length {m}, got {cnp.PyArray_DIM(DB, 0)}")
    _check_out(DB, "db")
    if dx is not None:
        _same_type(t, dx, "dx")
        DX = <cnp.ndarray>dx
        _check_ndim(DX, 2, "dx"); _check_shape2(DX, n, d, "dx"); _check_out(DX, "dx")
    _check_int_dims(n, d, m)
    for o, oname in ((DX, "dx"), (DW, "dW"), (DB, "db")):
        for i, iname in ((D, "dout"), (X, "x"), (Wa, "W")):
            _check_no_overlap(o, i, oname, iname)
    _check_no_overlap(DW, DB, "dW", "db"); _check_no_overlap(DX, DW, "dx", "dW"); _check_no_overlap(DX, DB, "dx", "db")
    if not cnp.PyArray_IS_C_CONTIGUOUS(D):
        D = np.ascontiguousarray(D)
    cdef int tx, ldx, tw, ldw, rc
    X = _blas_operand(X, &tx, &ldx)
    Wa = _blas_operand(Wa, &tw, &ldw)
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
    cdef int t = _ftype(dout, "dout")
    _same_type(t, db, "db")
    cdef cnp.ndarray D = <cnp.ndarray>dout, DB = <cnp.ndarray>db
    _check_ndim(D, 2, "dout"); _check_ndim(DB, 1, "db"); _check_out(DB, "db")
    cdef Py_ssize_t n = cnp.PyArray_DIM(D, 0), m = cnp.PyArray_DIM(D, 1)
    if cnp.PyArray_DIM(DB, 0) != m:
        raise ValueError(f"db must have length {m}, got {cnp.PyArray_DIM(DB, 0)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(D):
        D = np.ascontiguousarray(D)
    cdef double *acc = <double*>malloc((m if m > 0 else 1) * sizeof(double))
    if acc == NULL:
        raise MemoryError()
    with nogil:
        if t == 0:
            _bias_backward[float](n, m, <float*>cnp.PyArray_DATA(D), <float*>cnp.PyArray_DATA(DB), acc)
        else:
            _bias_backward[double](n, m, <double*>cnp.PyArray_DATA(D), <double*>cnp.PyArray_DATA(DB), acc)
    free(acc)
    return db


# ---------------------------------------------------------------------------------------------------------------
# Elementwise: ReLU and sigmoid
# ---------------------------------------------------------------------------------------------------------------
cdef inline int _threads_for(Py_ssize_t n) noexcept nogil:
    if n < PARALLEL_MIN:
        return 1
    return fastbp_max_threads()         # 1 in a forked child


cdef inline Py_ssize_t _chunk_end(Py_ssize_t lo, Py_ssize_t chunk, Py_ssize_t n) noexcept nogil:
    """End of the chunk that starts at lo (chunk elements, clipped to n)."""
    return lo + chunk if lo + chunk < n else n


cdef inline void _relu_f(Py_ssize_t n, const floating *x, floating *out, uint8_t *mask) noexcept nogil:
    if floating is float:
        fb_relu_forward_f32(n, x, out, mask)
    else:
        fb_relu_forward_f64(n, x, out, mask)


cdef inline void _relu_b(Py_ssize_t n, const floating *dout, const uint8_t *mask, floating *dx) noexcept nogil:
    if floating is float:
        fb_relu_backward_f32(n, dout, mask, dx)
    else:
        fb_relu_backward_f64(n, dout, mask, dx)


cdef void _relu_forward(Py_ssize_t n, const floating *x, floating *out, uint8_t *mask) noexcept nogil:
    """mask = x <= 0; out = 0 where mask else x (NaN passes through with mask False); one chunk per thread."""
    cdef int nt = _threads_for(n)
    cdef Py_ssize_t k, lo, hi, chunk = (n + nt - 1) // nt
    if nt <= 1:
        _relu_f(n, x, out, mask)
        return
    for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
        lo = k * chunk
        hi = _chunk_end(lo, chunk, n)
        if lo < hi:
            _relu_f(hi - lo, x + lo, out + lo, mask + lo)


cdef void _relu_backward(Py_ssize_t n, const floating *dout, const uint8_t *mask, floating *dx) noexcept nogil:
    """dx = 0 where mask else dout; one chunk per thread."""
    cdef int nt = _threads_for(n)
    cdef Py_ssize_t k, lo, hi, chunk = (n + nt - 1) // nt
    if nt <= 1:
        _relu_b(n, dout, mask, dx)
        return
    for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
        lo = k * chunk
        hi = _chunk_end(lo, chunk, n)
        if lo < hi:
            _relu_b(hi - lo, dout + lo, mask + lo, dx + lo)


cdef inline _check_mask(object mask, cnp.ndarray ref):
    if not cnp.PyArray_Check(mask) or cnp.PyArray_TYPE(<cnp.ndarray>mask) != cnp.NPY_BOOL:
        raise TypeError(f"mask must be a numpy bool array, got {type(mask).__name__ if not cnp.PyArray_Check(mask) else (<cnp.ndarray>mask).dtype}")
    _check_same_shape(<cnp.ndarray>mask, ref, "mask", "x")


def relu_forward(x, out, mask):
    """out = max(x, 0), mask = (x <= 0); all C-contiguous of one shape; returns out."""
    cdef int t = _ftype(x, "x")
    _same_type(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x, O = <cnp.ndarray>out
    _check_contig(X, "x"); _check_same_shape(O, X, "out", "x"); _check_out(O, "out")
    _check_mask(mask, X); _check_out(<cnp.ndarray>mask, "mask")
    _check_no_overlap(O, X, "out", "x", True); _check_no_overlap(mask, X, "mask", "x")
    _check_no_overlap(mask, O, "mask", "out")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(X)
    cdef uint8_t *mp = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>mask)
    with nogil:
        if t == 0:
            _relu_forward[float](n, <float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(O), mp)
        else:
            _relu_forward[double](n, <double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(O), mp)
    return out


def relu_backward(dout, mask, dx):
    """dx = where(mask, 0, dout); dout is only read; returns dx."""
    cdef int t = _ftype(dout, "dout")
    _same_type(t, dx, "dx")
    cdef cnp.ndarray D = <cnp.ndarray>dout, DX = <cnp.ndarray>dx
    _check_contig(D, "dout"); _check_mask(mask, D)
    _check_contig(<cnp.ndarray>mask, "mask")
    _check_same_shape(DX, D, "dx", "dout"); _check_out(DX, "dx")
    _check_no_overlap(DX, D, "dx", "dout", True); _check_no_overlap(DX, mask, "dx", "mask")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(D)
    cdef const uint8_t *mp = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>mask)
    with nogil:
        if t == 0:
            _relu_backward[float](n, <float*>cnp.PyArray_DATA(D), mp, <float*>cnp.PyArray_DATA(DX))
        else:
            _relu_backward[double](n, <double*>cnp.PyArray_DATA(D), mp, <double*>cnp.PyArray_DATA(DX))
    return dx


cdef void _sigmoid_forward(Py_ssize_t n, const floating *x, floating *out) noexcept nogil:
    """out = sigmoid(x), split into one contiguous chunk per thread."""
    cdef int nt = _threads_for(n // 4)
    cdef Py_ssize_t k, lo, hi, chunk = (n + nt - 1) // nt
    if nt <= 1:
        if floating is float:
            fb_sigmoid_f32(n, x, out)
        else:
            fb_sigmoid_f64(n, x, out)
        return
    for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
        lo = k * chunk
        hi = _chunk_end(lo, chunk, n)
        if lo < hi:
            if floating is float:
                fb_sigmoid_f32(hi - lo, x + lo, out + lo)
            else:
                fb_sigmoid_f64(hi - lo, x + lo, out + lo)


cdef void _sigmoid_backward(Py_ssize_t n, const floating *dout, const floating *y, floating *dx) noexcept nogil:
    """dx = dout * (1 - y) * y, one contiguous chunk per thread for large arrays."""
    cdef Py_ssize_t i, k, lo, hi
    cdef int nt = _threads_for(n)
    cdef Py_ssize_t chunk = (n + nt - 1) // nt
    if nt <= 1:
        for i in range(n):
            dx[i] = dout[i] * (1 - y[i]) * y[i]
        return
    for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
        lo = k * chunk
        hi = _chunk_end(lo, chunk, n)
        for i in range(lo, hi):
            dx[i] = dout[i] * (1 - y[i]) * y[i]


def sigmoid_forward(x, out):
    """out = 1 / (1 + exp(-x)), stable for any finite x; returns out."""
    cdef int t = _ftype(x, "x")
    _same_type(t, out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x, O = <cnp.ndarray>out
    _check_contig(X, "x"); _check_same_shape(O, X, "out", "x"); _check_out(O, "out")
    _check_no_overlap(O, X, "out", "x", True)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(X)
    with nogil:
        if t == 0:
            _sigmoid_forward[float](n, <float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(O))
        else:
            _sigmoid_forward[double](n, <double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(O))
    return out


def sigmoid_backward(dout, y, dx):
    """dx = dout * (1 - y) * y where y is the forward output; returns dx."""
    cdef int t = _ftype(dout, "dout")
    _same_type(t, y, "y"); _same_type(t, dx, "dx")
    cdef cnp.ndarray D = <cnp.ndarray>dout, Y = <cnp.ndarray>y, DX = <cnp.ndarray>dx
    _check_contig(D, "dout"); _check_contig(Y, "y")
    _check_same_shape(D, Y, "dout", "the forward output")
    _check_same_shape(DX, D, "dx", "dout"); _check_out(DX, "dx")
    _check_no_overlap(DX, D, "dx", "dout", True); _check_no_overlap(DX, Y, "dx", "y", True)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(D)
    with nogil:
        if t == 0:
            _sigmoid_backward[float](n, <float*>cnp.PyArray_DATA(D), <float*>cnp.PyArray_DATA(Y),
                                     <float*>cnp.PyArray_DATA(DX))
        else:
            _sigmoid_backward[double](n, <double*>cnp.PyArray_DATA(D), <double*>cnp.PyArray_DATA(Y),
                                      <double*>cnp.PyArray_DATA(DX))
    return dx


# ---------------------------------------------------------------------------------------------------------------
# Softmax with cross-entropy loss
# ---------------------------------------------------------------------------------------------------------------
cdef extern from "_simd.h" nogil:
    void fb_softmax_block_f32(const float *x, float *y, float *g, long rows, long c, float scale,
                              const float *onehot, const int64_t *labels, double *rowloss) noexcept
    void fb_softmax_block_f64(const double *x, double *y, double *g, long rows, long c, double scale,
                              const double *onehot, const int64_t *labels, double *rowloss) noexcept
    void fb_relu_forward_f32(long n, const float *x, float *out, uint8_t *mask) noexcept
    void fb_relu_forward_f64(long n, const double *x, double *out, uint8_t *mask) noexcept
    void fb_relu_backward_f32(long n, const float *dout, const uint8_t *mask, float *dx) noexcept
    void fb_relu_backward_f64(long n, const double *dout, const uint8_t *mask, double *dx) noexcept
    void fb_colsum_f32(long n, long m, const float *dout, float *db, double *acc) noexcept
    void fb_colsum_f64(long n, long m, const double *dout, double *db, double *acc) noexcept
    void fb_opt_f32(int kind, long n, float *p, const float *g, float *s1, float *s2, float lr, float a, float b,
                    float eps) noexcept
    void fb_opt_f64(int kind, long n, double *p, const double *g, double *s1, double *s2, double lr, double a,
                    double b, double eps) noexcept
    void fb_sigmoid_f32(long n, const float *x, float *out) noexcept
    void fb_sigmoid_f64(long n, const double *x, double *out) noexcept
    float fb_expf(float x) noexcept
    double fb_exp(double x) noexcept


cdef double _softmax_ce(Py_ssize_t n, Py_ssize_t c, const floating *x, const int64_t *t, const floating *onehot,
                        floating *y, floating *g, double scale, double *rows) noexcept nogil:
    """y = softmax(x) row-wise; rows[i] = lse(x_i) - x_i[t_i] (or sum_j t_ij (lse - x_ij)); g = scale * (y - t).

    Row blocks go to threads; returns sum(rows) added in row order, so the loss does not depend on the thread
    count."""
    cdef Py_ssize_t i, k, lo, hi, chunk
    cdef double loss = 0
    cdef int nt = _threads_for(n * c // 8)
    if nt > n:
        nt = <int>n if n > 0 else 1
    chunk = (n + nt - 1) // nt if n > 0 else 0
    if nt <= 1:
        _softmax_block(0, n, c, x, t, onehot, y, g, scale, rows)
    else:
        for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
            lo = k * chunk
            hi = _chunk_end(lo, chunk, n)
            if lo < hi:
                _softmax_block(lo, hi, c, x, t, onehot, y, g, scale, rows)
    for i in range(n):
        loss += rows[i]
    return loss


cdef inline void _softmax_block(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t c, const floating *x, const int64_t *t,
                                const floating *onehot, floating *y, floating *g, double scale,
                                double *rows) noexcept nogil:
    cdef Py_ssize_t off = lo * c
    if floating is float:
        fb_softmax_block_f32(x + off, y + off, NULL if g == NULL else g + off, hi - lo, c, <float>scale,
                             NULL if onehot == NULL else onehot + off, NULL if t == NULL else t + lo, rows + lo)
    else:
        fb_softmax_block_f64(x + off, y + off, NULL if g == NULL else g + off, hi - lo, c, scale,
                             NULL if onehot == NULL else onehot + off, NULL if t == NULL else t + lo, rows + lo)


cdef Py_ssize_t _first_bad_label(Py_ssize_t n, const int64_t *t, int64_t c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if t[i] < 0 or t[i] >= c:
            return i
    return -1


def softmax_cross_entropy(x, t, y, grad, double scale):
    """y = softmax(x) row-wise; grad = scale * (y - onehot(t)) (grad may be None); returns sum of row losses.

    x, y, grad: C-contiguous (N, C) of one float dtype.  t: int64 labels (N,) with 0 <= t < C, or a one-hot /
    probability matrix (N, C) of x's dtype.  The row loss is the exact log-sum-exp form lse(x) - x[t].
    """
    cdef int ft = _ftype(x, "x")
    _same_type(ft, y, "y")
    cdef cnp.ndarray X = <cnp.ndarray>x, Y = <cnp.ndarray>y, G = None, T
    _check_ndim(X, 2, "x"); _check_contig(X, "x")
    _check_same_shape(Y, X, "y", "x"); _check_out(Y, "y")
    if grad is not None:
        _same_type(ft, grad, "grad")
        G = <cnp.ndarray>grad
        _check_same_shape(G, X, "grad", "x"); _check_out(G, "grad")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), c = cnp.PyArray_DIM(X, 1)
    if n > 0 and c == 0:
        raise ValueError(f"x must have at least one class column, got shape {_shp(X)}")
    if not cnp.PyArray_Check(t):
        raise TypeError(f"t must be a numpy.ndarray, got {type(t).__name__}")
    T = <cnp.ndarray>t
    _check_contig(T, "t")
    _check_no_overlap(Y, X, "y", "x"); _check_no_overlap(Y, T, "y", "t")
    _check_no_overlap(G, X, "grad", "x"); _check_no_overlap(G, T, "grad", "t"); _check_no_overlap(G, Y, "grad", "y")
    cdef void *gp = NULL if G is None else cnp.PyArray_DATA(G)
    cdef double small[64]
    cdef double *rows = &small[0]
    if n > 64:
        rows = <double*>malloc(n * sizeof(double))
    if rows == NULL:
        raise MemoryError()
    try:
        return _softmax_ce_dispatch(ft, X, T, Y, gp, n, c, scale, rows)
    finally:
        if rows != &small[0]:
            free(rows)


cdef double _softmax_ce_dispatch(int ft, cnp.ndarray X, cnp.ndarray T, cnp.ndarray Y, void *gp, Py_ssize_t n,
                                 Py_ssize_t c, double scale, double *rows) except? -1.0:
    cdef Py_ssize_t bad
    cdef double loss
    if cnp.PyArray_NDIM(T) == 1:
        if cnp.PyArray_TYPE(T) != cnp.NPY_INT64 or not cnp.PyArray_ISNOTSWAPPED(T):
            raise TypeError(f"labels must be native int64 here, got {_dt(T)}")
        if cnp.PyArray_DIM(T, 0) != n:
            raise ValueError(f"expected {n} labels (one per row of x {_shp(X)}), got {cnp.PyArray_DIM(T, 0)}")
        with nogil:
            bad = _first_bad_label(n, <int64_t*>cnp.PyArray_DATA(T), c)
        if bad >= 0:
            raise ValueError(f"label {T[bad]} at index {bad} is out of range: labels must be in [0, {c - 1}]")
        with nogil:
            if ft == 0:
                loss = _softmax_ce[float](n, c, <float*>cnp.PyArray_DATA(X), <int64_t*>cnp.PyArray_DATA(T), NULL,
                                          <float*>cnp.PyArray_DATA(Y), <float*>gp, scale, rows)
            else:
                loss = _softmax_ce[double](n, c, <double*>cnp.PyArray_DATA(X), <int64_t*>cnp.PyArray_DATA(T), NULL,
                                           <double*>cnp.PyArray_DATA(Y), <double*>gp, scale, rows)
    elif cnp.PyArray_NDIM(T) == 2:
        _same_type(ft, T, "t (one-hot)")
        _check_same_shape(T, X, "t (one-hot)", "x")
        with nogil:
            if ft == 0:
                loss = _softmax_ce[float](n, c, <float*>cnp.PyArray_DATA(X), NULL, <float*>cnp.PyArray_DATA(T),
                                          <float*>cnp.PyArray_DATA(Y), <float*>gp, scale, rows)
            else:
                loss = _softmax_ce[double](n, c, <double*>cnp.PyArray_DATA(X), NULL, <double*>cnp.PyArray_DATA(T),
                                           <double*>cnp.PyArray_DATA(Y), <double*>gp, scale, rows)
    else:
        raise ValueError(f"t must be labels (N,) or one-hot (N, C), got {cnp.PyArray_NDIM(T)}-D shape {_shp(T)}")
    return loss


def scale_into(src, double alpha, dst):
    """dst = alpha * src for C-contiguous arrays of one shape and float dtype; returns dst."""
    cdef int t = _ftype(src, "src")
    _same_type(t, dst, "dst")
    cdef cnp.ndarray S = <cnp.ndarray>src, D = <cnp.ndarray>dst
    _check_contig(S, "src"); _check_same_shape(D, S, "dst", "src"); _check_out(D, "dst")
    _check_no_overlap(D, S, "dst", "src", True)
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


# ---------------------------------------------------------------------------------------------------------------
# Optimizer updates: one fused pass per parameter array, in place
# ---------------------------------------------------------------------------------------------------------------
cdef enum:
    OPT_SGD = 0
    OPT_MOMENTUM = 1
    OPT_NESTEROV = 2
    OPT_ADAGRAD = 3
    OPT_RMSPROP = 4
    OPT_ADAM = 5


cdef inline void _opt_range(int kind, Py_ssize_t lo, Py_ssize_t hi, floating *p, const floating *g,
                            floating *s1, floating *s2, floating lr, floating a, floating b,
                            floating eps) noexcept nogil:
    """One optimizer step over elements [lo, hi) (the formulas are in _simd.h's FB_OPT)."""
    if floating is float:
        fb_opt_f32(kind, hi - lo, p + lo, g + lo, NULL if s1 == NULL else s1 + lo, NULL if s2 == NULL else s2 + lo,
                   lr, a, b, eps)
    else:
        fb_opt_f64(kind, hi - lo, p + lo, g + lo, NULL if s1 == NULL else s1 + lo, NULL if s2 == NULL else s2 + lo,
                   lr, a, b, eps)


cdef void _opt_update(int kind, Py_ssize_t n, floating *p, const floating *g, floating *s1, floating *s2,
                      double lr, double a, double b, double eps) noexcept nogil:
    """One optimizer step over n elements, one contiguous chunk per thread for large arrays."""
    cdef int nt = _threads_for(n)
    cdef Py_ssize_t k, lo, hi, chunk = (n + nt - 1) // nt
    if nt <= 1:
        _opt_range(kind, 0, n, p, g, s1, s2, <floating>lr, <floating>a, <floating>b, <floating>eps)
        return
    for k in prange(nt, nogil=True, schedule="static", num_threads=nt):
        lo = k * chunk
        hi = _chunk_end(lo, chunk, n)
        if lo < hi:
            _opt_range(kind, lo, hi, p, g, s1, s2, <floating>lr, <floating>a, <floating>b, <floating>eps)


cdef inline bint _contig_like(cnp.ndarray a, bint c_order):
    return cnp.PyArray_IS_C_CONTIGUOUS(a) if c_order else cnp.PyArray_IS_F_CONTIGUOUS(a)


def optimizer_update(int kind, param, grad, state1, state2, double lr, double a=0, double b=0,
                     double eps=1e-7):
    """In-place update of `param` by optimizer `kind` (0 SGD, 1 Momentum, 2 Nesterov, 3 AdaGrad, 4 RMSprop,
    5 Adam); state arrays as that optimizer needs (None otherwise).  All arrays: one shape, one float dtype,
    one memory order (all C- or all F-contiguous), param and states writeable."""
    if kind < OPT_SGD or kind > OPT_ADAM:
        raise ValueError(f"unknown optimizer kind {kind}")
    cdef int t = _ftype(param, "param")
    _same_type(t, grad, "grad")
    cdef cnp.ndarray P = <cnp.ndarray>param, G = <cnp.ndarray>grad, S1 = None, S2 = None
    _check_same_shape(G, P, "grad", "param")
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
        _same_type(t, state1, "state1")
        S1 = <cnp.ndarray>state1
        _check_same_shape(S1, P, "state1", "param")
        if not cnp.PyArray_ISWRITEABLE(S1) or not _contig_like(S1, c_order):
            raise ValueError("state1 must be writeable and contiguous in the same memory order as param")
    if kind == OPT_ADAM:
        if state2 is None:
            raise ValueError("Adam needs two state arrays")
        _same_type(t, state2, "state2")
        S2 = <cnp.ndarray>state2
        _check_same_shape(S2, P, "state2", "param")
        if not cnp.PyArray_ISWRITEABLE(S2) or not _contig_like(S2, c_order):
            raise ValueError("state2 must be writeable and contiguous in the same memory order as param")
    _check_no_overlap(P, G, "param", "grad")
    _check_no_overlap(S1, G, "state1", "grad"); _check_no_overlap(S1, P, "state1", "param")
    _check_no_overlap(S2, G, "state2", "grad"); _check_no_overlap(S2, P, "state2", "param")
    _check_no_overlap(S2, S1, "state2", "state1")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(P)
    cdef void *s1p = NULL if S1 is None else cnp.PyArray_DATA(S1)
    cdef void *s2p = NULL if S2 is None else cnp.PyArray_DATA(S2)
    with nogil:
        if t == 0:
            _opt_update[float](kind, n, <float*>cnp.PyArray_DATA(P), <float*>cnp.PyArray_DATA(G),
                               <float*>s1p, <float*>s2p, lr, a, b, eps)
        else:
            _opt_update[double](kind, n, <double*>cnp.PyArray_DATA(P), <double*>cnp.PyArray_DATA(G),
                                <double*>s1p, <double*>s2p, lr, a, b, eps)
    return param


def _exp_kernel(x):
    """The kernels' vectorisable exp on a copy of x (float32 or float64, values <= 0): for accuracy tests."""
    cdef int t = _ftype(x, "x")
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
