"""The layers of *Deep Learning from Scratch* (books 1 and 2) on fastbp's Cython kernels.

Drop-in for the book's ``common/layers.py``: same class names, constructor arguments, attributes and return
values.  Each layer subclasses the plain-NumPy layer of the same name in :mod:`fastbp.reference`, which gives it
the book's attribute names, the ``params``/``grads`` lists, ``__call__`` and the NumPy answer for inputs the
kernels do not take; a fastbp layer only adds its fast path.  What differs from the book on purpose:

* ``Relu.backward`` does not overwrite the caller's ``dout`` (the book's sets ``dout[mask] = 0`` in place).
* ``SoftmaxWithLoss`` computes the loss exactly as ``logsumexp(x) - x[t]`` instead of the book's
  ``-log(y + 1e-7)``; the two agree to about 1e-7 except where y underflows, where the book's value is capped
  at ``-log(1e-7) = 16.1`` and ours is the true loss.
* ``Affine``/``MatMul`` write ``dW``/``db`` into the same arrays at every backward (``layer.grads[0] is
  layer.dW``, ``grads[0][...] = dW`` as the book-2 layers do), converted to their dtype, whatever the dtypes and
  layouts of the inputs: book 2 keeps its own list of the grads arrays.

Every layer also takes ``reuse=False``: with ``reuse=True`` (the networks of :mod:`fastbp.nets` set it) the
forward and backward results are written into per-layer workspaces that are reused at the next call of the same
shape, so a training step allocates nothing after warm-up; an array returned by one call is then overwritten by
the next call, as in any framework's workspace (a layer fed its own previous output writes into a second buffer).
With the default, every call returns new arrays like the book.

dtypes: float32 and float64 run in the kernels; mixed inputs follow NumPy's promotion (``np.result_type``), so
float32 images with float64 weights compute in float64 like the book (the converted copy lives in a scratch
buffer the layer keeps for the next call: operands converted for the kernels are never handed back).  Where a
layer takes ``exp`` (``Sigmoid``, ``SoftmaxWithLoss``) integer inputs promote as ``np.exp`` promotes them
(:func:`fastbp.reference.exp_dtype`: int16 -> float32, int32 -> float64).  Every input whose NumPy result type is
not float32/float64 (float16, int8 into Sigmoid, integer weights and inputs into Affine, ...) is computed by the
:mod:`fastbp.reference` layer this class inherits from: the result is NumPy's, dtype included.  Any memory layout
is accepted; a copy is made once where a kernel needs contiguity.

Threads: a layer instance holds the state of its last forward pass (and its workspaces), so an instance is not
thread-safe, as in NumPy-based frameworks; use one instance (one network) per thread.  Separate instances share
nothing and run in parallel (the kernels release the GIL).
"""

import math
import warnings

import numpy as np

from fastbp import _blas  # noqa: F401  (checks the FASTBP_* settings at import)
from fastbp import _kernels as _k
from fastbp import reference as _ref
from fastbp._workspace import Workspace as _Workspace
from fastbp.reference import AddLayer, MulLayer, Repeat, Sum  # scalar/broadcast nodes: no hot loop to speed up

__all__ = ["MulLayer", "AddLayer", "Relu", "Sigmoid", "Affine", "MatMul", "SoftmaxWithLoss", "Repeat", "Sum"]
__all__ += ["Softmax", "SigmoidWithLoss", "Embedding"]  # book 2 (defined at the end of this file)

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_BOOL = np.dtype(np.bool_)
# Each fast path below is a dtype/flags check on the common case (native float32/float64 ndarrays of matching
# dtypes) that takes it straight to the kernel; the kernel's own checks then raise on a genuine error (shapes,
# overlap).  Everything else goes through `_forward_any`/`_backward_any`, which converts what the kernels can
# compute (other byte orders, layouts, mixed float32/float64) and hands the rest to the reference (super()).


def _kernel_dtype(dt):
    """The kernels' native dtype (float32 or float64) for `dt` of any byte order, or None."""
    if dt.kind == "f":
        if dt.itemsize == 8:
            return _F64
        if dt.itemsize == 4:
            return _F32
    return None


class _Fast:
    """Mixin of the fast layers: the `reuse` switch of the layer's workspace."""

    @property
    def reuse(self):
        return self._ws.reuse

    @reuse.setter
    def reuse(self, value):
        self._ws.reuse = bool(value)


# ---------------------------------------------------------------------------------------------------------------
class Relu(_Fast, _ref.Relu):
    """out = max(x, 0); backward: dx = dout where x > 0 else 0.  ``mask`` is ``x <= 0`` like the book's.

    Unlike the book, ``backward`` leaves ``dout`` unchanged and returns a new array (or a workspace with
    ``reuse=True``).  fastbp's own convolutional nets run a Relu that feeds a Pooling inside the pooling kernel
    (``Pooling._forward_relu``); they hand this layer its input with ``_defer``, and ``mask`` is then computed from
    it when first read.
    """

    def __init__(self, *, reuse=False):
        self._mask_src = None
        super().__init__()
        self._ws = _Workspace(reuse)

    @property
    def mask(self):
        """``x <= 0`` of the last forward (the book's attribute; computed on first access after ``_defer``)."""
        m = self._mask
        if m is None and self._mask_src is not None:
            m = self._mask = self._mask_src <= 0
            self._mask_src = None
        return m

    @mask.setter
    def mask(self, value):
        self._mask = value
        self._mask_src = None

    def _defer(self, x):
        """fastbp's nets, which apply this ReLU inside the next Pooling (Pooling._forward_relu): keep ``x`` (not
        copied: the net's own workspace) so that ``mask`` and ``backward`` still work as after ``forward(x)``."""
        self._mask = None
        self._mask_src = x

    def forward(self, x):
        if type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64) and x.flags.c_contiguous:
            ws = self._ws
            out = ws.result("out", x.shape, x.dtype, x)
            mask = ws.result("mask", x.shape, _BOOL)
            _k.relu_forward(x, out, mask)
            self.mask = mask
            return out
        return self._forward_any(x)

    def _forward_any(self, x):
        x = _ref._numeric(x, "x", "Relu")
        kd = _kernel_dtype(x.dtype)
        if kd is None:
            return super().forward(x)
        ws = self._ws
        x = ws.as_dtype("x", x, kd)
        out = ws.result("out", x.shape, kd, x)
        mask = ws.result("mask", x.shape, _BOOL)
        _k.relu_forward(x, out, mask)
        self.mask = mask
        return out

    def backward(self, dout):
        mask = self.mask
        if (
            type(dout) is np.ndarray
            and (dout.dtype is _F32 or dout.dtype is _F64)
            and mask is not None
            and dout.shape == mask.shape
            and dout.flags.c_contiguous
            and mask.flags.c_contiguous
        ):
            dx = self._ws.result("dx", dout.shape, dout.dtype, dout)
            _k.relu_backward(dout, mask, dx)
            return dx
        return self._backward_any(dout)

    def _backward_any(self, dout):
        mask = self.mask
        d = np.asarray(dout)
        kd = _kernel_dtype(d.dtype)
        if mask is None or kd is None or d.shape != mask.shape:
            return super().backward(dout)  # before forward, bad shapes, or NumPy's answer for float16/int
        ws = self._ws
        d = ws.as_dtype("dout", d, kd)
        mask = ws.as_dtype("mask", mask, _BOOL)
        dx = ws.result("dx", d.shape, kd, dout)
        _k.relu_backward(d, mask, dx)
        return dx


# ---------------------------------------------------------------------------------------------------------------
class Sigmoid(_Fast, _ref.Sigmoid):
    """out = 1 / (1 + exp(-x)), computed without overflow for any x; backward: dx = dout * (1 - out) * out."""

    def __init__(self, *, reuse=False):
        super().__init__()
        self._ws = _Workspace(reuse)

    def forward(self, x):
        if type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64) and x.flags.c_contiguous:
            out = self._ws.result("out", x.shape, x.dtype, x)
            _k.sigmoid_forward(x, out)
            self.out = out
            return out
        return self._forward_any(x)

    def _forward_any(self, x):
        x = _ref._numeric(x, "x", "Sigmoid")
        kd = _kernel_dtype(_ref.exp_dtype(x.dtype))
        if kd is None:
            return super().forward(x)  # np.exp's float16 (bool, int8, uint8, float16): NumPy's answer
        x = self._ws.as_dtype("x", x, kd)
        out = self._ws.result("out", x.shape, kd, x)
        _k.sigmoid_forward(x, out)
        self.out = out
        return out

    def backward(self, dout):
        y = self.out
        if (
            type(dout) is np.ndarray
            and y is not None
            and dout.dtype is y.dtype
            and (y.dtype is _F32 or y.dtype is _F64)
            and dout.shape == y.shape
            and dout.flags.c_contiguous
            and y.flags.c_contiguous
        ):
            dx = self._ws.result("dx", dout.shape, dout.dtype, dout)
            _k.sigmoid_backward(dout, y, dx)
            return dx
        return self._backward_any(dout)

    def _backward_any(self, dout):
        y = self.out
        d = np.asarray(dout)
        if y is None or d.dtype.kind not in "biuf" or d.shape != y.shape:
            return super().backward(dout)
        kd = _kernel_dtype(np.result_type(d, y))
        if kd is None:
            return super().backward(dout)
        ws = self._ws
        d = ws.as_dtype("dout", d, kd)
        y = ws.as_dtype("y", y, kd)
        dx = ws.result("dx", d.shape, kd, dout)
        _k.sigmoid_backward(d, y, dx)
        return dx


# ---------------------------------------------------------------------------------------------------------------
def _as_batch(x):
    """Flatten input to (N, D) like the book: `x.reshape(x.shape[0], -1)` (so a 1-D input is N samples of 1)."""
    if x.ndim == 2:
        return x
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 cannot be inferred for an empty batch


class _GemmLayer(_Fast):
    """Shared by Affine and MatMul: the grads written in place, the kernel operands of backward."""

    def _grads_checked(self):
        """Remember that params[0] and the grads are the kernels' (same float dtype, C-contiguous, writeable,
        matching shapes): then backward's fast path only compares identities.  (A flag changed later on one of
        these same arrays is caught by the kernel's own checks, with a clear error.)"""
        W = self.params[0]
        grads = tuple(self.grads)
        dt = W.dtype
        ok = (
            isinstance(W, np.ndarray)
            and W.ndim == 2
            and (dt is _F32 or dt is _F64)
            and all(
                isinstance(g, np.ndarray) and g.dtype == dt and g.flags.c_contiguous and g.flags.writeable
                for g in grads
            )
            and grads[0].shape == W.shape
            and all(g.shape == (W.shape[1],) for g in grads[1:])
        )
        self._ok = (W,) + grads if ok else None

    def _grad_target(self, i, name, shape, dt):
        """grads[i] itself when the kernel can write it (dtype dt, C-contiguous, writeable, shape), else scratch
        whose result `_store` copies into grads[i]."""
        g = self.grads[i]
        if (
            isinstance(g, np.ndarray)
            and g.dtype == dt
            and g.shape == shape
            and g.flags.c_contiguous
            and g.flags.writeable
        ):
            return g
        return self._ws.scratch(name, shape, dt)

    def _store(self, i, value):
        if value is not self.grads[i]:
            _ref._store_grad(self.grads, i, value, type(self).__name__)


class Affine(_GemmLayer, _ref.Affine):
    """out = x @ W + b on the input flattened to (N, -1); backward: dx = dout @ W.T, dW = x.T @ dout, db = sum(dout).

    ``W`` and ``b`` are the caller's arrays, held by reference and read at every call (in-place updates such as
    ``W -= lr * dW`` or ``numerical_gradient``'s perturbations are seen).  ``params = [W, b]`` and
    ``grads = [dW, db]`` are the same objects as the attributes; ``dW``/``db`` are written in place at each
    backward, converted to their dtype (float64 data into a float32 layer computes in float64 like NumPy, and the
    float32 grads receive the result).  ``dx`` comes back in the shape of the input.

    ``backward(dout, need_dx=False)`` (keyword-only; fastbp extension, not in the book) computes and writes
    ``dW``/``db`` exactly as before but skips ``dx`` (one of the layer's three GEMMs) and returns None: the first
    layer of a network does not need the gradient of its input.  ``Affine(W, b, need_dx=False)`` sets the same
    for every backward of the layer; dx is computed only when neither says False.
    """

    def __init__(self, W, b, *, reuse=False, need_dx=True):
        super().__init__(W, b)
        self.need_dx = need_dx
        self._xk = None  # the forward input as the kernel read it (converted), None after a NumPy forward
        self._ok = None
        self._ws = _Workspace(reuse)

    def forward(self, x):
        W, b = self.params
        if type(x) is np.ndarray and x.ndim == 2:
            dt = x.dtype
            if (dt is _F32 or dt is _F64) and W.dtype is dt and b.dtype is dt:
                out = self._ws.result("out", (x.shape[0], W.shape[1]), dt, x)
                _k.affine_forward(x, W, b, out)  # checks the shapes, reads any strided layout in place
                self.original_x_shape = x.shape
                self.x = x
                self._xk = x
                return out
        return self._forward_any(x)

    def _forward_any(self, x):
        W, b = self.params
        xa = _ref._numeric(x, "x", "Affine")
        if (
            xa.ndim >= 1
            and isinstance(W, np.ndarray)
            and W.ndim == 2
            and isinstance(b, np.ndarray)
            and b.shape == (W.shape[1],)
            and W.dtype.kind in "biuf"
            and b.dtype.kind in "biuf"
        ):
            x2 = _as_batch(xa)
            kd = _kernel_dtype(np.result_type(x2, W, b))
            if kd is not None and x2.shape[1] == W.shape[0]:
                ws = self._ws
                Wk = W if W.dtype is kd else ws.as_dtype("W", W, kd)  # promoted weights: refreshed every call
                bk = b if b.dtype is kd else ws.as_dtype("b", b, kd)
                out = ws.result("out", (x2.shape[0], W.shape[1]), kd, x2)
                if x2.dtype is _F32 and kd is _F64:
                    # float32 images into float64 weights (book 1): the kernel converts x into xk inside the
                    # product, each thread the part it reads (whole 64-byte cache lines each: aligned scratch)
                    xk = ws.scratch("x", x2.shape, kd, align=64)
                    _k.affine_forward(x2, Wk, bk, out, xk=xk)
                else:
                    xk = x2 if x2.dtype is kd else ws.as_dtype("x", x2, kd)
                    _k.affine_forward(xk, Wk, bk, out)
                self.original_x_shape = xa.shape
                self.x = x2
                self._xk = xk
                return out
        self._xk = None
        return super().forward(x)  # NumPy's answer (float16, integers) or the reference's error

    def backward(self, dout, *, need_dx=True):
        need_dx = need_dx and self.need_dx
        xk = self._xk
        ok = self._ok
        if (
            xk is not None
            and ok is not None
            and type(dout) is np.ndarray
            and dout.dtype is xk.dtype
            and dout.ndim == 2
            and ok[0] is self.params[0]
            and ok[1] is self.grads[0]
            and ok[2] is self.grads[1]
            and ok[0].dtype is xk.dtype
        ):
            W, dW, db = ok
            dx = self._ws.result("dx", xk.shape, xk.dtype, dout) if need_dx else None
            _k.affine_backward(dout, xk, W, dx, dW, db)  # checks dout's shape
            if dx is None or len(self.original_x_shape) == 2:
                return dx
            return dx.reshape(self.original_x_shape)
        return self._backward_any(dout, need_dx)

    def _backward_any(self, dout, need_dx):
        xk = self._xk
        if xk is None:  # before forward (the reference raises), or a NumPy forward
            return super().backward(dout, need_dx=need_dx)
        self._grads_checked()  # the next backward of the kernels' dtypes takes the fast path
        W = self.params[0]
        d = _ref._numeric(dout, "dout", "Affine")
        n, m = xk.shape[0], W.shape[1]
        kd = _kernel_dtype(np.result_type(d, xk, W)) if W.dtype.kind in "biuf" else None
        if d.shape != (n, m) or kd is None:
            return super().backward(dout, need_dx=need_dx)  # the reference's error, or NumPy's answer
        ws = self._ws
        d = ws.as_dtype("dout", d, kd)
        xb = xk if xk.dtype is kd else ws.as_dtype("xb", xk, kd)
        Wk = W if W.dtype is kd else ws.as_dtype("Wb", W, kd)
        dW = self._grad_target(0, "dW", W.shape, kd)
        db = self._grad_target(1, "db", (m,), kd)
        dx = ws.result("dx", xb.shape, kd, dout) if need_dx else None
        _k.affine_backward(d, xb, Wk, dx, dW, db)
        self._store(0, dW)
        self._store(1, db)
        if dx is None or len(self.original_x_shape) == 2:
            return dx
        return dx.reshape(self.original_x_shape)


# ---------------------------------------------------------------------------------------------------------------
class MatMul(_GemmLayer, _ref.MatMul):
    """Book 2's MatMul: out = x @ W; backward: dx = dout @ W.T, grads[0][...] = x.T @ dout (in place, converted to
    the grads' dtype, whatever dtypes come in)."""

    def __init__(self, W, *, reuse=False):
        super().__init__(W)
        self._xk = None
        self._ok = None
        self._ws = _Workspace(reuse)

    def forward(self, x):
        W = self.params[0]
        if type(x) is np.ndarray and x.ndim == 2:
            dt = x.dtype
            if (dt is _F32 or dt is _F64) and W.dtype is dt and W.ndim == 2 and x.shape[1] == W.shape[0]:
                out = self._ws.result("out", (x.shape[0], W.shape[1]), dt, x)
                _k.gemm(x, W, out)  # reads any strided layout in place
                self.x = x
                self._xk = x
                return out
        return self._forward_any(x)

    def _forward_any(self, x):
        W = self.params[0]
        xa = _ref._numeric(x, "x", "MatMul")
        if (
            xa.ndim == 2
            and isinstance(W, np.ndarray)
            and W.ndim == 2
            and W.dtype.kind in "biuf"
            and xa.shape[1] == W.shape[0]
        ):
            kd = _kernel_dtype(np.result_type(xa, W))
            if kd is not None:
                ws = self._ws
                xk = xa if xa.dtype is kd else ws.as_dtype("x", xa, kd)
                Wk = W if W.dtype is kd else ws.as_dtype("W", W, kd)
                out = ws.result("out", (xa.shape[0], W.shape[1]), kd, xa)
                _k.gemm(xk, Wk, out)
                self.x = xa
                self._xk = xk
                return out
        self._xk = None
        return super().forward(x)

    def backward(self, dout):
        xk = self._xk
        ok = self._ok
        if (
            xk is not None
            and ok is not None
            and type(dout) is np.ndarray
            and dout.dtype is xk.dtype
            and ok[0] is self.params[0]
            and ok[1] is self.grads[0]
            and ok[0].dtype is xk.dtype
            and dout.shape == (xk.shape[0], ok[0].shape[1])
        ):
            W, dW = ok
            dx = self._ws.result("dx", xk.shape, xk.dtype, dout)
            _k.gemm(dout, W, dx, trans_b=True)
            _k.gemm(xk, dout, dW, trans_a=True)
            return dx
        return self._backward_any(dout)

    def _backward_any(self, dout):
        xk = self._xk
        if xk is None:
            return super().backward(dout)
        self._grads_checked()  # the next backward of the kernels' dtypes takes the fast path
        W = self.params[0]
        d = _ref._numeric(dout, "dout", "MatMul")
        if not (isinstance(W, np.ndarray) and W.ndim == 2) or d.shape != (xk.shape[0], W.shape[1]):
            return super().backward(dout)
        kd = _kernel_dtype(np.result_type(d, xk, W)) if W.dtype.kind in "biuf" else None
        if kd is None:
            return super().backward(dout)
        ws = self._ws
        d = d if d.dtype is kd else ws.as_dtype("dout", d, kd)  # the GEMM reads any strided layout
        xb = xk if xk.dtype is kd else ws.as_dtype("xb", xk, kd)
        Wk = W if W.dtype is kd else ws.as_dtype("Wb", W, kd)
        dW = self._grad_target(0, "dW", W.shape, kd)
        dx = ws.result("dx", xb.shape, kd, dout)
        _k.gemm(d, Wk, dx, trans_b=True)
        _k.gemm(xb, d, dW, trans_a=True)
        self._store(0, dW)
        return dx


# ---------------------------------------------------------------------------------------------------------------
class SoftmaxWithLoss(_Fast, _ref.SoftmaxWithLoss):
    """loss = mean over the batch of logsumexp(x) - x[t]; y = softmax(x); backward: dx = dout * (y - t) / N.

    ``t`` takes every form the book's ``cross_entropy_error`` takes: integer labels (N,) or (N, 1), one-hot (or
    probability) rows (N, C) of any numeric dtype (bool included; integer and bool rows are read in the logits'
    dtype), and for a single sample (1-D logits) a scalar label, a one-element label array or a one-hot vector.
    The loss is the exact log-sum-exp form, not the book's ``-log(y + 1e-7)`` (equal to ~1e-7 where the book's
    is not capped).  The gradient is computed in the same pass as the loss.  An empty batch gives a NaN loss with
    a RuntimeWarning.

    ``backward`` returns a new array at every call unless ``reuse=True`` (then the layer's workspace): the first
    call after a forward hands out the gradient computed with the loss, later calls recompute it from ``y`` and
    ``t`` as the book does, so scaling a returned gradient in place never changes the next one.
    """

    def __init__(self, *, reuse=False):
        super().__init__()
        self._g = None  # the gradient computed with the loss; None after a NumPy forward
        self._g_out = False  # `_g` was handed to the caller (without reuse): do not hand it out again
        self._ws = _Workspace(reuse)

    def forward(self, x, t):
        if (
            type(x) is np.ndarray
            and type(t) is np.ndarray
            and x.ndim == 2
            and (x.dtype is _F32 or x.dtype is _F64)
            and x.shape[0] > 0
            and x.flags.c_contiguous
        ):
            kt = self._kernel_targets(t, x.shape, x.dtype)
            if kt is not None:
                return self._forward_kernel(x, t, *kt)
        return self._forward_any(x, t)

    def _kernel_targets(self, t, shape, dt):
        """(tk, labels, target) for the kernel on logits of `shape` (N, C) and dtype `dt` when it takes targets `t`
        as they are: labels (N,) of an integer dtype (tk = labels: t itself when C-contiguous int64, else copied
        into int64 scratch, e.g. the book's uint8 labels; the kernel range-checks them) or one-hot rows (N, C) of
        the logits' dtype, C > 0 (tk = target = t, the book's); else None."""
        if t.ndim == 1 and t.dtype.kind in "iu":
            tk = t
            if t.dtype is not _I64 or not t.flags.c_contiguous:
                tk = self._ws.scratch("t", t.shape, _I64)
                np.copyto(tk, t, casting="unsafe")
            return tk, tk, None
        if (t.dtype is dt or t.dtype == dt) and t.shape == shape and shape[1] > 0 and t.flags.c_contiguous:
            return t, None, t
        return None

    def _forward_kernel(self, x, t, tk, labels, target):
        """The kernel on logits x (N, C), N > 0, and tk (labels int64, or rows of x's dtype) ready for it."""
        ws = self._ws
        y = ws.result("y", x.shape, x.dtype)
        g = ws.result("g", x.shape, x.dtype)
        loss = _k.softmax_cross_entropy(x, tk, y, g, 1.0 / x.shape[0])  # the mean loss
        return self._keep(t, y, g, labels, target, loss)

    def _keep(self, t, y, g, labels, target, loss):
        """The state a kernel forward leaves (what backward and the book's attributes read); returns loss."""
        self.t = t
        self.y = y
        self._g = g
        self._g_out = False
        self._labels = labels
        self._target = target
        self.loss = loss
        return loss

    def _forward_any(self, x, t):
        xa = _ref._numeric(x, "x", "SoftmaxWithLoss")
        kd = _kernel_dtype(_ref.exp_dtype(xa.dtype))
        ta = np.asarray(t)
        if kd is None or xa.ndim not in (1, 2) or xa.shape[-1] == 0:
            self._g = None
            return super().forward(x, t)  # float16 / int8 logits: NumPy's answer; or the reference's error
        single = xa.ndim == 1
        x2 = xa.reshape(1, -1) if single else xa
        n, c = x2.shape
        labels, rows = self._check_targets(xa, ta, n, c)
        ws = self._ws
        if rows is not None and rows.dtype != kd:
            kd = _kernel_dtype(np.result_type(kd, rows.dtype))  # float32 logits, float64 rows: float64 like NumPy
            if kd is None:
                self._g = None
                return super().forward(x, t)
        xk = ws.as_dtype("x", x2, kd)
        if labels is not None:
            tk = ws.as_dtype("t", labels, _I64)
        else:
            tk = ws.as_dtype("t1h", rows, kd)
        y = ws.result("y", x2.shape, kd, xk)
        g = ws.result("g", x2.shape, kd, xk)
        if n == 0:
            warnings.warn("SoftmaxWithLoss: empty batch, the loss is NaN", RuntimeWarning, stacklevel=3)
            loss = float("nan")
        else:
            loss = _k.softmax_cross_entropy(xk, tk, y, g, 1.0 / n)  # the mean loss
        self.t = t
        self.y = y.reshape(xa.shape) if single else y
        self._g = g.reshape(xa.shape) if single else g
        self._g_out = False
        self._labels = tk if labels is not None else None
        self._target = tk if labels is None else None
        self.loss = loss
        return loss

    def backward(self, dout=1):
        g = self._g
        if g is None or self._g_out:
            return super().backward(dout)  # NumPy forward, before forward, or a repeated call: from y and t
        ws = self._ws
        if type(dout) is int or type(dout) is float:
            if dout == 1:
                if not ws.reuse:
                    self._g_out = True
                return g
            return _k.scale_into(g, float(dout), ws.result("dx", g.shape, g.dtype))
        d = np.asarray(dout)
        if d.ndim != 0:
            return super().backward(dout)  # the reference's error: dout must be a scalar
        return _k.scale_into(g, float(d), ws.result("dx", g.shape, g.dtype))


# ---------------------------------------------------------------------------------------------------------------
# book 1, chapters 6-7: Dropout, BatchNormalization, Convolution, Pooling
# ---------------------------------------------------------------------------------------------------------------
# Fast subclasses of the plain-NumPy classes of fastbp.reference: float32/float64 inputs run on the kernels of
# fastbp._conv / fastbp._pool / fastbp._norm (and the BLAS GEMM); other dtypes take the reference path (super()).
# Deliberate differences from the book, besides those of fastbp.reference (errors for a filter larger than the
# padded input, stride < 1, pad < 0, channel mismatch; gradients written in place):
# * results keep the computation dtype (NumPy's promotion of x, W, b): the book's im2col/col2im always allocate
#   float64, so its float32-only convolution comes out float64; fastbp's stays float32;
# * Pooling.arg_max is built on first access from the kernel's int32 (N, C, OH, OW) window positions (same
#   values and order as the book's int64 array); likewise Convolution.col (the book's (N*OH*OW, C*FH*FW) column
#   matrix) is built on first access from the kernels' per-sample transposed copy, and col_W is the book's
#   W.reshape(FN, -1).T view;
# * BatchNormalization.xc is computed on access as xn * std (the kernels keep xn and std only); at test time the
#   float64 running statistics do not promote a float32 input to float64 (the book's would);
# * the column matrix, Pooling's positions (and so .col and .arg_max), and with reuse=True Dropout.mask and
#   BatchNormalization.xn live in workspaces overwritten by the next forward; with reuse=True BatchNormalization
#   also updates running_mean/running_var in place (the book rebinds new arrays; so does reuse=False);
# * Dropout draws its mask in the kernel from NumPy's global generator (the numbers np.random.rand would return,
#   the generator advanced the same way), so np.random.seed reproduces the book's masks.
from fastbp import _conv as _ck  # noqa: E402
from fastbp import _norm as _nk  # noqa: E402
from fastbp import _pool as _pk  # noqa: E402

__all__ += ["Dropout", "BatchNormalization", "Convolution", "Pooling"]


_KERNEL_DTYPES = (_F32, _F64)


def _result_kernel_dtype(*arrays):
    """np.result_type of the operands when the kernels compute in it, else None (the reference path)."""
    try:
        dt = np.result_type(*arrays)
    except TypeError:
        return None
    return dt if dt in _KERNEL_DTYPES else None


def _grad_target(grads, i, shape, dtype, ws, name):
    """grads[i] itself when the kernels can write it in place, else a scratch array (copied back by _store)."""
    g = grads[i]
    if (
        type(g) is np.ndarray
        and g.dtype == dtype
        and g.dtype.isnative
        and g.shape == shape
        and g.flags.c_contiguous
        and g.flags.writeable
    ):
        return g
    return ws.scratch(name, shape, dtype)


def _store(grads, i, value):
    if grads[i] is not value:
        _ref._write_grad(grads, i, value)


class Convolution(_ref.Convolution):
    """out = conv(x, W) + b (NCHW, stride, pad) by im2col + GEMM;  backward: dW, db in place, dx by col2im.

    The book's interface (``W`` (FN, C, FH, FW) and ``b`` held by reference, ``x``, ``col``, ``col_W``, ``dW``,
    ``db``, ``params``/``grads``); ``reuse=True`` keeps every result in workspaces.

    fastbp extensions, not in the book: ``backward(dout, need_dx=False)`` computes and writes ``dW``/``db`` as
    usual but not dx, and returns None (a network's first layer: the gradient of the input images is thrown away);
    the constructor's ``need_dx=False`` makes that the default of every call.

    Deliberate difference from the book: the column matrix is not kept.  The kernels build it one sample at a
    time in a cache-sized buffer, in forward and again in backward (cheaper than writing the batch's column matrix
    to memory and reading it back), or not at all (stride-1 layers with 8 or more input channels read the padded
    sample at one offset per filter tap; see ``fastbp._conv``), from ``x``, the forward's input, which the layer
    keeps by reference as the book does.  So ``col`` is computed from ``x`` when first read (the same values as
    the book's), and changing ``x`` in place between forward and backward changes ``dW`` (the book's ``dW`` would
    use the columns of the forward).
    """

    def __init__(self, W, b, stride=1, pad=0, *, reuse=False, need_dx=True):
        self._xk = None
        self._book_col = None
        super().__init__(W, b, stride, pad)
        self.need_dx = need_dx
        self._ws = _Workspace(reuse)
        self._fast = False
        self._W2 = None

    reuse = _Fast.reuse

    @property
    def col(self):
        """The book's column matrix (N*OH*OW, C*FH*FW) of the last forward (built from ``x`` on first access)."""
        if self._book_col is None and self._xk is not None:
            xk = self._xk
            fh, fw = self._W_shape[2:]
            col = np.empty((xk.shape[0] * self._out_shape[2] * self._out_shape[3], xk.shape[1] * fh * fw), xk.dtype)
            self._book_col = _ck.im2col(xk, fh, fw, self.stride, self.pad, col)
        return self._book_col

    @col.setter
    def col(self, value):
        self._book_col = value
        self._xk = None

    def _scratch(self, x_shape, fn, fh, fw, dt, names):
        shapes = _ck.conv_scratch_shapes(x_shape, fn, fh, fw, self.stride, self.pad)
        return [self._ws.scratch(nm, shapes[nm], _F64 if nm == "db_part" else dt) for nm in names]

    def forward(self, x):
        W, b = self.params
        x = np.asarray(x)
        dt = _result_kernel_dtype(x, W, b) if type(W) is np.ndarray and type(b) is np.ndarray else None
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
        W2 = Wk.reshape(fn, c * fh * fw)
        scratch = self._scratch(xk.shape, fn, fh, fw, dt, ("col", "xpad", "wr"))
        out = ws.get("out", (n, fn, oh, ow), dt)
        _ck.conv_forward(xk, W2, bk, fh, fw, self.stride, self.pad, *scratch, out)
        self.x = x
        self._xk = xk
        self._book_col = None
        self.col_W = W2.T
        self._W2 = W2
        self._W_shape = W.shape
        self._out_shape = out.shape
        self._fast = True
        return out

    def backward(self, dout, *, need_dx=True):
        if not self._fast:
            return super().backward(dout, need_dx=need_dx and self.need_dx)
        dout = np.asarray(dout)
        if dout.shape != self._out_shape:
            raise ValueError(
                f"Convolution.backward: dout must have the forward output's shape {self._out_shape}, got {dout.shape}"
            )
        xk, W2 = self._xk, self._W2
        dt = _result_kernel_dtype(dout, xk)
        if dt is None:
            return super().backward(dout, need_dx=need_dx and self.need_dx)
        ws = self._ws
        if dt != xk.dtype:  # a wider dout widens the gradients, as NumPy would
            xk = ws.as_dtype("x64", xk, dt)
            W2 = ws.as_dtype("W64", W2, dt)
        dk = ws.as_dtype("dout", dout, dt)
        fn, k = W2.shape
        W_shape = self._W_shape
        fh, fw = W_shape[2:]
        db = _grad_target(self.grads, 1, (fn,), dt, ws, "db")
        dW = _grad_target(self.grads, 0, W_shape, dt, ws, "dW")
        dx = ws.get("dx", xk.shape, dt) if need_dx and self.need_dx else None
        scratch = self._scratch(xk.shape, fn, fh, fw, dt, ("dW_part", "db_part", "col", "xpad", "dT", "wr"))
        _ck.conv_backward(dk, xk, W2, fh, fw, self.stride, self.pad, dW.reshape(fn, k), db, dx, *scratch)
        _store(self.grads, 1, db)
        _store(self.grads, 0, dW)
        return dx


class Pooling(_ref.Pooling):
    """Max pooling (pool_h, pool_w, stride, pad) with the book's ``arg_max``; direct kernels, no im2col
    (fastbp._pool: the book's 2x2 stride-2 case on SIMD kernels).

    fastbp extension, not in the book: fastbp's own networks pool a ReLU's input in one pass
    (``_forward_relu``: out = max(maxpool(x), 0) == maxpool(relu(x))); ``arg_max`` is then the book's for the ReLU'd
    input (0 in windows whose inputs are all <= 0, where no gradient flows) and ``backward`` passes no gradient
    through such windows, as the book's Relu after its Pooling's backward would.
    """

    def __init__(self, pool_h, pool_w, stride=1, pad=0, *, reuse=False):
        self._arg = None
        self._book_arg = None
        self._relu = False
        super().__init__(pool_h, pool_w, stride, pad)
        self._ws = _Workspace(reuse)

    reuse = _Fast.reuse

    @property
    def arg_max(self):
        """Window position of each output's maximum, flat over (N, OH, OW, C) like the book's (int64)."""
        if self._book_arg is None and self._arg is not None:
            a = self._arg
            if self._relu:  # -1: a window of inputs <= 0, all 0 after the ReLU: the book's argmax is 0
                a = np.maximum(a, 0)
            self._book_arg = a.transpose(0, 2, 3, 1).reshape(-1).astype(np.intp)
        return self._book_arg

    @arg_max.setter
    def arg_max(self, value):
        self._book_arg = value
        self._arg = None

    def forward(self, x):
        return self._forward(x, False)

    def _forward_relu(self, x):
        """fastbp's nets: the book's Relu then this Pooling in one pass over float32/float64 ``x``: out =
        max(maxpool(x), 0); backward then routes dout only to window maxima > 0 (or NaN)."""
        x = np.asarray(x)
        if x.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"Pooling._forward_relu takes float32/float64 input, got {x.dtype}")
        return self._forward(x, True)

    def _forward(self, x, relu):
        x = np.asarray(x)
        dt = x.dtype
        if dt not in _KERNEL_DTYPES:
            if dt.kind in "biu":
                dt = _F64  # the book's im2col puts any integer image into float64
            else:
                return super().forward(x)
        x, oh, ow = self._geometry(x)
        ws = self._ws
        xk = ws.as_dtype("x", x, dt)
        shape = x.shape[:2] + (oh, ow)
        out = ws.get("out", shape, dt)
        arg = ws.scratch("arg", shape, np.dtype(np.int32))
        _pk.maxpool_forward(xk, self.pool_h, self.pool_w, self.stride, self.pad, out, arg, relu)
        self.x = x
        self._arg = arg
        self._relu = relu
        self._book_arg = None
        self._out_shape = shape
        return out

    def backward(self, dout):
        arg = self._arg
        if arg is None:
            return super().backward(dout)
        dout = np.asarray(dout)
        if dout.shape != self._out_shape:
            raise ValueError(
                f"Pooling.backward: dout must have the forward output's shape {self._out_shape}, got {dout.shape}"
            )
        dt = dout.dtype
        if dt not in _KERNEL_DTYPES:
            if self._relu:  # the fused ReLU's mask lives in the kernel's positions: compute in the forward's dtype
                dt = self.x.dtype
            elif dt.kind not in "biuf" or dt == np.float16:
                return super().backward(dout)
            else:
                dt = _F64 if dt.kind != "f" else dt
                if dt not in _KERNEL_DTYPES:
                    return super().backward(dout)
        ws = self._ws
        dk = ws.as_dtype("dout", dout, dt)
        dx = ws.get("dx", self.x.shape, dt)
        _pk.maxpool_backward(dk, arg, self.pool_h, self.pool_w, self.stride, self.pad, dx)
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

    reuse = _Fast.reuse

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
        if (
            mask is None
            or dout.dtype not in _KERNEL_DTYPES
            or not dout.dtype.isnative
            or dout.shape != mask.shape
            or not mask.flags.c_contiguous
        ):
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

    reuse = _Fast.reuse

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
        return (
            self._ws.as_dtype("rm", np.asarray(self.running_mean), _F64),
            self._ws.as_dtype("rv", np.asarray(self.running_var), _F64),
        )

    def forward(self, x, train_flg=True):
        x = np.asarray(x)
        gamma, beta = self.params
        dt = _result_kernel_dtype(x, gamma, beta) if x.ndim >= 2 else None
        if dt is None:
            self._fast = False
            return super().forward(x, train_flg)
        x2, gamma, beta = self._flatten(x)
        n, d = x2.shape
        if train_flg and n == 0:
            return super().forward(x, train_flg)  # raises the reference's error
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
            if (
                ws.reuse
                and type(cur_m) is np.ndarray
                and cur_m is rm
                and type(cur_v) is np.ndarray
                and cur_v is rv
                and cur_m.flags.writeable
                and cur_v.flags.writeable
            ):
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
            raise ValueError(
                f"BatchNormalization.backward: dout must have the forward input's shape "
                f"{self.input_shape}, got {dout.shape}"
            )
        xn = self.xn
        dt = xn.dtype
        gamma = self.params[0]
        if _result_kernel_dtype(dout, xn, gamma) != dt or np.shape(gamma) != (xn.shape[1],):
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


# ---------------------------------------------------------------------------------------------------------------
# Book 2: Softmax, SigmoidWithLoss, Embedding (reference twins in fastbp.reference_time)
# ---------------------------------------------------------------------------------------------------------------
from fastbp import _embedding as _emb  # noqa: E402
from fastbp import reference_time as _ref2  # noqa: E402


class Softmax(_ref2.Softmax):
    """Book 2's Softmax: out = softmax(x) over the last axis; dx = out * (dout - sum(out * dout)).

    Not a hot path in the book's models (they use the fused softmax-with-loss): this is the NumPy twin, with
    ``dout`` checked to have the output's shape (the book's broadcasts, e.g. a (N, 1) dout, give wrong dx)."""

    def backward(self, dout):
        if self.out is not None and np.shape(dout) != self.out.shape:
            raise ValueError(
                f"Softmax.backward: dout must have the output's shape {self.out.shape}, got {np.shape(dout)}"
            )
        return super().backward(dout)


class SigmoidWithLoss(_ref2.SigmoidWithLoss):
    """Book 2's SigmoidWithLoss: mean binary cross-entropy of sigmoid(x) against 0/1 labels; dx = dout (y - t) / N.

    The loss is the exact ``log(1 + exp(-|x|)) + max(x, 0) - t x``, not the book's ``-log(y + 1e-7)`` (equal to
    about 1e-7 except where the book's value is capped at 16.1).  Its batch is (N,) scores: a NumPy pass over N
    numbers; ``fastbp.negative_sampling_layer`` fuses it with the scores of all samples.  ``dout`` must be a
    scalar (an array would broadcast into a wrong gradient)."""

    def backward(self, dout=1):
        if np.ndim(dout) != 0:
            raise ValueError(f"SigmoidWithLoss.backward takes a scalar dout, got shape {np.shape(dout)}")
        return super().backward(dout)


def _index_array(idx, ws):
    """idx as a C-contiguous native int32/int64 array (a copy into the layer's scratch when it is not one)."""
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"Embedding: indices must be integers, got dtype {idx.dtype}")
    if (idx.dtype == np.int32 or idx.dtype == np.int64) and idx.dtype.isnative and idx.flags.c_contiguous:
        return idx
    if idx.dtype.kind == "u" and idx.size and idx.max() > np.iinfo(np.int64).max:
        raise IndexError(f"Embedding: index {idx.max()} is out of range")
    out = ws.scratch("idx", idx.shape, _I64)
    np.copyto(out, idx, casting="unsafe")
    return out


class Embedding(_ref2.Embedding):
    """Book 2's Embedding: out = W[idx] (any index shape); backward: dW = 0, then dW[idx] += dout, duplicates
    summed in index order (the book's ``np.add.at``), written into ``grads[0]`` in place; returns None.

    Gather and scatter run in fastbp._embedding (parallel over rows; the scatter is deterministic: no atomics,
    each destination row summed by one thread in index order, in double for float32).  ``W`` is held by
    reference.  Indices outside ``[0, V)`` raise IndexError (the book's NumPy indexing would wrap negatives).
    Other dtypes than float32/float64 (or a non-contiguous ``W``) take the NumPy twin's path.
    """

    def __init__(self, W, *, reuse=False):
        super().__init__(W)
        self._ws = _Workspace(reuse)
        self._idx = None

    reuse = _Fast.reuse

    def forward(self, idx):
        W = self.params[0]
        if type(W) is np.ndarray and (W.dtype is _F32 or W.dtype is _F64) and W.ndim == 2 and W.flags.c_contiguous:
            ik = _index_array(idx, self._ws)
            D = W.shape[1]
            out = self._ws.get("out", ik.shape + (D,), W.dtype)
            _emb.gather(W, ik, out.reshape(-1, D))
            self.idx = idx
            self._idx = ik
            return out
        self._idx = None
        return super().forward(idx)

    def backward(self, dout):
        ik = self._idx
        if ik is None:
            return super().backward(dout)
        dW = self.grads[0]
        D = dW.shape[1] if dW.ndim == 2 else -1
        dout = np.asarray(dout)
        if dout.shape != ik.shape + (D,):
            raise ValueError(f"Embedding.backward: dout must have shape {ik.shape + (D,)}, got {dout.shape}")
        if (dW.dtype is _F32 or dW.dtype is _F64) and dW.flags.c_contiguous and dW.flags.writeable:
            d2 = self._ws.as_dtype("dout", dout, dW.dtype).reshape(-1, D)
            _emb.scatter_add(d2, ik, dW)
            return None
        return super().backward(dout)
