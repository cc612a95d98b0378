"""Book 1's ``common/util.py`` helpers, on fastbp's kernels where there is a hot loop.

* ``im2col(input_data, filter_h, filter_w, stride=1, pad=0)`` -> (N*OH*OW, C*FH*FW) column matrix
* ``col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0)`` -> (N, C, H, W), the adjoint of im2col
* ``conv_output_size(input_size, filter_size, stride=1, pad=0)`` -> ``(input_size + 2*pad - filter_size) / stride + 1``
  (true division, as the book's: a float)

The same signatures and numbers as the book's, with two deliberate differences: the result keeps a float32
input's dtype (the book's allocate float64 whatever comes in; integer inputs give float64 like the book's), and a
filter larger than the padded input, ``stride < 1`` or ``pad < 0`` raise ValueError instead of producing an empty
or misshapen array.  Output sizes that do not divide evenly are floored, as the book's ``//`` does.

Book 2's ``common/util.py`` helpers used by its training scripts (``from common.util import ...``) live here too,
so one module serves both books' ``from common.util import ...``:

``clip_grads`` is one fused pass per gradient array for the norm (fastbp._embedding.sum_squares: accumulated in
double in fixed blocks, so the result does not depend on the thread count) and one in-place scaling pass when
clipping applies -- the book's formula ``rate = max_norm / (sqrt(sum of squares) + 1e-6)``, applied when
``rate < 1``.  The other helpers follow the book's definitions, vectorised where the book loops in Python.
"""

import sys

import numpy as np

from fastbp import _conv
from fastbp import _embedding as _emb
from fastbp import reference as _ref

__all__ = [
    "im2col",
    "col2im",
    "conv_output_size",
    "preprocess",
    "cos_similarity",
    "most_similar",
    "convert_one_hot",
    "create_co_matrix",
    "ppmi",
    "create_contexts_target",
    "to_cpu",
    "to_gpu",
    "clip_grads",
    "eval_perplexity",
    "eval_seq2seq",
    "analogy",
    "normalize",
]


_KERNEL = (np.dtype(np.float32), np.dtype(np.float64))


def _int(value, name, minimum):
    return _ref._check_int(value, name, "fastbp.util", minimum)


def conv_output_size(input_size, filter_size, stride=1, pad=0):
    """(input_size + 2*pad - filter_size) / stride + 1 (the book's formula, a float when it does not divide)."""
    return (input_size + 2 * pad - filter_size) / stride + 1


def im2col(input_data, filter_h, filter_w, stride=1, pad=0):
    """col[(n, i, j), (c, dy, dx)] = x_padded[n, c, i*stride + dy, j*stride + dx]; x (N, C, H, W)."""
    x = np.asarray(input_data)
    if x.ndim != 4:
        raise ValueError(f"im2col: input_data must be 4-D (N, C, H, W), got shape {x.shape}")
    fh, fw = _int(filter_h, "filter_h", 1), _int(filter_w, "filter_w", 1)
    stride, pad = _int(stride, "stride", 1), _int(pad, "pad", 0)
    n, c, h, w = x.shape
    oh, ow = _conv.output_size(h, w, fh, fw, stride, pad)
    dt = x.dtype if x.dtype in _KERNEL else (np.dtype(np.float64) if x.dtype.kind in "biu" else None)
    if dt is None:
        return _ref.im2col_np(x, fh, fw, stride, pad)
    x = np.ascontiguousarray(x, dtype=dt)
    col = np.empty((n * oh * ow, c * fh * fw), dt)
    return _conv.im2col(x, fh, fw, stride, pad, col)


def col2im(col, input_shape, filter_h, filter_w, stride=1, pad=0):
    """img[n, c, y, x] = sum of the col entries im2col read from (y, x) (padding dropped); returns (N, C, H, W)."""
    col = np.asarray(col)
    if len(input_shape) != 4:
        raise ValueError(f"col2im: input_shape must be (N, C, H, W), got {input_shape!r}")
    n, c, h, w = (_int(v, "input_shape entries", 0) for v in input_shape)
    fh, fw = _int(filter_h, "filter_h", 1), _int(filter_w, "filter_w", 1)
    stride, pad = _int(stride, "stride", 1), _int(pad, "pad", 0)
    oh, ow = _conv.output_size(h, w, fh, fw, stride, pad)
    if col.size != n * oh * ow * c * fh * fw:
        raise ValueError(
            f"col2im: col of shape {col.shape} does not hold ({n}*{oh}*{ow}, {c}*{fh}*{fw}) entries "
            f"for input_shape {tuple(input_shape)}"
        )
    dt = col.dtype if col.dtype in _KERNEL else (np.dtype(np.float64) if col.dtype.kind in "biu" else None)
    if dt is None:
        return _ref.col2im_np(col, (n, c, h, w), fh, fw, stride, pad)
    col = np.ascontiguousarray(col.reshape(n * oh * ow, c * fh * fw), dtype=dt)
    img = np.empty((n, c, h, w), dt)
    return _conv.col2im(col, fh, fw, stride, pad, img)


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _sum_squares(g):
    if (
        type(g) is np.ndarray
        and g.dtype in _FLOATS
        and g.dtype.isnative
        and (g.flags.c_contiguous or g.flags.f_contiguous)
    ):
        return _emb.sum_squares(g)
    g = np.asarray(g, dtype=np.float64)
    return float(np.sum(g * g))


def clip_grads(grads, max_norm):
    """Scale every array of ``grads`` in place by max_norm / (total L2 norm + 1e-6) when that is < 1."""
    total = 0.0
    for g in grads:
        total += _sum_squares(g)
    rate = max_norm / (np.sqrt(total) + 1e-6)
    if rate < 1:
        for g in grads:
            g *= rate


def preprocess(text):
    """(corpus, word_to_id, id_to_word) of a text: lower-cased, '.' split off, ids in order of appearance."""
    words = text.lower().replace(".", " .").split(" ")
    word_to_id, id_to_word = {}, {}
    for w in words:
        if w not in word_to_id:
            i = len(word_to_id)
            word_to_id[w] = i
            id_to_word[i] = w
    return np.array([word_to_id[w] for w in words]), word_to_id, id_to_word


def cos_similarity(x, y, eps=1e-8):
    nx = x / (np.sqrt(np.sum(x**2)) + eps)
    ny = y / (np.sqrt(np.sum(y**2)) + eps)
    return np.dot(nx, ny)


def most_similar(query, word_to_id, id_to_word, word_matrix, top=5):
    """Print the `top` words most cosine-similar to `query` (the book's output format, in English)."""
    if query not in word_to_id:
        print("%s is not found" % query)
        return
    print("\n[query] " + query)
    qv = word_matrix[word_to_id[query]]
    vocab_size = len(id_to_word)
    similarity = np.array([cos_similarity(word_matrix[i], qv) for i in range(vocab_size)])
    count = 0
    for i in (-1 * similarity).argsort():
        if id_to_word[i] == query:
            continue
        print(" %s: %s" % (id_to_word[i], similarity[i]))
        count += 1
        if count >= top:
            return


def convert_one_hot(corpus, vocab_size):
    """int32 one-hot (N, V) or (N, C, V) of a 1-D or 2-D array of word ids."""
    corpus = np.asarray(corpus)
    one_hot = np.zeros(corpus.shape + (vocab_size,), dtype=np.int32)
    np.put_along_axis(one_hot, corpus[..., None], 1, axis=-1)
    return one_hot


def create_co_matrix(corpus, vocab_size, window_size=1):
    corpus = np.asarray(corpus)
    co = np.zeros((vocab_size, vocab_size), dtype=np.int32)
    n = len(corpus)
    for d in range(1, window_size + 1):
        if d < n:
            np.add.at(co, (corpus[d:], corpus[:-d]), 1)
            np.add.at(co, (corpus[:-d], corpus[d:]), 1)
    return co


def ppmi(C, verbose=False, eps=1e-8):
    """Positive PMI of a co-occurrence matrix (float32), the book's formula without its Python double loop."""
    N = np.sum(C)
    S = np.sum(C, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log2(C * N / (S[None, :] * S[:, None]) + eps)
    return np.maximum(0, np.nan_to_num(pmi, nan=0.0, neginf=0.0)).astype(np.float32)


def create_contexts_target(corpus, window_size=1):
    corpus = np.asarray(corpus)
    target = corpus[window_size:-window_size]
    n = len(corpus) - 2 * window_size
    offs = [t for t in range(-window_size, window_size + 1) if t != 0]
    contexts = (
        np.stack([corpus[window_size + t : window_size + t + n] for t in offs], axis=1)
        if n > 0
        else np.zeros((0, len(offs)), corpus.dtype)
    )
    return contexts, target


def to_cpu(x):
    return x


def to_gpu(x):
    import cupy

    return cupy.asarray(x)


def eval_perplexity(model, corpus, batch_size=10, time_size=35):
    """exp(mean loss) of `model` over `corpus` read as batch_size parallel streams (the book's batching)."""
    print("evaluating perplexity ...")
    corpus = np.asarray(corpus)
    corpus_size = len(corpus)
    total_loss = 0
    max_iters = (corpus_size - 1) // (batch_size * time_size)
    jump = (corpus_size - 1) // batch_size
    for iters in range(max_iters):
        offsets = iters * time_size + jump * np.arange(batch_size)
        pos = offsets[:, None] + np.arange(time_size)[None, :]
        xs = corpus[pos % corpus_size].astype(np.int32)
        ts = corpus[(pos + 1) % corpus_size].astype(np.int32)
        try:
            loss = model.forward(xs, ts, train_flg=False)
        except TypeError:
            loss = model.forward(xs, ts)
        total_loss += loss
        sys.stdout.write("\r%d / %d" % (iters, max_iters))
        sys.stdout.flush()
    print("")
    return np.exp(total_loss / max_iters)


def eval_seq2seq(model, question, correct, id_to_char, verbos=False, is_reverse=False):
    correct = correct.flatten()
    start_id = correct[0]
    correct = correct[1:]
    guess = model.generate(question, start_id, len(correct))
    question = "".join([id_to_char[int(c)] for c in question.flatten()])
    correct = "".join([id_to_char[int(c)] for c in correct])
    guess = "".join([id_to_char[int(c)] for c in guess])
    if verbos:
        if is_reverse:
            question = question[::-1]
        print("Q", question)
        print("T", correct)
        print(("O " if correct == guess else "X ") + guess)
        print("---")
    return 1 if guess == correct else 0


def normalize(x):
    if x.ndim == 2:
        s = np.sqrt((x * x).sum(1))
        x /= s.reshape((s.shape[0], 1))
    elif x.ndim == 1:
        x /= np.sqrt((x * x).sum())
    return x


def analogy(a, b, c, word_to_id, id_to_word, word_matrix, top=5, answer=None):
    for word in (a, b, c):
        if word not in word_to_id:
            print("%s is not found" % word)
            return
    print("\n[analogy] " + a + ":" + b + " = " + c + ":?")
    a_vec, b_vec, c_vec = (word_matrix[word_to_id[w]] for w in (a, b, c))
    query_vec = normalize(b_vec - a_vec + c_vec)
    similarity = np.dot(word_matrix, query_vec)
    if answer is not None:
        print("==>" + answer + ":" + str(np.dot(word_matrix[word_to_id[answer]], query_vec)))
    count = 0
    for i in (-1 * similarity).argsort():
        if np.isnan(similarity[i]) or id_to_word[i] in (a, b, c):
            continue
        print(" {0}: {1}".format(id_to_word[i], similarity[i]))
        count += 1
        if count >= top:
            return
