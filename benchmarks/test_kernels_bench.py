"""Per-kernel benchmarks: affine forward/backward, bias reduction, ReLU, sigmoid, softmax cross-entropy and the
optimizer updates, each group one size and dtype with fastbp / fastbp-reuse / numpy (fastbp.reference) /
torch side by side.  Every implementation's result is checked against the NumPy reference once before it is
timed.  Run: ``pytest benchmarks/ --benchmark-only`` (see conftest.py for the options)."""

import numpy as np
import pytest

# implementations of a layer group / of a bare-kernel group (torch is skipped when it is not installed)
LAYER_IMPLS = ["fastbp", "fastbp-reuse", "numpy", "torch"]
KERNEL_IMPLS = ["fastbp", "numpy", "torch"]
# scale-aware check: max |got - want| <= TOL * max |want|, with want computed in float64
TOL = {np.float32: 1e-4, np.float64: 1e-10}


def _dt(dtype):
    return np.dtype(dtype).name


def _torch(request, impl):
    return request.getfixturevalue("need_torch") if impl == "torch" else None


def _close(got, want, dtype):
    got = got.detach().numpy() if hasattr(got, "detach") else np.asarray(got)
    got = got.astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert err <= TOL[dtype], f"max |diff| is {err:.3g} of max |value| (allowed {TOL[dtype]:g})"


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


def _layers(impl):
    from fastbp import layers, reference

    return reference if impl == "numpy" else layers


def _kw(impl):
    return {"reuse": True} if impl == "fastbp-reuse" else {}


# ---------------------------------------------------------------------------------------------------------
# Affine
# ---------------------------------------------------------------------------------------------------------
def _affine_data(rng, shape, dtype):
    n, d, m = shape
    x = rng.standard_normal((n, d)).astype(dtype)
    W = (rng.standard_normal((d, m)) / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    dout = rng.standard_normal((n, m)).astype(dtype)
    return x, W, b, dout


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_affine_forward(benchmark, request, rng, impl, affine_shape, dtype):
    n, d, m = affine_shape
    benchmark.group = f"affine-forward N={n} {d}->{m} {_dt(dtype)}"
    torch = _torch(request, impl)
    x, W, b, _ = _affine_data(rng, affine_shape, dtype)
    x64, W64, b64 = _f64(x, W, b)
    want = x64 @ W64 + b64
    if torch is not None:
        xt, Wt, bt = (torch.from_numpy(a) for a in (x, W, b))
        fn = lambda: torch.addmm(bt, xt, Wt)  # noqa: E731
    else:
        layer = _layers(impl).Affine(W, b, **_kw(impl))
        fn = lambda: layer.forward(x)  # noqa: E731
    _close(fn(), want, dtype)
    benchmark(fn)


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_affine_backward(benchmark, request, rng, impl, affine_shape, dtype):
    """dx = dout @ W.T, dW = x.T @ dout, db = dout.sum(0)."""
    n, d, m = affine_shape
    benchmark.group = f"affine-backward N={n} {d}->{m} {_dt(dtype)}"
    torch = _torch(request, impl)
    x, W, b, dout = _affine_data(rng, affine_shape, dtype)
    x64, W64, d64 = _f64(x, W, dout)
    want = (d64 @ W64.T, x64.T @ d64, d64.sum(0))
    if torch is not None:
        xt, Wt, dt = (torch.from_numpy(a) for a in (x, W, dout))

        def fn():
            return torch.mm(dt, Wt.t()), torch.mm(xt.t(), dt), torch.sum(dt, 0)
    else:
        layer = _layers(impl).Affine(W, b, **_kw(impl))
        layer.forward(x)

        def fn():
            return layer.backward(dout), layer.dW, layer.db

    for g, w in zip(fn(), want):
        _close(g, w, dtype)
    benchmark(fn)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_bias_reduction(benchmark, request, rng, impl, bias_shape, dtype):
    """db = dout.sum(axis=0) into a preallocated db (fastbp's kernel, np.sum(out=), torch.sum(out=))."""
    n, m = bias_shape
    benchmark.group = f"bias-reduction {n}x{m} {_dt(dtype)}"
    torch = _torch(request, impl)
    dout = rng.standard_normal((n, m)).astype(dtype)
    db = np.empty(m, dtype)
    if torch is not None:
        dt, dbt = torch.from_numpy(dout), torch.from_numpy(db)
        fn = lambda: torch.sum(dt, 0, out=dbt)  # noqa: E731
    elif impl == "fastbp":
        from fastbp import _kernels

        fn = lambda: _kernels.bias_backward(dout, db)  # noqa: E731
    else:
        fn = lambda: np.sum(dout, axis=0, out=db)  # noqa: E731
    fn()
    _close(db, dout.astype(np.float64).sum(0), dtype)
    benchmark(fn)


# ---------------------------------------------------------------------------------------------------------
# ReLU and sigmoid
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_relu_forward(benchmark, request, rng, impl, ew_shape, dtype):
    benchmark.group = f"relu-forward {ew_shape[0]}x{ew_shape[1]} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = rng.standard_normal(ew_shape).astype(dtype)
    if torch is not None:
        xt = torch.from_numpy(x)
        fn = lambda: torch.relu(xt)  # noqa: E731
    else:
        layer = _layers(impl).Relu(**_kw(impl))
        fn = lambda: layer.forward(x)  # noqa: E731
    _close(fn(), np.maximum(x, 0), dtype)
    benchmark(fn)


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_relu_backward(benchmark, request, rng, impl, ew_shape, dtype):
    benchmark.group = f"relu-backward {ew_shape[0]}x{ew_shape[1]} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = rng.standard_normal(ew_shape).astype(dtype)
    dout = rng.standard_normal(ew_shape).astype(dtype)
    if torch is not None:
        xt, dt = torch.from_numpy(x), torch.from_numpy(dout)
        fn = lambda: torch.ops.aten.threshold_backward(dt, xt, 0)  # noqa: E731  (what autograd runs)
    else:
        layer = _layers(impl).Relu(**_kw(impl))
        layer.forward(x)
        fn = lambda: layer.backward(dout)  # noqa: E731
    _close(fn(), np.where(x > 0, dout, 0), dtype)
    benchmark(fn)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_sigmoid_forward(benchmark, request, rng, impl, ew_shape, dtype):
    benchmark.group = f"sigmoid-forward {ew_shape[0]}x{ew_shape[1]} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = (rng.standard_normal(ew_shape) * 4).astype(dtype)
    if torch is not None:
        xt = torch.from_numpy(x)
        fn = lambda: torch.sigmoid(xt)  # noqa: E731
    else:
        layer = _layers(impl).Sigmoid(**_kw(impl))
        fn = lambda: layer.forward(x)  # noqa: E731
    _close(fn(), _sigmoid(x), dtype)
    benchmark(fn)


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_sigmoid_backward(benchmark, request, rng, impl, ew_shape, dtype):
    benchmark.group = f"sigmoid-backward {ew_shape[0]}x{ew_shape[1]} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = (rng.standard_normal(ew_shape) * 4).astype(dtype)
    dout = rng.standard_normal(ew_shape).astype(dtype)
    if torch is not None:
        yt, dt = torch.sigmoid(torch.from_numpy(x)), torch.from_numpy(dout)
        fn = lambda: torch.ops.aten.sigmoid_backward(dt, yt)  # noqa: E731  (what autograd runs)
        y = yt.numpy()
    else:
        layer = _layers(impl).Sigmoid(**_kw(impl))
        y = np.array(layer.forward(x))
        fn = lambda: layer.backward(dout)  # noqa: E731
    _close(fn(), dout * (1.0 - y) * y, dtype)
    benchmark(fn)


# ---------------------------------------------------------------------------------------------------------
# softmax cross-entropy
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_softmax_cross_entropy(benchmark, request, rng, impl, softmax_shape, dtype):
    """loss = forward(x, t) and dx = backward() with integer labels."""
    n, c = softmax_shape
    benchmark.group = f"softmax-ce-forward+backward {n}x{c} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    t = rng.integers(0, c, n).astype(np.int64)
    ref = _layers("numpy").SoftmaxWithLoss()
    ref.forward(x.astype(np.float64), t)
    want = ref.backward(1)
    if torch is not None:
        import torch.nn.functional as F

        xt = torch.from_numpy(x).requires_grad_(True)
        tt = torch.from_numpy(t)

        def fn():
            return torch.autograd.grad(F.cross_entropy(xt, tt), xt)[0]
    else:
        layer = _layers(impl).SoftmaxWithLoss(**_kw(impl))

        def fn():
            layer.forward(x, t)
            return layer.backward(1)

    _close(fn(), want, dtype)
    benchmark(fn)


# ---------------------------------------------------------------------------------------------------------
# optimizer updates
# ---------------------------------------------------------------------------------------------------------
class _BookOptimizer:
    """The book's common/optimizer.py formulas in NumPy (the baseline of the update benchmarks)."""

    def __init__(self, name, lr):
        self.name, self.lr, self.state, self.iter = name, lr, None, 0

    def update(self, params, grads):
        if self.state is None:
            self.state = {k: (np.zeros_like(p), np.zeros_like(p)) for k, p in params.items()}
        self.iter += 1
        lr, eps = self.lr, 1e-7
        for k, p in params.items():
            g = grads[k]
            s1, s2 = self.state[k]
            if self.name == "SGD":
                p -= lr * g
            elif self.name == "Momentum":
                s1[...] = 0.9 * s1 - lr * g
                p += s1
            elif self.name == "Nesterov":
                s1 *= 0.9
                s1 -= lr * g
                p += 0.81 * s1
                p -= 1.9 * lr * g
            elif self.name == "AdaGrad":
                s1 += g * g
                p -= lr * g / (np.sqrt(s1) + eps)
            elif self.name == "RMSprop":
                s1 *= 0.99
                s1 += 0.01 * g * g
                p -= lr * g / (np.sqrt(s1) + eps)
            elif self.name == "Adam":
                lr_t = lr * np.sqrt(1.0 - 0.999**self.iter) / (1.0 - 0.9**self.iter)
                s1 += 0.1 * (g - s1)
                s2 += 0.001 * (g**2 - s2)
                p -= lr_t * s1 / (np.sqrt(s2) + eps)
            else:
                raise ValueError(self.name)


def _torch_optimizer(torch, name, params, lr):
    optim = torch.optim
    return {
        "SGD": lambda: optim.SGD(params, lr=lr),
        "Momentum": lambda: optim.SGD(params, lr=lr, momentum=0.9),
        "Nesterov": lambda: optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
        "AdaGrad": lambda: optim.Adagrad(params, lr=lr, eps=1e-7),
        "RMSprop": lambda: optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-7),
        "Adam": lambda: optim.Adam(params, lr=lr, eps=1e-7),
    }[name]()


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_optimizer_update(benchmark, request, rng, impl, opt_name, opt_shape, dtype):
    """One update of one parameter array in place (fastbp.optimizers vs the book's NumPy formulas vs
    torch.optim with the same hyperparameters; torch's Momentum/Nesterov/AdaGrad/RMSprop are the
    equivalent torch optimizers, not the same formulas)."""
    benchmark.group = f"optimizer-{opt_name} {_shape(opt_shape)} {_dt(dtype)}"
    torch = _torch(request, impl)
    p0 = rng.standard_normal(opt_shape).astype(dtype)
    g = (rng.standard_normal(opt_shape) * 0.1).astype(dtype)
    lr = 0.01
    want = {"W": p0.astype(np.float64)}
    _BookOptimizer(opt_name, lr).update(want, {"W": g.astype(np.float64)})
    if torch is not None:
        p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        p.grad = torch.from_numpy(g)
        opt = _torch_optimizer(torch, opt_name, [p], lr)
        fn = opt.step
        with torch.no_grad():
            fn()
        if opt_name == "SGD":
            _close(p.detach(), want["W"], dtype)
    else:
        if impl == "fastbp":
            optimizers = pytest.importorskip("fastbp.optimizers")
            opt = getattr(optimizers, opt_name)(lr=lr)
        else:
            opt = _BookOptimizer(opt_name, lr)
        params, grads = {"W": p0.copy()}, {"W": g}
        fn = lambda: opt.update(params, grads)  # noqa: E731
        fn()
        _close(params["W"], want["W"], dtype)
    benchmark(fn)


def _shape(s):
    return "x".join(str(v) for v in s)
