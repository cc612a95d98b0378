/* 2x2 stride-2 max pooling (the book's SimpleConvNet/DeepConvNet pooling) for fastbp/_pool.pyx, in AVX-512,
 * AVX2 and baseline x86-64 variants dispatched like the row kernels of _simd.h (see there how and why).
 *
 * Forward, per output row i of a plane: out[j] = the first maximum of the window (x[2i][2j], x[2i][2j+1],
 * x[2i+1][2j], x[2i+1][2j+1]) in that order (the book's np.argmax order 0, 1, 2, 3), arg[j] its position.  A NaN
 * at position 0 wins here as in np.argmax; a NaN elsewhere would lose to the strict compares, so a row that holds
 * one is redone with the exact scalar rule (the first NaN wins).  With relu: out = relu(max), arg = -1 where
 * max <= 0 ("dead": relu(maxpool(x)) == maxpool(relu(x)), and such a window passes no gradient whichever
 * position the book's argmax picked).
 * Backward, per output row: the four cells of every window are written once (dout at the kept position, 0 at the
 * other three; nothing for arg = -1), so dx needs no separate zeroing pass; an odd last row/column that no window
 * covers is zeroed.  *bad is set when an arg entry is outside [-1, 4) (nothing is written out of bounds).
 *
 * Why intrinsics: a row has few outputs (12 in SimpleConvNet, 14/8/4 in DeepConvNet) and the windows interleave
 * even/odd input columns.  GCC vectorises a stride-2 loop over the outputs with 16-lane AVX-512 vectors only for
 * >= 16 outputs and runs scalar code below.  Measured single-threaded on (3000, 24, 24) f32 on the EPYC: the
 * previous two-stage auto-vectorised forward (kept here as the baseline variant) 0.63 ms compiled for AVX-512 /
 * 0.38 AVX2 / 0.53 baseline; a backward writing the four cells with selects 2.8-3.1 ms, memset + one scalar store
 * per window 0.72 ms; these AVX-512 kernels (masked tails, permutes) 0.24 / 0.27 ms (memcpy of the input:
 * 0.19 ms).
 */
#ifndef FASTBP_POOL_H
#define FASTBP_POOL_H
#include <stdint.h>
#include <string.h>

#include "_simd.h"

#define FB_POOL2_ROW_EXACT(NAME, T)                                                                           \
static void NAME(long ow, const T *r0, const T *r1, T *o, int32_t *g, int relu)                               \
{                                                                                                             \
    long j;                                                                                                   \
    int p;                                                                                                    \
    for (j = 0; j < ow; j++) {                                                                                \
        T w[4] = {r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]};                                        \
        T m = w[0];                                                                                           \
        int32_t k = 0;                                                                                        \
        for (p = 1; p < 4; p++)                                                                               \
            if ((w[p] > m || w[p] != w[p]) && m == m) { m = w[p]; k = p; }                                    \
        if (relu && m <= 0) { m = 0; k = -1; }                                                                \
        o[j] = m;                                                                                             \
        g[j] = k;                                                                                             \
    }                                                                                                         \
}
FB_POOL2_ROW_EXACT(fb_pool2_row_exact_f32, float)
FB_POOL2_ROW_EXACT(fb_pool2_row_exact_f64, double)

/* Outputs [j0, ow) of a row, scalar (the AVX2 rows' tails): same rule and flags as the vector rows. */
#define FB_POOL2_TAILS(NAME, T)                                                                               \
static inline int NAME##_tailf(long j0, long ow, const T *r0, const T *r1, T *o, int32_t *g, int relu)        \
{                                                                                                             \
    int nan = 0;                                                                                              \
    long j;                                                                                                   \
    for (j = j0; j < ow; j++) {                                                                               \
        T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1], m = a;                          \
        int32_t k = 0;                                                                                        \
        if (b > m) { m = b; k = 1; }                                                                          \
        if (c > m) { m = c; k = 2; }                                                                          \
        if (d > m) { m = d; k = 3; }                                                                          \
        nan |= (b != b) | (c != c) | (d != d);                                                                \
        if (relu && m <= 0) { m = 0; k = -1; }                                                                \
        o[j] = m;                                                                                             \
        g[j] = k;                                                                                             \
    }                                                                                                         \
    return nan;                                                                                               \
}                                                                                                             \
static inline int NAME##_tailb(long j0, long ow, const T *d, const int32_t *g, T *p0, T *p1)                  \
{   /* zeros, then one store per window (writing all four cells with selects measured 2x slower) */          \
    int bad = 0;                                                                                              \
    long j;                                                                                                   \
    if (j0 >= ow) return 0;                                                                                   \
    memset(p0 + 2 * j0, 0, (size_t)(2 * (ow - j0)) * sizeof(T));                                              \
    memset(p1 + 2 * j0, 0, (size_t)(2 * (ow - j0)) * sizeof(T));                                              \
    for (j = j0; j < ow; j++) {                                                                               \
        int32_t k = g[j];                                                                                     \
        if ((uint32_t)k < 4u) (k & 2 ? p1 : p0)[2 * j + (k & 1)] = d[j];                                      \
        else bad |= k != -1;                                                                                  \
    }                                                                                                         \
    return bad;                                                                                               \
}
FB_POOL2_TAILS(fb_pool2_s_f32, float)
FB_POOL2_TAILS(fb_pool2_s_f64, double)

/* The plane loops around a row kernel ROWF(ow, r0, r1, o, g, relu) -> "row holds a NaN" and ROWB(ow, d, g, p0, p1)
 * -> "bad arg entry"; np planes of (H, W) -> (H/2, W/2). */
#define FB_POOL2_PLANES(NAME, TARGET, T, ROWF, ROWB, EXACT)                                                   \
TARGET static void NAME##_fwd(long np, long H, long W, const T *restrict x, T *restrict out,                  \
                              int32_t *restrict arg, int relu)                                                \
{                                                                                                             \
    long oh = H / 2, ow = W / 2, q, i;                                                                        \
    for (q = 0; q < np; q++)                                                                                  \
        for (i = 0; i < oh; i++) {                                                                            \
            const T *r0 = x + (q * H + 2 * i) * W;                                                            \
            T *o = out + (q * oh + i) * ow;                                                                   \
            int32_t *g = arg + (q * oh + i) * ow;                                                             \
            if (ROWF(ow, r0, r0 + W, o, g, relu)) EXACT(ow, r0, r0 + W, o, g, relu);                          \
        }                                                                                                     \
}                                                                                                             \
TARGET static void NAME##_bwd(long np, long H, long W, const T *restrict dout, const int32_t *restrict arg,  \
                              T *restrict dx, int *bad)                                                       \
{                                                                                                             \
    long oh = H / 2, ow = W / 2, q, i;                                                                        \
    int b = 0;                                                                                                \
    for (q = 0; q < np; q++) {                                                                                \
        T *p = dx + q * H * W;                                                                                \
        for (i = 0; i < oh; i++) {                                                                            \
            T *p0 = p + 2 * i * W;                                                                            \
            b |= ROWB(ow, dout + (q * oh + i) * ow, arg + (q * oh + i) * ow, p0, p0 + W);                     \
            if (W & 1) { p0[W - 1] = 0; p0[2 * W - 1] = 0; }                                                  \
        }                                                                                                     \
        if (H & 1) memset(p + (H - 1) * W, 0, (size_t)W * sizeof(T));                                         \
    }                                                                                                         \
    *bad |= b;                                                                                                \
}

/* ---- baseline: vertical then horizontal stage (forward), scalar stores (backward) ---- */
#define FB_POOL2_MAXW 1024
#define FB_POOL2_BASE_ROWS(NAME, T)                                                                           \
static inline int NAME##_rowf(long ow, const T *restrict r0, const T *restrict r1, T *restrict o,             \
                              int32_t *restrict g, int relu)                                                  \
{                                                                                                             \
    T v[FB_POOL2_MAXW];                                                                                       \
    int32_t kv[FB_POOL2_MAXW];                                                                                \
    int nan = 0;                                                                                              \
    long e, j;                                                                                                \
    if (2 * ow > FB_POOL2_MAXW) return 1;            /* the exact row instead */                              \
    /* left/right column maxima (top wins ties), then the pair (the smaller position wins ties) */           \
    _Pragma("omp simd reduction(|:nan)")                                                                      \
    for (e = 0; e < 2 * ow; e++) {                                                                            \
        T a = r0[e], c = r1[e];                                                                               \
        int t = c > a;                                                                                        \
        v[e] = t ? c : a;                                                                                     \
        kv[e] = t ? 2 : 0;                                                                                    \
        nan |= (c != c) | ((int)(e & 1) & (a != a));                                                          \
    }                                                                                                         \
    _Pragma("omp simd")                                                                                       \
    for (j = 0; j < ow; j++) {                                                                                \
        T l = v[2 * j], r = v[2 * j + 1];                                                                     \
        int32_t kl = kv[2 * j], kr = kv[2 * j + 1] + 1;                                                       \
        int t = (r > l) | ((r == l) & (kr < kl));                                                             \
        o[j] = t ? r : l;                                                                                     \
        g[j] = t ? kr : kl;                                                                                   \
    }                                                                                                         \
    if (relu) {                                                                                               \
        _Pragma("omp simd")                                                                                   \
        for (j = 0; j < ow; j++) {                                                                            \
            int dead = o[j] <= 0;                                                                             \
            o[j] = dead ? (T)0 : o[j];                                                                        \
            g[j] = dead ? -1 : g[j];                                                                          \
        }                                                                                                     \
    }                                                                                                         \
    return nan;                                                                                               \
}                                                                                                             \
static inline int NAME##_rowb(long ow, const T *restrict d, const int32_t *restrict g, T *restrict p0,        \
                              T *restrict p1)                                                                 \
{                                                                                                             \
    long j;                                                                                                   \
    int bad = 0;                                                                                              \
    memset(p0, 0, (size_t)(2 * ow) * sizeof(T));                                                              \
    memset(p1, 0, (size_t)(2 * ow) * sizeof(T));                                                              \
    for (j = 0; j < ow; j++) {                                                                                \
        int32_t k = g[j];                                                                                     \
        if ((uint32_t)k < 4u) (k & 2 ? p1 : p0)[2 * j + (k & 1)] = d[j];                                      \
        else bad |= k != -1;                                                                                  \
    }                                                                                                         \
    return bad;                                                                                               \
}
FB_POOL2_BASE_ROWS(fb_pool2_base_f32, float)
FB_POOL2_BASE_ROWS(fb_pool2_base_f64, double)
FB_POOL2_PLANES(fb_pool2_f32_base, , float, fb_pool2_base_f32_rowf, fb_pool2_base_f32_rowb, fb_pool2_row_exact_f32)
FB_POOL2_PLANES(fb_pool2_f64_base, , double, fb_pool2_base_f64_rowf, fb_pool2_base_f64_rowb,
                fb_pool2_row_exact_f64)

#if FB_HAVE_VARIANTS
#include <immintrin.h>

/* ---- AVX-512: 16 (f32) / 8 (f64) outputs per step, masked tails, de-interleaved by two-source permutes ---- */
FB_TARGET_AVX512 static inline int fb_pool2_a512_f32_rowf(long ow, const float *r0, const float *r1, float *o,
                                                          int32_t *g, int relu)
{
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    __mmask16 nan = 0;
    long j;
    for (j = 0; j < ow; j += 16) {
        long n = ow - j < 16 ? ow - j : 16, e = 2 * n;
        __mmask16 mo = (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1);
        __mmask16 m0 = (__mmask16)(e >= 16 ? 0xffffu : (1u << e) - 1);
        __mmask16 m1 = (__mmask16)(e <= 16 ? 0u : (1u << (e - 16)) - 1);
        __m512 a0 = _mm512_maskz_loadu_ps(m0, r0 + 2 * j), a1 = _mm512_maskz_loadu_ps(m1, r0 + 2 * j + 16);
        __m512 c0 = _mm512_maskz_loadu_ps(m0, r1 + 2 * j), c1 = _mm512_maskz_loadu_ps(m1, r1 + 2 * j + 16);
        __m512 a = _mm512_permutex2var_ps(a0, ev, a1), b = _mm512_permutex2var_ps(a0, od, a1);
        __m512 c = _mm512_permutex2var_ps(c0, ev, c1), d = _mm512_permutex2var_ps(c0, od, c1);
        __m512 m = a;
        __m512i k = _mm512_setzero_si512();
        __mmask16 t = _mm512_cmp_ps_mask(b, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_ps(m, t, b);
        k = _mm512_mask_mov_epi32(k, t, _mm512_set1_epi32(1));
        t = _mm512_cmp_ps_mask(c, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_ps(m, t, c);
        k = _mm512_mask_mov_epi32(k, t, _mm512_set1_epi32(2));
        t = _mm512_cmp_ps_mask(d, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_ps(m, t, d);
        k = _mm512_mask_mov_epi32(k, t, _mm512_set1_epi32(3));
        nan |= _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q)
               | _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
        if (relu) {
            __mmask16 dead = _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_LE_OQ);
            m = _mm512_mask_mov_ps(m, dead, _mm512_setzero_ps());
            k = _mm512_mask_mov_epi32(k, dead, _mm512_set1_epi32(-1));
        }
        _mm512_mask_storeu_ps(o + j, mo, m);
        _mm512_mask_storeu_epi32(g + j, mo, k);
    }
    return nan != 0;
}

FB_TARGET_AVX512 static inline int fb_pool2_a512_f32_rowb(long ow, const float *dd, const int32_t *g, float *p0,
                                                          float *p1)
{
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    __mmask16 bad = 0;
    long j;
    for (j = 0; j < ow; j += 16) {
        long n = ow - j < 16 ? ow - j : 16, e = 2 * n;
        __mmask16 mo = (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1);
        __mmask16 m0 = (__mmask16)(e >= 16 ? 0xffffu : (1u << e) - 1);
        __mmask16 m1 = (__mmask16)(e <= 16 ? 0u : (1u << (e - 16)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(mo, dd + j);
        __m512i k = _mm512_maskz_loadu_epi32(mo, g + j);
        __m512 va = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(0)), v);
        __m512 vb = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(1)), v);
        __m512 vc = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(2)), v);
        __m512 vd = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(3)), v);
        bad |= _mm512_mask_cmpgt_epu32_mask(mo, _mm512_add_epi32(k, _mm512_set1_epi32(1)), _mm512_set1_epi32(4));
        _mm512_mask_storeu_ps(p0 + 2 * j, m0, _mm512_permutex2var_ps(va, lo, vb));
        _mm512_mask_storeu_ps(p0 + 2 * j + 16, m1, _mm512_permutex2var_ps(va, hi, vb));
        _mm512_mask_storeu_ps(p1 + 2 * j, m0, _mm512_permutex2var_ps(vc, lo, vd));
        _mm512_mask_storeu_ps(p1 + 2 * j + 16, m1, _mm512_permutex2var_ps(vc, hi, vd));
    }
    return bad != 0;
}

FB_TARGET_AVX512 static inline int fb_pool2_a512_f64_rowf(long ow, const double *r0, const double *r1, double *o,
                                                          int32_t *g, int relu)
{
    const __m512i ev = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    __mmask8 nan = 0;
    long j;
    for (j = 0; j < ow; j += 8) {
        long n = ow - j < 8 ? ow - j : 8, e = 2 * n;
        __mmask8 mo = (__mmask8)(n >= 8 ? 0xffu : (1u << n) - 1);
        __mmask8 m0 = (__mmask8)(e >= 8 ? 0xffu : (1u << e) - 1);
        __mmask8 m1 = (__mmask8)(e <= 8 ? 0u : (1u << (e - 8)) - 1);
        __m512d a0 = _mm512_maskz_loadu_pd(m0, r0 + 2 * j), a1 = _mm512_maskz_loadu_pd(m1, r0 + 2 * j + 8);
        __m512d c0 = _mm512_maskz_loadu_pd(m0, r1 + 2 * j), c1 = _mm512_maskz_loadu_pd(m1, r1 + 2 * j + 8);
        __m512d a = _mm512_permutex2var_pd(a0, ev, a1), b = _mm512_permutex2var_pd(a0, od, a1);
        __m512d c = _mm512_permutex2var_pd(c0, ev, c1), d = _mm512_permutex2var_pd(c0, od, c1);
        __m512d m = a;
        __m256i k = _mm256_setzero_si256();
        __mmask8 t = _mm512_cmp_pd_mask(b, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_pd(m, t, b);
        k = _mm256_mask_mov_epi32(k, t, _mm256_set1_epi32(1));
        t = _mm512_cmp_pd_mask(c, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_pd(m, t, c);
        k = _mm256_mask_mov_epi32(k, t, _mm256_set1_epi32(2));
        t = _mm512_cmp_pd_mask(d, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_pd(m, t, d);
        k = _mm256_mask_mov_epi32(k, t, _mm256_set1_epi32(3));
        nan |= _mm512_cmp_pd_mask(b, b, _CMP_UNORD_Q) | _mm512_cmp_pd_mask(c, c, _CMP_UNORD_Q)
               | _mm512_cmp_pd_mask(d, d, _CMP_UNORD_Q);
        if (relu) {
            __mmask8 dead = _mm512_cmp_pd_mask(m, _mm512_setzero_pd(), _CMP_LE_OQ);
            m = _mm512_mask_mov_pd(m, dead, _mm512_setzero_pd());
            k = _mm256_mask_mov_epi32(k, dead, _mm256_set1_epi32(-1));
        }
        _mm512_mask_storeu_pd(o + j, mo, m);
        _mm256_mask_storeu_epi32(g + j, mo, k);
    }
    return nan != 0;
}

FB_TARGET_AVX512 static inline int fb_pool2_a512_f64_rowb(long ow, const double *dd, const int32_t *g,
                                                          double *p0, double *p1)
{
    const __m512i lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    __mmask8 bad = 0;
    long j;
    for (j = 0; j < ow; j += 8) {
        long n = ow - j < 8 ? ow - j : 8, e = 2 * n;
        __mmask8 mo = (__mmask8)(n >= 8 ? 0xffu : (1u << n) - 1);
        __mmask8 m0 = (__mmask8)(e >= 8 ? 0xffu : (1u << e) - 1);
        __mmask8 m1 = (__mmask8)(e <= 8 ? 0u : (1u << (e - 8)) - 1);
        __m512d v = _mm512_maskz_loadu_pd(mo, dd + j);
        __m256i k = _mm256_maskz_loadu_epi32(mo, g + j);
        __m512d va = _mm512_maskz_mov_pd(_mm256_cmpeq_epi32_mask(k, _mm256_set1_epi32(0)), v);
        __m512d vb = _mm512_maskz_mov_pd(_mm256_cmpeq_epi32_mask(k, _mm256_set1_epi32(1)), v);
        __m512d vc = _mm512_maskz_mov_pd(_mm256_cmpeq_epi32_mask(k, _mm256_set1_epi32(2)), v);
        __m512d vd = _mm512_maskz_mov_pd(_mm256_cmpeq_epi32_mask(k, _mm256_set1_epi32(3)), v);
        bad |= _mm256_mask_cmpgt_epu32_mask(mo, _mm256_add_epi32(k, _mm256_set1_epi32(1)), _mm256_set1_epi32(4));
        _mm512_mask_storeu_pd(p0 + 2 * j, m0, _mm512_permutex2var_pd(va, lo, vb));
        _mm512_mask_storeu_pd(p0 + 2 * j + 8, m1, _mm512_permutex2var_pd(va, hi, vb));
        _mm512_mask_storeu_pd(p1 + 2 * j, m0, _mm512_permutex2var_pd(vc, lo, vd));
        _mm512_mask_storeu_pd(p1 + 2 * j + 8, m1, _mm512_permutex2var_pd(vc, hi, vd));
    }
    return bad != 0;
}

/* ---- AVX2: 8 (f32) / 4 (f64) outputs per step, shuffles + lane permutes, scalar tails (a first version with
 * vmaskmov loads/stores for the tails, which AMD Zen microcodes, measured several times slower) ---- */
FB_TARGET_AVX2 static inline int fb_pool2_a2_f32_rowf(long ow, const float *r0, const float *r1, float *o,
                                                      int32_t *g, int relu)
{
    int nan = 0;
    long j;
    for (j = 0; j + 8 <= ow; j += 8) {
        __m256 a0 = _mm256_loadu_ps(r0 + 2 * j), a1 = _mm256_loadu_ps(r0 + 2 * j + 8);
        __m256 c0 = _mm256_loadu_ps(r1 + 2 * j), c1 = _mm256_loadu_ps(r1 + 2 * j + 8);
        /* shuffle gives (0 2 8 10 | 4 6 12 14); the 64-bit lane permute puts them in order */
        __m256 a = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a0, a1, 0x88)), 0xd8));
        __m256 b = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a0, a1, 0xdd)), 0xd8));
        __m256 c = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(c0, c1, 0x88)), 0xd8));
        __m256 d = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(c0, c1, 0xdd)), 0xd8));
        __m256 m = a, k = _mm256_setzero_ps();
        __m256 t = _mm256_cmp_ps(b, m, _CMP_GT_OQ);
        m = _mm256_blendv_ps(m, b, t);
        k = _mm256_blendv_ps(k, _mm256_set1_ps(1.0f), t);
        t = _mm256_cmp_ps(c, m, _CMP_GT_OQ);
        m = _mm256_blendv_ps(m, c, t);
        k = _mm256_blendv_ps(k, _mm256_set1_ps(2.0f), t);
        t = _mm256_cmp_ps(d, m, _CMP_GT_OQ);
        m = _mm256_blendv_ps(m, d, t);
        k = _mm256_blendv_ps(k, _mm256_set1_ps(3.0f), t);
        nan |= _mm256_movemask_ps(_mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(b, b, _CMP_UNORD_Q),
                                                            _mm256_cmp_ps(c, c, _CMP_UNORD_Q)),
                                               _mm256_cmp_ps(d, d, _CMP_UNORD_Q)));
        if (relu) {
            __m256 dead = _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_LE_OQ);
            m = _mm256_andnot_ps(dead, m);
            k = _mm256_blendv_ps(k, _mm256_set1_ps(-1.0f), dead);
        }
        _mm256_storeu_ps(o + j, m);
        _mm256_storeu_si256((__m256i *)(g + j), _mm256_cvtps_epi32(k));
    }
    return (nan != 0) | fb_pool2_s_f32_tailf(j, ow, r0, r1, o, g, relu);
}

FB_TARGET_AVX2 static inline int fb_pool2_a2_f32_rowb(long ow, const float *dd, const int32_t *g, float *p0,
                                                      float *p1)
{
    __m256i bad = _mm256_setzero_si256();
    long j;
    for (j = 0; j + 8 <= ow; j += 8) {
        __m256 v = _mm256_loadu_ps(dd + j);
        __m256i k = _mm256_loadu_si256((const __m256i *)(g + j));
        __m256 va = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(0))), v);
        __m256 vb = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(1))), v);
        __m256 vc = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(2))), v);
        __m256 vd = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(3))), v);
        /* k outside [-1, 4): k < -1 or k > 3 (signed) */
        bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(-1), k),
                                                   _mm256_cmpgt_epi32(k, _mm256_set1_epi32(3))));
        __m256 lo = _mm256_unpacklo_ps(va, vb), hi = _mm256_unpackhi_ps(va, vb);
        _mm256_storeu_ps(p0 + 2 * j, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(p0 + 2 * j + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        lo = _mm256_unpacklo_ps(vc, vd);
        hi = _mm256_unpackhi_ps(vc, vd);
        _mm256_storeu_ps(p1 + 2 * j, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(p1 + 2 * j + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
    return (!_mm256_testz_si256(bad, bad)) | fb_pool2_s_f32_tailb(j, ow, dd, g, p0, p1);
}

FB_TARGET_AVX2 static inline int fb_pool2_a2_f64_rowf(long ow, const double *r0, const double *r1, double *o,
                                                      int32_t *g, int relu)
{
    int nan = 0;
    long j;
    for (j = 0; j + 4 <= ow; j += 4) {
        __m256d a0 = _mm256_loadu_pd(r0 + 2 * j), a1 = _mm256_loadu_pd(r0 + 2 * j + 4);
        __m256d c0 = _mm256_loadu_pd(r1 + 2 * j), c1 = _mm256_loadu_pd(r1 + 2 * j + 4);
        /* unpacklo gives (0 4 2 6); the lane permute puts them in order */
        __m256d a = _mm256_permute4x64_pd(_mm256_unpacklo_pd(a0, a1), 0xd8);
        __m256d b = _mm256_permute4x64_pd(_mm256_unpackhi_pd(a0, a1), 0xd8);
        __m256d c = _mm256_permute4x64_pd(_mm256_unpacklo_pd(c0, c1), 0xd8);
        __m256d d = _mm256_permute4x64_pd(_mm256_unpackhi_pd(c0, c1), 0xd8);
        __m256d m = a, k = _mm256_setzero_pd();
        __m256d t = _mm256_cmp_pd(b, m, _CMP_GT_OQ);
        m = _mm256_blendv_pd(m, b, t);
        k = _mm256_blendv_pd(k, _mm256_set1_pd(1.0), t);
        t = _mm256_cmp_pd(c, m, _CMP_GT_OQ);
        m = _mm256_blendv_pd(m, c, t);
        k = _mm256_blendv_pd(k, _mm256_set1_pd(2.0), t);
        t = _mm256_cmp_pd(d, m, _CMP_GT_OQ);
        m = _mm256_blendv_pd(m, d, t);
        k = _mm256_blendv_pd(k, _mm256_set1_pd(3.0), t);
        nan |= _mm256_movemask_pd(_mm256_or_pd(_mm256_or_pd(_mm256_cmp_pd(b, b, _CMP_UNORD_Q),
                                                            _mm256_cmp_pd(c, c, _CMP_UNORD_Q)),
                                               _mm256_cmp_pd(d, d, _CMP_UNORD_Q)));
        if (relu) {
            __m256d dead = _mm256_cmp_pd(m, _mm256_setzero_pd(), _CMP_LE_OQ);
            m = _mm256_andnot_pd(dead, m);
            k = _mm256_blendv_pd(k, _mm256_set1_pd(-1.0), dead);
        }
        _mm256_storeu_pd(o + j, m);
        _mm_storeu_si128((__m128i *)(g + j), _mm256_cvtpd_epi32(k));
    }
    return (nan != 0) | fb_pool2_s_f64_tailf(j, ow, r0, r1, o, g, relu);
}

FB_TARGET_AVX2 static inline int fb_pool2_a2_f64_rowb(long ow, const double *dd, const int32_t *g, double *p0,
                                                      double *p1)
{
    __m128i bad = _mm_setzero_si128();
    long j;
    for (j = 0; j + 4 <= ow; j += 4) {
        __m256d v = _mm256_loadu_pd(dd + j);
        __m128i k32 = _mm_loadu_si128((const __m128i *)(g + j));
        __m256i k = _mm256_cvtepi32_epi64(k32);
        __m256d va = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, _mm256_set1_epi64x(0))), v);
        __m256d vb = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, _mm256_set1_epi64x(1))), v);
        __m256d vc = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, _mm256_set1_epi64x(2))), v);
        __m256d vd = _mm256_and_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(k, _mm256_set1_epi64x(3))), v);
        bad = _mm_or_si128(bad, _mm_or_si128(_mm_cmpgt_epi32(_mm_set1_epi32(-1), k32), _mm_cmpgt_epi32(k32, _mm_set1_epi32(3))));
        __m256d lo = _mm256_unpacklo_pd(va, vb), hi = _mm256_unpackhi_pd(va, vb);   /* (a0 b0 a2 b2), (a1 b1 a3 b3) */
        _mm256_storeu_pd(p0 + 2 * j, _mm256_permute2f128_pd(lo, hi, 0x20));
        _mm256_storeu_pd(p0 + 2 * j + 4, _mm256_permute2f128_pd(lo, hi, 0x31));
        lo = _mm256_unpacklo_pd(vc, vd);
        hi = _mm256_unpackhi_pd(vc, vd);
        _mm256_storeu_pd(p1 + 2 * j, _mm256_permute2f128_pd(lo, hi, 0x20));
        _mm256_storeu_pd(p1 + 2 * j + 4, _mm256_permute2f128_pd(lo, hi, 0x31));
    }
    return (!_mm_testz_si128(bad, bad)) | fb_pool2_s_f64_tailb(j, ow, dd, g, p0, p1);
}

FB_POOL2_PLANES(fb_pool2_f32_avx512, FB_TARGET_AVX512, float, fb_pool2_a512_f32_rowf, fb_pool2_a512_f32_rowb,
                fb_pool2_row_exact_f32)
FB_POOL2_PLANES(fb_pool2_f64_avx512, FB_TARGET_AVX512, double, fb_pool2_a512_f64_rowf, fb_pool2_a512_f64_rowb,
                fb_pool2_row_exact_f64)
FB_POOL2_PLANES(fb_pool2_f32_avx2, FB_TARGET_AVX2, float, fb_pool2_a2_f32_rowf, fb_pool2_a2_f32_rowb,
                fb_pool2_row_exact_f32)
FB_POOL2_PLANES(fb_pool2_f64_avx2, FB_TARGET_AVX2, double, fb_pool2_a2_f64_rowf, fb_pool2_a2_f64_rowb,
                fb_pool2_row_exact_f64)
#endif

/* FB_DISPATCH names: NAME##_avx512 / _avx2 / _base */
#define fb_pool2_fwd_f32_avx512 fb_pool2_f32_avx512_fwd
#define fb_pool2_fwd_f32_avx2 fb_pool2_f32_avx2_fwd
#define fb_pool2_fwd_f32_base fb_pool2_f32_base_fwd
#define fb_pool2_fwd_f64_avx512 fb_pool2_f64_avx512_fwd
#define fb_pool2_fwd_f64_avx2 fb_pool2_f64_avx2_fwd
#define fb_pool2_fwd_f64_base fb_pool2_f64_base_fwd
#define fb_pool2_bwd_f32_avx512 fb_pool2_f32_avx512_bwd
#define fb_pool2_bwd_f32_avx2 fb_pool2_f32_avx2_bwd
#define fb_pool2_bwd_f32_base fb_pool2_f32_base_bwd
#define fb_pool2_bwd_f64_avx512 fb_pool2_f64_avx512_bwd
#define fb_pool2_bwd_f64_avx2 fb_pool2_f64_avx2_bwd
#define fb_pool2_bwd_f64_base fb_pool2_f64_base_bwd
FB_DISPATCH(fb_pool2_fwd_f32, (long np, long H, long W, const float *x, float *out, int32_t *arg, int relu),
            (np, H, W, x, out, arg, relu))
FB_DISPATCH(fb_pool2_fwd_f64, (long np, long H, long W, const double *x, double *out, int32_t *arg, int relu),
            (np, H, W, x, out, arg, relu))
FB_DISPATCH(fb_pool2_bwd_f32, (long np, long H, long W, const float *dout, const int32_t *arg, float *dx,
                               int *bad), (np, H, W, dout, arg, dx, bad))
FB_DISPATCH(fb_pool2_bwd_f64, (long np, long H, long W, const double *dout, const int32_t *arg, double *dx,
                               int *bad), (np, H, W, dout, arg, dx, bad))

#endif
