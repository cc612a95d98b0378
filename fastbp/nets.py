"""The book's fully connected networks on fastbp's layers: ``TwoLayerNet`` and ``MultiLayerNet``.

Same constructor arguments, attributes and methods as book 1's ``ch05/two_layer_net.py`` and
``common/multi_layer_net.py``: ``params`` dict (``W1``, ``b1``, ...), ``layers`` OrderedDict (``Affine1``,
``Relu1`` or ``Sigmoid1``, ..., ``Affine<L>``), ``lastLayer`` (also ``last_layer``), ``predict``, ``loss``,
``accuracy``, ``numerical_gradient`` and ``gradient``.  Weights are drawn like the book's
(``scale * np.random.randn(...)``, then cast to ``dtype``), so ``np.random.seed`` reproduces the book's
initial weights.  Two extra keyword arguments:

* ``dtype`` (float64 like the book, or float32): the dtype of the parameters.
* ``backend``: ``"fastbp"`` (default) builds the network from :mod:`fastbp.layers` with ``reuse=True``
  (layer outputs and gradients live in workspaces reused from call to call) and ``need_dx=False`` on the first
  Affine; ``"reference"`` builds it from :mod:`fastbp.reference` (plain NumPy, the baseline).

With the fastbp backend a training step ``grads = net.gradient(x, t); optimizer.update(net.params, grads)``
allocates no NumPy array once the batch shape has been seen. ``gradient`` also runs each ``Relu`` right after an
``Affine`` on that Affine's output in place (one pass, no mask array, no second buffer) and its backward as the mask
applied in place to the next Affine's dx: the same gradients bit for bit as layer by layer. That Relu's ``mask`` is
then computed from the kept output when first read (``relu(x) <= 0`` exactly where ``x <= 0``), as fastbp's
convolutional nets do for a Relu fused into a Pooling; it refers to the Affine's output workspace, so calling that
Affine's ``forward`` directly before reading ``mask`` changes it. When the layers are exactly fastbp's ``Affine``,
``Relu``, ..., ``Affine`` and ``SoftmaxWithLoss``, ``gradient`` runs forward and backward in one kernel call
(``_kernels.fc_relu_gradient``: the same kernels in the same order, so the same bits) and sets every layer's
attributes as the layer path does; its first call goes layer by layer (the Affines check their grads). The price of
reuse is the workspace rule: arrays returned by ``predict`` and ``gradient`` are the layers' own and are overwritten
by the next call (copy what you want to keep); ``gradient`` adds the weight-decay term ``lambda * W`` into the
Affine layers' ``dW`` in place. The fastbp backend computes in the network's dtype: inputs and float (one-hot)
targets of another dtype are converted into reused buffers (NumPy's promotion would turn a float32 network fed
float64 data into a float64 computation with per-call copies of the weights).

Other differences from the book: ``loss`` uses fastbp's exact log-sum-exp cross entropy (equal to the book's
``-log(y + 1e-7)`` to about 1e-7 where the book's is not capped), ``accuracy`` handles one-hot targets (the
book's ``MultiLayerNet.accuracy`` has a typo that breaks them), and ``accuracy`` takes an optional
``batch_size`` to evaluate a large set in slices.
"""

import math
import numbers
from collections import OrderedDict

import numpy as np

from fastbp import reference as _reference
from fastbp._workspace import Workspace as _Workspace
from fastbp.gradient import numerical_gradient as _numerical_gradient

__all__ = ["TwoLayerNet", "MultiLayerNet"]

_BACKENDS = ("fastbp", "reference")
_ACTIVATIONS = ("relu", "sigmoid")
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _layers_module(backend):
    if backend == "fastbp":
        from fastbp import layers

        return layers
    if backend == "reference":
        return _reference
    raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from e
    if dt != _F32 and dt != _F64:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def init_scale(weight_init_std, n_prev):
    """Standard deviation of a weight matrix fed by n_prev units: a number, or 'relu'/'he' -> sqrt(2/n_prev),
    'sigmoid'/'xavier' -> sqrt(1/n_prev) (as in the book's MultiLayerNet)."""
    if isinstance(weight_init_std, str):
        name = weight_init_std.lower()
        if name in ("relu", "he"):
            return math.sqrt(2.0 / n_prev)
        if name in ("sigmoid", "xavier"):
            return math.sqrt(1.0 / n_prev)
        raise ValueError(
            f"weight_init_std must be a number or one of 'relu', 'he', 'sigmoid', 'xavier', got {weight_init_std!r}"
        )
    if (
        isinstance(weight_init_std, bool)
        or not isinstance(weight_init_std, numbers.Real)
        or not math.isfinite(weight_init_std)
    ):
        raise ValueError(
            f"weight_init_std must be a finite number or one of 'relu', 'he', 'sigmoid', "
            f"'xavier', got {weight_init_std!r}"
        )
    return weight_init_std


_FAST = None


def _fast_modules():
    """(fastbp._kernels, fastbp.layers, fastbp._threads), imported at first use: the reference backend needs none."""
    global _FAST
    if _FAST is None:
        from fastbp import _kernels, _threads, layers

        _FAST = (_kernels, layers, _threads)
    return _FAST


def _threads_opened():
    """fastbp's count of parallel regions opened so far (_threads.regions_opened)."""
    return _fast_modules()[2].regions_opened()


def _add_scaled(dW, lam, W, serial=False):
    """dW += lam * W in place (the kernel's SGD update with lr = -lam is exactly this axpy); `serial`: on the calling
    thread only (see fastbp._optim, MIN_BLOCK)."""
    if (
        dW.dtype == W.dtype
        and (dW.dtype == _F32 or dW.dtype == _F64)
        and dW.dtype.isnative
        and dW.flags.c_contiguous
        and W.flags.c_contiguous
        and dW.flags.writeable
    ):
        _fast_modules()[0].optimizer_update(0, dW, W, None, None, -lam, 0, 0, 1e-7, serial)
    else:
        dW += lam * W


def _patched(layer):
    """True when `layer` has its own forward or backward (set on the instance, e.g. a spy): then it is called."""
    d = layer.__dict__
    return "forward" in d or "backward" in d


class _FullyConnectedNet:
    """Affine -> activation -> ... -> Affine -> SoftmaxWithLoss with the book-1 network API."""

    def _build(
        self,
        input_size,
        hidden_size_list,
        output_size,
        activation,
        weight_init_std,
        weight_decay_lambda,
        dtype,
        backend,
    ):
        self.input_size = _check_size(input_size, "input_size")
        self.output_size = _check_size(output_size, "output_size")
        if isinstance(hidden_size_list, numbers.Integral):
            raise TypeError(f"hidden_size_list must be a list of layer sizes, e.g. [{hidden_size_list}]")
        self.hidden_size_list = [_check_size(h, f"hidden_size_list[{i}]") for i, h in enumerate(hidden_size_list)]
        self.hidden_layer_num = len(self.hidden_size_list)
        if not isinstance(activation, str) or activation.lower() not in _ACTIVATIONS:
            raise ValueError(f"activation must be 'relu' or 'sigmoid', got {activation!r}")
        self.activation = activation.lower()
        if (
            isinstance(weight_decay_lambda, bool)
            or not isinstance(weight_decay_lambda, numbers.Real)
            or not math.isfinite(weight_decay_lambda)
            or weight_decay_lambda < 0
        ):
            raise ValueError(f"weight_decay_lambda must be a finite number >= 0, got {weight_decay_lambda!r}")
        self.weight_decay_lambda = weight_decay_lambda
        self.dtype = _check_dtype(dtype)
        L = _layers_module(backend)
        self.backend = backend
        fast = backend == "fastbp"

        sizes = [self.input_size] + self.hidden_size_list + [self.output_size]
        self.params = {}
        for idx in range(1, len(sizes)):
            scale = init_scale(weight_init_std, sizes[idx - 1])
            W = scale * np.random.randn(sizes[idx - 1], sizes[idx])
            self.params[f"W{idx}"] = W.astype(self.dtype, copy=False)
            self.params[f"b{idx}"] = np.zeros(sizes[idx], self.dtype)

        act_cls = L.Relu if self.activation == "relu" else L.Sigmoid
        act_name = "Relu" if self.activation == "relu" else "Sigmoid"
        kw = {"reuse": True} if fast else {}
        self.layers = OrderedDict()
        n_affine = len(sizes) - 1
        for idx in range(1, n_affine + 1):
            W, b = self.params[f"W{idx}"], self.params[f"b{idx}"]
            if fast:
                self.layers[f"Affine{idx}"] = L.Affine(W, b, reuse=True, need_dx=idx > 1)
            else:
                self.layers[f"Affine{idx}"] = L.Affine(W, b)
            if idx < n_affine:
                self.layers[f"{act_name}{idx}"] = act_cls(**kw)
        self.lastLayer = L.SoftmaxWithLoss(**kw)
        self._ws = _Workspace()  # the inputs and targets converted to the network's dtype
        self._fc_bufs = None  # _gradient_fc's arrays and their key (see there)

    # the book names it lastLayer in TwoLayerNet and last_layer in MultiLayerNet
    last_layer = property(lambda self: self.lastLayer, lambda self, v: setattr(self, "lastLayer", v))

    def _affine_count(self):
        return self.hidden_layer_num + 1

    def _in_dtype(self, name, a):
        """fastbp backend: a float/integer array of another dtype converted to the network's dtype, into a
        buffer reused from call to call (so a float32 net computes in float32 whatever it is fed, and a
        float64 one-hot target does not promote a float32 net's backward pass to float64)."""
        if self.backend != "fastbp":
            return a
        if not isinstance(a, np.ndarray):
            a = np.asarray(a)
        if a.dtype is self.dtype or a.dtype.kind not in "fiub" or (name == "t" and a.dtype.kind != "f"):
            return a  # integer labels stay labels
        return self._ws.cast(name, a, self.dtype)

    def predict(self, x):
        """Scores (logits) of the network for x: the layers' forward in order."""
        x = self._in_dtype("x", x)
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def weight_decay(self):
        """0.5 * lambda * sum over the weight matrices of sum(W ** 2) (no temporaries)."""
        lam = self.weight_decay_lambda
        if not lam:
            return 0.0
        total = 0.0
        for idx in range(1, self._affine_count() + 1):
            W = self.params[f"W{idx}"]
            total += float(np.vdot(W, W))
        return 0.5 * lam * total

    def loss(self, x, t):
        """Cross-entropy of softmax(predict(x)) against t (labels or one-hot) + 0.5 * lambda * sum(W ** 2)."""
        y = self.predict(x)
        return self.lastLayer.forward(y, self._in_dtype("t", t)) + self.weight_decay()

    def accuracy(self, x, t, batch_size=None):
        """Fraction of rows whose arg-max score equals the label (t labels (N,) or one-hot (N, C)).

        ``batch_size`` evaluates the rows in slices of that many (same result, bounded memory)."""
        x = np.asarray(x)
        t = np.asarray(t)
        n = x.shape[0] if x.ndim else 0
        if t.shape[:1] != (n,):
            raise ValueError(f"t must have one label or one-hot row per sample ({n}), got shape {t.shape}")
        if t.ndim != 1:
            t = np.argmax(t.reshape(n, -1), axis=1)
        if n == 0:
            raise ValueError("accuracy of an empty set is undefined (x has 0 rows)")
        step = n if batch_size is None else _check_size(batch_size, "batch_size")
        correct = 0
        for start in range(0, n, step):
            y = self.predict(x[start : start + step])
            correct += int(np.count_nonzero(np.argmax(y, axis=1) == t[start : start + step]))
        return correct / float(n)

    def numerical_gradient(self, x, t):
        """Gradients of loss(x, t) by central differences (the book's numerical_gradient), keyed like params."""

        def loss_W(_):
            return self.loss(x, t)

        grads = {}
        for key in self.params:
            grads[key] = _numerical_gradient(loss_W, self.params[key])
        return grads

    def _plan(self):
        """(layers in order, [(W key, b key, Affine layer)], ...), recomputed only when `layers` was changed."""
        layers = tuple(self.layers.values())
        cached = getattr(self, "_plan_cache", None)
        if cached is None or len(cached) != 6 or cached[0] != layers:  # (a net pickled by 0.1 kept 5 entries)
            affines = [(f"W{i}", f"b{i}", self.layers[f"Affine{i}"]) for i in range(1, self._affine_count() + 1)]
            # fastbp backend: the first layer's dx is never used, its backward gets need_dx=False (the reference
            # backend, the book's algorithm and the benchmarks' NumPy baseline, computes it as the book does)
            skip_first = self.backend == "fastbp" and bool(layers) and isinstance(layers[0], _reference.Affine)
            back = layers[::-1]
            # fastbp backend: a Relu right after an Affine (both fastbp's own classes) runs in gradient() on the
            # Affine's output in place (see _forward_fused); the positions of those Relus
            # The whole gradient in one kernel call (_gradient_fc) when the layers are exactly fastbp's Affine,
            # Relu, Affine, ..., Affine (every Relu fused): fc = (the Affine layers, the Relu layers), else None.
            fused = ()
            fc = None
            if self.backend == "fastbp":
                L = _fast_modules()[1]
                fused = frozenset(
                    i for i in range(1, len(layers)) if type(layers[i]) is L.Relu and type(layers[i - 1]) is L.Affine
                )
                if (
                    len(layers) % 2 == 1
                    and len(fused) == len(layers) // 2
                    and all(type(layer) is L.Affine for layer in layers[::2])
                ):
                    fc = (layers[::2], layers[1::2])
            cached = self._plan_cache = (layers, back[:-1] if skip_first else back, affines, skip_first, fused, fc)
        return cached

    def _gradient_fc(self, fc, x, t):
        """gradient()'s forward and backward in one call of the fused kernel (``_kernels.fc_relu_gradient``: the
        same kernels in the same order as the layer-by-layer path, so the same bits), leaving every layer's
        attributes as that path leaves them; True when done.  False, with nothing done, when the case is not the
        kernel's: the last layer is not fastbp's SoftmaxWithLoss, an operand of another dtype, targets other than
        labels (N,) or one-hot rows of the network's dtype, an empty batch, an Affine whose params or grads are
        not the arrays the layer path last checked (its backward checks them and then takes this path), or an
        Affine or the last layer with a forward or backward of its own set on the instance."""
        K, L, _ = _fast_modules()
        last = self.lastLayer
        dt = self.dtype
        # dtypes compare by `is` first (NumPy's singletons), then by value: an unpickled net or array has its own
        # dtype objects
        if dt is not _F32 and dt is not _F64:
            dt = _F32 if dt == _F32 else _F64
        if type(last) is not L.SoftmaxWithLoss or type(x) is not np.ndarray or x.ndim != 2:
            return False
        if x.dtype is not dt and x.dtype != dt:
            return False
        if _patched(last) or not last._ws.reuse:
            return False
        n = x.shape[0]
        if n == 0 or type(t) is not np.ndarray:
            return False
        affines, relus = fc
        bufs = getattr(self, "_fc_bufs", None)
        fresh = bufs is not None and bufs[0] == n and bufs[1] is affines and bufs[2] is last and bufs[3] is dt
        Ws, bs, dWs, dbs = [], [], [], []
        for k, A in enumerate(affines):
            if _patched(A) or not A._ws.reuse:
                return False
            W, b = A.params
            ok = A._ok
            gr = A.grads
            if ok is None or ok[0] is not W or ok[1] is not gr[0] or ok[2] is not gr[1]:
                return False
            if (W.dtype is not dt and W.dtype != dt) or (b.dtype is not dt and b.dtype != dt):
                return False
            if fresh and W.shape != bufs[4][k]:
                fresh = False
            Ws.append(W)
            bs.append(b)
            dWs.append(ok[1])
            dbs.append(ok[2])
        c = Ws[-1].shape[1]
        kt = last._kernel_targets(t, (n, c), dt)
        if kt is None:
            return False
        tk, labels, target = kt
        if not fresh:
            # the layers' own workspace arrays: what their forward and backward hand out
            outs = [A._ws.result("out", (n, W.shape[1]), dt) for A, W in zip(affines, Ws)]
            dxs = [None] + [A._ws.result("dx", (n, W.shape[0]), dt) for A, W in zip(affines[1:], Ws[1:])]
            y = last._ws.result("y", (n, c), dt)
            g = last._ws.result("g", (n, c), dt)
            ids = frozenset(id(a) for a in outs + dxs[1:] + [y, g])
            # keyed by the batch, the layer objects, the dtype and the weights' shapes; `ids` for the input check
            bufs = self._fc_bufs = (n, affines, last, dt, [W.shape for W in Ws], outs, dxs, y, g, ids)
        outs, dxs, y, g, ids = bufs[5:]
        # an input that is (a view of) one of these arrays, e.g. a layer's own earlier output fed back in: the layer
        # path, whose workspaces then hand out a second array
        if id(x) in ids or id(x.base) in ids or id(t) in ids or id(t.base) in ids:
            return False
        loss = K.fc_relu_gradient(x, tk, Ws, bs, outs, dxs, dWs, dbs, y, g)
        inp = x
        for A, out in zip(affines, outs):
            A.original_x_shape = inp.shape
            A.x = inp
            A._xk = inp
            inp = out
        for R, out in zip(relus, outs):
            R._defer(out)
        last._keep(t, y, g, labels, target, loss)
        return True

    def _forward_fused(self, layers, fused, x):
        """The forward pass of gradient() with each Relu in `fused` applied to its Affine's output in place
        (``relu_inplace``: one pass, no mask, no second buffer); that Relu keeps the result as the source of its
        lazy ``mask`` (``Relu._defer``: ``relu(x) <= 0`` exactly where ``x <= 0``).  Returns (the last output, the
        positions fused in this pass)."""
        K = _fast_modules()[0]
        done = []
        i, n = 0, len(layers)
        while i < n:
            x = layers[i].forward(x)
            if (
                i + 1 in fused
                and type(x) is np.ndarray
                and (x.dtype is _F32 or x.dtype is _F64)
                and x.flags.c_contiguous
                and x.flags.writeable
            ):
                K.relu_inplace(x)
                layers[i + 1]._defer(x)
                done.append(i + 1)
                i += 2
            else:
                i += 1
        return x, done

    def _backward_fused(self, layers, reversed_layers, done, dout):
        """The backward pass after _forward_fused: a fused Relu's backward is its mask applied to the next
        Affine's dx in place (``relu_mask_inplace``, from the Relu's kept output; that dx is the Affine's own
        workspace) instead of a new gradient array.  Returns the dout of the layers not in reversed_layers."""
        K = _fast_modules()[0]
        n = len(layers)
        for k, layer in enumerate(reversed_layers):
            i = n - 1 - k
            if i in done:
                src = layer._mask_src
                if (
                    src is not None
                    and type(dout) is np.ndarray
                    and dout.dtype is src.dtype
                    and dout.shape == src.shape
                    and dout.flags.c_contiguous
                    and dout.flags.writeable
                ):
                    K.relu_mask_inplace(src, dout)
                    continue
            dout = layer.backward(dout)
        return dout

    def _gradient_layers(self, layers, reversed_layers, skip_first, fused, x, t):
        """gradient()'s forward and backward layer by layer (x, t already in the network's dtype)."""
        done = ()
        if fused:
            x, done = self._forward_fused(layers, fused, x)
        else:
            for layer in layers:
                x = layer.forward(x)
        last = self.lastLayer
        last.forward(x, t)
        # backward
        dout = last.backward(1)
        if done:
            dout = self._backward_fused(layers, reversed_layers, done, dout)
        else:
            for layer in reversed_layers:
                dout = layer.backward(dout)
        if skip_first:
            layers[0].backward(dout, need_dx=False)  # fastbp extension: the images' gradient is not wanted

    def gradient(self, x, t):
        """Gradients of loss(x, t) by backpropagation, keyed like params (dW includes lambda * W)."""
        layers, reversed_layers, affines, skip_first, fused, fc = self._plan()
        regions0 = _threads_opened() if self.weight_decay_lambda and self.backend == "fastbp" else 0
        # forward (the weight-decay term of the loss does not change the backward pass)
        x = self._in_dtype("x", x)
        t = self._in_dtype("t", t)
        if fc is None or not self._gradient_fc(fc, x, t):
            self._gradient_layers(layers, reversed_layers, skip_first, fused, x, t)

        grads = {}
        lam = self.weight_decay_lambda
        fast = self.backend == "fastbp"
        # no parallel region in this gradient: its arrays are in this thread's cache, the decay term stays on it
        serial = lam and fast and _fast_modules()[2].no_region_since(regions0)
        for wkey, bkey, layer in affines:
            dW = layer.dW
            if lam:
                if fast:
                    _add_scaled(dW, lam, layer.W, serial)
                else:
                    dW = dW + lam * layer.W
            grads[wkey] = dW
            grads[bkey] = layer.db
        return grads


class TwoLayerNet(_FullyConnectedNet):
    """Affine1 -> Relu1 -> Affine2 -> SoftmaxWithLoss (book 1, chapter 5); weights std * randn."""

    def __init__(self, input_size, hidden_size, output_size, weight_init_std=0.01, dtype=np.float64, backend="fastbp"):
        self._build(
            input_size,
            [_check_size(hidden_size, "hidden_size")],
            output_size,
            "relu",
            weight_init_std,
            0,
            dtype,
            backend,
        )


class MultiLayerNet(_FullyConnectedNet):
    """(Affine -> Relu/Sigmoid) x len(hidden_size_list) -> Affine -> SoftmaxWithLoss, with L2 weight decay.

    weight_init_std: a number, 'relu'/'he' (sqrt(2 / n_prev)) or 'sigmoid'/'xavier' (sqrt(1 / n_prev)).
    """

    def __init__(
        self,
        input_size,
        hidden_size_list,
        output_size,
        activation="relu",
        weight_init_std="relu",
        weight_decay_lambda=0,
        dtype=np.float64,
        backend="fastbp",
    ):
        self._build(
            input_size, hidden_size_list, output_size, activation, weight_init_std, weight_decay_lambda, dtype, backend
        )


# book 1, chapters 6-8: SimpleConvNet, DeepConvNet, MultiLayerNetExtend live in fastbp.convnets (which imports this
# module's helpers), re-exported here on first access
# (F822: the names are resolved by the module-level __getattr__ below, a lazy re-export, not defined here)
__all__ += ["SimpleConvNet", "DeepConvNet", "MultiLayerNetExtend"]  # noqa: F822


def __getattr__(name):
    if name in ("SimpleConvNet", "DeepConvNet", "MultiLayerNetExtend"):
        from fastbp import convnets

        return getattr(convnets, name)
    raise AttributeError(f"module 'fastbp.nets' has no attribute {name!r}")
