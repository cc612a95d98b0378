"""fastbp._gradcheck_fast: directional (vᵀ J u) gradient checks of layers and networks."""

import numpy as np
import pytest

from fastbp import layers as F
from fastbp import reference as R
from fastbp._gradcheck_fast import gradient_check_fast
from fastbp.gradient import GradientCheckError
from fastbp.nets import DeepConvNet, MultiLayerNetExtend, SimpleConvNet


class _FlippedChannel(F.Convolution):
    """A planted bug: backward negates the weight gradient of one output channel."""

    def backward(self, dout):
        dx = super().backward(dout)
        self.dW[2] *= -1
        return dx


def _conv_input(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 2, 7, 7)), rng.standard_normal((5, 2, 3, 3)), rng.standard_normal(5)


@pytest.mark.parametrize("mod", [F, R], ids=["fastbp", "reference"])
def test_layers_pass(mod):
    x, W, b = _conv_input()
    errors = gradient_check_fast(mod.Convolution(W, b, stride=2, pad=1), x)
    assert set(errors) == {"x", "W", "b"} and max(errors.values()) < 1e-6
    gradient_check_fast(mod.Pooling(2, 2, 2), x)
    gradient_check_fast(mod.BatchNormalization(np.ones(98), np.zeros(98)), x)
    gradient_check_fast(mod.Dropout(0.3), x)  # the mask is the same in every pass


def test_catches_a_sign_flip_in_one_channel_of_dW():
    x, W, b = _conv_input()
    with pytest.raises(GradientCheckError) as e:
        gradient_check_fast(_FlippedChannel(W, b, pad=1), x)
    assert e.value.worst == "W" and e.value.errors["x"] < 1e-6 and e.value.errors["b"] < 1e-6


def test_catches_it_inside_a_network_on_real_digits():
    d = np.load(__file__.rsplit("/", 2)[0] + "/fastbp/data/mnist-5k.npz")
    x = (d["images"][::500] / 255).reshape(-1, 1, 28, 28)
    t = d["labels"][::500]
    # zero biases put every all-background window of a digit exactly on the ReLU kink (conv output 0), where no
    # numerical derivative is right: give the biases values away from 0
    np.random.seed(0)
    net = SimpleConvNet(weight_init_std=0.1)
    net.params["b1"][...] = 0.1 + 0.1 * np.random.rand(30)
    errors = gradient_check_fast(net, x, t)
    assert set(errors) == set(net.params) and max(errors.values()) < 1e-6
    np.random.seed(0)
    bad = SimpleConvNet(weight_init_std=0.1)
    bad.params["b1"][...] = net.params["b1"]
    conv = bad.layers["Conv1"]
    flipped = _FlippedChannel(conv.W, conv.b, reuse=True, need_dx=False)
    bad.layers["Conv1"] = flipped
    with pytest.raises(GradientCheckError) as e:
        gradient_check_fast(bad, x, t)
    assert e.value.worst == "W1"


def test_networks_with_dropout_and_batchnorm_pass_and_rng_is_left_alone():
    d = np.load(__file__.rsplit("/", 2)[0] + "/fastbp/data/mnist-5k.npz")
    x = (d["images"][::1000] / 255).reshape(-1, 1, 28, 28)
    t = d["labels"][::1000]
    np.random.seed(1)
    net = DeepConvNet()
    for i in range(1, 7):
        net.params[f"b{i}"][...] = 0.05 + 0.05 * np.random.rand(net.params[f"b{i}"].size)
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    errors = gradient_check_fast(net, x, t, n_dirs=1)
    assert np.array_equal(np.random.get_state()[1], before)
    assert max(errors.values()) < 1e-5
    np.random.seed(2)
    ext = MultiLayerNetExtend(20, [10, 10], 4, use_dropout=True, use_batchnorm=True, weight_decay_lambda=0.1)
    xe = np.random.rand(6, 20)
    gradient_check_fast(ext, xe, np.random.randint(0, 4, 6))


def test_bad_arguments():
    x, W, b = _conv_input()
    with pytest.raises(ValueError, match="n_dirs"):
        gradient_check_fast(F.Convolution(W, b), x, n_dirs=0)


def test_book1_cnn_cases_pass_in_the_cli_table():
    from fastbp import cli
    from fastbp._gradcheck_fast import book1_cnn_cases

    rows = cli.run_gradcheck(book1_cnn_cases(0), threshold=1e-6)
    table = cli.format_gradcheck(rows, 1e-6)
    assert all(r[3] for r in rows), table
    assert "SimpleConvNet 28x28 digits" in table and "DeepConvNet" in table and len(rows) >= 30
