/* Zeroing loop of fastbp/_embedding.pyx's scatter.  Why not memset: for a few MB glibc's memset takes its
 * non-temporal-store path (measured on the 2-core EPYC: 98 us for 4 MB), which also evicts the gradient the
 * optimizer reads next; plain vector stores take 40 us.  GCC would turn this loop back into a memset call
 * (loop distribution), hence the optimize attribute; compiled for each SIMD path of _simd.h. */
#ifndef FASTBP_EMBEDDING_H
#define FASTBP_EMBEDDING_H
#include "_simd.h"

#if defined(__GNUC__) && !defined(__clang__)
#define FB_NO_MEMSET __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define FB_NO_MEMSET
#endif

#define FB_ZERO(NAME, TARGET, T)                                                                              \
FB_NO_MEMSET TARGET static void NAME(T *restrict p, long n)                                                   \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) p[i] = (T)0;                                                                 \
}

FB_VARIANTS(FB_ZERO, fb_zero_f32, float)
FB_VARIANTS(FB_ZERO, fb_zero_f64, double)
FB_DISPATCH(fb_zero_f32, (float *p, long n), (p, n))
FB_DISPATCH(fb_zero_f64, (double *p, long n), (p, n))

#endif
