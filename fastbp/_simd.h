/* Vectorisable row kernels for fastbp/_kernels.pyx (the optimizer updates are in _optim.h).
 *
 * Why C: the exponential is the cost of softmax and sigmoid.  libm's exp/expf is a scalar call, so a loop over
 * it cannot be vectorised; here exp is a branch-free Cody-Waite range reduction plus a polynomial, which GCC
 * vectorises.  Why multiversioned: a portable build may only assume SSE2, so on x86-64 with GCC the loops are
 * compiled three times (AVX-512, AVX2+FMA, baseline) with `target_clones`, and the dynamic loader picks the
 * clone the CPU supports once, at load time.  Cython cannot attach that attribute, hence this header.
 *
 * Accuracy: fb_expf is within 2 ulp of expf on [-87.3, 0] (degree-7 polynomial on |r| <= ln2/2) and fb_exp within
 * 2 ulp of exp on [-708, 0] (degree-12); below those ranges they return 0 (the true values are subnormal), NaN in
 * gives NaN out.  They are only called on arguments <= 0 (x - max(x), -|x|).  Sums are accumulated in double.
 */
#ifndef FASTBP_SIMD_H
#define FASTBP_SIMD_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef FB_CLONES
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(FASTBP_NO_CLONES)
#define FB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FB_CLONES
#endif
#endif

static inline float fb_expf(float x)
{
    /* exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (two-part ln2 keeps r exact) */
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.3f ? -87.3f : x;
    float n = (xc * log2e + 12582912.0f) - 12582912.0f;   /* round to nearest: 1.5 * 2^23 trick */
    float r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    union { int32_t i; float f; } u = { bits };
    float scale = u.f;
    float v = p * scale;
    return x < -87.3f ? 0.0f : v;
}

static inline double fb_exp(double x)
{
    const double log2e = 1.4426950408889634074, ln2_hi = 6.93147180369123816490e-01,
                 ln2_lo = 1.90821492927058770002e-10;
    double xc = x < -708.0 ? -708.0 : x;
    double n = (xc * log2e + 6755399441055744.0) - 6755399441055744.0;   /* 1.5 * 2^52 */
    double r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    double p = 1.0 / 479001600.0;            /* 1/12! */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits = ((int64_t)n + 1023) << 52;
    union { int64_t i; double f; } u = { bits };
    double scale = u.f;
    double v = p * scale;
    return x < -708.0 ? 0.0 : v;
}

/* Softmax with cross-entropy over a block of `rows` rows of `c` classes.  y = softmax(x) row-wise;
 * g = scale * (y - target) unless g is NULL; target is onehot (rows x c) when onehot != NULL, else the one-hot
 * vector of labels[i].  rowloss[i] = sum_j target_j * (logsumexp(x_i) - x_ij).  With has_ignore, a row whose
 * label is `ignore` gets y but rowloss 0 and a zero gradient row.
 * Accuracy: with e_j = exp(x_j - max) (e = 1 at the max) and r = sum of the e_j other than one 1, the sum is 1 + r,
 *   logsumexp - x_t = (max - x_t) + log1p(r)       in double: no cancellation when the max dominates (tiny loss),
 *                                                  and finite for float32 logits whose loss is beyond float32;
 *   g_t = -scale * (sum_{j != t} e_j) / (1 + r)    in double, where y_t - 1 would cancel in float32.
 * The exponentials run over the whole block in one loop, so short rows (C = 10) still fill the vector lanes. */
#define FB_SOFTMAX_BLOCK(NAME, T, EXP)                                                                        \
FB_CLONES static void NAME(const T *restrict x, T *restrict y, T *restrict g, long rows, long c, T scale,     \
                           const T *restrict onehot, const int64_t *restrict labels, int has_ignore,          \
                           int64_t ignore, double *restrict rowloss)                                          \
{                                                                                                             \
    long i, j;                                                                                                \
    for (i = 0; i < rows; i++) {                                                                              \
        const T *xr = x + i * c;                                                                              \
        T *yr = y + i * c;                                                                                    \
        T m = xr[0];                                                                                          \
        int has_nan = 0;                                                                                      \
        _Pragma("omp simd reduction(max:m) reduction(|:has_nan)")                                             \
        for (j = 0; j < c; j++) { m = xr[j] > m ? xr[j] : m; has_nan |= xr[j] != xr[j]; }                     \
        if (has_nan) m = NAN;                       /* NaN in, NaN out (max would skip it) */                \
        _Pragma("omp simd")                                                                                   \
        for (j = 0; j < c; j++) yr[j] = xr[j] - m;                                                            \
        if (onehot == NULL) {                                                                                 \
            rowloss[i] = (has_ignore && labels[i] == ignore) ? 0.0 : (double)m - (double)xr[labels[i]];      \
        } else {                                                                                              \
            const T *tr = onehot + i * c;                                                                     \
            double acc = 0.0;                                                                                 \
            for (j = 0; j < c; j++) if (tr[j] != 0) acc += (double)tr[j] * ((double)m - (double)xr[j]);       \
            rowloss[i] = acc;                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    long total = rows * c;                                                                                    \
    _Pragma("omp simd")                                                                                       \
    for (i = 0; i < total; i++) y[i] = EXP(y[i]);                                                             \
    for (i = 0; i < rows; i++) {                                                                              \
        T *yr = y + i * c;                                                                                    \
        double r = 0.0, ones = 0.0;                                                                           \
        _Pragma("omp simd reduction(+:r,ones)")                                                               \
        for (j = 0; j < c; j++) { double e = (double)yr[j]; r += e == 1.0 ? 0.0 : e; ones += e == 1.0; }     \
        r += ones - 1.0;                            /* the sum of the e_j but one 1 (the max's) */           \
        double s = 1.0 + r;                                                                                   \
        T inv = (T)(1.0 / s);                                                                                 \
        double logs = log1p(r);                                                                               \
        int skip = onehot == NULL && has_ignore && labels[i] == ignore;                                       \
        double et = onehot == NULL && !skip ? (double)yr[labels[i]] : 0.0;                                    \
        _Pragma("omp simd")                                                                                   \
        for (j = 0; j < c; j++) yr[j] *= inv;                                                                 \
        if (onehot == NULL) {                                                                                 \
            if (skip) {                                                                                       \
                if (g != NULL) memset(g + i * c, 0, (size_t)c * sizeof(T));                                   \
                continue;                                                                                     \
            }                                                                                                 \
            rowloss[i] += logs;                                                                               \
            if (g != NULL) {                                                                                  \
                T *gr = g + i * c;                                                                            \
                _Pragma("omp simd")                                                                           \
                for (j = 0; j < c; j++) gr[j] = scale * yr[j];                                                \
                /* the e_j other than e_t: r when e_t is a 1 (r holds the other ones), else 1 + r - e_t */   \
                double others = et == 1.0 ? r : s - et;                                                       \
                gr[labels[i]] = (T)(-(double)scale * others / s);                                             \
            }                                                                                                 \
        } else {                                                                                              \
            const T *tr = onehot + i * c;                                                                     \
            double tsum = 0.0;                                                                                \
            for (j = 0; j < c; j++) if (tr[j] != 0) tsum += (double)tr[j];                                    \
            rowloss[i] += logs * tsum;                                                                        \
            if (g != NULL) {                                                                                  \
                T *gr = g + i * c;                                                                            \
                _Pragma("omp simd")                                                                           \
                for (j = 0; j < c; j++) gr[j] = scale * (yr[j] - tr[j]);                                      \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
}

FB_SOFTMAX_BLOCK(fb_softmax_block_f32, float, fb_expf)
FB_SOFTMAX_BLOCK(fb_softmax_block_f64, double, fb_exp)

/* out = 1 / (1 + exp(-x)) without overflow: e = exp(-|x|) <= 1; out = 1/(1+e) or e/(1+e). */
#define FB_SIGMOID(NAME, T, EXP)                                                                              \
FB_CLONES static void NAME(long n, const T *x, T *out)                                                        \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) {                                                                            \
        T v = x[i];                                                                                           \
        T e = EXP(v >= 0 ? -v : v);                                                                           \
        T s = (T)1 / ((T)1 + e);                                                                              \
        out[i] = v >= 0 ? s : e * s;                                                                          \
    }                                                                                                         \
}

FB_SIGMOID(fb_sigmoid_f32, float, fb_expf)
FB_SIGMOID(fb_sigmoid_f64, double, fb_exp)

/* ReLU, branch-free so that random signs cost nothing: mask = x <= 0; out = mask ? 0 : x; dx = mask ? 0 : dout
 * (NaN: mask false, passes through). */
#define FB_RELU(NAME_F, NAME_B, T)                                                                            \
FB_CLONES static void NAME_F(long n, const T *restrict x, T *out, unsigned char *restrict mask)               \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) { T v = x[i]; int m = v <= 0; mask[i] = (unsigned char)m; out[i] = m ? (T)0 : v; } \
}                                                                                                             \
FB_CLONES static void NAME_B(long n, const T *dout, const unsigned char *restrict mask, T *dx)               \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) { T d = dout[i]; dx[i] = mask[i] ? (T)0 : d; }                               \
}

FB_RELU(fb_relu_forward_f32, fb_relu_backward_f32, float)
FB_RELU(fb_relu_forward_f64, fb_relu_backward_f64, double)

/* db[j] = sum_i dout[i, j] over a C-contiguous (n, m) block, accumulated in double in acc (m entries). */
#define FB_COLSUM(NAME, T)                                                                                    \
FB_CLONES static void NAME(long n, long m, const T *restrict dout, T *restrict db, double *restrict acc)      \
{                                                                                                             \
    long i, j;                                                                                                \
    for (j = 0; j < m; j++) acc[j] = 0.0;                                                                     \
    for (i = 0; i < n; i++) {                                                                                 \
        const T *row = dout + i * m;                                                                          \
        _Pragma("omp simd")                                                                                   \
        for (j = 0; j < m; j++) acc[j] += (double)row[j];                                                     \
    }                                                                                                         \
    for (j = 0; j < m; j++) db[j] = (T)acc[j];                                                                \
}

FB_COLSUM(fb_colsum_f32, float)
FB_COLSUM(fb_colsum_f64, double)

#endif
