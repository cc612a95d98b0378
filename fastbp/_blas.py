"""Which BLAS fastbp's GEMMs call, and with which kernels.

fastbp's kernels call ``cblas_sgemm``/``cblas_dgemm`` of their *own* copy of OpenBLAS, the one shipped by the
``scipy-openblas32`` wheel, through function pointers handed to ``fastbp._kernels``.  NumPy keeps its own copy
untouched: different file, different globals, different thread pool.

Why a copy of our own: OpenBLAS picks its kernels once, when the library is loaded, from ``OPENBLAS_CORETYPE``
or from CPUID.  On some machines (this project's development machines among them) the environment pins NumPy's
OpenBLAS to the AVX2 "Haswell" kernels, which reach about half the float32 GEMM rate of the AVX-512 "SkylakeX"
kernels on a CPU that has AVX-512 (the measured rates are in the README, the one place figures are kept).
Loading a second copy lets fastbp choose for itself without changing NumPy's behaviour:

* ``FASTBP_BLAS_CORETYPE=<name>`` forces a core type for fastbp's copy (e.g. ``Haswell``, ``SkylakeX``).
* ``FASTBP_BLAS_CORETYPE=inherit`` uses whatever ``OPENBLAS_CORETYPE`` says (or CPUID detection).
* default (``auto``): when the CPU reports the AVX-512 subsets the SkylakeX kernels use (F, CD, BW, DQ, VL),
  fastbp's copy loads with ``SkylakeX``; otherwise ``OPENBLAS_CORETYPE`` is left as it is, so a CPU without
  AVX-512 gets OpenBLAS's own choice (never an instruction it lacks).

A core type the CPU cannot run -- forced, or inherited from ``OPENBLAS_CORETYPE`` (OpenBLAS itself does not check
a forced type: ``SkylakeX`` on a CPU without AVX-512 dies of SIGILL at the first GEMM) -- is refused with a
``RuntimeWarning`` naming the missing CPU flags, and fastbp's copy loads with OpenBLAS's own choice instead
(``OPENBLAS_CORETYPE`` removed around the load).  :data:`CORE_FLAGS` lists what each x86-64 core type needs; an
x86-64 name OpenBLAS does not know is refused the same way.  Elsewhere (aarch64, ...) the name is passed on.

The CPU flags come from ``/proc/cpuinfo`` (NumPy's runtime CPU features elsewhere), less any listed in
``FASTBP_DISABLE_CPU_FEATURES`` (comma- or space-separated flag names as ``/proc/cpuinfo`` spells them, shell
patterns allowed, e.g. ``avx512*``): fastbp then chooses as on a CPU without them, and since OpenBLAS's own choice
would still see them, loads its copy with the best core type the remaining flags allow (``Haswell`` for
``avx512*`` on an AVX-512 machine).  This is how the tests simulate an AVX2-only CPU on an AVX-512 one.

The environment variable is set only around the ``dlopen`` call (and the first BLAS call, which is when OpenBLAS
picks its kernels) and restored at once.  If another package of the same process has already loaded the
scipy-openblas32 library, ``dlopen`` returns that instance: its kernel type is then whatever it was loaded with
(``info()`` reports the real one) and fastbp's threading setting applies to it too.  How the GEMMs use threads
is decided by :func:`_choose_threading` (``FASTBP_BLAS_THREADING``, ``FASTBP_NUM_THREADS``).
"""

import ctypes
import fnmatch
import glob
import os
import platform
import re
import threading
import warnings

_lock = threading.Lock()
_state = {}

#: Cores whose OpenBLAS kernels include the small-matrix GEMM path, and the largest m*n*k it takes.
SMALL_MATRIX_CORES = ("skylakex", "cooperlake", "sapphirerapids")
SMALL_MATRIX_MNK = 1_000_000

#: AVX-512 subsets required by OpenBLAS's SkylakeX kernels.
SKYLAKEX_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


#: Largest FASTBP_NUM_THREADS / set_num_threads value accepted.
MAX_THREADS = 1024

#: CPU flags (as /proc/cpuinfo names them) the kernels of each x86-64 OpenBLAS core type execute, beyond the
#: SSE2 every x86-64 CPU has (names are matched case-insensitively, as OpenBLAS does).  The 32-bit-only core
#: types are aliases of Prescott on x86-64.
CORE_FLAGS = {
    "Katmai": ("pni",),
    "Coppermine": ("pni",),
    "Northwood": ("pni",),
    "Banias": ("pni",),
    "Athlon": ("pni",),
    "Prescott": ("pni",),
    "Opteron": (),
    "Opteron_SSE3": ("pni",),
    "Nano": ("pni",),
    "Atom": ("pni", "ssse3"),
    "Core2": ("pni", "ssse3"),
    "Bobcat": ("pni", "ssse3"),
    "Penryn": ("pni", "ssse3", "sse4_1"),
    "Dunnington": ("pni", "ssse3", "sse4_1"),
    "Barcelona": ("pni", "sse4a"),
    "Nehalem": ("pni", "ssse3", "sse4_1", "sse4_2"),
    "Sandybridge": ("sse4_2", "avx"),
    "Bulldozer": ("sse4_2", "avx", "fma4"),
    "Piledriver": ("sse4_2", "avx", "fma", "fma4"),
    "Steamroller": ("sse4_2", "avx", "fma", "fma4"),
    "Excavator": ("sse4_2", "avx", "avx2", "fma", "fma4"),
    "Haswell": ("sse4_2", "avx", "avx2", "fma"),
    "Zen": ("sse4_2", "avx", "avx2", "fma"),
    "SkylakeX": ("avx", "avx2", "fma") + SKYLAKEX_FLAGS,
    "Cooperlake": ("avx", "avx2", "fma") + SKYLAKEX_FLAGS + ("avx512_bf16",),
    "SapphireRapids": ("avx", "avx2", "fma") + SKYLAKEX_FLAGS + ("avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"),
}

#: Core types tried, best first, when fastbp must name one itself (features disabled by the environment).
_FALLBACK_ORDER = ("Cooperlake", "SkylakeX", "Haswell", "Sandybridge", "Nehalem", "Core2", "Prescott")

# NumPy's names of its runtime CPU features -> /proc/cpuinfo names (for systems without /proc/cpuinfo).
_NUMPY_FEATURES = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "SSE41": "sse4_1",
    "SSE42": "sse4_2",
    "AVX": "avx",
    "FMA3": "fma",
    "FMA4": "fma4",
    "AVX2": "avx2",
    "AVX512F": "avx512f",
    "AVX512CD": "avx512cd",
    "AVX512BW": "avx512bw",
    "AVX512DQ": "avx512dq",
    "AVX512VL": "avx512vl",
    "AVX512BF16": "avx512_bf16",
    "AVX512FP16": "avx512_fp16",
}


def _is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")


def _raw_cpu_flags():
    """The CPU feature flags Linux reports in /proc/cpuinfo; NumPy's runtime CPU features elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return set()
    return {name for key, name in _NUMPY_FEATURES.items() if feats.get(key)}


#: NumPy's names (NPY_DISABLE_CPU_FEATURES) of features /proc/cpuinfo spells otherwise, as patterns; the kernels'
#: path chooser in _simd.h knows the same table.
_NUMPY_ALIASES = {
    "fma3": "fma",
    "sse41": "sse4_1",
    "sse42": "sse4_2",
    "sse3": "pni",
    "avx512_skx": "avx512*",
    "bmi": "bmi1",
}


def disabled_cpu_features(environ=None):
    """The patterns of FASTBP_DISABLE_CPU_FEATURES (lower case, NumPy's names translated to /proc/cpuinfo's),
    empty when unset.  The same variable picks the SIMD path of fastbp's own kernels (see _simd.h)."""
    text = (os.environ if environ is None else environ).get("FASTBP_DISABLE_CPU_FEATURES", "")
    return tuple(_NUMPY_ALIASES.get(p.lower(), p.lower()) for p in re.split(r"[\s,]+", text) if p)


def cpu_flags(environ=None):
    """The CPU feature flags fastbp goes by: what the CPU reports, less FASTBP_DISABLE_CPU_FEATURES."""
    flags = _raw_cpu_flags()
    off = disabled_cpu_features(environ)
    if off:
        flags = {f for f in flags if not any(fnmatch.fnmatchcase(f.lower(), p) for p in off)}
    return flags


def core_flags(name):
    """(canonical OpenBLAS name, flags it needs) for an x86-64 core type name (any case); KeyError if unknown."""
    for canon, need in CORE_FLAGS.items():
        if canon.lower() == name.strip().lower():
            return canon, need
    raise KeyError(name)


#: _choose_coretype's answer when OPENBLAS_CORETYPE must be removed around the load (OpenBLAS's own choice).
CPUID = "<cpuid>"


def _check_runnable(name, flags, origin):
    """None when core type `name` can run on a CPU with `flags`, else the warning text."""
    if not _is_x86() or not flags:
        return None  # not x86 (OpenBLAS checks its own names there), or flags unknown: not checked
    try:
        canon, need = core_flags(name)
    except KeyError:
        return f"{origin}={name!r} is not a core type of OpenBLAS for x86-64 (known: {', '.join(CORE_FLAGS)}); ignored"
    missing = [f for f in need if f not in flags]
    if missing:
        also = " (NumPy's own OpenBLAS still follows it)" if origin == "OPENBLAS_CORETYPE" else ""
        return f"{origin}={name} needs CPU flags this CPU lacks ({' '.join(missing)}); ignored{also}"
    return None


def _best_core(flags):
    for name in _FALLBACK_ORDER:
        if all(f in flags for f in CORE_FLAGS[name]):
            return name
    return "Prescott"


def _fallback(flags, environ):
    """What to load with when fastbp does not take a core type from the environment: OpenBLAS's own choice,
    unless features were disabled, which OpenBLAS's CPUID detection would not know."""
    if disabled_cpu_features(environ) and _is_x86() and flags:
        best = _best_core(flags)
        return best, f"{best}: the best core type without FASTBP_DISABLE_CPU_FEATURES"
    return CPUID, "OpenBLAS's own choice"


def _choose_coretype(flags, environ=None):
    """(coretype, reason, warning): coretype is a name to load with, None to leave OPENBLAS_CORETYPE alone, or
    CPUID to remove it around the load (OpenBLAS's own choice); warning is None or the refusal text."""
    env = os.environ if environ is None else environ
    want = env.get("FASTBP_BLAS_CORETYPE", "auto").strip()
    inherited = env.get("OPENBLAS_CORETYPE", "").strip()
    if want and want.lower() not in ("auto", "inherit"):
        refused = _check_runnable(want, flags, "FASTBP_BLAS_CORETYPE")
        if refused is None:
            return want, "FASTBP_BLAS_CORETYPE", None
        core, why = _fallback(flags, env)
        return core, f"FASTBP_BLAS_CORETYPE={want} refused: {why}", refused
    if want.lower() != "inherit" and all(f in flags for f in CORE_FLAGS["SkylakeX"]):
        return "SkylakeX", "CPU has AVX-512 F/CD/BW/DQ/VL", None
    if inherited:
        refused = _check_runnable(inherited, flags, "OPENBLAS_CORETYPE")
        if refused is None:
            if disabled_cpu_features(env) and _is_x86() and flags:
                return inherited, "OPENBLAS_CORETYPE", None
            return None, f"OPENBLAS_CORETYPE={inherited}", None
        core, why = _fallback(flags, env)
        return core, f"OPENBLAS_CORETYPE={inherited} refused: {why}", refused
    if want.lower() == "inherit":
        core, why = _fallback(flags, env)
        return (None if core == CPUID else core), f"FASTBP_BLAS_CORETYPE=inherit: {why}", None
    core, why = _fallback(flags, env)
    return (None if core == CPUID else core), f"CPU lacks AVX-512: {why}", None


#: OPENBLAS_THREAD_TIMEOUT (idle OpenBLAS workers spin 2**N cycles before they sleep) for fastbp's own copy
#: when FASTBP_BLAS_THREAD_TIMEOUT is not set; None would leave OpenBLAS's default (N = 28, about 0.1 s).  It
#: matters only where fastbp's OpenBLAS runs its own thread pool (threading mode "openblas", e.g. a build without
#: OpenMP); NumPy's copy, loaded before fastbp's, never sees it.  16 (about 25 µs of spinning):
#: measured with python -m fastbp.bench.loops in that mode, the book's ch05/ch06 steps with fastbp's layers took
#: 28/31 ms with 16 and 31/37 ms with 4 against 51/123 ms with OpenBLAS's default, on the loaded machine.
BLAS_THREAD_TIMEOUT = 16


def blas_thread_timeout(environ=None):
    """The OPENBLAS_THREAD_TIMEOUT fastbp's OpenBLAS loads with (FASTBP_BLAS_THREAD_TIMEOUT, an integer 4..30,
    else BLAS_THREAD_TIMEOUT); None: OpenBLAS's own default, or what OPENBLAS_THREAD_TIMEOUT says."""
    text = (os.environ if environ is None else environ).get("FASTBP_BLAS_THREAD_TIMEOUT", "").strip()
    if not text:
        return BLAS_THREAD_TIMEOUT
    if not re.fullmatch(r"[0-9]{1,2}", text) or not 4 <= int(text) <= 30:
        raise ValueError(f"FASTBP_BLAS_THREAD_TIMEOUT must be an integer in 4..30 (or unset), got {text!r}")
    return int(text)


def env_num_threads(environ=None):
    """FASTBP_NUM_THREADS as an int in 1..MAX_THREADS, None when unset or empty; ValueError naming the variable
    and the accepted range otherwise."""
    text = (os.environ if environ is None else environ).get("FASTBP_NUM_THREADS")
    if text is None or not text.strip():
        return None
    t = text.strip()
    n = int(t) if re.fullmatch(r"\+?[0-9]{1,7}", t) else None
    if n is None or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"FASTBP_NUM_THREADS must be an integer in 1..{MAX_THREADS} (or unset), got {text!r}")
    return n


def env_threading(environ=None):
    """FASTBP_BLAS_THREADING (lower case, default 'split'); ValueError if it is not one of THREADING_MODES."""
    mode = (os.environ if environ is None else environ).get("FASTBP_BLAS_THREADING", "split").strip().lower()
    if mode not in THREADING_MODES:
        raise ValueError(f"FASTBP_BLAS_THREADING must be one of {THREADING_MODES}, got {mode!r}")
    return mode


def check_environment(environ=None):
    """Raise ValueError for a FASTBP_* threading setting fastbp cannot use (done at import)."""
    env_num_threads(environ)
    env_threading(environ)
    blas_thread_timeout(environ)
    env_blas(environ)
    from fastbp import _runtime  # the worker pool's settings (FASTBP_THREAD_POOL, FASTBP_SPIN_US, ...)

    _runtime.env_thread_pool(environ)
    _runtime.env_spin_us(environ)
    _runtime.env_wake_min_macs(environ)
    env_blas_threaded_min(environ)


def _usable_cpus():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _library_path():
    # Locate the file without importing scipy_openblas32: its import may load (and so initialise) the library.
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fastbp needs the scipy-openblas32 package (pip install scipy-openblas32)")
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    cands = sorted(
        glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))
        + glob.glob(os.path.join(libdir, "libscipy_openblas*.dylib"))
        + glob.glob(os.path.join(libdir, "libscipy_openblas*.dll"))
    )
    if not cands:
        raise ImportError(f"scipy-openblas32 is installed but has no library in {libdir}")
    return cands[0]


def ensure_loaded():
    """Load fastbp's OpenBLAS (once) and hand its GEMM entry points to the kernels; returns the info dict."""
    if _state:
        return _state
    # Importing fastbp._gemm loads the library: its last statement calls this function, which then finds _gemm
    # (with all its functions) in sys.modules.  So import it before taking the lock, never under it.
    from fastbp import _gemm

    with _lock:
        if _state:
            return _state
        path = _library_path()
        coretype, reason, refused = _choose_coretype(cpu_flags())
        if refused is not None:
            warnings.warn(
                f"fastbp: {refused}; fastbp's OpenBLAS loads with {reason.split(': ', 1)[-1]}",
                RuntimeWarning,
                stacklevel=2,
            )
        old = os.environ.get("OPENBLAS_CORETYPE")
        timeout = blas_thread_timeout()
        old_timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        try:
            if timeout is not None:  # read by OpenBLAS when it loads: reaches fastbp's copy only
                os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(timeout)
            if coretype == CPUID:
                os.environ.pop("OPENBLAS_CORETYPE", None)
            elif coretype is not None:
                os.environ["OPENBLAS_CORETYPE"] = coretype
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2))
            mode = _choose_threading(lib, _gemm)
            # OpenBLAS may pick its kernels lazily, at the first call: make that call while the variable is set.
            lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
            lib.scipy_openblas_get_corename()
            one = (ctypes.c_float * 1)(1.0)
            res = (ctypes.c_float * 1)(0.0)
            lib.scipy_cblas_sgemm(
                101, 111, 111, 1, 1, 1, ctypes.c_float(1.0), one, 1, one, 1, ctypes.c_float(0.0), res, 1
            )
        finally:
            if timeout is not None:
                if old_timeout is None:
                    os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
                else:
                    os.environ["OPENBLAS_THREAD_TIMEOUT"] = old_timeout
            if coretype is not None:
                if old is None:
                    os.environ.pop("OPENBLAS_CORETYPE", None)
                else:
                    os.environ["OPENBLAS_CORETYPE"] = old
        addresses = [
            ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            for name in ("scipy_cblas_sgemm", "scipy_cblas_dgemm", "scipy_cblas_sgemv", "scipy_cblas_dgemv")
        ]
        lib.scipy_openblas_get_config.restype = ctypes.c_char_p
        lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
        _gemm._set_gemm(*addresses)
        # OpenBLAS's SkylakeX-family cores run products of up to 10^6 multiply-adds with a small-matrix kernel
        # that skips packing (faster on the book's small products, see the README's figures): aim for it.
        core = lib.scipy_openblas_get_corename().decode()
        _gemm._set_small_mnk(SMALL_MATRIX_MNK if core.lower() in SMALL_MATRIX_CORES else 0)
        _state.update(
            library=path,
            lib=lib,
            requested_coretype=None if coretype == CPUID else coretype,
            reason=reason,
            refused=refused,
            threading=mode,
            thread_timeout=timeout,
            blas="own",
            blas_reason="FASTBP_BLAS=own" if env_blas() == "own" else f"FASTBP_BLAS=auto: {BLAS_AUTO}",
        )
        want = env_blas()
        if want == "numpy" or (want == "auto" and BLAS_AUTO == "numpy"):
            np_blas = _use_numpy_blas(_gemm)
            if np_blas is None:
                warnings.warn(
                    "fastbp: FASTBP_BLAS=numpy but NumPy uses no scipy-openblas library fastbp can call; "
                    "fastbp's own OpenBLAS is used",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _state["blas_reason"] = "NumPy's OpenBLAS not found"
            else:
                _state.update(blas="numpy", numpy_blas=np_blas, threading="numpy")
                _state["blas_reason"] = f"FASTBP_BLAS={want}"
        return _state


THREADING_MODES = ("split", "callback", "openblas")

#: FASTBP_BLAS values: "own" (fastbp's scipy-openblas32 copy, split over fastbp's threads), "numpy" (NumPy's own
#: OpenBLAS and its thread pool: one BLAS pool in a process that mixes NumPy's and fastbp's products; NumPy's
#: settings are never changed), "auto" (the default; see BLAS_AUTO).
BLAS_CHOICES = ("own", "numpy", "auto")

#: What FASTBP_BLAS=auto picks.  "own", measured on the 2-core AMD EPYC (AVX-512) development VM, where NumPy
#: 2.4's OpenBLAS runs the same SkylakeX kernels (python -m fastbp.bench.loops --configs default numpy-blas):
#: near idle the two were within the noise in the book's loops (ch05 1.08-1.18x the book with fastbp's copy and
#: pool, 1.13x on NumPy's; ch06 1.04-1.07x vs 1.16x); on the loaded machine NumPy's pool, which spins about 0.1 s
#: after each call, made the steps 3-5x slower (ch05 3.1 ms vs 0.97 ms, ch06 18.7 vs 3.5 ms).  NumPy's copy also
#: ignores FASTBP_DISABLE_CPU_FEATURES (its kernels are NumPy's choice), so the forced SIMD paths need "own".
BLAS_AUTO = "own"


def env_blas(environ=None):
    """FASTBP_BLAS (lower case, 'auto' when unset); ValueError naming the variable if not one of BLAS_CHOICES."""
    text = (os.environ if environ is None else environ).get("FASTBP_BLAS", "")
    v = text.strip().lower() or "auto"
    if v not in BLAS_CHOICES:
        raise ValueError(f"FASTBP_BLAS must be one of {BLAS_CHOICES} (or unset), got {text!r}")
    return v


def _numpy_openblas():
    """(path, ctypes library, symbol suffix) of the OpenBLAS NumPy itself uses (already loaded by NumPy's import),
    or None when NumPy does not use a scipy-openblas build."""
    import numpy  # noqa: F401  (maps its BLAS)

    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                part = line.split()
                if len(part) >= 6 and "openblas" in os.path.basename(part[-1]).lower():
                    paths.append(part[-1])
    except OSError:
        pass
    libs_dir = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    paths += sorted(glob.glob(os.path.join(libs_dir, "*openblas*")))
    own = _library_path()
    for path in dict.fromkeys(paths):
        if os.path.realpath(path) == os.path.realpath(own):
            continue
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2))
        except OSError:
            continue
        for suffix in ("64_", ""):
            if hasattr(lib, "scipy_cblas_sgemm" + suffix) and hasattr(lib, "scipy_cblas_dgemv" + suffix):
                return path, lib, suffix
    return None


def _use_numpy_blas(_gemm):
    """Point fastbp's BLAS table at NumPy's OpenBLAS (through 32-bit front ends for an ILP64 build); no split
    (NumPy's pool threads each product as np.matmul would); returns the info dict, or None when not possible."""
    found = _numpy_openblas()
    if found is None:
        return None
    path, lib, sfx = found
    addr = [
        ctypes.cast(getattr(lib, f"scipy_cblas_{name}{sfx}"), ctypes.c_void_p).value
        for name in ("sgemm", "dgemm", "sgemv", "dgemv")
    ]
    if sfx:
        from fastbp import _blas64

        addr = list(_blas64._set_ilp64(*addr))
    _gemm._set_gemm(*addr)
    _gemm._set_gemm_threads(1)
    _gemm._set_small_mnk(0)
    get_core = getattr(lib, f"scipy_openblas_get_corename{sfx}")
    get_core.restype = ctypes.c_char_p
    get_config = getattr(lib, f"scipy_openblas_get_config{sfx}")
    get_config.restype = ctypes.c_char_p
    get_threads = getattr(lib, f"scipy_openblas_get_num_threads{sfx}")
    get_threads.restype = ctypes.c_int
    return {
        "library": path,
        "corename": get_core().decode(),
        "config": get_config().decode(),
        "get_num_threads": get_threads,
        "ilp64": bool(sfx),
    }


#: In the split mode, FASTBP_BLAS_THREADED_MIN=<n> makes products of at least n multiply-adds (all dimensions
#: >= 128) one OpenBLAS call that OpenBLAS threads itself, its jobs on fastbp's OpenMP team (it packs the shared
#: operand once).  Off by default (0): measured in fastbp/_gemm.pyx, it gained 20 % on an idle machine and lost up
#: to 3x as soon as other processes used the CPUs.  BLAS_THREADED_SUGGESTED is the threshold the benchmarks try
#: (below the MultiLayerNet 784-1024-1024-10 step's 2e8-3e8, well above the book's networks' 4e6-8e6).
BLAS_THREADED_MNK = 0
BLAS_THREADED_SUGGESTED = 100_000_000


def env_blas_threaded_min(environ=None):
    """FASTBP_BLAS_THREADED_MIN as a float >= 0 (default BLAS_THREADED_MNK, off); ValueError naming the variable."""
    from fastbp._runtime import env_number

    return env_number(
        "FASTBP_BLAS_THREADED_MIN",
        float(BLAS_THREADED_MNK),
        lambda v: 0 <= v < float("inf"),
        "a number of multiply-adds >= 0",
        environ,
    )


def _choose_threading(lib, kernels):
    """Set up how fastbp's GEMMs use threads (before any BLAS call, as OpenBLAS requires); returns the mode.

    * ``split`` (default with OpenMP): OpenBLAS single-threaded; fastbp cuts each large GEMM into one
      independent piece per OpenMP thread (see _kernels.pyx).  One thread pool, and no packing shared between
      threads: the fastest on the book's small products (measured, see the README).
    * ``callback``: OpenBLAS threads its GEMMs itself but runs the jobs on fastbp's OpenMP team.
    * ``openblas``: OpenBLAS's own pthread pool (the only choice in a build without OpenMP).
    FASTBP_BLAS_THREADING picks one; FASTBP_NUM_THREADS sets the thread count (default: the OpenMP count).
    """
    openmp = kernels.build_info()["openmp"]
    mode = env_threading()
    if not openmp:
        mode = "openblas"
    n = env_num_threads()
    if mode == "split":
        lib.scipy_openblas_set_num_threads(ctypes.c_int(1))
        kernels._set_gemm_threads(n or kernels.build_info()["openmp_max_threads"])
        # opt-in (FASTBP_BLAS_THREADED_MIN): the largest products as one OpenBLAS call threaded by OpenBLAS, its
        # jobs on fastbp's team (_gemm.pyx); the callback is installed either way, so the benchmarks can compare
        callback = kernels._blas_threads_callback()
        if callback:
            lib.scipy_openblas_set_threads_callback_function(ctypes.c_void_p(callback))
            setter = ctypes.cast(lib.scipy_openblas_set_num_threads, ctypes.c_void_p).value
            kernels._set_blas_threaded(setter, env_blas_threaded_min(), _usable_cpus())
    else:
        if mode == "callback":
            lib.scipy_openblas_set_threads_callback_function(ctypes.c_void_p(kernels._blas_threads_callback()))
        if n:
            lib.scipy_openblas_set_num_threads(ctypes.c_int(n))
        kernels._set_gemm_threads(1)
    return mode


def set_num_threads(n):
    """Threads of fastbp's GEMMs (NumPy's BLAS is not touched)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    if n > MAX_THREADS:
        raise ValueError(f"number of threads must be <= {MAX_THREADS}, got {n}")
    st = ensure_loaded()
    if st["threading"] == "split":
        from fastbp import _kernels

        _kernels._set_gemm_threads(n)
    elif st["threading"] != "numpy":  # NumPy's pool is NumPy's: its settings are never changed
        st["lib"].scipy_openblas_set_num_threads(ctypes.c_int(n))


def get_num_threads():
    """Threads of fastbp's GEMMs."""
    st = ensure_loaded()
    if st["threading"] == "split":
        from fastbp import _kernels

        return _kernels._get_gemm_threads()
    if st["threading"] == "numpy":
        return int(st["numpy_blas"]["get_num_threads"]())
    return int(st["lib"].scipy_openblas_get_num_threads())


def info():
    """What fastbp's GEMMs call: library file, OpenBLAS config, kernel type in use, threads, and why."""
    st = ensure_loaded()
    lib = st["lib"]
    if st["blas"] == "numpy":
        nb = st["numpy_blas"]
        return {
            "blas": "numpy",
            "blas_reason": st["blas_reason"],
            "library": nb["library"],
            "config": nb["config"],
            "corename": nb["corename"],
            "requested_coretype": None,
            "reason": "NumPy's own OpenBLAS (its kernels and thread pool, settings untouched)",
            "refused": None,
            "num_threads": get_num_threads(),
            "threading": "numpy",
            "thread_timeout": None,
        }
    return {
        "blas": "own",
        "blas_reason": st["blas_reason"],
        "library": st["library"],
        "config": lib.scipy_openblas_get_config().decode(),
        "corename": lib.scipy_openblas_get_corename().decode(),
        "requested_coretype": st["requested_coretype"],
        "reason": st["reason"],
        "refused": st.get("refused"),
        "num_threads": get_num_threads(),
        "threading": st["threading"],
        "thread_timeout": st["thread_timeout"],
        "blas_threaded_min": _blas_threaded_min(),
    }


def _blas_threaded_min():
    """Multiply-adds from which a product runs on OpenBLAS's own threads in the split mode (0: never)."""
    from fastbp import _gemm

    return _gemm._get_blas_threaded_min()


# A setting fastbp cannot use is an error at import (the modules that run kernels import this one), not a bare
# int() error at the first GEMM.
check_environment()
