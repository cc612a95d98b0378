"""The measuring harness of ``fastbp bench``: interleaved rounds, calibration, the NumPy allocation probe and the
machine probes (thread-pool interference, spin-down, load of other processes, GEMM peak).  How and why the
numbers are taken this way: see :mod:`fastbp.bench`."""

import gc
import math
import os
import statistics
import sys
import threading
import time
import tracemalloc

import numpy as np

DEFAULT_ROUNDS = 15
QUICK_ROUNDS = 5
DEFAULT_GAP = 0.15  # seconds of idle before each timed batch (OpenBLAS workers spin ~0.1 s)
BATCH_TIME = 0.02  # seconds per timed batch
# Seconds of untimed warm-up calls after the gap, before each batch (at least 2 calls, at most one batch's worth):
# a training step's speed is the back-to-back regime of a training loop.  On the 2-core EPYC VM, the first ~5 ms
# after a 150 ms idle gap run 12-17 % slower (the book's MultiLayerNet step, both sides), and with 4 ms of warm-up
# the book-MultiLayerNet row read fastbp/NumPy 0.88-1.16x (median ~1.10x, 4 runs, AVX2 path) against 1.18-1.33x
# (median ~1.28x) with 30 ms, alternating; the book's own loop, each side in its own process, reads 1.32-1.52x.
WARM_TIME = 0.02
PEAK_SIZE = 2048
BASE = "fastbp"
BUSY = 0.1  # fraction of the CPUs used by other processes above which a row is flagged


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def _quartiles(xs):
    """(first quartile, third quartile) of xs (None for fewer than 2 values)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[0], q[2])


# ---------------------------------------------------------------------------------------------------------
# timing in interleaved rounds
# ---------------------------------------------------------------------------------------------------------
def _time_batch(fn, number, timer=time.perf_counter):
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = timer()
        for _ in range(number):
            fn()
        t1 = timer()
    finally:
        if gc_was:
            gc.enable()
    return (t1 - t0) / number


def calibrate(fn, batch_time=BATCH_TIME, max_number=100000):
    """(number of calls for a batch of about `batch_time`, estimated seconds per call)."""
    fn()
    fn()
    n, elapsed = 1, 0.0
    while True:
        t = _time_batch(fn, n) * n
        elapsed += t
        if t >= 0.2 * batch_time or elapsed >= batch_time:
            break
        n *= 4
    per_call = max(t / n, 1e-9)
    return int(min(max(round(batch_time / per_call), 1), max_number)), per_call


def interleave(
    impls, rounds, numbers, *, gap=DEFAULT_GAP, warm_calls=None, sleep=time.sleep, timer=time.perf_counter, log=None
):
    """Time `impls` (name -> zero-argument callable) in `rounds` interleaved rounds.

    In round r the implementations run in the order of `impls` rotated by r; each one: sleep `gap`, make
    ``warm_calls[name]`` untimed calls (default 2), then time ``numbers[name]`` calls.  Returns
    {name: [seconds per call of each round]} and the list of orders used."""
    names = list(impls)
    times = {n: [] for n in names}
    orders = []
    for r in range(rounds):
        k = r % len(names) if names else 0
        order = names[k:] + names[:k]
        orders.append(order)
        for name in order:
            fn = impls[name]
            if gap:
                sleep(gap)
            for _ in range((warm_calls or {}).get(name, 2)):
                fn()
            times[name].append(_time_batch(fn, numbers[name], timer))
        if log:
            log(r + 1, rounds)
    return times, orders


def summarize(times, base=BASE):
    """Medians of the per-round times and of the per-round ratios t_other / t_base (speedup of `base`)."""
    out = {"median_s": {}, "min_s": {}, "speedup": {}, "speedup_per_round": {}}
    for name, ts in times.items():
        out["median_s"][name] = median(ts)
        out["min_s"][name] = min(ts) if ts else float("nan")
    if base in times:
        bt = times[base]
        for name, ts in times.items():
            if name == base:
                continue
            per_round = [o / b for o, b in zip(ts, bt) if b > 0]
            out["speedup_per_round"][name] = per_round
            out["speedup"][name] = median(per_round)
            out.setdefault("speedup_iqr", {})[name] = _quartiles(per_round)
    return out


def check_case(case):
    """Run the case's equality check (before any timed call: the training steps change the weights);
    returns the row skeleton, with "error" set when the implementations disagree."""
    row = {
        "key": case.key,
        "title": case.title,
        "impls": list(case.impls),
        "flops": case.flops,
        "targets": case.targets,
        "note": case.note,
    }
    try:
        row["check"] = case.check() if case.check else "not checked"
    except AssertionError as e:
        row["check"] = f"FAILED: {e}"
        row["error"] = str(e)
    return row


def measure_case(case, rounds, gap, batch_time=BATCH_TIME, log=None, row=None):
    """Check (unless `row` from check_case is given), calibrate and time one case; returns its result row."""
    if row is None:
        row = check_case(case)
    if "error" in row:
        return row
    numbers, warm = {}, {}
    for name, fn in case.impls.items():
        time.sleep(gap)
        numbers[name], per_call = calibrate(fn, batch_time)
        warm[name] = max(2, min(numbers[name], int(math.ceil(WARM_TIME / per_call))))
    ticks0, t0 = _cpu_ticks(), time.perf_counter()
    times, orders = interleave(case.impls, rounds, numbers, gap=gap, warm_calls=warm, log=log)
    row["other_processes_cpu_fraction"] = _foreign_fraction(ticks0, _cpu_ticks(), time.perf_counter() - t0)
    s = summarize(times)
    row.update(numbers=numbers, warm_calls=warm, times_s=times, orders=orders, **s)
    if case.flops:
        row["gflops"] = {n: case.flops / t / 1e9 for n, t in s["median_s"].items() if t > 0}
    return row


# ---------------------------------------------------------------------------------------------------------
# NumPy allocation in a call
# ---------------------------------------------------------------------------------------------------------
def numpy_alloc_per_call(fn, calls=10, warmup=3):
    """NumPy bytes allocated per call of `fn` after `warmup` calls, by tracemalloc.

    Returns a dict: ``bytes_per_call`` -- NumPy's tracing domain only (Python objects do not count), the live
    NumPy bytes sampled at every Python and C function call and return made from Python code, every increase
    between two samples counted as allocated (so temporaries freed later in the call are seen; one created and
    freed inside a single compiled call is not); ``numpy_high_water`` -- the most live NumPy bytes above the
    start; ``traced_peak_per_call`` -- a second pass without sampling: the largest rise of tracemalloc's peak
    over all domains (Python objects included) within one call, which bounds whatever the sampling cannot
    see."""
    for _ in range(warmup):
        fn()
    domain = np.lib.tracemalloc_domain
    flt = [tracemalloc.DomainFilter(True, domain)]
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(1)

    def live():
        return sum(tr.size for tr in tracemalloc.take_snapshot().filter_traces(flt).traces)

    state = {}
    old = sys.getprofile()
    try:
        base = live()
        state.update(prev=base, alloc=0, high=0)

        def sample(*_):
            cur = live()
            if cur > state["prev"]:
                state["alloc"] += cur - state["prev"]
            state["prev"] = cur
            state["high"] = max(state["high"], cur - base)

        sys.setprofile(sample)
        for _ in range(calls):
            fn()
        sys.setprofile(old)
        sample()
        peak = 0
        for _ in range(calls):
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            fn()
            peak = max(peak, tracemalloc.get_traced_memory()[1] - start)
    finally:
        sys.setprofile(old)
        if not was_tracing:
            tracemalloc.stop()
    return {"bytes_per_call": state["alloc"] / calls, "numpy_high_water": state["high"], "traced_peak_per_call": peak}


# ---------------------------------------------------------------------------------------------------------
# machine facts: GEMM peak, pool interference, load of other processes
# ---------------------------------------------------------------------------------------------------------
def gemm_peak(n=PEAK_SIZE, repeats=6, gap=DEFAULT_GAP):
    """Best GFLOP/s of an n^3 sgemm/dgemm through fastbp's BLAS and through NumPy's (best of `repeats`)."""
    from fastbp import _kernels

    rng = np.random.default_rng(6)
    out = {}
    for dtype, tag in ((np.float32, "sgemm"), (np.float64, "dgemm")):
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)
        c = np.empty((n, n), dtype)
        c2 = np.empty((n, n), dtype)
        _kernels.gemm(a, b, c)
        np.matmul(a, b, out=c2)
        rel = float(np.max(np.abs(c - c2)) / np.max(np.abs(c2)))
        if not rel < (1e-4 if dtype == np.float32 else 1e-12):
            raise AssertionError(f"{tag}: fastbp and numpy GEMMs differ ({rel:.3g})")
        for lib, fn in (("fastbp", lambda: _kernels.gemm(a, b, c)), ("numpy", lambda: np.matmul(a, b, out=c2))):
            time.sleep(gap)
            fn()
            best = min(_time_batch(fn, 1) for _ in range(repeats))
            out[f"{lib}_{tag}_gflops"] = 2.0 * n**3 / best / 1e9
    out["size"] = n
    out["best_sgemm_gflops"] = max(out["fastbp_sgemm_gflops"], out["numpy_sgemm_gflops"])
    out["best_dgemm_gflops"] = max(out["fastbp_dgemm_gflops"], out["numpy_dgemm_gflops"])
    return out


def interference_probe(case, reps=5, gap=DEFAULT_GAP, number=None):
    """Does one pool's spinning slow the other down?  For the fastbp and numpy steps of `case`: per-call time
    of a batch after an idle `gap` plus warm-up ("alone") vs right after a batch of the other ("after")."""
    f, g = case.impls["fastbp"], case.impls["numpy"]
    nf = number or calibrate(f)[0]
    ng = number or calibrate(g)[0]
    res = {"fastbp_alone": [], "fastbp_after_numpy": [], "numpy_alone": [], "numpy_after_fastbp": []}
    for _ in range(reps):
        time.sleep(gap)
        f(), f()
        res["fastbp_alone"].append(_time_batch(f, nf))
        _time_batch(g, ng)
        res["fastbp_after_numpy"].append(_time_batch(f, nf))
        time.sleep(gap)
        g(), g()
        res["numpy_alone"].append(_time_batch(g, ng))
        _time_batch(f, nf)
        res["numpy_after_fastbp"].append(_time_batch(g, ng))
    out = {k: median(v) for k, v in res.items()}
    out["fastbp_slowdown"] = out["fastbp_after_numpy"] / out["fastbp_alone"]
    out["numpy_slowdown"] = out["numpy_after_fastbp"] / out["numpy_alone"]
    out["case"] = case.key
    out["spin_down_s"] = _spin_down_time(g)
    return out


def _thread_runtimes():
    """{thread id: ns on CPU} of this process (Linux /proc/self/task/*/schedstat; {} elsewhere)."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                out[tid] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def _spin_down_time(fn, calls=20, limit=1.0, poll=0.01):
    """Seconds during which threads other than this one keep using a CPU after `calls` calls of `fn` (an
    OpenBLAS worker spins before it sleeps); None where /proc/self/task is unavailable."""
    me = str(threading.get_native_id())
    for _ in range(calls):
        fn()
    t0 = time.perf_counter()
    prev = _thread_runtimes()
    if not prev:
        return None
    last_busy = 0.0
    while time.perf_counter() - t0 < limit:
        time.sleep(poll)
        cur = _thread_runtimes()
        busy = sum(cur[t] - prev.get(t, 0) for t in cur if t != me)
        prev = cur
        if busy > 0.3 * poll * 1e9:
            last_busy = time.perf_counter() - t0
        elif time.perf_counter() - t0 - last_busy > 0.1:
            break
    return last_busy


def _cpu_ticks():
    """(busy ticks of all CPUs, ticks used by this process) from /proc, or None."""
    try:
        with open("/proc/stat") as fh:
            parts = fh.readline().split()[1:]
        vals = [int(v) for v in parts]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)
        with open("/proc/self/stat") as fh:
            st = fh.read().rsplit(")", 1)[1].split()
        return busy, int(st[11]) + int(st[12])
    except (OSError, ValueError, IndexError):
        return None


def _foreign_fraction(ticks0, ticks1, seconds):
    """Fraction of all CPUs used by other processes between two _cpu_ticks() readings (None if unknown)."""
    if not ticks0 or not ticks1 or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    other = (ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1])
    return max(0.0, other / hz / (seconds * (os.cpu_count() or 1)))
