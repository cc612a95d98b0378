"""Issue 9's rows of ``fastbp bench``: book 1's convolutional networks and max pooling (fastbp vs the plain-NumPy
layers of :mod:`fastbp.reference` with the book's SGD vs PyTorch eager), in the format of
:func:`fastbp.bench.cases.build_cases`: ``conv_case_specs(torch)`` returns ``[(key, build)]``.

A training step is ``net.gradient(x, t)`` plus an SGD update on 100 MNIST digits (images / 255).  torch runs the
same layers (Conv2d, ReLU, MaxPool2d, Linear, Dropout in train mode, CrossEntropyLoss) from the same initial
weights; the check compares fastbp's gradients with the reference's (and torch's, for SimpleConvNet).
"""

from collections import OrderedDict

import numpy as np

from fastbp.bench.book import BookSGD, BookSimpleConvNet
from fastbp.bench.cases import _RTOL, Case, Target, _close, mnist_batch


def _digits(n, dtype):
    x, t = mnist_batch(n, dtype=dtype)
    return np.ascontiguousarray(x.reshape(n, 1, 28, 28)), t


def conv_step_flops(batch, convs, affines):
    """GEMM FLOPs of a step: per convolution (N*OH*OW, C*FH*FW, FN, needs dx) forward + dW (+ dx); per Affine
    (D, M, needs dx) likewise.  Only the products the step performs: the nets' ``gradient`` skips the first
    layer's dx (``backward(dout, need_dx=False)``), so its entry says False.  These are the exact products of the
    convolution; the kernels' wide layout (fastbp._conv, stride-1 layers with >= 8 channels) also multiplies
    (FW - 1) / OW garbage columns, extra work the floor does not count."""
    total = 0.0
    for p, k, fn, dx in convs:
        total += 2.0 * batch * p * k * fn * (3 if dx else 2)
    for d, m, dx in affines:
        total += 2.0 * batch * d * m * (3 if dx else 2)
    return total


SIMPLE_FLOPS = dict(convs=[(576, 25, 30, False)], affines=[(4320, 100, True), (100, 10, True)])
DEEP_FLOPS = dict(
    convs=[
        (784, 9, 16, False),
        (784, 144, 16, True),
        (196, 144, 32, True),
        (256, 288, 32, True),
        (64, 288, 64, True),
        (64, 576, 64, True),
    ],
    affines=[(1024, 50, True), (50, 10, True)],
)


def _torch_simple(torch, params, dtype):
    nn = torch.nn
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    m = nn.Sequential(
        nn.Conv2d(1, 30, 5),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(4320, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    ).to(tdt)
    with torch.no_grad():
        m[0].weight.copy_(torch.from_numpy(params["W1"]))
        m[0].bias.copy_(torch.from_numpy(params["b1"]))
        # the book flattens (C, H, W) in the same order as nn.Flatten
        m[4].weight.copy_(torch.from_numpy(np.ascontiguousarray(params["W2"].T)))
        m[4].bias.copy_(torch.from_numpy(params["b2"]))
        m[6].weight.copy_(torch.from_numpy(np.ascontiguousarray(params["W3"].T)))
        m[6].bias.copy_(torch.from_numpy(params["b3"]))
    return m


def _torch_deep(torch, dtype):
    nn = torch.nn
    layers, c = [], 1
    for i, (f, pad) in enumerate([(16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1)]):
        layers += [nn.Conv2d(c, f, 3, padding=pad), nn.ReLU()]
        if i % 2:
            layers.append(nn.MaxPool2d(2, 2))
        c = f
    layers += [nn.Flatten(), nn.Linear(1024, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 10), nn.Dropout(0.5)]
    return nn.Sequential(*layers).to(torch.float32 if dtype == np.float32 else torch.float64)


def _torch_step(torch, model, x, t, lr):
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t.astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=False)
        crit(model(xt), tt).backward()
        opt.step()

    return step, crit, xt, tt


def convnet_case(key, title, net_name, dtype, torch, targets, lr=0.01, book_swap=False):
    """A SimpleConvNet / DeepConvNet training step: fastbp.nets (reuse workspaces) + fastbp.optimizers.SGD vs
    the reference backend + the book's SGD vs torch.  book_swap (SimpleConvNet): the book's own class
    (fastbp.bench.book.BookSimpleConvNet: float64 weights fed float32 images) on fastbp.layers (the one-line
    import swap) vs on the plain NumPy layers, both with the book's SGD."""
    from fastbp import layers as fast_layers
    from fastbp import nets, optimizers
    from fastbp import reference as ref_layers

    dtype = np.dtype(dtype)
    cls = getattr(nets, net_name)
    np.random.seed(1)
    if book_swap:
        if net_name != "SimpleConvNet":
            raise ValueError(f"book_swap transcribes the book's SimpleConvNet only, got {net_name}")
        fnet = BookSimpleConvNet(fast_layers)
        rnet = BookSimpleConvNet(ref_layers)
    else:
        fnet = cls(dtype=dtype)
        rnet = cls(dtype=dtype, backend="reference")
    for k in fnet.params:
        rnet.params[k][...] = fnet.params[k]
    x, t = _digits(100, np.float32 if book_swap else dtype)
    fopt = BookSGD(lr=lr) if book_swap else optimizers.SGD(lr=lr)
    ropt = BookSGD(lr=lr)

    def fastbp_step():
        fopt.update(fnet.params, fnet.gradient(x, t))

    def numpy_step():
        ropt.update(rnet.params, rnet.gradient(x, t))

    impls = OrderedDict([("fastbp", fastbp_step), ("numpy", numpy_step)])
    model = None
    if torch is not None and not book_swap:
        model = _torch_simple(torch, fnet.params, dtype) if net_name == "SimpleConvNet" else _torch_deep(torch, dtype)
        impls["torch"], crit, xt, tt = _torch_step(torch, model, x, t, lr)

    def check():
        state = np.random.get_state()
        np.random.seed(7)
        fg = {k: np.array(v) for k, v in fnet.gradient(x, t).items()}
        np.random.seed(7)
        rg = rnet.gradient(x, t)
        np.random.set_state(state)
        rtol = 1e-9 if book_swap else _RTOL[dtype]
        worst = max(_close(fg[k], rg[k], rtol, f"fastbp {k} vs numpy") for k in rg)
        text = f"grads fastbp~numpy {worst:.1e}"
        if model is not None and net_name == "SimpleConvNet":
            model.zero_grad(set_to_none=False)
            crit(model(xt), tt).backward()
            tw = _close(model[0].weight.grad.numpy(), rg["W1"], rtol, "torch W1 vs numpy")
            tw = max(tw, _close(model[4].weight.grad.numpy().T, rg["W2"], rtol, "torch W2 vs numpy"))
            model.zero_grad(set_to_none=False)
            text += f", torch~numpy {tw:.1e}"
        return text

    flops = conv_step_flops(100, **(SIMPLE_FLOPS if net_name == "SimpleConvNet" else DEEP_FLOPS))
    return Case(
        key,
        title,
        impls,
        check,
        flops,
        targets,
        note="fastbp.nets vs fastbp.reference (the book's NumPy algorithms) vs torch eager; SGD step",
    )


def maxpool_case(torch, targets, shape=(100, 30, 24, 24)):
    """2x2 stride-2 max pooling forward + backward on float32: fastbp.layers (reuse) vs reference vs torch."""
    from fastbp import layers as L, reference as R

    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    d = rng.standard_normal(shape[:2] + (shape[2] // 2, shape[3] // 2)).astype(np.float32)
    f, r = L.Pooling(2, 2, 2, reuse=True), R.Pooling(2, 2, 2)
    impls = OrderedDict(
        [("fastbp", lambda: (f.forward(x), f.backward(d))), ("numpy", lambda: (r.forward(x), r.backward(d)))]
    )
    if torch is not None:
        xt = torch.from_numpy(x).requires_grad_(True)
        dt = torch.from_numpy(d)

        def torch_step():
            xt.grad = None
            torch.nn.functional.max_pool2d(xt, 2, 2).backward(dt)

        impls["torch"] = torch_step

    def check():
        fo, fd = (np.array(a) for a in (f.forward(x), f.backward(d)))
        worst = max(_close(fo, r.forward(x), 0, "pool out"), _close(fd, r.backward(d), 0, "pool dx"))
        return f"fastbp==numpy {worst:.1e}"

    return Case("maxpool-100x30x24x24", "max pooling 2x2/2 fwd+bwd (100, 30, 24, 24) f32", impls, check, None, targets)


def conv_case_specs(torch=None):
    """[(key, build)] for fastbp.bench.cases.build_cases (issue 9's speed targets)."""
    T = Target
    return [
        (
            "train-simpleconvnet-b100-f32",
            lambda: convnet_case(
                "train-simpleconvnet-b100-f32",
                "train step SimpleConvNet b100 f32",
                "SimpleConvNet",
                np.float32,
                torch,
                [T("speedup", 1.5, "torch"), T("speedup", 10.0, "numpy")],
            ),
        ),
        (
            "train-simpleconvnet-b100-f64",
            lambda: convnet_case(
                "train-simpleconvnet-b100-f64",
                "train step SimpleConvNet b100 f64",
                "SimpleConvNet",
                np.float64,
                torch,
                [T("speedup", 1.5, "torch")],
            ),
        ),
        (
            "train-deepconvnet-b100-f32",
            lambda: convnet_case(
                "train-deepconvnet-b100-f32",
                "train step DeepConvNet b100 f32",
                "DeepConvNet",
                np.float32,
                torch,
                [T("speedup", 1.0, "torch"), T("floor", 2.0)],
            ),
        ),
        (
            "book-simpleconvnet-b100",
            lambda: convnet_case(
                "book-simpleconvnet-b100",
                "book SimpleConvNet b100 (f64 W, f32 x), layers swapped",
                "SimpleConvNet",
                np.float64,
                torch,
                [T("speedup", 5.0, "numpy")],
                book_swap=True,
            ),
        ),
        ("maxpool-100x30x24x24", lambda: maxpool_case(torch, [T("speedup", 2.0, "torch")])),
    ]
