"""Book 2's own glue and models, transcribed once for fastbp's tests and benchmarks (``benchmarks/rnn_compare.py``,
``tests/test_book2_models.py``, ``tests/test_time_layers.py``, ``tests/test_trainer.py``,
``tests/test_negative_sampling.py``): ``common/util.py``'s clip_grads, ``common/optimizer.py``'s SGD and Adam
(lists of arrays), ch06's Rnnlm / BetterRnnlm and ch04's CBOW (negative sampling), written the book's way over a
module ``M`` of layers (``fastbp.time_layers`` or ``fastbp.reference_time``).

The models take their weights from the caller (each test or benchmark draws its own, in its own order and
scale); ``lstm_init`` is the book's initialisation of one LSTM's (Wx, Wh, b)."""

import numpy as np


def book_clip_grads(grads, max_norm):
    """common/util.py clip_grads: scale every gradient in place by max_norm / ||grads|| when that is < 1."""
    total = 0
    for g in grads:
        total += np.sum(g**2)
    total = np.sqrt(total)
    rate = max_norm / (total + 1e-6)
    if rate < 1:
        for g in grads:
            g *= rate


class BookSGD:
    """common/optimizer.py SGD over lists: params[i] -= lr * grads[i]."""

    def __init__(self, lr=0.01):
        self.lr = lr

    def update(self, params, grads):
        for i in range(len(params)):
            params[i] -= self.lr * grads[i]


class BookAdam:
    """common/optimizer.py Adam over lists, in NumPy."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter = 0
        self.m = self.v = None

    def update(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for i in range(len(params)):
            self.m[i] += (1 - self.beta1) * (grads[i] - self.m[i])
            self.v[i] += (1 - self.beta2) * (grads[i] ** 2 - self.v[i])
            params[i] -= lr_t * self.m[i] / (np.sqrt(self.v[i]) + 1e-7)


def lstm_init(rn, D, H, dt="f"):
    """The book's (Wx, Wh, b) of one LSTM: rn(...) / sqrt(fan-in), zero bias; rn draws standard normals."""
    return (
        (rn((D, 4 * H)) / np.sqrt(D)).astype(dt),
        (rn((H, 4 * H)) / np.sqrt(H)).astype(dt),
        np.zeros(4 * H).astype(dt),
    )


class BookModel:
    """The book's model plumbing: ``layers`` then ``loss_layer``; params/grads collected once from the layers."""

    layers = ()
    lstm_layers = ()

    def _collect(self, layers):
        self.params, self.grads = [], []
        for layer in layers:
            self.params += layer.params
            self.grads += layer.grads

    def predict(self, xs):
        for layer in self.layers:
            xs = layer.forward(xs)
        return xs

    def forward(self, xs, ts):
        return self.loss_layer.forward(self.predict(xs), ts)

    def backward(self, dout=1):
        dout = self.loss_layer.backward(dout)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def reset_state(self):
        for layer in self.lstm_layers:
            layer.reset_state()


class Rnnlm(BookModel):
    """ch06/rnnlm.py: TimeEmbedding(E), TimeLSTM(Wx, Wh, b, stateful), TimeAffine(W, bb), TimeSoftmaxWithLoss."""

    def __init__(self, M, E, Wx, Wh, b, W, bb):
        self.layers = [M.TimeEmbedding(E), M.TimeLSTM(Wx, Wh, b, stateful=True), M.TimeAffine(W, bb)]
        self.loss_layer = M.TimeSoftmaxWithLoss()
        self.lstm_layer = self.layers[1]
        self.lstm_layers = [self.lstm_layer]
        self._collect(self.layers)


class BetterRnnlm(BookModel):
    """ch06/better_rnnlm.py: two stateful LSTMs (lstm1, lstm2: (Wx, Wh, b) each), dropout after the embedding and
    each LSTM, weight tying TimeAffine(E.T, bb)."""

    def __init__(self, M, E, lstm1, lstm2, bb, dropout_ratio=0.5):
        self.layers = [
            M.TimeEmbedding(E),
            M.TimeDropout(dropout_ratio),
            M.TimeLSTM(*lstm1, stateful=True),
            M.TimeDropout(dropout_ratio),
            M.TimeLSTM(*lstm2, stateful=True),
            M.TimeDropout(dropout_ratio),
            M.TimeAffine(E.T, bb),
        ]  # weight tying
        self.loss_layer = M.TimeSoftmaxWithLoss()
        self.lstm_layers = [self.layers[2], self.layers[4]]
        self.drop_layers = [self.layers[1], self.layers[3], self.layers[5]]
        self._collect(self.layers)

    def predict(self, xs, train_flg=False):
        for layer in self.drop_layers:
            layer.train_flg = train_flg
        return super().predict(xs)

    def forward(self, xs, ts, train_flg=True):
        return self.loss_layer.forward(self.predict(xs, train_flg), ts)


class BookCBOW:
    """ch04/cbow.py against a module M with Embedding and NegativeSamplingLoss (one Embedding per context
    position, all sharing W_in; power 0.75, 5 negatives)."""

    def __init__(self, M, W_in, W_out, window_size, corpus):
        self.in_layers = [M.Embedding(W_in) for _ in range(2 * window_size)]
        self.ns_loss = M.NegativeSamplingLoss(W_out, corpus, power=0.75, sample_size=5)
        self.params, self.grads = [], []
        for layer in self.in_layers + [self.ns_loss]:
            self.params += layer.params
            self.grads += layer.grads

    def forward(self, contexts, target):
        h = 0
        for i, layer in enumerate(self.in_layers):
            h += layer.forward(contexts[:, i])
        h *= 1 / len(self.in_layers)
        return self.ns_loss.forward(h, target)

    def backward(self, dout=1):
        dout = self.ns_loss.backward(dout)
        dout *= 1 / len(self.in_layers)
        for layer in self.in_layers:
            layer.backward(dout)
