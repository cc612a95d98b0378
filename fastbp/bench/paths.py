"""Speed of fastbp's kernels on each SIMD path of this machine (issue 11 items 2 and 3): one column per path.

Each path runs in its own subprocess with FASTBP_DISABLE_CPU_FEATURES set (native: unset; avx2: AVX512F;
baseline: AVX), which moves fastbp's kernels and its OpenBLAS core type together (see fastbp/_simd.h).  Rows:

* softmax cross-entropy forward+backward (4096, 1000) float32: fastbp's layer vs PyTorch eager
  (``F.cross_entropy`` + backward, as in ``fastbp bench``), interleaved rounds, median of per-round ratios;
* memory-bound kernels on 2**23 float32 elements (32 MiB per array): ReLU forward/backward, sigmoid forward, the
  SGD and Adam updates; GB/s counts every byte read and written once, and the reference is ``np.copyto`` of
  an array holding the same number of bytes as the kernel moves in total, divided by two (so copyto moves the
  same bytes), timed in the same interleaved rounds.

    python -m fastbp.bench.paths                 # native, avx2, baseline
    python -m fastbp.bench.paths --paths avx2 --rounds 9
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

PATH_ENV = {"native": None, "avx2": "AVX512F", "baseline": "AVX"}
N = 1 << 23


def _interleave(impls, rounds, seconds):
    from fastbp.bench.harness import _time_batch, calibrate

    numbers = {k: calibrate(f, seconds)[0] for k, f in impls.items()}
    times = {k: [] for k in impls}
    names = list(impls)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastbp.bench.paths", description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", nargs="+", default=list(PATH_ENV), choices=list(PATH_ENV))
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
        env = {k: v for k, v in os.environ.items() if k != "FASTBP_DISABLE_CPU_FEATURES"}
        if PATH_ENV[path]:
            env["FASTBP_DISABLE_CPU_FEATURES"] = PATH_ENV[path]
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
                cells.append(f"{v['kernel_gbs']:.1f} vs {v['copyto_gbs']:.1f} GB/s: {v['ratio']:.2f}x")
        print(f"| {row} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
