"""Issue 9's speed table: book 1's convolutional layers and networks, fastbp vs the book's NumPy layers vs PyTorch.

    python benchmarks/conv_compare.py [--rounds 7] [--cases scn32,scn64,deep32,book,pool,floor,alloc]

Every case times its implementations in interleaved rounds (each round runs every implementation once for a fixed
number of calls, after a warm-up; the order rotates each round, and each timing follows 0.15 s of idle and one
untimed call), and reports per-implementation medians of the per-call time and the median of the per-round ratios. A
training step is ``net.gradient(x, t)`` plus an SGD update:

* fastbp: ``fastbp.nets.SimpleConvNet`` / ``DeepConvNet`` (``reuse=True`` workspaces) with ``fastbp.optimizers.SGD``;
* numpy: the same nets with ``backend="reference"`` (fastbp.reference: the book's algorithms in plain NumPy,
  im2col with its loop over filter positions) and the book's SGD (``p -= lr * g``);
* torch: PyTorch eager on the CPU, the same layers (``Conv2d``, ``ReLU``, ``MaxPool2d``, ``Linear``, ``Dropout``,
  ``CrossEntropyLoss``) and ``optim.SGD`` (``zero_grad``, ``backward``, ``step``).
"book" is the book's own ``SimpleConvNet`` structure and loop with float64 weights fed float32 images, built from
``fastbp.layers`` with default arguments (the one-line import swap) vs from the plain NumPy layers.
"floor" times only the matrix products of the fastbp float32 SimpleConvNet / DeepConvNet steps: the same
multiply-adds (no dx product for the first layer, which the nets' ``gradient`` skips), each convolution's as
batch-wide GEMMs on preallocated operands (the step runs them per sample; its wide-layout layers also multiply
(fw - 1) / OW garbage columns, which the floor does not count).
"""

import argparse
import gc
import statistics
import time
import tracemalloc

import numpy as np

from fastbp import _kernels
from fastbp.bench.harness import DEFAULT_GAP, interleave
from fastbp import layers as fast_layers
from fastbp.nets import DeepConvNet, SimpleConvNet
from fastbp.optimizers import SGD

try:
    import torch
except ImportError:  # torch is optional
    torch = None


def _digits(n, dtype=np.float32):
    d = np.load(__file__.rsplit("/", 2)[0] + "/fastbp/data/mnist-5k.npz")
    return (d["images"][:n] / 255).astype(dtype).reshape(n, 1, 28, 28), d["labels"][:n].astype(np.int64)


def book_sgd(params, grads, lr=0.01):
    for k in params:
        params[k] -= lr * grads[k]


def net_step(net, opt, x, t):
    if opt is None:
        return lambda: book_sgd(net.params, net.gradient(x, t))
    return lambda: opt.update(net.params, net.gradient(x, t))


def torch_step(model, x, t, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), t)
        loss.backward()
        opt.step()

    return step


def torch_simple(dtype):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 30, 5),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(30 * 12 * 12, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    ).to(dtype)


def torch_deep(dtype):
    nn = torch.nn
    layers, c = [], 1
    for i, (f, pad) in enumerate([(16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1)]):
        layers += [nn.Conv2d(c, f, 3, padding=pad), nn.ReLU()]
        if i % 2:
            layers.append(nn.MaxPool2d(2, 2))
        c = f
    layers += [nn.Flatten(), nn.Linear(64 * 4 * 4, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 10), nn.Dropout(0.5)]
    return nn.Sequential(*layers).to(dtype)


def measure(impls, rounds, calls, warmup=2, gap=DEFAULT_GAP):
    """{name: [seconds per call, one per round]}: `warmup` calls of each, then fastbp bench's interleaved rounds
    (fastbp.bench.harness.interleave: the order rotated by one each round, each batch of `calls` calls after `gap`
    idle seconds, so other libraries' thread pools have spun down, and one untimed call), a garbage collection
    before each gap."""
    for f in impls.values():
        for _ in range(warmup):
            f()
    numbers = calls if isinstance(calls, dict) else dict.fromkeys(impls, calls)

    def collect_and_sleep(seconds):
        gc.collect()
        time.sleep(seconds)

    times, _ = interleave(impls, rounds, numbers, gap=gap, warm_calls=dict.fromkeys(impls, 1), sleep=collect_and_sleep)
    return times


def report(title, times, base="fastbp"):
    med = {k: statistics.median(v) for k, v in times.items()}
    cols = [f"{k} {med[k] * 1e3:8.2f} ms" for k in times]
    ratios = [
        f"{k}/{base} {statistics.median(o / b for o, b in zip(times[k], times[base])):5.2f}x"
        for k in times
        if k != base
    ]
    print(f"{title:58s} " + " | ".join(cols) + ("  ||  " + ", ".join(ratios) if ratios else ""), flush=True)
    return med


def case_simple(dtype, rounds):
    x, t = _digits(100, dtype)
    np.random.seed(0)
    fast = SimpleConvNet(dtype=dtype)
    np.random.seed(0)
    ref = SimpleConvNet(dtype=dtype, backend="reference")
    impls = {"fastbp": net_step(fast, SGD(lr=0.01), x, t), "numpy": net_step(ref, None, x, t)}
    calls = {"fastbp": 10, "numpy": 1}
    if torch is not None:
        tdt = torch.float32 if dtype == np.float32 else torch.float64
        impls["torch"] = torch_step(torch_simple(tdt), torch.from_numpy(x).to(tdt), torch.from_numpy(t))
        calls["torch"] = 5
    report(f"SimpleConvNet b100 training step, {np.dtype(dtype).name}", measure(impls, rounds, calls))


def case_deep(dtype, rounds):
    x, t = _digits(100, dtype)
    np.random.seed(0)
    fast = DeepConvNet(dtype=dtype)
    impls = {"fastbp": net_step(fast, SGD(lr=0.01), x, t)}
    calls = {"fastbp": 2}
    if torch is not None:
        tdt = torch.float32 if dtype == np.float32 else torch.float64
        impls["torch"] = torch_step(torch_deep(tdt), torch.from_numpy(x).to(tdt), torch.from_numpy(t))
        calls["torch"] = 2
    np.random.seed(0)
    ref = DeepConvNet(dtype=dtype, backend="reference")
    impls["numpy"] = net_step(ref, None, x, t)
    calls["numpy"] = 1
    report(f"DeepConvNet b100 training step, {np.dtype(dtype).name}", measure(impls, rounds, calls, warmup=1))


def case_book(rounds):
    """The book's SimpleConvNet (float64 weights from randn, float32 images) with the layers module swapped."""
    x, t = _digits(100, np.float32)
    np.random.seed(0)
    swapped = SimpleConvNet(backend=fast_layers)  # fastbp.layers, default arguments (no reuse)
    np.random.seed(0)
    book = SimpleConvNet(backend="reference")
    impls = {"fastbp": net_step(swapped, None, x, t), "numpy": net_step(book, None, x, t)}
    report("book's SimpleConvNet, layers swapped (f64 W, f32 x)", measure(impls, rounds, {"fastbp": 5, "numpy": 1}))


def case_pool(rounds, dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 30, 24, 24)).astype(dtype)
    d = rng.standard_normal((100, 30, 12, 12)).astype(dtype)
    fast = fast_layers.Pooling(2, 2, 2, reuse=True)
    from fastbp import reference

    ref = reference.Pooling(2, 2, 2)
    impls = {"fastbp": lambda: (fast.forward(x), fast.backward(d)), "numpy": lambda: (ref.forward(x), ref.backward(d))}
    calls = {"fastbp": 50, "numpy": 2}
    if torch is not None:
        xt = torch.from_numpy(x).requires_grad_(True)
        dt = torch.from_numpy(d)

        def tstep():
            xt.grad = None
            out = torch.nn.functional.max_pool2d(xt, 2, 2)
            out.backward(dt)

        impls["torch"] = tstep
        calls["torch"] = 20
    report("max pooling 2x2 fwd+bwd (100, 30, 24, 24) float32", measure(impls, rounds, calls))


def _conv_gemms(n, c, h, w, fn, f, pad, dtype, need_dx):
    """The GEMM calls of one Convolution forward + backward (fastbp's shapes)."""
    oh, ow = h + 2 * pad - f + 1, w + 2 * pad - f + 1
    m, k = n * oh * ow, c * f * f
    col = np.random.rand(m, k).astype(dtype)
    W2 = np.random.rand(fn, k).astype(dtype)
    rows = np.empty((m, fn), dtype)
    dW = np.empty((fn, k), dtype)
    dcol = np.empty((m, k), dtype)
    calls = [lambda: _kernels.gemm(col, W2, rows, trans_b=True), lambda: _kernels.gemm(rows, col, dW, trans_a=True)]
    if need_dx:
        calls.append(lambda: _kernels.gemm(rows, W2, dcol))
    return calls


def _affine_gemms(n, d, m, dtype, need_dx=True):
    x = np.random.rand(n, d).astype(dtype)
    W = np.random.rand(d, m).astype(dtype)
    out = np.empty((n, m), dtype)
    dW = np.empty((d, m), dtype)
    dx = np.empty((n, d), dtype)
    calls = [lambda: _kernels.gemm(x, W, out), lambda: _kernels.gemm(x, out, dW, trans_a=True)]
    if need_dx:
        calls.append(lambda: _kernels.gemm(out, W, dx, trans_b=True))
    return calls


def case_floor(rounds):
    dt = np.float32
    x, t = _digits(100, dt)
    simple = (
        _conv_gemms(100, 1, 28, 28, 30, 5, 0, dt, False)
        + _affine_gemms(100, 4320, 100, dt)
        + _affine_gemms(100, 100, 10, dt)
    )
    deep = []
    c, s = 1, 28
    for i, (f, pad) in enumerate([(16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1)]):
        deep += _conv_gemms(100, c, s, s, f, 3, pad, dt, i > 0)
        s = s + 2 * pad - 2
        if i % 2:
            s //= 2
        c = f
    deep += _affine_gemms(100, 1024, 50, dt) + _affine_gemms(100, 50, 10, dt)
    np.random.seed(0)
    snet, dnet = SimpleConvNet(dtype=dt), DeepConvNet(dtype=dt)
    impls = {"fastbp": net_step(snet, SGD(lr=0.01), x, t), "gemms": lambda: [g() for g in simple]}
    report("SimpleConvNet f32 step vs its GEMMs alone", measure(impls, rounds, 10))
    impls = {"fastbp": net_step(dnet, SGD(lr=0.01), x, t), "gemms": lambda: [g() for g in deep]}
    report("DeepConvNet f32 step vs its GEMMs alone", measure(impls, rounds, 2))


def case_alloc():
    for name, net, dt in (("SimpleConvNet", SimpleConvNet, np.float32), ("DeepConvNet", DeepConvNet, np.float32)):
        x, t = _digits(100, dt)
        np.random.seed(0)
        step = net_step(net(dtype=dt), SGD(lr=0.01), x, t)
        for _ in range(3):
            step()
        gc.collect()
        tracemalloc.start()
        step()
        tracemalloc.reset_peak()
        cur0, _ = tracemalloc.get_traced_memory()
        step()
        cur1, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{name} b100 f32 step after warm-up: peak {peak - cur0} bytes above the start, {cur1 - cur0} kept")


CASES = {
    "scn32": lambda r: case_simple(np.float32, r),
    "scn64": lambda r: case_simple(np.float64, r),
    "deep32": lambda r: case_deep(np.float32, max(3, r // 2)),
    "book": case_book,
    "pool": case_pool,
    "floor": case_floor,
    "alloc": lambda r: case_alloc(),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default: torch's own; match FASTBP_NUM_THREADS for a fair table)",
    )
    args = p.parse_args(argv)
    if torch is not None and args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with open("/proc/cpuinfo") as f:
        info = f.read()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    print(
        f"CPU: {model}, AVX-512: {'avx512f' in info}; threads: torch {torch.get_num_threads() if torch else '-'}, "
        f"fastbp GEMM {_kernels._get_gemm_threads()}; {args.rounds} interleaved rounds, medians"
    )
    for name in args.cases.split(","):
        CASES[name](args.rounds)


if __name__ == "__main__":
    main()
