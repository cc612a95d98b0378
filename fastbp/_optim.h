/* Vectorisable optimizer updates for fastbp/_optim.pyx, compiled for AVX-512, AVX2+FMA and baseline x86-64 and
 * dispatched like the row kernels of _simd.h (see there how and why). */
#ifndef FASTBP_OPTIM_H
#define FASTBP_OPTIM_H
#include <math.h>

#include "_simd.h"

/* One optimizer step over n elements, in place (formulas of the book's common/optimizer.py):
 * 0 SGD p -= lr g; 1 Momentum v = a v - lr g, p += v; 2 Nesterov v = a v - lr g, p += a a v - (1 + a) lr g;
 * 3 AdaGrad h += g g, p -= lr g / (sqrt(h) + eps); 4 RMSprop h = a h + (1 - a) g g, p -= lr g / (sqrt(h) + eps);
 * 5 Adam m += (1 - a)(g - m), v += (1 - b)(g g - v), p -= lr m / (sqrt(v) + eps) (lr is Adam's lr_t). */
#define FB_OPT(NAME, TARGET, T, SQRT)                                                                         \
TARGET static void NAME(int kind, long n, T *restrict p, const T *restrict g, T *restrict s1,              \
                           T *restrict s2, T lr, T a, T b, T eps)                                             \
{                                                                                                             \
    long i;                                                                                                   \
    switch (kind) {                                                                                           \
    case 0:                                                                                                   \
        _Pragma("omp simd")                                                                                   \
        for (i = 0; i < n; i++) p[i] -= lr * g[i];                                                            \
        break;                                                                                                \
    case 1:                                                                                                   \
        _Pragma("omp simd")                                                                                   \
        for (i = 0; i < n; i++) { T v = a * s1[i] - lr * g[i]; s1[i] = v; p[i] += v; }                       \
        break;                                                                                                \
    case 2:                                                                                                   \
        _Pragma("omp simd")                                                                                   \
        for (i = 0; i < n; i++) {                                                                             \
            T gi = g[i], v = a * s1[i] - lr * gi;                                                             \
            s1[i] = v; p[i] = p[i] + a * a * v - (1 + a) * lr * gi;                                           \
        }                                                                                                     \
        break;                                                                                                \
    case 3:                                                                                                   \
        _Pragma("omp simd")                                                                                   \
        for (i = 0; i < n; i++) { T gi = g[i], v = s1[i] + gi * gi; s1[i] = v; p[i] -= lr * gi / (SQRT(v) + eps); } \
        break;                                                                                                \
    case 4:                                                                                                   \
        _Pragma("omp simd")                                                                                   \
        for (i = 0; i < n; i++) {                                                                             \
            T gi = g[i], v = a * s1[i] + (1 - a) * gi * gi;                                                   \
            s1[i] = v; p[i] -= lr * gi / (SQRT(v) + eps);                                                     \
        }                                                                                                     \
        break;                                                                                                \
    case 5:                                                                                                   \
        _Pragma("omp simd")                                                                                   \
        for (i = 0; i < n; i++) {                                                                             \
            T gi = g[i], m = s1[i] + (1 - a) * (gi - s1[i]), v = s2[i] + (1 - b) * (gi * gi - s2[i]);         \
            s1[i] = m; s2[i] = v; p[i] -= lr * m / (SQRT(v) + eps);                                           \
        }                                                                                                     \
        break;                                                                                                \
    }                                                                                                         \
}

FB_VARIANTS(FB_OPT, fb_opt_f32, float, sqrtf)
FB_VARIANTS(FB_OPT, fb_opt_f64, double, sqrt)
FB_DISPATCH(fb_opt_f32, (int kind, long n, float *p, const float *g, float *s1, float *s2, float lr, float a,
                         float b, float eps), (kind, n, p, g, s1, s2, lr, a, b, eps))
FB_DISPATCH(fb_opt_f64, (int kind, long n, double *p, const double *g, double *s1, double *s2, double lr, double a,
                         double b, double eps), (kind, n, p, g, s1, s2, lr, a, b, eps))

#endif
