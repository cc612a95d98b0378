"""Plain-NumPy reference implementations of the book's layers.

This module is the oracle the tests compare ``fastbp.layers`` against and the
NumPy baseline of the benchmarks.  It follows the interface of *Deep Learning
from Scratch* (books 1 and 2) with these deliberate differences:

* nothing the caller passes in is ever written to (``Relu.backward`` does not
  zero ``dout`` in place as the book does);
* ``Sigmoid`` is evaluated in an overflow-free form;
* ``SoftmaxWithLoss`` uses the exact log-sum-exp loss instead of
  ``log(y + 1e-7)``, and ``backward`` honours ``dout``;
* inputs are validated and mismatches raise ``ValueError``/``TypeError`` naming
  the expected and the actual shape/dtype/value.

Every layer has ``params``/``grads`` lists (book 2) and ``__call__`` is
``forward``.  Gradients of parameters are written into the ``grads`` arrays
in place (``grads[0][...] = dW``, converted to their dtype, as book 2 does):
they are created once (like the parameter for a float parameter, float64 for
an integer one) and never replaced unless the parameter changes shape.

dtypes follow NumPy's rules: the dtype of a result is NumPy's for the book's
formula.  Where a layer takes ``exp`` of its input (``Sigmoid``,
``SoftmaxWithLoss``), integer and bool inputs promote as ``np.exp`` promotes
them (int8/uint8/bool -> float16, int16/uint16 -> float32, wider -> float64);
:func:`exp_dtype` is that rule, shared by :mod:`fastbp.layers` and
:mod:`fastbp.functions`.

A layer instance holds the state of its last forward pass, so it is not
thread-safe (as in NumPy-based frameworks): use one instance per thread.
Separate instances share nothing and may run in parallel.
"""

import warnings

import numpy as np

from fastbp._npmath import stable_sigmoid as _stable_sigmoid

__all__ = [
    "MulLayer",
    "AddLayer",
    "Relu",
    "Sigmoid",
    "Affine",
    "MatMul",
    "SoftmaxWithLoss",
    "Repeat",
    "Sum",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _numeric(a, name, owner):
    """np.asarray(a) restricted to bool/int/float dtypes."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{owner}: {name} must be a real numeric array, got dtype {a.dtype}")
    return a


def exp_dtype(dtype):
    """The dtype np.exp gives for an array of `dtype` (native byte order): floats keep theirs, bool and integers
    promote as NumPy promotes them with float16 (bool/int8/uint8 -> float16, int16/uint16 -> float32, wider
    integers -> float64).  The one promotion rule of the layers and functions that take exp of their input."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype.newbyteorder("=")
    return np.result_type(dtype, np.float16)


def _floating(a, name, owner):
    """np.asarray(a) as a floating array; bool/int promoted as np.exp promotes them (int16 -> float32, ...)."""
    a = _numeric(a, name, owner)
    if a.dtype.kind != "f":
        a = a.astype(exp_dtype(a.dtype))
    return a


def _grad_like(p):
    """The gradient array of parameter `p`: zeros of p's shape and dtype (float64 for an integer/bool `p`)."""
    dt = p.dtype
    if dt.kind != "f":
        dt = np.dtype(np.float64)
    elif not dt.isnative:
        dt = np.dtype(dt.type)  # NumPy's own native dtype object (what `is` checks expect)
    return np.zeros(p.shape, dt)


def _store_grad(grads, i, value, owner):
    """grads[i][...] = value (converted to its dtype), in place: book 2 keeps its own list of the grads arrays.

    Only a gradient of a new shape (the parameter was replaced by one of another shape) replaces grads[i]."""
    g = grads[i]
    if not isinstance(g, np.ndarray) or g.shape != np.shape(value):
        grads[i] = np.array(value, dtype=value.dtype if value.dtype.kind == "f" else np.float64)
        return
    if not g.flags.writeable:
        raise ValueError(f"{owner}.backward: grads[{i}] is read-only; gradients are written into it in place")
    np.copyto(g, value, casting="unsafe")


def _matmul_grad(grads, i, a, b, owner):
    """grads[i][...] = a @ b, computed straight into grads[i] when it has the product's dtype (no temporary)."""
    g = grads[i]
    if (
        isinstance(g, np.ndarray)
        and g.shape == (a.shape[0], b.shape[1])
        and g.dtype == np.result_type(a, b)
        and g.flags.writeable
    ):
        np.matmul(a, b, out=g)
    else:
        _store_grad(grads, i, a @ b, owner)


def _check_dout(dout, shape, owner):
    """Validate that dout is numeric and has the forward output's shape."""
    dout = _numeric(dout, "dout", owner)
    if dout.shape != shape:
        raise ValueError(f"{owner}.backward: dout must have the forward output's shape {shape}, got {dout.shape}")
    return dout


def _backward_before_forward(owner):
    return RuntimeError(f"{owner}.backward called before {owner}.forward")


def _unbroadcast(g, shape):
    """Sum g over the axes that broadcasting added/stretched so it has `shape`."""
    if np.shape(g) == shape:
        return g
    g = np.asarray(g)
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


class _Layer:
    """Common bits: empty params/grads lists and __call__ = forward."""

    def __init__(self):
        self.params = []
        self.grads = []

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


# --------------------------------------------------------------------------
# book 1, chapter 5: computational-graph nodes
# --------------------------------------------------------------------------


class MulLayer(_Layer):
    """out = x * y;  dx = dout * y, dy = dout * x (summed back over broadcast axes)."""

    def __init__(self):
        super().__init__()
        self.x = None
        self.y = None
        self._out_shape = None

    def forward(self, x, y):
        self.x = x
        self.y = y
        out = x * y
        self._out_shape = np.shape(out)
        return out

    def backward(self, dout):
        if self._out_shape is None:
            raise _backward_before_forward("MulLayer")
        if np.shape(dout) != self._out_shape:
            raise ValueError(
                f"MulLayer.backward: dout must have the forward output's shape {self._out_shape}, got {np.shape(dout)}"
            )
        dx = _unbroadcast(dout * self.y, np.shape(self.x))
        dy = _unbroadcast(dout * self.x, np.shape(self.y))
        return dx, dy


class AddLayer(_Layer):
    """out = x + y;  dx = dy = dout (summed back over broadcast axes)."""

    def __init__(self):
        super().__init__()
        self._x_shape = None
        self._y_shape = None
        self._out_shape = None

    def forward(self, x, y):
        out = x + y
        self._x_shape = np.shape(x)
        self._y_shape = np.shape(y)
        self._out_shape = np.shape(out)
        return out

    def backward(self, dout):
        if self._out_shape is None:
            raise _backward_before_forward("AddLayer")
        if np.shape(dout) != self._out_shape:
            raise ValueError(
                f"AddLayer.backward: dout must have the forward output's shape {self._out_shape}, got {np.shape(dout)}"
            )
        # dout * 1 gives two fresh objects, never dout itself.
        dx = _unbroadcast(dout * 1, self._x_shape)
        dy = _unbroadcast(dout * 1, self._y_shape)
        return dx, dy


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------


class Relu(_Layer):
    """out = max(x, 0) with mask = (x <= 0);  dx = dout where not mask, else 0."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, x):
        x = _numeric(x, "x", "Relu")
        self.mask = x <= 0
        return np.where(self.mask, x.dtype.type(0), x)

    def backward(self, dout):
        if self.mask is None:
            raise _backward_before_forward("Relu")
        dout = _check_dout(dout, self.mask.shape, "Relu")
        return np.where(self.mask, dout.dtype.type(0), dout)


class Sigmoid(_Layer):
    """out = 1 / (1 + exp(-x)) (overflow-free);  dx = dout * out * (1 - out)."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, x):
        x = _floating(x, "x", "Sigmoid")
        self.out = _stable_sigmoid(x)
        return self.out

    def backward(self, dout):
        if self.out is None:
            raise _backward_before_forward("Sigmoid")
        dout = _check_dout(dout, self.out.shape, "Sigmoid")
        return dout * (1.0 - self.out) * self.out


# --------------------------------------------------------------------------
# parameterised layers
# --------------------------------------------------------------------------


def _check_weight(W, owner):
    W = _numeric(W, "W", owner)
    if W.ndim != 2:
        raise ValueError(f"{owner}: W must be 2-D (D, H), got shape {W.shape}")
    return W


def _check_bias(b, W, owner):
    b = _numeric(b, "b", owner)
    if b.shape != (W.shape[1],):
        raise ValueError(f"{owner}: b must have shape ({W.shape[1]},) to match W of shape {W.shape}, got {b.shape}")
    return b


class Affine(_Layer):
    """out = x.reshape(N, -1) @ W + b;  dx = dout @ W.T, dW = x.T @ dout, db = sum(dout, 0).

    W and b are kept by reference (``params = [W, b]``) and re-read at every
    forward, so in-place updates such as ``W -= lr * dW`` are seen.  ``W``/``b``
    and ``dW``/``db`` are views onto ``params``/``grads``; the gradients are
    written in place (``grads[0][...] = dW``, converted to their dtype, as book
    2 does) into the arrays created once like W and b (float64 for integer
    ones), whatever the dtypes of x and dout: book 2 keeps its own list of
    them.  A read-only grads array raises ValueError.
    """

    def __init__(self, W, b):
        super().__init__()
        W = _check_weight(W, "Affine")
        b = _check_bias(b, W, "Affine")
        self.params = [W, b]
        self.grads = [_grad_like(W), _grad_like(b)]
        self.x = None
        self.original_x_shape = None

    # book-1 attribute style over the book-2 lists (same objects)
    W = property(lambda self: self.params[0], lambda self, v: self.params.__setitem__(0, v))
    b = property(lambda self: self.params[1], lambda self, v: self.params.__setitem__(1, v))
    dW = property(lambda self: self.grads[0], lambda self, v: self.grads.__setitem__(0, v))
    db = property(lambda self: self.grads[1], lambda self, v: self.grads.__setitem__(1, v))

    def forward(self, x):
        W = _check_weight(self.params[0], "Affine")
        b = _check_bias(self.params[1], W, "Affine")
        x = _numeric(x, "x", "Affine")
        if x.ndim == 0:
            raise ValueError("Affine.forward: x must have ndim >= 1 (N, ...), got a scalar")
        n = x.shape[0]
        d = int(np.prod(x.shape[1:], dtype=np.int64))
        if d != W.shape[0]:
            hint = (
                (
                    " (1-D x is read as N samples of 1 feature, as in the book;"
                    " pass x.reshape(1, -1) for a single sample)"
                )
                if x.ndim == 1
                else ""
            )
            raise ValueError(
                f"Affine.forward: x of shape {x.shape} has {d} features per sample "
                f"but W of shape {W.shape} expects {W.shape[0]}{hint}"
            )
        x2 = x.reshape(n, d)
        self.original_x_shape = x.shape
        self.x = x2
        out = x2 @ W
        if out.dtype == np.result_type(out, b):
            out += b
        else:
            out = out + b
        return out

    def backward(self, dout, *, need_dx=True):
        """need_dx=False (fastbp extension, not in the book): dW and db as always, dx not computed, returns None."""
        if self.x is None:
            raise _backward_before_forward("Affine")
        W = np.asarray(self.params[0])
        x2 = self.x
        dout = _check_dout(dout, (x2.shape[0], W.shape[1]), "Affine")
        dx = (dout @ W.T).reshape(self.original_x_shape) if need_dx else None
        _matmul_grad(self.grads, 0, x2.T, dout, "Affine")
        g = self.grads[1]
        if isinstance(g, np.ndarray) and g.shape == (dout.shape[1],) and g.dtype == dout.dtype and g.flags.writeable:
            np.sum(dout, axis=0, out=g)
        else:
            _store_grad(self.grads, 1, np.sum(dout, axis=0), "Affine")
        return dx


class MatMul(_Layer):
    """out = x @ W;  dx = dout @ W.T, grads[0][...] = x.T @ dout (book 2)."""

    def __init__(self, W):
        super().__init__()
        W = _check_weight(W, "MatMul")
        self.params = [W]
        self.grads = [_grad_like(W)]
        self.x = None

    W = property(lambda self: self.params[0], lambda self, v: self.params.__setitem__(0, v))
    dW = property(lambda self: self.grads[0], lambda self, v: self.grads.__setitem__(0, v))

    def forward(self, x):
        W = _check_weight(self.params[0], "MatMul")
        x = _numeric(x, "x", "MatMul")
        if x.ndim != 2:
            raise ValueError(f"MatMul.forward: x must be 2-D (N, D), got shape {x.shape}")
        if x.shape[1] != W.shape[0]:
            raise ValueError(
                f"MatMul.forward: x of shape {x.shape} has {x.shape[1]} columns "
                f"but W of shape {W.shape} expects {W.shape[0]}"
            )
        self.x = x
        return x @ W

    def backward(self, dout):
        if self.x is None:
            raise _backward_before_forward("MatMul")
        W = np.asarray(self.params[0])
        x = self.x
        dout = _check_dout(dout, (x.shape[0], W.shape[1]), "MatMul")
        dx = dout @ W.T
        _matmul_grad(self.grads, 0, x.T, dout, "MatMul")
        return dx


# --------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------


class SoftmaxWithLoss(_Layer):
    """loss = mean_i(logsumexp(x_i) - x_i[t_i]);  dx = dout * (softmax(x) - onehot(t)) / N.

    ``t`` is integer labels (N,) or one-hot/target rows (N, C); a single sample
    is 1-D logits (C,) with a scalar label or a (C,) one-hot.  For target rows
    the loss is ``-sum(t * log_softmax(x)) / N`` (equal to the label form for
    one-hot rows; backward assumes each row sums to 1).  An empty batch gives a
    nan loss and a RuntimeWarning.
    """

    def __init__(self):
        super().__init__()
        self.loss = None
        self.y = None
        self.t = None
        self._labels = None  # (N,) int labels, or None for target rows
        self._target = None  # (N, C) target rows, or None for labels

    def forward(self, x, t):
        x = _floating(x, "x", "SoftmaxWithLoss")
        t = np.asarray(t)
        if x.ndim not in (1, 2):
            raise ValueError(f"SoftmaxWithLoss.forward: logits x must be 1-D (C,) or 2-D (N, C), got shape {x.shape}")
        if x.shape[-1] == 0:
            raise ValueError(f"SoftmaxWithLoss.forward: need at least one class, got x of shape {x.shape}")
        x2 = x.reshape(1, -1) if x.ndim == 1 else x
        n, c = x2.shape
        labels, target = self._check_targets(x, t, n, c)

        # shifted logits; exp in place afterwards turns them into softmax
        buf = x2 - x2.max(axis=1, keepdims=True)
        if labels is not None:
            picked = buf[np.arange(n), labels]
        else:
            picked = np.zeros(target.shape, dtype=np.result_type(target, buf))
            # skip zero targets so that -inf logits do not give 0 * -inf = nan
            np.multiply(target, buf, out=picked, where=target != 0)
            picked = picked.sum(axis=1)
        np.exp(buf, out=buf)
        s = buf.sum(axis=1)
        buf /= s[:, None]
        log_s = np.log(s)
        if labels is not None:
            rows = log_s - picked
        else:
            rows = log_s * target.sum(axis=1) - picked

        if n == 0:
            warnings.warn(
                "SoftmaxWithLoss.forward: empty batch (N=0); the loss is nan",
                RuntimeWarning,
                stacklevel=2,
            )
            loss = float("nan")
        else:
            loss = float(rows.mean())

        self.t = t
        self.y = buf.reshape(x.shape)
        self._labels = labels
        self._target = target
        self.loss = loss
        return loss

    @staticmethod
    def _check_targets(x, t, n, c):
        """Return (labels (N,), None) or (None, target rows (N, C)) after validation.

        Every form the book's ``cross_entropy_error`` accepts: labels (N,) or (N, 1); one-hot rows (N, C), bool
        included (the book's ``t.size == y.size`` rule); for one sample (1-D logits, or logits (1, C)) a scalar
        label or a one-element label array, and for 1-D logits a one-hot (C,) or (1, C).  Integer and bool rows
        are converted to the logits' dtype (exact for one-hot rows)."""
        owner = "SoftmaxWithLoss.forward"
        integer = t.dtype.kind in "iu"
        if x.ndim == 1:
            if integer and t.size == 1 and t.ndim <= 2 and c != 1:
                t = t.reshape(())  # a scalar label, or a one-element label array
            elif t.ndim in (1, 2) and t.shape[:-1] in ((), (1,)):
                t = t.reshape(1, t.shape[-1])  # a one-hot vector (the book reshapes t to (1, t.size))
        elif integer and c != 1 and t.ndim == 2 and t.shape == (n, 1):
            t = t.reshape(n)  # labels (N, 1), e.g. the book's ch07 t.reshape((1, 1))
        elif integer and n == 1 and t.ndim == 0:
            t = t.reshape(1)  # one sample (1, C) with a scalar label
        label_shape = x.shape[:-1]
        if t.ndim == x.ndim - 1:
            if not integer:
                raise TypeError(
                    f"{owner}: class labels must be integers, got dtype {t.dtype}"
                    + (" (convert with t.astype(int))" if t.dtype.kind == "f" else "")
                )
            if t.shape != label_shape:
                raise ValueError(
                    f"{owner}: expected {n} label(s) of shape {label_shape} for logits "
                    f"of shape {x.shape}, got {t.size} label(s) of shape {t.shape}"
                )
            if t.size:
                lo, hi = t.min(), t.max()
                if lo < 0:
                    raise ValueError(f"{owner}: labels must be >= 0, got {lo} (labels are in [0, {c - 1}])")
                if hi >= c:
                    raise ValueError(
                        f"{owner}: label {hi} out of range for C={c} classes (labels must be in [0, {c - 1}])"
                    )
            return t.reshape(n).astype(np.intp, copy=False), None
        if t.ndim == max(x.ndim, 2):
            if t.dtype.kind not in "biuf":
                raise TypeError(f"{owner}: one-hot targets must be numeric, got dtype {t.dtype}")
            if t.shape[0] != n:
                raise ValueError(
                    f"{owner}: expected {n} one-hot row(s) for logits of shape {x.shape}, "
                    f"got {t.shape[0]} (t shape {t.shape})"
                )
            if t.shape[-1] != c:
                raise ValueError(
                    f"{owner}: one-hot width mismatch: logits have C={c} classes "
                    f"(shape {x.shape}) but t has shape {t.shape}"
                )
            t = t.reshape(n, c)
            if t.dtype.kind != "f":
                t = t.astype(exp_dtype(x.dtype))
            return None, t
        raise ValueError(
            f"{owner}: t must be integer labels of shape {label_shape} or one-hot "
            f"targets of shape {x.shape}, got shape {t.shape}"
        )

    def backward(self, dout=1):
        if self.y is None:
            raise _backward_before_forward("SoftmaxWithLoss")
        if np.ndim(dout) != 0:
            raise ValueError(
                f"SoftmaxWithLoss.backward: dout must be a scalar (the loss is a scalar), got shape {np.shape(dout)}"
            )
        shape = self.y.shape
        y = self.y.reshape(-1, shape[-1])
        n = y.shape[0]
        if self._labels is not None:
            dx = y.copy()
            dx[np.arange(n), self._labels] -= 1
        else:
            dx = y - self._target
        if n:
            dx *= dout / n
        return dx.reshape(shape)


# --------------------------------------------------------------------------
# book 2, chapter 1: Repeat and Sum nodes
# --------------------------------------------------------------------------


class Repeat(_Layer):
    """out = x repeated N times along axis 0 ((1, D) -> (N, D));  dx = sum(dout, axis=0, keepdims)."""

    def __init__(self, N):
        super().__init__()
        if isinstance(N, (bool, np.bool_)) or not isinstance(N, (int, np.integer)) or N < 0:
            raise ValueError(f"Repeat: N must be a non-negative integer, got {N!r}")
        self.N = int(N)
        self._x_shape = None

    def forward(self, x):
        x = _numeric(x, "x", "Repeat")
        if x.ndim < 1 or x.shape[0] != 1:
            raise ValueError(f"Repeat.forward: x must have shape (1, ...), got {x.shape}")
        self._x_shape = x.shape
        return np.repeat(x, self.N, axis=0)

    def backward(self, dout):
        if self._x_shape is None:
            raise _backward_before_forward("Repeat")
        dout = _check_dout(dout, (self.N,) + self._x_shape[1:], "Repeat")
        return np.sum(dout, axis=0, keepdims=True)


class Sum(_Layer):
    """out = sum(x, axis=0, keepdims) ((N, D) -> (1, D));  dx = dout repeated N times along axis 0."""

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def forward(self, x):
        x = _numeric(x, "x", "Sum")
        if x.ndim < 1:
            raise ValueError("Sum.forward: x must have ndim >= 1 (N, ...), got a scalar")
        self._x_shape = x.shape
        return np.sum(x, axis=0, keepdims=True)

    def backward(self, dout):
        if self._x_shape is None:
            raise _backward_before_forward("Sum")
        dout = _check_dout(dout, (1,) + self._x_shape[1:], "Sum")
        return np.repeat(dout, self._x_shape[0], axis=0)


# --------------------------------------------------------------------------
# book 1, chapters 6-7: Dropout, BatchNormalization, Convolution, Pooling
# --------------------------------------------------------------------------
# The book's algorithms in plain NumPy (im2col/col2im with a loop over the
# filter positions), with these deliberate differences: im2col/col2im keep a
# float input's dtype (the book's always allocate float64), output sizes that
# do not divide evenly are floored like the book's im2col but a filter larger
# than the padded input, stride <= 0, pad < 0 or a channel mismatch raise
# ValueError; Pooling's output size counts the padding (the book's formula
# ignores `pad` and then fails to reshape); gradients are written in place into
# `grads` (converted to their dtype).

__all__ += ["Dropout", "BatchNormalization", "Convolution", "Pooling"]


def _check_int(value, name, owner, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _conv_out_size(size, filt, stride, pad, what, owner):
    """(size + 2*pad - filt) // stride + 1, or ValueError when the filter does not fit the padded input."""
    if filt > size + 2 * pad:
        raise ValueError(
            f"{owner}: the {what} filter size {filt} is larger than the padded input "
            f"({size} + 2*{pad} = {size + 2 * pad})"
        )
    return (size + 2 * pad - filt) // stride + 1


def _float_of(a):
    """The dtype im2col/col2im compute in: a float input's own, else float64 (as the book)."""
    return a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)


def im2col_np(x, filter_h, filter_w, stride=1, pad=0):
    """(N, C, H, W) -> (N*OH*OW, C*FH*FW): row (n, i, j) holds the padded window at (i*stride, j*stride)."""
    N, C, H, W = x.shape
    oh = (H + 2 * pad - filter_h) // stride + 1
    ow = (W + 2 * pad - filter_w) // stride + 1
    img = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], "constant")
    col = np.zeros((N, C, filter_h, filter_w, oh, ow), _float_of(x))
    for dy in range(filter_h):
        for dx in range(filter_w):
            col[:, :, dy, dx, :, :] = img[:, :, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(N * oh * ow, C * filter_h * filter_w)


def col2im_np(col, input_shape, filter_h, filter_w, stride=1, pad=0):
    """Adjoint of im2col_np: every column entry added back to the input position it was read from."""
    N, C, H, W = input_shape
    oh = (H + 2 * pad - filter_h) // stride + 1
    ow = (W + 2 * pad - filter_w) // stride + 1
    col = col.reshape(N, oh, ow, C, filter_h, filter_w).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((N, C, H + 2 * pad + stride - 1, W + 2 * pad + stride - 1), _float_of(col))
    for dy in range(filter_h):
        for dx in range(filter_w):
            img[:, :, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride] += col[:, :, dy, dx, :, :]
    return img[:, :, pad : H + pad, pad : W + pad]


def _write_grad(grads, i, value, owner="layer"):
    """grads[i][...] = value in place (see _store_grad)."""
    _store_grad(grads, i, np.asarray(value), owner)


class Dropout(_Layer):
    """train: mask = rand(*x.shape) > ratio, out = x * mask;  test: out = x * (1 - ratio);  dx = dout * mask.

    The mask is drawn exactly as the book draws it (``np.random.rand``), so
    ``np.random.seed`` reproduces the book's masks.
    """

    def __init__(self, dropout_ratio=0.5):
        super().__init__()
        if (
            isinstance(dropout_ratio, (bool, np.bool_))
            or not isinstance(dropout_ratio, (int, float, np.number))
            or not 0 <= dropout_ratio <= 1
        ):
            raise ValueError(f"Dropout: dropout_ratio must be a number in [0, 1], got {dropout_ratio!r}")
        self.dropout_ratio = dropout_ratio
        self.mask = None

    def forward(self, x, train_flg=True):
        x = _numeric(x, "x", "Dropout")
        if train_flg:
            self.mask = np.random.rand(*x.shape) > self.dropout_ratio
            return x * self.mask
        return x * (1.0 - self.dropout_ratio)

    def backward(self, dout):
        if self.mask is None:
            raise _backward_before_forward("Dropout")
        dout = _check_dout(dout, self.mask.shape, "Dropout")
        return dout * self.mask


def _check_gamma_beta(gamma, beta, owner):
    gamma = _numeric(gamma, "gamma", owner)
    beta = _numeric(beta, "beta", owner)
    if gamma.ndim != 1 or beta.shape != gamma.shape:
        raise ValueError(
            f"{owner}: gamma and beta must be 1-D of the same length, got shapes {gamma.shape} and {beta.shape}"
        )
    return gamma, beta


class BatchNormalization(_Layer):
    """train: xn = (x - mean) / sqrt(var + 1e-6), out = gamma * xn + beta, running stats
    m <- momentum * m + (1 - momentum) * batch stat;  test: the running stats instead.

    Input (N, D) or (N, C, H, W) (flattened to (N, C*H*W) like the book: one
    gamma per C*H*W feature).  Attributes as the book's: ``running_mean``,
    ``running_var`` (float64 zeros at the first forward unless given),
    ``xc``, ``xn``, ``std``, ``batch_size``, ``input_shape``, ``dgamma``,
    ``dbeta``; ``params = [gamma, beta]``, ``grads = [dgamma, dbeta]``.
    """

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None):
        super().__init__()
        gamma, beta = _check_gamma_beta(gamma, beta, "BatchNormalization")
        self.params = [gamma, beta]
        self.grads = [np.zeros(gamma.shape, _float_of(gamma)), np.zeros(beta.shape, _float_of(beta))]
        self.momentum = momentum
        self.input_shape = None
        self.running_mean = running_mean
        self.running_var = running_var
        self.batch_size = None
        self.xc = None
        self.xn = None
        self.std = None

    gamma = property(lambda self: self.params[0], lambda self, v: self.params.__setitem__(0, v))
    beta = property(lambda self: self.params[1], lambda self, v: self.params.__setitem__(1, v))
    dgamma = property(lambda self: self.grads[0], lambda self, v: self.grads.__setitem__(0, v))
    dbeta = property(lambda self: self.grads[1], lambda self, v: self.grads.__setitem__(1, v))

    def _flatten(self, x):
        """(x as (N, D), gamma, beta) after the shape checks."""
        owner = "BatchNormalization"
        x = _numeric(x, "x", owner)
        if x.ndim < 2:
            raise ValueError(f"{owner}.forward: x must be (N, D) or (N, C, H, W), got shape {x.shape}")
        gamma, beta = _check_gamma_beta(self.params[0], self.params[1], owner)
        x2 = x.reshape(x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64)))
        if x2.shape[1] != gamma.shape[0]:
            raise ValueError(
                f"{owner}.forward: x of shape {x.shape} has {x2.shape[1]} features per sample "
                f"but gamma has {gamma.shape[0]}"
            )
        for name in ("running_mean", "running_var"):
            r = getattr(self, name)
            if r is not None and np.shape(r) != (x2.shape[1],):
                raise ValueError(f"{owner}.forward: {name} must have shape ({x2.shape[1]},), got {np.shape(r)}")
        return x2, gamma, beta

    def forward(self, x, train_flg=True):
        x2, gamma, beta = self._flatten(x)
        self.input_shape = np.shape(x)
        n, d = x2.shape
        if self.running_mean is None:
            self.running_mean = np.zeros(d)
            self.running_var = np.zeros(d)
        if train_flg:
            if n == 0:
                raise ValueError("BatchNormalization.forward: training needs a non-empty batch")
            mu = x2.mean(axis=0)
            xc = x2 - mu
            var = np.mean(xc**2, axis=0)
            std = np.sqrt(var + 10e-7)
            xn = xc / std
            self.batch_size = n
            self.xc = xc
            self.xn = xn
            self.std = std
            m = self.momentum
            self.running_mean = m * self.running_mean + (1 - m) * mu
            self.running_var = m * self.running_var + (1 - m) * var
        else:
            dt = np.result_type(x2, gamma, beta, np.float16)
            xc = x2 - self.running_mean.astype(dt, copy=False)
            xn = xc / np.sqrt(self.running_var.astype(dt, copy=False) + 10e-7)
        out = gamma * xn + beta
        return out.reshape(self.input_shape)

    def backward(self, dout):
        if self.xn is None:
            raise _backward_before_forward("BatchNormalization")
        dout = _check_dout(dout, self.input_shape, "BatchNormalization")
        dout = dout.reshape(self.xn.shape)
        gamma = self.params[0]
        n = self.batch_size
        dbeta = dout.sum(axis=0)
        dgamma = np.sum(self.xn * dout, axis=0)
        dxn = gamma * dout
        dxc = dxn / self.std
        dstd = -np.sum((dxn * self.xc) / (self.std * self.std), axis=0)
        dvar = 0.5 * dstd / self.std
        dxc += (2.0 / n) * self.xc * dvar
        dmu = np.sum(dxc, axis=0)
        dx = dxc - dmu / n
        _write_grad(self.grads, 0, dgamma)
        _write_grad(self.grads, 1, dbeta)
        return dx.reshape(self.input_shape)


def _check_conv_weight(W, b, owner):
    W = _numeric(W, "W", owner)
    b = _numeric(b, "b", owner)
    if W.ndim != 4:
        raise ValueError(f"{owner}: W must be 4-D (FN, C, FH, FW), got shape {W.shape}")
    if b.shape != (W.shape[0],):
        raise ValueError(f"{owner}: b must have shape ({W.shape[0]},) to match W of shape {W.shape}, got {b.shape}")
    return W, b


def _check_image(x, owner, channels=None):
    x = _numeric(x, "x", owner)
    if x.ndim != 4:
        raise ValueError(f"{owner}.forward: x must be 4-D (N, C, H, W), got shape {x.shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{owner}.forward: x has {x.shape[1]} channels (shape {x.shape}) but W expects {channels}")
    return x


class Convolution(_Layer):
    """out[n, f] = sum over c, window of W[f, c] * x_padded[n, c, window] + b[f] (stride, pad), via im2col.

    ``W`` (FN, C, FH, FW) and ``b`` (FN,) are held by reference and read at
    every forward.  Attributes as the book's: ``x``, ``col`` (N*OH*OW, C*FH*FW),
    ``col_W`` (C*FH*FW, FN), ``dW``, ``db``; ``params = [W, b]``,
    ``grads = [dW, db]`` written in place.
    """

    def __init__(self, W, b, stride=1, pad=0):
        super().__init__()
        W, b = _check_conv_weight(W, b, "Convolution")
        self.stride = _check_int(stride, "stride", "Convolution", 1)
        self.pad = _check_int(pad, "pad", "Convolution", 0)
        self.params = [W, b]
        self.grads = [np.zeros(W.shape, _float_of(W)), np.zeros(b.shape, _float_of(b))]
        self.x = None
        self.col = None
        self.col_W = None
        self._out_shape = None

    W = property(lambda self: self.params[0], lambda self, v: self.params.__setitem__(0, v))
    b = property(lambda self: self.params[1], lambda self, v: self.params.__setitem__(1, v))
    dW = property(lambda self: self.grads[0], lambda self, v: self.grads.__setitem__(0, v))
    db = property(lambda self: self.grads[1], lambda self, v: self.grads.__setitem__(1, v))

    def _geometry(self, x):
        """(W, b, x, OH, OW) after the checks."""
        W, b = _check_conv_weight(self.params[0], self.params[1], "Convolution")
        x = _check_image(x, "Convolution", W.shape[1])
        fh, fw = W.shape[2:]
        oh = _conv_out_size(x.shape[2], fh, self.stride, self.pad, "height", "Convolution.forward")
        ow = _conv_out_size(x.shape[3], fw, self.stride, self.pad, "width", "Convolution.forward")
        return W, b, x, oh, ow

    def forward(self, x):
        W, b, x, oh, ow = self._geometry(x)
        fn, _, fh, fw = W.shape
        n = x.shape[0]
        col = im2col_np(x, fh, fw, self.stride, self.pad)
        col_W = W.reshape(fn, -1).T
        out = col @ col_W + b
        out = out.reshape(n, oh, ow, fn).transpose(0, 3, 1, 2)
        self._out_shape = out.shape
        self.x = x
        self.col = col
        self.col_W = col_W
        return out

    def backward(self, dout, *, need_dx=True):
        """dW, db written in place; returns dx, or None with ``need_dx=False`` (a fastbp extension, not in the
        book: a network's first layer skips the dcol product and col2im)."""
        if self.col is None:
            raise _backward_before_forward("Convolution")
        W = self.params[0]
        fn, c, fh, fw = W.shape
        shape = self._out_shape
        dout = _numeric(dout, "dout", "Convolution")
        if dout.shape != shape:
            raise ValueError(
                f"Convolution.backward: dout must have the forward output's shape {shape}, got {dout.shape}"
            )
        d2 = dout.transpose(0, 2, 3, 1).reshape(-1, fn)
        _write_grad(self.grads, 1, np.sum(d2, axis=0))
        _write_grad(self.grads, 0, (self.col.T @ d2).T.reshape(fn, c, fh, fw))
        if not need_dx:
            return None
        dcol = d2 @ self.col_W.T
        return col2im_np(dcol, self.x.shape, fh, fw, self.stride, self.pad)


class Pooling(_Layer):
    """Max pooling: out[n, c, i, j] = max of the (pool_h, pool_w) window at (i*stride, j*stride) of the
    zero-padded input; backward sends dout to the window's (first) arg-max.

    ``arg_max`` is the book's: the position of the max inside each window, flat
    over (pool_h, pool_w), one entry per output in (N, OH, OW, C) order.
    Padding is zeros, as the book's im2col pads.
    """

    def __init__(self, pool_h, pool_w, stride=1, pad=0):
        super().__init__()
        self.pool_h = _check_int(pool_h, "pool_h", "Pooling", 1)
        self.pool_w = _check_int(pool_w, "pool_w", "Pooling", 1)
        self.stride = _check_int(stride, "stride", "Pooling", 1)
        self.pad = _check_int(pad, "pad", "Pooling", 0)
        self.x = None
        self.arg_max = None
        self._out_shape = None

    def _geometry(self, x):
        x = _check_image(x, "Pooling")
        oh = _conv_out_size(x.shape[2], self.pool_h, self.stride, self.pad, "height", "Pooling.forward")
        ow = _conv_out_size(x.shape[3], self.pool_w, self.stride, self.pad, "width", "Pooling.forward")
        return x, oh, ow

    def forward(self, x):
        x, oh, ow = self._geometry(x)
        n, c = x.shape[:2]
        col = im2col_np(x, self.pool_h, self.pool_w, self.stride, self.pad)
        col = col.reshape(-1, self.pool_h * self.pool_w)
        arg_max = np.argmax(col, axis=1)
        out = np.max(col, axis=1).reshape(n, oh, ow, c).transpose(0, 3, 1, 2)
        self.x = x
        self.arg_max = arg_max
        self._out_shape = out.shape
        return out

    def backward(self, dout):
        if self.arg_max is None:
            raise _backward_before_forward("Pooling")
        n, c = self.x.shape[:2]
        dout = _numeric(dout, "dout", "Pooling")
        if dout.shape != self._out_shape:
            raise ValueError(
                f"Pooling.backward: dout must have the forward output's shape {self._out_shape}, got {dout.shape}"
            )
        d = dout.transpose(0, 2, 3, 1)
        size = self.pool_h * self.pool_w
        dmax = np.zeros((d.size, size), _float_of(d))
        dmax[np.arange(self.arg_max.size), self.arg_max.reshape(-1)] = d.reshape(-1)
        return col2im_np(dmax, self.x.shape, self.pool_h, self.pool_w, self.stride, self.pad)


from fastbp.reference_time import *  # noqa: E402,F401,F403  book 2's layers (Embedding, Time*, negative sampling)
