"""The optimizers of *Deep Learning from Scratch* (books 1 and 2 ``common/optimizer.py``), updating in place.

The book's import line swaps one for one: ``from common.optimizer import *`` -> ``from fastbp.optimizer import *``
(``fastbp.optimizers`` is the same module under its 0.1 name).

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
books.  After the first step an update allocates no NumPy array.  The state attributes are the truth: resetting
them as the book's readers do (``o.v = None``, ``o.v['W1'] = np.zeros(...)``, ``o.m = o.v = None; o.iter = 0``)
takes effect at the next update; a missing entry starts again from zeros, an array put there is updated in
place (any float dtype; another dtype or memory order than the parameter takes the NumPy path).

Every (parameter, gradient) pair and every state array is checked before anything is written, so an update that
raises leaves the parameters, the state and ``iter`` as they were.  A gradient may share memory with its
parameter (the book computes ``p -= lr * p`` without complaint): the gradient is then read in full before the
parameter is written.  Deliberate difference: the book's ``Nesterov`` reads ``grads[key]`` again after its first
in-place statement on ``params[key]``, so with such aliasing it would mix the old and the half-updated values;
fastbp uses the gradient as it was when ``update`` was called throughout.  Pairs are updated in key order, so a
gradient that is *another* parameter's array sees that parameter updated if its key comes first, as in the book.
"""

import math
import numbers

import numpy as np

from fastbp import _blas  # noqa: F401  (checks the FASTBP_* settings at import)
from fastbp import _kernels as _k
from fastbp import _threads

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


def _may_overlap(a, b):
    """False when arrays a and b certainly do not share memory (cheap for the usual unrelated arrays that own
    their data), else np.may_share_memory's answer (memory bounds)."""
    if a is b:
        return True
    if a.base is None and b.base is None and a.flags.owndata and b.flags.owndata:
        return False
    return np.may_share_memory(a, b)


def _shares(a, b):
    """np.shares_memory with bounded work; True when too hard to tell."""
    try:
        return np.shares_memory(a, b, max_work=1000)
    except np.exceptions.TooHardError:
        return True


def _contiguous_as(a, order):
    return a.flags.c_contiguous if order == "C" else a.flags.f_contiguous


class _Optimizer:
    """Shared machinery: validation, lazily created state, the kernel call and the NumPy fallback."""

    _kind = None
    _n_states = 0  # state arrays per parameter
    _state_names = ()  # book attribute names of the state containers

    def __init__(self):
        for name in self._state_names:
            setattr(self, name, None)
        self._gbuf = None  # converted-gradient buffers, keyed like the parameters
        # The last step's arrays when every pair went straight to the kernel: (*state containers,
        # [(key, param, grad, state1, state2)]).  It stands for the attributes it was built from and is used only
        # while those attributes still hold the very same objects (checked at every step, see update).
        self._plan = None
        # fastbp's parallel-region count after this optimizer's last step: unchanged at the next step means the
        # gradient ran entirely on this thread (small products), so the update stays on it too (_optim, MIN_BLOCK)
        self._regions_after = -1

    # -- hooks -----------------------------------------------------------------------------------------
    def _coefficients(self):
        """(lr, a, b) handed to the kernel for this step (called once per update, after validation)."""
        raise NotImplementedError

    def _uncount_step(self):
        """Undo what _coefficients counted (a step that failed before writing anything)."""

    # -- public ----------------------------------------------------------------------------------------
    def update(self, params, grads):
        """Update every array of `params` in place from `grads` (two dicts with the same keys or two lists).

        Every pair and every state array is checked before anything is written: a step that raises leaves the
        parameters, the state and ``iter`` as they were."""
        kind = self._kind
        plan = self._plan
        serial = _threads.no_region_since(getattr(self, "_regions_after", -1))
        try:
            return self._update(kind, plan, params, grads, serial)
        finally:
            self._regions_after = _threads.regions_opened()

    def _update(self, kind, plan, params, grads, serial):
        if plan is not None and self._plan_holds(plan, params, grads):
            # The same parameter, gradient and state objects as the last step, which all went through the
            # kernel: skip the Python-level checks (the kernel still checks dtype, shape, layout, writability and
            # overlap of each array, which only an in-place change of an array's flags could alter).
            lr, a, b = self._coefficients()
            done = 0
            try:
                for _, p, g, s1, s2 in plan[-1]:
                    _k.optimizer_update(kind, p, g, s1, s2, lr, a, b, EPS, serial)
                    done += 1
            except BaseException:
                self._plan = None
                if done == 0:
                    self._uncount_step()
                raise
            return None
        self._plan = None
        pairs = self._pairs(params, grads)
        containers, states = self._check_states(params, pairs)
        # -- nothing has been written up to here; from here on nothing can fail but the allocation of state --
        containers = self._create_states(params, pairs, containers, states)
        lr, a, b = self._coefficients()
        new_plan = []
        for (key, p, g), (s1, s2) in zip(pairs, states):
            if s1 is None and self._n_states >= 1:
                s1 = containers[0][key]
            if s2 is None and self._n_states >= 2:
                s2 = containers[1][key]
            # A gradient that shares memory with its parameter or its state (the book computes p -= lr * p
            # without complaint) is copied first: every element of it is read before any is written.
            aliased = (
                _may_overlap(g, p)
                or (s1 is not None and _may_overlap(g, s1))
                or (s2 is not None and _may_overlap(g, s2))
            )
            order = _kernel_order(p)
            if (
                order is not None
                and (s1 is None or (s1.dtype == p.dtype and _contiguous_as(s1, order)))
                and (s2 is None or (s2.dtype == p.dtype and _contiguous_as(s2, order)))
            ):
                if aliased or not (g.dtype == p.dtype and g.dtype.isnative and _contiguous_as(g, order)):
                    g = self._converted(key, g, p, order)
                    new_plan = None
                _k.optimizer_update(kind, p, g, s1, s2, lr, a, b, EPS, serial)
                if new_plan is not None:
                    new_plan.append((key, p, g, s1, s2))
            else:
                self._numpy_update(key, p, g.copy() if aliased else g, s1, s2, lr, a, b)
                new_plan = None
        if new_plan:
            self._plan = tuple(containers) + (new_plan,)
        return None

    def _plan_holds(self, plan, params, grads):
        """True when params, grads and the state attributes hold exactly the objects of `plan`, key for key
        (identity, not equality)."""
        entries = plan[-1]
        if len(params) != len(entries) or len(grads) != len(entries):
            return False
        try:
            n = self._n_states
            if n == 0:
                for key, p, g, _, _ in entries:
                    if params[key] is not p or grads[key] is not g:
                        return False
            elif n == 1:
                c1 = plan[0]
                if getattr(self, self._state_names[0]) is not c1:
                    return False
                for key, p, g, s1, _ in entries:
                    if params[key] is not p or grads[key] is not g or c1[key] is not s1:
                        return False
            else:
                c1, c2 = plan[0], plan[1]
                if getattr(self, self._state_names[0]) is not c1 or getattr(self, self._state_names[1]) is not c2:
                    return False
                for key, p, g, s1, s2 in entries:
                    if params[key] is not p or grads[key] is not g or c1[key] is not s1 or c2[key] is not s2:
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
                raise TypeError(
                    f"params is a dict, so grads must be a dict with the same keys, got {type(grads).__name__}"
                )
            missing = [k for k in params if k not in grads]
            if missing:
                raise ValueError(
                    f"grads has no entry for parameter(s) {missing}; "
                    f"params keys {list(params)}, grads keys {list(grads)}"
                )
            keys = params.keys()
        elif isinstance(params, (list, tuple)):
            if not isinstance(grads, (list, tuple)):
                raise TypeError(
                    f"params is a {type(params).__name__}, so grads must be a list of the same "
                    f"length, got {type(grads).__name__}"
                )
            if len(params) != len(grads):
                raise ValueError(
                    f"params and grads must have the same length, got {len(params)} params and {len(grads)} grads"
                )
            keys = range(len(params))
        else:
            raise TypeError(f"params must be a dict (book 1) or a list (book 2), got {type(params).__name__}")
        pairs = []
        for key in keys:
            p = params[key]
            g = grads[key]
            if not isinstance(p, np.ndarray):
                raise TypeError(
                    f"parameter {key!r} must be a numpy.ndarray (it is updated in place), got {type(p).__name__}"
                )
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

    def _check_states(self, params, pairs):
        """(the state containers as they are, [(state1, state2)] per pair, None where still to be created),
        after checking every existing state array against its parameter.  Changes nothing."""
        n = self._n_states
        if n == 0:
            return (), [(None, None)] * len(pairs)
        containers = [getattr(self, name) for name in self._state_names]
        is_dict = isinstance(params, dict)
        for name, c in zip(self._state_names, containers):
            if c is None:
                continue
            if not isinstance(c, (dict, list)):
                raise TypeError(f"optimizer state {name!r} must be None, a dict or a list, got {type(c).__name__}")
            if isinstance(c, dict) != is_dict:
                raise TypeError(
                    f"this optimizer holds state for {'a dict' if isinstance(c, dict) else 'a list'} "
                    f"of parameters but was given {'a dict' if is_dict else 'a list'}; "
                    f"use one optimizer per network"
                )
        states = []
        for key, p, _ in pairs:
            found = []
            for name, c in zip(self._state_names, containers):
                if c is None:
                    s = None
                elif is_dict:
                    s = c.get(key)
                else:
                    s = c[key] if key < len(c) else None
                if s is not None:
                    self._check_state(name, key, s, p, found)
                found.append(s)
            states.append((found + [None])[:2])
        return containers, states

    @staticmethod
    def _check_state(name, key, s, p, others):
        """ValueError/TypeError naming name[key] when state array `s` cannot be updated for parameter `p`."""
        if (
            type(s) is np.ndarray
            and s.shape == p.shape
            and s.dtype.kind == "f"
            and s.flags.writeable
            and not _may_overlap(s, p)
        ):
            for o in others:
                if o is not None and _may_overlap(s, o):
                    break
            else:
                return  # (the usual case, decided without building any message)
        where = f"optimizer state {name}[{key!r}]"
        if not isinstance(s, np.ndarray):
            raise TypeError(f"{where} must be a numpy.ndarray (or absent, to start from zeros), got {type(s).__name__}")
        if s.shape != p.shape:
            raise ValueError(
                f"{where} has shape {s.shape} but the parameter now has shape {p.shape}; use one optimizer per network"
            )
        if s.dtype.kind != "f":
            raise TypeError(f"{where} must be a floating-point array (it is updated in place), got dtype {s.dtype}")
        if not s.flags.writeable:
            raise ValueError(f"{where} is read-only (it is updated in place)")
        if _shares(s, p):
            raise ValueError(f"{where} shares memory with its parameter")
        for o in others:
            if o is not None and _shares(s, o):
                raise ValueError(f"{where} shares memory with another state array of the same parameter")

    def _create_states(self, params, pairs, containers, states):
        """Create the missing state containers and arrays (zeros like each parameter); returns the containers."""
        n = self._n_states
        if n == 0:
            return ()
        is_dict = isinstance(params, dict)
        for j, name in enumerate(self._state_names):
            if containers[j] is None:
                containers[j] = {} if is_dict else []
                setattr(self, name, containers[j])
        for (key, p, _), found in zip(pairs, states):
            for j, c in enumerate(containers):
                if found[j] is not None:
                    continue
                if is_dict:
                    c[key] = self._new_state(p)
                else:
                    while len(c) <= key:
                        c.append(None)
                    c[key] = self._new_state(p)
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
        p[...] = new  # integer parameters: truncated like astype (the book's `p -= ...` refuses them)

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

    def _uncount_step(self):
        self.iter -= 1

    def _coefficients(self):
        self.iter += 1
        t = self.iter
        lr_t = self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        return lr_t, self.beta1, self.beta2
