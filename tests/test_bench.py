"""Smoke tests of fastbp.bench's machinery at tiny sizes: interleaving, ratios, targets, table, JSON, the
allocation probe, the book transcription, and the command line end to end (one tiny case)."""

import argparse
import io
import json
import math
import re

import numpy as np
import pytest

from fastbp import bench

TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


# ---------------------------------------------------------------------------------------------------------
# interleaving and ratios
# ---------------------------------------------------------------------------------------------------------
def test_interleave_rotates_order_sleeps_and_warms_up():
    events = []
    impls = {name: (lambda name=name: events.append(name)) for name in ("fastbp", "numpy", "torch")}
    sleeps = []
    times, orders = bench.interleave(
        impls,
        rounds=4,
        numbers={"fastbp": 3, "numpy": 2, "torch": 1},
        gap=0.5,
        warm_calls={"fastbp": 2, "numpy": 1, "torch": 0},
        sleep=sleeps.append,
    )
    assert orders == [
        ["fastbp", "numpy", "torch"],
        ["numpy", "torch", "fastbp"],
        ["torch", "fastbp", "numpy"],
        ["fastbp", "numpy", "torch"],
    ]
    assert sleeps == [0.5] * 12  # one idle gap before every timed batch
    assert {k: len(v) for k, v in times.items()} == {"fastbp": 4, "numpy": 4, "torch": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    # per round and implementation: warm-up calls then the timed batch, back to back
    expected = []
    for order in orders:
        for name in order:
            expected += [name] * (
                {"fastbp": 2, "numpy": 1, "torch": 0}[name] + {"fastbp": 3, "numpy": 2, "torch": 1}[name]
            )
    assert events == expected


def test_interleave_without_gap_never_sleeps():
    sleeps = []
    bench.interleave({"fastbp": lambda: None}, rounds=3, numbers={"fastbp": 1}, gap=0, sleep=sleeps.append)
    assert sleeps == []


def test_summarize_takes_the_median_of_per_round_ratios():
    # ratio of medians would be 4/2 = 2; the per-round ratios are 1, 3, 10 -> median 3
    times = {"fastbp": [1.0, 2.0, 0.5], "numpy": [1.0, 6.0, 5.0]}
    s = bench.summarize(times)
    assert s["median_s"] == {"fastbp": 1.0, "numpy": 5.0}
    assert s["speedup_per_round"]["numpy"] == [1.0, 3.0, 10.0]
    assert s["speedup"]["numpy"] == 3.0
    assert "fastbp" not in s["speedup"]


def test_summarize_without_base_has_no_speedups():
    s = bench.summarize({"numpy": [1.0, 2.0]})
    assert s["speedup"] == {} and s["median_s"] == {"numpy": 1.5}


def test_calibrate_sizes_a_batch_to_the_requested_time():
    calls = []
    number, per_call = bench.calibrate(lambda: calls.append(1), batch_time=0.002)
    assert number >= 1 and per_call > 0
    assert number * per_call == pytest.approx(0.002, rel=0.6) or number == 100000


# ---------------------------------------------------------------------------------------------------------
# targets and table
# ---------------------------------------------------------------------------------------------------------
def _row(**kw):
    row = {
        "key": "k",
        "title": "a row",
        "median_s": {"fastbp": 1e-4, "numpy": 3.5e-4},
        "speedup": {"numpy": 3.5},
        "targets": [],
    }
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "target, row, value, result",
    [
        (bench.Target("speedup", 3.0, "numpy"), _row(), 3.5, "PASS"),
        (bench.Target("speedup", 4.0, "numpy"), _row(), 3.5, "MISS"),
        (bench.Target("speedup", 3.0, "torch"), _row(), None, "SKIP"),  # torch not installed
        (bench.Target("floor", 1.4), _row(floor_ratio=1.2), 1.2, "PASS"),
        (bench.Target("floor", 1.4), _row(floor_ratio=1.6), 1.6, "MISS"),
        (bench.Target("gemms", 1.3), _row(gemm_only_ratio=1.25), 1.25, "PASS"),
        (bench.Target("gemms", 1.3), _row(gemm_only_ratio=1.5), 1.5, "MISS"),
        (bench.Target("gemms", 1.3), _row(), None, "SKIP"),  # no GEMM-only timing in the row
        (bench.Target("layers", 1.3), _row(layers_ratio=1.1, gemm_only_ratio=2.0), 1.1, "PASS"),
        (bench.Target("layers", 1.3), _row(layers_ratio=1.4, gemm_only_ratio=1.0), 1.4, "MISS"),
        (bench.Target("layers", 1.3), _row(gemm_only_ratio=1.0), None, "SKIP"),  # the step not timed in parts
        (bench.Target("alloc", 0), {"bytes_per_step": 0.0}, 0.0, "PASS"),
        (bench.Target("alloc", 0), {"bytes_per_step": 800.0}, 800.0, "MISS"),
    ],
)
def test_target_evaluation(target, row, value, result):
    assert target.evaluate(row) == (value, result)


def test_issue_11_targets_are_in_the_case_table():
    specs = dict(bench.build_cases(None, ["train-mlp", "softmax-4096x1000", "book-2l", "train-2l-b100"]))
    texts = {key: [t.describe() for t in build().targets] for key, build in specs.items()}
    assert texts["train-mlp-b256-f32"] == ["<=1.3x GEMM floor"]
    assert ">=1x torch" in texts["softmax-4096x1000"]
    assert texts["train-2l-b100-f32"] == [">=3x numpy", ">=3x torch"]
    assert texts["train-2l-b100-f64"] == [">=2.5x numpy"]
    assert texts["book-2l-b100"] == [">=1x numpy", "<=1.3x its GEMMs", "layers <=1.3x its GEMMs"]
    mlp = dict(bench.build_cases(None, ["book-mlp"]))
    assert set(mlp) == {"book-mlp-b128", "book-mlp-b128-fbadam"}  # layers only, and layers + optimizer swapped
    for key in mlp:
        assert [t.describe() for t in mlp[key]().targets] == [
            ">=1x numpy",
            "<=1.3x its GEMMs",
            "layers <=1.3x its GEMMs",
        ]


def test_step_parts_are_medians_of_per_round_ratios_to_the_gemms():
    from fastbp.bench.report import step_parts

    times = {"gemm-only": [1.0, 2.0, 4.0], "layers": [1.5, 2.0, 4.8], "update": [0.5, 0.2, 4.0], "fastbp": [3, 3, 3]}
    parts = step_parts(times)
    assert parts["layers_ratio"] == pytest.approx(1.2)  # per round 1.5, 1.0, 1.2
    assert parts["update_ratio"] == pytest.approx(0.5)  # per round 0.5, 0.1, 1.0
    assert step_parts({"gemm-only": [1.0], "fastbp": [2.0]}) == {}


@pytest.mark.parametrize("key", ["book-2l-b100", "book-mlp-b128", "book-mlp-b128-fbadam"])
def test_book_rows_time_the_layers_and_the_update_and_the_update_moves_only_its_copies(key):
    case = dict(bench.build_cases(None, [key]))[key]()
    assert list(case.impls)[:2] == ["fastbp", "numpy"]
    assert {"layers", "update", "gemm-only"} <= set(case.impls)
    fnet = case.extra["nets"][0]
    before = {k: v.copy() for k, v in fnet.params.items()}
    update = case.impls["update"]
    copies = {k: v.copy() for k, v in update.params.items()}
    update()
    for k, v in fnet.params.items():
        np.testing.assert_array_equal(v, before[k])
        assert not np.shares_memory(v, update.params[k])
    assert any(not np.array_equal(update.params[k], copies[k]) for k in copies)  # it did update its copies
    # the layers part makes the same layer calls, in the same order, as the book's gradient()
    last_name = "last_layer" if hasattr(fnet, "last_layer") else "lastLayer"
    watched = {**fnet.layers, "last": getattr(fnet, last_name)}
    calls = []
    for name, layer in watched.items():
        for meth in ("forward", "backward"):
            f = getattr(layer, meth)
            setattr(layer, meth, lambda *a, _f=f, _n=f"{name}.{meth}", **k: (calls.append(_n), _f(*a, **k))[1])
    run = case.impls["layers"]
    env = dict(zip(run.__code__.co_freevars, (c.cell_contents for c in run.__closure__)))
    x, t = env["x"], env["t"]
    fnet.gradient(x, t)
    by_gradient, calls[:] = list(calls), []
    case.impls["layers"]()
    assert calls == by_gradient and "last.forward" in calls and "last.backward" in calls
    assert calls[-1] == f"{next(iter(fnet.layers))}.backward"


def test_gemm_only_step_counts_the_first_layers_dx_only_when_asked(monkeypatch):
    from fastbp import _kernels
    from fastbp.bench import cases

    sizes, batch = (7, 5, 3), 4
    fl = cases.step_gemm_flops(batch, sizes)
    assert fl == 2 * (2 * batch * (7 * 5 + 5 * 3)) + 2 * batch * 5 * 3
    assert cases.step_gemm_flops(batch, sizes, first_dx=True) == fl + 2 * batch * 7 * 5
    calls = []
    real = _kernels.gemm
    monkeypatch.setattr(_kernels, "gemm", lambda a, b, out, **kw: calls.append(out.shape) or real(a, b, out, **kw))
    cases.gemm_only_step(sizes, batch, np.float64)()
    n_skip = len(calls)
    calls.clear()
    cases.gemm_only_step(sizes, batch, np.float64, first_dx=True)()
    assert n_skip == 5 and len(calls) == 6 and (batch, 7) in calls


def test_target_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown target kind 'fast'"):
        bench.Target("fast", 1.0)


def test_evaluate_targets_combines_results():
    row = bench.evaluate_targets(
        _row(targets=[bench.Target("speedup", 3.0, "numpy"), bench.Target("speedup", 3.0, "torch")])
    )
    assert [t["result"] for t in row["target_results"]] == ["PASS", "SKIP"]
    assert row["result"] == "PASS"
    row = bench.evaluate_targets(_row(targets=[bench.Target("speedup", 9.0, "numpy")]))
    assert row["result"] == "MISS"
    row = bench.evaluate_targets(_row(targets=[bench.Target("speedup", 2.0, "numpy")], error="boom"))
    assert row["result"] == "ERROR"


def test_format_table_shows_times_ratios_targets_and_missing_torch():
    rows = [
        bench.evaluate_targets(
            _row(
                title="train step X",
                flops=2e6,
                gflops={"fastbp": 20.0},
                targets=[bench.Target("speedup", 3.0, "numpy"), bench.Target("speedup", 3.0, "torch")],
            )
        ),
        bench.evaluate_targets(
            _row(
                title="softmax Y",
                median_s={"fastbp": 2e-3, "numpy": 3e-3},
                speedup={"numpy": 1.5},
                targets=[bench.Target("speedup", 4.0, "numpy")],
                other_processes_cpu_fraction=0.5,
            )
        ),
    ]
    text = bench.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["case", "fastbp", "numpy", "torch"]
    assert "target" in lines[0] and "result" in lines[0]
    assert len(lines) == 4
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    # no torch: its time and ratio are "-"; the row measured while the machine was busy is starred
    assert cells[0] == ["train step X", "100 us", "350 us", "-", "3.50x", "-", "20.0", ">=3x numpy, >=3x torch", "PASS"]
    assert cells[1] == ["softmax Y *", "2 ms", "3 ms", "-", "1.50x", "-", "-", ">=4x numpy", "MISS"]


def test_fmt_time_units():
    assert bench.fmt_time(1.5e-6) == "1.5 us"
    assert bench.fmt_time(2.346e-3) == "2.35 ms"
    assert bench.fmt_time(250e-6) == "250 us"
    assert bench.fmt_time(3.0) == "3 s"
    assert bench.fmt_time(float("nan")) == "-"


def test_step_gemm_flops_counts_forward_dw_and_dx_but_the_first():
    # 784-50-10 at batch 100: forward 2*100*(784*50 + 50*10), the same for dW, dx only for layer 2
    fwd = 2 * 100 * (784 * 50 + 50 * 10)
    assert bench.step_gemm_flops(100, (784, 50, 10)) == 2 * fwd + 2 * 100 * 50 * 10
    assert bench.step_gemm_flops(1, (3, 2)) == 2 * (2 * 3 * 2)


# ---------------------------------------------------------------------------------------------------------
# NumPy allocation probe
# ---------------------------------------------------------------------------------------------------------
def test_alloc_probe_sees_temporaries_and_not_in_place_work():
    a = np.ones(1000)
    out = np.empty(1000)

    def temporary():
        np.add(a, 1.0).sum()  # an 8000-byte temporary, freed before the function returns

    def in_place():
        np.add(a, 1.0, out=out)

    res = bench.numpy_alloc_per_call(temporary, calls=4, warmup=1)
    assert res["bytes_per_call"] >= 8000 and res["numpy_high_water"] >= 8000
    assert res["traced_peak_per_call"] >= 8000
    res = bench.numpy_alloc_per_call(in_place, calls=4, warmup=1)
    assert res["bytes_per_call"] == 0 and res["numpy_high_water"] == 0
    assert res["traced_peak_per_call"] < 8000


def test_alloc_probe_leaves_tracing_and_profiling_as_they_were():
    import sys
    import tracemalloc

    assert not tracemalloc.is_tracing()
    bench.numpy_alloc_per_call(lambda: np.zeros(10), calls=2, warmup=0)
    assert not tracemalloc.is_tracing() and sys.getprofile() is None


# ---------------------------------------------------------------------------------------------------------
# the book's code, transcribed
# ---------------------------------------------------------------------------------------------------------
def test_book_layers_match_the_reference_layers():
    from fastbp import reference as R

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7))
    t = rng.integers(0, 7, 5)
    book, ref = bench.BookLayers.SoftmaxWithLoss(), R.SoftmaxWithLoss()
    assert book.forward(x, t) == pytest.approx(ref.forward(x, t), abs=1e-6)  # book adds 1e-7 in the log
    np.testing.assert_allclose(book.backward(), ref.backward(), **TOL[np.float64])
    relu = bench.BookLayers.Relu()
    np.testing.assert_array_equal(relu.forward(x), np.maximum(x, 0))
    dout = rng.standard_normal(x.shape)
    dx = relu.backward(dout)
    assert dx is dout  # the book zeroes dout in place and returns it
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0) + 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_book_two_layer_net_with_fastbp_layers_matches_book_layers(dtype):
    from fastbp import layers

    np.random.seed(0)
    a = bench.BookTwoLayerNet(12, 6, 4, weight_init_std=0.5, layers=layers)
    b = bench.BookTwoLayerNet(12, 6, 4, weight_init_std=0.5, layers=bench.BookLayers)
    for k in a.params:
        b.params[k][...] = a.params[k]
    x = np.random.rand(5, 12).astype(dtype)  # float32 images with float64 weights, like the book
    t = np.eye(4)[[0, 1, 2, 3, 1]]
    ga = {k: np.array(v) for k, v in a.gradient(x, t).items()}
    gb = b.gradient(x, t)
    for k in gb:
        np.testing.assert_allclose(ga[k], gb[k], **TOL[np.float64])
    bench.book_train_step(a, x, t, 0.1)
    bench.book_train_step(b, x, t, 0.1)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], **TOL[np.float64])


# ---------------------------------------------------------------------------------------------------------
# cases and the command line
# ---------------------------------------------------------------------------------------------------------
def test_train_case_checks_equal_gradients_and_steps_run():
    case = bench.train_case("t", "tiny", (20, 8, 3), 4, np.float32, None, [])
    assert list(case.impls) == ["fastbp", "numpy"]
    assert case.check().startswith("grads fastbp~numpy")
    for fn in case.impls.values():
        fn()
    assert case.flops == bench.step_gemm_flops(4, (20, 8, 3))


def test_case_check_failure_is_reported_not_timed():
    def bad():
        raise AssertionError("fastbp W1 vs numpy: differ")

    case = bench.Case("bad", "bad row", {"fastbp": lambda: None, "numpy": lambda: None}, bad)
    row = bench.measure_case(case, rounds=2, gap=0)
    assert row["error"] == "fastbp W1 vs numpy: differ"
    assert "median_s" not in row


def _run_cli(tmp_path, *extra):
    path = tmp_path / "out.json"
    argv = [
        "--rounds",
        "2",
        "--cases",
        "softmax-100x10",
        "--peak-size",
        "64",
        "--gap",
        "0",
        "--no-probe",
        "--json",
        str(path),
        "-q",
        *extra,
    ]
    return path, argv


def test_main_runs_one_tiny_case_and_writes_json(tmp_path, capsys):
    path, argv = _run_cli(tmp_path, "--no-torch")
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "softmax-CE fwd+bwd (100, 10) f32" in out
    assert "GEMM peak 64^3" in out and "targets:" in out and "wall time" in out
    assert "torch not installed" in out or "torch columns skipped" in out
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    (row,) = data["rows"]
    assert row["key"] == "softmax-100x10"
    assert row["impls"] == ["fastbp", "numpy"]
    assert len(row["times_s"]["fastbp"]) == len(row["times_s"]["numpy"]) == 2
    assert row["speedup"]["numpy"] == pytest.approx(float(np.median(row["speedup_per_round"]["numpy"])))
    assert row["speedup_per_round"]["numpy"] == pytest.approx(
        [n / f for n, f in zip(row["times_s"]["numpy"], row["times_s"]["fastbp"])]
    )
    assert row["target_results"][0]["text"] == ">=4x numpy"
    assert row["target_results"][0]["result"] in ("PASS", "MISS")
    assert row["check"].startswith("dx fastbp~numpy")
    assert data["settings"]["rounds"] == 2 and data["gemm_peak"]["size"] == 64
    assert data["machine"]["fastbp_blas"]["threads"] >= 1
    assert data["alloc"] == []


def test_main_includes_torch_when_installed(tmp_path, capsys):
    pytest.importorskip("torch")
    path, argv = _run_cli(tmp_path)
    assert bench.main(argv) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["impls"] == ["fastbp", "numpy", "torch"] and "torch" in row["speedup"]
    assert "torch" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main(["--plot", str(tmp_path / "p.png"), "--cases", "softmax-100x10"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_unknown_case_word_is_rejected(capsys):
    assert bench.main(["--cases", "nosuchrow"]) == 2
    assert "matches no row" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "expected a positive integer, got 0"),
        (["--gap", "-1"], "expected a finite number >= 0, got -1"),
        (["--peak-size", "x"], "expected a size >= 0"),
    ],
)
def test_bad_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_cli_registers_the_bench_subcommand():
    cli = pytest.importorskip("fastbp.cli")
    args = cli.build_parser().parse_args(["bench", "--quick", "--rounds", "3"])
    assert args.func is bench.cmd_bench and args.quick and args.rounds == 3


def test_run_reports_a_failed_check_as_error(monkeypatch, tmp_path):
    def broken(*a, **k):
        return bench.Case(
            "softmax-100x10",
            "broken row",
            {"fastbp": lambda: None, "numpy": lambda: None},
            lambda: (_ for _ in ()).throw(AssertionError("dx differs")),
        )

    monkeypatch.setattr(bench.cases, "softmax_case", broken)
    args = argparse.Namespace(
        quick=True,
        rounds=1,
        gap=0.0,
        json=None,
        plot=None,
        sweep=False,
        cases=["softmax-100x10"],
        peak_size=0,
        no_torch=True,
        no_probe=True,
        no_alloc=True,
        quiet=True,
    )
    out = io.StringIO()
    res = bench.run(args, out=out)
    assert res["rows"][0]["error"] == "dx differs"
    assert "ERROR: FAILED: dx differs" in out.getvalue()
    assert math.isfinite(res["wall_time_s"])


def test_gemm_only_other_route_switches_the_blas_route_for_its_call_only():
    from fastbp import _blas, _gemm
    from fastbp.bench import cases

    seen = []
    other = cases._gemm_only_other_route(lambda: seen.append(_gemm._get_blas_threaded_min()))
    before = _gemm._get_blas_threaded_min()
    if _blas.info()["threading"] != "split" or _gemm._get_gemm_threads() < 2:
        assert other is None  # the route cannot be taken: nothing to compare
        return
    name, fn = other
    fn()
    if before:
        assert name == "gemm-only-pieces" and seen == [0.0]
    else:
        assert name == "gemm-only-routed" and seen == [float(_blas.BLAS_THREADED_SUGGESTED)]
    assert _gemm._get_blas_threaded_min() == before


def test_book_mlp_row_with_fastbp_adam_checks_gradients_and_updates():
    from fastbp import optimizer
    from fastbp.bench.book import BookAdam
    from fastbp.bench.cases import book_mlp_case, check_adam_updates

    case = book_mlp_case(8, hidden=(6, 5), optimizer="fastbp")
    assert case.key == "book-mlp-b128-fbadam" and "fastbp Adam" in case.title
    text = case.check()
    assert "grads fastbp~book" in text and "Adam updates fastbp~book" in text
    fnet, bnet = case.extra["nets"]
    before = {k: v.copy() for k, v in fnet.params.items()}
    for _ in range(2):  # the timed steps move both nets' weights alike
        case.impls["fastbp"]()
        case.impls["numpy"]()
    for k in fnet.params:
        assert not np.array_equal(fnet.params[k], before[k])
        np.testing.assert_allclose(fnet.params[k], bnet.params[k], rtol=1e-9, atol=1e-12)
    grads = {"W": np.random.default_rng(0).standard_normal((4, 3)), "b": np.linspace(-1, 1, 3)}
    assert check_adam_updates(optimizer.Adam(0.01), BookAdam(0.01), grads) < 1e-12
    with pytest.raises(AssertionError, match="Adam update"):
        check_adam_updates(optimizer.Adam(0.02), BookAdam(0.01), grads)  # a different update is caught
    with pytest.raises(ValueError, match="optimizer"):
        book_mlp_case(8, hidden=(6,), optimizer="sgd")


def test_bound_note_names_numpy_step_over_fastbp_gemms_only_for_vs_numpy_rows():
    from fastbp.bench.cases import Target
    from fastbp.bench.report import _bound_note

    row = {"targets": [Target("speedup", 3.0, "numpy")], "numpy_over_gemms": 4.25}
    assert "numpy step / fastbp's GEMMs alone = 4.25x" in _bound_note(row)
    assert _bound_note({"targets": [Target("floor", 1.3)], "numpy_over_gemms": 4.25}) == ""
    assert _bound_note({"targets": [Target("speedup", 3.0, "numpy")]}) == ""


def test_miss_reason_says_whether_these_gemms_allow_a_missed_vs_numpy_target():
    from fastbp.bench.cases import Target
    from fastbp.bench.report import _miss_reason, evaluate_targets

    def result(row):
        return evaluate_targets(row)["target_results"][0]

    def missed(target, speedup, bound, cost):
        row = {"targets": [Target("speedup", target, "numpy")], "speedup": {"numpy": speedup}}
        row.update(numpy_over_gemms=bound, gemm_only_ratio=cost)
        res = result(row)
        assert res["result"] == "MISS"
        return _miss_reason(row, res)

    # the bound (numpy step / fastbp's GEMMs alone) below the target: no step on these GEMMs could reach it
    text = missed(2.5, 2.10, 2.35, 1.11)
    assert "out of reach in this run" in text and "= 2.35x, below 2.5x" in text
    assert "out of reach" in missed(2.5, 2.10, 2.35, float("nan")), "the cost is not needed for this verdict"
    # the bound at or above it: the step's allowed cost over its GEMMs (3.15 / 3 = 1.05x) against what it cost
    assert missed(3.0, 2.67, 3.15, 1.18) == "; to reach 3x the step may cost at most 1.05x its GEMMs; it cost 1.18x"
    assert missed(3.0, 2.90, 3.0, 1.10) == "; to reach 3x the step may cost at most 1.00x its GEMMs; it cost 1.10x"
    # each figure is its own median: a cost within the allowed one says the miss is in the rounds' spread
    text = missed(3.0, 2.95, 3.30, 1.08)
    assert "within the 1.10x that 3x allows" in text and "spread of the rounds" in text
    # nothing to say for a pass, a target against another library, a row without its GEMMs, a non-finite bound,
    # or a reachable target whose cost is not known
    assert missed(3.0, 2.0, float("nan"), 1.1) == "" and missed(3.0, 2.0, float("inf"), 1.1) == ""
    assert missed(3.0, 2.67, 3.15, float("nan")) == "" and missed(3.0, 2.67, 3.15, None) == ""
    row = {"targets": [Target("speedup", 3.0, "numpy")], "speedup": {"numpy": 3.2}}
    row.update(numpy_over_gemms=3.15, gemm_only_ratio=1.18)
    assert result(row)["result"] == "PASS" and _miss_reason(row, result(row)) == ""
    torch_row = dict(row, targets=[Target("speedup", 3.0, "torch")], speedup={"torch": 2.0})
    assert result(torch_row)["result"] == "MISS" and _miss_reason(torch_row, result(torch_row)) == ""
    bare = {"targets": [Target("speedup", 3.0, "numpy")], "speedup": {"numpy": 2.0}}
    assert result(bare)["result"] == "MISS" and _miss_reason(bare, result(bare)) == ""


def test_best_peak_takes_each_rate_from_the_better_measurement_and_keeps_both():
    from fastbp.bench.report import best_peak

    before = dict(fastbp_sgemm_gflops=140.0, numpy_sgemm_gflops=150.0, fastbp_dgemm_gflops=80.0)
    before.update(numpy_dgemm_gflops=90.0, size=64, best_sgemm_gflops=150.0, best_dgemm_gflops=90.0)
    after = dict(before, fastbp_sgemm_gflops=210.0, best_sgemm_gflops=210.0, numpy_dgemm_gflops=70.0)
    p = best_peak(before, after)
    assert p["best_sgemm_gflops"] == 210.0 and p["fastbp_sgemm_gflops"] == 210.0
    assert p["numpy_dgemm_gflops"] == 90.0 and p["best_dgemm_gflops"] == 90.0 and p["size"] == 64
    assert p["measurements"] == [before, after]
