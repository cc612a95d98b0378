"""The book's activation and loss functions (``common/functions.py``), in NumPy.

Same names and semantics as *Deep Learning from Scratch* book 1, except that
``sigmoid`` and ``softmax`` never overflow and bad inputs raise clear errors.
Integer and bool inputs promote as ``np.exp`` promotes them (the book's
formulas do exactly that): int8/uint8/bool -> float16, int16/uint16 ->
float32, wider integers -> float64 -- the rule of
:func:`fastbp.reference.exp_dtype`, shared with the layers, so
``sigmoid(x)`` and ``fastbp.layers.Sigmoid().forward(x)`` have one dtype.
``cross_entropy_error`` (and so ``softmax_loss``) deliberately keeps the book's
``log(y + 1e-7)``; the layer ``SoftmaxWithLoss`` uses the exact log-sum-exp
loss instead.
"""

import warnings

import numpy as np

from fastbp.reference import _floating, _stable_sigmoid
from fastbp.reference import _numeric as _real  # np.asarray restricted to bool/int/float, TypeError otherwise

__all__ = [
    "identity_function",
    "step_function",
    "sigmoid",
    "sigmoid_grad",
    "relu",
    "relu_grad",
    "softmax",
    "cross_entropy_error",
    "softmax_loss",
]


def _float(x, name, func):
    """np.asarray(x) as floating point (bool/int promoted as np.exp promotes them: int16 -> float32, ...)."""
    return _floating(x, name, func)


def identity_function(x):
    """y = x."""
    return x


def step_function(x):
    """y = 1 where x > 0 else 0 (int array)."""
    return np.array(np.asarray(x) > 0, dtype=int)


def sigmoid(x):
    """y = 1 / (1 + exp(-x)), computed from exp(-|x|) so it never overflows (float32/float64: one kernel pass)."""
    x = _float(x, "x", "sigmoid")
    if x.dtype in (np.float32, np.float64) and x.dtype.isnative:
        from fastbp import _kernels

        xc = x if x.flags.c_contiguous else x.copy()  # (ascontiguousarray would make a 0-d input 1-d)
        return _kernels.sigmoid_forward(xc, np.empty(xc.shape, xc.dtype))
    return _stable_sigmoid(x)  # float16 and other byte orders: the reference's NumPy form


def sigmoid_grad(x):
    """dy/dx = (1 - sigmoid(x)) * sigmoid(x)."""
    s = sigmoid(x)
    return (1.0 - s) * s


def relu(x):
    """y = max(0, x)."""
    return np.maximum(0, x)


def relu_grad(x):
    """dy/dx = 1 where x >= 0 else 0 (the book's convention: 1 at x == 0), dtype of x."""
    x = _real(x, "x", "relu_grad")
    grad = np.zeros_like(x)
    grad[x >= 0] = 1
    return grad


def softmax(x):
    """y = exp(x - max(x)) / sum(exp(x - max(x))) along the last axis of 1-D (C,) or 2-D (N, C) x."""
    x = _float(x, "x", "softmax")
    if x.ndim not in (1, 2):
        raise ValueError(f"softmax: x must be 1-D (C,) or 2-D (N, C), got shape {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError(f"softmax: need at least one class, got x of shape {x.shape}")
    e = x - np.max(x, axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= np.sum(e, axis=-1, keepdims=True)
    return e


def cross_entropy_error(y, t):
    """E = -sum(log(y[i, t_i] + 1e-7)) / N with y probabilities and t labels (N,) or one-hot (N, C).

    This is the book's function, ``+1e-7`` included (so E <= -log(1e-7) ~ 16.1
    even for y = 0, and E ~ 1e-7 rather than 0 for a perfect prediction).  1-D
    ``y`` is one sample; one-hot ``t`` (``t.size == y.size``) is turned into
    labels with ``argmax``.  An empty batch gives nan with a RuntimeWarning.
    """
    y = _float(y, "y", "cross_entropy_error")
    t = _real(t, "t", "cross_entropy_error")
    if y.ndim == 1:
        t = t.reshape(1, t.size)
        y = y.reshape(1, y.size)
    if y.ndim != 2:
        raise ValueError(f"cross_entropy_error: y must be 1-D (C,) or 2-D (N, C), got shape {y.shape}")
    n, c = y.shape
    if t.ndim == 2 and t.shape[0] == 1 and n == 1 and t.size != y.size:
        t = t.reshape(1)  # a single sample's label after the 1-D reshape
    if n == 0:
        if t.shape not in ((0,), (0, c)):
            raise ValueError(
                f"cross_entropy_error: t must have shape (0,) or {(0, c)} for y of shape {y.shape}, got {t.shape}"
            )
        warnings.warn("cross_entropy_error: empty batch (N=0); the error is nan", RuntimeWarning, stacklevel=2)
        return y.dtype.type(np.nan)
    if t.shape == (n, c):  # one-hot -> labels (the book's t.size == y.size rule)
        t = t.argmax(axis=1)
    elif t.size == y.size and c > 1:
        raise ValueError(f"cross_entropy_error: one-hot t must have shape {(n, c)} like y, got {t.shape}")
    else:
        if t.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy_error: class labels must be integers, got dtype {t.dtype}")
        if t.shape != (n,):
            raise ValueError(
                f"cross_entropy_error: t must be {n} label(s) of shape ({n},) or one-hot "
                f"of shape {(n, c)} for y of shape {y.shape}, got shape {t.shape}"
            )
        lo, hi = t.min(), t.max()
        if lo < 0 or hi >= c:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"cross_entropy_error: label {bad} out of range for C={c} classes (labels must be in [0, {c - 1}])"
            )
    return -np.sum(np.log(y[np.arange(n), t] + 1e-7)) / n


def softmax_loss(X, t):
    """E = cross_entropy_error(softmax(X), t) (the book's composition, with its +1e-7)."""
    y = softmax(X)
    return cross_entropy_error(y, t)
