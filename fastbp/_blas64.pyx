# Design
# ------
# 32-bit-int front ends for a BLAS with 64-bit integers (an "ILP64" build such as NumPy's scipy-openblas64_), so
# that fastbp's BLAS table (fastbp/_gemm.pxd: cblas_?gemm / cblas_?gemv with int sizes) can call it unchanged:
# fastbp._blas hands the ILP64 entry points to _set_ilp64 and installs the addresses of these front ends with
# _gemm._set_gemm.  Used only by FASTBP_BLAS=numpy (fastbp's GEMMs on NumPy's own OpenBLAS and thread pool);
# sizes are widened, never narrowed (the callers already checked every size against the 32-bit limit).
from libc.stdint cimport intptr_t

cdef extern from *:
    """
    #include <stdint.h>
    typedef void (*fb_sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                                 const float *, int64_t, float, float *, int64_t);
    typedef void (*fb_dgemm64_t)(int, int, int, int64_t, int64_t, int64_t, double, const double *, int64_t,
                                 const double *, int64_t, double, double *, int64_t);
    typedef void (*fb_sgemv64_t)(int, int, int64_t, int64_t, float, const float *, int64_t, const float *, int64_t,
                                 float, float *, int64_t);
    typedef void (*fb_dgemv64_t)(int, int, int64_t, int64_t, double, const double *, int64_t, const double *,
                                 int64_t, double, double *, int64_t);
    static fb_sgemm64_t fb_sgemm64 = 0;
    static fb_dgemm64_t fb_dgemm64 = 0;
    static fb_sgemv64_t fb_sgemv64 = 0;
    static fb_dgemv64_t fb_dgemv64 = 0;

    static void fb_sgemm32(int o, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                           const float *b, int ldb, float beta, float *c, int ldc) {
        fb_sgemm64(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    static void fb_dgemm32(int o, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                           const double *b, int ldb, double beta, double *c, int ldc) {
        fb_dgemm64(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    static void fb_sgemv32(int o, int t, int m, int n, float alpha, const float *a, int lda, const float *x,
                           int incx, float beta, float *y, int incy) {
        fb_sgemv64(o, t, m, n, alpha, a, lda, x, incx, beta, y, incy);
    }
    static void fb_dgemv32(int o, int t, int m, int n, double alpha, const double *a, int lda, const double *x,
                           int incx, double beta, double *y, int incy) {
        fb_dgemv64(o, t, m, n, alpha, a, lda, x, incx, beta, y, incy);
    }
    static void fb_set_ilp64(void *s, void *d, void *sv, void *dv) {
        fb_sgemm64 = (fb_sgemm64_t)s; fb_dgemm64 = (fb_dgemm64_t)d;
        fb_sgemv64 = (fb_sgemv64_t)sv; fb_dgemv64 = (fb_dgemv64_t)dv;
    }
    static void *fb_front(int i) {
        return i == 0 ? (void *)fb_sgemm32 : i == 1 ? (void *)fb_dgemm32 : i == 2 ? (void *)fb_sgemv32
                                                                                 : (void *)fb_dgemv32;
    }
    """
    void fb_set_ilp64(void *s, void *d, void *sv, void *dv)
    void *fb_front(int i)


def _set_ilp64(intptr_t sgemm64, intptr_t dgemm64, intptr_t sgemv64, intptr_t dgemv64):
    """Install the ILP64 cblas_?gemm / cblas_?gemv entry points; returns the addresses of the 32-bit-int front
    ends (sgemm, dgemm, sgemv, dgemv) for fastbp._gemm._set_gemm."""
    if sgemm64 == 0 or dgemm64 == 0 or sgemv64 == 0 or dgemv64 == 0:
        raise ValueError("null BLAS address")
    fb_set_ilp64(<void*>sgemm64, <void*>dgemm64, <void*>sgemv64, <void*>dgemv64)
    return tuple(<intptr_t>fb_front(i) for i in range(4))
