"""The optimizers of *Deep Learning from Scratch* (book 1 ``common/optimizer.py``), updating in place.

Same class names, constructor arguments, attributes and formulas as the book::

    SGD(lr=0.01)                      p -= lr g
    Momentum(lr=0.01, momentum=0.9)   v = momentum v - lr g ; p += v
    Nesterov(lr=0.01, momentum=0.9)   v = momentum v - lr g ; p += momentum^2 v - (1 + momentum) lr g
    AdaGrad(lr=0.01)                  h += g g ; p -= lr g / (sqrt(h) + 1e-7)
    RMSprop(lr=0.01, decay_rate=0.99) h = decay h + (1 - decay) g g ; p -= lr g / (sqrt(h) + 1e-7)
    Adam(lr=0.001, beta1=0.9, beta2=0.999)
        lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t) ; m += (1 - beta1)(g - m) ; v += (1 - beta2)(g g - v)
        p -= lr_t m / (sqrt(v) + 1e-7)

``update(params, grads)`` takes the book-1 form (two dicts with the same keys) or the book-2 form (two lists
of the same length).  Every parameter array is updated **in place** (the network's layers hold the same
objects, so they see the new values), by one fused kernel pass per array for float32/float64 arrays that are
C- or Fortran-contiguous; other parameters (non-contiguous views, float16, integer arrays) get the same
formula evaluated with NumPy and written back with ``param[...] = ...``.  A gradient of another dtype or
memory order than its parameter is converted once per step into a buffer the optimizer reuses.

State arrays (``v``, ``h``, ``m``) are created at the first update, zeros like each parameter (same memory
order), and keyed like the parameters: a dict for dict parameters, a list for list parameters, as in the
books.  After the first step an update allocates no NumPy array.
"""
import math
import numbers

import numpy as np

from fastbp import _kernels as _k

__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam", "EPS"]

#: The constant the book adds to square roots in the denominators.
EPS = 1e-7

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)

_SGD, _MOMENTUM, _NESTEROV, _ADAGRAD, _RMSPROP, _ADAM = range(6)


def _check_real(value, name, *, positive=False, unit=False):
    """value as a float, ValueError/TypeError naming `name` when it is not a usable hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if unit and not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


def _kernel_order(a):
    """'C' or 'F' when the kernel can update `a` in place, else None."""
    dt = a.dtype
    if (dt != _F32 and dt != _F64) or not dt.isnative or not a.flags.writeable:
        return None
    flags = a.flags
    if flags.c_contiguous:
        return "C"
    if flags.f_contiguous:
        return "F"
    return None


def _contiguous_as(a, order):
    return a.flags.c_contiguous if order == "C" else a.flags.f_contiguous


class _Optimizer:
    """Shared machinery: validation, lazily created state, the kernel call and the NumPy fallback."""

    _kind = None
    _n_states = 0               # state arrays per parameter
    _state_names = ()           # book attribute names of the state containers

    def __init__(self):
        for name in self._state_names:
            setattr(self, name, None)
        self._gbuf = None       # converted-gradient buffers, keyed like the parameters
        self._plan = None       # [(key, param, grad, s1, s2)] of the last all-kernel step (see update)

    # -- hooks -----------------------------------------------------------------------------------------
    def _coefficients(self):
        """(lr, a, b) handed to the kernel for this step (called once per update)."""
        raise NotImplementedError

    # -- public ----------------------------------------------------------------------------------------
    def update(self, params, grads):
        """Update every array of `params` in place from `grads` (two dicts with the same keys or two lists)."""
        kind = self._kind
        plan = self._plan
        if plan is not None and self._same_arrays(plan, params, grads):
            # Same parameter and gradient objects as the last step, which all went through the kernel: skip the
            # Python-level checks (the kernel still checks dtype, shape, layout and writability of each array).
            lr, a, b = self._coefficients()
            for _, p, g, s1, s2 in plan:
                _k.optimizer_update(kind, p, g, s1, s2, lr, a, b, EPS)
            return None
        pairs = self._pairs(params, grads)
        states = self._states(params, pairs)
        lr, a, b = self._coefficients()
        new_plan = []
        for key, p, g in pairs:
            s1 = states[0][key] if self._n_states >= 1 else None
            s2 = states[1][key] if self._n_states >= 2 else None
            order = _kernel_order(p)
            if (order is not None
                    and (s1 is None or _contiguous_as(s1, order))
                    and (s2 is None or _contiguous_as(s2, order))
                    and (s1 is None or s1.dtype == p.dtype) and (s2 is None or s2.dtype == p.dtype)):
                if not (g.dtype == p.dtype and g.dtype.isnative and _contiguous_as(g, order)):
                    g = self._converted(key, g, p, order)
                    new_plan = None
                _k.optimizer_update(kind, p, g, s1, s2, lr, a, b, EPS)
                if new_plan is not None:
                    new_plan.append((key, p, g, s1, s2))
            else:
                self._numpy_update(key, p, g, s1, s2, lr, a, b)
                new_plan = None
        self._plan = new_plan if new_plan else None
        return None

    @staticmethod
    def _same_arrays(plan, params, grads):
        """True when params/grads hold exactly the arrays of `plan`, key for key (identity, not equality)."""
        if len(params) != len(plan) or len(grads) != len(plan):
            return False
        try:
            for key, p, g, _, _ in plan:
                if params[key] is not p or grads[key] is not g:
                    return False
        except (KeyError, IndexError, TypeError):
            return False
        return True

    # -- validation ------------------------------------------------------------------------------------
    @staticmethod
    def _pairs(params, grads):
        """[(key, param, grad)] after checking that params and grads match."""
        if isinstance(params, dict):
            if not isinstance(grads, dict):
                raise TypeError(f"params is a dict, so grads must be a dict with the same keys, "
                                f"got {type(grads).__name__}")
            missing = [k for k in params if k not in grads]
            if missing:
                raise ValueError(f"grads has no entry for parameter(s) {missing}; "
                                 f"params keys {list(params)}, grads keys {list(grads)}")
            keys = params.keys()
        elif isinstance(params, (list, tuple)):
            if not isinstance(grads, (list, tuple)):
                raise TypeError(f"params is a {type(params).__name__}, so grads must be a list of the same "
                                f"length, got {type(grads).__name__}")
            if len(params) != len(grads):
                raise ValueError(f"params and grads must have the same length, got {len(params)} params "
                                 f"and {len(grads)} grads")
            keys = range(len(params))
        else:
            raise TypeError(f"params must be a dict (book 1) or a list (book 2), got {type(params).__name__}")
        pairs = []
        for key in keys:
            p = params[key]
            g = grads[key]
            if not isinstance(p, np.ndarray):
                raise TypeError(f"parameter {key!r} must be a numpy.ndarray (it is updated in place), "
                                f"got {type(p).__name__}")
            if not p.flags.writeable:
                raise ValueError(f"parameter {key!r} is read-only (it is updated in place)")
            if p.dtype.kind not in "fiu":
                raise TypeError(f"parameter {key!r} must be a real numeric array, got dtype {p.dtype}")
            if not isinstance(g, np.ndarray):
                g = np.asarray(g)
            if g.shape != p.shape:
                raise ValueError(f"gradient {key!r} has shape {g.shape} but its parameter has shape {p.shape}")
            if g.dtype.kind not in "fiub":
                raise TypeError(f"gradient {key!r} must be a real numeric array, got dtype {g.dtype}")
            pairs.append((key, p, g))
        return pairs

    def _states(self, params, pairs):
        """The state containers (created or extended lazily), checked against the parameters."""
        n = self._n_states
        if n == 0:
            return ()
        containers = [getattr(self, name) for name in self._state_names]
        is_dict = isinstance(params, dict)
        for j, c in enumerate(containers):
            if c is None:
                c = {} if is_dict else []
                containers[j] = c
                setattr(self, self._state_names[j], c)
            elif isinstance(c, dict) != is_dict:
                raise TypeError(f"this optimizer holds state for {'a dict' if isinstance(c, dict) else 'a list'} "
                                f"of parameters but was given {'a dict' if is_dict else 'a list'}; "
                                f"use one optimizer per network")
        for key, p, _ in pairs:
            for c in containers:
                if is_dict:
                    s = c.get(key)
                    if s is None:
                        c[key] = self._new_state(p)
                        continue
                else:
                    if key >= len(c):
                        c.append(self._new_state(p))
                        continue
                    s = c[key]
                if not isinstance(s, np.ndarray) or s.shape != p.shape:
                    raise ValueError(
                        f"optimizer state for parameter {key!r} has shape "
                        f"{getattr(s, 'shape', None)} but the parameter now has shape {p.shape}; "
                        f"use one optimizer per network")
        return containers

    @staticmethod
    def _new_state(p):
        """zeros like `p` (same memory order); float64 for integer parameters."""
        if p.dtype.kind == "f":
            return np.zeros_like(p, dtype=p.dtype.newbyteorder("="))
        return np.zeros_like(p, dtype=np.float64)

    def _converted(self, key, g, p, order):
        """`g` cast to p's dtype and memory order, in a buffer reused from step to step."""
        if self._gbuf is None:
            self._gbuf = {}
        buf = self._gbuf.get(key)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or not _contiguous_as(buf, order):
            buf = np.empty(p.shape, p.dtype, order=order)
            self._gbuf[key] = buf
        np.copyto(buf, g, casting="same_kind")
        return buf

    # -- NumPy fallback --------------------------------------------------------------------------------
    def _numpy_update(self, key, p, g, s1, s2, lr, a, b):
        """The same formula as the kernel, evaluated with NumPy; p written with p[...] = ..."""
        kind = self._kind
        ct = s1.dtype if s1 is not None else np.result_type(p.dtype, np.float16)
        g = g.astype(ct, copy=False)
        pv = p.astype(ct, copy=False)
        if kind == _SGD:
            new = pv - ct.type(lr) * g
        elif kind == _MOMENTUM:
            s1 *= ct.type(a)
            s1 -= ct.type(lr) * g
            new = pv + s1
        elif kind == _NESTEROV:
            s1 *= ct.type(a)
            s1 -= ct.type(lr) * g
            new = pv + ct.type(a * a) * s1 - ct.type((1 + a) * lr) * g
        elif kind == _ADAGRAD:
            s1 += g * g
            new = pv - ct.type(lr) * g / (np.sqrt(s1) + ct.type(EPS))
        elif kind == _RMSPROP:
            s1 *= ct.type(a)
            s1 += ct.type(1 - a) * g * g
            new = pv - ct.type(lr) * g / (np.sqrt(s1) + ct.type(EPS))
        else:  # Adam
            s1 += ct.type(1 - a) * (g - s1)
            s2 += ct.type(1 - b) * (g * g - s2)
            new = pv - ct.type(lr) * s1 / (np.sqrt(s2) + ct.type(EPS))
        p[...] = new            # integer parameters: truncated like astype (the book's `p -= ...` refuses them)

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}({args})"


class SGD(_Optimizer):
    """p -= lr * g"""

    _kind = _SGD
    _hyper = ("lr",)

    def __init__(self, lr=0.01):
        super().__init__()
        self.lr = _check_real(lr, "lr", positive=True)

    def _coefficients(self):
        return self.lr, 0.0, 0.0


class _WithMomentum(_Optimizer):
    """Momentum and Nesterov: one velocity state `v`, hyperparameters lr and momentum."""

    _n_states = 1
    _state_names = ("v",)
    _hyper = ("lr", "momentum")

    def __init__(self, lr=0.01, momentum=0.9):
        super().__init__()
        self.lr = _check_real(lr, "lr", positive=True)
        self.momentum = _check_real(momentum, "momentum", unit=True)

    def _coefficients(self):
        return self.lr, self.momentum, 0.0


class Momentum(_WithMomentum):
    """v = momentum * v - lr * g; p += v"""

    _kind = _MOMENTUM


class Nesterov(_WithMomentum):
    """v = momentum * v - lr * g; p += momentum^2 * v - (1 + momentum) * lr * g"""

    _kind = _NESTEROV


class AdaGrad(_Optimizer):
    """h += g * g; p -= lr * g / (sqrt(h) + 1e-7)"""

    _kind = _ADAGRAD
    _n_states = 1
    _state_names = ("h",)
    _hyper = ("lr",)

    def __init__(self, lr=0.01):
        super().__init__()
        self.lr = _check_real(lr, "lr", positive=True)

    def _coefficients(self):
        return self.lr, 0.0, 0.0


class RMSprop(_Optimizer):
    """h = decay_rate * h + (1 - decay_rate) * g * g; p -= lr * g / (sqrt(h) + 1e-7)"""

    _kind = _RMSPROP
    _n_states = 1
    _state_names = ("h",)
    _hyper = ("lr", "decay_rate")

    def __init__(self, lr=0.01, decay_rate=0.99):
        super().__init__()
        self.lr = _check_real(lr, "lr", positive=True)
        self.decay_rate = _check_real(decay_rate, "decay_rate", unit=True)

    def _coefficients(self):
        return self.lr, self.decay_rate, 0.0


class Adam(_Optimizer):
    """m += (1-beta1)(g-m); v += (1-beta2)(g^2-v); p -= lr sqrt(1-beta2^t)/(1-beta1^t) m / (sqrt(v)+1e-7)"""

    _kind = _ADAM
    _n_states = 2
    _state_names = ("m", "v")
    _hyper = ("lr", "beta1", "beta2")

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        super().__init__()
        self.lr = _check_real(lr, "lr", positive=True)
        self.beta1 = _check_real(beta1, "beta1", unit=True)
        self.beta2 = _check_real(beta2, "beta2", unit=True)
        self.iter = 0

    def _coefficients(self):
        self.iter += 1
        t = self.iter
        lr_t = self.lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        return lr_t, self.beta1, self.beta2
