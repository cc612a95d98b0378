# fastbp's BLAS function table (loaded when fastbp._gemm is imported) and the split GEMM (see _gemm.pyx).
cimport numpy as cnp
from fastbp._typedefs cimport floating

cdef enum:
    FB_ROWMAJOR = 101
    FB_NOTRANS = 111
    FB_TRANS = 112
    FB_INT_MAX = 2147483647        # largest dimension / leading dimension BLAS's 32-bit interface takes

ctypedef void (*sgemm_fn)(int order, int transa, int transb, int m, int n, int k, float alpha,
                          const float *a, int lda, const float *b, int ldb, float beta,
                          float *c, int ldc) noexcept nogil
ctypedef void (*dgemm_fn)(int order, int transa, int transb, int m, int n, int k, double alpha,
                          const double *a, int lda, const double *b, int ldb, double beta,
                          double *c, int ldc) noexcept nogil
ctypedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                          const float *x, int incx, float beta, float *y, int incy) noexcept nogil
ctypedef void (*dgemv_fn)(int order, int trans, int m, int n, double alpha, const double *a, int lda,
                          const double *x, int incx, double beta, double *y, int incy) noexcept nogil

ctypedef struct blas_table:
    sgemm_fn sgemm
    dgemm_fn dgemm
    sgemv_fn sgemv
    dgemv_fn dgemv

# Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C, op = transpose when FB_TRANS.  Any dim may be 0 (k = 0
# gives C = beta * C); m == 1 uses GEMV; large products are split over fastbp's GEMM threads; called from inside
# a parallel region it runs single-threaded.  The caller guarantees every dim and leading dim is <= FB_INT_MAX
# (check_blas_dims in the def wrapper) and that leading dims are >= 1.
cdef void sgemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, float alpha,
                const float *a, Py_ssize_t lda, const float *b, Py_ssize_t ldb, float beta,
                float *c, Py_ssize_t ldc) noexcept nogil
cdef void dgemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, double alpha,
                const double *a, Py_ssize_t lda, const double *b, Py_ssize_t ldb, double beta,
                double *c, Py_ssize_t ldc) noexcept nogil

# A float32 matrix that dgemm_from_f32 copies into the double operand A as the product's pieces read it.
ctypedef struct a_source:
    const float *src       # IN  (m, k), element strides s0 (rows) and s1 (columns)
    Py_ssize_t s0
    Py_ssize_t s1
    double *dst            # OUT (m, k) C-contiguous: A itself

# C[m, n] = alpha * A @ op(B) + beta * C where A (m, k) C-contiguous is first written from float32 `src` (element
# strides s0, s1): the float64 promotion of float32 data (the book's images against float64 weights) done inside
# the product.  When the product is split over M or K, each piece converts the rows or columns of A that it then
# reads, on the thread that reads them (data written by one core and read by another is slow to move); otherwise
# A is converted first, on the calling thread.  A K split is cut at multiples of 8 columns (whole cache lines of a
# 64-byte aligned A), so results may differ from dgemm on a converted copy in the last bits (not from one run to
# the next: the pieces depend on the shape and the thread count only, like dgemm's).
cdef void dgemm_from_f32(int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, double alpha,
                         const float *src, Py_ssize_t s0, Py_ssize_t s1, double *a,
                         const double *b, Py_ssize_t ldb, double beta, double *c, Py_ssize_t ldc) noexcept nogil


cdef inline void gemm(int ta, int tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                      const floating *a, Py_ssize_t lda, const floating *b, Py_ssize_t ldb, floating beta,
                      floating *c, Py_ssize_t ldc) noexcept nogil:
    if floating is float:
        sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    else:
        dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef inline int flip_trans(int t) noexcept nogil:
    return FB_TRANS if t == FB_NOTRANS else FB_NOTRANS


# ValueError naming the dimension (m, n, k, lda, ldb, ldc) that is >= 2**31 (BLAS's 32-bit interface).
cpdef check_blas_dims(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, Py_ssize_t lda=*, Py_ssize_t ldb=*,
                      Py_ssize_t ldc=*)

# `a` itself when BLAS can read the 2-D array in place (one unit stride), else one C-contiguous copy; sets
# trans (FB_NOTRANS / FB_TRANS) and the leading dimension (>= 1, <= FB_INT_MAX) BLAS reads it with.
cdef cnp.ndarray blas_operand(cnp.ndarray a, int *trans, Py_ssize_t *ld)
