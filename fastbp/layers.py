"""The layers of *Deep Learning from Scratch* (books 1 and 2) on fastbp's Cython kernels.

Drop-in for the book's ``common/layers.py``: same class names, constructor arguments, attributes and return
values.  What differs on purpose:

* ``Relu.backward`` does not overwrite the caller's ``dout`` (the book's sets ``dout[mask] = 0`` in place).
* ``SoftmaxWithLoss`` computes the loss exactly as ``logsumexp(x) - x[t]`` instead of the book's
  ``-log(y + 1e-7)``; the two agree to about 1e-7 except where y underflows, where the book's value is capped
  at ``-log(1e-7) = 16.1`` and ours is the true loss.
* ``Affine`` writes ``dW``/``db`` into the same arrays at every backward (``layer.grads[0] is layer.dW``, as the
  book-2 layers do with ``grads[0][...] = dW``).

Every layer also takes ``reuse=False``: with ``reuse=True`` (the networks of :mod:`fastbp.nets` set it) the
forward and backward results are written into per-layer workspaces that are reused at the next call of the same
shape, so a training step allocates nothing after warm-up; an array returned by one call is then overwritten by
the next call, as in any framework's workspace.  With the default, every call returns new arrays like the book.

dtypes: float32 and float64 run in the kernels; mixed inputs follow NumPy's promotion (``np.result_type``), so
float32 images with float64 weights compute in float64 like the book (the converted copy lives in a scratch
buffer the layer keeps for the next call: operands converted for the kernels are never handed back).  Integer inputs are promoted by NumPy's
rules; float16 and other types fall back to :mod:`fastbp.reference` (plain NumPy) where NumPy's own rules give
an answer, and raise TypeError where they do not.  Any memory layout is accepted; a copy is made once where a
kernel needs contiguity.
"""
import math
import warnings

import numpy as np

from fastbp import _kernels as _k
from fastbp import reference as _ref
from fastbp.reference import AddLayer, MulLayer, Repeat, Sum  # scalar/broadcast nodes: no hot loop to speed up

__all__ = ["MulLayer", "AddLayer", "Relu", "Sigmoid", "Affine", "MatMul", "SoftmaxWithLoss", "Repeat", "Sum"]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_KERNEL_DTYPES = (_F32, _F64)
_I64 = np.dtype(np.int64)
_BOOL = np.dtype(np.bool_)
# The fast paths below take the common case (native float32/float64 ndarrays of matching dtypes) straight to the
# kernel, whose own checks reject anything else; every other input goes through the general path, which
# converts what NumPy's rules allow and raises with a message naming expected and actual.


def _native(a):
    """`a` as a native-byte-order ndarray (converted once if it is not)."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def _float_dtype(*arrays):
    """NumPy's result dtype of the operands, or TypeError when the kernels cannot compute in it."""
    dt = np.result_type(*arrays)
    if dt not in _KERNEL_DTYPES:
        raise TypeError(f"fastbp computes in float32 or float64; these inputs promote to {dt} "
                        f"(dtypes {', '.join(str(np.asarray(a).dtype) for a in arrays)})")
    return dt


class _Workspace:
    """Arrays a layer owns, reused between calls of the same shape when `reuse` is on."""
    __slots__ = ("reuse", "_bufs")

    def __init__(self, reuse):
        self.reuse = bool(reuse)
        self._bufs = {}

    def get(self, name, shape, dtype):
        """A buffer for a result handed back to the caller: new each call unless reuse is on."""
        if not self.reuse:
            return np.empty(shape, dtype)
        return self.scratch(name, shape, dtype)

    def scratch(self, name, shape, dtype):
        """A buffer the layer keeps to itself (converted operands): always reused for the same shape."""
        a = self._bufs.get(name)
        if a is None or a.shape != shape or a.dtype is not dtype and a.dtype != dtype:
            a = np.empty(shape, dtype)
            self._bufs[name] = a
        return a

    def as_dtype(self, name, a, dtype):
        """`a` as a C-contiguous array of native `dtype`: itself if it is one, else a copy into the layer's
        private scratch (never handed back to the caller, so it is reused whatever `reuse` says)."""
        if a.dtype == dtype and a.dtype.isnative and a.flags.c_contiguous:
            return a
        out = self.scratch(name, a.shape, dtype)
        np.copyto(out, a, casting="unsafe")
        return out


class _Layer:
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @property
    def reuse(self):
        return self._ws.reuse

    @reuse.setter
    def reuse(self, value):
        self._ws.reuse = bool(value)


def _check_backward_ready(layer, what):
    if getattr(layer, what) is None:
        raise RuntimeError(f"{type(layer).__name__}.backward called before forward")


# ---------------------------------------------------------------------------------------------------------------
class Relu(_Layer):
    """out = max(x, 0); backward: dx = dout where x > 0 else 0.  ``mask`` is ``x <= 0`` like the book's.

    Unlike the book, ``backward`` leaves ``dout`` unchanged and returns a new array (or a workspace with
    ``reuse=True``).
    """

    def __init__(self, *, reuse=False):
        self.mask = None
        self._ws = _Workspace(reuse)

    def forward(self, x):
        if type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64):
            ws = self._ws
            out = ws.get("out", x.shape, x.dtype)
            mask = ws.get("mask", x.shape, _BOOL)
            try:
                _k.relu_forward(x, out, mask)
            except ValueError:            # not C-contiguous: the general path copies it once
                return self._forward(x)
            self.mask = mask
            return out
        return self._forward(x)

    def _forward(self, x):
        x = np.asarray(x)
        if x.dtype not in _KERNEL_DTYPES or not x.dtype.isnative:
            if x.dtype.kind == "f" and not x.dtype.isnative:
                x = _native(x)
            else:
                return self._fallback_forward(x)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        ws = self._ws
        out = ws.get("out", x.shape, x.dtype)
        mask = ws.get("mask", x.shape, np.bool_)
        _k.relu_forward(x, out, mask)
        self.mask = mask
        return out

    def _fallback_forward(self, x):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        mask = self.mask
        if (type(dout) is np.ndarray and (dout.dtype is _F32 or dout.dtype is _F64) and mask is not None
                and dout.shape == mask.shape):
            dx = self._ws.get("dx", dout.shape, dout.dtype)
            try:
                _k.relu_backward(dout, mask, dx)
                return dx
            except ValueError:            # a non-contiguous dout or mask: the general path
                pass
        return self._backward(dout)

    def _backward(self, dout):
        _check_backward_ready(self, "mask")
        dout = np.asarray(dout)
        if dout.shape != self.mask.shape:
            raise ValueError(f"dout must have the shape of the forward input {self.mask.shape}, got {dout.shape}")
        if dout.dtype not in _KERNEL_DTYPES or not dout.dtype.isnative:
            if dout.dtype.kind == "f" and not dout.dtype.isnative:
                dout = _native(dout)
            else:
                return np.where(self.mask, np.zeros((), dout.dtype), dout)
        if not dout.flags.c_contiguous:
            dout = np.ascontiguousarray(dout)
        mask = self.mask if self.mask.flags.c_contiguous else np.ascontiguousarray(self.mask)
        dx = self._ws.get("dx", dout.shape, dout.dtype)
        _k.relu_backward(dout, mask, dx)
        return dx


# ---------------------------------------------------------------------------------------------------------------
class Sigmoid(_Layer):
    """out = 1 / (1 + exp(-x)), computed without overflow for any x; backward: dx = dout * (1 - out) * out."""

    def __init__(self, *, reuse=False):
        self.out = None
        self._ws = _Workspace(reuse)

    def forward(self, x):
        x = np.asarray(x)
        if x.dtype not in _KERNEL_DTYPES or not x.dtype.isnative:
            # np.exp's promotion: int16 -> float32, int32 -> float64, int8/bool -> float16 (NumPy path)
            dt = np.result_type(x.dtype, np.float16) if x.dtype.kind in "biu" else x.dtype.newbyteorder("=")
            if dt not in _KERNEL_DTYPES:
                self.out = _ref.Sigmoid().forward(x)
                return self.out
            x = x.astype(dt)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        out = self._ws.get("out", x.shape, x.dtype)
        _k.sigmoid_forward(x, out)
        self.out = out
        return out

    def backward(self, dout):
        _check_backward_ready(self, "out")
        dout = np.asarray(dout)
        y = self.out
        if dout.shape != y.shape:
            raise ValueError(f"dout must have the shape of the forward output {y.shape}, got {dout.shape}")
        dt = np.result_type(dout, y)
        if dt not in _KERNEL_DTYPES:
            return dout * (1.0 - y) * y
        dout = np.ascontiguousarray(dout, dtype=dt) if (dout.dtype != dt or not dout.flags.c_contiguous) else dout
        if y.dtype != dt:
            y = y.astype(dt)
        dx = self._ws.get("dx", dout.shape, dt)
        _k.sigmoid_backward(dout, y, dx)
        return dx


# ---------------------------------------------------------------------------------------------------------------
def _as_batch(x, layer):
    """Flatten input to (N, D) like the book: `x.reshape(x.shape[0], -1)` (so a 1-D input is N samples of 1)."""
    if x.ndim == 2:
        return x
    if x.ndim == 0:
        raise ValueError(f"{layer} needs an input with at least one dimension, got a scalar")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))   # -1 cannot be inferred for an empty batch


class Affine(_Layer):
    """out = x @ W + b on the input flattened to (N, -1); backward: dx = dout @ W.T, dW = x.T @ dout, db = sum(dout).

    ``W`` and ``b`` are the caller's arrays, held by reference and read at every call (in-place updates such as
    ``W -= lr * dW`` or ``numerical_gradient``'s perturbations are seen).  ``params = [W, b]`` and
    ``grads = [dW, db]`` are the same objects as the attributes; ``dW``/``db`` are written in place at each
    backward.  ``dx`` comes back in the shape of the input.  ``need_dx = False`` makes ``backward`` skip ``dx``
    (and return None): the first layer of a network does not need it.
    """

    def __init__(self, W, b, *, reuse=False, need_dx=True):
        W = np.asarray(W)
        b = np.asarray(b)
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (input size, output size), got shape {W.shape}")
        if b.ndim != 1 or b.shape[0] != W.shape[1]:
            raise ValueError(f"b must have shape ({W.shape[1]},) to match W {W.shape}, got {b.shape}")
        self.params = [W, b]
        self.grads = [np.zeros(W.shape, W.dtype if W.dtype in _KERNEL_DTYPES else _F64),
                      np.zeros(b.shape, b.dtype if b.dtype in _KERNEL_DTYPES else _F64)]
        self.x = None
        self.original_x_shape = None
        self.need_dx = need_dx
        self._xk = None
        self._ws = _Workspace(reuse)

    W = property(lambda self: self.params[0], lambda self, v: self.params.__setitem__(0, v))
    b = property(lambda self: self.params[1], lambda self, v: self.params.__setitem__(1, v))
    dW = property(lambda self: self.grads[0], lambda self, v: self.grads.__setitem__(0, v))
    db = property(lambda self: self.grads[1], lambda self, v: self.grads.__setitem__(1, v))

    def _operands(self, x2):
        W, b = self.params
        dt = x2.dtype
        if not (dt is W.dtype and dt is b.dtype and dt in _KERNEL_DTYPES):
            dt = _float_dtype(x2, W, b)
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D, got shape {W.shape}")
        if b.ndim != 1 or b.shape[0] != W.shape[1]:
            raise ValueError(f"b must have shape ({W.shape[1]},) to match W {W.shape}, got {b.shape}")
        if W.dtype != dt or not W.dtype.isnative:
            W = self._ws.as_dtype("W", W, dt)      # promoted weights: a reused copy, refreshed every call
        if b.dtype != dt or not b.dtype.isnative:
            b = self._ws.as_dtype("b", b, dt)
        return dt, W, b

    def forward(self, x):
        W, b = self.params
        if type(x) is np.ndarray and x.ndim == 2 and W.ndim == 2:
            dt = x.dtype
            if (dt is _F32 or dt is _F64) and W.dtype is dt and b.dtype is dt:
                out = self._ws.get("out", (x.shape[0], W.shape[1]), dt)
                _k.affine_forward(x, W, b, out)     # checks the shapes, reads any strided layout in place
                self.original_x_shape = x.shape
                self.x = x
                self._xk = x
                return out
        return self._forward(x)

    def _forward(self, x):
        x = np.asarray(x)
        self.original_x_shape = x.shape
        x2 = _as_batch(x, "Affine")
        dt, W, b = self._operands(x2)
        if x2.shape[1] != W.shape[0]:
            hint = " (for a single 1-D sample use x.reshape(1, -1))" if x.ndim == 1 else ""
            raise ValueError(f"input has {x2.shape[1]} features per sample (shape {x.shape}) but W expects "
                             f"{W.shape[0]} (W shape {W.shape}){hint}")
        xk = self._ws.as_dtype("x", x2, dt) if (x2.dtype != dt or not x2.dtype.isnative) else x2
        out = self._ws.get("out", (x2.shape[0], W.shape[1]), dt)
        _k.affine_forward(xk, W, b, out)
        self.x = x2
        self._xk = xk
        return out

    def backward(self, dout):
        xk = self._xk
        W = self.params[0]
        if xk is not None and type(dout) is np.ndarray:
            dt = xk.dtype
            dW, db = self.grads
            if (dout.dtype is dt and W.dtype is dt and dW.dtype is dt and db.dtype is dt and W.ndim == 2
                    and dout.shape == (xk.shape[0], W.shape[1]) and dW.shape == W.shape):
                dx = self._ws.get("dx", xk.shape, dt) if self.need_dx else None
                try:
                    _k.affine_backward(dout, xk, W, dx, dW, db)
                except ValueError:        # read-only or non-contiguous grads: the general path replaces them
                    return self._backward(dout)
                if dx is None or len(self.original_x_shape) == 2:
                    return dx
                return dx.reshape(self.original_x_shape)
        return self._backward(dout)

    def _backward(self, dout):
        _check_backward_ready(self, "_xk")
        xk = self._xk
        dout = np.asarray(dout)
        n = xk.shape[0]
        dt, W, _ = self._operands(xk)
        m = W.shape[1]
        if dout.shape != (n, m):
            raise ValueError(f"dout must have the shape of the forward output {(n, m)}, got {dout.shape}")
        if dout.dtype is not dt:
            dt2 = np.result_type(dout, dt)
            if dt2 not in _KERNEL_DTYPES:
                raise TypeError(f"dout of dtype {dout.dtype} cannot be combined with {dt}")
            if dt2 != dt:          # a wider dout widens the gradients, as NumPy would
                dt = dt2
                W = self._ws.as_dtype("Wb", W, dt)
                xk = self._ws.as_dtype("xb", xk, dt)
            dout = self._ws.as_dtype("dout", _native(dout), dt)
        if not dout.flags.c_contiguous:
            dout = np.ascontiguousarray(dout)
        dW, db = self.grads
        if dW.dtype != dt or dW.shape != W.shape or not dW.flags.c_contiguous or not dW.flags.writeable:
            dW = self.grads[0] = np.zeros(W.shape, dt)
        if db.dtype != dt or db.shape != (m,) or not db.flags.writeable:
            db = self.grads[1] = np.zeros((m,), dt)
        if self.need_dx:
            dx = self._ws.get("dx", xk.shape, dt)
            _k.affine_backward(dout, xk, W, dx, dW, db)
            return dx.reshape(self.original_x_shape)
        _k.affine_backward(dout, xk, W, None, dW, db)
        return None


# ---------------------------------------------------------------------------------------------------------------
class MatMul(_Layer):
    """Book 2's MatMul: out = x @ W; backward: dx = dout @ W.T, grads[0][...] = x.T @ dout."""

    def __init__(self, W, *, reuse=False):
        W = np.asarray(W)
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D, got shape {W.shape}")
        self.params = [W]
        self.grads = [np.zeros(W.shape, W.dtype if W.dtype in _KERNEL_DTYPES else _F64)]
        self.x = None
        self._xk = None
        self._ws = _Workspace(reuse)

    W = property(lambda self: self.params[0], lambda self, v: self.params.__setitem__(0, v))
    dW = property(lambda self: self.grads[0], lambda self, v: self.grads.__setitem__(0, v))

    def _operand(self, name, a, dt):
        """`a` itself when the GEMM can read it (any strides), else converted into the layer's scratch."""
        return a if a.dtype == dt and a.dtype.isnative else self._ws.as_dtype(name, a, dt)

    def forward(self, x):
        x = np.asarray(x)
        W = self.params[0]
        if x.ndim != 2:
            raise ValueError(f"MatMul input must be 2-D (N, D), got shape {x.shape}")
        if x.shape[1] != W.shape[0]:
            raise ValueError(f"input has {x.shape[1]} columns but W has {W.shape[0]} rows (W {W.shape})")
        dt = _float_dtype(x, W)
        xk = self._operand("x", x, dt)
        Wk = self._operand("W", W, dt)
        out = self._ws.get("out", (x.shape[0], W.shape[1]), dt)
        _k.gemm(xk, Wk, out)
        self.x = x
        self._xk = xk
        return out

    def backward(self, dout):
        _check_backward_ready(self, "_xk")
        W = self.params[0]
        xk = self._xk
        dout = np.asarray(dout)
        if dout.shape != (xk.shape[0], W.shape[1]):
            raise ValueError(f"dout must have shape {(xk.shape[0], W.shape[1])}, got {dout.shape}")
        dt = _float_dtype(dout, xk, W)
        dout = self._operand("dout", dout, dt)
        xk = self._operand("xb", xk, dt)
        Wk = self._operand("W", W, dt)
        dW = self.grads[0]
        if dW.dtype != dt or dW.shape != W.shape or not dW.flags.c_contiguous:
            dW = self.grads[0] = np.zeros(W.shape, dt)
        dx = self._ws.get("dx", xk.shape, dt)
        _k.gemm(dout, Wk, dx, trans_b=True)
        _k.gemm(xk, dout, dW, trans_a=True)
        return dx


# ---------------------------------------------------------------------------------------------------------------
class SoftmaxWithLoss(_Layer):
    """loss = mean over the batch of logsumexp(x) - x[t]; y = softmax(x); backward: dx = dout * (y - t) / N.

    ``t`` is integer labels (N,), one-hot (or probability) rows (N, C), or for a single 1-D sample a scalar label
    or a 1-D one-hot vector.  The loss is the exact log-sum-exp form, not the book's ``-log(y + 1e-7)`` (equal to
    ~1e-7 where the book's is not capped).  The gradient is computed in the same pass as the loss.  An empty
    batch gives a NaN loss with a RuntimeWarning.
    """

    def __init__(self, *, reuse=False):
        self.loss = None
        self.y = None
        self.t = None
        self._g = None
        self._ws = _Workspace(reuse)

    def forward(self, x, t):
        if (type(x) is np.ndarray and type(t) is np.ndarray and x.ndim == 2 and t.ndim == 1
                and (x.dtype is _F32 or x.dtype is _F64) and x.shape[0] > 0 and t.dtype.kind in "iu"):
            ws = self._ws
            n = x.shape[0]
            tk = t
            if t.dtype is not _I64:       # e.g. the book's uint8 labels; the kernel range-checks the copy
                tk = ws.scratch("t", t.shape, _I64)
                np.copyto(tk, t, casting="unsafe")
            y = ws.get("y", x.shape, x.dtype)
            g = ws.get("g", x.shape, x.dtype)
            try:
                loss = _k.softmax_cross_entropy(x, tk, y, g, 1.0 / n) / n
            except ValueError:            # non-contiguous input or bad labels: the general path says which
                return self._forward(x, t)
            self.t = t
            self.y = y
            self._g = g
            self.loss = loss
            return loss
        return self._forward(x, t)

    def _forward(self, x, t):
        x = np.asarray(x)
        t_in = t
        t = np.asarray(t)
        if x.ndim not in (1, 2):
            raise ValueError(f"logits must be 1-D (one sample) or 2-D (N, C), got shape {x.shape}")
        dt = x.dtype
        if dt not in _KERNEL_DTYPES or not dt.isnative:
            # NumPy's promotion of np.exp: int16 -> float32, int32 -> float64; float16/int8 stay on the NumPy path
            dt = np.result_type(dt, np.float16) if dt.kind in "biu" else dt.newbyteorder("=")
            if dt not in _KERNEL_DTYPES:
                return self._fallback(x, t_in)
        single = x.ndim == 1
        x2 = x.reshape(1, -1) if single else x
        n, c = x2.shape
        tk = self._targets(t, x2, single)
        if tk.ndim == 2 and tk.dtype.kind == "f" and tk.dtype != dt:
            dt = _float_dtype(dt, tk.dtype)          # y - t promotes like NumPy (float32 logits, float64 rows)
        ws = self._ws
        xk = ws.as_dtype("x", x2, dt)
        if tk.ndim == 2:
            tk = ws.as_dtype("t1h", tk, dt)     # integer one-hot rows convert exactly
        y = ws.get("y", xk.shape, dt)
        g = ws.get("g", xk.shape, dt)
        if n == 0:
            warnings.warn("SoftmaxWithLoss: empty batch, the loss is NaN", RuntimeWarning, stacklevel=2)
            loss = float("nan")
        else:
            loss = _k.softmax_cross_entropy(xk, tk, y, g, 1.0 / n) / n
        self.t = t_in
        self.y = y.reshape(x.shape) if single else y
        self._g = g.reshape(x.shape) if single else g
        self.loss = loss
        return loss

    def _targets(self, t, x2, single):
        """Validated targets: int64 labels (N,) (in a workspace when converted) or one-hot rows (N, C)."""
        n, c = x2.shape
        kind = t.dtype.kind
        if kind in "iu":
            if single and (t.ndim == 0 or (t.shape == (1,) and c != 1)):
                t = t.reshape(1)
            elif single and t.shape == (c,):
                return t.reshape(1, c)                   # an integer one-hot vector, as the book accepts
            elif t.ndim == 2 and t.shape == x2.shape:
                return t
            elif single or t.ndim != 1:
                expected = "a scalar label or one-hot shape" if single else f"labels ({n},) or one-hot shape"
                raise ValueError(f"targets must be {expected} {x2.shape[1:] if single else x2.shape}, got {t.shape}")
            elif t.shape[0] != n:
                raise ValueError(f"expected {n} labels (one per row of logits {x2.shape}), got {t.shape[0]}")
            if t.dtype == np.int64 and t.flags.c_contiguous and t.dtype.isnative:
                return t
            if t.size and (t.min() < 0 or (kind == "u" and t.max() > c)):
                bad = t.min() if t.min() < 0 else t.max()
                raise ValueError(f"label {bad} is out of range: labels must be in [0, {c - 1}]")
            tk = self._ws.scratch("t", t.shape, _I64)
            np.copyto(tk, t, casting="unsafe")
            return tk
        if kind == "f":
            if single and t.shape == (c,):
                t = t.reshape(1, c)
            elif t.ndim < 2:
                raise TypeError(f"labels must be integers, got {t.dtype} array of shape {t.shape} "
                                f"(one-hot targets must have the shape of the logits {x2.shape})")
            if t.shape != x2.shape:
                raise ValueError(f"one-hot targets must have the shape of the logits {x2.shape}, got {t.shape}")
            return t if t.dtype.isnative else _native(t)
        raise TypeError(f"targets must be integer labels or float one-hot rows, got dtype {t.dtype}")

    def _fallback(self, x, t):
        """float16 / int8 logits: NumPy's own promotion, computed by the reference layer."""
        ref = _ref.SoftmaxWithLoss()
        loss = ref.forward(x, t)
        self._g = ref.backward(1)
        self.y, self.t, self.loss = ref.y, ref.t, ref.loss
        return loss

    def backward(self, dout=1):
        _check_backward_ready(self, "_g")
        g = self._g
        if type(dout) is int or type(dout) is float:
            if dout == 1:
                return g
            return _k.scale_into(g, float(dout), self._ws.get("dx", g.shape, g.dtype))
        d = np.asarray(dout)
        if d.ndim != 0:
            raise ValueError(f"SoftmaxWithLoss.backward takes a scalar dout (the loss is a scalar), got shape {d.shape}")
        return _k.scale_into(g, float(d), self._ws.get("dx", g.shape, g.dtype))


# ---------------------------------------------------------------------------------------------------------------
# book 1, chapters 6-7: Dropout, BatchNormalization, Convolution, Pooling
# ---------------------------------------------------------------------------------------------------------------
# Fast subclasses of the plain-NumPy classes of fastbp.reference: float32/float64 inputs run on the kernels of
# fastbp._conv / fastbp._norm (and the BLAS GEMM); other dtypes take the reference path (super()).  Deliberate
# differences from the book, besides those of fastbp.reference (errors for a filter larger than the padded input,
# stride < 1, pad < 0, channel mismatch; gradients written in place):
# * results keep the computation dtype (NumPy's promotion of x, W, b): the book's im2col/col2im always allocate
#   float64, so its float32-only convolution comes out float64; fastbp's stays float32;
# * Pooling.arg_max is built on first access from the kernel's int32 (N, C, OH, OW) window positions (same
#   values and order as the book's int64 array);
# * BatchNormalization.xc is computed on access as xn * std (the kernels keep xn and std only); at test time the
#   float64 running statistics do not promote a float32 input to float64 (the book's would);
# * with reuse=True, Convolution.col, Pooling's positions, Dropout.mask and BatchNormalization.xn live in
#   workspaces overwritten by the next forward, and BatchNormalization updates running_mean/running_var in place.
from fastbp import _conv as _ck   # noqa: E402
from fastbp import _norm as _nk   # noqa: E402

__all__ += ["Dropout", "BatchNormalization", "Convolution", "Pooling"]


def _kernel_dtype(*arrays):
    """np.result_type of the operands when the kernels compute in it, else None (the reference path)."""
    try:
        dt = np.result_type(*arrays)
    except TypeError:
        return None
    return dt if dt in _KERNEL_DTYPES else None


def _grad_target(grads, i, shape, dtype, ws, name):
    """grads[i] itself when the kernels can write it in place, else a scratch array (copied back by _store)."""
    g = grads[i]
    if (type(g) is np.ndarray and g.dtype == dtype and g.dtype.isnative and g.shape == shape
            and g.flags.c_contiguous and g.flags.writeable):
        return g
    return ws.scratch(name, shape, dtype)


def _store(grads, i, value):
    if grads[i] is not value:
        _ref._write_grad(grads, i, value)


class Convolution(_ref.Convolution):
    """out = conv(x, W) + b (NCHW, stride, pad) by im2col + GEMM;  backward: dW, db in place, dx by col2im.

    The book's interface (``W`` (FN, C, FH, FW) and ``b`` held by reference, ``x``, ``col``, ``col_W``, ``dW``,
    ``db``, ``params``/``grads``).  ``need_dx=False`` skips dx (first layer of a network); ``reuse=True`` keeps
    every result in workspaces.
    """

    def __init__(self, W, b, stride=1, pad=0, *, reuse=False, need_dx=True):
        self._colT = None
        self._book_col = None
        super().__init__(W, b, stride, pad)
        self.need_dx = need_dx
        self._ws = _Workspace(reuse)
        self._fast = False
        self._W2 = None
        self._xk = None

    reuse = _Layer.reuse

    @property
    def col(self):
        """The book's column matrix (N*OH*OW, C*FH*FW) of the last forward (built on first access from the
        kernels' per-sample transposed copy)."""
        if self._book_col is None and self._colT is not None:
            colT = self._colT
            self._book_col = colT.transpose(0, 2, 1).reshape(colT.shape[0] * colT.shape[2], colT.shape[1])
        return self._book_col

    @col.setter
    def col(self, value):
        self._book_col = value
        self._colT = None

    def forward(self, x):
        W, b = self.params
        x = np.asarray(x)
        dt = _kernel_dtype(x, W, b) if type(W) is np.ndarray and type(b) is np.ndarray else None
        if dt is None:
            self._fast = False
            return super().forward(x)
        W, b, x, oh, ow = self._geometry(x)
        ws = self._ws
        xk = ws.as_dtype("x", x, dt)
        Wk = ws.as_dtype("W", W, dt)
        bk = ws.as_dtype("b", b, dt)
        n = x.shape[0]
        fn, c, fh, fw = W.shape
        k = c * fh * fw
        W2 = Wk.reshape(fn, k)
        colT = ws.scratch("colT", (n, k, oh * ow), dt)
        out = ws.get("out", (n, fn, oh, ow), dt)
        _ck.conv_forward(xk, W2, bk, fh, fw, self.stride, self.pad, colT, out)
        self.x = x
        self._colT = colT
        self._book_col = None
        self.col_W = W2.T
        self._W2 = W2
        self._W_shape = W.shape
        self._xk = xk
        self._out_shape = out.shape
        self._fast = True
        return out

    def backward(self, dout):
        if not self._fast:
            return super().backward(dout)
        dout = np.asarray(dout)
        if dout.shape != self._out_shape:
            raise ValueError(f"Convolution.backward: dout must have the forward output's shape {self._out_shape}, "
                             f"got {dout.shape}")
        col, W2 = self._colT, self._W2
        dt = _kernel_dtype(dout, col)
        if dt is None:
            return super().backward(dout)
        ws = self._ws
        if dt != col.dtype:              # a wider dout widens the gradients, as NumPy would
            col = ws.as_dtype("colT64", col, dt)
            W2 = ws.as_dtype("W64", W2, dt)
        dk = ws.as_dtype("dout", dout, dt)
        fn, k = W2.shape
        x_shape = self._xk.shape
        W_shape = self._W_shape
        fh, fw = W_shape[2:]
        nb = _ck.sample_block(x_shape[0])[1]
        db = _grad_target(self.grads, 1, (fn,), dt, ws, "db")
        dW = _grad_target(self.grads, 0, W_shape, dt, ws, "dW")
        dx = dcol = None
        if self.need_dx:
            dx = ws.get("dx", x_shape, dt)
            dcol = ws.scratch("dcol", (nb, k, self._out_shape[2] * self._out_shape[3]), dt)
        _ck.conv_backward(dk, col, W2, x_shape, fh, fw, self.stride, self.pad, dW.reshape(fn, k), db, dx,
                          ws.scratch("dW_part", (nb, fn, k), dt), ws.scratch("db_part", (nb, fn), _F64), dcol)
        _store(self.grads, 1, db)
        _store(self.grads, 0, dW)
        return dx


class Pooling(_ref.Pooling):
    """Max pooling (pool_h, pool_w, stride, pad) with the book's ``arg_max``; direct kernels, no im2col."""

    def __init__(self, pool_h, pool_w, stride=1, pad=0, *, reuse=False):
        self._arg = None
        self._book_arg = None
        super().__init__(pool_h, pool_w, stride, pad)
        self._ws = _Workspace(reuse)

    reuse = _Layer.reuse

    @property
    def arg_max(self):
        """Window position of each output's maximum, flat over (N, OH, OW, C) like the book's (int64)."""
        if self._book_arg is None and self._arg is not None:
            self._book_arg = self._arg.transpose(0, 2, 3, 1).reshape(-1).astype(np.intp)
        return self._book_arg

    @arg_max.setter
    def arg_max(self, value):
        self._book_arg = value
        self._arg = None

    def forward(self, x):
        x = np.asarray(x)
        dt = x.dtype
        if dt not in _KERNEL_DTYPES:
            if dt.kind in "biu":
                dt = _F64                # the book's im2col puts any integer image into float64
            else:
                return super().forward(x)
        x, oh, ow = self._geometry(x)
        ws = self._ws
        xk = ws.as_dtype("x", x, dt)
        shape = x.shape[:2] + (oh, ow)
        out = ws.get("out", shape, dt)
        arg = ws.scratch("arg", shape, np.dtype(np.int32))
        _ck.maxpool_forward(xk, self.pool_h, self.pool_w, self.stride, self.pad, out, arg)
        self.x = x
        self._arg = arg
        self._book_arg = None
        self._out_shape = shape
        return out

    def backward(self, dout):
        arg = self._arg
        if arg is None:
            return super().backward(dout)
        dout = np.asarray(dout)
        if dout.shape != self._out_shape:
            raise ValueError(f"Pooling.backward: dout must have the forward output's shape {self._out_shape}, "
                             f"got {dout.shape}")
        dt = dout.dtype
        if dt not in _KERNEL_DTYPES:
            if dt.kind not in "biuf" or dt == np.float16:
                return super().backward(dout)
            dt = _F64 if dt.kind != "f" else dt
            if dt not in _KERNEL_DTYPES:
                return super().backward(dout)
        ws = self._ws
        dk = ws.as_dtype("dout", dout, dt)
        dx = ws.get("dx", self.x.shape, dt)
        _ck.maxpool_backward(dk, arg, self.pool_h, self.pool_w, self.stride, self.pad, dx)
        return dx


def _numpy_bit_generator():
    """The bit generator behind np.random.rand (NumPy's global RandomState), or None if it cannot be had."""
    rs = getattr(getattr(np.random, "mtrand", None), "_rand", None)
    bg = getattr(rs, "_bit_generator", None)
    return bg if bg is not None and hasattr(bg, "capsule") and hasattr(bg, "lock") else None


class Dropout(_ref.Dropout):
    """train: mask = np.random.rand(*x.shape) > ratio, out = x * mask;  test: out = x * (1 - ratio);
    dx = dout * mask.  The mask is drawn in the kernel from the very numbers ``np.random.rand`` would return
    (NumPy's global generator, advanced the same way), so ``np.random.seed`` gives the book's mask."""

    def __init__(self, dropout_ratio=0.5, *, reuse=False):
        super().__init__(dropout_ratio)
        self._ws = _Workspace(reuse)

    reuse = _Layer.reuse

    def forward(self, x, train_flg=True):
        x = np.asarray(x)
        if x.dtype not in _KERNEL_DTYPES or not x.dtype.isnative:
            return super().forward(x, train_flg)
        ws = self._ws
        xk = ws.as_dtype("x", x, x.dtype)
        out = ws.get("out", x.shape, x.dtype)
        if not train_flg:
            np.multiply(xk, 1.0 - self.dropout_ratio, out=out)
            return out
        bg = _numpy_bit_generator()
        if bg is None:
            return super().forward(x, train_flg)
        mask = ws.get("mask", x.shape, _BOOL)
        with bg.lock:
            _nk.dropout_forward(xk, out, mask, float(self.dropout_ratio), bg)
        self.mask = mask
        return out

    def backward(self, dout):
        mask = self.mask
        dout = np.asarray(dout)
        if (mask is None or dout.dtype not in _KERNEL_DTYPES or not dout.dtype.isnative
                or dout.shape != mask.shape or not mask.flags.c_contiguous):
            return super().backward(dout)
        dk = self._ws.as_dtype("dout", dout, dout.dtype)
        dx = self._ws.get("dx", dout.shape, dout.dtype)
        _nk.dropout_backward(dk, mask, dx)
        return dx


class BatchNormalization(_ref.BatchNormalization):
    """Batch normalization over the features of x flattened to (N, -1), like the book (2-D and 4-D input);
    fused per-feature kernels, float32 statistics accumulated in double in a fixed order."""

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None, *, reuse=False):
        self._xc = None
        self._fast = False
        super().__init__(gamma, beta, momentum, running_mean, running_var)
        self._ws = _Workspace(reuse)
        self._gk = None

    reuse = _Layer.reuse

    @property
    def xc(self):
        """x - batch mean of the last training forward (computed on access as xn * std)."""
        if self._xc is None and self._fast and self.xn is not None:
            self._xc = self.xn * self.std
        return self._xc

    @xc.setter
    def xc(self, value):
        self._xc = value

    def _running(self, d):
        """The running statistics as float64 (D,) arrays the kernels read (zeros at the first call, as the book)."""
        if self.running_mean is None:
            self.running_mean = np.zeros(d)
            self.running_var = np.zeros(d)
        return (self._ws.as_dtype("rm", np.asarray(self.running_mean), _F64),
                self._ws.as_dtype("rv", np.asarray(self.running_var), _F64))

    def forward(self, x, train_flg=True):
        x = np.asarray(x)
        gamma, beta = self.params
        dt = _kernel_dtype(x, gamma, beta) if x.ndim >= 2 else None
        if dt is None:
            self._fast = False
            return super().forward(x, train_flg)
        x2, gamma, beta = self._flatten(x)
        n, d = x2.shape
        if train_flg and n == 0:
            return super().forward(x, train_flg)       # raises the reference's error
        ws = self._ws
        xk = ws.as_dtype("x", x2, dt)
        gk = ws.as_dtype("gamma", gamma, dt)
        bk = ws.as_dtype("beta", beta, dt)
        rm, rv = self._running(d)
        out = ws.get("out", (n, d), dt)
        self.input_shape = x.shape
        if train_flg:
            xn = ws.scratch("xn", (n, d), dt) if ws.reuse else np.empty((n, d), dt)
            std = ws.scratch("std", (d,), dt) if ws.reuse else np.empty((d,), dt)
            mean = ws.scratch("mean", (d,), _F64)
            var = ws.scratch("var", (d,), _F64)
            _nk.bn_forward_train(xk, gk, bk, out, xn, std, mean, var)
            m = self.momentum
            cur_m, cur_v = self.running_mean, self.running_var
            if (ws.reuse and type(cur_m) is np.ndarray and cur_m is rm and type(cur_v) is np.ndarray
                    and cur_v is rv and cur_m.flags.writeable and cur_v.flags.writeable):
                _nk.running_update(cur_m, mean, m)
                _nk.running_update(cur_v, var, m)
            else:
                self.running_mean = m * rm + (1 - m) * mean
                self.running_var = m * rv + (1 - m) * var
            self.batch_size = n
            self.xn = xn
            self.std = std
            self._xc = None
            self._fast = True
        else:
            _nk.bn_forward_test(xk, gk, bk, rm, rv, out)
        return out.reshape(x.shape)

    def backward(self, dout):
        if not self._fast:
            return super().backward(dout)
        dout = np.asarray(dout)
        if dout.shape != self.input_shape:
            raise ValueError(f"BatchNormalization.backward: dout must have the forward input's shape "
                             f"{self.input_shape}, got {dout.shape}")
        xn = self.xn
        dt = xn.dtype
        gamma = self.params[0]
        if _kernel_dtype(dout, xn, gamma) != dt or np.shape(gamma) != (xn.shape[1],):
            return super().backward(dout)
        n, d = xn.shape
        ws = self._ws
        dk = ws.as_dtype("dout", dout.reshape(n, d), dt)
        gk = ws.as_dtype("gamma", np.asarray(gamma), dt)
        dg = _grad_target(self.grads, 0, (d,), dt, ws, "dgamma")
        db = _grad_target(self.grads, 1, (d,), dt, ws, "dbeta")
        dx = ws.get("dx", (n, d), dt)
        _nk.bn_backward(dk, xn, gk, self.std, dx, dg, db)
        _store(self.grads, 0, dg)
        _store(self.grads, 1, db)
        return dx.reshape(self.input_shape)
