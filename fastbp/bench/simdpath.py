"""Putting every library of the process on one SIMD path: ``--path`` of ``fastbp bench``,
``python -m fastbp.bench.loops`` and ``python -m fastbp.bench.paths``.

NumPy's OpenBLAS, NumPy's SIMD dispatch, PyTorch's ATen/oneDNN/MKL and fastbp read their settings when they load,
so a path is forced by running the benchmark in a child process with the environment of
:func:`path_environment` (the one place for the rule); the child measures which kernels each library runs
(:func:`kernels_in_use`) and refuses to time a column that would be mislabelled (:func:`check_kernels`).  The
caller's environment and NumPy's settings in the calling process are never touched.
"""

import fnmatch
import os
import subprocess
import sys

# ---------------------------------------------------------------------------------------------------------------
# Putting every library of the process on one SIMD path (``--path`` of fastbp bench, bench.loops and this module)
# ---------------------------------------------------------------------------------------------------------------
#: The paths ``--path`` takes.  "native": every library on the kernels it picks for this CPU by itself (the
#: steering variables below removed); "avx512": the same, refused on a CPU without fastbp's AVX-512 path; "avx2"
#: and "baseline": every library capped at that instruction set, as on a CPU that has nothing more.
PATHS = ("native", "avx512", "avx2", "baseline")
_RANK = {"baseline": 0, "avx2": 1, "avx512": 2}

#: The environment variables the rule below owns: with ``--path`` the child process gets exactly the path's
#: values for them, whatever the caller's environment says (the caller's own values are listed as overridden).
STEERING_VARS = (
    "FASTBP_DISABLE_CPU_FEATURES",  # fastbp's kernels and the core type of its OpenBLAS copy (fastbp/_simd.h, _blas)
    "FASTBP_BLAS_CORETYPE",  # a forced core type for fastbp's copy would beat the path: removed
    "OPENBLAS_CORETYPE",  # NumPy's bundled OpenBLAS (read when NumPy loads it)
    "NPY_DISABLE_CPU_FEATURES",  # NumPy's own SIMD dispatch (only dispatchable targets may be named)
    "NPY_ENABLE_CPU_FEATURES",
    "ATEN_CPU_CAPABILITY",  # PyTorch's ATen kernels: default / avx2 / avx512
    "ONEDNN_MAX_CPU_ISA",  # PyTorch's oneDNN
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",  # PyTorch's MKL (its GEMMs on x86)
)

#: The marker the child process gets: the path it must run on.
CHILD_VAR = "FASTBP_BENCH_PATH"

#: Per capped path: fastbp's FASTBP_DISABLE_CPU_FEATURES (the same values as .ci/run and the tests use), PyTorch's
#: ATen capability (and what get_cpu_capability() then says), oneDNN's and MKL's caps.
_CAPS = {
    "avx2": {"fastbp": "AVX512F", "aten": "avx2", "aten_says": "AVX2", "onednn": "AVX2", "mkl": "AVX2"},
    "baseline": {"fastbp": "AVX", "aten": "default", "aten_says": "DEFAULT", "onednn": "SSE41", "mkl": "SSE4_2"},
}

#: fastbp's AVX-512 and AVX2 paths need these CPU flags (fastbp/_simd.h), as /proc/cpuinfo names them.
_PATH_FLAGS = {
    "avx2": ("avx", "avx2", "fma", "bmi1", "bmi2"),
    "avx512": ("avx", "avx2", "fma", "bmi1", "bmi2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
}


def numpy_targets_above(path, dispatch):
    """The targets of NumPy's SIMD dispatch list `dispatch` (``__cpu_dispatch__``: X86_V3, X86_V4, AVX512_ICL, ...
    in NumPy 2.x; AVX512F, AVX512_SKX, ... in 1.x) that a CPU with nothing beyond `path` lacks: for "avx2" those of
    the AVX-512 class (X86_V4, AVX512*, AVX10*), for "baseline" all of them (NumPy's build baseline, X86_V2 for
    NumPy 2.x, cannot be disabled and stays on)."""
    if path == "baseline":
        return list(dispatch)
    if path == "avx2":
        return [t for t in dispatch if t.upper().startswith(("AVX512", "X86_V4", "AVX10"))]
    return []


def path_environment(path, environ, cpu_path, cpu_flags, numpy_dispatch, x86=True):
    """(environment of the child process, notes) that put fastbp, NumPy and PyTorch on SIMD path `path`.

    A pure function: `environ` (the caller's environment, not modified) with the STEERING_VARS replaced by the
    path's values.  `cpu_path` is the best path of this CPU and build (fastbp's ``simd_info()['cpu']``),
    `cpu_flags` its /proc/cpuinfo flags, `numpy_dispatch` NumPy's ``__cpu_dispatch__``.  For "avx2"/"baseline":
    FASTBP_DISABLE_CPU_FEATURES as the tests use it; OPENBLAS_CORETYPE = the best OpenBLAS core type the remaining
    flags allow, by the rule fastbp's own copy follows (so both OpenBLAS copies run the same kernels: Haswell,
    Nehalem); NPY_DISABLE_CPU_FEATURES = the dispatch targets above the path; ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS capped.  "native"/"avx512": all of them removed (each library's
    own choice; "avx512" adds ATEN_CPU_CAPABILITY=avx512).  The notes name every caller setting overridden.
    ValueError for an unknown path, a path this CPU (or build) does not have, naming what it has, or any path but
    "native" off x86-64 (`x86` false: the paths and OpenBLAS core names are x86's)."""
    from fastbp import _blas

    if path not in PATHS:
        raise ValueError(f"unknown SIMD path {path!r}; expected one of {', '.join(PATHS)}")
    if path != "native" and not x86:
        raise ValueError(f"--path {path}: the SIMD paths are x86-64's; on this machine only --path native applies")
    if cpu_path not in _RANK:
        raise ValueError(f"cpu_path must be one of {', '.join(_RANK)}, got {cpu_path!r}")
    if path != "native" and _RANK[path] > _RANK[cpu_path]:
        missing = [f for f in _PATH_FLAGS.get(path, ()) if f not in cpu_flags]
        lacks = f" (it lacks {' '.join(missing)})" if missing else " (the build has no variants of that path)"
        raise ValueError(
            f"--path {path}: this CPU's best path is {cpu_path}{lacks}; use --path {cpu_path} or a lower one"
        )
    env = {k: v for k, v in environ.items() if k not in STEERING_VARS}
    env[CHILD_VAR] = path
    if path in _CAPS:
        cap = _CAPS[path]
        env["FASTBP_DISABLE_CPU_FEATURES"] = cap["fastbp"]
        off = _blas.disabled_cpu_features(env)
        left = {f for f in cpu_flags if not any(fnmatch.fnmatchcase(f.lower(), p) for p in off)}
        env["OPENBLAS_CORETYPE"] = _blas._best_core(left)
        above = numpy_targets_above(path, numpy_dispatch)
        if above:
            env["NPY_DISABLE_CPU_FEATURES"] = " ".join(above)
        env["ATEN_CPU_CAPABILITY"] = cap["aten"]
        env["ONEDNN_MAX_CPU_ISA"] = cap["onednn"]
        env["MKL_ENABLE_INSTRUCTIONS"] = cap["mkl"]
    elif path == "avx512":
        env["ATEN_CPU_CAPABILITY"] = "avx512"
    notes = []
    for k in STEERING_VARS:
        if k in environ and environ[k] != env.get(k):
            now = f"{k}={env[k]}" if k in env else "removed"
            notes.append(f"{k}={environ[k]} of your environment overridden ({now}): --path {path} sets them all")
    return env, notes


def child_environment(path, environ=None):
    """path_environment() with this machine's facts (fastbp's CPU path, /proc/cpuinfo, NumPy's dispatch list)."""
    from fastbp import _blas
    from fastbp import _kernels as K

    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__ as dispatch
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__ as dispatch
    environ = os.environ if environ is None else environ
    return path_environment(
        path, dict(environ), K.simd_info()["cpu"], _blas._raw_cpu_flags(), list(dispatch), _blas._is_x86()
    )


def kernels_in_use(torch=None):
    """Which kernels each library of THIS process runs, measured: fastbp's SIMD path and OpenBLAS core, NumPy's
    enabled dispatch targets and its OpenBLAS core (None when NumPy's BLAS is not a scipy-openblas build), PyTorch's
    ATen capability (None without torch), and the steering variables of the environment."""
    import ctypes

    from fastbp import _blas
    from fastbp import _kernels as K

    try:
        from numpy._core import _multiarray_umath as mu
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath as mu
    np_core = np_threads = None
    found = _blas._numpy_openblas()
    if found is not None:
        _, lib, sfx = found
        get = getattr(lib, f"scipy_openblas_get_corename{sfx}", None)
        if get is not None:
            get.restype = ctypes.c_char_p
            np_core = get().decode()
        get = getattr(lib, f"scipy_openblas_get_num_threads{sfx}", None)
        if get is not None:
            get.restype = ctypes.c_int
            np_threads = int(get())
    used = {
        "fastbp": {"simd": K.simd_info()["path"], "cpu": K.simd_info()["cpu"], "blas_core": _blas.info()["corename"]},
        "numpy": {
            "dispatch_on": [t for t in mu.__cpu_dispatch__ if mu.__cpu_features__.get(t)],
            "baseline": list(mu.__cpu_baseline__),
            "blas_core": np_core,
            "blas_threads": np_threads,
        },
        "torch": None,
        "env": {k: os.environ[k] for k in STEERING_VARS if k in os.environ},
    }
    if torch is not None:
        used["torch"] = {"aten": torch.backends.cpu.get_cpu_capability(), "version": torch.__version__}
    return used


def check_kernels(path, used):
    """(problems, warnings) of the kernels `used` (kernels_in_use() of the child) against path `path`: a problem
    is a library on other kernels than the path's (the column would be a lie); a warning, one that cannot be
    checked.  Nothing is checked for "native" but fastbp's own path."""
    problems, warnings = [], []
    fb, nb, env = used["fastbp"], used["numpy"], used["env"]
    want = fb["cpu"] if path == "native" else path
    if fb["simd"] != want:
        problems.append(f"fastbp's kernels run the {fb['simd']} path, not {want}")
    core = env.get("OPENBLAS_CORETYPE")
    if path in _CAPS and core is None:
        problems.append("OPENBLAS_CORETYPE is not set (this process was not started by --path)")
    elif path in _CAPS:
        if (fb["blas_core"] or "").lower() != core.lower():
            problems.append(f"fastbp's OpenBLAS runs {fb['blas_core']} kernels, not {core}")
        if nb["blas_core"] is None:
            warnings.append("NumPy's OpenBLAS core type cannot be read (not a scipy-openblas build): unchecked")
        elif nb["blas_core"].lower() != core.lower():
            problems.append(f"NumPy's OpenBLAS runs {nb['blas_core']} kernels, not {core}")
        above = numpy_targets_above(path, nb["dispatch_on"])
        if above:
            problems.append(f"NumPy's SIMD dispatch still has {' '.join(above)} on")
        t = used["torch"]
        if t is not None and t["aten"].upper() != _CAPS[path]["aten_says"]:
            problems.append(f"PyTorch's ATen runs {t['aten']} kernels, not {_CAPS[path]['aten_says']}")
    elif path == "avx512" and used["torch"] is not None and used["torch"]["aten"].upper() != "AVX512":
        problems.append(f"PyTorch's ATen runs {used['torch']['aten']} kernels, not AVX512")
    return problems, warnings


def format_kernels(used, path=None):
    """Header lines: which kernels each library ran (measured in this process), and the path asked for."""
    fb, nb, t, env = used["fastbp"], used["numpy"], used["torch"], used["env"]
    np_simd = "+".join(nb["baseline"]) + (" + dispatch " + " ".join(nb["dispatch_on"]) if nb["dispatch_on"] else "")
    if not nb["dispatch_on"]:
        np_simd += " only (no dispatch target)"
    lines = [
        (
            f"SIMD path {path} (forced at the start of the timing process: "
            + (
                "every library's own choice, steering variables removed)"
                if path in ("native", "avx512")
                else ", ".join(f"{k}={env[k]}" for k in STEERING_VARS if k in env) + ")"
            )
        )
        if path
        else "SIMD path: as the environment leaves it (no --path)",
        f"  kernels measured: fastbp {fb['simd']} (CPU: {fb['cpu']}), its OpenBLAS {fb['blas_core']}; NumPy {np_simd}, "
        f"its OpenBLAS {nb['blas_core'] or 'unknown'}"
        + (f"; PyTorch ATen {t['aten']}" if t else "; PyTorch not loaded"),
    ]
    if t and path in _CAPS:
        lines.append(
            f"  PyTorch's oneDNN and MKL capped by ONEDNN_MAX_CPU_ISA={env.get('ONEDNN_MAX_CPU_ISA')} and "
            f"MKL_ENABLE_INSTRUCTIONS={env.get('MKL_ENABLE_INSTRUCTIONS')} (their kernels are not observable "
            "from Python: not checked)"
        )
    return lines


def run_on_path(path, module_argv, environ=None, log=sys.stderr):
    """Run ``python -m <module_argv>`` in a child process on SIMD path `path` (its output streams through);
    returns its exit code, or 2 with the reason on `log` when the path cannot be forced here."""
    try:
        env, notes = child_environment(path, environ)
    except ValueError as e:
        log.write(f"fastbp: {e}\n")
        return 2
    import fastbp

    # the child imports the same fastbp as this process, wherever it came from
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbp.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for n in notes:
        log.write(f"fastbp: note: {n}\n")
    log.flush()
    return subprocess.run([sys.executable, "-m", *module_argv], env=env, check=False).returncode


def child_check(path, torch=None, log=sys.stderr):
    """In the child process: kernels_in_use(), and None if they match `path` (warnings on `log`), else the text
    of the refusal (every library that did not take the path)."""
    if os.environ.get(CHILD_VAR) != path:
        return None, f"--path {path} runs only in the child process fastbp starts (no {CHILD_VAR}={path} here)"
    used = kernels_in_use(torch)
    problems, warnings = check_kernels(path, used)
    for w in warnings:
        log.write(f"fastbp: WARNING: --path {path}: {w}\n")
    if problems:
        return used, (
            f"--path {path} NOT taken, refusing to time a column that would be mislabelled: " + "; ".join(problems)
        )
    return used, None
