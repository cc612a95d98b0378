"""The fastbp command line (python -m fastbp ...) and the book-flow examples."""

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastbp
from fastbp import cli
from fastbp import layers as L

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=120, script=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "fastbp"]
    return subprocess.run(
        cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def test_train_short_run_writes_json(tmp_path):
    out = tmp_path / "run.json"
    r = run("train", "--iters", 60, "--hidden", 20, "--source", "sample", "--quiet", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "sample MNIST" in r.stdout and "4000 train / 1000 test" in r.stdout
    assert "final test accuracy" in r.stdout
    assert r.stderr == ""  # not a tty: no progress bar
    d = json.loads(out.read_text())
    assert d["iterations"] == 60 and d["hidden"] == [20] and d["backend"] == "fastbp"
    assert d["data_source"] == "sample" and d["n_train"] == 4000 and d["n_test"] == 1000
    assert d["epoch"] == [1.0, 1.5]  # 40 iterations per epoch, and the end
    assert len(d["test_accuracy"]) == 2 and len(d["train_accuracy"]) == 2
    assert d["final_test_accuracy"] == d["test_accuracy"][-1]
    assert 0.5 < d["final_test_accuracy"] <= 1.0  # 60 SGD steps already learn something
    assert d["train_time_s"] > 0 and d["eval_time_s"] > 0
    assert d["wall_time_s"] >= d["train_time_s"]


def test_train_defaults_reach_90_percent_on_the_sample(tmp_path):
    out = tmp_path / "run.json"
    r = run("train", "--source", "sample", "--quiet", "--no-train-acc", "--json", out)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["hidden"] == [100] and d["optimizer"] == "sgd" and d["lr"] == 0.1 and d["batch_size"] == 100
    assert d["final_test_accuracy"] >= 0.90, r.stdout


def test_train_options_and_reference_backend(tmp_path):
    out = tmp_path / "run.json"
    r = run(
        "train",
        "--epochs",
        1,
        "--hidden",
        "30,20",
        "--optimizer",
        "adam",
        "--dtype",
        "float32",
        "--backend",
        "reference",
        "--weight-decay",
        0.01,
        "--activation",
        "sigmoid",
        "--seed",
        3,
        "--source",
        "sample",
        "-q",
        "--json",
        out,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert (d["hidden"], d["optimizer"], d["lr"], d["dtype"], d["backend"], d["activation"]) == (
        [30, 20],
        "adam",
        0.001,
        "float32",
        "reference",
        "sigmoid",
    )
    assert d["weight_decay"] == 0.01 and d["seed"] == 3 and d["iterations"] == 40
    assert "784-30-20-10 sigmoid" in r.stdout


def test_train_backends_agree(tmp_path):
    acc = {}
    for backend in ("fastbp", "reference"):
        out = tmp_path / f"{backend}.json"
        r = run("train", "--iters", 40, "--hidden", 16, "--backend", backend, "--source", "sample", "-q", "--json", out)
        assert r.returncode == 0, r.stderr
        acc[backend] = json.loads(out.read_text())
    assert acc["fastbp"]["test_accuracy"] == pytest.approx(acc["reference"]["test_accuracy"], abs=2e-3)
    assert acc["fastbp"]["last_epoch_loss"] == pytest.approx(acc["reference"]["last_epoch_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--iters", "5", "--epochs", "1"], "not allowed with"),
        (["--hidden", "10,x"], "hidden sizes"),
        (["--hidden", "0"], "positive"),
        (["--optimizer", "lbfgs"], "invalid choice"),
        (["--lr", "-1"], "> 0"),
        (["--batch-size", "5000", "--source", "sample"], "larger than the training set"),
    ],
)
def test_train_bad_arguments_exit_2(args, message):
    r = run("train", *args)
    assert r.returncode == 2
    assert message in r.stderr


@pytest.mark.skipif(_has_matplotlib(), reason="matplotlib is installed")
def test_train_plot_without_matplotlib_exits_2():
    r = run("train", "--iters", 1, "--plot", "curves.png")
    assert r.returncode == 2
    assert "matplotlib" in r.stderr
    assert not (ROOT / "curves.png").exists()


@pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib is not installed")
def test_train_plot_writes_png(tmp_path):
    png = tmp_path / "curves.png"
    r = run("train", "--iters", 45, "--hidden", 10, "--source", "sample", "-q", "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar():
    buf = io.StringIO()
    bar = cli.ProgressBar(10, enabled=True, stream=buf, width=10)
    bar.update(5, 0.25, force=True)
    assert "[#####.....] 5/10 loss 0.2500" in buf.getvalue()
    bar.clear()
    assert buf.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    bar = cli.ProgressBar(10, enabled=False, stream=quiet)
    bar.update(10, 1.0, force=True)
    bar.clear()
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------------------
def test_gradcheck_command_passes():
    r = run("gradcheck")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in (
        "Affine",
        "Relu",
        "Sigmoid",
        "SoftmaxWithLoss (labels)",
        "SoftmaxWithLoss (one-hot)",
        "MatMul",
        "TwoLayerNet",
        "MultiLayerNet relu + decay",
        "MultiLayerNet sigmoid",
        "Convolution",
        "Pooling",
        "BatchNormalization",
        "Dropout",
        "SimpleConvNet 28x28 digits",
        "DeepConvNet",
        "MultiLayerNetExtend",
    ):
        assert name in r.stdout
    assert "FAIL" not in r.stdout
    assert "72/72 passed" in r.stdout


def test_gradcheck_float32_command_passes():
    r = run("gradcheck", "--dtype", "float32")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "28/28 passed" in r.stdout and "float32 backprop vs float64" in r.stdout
    assert "FAIL" not in r.stdout


def test_float32_cases_catch_a_float32_only_error(monkeypatch):
    """The float32 check compares against float64 numerics, so an error of 1e-3 in the float32 path fails it."""
    real = L.Sigmoid.backward

    def skewed(self, dout):
        dx = real(self, dout)
        return dx * (1.001 if dx.dtype == np.float32 else 1.0)

    monkeypatch.setattr(L.Sigmoid, "backward", skewed)
    rows = cli.run_gradcheck([c for c in cli.float32_cases(0) if c[0] == "Sigmoid"], threshold=1e-4)
    assert rows and rows[0][3] is False and 5e-4 < rows[0][2] < 5e-3


class _WrongRelu(L.Relu):
    """Relu whose backward is twice too large."""

    def backward(self, dout):
        return 2 * super().backward(dout)


class _CrashingLayer(L.Sigmoid):
    def backward(self, dout):
        raise RuntimeError("boom")


def test_gradcheck_table_reports_a_wrong_layer():
    from fastbp.gradient import gradient_check_layer

    x = np.array([[0.5, -1.0, 2.0], [1.5, -0.3, 0.7]])
    cases = [
        ("good Relu", lambda: gradient_check_layer(L.Relu(), x, raise_on_failure=False)),
        ("wrong Relu", lambda: gradient_check_layer(_WrongRelu(), x, raise_on_failure=False)),
        ("crashing", lambda: gradient_check_layer(_CrashingLayer(), x, raise_on_failure=False)),
    ]
    rows = cli.run_gradcheck(cases, threshold=1e-6)
    by_name = {r[0]: r for r in rows}
    assert by_name["good Relu"][3] is True
    assert by_name["wrong Relu"][3] is False and by_name["wrong Relu"][2] > 0.3
    assert by_name["crashing"][3] is False and "boom" in by_name["crashing"][1]
    table = cli.format_gradcheck(rows, 1e-6)
    assert "wrong Relu" in table and "FAIL" in table and "2 FAILED" in table
    assert "1/3 passed" in table


def test_gradcheck_exit_code_is_1_on_failure(monkeypatch, capsys):
    from fastbp.gradient import gradient_check_layer

    x = np.array([[0.5, -1.0, 2.0]])
    monkeypatch.setattr(
        cli,
        "gradcheck_cases",
        lambda seed=0: [("wrong Relu", lambda: gradient_check_layer(_WrongRelu(), x, raise_on_failure=False))],
    )
    assert cli.main(["gradcheck"]) == 1
    assert "FAIL" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# info, usage, plug-in subcommands
# ---------------------------------------------------------------------------------------------------------
def test_info():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert f"fastbp   {fastbp.__version__}" in r.stdout
    assert f"numpy    {np.__version__}" in r.stdout
    assert "OpenMP:" in r.stdout and "compiler:" in r.stdout
    assert "BLAS     fastbp:" in r.stdout and "BLAS     numpy:" in r.stdout
    assert "CPU" in r.stdout and "SIMD" in r.stdout


def test_info_json():
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fastbp"] == fastbp.__version__ and d["numpy"] == np.__version__
    assert isinstance(d["extension"]["openmp"], bool)
    assert {"library", "corename", "reason", "num_threads"} <= set(d["fastbp_blas"])
    from fastbp._blas import cpu_flags

    assert set(d["cpu"]["simd"]) <= cpu_flags()


def test_info_says_how_regions_run_and_which_blas_the_gemms_use():
    # issue 11 item 1: the pool and its spin, and fastbp's own OpenBLAS vs NumPy's (FASTBP_BLAS)
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fastbp_blas"]["blas"] in ("own", "numpy") and d["fastbp_blas"]["blas_reason"]
    if d["extension"]["openmp"]:
        assert d["thread_pool"]["pool"] in ("fastbp", "openmp") and d["thread_pool"]["spin_us"] >= 0
    text = run("info").stdout
    assert "fastbp's GEMMs run on" in text
    if d["extension"]["openmp"] and d["thread_pool"]["pool"] == "fastbp":
        assert f"workers spin {d['thread_pool']['spin_us']:g} us after a region" in text


def test_usage_and_version():
    r = run()
    assert r.returncode == 2 and "train" in r.stdout and "gradcheck" in r.stdout and "info" in r.stdout
    r = run("--version")
    assert r.returncode == 0 and fastbp.__version__ in r.stdout


def test_subcommands_from_other_modules(monkeypatch, capsys, tmp_path):
    mod = types.ModuleType("fastbp_test_plugin")

    def add_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--name", default="book")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 7)

    mod.add_parser = add_parser
    broken = "fastbp_test_broken_plugin"
    (tmp_path / f"{broken}.py").write_text("import fastbp_test_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "fastbp_test_plugin", mod)
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["fastbp_test_plugin", "fastbp_test_absent_module", broken])
    assert cli.main(["hello", "--name", "saito"]) == 7
    assert "hello saito" in capsys.readouterr().out
    assert cli.main(["fastbp_test_broken_plugin"]) == 2
    assert "unavailable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fastbp_test_absent_module"])


# ---------------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------------
def test_example_ch05_train_neuralnet():
    r = run("--iters", 45, "--seed", 0, script=ROOT / "examples" / "ch05_train_neuralnet.py")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("iter")]
    assert [ln.split()[1] for ln in lines] == ["0", "40"]
    assert "final: train acc" in r.stdout


def test_example_ch06_optimizer_compare():
    r = run(
        "--iters", 101, "--seed", 0, "--nesterov", "--rmsprop", script=ROOT / "examples" / "ch06_optimizer_compare.py"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("===========iteration:") == 2
    for name in ("SGD", "Momentum", "AdaGrad", "Adam", "Nesterov", "RMSprop"):
        assert f"{name}:" in r.stdout
    losses = [
        float(ln.split(":")[1])
        for ln in r.stdout.splitlines()
        if ln.split(":")[0] in ("SGD", "Momentum", "AdaGrad", "Adam")
    ]
    assert all(np.isfinite(losses))


def run_here(capsys, *args):
    """(exit code, stdout, stderr) of fastbp.cli.main(args) in this process."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text", ["abc", "99999999999", "0", "-1"])
def test_train_with_a_bad_num_threads_prints_one_line_and_exits_2(text, monkeypatch, capsys):
    monkeypatch.setenv("FASTBP_NUM_THREADS", text)
    code, out, err = run_here(capsys, "train", "--iters", 1, "--source", "sample", "-q")
    assert code == 2
    assert err == f"fastbp: FASTBP_NUM_THREADS must be an integer in 1..1024 (or unset), got {text!r}\n"
    assert "data:" not in out  # before any work


def test_train_with_a_bad_num_threads_in_a_fresh_process():
    env = dict(os.environ, FASTBP_NUM_THREADS="abc")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "fastbp", "train", "--iters", "1", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr == "fastbp: FASTBP_NUM_THREADS must be an integer in 1..1024 (or unset), got 'abc'\n"


# -- issue 7 item 11: bad values and unwritable outputs: one line, exit 2, before any training --------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-1"], "argument --seed: expected an integer in 0..4294967295 (what np.random.seed takes), got -1"),
        (["--seed", "4294967296"], "expected an integer in 0..4294967295 (what np.random.seed takes), got 4294967296"),
        (["--seed", "x"], "expected an integer in 0..4294967295, got 'x'"),
        (["--hidden", "100000000"], "hidden sizes must be at most 65536, got '100000000'"),
        (["--hidden", ",".join(["65536"] * 8)], "training this network takes about"),  # about 1.1 TB
        (["--json", "{tmp}"], "--json {tmp}: is a directory"),
        (["--json", "{tmp}/no/such/dir/run.json"], "--json {tmp}/no/such/dir/run.json: cannot write there"),
        (["--json", "{file}/run.json"], "cannot write there"),
        (["--plot", "{tmp}/no/such/dir/c.png"], "--plot {tmp}/no/such/dir/c.png: cannot write there"),
        (["--plot", "{tmp}/curves.xyz"], "the file name must end in one of"),
        (["--plot", "{tmp}/c.png", "--json", "{tmp}"], "--json {tmp}: is a directory"),
    ],
)
def test_train_bad_values_and_paths_one_line_exit_2_before_training(tmp_path, capsys, args, message):
    if "--plot" in args and not _has_matplotlib():
        pytest.skip("matplotlib is not installed")
    f = tmp_path / "a_file"
    f.write_text("x")
    fill = dict(tmp=tmp_path, file=f)
    code, out, err = run_here(
        capsys, "train", "--iters", 1, "--source", "sample", "-q", *[a.format(**fill) for a in args]
    )
    assert code == 2, err
    assert message.format(**fill) in err
    assert len(err.splitlines()) == 1, err
    assert out == ""  # nothing loaded, nothing trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # and nothing left behind


def test_train_output_check_keeps_an_existing_file_until_the_run_overwrites_it(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.write_text("old")
    code, _, err = run_here(
        capsys, "train", "--iters", 3, "--hidden", 10, "--source", "sample", "-q", "--json", out, "--lr", "1e308"
    )  # diverges at once
    assert code == 1 and "diverged" in err
    assert out.read_text() == "old"  # the check opened it for appending, no more
