"""Every SIMD path of fastbp's kernels, on any machine (issue 11 item 2).

FASTBP_DISABLE_CPU_FEATURES (NumPy's NPY_DISABLE_CPU_FEATURES convention) lowers the path of fastbp's own kernels
(avx512 -> avx2 -> baseline, see _simd.h) and the core type of its OpenBLAS together.  Here each path runs in a
subprocess that counts which variant every kernel call ran, so the test fails if the variable stops reaching
the kernels; the kernel results are checked against NumPy on each path.  `.ci/run` also runs the whole kernel
test files once per path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastbp import _blas, _kernels, _optim

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("baseline", "avx2", "avx512")
HW = _kernels.simd_info()["cpu"]
RANK = {p: i for i, p in enumerate(PATHS)}


@pytest.mark.parametrize(
    "disabled,best,expected",
    [
        (None, "avx512", "avx512"),
        ("", "avx512", "avx512"),
        ("AVX512F", "avx512", "avx2"),
        ("avx512vl", "avx512", "avx2"),
        ("AVX512_SKX", "avx512", "avx2"),
        ("avx512*", "avx512", "avx2"),
        ("avx512_bf16", "avx512", "avx512"),
        ("AVX512F,AVX2", "avx512", "baseline"),
        ("AVX2", "avx512", "baseline"),
        ("avx", "avx512", "baseline"),
        ("FMA3", "avx512", "baseline"),
        ("bmi", "avx512", "baseline"),
        (" sse4_2 , AVX512F ", "avx512", "avx2"),
        ("av?2", "avx512", "baseline"),
        ("*", "avx512", "baseline"),
        ("AVX512F", "avx2", "avx2"),
        ("AVX2", "avx2", "baseline"),
        ("", "baseline", "baseline"),
        ("fma4 xop", "avx512", "avx512"),
        ("AVX512FX", "avx512", "avx512"),
    ],
)
def test_the_path_the_variable_selects(disabled, best, expected):
    assert _kernels._simd_level_for(RANK[best], disabled) == expected
    assert _optim._simd_level_for(RANK[best], disabled) == expected


def test_numpy_feature_names_disable_the_same_flags_for_the_blas_core():
    assert _blas.disabled_cpu_features({"FASTBP_DISABLE_CPU_FEATURES": "FMA3, AVX512_SKX,sse41"}) == (
        "fma",
        "avx512*",
        "sse4_1",
    )


def test_both_modules_report_the_same_path_in_this_process():
    a, b = _kernels.simd_info(), _optim.simd_info()
    assert a == b
    assert a["path"] in a["compiled"] and RANK[a["path"]] <= RANK[a["cpu"]]


# One subprocess per path: run every dispatched kernel with counting on and report which variants ran, the BLAS
# core type, and whether each result matches NumPy.
_PROBE = r"""
import json, numpy as np
from fastbp import _kernels as K, _optim as O, _blas
rng = np.random.default_rng(0)
ok = {}
K._simd_count(True); O._simd_count(True)
for dt in (np.float32, np.float64):
    tol = 1e-5 if dt == np.float32 else 1e-12
    x = rng.standard_normal((64, 37)).astype(dt)
    out = np.empty_like(x); mask = np.empty(x.shape, bool); dx = np.empty_like(x)
    K.relu_forward(x, out, mask); K.relu_backward(x, mask, dx)
    ok[f"relu {dt.__name__}"] = bool(np.array_equal(out, np.maximum(x, 0))
                                     and np.array_equal(dx, np.where(x > 0, x, 0)))
    K.sigmoid_forward(x, out)
    ok[f"sigmoid {dt.__name__}"] = bool(np.allclose(out, 1 / (1 + np.exp(-x.astype(np.float64))), rtol=tol, atol=0))
    t = rng.integers(0, 37, 64)
    y = np.empty_like(x); g = np.empty_like(x)
    loss = K.softmax_cross_entropy(x, t, y, g, 1.0 / 64)
    xd = x.astype(np.float64); e = np.exp(xd - xd.max(1, keepdims=True)); p = e / e.sum(1, keepdims=True)
    ref = -np.log(p[np.arange(64), t]).mean(); gr = p.copy(); gr[np.arange(64), t] -= 1; gr /= 64
    ok[f"softmax {dt.__name__}"] = bool(abs(loss - ref) <= tol * abs(ref) and np.allclose(y, p, rtol=tol, atol=tol)
                                        and np.allclose(g, gr, rtol=tol, atol=tol))
    db = np.empty(37, dt); K.bias_backward(x, db)
    ok[f"colsum {dt.__name__}"] = bool(np.allclose(db, xd.sum(0), rtol=tol, atol=tol))
    pm = rng.standard_normal(1000).astype(dt); gm = rng.standard_normal(1000).astype(dt)
    want = pm - dt(0.1) * gm
    O.optimizer_update(0, pm, gm, None, None, 0.1)
    ok[f"sgd {dt.__name__}"] = bool(np.allclose(pm, want, rtol=tol, atol=tol))
from fastbp import _recurrent, _embedding
others = [m.simd_info()["path"] for m in (O, _recurrent, _embedding)]
print(json.dumps({"kernels": K._simd_count(False), "optim": O._simd_count(False), "info": K.simd_info(),
                  "other_modules": others,
                  "core": _blas.info()["corename"], "ok": ok}))
"""


def _run_path(disabled):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_CORETYPE", "FASTBP_BLAS_CORETYPE", "FASTBP_DISABLE_CPU_FEATURES")
    }
    if disabled is not None:
        env["FASTBP_DISABLE_CPU_FEATURES"] = disabled
    env["FASTBP_BLAS"] = "own"  # the core of fastbp's own OpenBLAS copy is part of the path
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "disabled,path,cores",
    [
        (None, "avx512", ("SkylakeX", "Cooperlake", "SapphireRapids")),
        ("AVX512F", "avx2", ("Haswell",)),
        ("AVX", "baseline", ("Nehalem",)),
    ],
)
def test_each_path_runs_its_own_variants_and_blas_core(disabled, path, cores):
    if RANK[path] > RANK[HW]:
        pytest.skip(f"this CPU (or build) has no {path} path")
    got = _run_path(disabled)
    assert got["info"]["path"] == path
    assert got["other_modules"] == [path] * 3  # _optim, _recurrent, _embedding chose the same path
    for module in ("kernels", "optim"):
        counts = got[module]
        assert counts[path] > 0, (module, counts)
        assert all(n == 0 for p, n in counts.items() if p != path), (module, counts)
    assert all(got["ok"].values()), got["ok"]
    if _blas._is_x86() and all(f in _blas.cpu_flags() for f in _blas.CORE_FLAGS[cores[0]]):
        assert got["core"] in cores, got["core"]
