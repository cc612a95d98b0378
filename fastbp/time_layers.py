"""Book 2's ``common/time_layers.py`` on fastbp's kernels: swap ``from common.time_layers import *`` for
``from fastbp.time_layers import *``.

Same class names, constructor arguments and attributes the book's models read: ``params``/``grads`` (the
caller's parameter arrays held by reference and read at every forward; gradient arrays created once and
written in place), ``stateful``, ``h``, ``c``, ``dh``, ``set_state``/``reset_state``, ``W``,
``ignore_label``, ``dropout_ratio``/``train_flg``/``mask``, ``forward_lstm``/``backward_lstm``.  The
book's layers ``Embedding``, ``Affine``, ``SoftmaxWithLoss``, ``Softmax``, ``Sigmoid``, ``SigmoidWithLoss``,
``MatMul``, ``Dropout`` (where fastbp.layers has it) are re-exported, as the book's ``from common.layers
import *`` does.

How it is fast:

* ``TimeRNN``/``TimeLSTM``/``TimeGRU``: one GEMM ``xs @ Wx + b`` for all time steps, then the time loop in
  Cython (fastbp._recurrent): per step one ``h @ Wh`` GEMM and one fused gate kernel (two of each for the book's
  GRU), forward and backward; after the backward loop one GEMM each for ``dWx``, ``dWh``, ``dxs`` and a column
  sum for ``db``.  No Python per time step, no per-step layer objects.
* ``TimeEmbedding``: one gather and one deterministic scatter-add (fastbp._embedding).
* ``TimeAffine``: the ``(N*T, D)`` reshape over fastbp's GEMM / affine kernels (a transposed, tied ``W`` is read
  in place).  ``TimeSoftmaxWithLoss``: fastbp's fused softmax cross-entropy kernel over ``(N*T, V)``.

Differences from the book, on purpose (also in each class's docstring):

* the per-step layer objects are not created: ``layers`` is None on ``TimeRNN``/``TimeLSTM``/``TimeGRU``/
  ``TimeEmbedding`` (the book's models never read it);
* dtypes follow the parameters (float32 like the book, or float64), not a hard-coded ``'f'``;
* ``TimeSoftmaxWithLoss`` computes the exact log-sum-exp loss; ignored positions (label -1) give zero gradient
  rows, and a batch where every label is ignored gives loss 0 (the book divides by zero);
* ``GRU``/``TimeGRU`` have ``params = [Wx, Wh]`` and ``grads = [dWx, dWh]`` (the book's have neither list;
  ``dWx``/``dWh`` are the same arrays);
* indices outside ``[0, V)`` raise IndexError; ``h``/``c`` of the wrong shape raise ValueError.

Every layer takes ``reuse=False``; with ``reuse=True`` returned arrays are workspaces overwritten by the layer's
next call of the same shape (no allocation after warm-up).
"""

import numpy as np

from fastbp import _embedding as _emb
from fastbp import _kernels as _k
from fastbp import _recurrent as _rec
from fastbp import reference_time as _ref
from fastbp.layers import (
    Affine,
    Dropout,  # noqa: F401  (book 2's time_layers.py sees common/layers.py's Dropout)
    Embedding,
    MatMul,
    Sigmoid,
    SigmoidWithLoss,
    Softmax,  # noqa: F401
    SoftmaxWithLoss,
    _Fast,
    _index_array,
    _Workspace,
)

__all__ = [
    *_ref.TIME_LAYERS,
    "Embedding",
    "Affine",
    "MatMul",
    "Softmax",
    "SoftmaxWithLoss",
    "Sigmoid",
    "SigmoidWithLoss",
]
if "Dropout" in globals():
    __all__.append("Dropout")

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _compute_dtype(owner, *arrays):
    dt = np.result_type(*arrays)
    if dt not in (_F32, _F64):
        raise TypeError(
            f"{owner}: fastbp computes in float32 or float64; the inputs promote to {dt} "
            f"(dtypes {', '.join(str(np.asarray(a).dtype) for a in arrays)})"
        )
    return dt


def _grad_zeros(p):
    p = np.asarray(p)
    return np.zeros_like(p, dtype=p.dtype if p.dtype in (_F32, _F64) else _F64)


def _scalar_dout(owner, dout):
    """The loss layers' upstream gradient: a scalar (an array would broadcast into a wrong gradient)."""
    if np.ndim(dout) != 0:
        raise ValueError(f"{owner}.backward takes a scalar dout, got shape {np.shape(dout)}")
    return dout


def _not_ready(owner):
    return RuntimeError(f"{owner}.backward called before {owner}.forward")


class _Base(_Fast):  # the `reuse` switch of the layer's workspace: fastbp.layers' mixin
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _grad_out(self, i, dt):
        """(array to compute grads[i] into, whether it must be copied into grads[i] afterwards)."""
        g = self.grads[i]
        if g.dtype == dt and g.flags.c_contiguous and g.flags.writeable:
            return g, False
        return self._ws.scratch(f"grad{i}", g.shape, dt), True

    def _grad_done(self, i, buf, copy):
        if copy:
            np.copyto(self.grads[i], buf.reshape(self.grads[i].shape), casting="unsafe")


def _gemm_into_grad(layer, i, a, b, dt):
    """grads[i][...] = a.T @ b (a (M, K), b (M, N)), written in place whatever the layout of grads[i]."""
    g = layer.grads[i]
    if g.dtype == dt and g.flags.writeable and g.ndim == 2:
        if g.flags.c_contiguous:
            _k.gemm(a, b, g, trans_a=True)
            return
        if g.flags.f_contiguous:  # e.g. a tied W.T: fill its C-contiguous transpose
            _k.gemm(b, a, g.T, trans_a=True)
            return
    buf = layer._ws.scratch(f"grad{i}", (a.shape[1], b.shape[1]), dt)
    _k.gemm(a, b, buf, trans_a=True)
    np.copyto(g, buf, casting="unsafe")


def _colsum_into_grad(layer, i, d2, dt):
    g = layer.grads[i]
    if g.dtype == dt and g.flags.c_contiguous and g.flags.writeable and g.ndim == 1:
        _k.bias_backward(d2, g)
        return
    buf = layer._ws.scratch(f"grad{i}", (d2.shape[1],), dt)
    _k.bias_backward(d2, buf)
    np.copyto(g, buf.reshape(g.shape), casting="unsafe")


# ---------------------------------------------------------------------------------------------------------------
# Recurrent layers
# ---------------------------------------------------------------------------------------------------------------
class _Recurrent(_ref._HState, _Base):
    """Shared machinery of TimeRNN / TimeLSTM / TimeGRU (G gates of H columns, cell state or not, bias or not)."""

    _name = None
    _gates = 1
    _has_c = False
    _has_bias = True

    def __init__(self, params, stateful, reuse):
        self.params = list(params)
        self.grads = [_grad_zeros(p) for p in self.params]
        self.layers = None
        self.h = None
        self.dh = None
        self.stateful = stateful
        self._ws = _Workspace(reuse)
        self._cache = None

    # -- the time loop: shared by every cell; the cell's kernel call is _cell_forward / _cell_backward ----------
    def forward(self, xs):
        dt, N, T, D, H, xk, Wxk, Whk, bk = self._operands(xs)
        h0 = self._initial_state(N, H, dt)
        A = self._project(xk, Wxk, bk, N, T, D, H, dt)
        hs = self._ws.get("hs", (N, T, H), dt)
        cell = self._cell_forward(A, Whk, h0, hs, N, T, H, dt)
        self._cache = dict(
            xk=xk,
            Wxk=Wxk,
            Whk=Whk,
            hprev=self._hprev(h0, hs, N, T, H, dt),
            shape=(N, T, D, H),
            dt=dt,
            **cell,
        )
        self.h = self._last("hT", hs, h0, N, T, H, dt)
        return hs

    def backward(self, dhs):
        c = self._cache
        if c is None:
            raise _not_ready(self._name)
        N, T, D, H = c["shape"]
        dt = c["dt"]
        return self._backward(self._dhs(dhs, N, T, H, dt), N, T, D, H, dt)

    def _backward(self, dk, N, T, D, H, dt, **cell_state):
        """dxs from the checked upstream gradients dk (N, T, H); also sets dh and the grads (one step: T = 1)."""
        dh = self._ws.get("dh", (N, H), dt)
        dh.fill(0)
        dA = self._ws.scratch("dA", (N, T, self._gates * H), dt)
        self._cell_backward(dk, self._cache, dh, dA, N, T, H, dt, **cell_state)
        return self._finish_backward(dA, dh, N, T, D, H, dt)

    def _cell_forward(self, A, Whk, h0, hs, N, T, H, dt):
        """Run the cell's forward kernel over all steps; returns what its backward needs, for the cache."""
        raise NotImplementedError

    def _cell_backward(self, dk, c, dh, dA, N, T, H, dt):
        """Run the cell's backward kernel over all steps, filling dA (N, T, G*H) and dh."""
        raise NotImplementedError

    # -- operands -------------------------------------------------------------------------------------------
    def _operands(self, xs):
        name, G = self._name, self._gates
        Wx, Wh = self.params[0], self.params[1]
        b = self.params[2] if self._has_bias else None
        xs = np.asarray(xs)
        if xs.ndim != 3:
            raise ValueError(f"{name}: xs must be (N, T, D), got shape {xs.shape}")
        if Wx.ndim != 2 or Wh.ndim != 2 or Wh.shape[1] != G * Wh.shape[0] or Wx.shape[1] != Wh.shape[1]:
            raise ValueError(f"{name}: expected Wx (D, {G}H) and Wh (H, {G}H), got {Wx.shape} and {Wh.shape}")
        H = Wh.shape[0]
        if b is not None and b.shape != (G * H,):
            raise ValueError(f"{name}: b must have shape ({G * H},), got {b.shape}")
        if xs.shape[2] != Wx.shape[0]:
            raise ValueError(f"{name}: xs has {xs.shape[2]} features but Wx has {Wx.shape[0]} rows")
        dt = _compute_dtype(name, xs, Wx, Wh, *(() if b is None else (b,)))
        ws = self._ws
        N, T, D = xs.shape
        xk = ws.as_dtype("xs", xs, dt)
        Wxk = Wx if (Wx.dtype == dt and Wx.dtype.isnative) else ws.as_dtype("Wx", Wx, dt)
        Whk = ws.as_dtype("Wh", Wh, dt)
        bk = None if b is None else ws.as_dtype("b", b, dt)
        return dt, N, T, D, H, xk, Wxk, Whk, bk

    def _initial_state(self, N, H, dt):
        """h0, checked before any work is done (TimeLSTM also checks its c here)."""
        return self._state("h", N, H, dt, "h0")

    def _state(self, attr, N, H, dt, buf_name):
        """The initial state in a scratch buffer: zeros unless stateful with a state set (checked (N, H))."""
        buf = self._ws.scratch(buf_name, (N, H), dt)
        v = getattr(self, attr)
        if not self.stateful or v is None:
            buf.fill(0)
        else:
            v = np.asarray(v)
            if v.shape != (N, H):
                raise ValueError(f"{self._name}: state {attr} must have shape {(N, H)} (N, H), got {v.shape}")
            np.copyto(buf, v, casting="same_kind")
        return buf

    def _project(self, xk, Wxk, bk, N, T, D, H, dt):
        """A = xs @ Wx (+ b) for all steps: (N, T, G*H)."""
        GH = self._gates * H
        A = self._ws.scratch("A", (N, T, GH), dt)
        A2 = A.reshape(N * T, GH)
        if bk is not None:
            _k.affine_forward(xk.reshape(N * T, D), Wxk, bk, A2)
        else:
            _k.gemm(xk.reshape(N * T, D), Wxk, A2)
        return A

    def _hprev(self, h0, hs, N, T, H, dt):
        """(N, T, H): h_{t-1} at step t (h0 at step 0), kept for dWh."""
        hp = self._ws.scratch("hprev", (N, T, H), dt)
        if T:
            hp[:, 0] = h0
            hp[:, 1:] = hs[:, :-1]
        return hp

    def _last(self, name, seq, first, N, T, H, dt):
        """The state after the last step (a new array, or a workspace with reuse=True): seq[:, -1] or first."""
        out = self._ws.get(name, (N, H), dt)
        np.copyto(out, seq[:, -1] if T else first)
        return out

    def _finish_backward(self, dA, dh, N, T, D, H, dt):
        """dWx, dWh (except GRU's), db, dxs from dA (N, T, G*H)."""
        c = self._cache
        GH = self._gates * H
        dA2 = dA.reshape(N * T, GH)
        _gemm_into_grad(self, 0, c["xk"].reshape(N * T, D), dA2, dt)
        self._dWh(dA2, N, T, H, dt)
        if self._has_bias:
            _colsum_into_grad(self, 2, dA2, dt)
        dxs = self._ws.get("dxs", (N, T, D), dt)
        _k.gemm(dA2, c["Wxk"], dxs.reshape(N * T, D), trans_b=True)
        self.dh = dh
        return dxs

    def _dWh(self, dA2, N, T, H, dt):
        _gemm_into_grad(self, 1, self._cache["hprev"].reshape(N * T, H), dA2, dt)

    def _dhs(self, dhs, N, T, H, dt):
        if self._cache is None:
            raise _not_ready(self._name)
        dhs = np.asarray(dhs)
        if dhs.shape != (N, T, H):
            raise ValueError(f"{self._name}.backward: dhs must have shape {(N, T, H)}, got {dhs.shape}")
        return self._ws.as_dtype("dhs", dhs, dt)


class TimeRNN(_Recurrent):
    """Book 2's TimeRNN: h_t = tanh(h_{t-1} Wh + x_t Wx + b) over (N, T, D) -> hs (N, T, H).

    ``stateful``: the next forward starts from ``h`` (the last step's state); ``set_state(h)``/``reset_state()``.
    ``backward(dhs)`` sets ``dh`` (the gradient wrt the initial state) and returns dxs.  The time loop is
    Cython (fastbp._recurrent); ``layers`` is None (no per-step objects)."""

    _name = "TimeRNN"
    _gates = 1

    def __init__(self, Wx, Wh, b, stateful=False, *, reuse=False):
        super().__init__((Wx, Wh, b), stateful, reuse)

    def _cell_forward(self, A, Whk, h0, hs, N, T, H, dt):
        _rec.rnn_forward(A, Whk, h0, hs)
        return dict(hs=hs.copy() if not self._ws.reuse else hs)

    def _cell_backward(self, dk, c, dh, dA, N, T, H, dt):
        _rec.rnn_backward(dk, c["hs"], c["Whk"], dh, dA)


class TimeLSTM(_ref._HCState, _Recurrent):
    """Book 2's TimeLSTM: gates A = x Wx + h Wh + b split [f | g | i | o] (the book's order, so its weights and
    pickles work unchanged); c_t = f c_{t-1} + g i; h_t = o tanh(c_t).

    ``stateful`` keeps ``h`` and ``c`` between forwards; ``set_state(h, c=None)``/``reset_state()``;
    ``backward(dhs)`` sets ``dh`` and returns dxs.  Whole-sequence Cython loop (fastbp._recurrent): one
    ``xs @ Wx`` GEMM, per step one ``h @ Wh`` GEMM and one fused gate kernel, forward and backward.
    ``layers`` is None (no per-step objects)."""

    _name = "TimeLSTM"
    _gates = 4
    _has_c = True

    def __init__(self, Wx, Wh, b, stateful=False, *, reuse=False):
        super().__init__((Wx, Wh, b), stateful, reuse)
        self.c = None

    def _initial_state(self, N, H, dt):
        h0 = super()._initial_state(N, H, dt)
        self._c0 = self._state("c", N, H, dt, "c0")  # checked after h, before any work (as always)
        return h0

    def _cell_forward(self, A, Whk, h0, hs, N, T, H, dt):
        c0 = self._c0
        cs = self._ws.scratch("cs", (N, T, H), dt)
        _rec.lstm_forward(A, Whk, h0, c0, hs, cs)
        self.c = self._last("cT", cs, c0, N, T, H, dt)
        return dict(A=A, cs=cs, c0=c0)

    def _cell_backward(self, dk, c, dh, dA, N, T, H, dt, dc=None):
        """dc: the gradient into the last step's cell state (zeros for the whole sequence; the LSTM step's
        dc_next), overwritten with dc0."""
        if dc is None:
            dc = self._ws.scratch("dc", (N, H), dt)
            dc.fill(0)
        _rec.lstm_backward(dk, c["A"], c["cs"], c["c0"], c["Whk"], dh, dc, dA)


class TimeGRU(_ref._GRUNames, _Recurrent):
    """Book 2's TimeGRU (no bias): z = sig(x Wxz + h Whz), r = sig(x Wxr + h Whr), h~ = tanh(x Wxh + (r h) Whh),
    h_t = (1 - z) h_{t-1} + z h~; gate columns [z | r | h~].

    Unlike the book's, it has ``params = [Wx, Wh]`` and ``grads = [dWx, dWh]`` (``dWx``/``dWh`` are the same
    arrays, written in place).  ``stateful``, ``h``, ``dh``, ``set_state``/``reset_state`` as the book.  Cython
    time loop: per step two GEMMs and two fused kernels each way."""

    _name = "TimeGRU"
    _gates = 3
    _has_bias = False

    def __init__(self, Wx, Wh, stateful=False, *, reuse=False):
        super().__init__((Wx, Wh), stateful, reuse)

    def _cell_forward(self, A, Whk, h0, hs, N, T, H, dt):
        rhs = self._ws.scratch("rhs", (N, T, H), dt)
        work = self._ws.scratch("work", (N, 2 * H), dt)
        _rec.gru_forward(A, Whk, h0, hs, rhs, work)
        return dict(A=A, rhs=rhs, h0=h0, hs=hs.copy() if not self._ws.reuse else hs)

    def _cell_backward(self, dk, c, dh, dA, N, T, H, dt):
        work = self._ws.scratch("work", (N, 2 * H), dt)
        _rec.gru_backward(dk, c["A"], c["hs"], c["h0"], c["Whk"], dh, dA, work)

    def _dWh(self, dA2, N, T, H, dt):
        # dWh[:, :2H] = hprev^T dA[:, :2H]; dWh[:, 2H:] = (r h)^T dA[:, 2H:]
        c = self._cache
        buf = self._ws.scratch("dWh", (H, 3 * H), dt)
        zr = self._ws.scratch("dWh_zr", (H, 2 * H), dt)
        hh = self._ws.scratch("dWh_h", (H, H), dt)
        _k.gemm(c["hprev"].reshape(N * T, H), dA2[:, : 2 * H], zr, trans_a=True)
        _k.gemm(c["rhs"].reshape(N * T, H), dA2[:, 2 * H :], hh, trans_a=True)
        buf[:, : 2 * H] = zr
        buf[:, 2 * H :] = hh
        np.copyto(self.grads[1], buf, casting="unsafe")


# ---------------------------------------------------------------------------------------------------------------
# Single-step layers: the same kernels with T = 1
# ---------------------------------------------------------------------------------------------------------------
class _Step(_Base):
    """A step layer over its Time* twin with T = 1 (stateful, its h set from h_prev at every forward)."""

    _name = None

    def __init__(self, time_layer):
        self._t = time_layer
        self.params, self.grads = self._t.params, self._t.grads
        self._ws = self._t._ws
        self.cache = None

    def forward(self, x, h_prev):
        xs = self._seq(x)
        self._t.h = self._check_h(h_prev, xs.shape[0], self.params[1].shape[0])
        hs = self._t.forward(xs)
        self.cache = True
        return hs[:, 0]

    def backward(self, dh_next):
        if self.cache is None:
            raise _not_ready(self._name)
        dxs = self._t.backward(self._dnext(dh_next, "dh_next")[:, None, :])
        return dxs[:, 0], self._t.dh

    def _seq(self, x):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{type(self).__name__}: x must be (N, D), got shape {x.shape}")
        return x[:, None, :]

    def _dnext(self, d, name):
        """An upstream gradient of the step's (N, H) output, shape-checked against the last forward."""
        N, H = self._t._cache["shape"][0], self._t._cache["shape"][3]
        d = np.asarray(d)
        if d.shape != (N, H):
            raise ValueError(f"{type(self).__name__}.backward: {name} must have shape {(N, H)} (N, H), got {d.shape}")
        return d

    def _check_h(self, h, N, H, name="h_prev"):
        h = np.asarray(h)
        if h.shape != (N, H):
            raise ValueError(f"{type(self).__name__}: {name} must have shape {(N, H)}, got {h.shape}")
        return h


class RNN(_Step):
    """Book 2's RNN step: h_next = tanh(h_prev Wh + x Wx + b); backward(dh_next) -> (dx, dh_prev)."""

    _name = "RNN"

    def __init__(self, Wx, Wh, b, *, reuse=False):
        super().__init__(TimeRNN(Wx, Wh, b, stateful=True, reuse=reuse))


class LSTM(_Step):
    """Book 2's LSTM step: A = x Wx + h_prev Wh + b split [f | g | i | o]; c_next = f c_prev + g i;
    h_next = o tanh(c_next).  forward(x, h_prev, c_prev) -> (h_next, c_next);
    backward(dh_next, dc_next) -> (dx, dh_prev, dc_prev)."""

    _name = "LSTM"

    def __init__(self, Wx, Wh, b, *, reuse=False):
        super().__init__(TimeLSTM(Wx, Wh, b, stateful=True, reuse=reuse))

    def forward(self, x, h_prev, c_prev):
        xs = self._seq(x)
        N, H = xs.shape[0], self.params[1].shape[0]
        self._t.h = self._check_h(h_prev, N, H)
        self._t.c = self._check_h(c_prev, N, H, "c_prev")
        hs = self._t.forward(xs)
        self.cache = True
        return hs[:, 0], self._t.c

    def backward(self, dh_next, dc_next):
        if self.cache is None:
            raise _not_ready(self._name)
        t = self._t
        N, T, D, H = t._cache["shape"]
        dt = t._cache["dt"]
        dk = t._dhs(self._dnext(dh_next, "dh_next")[:, None, :], N, 1, H, dt)
        dc_next = self._dnext(dc_next, "dc_next")
        dc = np.zeros((N, H), dt)
        np.copyto(dc, dc_next, casting="same_kind")
        dxs = t._backward(dk, N, 1, D, H, dt, dc=dc)
        return dxs[:, 0], t.dh, dc


class GRU(_ref._GRUNames, _Step):
    """Book 2's GRU step (no bias; gates [z | r | h~]): forward(x, h_prev) -> h_next;
    backward(dh_next) -> (dx, dh_prev).  ``params = [Wx, Wh]``, ``grads = [dWx, dWh]`` (the book's has
    neither list; ``Wx``/``Wh``/``dWx``/``dWh`` are its attribute names)."""

    _name = "GRU"

    def __init__(self, Wx, Wh, *, reuse=False):
        super().__init__(TimeGRU(Wx, Wh, stateful=True, reuse=reuse))


# ---------------------------------------------------------------------------------------------------------------
# Embedding, Affine, Softmax-with-loss over time
# ---------------------------------------------------------------------------------------------------------------
class TimeEmbedding(_Base):
    """Book 2's TimeEmbedding: out[n, t] = W[xs[n, t]]; backward: grads[0] = 0, then += dout rows at xs
    (duplicates summed in index order; deterministic and parallel, fastbp._embedding).  ``W`` is the caller's
    array (``self.W is params[0]``).  ``layers`` is None (no per-step Embedding objects)."""

    def __init__(self, W, *, reuse=False):
        self.params = [W]
        self.grads = [_grad_zeros(W)]
        self.layers = None
        self.W = W
        self._ws = _Workspace(reuse)
        self._idx = None
        self._ref = None

    def forward(self, xs):
        W = self.params[0]
        xs = np.asarray(xs)
        if xs.ndim != 2:
            raise ValueError(f"TimeEmbedding: xs must be (N, T) indices, got shape {xs.shape}")
        if not (type(W) is np.ndarray and W.dtype in (_F32, _F64) and W.ndim == 2 and W.flags.c_contiguous):
            self._ref = _ref.TimeEmbedding(W)
            self._ref.grads = self.grads
            self._idx = None
            return self._ref.forward(xs)
        self._ref = None
        ik = _index_array(xs, self._ws)
        N, T = xs.shape
        D = W.shape[1]
        out = self._ws.get("out", (N, T, D), W.dtype)
        _emb.gather(W, ik, out.reshape(N * T, D))
        self._idx = ik
        return out

    def backward(self, dout):
        if self._ref is not None:
            return self._ref.backward(dout)
        ik = self._idx
        if ik is None:
            raise _not_ready("TimeEmbedding")
        dW = self.grads[0]
        N, T = ik.shape
        D = dW.shape[1]
        dout = np.asarray(dout)
        if dout.shape != (N, T, D):
            raise ValueError(f"TimeEmbedding.backward: dout must have shape {(N, T, D)}, got {dout.shape}")
        dt = dW.dtype if dW.dtype in (_F32, _F64) else _F64
        d2 = self._ws.as_dtype("dout", dout, dt).reshape(N * T, D)
        if dW.dtype == dt and dW.flags.c_contiguous and dW.flags.writeable:
            _emb.scatter_add(d2, ik, dW)
        else:
            buf = self._ws.scratch("dW", dW.shape, dt)
            _emb.scatter_add(d2, ik, buf)
            np.copyto(dW, buf, casting="unsafe")
        return None


class TimeAffine(_Base):
    """Book 2's TimeAffine: out = x.reshape(N*T, D) @ W + b, back to (N, T, M); backward writes grads[0]
    (dW = x^T dout) and grads[1] (db) in place and returns dx.  ``W`` may be a transposed view (the book's
    weight tying ``TimeAffine(embed_W.T, b)``): it is read in place, and its gradient (``np.zeros_like(W.T)``
    layout) is written in place."""

    def __init__(self, W, b, *, reuse=False):
        self.params = [W, b]
        self.grads = [_grad_zeros(W), _grad_zeros(b)]
        self.x = None
        self._ws = _Workspace(reuse)
        self._cache = None

    def forward(self, x):
        W, b = self.params
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"TimeAffine: x must be (N, T, D), got shape {x.shape}")
        if W.ndim != 2 or b.shape != (W.shape[1],) or x.shape[2] != W.shape[0]:
            raise ValueError(
                f"TimeAffine: x {x.shape}, W {W.shape} and b {b.shape} do not fit ((N, T, D), (D, M), (M,))"
            )
        N, T, D = x.shape
        M = W.shape[1]
        dt = _compute_dtype("TimeAffine", x, W, b)
        ws = self._ws
        xk = ws.as_dtype("x", x, dt)
        Wk = W if (W.dtype == dt and W.dtype.isnative) else ws.as_dtype("W", W, dt)
        bk = ws.as_dtype("b", b, dt)
        out = ws.get("out", (N, T, M), dt)
        _k.affine_forward(xk.reshape(N * T, D), Wk, bk, out.reshape(N * T, M))
        self.x = x
        self._cache = (xk, Wk, dt)
        return out

    def backward(self, dout):
        if self._cache is None:
            raise _not_ready("TimeAffine")
        xk, Wk, dt = self._cache
        N, T, D = xk.shape
        M = Wk.shape[1]
        dout = np.asarray(dout)
        if dout.shape != (N, T, M):
            raise ValueError(f"TimeAffine.backward: dout must have shape {(N, T, M)}, got {dout.shape}")
        d2 = self._ws.as_dtype("dout", dout, dt).reshape(N * T, M)
        x2 = xk.reshape(N * T, D)
        _gemm_into_grad(self, 0, x2, d2, dt)
        _colsum_into_grad(self, 1, d2, dt)
        dx = self._ws.get("dx", (N, T, D), dt)
        _k.gemm(d2, Wk, dx.reshape(N * T, D), trans_b=True)
        return dx


def _softmax_ce(x2, t, y, g, scale, ignore, mask):
    """Sum of the valid rows' losses; y = softmax(x2); g = scale (y - onehot) on valid rows, 0 on ignored ones.

    The kernel returns the mean over the valid rows (it skips rows labelled `ignore`), so the sum is mean * n_valid."""
    if mask is None:
        return _k.softmax_cross_entropy(x2, t, y, g, scale) * t.shape[0]
    return _k.softmax_cross_entropy(x2, t, y, g, scale, ignore_label=ignore) * int(mask.sum())


class TimeSoftmaxWithLoss(_Base):
    """Book 2's TimeSoftmaxWithLoss: loss = mean over positions whose label is not ``ignore_label`` (-1) of
    ``logsumexp(x) - x[t]``; backward: dx = dout (softmax(x) - onehot(t)) / n_valid, zero rows where ignored.

    Labels are (N, T) integers (or one-hot (N, T, V), argmax'ed as the book does).  The loss and gradient come
    from fastbp's fused softmax cross-entropy kernel in one pass over (N*T, V).  Unlike the book, the loss is the
    exact log-sum-exp form, a batch where every label is ignored gives loss 0 and a zero gradient (the book
    divides by zero), and a label outside [0, V) other than ``ignore_label`` raises IndexError."""

    def __init__(self, *, reuse=False):
        self.params, self.grads = [], []
        self.cache = None
        self.ignore_label = -1
        self._ws = _Workspace(reuse)
        self._g = None

    def forward(self, xs, ts):
        xs = np.asarray(xs)
        ts = np.asarray(ts)
        if xs.ndim != 3:
            raise ValueError(f"TimeSoftmaxWithLoss: xs must be (N, T, V), got shape {xs.shape}")
        N, T, V = xs.shape
        if ts.ndim == 3:
            ts = ts.argmax(axis=2)
        if ts.shape != (N, T):
            raise ValueError(f"TimeSoftmaxWithLoss: ts must be (N, T) = {(N, T)} labels, got shape {ts.shape}")
        if ts.dtype.kind not in "iu":
            raise TypeError(f"TimeSoftmaxWithLoss: labels must be integers, got {ts.dtype}")
        dt = xs.dtype if xs.dtype in (_F32, _F64) else _compute_dtype("TimeSoftmaxWithLoss", xs, np.float32)
        ws = self._ws
        x2 = ws.as_dtype("x", xs, dt).reshape(N * T, V)
        if ts.dtype.kind == "u" and ts.size and ts.max() >= V:  # checked before the int64 cast can wrap it
            raise IndexError(
                f"TimeSoftmaxWithLoss: label {ts.max()} is out of range for {V} classes (valid: 0 .. {V - 1})"
            )
        t = ws.scratch("t", (N * T,), _I64)
        np.copyto(t, ts.reshape(N * T), casting="unsafe")
        mask = None
        ignore = self.ignore_label
        lo, hi = (int(t.min()), int(t.max())) if N * T else (0, 0)
        valid = t
        in_range_ignore = ignore is not None and 0 <= ignore < V  # the book masks ts == ignore_label, whatever it is
        if lo < 0 or hi >= V or in_range_ignore:  # ignored positions, or a bad label: look closer
            if ignore is not None:
                m = t == ignore
                if m.any():
                    mask = ~m
                    valid = t[mask]
            _ref._check_labels(valid, V, ignore)
        n_valid = valid.size
        y = ws.scratch("y", (N * T, V), dt)
        g = ws.get("g", (N, T, V), dt)
        g2 = g.reshape(N * T, V)
        if n_valid == 0:
            g.fill(0)
            loss = 0.0
        else:
            loss = _softmax_ce(x2, t, y, g2, 1.0 / n_valid, ignore, mask) / n_valid
        self._g = g
        self.cache = (t, y, mask, (N, T, V))
        return loss

    def backward(self, dout=1):
        g = self._g
        if g is None:
            raise _not_ready("TimeSoftmaxWithLoss")
        if (type(dout) is int or type(dout) is float) and dout == 1:
            return g
        d = np.asarray(dout)
        if d.ndim != 0:
            raise ValueError(f"TimeSoftmaxWithLoss.backward takes a scalar dout, got shape {d.shape}")
        return _k.scale_into(g, float(d), self._ws.get("dx", g.shape, g.dtype))


class TimeSigmoidWithLoss(_ref.TimeSigmoidWithLoss):
    """Book 2's TimeSigmoidWithLoss: the mean over T of SigmoidWithLoss over (N, T) scores and 0/1 labels.

    One vectorised pass over (N, T) instead of T per-step layers (``layers`` is None); the exact binary
    cross-entropy ``log(1 + exp(-|x|)) + max(x, 0) - t x`` (the book's adds 1e-7 inside the log)."""

    def forward(self, xs, ts):
        xs = np.asarray(xs)
        ts = np.asarray(ts)
        if xs.ndim != 2 or ts.shape != xs.shape:
            raise ValueError(f"TimeSigmoidWithLoss: xs and ts must both be (N, T), got {xs.shape} and {ts.shape}")
        N, T = xs.shape
        self.xs_shape = xs.shape
        self.layers = None
        e = np.exp(-np.abs(xs))
        self._y = np.where(xs >= 0, 1 / (1 + e), e / (1 + e))
        self._t = ts
        rows = np.log1p(e) + np.maximum(xs, 0) - ts * xs
        return rows.sum() / (N * T) if N * T else rows.sum()

    def backward(self, dout=1):
        if self.xs_shape is None:
            raise _not_ready("TimeSigmoidWithLoss")
        N, T = self.xs_shape
        return (self._y - self._t) * (_scalar_dout("TimeSigmoidWithLoss", dout) / (N * T))


class TimeDropout(_ref.TimeDropout):
    """Book 2's TimeDropout (inverted dropout while ``train_flg``): mask = (np.random.rand(*xs.shape) >
    ratio) / (1 - ratio), the book's draw, so a fixed ``np.random.seed`` gives the book's masks; the mask is kept
    in the input's dtype (the book's is float32).  ``backward`` checks that dout has the mask's shape."""

    def backward(self, dout):
        if self.mask is not None and np.shape(dout) != self.mask.shape:
            raise ValueError(f"TimeDropout.backward: dout must have shape {self.mask.shape}, got {np.shape(dout)}")
        return super().backward(dout)


class TimeBiLSTM(_ref.TimeBiLSTM):
    """Book 2's TimeBiLSTM on fastbp's TimeLSTM: [forward LSTM | backward LSTM over the reversed sequence]."""

    _lstm = TimeLSTM
