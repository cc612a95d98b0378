"""Book 1, chapters 6-8: Convolution, max pooling, BatchNormalization, Dropout and the SimpleConvNet training step,
each group one size and dtype with fastbp / fastbp-reuse / numpy (fastbp.reference) / torch side by side.  Every
implementation's result is checked against float64 NumPy once before it is timed.
Run: ``pytest benchmarks/test_conv_bench.py --benchmark-only``; the speed table of issue 9 with interleaved
ratios is ``python benchmarks/conv_compare.py``."""

import numpy as np
import pytest

LAYER_IMPLS = ["fastbp", "fastbp-reuse", "numpy", "torch"]
TOL = {np.float32: 1e-4, np.float64: 1e-10}
# (N, C, H, W, FN, F, pad): the book's SimpleConvNet layer and two DeepConvNet layers
CONV_SHAPES = [(100, 1, 28, 28, 30, 5, 0), (100, 16, 28, 28, 16, 3, 1), (100, 64, 7, 7, 64, 3, 1)]
POOL_SHAPES = [(100, 30, 24, 24), (100, 16, 28, 28)]
BN_SHAPES = [(100, 100), (100, 1000)]


def _dt(dtype):
    return np.dtype(dtype).name


def _id(v):
    return "x".join(str(s) for s in v)


def _close(got, want, dtype):
    got = got.detach().numpy() if hasattr(got, "detach") else np.asarray(got)
    got, want = got.astype(np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= TOL[dtype], f"max |diff| is {err:.3g} of max |value| (allowed {TOL[dtype]:g})"


def _layers(impl):
    from fastbp import layers, reference

    return reference if impl == "numpy" else layers


def _kw(impl):
    return {"reuse": True} if impl == "fastbp-reuse" else {}


def _torch(request, impl):
    return request.getfixturevalue("need_torch") if impl == "torch" else None


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_conv_forward_backward(benchmark, request, rng, impl, shape, dtype):
    n, c, h, w, fn, f, pad = shape
    benchmark.group = f"conv-fwd+bwd {_id(shape)} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = (rng.standard_normal((fn, c, f, f)) / np.sqrt(c * f * f)).astype(dtype)
    b = rng.standard_normal(fn).astype(dtype)
    from fastbp import reference

    ref = reference.Convolution(W.astype(np.float64), b.astype(np.float64), 1, pad)
    want = ref.forward(x.astype(np.float64))
    dout = rng.standard_normal(want.shape).astype(dtype)
    want_dx = ref.backward(dout.astype(np.float64))
    if torch is not None:
        xt = torch.from_numpy(x).requires_grad_(True)
        Wt = torch.from_numpy(W).requires_grad_(True)
        bt = torch.from_numpy(b).requires_grad_(True)
        dt = torch.from_numpy(dout)

        def fn():
            xt.grad = Wt.grad = bt.grad = None
            out = torch.nn.functional.conv2d(xt, Wt, bt, padding=pad)
            out.backward(dt)
            return out, xt.grad, Wt.grad
    else:
        layer = _layers(impl).Convolution(W, b, 1, pad, **_kw(impl))

        def fn():
            out = layer.forward(x)
            return out, layer.backward(dout), layer.dW

    for g, wnt in zip(fn(), (want, want_dx, ref.dW)):
        _close(g, wnt, dtype)
    benchmark(fn)


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_maxpool_forward_backward(benchmark, request, rng, impl, shape, dtype):
    """2x2 stride-2 max pooling forward + backward (the book's SimpleConvNet/DeepConvNet pooling)."""
    benchmark.group = f"maxpool2x2-fwd+bwd {_id(shape)} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = rng.standard_normal(shape).astype(dtype)
    n, c, h, w = shape
    want = x.astype(np.float64).reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    dout = rng.standard_normal(want.shape).astype(dtype)
    if torch is not None:
        xt = torch.from_numpy(x).requires_grad_(True)
        dt = torch.from_numpy(dout)

        def fn():
            xt.grad = None
            out = torch.nn.functional.max_pool2d(xt, 2, 2)
            out.backward(dt)
            return out
    else:
        layer = _layers(impl).Pooling(2, 2, 2, **_kw(impl))

        def fn():
            out = layer.forward(x)
            layer.backward(dout)
            return out

    _close(fn(), want, dtype)
    benchmark(fn)


@pytest.mark.parametrize("shape", BN_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_batchnorm_train_forward_backward(benchmark, request, rng, impl, shape, dtype):
    benchmark.group = f"batchnorm-train-fwd+bwd {_id(shape)} {_dt(dtype)}"
    torch = _torch(request, impl)
    x = rng.standard_normal(shape).astype(dtype)
    d = shape[1]
    g, b = np.ones(d, dtype), np.zeros(d, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-6)
    if torch is not None:
        bn = torch.nn.BatchNorm1d(d, eps=1e-6, momentum=0.1).to(torch.float32 if dtype == np.float32 else torch.float64)
        xt = torch.from_numpy(x).requires_grad_(True)
        dt = torch.from_numpy(dout)

        def fn():
            xt.grad = None
            bn.zero_grad()
            out = bn(xt)
            out.backward(dt)
            return out
    else:
        layer = _layers(impl).BatchNormalization(g, b, **_kw(impl))

        def fn():
            out = layer.forward(x)
            layer.backward(dout)
            return out

    _close(fn(), want, dtype)
    benchmark(fn)


@pytest.mark.parametrize("impl", ["fastbp", "fastbp-reuse", "numpy"])
def test_dropout_forward_backward(benchmark, impl, rng, dtype):
    """Dropout(0.5) with the book's mask (np.random.rand > ratio); torch draws its own, so it is not compared."""
    benchmark.group = f"dropout-fwd+bwd 100x1000 {_dt(dtype)}"
    x = rng.standard_normal((100, 1000)).astype(dtype)
    layer = _layers(impl).Dropout(0.5, **_kw(impl))

    def fn():
        out = layer.forward(x)
        layer.backward(x)
        return out

    np.random.seed(0)
    got = fn()
    np.random.seed(0)
    _close(got, x * (np.random.rand(*x.shape) > 0.5), dtype)
    benchmark(fn)


@pytest.mark.parametrize("impl", ["fastbp", "numpy", "torch"])
def test_simpleconvnet_training_step(benchmark, request, impl, dtype):
    """The book's SimpleConvNet, batch 100 of MNIST digits: gradient + SGD update."""
    benchmark.group = f"simpleconvnet-step b100 {_dt(dtype)}"
    import os

    here = os.path.dirname(__file__)
    d = np.load(os.path.join(here, os.pardir, "fastbp", "data", "mnist-5k.npz"))
    x = (d["images"][:100] / 255).astype(dtype).reshape(100, 1, 28, 28)
    t = d["labels"][:100].astype(np.int64)
    torch = _torch(request, impl)
    if torch is not None:
        nn = torch.nn
        tdt = torch.float32 if dtype == np.float32 else torch.float64
        model = nn.Sequential(
            nn.Conv2d(1, 30, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(4320, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        ).to(tdt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = nn.CrossEntropyLoss()
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def fn():
            opt.zero_grad()
            loss = loss_fn(model(xt), tt)
            loss.backward()
            opt.step()
    else:
        from fastbp.nets import SimpleConvNet
        from fastbp.optimizers import SGD

        np.random.seed(0)
        net = SimpleConvNet(dtype=dtype, backend="fastbp" if impl == "fastbp" else "reference")
        opt = SGD(lr=0.01)

        def fn():
            opt.update(net.params, net.gradient(x, t))

    benchmark(fn)
