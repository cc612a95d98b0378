/* Vectorisable row kernels for fastbp/_kernels.pyx, and the machinery that runs each of them in the variant for
 * the CPU's instruction set (the optimizer updates in _optim.h use it too).
 *
 * Why C: the exponential is the cost of softmax and sigmoid.  libm's exp/expf is a scalar call, so a loop over
 * it cannot be vectorised; here exp is a branch-free Cody-Waite range reduction plus a polynomial, which the
 * compiler vectorises.  Cython cannot attach target attributes, hence this header.
 *
 * SIMD paths.  A portable build may only assume the baseline (SSE2 on x86-64), so every kernel is compiled up to
 * three times: FB_VARIANTS(DEF, NAME, ...) expands DEF(NAME_avx512, <target attribute>, ...),
 * DEF(NAME_avx2, ...) and DEF(NAME_base, <nothing>, ...), and FB_DISPATCH(NAME, (params), (args)) defines NAME
 * itself, which calls the variant of the path chosen once per extension module (at its first kernel call, or at
 * import through fb_simd_level()):
 *   2 "avx512"   AVX-512 F/CD/BW/DQ/VL + AVX2/FMA/BMI1/BMI2   (the CPU has them all)
 *   1 "avx2"     AVX2/FMA/BMI1/BMI2 (+ AVX)
 *   0 "baseline" what the compiler targets by default
 * less what FASTBP_DISABLE_CPU_FEATURES turns off (NumPy's NPY_DISABLE_CPU_FEATURES convention: a comma or space
 * separated list of feature names or patterns with * and ?, any case; /proc/cpuinfo names, or NumPy's FMA3,
 * SSE41, SSE42, SSE3, AVX512_SKX).  A path is off when any of its features, or of the paths below it, is named:
 * "AVX512F" gives the avx2 path, "AVX2" or "AVX" the baseline.  fastbp._blas reads the same variable for the
 * core type of its OpenBLAS, so one setting moves both.  The variants exist only on x86 with a compiler that
 * takes target attributes (setup.py probes it: FASTBP_TARGET_ATTR); elsewhere the baseline is the only path.
 * fb_simd_count(1) makes every dispatch count the variant it runs (fb_simd_calls[path]), so tests can show the
 * path really changed; off, it costs one predictable branch.
 */
#ifndef FASTBP_SIMD_H
#define FASTBP_SIMD_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef FASTBP_TARGET_ATTR
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTBP_TARGET_ATTR 1
#else
#define FASTBP_TARGET_ATTR 0
#endif
#endif

#if FASTBP_TARGET_ATTR && (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FB_HAVE_VARIANTS 1
#define FB_TARGET_AVX2 __attribute__((target("avx,avx2,fma,bmi,bmi2")))
#define FB_TARGET_AVX512 __attribute__((target("avx,avx2,fma,bmi,bmi2,avx512f,avx512cd,avx512bw,avx512dq,avx512vl")))
#define FB_VARIANTS(DEF, NAME, ...)                                                                           \
    DEF(NAME##_avx512, FB_TARGET_AVX512, __VA_ARGS__)                                                         \
    DEF(NAME##_avx2, FB_TARGET_AVX2, __VA_ARGS__)                                                             \
    DEF(NAME##_base, , __VA_ARGS__)
#define FB_DISPATCH(NAME, PARAMS, ARGS)                                                                       \
static inline void NAME PARAMS                                                                                \
{                                                                                                             \
    int l_ = fb_simd_pick();                                                                                  \
    if (l_ == 2) NAME##_avx512 ARGS;                                                                          \
    else if (l_ == 1) NAME##_avx2 ARGS;                                                                       \
    else NAME##_base ARGS;                                                                                    \
}
#else
#define FB_HAVE_VARIANTS 0
#define FB_VARIANTS(DEF, NAME, ...) DEF(NAME##_base, , __VA_ARGS__)
#define FB_DISPATCH(NAME, PARAMS, ARGS)                                                                       \
static inline void NAME PARAMS { (void)fb_simd_pick(); NAME##_base ARGS; }
#endif

/* Kept for kernels not yet converted to FB_VARIANTS/FB_DISPATCH: GCC's target_clones, resolved by the dynamic
 * loader from the CPU alone (FASTBP_DISABLE_CPU_FEATURES cannot reach them).  Convert, do not add more. */
#ifndef FB_CLONES
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && FASTBP_TARGET_ATTR
#define FB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FB_CLONES
#endif
#endif

static const char *const fb_simd_names[3] = {"baseline", "avx2", "avx512"};
static int fb_simd_level_ = -1;        /* the path of this extension module, -1 until chosen */
static int fb_simd_counting = 0;
static long long fb_simd_calls[3];

/* The features each path needs, by /proc/cpuinfo name (a path needs its own and those of the paths below). */
static const char *const fb_simd_avx2_features[] = {"avx", "avx2", "fma", "bmi1", "bmi2", NULL};
static const char *const fb_simd_avx512_features[] = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
                                                     NULL};

/* Case-insensitive match of a name against a pattern with * and ? (fnmatch's rule for those two). */
static int fb_glob(const char *p, const char *s)
{
    const char *star = NULL, *resume = NULL;
    while (*s) {
        char a = *p >= 'A' && *p <= 'Z' ? (char)(*p + 32) : *p;
        char b = *s >= 'A' && *s <= 'Z' ? (char)(*s + 32) : *s;
        if (*p == '*') { star = p++; resume = s; continue; }
        if (*p && (*p == '?' || a == b)) { p++; s++; continue; }
        if (star) { p = star + 1; s = ++resume; continue; }
        return 0;
    }
    while (*p == '*') p++;
    return *p == 0;
}

/* NumPy's names of features that /proc/cpuinfo spells otherwise. */
static const char *fb_simd_alias(const char *w)
{
    static const char *const pairs[][2] = {{"fma3", "fma"}, {"sse41", "sse4_1"}, {"sse42", "sse4_2"},
                                           {"sse3", "pni"}, {"avx512_skx", "avx512*"}, {"bmi", "bmi1"}};
    size_t i;
    for (i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++)
        if (fb_glob(pairs[i][0], w) && strlen(w) == strlen(pairs[i][0])) return pairs[i][1];
    return w;
}

static int fb_simd_named(const char *disabled, const char *const *features)
{
    char word[64];
    const char *s = disabled;
    while (s && *s) {
        size_t n = 0;
        while (*s == ',' || *s == ' ' || *s == '\t' || *s == '\n') s++;
        while (*s && *s != ',' && *s != ' ' && *s != '\t' && *s != '\n') {
            if (n < sizeof(word) - 1) word[n++] = *s;
            s++;
        }
        word[n] = 0;
        if (n) {
            const char *pat = fb_simd_alias(word);
            const char *const *f;
            for (f = features; *f; f++)
                if (fb_glob(pat, *f)) return 1;
        }
    }
    return 0;
}

/* The best path the CPU runs (and this build has), 0..2. */
static int fb_simd_hw_level(void)
{
#if FB_HAVE_VARIANTS
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
          && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")))
        return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return 2;
    return 1;
#else
    return 0;
#endif
}

/* min(hw, the best path none of whose features `disabled` names). */
static int fb_simd_level_for(int hw, const char *disabled)
{
    if (disabled == NULL) return hw;
    if (fb_simd_named(disabled, fb_simd_avx2_features)) return 0;
    if (hw >= 2 && fb_simd_named(disabled, fb_simd_avx512_features)) return 1;
    return hw;
}

/* Choose this module's path (once; every later call returns the same). */
static int fb_simd_level(void)
{
    if (fb_simd_level_ < 0)
        fb_simd_level_ = fb_simd_level_for(fb_simd_hw_level(), getenv("FASTBP_DISABLE_CPU_FEATURES"));
    return fb_simd_level_;
}

static inline int fb_simd_pick(void)
{
    int l = fb_simd_level_;
    if (l < 0) l = fb_simd_level();
    if (fb_simd_counting) {
#if defined(__GNUC__) || defined(__clang__)
        __atomic_fetch_add(&fb_simd_calls[l], 1, __ATOMIC_RELAXED);
#else
        fb_simd_calls[l]++;
#endif
    }
    return l;
}

/* Start (1) or stop (0) counting dispatches, zeroing the counts when starting. */
static void fb_simd_count(int on)
{
    if (on) memset(fb_simd_calls, 0, sizeof(fb_simd_calls));
    fb_simd_counting = on;
}

static inline float fb_expf(float x)
{
    /* exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (two-part ln2 keeps r exact) */
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.3f ? -87.3f : x;                  /* NaN stays NaN, and gives NaN below */
    float t = xc * log2e + 12582912.0f;                  /* round to nearest: 1.5 * 2^23 trick */
    float n = t - 12582912.0f;
    float r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    /* exp(r) ~ the degree-7 Taylor polynomial (|r| <= ln2 / 2: within 1.3 ulp), evaluated by Estrin's scheme:
     * pairs of terms, then powers r^2 and r^4, so the chain of dependent multiply-adds is 4 deep instead of
     * Horner's 8 and the loops that call it run at the vector units' throughput, not at their latency. */
    float r2 = r * r, r4 = r2 * r2;
    float q67 = (1.0f / 5040.0f) * r + 1.0f / 720.0f;
    float q45 = (1.0f / 120.0f) * r + 1.0f / 24.0f;
    float q23 = (1.0f / 6.0f) * r + 0.5f;
    float q47 = q67 * r2 + q45;
    float q13 = q23 * r2 + r;
    float p = (q47 * r4 + q13) + 1.0f;
    /* 2^n without a float -> int conversion: t + 127 holds n + 127 in its low mantissa bits; shifted up, they
     * are the exponent field. */
    union { float f; uint32_t i; } u = { t + 127.0f };
    u.i <<= 23;
    float scale = u.f;
    /* zero below the range (NaN stays NaN): a bit mask, one AND (a multiply by 0/1 compiled to three blends).
     * Under the default -ftrapping-math GCC branches around the polynomial here and then cannot vectorise the
     * loop for AVX2 (it may not speculate the multiplies): setup.py builds with -fno-trapping-math. */
    union { float f; uint32_t i; } v = { p * scale };
    v.i &= 0u - (uint32_t)!(x < -87.3f);
    return v.f;
}

static inline double fb_exp(double x)
{
    const double log2e = 1.4426950408889634074, ln2_hi = 6.93147180369123816490e-01,
                 ln2_lo = 1.90821492927058770002e-10;
    double xc = x < -708.0 ? -708.0 : x;
    double t = xc * log2e + 6755399441055744.0;                          /* 1.5 * 2^52 */
    double n = t - 6755399441055744.0;
    double r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    /* the degree-12 Taylor polynomial (within 3 ulp) by Estrin's scheme, as in fb_expf */
    double r2 = r * r, r4 = r2 * r2;
    double q1011 = (1.0 / 39916800.0) * r + 1.0 / 3628800.0;
    double q89 = (1.0 / 362880.0) * r + 1.0 / 40320.0;
    double q67 = (1.0 / 5040.0) * r + 1.0 / 720.0;
    double q45 = (1.0 / 120.0) * r + 1.0 / 24.0;
    double q23 = (1.0 / 6.0) * r + 0.5;
    double q812 = (1.0 / 479001600.0) * r4 + (q1011 * r2 + q89);
    double q47 = q67 * r2 + q45;
    double q13 = q23 * r2 + r;
    double p = ((q812 * r4 + q47) * r4 + q13) + 1.0;
    union { double f; uint64_t i; } u = { t + 1023.0 };   /* 2^n as in fb_expf: AVX2 has no double -> int64 */
    u.i <<= 52;
    double scale = u.f;
    union { double f; uint64_t i; } v = { p * scale };
    v.i &= (uint64_t)0 - (uint64_t)!(x < -708.0);
    return v.f;
}

/* Softmax with cross-entropy over a block of `rows` rows (at most FB_SOFTMAX_CHUNK) of `c` classes.  y = softmax(x)
 * row-wise; g = scale * (y - target) unless g is NULL; target is onehot (rows x c) when onehot != NULL, else the
 * one-hot vector of labels[i].  rowloss[i] = sum_j target_j * (logsumexp(x_i) - x_ij).  With has_ignore, a row
 * whose label is `ignore` gets y but rowloss 0 and a zero gradient row.
 * Accuracy: with e_j = exp(x_j - max) (e = 1 at the max) and r = sum of the e_j other than one 1, the sum is 1 + r,
 *   logsumexp - x_t = (max - x_t) + log1p(r)       in double: no cancellation when the max dominates (tiny loss),
 *                                                  and finite for float32 logits whose loss is beyond float32;
 *   g_t = -scale * (sum_{j != t} e_j) / (1 + r)    in double, where y_t - 1 would cancel in float32.
 * NaN in a row makes its sum NaN, and so its whole y and g rows and its loss (the max may skip the NaN: no test
 * needed).  Short rows (C = 10) cost per row, not per element, so the passes are separate loops: the exponentials
 * over the whole block in one loop (the vector lanes stay full), the logs (library calls, which would spill every
 * vector register in the middle of a row loop) in a loop of their own over the rows' sums kept in rs[]. */
#define FB_SOFTMAX_BLOCK(NAME, TARGET, T, EXP)                                                                \
TARGET static inline void NAME##_rows(const T *restrict x, T *restrict y, T *restrict g, long rows, long c,  \
                           T scale, const T *restrict onehot, const int64_t *restrict labels, int has_ignore, \
                           int64_t ignore, double *restrict rowloss)                                          \
{                                                                                                             \
    double rs[FB_SOFTMAX_CHUNK], lg[FB_SOFTMAX_CHUNK];   /* per row: r, then log(1 + r) */                    \
    T ms[FB_SOFTMAX_CHUNK];                              /* per row: its max */                               \
    long i, j;                                                                                                \
    if (c < 64) {                                                                                             \
        /* rows shorter than 64: plain loops (an omp simd reduction goes through a stack array of lanes, which \
         * costs a store-forwarding stall per row, more than the row's work), four rows at a time: each row's \
         * maximum is taken in its own order as before, and the four chains of dependent comparisons overlap */ \
        for (i = 0; i + 4 <= rows; i += 4) {                                                                  \
            const T *x0 = x + i * c, *x1 = x0 + c, *x2 = x1 + c, *x3 = x2 + c;                                \
            T m0 = x0[0], m1 = x1[0], m2 = x2[0], m3 = x3[0];                                                 \
            for (j = 1; j < c; j++) {                                                                         \
                m0 = x0[j] > m0 ? x0[j] : m0;                                                                 \
                m1 = x1[j] > m1 ? x1[j] : m1;                                                                 \
                m2 = x2[j] > m2 ? x2[j] : m2;                                                                 \
                m3 = x3[j] > m3 ? x3[j] : m3;                                                                 \
            }                                                                                                 \
            ms[i] = m0; ms[i + 1] = m1; ms[i + 2] = m2; ms[i + 3] = m3;                                       \
        }                                                                                                     \
        for (; i < rows; i++) {                                                                               \
            const T *xr = x + i * c;                                                                          \
            T m = xr[0];                                                                                      \
            for (j = 1; j < c; j++) m = xr[j] > m ? xr[j] : m;                                                \
            ms[i] = m;                                                                                        \
        }                                                                                                     \
    } else {                                                                                                  \
        for (i = 0; i < rows; i++) {                                                                          \
            const T *xr = x + i * c;                                                                          \
            T m = xr[0];                                                                                      \
            _Pragma("omp simd reduction(max:m)")                                                              \
            for (j = 1; j < c; j++) m = xr[j] > m ? xr[j] : m;                                                \
            ms[i] = m;                                                                                        \
        }                                                                                                     \
    }                                                                                                         \
    for (i = 0; i < rows; i++) {                                                                              \
        const T *xr = x + i * c;                                                                              \
        T *yr = y + i * c;                                                                                    \
        T m = ms[i];                                                                                          \
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
    /* s: all e_j; r: those below 1 (two sums vectorise; counting the 1s in the loop does not); rs[i] = r + the \
     * 1s but one (ties at the max): the e_j but one 1.  Short rows four at a time, each summed in its own order */ \
    i = 0;                                                                                                    \
    if (c < 64) {                                                                                             \
        for (; i + 4 <= rows; i += 4) {                                                                       \
            const T *y0 = y + i * c, *y1 = y0 + c, *y2 = y1 + c, *y3 = y2 + c;                                \
            double s0 = 0.0, r0 = 0.0, s1 = 0.0, r1 = 0.0, s2 = 0.0, r2 = 0.0, s3 = 0.0, r3 = 0.0;            \
            for (j = 0; j < c; j++) {                                                                         \
                double e0 = (double)y0[j], e1 = (double)y1[j], e2 = (double)y2[j], e3 = (double)y3[j];        \
                s0 += e0; r0 += e0 < 1.0 ? e0 : 0.0;                                                          \
                s1 += e1; r1 += e1 < 1.0 ? e1 : 0.0;                                                          \
                s2 += e2; r2 += e2 < 1.0 ? e2 : 0.0;                                                          \
                s3 += e3; r3 += e3 < 1.0 ? e3 : 0.0;                                                          \
            }                                                                                                 \
            rs[i] = r0 + (nearbyint(s0 - r0) - 1.0);                                                          \
            rs[i + 1] = r1 + (nearbyint(s1 - r1) - 1.0);                                                      \
            rs[i + 2] = r2 + (nearbyint(s2 - r2) - 1.0);                                                      \
            rs[i + 3] = r3 + (nearbyint(s3 - r3) - 1.0);                                                      \
        }                                                                                                     \
    }                                                                                                         \
    for (; i < rows; i++) {                                                                                   \
        const T *yr = y + i * c;                                                                              \
        double s = 0.0, r = 0.0;                                                                              \
        if (c < 64) {                                                                                         \
            for (j = 0; j < c; j++) { double e = (double)yr[j]; s += e; r += e < 1.0 ? e : 0.0; }           \
        } else {                                                                                              \
            _Pragma("omp simd reduction(+:s,r)")                                                              \
            for (j = 0; j < c; j++) { double e = (double)yr[j]; s += e; r += e < 1.0 ? e : 0.0; }           \
        }                                                                                                     \
        rs[i] = r + (nearbyint(s - r) - 1.0);                                                                 \
    }                                                                                                         \
    for (i = 0; i < rows; i++) {                    /* log(s) loses digits only when s is near 1 */          \
        double r = rs[i];                                                                                     \
        lg[i] = r < 0.5 ? log1p(r) : log(1.0 + r);                                                            \
    }                                                                                                         \
    for (i = 0; i < rows; i++) {                                                                              \
        T *yr = y + i * c;                                                                                    \
        double r = rs[i], s = 1.0 + r;                                                                        \
        double invs = 1.0 / s;                                                                                \
        T inv = (T)invs;                                                                                      \
        int skip = onehot == NULL && has_ignore && labels[i] == ignore;                                       \
        double et = onehot == NULL && !skip ? (double)yr[labels[i]] : 0.0;                                    \
        _Pragma("omp simd")                                                                                   \
        for (j = 0; j < c; j++) yr[j] *= inv;                                                                 \
        if (onehot == NULL) {                                                                                 \
            if (skip) {                                                                                       \
                if (g != NULL) memset(g + i * c, 0, (size_t)c * sizeof(T));                                   \
                continue;                                                                                     \
            }                                                                                                 \
            rowloss[i] += lg[i];                                                                              \
            if (g != NULL) {                                                                                  \
                T *gr = g + i * c;                                                                            \
                _Pragma("omp simd")                                                                           \
                for (j = 0; j < c; j++) gr[j] = scale * yr[j];                                                \
                /* the e_j other than e_t: r when e_t is a 1 (r holds the other ones), else 1 + r - e_t */   \
                double others = et == 1.0 ? r : s - et;                                                       \
                gr[labels[i]] = (T)(-(double)scale * others * invs);                                          \
            }                                                                                                 \
        } else {                                                                                              \
            const T *tr = onehot + i * c;                                                                     \
            double tsum = 0.0;                                                                                \
            for (j = 0; j < c; j++) if (tr[j] != 0) tsum += (double)tr[j];                                    \
            rowloss[i] += lg[i] * tsum;                                                                       \
            if (g != NULL) {                                                                                  \
                T *gr = g + i * c;                                                                            \
                _Pragma("omp simd")                                                                           \
                for (j = 0; j < c; j++) gr[j] = scale * (yr[j] - tr[j]);                                      \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
}

/* ... over chunks of about FB_SOFTMAX_CHUNK elements (whole rows), so that the passes over a chunk (max,
 * exponentials, sums, scaling, gradient) run in L1 instead of streaming a large block through memory five times;
 * each row's results do not depend on the chunking. */
#define FB_SOFTMAX_CHUNK 2048
#define FB_SOFTMAX_CHUNKED(NAME, TARGET, T, EXP)                                                              \
FB_SOFTMAX_BLOCK(NAME, TARGET, T, EXP)                                                                        \
TARGET static void NAME(const T *x, T *y, T *g, long rows, long c, T scale, const T *onehot,                  \
                        const int64_t *labels, int has_ignore, int64_t ignore, double *rowloss)               \
{                                                                                                             \
    long step = c > 0 && c < FB_SOFTMAX_CHUNK ? FB_SOFTMAX_CHUNK / c : 1, r0;                                 \
    for (r0 = 0; r0 < rows; r0 += step) {                                                                     \
        long nr = rows - r0 < step ? rows - r0 : step;                                                        \
        NAME##_rows(x + r0 * c, y + r0 * c, g == NULL ? NULL : g + r0 * c, nr, c, scale,                      \
                    onehot == NULL ? NULL : onehot + r0 * c, labels == NULL ? NULL : labels + r0, has_ignore,  \
                    ignore, rowloss + r0);                                                                    \
    }                                                                                                         \
}

FB_VARIANTS(FB_SOFTMAX_CHUNKED, fb_softmax_block_f32, float, fb_expf)
FB_VARIANTS(FB_SOFTMAX_CHUNKED, fb_softmax_block_f64, double, fb_exp)
FB_DISPATCH(fb_softmax_block_f32, (const float *x, float *y, float *g, long rows, long c, float scale,
                                   const float *onehot, const int64_t *labels, int has_ignore, int64_t ignore,
                                   double *rowloss),
            (x, y, g, rows, c, scale, onehot, labels, has_ignore, ignore, rowloss))
FB_DISPATCH(fb_softmax_block_f64, (const double *x, double *y, double *g, long rows, long c, double scale,
                                   const double *onehot, const int64_t *labels, int has_ignore, int64_t ignore,
                                   double *rowloss),
            (x, y, g, rows, c, scale, onehot, labels, has_ignore, ignore, rowloss))

/* out = 1 / (1 + exp(-x)) without overflow: e = exp(-|x|) <= 1; out = 1/(1+e) or e/(1+e). */
#define FB_SIGMOID(NAME, TARGET, T, EXP)                                                                      \
TARGET static void NAME(long n, const T *x, T *out)                                                        \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) {                                                                            \
        T v = x[i];                                                                                           \
        T e = EXP(COPYSIGN(v, (T)-1));              /* exp(-|v|): one OR of the sign bit */                   \
        T s = (T)1 / ((T)1 + e);                                                                              \
        T one = (T)(v >= 0);                        /* numerator max(e, one): 1 if v >= 0 (e <= 1), else e */ \
        out[i] = (e > one ? e : one) * s;           /* NaN: s is NaN */                                       \
    }                                                                                                         \
}

#define COPYSIGN(a, b) _Generic((a), float: copysignf, default: copysign)(a, b)
FB_VARIANTS(FB_SIGMOID, fb_sigmoid_f32, float, fb_expf)
FB_VARIANTS(FB_SIGMOID, fb_sigmoid_f64, double, fb_exp)
#undef COPYSIGN
FB_DISPATCH(fb_sigmoid_f32, (long n, const float *x, float *out), (n, x, out))
FB_DISPATCH(fb_sigmoid_f64, (long n, const double *x, double *out), (n, x, out))

/* ReLU, branch-free so that random signs cost nothing: mask = x <= 0; out = mask ? 0 : x; dx = mask ? 0 : dout
 * (NaN: mask false, passes through). */
#define FB_RELU_F(NAME, TARGET, T)                                                                            \
TARGET static void NAME(long n, const T *restrict x, T *out, unsigned char *restrict mask)                    \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) { T v = x[i]; int m = v <= 0; mask[i] = (unsigned char)m; out[i] = m ? (T)0 : v; } \
}
#define FB_RELU_B(NAME, TARGET, T)                                                                            \
TARGET static void NAME(long n, const T *dout, const unsigned char *restrict mask, T *dx)                     \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) { T d = dout[i]; dx[i] = mask[i] ? (T)0 : d; }                               \
}

/* ReLU fused into an Affine layer's output (fastbp's own nets): x = max(x, 0) in place, no mask (NaN stays); and
 * its backward from that output: d = 0 where y <= 0 (y = relu(x) <= 0 exactly where x <= 0, the book's mask). */
#define FB_RELU_IP(NAME, TARGET, T)                                                                           \
TARGET static void NAME(long n, T *x)                                                                         \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) { T v = x[i]; x[i] = v <= 0 ? (T)0 : v; }                                   \
}
#define FB_RELU_MASK_IP(NAME, TARGET, T)                                                                      \
TARGET static void NAME(long n, const T *restrict y, T *restrict d)                                           \
{                                                                                                             \
    _Pragma("omp simd")                                                                                       \
    for (long i = 0; i < n; i++) { T v = d[i]; d[i] = y[i] <= 0 ? (T)0 : v; }                                 \
}

FB_VARIANTS(FB_RELU_F, fb_relu_forward_f32, float)
FB_VARIANTS(FB_RELU_F, fb_relu_forward_f64, double)
FB_VARIANTS(FB_RELU_B, fb_relu_backward_f32, float)
FB_VARIANTS(FB_RELU_B, fb_relu_backward_f64, double)
FB_VARIANTS(FB_RELU_IP, fb_relu_inplace_f32, float)
FB_VARIANTS(FB_RELU_IP, fb_relu_inplace_f64, double)
FB_VARIANTS(FB_RELU_MASK_IP, fb_relu_mask_inplace_f32, float)
FB_VARIANTS(FB_RELU_MASK_IP, fb_relu_mask_inplace_f64, double)
FB_DISPATCH(fb_relu_inplace_f32, (long n, float *x), (n, x))
FB_DISPATCH(fb_relu_inplace_f64, (long n, double *x), (n, x))
FB_DISPATCH(fb_relu_mask_inplace_f32, (long n, const float *y, float *d), (n, y, d))
FB_DISPATCH(fb_relu_mask_inplace_f64, (long n, const double *y, double *d), (n, y, d))
FB_DISPATCH(fb_relu_forward_f32, (long n, const float *x, float *out, unsigned char *mask), (n, x, out, mask))
FB_DISPATCH(fb_relu_forward_f64, (long n, const double *x, double *out, unsigned char *mask), (n, x, out, mask))
FB_DISPATCH(fb_relu_backward_f32, (long n, const float *dout, const unsigned char *mask, float *dx),
            (n, dout, mask, dx))
FB_DISPATCH(fb_relu_backward_f64, (long n, const double *dout, const unsigned char *mask, double *dx),
            (n, dout, mask, dx))

/* db[j] = sum_i dout[i, j] over a C-contiguous (n, m) block, accumulated in double in acc (m entries). */
#define FB_COLSUM(NAME, TARGET, T)                                                                            \
TARGET static void NAME(long n, long m, const T *restrict dout, T *restrict db, double *restrict acc)      \
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

FB_VARIANTS(FB_COLSUM, fb_colsum_f32, float)
FB_VARIANTS(FB_COLSUM, fb_colsum_f64, double)
FB_DISPATCH(fb_colsum_f32, (long n, long m, const float *dout, float *db, double *acc), (n, m, dout, db, acc))
FB_DISPATCH(fb_colsum_f64, (long n, long m, const double *dout, double *db, double *acc), (n, m, dout, db, acc))

#endif
