"""The book's own code, transcribed: the baseline a reader switches from (``common/layers.py``'s layers,
``ch05/two_layer_net.py``, the ch05 loop step, ``common/optimizer.py``'s SGD).  The one copy used by the
``fastbp bench`` rows and the pytest-benchmark suite in ``benchmarks/``."""

from collections import OrderedDict

import numpy as np


def _book_softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    return np.exp(x) / np.sum(np.exp(x), axis=-1, keepdims=True)


def _book_cross_entropy_error(y, t):
    if y.ndim == 1:
        t = t.reshape(1, t.size)
        y = y.reshape(1, y.size)
    if t.size == y.size:  # one-hot targets -> label indices
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


class BookSimpleConvNet:
    """The book's ``ch07/simple_convnet.py`` (conv - relu - pool - affine - relu - affine - softmax, float64 weights
    from ``np.random.randn``), the layers module as a parameter: ``fastbp.layers`` for the one-line import swap,
    ``fastbp.reference`` for the book's NumPy layers (``common/layers.py``'s algorithms: im2col + np.dot,
    np.argmax pooling)."""

    def __init__(
        self,
        layers,
        input_dim=(1, 28, 28),
        filter_num=30,
        filter_size=5,
        hidden_size=100,
        output_size=10,
        weight_init_std=0.01,
    ):
        conv_out = (input_dim[1] - filter_size) / 1 + 1
        pool_out = int(filter_num * (conv_out / 2) * (conv_out / 2))
        self.params = {}
        self.params["W1"] = weight_init_std * np.random.randn(filter_num, input_dim[0], filter_size, filter_size)
        self.params["b1"] = np.zeros(filter_num)
        self.params["W2"] = weight_init_std * np.random.randn(pool_out, hidden_size)
        self.params["b2"] = np.zeros(hidden_size)
        self.params["W3"] = weight_init_std * np.random.randn(hidden_size, output_size)
        self.params["b3"] = np.zeros(output_size)
        self.layers = OrderedDict()
        self.layers["Conv1"] = layers.Convolution(self.params["W1"], self.params["b1"], 1, 0)
        self.layers["Relu1"] = layers.Relu()
        self.layers["Pool1"] = layers.Pooling(pool_h=2, pool_w=2, stride=2)
        self.layers["Affine1"] = layers.Affine(self.params["W2"], self.params["b2"])
        self.layers["Relu2"] = layers.Relu()
        self.layers["Affine2"] = layers.Affine(self.params["W3"], self.params["b3"])
        self.last_layer = layers.SoftmaxWithLoss()

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        return self.last_layer.forward(self.predict(x), t)

    def gradient(self, x, t):
        self.loss(x, t)
        dout = self.last_layer.backward(1)
        for layer in reversed(list(self.layers.values())):
            dout = layer.backward(dout)
        grads = {}
        for i, name in enumerate(("Conv1", "Affine1", "Affine2"), 1):
            grads["W" + str(i)], grads["b" + str(i)] = self.layers[name].dW, self.layers[name].db
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


class BookMultiLayerNet:
    """The book's ``common/multi_layer_net.py`` (ReLU, He init, L2 weight decay computed in the loss as the book
    does even at lambda 0), the layers module as a parameter like BookTwoLayerNet."""

    def __init__(self, input_size, hidden_size_list, output_size, weight_decay_lambda=0, layers=BookLayers):
        self.hidden_layer_num = len(hidden_size_list)
        self.weight_decay_lambda = weight_decay_lambda
        self.params = {}
        sizes = [input_size] + list(hidden_size_list) + [output_size]
        for idx in range(1, len(sizes)):
            scale = np.sqrt(2.0 / sizes[idx - 1])
            self.params["W" + str(idx)] = scale * np.random.randn(sizes[idx - 1], sizes[idx])
            self.params["b" + str(idx)] = np.zeros(sizes[idx])
        self.layers = OrderedDict()
        for idx in range(1, self.hidden_layer_num + 1):
            self.layers["Affine" + str(idx)] = layers.Affine(self.params["W" + str(idx)], self.params["b" + str(idx)])
            self.layers["Activation_function" + str(idx)] = layers.Relu()
        idx = self.hidden_layer_num + 1
        self.layers["Affine" + str(idx)] = layers.Affine(self.params["W" + str(idx)], self.params["b" + str(idx)])
        self.last_layer = layers.SoftmaxWithLoss()

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        y = self.predict(x)
        weight_decay = 0
        for idx in range(1, self.hidden_layer_num + 2):
            W = self.params["W" + str(idx)]
            weight_decay += 0.5 * self.weight_decay_lambda * np.sum(W**2)
        return self.last_layer.forward(y, t) + weight_decay

    def gradient(self, x, t):
        self.loss(x, t)
        dout = self.last_layer.backward(1)
        for layer in reversed(list(self.layers.values())):
            dout = layer.backward(dout)
        grads = {}
        for idx in range(1, self.hidden_layer_num + 2):
            grads["W" + str(idx)] = (
                self.layers["Affine" + str(idx)].dW + self.weight_decay_lambda * self.layers["Affine" + str(idx)].W
            )
            grads["b" + str(idx)] = self.layers["Affine" + str(idx)].db
        return grads


class BookAdam:
    """The book's Adam (common/optimizer.py), in NumPy."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter = 0
        self.m = None
        self.v = None

    def update(self, params, grads):
        if self.m is None:
            self.m, self.v = {}, {}
            for key, val in params.items():
                self.m[key] = np.zeros_like(val)
                self.v[key] = np.zeros_like(val)
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key in params.keys():
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])
            params[key] -= lr_t * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)
