"""The book-loop bench (python -m fastbp.bench.loops): how the two sides are timed."""

import json
import subprocess

import pytest

from fastbp.bench import loops


def test_pair_ratio_is_median_book_batch_over_median_fastbp_batch():
    assert loops.pair_ratio([3.0, 9.0, 6.0], [2.0, 1.0, 3.0]) == pytest.approx(3.0)


def test_worker_with_a_side_times_only_that_side():
    book = loops.worker(2, 0.005, ["ch05"], side="book")
    assert set(book["ch05"]) == {"book_s"} and len(book["ch05"]["book_s"]) == 2
    fast = loops.worker(2, 0.005, ["ch05"], side="fastbp")
    assert set(fast["ch05"]) == {"fastbp_s", "regions"} and len(fast["ch05"]["fastbp_s"]) == 2
    both = loops.worker(2, 0.005, ["ch05"])
    assert set(both["ch05"]) == {"fastbp_s", "book_s", "regions", "ratio"} and len(both["ch05"]["ratio"]) == 2


def _fake_run(calls):
    """subprocess.run stand-in: a worker that reports book batches of 6 s and fastbp batches of 2 s."""

    def run(cmd, **kw):
        side = cmd[cmd.index("--side") + 1] if "--side" in cmd else None
        calls.append(side)
        out = {"_runtime": {}, "_kernels": {}}
        loop = {}
        if side in (None, "book"):
            loop["book_s"] = [6.0, 6.0]
        if side in (None, "fastbp"):
            loop["fastbp_s"] = [2.0, 2.0]
            loop["regions"] = [3.0]
        if side is None:
            loop["ratio"] = [3.0, 3.0]
        out["ch05"] = loop
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(out) + "\n", stderr="")

    return run


def test_separate_mode_runs_one_process_per_side_alternating_which_goes_first(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls))
    res = loops.drive(["default"], 3, 2, 0.01, ["ch05"], log=None, mode="separate")
    assert calls == ["book", "fastbp", "fastbp", "book", "book", "fastbp"]
    v = res["default"]["ch05"]
    assert v["ratio"] == [3.0, 3.0, 3.0]  # one ratio per pair of processes
    assert len(v["book_s"]) == 6 and len(v["fastbp_s"]) == 6 and v["regions"] == [3.0] * 3
    assert res["default"]["_mode"] == "separate"


def test_same_process_mode_runs_one_process_timing_both(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls))
    res = loops.drive(["default"], 2, 2, 0.01, ["ch05"], log=None, mode="same-process")
    assert calls == [None, None]
    assert res["default"]["ch05"]["ratio"] == [3.0] * 4 and res["default"]["_mode"] == "same-process"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        loops.drive(["default"], 1, 1, 0.01, ["ch05"], log=None, mode="both")
