"""fastbp's environment settings: the OpenBLAS core type it may load (never one the CPU cannot run) and
FASTBP_NUM_THREADS (a clear error at import).  The CPU is simulated through FASTBP_DISABLE_CPU_FEATURES or by
passing flag sets to the chooser, so the refusals are tested on a machine that has AVX-512."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastbp import _blas

ROOT = Path(__file__).resolve().parents[1]
X86 = _blas._is_x86()  # (the real machine, before the fixture below)
HAS_AVX2 = X86 and all(f in _blas.cpu_flags() for f in _blas.CORE_FLAGS["Haswell"])
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="the subprocess checks load Haswell kernels: x86-64 AVX2 CPU")
AVX2_CPU = {"sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma"}  # e.g. a Zen 2 laptop
SKX_CPU = AVX2_CPU | set(_blas.SKYLAKEX_FLAGS)  # Skylake-SP: no bf16, no AMX
ZEN4_CPU = SKX_CPU | {"avx512_bf16"}


@pytest.fixture(autouse=True)
def _x86(monkeypatch):
    monkeypatch.setattr(_blas, "_is_x86", lambda: True)  # the x86-64 table applies (whatever runs this)


def choose(flags, **env):
    return _blas._choose_coretype(flags, env)


# -- issue 7 item 8: a core type the CPU cannot run is refused, naming the missing flags -------------------------
@pytest.mark.parametrize("var", ["FASTBP_BLAS_CORETYPE", "OPENBLAS_CORETYPE"])
def test_skylakex_is_refused_on_an_avx2_only_cpu(var):
    env = {var: "SkylakeX"} if var == "FASTBP_BLAS_CORETYPE" else {var: "SkylakeX", "FASTBP_BLAS_CORETYPE": "inherit"}
    core, reason, refused = choose(AVX2_CPU, **env)
    assert core == _blas.CPUID  # OPENBLAS_CORETYPE removed around the load: OpenBLAS's choice
    assert f"{var}=SkylakeX" in refused and "avx512f avx512cd avx512bw avx512dq avx512vl" in refused
    assert "refused" in reason


def test_inherited_skylakex_is_refused_in_auto_mode_too():
    core, _, refused = choose(AVX2_CPU, OPENBLAS_CORETYPE="skylakex")
    assert core == _blas.CPUID and "avx512f" in refused


@pytest.mark.parametrize(
    "name,cpu,missing",
    [
        ("Cooperlake", SKX_CPU, "avx512_bf16"),
        ("SapphireRapids", ZEN4_CPU, "avx512_fp16 amx_tile amx_bf16"),
        ("Haswell", {"sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx"}, "avx2 fma"),
        ("Sandybridge", {"sse2", "pni", "sse4_2"}, "avx"),
    ],
)
def test_every_avx_core_type_names_what_it_lacks(name, cpu, missing):
    core, _, refused = choose(cpu, FASTBP_BLAS_CORETYPE=name)
    assert core == _blas.CPUID
    assert f"({missing})" in refused


@pytest.mark.parametrize(
    "name,cpu",
    [
        ("Haswell", AVX2_CPU),
        ("haswell", AVX2_CPU),
        ("Zen", AVX2_CPU),
        ("SkylakeX", SKX_CPU),
        ("Cooperlake", ZEN4_CPU),
        ("Nehalem", AVX2_CPU),
    ],
)
def test_a_runnable_core_type_is_loaded_as_asked(name, cpu):
    assert choose(cpu, FASTBP_BLAS_CORETYPE=name) == (name, "FASTBP_BLAS_CORETYPE", None)
    core, _, refused = choose(cpu, FASTBP_BLAS_CORETYPE="inherit", OPENBLAS_CORETYPE=name)
    assert core is None and refused is None  # OPENBLAS_CORETYPE left as it is


def test_unknown_core_type_is_refused_and_unknown_flags_are_not_checked():
    core, _, refused = choose(AVX2_CPU, FASTBP_BLAS_CORETYPE="Pentium9")
    assert core == _blas.CPUID and "'Pentium9' is not a core type" in refused and "Haswell" in refused
    assert choose(set(), FASTBP_BLAS_CORETYPE="SkylakeX") == ("SkylakeX", "FASTBP_BLAS_CORETYPE", None)


def test_auto_mode_chooses_skylakex_only_with_avx512():
    assert choose(SKX_CPU)[0] == "SkylakeX"
    assert choose(AVX2_CPU)[:1] == (None,) and choose(AVX2_CPU)[2] is None
    assert choose(SKX_CPU, FASTBP_BLAS_CORETYPE="inherit")[0] is None


def test_disabled_cpu_features_are_removed_and_steer_the_choice(monkeypatch):
    monkeypatch.setattr(_blas, "_raw_cpu_flags", lambda: set(ZEN4_CPU))
    env = {"FASTBP_DISABLE_CPU_FEATURES": "AVX512*, fma4"}
    flags = _blas.cpu_flags(env)
    assert flags == AVX2_CPU
    # OpenBLAS's own choice would still see AVX-512, so fastbp names the best core the remaining flags allow
    assert choose(flags, **env)[:1] == ("Haswell",)
    core, _, refused = choose(flags, FASTBP_BLAS_CORETYPE="SkylakeX", **env)
    assert core == "Haswell" and "avx512f" in refused
    assert _blas.cpu_flags({"FASTBP_DISABLE_CPU_FEATURES": "avx2 fma"}) == ZEN4_CPU - {"avx2", "fma"}


def _run(code, timeout=120, **env):
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_CORETYPE", "FASTBP_BLAS_CORETYPE", "FASTBP_DISABLE_CPU_FEATURES")
    }
    e["FASTBP_BLAS"] = "own"  # these are settings of fastbp's own OpenBLAS copy (a run may say otherwise)
    e.update(env)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    args = code if isinstance(code, list) else ["-c", code]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


_GEMM = (
    "import warnings, numpy as np; from fastbp import _blas, _kernels as K; "
    "a = np.arange(6.0).reshape(2, 3); c = np.empty((2, 2)); K.gemm(a, a.T, c); "
    "assert np.allclose(c, a @ a.T); i = _blas.info(); print(i['corename'], i['requested_coretype'])"
)


@needs_avx2
@pytest.mark.parametrize(
    "env,core,warned",
    [
        ({"FASTBP_BLAS_CORETYPE": "Haswell"}, "Haswell", None),
        # an AVX2-only CPU, simulated: SkylakeX (forced, or inherited from OPENBLAS_CORETYPE) is refused
        (
            {"FASTBP_BLAS_CORETYPE": "SkylakeX", "FASTBP_DISABLE_CPU_FEATURES": "avx512*"},
            "Haswell",
            "FASTBP_BLAS_CORETYPE=SkylakeX needs CPU flags this CPU lacks "
            "(avx512f avx512cd avx512bw avx512dq avx512vl)",
        ),
        (
            {"OPENBLAS_CORETYPE": "SkylakeX", "FASTBP_DISABLE_CPU_FEATURES": "avx512f"},
            "Haswell",
            "OPENBLAS_CORETYPE=SkylakeX needs CPU flags this CPU lacks (avx512f)",
        ),
    ],
)
def test_the_loaded_core_type_and_the_warning(env, core, warned):
    r = _run(_GEMM, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == core
    if warned:
        assert "RuntimeWarning" in r.stderr and warned in r.stderr
    else:
        assert "Warning" not in r.stderr


@needs_avx2
@pytest.mark.parametrize("coretype", ["Haswell", "SkylakeX"])
def test_fastbp_info_runs_under_a_forced_core_type(coretype):
    r = _run(["-m", "fastbp", "info"], FASTBP_BLAS_CORETYPE=coretype)
    assert r.returncode == 0, r.stderr
    runnable = all(f in _blas.cpu_flags() for f in _blas.CORE_FLAGS[coretype])
    if runnable:
        assert f"core {coretype} (requested {coretype}: FASTBP_BLAS_CORETYPE)" in r.stdout
    else:
        assert "lacks" in r.stderr and "refused" in r.stdout


# -- issue 7 item 9: FASTBP_NUM_THREADS ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["abc", "99999999999", "0", "-1", "1025", "3.0", "1e3", "0x10", "4 4"])
def test_bad_num_threads_is_a_value_error_naming_the_variable_and_range(text):
    with pytest.raises(ValueError, match=r"FASTBP_NUM_THREADS must be an integer in 1\.\.1024 .*got "):
        _blas.env_num_threads({"FASTBP_NUM_THREADS": text})


@pytest.mark.parametrize("text,n", [("1", 1), (" 16 ", 16), ("+3", 3), ("1024", 1024), ("", None), ("  ", None)])
def test_good_num_threads(text, n):
    assert _blas.env_num_threads({"FASTBP_NUM_THREADS": text}) == n
    assert _blas.env_num_threads({}) is None


@pytest.mark.parametrize("text", ["abc", "-1"])  # (every bad form: the unit test above)
def test_bad_num_threads_fails_the_import_of_the_layers(text):
    r = _run("import fastbp.layers", FASTBP_NUM_THREADS=text)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"ValueError: FASTBP_NUM_THREADS must be an integer in 1..1024 (or unset), got {text!r}"


def test_set_num_threads_range():
    with pytest.raises(ValueError, match="<= 1024, got 1025"):
        _blas.set_num_threads(1025)


# -- issue 11 item 1: FASTBP_BLAS=numpy runs fastbp's GEMMs on NumPy's own OpenBLAS ---------------------------
def test_fastbp_blas_parsing():
    assert _blas.env_blas({}) == "auto"
    assert _blas.env_blas({"FASTBP_BLAS": " NumPy "}) == "numpy"
    assert _blas.env_blas({"FASTBP_BLAS": "own"}) == "own"
    with pytest.raises(ValueError, match=r"FASTBP_BLAS must be one of \('own', 'numpy', 'auto'\)"):
        _blas.env_blas({"FASTBP_BLAS": "mkl"})


_NUMPY_BLAS_PROBE = r"""
import json, numpy as np
from fastbp import _blas, _kernels
rng = np.random.default_rng(0)
worst = 0.0
for dt in (np.float32, np.float64):
    for m, k, n, ta, tb in [(100, 784, 50, 0, 0), (784, 100, 50, 1, 0), (100, 50, 784, 0, 1), (1, 300, 7, 0, 0),
                            (1, 300, 7, 0, 1), (257, 129, 65, 1, 1), (3, 0, 4, 0, 0)]:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(dt)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(dt)
        out = np.full((m, n), np.nan, dt)
        _kernels.gemm(a, b, out, trans_a=bool(ta), trans_b=bool(tb))
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
        err = float(np.max(np.abs(out - want), initial=0.0))
        worst = max(worst, err / max(1.0, float(np.max(np.abs(want), initial=0.0))))
info = _blas.info()
print(json.dumps({"blas": info["blas"], "library": info["library"], "threading": info["threading"], "worst": worst}))
"""


@pytest.mark.parametrize("value", ["numpy", "own"])
def test_numpy_blas_choice_runs_every_gemm_right(value):
    import json

    e = dict(os.environ, PYTHONPATH=str(ROOT), FASTBP_BLAS=value)
    r = subprocess.run(
        [sys.executable, "-c", _NUMPY_BLAS_PROBE], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["worst"] < 1e-4, got
    if value == "own":
        assert got["blas"] == "own" and "scipy_openblas32" in got["library"]
    elif got["blas"] == "numpy":  # NumPy built on scipy-openblas (the wheels): its library, its pool
        assert "scipy_openblas32" not in got["library"] and got["threading"] == "numpy"
    else:
        assert "RuntimeWarning" in r.stderr
