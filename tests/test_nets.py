"""fastbp.nets: the book's TwoLayerNet / MultiLayerNet API, gradients, backends, allocation-free steps."""

import gc
import copy
import tracemalloc

import numpy as np
import pytest

from fastbp import layers as fast_layers
from fastbp import reference as ref_layers
from fastbp.nets import MultiLayerNet, TwoLayerNet
from fastbp.optimizers import SGD, Adam, Momentum

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
GRAD_CHECK_MAX = 1e-6


def _relative_error(a, n):
    """max |a - n| / max(|a|, |n|, 1e-6 * largest entry): entries that are ~0 compare absolutely."""
    a = np.asarray(a, np.float64)
    n = np.asarray(n, np.float64)
    floor = 1e-6 * max(np.abs(a).max(), np.abs(n).max(), 1e-300)
    return float(np.max(np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)))


def _make(kind, seed=0, **kw):
    np.random.seed(seed)
    if kind == "two":
        return TwoLayerNet(12, 8, 4, weight_init_std=kw.pop("weight_init_std", 0.5), **kw)
    if kind == "relu":
        return MultiLayerNet(12, [8, 6], 4, activation="relu", weight_init_std="he", **kw)
    if kind == "sigmoid":
        return MultiLayerNet(12, [8, 6], 4, activation="sigmoid", weight_init_std="xavier", **kw)
    raise AssertionError(kind)


def _data(n=3, d=12, c=4, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    t = rng.integers(0, c, n)
    return x, t, np.eye(c)[t]


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fastbp", "reference"])
@pytest.mark.parametrize("kind,lam", [("two", 0), ("relu", 0), ("relu", 0.1), ("sigmoid", 0), ("sigmoid", 0.1)])
@pytest.mark.parametrize("onehot", [False, True])
def test_gradient_matches_numerical_gradient(kind, lam, backend, onehot):
    kw = {} if kind == "two" else {"weight_decay_lambda": lam}
    net = _make(kind, backend=backend, **kw)
    x, t, T = _data()
    target = T if onehot else t
    grads = {k: v.copy() for k, v in net.gradient(x, target).items()}
    num = net.numerical_gradient(x, target)
    assert list(grads) == list(net.params) == list(num)
    for k in net.params:
        assert grads[k].shape == net.params[k].shape
        err = _relative_error(grads[k], num[k])
        assert err <= GRAD_CHECK_MAX, f"{k}: relative error {err:.3g}"


def test_weight_decay_enters_loss_and_gradient():
    x, t, _ = _data()
    plain = _make("relu")
    decayed = _make("relu", weight_decay_lambda=0.3)
    ws = sum(float(np.sum(plain.params[f"W{i}"] ** 2)) for i in (1, 2, 3))
    np.testing.assert_allclose(decayed.loss(x, t) - plain.loss(x, t), 0.5 * 0.3 * ws, rtol=1e-12)
    g0 = {k: v.copy() for k, v in plain.gradient(x, t).items()}
    g1 = decayed.gradient(x, t)
    for i in (1, 2, 3):
        np.testing.assert_allclose(g1[f"W{i}"], g0[f"W{i}"] + 0.3 * plain.params[f"W{i}"], rtol=1e-12)
        np.testing.assert_allclose(g1[f"b{i}"], g0[f"b{i}"], rtol=1e-12)
    # a second call recomputes dW from scratch (the decay term is not added twice)
    g2 = decayed.gradient(x, t)
    np.testing.assert_allclose(g2["W1"], g0["W1"] + 0.3 * plain.params["W1"], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# fastbp backend == reference backend
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,lam", [("two", 0), ("relu", 0.05), ("sigmoid", 0)])
def test_fastbp_backend_equals_reference_backend(dtype, kind, lam):
    kw = {} if kind == "two" else {"weight_decay_lambda": lam}
    fast = _make(kind, dtype=dtype, backend="fastbp", **kw)
    slow = _make(kind, dtype=dtype, backend="reference", **kw)
    for k in fast.params:
        np.testing.assert_array_equal(fast.params[k], slow.params[k])
    rng = np.random.default_rng(7)
    opt_f, opt_s = Momentum(lr=0.1), Momentum(lr=0.1)
    for step in range(4):
        x = rng.random((16, 12)).astype(dtype)
        t = rng.integers(0, 4, 16).astype(np.uint8)
        np.testing.assert_allclose(fast.predict(x), slow.predict(x), **TOL[dtype])
        np.testing.assert_allclose(fast.loss(x, t), slow.loss(x, t), **TOL[dtype])
        gf, gs = fast.gradient(x, t), slow.gradient(x, t)
        for k in fast.params:
            assert gf[k].dtype == np.dtype(dtype)
            np.testing.assert_allclose(gf[k], gs[k], **TOL[dtype], err_msg=f"step {step} {k}")
        opt_f.update(fast.params, gf)
        opt_s.update(slow.params, gs)
    for k in fast.params:
        np.testing.assert_allclose(fast.params[k], slow.params[k], **TOL[dtype])
    assert fast.accuracy(x, t) == slow.accuracy(x, t)


@pytest.mark.parametrize("feed", ["one-hot", "float64 x"])
def test_float32_net_computes_in_float32_whatever_it_is_fed(feed):
    x, t, T = _data(n=5)  # float64 x, float64 one-hot T
    fast = _make("relu", dtype=np.float32)
    slow = _make("relu", dtype=np.float32, backend="reference")
    target = T if feed == "one-hot" else t
    xin = x.astype(np.float32) if feed == "one-hot" else x
    assert fast.predict(xin).dtype == np.float32
    grads = fast.gradient(xin, target)
    for k in fast.params:
        assert grads[k].dtype == np.float32
        np.testing.assert_allclose(grads[k], slow.gradient(xin, target)[k], **TOL[np.float32])
    np.testing.assert_allclose(fast.loss(xin, target), slow.loss(xin, target), **TOL[np.float32])


def test_float32_images_with_float64_net_like_the_book():
    x, t, _ = _data(n=5)
    x32 = x.astype(np.float32)
    fast = _make("relu")
    slow = _make("relu", backend="reference")
    assert fast.predict(x32).dtype == np.float64
    np.testing.assert_allclose(fast.predict(x32), slow.predict(x32), **TOL[np.float64])
    np.testing.assert_allclose(fast.gradient(x32, t)["W1"], slow.gradient(x32, t)["W1"], **TOL[np.float64])


# ---------------------------------------------------------------------------------------------------------
# the book's API
# ---------------------------------------------------------------------------------------------------------
def test_two_layer_net_api_and_init_like_the_book():
    np.random.seed(42)
    W1 = 0.01 * np.random.randn(784, 50)
    W2 = 0.01 * np.random.randn(50, 10)
    np.random.seed(42)
    net = TwoLayerNet(input_size=784, hidden_size=50, output_size=10)
    assert list(net.params) == ["W1", "b1", "W2", "b2"]
    np.testing.assert_array_equal(net.params["W1"], W1)
    np.testing.assert_array_equal(net.params["W2"], W2)
    np.testing.assert_array_equal(net.params["b1"], np.zeros(50))
    assert list(net.layers) == ["Affine1", "Relu1", "Affine2"]
    assert isinstance(net.lastLayer, fast_layers.SoftmaxWithLoss) and net.last_layer is net.lastLayer
    assert all(layer.reuse for layer in net.layers.values()) and net.lastLayer.reuse
    assert net.layers["Affine1"].need_dx is False and net.layers["Affine2"].need_dx is True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "init,scale",
    [
        ("relu", lambda n: np.sqrt(2 / n)),
        ("he", lambda n: np.sqrt(2 / n)),
        ("sigmoid", lambda n: np.sqrt(1 / n)),
        ("Xavier", lambda n: np.sqrt(1 / n)),
        (0.05, lambda n: 0.05),
    ],
)
def test_multi_layer_net_init(init, scale, dtype):
    sizes = [20, 9, 7, 3]
    np.random.seed(3)
    expected = [scale(sizes[i]) * np.random.randn(sizes[i], sizes[i + 1]) for i in range(3)]
    np.random.seed(3)
    net = MultiLayerNet(20, [9, 7], 3, activation="sigmoid", weight_init_std=init, dtype=dtype)
    assert list(net.layers) == ["Affine1", "Sigmoid1", "Affine2", "Sigmoid2", "Affine3"]
    assert net.hidden_size_list == [9, 7] and net.hidden_layer_num == 2
    for i in range(3):
        W = net.params[f"W{i + 1}"]
        assert W.dtype == np.dtype(dtype) and W.flags.c_contiguous
        np.testing.assert_array_equal(W, expected[i].astype(dtype))
        assert net.params[f"b{i + 1}"].dtype == np.dtype(dtype)


def test_reference_backend_uses_reference_layers():
    net = _make("relu", backend="reference")
    assert isinstance(net.layers["Affine1"], ref_layers.Affine)
    assert isinstance(net.layers["Relu1"], ref_layers.Relu)
    assert isinstance(net.lastLayer, ref_layers.SoftmaxWithLoss)


@pytest.mark.parametrize("backend", ["fastbp", "reference"])
def test_params_are_the_layers_arrays_and_updates_are_seen(backend):
    net = _make("relu", backend=backend)
    for i in (1, 2, 3):
        assert net.params[f"W{i}"] is net.layers[f"Affine{i}"].W
        assert net.params[f"b{i}"] is net.layers[f"Affine{i}"].b
    x, t, _ = _data(n=6)
    before = net.loss(x, t)
    opt = SGD(lr=0.5)
    ids = {k: id(v) for k, v in net.params.items()}
    for _ in range(5):
        opt.update(net.params, net.gradient(x, t))
    assert {k: id(v) for k, v in net.params.items()} == ids
    assert net.loss(x, t) < before
    # the layers compute with the updated arrays
    h = np.maximum(x @ net.params["W1"] + net.params["b1"], 0)
    h = np.maximum(h @ net.params["W2"] + net.params["b2"], 0)
    np.testing.assert_allclose(net.predict(x), h @ net.params["W3"] + net.params["b3"], rtol=1e-12)


def test_book_style_manual_update_works():
    net = _make("two")
    x, t, T = _data(n=6)
    before = net.loss(x, T)
    for _ in range(5):
        grad = net.gradient(x, T)
        for key in ("W1", "b1", "W2", "b2"):
            net.params[key] -= 0.5 * grad[key]
    assert net.loss(x, T) < before


@pytest.mark.parametrize("backend", ["fastbp", "reference"])
def test_accuracy_with_labels_one_hot_and_slices(backend):
    net = _make("relu", backend=backend)
    x, t, T = _data(n=50, seed=4)
    y = np.argmax(net.predict(x), axis=1).copy()
    expected = np.mean(y == t)
    assert 0 < expected < 1  # make both kinds of rows occur
    assert net.accuracy(x, t) == expected
    assert net.accuracy(x, T) == expected
    assert net.accuracy(x, t, batch_size=7) == expected
    assert net.accuracy(x, T.astype(np.float32), batch_size=50) == expected
    with pytest.raises(ValueError, match="one label"):
        net.accuracy(x, t[:-1])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(backend="torch"), ValueError, "backend"),
        (dict(dtype=np.int32), TypeError, "float32 or float64"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(weight_init_std="glorot"), ValueError, "weight_init_std"),
        (dict(weight_decay_lambda=-1), ValueError, "weight_decay_lambda"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MultiLayerNet(4, [3], 2, **kwargs)


def test_size_validation():
    with pytest.raises(ValueError, match="hidden_size"):
        TwoLayerNet(4, 0, 2)
    with pytest.raises(TypeError, match="list"):
        MultiLayerNet(4, 3, 2)


# ---------------------------------------------------------------------------------------------------------
# allocation-free training step
# ---------------------------------------------------------------------------------------------------------
def _step_peak(net, opt, x, t, steps=3):
    """Peak of traced memory above the starting point over `steps` training steps, after warm-up (bytes)
    and the live memory left behind."""

    def step():
        grads = net.gradient(x, t)
        opt.update(net.params, grads)

    for _ in range(3):
        step()
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        step()
        tracemalloc.reset_peak()
        cur0, _ = tracemalloc.get_traced_memory()
        for _ in range(steps):
            step()
        cur1, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    return peak - cur0, cur1 - cur0


def _alloc_case(kind, scale, dtype, backend, opt_cls, feed="labels"):
    """A net whose every array has at least 16 elements, sized by `scale`."""
    np.random.seed(0)
    d, h, c, n = 32 * scale, 24 * scale, 16 * scale, 16 * scale
    if kind == "two":
        net = TwoLayerNet(d, h, c, dtype=dtype, backend=backend)
    else:
        net = MultiLayerNet(d, [h, h], c, activation=kind, weight_decay_lambda=0.01, dtype=dtype, backend=backend)
    rng = np.random.default_rng(0)
    x = rng.random((n, d)).astype(np.float32)  # float32 images, like load_mnist(normalize=True)
    t = rng.integers(0, c, n).astype(np.uint8)  # uint8 labels, like load_mnist
    if feed == "one-hot":
        t = np.eye(c)[t]  # float64, like load_mnist(one_hot_label=True)
    elif feed == "float64 x":
        x = x.astype(np.float64)
    return _step_peak(net, opt_cls(), x, t)


@pytest.mark.parametrize("feed", ["labels", "one-hot", "float64 x"])
@pytest.mark.parametrize("opt_cls", [SGD, Adam])
@pytest.mark.parametrize("kind", ["two", "relu", "sigmoid"])
def test_training_step_allocates_no_numpy_arrays(kind, opt_cls, feed):
    """Any NumPy temporary scales with the array sizes; the Python objects of a step (the grads dict, ...)
    do not.  So the step's peak must be the same for a small float32 net and a 2x larger float64 one."""
    small, live_small = _alloc_case(kind, 1, np.float32, "fastbp", opt_cls, feed)
    big, live_big = _alloc_case(kind, 2, np.float64, "fastbp", opt_cls, feed)
    assert small < 2048, f"a training step allocated {small} bytes"
    assert abs(big - small) <= 16, f"step peak {small} B (small float32 net) vs {big} B (2x float64 net)"
    assert live_small < 256 and live_big < 256


def test_allocation_measurement_sees_numpy_temporaries():
    """The reference backend allocates per step, and the measurement above notices it."""
    small, _ = _alloc_case("relu", 1, np.float32, "reference", SGD)
    big, _ = _alloc_case("relu", 2, np.float64, "reference", SGD)
    assert big > small + 4096


@pytest.mark.parametrize("backend", ["fastbp", "reference"])
def test_gradient_asks_the_first_affine_for_no_dx_on_the_fastbp_backend_only(backend, monkeypatch):
    # common API: fastbp's own nets pass need_dx=False to the first layer's backward (the images' gradient is
    # never used); the reference backend (the book's algorithm, the benchmarks' NumPy baseline) computes it
    np.random.seed(0)
    net = MultiLayerNet(12, [7, 5], 3, backend=backend)
    x, t = np.random.rand(4, 12), np.array([0, 2, 1, 2])
    want = {k: np.array(v) for k, v in MultiLayerNet(12, [7, 5], 3, backend="reference").gradient(x, t).items()}
    np.random.seed(0)
    calls = []
    for name in ("Affine1", "Affine2"):
        layer = net.layers[name]
        orig = layer.backward

        def spy(dout, *, need_dx=True, _orig=orig, _name=name):
            calls.append((_name, need_dx))
            out = _orig(dout, need_dx=need_dx)
            assert (out is None) == (not need_dx or not getattr(net.layers[_name], "need_dx", True))
            return out

        monkeypatch.setattr(layer, "backward", spy)
    got = net.gradient(x, t)
    assert calls == [("Affine2", True), ("Affine1", backend != "fastbp")]
    np.random.seed(0)
    ref = MultiLayerNet(12, [7, 5], 3, backend="reference")
    for k in want:
        np.testing.assert_allclose(got[k], ref.gradient(x, t)[k], rtol=1e-12, atol=1e-14)


def test_two_layer_net_step_opens_three_regions_its_two_large_products_and_w1s_update():
    # 784-50-10 batch 100: x @ W1 and x.T @ dout1 are the only products above the split threshold (no dx GEMM
    # for the first layer), and W1's update (39200 elements) is cut into one block per thread, each the rows that
    # thread's pieces of those products read and write; ReLU, bias, softmax and the other updates stay on the
    # calling thread at this size
    from fastbp import _blas, _kernels, _threads

    if _kernels.build_info()["num_threads"] < 2:
        pytest.skip("one thread: no region is ever opened")
    if _blas.info()["threading"] != "split":
        pytest.skip("OpenBLAS threads the products itself in this mode")
    np.random.seed(1)
    net = TwoLayerNet(784, 50, 10, dtype=np.float32)
    opt = SGD(lr=0.1)
    x, t = np.random.rand(100, 784).astype(np.float32), np.random.randint(0, 10, 100)
    opt.update(net.params, net.gradient(x, t))
    _threads.reset_region_counts()
    for _ in range(3):
        opt.update(net.params, net.gradient(x, t))
    assert _threads.region_counts() == {"opened": 9, "serial": 0}


# ---------------------------------------------------------------------------------------------------------
# Affine -> Relu fused in gradient() (fastbp backend)
# ---------------------------------------------------------------------------------------------------------
def _unfused_twin(net):
    """The same net with its Relus replaced by a subclass of fastbp's Relu (not fused: gradient() fuses only
    fastbp's own classes), sharing the parameters."""
    from fastbp import layers as FL

    class PlainRelu(FL.Relu):
        pass

    twin = copy.deepcopy(net)
    for name, layer in list(twin.layers.items()):
        if type(layer) is FL.Relu:
            twin.layers[name] = PlainRelu(reuse=True)
    return twin


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,lam", [("two", 0), ("relu", 0), ("relu", 0.1)])
def test_fused_affine_relu_gives_the_layer_by_layer_gradients_bit_for_bit(kind, lam, dtype):
    from fastbp import layers as FL

    kw = {"weight_decay_lambda": lam} if kind == "relu" else {}
    net = _make(kind, dtype=dtype, **kw)
    twin = _unfused_twin(net)
    x, t, _ = _data(n=9)
    x[0, :] = -x[0, :]  # rows with negative pre-activations, exact zeros and a NaN-free mix
    relus = [name for name, layer in net.layers.items() if type(layer) is FL.Relu]
    for name in relus:  # gradient() must not call the fused Relus' forward/backward
        layer = net.layers[name]
        layer.forward = layer.backward = lambda *a, **k: pytest.fail("a fused Relu was called")
    for _ in range(2):  # the second call reuses every workspace
        got = net.gradient(x, t)
        want = twin.gradient(x, t)
        for key in want:
            assert got[key].dtype == want[key].dtype
            assert np.array_equal(got[key], want[key]), key
        for name in relus:  # the book's attribute, computed from the kept output when read
            assert np.array_equal(vars(net.layers[name])["_mask_src"] <= 0, twin.layers[name].mask)
            assert np.array_equal(net.layers[name].mask, twin.layers[name].mask)


def test_fused_relu_layer_still_works_when_called_after_gradient():
    from fastbp import layers as FL

    net = _make("two", dtype=np.float64)
    twin = _unfused_twin(net)
    x, t, _ = _data(n=5)
    net.gradient(x, t)
    twin.gradient(x, t)
    dout = np.random.default_rng(3).standard_normal(net.layers["Relu1"].mask.shape)
    assert type(net.layers["Relu1"]) is FL.Relu
    assert np.array_equal(net.layers["Relu1"].backward(dout), twin.layers["Relu1"].backward(dout))
    assert np.array_equal(net.predict(x), twin.predict(x))  # predict runs the layers one by one
    assert np.array_equal(net.layers["Relu1"].mask, twin.layers["Relu1"].mask)


def test_fused_relu_passes_nan_like_the_layer():
    net = _make("two", dtype=np.float64)
    twin = _unfused_twin(net)
    x, t, _ = _data(n=4)
    x[1, 2] = np.nan
    got, want = net.gradient(x, t), twin.gradient(x, t)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])  # NaN where the layers give NaN


# ---------------------------------------------------------------------------------------------------------
# The whole gradient in one kernel call (fastbp backend, Affine/Relu/.../Affine + SoftmaxWithLoss)
# ---------------------------------------------------------------------------------------------------------
def _count_fc_calls(monkeypatch):
    from fastbp import _kernels

    calls = []
    real = _kernels.fc_relu_gradient

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(_kernels, "fc_relu_gradient", spy)
    return calls


def _layer_state(net):
    """What the book can read off the layers after gradient()."""
    out = {}
    for name, layer in net.layers.items():
        if name.startswith("Affine"):
            out[name + ".x"] = np.array(layer.x)
            out[name + ".dW"] = np.array(layer.dW)
            out[name + ".db"] = np.array(layer.db)
        else:
            out[name + ".mask"] = np.array(layer.mask)
    last = net.lastLayer
    out["y"] = np.array(last.y)
    out["t"] = np.array(last.t)
    out["loss"] = np.array(last.loss)
    out["dx"] = np.array(last.backward(1))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,lam", [("two", 0), ("relu", 0), ("relu", 0.1), ("none", 0)])
@pytest.mark.parametrize("target", ["labels", "uint8", "one-hot"])
def test_one_call_gradient_gives_the_layer_path_bits_and_attributes(kind, lam, dtype, target, monkeypatch):
    if kind == "none":  # no hidden layer: Affine -> SoftmaxWithLoss
        np.random.seed(0)
        net = MultiLayerNet(12, [], 4, dtype=dtype)
    else:
        net = _make(kind, dtype=dtype, **({"weight_decay_lambda": lam} if kind == "relu" else {}))
    twin = _unfused_twin(net)  # its Relus are not fastbp's own class: layer by layer, nothing fused

    class PlainSoftmaxWithLoss(fast_layers.SoftmaxWithLoss):  # nor its loss layer: never the one-call path
        pass

    twin.lastLayer = PlainSoftmaxWithLoss(reuse=True)
    calls = _count_fc_calls(monkeypatch)
    for n in (9, 9, 5):  # the second call reuses the arrays, the third has another batch size
        x, t, t1h = _data(n=n, seed=n)
        x[0, :] = -x[0, :]
        tt = {"labels": t, "uint8": t.astype(np.uint8), "one-hot": t1h}[target]
        got = {k: np.array(v) for k, v in net.gradient(x, tt).items()}
        want = twin.gradient(x, tt)
        for key in want:
            assert got[key].dtype == want[key].dtype
            assert np.array_equal(got[key], want[key]), key
        sg, sw = _layer_state(net), _layer_state(twin)
        for key in sw:
            assert np.array_equal(sg[key], sw[key]), key
    assert len(calls) == 2  # the first call checks the grads layer by layer, the next ones take one call


def test_one_call_gradient_falls_back_to_the_layers_when_they_are_not_its_case(monkeypatch):
    from fastbp import reference

    net = _make("two", dtype=np.float64)
    twin = _unfused_twin(net)
    calls = _count_fc_calls(monkeypatch)
    x, t, t1h = _data(n=6)
    net.gradient(x, t)
    net.gradient(x, t)
    assert len(calls) == 1
    cases = [
        ("labels (N, 1)", lambda: (x, t.reshape(-1, 1))),
        ("float32 one-hot rows", lambda: (x, t1h.astype(np.float32))),
    ]
    for what, make in cases:
        xx, tt = make()
        got = {k: np.array(v) for k, v in net.gradient(xx, tt).items()}
        want = twin.gradient(xx, tt)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=what)
    assert len(calls) == 1 + 1  # the float32 rows are converted to the net's dtype: one call; (N, 1): none
    # a spy set on a layer is called
    seen = []
    layer = net.layers["Affine2"]
    real = layer.backward
    monkeypatch.setattr(layer, "backward", lambda d, **k: seen.append(1) or real(d, **k))
    net.gradient(x, t)
    assert seen == [1] and len(calls) == 2
    monkeypatch.undo()
    calls = _count_fc_calls(monkeypatch)
    # the book's loss layer swapped in
    net.lastLayer = reference.SoftmaxWithLoss()
    twin.lastLayer = reference.SoftmaxWithLoss()
    got = {k: np.array(v) for k, v in net.gradient(x, t).items()}
    want = twin.gradient(x, t)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert calls == []


def test_one_call_gradient_follows_replaced_weights_of_another_shape(monkeypatch):
    net = _make("two", dtype=np.float64)  # 12-8-4
    calls = _count_fc_calls(monkeypatch)
    x, t, _ = _data(n=5)
    net.gradient(x, t)
    net.gradient(x, t)
    # a hidden layer of 6 units: new W1, b1, W2 and their grads, put into the layers' lists in place
    rng = np.random.default_rng(7)
    A1, A2 = net.layers["Affine1"], net.layers["Affine2"]
    A1.params[0] = rng.standard_normal((12, 6))
    A1.params[1] = rng.standard_normal(6)
    A1.grads[0], A1.grads[1] = np.zeros((12, 6)), np.zeros(6)
    A2.params[0] = rng.standard_normal((6, 4))
    A2.grads[0] = np.zeros((6, 4))
    want_net = TwoLayerNet(12, 6, 4, backend="reference")
    for k, A in (("1", A1), ("2", A2)):
        want_net.params["W" + k][...] = A.params[0]
        want_net.params["b" + k][...] = A.params[1]
    for _ in range(3):
        got = net.gradient(x, t)
        want = want_net.gradient(x, t)
        np.testing.assert_allclose(got["W1"], want["W1"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["W2"], want["W2"], rtol=1e-10, atol=1e-12)
        assert got["W1"].shape == (12, 6)
    assert len(calls) == 1 + 2  # after the change: one layer-path call (it checks the new grads), then one call


def test_one_call_gradient_bad_label_raises_like_the_layer_path(monkeypatch):
    net = _make("two", dtype=np.float32)
    x, t, _ = _data(n=4)
    net.gradient(x, t)
    net.gradient(x, t)
    before = {k: np.array(v) for k, v in net.gradient(x, t).items()}
    h = net.layers["Affine1"]._ws.result("out", (4, 8), np.dtype(np.float32))
    h_before, y_before = h.copy(), net.lastLayer.y.copy()
    calls = _count_fc_calls(monkeypatch)
    with pytest.raises(ValueError, match="label 9 at index 2 is out of range"):
        net.gradient(x * 2, np.array([0, 1, 9, 2]))
    assert len(calls) == 1  # the one-call path raised it
    for k, v in before.items():  # nothing written: the labels are checked before any kernel runs
        np.testing.assert_array_equal(getattr(net.layers["Affine" + k[1]], "d" + k[0]), v)
    np.testing.assert_array_equal(h, h_before)
    np.testing.assert_array_equal(net.lastLayer.y, y_before)


def test_small_batch_step_opens_no_region():
    # batch 1: every product of the step is below the split threshold and runs on the calling thread; the update
    # then stays on it too (a worker updating half of W1 would pull it to its core and back every step)
    from fastbp import _kernels, _threads

    if _kernels.build_info()["num_threads"] < 2:
        pytest.skip("one thread: no region is ever opened")
    np.random.seed(1)
    net = TwoLayerNet(784, 50, 10, dtype=np.float32)
    twin = TwoLayerNet(784, 50, 10, dtype=np.float32)
    for k in net.params:
        twin.params[k][...] = net.params[k]
    opt, opt_twin = SGD(lr=0.1), SGD(lr=0.1)
    x, t = np.random.rand(1, 784).astype(np.float32), np.array([3])
    opt.update(net.params, net.gradient(x, t))  # the first update has no previous step: in blocks over the threads
    before = _threads.regions_opened()
    for _ in range(6):
        opt.update(net.params, net.gradient(x, t))
    assert _threads.regions_opened() == before
    for _ in range(7):  # the same weights as updates in blocks over the threads (elementwise: the same bits)
        grads = twin.gradient(x, t)
        opt_twin._regions_after = -1
        opt_twin.update(twin.params, grads)
    for k in net.params:
        np.testing.assert_array_equal(net.params[k], twin.params[k])


def test_one_call_gradient_cases_found_in_review(monkeypatch):
    import pickle

    x, t, _ = _data(n=5)
    # a plan cached by a net pickled before the one-call path (5 entries) is rebuilt
    net = _make("two", dtype=np.float64)
    net.gradient(x, t)
    net._plan_cache = net._plan_cache[:5]
    want = {k: np.array(v) for k, v in _make("two", dtype=np.float64).gradient(x, t).items()}
    for k, v in net.gradient(x, t).items():
        np.testing.assert_array_equal(v, want[k])
    # a pickled net (its dtype an equal object, not NumPy's singleton) still takes the one-call path
    calls = _count_fc_calls(monkeypatch)
    clone = pickle.loads(pickle.dumps(net))
    clone.gradient(x, t)
    clone.gradient(x, t)
    assert len(calls) >= 1
    for k, v in clone.gradient(x, t).items():
        np.testing.assert_array_equal(v, want[k])
    # a later layer's weights of another dtype: the layers (NumPy's promotion), not an error
    net = _make("two", dtype=np.float32)
    A2 = net.layers["Affine2"]
    A2.W = A2.W.astype(np.float64)
    A2.dW, A2.db = np.zeros((8, 4)), np.zeros(4)
    x32 = x.astype(np.float32)
    first = {k: np.array(v) for k, v in net.gradient(x32, t).items()}
    for k, v in net.gradient(x32, t).items():
        np.testing.assert_array_equal(v, first[k])
    # reuse switched off: fresh arrays at every call, and backward(1) a copy, as on the layer path
    net = _make("two", dtype=np.float64)
    net.gradient(x, t)
    for layer in list(net.layers.values()) + [net.lastLayer]:
        layer.reuse = False
    n0 = len(calls)
    net.gradient(x, t)
    y1 = net.lastLayer.y
    net.gradient(x, t)
    assert net.lastLayer.y is not y1 and len(calls) == n0
    assert net.lastLayer.backward(1) is not net.lastLayer.backward(1)
    # a layer's own output fed back in: the layer path (its workspace hands out a second array), not an error
    np.random.seed(0)
    net = TwoLayerNet(8, 8, 4)
    twin = TwoLayerNet(8, 8, 4, backend="reference")
    for k in net.params:
        twin.params[k][...] = net.params[k]
    x8 = np.random.rand(5, 8)
    net.gradient(x8, t)
    net.gradient(x8, t)
    for _ in range(2):
        h = net.layers["Affine1"].forward(x8)
        hc = h.copy()
        got = {k: np.array(v) for k, v in net.gradient(h, t).items()}
        for k, v in twin.gradient(hc, t).items():
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-14)


def test_small_batch_step_with_weight_decay_opens_no_region():
    from fastbp import _kernels, _threads

    if _kernels.build_info()["num_threads"] < 2:
        pytest.skip("one thread: no region is ever opened")
    np.random.seed(1)
    net = MultiLayerNet(784, [50], 10, weight_decay_lambda=0.1, dtype=np.float32)
    opt = SGD(lr=0.1)
    x, t = np.random.rand(1, 784).astype(np.float32), np.array([3])
    opt.update(net.params, net.gradient(x, t))
    before = _threads.regions_opened()
    for _ in range(4):
        opt.update(net.params, net.gradient(x, t))
    assert _threads.regions_opened() == before


def test_update_stays_on_the_caller_only_for_arrays_that_fit_its_cache():
    # no region between steps: an array of up to 2**16 elements is updated on the calling thread, a larger one (book
    # 2's 10000 x 100 embeddings, bandwidth-bound) still in blocks over the threads
    from fastbp import _kernels, _threads

    if _kernels.build_info()["num_threads"] < 2:
        pytest.skip("one thread: no region is ever opened")
    for shape, regions_per_step in (((200, 200), 0), ((1000, 100), 1)):
        p = np.zeros(shape, np.float32)
        g = np.ones(shape, np.float32)
        opt = SGD(lr=0.5)
        opt.update([p], [g])
        before = _threads.regions_opened()
        for _ in range(3):
            opt.update([p], [g])
        assert _threads.regions_opened() - before == 3 * regions_per_step, shape
        np.testing.assert_array_equal(p, np.full(shape, -2.0, np.float32))
