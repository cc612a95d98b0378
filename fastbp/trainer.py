"""The training loops of both books: swap ``from common.trainer import Trainer`` (book 1 or book 2) or
``from common.trainer import Trainer, RnnlmTrainer`` (book 2) for ``from fastbp.trainer import ...``.

One name, both books.  ``Trainer`` picks its book from its arguments:

* book 1 (``common/trainer.py`` of *Deep Learning from Scratch*):
  ``Trainer(network, x_train, t_train, x_test, t_test, epochs=20, mini_batch_size=100, optimizer='SGD',
  optimizer_param={'lr': 0.01}, evaluate_sample_num_per_epoch=None, verbose=True)`` then ``train()`` --
  chosen when there are more than two positional arguments or any of the book-1 keywords (``x_train`` ...);
* book 2 (``common/trainer.py`` of book 2): ``Trainer(model, optimizer)`` then
  ``fit(x, t, max_epoch=10, batch_size=32, max_grad=None, eval_interval=20)`` and ``plot()`` -- chosen for two
  arguments (or the keywords ``model``/``optimizer``).

``Trainer(...)`` returns a ``Book1Trainer`` or a ``Book2Trainer``, both subclasses of ``Trainer``.  ``RnnlmTrainer``
and ``remove_duplicate`` are book 2's.  Book 1's optimizer names map to :mod:`fastbp.optimizers` (which also takes
book 2's parameter/gradient lists).  Printed progress lines are the books' (in English).

Faster than the books where it costs nothing in meaning: ``RnnlmTrainer.get_batch`` builds the (batch, time)
windows with one fancy-indexing gather instead of a double Python loop (same arrays, same ``time_idx``);
``remove_duplicate`` recognises a transposed view of a parameter (book 2's weight tying) by its memory before
comparing values as the book does; ``clip_grads`` is :func:`fastbp.util.clip_grads` (one fused pass).
"""

import time

import numpy as np

from fastbp import optimizers as _opt
from fastbp.util import clip_grads

__all__ = ["Trainer", "Book1Trainer", "Book2Trainer", "RnnlmTrainer", "remove_duplicate"]

_BOOK1_KEYWORDS = {
    "network",
    "x_train",
    "t_train",
    "x_test",
    "t_test",
    "epochs",
    "mini_batch_size",
    "optimizer_param",
    "evaluate_sample_num_per_epoch",
    "verbose",
}


def _is_book1(args, kwargs):
    return len(args) > 2 or bool(_BOOK1_KEYWORDS & set(kwargs))


class Trainer:
    """Book 1's or book 2's Trainer, chosen by the arguments (see the module docstring)."""

    def __new__(cls, *args, **kwargs):
        if cls is Trainer:
            cls = Book1Trainer if _is_book1(args, kwargs) else Book2Trainer
        return object.__new__(cls)


# ---------------------------------------------------------------------------------------------------------------
# Book 1
# ---------------------------------------------------------------------------------------------------------------
class Book1Trainer(Trainer):
    """Book 1's Trainer: random mini-batches (``np.random.choice`` with replacement, as the book), one optimizer
    step per batch, train/test accuracy once per epoch; ``train()`` runs ``epochs`` epochs."""

    def __init__(
        self,
        network,
        x_train,
        t_train,
        x_test,
        t_test,
        epochs=20,
        mini_batch_size=100,
        optimizer="SGD",
        optimizer_param=None,
        evaluate_sample_num_per_epoch=None,
        verbose=True,
    ):
        if optimizer_param is None:
            optimizer_param = {"lr": 0.01}
        self.network = network
        self.verbose = verbose
        self.x_train, self.t_train = x_train, t_train
        self.x_test, self.t_test = x_test, t_test
        self.epochs = epochs
        self.batch_size = mini_batch_size
        self.evaluate_sample_num_per_epoch = evaluate_sample_num_per_epoch
        classes = {
            "sgd": _opt.SGD,
            "momentum": _opt.Momentum,
            "nesterov": _opt.Nesterov,
            "adagrad": _opt.AdaGrad,
            "rmsprop": _opt.RMSprop,
            "adam": _opt.Adam,
        }
        try:
            self.optimizer = classes[optimizer.lower()](**optimizer_param)
        except KeyError:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(classes)}") from None
        self.train_size = x_train.shape[0]
        self.iter_per_epoch = max(self.train_size / mini_batch_size, 1)
        self.max_iter = int(epochs * self.iter_per_epoch)
        self.current_iter = 0
        self.current_epoch = 0
        self.train_loss_list = []
        self.train_acc_list = []
        self.test_acc_list = []

    def train_step(self):
        batch_mask = np.random.choice(self.train_size, self.batch_size)
        x_batch = self.x_train[batch_mask]
        t_batch = self.t_train[batch_mask]
        grads = self.network.gradient(x_batch, t_batch)
        self.optimizer.update(self.network.params, grads)
        loss = self.network.loss(x_batch, t_batch)
        self.train_loss_list.append(loss)
        if self.verbose:
            print("train loss:" + str(loss))
        if self.current_iter % self.iter_per_epoch == 0:
            self.current_epoch += 1
            x_tr, t_tr, x_te, t_te = self.x_train, self.t_train, self.x_test, self.t_test
            if self.evaluate_sample_num_per_epoch is not None:
                k = self.evaluate_sample_num_per_epoch
                x_tr, t_tr, x_te, t_te = x_tr[:k], t_tr[:k], x_te[:k], t_te[:k]
            train_acc = self.network.accuracy(x_tr, t_tr)
            test_acc = self.network.accuracy(x_te, t_te)
            self.train_acc_list.append(train_acc)
            self.test_acc_list.append(test_acc)
            if self.verbose:
                print(
                    "=== epoch:"
                    + str(self.current_epoch)
                    + ", train acc:"
                    + str(train_acc)
                    + ", test acc:"
                    + str(test_acc)
                    + " ==="
                )
        self.current_iter += 1

    def train(self):
        for _ in range(self.max_iter):
            self.train_step()
        test_acc = self.network.accuracy(self.x_test, self.t_test)
        if self.verbose:
            print("=============== Final Test Accuracy ===============")
            print("test acc:" + str(test_acc))


# ---------------------------------------------------------------------------------------------------------------
# Book 2
# ---------------------------------------------------------------------------------------------------------------
def _plot(values, ylim, interval, ylabel):
    import matplotlib.pyplot as plt

    x = np.arange(len(values))
    if ylim is not None:
        plt.ylim(*ylim)
    plt.plot(x, values, label="train")
    plt.xlabel("iterations (x" + str(interval) + ")")
    plt.ylabel(ylabel)
    plt.show()


def _step(model, optimizer, batch_x, batch_t, max_grad):
    loss = model.forward(batch_x, batch_t)
    model.backward()
    params, grads = remove_duplicate(model.params, model.grads)
    if max_grad is not None:
        clip_grads(grads, max_grad)
    optimizer.update(params, grads)
    return loss


class Book2Trainer(Trainer):
    """Book 2's Trainer(model, optimizer): ``fit`` shuffles once per epoch (``numpy.random.permutation``), then
    per mini-batch forward, backward, ``remove_duplicate``, optional ``clip_grads``, ``optimizer.update``; the
    average loss every ``eval_interval`` iterations goes to ``loss_list``."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer
        self.loss_list = []
        self.eval_interval = None
        self.current_epoch = 0

    def fit(self, x, t, max_epoch=10, batch_size=32, max_grad=None, eval_interval=20):
        data_size = len(x)
        max_iters = data_size // batch_size
        self.eval_interval = eval_interval
        model, optimizer = self.model, self.optimizer
        total_loss, loss_count = 0, 0
        start_time = time.time()
        for epoch in range(max_epoch):
            idx = np.random.permutation(np.arange(data_size))
            x = x[idx]
            t = t[idx]
            for iters in range(max_iters):
                batch_x = x[iters * batch_size : (iters + 1) * batch_size]
                batch_t = t[iters * batch_size : (iters + 1) * batch_size]
                total_loss += _step(model, optimizer, batch_x, batch_t, max_grad)
                loss_count += 1
                if eval_interval is not None and iters % eval_interval == 0:
                    avg_loss = total_loss / loss_count
                    print(
                        "| epoch %d |  iter %d / %d | time %d[s] | loss %.2f"
                        % (self.current_epoch + 1, iters + 1, max_iters, time.time() - start_time, avg_loss)
                    )
                    self.loss_list.append(float(avg_loss))
                    total_loss, loss_count = 0, 0
            self.current_epoch += 1

    def plot(self, ylim=None):
        _plot(self.loss_list, ylim, self.eval_interval, "loss")


class RnnlmTrainer:
    """Book 2's RnnlmTrainer(model, optimizer): ``fit(xs, ts, max_epoch=10, batch_size=20, time_size=35,
    max_grad=None, eval_interval=20)`` reads the corpus as ``batch_size`` parallel streams (truncated BPTT,
    ``time_idx`` carried across batches and epochs), perplexity every ``eval_interval`` iterations into
    ``ppl_list``."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer
        self.time_idx = None
        self.ppl_list = None
        self.eval_interval = None
        self.current_epoch = 0

    def get_batch(self, x, t, batch_size, time_size):
        data_size = len(x)
        jump = data_size // batch_size
        pos = (np.arange(batch_size)[:, None] * jump + self.time_idx + np.arange(time_size)[None, :]) % data_size
        self.time_idx += time_size
        return np.asarray(x)[pos].astype("i"), np.asarray(t)[pos].astype("i")

    def fit(self, xs, ts, max_epoch=10, batch_size=20, time_size=35, max_grad=None, eval_interval=20):
        data_size = len(xs)
        max_iters = data_size // (batch_size * time_size)
        self.time_idx = 0
        self.ppl_list = []
        self.eval_interval = eval_interval
        model, optimizer = self.model, self.optimizer
        total_loss, loss_count = 0, 0
        start_time = time.time()
        for epoch in range(max_epoch):
            for iters in range(max_iters):
                batch_x, batch_t = self.get_batch(xs, ts, batch_size, time_size)
                total_loss += _step(model, optimizer, batch_x, batch_t, max_grad)
                loss_count += 1
                if eval_interval is not None and iters % eval_interval == 0:
                    ppl = np.exp(total_loss / loss_count)
                    print(
                        "| epoch %d |  iter %d / %d | time %d[s] | perplexity %.2f"
                        % (self.current_epoch + 1, iters + 1, max_iters, time.time() - start_time, ppl)
                    )
                    self.ppl_list.append(float(ppl))
                    total_loss, loss_count = 0, 0
            self.current_epoch += 1

    def plot(self, ylim=None):
        _plot(self.ppl_list, ylim, self.eval_interval, "perplexity")


def _is_transpose_view(a, b):
    """b is a.T in memory (same buffer, swapped strides): the book's weight tying, decided without reading."""
    return (
        a.ndim == 2
        and b.ndim == 2
        and a.shape == b.shape[::-1]
        and a.strides == b.strides[::-1]
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _transposes_equal(a, b):
    """np.all(a.T == b) (the book's test), after a cheap look at three corner entries: when one differs the full
    comparison is False anyway (NaN compares unequal in both)."""
    r, c = a.shape
    if r and c:
        for i, j in ((0, 0), (r - 1, c - 1), (r - 1, 0)):
            if not a[i, j] == b[j, i]:
                return False
    return bool(np.all(a.T == b))


def remove_duplicate(params, grads):
    """Book 2's remove_duplicate: merge parameters that are the same array (``grads[i] += grads[j]``) or whose
    transposes are equal (weight tying, ``grads[i] += grads[j].T``), keeping the first; returns new lists and
    adds into the kept gradient arrays in place, as the book."""
    params, grads = params[:], grads[:]
    while True:
        found = False
        L = len(params)
        for i in range(0, L - 1):
            for j in range(i + 1, L):
                pi, pj = params[i], params[j]
                if pi is pj:
                    grads[i] += grads[j]
                    found = True
                elif (
                    pi.ndim == 2
                    and pj.ndim == 2
                    and pi.T.shape == pj.shape
                    and (_is_transpose_view(pi, pj) or _transposes_equal(pi, pj))
                ):
                    grads[i] += grads[j].T
                    found = True
                if found:
                    params.pop(j)
                    grads.pop(j)
                    break
            if found:
                break
        if not found:
            break
    return params, grads
