"""Book 2's ``ch04/negative_sampling_layer.py`` on fastbp's kernels: ``EmbeddingDot``, ``UnigramSampler``,
``NegativeSamplingLoss`` (same constructors and attributes), plus ``CBOW`` (``ch04/cbow.py``'s model) built on
them.  Swap ``from negative_sampling_layer import ...`` for ``from fastbp.negative_sampling_layer import ...``.

* ``UnigramSampler.get_negative_sample(target)`` draws, for every row, ``sample_size`` distinct words from the
  book's distribution p(w) ~ count(w)**power with the row's target excluded -- the same distribution as the
  book's per-row ``np.random.choice(V, size, replace=False, p)`` -- but without a Python loop over rows: each of
  the ``sample_size`` positions is drawn for all rows at once by inverse-CDF lookup (``np.searchsorted``), and
  the rows whose draw hit their target or an earlier pick of the row are redrawn (vectorised) until none is
  left.  Redrawing a rejected draw from p is exactly sampling from p renormalised over the words still allowed,
  which is what ``np.random.choice(replace=False)`` does position by position.  Randomness: the draws come from
  NumPy's global legacy generator (``np.random.random_sample``), so a fixed ``np.random.seed(s)`` reproduces
  fastbp's negative samples run to run (and for any thread count); it does NOT reproduce the book's samples
  (the book's consumes the generator differently, one ``choice`` call per row).
* ``NegativeSamplingLoss`` scores the target and all negatives with one fused gather-dot kernel, computes the
  sigmoid cross-entropy of all (N, sample_size + 1) scores in one vectorised pass, and in ``backward`` scatters
  each score column's gradient into its own ``grads[k]`` (the book's layout: one gradient array per
  EmbeddingDot, summed later by ``remove_duplicate``), deterministically (fastbp._embedding).
  ``share_grads=True`` (fastbp's addition, used by fastbp's ``CBOW``) keeps one ``params = [W]`` /
  ``grads = [dW]`` pair holding the summed gradient instead -- the same numbers after ``remove_duplicate``,
  without sample_size + 1 dense V x H gradient arrays per step.
* The loss is the exact binary cross-entropy ``log(1 + exp(-|s|)) + max(s, 0) - t s`` (the book's adds 1e-7
  inside the log: equal to about 1e-7 except where the book's value is capped at 16.1).
"""

import numpy as np

from fastbp import _embedding as _emb
from fastbp.layers import Embedding, SigmoidWithLoss, _index_array, _Workspace
from fastbp import reference_time as _ref

__all__ = ["EmbeddingDot", "UnigramSampler", "NegativeSamplingLoss", "CBOW"]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _kernel_ok(W):
    return type(W) is np.ndarray and W.ndim == 2 and (W.dtype is _F32 or W.dtype is _F64) and W.flags.c_contiguous


class EmbeddingDot:
    """out[n] = W[idx[n]] . h[n]; backward(dout): dW rows idx[n] += dout[n] h[n] (grads[0], zeroed first),
    returns dh = dout[:, None] * W[idx].  ``embed`` is an Embedding on the same W; ``params``/``grads`` are its
    lists, as in the book."""

    def __init__(self, W):
        self.embed = Embedding(W)
        self.params = self.embed.params
        self.grads = self.embed.grads
        self.cache = None
        self._ws = _Workspace(False)

    def __call__(self, *args):
        return self.forward(*args)

    def forward(self, h, idx):
        W = self.params[0]
        h = np.asarray(h)
        if not _kernel_ok(W) or h.ndim != 2:
            self.cache = ("ref", None)
            ref = self._ref = _ref.EmbeddingDot(W)
            ref.embed.grads = ref.grads = self.grads
            return ref.forward(h, idx)
        ik = _index_array(idx, self._ws).reshape(-1, 1)
        if ik.shape[0] != h.shape[0] or h.shape[1] != W.shape[1]:
            raise ValueError(f"EmbeddingDot: h must be ({ik.shape[0]}, {W.shape[1]}), got {h.shape}")
        hk = self._ws.as_dtype("h", h, W.dtype)
        out = np.empty((ik.shape[0], 1), W.dtype)
        _emb.rowdot(W, ik, hk, out)
        self.embed.idx = idx
        self.cache = (hk, ik)
        return out.reshape(-1)

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError("EmbeddingDot.backward called before EmbeddingDot.forward")
        hk, ik = self.cache
        if isinstance(hk, str):
            return self._ref.backward(dout)
        W, dW = self.params[0], self.grads[0]
        ds = self._ws.as_dtype("ds", np.asarray(dout).reshape(-1, 1), W.dtype)
        dh = np.empty(hk.shape, W.dtype)
        _emb.rowdot_backward(W, ik, ds, dh)
        _scatter_into(dW, hk, ik.reshape(-1), ds.reshape(-1), self._ws, "dW")
        return dh


def _scatter_into(dW, src, idx, scale, ws, name):
    """dW[...] = 0; dW[idx[i]] += scale[i] * src[i], in place whatever dW's dtype."""
    if dW.dtype == src.dtype and dW.flags.c_contiguous and dW.flags.writeable:
        _emb.scatter_add(src, idx, dW, scale)
    else:
        buf = ws.scratch(name, dW.shape, src.dtype)
        _emb.scatter_add(src, idx, buf, scale)
        np.copyto(dW, buf, casting="unsafe")


class UnigramSampler:
    """The book's unigram sampler: ``word_p`` ~ count**power over ids 0 .. vocab_size-1 (vocab_size = number of
    distinct ids in the corpus, as the book counts); ``get_negative_sample(target)`` -> (N, sample_size) int32,
    distinct words per row, never the row's target.  Vectorised rejection sampling, see the module docstring
    for what ``np.random.seed`` reproduces."""

    MAX_ROUNDS = 1000

    def __init__(self, corpus, power, sample_size):
        self.sample_size = sample_size
        corpus = np.asarray(corpus).reshape(-1)
        if corpus.size and corpus.min() < 0:
            raise ValueError(f"UnigramSampler: word ids must be >= 0, got {corpus.min()}")
        counts = np.bincount(corpus) if corpus.size else np.zeros(0, np.int64)
        self.vocab_size = int(np.count_nonzero(counts))
        word_p = np.zeros(self.vocab_size)
        m = min(self.vocab_size, counts.size)
        word_p[:m] = counts[:m]
        word_p = np.power(word_p, power)
        self.word_p = word_p / np.sum(word_p)
        self._cdf = np.cumsum(self.word_p)
        self._nonzero = int(np.count_nonzero(self.word_p))

    def _draw(self, n):
        u = np.random.random_sample(n) * self._cdf[-1]
        w = np.searchsorted(self._cdf, u, side="right")
        np.minimum(w, self.vocab_size - 1, out=w)
        return w

    def get_negative_sample(self, target):
        target = np.asarray(target).reshape(-1)
        if target.dtype.kind not in "iu":
            raise TypeError(f"UnigramSampler: target must be integer word ids, got dtype {target.dtype}")
        if target.size and (target.min() < 0 or target.max() >= self.vocab_size):
            bad = target.min() if target.min() < 0 else target.max()
            raise IndexError(
                f"UnigramSampler: target {bad} is out of range for the corpus's {self.vocab_size} "
                f"words (valid: 0 .. {self.vocab_size - 1})"
            )
        N, S = target.shape[0], self.sample_size
        if S > self._nonzero - 1:
            raise ValueError(
                f"UnigramSampler: cannot draw {S} distinct words other than the target from "
                f"{self._nonzero} words of nonzero probability"
            )
        out = np.empty((N, S), dtype=np.int32)
        for k in range(S):
            col = self._draw(N)
            taken = out[:, :k]
            bad = (col == target) | (taken == col[:, None]).any(axis=1)
            rounds = 0
            while bad.any():
                rows = np.flatnonzero(bad)
                col[rows] = self._draw(rows.size)
                bad[rows] = (col[rows] == target[rows]) | (taken[rows] == col[rows, None]).any(axis=1)
                rounds += 1
                if rounds > self.MAX_ROUNDS:  # pathological distributions: the book's exact per-row draw
                    for i in np.flatnonzero(bad):
                        p = self.word_p.copy()
                        p[target[i]] = 0
                        p[taken[i]] = 0
                        col[i] = np.random.choice(self.vocab_size, p=p / p.sum())
                    break
            out[:, k] = col
        return out


class NegativeSamplingLoss:
    """Book 2's NegativeSamplingLoss(W, corpus, power=0.75, sample_size=5): sum over the target (label 1) and
    sample_size negatives (label 0) of the batch-mean sigmoid cross-entropy of their scores W[w] . h.

    Attributes as the book: ``sample_size``, ``sampler``, ``loss_layers``, ``embed_dot_layers`` (their
    ``grads`` are the arrays written), ``params`` (W, sample_size + 1 times) and ``grads`` (one array per
    EmbeddingDot).  With ``share_grads=True``: ``params = [W]``, ``grads = [dW]`` (the summed gradient)."""

    def __init__(self, W, corpus, power=0.75, sample_size=5, *, share_grads=False):
        self.sample_size = sample_size
        self.sampler = UnigramSampler(corpus, power, sample_size)
        self.share_grads = share_grads
        if share_grads:
            self.loss_layers = []
            self.embed_dot_layers = []
            self.params = [W]
            self.grads = [np.zeros_like(W)]
        else:
            _ref._per_sample_layers(self, W, SigmoidWithLoss, EmbeddingDot)
        self._ws = _Workspace(False)
        self._cache = None

    def __call__(self, *args):
        return self.forward(*args)

    def forward(self, h, target):
        W = self.params[0]
        negative_sample = self.sampler.get_negative_sample(target)
        target = np.asarray(target)
        N = target.shape[0]
        idx = self._ws.scratch("idx", (N, self.sample_size + 1), np.dtype(np.int64))
        idx[:, 0] = target
        idx[:, 1:] = negative_sample
        h = np.asarray(h)
        if not _kernel_ok(W):
            raise TypeError(
                f"NegativeSamplingLoss: W must be a C-contiguous float32/float64 (V, H) array, got "
                f"{getattr(W, 'dtype', type(W))} {getattr(W, 'shape', '')}"
            )
        if h.shape != (N, W.shape[1]):
            raise ValueError(f"NegativeSamplingLoss: h must be ({N}, {W.shape[1]}), got {h.shape}")
        hk = self._ws.as_dtype("h", h, W.dtype)
        s = np.empty((N, self.sample_size + 1), W.dtype)
        _emb.rowdot(W, idx, hk, s)
        # label 1 for column 0, 0 for the negatives: loss = softplus(-s0) + sum_k softplus(s_k), batch means
        e = np.exp(-np.abs(s))
        y = np.where(s >= 0, 1 / (1 + e), e / (1 + e))
        rows = np.log1p(e) + np.maximum(s, 0)
        rows[:, 0] -= s[:, 0]
        loss = rows.sum(axis=0, dtype=np.float64) / N if N else np.zeros(self.sample_size + 1)
        self._cache = (hk, idx.copy(), y, N)
        return float(loss.sum())

    def backward(self, dout=1):
        if self._cache is None:
            raise RuntimeError("NegativeSamplingLoss.backward called before NegativeSamplingLoss.forward")
        hk, idx, y, N = self._cache
        if np.ndim(dout) != 0:
            raise ValueError(f"NegativeSamplingLoss.backward takes a scalar dout, got shape {np.shape(dout)}")
        W = self.params[0]
        ds = (y * (dout / N)).astype(W.dtype, copy=False)
        ds[:, 0] -= dout / N
        ds = np.ascontiguousarray(ds)
        dh = np.empty(hk.shape, W.dtype)
        _emb.rowdot_backward(W, idx, ds, dh)
        K = self.sample_size + 1
        if self.share_grads:
            src = np.repeat(hk, K, axis=0)
            _scatter_into(self.grads[0], src, idx.reshape(-1), ds.reshape(-1), self._ws, "dW")
        else:
            for k in range(K):
                _scatter_into(
                    self.grads[k], hk, np.ascontiguousarray(idx[:, k]), np.ascontiguousarray(ds[:, k]), self._ws, "dW"
                )
        return dh


class CBOW:
    """ch04/cbow.py's CBOW(vocab_size, hidden_size, window_size, corpus) on fastbp: the same initialisation
    (``0.01 * randn``, float32, drawn in the book's order) and numbers, but one Embedding over the
    (N, 2*window) contexts and a ``share_grads`` NegativeSamplingLoss, so ``params = [W_in, W_out]`` and
    ``grads`` are two arrays (the book's model lists W_in 2*window times and W_out sample_size + 1 times;
    after the book's ``remove_duplicate`` both models hand the optimizer the same two arrays and gradients).
    ``word_vecs`` is W_in."""

    def __init__(self, vocab_size, hidden_size, window_size, corpus):
        V, H = vocab_size, hidden_size
        W_in = 0.01 * np.random.randn(V, H).astype("f")
        W_out = 0.01 * np.random.randn(V, H).astype("f")
        self.window_size = window_size
        self.in_layer = Embedding(W_in)
        self.ns_loss = NegativeSamplingLoss(W_out, corpus, power=0.75, sample_size=5, share_grads=True)
        self.params = [W_in, W_out]
        self.grads = [self.in_layer.grads[0], self.ns_loss.grads[0]]
        self.word_vecs = W_in
        self._C = None

    def forward(self, contexts, target):
        contexts = np.asarray(contexts)
        emb = self.in_layer.forward(contexts)  # (N, C, H)
        C = contexts.shape[1]
        h = emb.sum(axis=1)
        h *= 1 / C
        self._C = C
        return self.ns_loss.forward(h, target)

    def backward(self, dout=1):
        dh = self.ns_loss.backward(dout)
        dh *= 1 / self._C
        d = np.broadcast_to(dh[:, None, :], (dh.shape[0], self._C, dh.shape[1]))
        self.in_layer.backward(d)
        return None
