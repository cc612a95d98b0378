"""Speed of fastbp's kernels on each SIMD path of this machine (issue 11 items 2 and 3): one column per path.

Each path runs in its own subprocess whose environment (:func:`fastbp.bench.simdpath.path_environment`, the
rule ``fastbp bench --path`` and ``python -m fastbp.bench.loops --path`` follow too) puts fastbp
(FASTBP_DISABLE_CPU_FEATURES: its kernels and its OpenBLAS core type), NumPy (OPENBLAS_CORETYPE,
NPY_DISABLE_CPU_FEATURES) and PyTorch (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) on that
path, so every column compares libraries on the same instruction set, as on a CPU that has nothing more; the
subprocess checks the kernels each library really runs (:func:`~fastbp.bench.simdpath.check_kernels`) and refuses
to time otherwise.  Rows:

* softmax cross-entropy forward+backward (4096, 1000) float32: fastbp's layer vs PyTorch eager
  (``F.cross_entropy`` + backward, as in ``fastbp bench``), interleaved rounds, median of per-round ratios;
* memory-bound kernels on 2**23 float32 elements (32 MiB per array): ReLU forward/backward, sigmoid forward, the
  SGD and Adam updates; GB/s counts every byte read and written once, and the reference is ``np.copyto`` of
  an array holding the same number of bytes as the kernel moves in total, divided by two (so copyto moves the
  same bytes), timed in the same interleaved rounds;
* the book's small GEMMs (TwoLayerNet 784-50-10, batch 100: forward x @ W1, dW1 = x.T @ d, dx = d @ W1.T) in
  float32 and float64: fastbp's ``gemm`` (its own OpenBLAS, split over its threads) against ``np.matmul`` with
  ``out=`` (NumPy's OpenBLAS and its threads), GFLOP/s and the median per-round ratio;
* the eight products of the MultiLayerNet 784-1024-1024-10 batch-256 float32 step (``gemm_only_step`` of
  ``fastbp bench``): the largest threaded by OpenBLAS on fastbp's team (the opt-in FASTBP_BLAS_THREADED_MIN
  route, at its setting or at _blas.BLAS_THREADED_SUGGESTED) against every product cut into independent pieces
  (the default), in the same process.

    python -m fastbp.bench.paths                 # native, avx2, baseline
    python -m fastbp.bench.paths --paths avx2 --rounds 9
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from fastbp.bench.simdpath import CHILD_VAR, PATHS, child_check, child_environment, format_kernels, kernels_in_use

N = 1 << 23


def _interleave(impls, rounds, seconds, gap=0.0):
    """Per-call times of each implementation in `rounds` rounds (order rotating); with `gap`, an idle pause before
    each batch so that the thread pool of the previous one (NumPy's OpenBLAS spins ~0.1 s) has gone to sleep."""
    import time

    from fastbp.bench.harness import _time_batch, calibrate

    numbers = {k: calibrate(f, seconds)[0] for k, f in impls.items()}
    times = {k: [] for k in impls}
    names = list(impls)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if gap:
                time.sleep(gap)
            impls[name]()
            impls[name]()
            times[name].append(_time_batch(impls[name], numbers[name]))
    return times


def worker(rounds, seconds):
    import numpy as np

    from fastbp import _blas
    from fastbp import _kernels as K
    from fastbp import _optim as O
    from fastbp.bench.cases import _import_torch, softmax_case

    out = {"path": K.simd_info()["path"], "core": _blas.info()["corename"], "rows": {}}
    torch = _import_torch()
    path = os.environ.get(CHILD_VAR)
    if path:
        used, refusal = child_check(path, torch)
        if refusal:
            raise SystemExit(f"fastbp: ERROR: {refusal}")
    else:
        used = kernels_in_use(torch)
    out["kernels"] = used
    if torch is not None:
        case = softmax_case(4096, 1000, torch, [])
        case.check()
        impls = {k: v for k, v in case.impls.items() if k in ("fastbp", "torch")}
        t = _interleave(impls, rounds, seconds)
        ratio = [b / a for a, b in zip(t["fastbp"], t["torch"])]
        out["rows"]["softmax-CE (4096, 1000) f32 vs PyTorch"] = {
            "fastbp_s": statistics.median(t["fastbp"]),
            "torch_s": statistics.median(t["torch"]),
            "ratio": statistics.median(ratio),
            "ratios": ratio,
        }
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal(N).astype(f32)
    out_a = np.empty(N, f32)
    mask = np.empty(N, bool)
    g = rng.standard_normal(N).astype(f32) * f32(1e-3)
    p = rng.standard_normal(N).astype(f32)
    m = np.zeros(N, f32)
    v = np.zeros(N, f32)
    kernels = {  # name: (call, bytes read + written)
        "ReLU forward": (lambda: K.relu_forward(x, out_a, mask), 4 * N + 4 * N + N),
        "ReLU backward": (lambda: K.relu_backward(g, mask, out_a), 4 * N + N + 4 * N),
        "sigmoid forward": (lambda: K.sigmoid_forward(x, out_a), 8 * N),
        "SGD update": (lambda: O.optimizer_update(0, p, g, None, None, 1e-6), 12 * N),
        "Adam update": (lambda: O.optimizer_update(5, p, g, m, v, 1e-6, 0.9, 0.999, 1e-7), 28 * N),
    }
    _gemm_rows(out["rows"], rounds, seconds)
    for name, (fn, nbytes) in kernels.items():
        src = np.ones(nbytes // 2, np.uint8)
        dst = np.empty_like(src)
        t = _interleave({"kernel": fn, "copyto": lambda d=dst, s=src: np.copyto(d, s)}, rounds, seconds)
        ratio = [c / k for k, c in zip(t["kernel"], t["copyto"])]
        out["rows"][f"{name} GB/s (vs np.copyto of the same bytes)"] = {
            "kernel_gbs": nbytes / statistics.median(t["kernel"]) / 1e9,
            "copyto_gbs": nbytes / statistics.median(t["copyto"]) / 1e9,
            "ratio": statistics.median(ratio),
        }
    return out


def _gemm_rows(rows, rounds, seconds):
    """The book's small products, fastbp vs NumPy, and the MultiLayerNet step's products on both routes."""
    import numpy as np

    from fastbp import _blas, _gemm
    from fastbp import _kernels as K
    from fastbp.bench.cases import gemm_only_step, step_gemm_flops

    rng = np.random.default_rng(1)
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((100, 784)).astype(dt)
        W = rng.standard_normal((784, 50)).astype(dt)
        d = rng.standard_normal((100, 50)).astype(dt)
        h, dW, dx = np.empty((100, 50), dt), np.empty((784, 50), dt), np.empty((100, 784), dt)
        shapes = {  # name: (fastbp call, NumPy call)
            "x @ W 100x784x50": (lambda: K.gemm(x, W, h), lambda: np.matmul(x, W, out=h)),
            "x.T @ d 784x100x50": (lambda: K.gemm(x, d, dW, trans_a=True), lambda: np.matmul(x.T, d, out=dW)),
            "d @ W.T 100x50x784": (lambda: K.gemm(d, W, dx, trans_b=True), lambda: np.matmul(d, W.T, out=dx)),
        }
        flops = 2.0 * 100 * 784 * 50
        for name, (f, g) in shapes.items():
            t = _interleave({"fastbp": f, "numpy": g}, rounds, seconds, gap=0.15)
            rows[f"GEMM {name} {np.dtype(dt).name} GFLOP/s (vs np.matmul)"] = {
                "kernel_gbs": flops / statistics.median(t["fastbp"]) / 1e9,
                "copyto_gbs": flops / statistics.median(t["numpy"]) / 1e9,
                "ratio": statistics.median([b / a for a, b in zip(t["fastbp"], t["numpy"])]),
                "unit": "GFLOP/s",
            }
    thr = _gemm._get_blas_threaded_min()
    route = thr or float(_blas.BLAS_THREADED_SUGGESTED)
    if _blas.info()["threading"] == "split" and _gemm._blas_threads_callback() and K._get_gemm_threads() > 1:
        import ctypes

        lib = _blas.ensure_loaded()["lib"]
        setter = ctypes.cast(lib.scipy_openblas_set_num_threads, ctypes.c_void_p).value
        step = gemm_only_step((784, 1024, 1024, 10), 256, np.float32)

        def routed():
            _gemm._set_blas_threaded(setter, route, _blas._usable_cpus())
            step()

        def pieces():
            _gemm._set_blas_threaded(setter, 0.0, 1)
            step()

        try:
            t = _interleave({"routed": routed, "pieces": pieces}, rounds, seconds)
        finally:
            _gemm._set_blas_threaded(setter, thr, _blas._usable_cpus())
        fl = step_gemm_flops(256, (784, 1024, 1024, 10))
        rows["MultiLayerNet b256 step GEMMs: OpenBLAS-threaded route GFLOP/s (vs all in pieces)"] = {
            "kernel_gbs": fl / statistics.median(t["routed"]) / 1e9,
            "copyto_gbs": fl / statistics.median(t["pieces"]) / 1e9,
            "ratio": statistics.median([b / a for a, b in zip(t["routed"], t["pieces"])]),
            "unit": "GFLOP/s",
        }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbp.bench.paths", description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", nargs="+", default=["native", "avx2", "baseline"], choices=PATHS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=0.1)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.rounds, a.seconds)))
        return 0
    res = {}
    for path in a.paths:
        try:
            env, notes = child_environment(path)
        except ValueError as e:
            sys.stderr.write(f"fastbp: {e}; skipped\n")
            continue
        for n in notes:
            sys.stderr.write(f"fastbp: note: {n}\n")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastbp.bench.paths",
                "--worker",
                "--rounds",
                str(a.rounds),
                "--seconds",
                str(a.seconds),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if r.returncode != 0:
            raise SystemExit(f"path {path}: {r.stderr[-2000:]}")
        res[path] = json.loads(r.stdout.strip().splitlines()[-1])
        sys.stderr.write(f"{path}: done\n")
    cols = list(res)
    if not cols:
        return 2
    for c in cols:
        print(f"{c}: " + " / ".join(line.strip() for line in format_kernels(res[c]["kernels"], c)[1:]))
    print("| row | " + " | ".join(f"{c}: {res[c]['path']} kernels, OpenBLAS {res[c]['core']}" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in res[cols[0]]["rows"]:
        cells = []
        for c in cols:
            v = res[c]["rows"].get(row)
            if v is None:
                cells.append("-")
            elif "torch_s" in v:
                cells.append(f"{v['fastbp_s'] * 1e3:.2f} ms vs {v['torch_s'] * 1e3:.2f} ms: {v['ratio']:.2f}x")
            else:
                unit = v.get("unit", "GB/s")
                cells.append(f"{v['kernel_gbs']:.1f} vs {v['copyto_gbs']:.1f} {unit}: {v['ratio']:.2f}x")
        print(f"| {row} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
