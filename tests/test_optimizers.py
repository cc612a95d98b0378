"""fastbp.optimizer (alias fastbp.optimizers) against a transcription of the book's formulas (common/optimizer.py)."""

import tracemalloc
import zlib

import numpy as np
import pytest

from fastbp import optimizer as O

DTYPES = [np.float32, np.float64]
TOL = {
    np.float32: dict(rtol=2e-5, atol=1e-6),
    np.float64: dict(rtol=1e-12, atol=1e-14),
    np.float16: dict(rtol=2e-2, atol=2e-3),
}
NAMES = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"]
HYPER = {  # non-default hyperparameters, so that a swapped argument shows up
    "SGD": dict(lr=0.05),
    "Momentum": dict(lr=0.05, momentum=0.8),
    "Nesterov": dict(lr=0.05, momentum=0.7),
    "AdaGrad": dict(lr=0.05),
    "RMSprop": dict(lr=0.02, decay_rate=0.9),
    "Adam": dict(lr=0.01, beta1=0.8, beta2=0.99),
}
STEPS = 5


class BookOptimizer:
    """The book's update rules written out with NumPy, state keyed like params, computed in the param dtype."""

    def __init__(self, name, **hp):
        self.name = name
        self.hp = {**{"lr": 0.01, "momentum": 0.9, "decay_rate": 0.99, "beta1": 0.9, "beta2": 0.999}, **hp}
        if name == "Adam" and "lr" not in hp:
            self.hp["lr"] = 0.001
        self.s1 = {}
        self.s2 = {}
        self.iter = 0

    def update(self, params, grads):
        hp = self.hp
        keys = list(params.keys()) if isinstance(params, dict) else range(len(params))
        self.iter += 1
        for k in keys:
            p = params[k]
            g = np.asarray(grads[k]).astype(p.dtype)
            dt = p.dtype.type
            lr = dt(hp["lr"])
            if k not in self.s1:
                self.s1[k] = np.zeros_like(p)
                self.s2[k] = np.zeros_like(p)
            v, h = self.s1[k], self.s2[k]
            if self.name == "SGD":
                p -= lr * g
            elif self.name == "Momentum":
                v[...] = dt(hp["momentum"]) * v - lr * g
                p += v
            elif self.name == "Nesterov":
                m = dt(hp["momentum"])
                v *= m
                v -= lr * g
                p += m * m * v
                p -= (1 + m) * lr * g
            elif self.name == "AdaGrad":
                v += g * g
                p -= lr * g / (np.sqrt(v) + dt(1e-7))
            elif self.name == "RMSprop":
                d = dt(hp["decay_rate"])
                v *= d
                v += (1 - d) * g * g
                p -= lr * g / (np.sqrt(v) + dt(1e-7))
            elif self.name == "Adam":
                b1, b2 = hp["beta1"], hp["beta2"]
                lr_t = dt(hp["lr"] * np.sqrt(1.0 - b2**self.iter) / (1.0 - b1**self.iter))
                v += dt(1 - b1) * (g - v)
                h += dt(1 - b2) * (g**2 - h)
                p -= lr_t * v / (np.sqrt(h) + dt(1e-7))


def _params(rng, dtype, order="C"):
    return {
        "W1": np.asarray(rng.standard_normal((7, 5)), dtype=dtype, order=order),
        "b1": np.asarray(rng.standard_normal(5), dtype=dtype),
        "W2": np.asarray(rng.standard_normal((5, 3)), dtype=dtype, order=order),
    }


def _grads(rng, params, dtype=None):
    return {k: np.asarray(rng.standard_normal(p.shape), dtype=dtype or p.dtype, order="K") for k, p in params.items()}


def _run_both(name, params, grad_seq, as_list=False, hp=None):
    hp = HYPER[name] if hp is None else hp
    ours = getattr(O, name)(**hp)
    book = BookOptimizer(name, **hp)
    mine = {k: v for k, v in params.items()}  # the very arrays, updated in place
    theirs = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in mine.items()}
    keys = list(params)
    for grads in grad_seq:
        if as_list:
            ours.update([mine[k] for k in keys], [grads[k] for k in keys])
        else:
            ours.update(mine, grads)
        book.update(theirs, {k: g.copy() for k, g in grads.items()})
    assert {k: id(v) for k, v in mine.items()} == ids
    return ours, mine, theirs


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("form", ["dict", "list"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_matches_book_formulas(name, dtype, form, order):
    rng = np.random.default_rng(zlib.crc32(f"{name}{form}{order}".encode()))
    params = _params(rng, dtype, order)
    grad_seq = [_grads(rng, params) for _ in range(STEPS)]
    originals = {k: v.copy() for k, v in params.items()}
    ours, mine, theirs = _run_both(name, params, grad_seq, as_list=(form == "list"))
    for k in params:
        assert mine[k].dtype == np.dtype(dtype)
        assert not np.array_equal(mine[k], originals[k])
        np.testing.assert_allclose(mine[k], theirs[k], **TOL[dtype], err_msg=f"{name} {k}")


@pytest.mark.parametrize("name", NAMES)
def test_default_hyperparameters_are_the_books(name):
    rng = np.random.default_rng(1)
    params = _params(rng, np.float64)
    grad_seq = [_grads(rng, params) for _ in range(3)]
    ours, mine, theirs = _run_both(name, params, grad_seq, hp={})
    for k in params:
        np.testing.assert_allclose(mine[k], theirs[k], **TOL[np.float64])
    defaults = {
        "SGD": dict(lr=0.01),
        "Momentum": dict(lr=0.01, momentum=0.9),
        "Nesterov": dict(lr=0.01, momentum=0.9),
        "AdaGrad": dict(lr=0.01),
        "RMSprop": dict(lr=0.01, decay_rate=0.99),
        "Adam": dict(lr=0.001, beta1=0.9, beta2=0.999),
    }
    for attr, value in defaults[name].items():
        assert getattr(ours, attr) == value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_params_fall_back_to_numpy_in_place(name, dtype):
    rng = np.random.default_rng(2)
    base = np.asarray(rng.standard_normal((6, 10)), dtype=dtype)
    before = base.copy()
    view = base[:, ::2]  # neither C- nor F-contiguous
    params = {"W": view, "b": np.asarray(rng.standard_normal(4), dtype=dtype)}
    grad_seq = [
        {
            "W": np.asarray(rng.standard_normal(view.shape), dtype=dtype),
            "b": np.asarray(rng.standard_normal(4), dtype=dtype),
        }
        for _ in range(STEPS)
    ]
    ours, mine, theirs = _run_both(name, params, grad_seq)
    np.testing.assert_allclose(base[:, ::2], theirs["W"], **TOL[dtype])
    np.testing.assert_array_equal(base[:, 1::2], before[:, 1::2])  # the other columns are untouched
    np.testing.assert_allclose(mine["b"], theirs["b"], **TOL[dtype])


@pytest.mark.parametrize("name", NAMES)
def test_float16_params_fall_back(name):
    rng = np.random.default_rng(3)
    params = {"W": np.asarray(rng.standard_normal((4, 3)), dtype=np.float16)}
    grad_seq = [{"W": np.asarray(rng.standard_normal((4, 3)), dtype=np.float16)} for _ in range(3)]
    ours, mine, theirs = _run_both(name, params, grad_seq)
    assert mine["W"].dtype == np.float16
    np.testing.assert_allclose(mine["W"].astype(np.float64), theirs["W"].astype(np.float64), **TOL[np.float16])


def test_integer_params_are_updated_in_place_with_truncation():
    p = np.array([10, 20, 30])
    O.SGD(lr=1.0).update([p], [np.array([0.5, 2.0, -3.7])])
    np.testing.assert_array_equal(p, np.array([9.5, 18.0, 33.7]).astype(p.dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,gdtype", [(np.float32, np.float64), (np.float64, np.float32), (np.float64, np.int32)])
def test_grad_of_another_dtype_or_order(name, dtype, gdtype):
    rng = np.random.default_rng(4)
    params = _params(rng, dtype)
    grad_seq = []
    for _ in range(STEPS):
        g = {
            k: np.asfortranarray(np.asarray(rng.standard_normal(p.shape) * 3, dtype=gdtype)) for k, p in params.items()
        }
        grad_seq.append(g)
    ours, mine, theirs = _run_both(name, params, grad_seq)
    for k in params:
        assert mine[k].dtype == np.dtype(dtype)
        np.testing.assert_allclose(mine[k], theirs[k], **TOL[dtype])


@pytest.mark.parametrize("name", ["Momentum", "Adam"])
def test_state_is_keyed_like_params_and_in_param_order(name):
    rng = np.random.default_rng(5)
    params = _params(rng, np.float32, order="F")
    opt = getattr(O, name)()
    opt.update(params, _grads(rng, params))
    states = [opt.v] if name == "Momentum" else [opt.m, opt.v]
    for s in states:
        assert isinstance(s, dict) and list(s) == list(params)
        for k, p in params.items():
            assert s[k].shape == p.shape and s[k].dtype == p.dtype
            assert s[k].flags.f_contiguous == p.flags.f_contiguous
    opt2 = getattr(O, name)()
    plist = list(params.values())
    opt2.update(plist, [np.ones_like(p) for p in plist])
    s = opt2.v
    assert isinstance(s, list) and len(s) == len(plist)


def test_adam_counts_iterations_and_uses_bias_corrected_rate():
    p = np.zeros(3)
    opt = O.Adam(lr=0.1, beta1=0.5, beta2=0.75)
    g = np.array([1.0, -2.0, 0.5])
    opt.update([p], [g])
    assert opt.iter == 1
    # step 1: m = (1-b1) g, v = (1-b2) g^2, lr_t = lr sqrt(1-b2)/(1-b1) -> p = -lr g/|g| (up to eps)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-5)
    opt.update([p], [g])
    assert opt.iter == 2


def test_update_allocates_nothing_after_the_first_step():
    rng = np.random.default_rng(6)
    params = {"W": np.asarray(rng.standard_normal((400, 250)), dtype=np.float32), "b": np.zeros(250, np.float32)}
    grads = {
        "W": rng.standard_normal((400, 250)),  # float64: converted into a reused buffer
        "b": np.ones(250, np.float32),
    }
    opt = O.Adam()
    opt.update(params, grads)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        cur0, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            opt.update(params, grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the smallest array involved is 1000 bytes; a temporary of W would be 400 kB
    assert peak - cur0 < 1000, f"update allocated {peak - cur0} bytes"


def test_validation_names_the_key():
    p = {"W": np.zeros((2, 3)), "b": np.zeros(3)}
    with pytest.raises(ValueError, match="'b'"):
        O.SGD().update(p, {"W": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"'W'.*\(3, 2\).*\(2, 3\)"):
        O.Momentum().update(p, {"W": np.zeros((3, 2)), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="same length"):
        O.SGD().update([np.zeros(2)], [np.zeros(2), np.zeros(2)])
    with pytest.raises(TypeError, match="dict"):
        O.SGD().update(p, [np.zeros((2, 3)), np.zeros(3)])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        O.SGD().update({"b": ro}, {"b": np.ones(3)})
    with pytest.raises(TypeError, match="ndarray"):
        O.SGD().update({"x": 1.0}, {"x": 1.0})
    with pytest.raises(TypeError, match="complex"):
        O.SGD().update({"b": np.zeros(3)}, {"b": np.ones(3, complex)})


def test_failed_validation_leaves_params_and_state_untouched():
    p = {"W": np.ones((2, 2)), "b": np.ones(2)}
    opt = O.Adam()
    with pytest.raises(ValueError):
        opt.update(p, {"W": np.ones((2, 2)), "b": np.ones(3)})
    assert opt.iter == 0
    np.testing.assert_array_equal(p["W"], np.ones((2, 2)))


def test_state_shape_mismatch_is_an_error():
    opt = O.Momentum()
    opt.update({"W": np.zeros(3)}, {"W": np.ones(3)})
    with pytest.raises(ValueError, match="'W'.*shape"):
        opt.update({"W": np.zeros(4)}, {"W": np.ones(4)})
    with pytest.raises(TypeError, match="one optimizer per network"):
        opt.update([np.zeros(3)], [np.ones(3)])


@pytest.mark.parametrize(
    "cls,kw",
    [
        (O.SGD, dict(lr=0)),
        (O.SGD, dict(lr=-1)),
        (O.Momentum, dict(momentum=1.0)),
        (O.RMSprop, dict(decay_rate=1.5)),
        (O.Adam, dict(beta2=-0.1)),
        (O.AdaGrad, dict(lr=float("nan"))),
    ],
)
def test_bad_hyperparameters(cls, kw):
    with pytest.raises(ValueError):
        cls(**kw)


def test_hyperparameter_type():
    with pytest.raises(TypeError, match="lr"):
        O.SGD(lr="0.1")


# -- issue 7 item 3: the cached update plan never disagrees with the state attributes ---------------------
STATEFUL = ["Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"]


def _state_names(opt):
    return ("m", "v") if isinstance(opt, O.Adam) else ("v",) if hasattr(opt, "momentum") else ("h",)


def _reset(opt, how, params):
    names = _state_names(opt)
    if how == "attribute":  # o.v = None (Adam: o.m = o.v = None; o.iter = 0)
        for n in names:
            setattr(opt, n, None)
        if isinstance(opt, O.Adam):
            opt.iter = 0
    elif how == "entry":  # o.v['W1'] = np.zeros(...) for every state container
        for n in names:
            getattr(opt, n)["W1"] = np.zeros_like(params["W1"])
    elif how == "new_dict":  # o.v = {k: zeros}
        for n in names:
            setattr(opt, n, {k: np.zeros_like(p) for k, p in params.items()})


@pytest.mark.parametrize("how", ["attribute", "entry", "new_dict"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", STATEFUL)
def test_state_reset_by_the_user_is_honoured(name, dtype, how):
    rng = np.random.default_rng(zlib.crc32(f"{name}{how}".encode()))
    params = _params(rng, dtype)
    grad_seq = [_grads(rng, params) for _ in range(6)]
    ours, book = getattr(O, name)(**HYPER[name]), BookOptimizer(name, **HYPER[name])
    mine, theirs = params, {k: v.copy() for k, v in params.items()}
    grads = {k: np.empty_like(g) for k, g in grad_seq[0].items()}  # the same arrays at every step, as a
    for i, step_grads in enumerate(grad_seq):  # network's grads (so the plan is used)
        for k in grads:
            grads[k][...] = step_grads[k]
        if i == 3:  # after the plan has been cached (steps 2 and 3 use it)
            _reset(ours, how, mine)
            if how == "entry":
                book.s1["W1"] = np.zeros_like(theirs["W1"])
                book.s2["W1"] = np.zeros_like(theirs["W1"])
            else:
                book.s1, book.s2 = {}, {}
                if how == "attribute":
                    book.iter = 0
        ours.update(mine, grads)
        book.update(theirs, {k: g.copy() for k, g in grads.items()})
        for k in params:
            np.testing.assert_allclose(mine[k], theirs[k], **TOL[dtype], err_msg=f"step {i} {k}")
    for n in _state_names(ours):  # the attributes hold the arrays that were updated
        assert not np.array_equal(getattr(ours, n)["W1"], 0)


def test_state_entry_replaced_by_another_dtype_is_used():
    rng = np.random.default_rng(11)
    params = _params(rng, np.float32)
    opt = O.Momentum(lr=0.1, momentum=0.5)
    g = _grads(rng, params)
    for _ in range(3):
        opt.update(params, g)
    v = np.zeros(params["W1"].shape, np.float64)  # float64 state for a float32 parameter
    opt.v["W1"] = v
    before = params["W1"].copy()
    opt.update(params, g)
    assert opt.v["W1"] is v
    np.testing.assert_allclose(v, -0.1 * g["W1"].astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(params["W1"], before - 0.1 * g["W1"], rtol=1e-5, atol=1e-6)


# -- issue 7 item 4: every pair is validated before anything is touched; a param may be its own grad ------
def _bad_steps():
    """(params, grads) where only the LAST pair is wrong: nothing may be updated."""
    a = lambda: np.ones(4)  # noqa: E731
    ro = np.ones(4)
    ro.flags.writeable = False
    yield "shape", {"a": a(), "b": np.ones(3)}, {"a": np.ones(4), "b": np.ones(4)}
    yield "read-only", {"a": a(), "b": ro}, {"a": np.ones(4), "b": np.ones(4)}
    yield "complex grad", {"a": a(), "b": np.ones(4)}, {"a": np.ones(4), "b": np.ones(4, complex)}
    yield "missing", {"a": a(), "b": np.ones(4)}, {"a": np.ones(4)}


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_pair_anywhere_leaves_everything_untouched(name):
    for what, params, grads in _bad_steps():
        opt = getattr(O, name)()
        before = {k: v.copy() for k, v in params.items()}
        with pytest.raises((ValueError, TypeError)):
            opt.update(params, grads)
        for k in params:
            np.testing.assert_array_equal(params[k], before[k], err_msg=what)
        assert getattr(opt, "iter", 0) == 0
        for n in ("v", "h", "m"):
            assert getattr(opt, n, None) in (None, {}), (what, n)


@pytest.mark.parametrize("name", STATEFUL)
def test_a_bad_state_entry_is_refused_before_any_update(name):
    params = {"a": np.ones(4), "b": np.ones(4)}
    grads = {"a": np.ones(4), "b": np.ones(4)}
    opt = getattr(O, name)()
    opt.update(params, grads)
    it = getattr(opt, "iter", None)
    state = getattr(opt, _state_names(opt)[0])
    for bad in (np.zeros(5), np.zeros(4, np.int64), "zeros", params["b"]):  # shape, dtype, type, the param
        state["b"] = bad
        before = {k: v.copy() for k, v in params.items()}
        with pytest.raises((ValueError, TypeError), match="'b'"):
            opt.update(params, grads)
        for k in params:
            np.testing.assert_array_equal(params[k], before[k])
        assert getattr(opt, "iter", None) == it


@pytest.mark.parametrize("form", ["dict", "list"])
@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
@pytest.mark.parametrize("name", NAMES)
def test_a_param_that_is_its_own_grad_updates_as_in_the_book(name, dtype, form):
    # The book's optimizers compute p -= lr * p (etc.) without complaint: the gradient is read before the
    # parameter is written.  Full aliasing, a partial overlap (grad a shifted view of the param) and the same
    # array as another key's gradient all give the book's numbers.
    rng = np.random.default_rng(zlib.crc32(f"{name}{form}".encode()))
    base = np.asarray(rng.standard_normal(12), dtype=dtype)
    other = np.asarray(rng.standard_normal(6), dtype=dtype)
    ref_base, ref_other = base.copy(), other.copy()
    ours, book = getattr(O, name)(**HYPER[name]), BookOptimizer(name, **HYPER[name])
    for _ in range(3):
        mine = {"p": base[:6], "q": other, "r": base[6:]}
        g_mine = {"p": base[:6], "q": base[3:9], "r": other}  # own grad / overlaps p and r / q's array
        theirs = {"p": ref_base[:6], "q": ref_other, "r": ref_base[6:]}
        g_theirs = {"p": ref_base[:6], "q": ref_base[3:9], "r": ref_other}
        if form == "list":
            ours.update(list(mine.values()), list(g_mine.values()))
            book.update(list(theirs.values()), list(g_theirs.values()))
        else:
            ours.update(mine, g_mine)
            book.update(theirs, g_theirs)
    np.testing.assert_allclose(base.astype(np.float64), ref_base.astype(np.float64), **TOL[dtype])
    np.testing.assert_allclose(other.astype(np.float64), ref_other.astype(np.float64), **TOL[dtype])


def test_the_issue_reproducer_updates_both_params_as_the_book_does():
    # Adam().update({'a': a, 'b': b}, {'a': np.ones(4), 'b': b}) used to raise for b only after a was updated.
    a, b = np.full(4, 2.0), np.full(4, 3.0)
    ra, rb = a.copy(), b.copy()
    opt, book = O.Adam(), BookOptimizer("Adam")
    for _ in range(2):
        opt.update({"a": a, "b": b}, {"a": np.ones(4), "b": b})
        book.update({"a": ra, "b": rb}, {"a": np.ones(4), "b": rb})
    assert opt.iter == 2
    np.testing.assert_allclose(a, ra, rtol=1e-12)
    np.testing.assert_allclose(b, rb, rtol=1e-12)
    assert not np.array_equal(b, np.full(4, 3.0))


def test_the_books_module_name_and_the_old_alias_are_one_module():
    import importlib
    import fastbp.optimizer as singular
    import fastbp.optimizers as plural

    assert plural is singular and importlib.import_module("fastbp.optimizers") is singular
    ns = {}
    exec("from fastbp.optimizer import *", ns)  # the book's import line, swapped
    for name in ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"):
        assert ns[name] is getattr(plural, name)
    from fastbp.optimizers import Adam

    assert isinstance(singular.Adam(), Adam)
