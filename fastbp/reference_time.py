"""Plain-NumPy twins of book 2's layers: ``common/layers.py`` (Softmax, SigmoidWithLoss, Embedding),
``ch04/negative_sampling_layer.py`` (EmbeddingDot, UnigramSampler, NegativeSamplingLoss) and
``common/time_layers.py`` (RNN, TimeRNN, LSTM, TimeLSTM, GRU, TimeGRU, TimeEmbedding, TimeAffine,
TimeSoftmaxWithLoss, TimeSigmoidWithLoss, TimeDropout, TimeBiLSTM).

They are the oracle of fastbp's tests and the "book's NumPy" of its benchmarks, so they are written the book's
way: the Time* layers loop over time steps in Python, creating one per-step layer each, and Embedding's backward
is ``np.add.at``.  Differences from the book, on purpose:

* dtypes follow the parameters (the book hard-codes float32 ``'f'`` buffers): float64 weights give float64
  results, so gradients can be checked numerically;
* ``TimeSoftmaxWithLoss`` takes the log of the softmax as ``x - max - log(sum(exp))`` (the book's
  ``log(softmax(x))`` gives ``-inf`` once a probability underflows); ``SigmoidWithLoss`` computes the exact
  binary cross-entropy ``log(1 + exp(-|x|)) + max(x, 0) - t x`` instead of ``-log(y + 1e-7)`` (equal to about
  1e-7 except where the book's value is capped at 16.1);
* ``backward`` never writes into the caller's ``dout`` (the book's ``TimeSoftmaxWithLoss.backward`` edits its
  cached ``ys`` in place, so a second call gives a different answer; here it does not);
* the book's ``GRU``/``TimeGRU`` have no ``params``/``grads`` lists; these have ``params = [Wx, Wh]`` and
  ``grads = [dWx, dWh]`` (``dWx``/``dWh`` are the book's attribute names, the same arrays);
* bad input raises: indices out of ``[0, V)`` (IndexError), ``h`` of the wrong shape, backward before forward.
"""

import collections

import numpy as np

from fastbp._npmath import stable_sigmoid as _sigmoid

#: The layers of book 2's common/time_layers.py (also fastbp.time_layers' own, in this order).
TIME_LAYERS = [
    "RNN",
    "TimeRNN",
    "LSTM",
    "TimeLSTM",
    "GRU",
    "TimeGRU",
    "TimeEmbedding",
    "TimeAffine",
    "TimeSoftmaxWithLoss",
    "TimeSigmoidWithLoss",
    "TimeDropout",
    "TimeBiLSTM",
]
__all__ = [
    "Softmax",
    "SigmoidWithLoss",
    "Embedding",
    "EmbeddingDot",
    "UnigramSampler",
    "NegativeSamplingLoss",
    *TIME_LAYERS,
]


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    x = np.exp(x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def _check_index(idx, V, owner):
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{owner}: indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= V):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise IndexError(f"{owner}: index {bad} is out of range for {V} rows (valid: 0 .. {V - 1})")
    return idx


def _not_ready(owner):
    return RuntimeError(f"{owner}.backward called before {owner}.forward")


def _check_labels(valid, V, ignore_label):
    """IndexError for a label of `valid` (the labels not ignored) outside [0, V) (book 2's TimeSoftmaxWithLoss)."""
    if valid.size and (valid.min() < 0 or valid.max() >= V):
        bad = valid.min() if valid.min() < 0 else valid.max()
        raise IndexError(
            f"TimeSoftmaxWithLoss: label {bad} is out of range for {V} classes "
            f"(and is not the ignore label {ignore_label})"
        )


def _check_state(h, shape, dtype, owner, name="h"):
    if h.shape != shape:
        raise ValueError(f"{owner}: {name} must have shape {shape} (N, H), got {h.shape}")
    return h.astype(dtype, copy=False)


class _Layer:
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class _HState:
    """The book's set_state / reset_state of a recurrent layer with state h."""

    def set_state(self, h):
        self.h = h

    def reset_state(self):
        self.h = None


class _HCState:
    """The book's set_state / reset_state of an LSTM layer (states h and c)."""

    def set_state(self, h, c=None):
        self.h, self.c = h, c

    def reset_state(self):
        self.h, self.c = None, None


# ---------------------------------------------------------------------------------------------------------------
# common/layers.py
# ---------------------------------------------------------------------------------------------------------------
class Softmax(_Layer):
    """out = softmax(x) over the last axis; dx = out * (dout - sum(out * dout))."""

    def __init__(self):
        self.params, self.grads = [], []
        self.out = None

    def forward(self, x):
        self.out = _softmax(np.asarray(x))
        return self.out

    def backward(self, dout):
        if self.out is None:
            raise _not_ready("Softmax")
        dx = self.out * dout
        dx -= self.out * dx.sum(axis=-1, keepdims=True)
        return dx


class SigmoidWithLoss(_Layer):
    """loss = mean binary cross-entropy of sigmoid(x) against t in {0, 1}; dx = dout * (y - t) / N."""

    def __init__(self):
        self.params, self.grads = [], []
        self.loss = None
        self.y = None
        self.t = None

    def forward(self, x, t):
        x = np.asarray(x)
        t = np.asarray(t)
        if t.shape != x.shape:
            raise ValueError(f"SigmoidWithLoss: t must have the shape of x {x.shape}, got {t.shape}")
        self.t = t
        self.y = _sigmoid(x)
        rows = np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - t * x
        self.loss = rows.sum() / t.shape[0]
        return self.loss

    def backward(self, dout=1):
        if self.y is None:
            raise _not_ready("SigmoidWithLoss")
        return (self.y - self.t) * dout / self.t.shape[0]


class Embedding(_Layer):
    """out = W[idx];  backward: dW = 0, then np.add.at(dW, idx, dout) (duplicates summed)."""

    def __init__(self, W):
        self.params = [W]
        self.grads = [np.zeros_like(W)]
        self.idx = None

    def forward(self, idx):
        (W,) = self.params
        self.idx = _check_index(idx, W.shape[0], "Embedding")
        return W[self.idx]

    def backward(self, dout):
        if self.idx is None:
            raise _not_ready("Embedding")
        (dW,) = self.grads
        dW[...] = 0
        np.add.at(dW, self.idx, dout)
        return None


# ---------------------------------------------------------------------------------------------------------------
# ch04/negative_sampling_layer.py
# ---------------------------------------------------------------------------------------------------------------
class EmbeddingDot(_Layer):
    """out[n] = W[idx[n]] . h[n];  dh = dout * W[idx], dW rows += dout * h."""

    def __init__(self, W):
        self.embed = Embedding(W)
        self.params = self.embed.params
        self.grads = self.embed.grads
        self.cache = None

    def forward(self, h, idx):
        target_W = self.embed.forward(idx)
        out = np.sum(target_W * h, axis=1)
        self.cache = (h, target_W)
        return out

    def backward(self, dout):
        if self.cache is None:
            raise _not_ready("EmbeddingDot")
        h, target_W = self.cache
        dout = dout.reshape(dout.shape[0], 1)
        self.embed.backward(dout * h)
        return dout * target_W


class UnigramSampler:
    """The book's sampler: p(w) ~ count(w)**power; per row, sample_size distinct words drawn without
    replacement from p with the row's target removed (np.random.choice, one call per row)."""

    def __init__(self, corpus, power, sample_size):
        self.sample_size = sample_size
        counts = collections.Counter()
        for word_id in corpus:
            counts[word_id] += 1
        self.vocab_size = len(counts)
        self.word_p = np.zeros(self.vocab_size)
        for i in range(self.vocab_size):
            self.word_p[i] = counts[i]
        self.word_p = np.power(self.word_p, power)
        self.word_p /= np.sum(self.word_p)

    def get_negative_sample(self, target):
        batch_size = target.shape[0]
        negative_sample = np.zeros((batch_size, self.sample_size), dtype=np.int32)
        for i in range(batch_size):
            p = self.word_p.copy()
            p[target[i]] = 0
            p /= p.sum()
            negative_sample[i, :] = np.random.choice(self.vocab_size, size=self.sample_size, replace=False, p=p)
        return negative_sample


def _per_sample_layers(owner, W, loss_cls, dot_cls):
    """The book's NegativeSamplingLoss layers: owner.sample_size + 1 loss and EmbeddingDot layers (all over W),
    their params/grads collected into owner.params/owner.grads (also fastbp's, with its own layer classes)."""
    owner.loss_layers = [loss_cls() for _ in range(owner.sample_size + 1)]
    owner.embed_dot_layers = [dot_cls(W) for _ in range(owner.sample_size + 1)]
    owner.params, owner.grads = [], []
    for layer in owner.embed_dot_layers:
        owner.params += layer.params
        owner.grads += layer.grads


class NegativeSamplingLoss(_Layer):
    """Binary cross-entropy of the target's score (label 1) plus sample_size negatives' scores (label 0)."""

    def __init__(self, W, corpus, power=0.75, sample_size=5):
        self.sample_size = sample_size
        self.sampler = UnigramSampler(corpus, power, sample_size)
        _per_sample_layers(self, W, SigmoidWithLoss, EmbeddingDot)

    def forward(self, h, target):
        batch_size = target.shape[0]
        negative_sample = self.sampler.get_negative_sample(target)
        score = self.embed_dot_layers[0].forward(h, target)
        loss = self.loss_layers[0].forward(score, np.ones(batch_size, dtype=np.int32))
        negative_label = np.zeros(batch_size, dtype=np.int32)
        for i in range(self.sample_size):
            score = self.embed_dot_layers[1 + i].forward(h, negative_sample[:, i])
            loss += self.loss_layers[1 + i].forward(score, negative_label)
        return loss

    def backward(self, dout=1):
        dh = 0
        for l0, l1 in zip(self.loss_layers, self.embed_dot_layers):
            dh += l1.backward(l0.backward(dout))
        return dh


# ---------------------------------------------------------------------------------------------------------------
# common/time_layers.py
# ---------------------------------------------------------------------------------------------------------------
class _TimeRecurrent(_HState, _Layer):
    """The book's Time* loop over per-step layers, one for every cell: forward creates ``_step(*params)`` per
    step and carries its states (h, or h and c); backward runs them in reverse, summing their grads."""

    _step = None
    _name = None
    _states = ("h",)

    def __init__(self, params, stateful):
        self.params = list(params)
        self.grads = [np.zeros_like(p) for p in self.params]
        self.layers = None
        self.h, self.dh = None, None
        self.stateful = stateful

    def forward(self, xs):
        Wx, Wh = self.params[0], self.params[1]
        N, T, D = xs.shape
        H = Wh.shape[0]
        dt = np.result_type(xs, Wx)
        self.layers = []
        hs = np.empty((N, T, H), dtype=dt)
        for name in self._states:
            if not self.stateful or getattr(self, name) is None:
                setattr(self, name, np.zeros((N, H), dtype=dt))
            else:
                setattr(self, name, _check_state(getattr(self, name), (N, H), dt, self._name, name))
        for t in range(T):
            layer = self._step(*self.params)
            out = layer.forward(xs[:, t, :], *[getattr(self, name) for name in self._states])
            for name, v in zip(self._states, out if len(self._states) > 1 else (out,)):
                setattr(self, name, v)
            hs[:, t, :] = self.h
            self.layers.append(layer)
        return hs

    def backward(self, dhs):
        if self.layers is None:
            raise _not_ready(self._name)
        Wx = self.params[0]
        N, T, H = dhs.shape
        D = Wx.shape[0]
        dxs = np.empty((N, T, D), dtype=np.result_type(dhs, Wx))
        dstates = [0] * len(self._states)  # dh (and dc) flowing into step t from step t + 1
        grads = [0] * len(self.grads)
        for t in reversed(range(T)):
            layer = self.layers[t]
            dx, *dstates = layer.backward(dhs[:, t, :] + dstates[0], *dstates[1:])
            dxs[:, t, :] = dx
            for i, grad in enumerate(layer.grads):
                grads[i] += grad
        for i, grad in enumerate(grads):
            self.grads[i][...] = grad
        self.dh = dstates[0]
        return dxs


class _GRUNames:
    """The book's GRU/TimeGRU attribute names for params[0], params[1] and their gradients."""

    Wx = property(lambda self: self.params[0])
    Wh = property(lambda self: self.params[1])
    dWx = property(lambda self: self.grads[0])
    dWh = property(lambda self: self.grads[1])


class RNN(_Layer):
    """h_next = tanh(h_prev Wh + x Wx + b)."""

    def __init__(self, Wx, Wh, b):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.cache = None

    def forward(self, x, h_prev):
        Wx, Wh, b = self.params
        h_next = np.tanh(np.dot(h_prev, Wh) + np.dot(x, Wx) + b)
        self.cache = (x, h_prev, h_next)
        return h_next

    def backward(self, dh_next):
        if self.cache is None:
            raise _not_ready("RNN")
        Wx, Wh, b = self.params
        x, h_prev, h_next = self.cache
        dt = dh_next * (1 - h_next**2)
        self.grads[0][...] = np.dot(x.T, dt)
        self.grads[1][...] = np.dot(h_prev.T, dt)
        self.grads[2][...] = np.sum(dt, axis=0)
        return np.dot(dt, Wx.T), np.dot(dt, Wh.T)


class TimeRNN(_TimeRecurrent):
    _step = RNN
    _name = "TimeRNN"

    def __init__(self, Wx, Wh, b, stateful=False):
        super().__init__((Wx, Wh, b), stateful)


class LSTM(_Layer):
    """A = x Wx + h_prev Wh + b split [f | g | i | o]; c = f c_prev + g i; h = o tanh(c)."""

    def __init__(self, Wx, Wh, b):
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.cache = None

    def forward(self, x, h_prev, c_prev):
        Wx, Wh, b = self.params
        N, H = h_prev.shape
        A = np.dot(x, Wx) + np.dot(h_prev, Wh) + b
        f = _sigmoid(A[:, :H])
        g = np.tanh(A[:, H : 2 * H])
        i = _sigmoid(A[:, 2 * H : 3 * H])
        o = _sigmoid(A[:, 3 * H :])
        c_next = f * c_prev + g * i
        h_next = o * np.tanh(c_next)
        self.cache = (x, h_prev, c_prev, i, f, g, o, c_next)
        return h_next, c_next

    def backward(self, dh_next, dc_next):
        if self.cache is None:
            raise _not_ready("LSTM")
        Wx, Wh, b = self.params
        x, h_prev, c_prev, i, f, g, o, c_next = self.cache
        tanh_c_next = np.tanh(c_next)
        ds = dc_next + (dh_next * o) * (1 - tanh_c_next**2)
        dc_prev = ds * f
        di = ds * g * i * (1 - i)
        df = ds * c_prev * f * (1 - f)
        do = dh_next * tanh_c_next * o * (1 - o)
        dg = ds * i * (1 - g**2)
        dA = np.hstack((df, dg, di, do))
        self.grads[0][...] = np.dot(x.T, dA)
        self.grads[1][...] = np.dot(h_prev.T, dA)
        self.grads[2][...] = dA.sum(axis=0)
        return np.dot(dA, Wx.T), np.dot(dA, Wh.T), dc_prev


class TimeLSTM(_HCState, _TimeRecurrent):
    _step = LSTM
    _name = "TimeLSTM"
    _states = ("h", "c")

    def __init__(self, Wx, Wh, b, stateful=False):
        super().__init__((Wx, Wh, b), stateful)
        self.c = None


class GRU(_GRUNames, _Layer):
    """The book's GRU (no bias): z = sig(x Wxz + h Whz), r = sig(x Wxr + h Whr), h~ = tanh(x Wxh + (r h) Whh),
    h_next = (1 - z) h + z h~.  Gate columns [z | r | h~]."""

    def __init__(self, Wx, Wh):
        self.params = [Wx, Wh]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh)]
        self.cache = None

    def forward(self, x, h_prev):
        Wx, Wh = self.params
        H = Wh.shape[0]
        z = _sigmoid(np.dot(x, Wx[:, :H]) + np.dot(h_prev, Wh[:, :H]))
        r = _sigmoid(np.dot(x, Wx[:, H : 2 * H]) + np.dot(h_prev, Wh[:, H : 2 * H]))
        h_hat = np.tanh(np.dot(x, Wx[:, 2 * H :]) + np.dot(r * h_prev, Wh[:, 2 * H :]))
        self.cache = (x, h_prev, z, r, h_hat)
        return (1 - z) * h_prev + z * h_hat

    def backward(self, dh_next):
        if self.cache is None:
            raise _not_ready("GRU")
        Wx, Wh = self.params
        H = Wh.shape[0]
        x, h_prev, z, r, h_hat = self.cache
        dh_hat = dh_next * z
        dh_prev = dh_next * (1 - z)
        dt = dh_hat * (1 - h_hat**2)
        dWhh = np.dot((r * h_prev).T, dt)
        dhr = np.dot(dt, Wh[:, 2 * H :].T)
        dWxh = np.dot(x.T, dt)
        dx = np.dot(dt, Wx[:, 2 * H :].T)
        dh_prev += r * dhr
        dz = dh_next * h_hat - dh_next * h_prev
        dt = dz * z * (1 - z)
        dWhz = np.dot(h_prev.T, dt)
        dh_prev += np.dot(dt, Wh[:, :H].T)
        dWxz = np.dot(x.T, dt)
        dx += np.dot(dt, Wx[:, :H].T)
        dr = dhr * h_prev
        dt = dr * r * (1 - r)
        dWhr = np.dot(h_prev.T, dt)
        dh_prev += np.dot(dt, Wh[:, H : 2 * H].T)
        dWxr = np.dot(x.T, dt)
        dx += np.dot(dt, Wx[:, H : 2 * H].T)
        self.grads[0][...] = np.hstack((dWxz, dWxr, dWxh))
        self.grads[1][...] = np.hstack((dWhz, dWhr, dWhh))
        return dx, dh_prev


class TimeGRU(_GRUNames, _TimeRecurrent):
    _step = GRU
    _name = "TimeGRU"

    def __init__(self, Wx, Wh, stateful=False):
        super().__init__((Wx, Wh), stateful)


class TimeEmbedding(_Layer):
    def __init__(self, W):
        self.params = [W]
        self.grads = [np.zeros_like(W)]
        self.layers = None
        self.W = W

    def forward(self, xs):
        N, T = xs.shape
        W = self.params[0]
        V, D = W.shape
        out = np.empty((N, T, D), dtype=W.dtype)
        self.layers = []
        for t in range(T):
            layer = Embedding(W)
            out[:, t, :] = layer.forward(xs[:, t])
            self.layers.append(layer)
        return out

    def backward(self, dout):
        if self.layers is None:
            raise _not_ready("TimeEmbedding")
        N, T, D = dout.shape
        grad = 0
        for t in range(T):
            layer = self.layers[t]
            layer.backward(dout[:, t, :])
            grad += layer.grads[0]
        self.grads[0][...] = grad
        return None


class TimeAffine(_Layer):
    def __init__(self, W, b):
        self.params = [W, b]
        self.grads = [np.zeros_like(W), np.zeros_like(b)]
        self.x = None

    def forward(self, x):
        N, T, D = x.shape
        W, b = self.params
        out = np.dot(x.reshape(N * T, -1), W) + b
        self.x = x
        return out.reshape(N, T, -1)

    def backward(self, dout):
        if self.x is None:
            raise _not_ready("TimeAffine")
        x = self.x
        N, T, D = x.shape
        W, b = self.params
        dout = dout.reshape(N * T, -1)
        rx = x.reshape(N * T, -1)
        self.grads[0][...] = np.dot(rx.T, dout)
        self.grads[1][...] = np.sum(dout, axis=0)
        return np.dot(dout, W.T).reshape(*x.shape)


class TimeSoftmaxWithLoss(_Layer):
    """loss = mean over the (n, t) with ts != ignore_label (-1) of -log softmax(xs)[ts]."""

    def __init__(self):
        self.params, self.grads = [], []
        self.cache = None
        self.ignore_label = -1

    def forward(self, xs, ts):
        N, T, V = xs.shape
        if ts.ndim == 3:
            ts = ts.argmax(axis=2)
        mask = ts != self.ignore_label
        valid = ts[mask]
        _check_labels(valid, V, self.ignore_label)
        xs = xs.reshape(N * T, V)
        ts = np.where(mask, ts, 0).reshape(N * T)
        mask = mask.reshape(N * T)
        shifted = xs - xs.max(axis=1, keepdims=True)
        lse = np.log(np.exp(shifted).sum(axis=1))
        ys = np.exp(shifted - lse[:, None])
        ls = (shifted[np.arange(N * T), ts] - lse) * mask
        loss = -np.sum(ls) / mask.sum()
        self.cache = (ts, ys, mask, (N, T, V))
        return loss

    def backward(self, dout=1):
        if self.cache is None:
            raise _not_ready("TimeSoftmaxWithLoss")
        ts, ys, mask, (N, T, V) = self.cache
        dx = ys.copy()
        dx[np.arange(N * T), ts] -= 1
        dx *= dout
        dx /= mask.sum()
        dx *= mask[:, np.newaxis]
        return dx.reshape((N, T, V))


class TimeSigmoidWithLoss(_Layer):
    def __init__(self):
        self.params, self.grads = [], []
        self.xs_shape = None
        self.layers = None

    def forward(self, xs, ts):
        N, T = xs.shape
        self.xs_shape = xs.shape
        self.layers = []
        loss = 0
        for t in range(T):
            layer = SigmoidWithLoss()
            loss += layer.forward(xs[:, t], ts[:, t])
            self.layers.append(layer)
        return loss / T

    def backward(self, dout=1):
        if self.layers is None:
            raise _not_ready("TimeSigmoidWithLoss")
        N, T = self.xs_shape
        dxs = np.empty(self.xs_shape, dtype=self.layers[0].y.dtype if T else np.float32)
        dout = dout * (1 / T)
        for t in range(T):
            dxs[:, t] = self.layers[t].backward(dout)
        return dxs


class TimeDropout(_Layer):
    """Inverted dropout: mask = (np.random.rand(*xs.shape) > ratio) / (1 - ratio) while train_flg."""

    def __init__(self, dropout_ratio=0.5):
        self.params, self.grads = [], []
        self.dropout_ratio = dropout_ratio
        self.mask = None
        self.train_flg = True

    def forward(self, xs):
        if self.train_flg:
            flg = np.random.rand(*xs.shape) > self.dropout_ratio
            scale = 1 / (1.0 - self.dropout_ratio)
            self.mask = flg.astype(xs.dtype) * scale
            return xs * self.mask
        return xs

    def backward(self, dout):
        if self.mask is None:
            raise _not_ready("TimeDropout")
        return dout * self.mask


class TimeBiLSTM(_Layer):
    """Two TimeLSTMs, one reading the sequence backwards; outputs concatenated [forward | backward]."""

    _lstm = TimeLSTM

    def __init__(self, Wx1, Wh1, b1, Wx2, Wh2, b2, stateful=False):
        self.forward_lstm = self._lstm(Wx1, Wh1, b1, stateful)
        self.backward_lstm = self._lstm(Wx2, Wh2, b2, stateful)
        self.params = self.forward_lstm.params + self.backward_lstm.params
        self.grads = self.forward_lstm.grads + self.backward_lstm.grads

    def forward(self, xs):
        o1 = self.forward_lstm.forward(xs)
        o2 = self.backward_lstm.forward(xs[:, ::-1])
        return np.concatenate((o1, o2[:, ::-1]), axis=2)

    def backward(self, dhs):
        H = dhs.shape[2] // 2
        dxs1 = self.forward_lstm.backward(dhs[:, :, :H])
        dxs2 = self.backward_lstm.backward(dhs[:, ::-1, H:])
        return dxs1 + dxs2[:, ::-1]
