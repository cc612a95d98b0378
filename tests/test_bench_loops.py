"""The book-loop bench (python -m fastbp.bench.loops): how the two sides are timed."""

import json
import subprocess
import sys

import pytest

from fastbp.bench import loops


def test_serve_answers_each_request_with_one_line():
    import io

    reqs = [
        {"calibrate": "ch05", "seconds": 0.002},
        {"time": "ch05", "number": 3},
        {"regions": "ch05"},
        {"info": True},
    ]
    out = io.StringIO()
    loops.serve("fastbp", ["ch05"], inp=io.StringIO("".join(json.dumps(r) + "\n" for r in reqs)), out=out)
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(replies) == 4
    assert replies[0]["number"] >= 1 and replies[1]["s"] > 0 and replies[2]["regions"] >= 0
    assert set(replies[3]) == {"_runtime", "_kernels"}


def test_separate_mode_times_both_sides_in_two_live_processes_taking_turns():
    res = loops.drive(["default"], 1, 2, 0.005, ["ch05"], log=None, mode="separate", gap=0.0)
    v = res["default"]["ch05"]
    assert len(v["fastbp_s"]) == len(v["book_s"]) == len(v["ratio"]) == 2
    assert v["ratio"] == pytest.approx([b / f for b, f in zip(v["book_s"], v["fastbp_s"])])
    assert v["regions"][0] >= 0 and res["default"]["_mode"] == "separate"


def _fake_run(calls):
    """subprocess.run stand-in: a same-process worker reporting book batches of 6 s and fastbp batches of 2 s."""

    def run(cmd, **kw):
        calls.append(cmd)
        i = len(calls)  # the worker's own per-round ratios, distinct per call: the driver must keep them as they are
        loop = {"book_s": [6.0, 6.0], "fastbp_s": [2.0, 2.0], "regions": [3.0], "ratio": [10.0 * i, 10.0 * i + 1]}
        out = {"_runtime": {}, "_kernels": {}, "ch05": loop}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(out) + "\n", stderr="")

    return run


def test_same_process_mode_runs_one_process_timing_both(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls))
    res = loops.drive(["default"], 2, 2, 0.01, ["ch05"], log=None, mode="same-process")
    assert len(calls) == 2 and all("--worker" in c for c in calls)
    assert res["default"]["ch05"]["ratio"] == [10.0, 11.0, 20.0, 21.0] and res["default"]["_mode"] == "same-process"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        loops.drive(["default"], 1, 1, 0.01, ["ch05"], log=None, mode="both")


def test_separate_mode_names_a_worker_that_dies_and_leaves_no_child_behind():
    import os

    with pytest.raises(RuntimeError, match=r"config default: (book|fastbp) worker \(exit 2\)"):
        loops.drive(["default"], 1, 1, 0.005, ["no-such-loop"], log=None, mode="separate", gap=0.0)
    with pytest.raises(ChildProcessError):  # every worker was waited for
        os.waitpid(-1, os.WNOHANG)


def test_separate_mode_kills_a_silent_worker_after_its_timeout(monkeypatch):
    import os

    real_popen = subprocess.Popen

    def silent(cmd, **kw):  # a worker that never answers
        return real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw)

    monkeypatch.setattr(subprocess, "Popen", silent)
    with pytest.raises(RuntimeError, match=r"(book|fastbp) worker \(exit -9\)"):
        loops._served_pair(dict(os.environ), 1, 0.005, ["ch05"], 0.0, "book", timeout=0.5)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
