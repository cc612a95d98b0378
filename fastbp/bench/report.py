"""Running the rows of ``fastbp bench`` and reporting them: machine facts, the table with PASS/MISS against the
targets, the header lines, JSON and the batch-size plot."""

import gc
import json
import math
import os
import platform
import sys
import time

import numpy as np

from fastbp.bench.cases import Target, _alloc_rows, _import_torch, build_cases, sweep_cases
from fastbp.bench.simdpath import child_check, format_kernels, kernels_in_use
from fastbp.bench.harness import (
    BASE,
    BATCH_TIME,
    BUSY,
    WARM_TIME,
    _cpu_ticks,
    _foreign_fraction,
    check_case,
    gemm_peak,
    interference_probe,
    measure_case,
    median,
)


# ---------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------
def fmt_time(seconds):
    """A duration with 3 significant digits in ns/us/ms/s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            v = seconds / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return "-"


def _fmt_ratio(r):
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------------------
# machine facts
# ---------------------------------------------------------------------------------------------------------
def machine_info(torch):
    from fastbp import _blas, _kernels

    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    import fastbp

    info["fastbp"] = fastbp.__version__
    b = _blas.info()
    info["fastbp_blas"] = {
        "corename": b["corename"],
        "threads": _blas.get_num_threads(),
        "library": b["library"],
        "config": b["config"],
    }
    bi = _kernels.build_info()
    info["openmp"] = {"enabled": bi["openmp"], "threads": bi["openmp_max_threads"]}
    info["numpy_blas"] = None
    try:
        import threadpoolctl

        pools = threadpoolctl.threadpool_info()
        cands = [
            p
            for p in pools
            if p.get("user_api") == "blas" and os.path.realpath(p.get("filepath", "")) != os.path.realpath(b["library"])
        ]
        cands.sort(key=lambda p: "numpy" not in p.get("filepath", ""))
        if cands:
            p = cands[0]
            info["numpy_blas"] = {
                "corename": p.get("architecture"),
                "threads": p.get("num_threads"),
                "library": p.get("filepath"),
                "version": p.get("version"),
                "internal_api": p.get("internal_api"),
            }
    except ImportError:
        pass
    if info["numpy_blas"] is None:
        info["numpy_blas"] = {"corename": "unknown (pip install threadpoolctl to see it)", "threads": None}
    info["torch"] = None
    if torch is not None:
        info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    info["env"] = {
        k: os.environ[k]
        for k in (
            "OPENBLAS_CORETYPE",
            "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS",
            "FASTBP_NUM_THREADS",
            "FASTBP_BLAS_CORETYPE",
        )
        if k in os.environ
    }
    return info


# ---------------------------------------------------------------------------------------------------------
# targets, table, header
# ---------------------------------------------------------------------------------------------------------
def evaluate_targets(row):
    out = []
    for tg in row.get("targets", []):
        v, res = tg.evaluate(row) if "error" not in row else (None, "ERROR")
        out.append({**tg.to_json(), "value": v, "result": res})
    row["target_results"] = out
    results = [t["result"] for t in out]
    if not results:
        row["result"] = ""
    elif "ERROR" in results:
        row["result"] = "ERROR"
    elif "MISS" in results:
        row["result"] = "MISS"
    elif all(r == "SKIP" for r in results):
        row["result"] = "SKIP"
    else:
        row["result"] = "PASS"
    return row


# what a floor row's footnote says about the products counted
_FLOOR_NOTES = {"train-mlp-b256-f32": " (the step skips the first layer's dx, need_dx=False; neither counts it)"}


def format_table(rows, impl_cols=("fastbp", "numpy", "torch")):
    """The result table: one line per timed row, times (median per call), speedups of fastbp, GFLOP/s,
    target and PASS/MISS."""
    head = ["case"] + list(impl_cols) + [f"vs {c}" for c in impl_cols[1:]] + ["GFLOP/s fastbp", "target", "result"]
    lines = []
    for r in rows:
        med = r.get("median_s", {})
        busy = (r.get("other_processes_cpu_fraction") or 0) > BUSY
        cells = [r["title"] + (" *" if busy else "")]
        cells += [fmt_time(med.get(c)) if c in med else "-" for c in impl_cols]
        cells += [_fmt_ratio(r.get("speedup", {}).get(c)) for c in impl_cols[1:]]
        gf = r.get("gflops", {}).get(BASE)
        cells.append(f"{gf:.1f}" if gf else "-")
        tg = []
        for t in r.get("target_results", []):
            if t["kind"] in ("floor", "gemms", "layers"):
                tg.append(f"{t['text']}: {_fmt_ratio(t['value'])}")
            else:
                tg.append(t["text"])
        cells.append(", ".join(tg) or "-")
        res = r.get("result", "")
        if res == "MISS":
            missed = [t["text"] for t in r["target_results"] if t["result"] == "MISS"]
            res = "MISS (" + "; ".join(missed) + ")" if len(r["target_results"]) > 1 else "MISS"
        if "error" in r:
            res = "ERROR: " + r["check"]
        cells.append(res or "-")
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt_row = lambda cells: "  ".join(  # noqa: E731
        (str(c).ljust(w) if i == 0 or i >= len(cells) - 2 else str(c).rjust(w))
        for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    out = [fmt_row(head), fmt_row(["-" * w for w in widths])]
    out += [fmt_row(c) for c in lines]
    return "\n".join(out)


def format_alloc(rows):
    lines = []
    for r in rows:
        lines.append(
            f"{r['title']}: fastbp {_fmt_bytes(r['bytes_per_step'])}/step (all tracemalloc domains, "
            f"Python objects included: peak +{_fmt_bytes(r['traced_peak_per_step'])}), reference "
            f"{_fmt_bytes(r['reference_bytes_per_step'])}/step; target 0 B -> {r['result']}"
        )
    return "\n".join(lines)


def best_peak(before, after):
    """The GEMM-peak record with each rate the better of two measurements; both kept under "measurements"."""
    out = dict(before)
    for k, v in after.items():
        if k.endswith("_gflops"):
            out[k] = max(before[k], v)
    out["measurements"] = [{k: v for k, v in m.items() if k != "measurements"} for m in (before, after)]
    return out


def step_parts(times):
    """For a row whose step was also timed in its parts ("layers" and "update", see cases.add_step_parts) and as
    its GEMMs alone ("gemm-only"), in the same rounds: the medians of the per-round ratios of each part to the
    GEMMs ("layers_ratio", "update_ratio"); {} for any other row."""
    if not all(k in times for k in ("layers", "update", "gemm-only")):
        return {}
    g = times["gemm-only"]
    return {f"{part}_ratio": median([p / q for p, q in zip(times[part], g) if q > 0]) for part in ("layers", "update")}


def _parts_note(row):
    """The line saying how a book row's step splits: the layers, the loop's update, the rest (the book's network
    code around the layers, by difference of the medians)."""
    if "layers_ratio" not in row:
        return ""
    m = row["median_s"]
    rest = m["fastbp"] - m["layers"] - m["update"]
    return (
        f"  {row['title']}: in parts, same rounds: the layers alone (forward + backward as gradient() calls them) "
        f"{fmt_time(m['layers'])} = {row['layers_ratio']:.2f}x its GEMMs; the loop's update alone "
        f"{fmt_time(m['update'])} = {row['update_ratio']:.2f}x its GEMMs; the rest of the step (the book's network "
        f"code around the layers, step - layers - update) {fmt_time(max(rest, 0.0))}"
    )


def _bound_note(row):
    """For a row with a "vs numpy" target and its GEMMs timed alone: NumPy's step over fastbp's GEMMs alone, the
    most that ratio could be with these products (where NumPy's GEMMs run the same kernels, the GEMMs' share of
    the step bounds it)."""
    if "numpy_over_gemms" not in row or not any(
        t.kind == "speedup" and t.vs == "numpy" for t in row.get("targets", [])
    ):
        return ""
    return f"; numpy step / fastbp's GEMMs alone = {row['numpy_over_gemms']:.2f}x (the most 'vs numpy' could reach)"


def _miss_reason(row, result):
    """For a missed "vs numpy" speedup target of a row with its GEMMs timed alone: whether this run's products
    allowed it.  numpy step / fastbp's GEMMs alone (the bound) below the target: no step on these GEMMs could
    have met it in this run; otherwise the step's cost over its GEMMs that the target allows (bound / target)
    against what it cost, or, where the cost was within that (each figure is its own median of per-round ratios),
    that the miss is in the spread of the rounds."""
    if result["result"] != "MISS" or result["kind"] != "speedup" or result["vs"] != "numpy":
        return ""
    bound, cost = row.get("numpy_over_gemms"), row.get("gemm_only_ratio")
    if bound is None or not math.isfinite(bound):
        return ""
    need = result["threshold"]
    if bound < need:
        return f"; out of reach in this run: numpy step / fastbp's GEMMs alone = {bound:.2f}x, below {need:g}x"
    if cost is None or not math.isfinite(cost):
        return ""
    allowed = bound / need
    if cost <= allowed:
        return (
            f"; the step cost {cost:.2f}x its GEMMs, within the {allowed:.2f}x that {need:g}x allows: the miss is in "
            f"the spread of the rounds"
        )
    return f"; to reach {need:g}x the step may cost at most {allowed:.2f}x its GEMMs; it cost {cost:.2f}x"


def _header(info, peak, probe, args, torch, kernels=None):
    nb = info["numpy_blas"]
    tl = (
        f"torch {info['torch']['version']} ({info['torch']['threads']} threads)"
        if torch is not None
        else "torch not installed: torch columns skipped"
    )
    lines = [
        f"fastbp {info['fastbp']} bench: numpy {info['numpy']}, python {info['python']}, "
        f"{info['cpu_count']} CPUs, {tl}",
        f"threads: fastbp BLAS {info['fastbp_blas']['threads']} ({info['fastbp_blas']['corename']}), "
        f"fastbp OpenMP {info['openmp']['threads'] if info['openmp']['enabled'] else 'off'}, "
        f"NumPy BLAS {nb.get('threads')} ({nb.get('corename')})"
        + (f", torch {info['torch']['threads']}" if torch is not None else ""),
    ]
    if kernels is not None:
        lines += format_kernels(kernels, getattr(args, "path", None))
    if peak:
        lines.append(
            f"GEMM peak {peak['size']}^3: fastbp sgemm {peak['fastbp_sgemm_gflops']:.0f} / dgemm "
            f"{peak['fastbp_dgemm_gflops']:.0f} GFLOP/s; NumPy sgemm {peak['numpy_sgemm_gflops']:.0f} / dgemm "
            f"{peak['numpy_dgemm_gflops']:.0f} GFLOP/s"
            + (
                " (each the better of a measurement before the rows, sgemm "
                + " and one after, sgemm ".join(
                    f"{max(m['fastbp_sgemm_gflops'], m['numpy_sgemm_gflops']):.0f}" for m in peak["measurements"]
                )
                + "; the GEMM floors use it)"
                if "measurements" in peak
                else ""
            )
        )
    lines.append(
        f"method: {args.rounds} interleaved rounds per row, implementation order rotating; before each timed "
        f"batch (~{BATCH_TIME * 1e3:.0f} ms) an idle gap of {args.gap * 1e3:.0f} ms and ~{WARM_TIME * 1e3:.0f} ms of "
        f"untimed warm-up calls; "
        f"times = median per call, speedups = median of per-round ratios"
    )
    if probe:
        sd = probe.get("spin_down_s")
        sd_text = (
            f"; worker threads kept a CPU busy {sd * 1e3:.0f} ms after the last NumPy call" if sd is not None else ""
        )
        lines.append(
            f"interference ({probe['case']}): fastbp step right after a NumPy batch "
            f"{fmt_time(probe['fastbp_after_numpy'])} vs alone {fmt_time(probe['fastbp_alone'])} "
            f"({probe['fastbp_slowdown']:.2f}x); NumPy right after fastbp {fmt_time(probe['numpy_after_fastbp'])} "
            f"vs alone {fmt_time(probe['numpy_alone'])} ({probe['numpy_slowdown']:.2f}x){sd_text}"
        )
        if sd is not None and sd > args.gap:
            lines.append(
                f"WARNING: spin-down {sd * 1e3:.0f} ms is longer than the gap {args.gap * 1e3:.0f} ms; "
                f"consider --gap {math.ceil(sd * 20) / 20 + 0.05:.2f}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------
def run(args, out=None):
    """Run the benchmark described by parsed `args`; prints the report to `out` and returns the result dict."""
    out = sys.stdout if out is None else out
    t_start = time.perf_counter()
    ticks0 = _cpu_ticks()
    torch = None if args.no_torch else _import_torch()
    from fastbp import _blas

    _blas.ensure_loaded()
    path = getattr(args, "path", None)
    if path:  # in the child process of --path: every library must have taken the path before anything is timed
        kernels, refusal = child_check(path, torch)
        if refusal:
            sys.stderr.write(f"fastbp: ERROR: {refusal}\n")
            return {"refused": refusal, "kernels": kernels, "rows": [], "alloc": []}
    else:
        kernels = kernels_in_use(torch)
    info = machine_info(torch)
    if info["numpy_blas"].get("threads") is None and kernels and kernels["numpy"]["blas_core"]:
        info["numpy_blas"]["corename"] = kernels["numpy"]["blas_core"]  # read without threadpoolctl
        info["numpy_blas"]["threads"] = kernels["numpy"]["blas_threads"]
    quiet = getattr(args, "quiet", False)

    def log(msg):
        if not quiet:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    peak = None
    if args.peak_size:
        log(f"measuring the GEMM peak ({args.peak_size}^3) ...")
        peak = gemm_peak(args.peak_size, repeats=3 if args.quick else 6, gap=args.gap)

    specs = build_cases(torch, args.cases)
    if args.plot or args.sweep:
        specs += sweep_cases(torch)
    sweep_rounds = max(3, args.rounds // 2)
    rows = []
    probe = None
    for key, build in specs:
        log(f"[{len(rows) + 1}/{len(specs)}] {key} ...")
        case = build()
        row = check_case(case)
        if probe is None and not args.no_probe and key.startswith("train-2l-b100") and "error" not in row:
            probe = interference_probe(case, reps=3 if args.quick else 5, gap=args.gap)
        row = measure_case(case, sweep_rounds if key.startswith("sweep-") else args.rounds, args.gap, row=row)
        if "median_s" in row and "gemm-only" in row["median_s"]:
            # median of the per-round ratios, as for every other ratio of the table
            row["gemm_only_ratio"] = 1.0 / row["speedup"]["gemm-only"]
            if "numpy" in row["times_s"]:
                # the most "vs numpy" this row could show with these products: NumPy's step / fastbp's GEMMs alone
                row["numpy_over_gemms"] = median(
                    [n / g for n, g in zip(row["times_s"]["numpy"], row["times_s"]["gemm-only"]) if g > 0]
                )
            row.update(step_parts(row["times_s"]))
        rows.append(row)
        del case
        gc.collect()

    floor_rows = [r for r in rows if "median_s" in r and any(t.kind == "floor" for t in r["targets"])]
    if peak and floor_rows:
        # the floors use the best peak of a measurement before and one after the rows: a host that slowed one of
        # them (a shared VM's neighbours) would otherwise make every floor too lenient
        log(f"measuring the GEMM peak ({args.peak_size}^3) again ...")
        peak = best_peak(peak, gemm_peak(args.peak_size, repeats=3 if args.quick else 6, gap=args.gap))
        for r in floor_rows:
            r["floor_s"] = r["flops"] / (peak["best_sgemm_gflops"] * 1e9)
            r["floor_ratio"] = r["median_s"]["fastbp"] / r["floor_s"]
    rows = [evaluate_targets(r) for r in rows]

    alloc = []
    if not args.no_alloc and (not args.cases or any("alloc" in w for w in args.cases)):
        log("measuring NumPy allocation per step ...")
        alloc = [evaluate_targets(r) for r in _alloc_rows(torch)]

    wall = time.perf_counter() - t_start
    foreign = _foreign_fraction(ticks0, _cpu_ticks(), wall)

    main_rows = [r for r in rows if not r["key"].startswith("sweep-")]
    sweep_rows = [r for r in rows if r["key"].startswith("sweep-")]
    print(_header(info, peak, probe, args, torch, kernels), file=out)
    print("", file=out)
    print(format_table(main_rows), file=out)
    if any((r.get("other_processes_cpu_fraction") or 0) > BUSY for r in rows):
        print(f"  * other processes used more than {BUSY:.0%} of the CPUs while this row was timed", file=out)
    for r in main_rows:
        if "floor_s" not in r and "gemm_only_ratio" in r:
            print(
                f"  {r['title']}: step {fmt_time(r['median_s']['fastbp'])}, its GEMMs alone (same shapes and dtype, "
                f"fastbp's BLAS) {fmt_time(r['median_s']['gemm-only'])}: step = {r['gemm_only_ratio']:.2f}x GEMMs"
                + _bound_note(r),
                file=out,
            )
        parts = _parts_note(r)
        if parts:
            print(parts, file=out)
        if "floor_s" in r:
            extra = ""
            if "gemm_only_ratio" in r:
                extra = (
                    f"; the step's GEMMs alone (same shapes, fastbp's BLAS) "
                    f"{fmt_time(r['median_s']['gemm-only'])}: step = {r['gemm_only_ratio']:.2f}x GEMMs"
                )
                if "gemm-only-pieces" in r["median_s"]:
                    extra += (
                        f" (every product in independent pieces, FASTBP_BLAS_THREADED_MIN=0: "
                        f"{fmt_time(r['median_s']['gemm-only-pieces'])})"
                    )
                if "gemm-only-routed" in r["median_s"]:
                    extra += (
                        f" (the largest threaded by OpenBLAS, FASTBP_BLAS_THREADED_MIN=1e8: "
                        f"{fmt_time(r['median_s']['gemm-only-routed'])})"
                    )
            print(
                f"  {r['title']}: GEMM floor {fmt_time(r['floor_s'])} ({r['flops'] / 1e9:.2f} GFLOP at "
                f"{peak['best_sgemm_gflops']:.0f} GFLOP/s), step {fmt_time(r['median_s']['fastbp'])} = "
                f"{r['floor_ratio']:.2f}x floor{extra}{_bound_note(r)}{_FLOOR_NOTES.get(r['key'], '')}",
                file=out,
            )
    if sweep_rows:
        print("\nbatch-size sweep (TwoLayerNet 784-50-10 f32 train step):", file=out)
        print(format_table(sweep_rows), file=out)
    if alloc:
        print("\n" + format_alloc(alloc), file=out)
    print("\ntargets:", file=out)
    for r in main_rows + alloc:
        for t in r.get("target_results", []):
            v = t["value"]
            vt = "-" if v is None else (_fmt_bytes(v) + "/step" if t["kind"] == "alloc" else _fmt_ratio(v))
            iqr = r.get("speedup_iqr", {}).get(t["vs"]) if t["kind"] == "speedup" else None
            if iqr:
                vt += f", per-round ratios IQR {iqr[0]:.2f}-{iqr[1]:.2f}x"
            print(f"  [{t['result']}] {r['title']}: {t['text']} (measured {vt}{_miss_reason(r, t)})", file=out)
    load = "" if foreign is None else f"; other processes used {foreign * 100:.0f}% of the CPUs meanwhile"
    print(f"\nwall time {wall:.1f} s{load}", file=out)
    if foreign is not None and foreign > BUSY:
        print(
            "WARNING: the machine was busy with other work; the medians resist it, but rerun on a quiet "
            "machine for final numbers",
            file=out,
        )

    result = {
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "gap_s": args.gap,
            "batch_time_s": BATCH_TIME,
            "warm_time_s": WARM_TIME,
            "quick": args.quick,
        },
        "gemm_peak": peak,
        "simd_path": path,
        "kernels": kernels,
        "interference": probe,
        "rows": rows,
        "alloc": alloc,
        "wall_time_s": wall,
        "other_processes_cpu_fraction": foreign,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(result), fh, indent=1)
        print(f"results written to {args.json}", file=out)
    if args.plot:
        _plot(sweep_rows, args.plot)
        print(f"plot written to {args.plot}", file=out)
    return result


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Target):
        return o.to_json()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _plot(sweep_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [int(r["key"].split("-b")[1]) for r in sweep_rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for other in ("numpy", "torch"):
        ys = [r.get("speedup", {}).get(other) for r in sweep_rows]
        if any(y is not None for y in ys):
            ax.plot(batches, [np.nan if y is None else y for y in ys], marker="o", label=f"fastbp vs {other}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup (median of per-round ratios)")
    ax.set_title("TwoLayerNet 784-50-10 float32 training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
