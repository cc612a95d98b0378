"""``fastbp`` command line (also ``python -m fastbp``): train, gradcheck, info.

Subcommands are argparse sub-parsers.  Other modules add their own: every module named in
:data:`SUBCOMMAND_MODULES` that imports and has ``add_parser(subparsers)`` is asked to register its
sub-parser(s); a sub-parser must ``set_defaults(func=callable)`` where ``func(args)`` returns the exit code.
A listed module that is absent is skipped; one that fails to import shows up as a subcommand that explains
the failure (exit code 2) instead of breaking the other subcommands.
"""

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time

import numpy as np

import fastbp

__all__ = [
    "main",
    "build_parser",
    "SUBCOMMAND_MODULES",
    "gradcheck_cases",
    "run_gradcheck",
    "format_gradcheck",
    "ProgressBar",
]

#: Modules that may contribute subcommands through ``add_parser(subparsers)``.
SUBCOMMAND_MODULES = ["fastbp.bench"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
#: Learning rate used when --lr is not given (SGD: the book's chapter-5 value; the others: rates at which
#: they train the default network well; the book's own defaults are 0.01 and, for Adam, 0.001).
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.01, "rmsprop": 0.001, "adam": 0.001}
DEFAULT_EPOCHS = 30
DEFAULT_HIDDEN = "100"


# ---------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------
def _err(msg):
    sys.stderr.write(f"fastbp: {msg}\n")


#: Largest hidden layer `fastbp train` builds (a 784 x 65536 float64 weight is 411 MB).
MAX_HIDDEN = 65536
#: Seeds np.random.seed takes.
MAX_SEED = 2**32 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one `--help` away), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _hidden_sizes(text):
    """'100' or '100,100' -> [100] / [100, 100] (argparse type)."""
    try:
        sizes = [int(s) for s in str(text).replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes must be comma-separated integers, got {text!r}")
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive integers, got {text!r}")
    if any(s > MAX_HIDDEN for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be at most {MAX_HIDDEN}, got {text!r}")
    return sizes


def _seed(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED}, got {text!r}")
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED} (what np.random.seed takes), got {v}")
    return v


def _physical_memory():
    """Bytes of RAM, or None when the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _train_memory(n_in, hidden, n_out, batch, itemsize):
    """Rough bytes a training run holds: parameters, gradients and up to two optimizer states (4 copies of the
    weights), and a few activation arrays per layer for a batch and for the evaluation batches."""
    sizes = [n_in] + list(hidden) + [n_out]
    weights = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    activations = 4 * batch * sum(sizes)
    return (4 * weights + activations) * itemsize


def _check_output_path(path, option):
    """None when `path` can be written (tried by opening it for appending; a file created by the check is
    removed again), else the one-line error."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return f"{option} {p}: is a directory"
    existed = os.path.exists(p)
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        return f"{option} {p}: cannot write there ({e.strerror or e})"
    if not existed:
        try:
            os.remove(p)
        except OSError:
            pass
    return None


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def _init_std(text):
    if text.lower() in ("relu", "he", "sigmoid", "xavier"):
        return text.lower()
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or he/relu/xavier/sigmoid, got {text!r}")
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return v


def _fmt_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


class ProgressBar:
    """A one-line progress bar with a running value, redrawn on `stream` at most 10 times a second."""

    def __init__(self, total, *, enabled=True, stream=None, width=30, label=""):
        self.total = max(int(total), 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.label = label
        self._last = 0.0
        self._start = time.perf_counter()
        self._shown = False

    def update(self, done, value=None, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        extra = "" if value is None else f" loss {value:.4f}"
        line = f"\r{self.label}[{bar}] {done}/{self.total}{extra} {now - self._start:.1f}s"
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self):
        """Erase the bar (before printing a normal line)."""
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    close = clear


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------
def _add_train_parser(sub):
    p = sub.add_parser(
        "train",
        help="train a fully connected network on MNIST (the book's chapter-5 loop)",
        description="Train an MLP (Affine/ReLU or Sigmoid, softmax cross-entropy) with mini-batches on MNIST: "
        "full MNIST if it is on disk, else the 5,000 digits bundled with fastbp. Per-epoch "
        "train/test accuracy on stdout, a progress bar with the running loss on stderr.",
    )
    p.add_argument(
        "--net",
        choices=("mlp", "simpleconvnet", "deepconvnet"),
        default="mlp",
        help="mlp (MultiLayerNet, default), or the book's chapter-7/8 SimpleConvNet / DeepConvNet on "
        "28x28 images (--hidden/--activation/--weight-init/--weight-decay do not apply; the book "
        "trains them with --optimizer adam --lr 0.001)",
    )
    p.add_argument(
        "--hidden",
        type=_hidden_sizes,
        default=_hidden_sizes(DEFAULT_HIDDEN),
        metavar="SIZES",
        help=f"hidden layer sizes, comma-separated (default {DEFAULT_HIDDEN}; e.g. 100,100)",
    )
    p.add_argument("--activation", choices=("relu", "sigmoid"), default="relu", help="default relu")
    p.add_argument(
        "--weight-init",
        type=_init_std,
        default=None,
        metavar="STD",
        help="weight init: number, he/relu or xavier/sigmoid (default: matches --activation)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=100, help="default 100")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--epochs", type=_positive_int, default=None, help=f"passes over the training set (default {DEFAULT_EPOCHS})"
    )
    g.add_argument(
        "--iters", type=_positive_int, default=None, help="number of mini-batch iterations instead of --epochs"
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="default sgd")
    p.add_argument(
        "--weight-decay", type=_nonneg_float, default=0.0, metavar="LAMBDA", help="L2 weight decay lambda (default 0)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float64",
        help="parameter dtype (default float64, as in the book)",
    )
    p.add_argument(
        "--backend",
        choices=("fastbp", "reference"),
        default="fastbp",
        help="fastbp kernels (default) or the plain-NumPy reference layers",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of np.random (weights and batches; default 0)")
    p.add_argument(
        "--source",
        choices=("auto", "full", "sample"),
        default="auto",
        help="MNIST source: auto (full if on disk, else the bundled sample), full, sample",
    )
    p.add_argument("--data-dir", default=None, help="directory of the full MNIST files")
    p.add_argument(
        "--no-train-acc",
        action="store_true",
        help="skip the training-set accuracy at each epoch (faster on full MNIST)",
    )
    p.add_argument("--plot", metavar="FILE.png", default=None, help="save loss and accuracy curves (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", default=None, help="write a JSON summary of the run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def make_optimizer(name, lr=None):
    """An optimizer of fastbp.optimizer by CLI name, with DEFAULT_LR when lr is None."""
    from fastbp import optimizer as O

    cls = {
        "sgd": O.SGD,
        "momentum": O.Momentum,
        "nesterov": O.Nesterov,
        "adagrad": O.AdaGrad,
        "rmsprop": O.RMSprop,
        "adam": O.Adam,
    }[name]
    return cls(lr=DEFAULT_LR[name] if lr is None else lr)


def _smooth(values, k=11):
    """Moving average (for plotting)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < k:
        return v
    w = np.ones(k) / k
    pad = np.r_[np.full(k // 2, v[0]), v, np.full(k // 2, v[-1])]
    return np.convolve(pad, w, mode="valid")


def _save_plot(plt, path, losses, epochs, train_acc, test_acc, title):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(np.arange(len(losses)), losses, alpha=0.3, label="batch loss")
    a1.plot(np.arange(len(losses)), _smooth(losses), label="smoothed")
    a1.set_xlabel("iteration")
    a1.set_ylabel("loss")
    a1.legend()
    if train_acc:
        a2.plot(epochs, train_acc, marker="o", label="train")
    a2.plot(epochs, test_acc, marker="s", label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_train(args):
    plt = None
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            _err(
                "--plot needs matplotlib, which is not installed (pip install matplotlib, or "
                "pip install 'fastbp[plot]')"
            )
            return 2
        ext = os.path.splitext(os.fspath(args.plot))[1].lstrip(".").lower()
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        formats = FigureCanvasAgg.get_supported_filetypes()
        if ext not in formats:
            _err(f"--plot {args.plot}: the file name must end in one of {', '.join('.' + f for f in sorted(formats))}")
            return 2
    # Output paths are checked before any training, not after it.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and _check_output_path(path, option)
        if problem:
            _err(problem)
            return 2
    itemsize = np.dtype(args.dtype).itemsize
    need, have = _train_memory(784, args.hidden, 10, max(args.batch_size, 100), itemsize), _physical_memory()
    if have and need > have:
        _err(
            f"--hidden {','.join(map(str, args.hidden))}: training this network takes about "
            f"{need / 1e9:.3g} GB, more than this machine's {have / 1e9:.3g} GB of memory"
        )
        return 2
    from fastbp.datasets import load_mnist
    from fastbp.nets import MultiLayerNet

    try:
        (x_train, t_train), (x_test, t_test), info = _load(load_mnist, args)
    except (OSError, ValueError) as e:
        _err(f"cannot load MNIST: {e}")
        return 1
    n = x_train.shape[0]
    bs = args.batch_size
    if bs > n:
        _err(f"--batch-size {bs} is larger than the training set ({n} samples)")
        return 2
    note = ""
    if info.source == "sample" and args.source == "auto":
        note = " (full MNIST not found locally; --source full downloads it)"
    print(f"data: {info}{note}")

    np.random.seed(args.seed)
    init = args.weight_init if args.weight_init is not None else args.activation
    if getattr(args, "net", "mlp") != "mlp":  # book 1, chapters 7-8 (fastbp.convnets)
        from fastbp.nets import DeepConvNet, SimpleConvNet

        x_train, x_test = x_train.reshape(-1, 1, 28, 28), x_test.reshape(-1, 1, 28, 28)
        net = (SimpleConvNet if args.net == "simpleconvnet" else DeepConvNet)(
            dtype=np.dtype(args.dtype), backend=args.backend
        )
    else:
        net = MultiLayerNet(
            x_train.shape[1],
            args.hidden,
            10,
            activation=args.activation,
            weight_init_std=init,
            weight_decay_lambda=args.weight_decay,
            dtype=np.dtype(args.dtype),
            backend=args.backend,
        )
    opt = make_optimizer(args.optimizer, args.lr)
    iter_per_epoch = max(n // bs, 1)
    if args.iters is not None:
        total = args.iters
    else:
        total = (args.epochs if args.epochs is not None else DEFAULT_EPOCHS) * iter_per_epoch
    if getattr(args, "net", "mlp") != "mlp":
        arch = {"simpleconvnet": "SimpleConvNet", "deepconvnet": "DeepConvNet"}[args.net]
        print(f"net: {arch} (the book's), {args.dtype}, backend {args.backend}")
    else:
        arch = "-".join(str(s) for s in [x_train.shape[1]] + args.hidden + [10])
        print(
            f"net: MultiLayerNet {arch} {args.activation}, init {init}, weight decay {args.weight_decay:g}, "
            f"{args.dtype}, backend {args.backend}"
        )
    print(
        f"training: {type(opt).__name__}(lr={opt.lr:g}), batch {bs}, {total} iterations "
        f"({total / iter_per_epoch:.4g} epochs of {iter_per_epoch}), seed {args.seed}"
    )
    sys.stdout.flush()

    bar = ProgressBar(total, enabled=not args.quiet and sys.stderr.isatty())
    xb = np.empty((bs,) + x_train.shape[1:], x_train.dtype)
    tb = np.empty((bs,) + t_train.shape[1:], t_train.dtype)
    losses = []
    epochs_done, train_accs, test_accs = [], [], []
    train_time = eval_time = 0.0
    epoch_sum, epoch_count = 0.0, 0  # mean batch loss of the current epoch
    running = float("nan")
    perm = None
    pos = n  # forces a new permutation at the first iteration

    def evaluate(epoch_label):
        nonlocal eval_time
        t0 = time.perf_counter()
        tr = None if args.no_train_acc else net.accuracy(x_train, t_train, batch_size=bs)
        te = net.accuracy(x_test, t_test, batch_size=bs)
        eval_time += time.perf_counter() - t0
        epochs_done.append(epoch_label)
        if tr is not None:
            train_accs.append(tr)
        test_accs.append(te)
        bar.clear()
        tr_s = "" if tr is None else f"  train acc {tr:.4f}"
        print(
            f"epoch {epoch_label:>7.4g}  loss {running:.4f}{tr_s}  test acc {te:.4f}  "
            f"(train {train_time:.2f} s, eval {eval_time:.2f} s)"
        )
        sys.stdout.flush()
        return te

    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    for i in range(total):
        if pos + bs > n:
            perm = np.random.permutation(n)
            pos = 0
        idx = perm[pos : pos + bs]
        pos += bs
        np.take(x_train, idx, axis=0, out=xb)
        np.take(t_train, idx, axis=0, out=tb)
        grads = net.gradient(xb, tb)
        opt.update(net.params, grads)
        loss = net.last_layer.loss
        if not math.isfinite(loss):
            train_time += time.perf_counter() - t0
            bar.clear()
            _err(f"the loss became {loss} at iteration {i + 1}: training diverged (lower --lr)")
            return 1
        losses.append(loss)
        epoch_sum += loss
        epoch_count += 1
        running = epoch_sum / epoch_count
        bar.update(i + 1, running)
        if (i + 1) % iter_per_epoch == 0 or i + 1 == total:
            train_time += time.perf_counter() - t0
            evaluate((i + 1) / iter_per_epoch)
            epoch_sum, epoch_count = 0.0, 0
            t0 = time.perf_counter()
    bar.close()
    wall = time.perf_counter() - wall0
    final = test_accs[-1]
    print(
        f"final test accuracy {final:.4f}  |  training {_fmt_time(train_time)} "
        f"({_fmt_time(train_time / total)}/iteration), evaluation {_fmt_time(eval_time)}, "
        f"wall {_fmt_time(wall)}"
    )

    summary = {
        "fastbp_version": fastbp.__version__,
        "data": str(info),
        "data_source": info.source,
        "n_train": int(n),
        "n_test": int(x_test.shape[0]),
        "net": getattr(args, "net", "mlp"),
        "hidden": args.hidden,
        "activation": args.activation,
        "weight_init_std": init,
        "weight_decay": args.weight_decay,
        "dtype": args.dtype,
        "backend": args.backend,
        "optimizer": args.optimizer,
        "lr": opt.lr,
        "batch_size": bs,
        "iterations": total,
        "epochs": total / iter_per_epoch,
        "seed": args.seed,
        "final_test_accuracy": final,
        "final_train_accuracy": train_accs[-1] if train_accs else None,
        "epoch": epochs_done,
        "train_accuracy": train_accs,
        "test_accuracy": test_accs,
        "last_epoch_loss": running,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "wall_time_s": wall,
        "time_per_iteration_s": train_time / total,
    }
    try:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
            print(f"summary written to {args.json}")
        if plt is not None:
            title = f"{arch} {args.optimizer} lr={opt.lr:g} ({info.source} MNIST)"
            _save_plot(plt, args.plot, losses, epochs_done, train_accs, test_accs, title)
            print(f"plot written to {args.plot}")
    except OSError as e:  # checked before training, but the disk may have filled since
        _err(f"cannot write {e.filename or 'the output'}: {e.strerror or e}")
        return 1
    return 0


def _load(load_mnist, args):
    """((x_train, t_train), (x_test, t_test), DatasetInfo): images float32 (N, 784), labels uint8."""
    (train, test), info = load_mnist(
        normalize=True,
        flatten=True,
        one_hot_label=False,
        source=args.source,
        data_dir=args.data_dir,
        verbose=args.source == "full",
        return_info=True,
    )
    return train, test, info


# ---------------------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------------------
def gradcheck_cases(seed=0):
    """[(name, check)] where check() -> {array name: max relative error}: every fastbp layer and both nets
    in float64, backpropagation against central differences."""
    from fastbp import layers as L
    from fastbp.gradient import gradient_check_layer, gradient_check_model
    from fastbp._gradcheck_fast import book1_cnn_cases
    from fastbp.nets import MultiLayerNet, TwoLayerNet

    rng = np.random.default_rng(seed)

    def away_from_zero(shape):
        v = rng.standard_normal(shape)
        return np.sign(v) * (0.1 + np.abs(v))  # ReLU's kink at 0 is out of the central difference's reach

    def layer_case(make, x, t=None):
        return lambda: gradient_check_layer(make(), x, t=t, raise_on_failure=False)

    def net_case(make, x, t):
        def run():
            state = np.random.get_state()
            np.random.seed(seed)
            try:
                net = make()
            finally:
                np.random.set_state(state)
            return gradient_check_model(net, x, t, raise_on_failure=False)

        return run

    n, d, h, c = 3, 6, 5, 4
    W = rng.standard_normal((d, h)) * 0.5
    b = rng.standard_normal(h) * 0.1
    logits = rng.standard_normal((n, c))
    labels = rng.integers(0, c, n)
    onehot = np.eye(c)[labels]
    xin = rng.random((n, 12))
    return [
        ("Affine", layer_case(lambda: L.Affine(W.copy(), b.copy()), rng.standard_normal((n, d)))),
        ("Affine (4-D input)", layer_case(lambda: L.Affine(W.copy(), b.copy()), rng.standard_normal((n, 1, 2, 3)))),
        ("Relu", layer_case(L.Relu, away_from_zero((n, h)))),
        ("Sigmoid", layer_case(L.Sigmoid, rng.standard_normal((n, h)) * 3)),
        ("SoftmaxWithLoss (labels)", layer_case(L.SoftmaxWithLoss, logits, labels)),
        ("SoftmaxWithLoss (one-hot)", layer_case(L.SoftmaxWithLoss, logits, onehot)),
        ("MatMul", layer_case(lambda: L.MatMul(W.copy()), rng.standard_normal((n, d)))),
        ("TwoLayerNet", net_case(lambda: TwoLayerNet(12, 8, c, weight_init_std=0.5), xin, labels)),
        (
            "MultiLayerNet relu + decay",
            net_case(lambda: MultiLayerNet(12, [8, 6], c, "relu", "he", weight_decay_lambda=0.1), xin, labels),
        ),
        (
            "MultiLayerNet sigmoid (one-hot)",
            net_case(lambda: MultiLayerNet(12, [8, 6], c, "sigmoid", "xavier"), xin, onehot),
        ),
    ] + book1_cnn_cases(seed)


def float32_cases(seed=0):
    """[(name, check)] like gradcheck_cases, for the float32 kernels: check() -> {array name: max-norm relative
    error max|g32 - n64| / max|n64|} of the float32 backprop against float64 central differences of the same
    layer or network (a float32 numerical derivative would only measure its own rounding noise)."""
    from fastbp import layers as L
    from fastbp.gradient import numerical_gradient
    from fastbp.nets import MultiLayerNet, TwoLayerNet

    rng = np.random.default_rng(seed)

    def err(a, n):
        n = np.asarray(n, dtype=np.float64)
        scale = float(np.max(np.abs(n))) if n.size else 0.0
        return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - n))) / scale if scale else 0.0

    def layer_case(make, x, t=None):
        def run():
            l64, l32 = make(np.float64), make(np.float32)
            out = l64.forward(x) if t is None else l64.forward(x, t)
            dout = 1.0 if t is not None else np.random.default_rng(seed + 1).standard_normal(np.shape(out))
            x32 = x.astype(np.float32)
            t32 = t.astype(np.float32) if t is not None and t.dtype.kind == "f" else t
            if t is None:
                l32.forward(x32)
                dx32 = l32.backward(dout.astype(np.float32))
            else:
                l32.forward(x32, t32)
                dx32 = l32.backward(1)
            x64 = x.copy()

            def f(_):
                y = l64.forward(x64) if t is None else l64.forward(x64, t)
                return float(np.sum(np.asarray(y) * dout))

            errors = {"x": err(dx32, numerical_gradient(f, x64))}
            names = ["W", "b"]
            for i, (p64, g32) in enumerate(zip(getattr(l64, "params", []), getattr(l32, "grads", []))):
                errors[names[i]] = err(g32, numerical_gradient(f, p64))
            return errors

        return run

    def net_case(make, x, t):
        def run():
            state = np.random.get_state()
            try:
                np.random.seed(seed)
                n64 = make(np.float64)
                np.random.seed(seed)
                n32 = make(np.float32)
            finally:
                np.random.set_state(state)
            g32 = n32.gradient(x.astype(np.float32), t)
            num = n64.numerical_gradient(x, t)
            return {k: err(g32[k], num[k]) for k in num}

        return run

    n, d, h, c = 3, 6, 5, 4
    W = rng.standard_normal((d, h)) * 0.5
    b = rng.standard_normal(h) * 0.1
    logits = rng.standard_normal((n, c))
    labels = rng.integers(0, c, n)
    onehot = np.eye(c)[labels]
    xin = rng.random((n, 12))
    relu_x = rng.standard_normal((n, h))
    relu_x = np.sign(relu_x) * (0.1 + np.abs(relu_x))
    return [
        ("Affine", layer_case(lambda dt: L.Affine(W.astype(dt), b.astype(dt)), rng.standard_normal((n, d)))),
        (
            "Affine (4-D input)",
            layer_case(lambda dt: L.Affine(W.astype(dt), b.astype(dt)), rng.standard_normal((n, 1, 2, 3))),
        ),
        ("Relu", layer_case(lambda dt: L.Relu(), relu_x)),
        ("Sigmoid", layer_case(lambda dt: L.Sigmoid(), rng.standard_normal((n, h)) * 3)),
        ("SoftmaxWithLoss (labels)", layer_case(lambda dt: L.SoftmaxWithLoss(), logits, labels)),
        ("SoftmaxWithLoss (one-hot)", layer_case(lambda dt: L.SoftmaxWithLoss(), logits, onehot)),
        ("MatMul", layer_case(lambda dt: L.MatMul(W.astype(dt)), rng.standard_normal((n, d)))),
        ("TwoLayerNet", net_case(lambda dt: TwoLayerNet(12, 8, c, weight_init_std=0.5, dtype=dt), xin, labels)),
        (
            "MultiLayerNet relu + decay",
            net_case(
                lambda dt: MultiLayerNet(12, [8, 6], c, "relu", "he", weight_decay_lambda=0.1, dtype=dt), xin, labels
            ),
        ),
        (
            "MultiLayerNet sigmoid (one-hot)",
            net_case(lambda dt: MultiLayerNet(12, [8, 6], c, "sigmoid", "xavier", dtype=dt), xin, onehot),
        ),
    ]


def run_gradcheck(cases, threshold=1e-6):
    """[(case, array, error, passed)] for every array of every case; a check that raises is one failed row."""
    rows = []
    for name, check in cases:
        try:
            errors = check()
        except Exception as e:  # a crashing layer is a failed check, reported in the table
            rows.append((name, f"error: {type(e).__name__}: {e}", float("nan"), False))
            continue
        if not errors:
            rows.append((name, "(no arrays checked)", float("nan"), False))
        for key, err in errors.items():
            rows.append((name, key, float(err), bool(err <= threshold)))
    return rows


def format_gradcheck(rows, threshold, dtype="float64"):
    w1 = max([len("check")] + [len(r[0]) for r in rows])
    w2 = max([len("array")] + [len(r[1]) for r in rows])
    lines = [f"{'check':<{w1}}  {'array':<{w2}}  {'max rel. error':>14}  result", "-" * (w1 + w2 + 26)]
    for name, key, err, ok in rows:
        lines.append(f"{name:<{w1}}  {key:<{w2}}  {err:>14.3e}  {'pass' if ok else 'FAIL'}")
    failed = sum(1 for r in rows if not r[3])
    lines.append("-" * (w1 + w2 + 26))
    how = (
        "float64, central differences"
        if dtype == "float64"
        else "float32 backprop vs float64 central differences, max-norm relative error"
    )
    lines.append(
        f"{len(rows) - failed}/{len(rows)} passed (threshold {threshold:g}, {how})"
        + ("" if not failed else f"; {failed} FAILED")
    )
    return "\n".join(lines)


def _add_gradcheck_parser(sub):
    p = sub.add_parser(
        "gradcheck",
        help="check every layer's and both networks' backward against numerical derivatives",
        description="Compare backpropagated gradients with central differences (float64) for "
        "Affine, Relu, Sigmoid, SoftmaxWithLoss (labels and one-hot), MatMul, "
        "TwoLayerNet and MultiLayerNet; exit code 1 when any check fails.",
    )
    p.add_argument(
        "--threshold",
        type=_positive_float,
        default=None,
        help="largest accepted max relative error (default 1e-6 for float64, 1e-4 for float32)",
    )
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="float64: backprop vs central differences; float32: the float32 kernels' backprop vs "
        "float64 central differences (default float64)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(func=cmd_gradcheck)


def cmd_gradcheck(args):
    f32 = args.dtype == "float32"
    threshold = args.threshold if args.threshold is not None else (1e-4 if f32 else 1e-6)
    cases = float32_cases(args.seed) if f32 else gradcheck_cases(args.seed)
    rows = run_gradcheck(cases, threshold)
    print(format_gradcheck(rows, threshold, args.dtype))
    return 0 if all(r[3] for r in rows) else 1


# ---------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _numpy_blas(exclude=None):
    """Lines describing NumPy's BLAS: threadpoolctl when installed (skipping the library `exclude`, i.e.
    fastbp's own copy), else numpy.show_config's build information."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        lines = []
        skip = os.path.realpath(exclude) if exclude else None
        for lib in threadpool_info():
            path = lib.get("filepath", "")
            if lib.get("user_api") != "blas" or (skip and os.path.realpath(path) == skip):
                continue
            lines.append(
                f"{lib.get('internal_api')} {lib.get('version')}, kernels {lib.get('architecture')}, "
                f"{lib.get('num_threads')} threads, {path}"
            )
        if lines:
            return lines
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return [
            f"{blas.get('name', '?')} {blas.get('version', '')} (from numpy.show_config; "
            f"install threadpoolctl for runtime details)".replace("  ", " ")
        ]
    except Exception as e:  # very old NumPy: no dict mode
        return [f"unknown ({type(e).__name__}: {e})"]


def collect_info():
    """Everything `fastbp info` prints, as a dict."""
    import sysconfig

    out = {
        "fastbp": fastbp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        from fastbp import _kernels

        bi = _kernels.build_info()
        out["extension"] = {
            "file": _kernels.__file__,
            "openmp": bool(bi.get("openmp")),
            "openmp_max_threads": bi.get("openmp_max_threads"),
            "compiler": sysconfig.get_config_var("CC"),
        }
    except ImportError as e:
        out["extension"] = {"error": f"not built or not importable: {e}"}
    try:
        from fastbp import _blas

        out["fastbp_blas"] = {k: v for k, v in _blas.info().items()}
    except Exception as e:
        out["fastbp_blas"] = {"error": f"{type(e).__name__}: {e}"}
    out["numpy_blas"] = _numpy_blas(out["fastbp_blas"].get("library"))
    from fastbp import _runtime

    out["openmp_wait"] = _runtime.info()
    try:
        from fastbp import _threads

        out["thread_pool"] = _threads.pool_info()
    except Exception as e:
        out["thread_pool"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from fastbp import _kernels

        out["simd_path"] = _kernels.simd_info()
    except Exception as e:
        out["simd_path"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from fastbp._blas import cpu_flags

        flags = cpu_flags()
    except Exception:
        flags = set()
    simd = sorted(f for f in flags if f in ("sse4_2", "avx", "avx2", "fma") or f.startswith("avx512"))
    out["cpu"] = {
        "model": _cpu_model(),
        "cores": os.cpu_count(),
        "simd": simd,
        "disabled": os.environ.get("FASTBP_DISABLE_CPU_FEATURES", "").strip(),
    }
    return out


def cmd_info(args):
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    ext = info["extension"]
    blas = info["fastbp_blas"]
    cpu = info["cpu"]
    print(f"fastbp   {info['fastbp']}")
    print(f"numpy    {info['numpy']}")
    print(f"python   {info['python']} ({info['platform']})")
    if "error" in ext:
        print(f"kernels  {ext['error']}")
    else:
        omp = f"yes, {ext['openmp_max_threads']} threads" if ext["openmp"] else "no"
        print(f"kernels  {ext['file']}")
        print(f"         OpenMP: {omp}; compiler: {ext['compiler']}")
        w = info["openmp_wait"]
        pool = info.get("thread_pool", {})
        if ext["openmp"] and pool.get("pool") == "fastbp":
            print(
                f"         parallel regions: fastbp's worker pool (FASTBP_THREAD_POOL=openmp for OpenMP's), workers "
                f"spin {pool['spin_us']:g} us after a region, then sleep (FASTBP_SPIN_US); products below "
                f"{pool['wake_min_macs']:g} multiply-adds wake no sleeping worker (FASTBP_WAKE_MIN_MACS); "
                f"NumPy's BLAS settings untouched"
            )
        elif ext["openmp"] and w:
            print(
                f"         OpenMP workers after a region: {w['setting']} (set by {w['by']}); NumPy's BLAS "
                f"settings untouched"
            )
    if "error" in blas:
        print(f"BLAS     fastbp's OpenBLAS unavailable: {blas['error']}")
    else:
        which = "NumPy's own OpenBLAS" if blas.get("blas") == "numpy" else "fastbp's own OpenBLAS copy"
        print(f"BLAS     fastbp: {blas['library']}")
        print(f"         fastbp's GEMMs run on {which} ({blas.get('blas_reason')}; FASTBP_BLAS=own|numpy|auto)")
        print(
            f"         core {blas['corename']} (requested {blas['requested_coretype'] or 'none'}: "
            f"{blas['reason']}), {blas['num_threads']} threads, threading: {blas.get('threading')}"
            + (
                f", OPENBLAS_THREAD_TIMEOUT={blas['thread_timeout']} for this copy only"
                if blas.get("thread_timeout") is not None
                else ""
            )
        )
        if blas.get("threading") == "split" and blas.get("blas_threaded_min"):
            print(
                f"         products of >= {blas['blas_threaded_min']:.3g} multiply-adds: threaded by OpenBLAS on "
                f"fastbp's team (FASTBP_BLAS_THREADED_MIN)"
            )
        print(f"         {blas['config']}")
    for i, line in enumerate(info["numpy_blas"]):
        print(("BLAS     numpy: " if i == 0 else "         ") + line)
    print(f"CPU      {cpu['model']} ({cpu['cores']} logical cores)")
    off = f" (FASTBP_DISABLE_CPU_FEATURES={cpu['disabled']})" if cpu.get("disabled") else ""
    print(f"SIMD     {' '.join(cpu['simd']) or 'none reported'}{off}")
    sp = info["simd_path"]
    if "error" in sp:
        print(f"         fastbp's kernels: path unknown ({sp['error']})")
    else:
        why = "" if sp["path"] == sp["cpu"] else "FASTBP_DISABLE_CPU_FEATURES; "
        core = f"; fastbp's OpenBLAS: core {blas['corename']}" if "error" not in blas else ""
        print(
            f"         fastbp's kernels: {sp['path']} path ({why}best for this CPU and build: {sp['cpu']}; "
            f"compiled: {' '.join(sp['compiled'])}){core}"
        )
    return 0


def _add_info_parser(sub):
    p = sub.add_parser("info", help="versions, build, BLAS and CPU information")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.set_defaults(func=cmd_info)


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------
def _add_unavailable(sub, name, error):
    p = sub.add_parser(name, help=f"(unavailable: {error})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def unavailable(args):
        _err(f"the '{name}' command is unavailable: {error}")
        return 2

    p.set_defaults(func=unavailable)


def build_parser():
    parser = _Parser(prog="fastbp", description="fastbp: the layers of 'Deep Learning from Scratch' on fast kernels.")
    parser.add_argument("--version", action="version", version=f"fastbp {fastbp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_gradcheck_parser(sub)
    _add_info_parser(sub)
    for modname in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # not there (yet): nothing to register
            _add_unavailable(sub, modname.rsplit(".", 1)[-1], f"{type(e).__name__}: {e}")
            continue
        except Exception as e:
            _add_unavailable(sub, modname.rsplit(".", 1)[-1], f"{type(e).__name__}: {e}")
            continue
        add = getattr(mod, "add_parser", None)
        if callable(add):
            add(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    if func is not cmd_info:  # (info reports a bad setting in its BLAS line instead)
        try:
            from fastbp import _blas  # a FASTBP_* setting fastbp cannot use fails its import

            _blas.check_environment()
        except ValueError as e:
            _err(str(e))
            return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `fastbp info | head`: the reader went away, not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
