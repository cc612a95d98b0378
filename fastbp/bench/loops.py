"""The book's own training loops with fastbp's layers dropped in, against the untouched book (issue 11 item 1),
and the process-wide settings that decide whether fastbp's threads fight NumPy's code between its calls.

Loops (one iteration each: the book's batch draw with np.random.choice and fancy indexing, the gradient, the
update -- no idle gap within a batch, as in the book's scripts):

* ``ch05``: the book's ch05 TwoLayerNet 784-50-10 (float64 weights, float32 images, one-hot labels), batch 100,
  the book's NumPy SGD update ``params[key] -= lr * grad[key]``; fastbp = the same code on ``fastbp.layers``.
* ``ch06``: the book's MultiLayerNet 784-100-100-100-100-10 with the book's NumPy ``Adam``, batch 128 (ch06's
  optimizer_compare_mnist); fastbp = the same code on ``fastbp.layers``.
* ``own``: fastbp's own ``nets.TwoLayerNet`` float32 with ``fastbp.optimizer.SGD`` inside the book's loop (the
  batch draw and indexing in NumPy between steps), against the book's ch05 loop: the standalone gain, in a loop.

Settings ("configs") are process-wide (read when libgomp loads), so each runs in its own subprocess; the driver
runs the configs one after the other in every repetition (interleaved).

How the two sides are timed (``--mode``):

* ``separate`` (the default): as a reader runs them, one side per process -- the book's script in one, the same
  script with the import swapped in the other -- so the book's NumPy layers (and NumPy's OpenBLAS threads) are
  never in fastbp's process, nor fastbp's layers and pool in the book's (that process builds the book's side
  only; it does import fastbp, whose OpenBLAS copy then sits idle there).  Every repetition starts a book and a fastbp
  process that stay alive together and take turns, one batch of about ``--seconds`` each per round (which goes
  first alternates), with an idle gap of 0.15 s before every batch so that the other process's threads have
  settled (NumPy's OpenBLAS workers spin about 0.1 s after a call).  The figure per (config, loop) is the median
  over all rounds of book time / fastbp time of the same round, with its quartiles.
* ``same-process``: both sides in one process, in interleaved rounds (book batch, fastbp batch, ...): a script
  that mixes NumPy's GEMMs with fastbp's; the figure is the median over all rounds of book time / fastbp time
  of the same round.  Measured on the 2-core EPYC VM this mode reads lower and far noisier than ``separate``
  (the two libraries' thread pools meet in one process), which is not what a reader who swapped the import runs.

    python -m fastbp.bench.loops --reps 3            # every config
    python -m fastbp.bench.loops --configs default passive --reps 5
    python -m fastbp.bench.loops --configs default --path avx2   # every library on AVX2 (see bench.paths)

``--path`` puts every worker subprocess -- fastbp, NumPy's OpenBLAS and SIMD dispatch -- on one SIMD path by the
rule of :func:`fastbp.bench.paths.path_environment` (on top of the config's settings); each worker checks the
kernels it really runs and refuses to time otherwise, and the report names them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from fastbp.bench.harness import DEFAULT_GAP
from fastbp.bench.simdpath import PATHS, format_kernels

#: Process settings measured: environment of the worker subprocess (none of them is NumPy's).
_OMP = {"FASTBP_THREAD_POOL": "openmp"}  # regions as OpenMP regions (libgomp's team and spin) instead of the pool
MODES = ("separate", "same-process")  # how the two sides are timed, see the module docstring
CONFIGS = {
    "default": {},  # whatever fastbp does by itself
    # fastbp's worker pool (the default): how long a worker spins after a region, which products wake a sleeper
    "pool-spin0": {"FASTBP_SPIN_US": "0"},
    "pool-spin20": {"FASTBP_SPIN_US": "20"},
    "pool-spin50": {"FASTBP_SPIN_US": "50"},
    "pool-spin200": {"FASTBP_SPIN_US": "200"},
    "pool-spin1000": {"FASTBP_SPIN_US": "1000"},
    "pool-wake4M": {"FASTBP_WAKE_MIN_MACS": "4e6"},  # book-sized products wake no sleeping worker
    "pool-wake16M": {"FASTBP_WAKE_MIN_MACS": "16e6"},
    "numpy-blas": {"FASTBP_BLAS": "numpy"},  # fastbp's GEMMs on NumPy's OpenBLAS and its thread pool
    # OpenMP regions (the previous default), with libgomp's spin settings
    "omp-spin0": {**_OMP},  # fastbp's GOMP_SPINCOUNT=0
    "gomp-libdefault": {**_OMP, "FASTBP_OMP_SPIN": "keep"},  # libgomp's own default spin, untouched by fastbp
    "passive": {**_OMP, "OMP_WAIT_POLICY": "PASSIVE"},  # fastbp's OpenMP workers sleep at once after a region
    "spin1k": {**_OMP, "GOMP_SPINCOUNT": "1000"},
    "spin3k": {**_OMP, "GOMP_SPINCOUNT": "3000"},
    "spin10k": {**_OMP, "GOMP_SPINCOUNT": "10000"},
    "spin30k": {**_OMP, "GOMP_SPINCOUNT": "30000"},
    "active": {**_OMP, "OMP_WAIT_POLICY": "ACTIVE"},  # workers spin (practically) for ever
    "1thread": {"FASTBP_NUM_THREADS": "1"},  # every product and kernel single-threaded
    # fastbp's OpenBLAS spin before its idle workers sleep (only where that pool runs: threading mode
    # "openblas", e.g. a build without OpenMP); NumPy's copy keeps its own setting
    "openblas-mode": {"FASTBP_BLAS_THREADING": "openblas"},
    "openblas-mode-timeout4": {"FASTBP_BLAS_THREADING": "openblas", "FASTBP_BLAS_THREAD_TIMEOUT": "4"},
    "openblas-mode-timeout16": {"FASTBP_BLAS_THREADING": "openblas", "FASTBP_BLAS_THREAD_TIMEOUT": "16"},
}


def _mnist():
    from pathlib import Path

    import numpy as np

    d = np.load(Path(__file__).resolve().parents[1] / "data" / "mnist-5k.npz")
    x = d["images"].reshape(len(d["images"]), -1).astype(np.float32) / 255.0
    t = d["labels"].astype(np.int64)
    onehot = np.zeros((len(t), 10), np.float32)
    onehot[np.arange(len(t)), t] = 1
    return x, t, onehot


def make_loops(seed=0, sides=("fastbp", "book")):
    """{loop: {side: step}} for each of `sides` ("fastbp", "book"), each step one iteration of the loop."""
    import numpy as np

    import fastbp.layers as FL
    from fastbp import nets, optimizer
    from fastbp.bench.book import (
        BookAdam,
        BookLayers,
        BookMultiLayerNet,
        BookTwoLayerNet,
    )

    x_train, t_train, t_onehot = _mnist()
    n = x_train.shape[0]
    loops = {}

    def ch05(layers):
        np.random.seed(seed)
        net = BookTwoLayerNet(784, 50, 10, layers=layers)

        def step():
            mask = np.random.choice(n, 100)
            xb, tb = x_train[mask], t_onehot[mask]
            grad = net.gradient(xb, tb)
            for key in ("W1", "b1", "W2", "b2"):
                net.params[key] -= 0.1 * grad[key]

        return step

    def ch06(layers):
        np.random.seed(seed)
        net = BookMultiLayerNet(784, [100, 100, 100, 100], 10, layers=layers)
        opt = BookAdam(0.001)

        def step():
            mask = np.random.choice(n, 128)
            xb, tb = x_train[mask], t_train[mask]
            grads = net.gradient(xb, tb)
            opt.update(net.params, grads)

        return step

    def own():
        np.random.seed(seed)
        net = nets.TwoLayerNet(784, 50, 10, dtype=np.float32)
        opt = optimizer.SGD(0.1)

        def step():
            mask = np.random.choice(n, 100)
            xb, tb = x_train[mask], t_train[mask]
            grads = net.gradient(xb, tb)
            opt.update(net.params, grads)

        return step

    build = {
        "ch05": {"fastbp": lambda: ch05(FL), "book": lambda: ch05(BookLayers)},
        "ch06": {"fastbp": lambda: ch06(FL), "book": lambda: ch06(BookLayers)},
        "own": {"fastbp": own, "book": lambda: ch05(BookLayers)},
    }
    for name, by_side in build.items():
        loops[name] = {side: by_side[side]() for side in sides}
    return loops


def _regions_per_step(step, steps=10):
    """Parallel regions fastbp opens per call of `step` (mean over `steps` calls)."""
    from fastbp import _threads

    _threads.reset_region_counts()
    for _ in range(steps):
        step()
    return _threads.region_counts()["opened"] / steps


def _process_info(used):
    """What a worker reports of its process: fastbp's runtime and pool settings, and the kernels `used`."""
    from fastbp import _runtime, _threads

    return {"_runtime": {**_runtime.info(), "pool": _threads.pool_info()}, "_kernels": used}


def _kernels_or_refuse():
    """The kernels this worker runs; exits (refusing to time) when a --path child did not get its path."""
    from fastbp.bench.simdpath import CHILD_VAR, child_check, kernels_in_use

    path = os.environ.get(CHILD_VAR)
    if not path:
        return kernels_in_use()
    used, refusal = child_check(path)
    if refusal:
        raise SystemExit(f"fastbp: ERROR: {refusal}")
    return used


def worker(rounds, seconds, loops_wanted):
    """Same-process mode: time each loop's fastbp and book steps in `rounds` interleaved rounds of about `seconds`
    each."""
    from fastbp.bench.harness import _time_batch, calibrate

    used = _kernels_or_refuse()
    loops = make_loops()
    out = {}
    for name in loops_wanted:
        impls = loops[name]
        numbers = {k: calibrate(f, seconds)[0] for k, f in impls.items()}
        times = {k: [] for k in impls}
        for r in range(rounds):
            order = list(impls) if r % 2 == 0 else list(impls)[::-1]
            for k in order:
                times[k].append(_time_batch(impls[k], numbers[k]))
        out[name] = {
            "fastbp_s": times["fastbp"],
            "book_s": times["book"],
            "ratio": [b / f for b, f in zip(times["book"], times["fastbp"])],
            "regions": [_regions_per_step(impls["fastbp"])],
        }
    out.update(_process_info(used))
    return out


def serve(side, loops_wanted, inp=None, out=None):
    """Separate mode's worker: one side's loops in this process, timed on request, one JSON line in, one out:
    {"calibrate": loop, "seconds": s} -> {"number": calls for a batch of about s}; {"time": loop, "number": n} ->
    {"s": seconds per step of a batch of n steps, after 2 untimed ones}; {"regions": loop} -> {"regions": parallel
    regions per step}; {"info": true} -> {"_runtime": ..., "_kernels": ...}.  Ends at end of input."""
    from fastbp.bench.harness import _time_batch, calibrate

    inp = sys.stdin if inp is None else inp
    out = sys.stdout if out is None else out
    used = _kernels_or_refuse()
    steps = {name: loop[side] for name, loop in make_loops(sides=(side,)).items() if name in loops_wanted}
    for line in inp:
        req = json.loads(line)
        if "calibrate" in req:
            reply = {"number": calibrate(steps[req["calibrate"]], req["seconds"])[0]}
        elif "time" in req:
            f = steps[req["time"]]
            f()
            f()
            reply = {"s": _time_batch(f, req["number"])}
        elif "regions" in req:
            reply = {"regions": _regions_per_step(steps[req["regions"]])}
        else:
            reply = _process_info(used)
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _served_pair(env, rounds, seconds, loops_wanted, gap, first, timeout=900):
    """Separate mode, one repetition: a book and a fastbp process (see serve), alive together; per loop, rounds
    of one batch each, the order alternating (`first` side first in round 0), an idle `gap` before every batch
    so the other process's threads (NumPy's OpenBLAS workers spin ~0.1 s after a call) have settled.  Returns
    the worker dict of the same-process mode: per loop fastbp_s, book_s, ratio (per round), regions.  A worker
    that dies or stays silent for `timeout` seconds is a RuntimeError naming it, and no worker is left behind."""
    import tempfile

    import threading

    sides = (first, "book" if first == "fastbp" else "fastbp")
    procs, errs = {}, {}

    def ask(side, req):
        p = procs[side]
        watchdog = threading.Timer(timeout, p.kill)  # a hung worker must not hang the driver
        watchdog.start()
        try:
            p.stdin.write(json.dumps(req) + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
        except OSError:  # BrokenPipeError: the worker is gone
            line = ""
        finally:
            watchdog.cancel()
        if not line:
            p.wait(timeout=60)
            errs[side].seek(0)
            raise RuntimeError(f"{side} worker (exit {p.returncode}): {errs[side].read()[-2000:]}")
        return json.loads(line)

    try:
        for side in sides:
            errs[side] = tempfile.TemporaryFile(mode="w+")
            cmd = [sys.executable, "-m", "fastbp.bench.loops", "--serve", side, "--loops", *loops_wanted]
            procs[side] = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[side], text=True
            )
        got = {}
        for loop in loops_wanted:
            numbers = {side: ask(side, {"calibrate": loop, "seconds": seconds})["number"] for side in sides}
            times = {side: [] for side in sides}
            for r in range(rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    time.sleep(gap)
                    times[side].append(ask(side, {"time": loop, "number": numbers[side]})["s"])
            got[loop] = {
                "fastbp_s": times["fastbp"],
                "book_s": times["book"],
                "ratio": [b / f for b, f in zip(times["book"], times["fastbp"])],
                "regions": [ask("fastbp", {"regions": loop})["regions"]],
            }
        got.update(ask("fastbp", {"info": True}))
    finally:
        for p in procs.values():
            try:
                p.stdin.close()
            except OSError:  # the unsent request of a worker that died
                pass
            try:  # a worker ends at the end of its input; one that does not is killed
                p.wait(timeout=min(timeout, 10))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in errs.values():
            f.close()
    return got


def _child_env(extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "OMP_WAIT_POLICY",
            "GOMP_SPINCOUNT",
            "FASTBP_NUM_THREADS",
            "FASTBP_OMP_SPIN",
            "FASTBP_BLAS_THREADING",
            "FASTBP_BLAS_THREAD_TIMEOUT",
            "FASTBP_THREAD_POOL",
            "FASTBP_SPIN_US",
            "FASTBP_WAKE_MIN_MACS",
            "FASTBP_BLAS",
        )
    }
    env.update(extra)
    return env


def drive(configs, reps, rounds, seconds, loops_wanted, log=sys.stderr, path=None, mode="separate", gap=DEFAULT_GAP):
    """Run every config `reps` times (order rotating), each time in worker subprocesses (mode "separate": a book and
    a fastbp process per config and repetition, see the module docstring; "same-process": one process timing both); with
    `path`, the workers run on that SIMD path (ValueError when this CPU does not have it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from fastbp.bench.simdpath import child_environment

    envs = {}
    for c in configs:
        envs[c] = _child_env(CONFIGS[c])
        if path:
            envs[c], notes = child_environment(path, envs[c])
            if log and c == configs[0]:
                for n in notes:
                    log.write(f"fastbp: note: {n}\n")
    results = {c: {} for c in configs}

    def run_worker(c):  # same-process mode
        cmd = [
            sys.executable,
            "-m",
            "fastbp.bench.loops",
            "--worker",
            "--rounds",
            str(rounds),
            "--seconds",
            str(seconds),
            "--loops",
            *loops_wanted,
        ]
        r = subprocess.run(cmd, env=envs[c], capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"config {c}: {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    for rep in range(reps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for c in order:
            if mode == "same-process":
                got = run_worker(c)
            else:
                try:
                    got = _served_pair(
                        envs[c], rounds, seconds, loops_wanted, gap, "book" if rep % 2 == 0 else "fastbp"
                    )
                except RuntimeError as e:
                    raise RuntimeError(f"config {c}: {e}") from None
            results[c]["_mode"] = mode
            results[c]["_runtime"] = got.pop("_runtime")
            results[c]["_kernels"] = got.pop("_kernels")
            for loop, v in got.items():
                acc = results[c].setdefault(loop, {"fastbp_s": [], "book_s": [], "ratio": [], "regions": []})
                for k in acc:
                    acc[k] += v[k]
            if log:
                log.write(
                    f"rep {rep + 1}/{reps} {c}: "
                    + ", ".join(f"{loop} {statistics.median(v['ratio']):.2f}x" for loop, v in got.items())
                    + "\n"
                )
                log.flush()
    return results


def _q(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def report(results, loops_wanted):
    lines = [
        "| config | "
        + " | ".join(f"{loop} book/fastbp (IQR); fastbp step; regions/step" for loop in loops_wanted)
        + " |",
        "|---|" + "---|" * len(loops_wanted),
    ]
    for c, res in results.items():
        cells = []
        for loop in loops_wanted:
            v = res[loop]
            lo, hi = _q(v["ratio"])
            cells.append(
                f"{statistics.median(v['ratio']):.2f}x ({lo:.2f}-{hi:.2f}); "
                f"{statistics.median(v['fastbp_s']) * 1e6:.0f} µs; {max(v['regions'], default=0):g} regions"
            )
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbp.bench.loops", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--loops", nargs="+", default=["ch05", "ch06", "own"], choices=["ch05", "ch06", "own"])
    p.add_argument("--reps", type=int, default=3, help="repetitions of the whole set of configs")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per config and repetition")
    p.add_argument("--seconds", type=float, default=0.15, help="time per timed batch")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--path",
        choices=PATHS,
        default=None,
        help="run the workers with fastbp and NumPy on this SIMD path (see python -m fastbp bench --help)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="separate",
        help="separate (default): the book and fastbp each in their own process, as a reader runs them; "
        "same-process: both in one process, interleaved rounds",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve", choices=["fastbp", "book"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve, a.loops)
        return 0
    if a.worker:
        print(json.dumps(worker(a.rounds, a.seconds, a.loops)))
        return 0
    t0 = time.time()
    try:
        res = drive(a.configs, a.reps, a.rounds, a.seconds, a.loops, path=a.path, mode=a.mode)
    except ValueError as e:
        sys.stderr.write(f"fastbp: {e}\n")
        return 2
    except RuntimeError as e:  # a worker refused its --path, or died
        sys.stderr.write(f"fastbp: {e}\n")
        return 3
    first = res[a.configs[0]]["_kernels"]
    print("\n".join(format_kernels(first, a.path)))
    print(report(res, a.loops))
    how = (
        "a book and a fastbp process per config and rep, alive together, taking turns (idle gap before each "
        "batch); ratio per round"
        if a.mode == "separate"
        else "both sides in one process per rep, interleaved rounds; ratio per round"
    )
    print(f"(mode {a.mode}: {how}; {a.reps} reps x {a.rounds} rounds per config, {time.time() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
