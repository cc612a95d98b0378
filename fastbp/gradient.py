"""Numerical gradients (the book's ``numerical_gradient``) and gradient checks.

``numerical_gradient(f, x)`` keeps the book's signature and behaviour: central
differences with ``h = 1e-4``, every element of ``x`` perturbed *in place* one
at a time and restored exactly, ``f(x)`` called with the perturbed array.

The gradient checks compare backpropagation with numerical derivatives using
duck typing only, so they work with ``fastbp.reference`` and ``fastbp.layers``
classes alike (and with the book's own classes):

* ``gradient_check_layer(layer, x, dout=None, t=None)`` -- a layer with
  ``forward``/``backward`` (and optionally ``params``/``grads`` lists or book-1
  ``W``/``dW`` style attributes); with ``t`` the layer is a loss layer
  (``forward(x, t)`` returns a scalar, e.g. ``SoftmaxWithLoss``).
* ``gradient_check_model(net, x, t)`` -- the book-1 ``TwoLayerNet`` API
  (``params`` dict, ``loss(x, t)``, ``gradient(x, t)`` returning a dict) or the
  book-2 API (``params``/``grads`` lists, ``forward(x, t)``, ``backward()``).

Both return ``{name: max relative error}`` and raise ``GradientCheckError`` (an
``AssertionError``) naming the worst array when an error exceeds ``threshold``.

Numerical derivatives are taken by writing into the parameter arrays the layer
or network holds (that is how it sees the perturbation); every element is
restored bit-for-bit afterwards.  Inputs ``x`` are copied, never written.
"""

import numbers

import numpy as np

__all__ = [
    "numerical_gradient",
    "numerical_gradient_5pt",
    "relative_error",
    "GradientCheckError",
    "gradient_check",
    "gradient_check_layer",
    "gradient_check_model",
]

_TINY = np.finfo(np.float64).tiny

# Defaults by the precision of the arrays being checked ("f8" = all float64,
# "f4" = anything narrower): step h per stencil order, error threshold, and the
# denominator floor as a fraction of the largest |gradient| entry.  In float32
# the numerical derivative is dominated by rounding noise, so the floor is the
# largest entry itself (a max-norm relative error).  Chosen from measurements on
# small Affine/ReLU/Sigmoid/softmax nets; h is kept small so that a perturbation
# rarely crosses a ReLU kink (where no numerical derivative is right).
_DEFAULT_H = {("f8", 2): 1e-4, ("f8", 4): 1e-4, ("f4", 2): 1e-3, ("f4", 4): 1e-3}
_DEFAULT_THRESHOLD = {"f8": 1e-5, "f4": 5e-2}
_DEFAULT_FLOOR = {"f8": 1e-3, "f4": 1.0}


class GradientCheckError(AssertionError):
    """Backpropagated and numerical gradients disagree beyond the threshold.

    Attributes: ``errors`` (dict name -> max relative error), ``worst`` (name),
    ``threshold``.
    """

    def __init__(self, message, errors, worst, threshold):
        super().__init__(message)
        self.errors = errors
        self.worst = worst
        self.threshold = threshold


# --------------------------------------------------------------------------
# numerical derivatives
# --------------------------------------------------------------------------


def _scalar(value):
    """float(value) for a Python/NumPy scalar or a size-1 array."""
    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(f"f must return a scalar, got an array of shape {a.shape}")
    return float(a.reshape(()))


def numerical_gradient(f, x, h=None, order=2):
    """grad[i] = (f(x + h e_i) - f(x - h e_i)) / (2h), x perturbed in place and restored.

    Book signature ``numerical_gradient(f, x)`` with ``h = 1e-4``.  ``order=4``
    selects the 5-point stencil ``(f(x-2h) - 8f(x-h) + 8f(x+h) - f(x+2h)) / 12h``
    (default ``h = 1e-3``).  Returns ``np.zeros_like(x)`` filled in, so the
    result has x's shape and dtype.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"numerical_gradient: x must be a NumPy array (it is perturbed in place), got {type(x).__name__}"
        )
    if x.dtype.kind != "f":
        raise TypeError(f"numerical_gradient: x must be a floating-point array, got dtype {x.dtype}")
    if not x.flags.writeable:
        raise ValueError("numerical_gradient: x must be writeable (it is perturbed in place)")
    if order not in (2, 4):
        raise ValueError(f"numerical_gradient: order must be 2 or 4, got {order!r}")
    if h is None:
        h = 1e-4 if order == 2 else 1e-3
    if not (isinstance(h, numbers.Real) and np.isfinite(h) and h > 0):
        raise ValueError(f"numerical_gradient: h must be a positive finite number, got {h!r}")

    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index", "zerosize_ok"], op_flags=["readonly"])
    while not it.finished:
        idx = it.multi_index
        tmp_val = x[idx]  # NumPy scalar: an exact copy
        try:
            if order == 2:
                x[idx] = float(tmp_val) + h
                fxh1 = _scalar(f(x))  # f(x+h)
                x[idx] = tmp_val - h
                fxh2 = _scalar(f(x))  # f(x-h)
                grad[idx] = (fxh1 - fxh2) / (2 * h)
            else:
                v = float(tmp_val)
                x[idx] = v + h
                fp1 = _scalar(f(x))
                x[idx] = v - h
                fm1 = _scalar(f(x))
                x[idx] = v + 2 * h
                fp2 = _scalar(f(x))
                x[idx] = v - 2 * h
                fm2 = _scalar(f(x))
                # differences first: exactly 0 when f does not change
                grad[idx] = (8.0 * (fp1 - fm1) - (fp2 - fm2)) / (12 * h)
        finally:
            x[idx] = tmp_val  # restore exactly
        it.iternext()
    return grad


def numerical_gradient_5pt(f, x, h=1e-3):
    """grad[i] = (f(x-2h) - 8 f(x-h) + 8 f(x+h) - f(x+2h)) / (12h), x perturbed in place and restored."""
    return numerical_gradient(f, x, h=h, order=4)


def relative_error(a, n, floor=None):
    """max_i |a_i - n_i| / max(|a_i|, |n_i|, floor) with floor defaulting to the float64 tiny."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"relative_error: shapes differ: {a.shape} vs {n.shape}")
    if a.size == 0:
        return 0.0
    floor = _TINY if floor is None else max(float(floor), _TINY)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)
    return float(np.max(np.abs(a - n) / denom))


# --------------------------------------------------------------------------
# gradient checks
# --------------------------------------------------------------------------


def _precision(arrays):
    """ "f8" when every array is float64 (or wider), else "f4"."""
    for a in arrays:
        if np.dtype(a.dtype).itemsize < 8:
            return "f4"
    return "f8"


def _compare(named, h_used, precision, threshold, floor, raise_on_failure, what):
    """named: list of (name, analytic, numeric).  Returns the error dict, raising if asked."""
    if threshold is None:
        threshold = _DEFAULT_THRESHOLD[precision]
    ratio = _DEFAULT_FLOOR[precision] if floor is None else None
    errors = {}
    problems = {}
    for name, analytic, numeric in named:
        if analytic is None:
            problems[name] = "backward returned no gradient"
            errors[name] = float("inf")
            continue
        analytic = np.asarray(analytic)
        if analytic.shape != numeric.shape:
            problems[name] = f"backward gradient has shape {analytic.shape}, expected {numeric.shape}"
            errors[name] = float("inf")
            continue
        if ratio is not None:
            scale = max(float(np.max(np.abs(analytic), initial=0.0)), float(np.max(np.abs(numeric), initial=0.0)))
            fl = ratio * scale if np.isfinite(scale) else None
        else:
            fl = floor
        errors[name] = relative_error(analytic, numeric, floor=fl)

    bad = [k for k, e in errors.items() if not e <= threshold]  # nan counts as failure
    if bad and raise_on_failure:
        worst = max(bad, key=lambda k: (np.isnan(errors[k]), errors[k]))
        detail = f" ({problems[worst]})" if worst in problems else ""
        summary = ", ".join(f"{k}={v:.3g}" for k, v in errors.items())
        raise GradientCheckError(
            f"gradient check failed for {what}: worst is {worst!r} with relative "
            f"error {errors[worst]:.3g} > threshold {threshold:.3g}{detail} "
            f"[all: {summary}; h={h_used:g}]",
            errors,
            worst,
            threshold,
        )
    return errors


def _layer_params(layer):
    """[(name, getter of the param array, getter of its gradient)] by duck typing."""
    entries = []
    params = getattr(layer, "params", None)
    if isinstance(params, (list, tuple)) and len(params) > 0:
        for i, p in enumerate(params):
            if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
                continue
            name = f"params[{i}]"
            for attr in ("W", "b", "gamma", "beta"):
                try:
                    if getattr(layer, attr, None) is p:
                        name = attr
                        break
                except Exception:  # a property that fails is simply not a name
                    pass
            entries.append((name, lambda i=i: layer.params[i], lambda i=i: layer.grads[i]))
        return entries
    for pname, gname in (("W", "dW"), ("b", "db"), ("gamma", "dgamma"), ("beta", "dbeta")):
        p = getattr(layer, pname, None)
        if isinstance(p, np.ndarray) and p.dtype.kind == "f":
            entries.append(
                (pname, lambda pname=pname: getattr(layer, pname), lambda gname=gname: getattr(layer, gname, None))
            )
    return entries


def _copy_grad(g):
    return None if g is None else np.array(g, dtype=np.float64, copy=True)


def gradient_check_layer(
    layer, x, dout=None, *, t=None, h=None, order=2, threshold=None, floor=None, raise_on_failure=True, seed=0
):
    """errors[name] = relative_error(backprop, numerical d(sum(forward(x) * dout))/d name).

    ``x`` is one input or a tuple of inputs (``forward(*x)``; names ``x0``,
    ``x1``, ...); floating inputs are copied and checked.  Integer or bool
    inputs of a layer without floating parameters (``Relu()`` fed integers)
    are converted to float64 and checked; an integer input of a layer with
    parameters (indices) is passed as it is and not differentiated.  A check
    with nothing floating to compare raises ``ValueError`` (never ``{}``).  ``dout`` defaults to
    a seeded standard-normal array of the output's shape.  With ``t`` given the
    layer is a loss layer: ``f = dout * forward(x, t)`` with scalar ``dout``
    (default 1) and ``backward(dout)``.  Parameters come from ``layer.params``/
    ``layer.grads`` (book 2) or ``W``/``dW``, ``b``/``db``, ... (book 1) and are
    perturbed in place, then restored exactly.

    Errors are :func:`relative_error` with the denominator floor ``floor``
    (absolute) or, by default, a fraction of the largest gradient entry: 1e-3
    in float64 (entries ~0 compare absolutely), 1 in float32 (max-norm relative
    error, since float32 numerical derivatives are rounding-noise limited).
    ``h`` defaults to 1e-4 in float64 (the book's) and 1e-3 in float32;
    ``threshold`` to 1e-5 (float64) / 5e-2 (float32).  Exceeding it raises
    ``GradientCheckError`` unless ``raise_on_failure=False``.  Numerical
    derivatives are meaningless where a perturbation crosses a ReLU kink and
    noisy in float32: prefer float64 inputs away from kinks.
    """
    return _check_layer(
        layer, x, dout, t, h, order, threshold, floor, raise_on_failure, seed, check_inputs=True, select=None
    )


def _check_layer(layer, x, dout, t, h, order, threshold, floor, raise_on_failure, seed, check_inputs, select):
    """Body of gradient_check_layer; select restricts the parameter names checked."""
    multi = isinstance(x, tuple)
    xs = [np.array(xi, copy=True) for xi in (x if multi else (x,))]
    if check_inputs and not any(xi.dtype.kind == "f" for xi in xs) and not _layer_params(layer):
        # integer/bool input of a layer without floating parameters: checked in float64 (nothing else to check)
        xs = [xi.astype(np.float64) if xi.dtype.kind in "biu" else xi for xi in xs]
    names = [f"x{i}" for i in range(len(xs))] if multi else ["x"]
    loss_layer = t is not None

    def forward():
        return layer.forward(*xs, t) if loss_layer else layer.forward(*xs)

    out = forward()
    if loss_layer:
        if dout is None:
            dout = 1.0
        if np.ndim(dout) != 0:
            raise ValueError(
                f"gradient_check_layer: dout for a loss layer must be a scalar, got shape {np.shape(dout)}"
            )
        dout_value = float(dout)

        def f(_):
            return dout_value * _scalar(forward())
    else:
        out = np.asarray(out)
        if dout is None:
            dt = out.dtype if out.dtype.kind == "f" else np.float64
            dout = np.random.default_rng(seed).standard_normal(out.shape).astype(dt)
        else:
            dout = np.array(dout, copy=True)
            if dout.shape != out.shape:
                raise ValueError(
                    f"gradient_check_layer: dout must have the forward output's shape {out.shape}, got {dout.shape}"
                )
        dout64 = np.asarray(dout, dtype=np.float64).ravel()

        def f(_):
            o = np.asarray(forward(), dtype=np.float64).ravel()
            return float(np.dot(o, dout64))

    # analytic gradients at the unperturbed point (a copy of dout: a book-style
    # backward may write into it, which must not change f)
    dx = layer.backward(dout if loss_layer else dout.copy())
    dxs = list(dx) if multi and isinstance(dx, (tuple, list)) else [dx]
    analytic_inputs = [_copy_grad(g) for g in dxs]
    pentries = _layer_params(layer)
    analytic_params = [_copy_grad(gget()) for _, _, gget in pentries]

    checked = []
    if check_inputs:
        for name, xi, gi in zip(names, xs, analytic_inputs + [None] * len(xs)):
            if xi.dtype.kind == "f":
                checked.append((name, xi, gi))
    for (name, pget, _), gi in zip(pentries, analytic_params):
        if select is None or name in select:
            checked.append((name, pget(), gi))

    if not checked:
        raise ValueError(
            f"gradient_check_layer: nothing to check for {type(layer).__name__}: no floating-point input "
            f"(inputs: {', '.join(str(xi.dtype) for xi in xs)}) and no floating-point parameter"
            + ("" if select is None else f" among {sorted(select)}")
        )
    precision = _precision([arr for _, arr, _ in checked])
    if h is None:
        h = _DEFAULT_H[(precision, order)]
    try:
        named = []
        for name, arr, gi in checked:
            num = numerical_gradient(f, arr, h=h, order=order)
            named.append((name, gi, num))
    finally:
        forward()  # leave the layer's cached state at the unperturbed point
    return _compare(named, h, precision, threshold, floor, raise_on_failure, type(layer).__name__)


def gradient_check_model(net, x, t, *, keys=None, h=None, order=2, threshold=None, floor=None, raise_on_failure=True):
    """errors[key] = relative_error(net.gradient(x, t)[key], numerical d net.loss(x, t) / d params[key]).

    Book 1 API: ``net.params`` dict, ``net.loss(x, t)``, ``net.gradient(x, t)``
    returning a dict with the same keys.  Book 2 API: ``net.params``/``net.grads``
    lists, ``net.forward(x, t)`` returning the loss and ``net.backward()``
    (names ``params[i]``).  ``keys`` restricts the check to some parameters.
    Parameters are perturbed in place and restored exactly.  Thresholds and
    floors as in :func:`gradient_check_layer`.
    """
    params = getattr(net, "params", None)
    if isinstance(params, dict):
        if not (callable(getattr(net, "loss", None)) and callable(getattr(net, "gradient", None))):
            raise TypeError(
                "gradient_check_model: a net with a params dict needs loss(x, t) and "
                f"gradient(x, t) methods; {type(net).__name__} lacks them"
            )
        selected = list(params) if keys is None else list(keys)
        missing = [k for k in selected if k not in params]
        if missing:
            raise KeyError(f"gradient_check_model: unknown parameter(s) {missing}; net.params has {list(params)}")
        grads = net.gradient(x, t)
        absent = [k for k in selected if k not in grads]
        if absent:
            raise ValueError(f"gradient_check_model: net.gradient(x, t) returned no gradient for {absent}")
        analytic = {k: _copy_grad(grads[k]) for k in selected}

        def f(_):
            return _scalar(net.loss(x, t))

        arrays = [params[k] for k in selected]
        precision = _precision(arrays)
        if h is None:
            h = _DEFAULT_H[(precision, order)]
        named = []
        for k in selected:
            num = numerical_gradient(f, params[k], h=h, order=order)
            named.append((k, analytic[k], num))
        return _compare(named, h, precision, threshold, floor, raise_on_failure, type(net).__name__)

    if isinstance(params, (list, tuple)):
        if not (
            callable(getattr(net, "forward", None))
            and callable(getattr(net, "backward", None))
            and isinstance(getattr(net, "grads", None), (list, tuple))
        ):
            raise TypeError(
                "gradient_check_model: a net with a params list needs a grads list and "
                f"forward(x, t)/backward() methods; {type(net).__name__} lacks them"
            )
        if keys is not None:
            known = [name for name, _, _ in _layer_params(net)]
            missing = [k for k in keys if k not in known]
            if missing:
                raise KeyError(
                    f"gradient_check_model: unknown parameter(s) {missing}; the net's parameters are {known}"
                )
        return _check_layer(
            net,
            x,
            None,
            t,
            h,
            order,
            threshold,
            floor,
            raise_on_failure,
            0,
            check_inputs=False,
            select=None if keys is None else set(keys),
        )

    raise TypeError(
        "gradient_check_model: net must have a params dict (book 1: loss/gradient) or a "
        f"params list (book 2: forward/backward/grads); got {type(net).__name__} with "
        f"params of type {type(params).__name__}"
    )


def gradient_check(target, x, t=None, dout=None, **kwargs):
    """Dispatch: a net with a ``params`` dict -> gradient_check_model, else gradient_check_layer."""
    if isinstance(getattr(target, "params", None), dict):
        if t is None:
            raise ValueError("gradient_check: checking a model needs targets t")
        if dout is not None:
            raise ValueError("gradient_check: dout does not apply to a model check")
        return gradient_check_model(target, x, t, **kwargs)
    return gradient_check_layer(target, x, dout, t=t, **kwargs)
