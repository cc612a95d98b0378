"""Book 2 benchmarks (pytest-benchmark groups, float32): Embedding backward, TimeLSTM forward+backward and
TimeSoftmaxWithLoss at the sizes of the book's Rnnlm (batch 20, time 35, vocab 10000, hidden 100), with
fastbp / fastbp-reuse / numpy (fastbp.reference_time) / torch side by side.  Each implementation's result is
checked against the NumPy twin once before it is timed.  The whole-model table is benchmarks/rnn_compare.py."""

import numpy as np
import pytest

IMPLS = ["fastbp", "fastbp-reuse", "numpy", "torch"]
N, T, V, D, H = 20, 35, 10000, 100, 100


def _close(got, want, tol=1e-4):
    got = got.detach().numpy() if hasattr(got, "detach") else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= tol * max(np.max(np.abs(want)), 1e-30)


def _mods(impl):
    import fastbp.reference as REF
    import fastbp.time_layers as TL

    return REF if impl == "numpy" else TL


def _kw(impl):
    return {"reuse": True} if impl == "fastbp-reuse" else {}


@pytest.mark.parametrize("impl", IMPLS)
def test_embedding_backward(benchmark, request, rng, impl):
    benchmark.group = "book2 embedding backward 700x100 -> 10000x100 float32"
    W = rng.standard_normal((V, D)).astype(np.float32)
    idx = rng.integers(0, V, N * T).astype(np.int32)
    dout = rng.standard_normal((N * T, D)).astype(np.float32)
    want = np.zeros((V, D), np.float32)
    np.add.at(want, idx, dout)
    if impl == "torch":
        torch = request.getfixturevalue("need_torch")
        g, ti, td = torch.zeros(V, D), torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(dout)

        def run():
            g.zero_()
            g.index_add_(0, ti, td)
            return g
    else:
        from fastbp.layers import Embedding
        from fastbp.reference import Embedding as REmb

        layer = REmb(W) if impl == "numpy" else Embedding(W, **_kw(impl))
        layer.forward(idx)

        def run():
            layer.backward(dout)
            return layer.grads[0]

    _close(run(), want)
    benchmark(run)


@pytest.mark.parametrize("impl", IMPLS)
def test_time_lstm_forward_backward(benchmark, request, rng, impl):
    benchmark.group = "book2 TimeLSTM forward+backward b20 t35 D100 H100 float32"
    Wx = (rng.standard_normal((D, 4 * H)) / 10).astype(np.float32)
    Wh = (rng.standard_normal((H, 4 * H)) / 10).astype(np.float32)
    b = np.zeros(4 * H, np.float32)
    xs = rng.standard_normal((N, T, D)).astype(np.float32)
    dhs = rng.standard_normal((N, T, H)).astype(np.float32)
    import fastbp.reference as REF

    ref = REF.TimeLSTM(Wx, Wh, b)
    want = ref.forward(xs)
    if impl == "torch":
        torch = request.getfixturevalue("need_torch")
        order = np.r_[2 * H : 3 * H, 0:H, H : 2 * H, 3 * H : 4 * H]
        lstm = torch.nn.LSTM(D, H, batch_first=True)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(torch.from_numpy(Wx[:, order].T.copy()))
            lstm.weight_hh_l0.copy_(torch.from_numpy(Wh[:, order].T.copy()))
            lstm.bias_ih_l0.zero_()
            lstm.bias_hh_l0.zero_()
        tx, td = torch.from_numpy(xs).requires_grad_(), torch.from_numpy(dhs)

        def run():
            out, _ = lstm(tx)
            out.backward(td)
            return out
    else:
        M = _mods(impl)
        layer = M.TimeLSTM(Wx, Wh, b, **_kw(impl))

        def run():
            hs = layer.forward(xs)
            layer.backward(dhs)
            return hs

    _close(run(), want)
    benchmark(run)


@pytest.mark.parametrize("impl", IMPLS)
def test_time_softmax_with_loss(benchmark, request, rng, impl):
    benchmark.group = "book2 TimeSoftmaxWithLoss forward+backward (20, 35, 10000) float32"
    xs = rng.standard_normal((N, T, V)).astype(np.float32)
    ts = rng.integers(0, V, (N, T)).astype(np.int32)
    import fastbp.reference as REF

    ref = REF.TimeSoftmaxWithLoss()
    ref.forward(xs, ts)
    want = ref.backward()
    if impl == "torch":
        torch = request.getfixturevalue("need_torch")
        tx = torch.from_numpy(xs.reshape(N * T, V)).requires_grad_()
        tt = torch.from_numpy(ts.reshape(-1).astype(np.int64))

        def run():
            tx.grad = None
            loss = torch.nn.functional.cross_entropy(tx, tt)
            loss.backward()
            return tx.grad.reshape(N, T, V)
    else:
        layer = _mods(impl).TimeSoftmaxWithLoss(**_kw(impl))

        def run():
            layer.forward(xs, ts)
            return layer.backward()

    _close(run(), want)
    benchmark(run)
