"""fastbp.negative_sampling_layer against the book's NumPy twins (fastbp.reference_time), numerical gradients
in float64, the vectorised sampler's guarantees, and the CBOW model of ch04 against the book's layer-per-context
model after remove_duplicate."""

import numpy as np
import pytest

import fastbp.negative_sampling_layer as NS
import fastbp.reference as REF
from fastbp._book2 import BookCBOW
from fastbp.trainer import remove_duplicate
from fastbp_tests import num_grad

DTYPES = [np.float32, np.float64]
with_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
TOL = {np.float32: dict(rtol=2e-4, atol=2e-6), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _corpus(V=50, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    c = (rng.zipf(1.3, n) % V).astype(np.int32)
    c[:V] = np.arange(V)  # every id present, as the book's sampler assumes
    return c


def _fix_negatives(layer, neg):
    layer.sampler.get_negative_sample = lambda target: neg


def test_sampler_rules_and_seed():
    corpus = _corpus()
    s = NS.UnigramSampler(corpus, 0.75, 5)
    ref = REF.UnigramSampler(corpus, 0.75, 5)
    assert s.vocab_size == ref.vocab_size
    np.testing.assert_allclose(s.word_p, ref.word_p, rtol=1e-12)
    target = np.random.default_rng(1).integers(0, 50, 400).astype(np.int32)
    target[:100] = 0  # the most frequent word as target
    np.random.seed(5)
    neg = s.get_negative_sample(target)
    assert neg.shape == (400, 5) and neg.dtype == np.int32
    assert not np.any(neg == target[:, None])
    srt = np.sort(neg, axis=1)
    assert not np.any(srt[:, 1:] == srt[:, :-1])
    np.random.seed(5)
    np.testing.assert_array_equal(s.get_negative_sample(target), neg)
    with pytest.raises(ValueError, match="distinct"):
        NS.UnigramSampler(np.array([0, 1, 2, 0]), 0.75, 3).get_negative_sample(np.array([0]))


def test_sampler_distribution_matches_book():
    """First-position marginal: p with the target removed, renormalised (the book's first draw)."""
    corpus = _corpus(V=8, n=500, seed=2)
    s = NS.UnigramSampler(corpus, 0.75, 2)
    np.random.seed(0)
    target = np.full(40000, 3, dtype=np.int32)
    neg = s.get_negative_sample(target)
    p = s.word_p.copy()
    p[3] = 0
    p /= p.sum()
    freq = np.bincount(neg[:, 0], minlength=8) / neg.shape[0]
    np.testing.assert_allclose(freq, p, atol=0.01)


@with_dtypes
def test_embedding_dot_matches_reference_and_gradient(dtype):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((20, 4)).astype(dtype)
    h = rng.standard_normal((6, 4)).astype(dtype)
    idx = np.array([1, 5, 5, 0, 19, 1])
    a, r = NS.EmbeddingDot(W), REF.EmbeddingDot(W)
    np.testing.assert_allclose(a.forward(h, idx), r.forward(h, idx), **TOL[dtype])
    d = rng.standard_normal(6).astype(dtype)
    np.testing.assert_allclose(a.backward(d), r.backward(d), **TOL[dtype])
    np.testing.assert_allclose(a.grads[0], r.grads[0], **TOL[dtype])


def _num_grad(f, x, h=1e-6):
    return num_grad(f, x, h)


@with_dtypes
def test_negative_sampling_loss_matches_reference(dtype):
    rng = np.random.default_rng(4)
    corpus = _corpus()
    W = (rng.standard_normal((50, 8)) * 0.5).astype(dtype)
    h = rng.standard_normal((7, 8)).astype(dtype)
    target = rng.integers(0, 50, 7).astype(np.int32)
    np.random.seed(1)
    neg = NS.UnigramSampler(corpus, 0.75, 5).get_negative_sample(target)
    a, r = NS.NegativeSamplingLoss(W, corpus), REF.NegativeSamplingLoss(W, corpus)
    shared = NS.NegativeSamplingLoss(W, corpus, share_grads=True)
    for layer in (a, r, shared):
        _fix_negatives(layer, neg)
    la, lr, ls = a.forward(h, target), r.forward(h, target), shared.forward(h, target)
    np.testing.assert_allclose(la, lr, **TOL[dtype])
    np.testing.assert_allclose(ls, lr, **TOL[dtype])
    da, dr, dsh = a.backward(), r.backward(), shared.backward()
    np.testing.assert_allclose(da, dr, **TOL[dtype])
    np.testing.assert_allclose(dsh, dr, **TOL[dtype])
    assert len(a.grads) == 6 and all(p is W for p in a.params)
    for ga, gr in zip(a.grads, r.grads):
        np.testing.assert_allclose(ga, gr, **TOL[dtype])
    np.testing.assert_allclose(shared.grads[0], sum(r.grads), **TOL[dtype])


@pytest.mark.parametrize("share", [False, True])
def test_negative_sampling_gradients_float64(share):
    rng = np.random.default_rng(5)
    corpus = _corpus(V=12, n=200)
    W = rng.standard_normal((12, 3))
    h = rng.standard_normal((4, 3))
    target = np.array([0, 3, 3, 11])
    layer = NS.NegativeSamplingLoss(W, corpus, sample_size=3, share_grads=share)
    np.random.seed(2)
    _fix_negatives(layer, layer.sampler.get_negative_sample(target))
    f = lambda: layer.forward(h, target)  # noqa: E731
    f()
    dh = layer.backward()
    dW = sum(layer.grads)
    np.testing.assert_allclose(dh, _num_grad(f, h), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dW, _num_grad(f, W), rtol=1e-6, atol=1e-8)


def _BookCBOW(V, H, window_size, corpus):
    """ch04/cbow.py (fastbp._book2) on the reference layers, its weights drawn as the book does (np.random.randn)."""
    W_in = 0.01 * np.random.randn(V, H).astype("f")
    W_out = 0.01 * np.random.randn(V, H).astype("f")
    return BookCBOW(REF, W_in, W_out, window_size, corpus)


def test_cbow_matches_book_model():
    from fastbp.util import create_contexts_target

    corpus = _corpus(V=40, n=600, seed=6)
    contexts, target = create_contexts_target(corpus, window_size=2)
    contexts, target = contexts[:32], target[:32]
    np.random.seed(7)
    fast = NS.CBOW(40, 6, 2, corpus)
    np.random.seed(7)
    book = _BookCBOW(40, 6, 2, corpus)
    np.testing.assert_array_equal(fast.word_vecs, book.params[0])
    np.random.seed(8)
    neg = fast.ns_loss.sampler.get_negative_sample(target)
    _fix_negatives(fast.ns_loss, neg)
    _fix_negatives(book.ns_loss, neg)
    for _ in range(3):
        lf, lb = fast.forward(contexts, target), book.forward(contexts, target)
        np.testing.assert_allclose(lf, lb, rtol=1e-5)
        fast.backward()
        book.backward()
        params, grads = remove_duplicate(book.params, book.grads)
        assert len(params) == 2
        for pf, gf, pb, gb in zip(fast.params, fast.grads, params, grads):
            np.testing.assert_allclose(gf, gb, rtol=1e-4, atol=1e-7)
            pf -= 1.0 * gf
            pb -= 1.0 * gb
