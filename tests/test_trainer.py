"""fastbp.trainer (both books' Trainer, RnnlmTrainer, remove_duplicate) and fastbp.util (clip_grads,
eval_perplexity, the corpus helpers) against the books' definitions."""

import os

import numpy as np
import pytest

import fastbp.time_layers as TL
from fastbp import _book2 as book2
from fastbp import optimizers
from fastbp import util
from fastbp.trainer import Book1Trainer, Book2Trainer, RnnlmTrainer, Trainer, remove_duplicate
from fastbp_tests import BOOK_DATA


def _book_clip(grads, max_norm):
    total = 0
    for g in grads:
        total += np.sum(g**2)
    rate = max_norm / (np.sqrt(total) + 1e-6)
    if rate < 1:
        for g in grads:
            g *= rate


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_grads_matches_book(dtype, max_norm):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(dtype) for s in [(300, 200), (7,), (40, 3)]]
    grads.append(np.asfortranarray(rng.standard_normal((5, 9)).astype(dtype)))
    mine = [g.copy(order="K") for g in grads]
    ids = [id(g) for g in mine]
    util.clip_grads(mine, max_norm)
    _book_clip(grads, max_norm)
    assert [id(g) for g in mine] == ids
    for a, b in zip(mine, grads):
        np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_sum_squares_thread_independent():
    from fastbp import _embedding as _emb

    a = np.random.default_rng(1).standard_normal(300001).astype(np.float32)
    from test_time_layers import _threads_set

    vals = []
    for nt in (1, 3, 16, 64):
        with _threads_set(nt):
            vals.append(_emb.sum_squares(a))
    assert len(set(vals)) == 1
    assert abs(vals[0] - np.sum(a.astype(np.float64) ** 2)) < 1e-9 * vals[0]


def test_remove_duplicate_shared_and_tied():
    rng = np.random.default_rng(2)
    E = rng.standard_normal((6, 4)).astype("f")
    b = np.zeros(6, "f")
    W2 = rng.standard_normal((4, 4)).astype("f")
    params = [E, W2, E, E.T, b]
    grads = [rng.standard_normal(p.shape).astype("f") for p in params]
    expect = [grads[0] + grads[2] + grads[3].T, grads[1], grads[4]]
    p, g = remove_duplicate(params, grads)
    assert len(p) == 3 and p[0] is E and p[1] is W2 and p[2] is b
    assert g[0] is grads[0]  # added in place into the kept array, as the book
    for a, e in zip(g, expect):
        np.testing.assert_allclose(a, e, rtol=1e-6)
    assert len(params) == 5  # the caller's lists are not touched


def test_trainer_dispatch():
    class Net:
        params = {}

    t1 = Trainer(Net(), np.zeros((10, 2)), np.zeros(10), np.zeros((5, 2)), np.zeros(5), verbose=False)
    t2 = Trainer(object(), optimizers.SGD())
    assert isinstance(t1, Book1Trainer) and isinstance(t1, Trainer)
    assert isinstance(t2, Book2Trainer) and isinstance(t2, Trainer)
    assert isinstance(Trainer(model=object(), optimizer=optimizers.SGD()), Book2Trainer)
    with pytest.raises(ValueError, match="unknown optimizer"):
        Trainer(Net(), np.zeros((10, 2)), np.zeros(10), np.zeros((5, 2)), np.zeros(5), optimizer="nope")


def test_book1_trainer_trains_two_layer_net():
    from fastbp.datasets import load_mnist
    from fastbp.nets import TwoLayerNet

    (x_train, t_train), (x_test, t_test) = load_mnist(source="sample")
    x_train, t_train, x_test, t_test = x_train[:1000], t_train[:1000], x_test[:300], t_test[:300]
    np.random.seed(0)
    net = TwoLayerNet(784, 30, 10)
    tr = Trainer(
        net,
        x_train,
        t_train,
        x_test,
        t_test,
        epochs=3,
        mini_batch_size=100,
        optimizer="Adam",
        optimizer_param={"lr": 0.01},
        verbose=False,
    )
    tr.train()
    assert tr.max_iter == 30 and len(tr.train_loss_list) == 30 and len(tr.test_acc_list) == 3
    assert tr.test_acc_list[-1] > 0.7
    assert tr.train_loss_list[-1] < tr.train_loss_list[0]


def _TinyRnnlm(V=12, D=5, H=6, seed=3):
    rng = np.random.default_rng(seed)
    E = (rng.standard_normal((V, D)) / 10).astype("f")
    Wx = (rng.standard_normal((D, 4 * H)) / 3).astype("f")
    Wh = (rng.standard_normal((H, 4 * H)) / 3).astype("f")
    W = (rng.standard_normal((H, V)) / 3).astype("f")
    return book2.Rnnlm(TL, E, Wx, Wh, np.zeros(4 * H, "f"), W, np.zeros(V, "f"))


def test_rnnlm_trainer_get_batch_matches_book_and_trains(capsys):
    corpus = np.tile(np.arange(12), 30)
    xs, ts = corpus[:-1], corpus[1:]
    tr = RnnlmTrainer(_TinyRnnlm(), optimizers.SGD(lr=1.0))
    tr.time_idx = 3
    bx, bt = tr.get_batch(xs, ts, 4, 5)
    # the book's double loop
    jump = len(xs) // 4
    ex, et = np.empty((4, 5), "i"), np.empty((4, 5), "i")
    for time in range(5):
        for i in range(4):
            ex[i, time] = xs[(i * jump + 3 + time) % len(xs)]
            et[i, time] = ts[(i * jump + 3 + time) % len(xs)]
    np.testing.assert_array_equal(bx, ex)
    np.testing.assert_array_equal(bt, et)
    assert bx.dtype == np.int32 and tr.time_idx == 8
    tr.fit(xs, ts, max_epoch=8, batch_size=4, time_size=5, max_grad=1.0, eval_interval=5)
    assert "perplexity" in capsys.readouterr().out
    assert tr.ppl_list[-1] < tr.ppl_list[0]
    model = tr.model
    model.reset_state()
    ppl = util.eval_perplexity(model, corpus, batch_size=4, time_size=5)
    assert 1.0 <= ppl < 12


def test_book2_trainer_fit(capsys):
    class Model:  # the book's two-layer net style: Affine -> SoftmaxWithLoss on lists
        def __init__(self):
            from fastbp.layers import Affine, SoftmaxWithLoss

            rng = np.random.default_rng(4)
            self.layers = [Affine((rng.standard_normal((2, 3)) * 0.1).astype("f"), np.zeros(3, "f"))]
            self.loss_layer = SoftmaxWithLoss()
            self.params = self.layers[0].params
            self.grads = self.layers[0].grads

        def forward(self, x, t):
            return self.loss_layer.forward(self.layers[0].forward(x), t)

        def backward(self, dout=1):
            self.layers[0].backward(self.loss_layer.backward(dout))

    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 2)).astype("f")
    t = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1)
    np.random.seed(0)
    tr = Trainer(Model(), optimizers.SGD(lr=1.0))
    tr.fit(x, t, max_epoch=10, batch_size=30, eval_interval=5, max_grad=5.0)
    assert "loss" in capsys.readouterr().out
    assert tr.current_epoch == 10 and len(tr.loss_list) == 20
    assert tr.loss_list[-1] < tr.loss_list[0]


def test_corpus_helpers_match_book():
    corpus, w2i, i2w = util.preprocess("You say goodbye and I say hello.")
    np.testing.assert_array_equal(corpus, [0, 1, 2, 3, 4, 1, 5, 6])
    assert i2w[6] == "." and w2i["say"] == 1
    ctx, tgt = util.create_contexts_target(corpus, window_size=1)
    np.testing.assert_array_equal(ctx[:2], [[0, 2], [1, 3]])
    np.testing.assert_array_equal(tgt, corpus[1:-1])
    co = util.create_co_matrix(corpus, 7)
    assert co[1, 0] == 1 and co[1, 2] == 1 and co[1, 4] == 1 and co[1, 5] == 1 and co.sum() == 14
    oh = util.convert_one_hot(ctx, 7)
    assert oh.shape == (6, 2, 7) and oh.sum() == 12 and oh[0, 1, 2] == 1


ADDITION = os.path.join(BOOK_DATA, "book2-addition.txt")


def _seq2seq_data(n):
    chars, qs, ans = {}, [], []
    with open(ADDITION) as f:
        for line in list(f)[:n]:
            q, a = line.rstrip("\n").split("_")
            qs.append(q)
            ans.append("_" + a)
    for s in qs + ans:
        for ch in s:
            chars.setdefault(ch, len(chars))
    x = np.array([[chars[c] for c in q] for q in qs])
    t = np.array([[chars[c] for c in a] for a in ans])
    return x, t, len(chars)


class _Seq2seq:
    """ch07/seq2seq.py's Encoder/Decoder/Seq2seq, written against a module of time layers."""

    def __init__(self, M, V, D, H, seed=0):
        rng = np.random.default_rng(seed)
        rn = rng.standard_normal
        self.enc = [
            M.TimeEmbedding((rn((V, D)) / 100).astype("f")),
            M.TimeLSTM(
                (rn((D, 4 * H)) / np.sqrt(D)).astype("f"),
                (rn((H, 4 * H)) / np.sqrt(H)).astype("f"),
                np.zeros(4 * H, "f"),
                stateful=False,
            ),
        ]
        self.dec = [
            M.TimeEmbedding((rn((V, D)) / 100).astype("f")),
            M.TimeLSTM(
                (rn((D, 4 * H)) / np.sqrt(D)).astype("f"),
                (rn((H, 4 * H)) / np.sqrt(H)).astype("f"),
                np.zeros(4 * H, "f"),
                stateful=True,
            ),
            M.TimeAffine((rn((H, V)) / np.sqrt(H)).astype("f"), np.zeros(V, "f")),
        ]
        self.loss_layer = M.TimeSoftmaxWithLoss()
        self.params, self.grads = [], []
        for layer in self.enc + self.dec:
            self.params += layer.params
            self.grads += layer.grads

    def forward(self, xs, ts):
        hs = self.enc[1].forward(self.enc[0].forward(xs))
        self.hs = hs
        h = hs[:, -1, :]
        self.dec[1].set_state(h)
        out = ts[:, :-1]
        for layer in self.dec:
            out = layer.forward(out)
        return self.loss_layer.forward(out, ts[:, 1:])

    def backward(self, dout=1):
        dout = self.loss_layer.backward(dout)
        for layer in reversed(self.dec):
            dout = layer.backward(dout)
        dh = self.dec[1].dh
        dhs = np.zeros_like(self.hs)
        dhs[:, -1, :] = dh
        self.enc[0].backward(self.enc[1].backward(dhs))


@pytest.mark.skipif(not __import__("os").path.exists(ADDITION), reason="book data not available")
def test_seq2seq_trains_like_reference_through_trainer(capsys):
    import fastbp.reference as REF

    x, t, V = _seq2seq_data(200)
    curves = []
    for M in (TL, REF):
        np.random.seed(1)
        tr = Trainer(_Seq2seq(M, V, 8, 16), optimizers.Adam())
        tr.fit(x, t, max_epoch=2, batch_size=32, max_grad=5.0, eval_interval=2)
        curves.append(tr.loss_list)
    capsys.readouterr()
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert curves[0][-1] < curves[0][0]
