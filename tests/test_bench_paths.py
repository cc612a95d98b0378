"""--path of fastbp bench: the environment that puts fastbp, NumPy and PyTorch on one SIMD path, the check of the
kernels the child process really ran, and the child-process plumbing."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from fastbp.bench import command, simdpath as P

DISPATCH_2 = ["X86_V3", "X86_V4", "AVX512_ICL", "AVX512_SPR"]  # NumPy 2.4's dispatch targets on x86-64
FLAGS_512 = {"sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "bmi1", "bmi2"} | {
    "avx512f",
    "avx512cd",
    "avx512bw",
    "avx512dq",
    "avx512vl",
}
FLAGS_AVX2 = {f for f in FLAGS_512 if not f.startswith("avx512")}


def _steer(env):
    return {k: v for k, v in env.items() if k in P.STEERING_VARS or k == P.CHILD_VAR}


def test_avx2_environment_caps_every_library():
    caller = {"HOME": "/h", "PATH": "/bin"}
    env, notes = P.path_environment("avx2", caller, "avx512", FLAGS_512, DISPATCH_2)
    assert _steer(env) == {
        "FASTBP_BENCH_PATH": "avx2",
        "FASTBP_DISABLE_CPU_FEATURES": "AVX512F",
        "OPENBLAS_CORETYPE": "Haswell",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
    assert env["HOME"] == "/h" and env["PATH"] == "/bin" and notes == []
    assert caller == {"HOME": "/h", "PATH": "/bin"}  # the caller's environment is never modified


def test_baseline_environment_disables_every_numpy_dispatch_target():
    env, _ = P.path_environment("baseline", {}, "avx512", FLAGS_512, DISPATCH_2)
    assert env["FASTBP_DISABLE_CPU_FEATURES"] == "AVX"
    assert env["OPENBLAS_CORETYPE"] == "Nehalem"  # the best core type without AVX, as fastbp's own copy picks
    assert env["NPY_DISABLE_CPU_FEATURES"].split() == DISPATCH_2
    assert (env["ATEN_CPU_CAPABILITY"], env["ONEDNN_MAX_CPU_ISA"], env["MKL_ENABLE_INSTRUCTIONS"]) == (
        "default",
        "SSE41",
        "SSE4_2",
    )


def test_numpy_1x_dispatch_names_are_split_at_avx512():
    old = ["SSSE3", "SSE41", "POPCNT", "SSE42", "AVX", "F16C", "FMA3", "AVX2", "AVX512F", "AVX512_SKX", "AVX512_ICL"]
    assert P.numpy_targets_above("avx2", old) == ["AVX512F", "AVX512_SKX", "AVX512_ICL"]
    assert P.numpy_targets_above("baseline", old) == old
    assert P.numpy_targets_above("native", old) == []


def test_native_removes_every_steering_variable_and_names_the_callers_ones():
    caller = {
        "FASTBP_DISABLE_CPU_FEATURES": "AVX512F",
        "OPENBLAS_CORETYPE": "Haswell",
        "ATEN_CPU_CAPABILITY": "avx2",
        "OMP_NUM_THREADS": "2",
    }
    env, notes = P.path_environment("native", caller, "avx512", FLAGS_512, DISPATCH_2)
    assert _steer(env) == {"FASTBP_BENCH_PATH": "native"} and env["OMP_NUM_THREADS"] == "2"
    assert len(notes) == 3 and all("overridden (removed)" in n for n in notes)
    assert any(n.startswith("FASTBP_DISABLE_CPU_FEATURES=AVX512F") for n in notes)
    env, _ = P.path_environment("avx512", caller, "avx512", FLAGS_512, DISPATCH_2)
    assert _steer(env) == {"FASTBP_BENCH_PATH": "avx512", "ATEN_CPU_CAPABILITY": "avx512"}


def test_path_given_and_user_disable_set_the_path_wins_with_a_note():
    env, notes = P.path_environment("avx2", {"FASTBP_DISABLE_CPU_FEATURES": "AVX"}, "avx512", FLAGS_512, DISPATCH_2)
    assert env["FASTBP_DISABLE_CPU_FEATURES"] == "AVX512F"
    assert notes == [
        "FASTBP_DISABLE_CPU_FEATURES=AVX of your environment overridden (FASTBP_DISABLE_CPU_FEATURES=AVX512F): "
        "--path avx2 sets them all"
    ]
    _, notes = P.path_environment("baseline", {"FASTBP_DISABLE_CPU_FEATURES": "AVX"}, "avx512", FLAGS_512, [])
    assert notes == []  # the same value: nothing overridden


def test_a_path_above_the_cpu_or_unknown_is_an_error_naming_what_the_cpu_has():
    with pytest.raises(ValueError, match=r"--path avx512: this CPU's best path is avx2 \(it lacks avx512f avx512cd"):
        P.path_environment("avx512", {}, "avx2", FLAGS_AVX2, DISPATCH_2)
    with pytest.raises(ValueError, match="best path is baseline"):
        P.path_environment("avx2", {}, "baseline", {"sse2"}, [])
    with pytest.raises(ValueError, match="unknown SIMD path 'sse'"):
        P.path_environment("sse", {}, "avx512", FLAGS_512, [])
    with pytest.raises(ValueError, match="only --path native applies"):
        P.path_environment("baseline", {}, "baseline", {"asimd"}, ["ASIMDHP"], x86=False)
    env, _ = P.path_environment("native", {"OPENBLAS_CORETYPE": "NEOVERSEN1"}, "baseline", {"asimd"}, [], x86=False)
    assert "OPENBLAS_CORETYPE" not in env
    env, _ = P.path_environment("avx2", {}, "avx2", FLAGS_AVX2, DISPATCH_2)  # the CPU's own path is fine
    assert env["OPENBLAS_CORETYPE"] == "Haswell"


def _used(**over):
    u = {
        "fastbp": {"simd": "avx2", "cpu": "avx512", "blas_core": "Haswell"},
        "numpy": {"dispatch_on": ["X86_V3"], "baseline": ["X86_V2"], "blas_core": "Haswell"},
        "torch": {"aten": "AVX2", "version": "x"},
        "env": {"OPENBLAS_CORETYPE": "Haswell", "FASTBP_DISABLE_CPU_FEATURES": "AVX512F", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    }
    for k, v in over.items():
        lib, key = k.split("__")
        u[lib] = None if v is None and key == "all" else {**u[lib], key: v}
    return u


@pytest.mark.parametrize(
    "over, problem",
    [
        ({}, None),
        ({"torch__all": None}, None),  # no torch: nothing to check there
        ({"fastbp__simd": "avx512"}, "fastbp's kernels run the avx512 path"),
        ({"fastbp__blas_core": "SkylakeX"}, "fastbp's OpenBLAS runs SkylakeX"),
        ({"numpy__blas_core": "SkylakeX"}, "NumPy's OpenBLAS runs SkylakeX"),
        ({"numpy__dispatch_on": ["X86_V3", "X86_V4"]}, "NumPy's SIMD dispatch still has X86_V4 on"),
        ({"torch__aten": "AVX512"}, "PyTorch's ATen runs AVX512"),
        ({"env__OPENBLAS_CORETYPE": None}, "OPENBLAS_CORETYPE is not set"),
    ],
)
def test_check_kernels_names_every_library_off_the_path(over, problem):
    u = _used(**{k: v for k, v in over.items() if not k.startswith("env__")})
    if "env__OPENBLAS_CORETYPE" in over:
        del u["env"]["OPENBLAS_CORETYPE"]
    problems, warnings = P.check_kernels("avx2", u)
    assert warnings == []
    if problem is None:
        assert problems == []
    else:
        assert len(problems) >= 1 and problem in problems[0]


def test_check_kernels_warns_when_numpys_blas_cannot_be_read():
    problems, warnings = P.check_kernels("avx2", _used(numpy__blas_core=None))
    assert problems == [] and "cannot be read" in warnings[0]


def test_header_lines_name_the_kernels_of_each_library():
    lines = P.format_kernels(_used(), "avx2")
    assert (
        lines[0].startswith("SIMD path avx2 (forced at the start of the timing process: ")
        and "OPENBLAS_CORETYPE=Haswell" in lines[0]
    )
    assert "fastbp avx2 (CPU: avx512), its OpenBLAS Haswell" in lines[1]
    assert "NumPy X86_V2 + dispatch X86_V3, its OpenBLAS Haswell; PyTorch ATen AVX2" in lines[1]
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in lines[2] and "not checked" in lines[2]
    assert P.format_kernels(_used(torch__all=None))[0] == "SIMD path: as the environment leaves it (no --path)"


def test_to_argv_parses_back_to_the_same_options():
    p = command._configure(argparse.ArgumentParser())
    argv = [
        "--quick",
        "--rounds",
        "3",
        "--gap",
        "0.05",
        "--cases",
        "softmax",
        "book-mlp",
        "--peak-size",
        "0",
        "--no-torch",
        "--no-probe",
        "--no-alloc",
        "-q",
        "--path",
        "avx2",
        "--json",
        "x.json",
        "--sweep",
    ]
    a = p.parse_args(argv)
    b = p.parse_args(command.to_argv(a))
    assert vars(a) == vars(b)
    assert vars(p.parse_args(command.to_argv(p.parse_args([])))) == vars(p.parse_args([]))


def _cpu_path():
    from fastbp import _kernels

    return _kernels.simd_info()["cpu"]


_CHEAP = [
    "--cases",
    "softmax-100x10",
    "--rounds",
    "1",
    "--no-probe",
    "--no-alloc",
    "--peak-size",
    "0",
    "--gap",
    "0",
    "-q",
]


@pytest.mark.skipif(_cpu_path() == "baseline", reason="this CPU (or build) has no AVX2 path to force")
def test_bench_path_avx2_runs_in_a_child_with_every_library_on_avx2(tmp_path):
    torch = pytest.importorskip("torch")  # noqa: F841  (the child checks PyTorch's ATen path too)
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != P.CHILD_VAR}
    env["FASTBP_DISABLE_CPU_FEATURES"] = "AVX"  # the caller's setting is overridden in the child, and named
    r = subprocess.run(
        [sys.executable, "-m", "fastbp", "bench", "--path", "avx2", *_CHEAP, "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "FASTBP_DISABLE_CPU_FEATURES=AVX of your environment overridden" in r.stderr
    assert "SIMD path avx2 (forced at the start of the timing process" in r.stdout
    assert "kernels measured: fastbp avx2" in r.stdout and "PyTorch ATen AVX2" in r.stdout
    data = json.loads(out.read_text())
    k = data["kernels"]
    assert data["simd_path"] == "avx2" and k["fastbp"]["simd"] == "avx2" and k["torch"]["aten"] == "AVX2"
    assert k["numpy"]["blas_core"] in (None, k["env"]["OPENBLAS_CORETYPE"])
    assert not P.numpy_targets_above("avx2", k["numpy"]["dispatch_on"])
    assert [row["key"] for row in data["rows"]] == ["softmax-100x10"]


def test_a_process_not_on_its_path_refuses_to_time():
    env = {k: v for k, v in os.environ.items() if k not in P.STEERING_VARS}
    env[P.CHILD_VAR] = "baseline"  # claims to be the child of --path baseline, but nothing was steered
    r = subprocess.run(
        [sys.executable, "-m", "fastbp.bench", "--path", "baseline", "--no-torch", *_CHEAP],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 3, r.stderr
    assert "--path baseline NOT taken" in r.stderr and "not baseline" in r.stderr
    assert r.stdout == ""


def test_a_path_the_cpu_lacks_is_refused_before_any_child(monkeypatch):
    import io

    def lacks(path, environ=None):
        return P.path_environment(path, {}, "avx2", FLAGS_AVX2, DISPATCH_2)

    monkeypatch.setattr(P, "child_environment", lacks)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no child may start"))
    log = io.StringIO()
    assert P.run_on_path("avx512", ["fastbp.bench"], log=log) == 2
    assert "fastbp: --path avx512: this CPU's best path is avx2 (it lacks avx512f" in log.getvalue()


@pytest.mark.skipif(_cpu_path() == "baseline", reason="this CPU (or build) has no AVX2 path to force")
def test_loops_path_avx2_runs_its_workers_on_avx2(capsys):
    from fastbp.bench import loops

    argv = ["--configs", "default", "--reps", "1", "--rounds", "1", "--seconds", "0.01", "--loops", "ch05"]
    assert loops.main([*argv, "--path", "avx2"]) == 0
    out = capsys.readouterr().out
    assert "SIMD path avx2 (forced" in out and "kernels measured: fastbp avx2" in out and "OpenBLAS Haswell" in out
    assert "| default |" in out
