"""Which BLAS fastbp's GEMMs call, and with which kernels.

fastbp's kernels call ``cblas_sgemm``/``cblas_dgemm`` of their *own* copy of OpenBLAS, the one shipped by the
``scipy-openblas32`` wheel, through function pointers handed to ``fastbp._kernels``.  NumPy keeps its own copy
untouched: different file, different globals, different thread pool.

Why a copy of our own: OpenBLAS picks its kernels once, when the library is loaded, from ``OPENBLAS_CORETYPE``
or from CPUID.  On some machines (this project's development machines among them) the environment pins NumPy's
OpenBLAS to the AVX2 "Haswell" kernels, which reach about half the float32 GEMM rate of the AVX-512 "SkylakeX"
kernels on a CPU that has AVX-512 (measured: 2048^3 sgemm 215 vs 435-460 GFLOP/s; 100x784x50 47 vs 30 us).
Loading a second copy lets fastbp choose for itself without changing NumPy's behaviour:

* ``FASTBP_BLAS_CORETYPE=<name>`` forces a core type for fastbp's copy (e.g. ``Haswell``, ``SkylakeX``).
* ``FASTBP_BLAS_CORETYPE=inherit`` uses whatever ``OPENBLAS_CORETYPE`` says (or CPUID detection).
* default (``auto``): when the CPU reports the AVX-512 subsets the SkylakeX kernels use (F, CD, BW, DQ, VL),
  fastbp's copy loads with ``SkylakeX``; otherwise ``OPENBLAS_CORETYPE`` is left as it is, so a CPU without
  AVX-512 gets OpenBLAS's own choice (never an instruction it lacks).

The environment variable is set only around the ``dlopen`` call (and the first BLAS call, which is when OpenBLAS
picks its kernels) and restored at once.  If another package of the same process has already loaded the
scipy-openblas32 library, ``dlopen`` returns that instance: its kernel type is then whatever it was loaded with
(``info()`` reports the real one) and fastbp's threading setting applies to it too.  How the GEMMs use threads
is decided by :func:`_choose_threading` (``FASTBP_BLAS_THREADING``, ``FASTBP_NUM_THREADS``).
"""
import ctypes
import glob
import os
import threading

_lock = threading.Lock()
_state = {}

#: Cores whose OpenBLAS kernels include the small-matrix GEMM path, and the largest m*n*k it takes.
SMALL_MATRIX_CORES = ("skylakex", "cooperlake", "sapphirerapids")
SMALL_MATRIX_MNK = 1_000_000

#: AVX-512 subsets required by OpenBLAS's SkylakeX kernels.
SKYLAKEX_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def cpu_flags():
    """The CPU feature flags Linux reports in /proc/cpuinfo (empty set elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _choose_coretype(flags):
    """(coretype to load with or None to leave the environment alone, reason)."""
    want = os.environ.get("FASTBP_BLAS_CORETYPE", "auto").strip()
    if want.lower() == "inherit":
        return None, "FASTBP_BLAS_CORETYPE=inherit"
    if want and want.lower() != "auto":
        return want, "FASTBP_BLAS_CORETYPE"
    if all(f in flags for f in SKYLAKEX_FLAGS):
        return "SkylakeX", "CPU has AVX-512 F/CD/BW/DQ/VL"
    return None, "CPU lacks AVX-512: OpenBLAS's own choice"


def _library_path():
    # Locate the file without importing scipy_openblas32: its import may load (and so initialise) the library.
    import importlib.util
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fastbp needs the scipy-openblas32 package (pip install scipy-openblas32)")
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    cands = sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")) +
                   glob.glob(os.path.join(libdir, "libscipy_openblas*.dylib")) +
                   glob.glob(os.path.join(libdir, "libscipy_openblas*.dll")))
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
        coretype, reason = _choose_coretype(cpu_flags())
        old = os.environ.get("OPENBLAS_CORETYPE")
        try:
            if coretype is not None:
                os.environ["OPENBLAS_CORETYPE"] = coretype
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2))
            mode = _choose_threading(lib, _gemm)
            # OpenBLAS may pick its kernels lazily, at the first call: make that call while the variable is set.
            lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
            lib.scipy_openblas_get_corename()
            one = (ctypes.c_float * 1)(1.0)
            res = (ctypes.c_float * 1)(0.0)
            lib.scipy_cblas_sgemm(101, 111, 111, 1, 1, 1, ctypes.c_float(1.0), one, 1, one, 1,
                                  ctypes.c_float(0.0), res, 1)
        finally:
            if coretype is not None:
                if old is None:
                    os.environ.pop("OPENBLAS_CORETYPE", None)
                else:
                    os.environ["OPENBLAS_CORETYPE"] = old
        addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for name in ("scipy_cblas_sgemm", "scipy_cblas_dgemm", "scipy_cblas_sgemv", "scipy_cblas_dgemv")]
        lib.scipy_openblas_get_config.restype = ctypes.c_char_p
        lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
        _gemm._set_gemm(*addresses)
        # OpenBLAS's SkylakeX-family cores run products of up to 10^6 multiply-adds with a small-matrix kernel
        # that skips packing (measured: 20% faster in float32, 55% in float64 at 100 x 200 x 50): aim for it.
        core = lib.scipy_openblas_get_corename().decode()
        _gemm._set_small_mnk(SMALL_MATRIX_MNK if core.lower() in SMALL_MATRIX_CORES else 0)
        _state.update(
            library=path,
            lib=lib,
            requested_coretype=coretype,
            reason=reason,
            threading=mode,
        )
        return _state


THREADING_MODES = ("split", "callback", "openblas")


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
    mode = os.environ.get("FASTBP_BLAS_THREADING", "split").strip().lower()
    if mode not in THREADING_MODES:
        raise ValueError(f"FASTBP_BLAS_THREADING must be one of {THREADING_MODES}, got {mode!r}")
    if not openmp:
        mode = "openblas"
    env_n = os.environ.get("FASTBP_NUM_THREADS", "").strip()
    n = max(1, int(env_n)) if env_n else None
    if mode == "split":
        lib.scipy_openblas_set_num_threads(ctypes.c_int(1))
        kernels._set_gemm_threads(n or kernels.build_info()["openmp_max_threads"])
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
    st = ensure_loaded()
    if st["threading"] == "split":
        from fastbp import _kernels
        _kernels._set_gemm_threads(n)
    else:
        st["lib"].scipy_openblas_set_num_threads(ctypes.c_int(n))


def get_num_threads():
    """Threads of fastbp's GEMMs."""
    st = ensure_loaded()
    if st["threading"] == "split":
        from fastbp import _kernels
        return _kernels._get_gemm_threads()
    return int(st["lib"].scipy_openblas_get_num_threads())


def info():
    """What fastbp's GEMMs call: library file, OpenBLAS config, kernel type in use, threads, and why."""
    st = ensure_loaded()
    lib = st["lib"]
    return {
        "library": st["library"],
        "config": lib.scipy_openblas_get_config().decode(),
        "corename": lib.scipy_openblas_get_corename().decode(),
        "requested_coretype": st["requested_coretype"],
        "reason": st["reason"],
        "num_threads": get_num_threads(),
        "threading": st["threading"],
    }
