"""Book 2's time layers (fastbp.time_layers, Cython time loops) against numerical derivatives (float64), against
their NumPy twins (fastbp.reference_time) in float32/float64, against PyTorch's LSTM (gates reordered) where it is
installed, and on the book's trained Rnnlm pickle."""

import os
import pickle

import numpy as np
import pytest

import fastbp.layers as FL
import fastbp.reference as REF
import fastbp.time_layers as TL
from fastbp import _book2 as book2
from fastbp import _embedding as _emb
from fastbp_tests import BOOK_DATA, num_grad

DTYPES = [np.float32, np.float64]
with_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
MODULES = [pytest.param(TL, id="fastbp"), pytest.param(REF, id="reference")]
with_modules = pytest.mark.parametrize("M", MODULES)
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}
PICKLE = os.path.join(BOOK_DATA, "book2-ch06-Rnnlm.pkl")


class _threads_set:
    """Context: fastbp's thread count (elementwise/block kernels and GEMMs) set to n, restored after."""

    def __init__(self, n):
        from fastbp import _blas, _threads

        self.n, self._t, self._b = n, _threads, _blas

    def __enter__(self):
        self.old = (self._t._get_num_threads(), self._b.get_num_threads())
        self._t._set_num_threads(self.n)
        self._b.set_num_threads(self.n)

    def __exit__(self, *exc):
        self._t._set_num_threads(self.old[0])
        self._b.set_num_threads(self.old[1])


def _rng(seed=0):
    return np.random.default_rng(seed)


def _num_grad(f, x, h=1e-5):
    return num_grad(f, x, h)


def _assert_grad(analytic, numeric, tol=1e-6):
    scale = max(np.abs(numeric).max(), 1e-3)
    err = np.abs(np.asarray(analytic, np.float64) - numeric).max() / scale
    assert err < tol, f"max relative error {err:.3g}"


def _recurrent(M, kind, D, H, dtype, rng, stateful=False):
    G = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    Wx = (rng.standard_normal((D, G * H)) * 0.5).astype(dtype)
    Wh = (rng.standard_normal((H, G * H)) * 0.5).astype(dtype)
    b = (rng.standard_normal(G * H) * 0.5).astype(dtype)
    if kind == "rnn":
        return M.TimeRNN(Wx, Wh, b, stateful=stateful)
    if kind == "lstm":
        return M.TimeLSTM(Wx, Wh, b, stateful=stateful)
    return M.TimeGRU(Wx, Wh, stateful=stateful)


# ---------------------------------------------------------------------------------------------------------------
# numerical gradients (float64), every parameter and the input, several time steps
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("stateful", [False, True])
@with_modules
def test_recurrent_gradients(M, kind, stateful):
    rng = _rng(1)
    N, T, D, H = 2, 4, 3, 3
    layer = _recurrent(M, kind, D, H, np.float64, rng, stateful)
    xs = rng.standard_normal((N, T, D))
    R = rng.standard_normal((N, T, H))
    h_init = rng.standard_normal((N, H)) * 0.5
    c_init = rng.standard_normal((N, H)) * 0.5

    def loss():
        if stateful:
            if kind == "lstm":
                layer.set_state(h_init.copy(), c_init.copy())
            else:
                layer.set_state(h_init.copy())
        return float(np.sum(layer.forward(xs) * R))

    loss()
    dxs = layer.backward(R)
    grads = [g.copy() for g in layer.grads]
    dh = np.array(layer.dh)
    for p, g in zip(layer.params, grads):
        _assert_grad(g, _num_grad(loss, p))
    _assert_grad(dxs, _num_grad(loss, xs))
    if stateful:
        _assert_grad(dh, _num_grad(loss, h_init))


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_single_step_gradients(kind):
    rng = _rng(2)
    N, D, H = 3, 4, 2
    G = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    Wx = rng.standard_normal((D, G * H))
    Wh = rng.standard_normal((H, G * H))
    b = rng.standard_normal(G * H)
    x = rng.standard_normal((N, D))
    h = rng.standard_normal((N, H))
    c = rng.standard_normal((N, H))
    Rh, Rc = rng.standard_normal((N, H)), rng.standard_normal((N, H))
    for M in (TL, REF):
        layer = {"rnn": lambda: M.RNN(Wx, Wh, b), "lstm": lambda: M.LSTM(Wx, Wh, b), "gru": lambda: M.GRU(Wx, Wh)}[
            kind
        ]()

        def loss():
            if kind == "lstm":
                hn, cn = layer.forward(x, h, c)
                return float(np.sum(hn * Rh) + np.sum(cn * Rc))
            return float(np.sum(layer.forward(x, h) * Rh))

        loss()
        out = layer.backward(Rh, Rc) if kind == "lstm" else layer.backward(Rh)
        _assert_grad(out[0], _num_grad(loss, x))
        _assert_grad(out[1], _num_grad(loss, h))
        if kind == "lstm":
            _assert_grad(out[2], _num_grad(loss, c))
        grads = [g.copy() for g in layer.grads]
        for p, g in zip(layer.params, grads):
            _assert_grad(g, _num_grad(loss, p))


@with_modules
def test_time_affine_embedding_softmax_gradients(M):
    rng = _rng(3)
    N, T, V, D = 2, 3, 7, 4
    E = rng.standard_normal((V, D))
    W = rng.standard_normal((V, D))  # tied: TimeAffine(W.T, b)
    b = rng.standard_normal(V)
    xs = rng.integers(0, V, (N, T))
    xs[0, 0] = xs[1, 2]  # duplicate indices
    ts = rng.integers(0, V, (N, T))
    ts[1, 1] = -1  # ignored position
    emb, aff, sm = M.TimeEmbedding(E), M.TimeAffine(W.T, b), M.TimeSoftmaxWithLoss()

    def loss():
        return float(sm.forward(aff.forward(emb.forward(xs)), ts))

    loss()
    d = sm.backward(1)
    assert np.all(d[1, 1] == 0)
    emb.backward(aff.backward(d))
    assert aff.grads[0].shape == W.T.shape
    dE, dWT, db = emb.grads[0].copy(), aff.grads[0].copy(), aff.grads[1].copy()
    _assert_grad(dE, _num_grad(loss, E))
    _assert_grad(dWT, _num_grad(loss, W).T)
    _assert_grad(db, _num_grad(loss, b))


@with_modules
def test_softmax_loss_dout_and_all_ignored(M):
    rng = _rng(4)
    xs = rng.standard_normal((2, 3, 5))
    ts = rng.integers(0, 5, (2, 3))
    sm = M.TimeSoftmaxWithLoss()
    sm.forward(xs, ts)
    g1 = np.array(sm.backward(1))
    g3 = np.array(sm.backward(3.0))
    np.testing.assert_allclose(g3, 3 * g1, rtol=1e-12)
    if M is TL:
        assert sm.forward(xs, np.full((2, 3), -1)) == 0.0
        assert not np.any(sm.backward())


# ---------------------------------------------------------------------------------------------------------------
# fastbp vs the NumPy twins, float32 and float64
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@with_dtypes
def test_recurrent_matches_reference(kind, dtype):
    N, T, D, H = 5, 7, 6, 8
    a = _recurrent(TL, kind, D, H, dtype, _rng(5), stateful=True)
    r = _recurrent(REF, kind, D, H, dtype, _rng(5), stateful=True)
    rng = _rng(6)
    grads_a = a.grads
    for _ in range(3):  # stateful: h (and c) carried over
        xs = rng.standard_normal((N, T, D)).astype(dtype)
        dhs = rng.standard_normal((N, T, H)).astype(dtype)
        ha, hr = a.forward(xs), r.forward(xs)
        assert ha.dtype == dtype
        np.testing.assert_allclose(ha, hr, **TOL[dtype])
        np.testing.assert_allclose(a.h, r.h, **TOL[dtype])
        if kind == "lstm":
            np.testing.assert_allclose(a.c, r.c, **TOL[dtype])
        np.testing.assert_allclose(a.backward(dhs), r.backward(dhs), **TOL[dtype])
        np.testing.assert_allclose(a.dh, r.dh, **TOL[dtype])
        for ga, gr in zip(a.grads, r.grads):
            np.testing.assert_allclose(ga, gr, **TOL[dtype])
    assert all(x is y for x, y in zip(a.grads, grads_a))  # grads written in place, never replaced
    a.reset_state()
    assert a.h is None


def test_params_held_by_reference_and_seen_in_place():
    rng = _rng(7)
    layer = _recurrent(TL, "lstm", 3, 4, np.float32, rng)
    ref = REF.TimeLSTM(*layer.params)
    xs = rng.standard_normal((2, 3, 3)).astype(np.float32)
    layer.forward(xs)
    for p in layer.params:
        p *= 0.5  # the book's in-place SGD update
    np.testing.assert_allclose(layer.forward(xs), ref.forward(xs), rtol=1e-5, atol=1e-6)
    assert ref.params[0] is layer.params[0]


@with_dtypes
def test_bilstm_and_dropout(dtype):
    rng = _rng(8)
    N, T, D, H = 3, 4, 5, 6
    ps = [(rng.standard_normal(s) * 0.3).astype(dtype) for s in [(D, 4 * H), (H, 4 * H), (4 * H,)] * 2]
    a, r = TL.TimeBiLSTM(*ps), REF.TimeBiLSTM(*ps)
    xs = rng.standard_normal((N, T, D)).astype(dtype)
    d = rng.standard_normal((N, T, 2 * H)).astype(dtype)
    np.testing.assert_allclose(a.forward(xs), r.forward(xs), **TOL[dtype])
    np.testing.assert_allclose(a.backward(d), r.backward(d), **TOL[dtype])
    for ga, gr in zip(a.grads, r.grads):
        np.testing.assert_allclose(ga, gr, **TOL[dtype])
    da, dr = TL.TimeDropout(0.3), REF.TimeDropout(0.3)
    np.random.seed(3)
    ya = da.forward(xs)
    np.random.seed(3)
    yr = dr.forward(xs)
    np.testing.assert_array_equal(ya, yr)
    np.testing.assert_array_equal(da.backward(d[..., :D]), dr.backward(d[..., :D]))
    da.train_flg = False
    assert da.forward(xs) is xs


@with_dtypes
def test_time_sigmoid_with_loss(dtype):
    rng = _rng(9)
    xs = rng.standard_normal((4, 3)).astype(dtype) * 3
    ts = rng.integers(0, 2, (4, 3))
    a, r = TL.TimeSigmoidWithLoss(), REF.TimeSigmoidWithLoss()
    np.testing.assert_allclose(a.forward(xs, ts), r.forward(xs, ts), **TOL[dtype])
    np.testing.assert_allclose(a.backward(), r.backward(), **TOL[dtype])
    x64 = xs.astype(np.float64)
    layer = TL.TimeSigmoidWithLoss()
    layer.forward(x64, ts)
    _assert_grad(layer.backward(), _num_grad(lambda: TL.TimeSigmoidWithLoss().forward(x64, ts), x64))


# ---------------------------------------------------------------------------------------------------------------
# the book's Rnnlm, trained weights from the book's pickle; a model built the book's way trains identically
# ---------------------------------------------------------------------------------------------------------------
def _Rnnlm(M, params):
    """ch06/rnnlm.py's Rnnlm (fastbp._book2), written against a module of layers, from weights (E, Wx, Wh, b, W, bb)."""
    return book2.Rnnlm(M, *params)


@pytest.mark.skipif(not os.path.exists(PICKLE), reason="book pickle not available")
def test_book_rnnlm_pickle_same_outputs():
    with open(PICKLE, "rb") as f:
        params = [p.astype("f") for p in pickle.load(f)]  # the book's load_params
    rng = _rng(10)
    xs = rng.integers(0, 10000, (4, 12)).astype(np.int32)
    ts = np.roll(xs, -1, axis=1)
    a, r = _Rnnlm(TL, [p.copy() for p in params]), _Rnnlm(REF, [p.copy() for p in params])
    for _ in range(2):  # stateful: the second batch continues the first
        la, lr = a.forward(xs, ts), r.forward(xs, ts)
        assert abs(la - lr) < 1e-5 * abs(lr)
        np.testing.assert_allclose(a.lstm_layer.h, r.lstm_layer.h, rtol=1e-4, atol=1e-5)
        a.backward()
        r.backward()
        for ga, gr in zip(a.grads, r.grads):
            np.testing.assert_allclose(ga, gr, rtol=1e-3, atol=1e-6 * max(1.0, np.abs(gr).max()))
    scores = a.predict(xs)
    np.testing.assert_allclose(scores, r.predict(xs), rtol=1e-4, atol=1e-4)


def test_model_trains_like_reference():
    """A small Rnnlm built the book's way (params += layer.params), SGD with clip_grads: the same loss curve."""
    from fastbp.util import clip_grads

    rng = _rng(11)
    V, D, H = 30, 8, 10
    init = [
        rng.standard_normal((V, D)).astype("f") / 10,
        (rng.standard_normal((D, 4 * H)) / 3).astype("f"),
        (rng.standard_normal((H, 4 * H)) / 3).astype("f"),
        np.zeros(4 * H, "f"),
        (rng.standard_normal((H, V)) / 3).astype("f"),
        np.zeros(V, "f"),
    ]
    corpus = rng.integers(0, V, 400).astype(np.int32)
    curves = []
    for M in (TL, REF):
        model = _Rnnlm(M, [p.copy() for p in init])
        losses = []
        for it in range(15):
            off = (it * 5) % 300
            xs = np.stack([corpus[off + 40 * i : off + 40 * i + 5] for i in range(4)])
            ts = np.stack([corpus[off + 40 * i + 1 : off + 40 * i + 6] for i in range(4)])
            losses.append(model.forward(xs, ts))
            model.backward()
            clip_grads(model.grads, 0.5)
            for p, g in zip(model.params, model.grads):
                p -= 0.5 * g
        curves.append(losses)
    np.testing.assert_allclose(curves[0], curves[1], rtol=2e-4)
    assert curves[0][-1] < curves[0][0]


# ---------------------------------------------------------------------------------------------------------------
# PyTorch's LSTM with the gates reordered (torch: i, f, g, o; the book: f, g, i, o)
# ---------------------------------------------------------------------------------------------------------------
def test_lstm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = _rng(12)
    N, T, D, H = 3, 5, 4, 6
    Wx = rng.standard_normal((D, 4 * H)) * 0.4
    Wh = rng.standard_normal((H, 4 * H)) * 0.4
    b = rng.standard_normal(4 * H) * 0.4
    xs = rng.standard_normal((N, T, D))
    dhs = rng.standard_normal((N, T, H))
    layer = TL.TimeLSTM(Wx, Wh, b)
    hs = layer.forward(xs)
    dxs = layer.backward(dhs)
    order = np.concatenate([np.arange(2 * H, 3 * H), np.arange(0, H), np.arange(H, 2 * H), np.arange(3 * H, 4 * H)])
    lstm = torch.nn.LSTM(D, H, batch_first=True).double()
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(Wx[:, order].T.copy()))
        lstm.weight_hh_l0.copy_(torch.from_numpy(Wh[:, order].T.copy()))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b[order].copy()))
        lstm.bias_hh_l0.zero_()
    x = torch.from_numpy(xs).requires_grad_()
    out, _ = lstm(x)
    out.backward(torch.from_numpy(dhs))
    np.testing.assert_allclose(hs, out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dxs, x.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads[0][:, order].T, lstm.weight_ih_l0.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.grads[1][:, order].T, lstm.weight_hh_l0.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.grads[2][order], lstm.bias_ih_l0.grad.numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Embedding kernels: determinism across thread counts, duplicates, bad input
# ---------------------------------------------------------------------------------------------------------------
@with_dtypes
def test_scatter_add_deterministic_across_threads(dtype):
    rng = _rng(13)
    V, D, n = 40000, 110, 5000  # (V + n) * D above the kernel's parallel threshold
    idx = rng.integers(0, 20, n).astype(np.int32)  # heavy duplication
    idx[::7] = rng.integers(0, V, idx[::7].size)
    src = rng.standard_normal((n, D)).astype(dtype)
    results = []
    for nt in (1, 3, 16, 64):
        with _threads_set(nt):
            dW = np.full((V, D), 7, dtype)
            _emb.scatter_add(src, idx, dW)
        results.append(dW)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    ref = np.zeros((V, D), np.float64)
    np.add.at(ref, idx, src.astype(np.float64))
    np.testing.assert_allclose(results[0], ref, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-5)


@with_dtypes
def test_embedding_layer_matches_reference(dtype):
    rng = _rng(14)
    W = rng.standard_normal((40, 6)).astype(dtype)
    idx = rng.integers(0, 40, (5, 3))
    a, r = FL.Embedding(W), REF.Embedding(W)
    np.testing.assert_array_equal(a.forward(idx), r.forward(idx))
    d = rng.standard_normal((5, 3, 6)).astype(dtype)
    g = a.grads[0]
    a.backward(d)
    r.backward(d)
    assert a.grads[0] is g
    np.testing.assert_allclose(a.grads[0], r.grads[0], **TOL[dtype])
    col = rng.integers(0, 40, (8, 4)).astype(np.int32)[:, 1]  # a strided column, as the book's CBOW passes
    np.testing.assert_array_equal(a.forward(col), W[col])


def test_bad_input_raises():
    W = np.zeros((10, 3), np.float32)
    with pytest.raises(IndexError, match="out of range"):
        FL.Embedding(W).forward(np.array([1, 10]))
    with pytest.raises(IndexError, match="out of range"):
        TL.TimeEmbedding(W).forward(np.array([[1, -1]]))
    sm = TL.TimeSoftmaxWithLoss()
    with pytest.raises(IndexError, match="ignore"):
        sm.forward(np.zeros((1, 2, 4), np.float32), np.array([[0, 4]]))
    with pytest.raises(IndexError):
        sm.forward(np.zeros((1, 2, 4), np.float32), np.array([[0, -2]]))
    layer = _recurrent(TL, "lstm", 3, 4, np.float32, _rng(15), stateful=True)
    with pytest.raises(RuntimeError, match="before"):
        layer.backward(np.zeros((2, 3, 4), np.float32))
    layer.set_state(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        layer.forward(np.zeros((2, 3, 3), np.float32))
    layer.reset_state()
    layer.forward(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="dhs"):
        layer.backward(np.zeros((2, 3, 5), np.float32))
    for bad in (TL.TimeAffine(np.zeros((3, 2)), np.zeros(2)), TL.TimeEmbedding(W)):
        with pytest.raises(RuntimeError, match="before"):
            bad.backward(np.zeros((1, 1, 2)))


def test_recurrent_large_steps_over_threads():
    """Per-step GEMMs large enough to be split over threads (fastbp._gemm): the same bits when repeated with one
    thread count, float32 rounding apart across thread counts."""
    from fastbp import _recurrent as _rec

    rng = _rng(16)
    N, T, H = 20, 3, 100
    A0 = rng.standard_normal((N, T, 4 * H)).astype(np.float32)
    Wh = (rng.standard_normal((H, 4 * H)) * 0.1).astype(np.float32)
    h0, c0 = rng.standard_normal((2, N, H)).astype(np.float32)
    dhs = rng.standard_normal((N, T, H)).astype(np.float32)
    results = []
    for nt in (1, 3, 16, 64):
        with _threads_set(nt):
            A = A0.copy()
            hs, cs = np.empty((N, T, H), np.float32), np.empty((N, T, H), np.float32)
            _rec.lstm_forward(A, Wh, h0, c0, hs, cs)
            dh, dc = np.zeros((N, H), np.float32), np.zeros((N, H), np.float32)
            dA = np.empty_like(A)
            _rec.lstm_backward(dhs, A, cs, c0, Wh, dh, dc, dA)
        results.append((hs, dA, dh, dc))
        if nt == 3:
            with _threads_set(nt):
                A = A0.copy()
                hs2 = np.empty_like(hs)
                _rec.lstm_forward(A, Wh, h0, c0, hs2, np.empty_like(cs))
            np.testing.assert_array_equal(hs2, hs)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    ref = REF.TimeLSTM(np.zeros((1, 4 * H), np.float32), Wh, np.zeros(4 * H, np.float32), stateful=True)
    ref.set_state(h0, c0)
    # the reference with xs @ Wx + b = A0: feed one-hot-free identity by using A0 as inputs through Wx = I
    ref.params[0] = np.eye(4 * H, dtype=np.float32)
    ref.grads[0] = np.zeros((4 * H, 4 * H), np.float32)
    np.testing.assert_allclose(ref.forward(A0), results[0][0], **TOL[np.float32])


def _rnnlm_step_peak(V, D, H, N, T):
    import gc
    import tracemalloc
    from fastbp.optimizers import SGD
    from fastbp.trainer import remove_duplicate
    from fastbp.util import clip_grads

    rng = _rng(18)
    init = [(rng.standard_normal(s) / 10).astype("f") for s in [(V, D), (D, 4 * H), (H, 4 * H), (4 * H,), (H, V), (V,)]]
    model = _Rnnlm(TL, init)
    for layer in model.layers + [model.loss_layer]:
        layer.reuse = True
    opt = SGD(0.1)
    xs = rng.integers(0, V, (N, T)).astype(np.int32)
    ts = rng.integers(0, V, (N, T)).astype(np.int32)

    def step():
        model.forward(xs, ts)
        model.backward()
        params, grads = remove_duplicate(model.params, model.grads)
        clip_grads(grads, 0.25)
        opt.update(params, grads)

    for _ in range(3):
        step()
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        step()
        tracemalloc.reset_peak()
        cur0, _ = tracemalloc.get_traced_memory()
        for _ in range(2):
            step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    return peak - cur0


def test_rnnlm_step_with_reuse_allocates_no_arrays():
    """With reuse=True a training step's NumPy allocations do not grow with the model: a 4x larger model has the
    same (small, Python-object) peak."""
    small = _rnnlm_step_peak(40, 8, 8, 4, 5)
    big = _rnnlm_step_peak(160, 32, 32, 8, 10)
    assert small < 8192, f"a step allocated {small} bytes"
    assert abs(big - small) <= 512, f"step peak {small} B (small model) vs {big} B (4x model)"


def _BetterRnnlm(M, V, H, seed):
    """ch06/better_rnnlm.py's structure (fastbp._book2): two LSTMs, dropout, weight tying (TimeAffine(E.T, b))."""
    rn = _rng(seed).standard_normal
    E = (rn((V, H)) / 10).astype("f")

    def lstm():
        return (
            (rn((H, 4 * H)) / 3).astype("f"),
            (rn((H, 4 * H)) / 3).astype("f"),
            np.zeros(4 * H, "f"),
        )

    lstm1 = lstm()
    return book2.BetterRnnlm(M, E, lstm1, lstm(), np.zeros(V, "f"), dropout_ratio=0.3)


def test_better_rnnlm_tied_dropout_trains_like_reference():
    from fastbp.optimizers import SGD
    from fastbp.trainer import remove_duplicate
    from fastbp.util import clip_grads

    V, H = 25, 12
    corpus = _rng(20).integers(0, V, 300).astype(np.int32)
    curves = []
    for M in (TL, REF):
        model = _BetterRnnlm(M, V, H, seed=21)
        opt = SGD(1.0)
        np.random.seed(22)  # the dropout masks: the book's np.random.rand draws
        losses = []
        for it in range(8):
            xs = corpus[it * 24 : it * 24 + 24].reshape(4, 6)
            ts = corpus[it * 24 + 1 : it * 24 + 25].reshape(4, 6)
            losses.append(model.forward(xs, ts))
            model.backward()
            params, grads = remove_duplicate(model.params, model.grads)
            assert len(params) == len(model.params) - 1  # the tied W.T merged into the embedding
            clip_grads(grads, 1.0)
            opt.update(params, grads)
        curves.append(losses)
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert curves[0][-1] < curves[0][0]
