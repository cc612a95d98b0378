"""How long fastbp's worker threads spin after a parallel region before they sleep (issue 11 item 1).

By default fastbp's parallel regions run on its own worker pool (fastbp/_threads.h): workers spin SPIN_US
microseconds after a region (FASTBP_SPIN_US), then sleep; products below WAKE_MIN_MACS multiply-adds wake no
sleeping worker (FASTBP_WAKE_MIN_MACS); FASTBP_THREAD_POOL=openmp opens OpenMP regions instead.  The settings
below (GOMP_SPINCOUNT / KMP_BLOCKTIME) then apply to libgomp's team, which serves FASTBP_THREAD_POOL=openmp and
the OpenBLAS "callback" threading mode.

GNU OpenMP reads OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when libgomp is loaded.  Its default (spin about 300,000
rounds, roughly a millisecond or more) keeps fastbp's worker spinning on the other core while the book's NumPy
code runs between fastbp's layers.  So, unless the user has set one of them (or KMP_BLOCKTIME), fastbp sets
GOMP_SPINCOUNT to SPINCOUNT for exactly the moment its extension modules load libgomp and then removes it again:
later processes and other OpenMP runtimes (PyTorch's own libgomp copy, say) never see it.  A clang build against
LLVM's libomp gets KMP_BLOCKTIME the same way (libomp spins 200 ms by default).  NumPy's OpenBLAS uses pthreads,
not OpenMP, and is never touched.  FASTBP_OMP_SPIN=<n> picks another count, FASTBP_OMP_SPIN=keep leaves libgomp's
default.  The figures behind SPINCOUNT: python -m fastbp.bench.loops (see the README).
"""

import os

#: GOMP_SPINCOUNT fastbp uses for its own OpenMP runtime when the user sets neither OMP_WAIT_POLICY nor
#: GOMP_SPINCOUNT (None: libgomp's default).  0: a worker sleeps as soon as a region ends, so it never holds a
#: core while the book's NumPy code runs.  Chosen with python -m fastbp.bench.loops and `fastbp bench` (figures
#: in the README; a loaded 2-core machine): in the book's ch05/ch06 loops with fastbp's layers libgomp's default
#: made each step 30-100x slower than 0 or 1000 (fastbp slower than the book), 0 beat 1000 in 2 of 3 runs and
#: 3000/10000 were slower; in the bench's gap-separated TwoLayerNet step 0 beat 200 and 1000 in every round and
#: was within the noise of libgomp's default.
SPINCOUNT = 0

#: The same for a build against LLVM's libomp (clang): KMP_BLOCKTIME, in milliseconds; 0 = no spinning, as
#: SPINCOUNT (libomp's default is 200 ms).
KMP_BLOCKTIME = 0

_USER_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_info = {}


def _libgomp_loaded():
    """True when GNU OpenMP (libgomp.so, not a vendored libgomp-<hash> such as PyTorch's) is in the process."""
    return _mapped("libgomp.so")


def _mapped(name):
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f)
    except OSError:
        return None


def apply():
    """Load fastbp's OpenMP runtime (the _threads extension) with fastbp's spin setting; once per process."""
    if _info:
        return _info
    user = {k: os.environ[k] for k in _USER_VARS if k in os.environ}
    want = os.environ.get("FASTBP_OMP_SPIN", "").strip().lower()
    spin = SPINCOUNT if want in ("", "auto") else (None if want == "keep" else want)
    bad = spin is not None and not str(spin).isdigit()
    if bad:
        import warnings

        warnings.warn(
            f"fastbp: FASTBP_OMP_SPIN must be a spin count >= 0, 'keep' or 'auto', got {want!r}; using the default",
            RuntimeWarning,
            stacklevel=3,
        )
        spin = SPINCOUNT
    preloaded = _libgomp_loaded()
    if user:
        _info.update(setting=" ".join(f"{k}={v}" for k, v in user.items()), by="the user")
        spin = None
    elif spin is None:
        _info.update(setting="libgomp's default", by="FASTBP_OMP_SPIN=keep" if want == "keep" else "fastbp")
    elif want not in ("", "auto") and not bad:
        _info.update(setting=f"GOMP_SPINCOUNT={spin}", by="FASTBP_OMP_SPIN, for fastbp's OpenMP runtime only")
    else:
        _info.update(setting=f"GOMP_SPINCOUNT={spin}", by="fastbp, for its own OpenMP runtime only")
    llvm_preloaded = _mapped("libomp.so")
    if spin is not None:
        os.environ["GOMP_SPINCOUNT"] = str(spin)
        os.environ["KMP_BLOCKTIME"] = str(KMP_BLOCKTIME)
    try:
        from fastbp import _threads  # noqa: F401  (loads the OpenMP runtime, which reads the variables now)
    finally:
        if spin is not None:
            os.environ.pop("GOMP_SPINCOUNT", None)
            os.environ.pop("KMP_BLOCKTIME", None)
    if spin is not None and not _mapped("libgomp.so") and _mapped("libomp.so"):
        if llvm_preloaded:
            _info.update(
                setting="libomp's setting at its earlier load",
                by="nobody: LLVM's libomp was loaded before fastbp, KMP_BLOCKTIME came too late",
            )
        else:
            _info.update(
                setting=f"KMP_BLOCKTIME={KMP_BLOCKTIME} (LLVM's libomp)", by="fastbp, for its own OpenMP runtime only"
            )
    elif preloaded and spin is not None:
        _info.update(
            setting="libgomp's setting at its earlier load",
            by=f"nobody: libgomp was loaded before fastbp, GOMP_SPINCOUNT={spin} came too late",
        )
    return _info


def info():
    """{'setting': what fastbp's OpenMP workers do after a region, 'by': who chose it}."""
    return dict(_info)


# ---------------------------------------------------------------------------------------------------------------
# fastbp's own worker pool (fastbp/_threads.h): how parallel_blocks opens a region
# ---------------------------------------------------------------------------------------------------------------
#: Microseconds a pool worker spins after its last block before it sleeps (FASTBP_SPIN_US overrides).  It must
#: outlast the gaps between a training step's regions (50-100 us of layers between its two GEMMs in the 784-50-10
#: step) and the book's NumPy code between steps (~100-150 us in ch05), and no more.  Measured near idle on the
#: 2-core EPYC (python -m fastbp bench --quick; python -m fastbp.bench.loops, the book's loop): spin 50 us:
#: TwoLayerNet b100 f32 219 us (2.17x NumPy), ch05 1.08x the book; 200: 147-149 us, 1.13x; 300: 149 us (2.85x);
#: 1000: 150 us, 1.18x; OpenMP regions with GOMP_SPINCOUNT=0 (the previous default): 264 us, 0.89x.  The
#: spinning worker yields its core about every microsecond, so a thread that wants it gets it.
SPIN_US = 300

#: Largest FASTBP_SPIN_US accepted (one second).
MAX_SPIN_US = 1_000_000

POOLS = ("fastbp", "openmp")


def env_thread_pool(environ=None):
    """FASTBP_THREAD_POOL (lower case): 'fastbp' (default: fastbp's own worker pool) or 'openmp' (an OpenMP region
    per call, libgomp's team and spin setting); ValueError naming the variable otherwise."""
    text = (os.environ if environ is None else environ).get("FASTBP_THREAD_POOL", "")
    v = text.strip().lower() or "fastbp"
    if v not in POOLS:
        raise ValueError(f"FASTBP_THREAD_POOL must be one of {POOLS} (or unset), got {text!r}")
    return v


def env_number(name, default, ok, expected, environ=None):
    """The environment variable `name` as a float (`default` when unset or empty); ValueError naming the variable
    and what it takes (`expected`) when it is not a number or `ok(value)` is false (NaN never is)."""
    text = (os.environ if environ is None else environ).get(name, "")
    t = text.strip()
    if not t:
        return default
    try:
        v = float(t)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise ValueError(f"{name} must be {expected} (or unset), got {text!r}")
    return v


def env_spin_us(environ=None):
    """FASTBP_SPIN_US as a number of microseconds in 0..MAX_SPIN_US (SPIN_US when unset or empty); ValueError
    naming the variable otherwise."""
    return env_number(
        "FASTBP_SPIN_US",
        SPIN_US,
        lambda v: 0 <= v <= MAX_SPIN_US,
        f"a number of microseconds in 0..{MAX_SPIN_US}",
        environ,
    )


#: Smallest matrix product (multiply-adds) that wakes a sleeping pool worker (FASTBP_WAKE_MIN_MACS overrides).
WAKE_MIN_MACS = 0


def env_wake_min_macs(environ=None):
    """FASTBP_WAKE_MIN_MACS as a number >= 0 (WAKE_MIN_MACS when unset or empty); ValueError naming it otherwise."""
    return env_number(
        "FASTBP_WAKE_MIN_MACS",
        WAKE_MIN_MACS,
        lambda v: 0 <= v < float("inf"),
        "a number of multiply-adds >= 0",
        environ,
    )
