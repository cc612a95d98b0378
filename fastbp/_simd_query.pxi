# Python-level view of the SIMD path of the module that includes this file (each extension module that includes
# _simd.h holds its own choice; they all make the same one).  Included by _kernels.pyx and _optim.pyx.
cdef extern from "_simd.h" nogil:
    int FB_HAVE_VARIANTS
    int fb_simd_level() noexcept
    int fb_simd_hw_level() noexcept
    int fb_simd_level_for(int hw, const char *disabled) noexcept
    void fb_simd_count(int on) noexcept
    long long fb_simd_calls[3]

SIMD_PATHS = ("baseline", "avx2", "avx512")


def simd_info():
    """{'path': the SIMD path these kernels run, 'cpu': the best path the CPU and the build allow,
    'compiled': the paths this build has} ('avx512', 'avx2', 'baseline'; see _simd.h)."""
    return {"path": SIMD_PATHS[fb_simd_level()], "cpu": SIMD_PATHS[fb_simd_hw_level()],
            "compiled": list(SIMD_PATHS if FB_HAVE_VARIANTS else SIMD_PATHS[:1])}


def _simd_count(bint on):
    """For tests: start (True: counts zeroed) or stop counting which variant each kernel call runs; returns the
    counts so far as {path: calls}."""
    counts = {SIMD_PATHS[i]: int(fb_simd_calls[i]) for i in range(3)}
    fb_simd_count(1 if on else 0)
    return counts


def _simd_level_for(int hw, disabled):
    """For tests: the path chosen on a CPU whose best path is SIMD_PATHS[hw] with FASTBP_DISABLE_CPU_FEATURES
    = disabled (None: unset)."""
    if disabled is None:
        return SIMD_PATHS[fb_simd_level_for(hw, NULL)]
    cdef bytes b = disabled.encode()
    return SIMD_PATHS[fb_simd_level_for(hw, b)]
