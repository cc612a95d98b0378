"""Per-layer time of one training step: where a small network's step goes besides its GEMMs.

Each layer's ``forward``/``backward`` of the network is wrapped (on the instance, removed afterwards) by a timer;
the step is run in a tight loop (no idle gap: the wrappers' own cost, ~0.1-0.2 us per call, is included in each
layer's figure).  Reported per layer: the median time per call; per step: the median step time, the median of
the layers' sum within each step, and the rest (the optimizer, the network's own Python, the book's NumPy update).

Networks (the bench's shapes):

* ``own-f32`` / ``own-f64``: fastbp's own ``nets.TwoLayerNet`` 784-50-10, batch 100, integer labels, with
  ``fastbp.optimizer.SGD`` (the ``train step TwoLayerNet`` rows of ``python -m fastbp bench``); its ``gradient``
  runs the Relu on Affine1's output itself (no Relu layer call: that ReLU's time is in the rest);
* ``book``: the book's ch05 TwoLayerNet on ``fastbp.layers`` (float64 weights, float32 images, float64 one-hot
  labels) with the book's NumPy SGD step;
* ``book-mlp``: the book's MultiLayerNet 784-100x4-10 on ``fastbp.layers``, batch 128, with the book's NumPy Adam.

    python -m fastbp.bench.profile                       # every network
    python -m fastbp.bench.profile --nets own-f32 book --steps 3000
"""

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict

import numpy as np

NETS = ("own-f32", "own-f64", "book", "book-mlp")


def _make(name, seed=0):
    """(network, step callable) for one of NETS."""
    from fastbp import layers as fast_layers
    from fastbp import nets, optimizer
    from fastbp.bench.book import BookAdam, BookMultiLayerNet, BookTwoLayerNet, book_train_step

    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    if name in ("own-f32", "own-f64"):
        dt = np.float32 if name == "own-f32" else np.float64
        net = nets.TwoLayerNet(784, 50, 10, dtype=dt)
        opt = optimizer.SGD(lr=0.01)
        x = rng.random((100, 784)).astype(dt)
        t = rng.integers(0, 10, 100)
        return net, lambda: opt.update(net.params, net.gradient(x, t))
    if name == "book":
        net = BookTwoLayerNet(784, 50, 10, layers=fast_layers)
        x = rng.random((100, 784)).astype(np.float32)
        t = np.eye(10)[rng.integers(0, 10, 100)]
        return net, lambda: book_train_step(net, x, t, 0.01)
    if name == "book-mlp":
        net = BookMultiLayerNet(784, [100] * 4, 10, layers=fast_layers)
        opt = BookAdam(0.001)
        x = rng.random((128, 784)).astype(np.float32)
        t = rng.integers(0, 10, 128)
        return net, lambda: opt.update(net.params, net.gradient(x, t))
    raise ValueError(f"unknown network {name!r}; choose from {NETS}")


def _last_layer(net):
    return getattr(net, "lastLayer", None) or net.last_layer


def profile(net, step, steps=2000, warmup=None):
    """Time `steps` calls of `step` with every layer of `net` (its ``layers`` and last layer) wrapped.

    Returns a dict: ``layers`` (OrderedDict "<layer>.forward"/"<layer>.backward" -> median us per call, in call
    order), ``step_us`` (median step), ``layers_us`` (median over the steps of the layers' sum in that step; never
    above ``step_us``, as each step's sum is part of that step) and ``rest_us`` (step_us - layers_us)."""
    from fastbp import _threads

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup = max(1, steps // 5) if warmup is None else warmup
    named = list(net.layers.items()) + [("lastLayer", _last_layer(net))]
    calls = OrderedDict()
    in_step = [0.0]
    clock = time.perf_counter

    def wrap(layer, meth, key):
        inner = getattr(layer, meth)  # the bound method of the class
        times = calls.setdefault(key, [])

        def timed(*args, **kwargs):
            t0 = clock()
            out = inner(*args, **kwargs)
            dt = clock() - t0
            times.append(dt)
            in_step[0] += dt
            return out

        setattr(layer, meth, timed)

    for name, layer in named:
        for meth in ("forward", "backward"):
            wrap(layer, meth, f"{name}.{meth}")
    try:
        for _ in range(warmup):
            step()
        for times in calls.values():
            times.clear()
        step_t, layer_t = [], []
        stats_were = _threads.pool_stats(True)  # the pool times its regions during the timed steps only
        try:
            pool0 = _threads.pool_info()
            for _ in range(steps):
                in_step[0] = 0.0
                t0 = clock()
                step()
                step_t.append(clock() - t0)
                layer_t.append(in_step[0])
            pool1 = _threads.pool_info()
        finally:
            _threads.pool_stats(stats_were)
    finally:
        for _, layer in named:
            for meth in ("forward", "backward"):
                layer.__dict__.pop(meth, None)
    order = [k for k in calls if calls[k] and k.endswith("forward")] + [
        k for k in reversed(calls) if calls[k] and k.endswith("backward")
    ]  # the order a step calls them in
    layers = OrderedDict((k, statistics.median(calls[k]) * 1e6) for k in order)
    step_us = statistics.median(step_t) * 1e6
    layers_us = statistics.median(layer_t) * 1e6
    return {
        "layers": layers,
        "step_us": step_us,
        "layers_us": layers_us,
        "rest_us": step_us - layers_us,
        "pool": _pool_use(pool0, pool1, steps),
    }


def _pool_use(before, after, steps):
    """What fastbp's worker pool did in the timed steps (from two _threads.pool_info() readings): regions per step,
    and per region the caller's time in its own blocks and waiting for the workers' blocks after them; per worker
    block its time; per worker and region the delay from the region's opening to its first block (means,
    microseconds; None where nothing ran)."""
    keys = (
        "regions", "caller_block_us", "caller_wait_us", "worker_blocks", "worker_block_us", "worker_starts",
        "worker_start_us",
    )  # fmt: skip
    d = {k: after[k] - before[k] for k in keys}
    r, w, ws = d["regions"], d["worker_blocks"], d["worker_starts"]
    return {
        "regions_per_step": r / steps,
        "caller_block_us": d["caller_block_us"] / r if r else None,
        "caller_wait_us": d["caller_wait_us"] / r if r else None,
        "worker_blocks_per_region": w / r if r else None,
        "worker_block_us": d["worker_block_us"] / w if w else None,
        "worker_start_us": d["worker_start_us"] / ws if ws else None,
    }


def _report(name, r, out):
    print(f"{name}: step {r['step_us']:.1f} us = layers {r['layers_us']:.1f} + rest {r['rest_us']:.1f}", file=out)
    for k, v in r["layers"].items():
        print(f"  {k:32s} {v:8.1f} us", file=out)
    p = r["pool"]
    if p["regions_per_step"]:
        line = (
            f"  pool: {p['regions_per_step']:.1f} regions per step; per region the caller ran its blocks "
            f"{p['caller_block_us']:.1f} us and then waited {p['caller_wait_us']:.1f} us for the workers'"
        )
        if p["worker_block_us"] is not None:
            line += (
                f"; per worker block {p['worker_block_us']:.1f} us; a worker started its first block "
                f"{p['worker_start_us']:.1f} us after the region opened"
            )
        print(line, file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastbp.bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    ap.add_argument("--steps", type=int, default=2000, help="timed steps per network (default 2000)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = ap.parse_args(argv)
    from fastbp import _kernels
    from fastbp.cli import _cpu_model

    path = _kernels.simd_info()["path"]
    print(f"cpu: {_cpu_model()}, SIMD path {path}; tight loop, median per call", file=sys.stdout)
    results = {}
    for name in args.nets:
        net, step = _make(name)
        results[name] = profile(net, step, args.steps)
        _report(name, results[name], sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
