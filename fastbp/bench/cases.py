"""The rows of ``fastbp bench`` (and the cases of the pytest-benchmark suite in ``benchmarks/``): each a
:class:`Case` of zero-argument callables -- fastbp, the NumPy baseline (:mod:`fastbp.reference` or the book's
code of :mod:`fastbp.bench.book`) and the PyTorch eager equivalent when torch is installed -- on the same inputs,
with a check that they compute the same thing and the speed targets of the project."""

import math
import os
from collections import OrderedDict

import numpy as np

from fastbp.bench.book import (
    BookAdam,
    BookLayers,
    BookMultiLayerNet,
    BookSGD,
    BookTwoLayerNet,
    book_train_step,
)
from fastbp.bench.harness import numpy_alloc_per_call

SWEEP_BATCHES = (1, 4, 16, 64, 100, 256, 1024)


def step_gemm_flops(batch, sizes, first_dx=False):
    """FLOPs of the matrix products of one training step of an MLP with layer sizes `sizes` (input first):
    forward x @ W for every layer, dW = x.T @ dout for every layer, dx = dout @ W.T for all but the first (fastbp's
    nets skip the first layer's dx, need_dx=False; `first_dx` counts it too, as the book's nets compute it)."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    fwd = sum(2.0 * batch * d * m for d, m in pairs)
    dx = sum(2.0 * batch * d * m for d, m in (pairs if first_dx else pairs[1:]))
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
        raise AssertionError(
            f"{what}: max |diff| = {diff:.3g} is {rel:.3g} of max |value| {scale:.3g} (allowed {rtol:g})"
        )
    return rel


_RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}


def _import_torch():
    try:
        import torch
    except Exception:  # not installed, or broken: the torch columns are skipped
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


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
# targets and cases
# ---------------------------------------------------------------------------------------------------------
class Target:
    """A speed target: kind 'speedup' (median t_vs / t_fastbp >= threshold), 'floor' (t_fastbp / floor <=
    threshold), 'gemms' (t_fastbp / t_gemm-only <= threshold: the step against the same step's GEMMs alone, timed
    in the same rounds), 'layers' (the same for the network's layers alone, the part of a book row's step that
    fastbp's layers run: t_layers / t_gemm-only <= threshold) or 'alloc' (NumPy bytes per step <= threshold)."""

    def __init__(self, kind, threshold, vs=None):
        if kind not in ("speedup", "floor", "gemms", "layers", "alloc"):
            raise ValueError(f"unknown target kind {kind!r}")
        self.kind, self.threshold, self.vs = kind, threshold, vs

    def describe(self):
        if self.kind == "speedup":
            return f">={self.threshold:g}x {self.vs}"
        if self.kind == "floor":
            return f"<={self.threshold:g}x GEMM floor"
        if self.kind == "gemms":
            return f"<={self.threshold:g}x its GEMMs"
        if self.kind == "layers":
            return f"layers <={self.threshold:g}x its GEMMs"
        return f"<={self.threshold:g} B/step"

    def evaluate(self, row):
        """(value, 'PASS' | 'MISS' | 'SKIP')."""
        if self.kind == "speedup":
            v = row.get("speedup", {}).get(self.vs)
            if v is None or not math.isfinite(v):
                return None, "SKIP"
            return v, "PASS" if v >= self.threshold else "MISS"
        if self.kind in ("floor", "gemms", "layers"):
            v = row.get({"floor": "floor_ratio", "gemms": "gemm_only_ratio", "layers": "layers_ratio"}[self.kind])
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

        def make(backend):
            return nets.TwoLayerNet(sizes[0], hidden[0], sizes[-1], dtype=dtype, backend=backend)
    else:

        def make(backend):
            return nets.MultiLayerNet(sizes[0], hidden, sizes[-1], dtype=dtype, backend=backend)

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
        other = _gemm_only_other_route(impls["gemm-only"])
        if other is not None:
            impls[other[0]] = other[1]
    return Case(key, title, impls, check, flops, targets)


def _gemm_only_other_route(step):
    """(name, `step` on the other route) for the largest products: when they run on OpenBLAS's own threads
    (FASTBP_BLAS_THREADED_MIN set), "gemm-only-pieces" with the route off for the call; when the route is off (the
    default), "gemm-only-routed" with it on at _blas.BLAS_THREADED_SUGGESTED multiply-adds.  None when the route
    cannot be taken (not the split mode, one thread, no threads callback)."""
    import ctypes

    from fastbp import _blas, _gemm

    if _blas.info()["threading"] != "split" or _gemm._get_gemm_threads() < 2 or not _gemm._blas_threads_callback():
        return None
    thr = _gemm._get_blas_threaded_min()
    setter = ctypes.cast(_blas.ensure_loaded()["lib"].scipy_openblas_set_num_threads, ctypes.c_void_p).value
    cpus = _blas._usable_cpus()
    name, during = ("gemm-only-pieces", 0.0) if thr else ("gemm-only-routed", float(_blas.BLAS_THREADED_SUGGESTED))

    def other():
        _gemm._set_blas_threaded(setter, during, cpus)
        try:
            step()
        finally:
            _gemm._set_blas_threaded(setter, thr, cpus)

    return name, other


def gemm_only_step(sizes, batch, dtype, first_dx=False):
    """The matrix products of one training step alone, same shapes and transposes, via fastbp._kernels.gemm:
    forward x @ W and backward dW of every layer, dx of every layer but the first (of the first too with
    `first_dx`: the book's nets compute it and throw it away; fastbp's nets skip it, need_dx=False)."""
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
            if i > 0 or first_dx:
                gemm(outs[i], Ws[i], dxs[i], trans_b=True)
            gemm(xs[i], outs[i], dWs[i], trans_a=True)

    return step


def add_step_parts(impls, net, x, t, update):
    """Add a book row's step in parts, timed in the same rounds as the step: "layers", the network's layers alone
    as its ``gradient`` calls them (forward through ``net.layers`` and the loss layer, backward in reverse: what
    fastbp.layers runs, without the book's own NumPy code around them: weight-decay sums, the grads dict), and
    "update", the loop's parameter update alone (the book's NumPy code, or fastbp's optimizer), applied to copies
    of the parameters with fixed gradients so that it never moves the nets the other implementations time."""
    layers = list(net.layers.values())
    backward = layers[::-1]
    last = net.last_layer if hasattr(net, "last_layer") else net.lastLayer  # ch06's name, ch05's name

    def run_layers():
        y = x
        for layer in layers:
            y = layer.forward(y)
        last.forward(y, t)
        d = last.backward(1)
        for layer in backward:
            d = layer.backward(d)

    impls["layers"] = run_layers
    impls["update"] = update


class _UpdateOnCopies:
    """A zero-argument callable running ``apply(params, grads)`` on private copies (``.params``, ``.grads``)."""

    def __init__(self, params, grads, apply):
        self.params = {k: np.array(v, copy=True) for k, v in params.items()}
        self.grads = {k: np.array(v, copy=True) for k, v in grads.items()}
        self.apply = apply

    def __call__(self):
        self.apply(self.params, self.grads)


def book_case(batch=100, lr=0.1):
    """The book's TwoLayerNet 784-50-10 and loop step (float64 weights, float32 images, one-hot labels):
    fastbp.layers dropped in vs the book's own layers (BookLayers), same initial weights."""
    from fastbp import layers as fast_layers

    np.random.seed(3)
    fnet = BookTwoLayerNet(784, 50, 10, layers=fast_layers)
    bnet = BookTwoLayerNet(784, 50, 10, layers=BookLayers)
    for k in fnet.params:
        bnet.params[k][...] = fnet.params[k]
    x, t = mnist_batch(batch, one_hot=True)  # float32 images, float64 one-hot (as load_mnist gives)

    impls = OrderedDict(
        [("fastbp", lambda: book_train_step(fnet, x, t, lr)), ("numpy", lambda: book_train_step(bnet, x, t, lr))]
    )
    # the step's products alone: float64 (NumPy promotes the float32 images against float64 weights), and the
    # first layer's dx too (the book's Affine computes it)
    impls["gemm-only"] = gemm_only_step((784, 50, 10), batch, np.float64, first_dx=True)

    def sgd(params, grads):  # the loop of book_train_step, on copies
        for key in ("W1", "b1", "W2", "b2"):
            params[key] -= lr * grads[key]

    add_step_parts(impls, fnet, x, t, _UpdateOnCopies(fnet.params, fnet.gradient(x, t), sgd))

    def check():
        fg = fnet.gradient(x, t)
        fg = {k: np.array(v) for k, v in fg.items()}
        bg = bnet.gradient(x, t)
        worst = max(_close(fg[k], bg[k], 1e-9, f"book net: fastbp layers {k} vs book layers") for k in bg)
        return f"grads fastbp~book {worst:.1e}"

    # the book's nets compute dx for the first layer too: its step's GEMMs include that product
    flops = step_gemm_flops(batch, (784, 50, 10), first_dx=True)
    return Case(
        "book-2l-b100",
        f"book TwoLayerNet 784-50-10 b{batch} (f64 W, f32 x)",
        impls,
        check,
        flops,
        [Target("speedup", 1.0, "numpy"), Target("gemms", 1.3), Target("layers", 1.3)],
        extra={"nets": (fnet, bnet)},
        note="the book's ch05 TwoLayerNet + loop step; fastbp.layers vs the book's common/layers.py; its GEMMs: "
        "the step's float64 products (dx of the first layer included) alone through fastbp's BLAS; its parts: "
        "the layers' forward + backward alone and the book's NumPy SGD alone (on copies)",
    )


def book_mlp_case(batch=128, hidden=(100, 100, 100, 100), lr=0.001, optimizer="book"):
    """The book's ch06 MultiLayerNet 784-100x4-10 (float64 weights, float32 images, integer labels), same initial
    weights: fastbp.layers dropped in (with the book's NumPy Adam, `optimizer` "book", or with fastbp.optimizer.Adam
    too, "fastbp": a reader who also swaps ``common.optimizer``) vs the book's own layers and NumPy Adam."""
    from fastbp import layers as fast_layers
    from fastbp import optimizer as fast_optimizer

    if optimizer not in ("book", "fastbp"):
        raise ValueError(f"optimizer must be 'book' or 'fastbp', got {optimizer!r}")
    np.random.seed(4)
    fnet = BookMultiLayerNet(784, list(hidden), 10, layers=fast_layers)
    bnet = BookMultiLayerNet(784, list(hidden), 10, layers=BookLayers)
    for k in fnet.params:
        bnet.params[k][...] = fnet.params[k]
    x, t = mnist_batch(batch)  # float32 images, int64 labels
    fast_adam = optimizer == "fastbp"
    fopt = fast_optimizer.Adam(lr) if fast_adam else BookAdam(lr)
    bopt = BookAdam(lr)

    def fastbp_step():
        fopt.update(fnet.params, fnet.gradient(x, t))

    def numpy_step():
        bopt.update(bnet.params, bnet.gradient(x, t))

    impls = OrderedDict([("fastbp", fastbp_step), ("numpy", numpy_step)])

    def check():
        fg = {k: np.array(v) for k, v in fnet.gradient(x, t).items()}
        bg = bnet.gradient(x, t)
        worst = max(_close(fg[k], bg[k], 1e-9, f"book MultiLayerNet: fastbp layers {k} vs book layers") for k in bg)
        text = f"grads fastbp~book {worst:.1e}"
        if fast_adam:
            text += f", Adam updates fastbp~book {check_adam_updates(fast_optimizer.Adam(lr), BookAdam(lr), bg):.1e}"
        return text

    sizes = (784, *hidden, 10)
    flops = step_gemm_flops(batch, sizes, first_dx=True)
    impls["gemm-only"] = gemm_only_step(sizes, batch, np.float64, first_dx=True)
    part_opt = fast_optimizer.Adam(lr) if fast_adam else BookAdam(lr)
    add_step_parts(impls, fnet, x, t, _UpdateOnCopies(fnet.params, fnet.gradient(x, t), part_opt.update))
    which = "fastbp.layers + fastbp.optimizer.Adam" if fast_adam else "fastbp.layers (book Adam)"
    return Case(
        "book-mlp-b128-fbadam" if fast_adam else "book-mlp-b128",
        f"book MultiLayerNet 784-{'-'.join(map(str, hidden))}-10 b{batch} + "
        + ("fastbp Adam" if fast_adam else "book Adam")
        + " (f64 W, f32 x)",
        impls,
        check,
        flops,
        [Target("speedup", 1.0, "numpy"), Target("gemms", 1.3), Target("layers", 1.3)],
        extra={"nets": (fnet, bnet)},
        note=f"the book's ch06 MultiLayerNet; {which} vs the book's common/layers.py + its NumPy Adam; its "
        "GEMMs: the step's float64 products (dx of the first layer included) alone through fastbp's BLAS; its "
        "parts: the layers' forward + backward alone and the step's Adam alone (on copies)",
    )


def check_adam_updates(fast_opt, book_opt, grads, steps=3, rtol=1e-9):
    """Run `steps` updates of `fast_opt` and `book_opt` (fresh optimizers) from the same copies of the gradients'
    shapes (parameters = the gradients scaled, so both start equal) and return the largest relative difference
    of the parameter changes; AssertionError when it exceeds `rtol`."""
    pf = {k: np.array(g) * 10.0 for k, g in grads.items()}
    pb = {k: v.copy() for k, v in pf.items()}
    start = {k: v.copy() for k, v in pf.items()}
    worst = 0.0
    for i in range(steps):
        g = {k: np.array(v) * (1.0 + 0.5 * i) for k, v in grads.items()}
        fast_opt.update(pf, g)
        book_opt.update(pb, {k: v.copy() for k, v in g.items()})
    for k in pf:
        worst = max(worst, _close(pf[k] - start[k], pb[k] - start[k], rtol, f"Adam update {k} fastbp vs book"))
    return worst


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
    from fastbp.bench.conv_cases import conv_case_specs  # it builds on this module's Case and Target

    T = Target
    specs = [
        (
            "train-2l-b100-f32",
            lambda: train_case(
                "train-2l-b100-f32",
                "train step TwoLayerNet 784-50-10 b100 f32",
                (784, 50, 10),
                100,
                np.float32,
                torch,
                [T("speedup", 3.0, "numpy"), T("speedup", 3.0, "torch")],
                with_gemm_only=True,
            ),
        ),
        (
            "train-2l-b100-f64",
            lambda: train_case(
                "train-2l-b100-f64",
                "train step TwoLayerNet 784-50-10 b100 f64",
                (784, 50, 10),
                100,
                np.float64,
                torch,
                [T("speedup", 2.5, "numpy")],
                with_gemm_only=True,
            ),
        ),
        (
            "train-2l-b1-f32",
            lambda: train_case(
                "train-2l-b1-f32",
                "train step TwoLayerNet 784-50-10 b1 f32",
                (784, 50, 10),
                1,
                np.float32,
                torch,
                [T("speedup", 3.0, "numpy")],
            ),
        ),
        (
            "train-mlp-b256-f32",
            lambda: train_case(
                "train-mlp-b256-f32",
                "train step MultiLayerNet 784-1024-1024-10 b256 f32",
                (784, 1024, 1024, 10),
                256,
                np.float32,
                torch,
                [T("floor", 1.3)],
                with_gemm_only=True,
            ),
        ),
        ("book-2l-b100", lambda: book_case(100)),
        ("book-mlp-b128", lambda: book_mlp_case(128)),
        ("book-mlp-b128-fbadam", lambda: book_mlp_case(128, optimizer="fastbp")),
        ("softmax-100x10", lambda: softmax_case(100, 10, torch, [T("speedup", 4.0, "numpy")])),
        (
            "softmax-4096x1000",
            lambda: softmax_case(4096, 1000, torch, [T("speedup", 2.0, "numpy"), T("speedup", 1.0, "torch")]),
        ),
        ("softmax-4096x1000-reuse", lambda: softmax_case(4096, 1000, torch, [], reuse=True)),
        ("relu-4096x4096", lambda: relu_case(4096, 4096, torch, [T("speedup", 1.5, "numpy")])),
        ("relu-4096x4096-reuse", lambda: relu_case(4096, 4096, torch, [], reuse=True)),
    ] + conv_case_specs(torch)
    if select:
        specs = [s for s in specs if any(w in s[0] for w in select)]
    return specs


def sweep_cases(torch, batches=SWEEP_BATCHES):
    """Train step TwoLayerNet 784-50-10 f32 at several batch sizes (for --plot)."""
    return [
        (
            f"sweep-b{b}",
            (
                lambda b=b: train_case(
                    f"sweep-b{b}", f"train step 784-50-10 b{b} f32", (784, 50, 10), b, np.float32, torch, []
                )
            ),
        )
        for b in batches
    ]


# ---------------------------------------------------------------------------------------------------------
# NumPy allocation per training step
# ---------------------------------------------------------------------------------------------------------
def _alloc_rows(torch):
    """NumPy allocation per training step after warm-up, fastbp nets vs the reference nets."""
    from fastbp import nets, optimizers

    rows = []
    for key, title, sizes, batch, dtype in (
        ("alloc-2l-b100-f32", "TwoLayerNet 784-50-10 b100 f32", (784, 50, 10), 100, np.float32),
        ("alloc-2l-b1-f64", "TwoLayerNet 784-50-10 b1 f64", (784, 50, 10), 1, np.float64),
        ("alloc-mlp-b256-f32", "MultiLayerNet 784-1024-1024-10 b256 f32", (784, 1024, 1024, 10), 256, np.float32),
    ):
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
        rows.append(
            {
                "key": key,
                "title": f"NumPy bytes allocated per step, {title}",
                "bytes_per_step": res["fastbp"]["bytes_per_call"],
                "numpy_high_water": res["fastbp"]["numpy_high_water"],
                "traced_peak_per_step": res["fastbp"]["traced_peak_per_call"],
                "reference_bytes_per_step": res["reference"]["bytes_per_call"],
                "reference_traced_peak_per_step": res["reference"]["traced_peak_per_call"],
                "targets": [Target("alloc", 0)],
            }
        )
    return rows
