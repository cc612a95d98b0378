"""Book 1's SimpleConvNet, DeepConvNet and MultiLayerNetExtend on fastbp (fastbp.convnets via fastbp.nets).

The book's trained pickles give the book's accuracy on the bundled digits; backprop matches numerical gradients
with the book's own check settings (ch07/gradient_check.py, ch06/batch_norm_gradient_check.py, scaled down);
the fastbp backend equals the reference backend (dropout masks included, under one seed); a training step
allocates nothing after warm-up.
"""

import gc
import os
import tracemalloc

import numpy as np
import pytest

from fastbp import layers as F
from fastbp import reference as R
from fastbp.nets import DeepConvNet, MultiLayerNetExtend, SimpleConvNet
from fastbp.optimizers import SGD, Adam
from fastbp_tests import BOOK_DATA

BOOK_DIR = BOOK_DATA
MNIST = os.path.join(os.path.dirname(__file__), os.pardir, "fastbp", "data", "mnist-5k.npz")


def _book_file(name):
    path = os.path.join(BOOK_DIR, name)
    if not os.path.exists(path):
        pytest.skip(f"the book's pickle {name} is not in {BOOK_DIR} (set FASTBP_BOOK_DATA)")
    return path


def _digits(n):
    d = np.load(MNIST)
    return (d["images"][:n] / 255).astype(np.float32).reshape(n, 1, 28, 28), d["labels"][:n]


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ---------------------------------------------------------------------------------------------------------------
# the book's pickles
# ---------------------------------------------------------------------------------------------------------------
def test_simpleconvnet_loads_the_books_params_and_gets_its_accuracy():
    x, t = _digits(2000)
    net = SimpleConvNet()
    net.load_params(_book_file("book1-ch07-params.pkl"))
    assert net.layers["Conv1"].W is net.params["W1"] and net.params["W1"].shape == (30, 1, 5, 5)
    assert net.accuracy(x, t) == 0.9695
    ref = SimpleConvNet(backend="reference")
    ref.load_params(_book_file("book1-ch07-params.pkl"))
    yf = net.predict(x[:200]).copy()
    yr = ref.predict(x[:200])
    assert _max_rel(yf, yr) < 1e-12
    np.testing.assert_array_equal(np.argmax(yf, 1), np.argmax(yr, 1))


def test_deepconvnet_loads_the_books_params_and_gets_its_accuracy():
    x, t = _digits(1000)
    net = DeepConvNet()
    net.load_params(_book_file("book1-ch08-deep_convnet_params.pkl"))
    assert net.layers[0].W is net.params["W1"] and net.layers[18].W is net.params["W8"]
    assert net.accuracy(x, t) == 0.984
    ref = DeepConvNet(backend="reference")
    ref.load_params(_book_file("book1-ch08-deep_convnet_params.pkl"))
    assert _max_rel(net.predict(x[:20]), ref.predict(x[:20])) < 1e-12


def test_save_and_load_params_round_trip(tmp_path):
    np.random.seed(0)
    a = SimpleConvNet(
        input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=5
    )
    a.save_params(str(tmp_path / "p.pkl"))
    b = SimpleConvNet(
        input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=5
    )
    b.load_params(str(tmp_path / "p.pkl"))
    x = np.random.rand(2, 1, 10, 10)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fastbp", "reference"])
def test_simpleconvnet_gradient_check_with_the_books_settings(backend):
    """ch07/gradient_check.py: 1x10x10 input, 10 filters 3x3, hidden 10, a (1, 1) label array."""
    np.random.seed(0)
    net = SimpleConvNet(
        input_dim=(1, 10, 10),
        conv_param={"filter_num": 10, "filter_size": 3, "pad": 0, "stride": 1},
        hidden_size=10,
        output_size=10,
        weight_init_std=0.01,
        backend=backend,
    )
    X = np.random.rand(100).reshape((1, 1, 10, 10))
    T = np.array([1]).reshape((1, 1))
    num = net.numerical_gradient(X, T)
    grad = net.gradient(X, T)
    assert set(grad) == set(num) == {"W1", "b1", "W2", "b2", "W3", "b3"}
    for key in num:
        # the book prints this mean; a perturbation of 1e-4 can cross a ReLU/max kink of this 0.01-scale net,
        # so a few entries differ (measured with seed 0: filter 4's b1 by 8e-5, the same for the reference layers)
        assert np.abs(num[key] - grad[key]).mean() < 2e-5, key
        assert np.median(np.abs(num[key] - grad[key])) < 1e-9, key
    np.random.seed(0)
    ref = SimpleConvNet(
        input_dim=(1, 10, 10),
        conv_param={"filter_num": 10, "filter_size": 3, "pad": 0, "stride": 1},
        hidden_size=10,
        output_size=10,
        weight_init_std=0.01,
        backend="reference",
    )
    for key, g in ref.gradient(X, T).items():
        assert _max_rel(grad[key], g) < 1e-12, key


@pytest.mark.parametrize("backend", ["fastbp", "reference"])
@pytest.mark.parametrize("batch", [2, 5])
def test_multilayernetextend_batchnorm_gradient_check(backend, batch):
    """ch06/batch_norm_gradient_check.py scaled down, with weight decay (the book's batch of 1 puts every
    BatchNorm output at beta = 0, on the ReLU kink, where no numerical derivative is right)."""
    np.random.seed(1)
    net = MultiLayerNetExtend(12, [8, 6], 4, use_batchnorm=True, weight_decay_lambda=0.1, backend=backend)
    x = np.random.rand(batch, 12)
    t = np.eye(4)[np.random.randint(0, 4, batch)]
    num = net.numerical_gradient(x, t)
    grad = {k: np.array(v) for k, v in net.gradient(x, t).items()}
    assert list(grad) == list(num)
    assert "gamma1" in grad and "beta2" in grad
    for key in num:
        assert _max_rel(grad[key], num[key]) < 1e-5 or np.abs(grad[key] - num[key]).max() < 1e-8, key


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deepconvnet_fastbp_equals_reference_with_dropout_masks(dtype):
    x, t = _digits(3)
    np.random.seed(3)
    fast = DeepConvNet(dtype=dtype)
    np.random.seed(3)
    ref = DeepConvNet(dtype=dtype, backend="reference")
    for k in fast.params:
        np.testing.assert_array_equal(fast.params[k], ref.params[k])
    np.random.seed(11)
    gf = {k: np.array(v) for k, v in fast.gradient(x, t).items()}
    np.random.seed(11)
    gr = ref.gradient(x, t)
    tol = 1e-3 if dtype == np.float32 else 1e-9
    for k in gr:
        assert gf[k].dtype == dtype
        assert _max_rel(gf[k], gr[k]) < tol, k
    np.testing.assert_array_equal(fast.layers[16].mask, ref.layers[16].mask)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multilayernetextend_fastbp_equals_reference(dtype):
    np.random.seed(5)
    kw = dict(
        activation="relu",
        weight_decay_lambda=0.05,
        use_dropout=True,
        dropout_ration=0.3,
        use_batchnorm=True,
        dtype=dtype,
    )
    fast = MultiLayerNetExtend(20, [16, 16], 5, **kw)
    np.random.seed(5)
    ref = MultiLayerNetExtend(20, [16, 16], 5, backend="reference", **kw)
    x = np.random.rand(8, 20).astype(np.float32)
    t = np.random.randint(0, 5, 8)
    for _ in range(2):
        np.random.seed(9)
        gf = {k: np.array(v) for k, v in fast.gradient(x, t).items()}
        np.random.seed(9)
        gr = ref.gradient(x, t)
        tol = 2e-3 if dtype == np.float32 else 1e-9
        for k in gr:  # b1, b2 feed a batch norm: their true gradient is 0, so compare absolutely too
            np.testing.assert_allclose(gf[k], gr[k], rtol=tol, atol=tol * 1e-2, err_msg=k)
            fast.params[k] -= 0.1 * gf[k]
            ref.params[k] -= 0.1 * gr[k].astype(dtype)
    for i in (1, 2):
        np.testing.assert_allclose(
            fast.layers[f"BatchNorm{i}"].running_mean, ref.layers[f"BatchNorm{i}"].running_mean, rtol=1e-4, atol=1e-6
        )
    assert fast.accuracy(x, t) == ref.accuracy(x, t)
    assert abs(fast.loss(x, t) - ref.loss(x, t)) < (1e-4 if dtype == np.float32 else 1e-10)


def test_backend_module_builds_the_books_class_with_that_module():
    np.random.seed(0)
    net = SimpleConvNet(backend=F)
    assert type(net.layers["Conv1"]) is F.Convolution and not net.layers["Conv1"].reuse
    assert type(SimpleConvNet(backend="reference").layers["Pool1"]) is R.Pooling
    with pytest.raises(ValueError, match="backend"):
        SimpleConvNet(backend="torch")


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def _step_bytes(net, opt, x, t, steps=3):
    def step():
        opt.update(net.params, net.gradient(x, t))

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
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    return peak - cur0


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
def test_training_steps_allocate_no_numpy_arrays(opt_cls):
    """The step's peak is the same for a small float32 net and a bigger float64 one: no temporary scales."""
    peaks = []
    for scale, dtype in ((1, np.float32), (2, np.float64)):
        np.random.seed(0)
        size = 12 * scale
        conv = SimpleConvNet(
            input_dim=(1, size, size),
            conv_param={"filter_num": 4 * scale, "filter_size": 3, "pad": 1, "stride": 1},
            hidden_size=16 * scale,
            output_size=10,
            dtype=dtype,
        )
        x = np.random.rand(8 * scale, 1, size, size).astype(np.float32)
        t = np.random.randint(0, 10, 8 * scale).astype(np.uint8)
        ext = MultiLayerNetExtend(
            32 * scale,
            [16 * scale, 16 * scale],
            10,
            weight_decay_lambda=0.01,
            use_dropout=True,
            use_batchnorm=True,
            dtype=dtype,
        )
        xe = np.random.rand(8 * scale, 32 * scale).astype(np.float32)
        peaks.append((_step_bytes(conv, opt_cls(), x, t), _step_bytes(ext, opt_cls(), xe, t)))
    for (small, big), name in zip(zip(*peaks), ("SimpleConvNet", "MultiLayerNetExtend")):
        assert small < 4096, f"{name}: a training step allocated {small} bytes"
        assert abs(big - small) <= 64, f"{name}: step peak {small} B (small float32) vs {big} B (2x float64)"


def test_simpleconvnet_trains_on_the_bundled_digits():
    x, t = _digits(5000)  # the bundled digits are sorted by label: draw a random split
    rng = np.random.default_rng(0)
    perm = rng.permutation(5000)
    xtr, ttr, xte, tte = x[perm[:1000]], t[perm[:1000]], x[perm[4500:]], t[perm[4500:]]
    np.random.seed(0)
    net = SimpleConvNet(dtype=np.float32)
    opt = Adam(lr=0.001)  # the book's ch07/train_convnet.py settings
    before = net.loss(xte, tte)
    for _ in range(40):
        idx = rng.integers(0, 1000, 50)
        opt.update(net.params, net.gradient(xtr[idx], ttr[idx]))
    assert net.loss(xte, tte) < 0.6 * before
    assert net.accuracy(xte, tte) > 0.6  # measured 0.70 after these 40 steps (chance: 0.1)


@pytest.mark.parametrize("net", ["simpleconvnet"])  # deepconvnet takes the same path (2 s more)
def test_cli_trains_the_convolutional_nets(net, tmp_path, capsys):
    from fastbp import cli

    out = tmp_path / "run.json"
    rc = cli.main(
        [
            "train",
            "--net",
            net,
            "--iters",
            "2",
            "--batch-size",
            "20",
            "--source",
            "sample",
            "--no-train-acc",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--dtype",
            "float32",
            "-q",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    import json

    summary = json.loads(out.read_text())
    assert summary["net"] == net and summary["iterations"] == 2 and 0 <= summary["final_test_accuracy"] <= 1
    assert ("SimpleConvNet" if net == "simpleconvnet" else "DeepConvNet") in capsys.readouterr().out


def test_bench_conv_cases_check_out():
    """fastbp.bench.conv_cases (issue 9's rows of `fastbp bench`): the implementations agree before timing."""
    from fastbp.bench.conv_cases import conv_case_specs
    from fastbp.bench.harness import check_case

    specs = dict(conv_case_specs(None))
    assert set(specs) >= {
        "train-simpleconvnet-b100-f32",
        "train-deepconvnet-b100-f32",
        "book-simpleconvnet-b100",
        "maxpool-100x30x24x24",
    }
    for key in ("maxpool-100x30x24x24", "train-simpleconvnet-b100-f64", "book-simpleconvnet-b100"):
        row = check_case(specs[key]())
        assert "error" not in row, row["check"]
