"""Book 1's networks of chapters 6-8 on fastbp's layers: ``SimpleConvNet``, ``DeepConvNet``, ``MultiLayerNetExtend``.

Same constructor arguments, ``params`` dicts, layer containers and methods as the book's ``ch07/simple_convnet.py``,
``ch08/deep_convnet.py`` and ``common/multi_layer_net_extend.py`` (``predict``, ``loss``, ``accuracy``,
``numerical_gradient``, ``gradient``, ``save_params``/``load_params`` reading and writing the book's own pickles).
Weights are drawn like the book's (same ``np.random.randn`` calls in the same order), so ``np.random.seed``
reproduces the book's initial weights.  Extra keyword arguments, as in :mod:`fastbp.nets`:

* ``dtype`` (float64 like the book, or float32): the dtype of the parameters; the fastbp backend converts the
  input to it (a float32 net computes in float32 whatever it is fed).
* ``backend``: ``"fastbp"`` (default) builds the layers of :mod:`fastbp.layers` with ``reuse=True`` (a training
  step allocates nothing after warm-up; arrays returned by ``predict``/``gradient`` are overwritten by the next
  call) and, in ``gradient``, no ``dx`` for the first convolution (``backward(dout, need_dx=False)``), and runs
  each ``Relu`` followed by a ``Pooling`` as one kernel (the ReLU applied to the pooled maxima: relu(maxpool(x)) ==
  maxpool(relu(x)); the same loss and gradients as layer by layer, one pass over the convolution output instead of
  three).  The layers keep the book's attributes: that ``Relu``'s ``mask`` is computed from its input when first
  read, the ``Pooling``'s ``arg_max`` is the book's for the ReLU'd input (0 in windows whose inputs are all
  <= 0), and both still work when called directly;
  ``"reference"`` builds :mod:`fastbp.reference`'s plain-NumPy layers; a module object (e.g. ``fastbp.layers``
  itself) builds that module's classes with their default arguments, which is the book's class with its import
  line swapped.

Differences from the book: ``accuracy`` counts every row (the book's ``accuracy(x, t, batch_size)`` of the
convolutional nets skips a last partial batch yet divides by all rows); integer labels of shape (N, 1) (as in
the book's ``ch07/gradient_check.py``) are read as (N,); ``loss`` is fastbp's exact log-sum-exp cross entropy.
"""

import pickle
from collections import OrderedDict

import numpy as np

from fastbp import reference as _reference
from fastbp.gradient import numerical_gradient as _numerical_gradient
from fastbp.nets import _add_scaled, _check_dtype, _check_size, init_scale

_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

__all__ = ["SimpleConvNet", "DeepConvNet", "MultiLayerNetExtend"]


def _module(backend):
    if backend == "fastbp":
        from fastbp import layers

        return layers, True
    if backend == "reference":
        return _reference, False
    if hasattr(backend, "Convolution") and hasattr(backend, "Affine"):
        return backend, False
    raise ValueError(f"backend must be 'fastbp', 'reference' or a layers module, got {backend!r}")


def _conv_param(p, name):
    try:
        return (
            _check_size(p["filter_num"], f"{name}['filter_num']"),
            _check_size(p["filter_size"], f"{name}['filter_size']"),
            int(p["pad"]),
            _check_size(p["stride"], f"{name}['stride']"),
        )
    except KeyError as e:
        raise ValueError(f"{name} needs keys 'filter_num', 'filter_size', 'pad', 'stride'; missing {e}") from None


def _takes_need_dx(layer):
    """Whether layer.backward has the need_dx keyword (a layer swapped in by the user may not)."""
    code = getattr(getattr(type(layer), "backward", None), "__code__", None)
    return code is not None and "need_dx" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


class _BookNet:
    """predict/loss/accuracy/gradient plumbing shared by the three networks."""

    _stochastic = ()  # layer classes whose forward takes train_flg
    _fuse_relu_pool = True  # fastbp backend: a Relu followed by a Pooling runs as one kernel (False: layer by layer)

    def _setup(self, dtype, backend):
        self.dtype = _check_dtype(dtype)
        self.backend = backend
        self._L, self._fast = _module(backend)
        self._bufs = {}

    def _kw(self, **extra):
        return dict(reuse=True, **extra) if self._fast else {}

    def _in(self, name, a):
        """fastbp backend: float input converted to the net's dtype in a reused buffer; labels (N, 1) -> (N,)."""
        if not isinstance(a, np.ndarray):
            a = np.asarray(a)
        if name == "t" and a.dtype.kind in "iu" and a.ndim == 2 and a.shape[1] == 1 and self.output_size != 1:
            return a.reshape(-1)
        if (
            not self._fast
            or a.dtype == self.dtype
            or a.dtype.kind not in "fiub"
            or (name == "t" and a.dtype.kind != "f")
        ):
            return a
        buf = self._bufs.get(name)
        if buf is None or buf.shape != a.shape:
            buf = self._bufs[name] = np.empty(a.shape, self.dtype)
        np.copyto(buf, a, casting="unsafe")
        return buf

    def _layer_list(self):
        return list(self.layers.values()) if isinstance(self.layers, dict) else list(self.layers)

    def predict(self, x, train_flg=False):
        x = self._in("x", x)
        stoch = (self._L.Dropout, self._L.BatchNormalization)
        layers = self._layer_list()
        fused = self._fused = set()
        fuse = self._fast and self._fuse_relu_pool
        i, n = 0, len(layers)
        while i < n:
            layer = layers[i]
            if (
                fuse
                and i + 1 < n
                and type(layer) is self._L.Relu
                and type(layers[i + 1]) is self._L.Pooling
                and type(x) is np.ndarray
                and x.dtype in _KERNEL_DTYPES
            ):
                # ReLU then max pooling in one pass over the big tensor: maxpool(relu(x)) == relu(maxpool(x))
                layer._defer(x)
                x = layers[i + 1]._forward_relu(x)
                fused.add(i)
                i += 2
                continue
            x = layer.forward(x, train_flg) if isinstance(layer, stoch) else layer.forward(x)
            i += 1
        return x

    def _loss(self, x, t, train_flg):
        y = self.predict(x, train_flg)
        return self.last_layer.forward(y, self._in("t", t))

    def accuracy(self, x, t, batch_size=100):
        """Fraction of rows whose arg-max score is the label (t labels or one-hot), evaluated in batches."""
        x = np.asarray(x)
        t = np.asarray(t)
        if t.ndim != 1:
            t = np.argmax(t, axis=1)
        n = x.shape[0]
        if n == 0:
            raise ValueError("accuracy of an empty set is undefined (x has 0 rows)")
        step = _check_size(batch_size, "batch_size")
        correct = 0
        for i in range(0, n, step):
            y = self.predict(x[i : i + step], train_flg=False)
            correct += int(np.count_nonzero(np.argmax(y, axis=1) == t[i : i + step]))
        return correct / n

    _first_skips_dx = False  # the first layer's backward takes need_dx=False in gradient() (fastbp backend)

    def _backward(self):
        dout = self.last_layer.backward(1)
        layers = self._layer_list()
        fused = getattr(self, "_fused", ())
        for i in range(len(layers) - 1, 0, -1):
            if i not in fused:  # a ReLU fused into the next Pooling: that Pooling's backward applied its mask
                dout = layers[i].backward(dout)
        if self._fast and self._first_skips_dx and _takes_need_dx(layers[0]):
            layers[0].backward(dout, need_dx=False)  # the images' gradient is never used (common API need_dx)
        else:
            layers[0].backward(dout)

    def numerical_gradient(self, x, t):
        """Gradients of loss(x, t) by the book's central differences, keyed like params."""

        def loss_w(_):
            return self._numeric_loss(x, t)

        return {key: _numerical_gradient(loss_w, self.params[key]) for key in self.params}

    def _numeric_loss(self, x, t):
        return self.loss(x, t)

    def save_params(self, file_name="params.pkl"):
        """Pickle the params dict (the book's format)."""
        with open(file_name, "wb") as f:
            pickle.dump(dict(self.params), f)

    def load_params(self, file_name="params.pkl"):
        """Load a params pickle (the book's format) and hand the arrays to the layers."""
        with open(file_name, "rb") as f:
            params = pickle.load(f)
        for key, val in params.items():
            self.params[key] = val
        for (wkey, bkey), layer in self._param_layers():
            layer.W = self.params[wkey]
            layer.b = self.params[bkey]
        self._after_load()

    def _after_load(self):
        pass


class SimpleConvNet(_BookNet):
    """conv - relu - pool - affine - relu - affine - softmax (book 1, ch07/simple_convnet.py)."""

    _first_skips_dx = True

    def __init__(
        self,
        input_dim=(1, 28, 28),
        conv_param=None,
        hidden_size=100,
        output_size=10,
        weight_init_std=0.01,
        *,
        dtype=np.float64,
        backend="fastbp",
    ):
        if conv_param is None:
            conv_param = {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}
        self._setup(dtype, backend)
        filter_num, filter_size, pad, stride = _conv_param(conv_param, "conv_param")
        if len(input_dim) != 3:
            raise ValueError(f"input_dim must be (C, H, W), got {input_dim!r}")
        self.output_size = _check_size(output_size, "output_size")
        conv_out = (input_dim[1] - filter_size + 2 * pad) / stride + 1
        pool_out = int(filter_num * (conv_out / 2) * (conv_out / 2))
        dt = self.dtype
        self.params = {}
        self.params["W1"] = (
            weight_init_std * np.random.randn(filter_num, input_dim[0], filter_size, filter_size)
        ).astype(dt, copy=False)
        self.params["b1"] = np.zeros(filter_num, dt)
        self.params["W2"] = (weight_init_std * np.random.randn(pool_out, hidden_size)).astype(dt, copy=False)
        self.params["b2"] = np.zeros(hidden_size, dt)
        self.params["W3"] = (weight_init_std * np.random.randn(hidden_size, output_size)).astype(dt, copy=False)
        self.params["b3"] = np.zeros(output_size, dt)

        L, kw = self._L, self._kw
        p = self.params
        self.layers = OrderedDict()
        self.layers["Conv1"] = L.Convolution(p["W1"], p["b1"], stride, pad, **kw())
        self.layers["Relu1"] = L.Relu(**kw())
        self.layers["Pool1"] = L.Pooling(pool_h=2, pool_w=2, stride=2, **kw())
        self.layers["Affine1"] = L.Affine(p["W2"], p["b2"], **kw())
        self.layers["Relu2"] = L.Relu(**kw())
        self.layers["Affine2"] = L.Affine(p["W3"], p["b3"], **kw())
        self.last_layer = L.SoftmaxWithLoss(**kw())

    def _param_layers(self):
        return zip(
            (("W1", "b1"), ("W2", "b2"), ("W3", "b3")),
            (self.layers["Conv1"], self.layers["Affine1"], self.layers["Affine2"]),
        )

    def predict(self, x, train_flg=False):
        return super().predict(x, train_flg)

    def loss(self, x, t):
        """Cross entropy of softmax(predict(x)) against t."""
        return self._loss(x, t, False)

    def gradient(self, x, t):
        """Gradients of loss(x, t) by backpropagation, keyed like params (the layers' own dW/db arrays)."""
        self.loss(x, t)
        self._backward()
        return {k: a for (wk, bk), layer in self._param_layers() for k, a in ((wk, layer.dW), (bk, layer.db))}


class DeepConvNet(_BookNet):
    """(conv - relu - conv - relu - pool) x 3 - affine - relu - dropout - affine - dropout - softmax
    (book 1, ch08/deep_convnet.py; ``layers`` is a list as in the book)."""

    _first_skips_dx = True

    _PARAM_LAYERS = (0, 2, 5, 7, 10, 12, 15, 18)

    def __init__(
        self,
        input_dim=(1, 28, 28),
        conv_param_1=None,
        conv_param_2=None,
        conv_param_3=None,
        conv_param_4=None,
        conv_param_5=None,
        conv_param_6=None,
        hidden_size=50,
        output_size=10,
        *,
        dtype=np.float64,
        backend="fastbp",
    ):
        defaults = [(16, 1), (16, 1), (32, 1), (32, 2), (64, 1), (64, 1)]
        given = [conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5, conv_param_6]
        convs = [
            _conv_param(
                g if g is not None else {"filter_num": fnum, "filter_size": 3, "pad": pad, "stride": 1},
                f"conv_param_{i + 1}",
            )
            for i, (g, (fnum, pad)) in enumerate(zip(given, defaults))
        ]
        self._setup(dtype, backend)
        self.output_size = _check_size(output_size, "output_size")
        pre_node_nums = np.array(
            [1 * 3 * 3, 16 * 3 * 3, 16 * 3 * 3, 32 * 3 * 3, 32 * 3 * 3, 64 * 3 * 3, 64 * 4 * 4, hidden_size]
        )
        scales = np.sqrt(2.0 / pre_node_nums)
        dt = self.dtype
        self.params = {}
        pre_channel = input_dim[0]
        for idx, (fnum, fsize, _, _) in enumerate(convs):
            self.params[f"W{idx + 1}"] = (scales[idx] * np.random.randn(fnum, pre_channel, fsize, fsize)).astype(
                dt, copy=False
            )
            self.params[f"b{idx + 1}"] = np.zeros(fnum, dt)
            pre_channel = fnum
        self.params["W7"] = (scales[6] * np.random.randn(64 * 4 * 4, hidden_size)).astype(dt, copy=False)
        self.params["b7"] = np.zeros(hidden_size, dt)
        self.params["W8"] = (scales[7] * np.random.randn(hidden_size, output_size)).astype(dt, copy=False)
        self.params["b8"] = np.zeros(output_size, dt)

        L, kw, p = self._L, self._kw, self.params
        layers = []
        for i, (_, _, pad, stride) in enumerate(convs):
            layers.append(L.Convolution(p[f"W{i + 1}"], p[f"b{i + 1}"], stride, pad, **kw()))
            layers.append(L.Relu(**kw()))
            if i % 2 == 1:
                layers.append(L.Pooling(pool_h=2, pool_w=2, stride=2, **kw()))
        layers.append(L.Affine(p["W7"], p["b7"], **kw()))
        layers.append(L.Relu(**kw()))
        layers.append(L.Dropout(0.5, **kw()))
        layers.append(L.Affine(p["W8"], p["b8"], **kw()))
        layers.append(L.Dropout(0.5, **kw()))
        self.layers = layers
        self.last_layer = L.SoftmaxWithLoss(**kw())

    def _param_layers(self):
        return zip(((f"W{i + 1}", f"b{i + 1}") for i in range(8)), (self.layers[j] for j in self._PARAM_LAYERS))

    def loss(self, x, t):
        """Cross entropy of softmax(predict(x, train_flg=True)) against t (dropout on, as the book)."""
        return self._loss(x, t, True)

    def gradient(self, x, t):
        """Gradients of loss(x, t) by backpropagation, keyed like params."""
        self.loss(x, t)
        self._backward()
        return {k: a for (wk, bk), layer in self._param_layers() for k, a in ((wk, layer.dW), (bk, layer.db))}


class MultiLayerNetExtend(_BookNet):
    """Fully connected net with weight decay, Dropout and BatchNormalization (book 1,
    common/multi_layer_net_extend.py): (Affine [- BatchNorm] - activation [- Dropout]) x hidden - Affine - softmax.
    ``dropout_ration`` keeps the book's spelling."""

    def __init__(
        self,
        input_size,
        hidden_size_list,
        output_size,
        activation="relu",
        weight_init_std="relu",
        weight_decay_lambda=0,
        use_dropout=False,
        dropout_ration=0.5,
        use_batchnorm=False,
        *,
        dtype=np.float64,
        backend="fastbp",
    ):
        self._setup(dtype, backend)
        self.input_size = _check_size(input_size, "input_size")
        self.output_size = _check_size(output_size, "output_size")
        self.hidden_size_list = [_check_size(h, f"hidden_size_list[{i}]") for i, h in enumerate(hidden_size_list)]
        self.hidden_layer_num = len(self.hidden_size_list)
        self.use_dropout = use_dropout
        self.weight_decay_lambda = weight_decay_lambda
        self.use_batchnorm = use_batchnorm
        if activation not in ("relu", "sigmoid"):
            raise ValueError(f"activation must be 'relu' or 'sigmoid', got {activation!r}")
        dt = self.dtype
        sizes = [self.input_size] + self.hidden_size_list + [self.output_size]
        self.params = {}
        for idx in range(1, len(sizes)):
            scale = init_scale(weight_init_std, sizes[idx - 1])
            self.params[f"W{idx}"] = (scale * np.random.randn(sizes[idx - 1], sizes[idx])).astype(dt, copy=False)
            self.params[f"b{idx}"] = np.zeros(sizes[idx], dt)

        L, kw, p = self._L, self._kw, self.params
        act = {"sigmoid": L.Sigmoid, "relu": L.Relu}[activation]
        self.layers = OrderedDict()
        for idx in range(1, self.hidden_layer_num + 1):
            self.layers[f"Affine{idx}"] = L.Affine(
                p[f"W{idx}"], p[f"b{idx}"], **kw(**({"need_dx": idx > 1} if self._fast else {}))
            )
            if use_batchnorm:
                p[f"gamma{idx}"] = np.ones(self.hidden_size_list[idx - 1], dt)
                p[f"beta{idx}"] = np.zeros(self.hidden_size_list[idx - 1], dt)
                self.layers[f"BatchNorm{idx}"] = L.BatchNormalization(p[f"gamma{idx}"], p[f"beta{idx}"], **kw())
            self.layers[f"Activation_function{idx}"] = act(**kw())
            if use_dropout:
                self.layers[f"Dropout{idx}"] = L.Dropout(dropout_ration, **kw())
        idx = self.hidden_layer_num + 1
        self.layers[f"Affine{idx}"] = L.Affine(p[f"W{idx}"], p[f"b{idx}"], **kw())
        self.last_layer = L.SoftmaxWithLoss(**kw())

    def _param_layers(self):
        n = self.hidden_layer_num + 1
        return zip(((f"W{i}", f"b{i}") for i in range(1, n + 1)), (self.layers[f"Affine{i}"] for i in range(1, n + 1)))

    def _after_load(self):
        if self.use_batchnorm:
            for idx in range(1, self.hidden_layer_num + 1):
                layer = self.layers[f"BatchNorm{idx}"]
                layer.gamma = self.params[f"gamma{idx}"]
                layer.beta = self.params[f"beta{idx}"]

    def loss(self, x, t, train_flg=False):
        """Cross entropy + 0.5 * lambda * sum of W ** 2 over the Affine weights."""
        y = self.predict(x, train_flg)
        decay = 0.0
        lam = self.weight_decay_lambda
        if lam:
            for idx in range(1, self.hidden_layer_num + 2):
                W = self.params[f"W{idx}"]
                decay += 0.5 * lam * float(np.vdot(W, W))
        return self.last_layer.forward(y, self._in("t", t)) + decay

    def _numeric_loss(self, x, t):
        return self.loss(x, t, train_flg=True)

    def accuracy(self, X, T):
        """Fraction of rows whose arg-max score is the label, all rows in one predict (the book's)."""
        Y = np.argmax(self.predict(X, train_flg=False), axis=1)
        T = np.asarray(T)
        if T.ndim != 1:
            T = np.argmax(T, axis=1)
        return np.sum(Y == T) / float(np.shape(X)[0])

    def numerical_gradient(self, X, T):
        """Central-difference gradients keyed W1, b1, [gamma1, beta1,] ... (the book's order)."""

        def loss_w(_):
            return self.loss(X, T, train_flg=True)

        grads = {}
        for idx in range(1, self.hidden_layer_num + 2):
            for k in (f"W{idx}", f"b{idx}"):
                grads[k] = _numerical_gradient(loss_w, self.params[k])
            if self.use_batchnorm and idx != self.hidden_layer_num + 1:
                for k in (f"gamma{idx}", f"beta{idx}"):
                    grads[k] = _numerical_gradient(loss_w, self.params[k])
        return grads

    def gradient(self, x, t):
        """Backpropagated gradients; dW includes lambda * W (added into the layer's dW in place on fastbp)."""
        self.loss(x, t, train_flg=True)
        self._backward()
        grads = {}
        lam = self.weight_decay_lambda
        for idx in range(1, self.hidden_layer_num + 2):
            layer = self.layers[f"Affine{idx}"]
            dW = layer.dW
            if lam:
                if self._fast:
                    _add_scaled(dW, lam, self.params[f"W{idx}"])
                else:
                    dW = dW + lam * self.params[f"W{idx}"]
            grads[f"W{idx}"] = dW
            grads[f"b{idx}"] = layer.db
            if self.use_batchnorm and idx != self.hidden_layer_num + 1:
                bn = self.layers[f"BatchNorm{idx}"]
                grads[f"gamma{idx}"] = bn.dgamma
                grads[f"beta{idx}"] = bn.dbeta
        return grads
