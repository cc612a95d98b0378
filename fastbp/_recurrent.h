/* Per-time-step elementwise kernels of the recurrent layers (fastbp/_recurrent.pyx).
 *
 * Each function handles one time step for all N rows of the batch: rows of an operand are `ld` elements apart
 * (a (N, T, K) sequence buffer read at step t has ld = T*K), the H columns of a row are contiguous.  The inner
 * loops over j < H are plain, branch-free and use fastbp's vectorisable exponential (fb_expf / fb_exp from
 * _simd.h), so GCC vectorises them; FB_REC_KERNELS compiles them for each SIMD path of _simd.h (AVX-512, AVX2+FMA,
 * baseline) and FB_REC_DISPATCH runs the chosen one.
 *
 *   sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, with e = exp(-|x|)   (no overflow)
 *   tanh(x)    = sign(x) (1 - e) / (1 + e), with e = exp(-2|x|)
 * Gate layouts are the book's: LSTM columns [f | g | i | o] (H each); GRU columns [z | r | h~].
 */
#ifndef FASTBP_RECURRENT_H
#define FASTBP_RECURRENT_H
#include "_simd.h"

#define FB_REC_ACT(T, EXP, SUF)                                                                              \
static inline T fb_sig_##SUF(T x)                                                                            \
{                                                                                                             \
    T e = EXP(-(x < 0 ? -x : x));                                                                             \
    T d = (T)1 / ((T)1 + e);                                                                                  \
    return x >= 0 ? d : e * d;                                                                                \
}                                                                                                             \
static inline T fb_tanh_##SUF(T x)                                                                           \
{                                                                                                             \
    T ax = x < 0 ? -x : x;                                                                                    \
    T e = EXP((T)-2 * ax);                                                                                    \
    T v = ((T)1 - e) / ((T)1 + e);                                                                           \
    return x < 0 ? -v : v;                                                                                    \
}

FB_REC_ACT(float, fb_expf, f32)
FB_REC_ACT(double, fb_exp, f64)

#define FB_REC_KERNELS(T, SUF, ISA, TARGET)                                                                             \
/* LSTM forward: a (pre-activations x Wx + b + h Wh) -> activated gates in place;                            \
   c = f * cprev + g * i; h = o * tanh(c). */                                                                 \
TARGET static void fb_lstm_fwd_##SUF##_##ISA(long N, long H, T *a, long lda, const T *cprev, long ldcp,          \
                                         T *c, long ldc, T *h, long ldh)                                      \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        T *restrict af = a + n * lda, *restrict ag = af + H, *restrict ai = af + 2 * H, *restrict ao = af + 3 * H; \
        const T *restrict cp = cprev + n * ldcp;                                                              \
        T *restrict cr = c + n * ldc, *restrict hr = h + n * ldh;                                             \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) {                                                                        \
            T f = fb_sig_##SUF(af[j]), g = fb_tanh_##SUF(ag[j]), i = fb_sig_##SUF(ai[j]), o = fb_sig_##SUF(ao[j]); \
            T cn = f * cp[j] + g * i;                                                                         \
            af[j] = f; ag[j] = g; ai[j] = i; ao[j] = o;                                                       \
            cr[j] = cn;                                                                                       \
            hr[j] = o * fb_tanh_##SUF(cn);                                                                    \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
/* LSTM backward: dh = dhs + dhn; tc = tanh(c); ds = dc + dh o (1 - tc^2); dc <- ds f;                       \
   da = [ds cprev f(1-f) | ds i (1-g^2) | ds g i(1-i) | dh tc o(1-o)]. dc and dhn are (N, H) contiguous. */    \
TARGET static void fb_lstm_bwd_##SUF##_##ISA(long N, long H, const T *gates, long ldg, const T *c, long ldc,      \
                                         const T *cprev, long ldcp, const T *dhs, long ldd, const T *dhn,    \
                                         T *dc, T *da, long ldda)                                            \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        const T *restrict gf = gates + n * ldg, *restrict gg = gf + H, *restrict gi = gf + 2 * H,            \
                *restrict go = gf + 3 * H;                                                                    \
        const T *restrict cr = c + n * ldc, *restrict cp = cprev + n * ldcp, *restrict dd = dhs + n * ldd,   \
                *restrict dn = dhn + n * H;                                                                   \
        T *restrict dcr = dc + n * H;                                                                         \
        T *restrict df = da + n * ldda, *restrict dg = df + H, *restrict di = df + 2 * H, *restrict dO = df + 3 * H; \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) {                                                                        \
            T f = gf[j], g = gg[j], i = gi[j], o = go[j];                                                     \
            T dh = dd[j] + dn[j];                                                                             \
            T tc = fb_tanh_##SUF(cr[j]);                                                                      \
            T ds = dcr[j] + dh * o * ((T)1 - tc * tc);                                                        \
            dcr[j] = ds * f;                                                                                  \
            df[j] = ds * cp[j] * f * ((T)1 - f);                                                              \
            dg[j] = ds * i * ((T)1 - g * g);                                                                  \
            di[j] = ds * g * i * ((T)1 - i);                                                                  \
            dO[j] = dh * tc * o * ((T)1 - o);                                                                 \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
/* RNN forward: h = tanh(a) (a = x Wx + b + hprev Wh). */                                                     \
TARGET static void fb_rnn_fwd_##SUF##_##ISA(long N, long H, const T *a, long lda, T *h, long ldh)                \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        const T *restrict ar = a + n * lda;                                                                   \
        T *restrict hr = h + n * ldh;                                                                         \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) hr[j] = fb_tanh_##SUF(ar[j]);                                            \
    }                                                                                                         \
}                                                                                                             \
/* RNN backward: da = (dhs + dhn) (1 - h^2). */                                                               \
TARGET static void fb_rnn_bwd_##SUF##_##ISA(long N, long H, const T *h, long ldh, const T *dhs, long ldd,        \
                                        const T *dhn, T *da, long ldda)                                       \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        const T *restrict hr = h + n * ldh, *restrict dd = dhs + n * ldd, *restrict dn = dhn + n * H;        \
        T *restrict dr = da + n * ldda;                                                                       \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) { T y = hr[j]; dr[j] = (dd[j] + dn[j]) * ((T)1 - y * y); }              \
    }                                                                                                         \
}                                                                                                             \
/* GRU forward, first half: b = hprev [Whz | Whr] (N, 2H contiguous); z = sig(az + bz), r = sig(ar + br)     \
   stored in a; rh = r hprev. */                                                                              \
TARGET static void fb_gru_fwd1_##SUF##_##ISA(long N, long H, T *a, long lda, const T *b, const T *hp, long ldhp, \
                                         T *rh, long ldrh)                                                    \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        T *restrict az = a + n * lda, *restrict ar = az + H;                                                  \
        const T *restrict bz = b + n * 2 * H, *restrict br = bz + H, *restrict hr = hp + n * ldhp;           \
        T *restrict o = rh + n * ldrh;                                                                        \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) {                                                                        \
            T z = fb_sig_##SUF(az[j] + bz[j]), r = fb_sig_##SUF(ar[j] + br[j]);                               \
            az[j] = z; ar[j] = r; o[j] = r * hr[j];                                                           \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
/* GRU forward, second half: q = (r hprev) Whh (N, H contiguous); h~ = tanh(ah + q) stored in a;             \
   h = (1 - z) hprev + z h~. */                                                                               \
TARGET static void fb_gru_fwd2_##SUF##_##ISA(long N, long H, T *a, long lda, const T *q, const T *hp, long ldhp, \
                                         T *h, long ldh)                                                      \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        T *restrict az = a + n * lda, *restrict ah = az + 2 * H;                                              \
        const T *restrict qr = q + n * H, *restrict hr = hp + n * ldhp;                                       \
        T *restrict o = h + n * ldh;                                                                          \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) {                                                                        \
            T z = az[j], hh = fb_tanh_##SUF(ah[j] + qr[j]);                                                   \
            ah[j] = hh;                                                                                       \
            o[j] = ((T)1 - z) * hr[j] + z * hh;                                                               \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
/* GRU backward, first half: dh = dhs + dhn; da_h = dh z (1 - h~^2); da_z = dh (h~ - hprev) z (1 - z);      \
   acc = dh (1 - z)  (acc: (N, H) contiguous, becomes dhprev). */                                              \
TARGET static void fb_gru_bwd1_##SUF##_##ISA(long N, long H, const T *g, long ldg, const T *hp, long ldhp,       \
                                         const T *dhs, long ldd, const T *dhn, T *acc, T *da, long ldda)     \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        const T *restrict gz = g + n * ldg, *restrict gh = gz + 2 * H, *restrict hr = hp + n * ldhp,          \
                *restrict dd = dhs + n * ldd, *restrict dn = dhn + n * H;                                     \
        T *restrict ac = acc + n * H, *restrict dz = da + n * ldda, *restrict dH = dz + 2 * H;               \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) {                                                                        \
            T z = gz[j], hh = gh[j], dh = dd[j] + dn[j];                                                      \
            dH[j] = dh * z * ((T)1 - hh * hh);                                                                \
            dz[j] = dh * (hh - hr[j]) * z * ((T)1 - z);                                                       \
            ac[j] = dh * ((T)1 - z);                                                                          \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
/* GRU backward, second half: dhr = da_h Whh^T (N, H contiguous); acc += r dhr;                              \
   da_r = dhr hprev r (1 - r). */                                                                             \
TARGET static void fb_gru_bwd2_##SUF##_##ISA(long N, long H, const T *g, long ldg, const T *hp, long ldhp,       \
                                         const T *dhr, T *acc, T *da, long ldda)                             \
{                                                                                                             \
    for (long n = 0; n < N; n++) {                                                                            \
        const T *restrict gr = g + n * ldg + H, *restrict hr = hp + n * ldhp, *restrict q = dhr + n * H;      \
        T *restrict ac = acc + n * H, *restrict dr = da + n * ldda + H;                                      \
        _Pragma("omp simd")                                                                                   \
        for (long j = 0; j < H; j++) {                                                                        \
            T r = gr[j];                                                                                      \
            ac[j] += r * q[j];                                                                                \
            dr[j] = q[j] * hr[j] * r * ((T)1 - r);                                                            \
        }                                                                                                     \
    }                                                                                                         \
}

/* Each kernel in the variant of every SIMD path, and the dispatcher that runs the chosen one (see _simd.h). */
#if FB_HAVE_VARIANTS
FB_REC_KERNELS(float, f32, avx512, FB_TARGET_AVX512)
FB_REC_KERNELS(double, f64, avx512, FB_TARGET_AVX512)
FB_REC_KERNELS(float, f32, avx2, FB_TARGET_AVX2)
FB_REC_KERNELS(double, f64, avx2, FB_TARGET_AVX2)
#endif
FB_REC_KERNELS(float, f32, base, )
FB_REC_KERNELS(double, f64, base, )

#define FB_REC_DISPATCH(T, SUF)                                                                              \
FB_DISPATCH(fb_lstm_fwd_##SUF, (long N, long H, T *a, long lda, const T *cprev, long ldcp, T *c, long ldc,    \
                                T *h, long ldh), (N, H, a, lda, cprev, ldcp, c, ldc, h, ldh))                 \
FB_DISPATCH(fb_lstm_bwd_##SUF, (long N, long H, const T *gates, long ldg, const T *c, long ldc,               \
                                const T *cprev, long ldcp, const T *dhs, long ldd, const T *dhn, T *dc, T *da, \
                                long ldda), (N, H, gates, ldg, c, ldc, cprev, ldcp, dhs, ldd, dhn, dc, da, ldda)) \
FB_DISPATCH(fb_rnn_fwd_##SUF, (long N, long H, const T *a, long lda, T *h, long ldh), (N, H, a, lda, h, ldh)) \
FB_DISPATCH(fb_rnn_bwd_##SUF, (long N, long H, const T *h, long ldh, const T *dhs, long ldd, const T *dhn,   \
                               T *da, long ldda), (N, H, h, ldh, dhs, ldd, dhn, da, ldda))                   \
FB_DISPATCH(fb_gru_fwd1_##SUF, (long N, long H, T *a, long lda, const T *b, const T *hp, long ldhp, T *rh,    \
                                long ldrh), (N, H, a, lda, b, hp, ldhp, rh, ldrh))                            \
FB_DISPATCH(fb_gru_fwd2_##SUF, (long N, long H, T *a, long lda, const T *q, const T *hp, long ldhp, T *h,     \
                                long ldh), (N, H, a, lda, q, hp, ldhp, h, ldh))                               \
FB_DISPATCH(fb_gru_bwd1_##SUF, (long N, long H, const T *g, long ldg, const T *hp, long ldhp, const T *dhs,   \
                                long ldd, const T *dhn, T *acc, T *da, long ldda),                            \
            (N, H, g, ldg, hp, ldhp, dhs, ldd, dhn, acc, da, ldda))                                           \
FB_DISPATCH(fb_gru_bwd2_##SUF, (long N, long H, const T *g, long ldg, const T *hp, long ldhp, const T *dhr,   \
                                T *acc, T *da, long ldda), (N, H, g, ldg, hp, ldhp, dhr, acc, da, ldda))

FB_REC_DISPATCH(float, f32)
FB_REC_DISPATCH(double, f64)

#endif
