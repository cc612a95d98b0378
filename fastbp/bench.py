"""``python -m fastbp bench``: the curated speed benchmark of fastbp against plain NumPy (and PyTorch).

Every row times fastbp, the NumPy baseline and, when it is installed, PyTorch eager on the CPU, on the same
inputs, after checking once that they compute the same thing (``allclose`` on the gradients or outputs).  The
speed targets of the project are printed next to each row with PASS/MISS.

How the numbers are taken (interleaved rounds)
----------------------------------------------
* A row is measured in R rounds.  In each round every implementation times one batch of ``number`` calls back
  to back (``number`` is calibrated once so that a batch lasts about 20 ms), in an order that rotates from
  round to round, so slow drifts of the machine hit all implementations alike.
* The reported time of an implementation is the median over the rounds of its per-call time; the reported
  speedup ``fastbp vs X`` is the median over the rounds of the per-round ratio ``t_X / t_fastbp``.  A median
  ignores the rounds spoilt by other processes of a shared machine.
* Thread pools do not leak into each other's timings.  NumPy's OpenBLAS pool, fastbp's OpenMP team (which also
  runs fastbp's GEMM pieces, see :mod:`fastbp._blas`) and PyTorch's pool are separate sets of threads; an OpenBLAS worker
  keeps spinning on a core for about 0.1 s after a GEMM, and on a 2-core machine that steals a core from
  whatever runs next (the ``interference`` line of the header measures it: fastbp's step timed right after a
  NumPy batch against after an idle gap, and the reverse).  Measured on the project's 2-core machine: the
  TwoLayerNet batch-100 step of fastbp ran 1.9-2.0x slower right after a NumPy batch, NumPy's 1.85-2.4x slower
  right after fastbp's, and NumPy's OpenBLAS worker kept a CPU busy for 105 ms after its last call.  So before
  each timed batch the process sleeps ``--gap`` seconds (default 0.15 s, longer than the measured spin-down;
  the header prints the spin-down of the run and warns when it exceeds the gap), then makes untimed warm-up
  calls of the same implementation for about 4 ms (at least 2; they wake its own pool), then times the batch.
  The garbage collector is off during the timed batches only.
* GFLOP/s of the GEMM-bound rows count the matrix products a training step needs: forward ``x @ W`` of every
  layer, ``dW`` of every layer and ``dx`` of all layers but the first.  The GEMM peak is the best rate of a
  2048^3 ``sgemm``/``dgemm`` through fastbp's BLAS (``fastbp._kernels.gemm``) and through NumPy's
  (``np.matmul``), best of several calls; the "GEMM floor" of a step is its GEMM FLOPs over the best sgemm
  rate of the two.
* NumPy allocation in a fastbp training step is measured with :mod:`tracemalloc` (NumPy's own tracing domain,
  so Python objects do not count) over 10 steps after warm-up, sampling the live NumPy bytes at every Python
  and C function call and return, so temporaries freed within the step are seen too.

The NumPy baseline is :mod:`fastbp.reference` (the same layers in plain NumPy) with the book's SGD update
(``p -= lr * g``), and, for the "book" row, a transcription of the book's own ``ch05/two_layer_net.py`` with
its ``common/layers.py`` (:class:`BookLayers`) against the same class with :mod:`fastbp.layers` dropped in.
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections import OrderedDict

import numpy as np

__all__ = ["add_parser", "main", "run", "BookLayers", "BookTwoLayerNet", "Case", "Target", "interleave",
           "summarize", "format_table", "numpy_alloc_per_call", "step_gemm_flops", "fmt_time", "build_cases",
           "train_case", "book_case", "softmax_case", "relu_case", "gemm_only_step", "mnist_batch", "BookSGD",
           "DEFAULT_GAP", "DEFAULT_ROUNDS", "QUICK_ROUNDS"]

DEFAULT_ROUNDS = 15
QUICK_ROUNDS = 5
DEFAULT_GAP = 0.15          # seconds of idle before each timed batch (OpenBLAS workers spin ~0.1 s)
BATCH_TIME = 0.02           # seconds per timed batch
WARM_TIME = 0.004           # seconds of untimed warm-up calls before each batch (at least 2 calls)
PEAK_SIZE = 2048
BASE = "fastbp"
SWEEP_BATCHES = (1, 4, 16, 64, 100, 256, 1024)
BUSY = 0.1                  # fraction of the CPUs used by other processes above which a row is flagged


# ---------------------------------------------------------------------------------------------------------
# small helpers
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


def step_gemm_flops(batch, sizes):
    """FLOPs of the matrix products of one training step of an MLP with layer sizes `sizes` (input first):
    forward x @ W for every layer, dW = x.T @ dout for every layer, dx = dout @ W.T for all but the first."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    fwd = sum(2.0 * batch * d * m for d, m in pairs)
    dx = sum(2.0 * batch * d * m for d, m in pairs[1:])
    return 2 * fwd + dx


def _close(a, b, rtol, what):
    """max |a - b| <= rtol * max |b| (a scale-aware allclose); returns the relative difference."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ {a.shape} vs {b.shape}")
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    rel = diff / scale if scale > 0 else diff
    if not rel <= rtol:
        raise AssertionError(f"{what}: max |diff| = {diff:.3g} is {rel:.3g} of max |value| {scale:.3g} "
                             f"(allowed {rtol:g})")
    return rel


_RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}


def _import_torch():
    try:
        import torch
    except Exception:                      # not installed, or broken: the torch columns are skipped
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


# ---------------------------------------------------------------------------------------------------------
# the book's code, transcribed (the baseline users switch from)
# ---------------------------------------------------------------------------------------------------------
def _book_softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    return np.exp(x) / np.sum(np.exp(x), axis=-1, keepdims=True)


def _book_cross_entropy_error(y, t):
    if y.ndim == 1:
        t = t.reshape(1, t.size)
        y = y.reshape(1, y.size)
    if t.size == y.size:                 # one-hot targets -> label indices
        t = t.argmax(axis=1)
    batch_size = y.shape[0]
    return -np.sum(np.log(y[np.arange(batch_size), t] + 1e-7)) / batch_size


class BookLayers:
    """The book's ``common/layers.py`` (Relu, Sigmoid, Affine, SoftmaxWithLoss) in plain NumPy, as written
    there: new arrays at every call, ``Relu.backward`` zeroing ``dout`` in place, ``-log(y + 1e-7)`` loss."""

    softmax = staticmethod(_book_softmax)
    cross_entropy_error = staticmethod(_book_cross_entropy_error)

    class Relu:
        def __init__(self):
            self.mask = None

        def forward(self, x):
            self.mask = x <= 0
            out = x.copy()
            out[self.mask] = 0
            return out

        def backward(self, dout):
            dout[self.mask] = 0
            return dout

    class Sigmoid:
        def __init__(self):
            self.out = None

        def forward(self, x):
            self.out = 1 / (1 + np.exp(-x))
            return self.out

        def backward(self, dout):
            return dout * (1.0 - self.out) * self.out

    class Affine:
        def __init__(self, W, b):
            self.W = W
            self.b = b
            self.x = None
            self.original_x_shape = None
            self.dW = None
            self.db = None

        def forward(self, x):
            self.original_x_shape = x.shape
            self.x = x.reshape(x.shape[0], -1)
            return np.dot(self.x, self.W) + self.b

        def backward(self, dout):
            dx = np.dot(dout, self.W.T)
            self.dW = np.dot(self.x.T, dout)
            self.db = np.sum(dout, axis=0)
            return dx.reshape(*self.original_x_shape)

    class SoftmaxWithLoss:
        def __init__(self):
            self.loss = None
            self.y = None
            self.t = None

        def forward(self, x, t):
            self.t = t
            self.y = _book_softmax(x)
            self.loss = _book_cross_entropy_error(self.y, self.t)
            return self.loss

        def backward(self, dout=1):
            batch_size = self.t.shape[0]
            if self.t.size == self.y.size:
                return (self.y - self.t) / batch_size
            dx = self.y.copy()
            dx[np.arange(batch_size), self.t] -= 1
            return dx / batch_size


class BookTwoLayerNet:
    """The book's ``ch05/two_layer_net.py`` with the layers module as a parameter: pass ``BookLayers`` for the
    book's NumPy layers or ``fastbp.layers`` for the drop-in (weights float64 from ``np.random.randn``)."""

    def __init__(self, input_size, hidden_size, output_size, weight_init_std=0.01, layers=BookLayers):
        self.params = {}
        self.params["W1"] = weight_init_std * np.random.randn(input_size, hidden_size)
        self.params["b1"] = np.zeros(hidden_size)
        self.params["W2"] = weight_init_std * np.random.randn(hidden_size, output_size)
        self.params["b2"] = np.zeros(output_size)

        self.layers = OrderedDict()
        self.layers["Affine1"] = layers.Affine(self.params["W1"], self.params["b1"])
        self.layers["Relu1"] = layers.Relu()
        self.layers["Affine2"] = layers.Affine(self.params["W2"], self.params["b2"])
        self.lastLayer = layers.SoftmaxWithLoss()

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        return self.lastLayer.forward(self.predict(x), t)

    def accuracy(self, x, t):
        y = np.argmax(self.predict(x), axis=1)
        if t.ndim != 1:
            t = np.argmax(t, axis=1)
        return np.sum(y == t) / float(x.shape[0])

    def numerical_gradient(self, x, t):
        from fastbp.gradient import numerical_gradient
        loss_W = lambda W: self.loss(x, t)  # noqa: E731 (the book's form)
        return {key: numerical_gradient(loss_W, self.params[key]) for key in ("W1", "b1", "W2", "b2")}

    def gradient(self, x, t):
        self.loss(x, t)
        dout = self.lastLayer.backward(1)
        for layer in reversed(list(self.layers.values())):
            dout = layer.backward(dout)
        grads = {}
        grads["W1"], grads["b1"] = self.layers["Affine1"].dW, self.layers["Affine1"].db
        grads["W2"], grads["b2"] = self.layers["Affine2"].dW, self.layers["Affine2"].db
        return grads


def book_train_step(network, x_batch, t_batch, learning_rate=0.1):
    """One iteration of the book's ch05/train_neuralnet.py loop (without the batch draw)."""
    grad = network.gradient(x_batch, t_batch)
    for key in ("W1", "b1", "W2", "b2"):
        network.params[key] -= learning_rate * grad[key]


class BookSGD:
    """The book's SGD (common/optimizer.py): params[key] -= lr * grads[key] (the NumPy side of a step)."""

    def __init__(self, lr=0.01):
        self.lr = lr

    def update(self, params, grads):
        for key in params.keys():
            params[key] -= self.lr * grads[key]


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
_MNIST = {}


def mnist_batch(n, one_hot=False, dtype=np.float32, offset=0):
    """n rows of the bundled MNIST sample (normalized float32 images, cycling if n > 4000) as `dtype`, with
    int64 labels or float64 one-hot rows; random data of the same kind if the sample cannot be loaded."""
    if "x" not in _MNIST:
        try:
            from fastbp.datasets import load_mnist
            (x, t), _ = load_mnist(normalize=True, one_hot_label=False, source="sample", verbose=False)
        except Exception:
            rng = np.random.default_rng(0)
            x = rng.random((4000, 784), dtype=np.float32)
            t = rng.integers(0, 10, 4000)
        _MNIST["x"] = np.ascontiguousarray(x, dtype=np.float32)
        _MNIST["t"] = np.asarray(t, dtype=np.int64)
    if n < 0:
        raise ValueError(f"batch size must be >= 0, got {n}")
    idx = (offset + np.arange(n)) % _MNIST["x"].shape[0]
    x = np.ascontiguousarray(_MNIST["x"][idx], dtype=dtype)
    t = _MNIST["t"][idx]
    if one_hot:
        oh = np.zeros((n, 10))
        oh[np.arange(n), t] = 1.0
        t = oh
    return x, t


def net_batch(n, sizes, dtype=np.float32):
    """(x, int64 labels) for an MLP with layer sizes `sizes`: MNIST rows for 784 inputs and 10 classes, else
    uniform [0, 1) inputs with random labels (tiny test nets)."""
    if sizes[0] == 784 and sizes[-1] == 10:
        return mnist_batch(n, dtype=dtype)
    rng = np.random.default_rng(7)
    return rng.random((n, sizes[0])).astype(dtype), rng.integers(0, sizes[-1], n).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# timing machinery
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


def interleave(impls, rounds, numbers, *, gap=DEFAULT_GAP, warm_calls=None, sleep=time.sleep,
               timer=time.perf_counter, log=None):
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


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------
class Target:
    """A speed target: kind 'speedup' (median t_vs / t_fastbp >= threshold), 'floor' (t_fastbp / floor <=
    threshold) or 'alloc' (NumPy bytes per step <= threshold)."""

    def __init__(self, kind, threshold, vs=None):
        if kind not in ("speedup", "floor", "alloc"):
            raise ValueError(f"unknown target kind {kind!r}")
        self.kind, self.threshold, self.vs = kind, threshold, vs

    def describe(self):
        if self.kind == "speedup":
            return f">={self.threshold:g}x {self.vs}"
        if self.kind == "floor":
            return f"<={self.threshold:g}x GEMM floor"
        return f"<={self.threshold:g} B/step"

    def evaluate(self, row):
        """(value, 'PASS' | 'MISS' | 'SKIP')."""
        if self.kind == "speedup":
            v = row.get("speedup", {}).get(self.vs)
            if v is None or not math.isfinite(v):
                return None, "SKIP"
            return v, "PASS" if v >= self.threshold else "MISS"
        if self.kind == "floor":
            v = row.get("floor_ratio")
            if v is None or not math.isfinite(v):
                return None, "SKIP"
            return v, "PASS" if v <= self.threshold else "MISS"
        v = row.get("bytes_per_step")
        if v is None:
            return None, "SKIP"
        return v, "PASS" if v <= self.threshold else "MISS"

    def to_json(self):
        return {"kind": self.kind, "threshold": self.threshold, "vs": self.vs, "text": self.describe()}


class Case:
    """One row: implementations (name -> zero-argument callable, fastbp first), a check run once before
    timing (returns a short text, raises AssertionError on a mismatch), GEMM FLOPs per call, targets."""

    def __init__(self, key, title, impls, check=None, flops=None, targets=(), extra=None, note=None):
        self.key, self.title, self.impls, self.check = key, title, impls, check
        self.flops, self.targets, self.extra, self.note = flops, list(targets), extra or {}, note


def _torch_mlp(torch, params, n_layers, dtype):
    """nn.Sequential(Linear, ReLU, ..., Linear) holding copies of params W1..Wn (transposed), b1..bn."""
    tdt = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
    mods = []
    for i in range(1, n_layers + 1):
        W, b = params[f"W{i}"], params[f"b{i}"]
        lin = torch.nn.Linear(W.shape[0], W.shape[1], dtype=tdt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if i < n_layers:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def train_case(key, title, sizes, batch, dtype, torch, targets, lr=0.1, with_gemm_only=False):
    """Training step (gradient + SGD update) of an MLP with layer sizes `sizes` and ReLU: fastbp.nets +
    fastbp.optimizers.SGD vs the reference-backend net + the book's SGD vs torch (Linear/ReLU, CrossEntropyLoss,
    backward, optim.SGD), all from the same initial weights; `with_gemm_only` adds the step's GEMMs alone."""
    from fastbp import nets, optimizers
    dtype = np.dtype(dtype)
    np.random.seed(1)
    hidden = list(sizes[1:-1])
    if len(hidden) == 1:
        make = lambda backend: nets.TwoLayerNet(sizes[0], hidden[0], sizes[-1], dtype=dtype,  # noqa: E731
                                                backend=backend)
    else:
        make = lambda backend: nets.MultiLayerNet(sizes[0], hidden, sizes[-1], dtype=dtype,  # noqa: E731
                                                  backend=backend)
    fnet = make("fastbp")
    rnet = make("reference")
    for k in fnet.params:
        rnet.params[k][...] = fnet.params[k]
    x, t = net_batch(batch, sizes, dtype)
    fopt = optimizers.SGD(lr=lr)
    ropt = BookSGD(lr=lr)
    n_layers = len(sizes) - 1

    def fastbp_step():
        fopt.update(fnet.params, fnet.gradient(x, t))

    def numpy_step():
        ropt.update(rnet.params, rnet.gradient(x, t))

    impls = OrderedDict([("fastbp", fastbp_step), ("numpy", numpy_step)])
    model = None
    if torch is not None:
        model = _torch_mlp(torch, fnet.params, n_layers, dtype)
        crit = torch.nn.CrossEntropyLoss()
        topt = torch.optim.SGD(model.parameters(), lr=lr)
        xt = torch.from_numpy(x)
        tt = torch.from_numpy(t)

        def torch_step():
            topt.zero_grad(set_to_none=False)
            loss = crit(model(xt), tt)
            loss.backward()
            topt.step()

        impls["torch"] = torch_step

    def check():
        fg = {k: np.array(v) for k, v in fnet.gradient(x, t).items()}
        rg = rnet.gradient(x, t)
        rtol = _RTOL[dtype]
        worst = 0.0
        for k in rg:
            worst = max(worst, _close(fg[k], rg[k], rtol, f"fastbp {k} vs numpy"))
        worst = max(worst, _close(fnet.lastLayer.loss, rnet.lastLayer.loss, rtol, "loss fastbp vs numpy"))
        text = f"grads fastbp~numpy {worst:.1e}"
        if model is not None:
            model.zero_grad(set_to_none=False)
            crit(model(xt), tt).backward()
            tw = 0.0
            lin = [m for m in model if isinstance(m, torch.nn.Linear)]
            for i, m in enumerate(lin, 1):
                tw = max(tw, _close(m.weight.grad.numpy().T, rg[f"W{i}"], rtol, f"torch W{i} vs numpy"))
                tw = max(tw, _close(m.bias.grad.numpy(), rg[f"b{i}"], rtol, f"torch b{i} vs numpy"))
            model.zero_grad(set_to_none=False)
            text += f", torch~numpy {tw:.1e}"
        return text

    flops = step_gemm_flops(batch, sizes)
    if with_gemm_only:
        impls["gemm-only"] = gemm_only_step(sizes, batch, dtype)
    return Case(key, title, impls, check, flops, targets)


def gemm_only_step(sizes, batch, dtype):
    """The matrix products of one training step alone, same shapes and transposes, via fastbp._kernels.gemm."""
    from fastbp import _kernels
    rng = np.random.default_rng(2)
    pairs = list(zip(sizes[:-1], sizes[1:]))
    xs = [rng.standard_normal((batch, d)).astype(dtype) for d, _ in pairs]
    Ws = [rng.standard_normal((d, m)).astype(dtype) for d, m in pairs]
    outs = [np.empty((batch, m), dtype) for _, m in pairs]
    dWs = [np.empty((d, m), dtype) for d, m in pairs]
    dxs = [np.empty((batch, d), dtype) for d, _ in pairs]
    gemm = _kernels.gemm
    L = len(pairs)

    def step():
        for i in range(L):
            gemm(xs[i], Ws[i], outs[i])
        for i in reversed(range(L)):
            if i > 0:
                gemm(outs[i], Ws[i], dxs[i], trans_b=True)
            gemm(xs[i], outs[i], dWs[i], trans_a=True)
    return step


def book_case(batch=100, lr=0.1):
    """The book's TwoLayerNet 784-50-10 and loop step (float64 weights, float32 images, one-hot labels):
    fastbp.layers dropped in vs the book's own layers (BookLayers), same initial weights."""
    from fastbp import layers as fast_layers
    np.random.seed(3)
    fnet = BookTwoLayerNet(784, 50, 10, layers=fast_layers)
    bnet = BookTwoLayerNet(784, 50, 10, layers=BookLayers)
    for k in fnet.params:
        bnet.params[k][...] = fnet.params[k]
    x, t = mnist_batch(batch, one_hot=True)         # float32 images, float64 one-hot (as load_mnist gives)

    impls = OrderedDict([("fastbp", lambda: book_train_step(fnet, x, t, lr)),
                         ("numpy", lambda: book_train_step(bnet, x, t, lr))])

    def check():
        fg = fnet.gradient(x, t)
        fg = {k: np.array(v) for k, v in fg.items()}
        bg = bnet.gradient(x, t)
        worst = max(_close(fg[k], bg[k], 1e-9, f"book net: fastbp layers {k} vs book layers") for k in bg)
        return f"grads fastbp~book {worst:.1e}"

    flops = step_gemm_flops(batch, (784, 50, 10))
    return Case("book-2l-b100", f"book TwoLayerNet 784-50-10 b{batch} (f64 W, f32 x)", impls, check, flops,
                [Target("speedup", 2.0, "numpy")],
                note="the book's ch05 TwoLayerNet + loop step; fastbp.layers vs the book's common/layers.py")


def softmax_case(n, c, torch, targets, reuse=False):
    """SoftmaxWithLoss forward + backward on (n, c) float32 logits with int64 labels: fastbp.layers vs
    fastbp.reference vs torch (F.cross_entropy + autograd.grad)."""
    from fastbp import layers as L, reference as R
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    t = rng.integers(0, c, n).astype(np.int64)
    fl = L.SoftmaxWithLoss(reuse=reuse)
    rl = R.SoftmaxWithLoss()

    def fastbp_fn():
        fl.forward(x, t)
        return fl.backward(1)

    def numpy_fn():
        rl.forward(x, t)
        return rl.backward(1)

    impls = OrderedDict([("fastbp", fastbp_fn), ("numpy", numpy_fn)])
    if torch is not None:
        import torch.nn.functional as F
        xt = torch.from_numpy(x).requires_grad_(True)
        tt = torch.from_numpy(t)

        def torch_fn():
            loss = F.cross_entropy(xt, tt)
            return torch.autograd.grad(loss, xt)[0]

        impls["torch"] = torch_fn

    def check():
        a = np.array(fastbp_fn())
        b = numpy_fn()
        rel = _close(a, b, 2e-4, "softmax-CE dx fastbp vs numpy")
        _close(fl.loss, rl.loss, 2e-5, "softmax-CE loss fastbp vs numpy")
        text = f"dx fastbp~numpy {rel:.1e}"
        if torch is not None:
            text += f", torch~numpy {_close(torch_fn().numpy(), b, 2e-4, 'softmax-CE dx torch vs numpy'):.1e}"
        return text

    key = f"softmax-{n}x{c}" + ("-reuse" if reuse else "")
    title = f"softmax-CE fwd+bwd ({n}, {c}) f32" + (" reuse=True" if reuse else "")
    return Case(key, title, impls, check, None, targets)


def relu_case(n, m, torch, targets, reuse=False):
    """Relu forward + backward on (n, m) float32: fastbp.layers vs fastbp.reference vs torch (F.relu +
    autograd.grad)."""
    from fastbp import layers as L, reference as R
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, m)).astype(np.float32)
    dout = rng.standard_normal((n, m)).astype(np.float32)
    fl = L.Relu(reuse=reuse)
    rl = R.Relu()

    def fastbp_fn():
        fl.forward(x)
        return fl.backward(dout)

    def numpy_fn():
        rl.forward(x)
        return rl.backward(dout)

    impls = OrderedDict([("fastbp", fastbp_fn), ("numpy", numpy_fn)])
    if torch is not None:
        import torch.nn.functional as F
        xt = torch.from_numpy(x).requires_grad_(True)
        dt = torch.from_numpy(dout)

        def torch_fn():
            y = F.relu(xt)
            return torch.autograd.grad(y, xt, dt)[0]

        impls["torch"] = torch_fn

    def check():
        a = fastbp_fn()
        b = numpy_fn()
        if not np.array_equal(a, b):
            raise AssertionError("ReLU dx differs between fastbp and numpy")
        if not np.array_equal(fl.mask, rl.mask):
            raise AssertionError("ReLU mask differs between fastbp and numpy")
        if torch is not None and not np.array_equal(torch_fn().numpy(), b):
            raise AssertionError("ReLU dx differs between torch and numpy")
        return "dx identical"

    key = f"relu-{n}x{m}" + ("-reuse" if reuse else "")
    title = f"ReLU fwd+bwd ({n}, {m}) f32" + (" reuse=True" if reuse else "")
    return Case(key, title, impls, check, None, targets)


def build_cases(torch=None, select=None):
    """The curated cases (the issue's speed targets), optionally only those whose key contains a word of
    `select`; built lazily so an unselected case costs nothing."""
    T = Target
    specs = [
        ("train-2l-b100-f32", lambda: train_case(
            "train-2l-b100-f32", "train step TwoLayerNet 784-50-10 b100 f32", (784, 50, 10), 100, np.float32,
            torch, [T("speedup", 3.0, "numpy"), T("speedup", 3.0, "torch")])),
        ("train-2l-b100-f64", lambda: train_case(
            "train-2l-b100-f64", "train step TwoLayerNet 784-50-10 b100 f64", (784, 50, 10), 100, np.float64,
            torch, [T("speedup", 2.5, "numpy")])),
        ("train-2l-b1-f32", lambda: train_case(
            "train-2l-b1-f32", "train step TwoLayerNet 784-50-10 b1 f32", (784, 50, 10), 1, np.float32,
            torch, [T("speedup", 3.0, "numpy")])),
        ("train-mlp-b256-f32", lambda: train_case(
            "train-mlp-b256-f32", "train step MultiLayerNet 784-1024-1024-10 b256 f32", (784, 1024, 1024, 10),
            256, np.float32, torch, [T("floor", 1.4)], with_gemm_only=True)),
        ("book-2l-b100", lambda: book_case(100)),
        ("softmax-100x10", lambda: softmax_case(100, 10, torch, [T("speedup", 4.0, "numpy")])),
        ("softmax-4096x1000", lambda: softmax_case(4096, 1000, torch, [T("speedup", 2.0, "numpy")])),
        ("softmax-4096x1000-reuse", lambda: softmax_case(4096, 1000, torch, [], reuse=True)),
        ("relu-4096x4096", lambda: relu_case(4096, 4096, torch, [T("speedup", 1.5, "numpy")])),
        ("relu-4096x4096-reuse", lambda: relu_case(4096, 4096, torch, [], reuse=True)),
    ]
    if select:
        specs = [s for s in specs if any(w in s[0] for w in select)]
    return specs


def sweep_cases(torch, batches=SWEEP_BATCHES):
    """Train step TwoLayerNet 784-50-10 f32 at several batch sizes (for --plot)."""
    return [(f"sweep-b{b}", (lambda b=b: train_case(f"sweep-b{b}", f"train step 784-50-10 b{b} f32",
                                                       (784, 50, 10), b, np.float32, torch, [])))
            for b in batches]


# ---------------------------------------------------------------------------------------------------------
# NumPy allocation in a step
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
    return {"bytes_per_call": state["alloc"] / calls, "numpy_high_water": state["high"],
            "traced_peak_per_call": peak}


def _alloc_rows(torch):
    """NumPy allocation per training step after warm-up, fastbp nets vs the reference nets."""
    from fastbp import nets, optimizers
    rows = []
    for key, title, sizes, batch, dtype in (
            ("alloc-2l-b100-f32", "TwoLayerNet 784-50-10 b100 f32", (784, 50, 10), 100, np.float32),
            ("alloc-2l-b1-f64", "TwoLayerNet 784-50-10 b1 f64", (784, 50, 10), 1, np.float64),
            ("alloc-mlp-b256-f32", "MultiLayerNet 784-1024-1024-10 b256 f32", (784, 1024, 1024, 10), 256,
             np.float32)):
        res = {}
        for backend in ("fastbp", "reference"):
            np.random.seed(1)
            if len(sizes) == 3:
                net = nets.TwoLayerNet(sizes[0], sizes[1], sizes[2], dtype=dtype, backend=backend)
            else:
                net = nets.MultiLayerNet(sizes[0], list(sizes[1:-1]), sizes[-1], dtype=dtype, backend=backend)
            opt = optimizers.SGD(lr=0.01) if backend == "fastbp" else BookSGD(lr=0.01)
            x, t = mnist_batch(batch, dtype=dtype)

            def step(net=net, opt=opt, x=x, t=t):
                opt.update(net.params, net.gradient(x, t))
            res[backend] = numpy_alloc_per_call(step, calls=10, warmup=3)
        rows.append({"key": key, "title": f"NumPy bytes allocated per step, {title}",
                     "bytes_per_step": res["fastbp"]["bytes_per_call"],
                     "numpy_high_water": res["fastbp"]["numpy_high_water"],
                     "traced_peak_per_step": res["fastbp"]["traced_peak_per_call"],
                     "reference_bytes_per_step": res["reference"]["bytes_per_call"],
                     "reference_traced_peak_per_step": res["reference"]["traced_peak_per_call"],
                     "targets": [Target("alloc", 0)]})
    return rows


# ---------------------------------------------------------------------------------------------------------
# machine facts: threads, BLAS, GEMM peak, pool interference, load of other processes
# ---------------------------------------------------------------------------------------------------------
def machine_info(torch):
    from fastbp import _blas, _kernels
    info = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    import fastbp
    info["fastbp"] = fastbp.__version__
    b = _blas.info()
    info["fastbp_blas"] = {"corename": b["corename"], "threads": _blas.get_num_threads(),
                           "library": b["library"], "config": b["config"]}
    bi = _kernels.build_info()
    info["openmp"] = {"enabled": bi["openmp"], "threads": bi["openmp_max_threads"]}
    info["numpy_blas"] = None
    try:
        import threadpoolctl
        pools = threadpoolctl.threadpool_info()
        cands = [p for p in pools if p.get("user_api") == "blas"
                 and os.path.realpath(p.get("filepath", "")) != os.path.realpath(b["library"])]
        cands.sort(key=lambda p: "numpy" not in p.get("filepath", ""))
        if cands:
            p = cands[0]
            info["numpy_blas"] = {"corename": p.get("architecture"), "threads": p.get("num_threads"),
                                  "library": p.get("filepath"), "version": p.get("version"),
                                  "internal_api": p.get("internal_api")}
    except ImportError:
        pass
    if info["numpy_blas"] is None:
        info["numpy_blas"] = {"corename": "unknown (pip install threadpoolctl to see it)", "threads": None}
    info["torch"] = None
    if torch is not None:
        info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                              "FASTBP_NUM_THREADS", "FASTBP_BLAS_CORETYPE") if k in os.environ}
    return info


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
            out[f"{lib}_{tag}_gflops"] = 2.0 * n ** 3 / best / 1e9
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


# ---------------------------------------------------------------------------------------------------------
# running and reporting
# ---------------------------------------------------------------------------------------------------------
def check_case(case):
    """Run the case's equality check (before any timed call: the training steps change the weights);
    returns the row skeleton, with "error" set when the implementations disagree."""
    row = {"key": case.key, "title": case.title, "impls": list(case.impls), "flops": case.flops,
           "targets": case.targets, "note": case.note}
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


def format_table(rows, impl_cols=("fastbp", "numpy", "torch")):
    """The result table: one line per timed row, times (median per call), speedups of fastbp, GFLOP/s,
    target and PASS/MISS."""
    head = ["case"] + list(impl_cols) + [f"vs {c}" for c in impl_cols[1:]] + ["GFLOP/s fastbp", "target",
                                                                                  "result"]
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
            if t["kind"] == "floor":
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
        (str(c).ljust(w) if i == 0 or i >= len(cells) - 2 else str(c).rjust(w)) for i, (c, w) in
        enumerate(zip(cells, widths))).rstrip()
    out = [fmt_row(head), fmt_row(["-" * w for w in widths])]
    out += [fmt_row(c) for c in lines]
    return "\n".join(out)


def format_alloc(rows):
    lines = []
    for r in rows:
        lines.append(f"{r['title']}: fastbp {_fmt_bytes(r['bytes_per_step'])}/step (all tracemalloc domains, "
                     f"Python objects included: peak +{_fmt_bytes(r['traced_peak_per_step'])}), reference "
                     f"{_fmt_bytes(r['reference_bytes_per_step'])}/step; target 0 B -> {r['result']}")
    return "\n".join(lines)


def _header(info, peak, probe, args, torch):
    nb = info["numpy_blas"]
    tl = (f"torch {info['torch']['version']} ({info['torch']['threads']} threads)" if torch is not None
          else "torch not installed: torch columns skipped")
    lines = [
        f"fastbp {info['fastbp']} bench: numpy {info['numpy']}, python {info['python']}, "
        f"{info['cpu_count']} CPUs, {tl}",
        f"threads: fastbp BLAS {info['fastbp_blas']['threads']} ({info['fastbp_blas']['corename']}), "
        f"fastbp OpenMP {info['openmp']['threads'] if info['openmp']['enabled'] else 'off'}, "
        f"NumPy BLAS {nb.get('threads')} ({nb.get('corename')})"
        + (f", torch {info['torch']['threads']}" if torch is not None else ""),
    ]
    if peak:
        lines.append(
            f"GEMM peak {peak['size']}^3: fastbp sgemm {peak['fastbp_sgemm_gflops']:.0f} / dgemm "
            f"{peak['fastbp_dgemm_gflops']:.0f} GFLOP/s; NumPy sgemm {peak['numpy_sgemm_gflops']:.0f} / dgemm "
            f"{peak['numpy_dgemm_gflops']:.0f} GFLOP/s")
    lines.append(
        f"method: {args.rounds} interleaved rounds per row, implementation order rotating; before each timed "
        f"batch (~{BATCH_TIME * 1e3:.0f} ms) an idle gap of {args.gap * 1e3:.0f} ms and untimed warm-up calls; "
        f"times = median per call, speedups = median of per-round ratios")
    if probe:
        sd = probe.get("spin_down_s")
        sd_text = f"; worker threads kept a CPU busy {sd * 1e3:.0f} ms after the last NumPy call" \
            if sd is not None else ""
        lines.append(
            f"interference ({probe['case']}): fastbp step right after a NumPy batch "
            f"{fmt_time(probe['fastbp_after_numpy'])} vs alone {fmt_time(probe['fastbp_alone'])} "
            f"({probe['fastbp_slowdown']:.2f}x); NumPy right after fastbp {fmt_time(probe['numpy_after_fastbp'])} "
            f"vs alone {fmt_time(probe['numpy_alone'])} ({probe['numpy_slowdown']:.2f}x){sd_text}")
        if sd is not None and sd > args.gap:
            lines.append(f"WARNING: spin-down {sd * 1e3:.0f} ms is longer than the gap {args.gap * 1e3:.0f} ms; "
                         f"consider --gap {math.ceil(sd * 20) / 20 + 0.05:.2f}")
    return "\n".join(lines)


def run(args, out=None):
    """Run the benchmark described by parsed `args`; prints the report to `out` and returns the result dict."""
    out = sys.stdout if out is None else out
    t_start = time.perf_counter()
    ticks0 = _cpu_ticks()
    torch = None if args.no_torch else _import_torch()
    from fastbp import _blas
    _blas.ensure_loaded()
    info = machine_info(torch)
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
        if key == "train-mlp-b256-f32" and peak and "median_s" in row:
            floor = case.flops / (peak["best_sgemm_gflops"] * 1e9)
            row["floor_s"] = floor
            row["floor_ratio"] = row["median_s"]["fastbp"] / floor
            if "gemm-only" in row["median_s"]:
                row["gemm_only_ratio"] = row["median_s"]["fastbp"] / row["median_s"]["gemm-only"]
        rows.append(evaluate_targets(row))
        del case
        gc.collect()

    alloc = []
    if not args.no_alloc and (not args.cases or any("alloc" in w for w in args.cases)):
        log("measuring NumPy allocation per step ...")
        alloc = [evaluate_targets(r) for r in _alloc_rows(torch)]

    wall = time.perf_counter() - t_start
    foreign = _foreign_fraction(ticks0, _cpu_ticks(), wall)

    main_rows = [r for r in rows if not r["key"].startswith("sweep-")]
    sweep_rows = [r for r in rows if r["key"].startswith("sweep-")]
    print(_header(info, peak, probe, args, torch), file=out)
    print("", file=out)
    print(format_table(main_rows), file=out)
    if any((r.get("other_processes_cpu_fraction") or 0) > BUSY for r in rows):
        print(f"  * other processes used more than {BUSY:.0%} of the CPUs while this row was timed", file=out)
    for r in main_rows:
        if "floor_s" in r:
            extra = ""
            if "gemm_only_ratio" in r:
                extra = (f"; the step's GEMMs alone (same shapes, fastbp's BLAS) "
                         f"{fmt_time(r['median_s']['gemm-only'])}: step = {r['gemm_only_ratio']:.2f}x GEMMs")
            print(f"  {r['title']}: GEMM floor {fmt_time(r['floor_s'])} ({r['flops'] / 1e9:.2f} GFLOP at "
                  f"{peak['best_sgemm_gflops']:.0f} GFLOP/s), step {fmt_time(r['median_s']['fastbp'])} = "
                  f"{r['floor_ratio']:.2f}x floor{extra}", file=out)
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
            print(f"  [{t['result']}] {r['title']}: {t['text']} (measured {vt})", file=out)
    load = "" if foreign is None else f"; other processes used {foreign * 100:.0f}% of the CPUs meanwhile"
    print(f"\nwall time {wall:.1f} s{load}", file=out)
    if foreign is not None and foreign > BUSY:
        print("WARNING: the machine was busy with other work; the medians resist it, but rerun on a quiet "
              "machine for final numbers", file=out)

    result = {"machine": info, "settings": {"rounds": args.rounds, "gap_s": args.gap, "batch_time_s": BATCH_TIME,
                                            "warm_time_s": WARM_TIME, "quick": args.quick},
              "gemm_peak": peak, "interference": probe, "rows": rows, "alloc": alloc, "wall_time_s": wall,
              "other_processes_cpu_fraction": foreign}
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


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------
def _peak_size(text):
    v = int(text) if text.strip().lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"expected a size >= 0 (0 skips the peak), got {text!r}")
    return v


DESCRIPTION = ("Time fastbp against the plain-NumPy reference (and PyTorch eager when installed) in "
               "interleaved rounds and print a table with the speed targets. Takes about 2 minutes "
               "(--quick: under 1).")


def _configure(p):
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_ROUNDS} rounds instead of {DEFAULT_ROUNDS} and a shorter GEMM-peak measurement")
    from fastbp.cli import _nonneg_float, _positive_int   # the CLI's argument types
    p.add_argument("--rounds", type=_positive_int, default=None,
                   help=f"interleaved rounds per row (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})")
    p.add_argument("--gap", type=_nonneg_float, default=DEFAULT_GAP,
                   help=f"idle seconds before each timed batch so other thread pools stop spinning "
                        f"(default {DEFAULT_GAP})")
    p.add_argument("--json", metavar="FILE", default=None, help="write every number to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also sweep the train step over batch sizes (half the rounds) and plot the speedups "
                        "(needs matplotlib)")
    p.add_argument("--sweep", action="store_true", help="run the batch-size sweep without plotting it")
    p.add_argument("--cases", nargs="+", metavar="WORD", default=None,
                   help="run only the rows whose key contains one of these words (e.g. train softmax alloc)")
    p.add_argument("--peak-size", type=_peak_size, default=PEAK_SIZE,
                   help=f"matrix size of the GEMM-peak measurement (default {PEAK_SIZE}; 0 skips it)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns even if torch is installed")
    p.add_argument("--no-probe", action="store_true", help="skip the thread-pool interference probe")
    p.add_argument("--no-alloc", action="store_true", help="skip the NumPy allocation measurement")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_bench)
    return p


def add_parser(subparsers):
    """Register the ``bench`` subcommand on an argparse subparsers object (used by fastbp.cli)."""
    p = subparsers.add_parser(
        "bench", help="speed benchmark: fastbp vs NumPy (and PyTorch), with the project's speed targets",
        description=DESCRIPTION)
    return _configure(p)


def cmd_bench(args):
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.stderr.write("fastbp: --plot needs matplotlib, which is not installed "
                             "(pip install matplotlib, or pip install 'fastbp[plot]')\n")
            return 2
    if args.cases:
        known = [k for k, _ in build_cases(None)] + ["alloc"]
        bad = [w for w in args.cases if not any(w in k for k in known)]
        if bad:
            sys.stderr.write(f"fastbp: --cases {' '.join(bad)} matches no row; rows: {', '.join(known)}\n")
            return 2
    res = run(args)
    rows = res["rows"] + res["alloc"]
    return 1 if any("error" in r for r in rows) else 0


def main(argv=None):
    """``python -m fastbp.bench [options]`` (same as ``python -m fastbp bench``)."""
    p = _configure(argparse.ArgumentParser(prog="fastbp bench", description=DESCRIPTION))
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
