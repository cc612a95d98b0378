/* Per-sample column kernels of the convolution in fastbp/_conv.pyx, compiled for AVX-512, AVX2+FMA and baseline
 * x86-64 and dispatched like the row kernels of _simd.h (see there how and why).
 *
 * Why C and why a padded copy: the sample is first copied into a zero-padded plane xp (C, Hp, Wp),
 * Hp = H + 2 pad, Wp = W + 2 pad (small: it stays in L1/L2), so that every row of the transposed column matrix
 * is a plain strided copy out of xp -- no bounds tests, no memcpy calls of a few bytes -- which the compiler
 * vectorises for the path's vector width.  col2im is the mirror image: the adds land in a zero-initialised padded
 * plane (again without bounds tests) whose interior is then copied out; the padding cells, which im2col read as
 * zeros, simply receive sums that are dropped.  The adds happen in the same order as an unpadded col2im would do
 * them (row (c, dy, dx), then i, then j) and nothing here is a reduction, so these kernels give the same bits on
 * every path and thread count (the GEMMs around them may not: each path has its own BLAS kernels).
 * The wide layout's helpers (widen / unwiden / unpad, below) move a sample's output or dout between the (FN, oh,
 * ow) layout and rows Wp long, and the interior out of a padded plane. */
#ifndef FASTBP_CONV_H
#define FASTBP_CONV_H
#include <string.h>

#include "_simd.h"

/* FB_DISPATCH (see _simd.h) for a kernel that returns an int. */
#if FB_HAVE_VARIANTS
#define FB_DISPATCH_INT(NAME, PARAMS, ARGS)                                                                   \
static inline int NAME PARAMS                                                                                 \
{                                                                                                             \
    int l_ = fb_simd_pick();                                                                                  \
    return l_ == 2 ? NAME##_avx512 ARGS : l_ == 1 ? NAME##_avx2 ARGS : NAME##_base ARGS;                      \
}
#else
#define FB_DISPATCH_INT(NAME, PARAMS, ARGS)                                                                   \
static inline int NAME PARAMS { (void)fb_simd_pick(); return NAME##_base ARGS; }
#endif

/* GCC turns the short row copies below into calls of memcpy (loop distribution), which cost more than the copy
 * itself for rows of 8 to 28 elements; kept as inline vector loops. */
#if defined(__GNUC__) && !defined(__clang__)
#define FB_CONV_INLINE_COPIES __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define FB_CONV_INLINE_COPIES
#endif

/* xp (C, H + 2 pad, W + 2 pad) = x (C, H, W) zero-padded. */
#define FB_CONV_PAD(NAME, TARGET, T)                                                                          \
TARGET FB_CONV_INLINE_COPIES static void NAME(long C, long H, long W, long pad, const T *restrict x,         \
                                              T *restrict xp)                                                 \
{                                                                                                             \
    long Hp = H + 2 * pad, Wp = W + 2 * pad, c, y, j;                                                         \
    for (c = 0; c < C; c++) {                                                                                 \
        T *p = xp + c * Hp * Wp;                                                                              \
        const T *s = x + c * H * W;                                                                           \
        if (pad) memset(p, 0, (size_t)(pad * Wp) * sizeof(T));                                                \
        for (y = 0; y < H; y++) {                                                                             \
            T *r = p + (y + pad) * Wp;                                                                        \
            for (j = 0; j < pad; j++) { r[j] = 0; r[pad + W + j] = 0; }                                       \
            _Pragma("omp simd")                                                                               \
            for (j = 0; j < W; j++) r[pad + j] = s[y * W + j];                                                \
        }                                                                                                     \
        if (pad) memset(p + (H + pad) * Wp, 0, (size_t)(pad * Wp) * sizeof(T));                               \
    }                                                                                                         \
}

/* Nonzero when p[0 .. n) holds an inf or a NaN: v - v is 0 for every finite v and NaN otherwise, and a sum with
 * a NaN in it is NaN.  (Folding this test into the padded copy kept its reduction in memory: 3x slower copies.) */
#define FB_CONV_NONFINITE(NAME, TARGET, T)                                                                    \
TARGET static int NAME(long n, const T *restrict p)                                                           \
{                                                                                                             \
    T acc = 0;                                                                                                \
    long i;                                                                                                   \
    _Pragma("omp simd reduction(+:acc)")                                                                      \
    for (i = 0; i < n; i++) acc += p[i] - p[i];                                                               \
    return acc != acc;                                                                                        \
}

/* colT[(c, dy, dx), (i, j)] = xp[c, i*s + dy, j*s + dx]: (C*fh*fw, oh*ow) from the padded plane (C, Hp, Wp). */
#define FB_CONV_IM2COL(NAME, TARGET, T)                                                                       \
TARGET FB_CONV_INLINE_COPIES static void NAME(long C, long Hp, long Wp, long fh, long fw, long s, long oh,     \
                                              long ow, const T *restrict xp, T *restrict colT)               \
{                                                                                                             \
    long c, dy, dx, i, j;                                                                                     \
    for (c = 0; c < C; c++)                                                                                   \
        for (dy = 0; dy < fh; dy++)                                                                           \
            for (dx = 0; dx < fw; dx++) {                                                                     \
                T *row = colT + ((c * fh + dy) * fw + dx) * oh * ow;                                          \
                const T *src = xp + (c * Hp + dy) * Wp + dx;                                                  \
                if (s == 1) {                                                                                 \
                    for (i = 0; i < oh; i++) {                                                                \
                        _Pragma("omp simd")                                                                   \
                        for (j = 0; j < ow; j++) row[i * ow + j] = src[i * Wp + j];                           \
                    }                                                                                         \
                } else {                                                                                      \
                    for (i = 0; i < oh; i++)                                                                  \
                        for (j = 0; j < ow; j++) row[i * ow + j] = src[i * s * Wp + j * s];                   \
                }                                                                                             \
            }                                                                                                 \
}

/* dx (C, H, W) = the adjoint of pad + im2col applied to colT (C*fh*fw, oh*ow); xp (C, Hp, Wp) is scratch. */
#define FB_CONV_COL2IM(NAME, TARGET, T)                                                                       \
TARGET FB_CONV_INLINE_COPIES static void NAME(long C, long H, long W, long fh, long fw, long s, long pad,      \
                                              long oh, long ow, const T *restrict colT, T *restrict xp,       \
                                              T *restrict dx)                                                 \
{                                                                                                             \
    long Hp = H + 2 * pad, Wp = W + 2 * pad, c, dy, ddx, i, j, y;                                             \
    memset(xp, 0, (size_t)(C * Hp * Wp) * sizeof(T));                                                        \
    for (c = 0; c < C; c++)                                                                                   \
        for (dy = 0; dy < fh; dy++)                                                                           \
            for (ddx = 0; ddx < fw; ddx++) {                                                                  \
                const T *row = colT + ((c * fh + dy) * fw + ddx) * oh * ow;                                   \
                T *dst = xp + (c * Hp + dy) * Wp + ddx;                                                       \
                if (s == 1) {                                                                                 \
                    for (i = 0; i < oh; i++) {                                                                \
                        _Pragma("omp simd")                                                                   \
                        for (j = 0; j < ow; j++) dst[i * Wp + j] += row[i * ow + j];                          \
                    }                                                                                         \
                } else {                                                                                      \
                    for (i = 0; i < oh; i++)                                                                  \
                        for (j = 0; j < ow; j++) dst[i * s * Wp + j * s] += row[i * ow + j];                  \
                }                                                                                             \
            }                                                                                                 \
    for (c = 0; c < C; c++)                                                                                   \
        for (y = 0; y < H; y++)                                                                               \
            for (j = 0; j < W; j++) dx[(c * H + y) * W + j] = xp[(c * Hp + y + pad) * Wp + pad + j];           \
}

/* dT (P, FN) = d (FN, P) transposed, in tiles of 16 positions (contiguous reads, cached writes). */
#define FB_CONV_TRANSPOSE(NAME, TARGET, T)                                                                    \
TARGET static void NAME(long FN, long P, const T *restrict d, T *restrict dT)                                \
{                                                                                                             \
    long p0, p1, f, p;                                                                                        \
    for (p0 = 0; p0 < P; p0 = p1) {                                                                           \
        p1 = p0 + 16 < P ? p0 + 16 : P;                                                                       \
        for (f = 0; f < FN; f++)                                                                              \
            for (p = p0; p < p1; p++) dT[p * FN + f] = d[f * P + p];                                          \
    }                                                                                                         \
}

FB_VARIANTS(FB_CONV_PAD, fb_conv_pad_f32, float)
FB_VARIANTS(FB_CONV_PAD, fb_conv_pad_f64, double)
FB_VARIANTS(FB_CONV_NONFINITE, fb_conv_nonfinite_f32, float)
FB_VARIANTS(FB_CONV_NONFINITE, fb_conv_nonfinite_f64, double)
FB_VARIANTS(FB_CONV_IM2COL, fb_conv_im2col_f32, float)
FB_VARIANTS(FB_CONV_IM2COL, fb_conv_im2col_f64, double)
FB_VARIANTS(FB_CONV_COL2IM, fb_conv_col2im_f32, float)
FB_VARIANTS(FB_CONV_COL2IM, fb_conv_col2im_f64, double)
FB_VARIANTS(FB_CONV_TRANSPOSE, fb_conv_transpose_f32, float)
FB_VARIANTS(FB_CONV_TRANSPOSE, fb_conv_transpose_f64, double)
FB_DISPATCH(fb_conv_pad_f32, (long C, long H, long W, long pad, const float *x, float *xp), (C, H, W, pad, x, xp))
FB_DISPATCH(fb_conv_pad_f64, (long C, long H, long W, long pad, const double *x, double *xp), (C, H, W, pad, x, xp))
FB_DISPATCH_INT(fb_conv_nonfinite_f32, (long n, const float *p), (n, p))
FB_DISPATCH_INT(fb_conv_nonfinite_f64, (long n, const double *p), (n, p))
FB_DISPATCH(fb_conv_im2col_f32, (long C, long Hp, long Wp, long fh, long fw, long s, long oh, long ow,
                                 const float *xp, float *colT), (C, Hp, Wp, fh, fw, s, oh, ow, xp, colT))
FB_DISPATCH(fb_conv_im2col_f64, (long C, long Hp, long Wp, long fh, long fw, long s, long oh, long ow,
                                 const double *xp, double *colT), (C, Hp, Wp, fh, fw, s, oh, ow, xp, colT))
FB_DISPATCH(fb_conv_col2im_f32, (long C, long H, long W, long fh, long fw, long s, long pad, long oh, long ow,
                                 const float *colT, float *xp, float *dx),
            (C, H, W, fh, fw, s, pad, oh, ow, colT, xp, dx))
FB_DISPATCH(fb_conv_col2im_f64, (long C, long H, long W, long fh, long fw, long s, long pad, long oh, long ow,
                                 const double *colT, double *xp, double *dx),
            (C, H, W, fh, fw, s, pad, oh, ow, colT, xp, dx))
FB_DISPATCH(fb_conv_transpose_f32, (long FN, long P, const float *d, float *dT), (FN, P, d, dT))
FB_DISPATCH(fb_conv_transpose_f64, (long FN, long P, const double *d, double *dT), (FN, P, d, dT))

/* acc[f] += the sum of row f of d (FN, P), in double (db of one sample).  The vector reduction order is fixed by
 * the path, never by the threads. */
#define FB_CONV_ROWSUMS(NAME, TARGET, T)                                                                      \
TARGET static void NAME(long FN, long P, const T *restrict d, double *restrict acc)                           \
{                                                                                                             \
    long f, p;                                                                                                \
    for (f = 0; f < FN; f++) {                                                                                \
        double s = 0;                                                                                         \
        _Pragma("omp simd reduction(+:s)")                                                                    \
        for (p = 0; p < P; p++) s += (double)d[f * P + p];                                                    \
        acc[f] += s;                                                                                          \
    }                                                                                                         \
}

/* out (FN, P) = b[f] in every row f (the bias the im2col way's GEMM then adds its product to). */
#define FB_CONV_FILL(NAME, TARGET, T)                                                                         \
TARGET static void NAME(long FN, long P, const T *restrict b, T *restrict out)                                \
{                                                                                                             \
    long f, p;                                                                                                \
    for (f = 0; f < FN; f++) {                                                                                \
        T bf = b[f];                                                                                          \
        _Pragma("omp simd")                                                                                   \
        for (p = 0; p < P; p++) out[f * P + p] = bf;                                                          \
    }                                                                                                         \
}

/* The "wide" layout of the stride-1 convolution (see _conv.pyx): a sample's output rows are computed Wp long
 * (columns ow .. Wp-1 are garbage), so that every filter tap reads the padded plane at one constant offset.
 * out (FN, oh, ow) = b + wide (FN, oh*Wp) with the garbage columns dropped. */
#define FB_CONV_UNWIDEN(NAME, TARGET, T)                                                                      \
TARGET FB_CONV_INLINE_COPIES static void NAME(long FN, long oh, long ow, long Wp, const T *restrict wide,   \
                                              const T *restrict b, T *restrict out)                           \
{                                                                                                             \
    long f, i, j;                                                                                             \
    for (f = 0; f < FN; f++) {                                                                                \
        T bf = b[f];                                                                                          \
        for (i = 0; i < oh; i++) {                                                                            \
            const T *src = wide + (f * oh + i) * Wp;                                                          \
            T *dst = out + (f * oh + i) * ow;                                                                 \
            _Pragma("omp simd")                                                                               \
            for (j = 0; j < ow; j++) dst[j] = src[j] + bf;                                                    \
        }                                                                                                     \
    }                                                                                                         \
}

/* wide (FN, oh*Wp) = d (FN, oh, ow) with zeros in the garbage columns; wideT (oh*Wp, FN) its transpose (either may
 * be NULL). */
#define FB_CONV_WIDEN(NAME, TARGET, T)                                                                        \
TARGET FB_CONV_INLINE_COPIES static void NAME(long FN, long oh, long ow, long Wp, const T *restrict d,      \
                                              T *restrict wide, T *restrict wideT)                            \
{                                                                                                             \
    long f, i, j;                                                                                             \
    if (wide)                                                                                                 \
        for (f = 0; f < FN; f++)                                                                              \
            for (i = 0; i < oh; i++) {                                                                        \
                const T *src = d + (f * oh + i) * ow;                                                         \
                T *dst = wide + (f * oh + i) * Wp;                                                            \
                _Pragma("omp simd")                                                                           \
                for (j = 0; j < ow; j++) dst[j] = src[j];                                                     \
                for (j = ow; j < Wp; j++) dst[j] = 0;                                                         \
            }                                                                                                 \
    if (wideT)                                                                                                \
        for (i = 0; i < oh; i++) {                                                                            \
            T *dst = wideT + i * Wp * FN;                                                                     \
            for (f = 0; f < FN; f++) {                                                                        \
                const T *src = d + (f * oh + i) * ow;                                                         \
                for (j = 0; j < ow; j++) dst[j * FN + f] = src[j];                                            \
            }                                                                                                 \
            for (j = ow * FN; j < Wp * FN; j++) dst[j] = 0;                                                   \
        }                                                                                                     \
}

/* dx (C, H, W) = the interior of the padded plane xp (C, H + 2 pad, W + 2 pad). */
#define FB_CONV_UNPAD(NAME, TARGET, T)                                                                        \
TARGET FB_CONV_INLINE_COPIES static void NAME(long C, long H, long W, long pad, const T *restrict xp,       \
                                              T *restrict dx)                                                 \
{                                                                                                             \
    long Hp = H + 2 * pad, Wp = W + 2 * pad, c, y, j;                                                         \
    for (c = 0; c < C; c++)                                                                                   \
        for (y = 0; y < H; y++) {                                                                             \
            const T *src = xp + (c * Hp + y + pad) * Wp + pad;                                                \
            T *dst = dx + (c * H + y) * W;                                                                    \
            _Pragma("omp simd")                                                                               \
            for (j = 0; j < W; j++) dst[j] = src[j];                                                          \
        }                                                                                                     \
}

FB_VARIANTS(FB_CONV_ROWSUMS, fb_conv_rowsums_f32, float)
FB_VARIANTS(FB_CONV_ROWSUMS, fb_conv_rowsums_f64, double)
FB_DISPATCH(fb_conv_rowsums_f32, (long FN, long P, const float *d, double *acc), (FN, P, d, acc))
FB_DISPATCH(fb_conv_rowsums_f64, (long FN, long P, const double *d, double *acc), (FN, P, d, acc))
FB_VARIANTS(FB_CONV_FILL, fb_conv_fill_f32, float)
FB_VARIANTS(FB_CONV_FILL, fb_conv_fill_f64, double)
FB_DISPATCH(fb_conv_fill_f32, (long FN, long P, const float *b, float *out), (FN, P, b, out))
FB_DISPATCH(fb_conv_fill_f64, (long FN, long P, const double *b, double *out), (FN, P, b, out))
FB_VARIANTS(FB_CONV_UNWIDEN, fb_conv_unwiden_f32, float)
FB_VARIANTS(FB_CONV_UNWIDEN, fb_conv_unwiden_f64, double)
FB_VARIANTS(FB_CONV_WIDEN, fb_conv_widen_f32, float)
FB_VARIANTS(FB_CONV_WIDEN, fb_conv_widen_f64, double)
FB_VARIANTS(FB_CONV_UNPAD, fb_conv_unpad_f32, float)
FB_VARIANTS(FB_CONV_UNPAD, fb_conv_unpad_f64, double)
FB_DISPATCH(fb_conv_unwiden_f32, (long FN, long oh, long ow, long Wp, const float *wide, const float *b, float *out),
            (FN, oh, ow, Wp, wide, b, out))
FB_DISPATCH(fb_conv_unwiden_f64, (long FN, long oh, long ow, long Wp, const double *wide, const double *b,
                                  double *out), (FN, oh, ow, Wp, wide, b, out))
FB_DISPATCH(fb_conv_widen_f32, (long FN, long oh, long ow, long Wp, const float *d, float *wide, float *wideT),
            (FN, oh, ow, Wp, d, wide, wideT))
FB_DISPATCH(fb_conv_widen_f64, (long FN, long oh, long ow, long Wp, const double *d, double *wide, double *wideT),
            (FN, oh, ow, Wp, d, wide, wideT))
FB_DISPATCH(fb_conv_unpad_f32, (long C, long H, long W, long pad, const float *xp, float *dx), (C, H, W, pad, xp, dx))
FB_DISPATCH(fb_conv_unpad_f64, (long C, long H, long W, long pad, const double *xp, double *dx),
            (C, H, W, pad, xp, dx))

#endif
