"""Book 2's own models, transcribed as fixtures (ch06 Rnnlm / BetterRnnlm, ch07 Seq2seq / PeekySeq2seq, with the
book's remove_duplicate, clip_grads and SGD), run on fastbp.time_layers against fastbp.reference_time; the grads
lists the book collects stay the same arrays and are written in place (also with float64 upstream gradients into
float32 layers); stateful / set_state / reset_state semantics; upstream-gradient shapes checked on the step layers
and the sampler's targets checked; thread counts 1, 3, 16, 64 (same bits where no GEMM is involved)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbp.reference_time as REF
import fastbp.time_layers as TL
from fastbp import layers as FL
from fastbp import _book2 as book2
from fastbp import negative_sampling_layer as NS
from fastbp._book2 import BookModel as _Model
from fastbp._book2 import BookSGD, book_clip_grads

TOL = {np.float32: {"rtol": 3e-4, "atol": 3e-6}, np.float64: {"rtol": 1e-9, "atol": 1e-12}}
with_dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


# ---------------------------------------------------------------------------------------------------------------
# the book's glue: common/trainer.py remove_duplicate (clip_grads and SGD: fastbp._book2, shared with benchmarks)
# ---------------------------------------------------------------------------------------------------------------
def book_remove_duplicate(params, grads):
    params, grads = params[:], grads[:]
    while True:
        found = False
        L = len(params)
        for i in range(L - 1):
            for j in range(i + 1, L):
                if params[i] is params[j]:
                    grads[i] += grads[j]
                    found = True
                    params.pop(j)
                    grads.pop(j)
                elif (
                    params[i].ndim == 2
                    and params[j].ndim == 2
                    and params[i].T.shape == params[j].shape
                    and np.all(params[i].T == params[j])
                ):
                    grads[i] += grads[j].T
                    found = True
                    params.pop(j)
                    grads.pop(j)
                if found:
                    break
            if found:
                break
        if not found:
            break
    return params, grads


# ---------------------------------------------------------------------------------------------------------------
# the book's models, against a module M of layers, in dtype dt (the book: 'f')
# ---------------------------------------------------------------------------------------------------------------
class Rnnlm(book2.Rnnlm):
    def __init__(self, M, V, D, H, rng, dt="f"):
        rn = rng.standard_normal
        embed_W = (rn((V, D)) / 100).astype(dt)
        Wx, Wh, b = book2.lstm_init(rn, D, H, dt)
        W = (rn((H, V)) / np.sqrt(H)).astype(dt)
        super().__init__(M, embed_W, Wx, Wh, b, W, np.zeros(V).astype(dt))


class BetterRnnlm(book2.BetterRnnlm):
    def __init__(self, M, V, D, H, rng, dt="f", dropout_ratio=0.5):
        rn = rng.standard_normal
        embed_W = (rn((V, D)) / 100).astype(dt)
        W1 = book2.lstm_init(rn, D, H, dt)
        W2 = book2.lstm_init(rn, H, H, dt)
        super().__init__(M, embed_W, W1, W2, np.zeros(V).astype(dt), dropout_ratio)


class Encoder(_Model):
    def __init__(self, M, V, D, H, rng, dt="f"):
        rn = rng.standard_normal
        self.embed = M.TimeEmbedding((rn((V, D)) / 100).astype(dt))
        self.lstm = M.TimeLSTM(*book2.lstm_init(rn, D, H, dt), stateful=False)
        self.params = self.embed.params + self.lstm.params
        self.grads = self.embed.grads + self.lstm.grads
        self.hs = None

    def forward(self, xs):
        hs = self.lstm.forward(self.embed.forward(xs))
        self.hs = hs
        return hs[:, -1, :]

    def backward(self, dh):
        dhs = np.zeros_like(self.hs)
        dhs[:, -1, :] = dh
        dout = self.lstm.backward(dhs)
        return self.embed.backward(dout)


class Decoder(_Model):
    def __init__(self, M, V, D, H, rng, dt="f", peeky=False):
        rn = rng.standard_normal
        DI, HA = (H + D, H + H) if peeky else (D, H)
        self.peeky = peeky
        self.embed = M.TimeEmbedding((rn((V, D)) / 100).astype(dt))
        self.lstm = M.TimeLSTM(*book2.lstm_init(rn, DI, H, dt), stateful=True)
        self.affine = M.TimeAffine((rn((HA, V)) / np.sqrt(HA)).astype(dt), np.zeros(V).astype(dt))
        self._collect([self.embed, self.lstm, self.affine])
        self.cache = None

    def forward(self, xs, h):
        self.lstm.set_state(h)
        out = self.embed.forward(xs)
        if not self.peeky:
            return self.affine.forward(self.lstm.forward(out))
        N, T = xs.shape
        H = h.shape[1]
        hs = np.repeat(h, T, axis=0).reshape(N, T, H)
        out = self.lstm.forward(np.concatenate((hs, out), axis=2))
        self.cache = H
        return self.affine.forward(np.concatenate((hs, out), axis=2))

    def backward(self, dscore):
        dout = self.affine.backward(dscore)
        if not self.peeky:
            self.embed.backward(self.lstm.backward(dout))
            return self.lstm.dh
        H = self.cache
        dout, dhs0 = dout[:, :, H:], dout[:, :, :H]  # strided views, as the book passes them
        dout = self.lstm.backward(dout)
        dembed, dhs1 = dout[:, :, H:], dout[:, :, :H]
        self.embed.backward(dembed)
        return self.lstm.dh + np.sum(dhs0 + dhs1, axis=1)

    def generate(self, h, start_id, sample_size):
        sampled, sample_id = [], start_id
        self.lstm.set_state(h)
        H = h.shape[1]
        peeky_h = h.reshape(1, 1, H)
        for _ in range(sample_size):
            out = self.embed.forward(np.array(sample_id).reshape((1, 1)))
            if self.peeky:
                out = np.concatenate((peeky_h, out), axis=2)
            out = self.lstm.forward(out)
            if self.peeky:
                out = np.concatenate((peeky_h, out), axis=2)
            sample_id = int(np.argmax(self.affine.forward(out).flatten()))
            sampled.append(sample_id)
        return sampled


class Seq2seq(_Model):
    def __init__(self, M, V, D, H, rng, dt="f", peeky=False):
        self.encoder = Encoder(M, V, D, H, rng, dt)
        self.decoder = Decoder(M, V, D, H, rng, dt, peeky)
        self.softmax = M.TimeSoftmaxWithLoss()
        self.params = self.encoder.params + self.decoder.params
        self.grads = self.encoder.grads + self.decoder.grads

    def forward(self, xs, ts):
        h = self.encoder.forward(xs)
        score = self.decoder.forward(ts[:, :-1], h)
        return self.softmax.forward(score, ts[:, 1:])

    def backward(self, dout=1, upcast=False):
        dout = self.softmax.backward(dout)
        if upcast:  # mixed dtypes: float64 dout into float32 layers
            dout = dout.astype(np.float64)
        dh = self.decoder.backward(dout)
        if upcast:
            dh = dh.astype(np.float64)
        return self.encoder.backward(dh)

    def generate(self, xs, start_id, sample_size):
        return self.decoder.generate(self.encoder.forward(xs), start_id, sample_size)


# ---------------------------------------------------------------------------------------------------------------
# training the book's way: same losses as the reference layers, grads lists the same arrays written in place
# ---------------------------------------------------------------------------------------------------------------
def _train(model, batches, lr=0.5, max_norm=0.25, steps_hook=None, **bw):
    opt = BookSGD(lr)
    grads_before = list(model.grads)
    losses, snaps = [], []
    for xs, ts in batches:
        losses.append(float(model.forward(xs, ts)))
        model.backward(**bw)
        params, grads = book_remove_duplicate(model.params, model.grads)
        book_clip_grads(grads, max_norm)
        opt.update(params, grads)
        snaps.append([g.copy() for g in model.grads])
    assert len(model.grads) == len(grads_before)
    assert all(a is b for a, b in zip(model.grads, grads_before)), "a grads array was replaced"
    return np.array(losses), snaps


def _lm_batches(V, N, T, steps, seed):
    corpus = np.random.default_rng(seed).integers(0, V, N * T * steps + 1).astype(np.int32)
    out = []
    for s in range(steps):
        blk = corpus[s * N * T : (s + 1) * N * T + 1]
        out.append((blk[:-1].reshape(N, T), blk[1:].reshape(N, T)))
    return out


@with_dtypes
@pytest.mark.parametrize("kind", ["rnnlm", "better"])
def test_book_rnnlm_models_train_like_reference(kind, dtype):
    V, D, H = (30, 8, 12) if kind == "rnnlm" else (30, 12, 12)  # weight tying needs D == H
    batches = _lm_batches(V, 4, 5, 6, seed=1)
    runs = []
    for M in (TL, REF):
        cls = Rnnlm if kind == "rnnlm" else BetterRnnlm
        model = cls(M, V, D, H, np.random.default_rng(2), dt=dtype)
        assert all(p.dtype == dtype for p in model.params)
        np.random.seed(3)  # the book's dropout draws
        runs.append(_train(model, batches))
        assert all(g.dtype == dtype for g in model.grads)
    (lf, sf), (lr_, sr) = runs
    np.testing.assert_allclose(lf, lr_, **TOL[dtype])
    for a, b in zip(sf, sr):  # every step's gradients, in the book's list
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, **TOL[dtype])
    assert not np.array_equal(sf[0][0], sf[-1][0])  # the grads arrays do get new values each step


@with_dtypes
@pytest.mark.parametrize("peeky", [False, True], ids=["seq2seq", "peeky"])
def test_book_seq2seq_train_like_reference(peeky, dtype):
    V, D, H, N = 13, 6, 9, 5
    rng = np.random.default_rng(4)
    batches = [
        (rng.integers(0, V, (N, 7)).astype(np.int32), rng.integers(0, V, (N, 5)).astype(np.int32)) for _ in range(5)
    ]
    runs, gens = [], []
    for M in (TL, REF):
        model = Seq2seq(M, V, D, H, np.random.default_rng(5), dt=dtype, peeky=peeky)
        runs.append(_train(model, batches, lr=1.0, max_norm=5.0))
        gens.append(model.generate(batches[0][0][:1], 0, 6))
    np.testing.assert_allclose(runs[0][0], runs[1][0], **TOL[dtype])
    for a, b in zip(runs[0][1], runs[1][1]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, **TOL[dtype])
    assert gens[0] == gens[1]


@pytest.mark.parametrize("peeky", [False, True], ids=["seq2seq", "peeky"])
def test_float64_dout_into_float32_layers_written_in_place(peeky):
    """float64 upstream gradients (dscore, dh) into the float32 decoder/encoder: grads stay the book's float32
    arrays, written in place, with the float32 path's values."""
    V, D, H, N = 11, 5, 7, 4
    rng = np.random.default_rng(6)
    xs, ts = rng.integers(0, V, (N, 6)).astype(np.int32), rng.integers(0, V, (N, 4)).astype(np.int32)
    got = []
    for upcast in (False, True):
        model = Seq2seq(TL, V, D, H, np.random.default_rng(7), peeky=peeky)
        before = list(model.grads)
        model.forward(xs, ts)
        model.backward(upcast=upcast)
        assert all(a is b and a.dtype == np.float32 for a, b in zip(model.grads, before))
        got.append([g.copy() for g in model.grads])
    for a, b in zip(*got):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_stateful_semantics_like_the_book():
    """stateful=True carries h and c across forwards (two halves == the whole sequence); reset_state restarts from
    zeros; set_state(h) with c None starts c from zeros (the book's rule); stateful=False ignores the state."""
    rng = np.random.default_rng(8)
    D, H, N, T = 4, 6, 3, 8
    Wx, Wh = rng.standard_normal((D, 4 * H)).astype("f"), rng.standard_normal((H, 4 * H)).astype("f")
    b = rng.standard_normal(4 * H).astype("f")
    xs = rng.standard_normal((N, T, D)).astype("f")
    whole = TL.TimeLSTM(Wx, Wh, b, stateful=False).forward(xs).copy()
    s = TL.TimeLSTM(Wx, Wh, b, stateful=True)
    halves = np.concatenate([s.forward(xs[:, :3]).copy(), s.forward(xs[:, 3:]).copy()], axis=1)
    np.testing.assert_allclose(halves, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(s.h, whole[:, -1])
    s.reset_state()
    assert s.h is None and s.c is None
    np.testing.assert_array_equal(s.forward(xs), whole)
    h0 = rng.standard_normal((N, H)).astype("f")
    for M in (TL, REF):
        r = M.TimeLSTM(Wx, Wh, b, stateful=True)
        r.set_state(h0)
        out = r.forward(xs).copy()
        if M is TL:
            mine = out
    np.testing.assert_allclose(mine, out, rtol=1e-5, atol=1e-6)
    n = TL.TimeLSTM(Wx, Wh, b, stateful=False)
    n.set_state(h0)
    np.testing.assert_array_equal(n.forward(xs), whole)  # not stateful: the state set is not read


# ---------------------------------------------------------------------------------------------------------------
# upstream gradients and sampler targets are checked (these broadcast or went through unchecked before)
# ---------------------------------------------------------------------------------------------------------------
def test_step_layers_check_upstream_gradient_shapes():
    rng = np.random.default_rng(9)
    N, D, H = 2, 3, 4
    x = rng.standard_normal((N, D)).astype("f")
    h = np.zeros((N, H), "f")
    lstm = TL.LSTM(
        rng.standard_normal((D, 4 * H)).astype("f"), rng.standard_normal((H, 4 * H)).astype("f"), np.zeros(4 * H, "f")
    )
    lstm.forward(x, h, h)
    with pytest.raises(ValueError, match=r"dc_next must have shape \(2, 4\).*got \(2, 1\)"):
        lstm.backward(np.ones((N, H), "f"), np.ones((N, 1), "f"))  # used to broadcast silently
    with pytest.raises(ValueError, match=r"dh_next must have shape \(2, 4\).*got \(2, 5\)"):
        lstm.backward(np.ones((N, H + 1), "f"), np.ones((N, H), "f"))
    dx, _, dc = lstm.backward(np.ones((N, H)), np.ones((N, H)))  # float64 upstream into float32 layer
    assert dx.shape == (N, D) and dc.shape == (N, H)
    rnn = TL.RNN(rng.standard_normal((D, H)).astype("f"), rng.standard_normal((H, H)).astype("f"), np.zeros(H, "f"))
    rnn.forward(x, h)
    with pytest.raises(ValueError, match=r"dh_next must have shape \(2, 4\).*got \(4,\)"):
        rnn.backward(np.ones(H, "f"))  # was a bare numpy IndexError
    gru = TL.GRU(rng.standard_normal((D, 3 * H)).astype("f"), rng.standard_normal((H, 3 * H)).astype("f"))
    gru.forward(x, h)
    with pytest.raises(ValueError, match=r"dh_next must have shape"):
        gru.backward(np.ones((1, H), "f"))
    sm = FL.Softmax()
    sm.forward(rng.standard_normal((N, 5)))
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 5\), got \(2, 1\)"):
        sm.backward(np.ones((N, 1)))  # used to broadcast into a wrong dx


def test_loss_layers_take_scalar_dout_and_dropout_checks_shape():
    """An array dout used to broadcast into a wrong gradient (or a bare numpy error)."""
    rng = np.random.default_rng(10)
    s = FL.SigmoidWithLoss()
    s.forward(rng.standard_normal(4), np.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"scalar dout, got shape \(4,\)"):
        s.backward(np.ones(4))
    assert s.backward(np.float32(2)).shape == (4,)
    ts = TL.TimeSigmoidWithLoss()
    ts.forward(rng.standard_normal((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"scalar dout, got shape \(2, 1\)"):
        ts.backward(np.ones((2, 1)))
    d = TL.TimeDropout(0.5)
    d.forward(np.ones((2, 3, 4), "f"))
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 4\), got \(2, 3, 1\)"):
        d.backward(np.ones((2, 3, 1), "f"))
    corpus = np.arange(8, dtype=np.int32)
    ns = NS.NegativeSamplingLoss(rng.standard_normal((8, 3)).astype("f"), corpus, 0.75, 2)
    ns.forward(np.ones((2, 3), "f"), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"scalar dout, got shape \(2,\)"):
        ns.backward(np.ones(2))


@with_dtypes
def test_softmax_loss_in_range_ignore_label(dtype):
    """The book masks ts == ignore_label whatever its value: an ignore_label inside [0, V) was not honoured (the
    positions were only looked at when some label was outside [0, V))."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 6)).astype(dtype)
    t = np.array([[0, 5, 1], [5, 2, 3]], np.int32)
    got = []
    for M in (TL, REF):
        s = M.TimeSoftmaxWithLoss()
        s.ignore_label = 5
        got.append((s.forward(x, t), np.array(s.backward())))
    np.testing.assert_allclose(got[0][0], got[1][0], **TOL[dtype])
    np.testing.assert_allclose(got[0][1], got[1][1], **TOL[dtype])
    assert not got[0][1][0, 1].any() and not got[0][1][1, 0].any()


def test_softmax_loss_unsigned_labels_checked_before_cast():
    """A uint64 label 2**64-1 used to wrap to -1 in the int64 cast and be silently ignored as book 2's -1."""
    sm = TL.TimeSoftmaxWithLoss()
    x = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(IndexError, match=r"label 18446744073709551615 is out of range for 4 classes"):
        sm.forward(x, np.array([[0, 2**64 - 1]], np.uint64))
    with pytest.raises(IndexError, match=r"label 4 is out of range"):
        sm.forward(x, np.array([[0, 4]], np.uint8))
    assert sm.forward(x, np.array([[0, 3]], np.uint64)) == pytest.approx(np.log(4))


def test_sampler_checks_targets():
    corpus = np.array([0, 1, 2, 3, 4, 5, 1, 2, 3], np.int32)
    s = NS.UnigramSampler(corpus, 0.75, 2)
    with pytest.raises(IndexError, match=r"target 6 is out of range.*0 \.\. 5"):
        s.get_negative_sample(np.array([0, 6]))  # used to return samples
    with pytest.raises(IndexError, match=r"target -1 is out of range"):
        s.get_negative_sample(np.array([-1, 2]))
    with pytest.raises(TypeError, match="integer"):
        s.get_negative_sample(np.array([0.0, 1.0]))
    W = np.zeros((6, 3), "f")
    with pytest.raises(IndexError, match="target 9"):
        NS.NegativeSamplingLoss(W, corpus, 0.75, 2).forward(np.zeros((2, 3), "f"), np.array([1, 9]))


# ---------------------------------------------------------------------------------------------------------------
# thread count: the same bits for 1, 3, 16, 64 threads (subprocesses: FASTBP_NUM_THREADS is read at import)
# ---------------------------------------------------------------------------------------------------------------
_CHILD = r"""
import json, sys, numpy as np
sys.path.insert(0, sys.argv[1])
import fastbp.time_layers as TL
from fastbp import negative_sampling_layer as NS
sys.path.insert(0, sys.argv[2])
import test_book2_models as B
out = {}
for dt in ("f", "d"):
    m = B.BetterRnnlm(TL, 300, 64, 64, np.random.default_rng(1), dt=dt, dropout_ratio=0.3)
    np.random.seed(2)
    losses, snaps = B._train(m, B._lm_batches(300, 8, 16, 2, seed=3))
    out[dt] = [losses.tolist()] + [float(np.sum(g, dtype=np.float64)) for g in snaps[-1]] + \
              [np.asarray(g, np.float64).ravel()[::97].tolist() for g in snaps[-1]]
np.random.seed(4)
corpus = np.random.randint(0, 200, 5000).astype(np.int32)
W = (np.random.randn(200, 50) * 0.1).astype("f")
ns = NS.NegativeSamplingLoss(W, corpus, 0.75, 5)
h = np.random.randn(100, 50).astype("f")
out["ns"] = [ns.forward(h, corpus[:100]), ns.backward().ravel()[::7].tolist()] + \
            [g.ravel()[::31].tolist() for g in ns.grads]
print(json.dumps(out))
"""


def test_same_bits_for_any_thread_count():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    res = {}
    for n in (1, 3, 16, 64):
        env = dict(os.environ, FASTBP_NUM_THREADS=str(n))
        p = subprocess.run(
            [sys.executable, "-c", _CHILD, root, here],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        res[n] = json.loads(p.stdout.strip().splitlines()[-1])
    for n in (3, 16, 64):
        # negative sampling (fastbp._embedding's gather-dot and deterministic scatter, NumPy's draws): same bits
        assert res[n]["ns"] == res[1]["ns"], f"negative sampling: {n} threads differ from 1 thread"
        # the models: GEMM pieces of fastbp._gemm differ by thread count (K splits summed per thread, and
        # OpenBLAS's small-matrix kernels on narrow N/M pieces round differently), so rounding apart only
        for key, tol in (("f", {"rtol": 2e-5, "atol": 1e-6}), ("d", {"rtol": 1e-11, "atol": 1e-13})):
            for a, b in zip(res[n][key], res[1][key]):
                np.testing.assert_allclose(a, b, **tol, err_msg=f"{key}: {n} threads vs 1")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_recurrent_loop_small_steps_same_bits_any_threads(dtype):
    """The Rnnlm's per-step products (20 x 100 x 400, below fastbp._recurrent's SERIAL_MNK) run as one BLAS call
    on the calling thread: the time loops give the same bits for 1, 3, 16, 64 threads (they were split over the
    threads, and at 16 threads came out differently rounded)."""
    from test_time_layers import _threads_set

    from fastbp import _recurrent as _rec

    rng = np.random.default_rng(11)
    N, T, H = 20, 6, 100
    assert N * 4 * H * H < _rec._serial_mnk()
    A0 = rng.standard_normal((N, T, 4 * H)).astype(dtype)
    Wh = (rng.standard_normal((H, 4 * H)) / 10).astype(dtype)
    h0, c0 = rng.standard_normal((N, H)).astype(dtype), rng.standard_normal((N, H)).astype(dtype)
    dhs = rng.standard_normal((N, T, H)).astype(dtype)
    outs = {}
    for n in (1, 3, 16, 64):
        with _threads_set(n):
            A, hs, cs = A0.copy(), np.empty((N, T, H), dtype), np.empty((N, T, H), dtype)
            _rec.lstm_forward(A, Wh, h0, c0, hs, cs)
            dh, dc, dA = np.zeros((N, H), dtype), np.zeros((N, H), dtype), np.empty((N, T, 4 * H), dtype)
            _rec.lstm_backward(dhs, A, cs, c0, Wh, dh, dc, dA)
            R = A0[..., :H].copy()
            hr = np.empty((N, T, H), dtype)
            _rec.rnn_forward(R, Wh[:, :H].copy(), h0, hr)
            outs[n] = (hs, cs, dh, dc, dA, hr)
    for n in (3, 16, 64):
        for a, b in zip(outs[n], outs[1]):
            np.testing.assert_array_equal(a, b, err_msg=f"{n} threads vs 1")
