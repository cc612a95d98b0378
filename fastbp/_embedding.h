/* Zeroing loop of fastbp/_embedding.pyx's scatter.  Why not memset: for a few MB glibc's memset takes its
 * non-temporal-store path (measured on the 2-core EPYC: 98 us for 4 MB), which also evicts the gradient the
 * optimizer reads next; plain vector stores take 40 us.  GCC would turn this loop back into a memset call
 * (loop distribution), hence the optimize attribute; FB_CLONES compiles it for AVX-512, AVX2 and baseline. */
#ifndef FASTBP_EMBEDDING_H
#define FASTBP_EMBEDDING_H
#include "_simd.h"

#if defined(__GNUC__) && !defined(__clang__)
#define FB_NO_MEMSET __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define FB_NO_MEMSET
#endif

FB_NO_MEMSET FB_CLONES static void fb_zero_f32(float *restrict p, long n)
{
    _Pragma("omp simd")
    for (long i = 0; i < n; i++) p[i] = 0.0f;
}

FB_NO_MEMSET FB_CLONES static void fb_zero_f64(double *restrict p, long n)
{
    _Pragma("omp simd")
    for (long i = 0; i < n; i++) p[i] = 0.0;
}

#endif
