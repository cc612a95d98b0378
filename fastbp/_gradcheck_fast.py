"""Fast gradient checks: directional derivatives instead of one central difference per parameter element.

``gradient_check_fast(target, x, t=None, dout=None)`` checks, for every input and parameter array ``p`` of a layer
or network, that backpropagation's directional derivative ``<grad_p, u>`` along a random unit direction ``u``
equals a five-point central difference along ``u``
(``(8 (f(p + h u) - f(p - h u)) - (f(p + 2h u) - f(p - 2h u))) / 12h``, error O(h^4)) -- the idea of
``torch.autograd.gradcheck(fast_mode=True)``, which compares ``vᵀ J u`` for random unit ``u`` and ``v``.  Here
``f`` is the scalar ``vᵀ forward(x)`` of a layer (``v`` a random unit array of the output's shape, which
backward receives as ``dout``), or the loss of a network (``v = 1``).  Two forward passes per direction and
array, whatever its size, instead of two per element: SimpleConvNet on real 28x28 digits or DeepConvNet check in
seconds.  A wrong gradient in any part of an array shows up unless it is orthogonal to every random direction (of
probability zero): a sign flip in one of 30 filters changes ``<grad_W, u>`` by about 2/sqrt(30) of its size.

Targets are duck-typed like :mod:`fastbp.gradient`'s checks:

* a network with the book-1 API (``params`` dict, ``loss(x, t)``, ``gradient(x, t)`` returning a dict);
* a layer with ``forward``/``backward`` and ``params``/``grads`` lists (book 2) or ``W``/``dW``, ``b``/``db``,
  ``gamma``/``dgamma``, ``beta``/``dbeta`` attributes (book 1); with ``t`` it is a loss layer.

NumPy's global random state is saved before the check and restored before every evaluation, so layers that draw
from it (Dropout) see the same masks in every pass; it is left as it was found.  Parameter arrays are perturbed
in place and restored bit for bit; inputs are copied.
"""

import inspect

import numpy as np

from fastbp.gradient import GradientCheckError, _layer_params

__all__ = ["gradient_check_fast"]


def _unit(rng, shape):
    u = rng.standard_normal(shape)
    n = float(np.linalg.norm(u))
    return u / n if n > 0 else u


def _rel(a, n, floor):
    return abs(a - n) / max(abs(a), abs(n), floor)


def gradient_check_fast(
    target, x, t=None, dout=None, *, n_dirs=2, h=None, threshold=None, floor=1e-3, seed=0, raise_on_failure=True
):
    """{name: worst relative error over n_dirs random unit directions} of backprop's directional derivative
    against a central difference along the same direction; raises GradientCheckError above ``threshold``.

    The relative error is ``|a - n| / max(|a|, |n|, floor * max(||grad||, 1e-6 * largest ||grad|| checked),
    noise / threshold)``: a direction almost orthogonal to the gradient compares absolutely, at ``floor`` times the
    gradient's norm (the largest directional derivative); a gradient that is zero in exact arithmetic (an Affine
    bias feeding a batch norm) at a millionth of the largest gradient's; and a difference within the rounding
    noise of the difference quotient (noise = 8 eps |f| / h) stays within the threshold.
    ``h`` defaults to 1e-5 (float64 parameters; small, so that a perturbation of every element at once rarely
    crosses a ReLU or max-pooling kink) or 1e-2 (float32); ``threshold`` to 1e-6 / 5e-2.  ``dout`` (a
    layer's output gradient) defaults to a random unit array ``v``.
    """
    if n_dirs < 1:
        raise ValueError(f"n_dirs must be >= 1, got {n_dirs}")
    rng = np.random.default_rng([seed, 0x6AD])  # not default_rng(seed): data drawn from that would equal v, u
    state = np.random.get_state()
    try:
        if hasattr(target, "gradient") and isinstance(getattr(target, "params", None), dict):
            named, f, analytic = _net_problem(target, x, t, state)
        else:
            named, f, analytic = _layer_problem(target, x, t, dout, rng, state)
        f64 = all(np.asarray(arr).dtype == np.float64 for _, arr in named)
        if h is None:
            h = 1e-5 if f64 else 1e-2
        if threshold is None:
            threshold = 1e-6 if f64 else 5e-2
        grads = {k: np.asarray(g, np.float64) for k, g in analytic().items()}
        biggest = max([float(np.linalg.norm(grads[name])) for name, _ in named] + [0.0])
        # rounding noise of a difference quotient of f: what no numerical derivative resolves
        noise = 8 * np.finfo(np.float64 if f64 else np.float32).eps * max(abs(f()), 1.0) / h
        errors = {}
        for name, arr in named:
            g = grads[name]
            scale = max(floor * max(float(np.linalg.norm(g)), 1e-6 * biggest), noise / threshold) or 1e-300
            worst = 0.0
            for _ in range(n_dirs):
                u = _unit(rng, arr.shape)
                a = float(np.vdot(g, u))
                num = _directional(f, arr, u, h)
                worst = max(worst, _rel(a, num, scale))
            errors[name] = worst
    finally:
        np.random.set_state(state)
    bad = {k: e for k, e in errors.items() if not e <= threshold}
    if bad and raise_on_failure:
        worst = max(bad, key=bad.get)
        summary = ", ".join(f"{k}={v:.3g}" for k, v in errors.items())
        raise GradientCheckError(
            f"fast gradient check failed for {type(target).__name__}: {worst!r} has directional relative error "
            f"{bad[worst]:.3g} > {threshold:.3g} [all: {summary}; h={h:g}, {n_dirs} directions]",
            errors,
            worst,
            threshold,
        )
    return errors


def _directional(f, arr, u, h):
    """Five-point central difference of f along u at arr (perturbed in place, restored exactly)."""
    saved = arr.copy()
    vals = []
    try:
        for step in (h, -h, 2 * h, -2 * h):
            np.add(saved, (step * u).astype(arr.dtype, copy=False), out=arr, casting="unsafe")
            vals.append(f())
    finally:
        arr[...] = saved
    fp, fm, fp2, fm2 = vals
    return (8 * (fp - fm) - (fp2 - fm2)) / (12 * h)


def _net_problem(net, x, t, state):
    named = [(k, p) for k, p in net.params.items() if isinstance(p, np.ndarray) and p.dtype.kind == "f"]
    try:  # the book's MultiLayerNetExtend.loss defaults to train_flg=False; its gradient trains
        kw = {"train_flg": True} if "train_flg" in inspect.signature(net.loss).parameters else {}
    except (TypeError, ValueError):
        kw = {}

    def f():
        np.random.set_state(state)
        return float(net.loss(x, t, **kw))

    def analytic():
        np.random.set_state(state)
        return {k: np.array(g, dtype=np.float64) for k, g in net.gradient(x, t).items()}

    return named, f, analytic


def _layer_problem(layer, x, t, dout, rng, state):
    xs = np.array(x, copy=True)
    loss_layer = t is not None

    def forward():
        np.random.set_state(state)
        return layer.forward(xs, t) if loss_layer else layer.forward(xs)

    out = forward()
    if loss_layer:
        v = 1.0 if dout is None else float(dout)
    else:
        out = np.asarray(out)
        v = (
            _unit(rng, out.shape).astype(out.dtype if out.dtype.kind == "f" else np.float64)
            if dout is None
            else np.array(dout, copy=True)
        )
        v64 = np.asarray(v, np.float64).ravel()

    def f():
        o = forward()
        if loss_layer:
            return v * float(o)
        return float(np.dot(np.asarray(o, np.float64).ravel(), v64))

    entries = _layer_params(layer)
    named = ([("x", xs)] if xs.dtype.kind == "f" else []) + [(name, pget()) for name, pget, _ in entries]

    def analytic():
        forward()
        dx = layer.backward(v if loss_layer else v.copy())
        grads = {name: np.array(gget(), dtype=np.float64) for name, _, gget in entries}
        if xs.dtype.kind == "f":
            grads["x"] = np.array(dx, dtype=np.float64)
        return grads

    return named, f, analytic


def book1_cnn_cases(seed=0):
    """[(name, check)] in the format of ``fastbp.cli.gradcheck_cases`` (check() -> {array: max relative error}),
    float64: Convolution, Pooling, BatchNormalization (2-D, 4-D) against element-wise central differences;
    Dropout, SimpleConvNet on real 28x28 digits, DeepConvNet and MultiLayerNetExtend (batch norm, dropout,
    weight decay) with the fast directional check.  Biases start away from 0 so that all-background windows of a
    digit do not sit on the ReLU kink."""
    import os

    from fastbp import layers as L
    from fastbp.convnets import DeepConvNet, MultiLayerNetExtend, SimpleConvNet
    from fastbp.gradient import gradient_check_layer

    rng = np.random.default_rng(seed)
    data = np.load(os.path.join(os.path.dirname(__file__), "data", "mnist-5k.npz"))
    digits = (data["images"][::1250] / 255).reshape(-1, 1, 28, 28)
    labels = data["labels"][::1250]

    def distinct(shape):
        size = int(np.prod(shape))
        return ((rng.permutation(size) - size / 2 + 0.5) * 0.01).reshape(shape)

    def layer(make, x):
        return lambda: gradient_check_layer(make(), x, raise_on_failure=False)

    def fast(make, x, t=None):
        def run():
            state = np.random.get_state()
            np.random.seed(seed)
            try:
                target = make()
            finally:
                np.random.set_state(state)
            return gradient_check_fast(target, x, t, seed=seed, raise_on_failure=False)

        return run

    def lift_biases(net, n):
        for i in range(1, n + 1):
            b = net.params[f"b{i}"]
            b[...] = 0.05 + 0.05 * np.random.rand(b.size)
        return net

    W = rng.standard_normal((3, 2, 3, 2))
    b = rng.standard_normal(3)
    xc = rng.standard_normal((2, 2, 6, 5))
    return [
        ("Convolution stride 2 pad 1", layer(lambda: L.Convolution(W.copy(), b.copy(), 2, 1), xc)),
        ("Pooling 2x2 stride 2", layer(lambda: L.Pooling(2, 2, 2), distinct((2, 3, 6, 5)))),
        ("Pooling 3x3 stride 2 pad 1", layer(lambda: L.Pooling(3, 3, 2, 1), distinct((2, 2, 7, 7)))),
        (
            "BatchNormalization 2-D",
            layer(lambda: L.BatchNormalization(1 + rng.random(4), rng.random(4)), rng.standard_normal((5, 4))),
        ),
        (
            "BatchNormalization 4-D",
            layer(lambda: L.BatchNormalization(1 + rng.random(12), rng.random(12)), rng.standard_normal((3, 3, 2, 2))),
        ),
        ("Dropout (fast, vTJu)", fast(lambda: L.Dropout(0.4), rng.standard_normal((4, 6)))),
        (
            "SimpleConvNet 28x28 digits (fast, vTJu)",
            fast(lambda: lift_biases(SimpleConvNet(weight_init_std=0.1), 1), digits, labels),
        ),
        ("DeepConvNet 28x28 digits (fast, vTJu)", fast(lambda: lift_biases(DeepConvNet(), 6), digits[:2], labels[:2])),
        (
            "MultiLayerNetExtend bn+dropout+decay (fast, vTJu)",
            fast(
                lambda: MultiLayerNetExtend(
                    12, [8, 6], 4, weight_decay_lambda=0.1, use_dropout=True, use_batchnorm=True
                ),
                rng.random((5, 12)),
                rng.integers(0, 4, 5),
            ),
        ),
    ]
