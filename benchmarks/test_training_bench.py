"""Training-step and gradient benchmarks.

* train-step groups: one step = ``net.gradient(x, t)`` + ``optimizer.update(net.params, grads)`` with SGD
  (fastbp: ``fastbp.nets`` + ``fastbp.optimizer.SGD``; numpy: the same net on ``fastbp.reference`` + the
  book's ``p -= lr * g``; torch: Linear/ReLU/Linear forward, CrossEntropyLoss, backward, torch.optim.SGD.step
  with ``zero_grad(set_to_none=False)``).  All start from the same weights and the gradients are compared
  once before timing.  Cases: TwoLayerNet 784-50-10 at batch 100 (the book's setting) and 1, MultiLayerNet
  784-1024-1024-10 at batch 256.
  The cases are ``fastbp bench``'s own (:mod:`fastbp.bench.cases`): one setup, one check, for both.
* book-step group: the book's own ch05 TwoLayerNet with fastbp.layers dropped in vs with its NumPy layers.
* gradient group: backpropagation vs the numerical gradient on the book's 3-sample gradient check
  (TwoLayerNet 784-50-10, float64 weights, float32 images, one-hot labels).
"""

import numpy as np
import pytest

pytest.importorskip("fastbp.nets")
pytest.importorskip("fastbp.optimizer")

from fastbp.bench import cases  # noqa: E402

IMPLS = ["fastbp", "numpy", "torch"]
TRAIN_CASES = {
    "TwoLayerNet-784-50-10-b100": ((784, 50, 10), 100),
    "TwoLayerNet-784-50-10-b1": ((784, 50, 10), 1),
    "MultiLayerNet-784-1024-1024-10-b256": ((784, 1024, 1024, 10), 256),
}


def _require_torch(request, impl):
    if impl == "torch":
        request.getfixturevalue("need_torch")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_step(benchmark, request, torch_or_none, impl, case, dtype):
    sizes, batch = TRAIN_CASES[case]
    if len(sizes) > 3 and np.dtype(dtype) == np.float64 and not _full(request):
        pytest.skip("MultiLayerNet float64 runs with --bench-full only")
    _require_torch(request, impl)
    benchmark.group = f"train-step {case} {np.dtype(dtype).name}"
    c = cases.train_case(case, case, sizes, batch, dtype, torch_or_none, [])
    c.check()
    benchmark(c.impls[impl])


def _full(request):
    return request.config.getoption("--bench-full")


@pytest.mark.parametrize("impl", ["fastbp", "numpy"])
def test_book_train_step(benchmark, impl):
    """The book's ch05 TwoLayerNet and loop step (gradient + params[key] -= lr * grad[key]), batch 100,
    fastbp.layers vs the book's common/layers.py."""
    benchmark.group = "book-train-step TwoLayerNet-784-50-10-b100 (f64 weights, f32 images)"
    c = cases.book_case(100)
    c.check()
    benchmark(c.impls[impl])


@pytest.fixture(scope="module")
def gradient_check_data():
    x, t = cases.mnist_batch(3, one_hot=True)  # the book's x_train[:3], t_train[:3]
    return x, t


@pytest.mark.parametrize("method", ["backprop", "numerical"])
@pytest.mark.parametrize("backend", ["fastbp", "numpy"])
def test_gradient(benchmark, request, gradient_check_data, method, backend):
    """net.gradient(x, t) vs net.numerical_gradient(x, t) on 3 samples (fastbp.nets.TwoLayerNet, float64)."""
    from fastbp import nets

    benchmark.group = "gradient TwoLayerNet-784-50-10 3 samples float64"
    x, t = gradient_check_data
    np.random.seed(0)
    net = nets.TwoLayerNet(784, 50, 10, backend="fastbp" if backend == "fastbp" else "reference")
    if method == "backprop":
        benchmark(net.gradient, x, t)
    else:
        rounds = 3 if _full(request) else 1
        grads = benchmark.pedantic(net.numerical_gradient, args=(x, t), rounds=rounds, iterations=1)
        back = net.gradient(x, t)
        for k in back:
            err = np.max(np.abs(grads[k] - back[k])) / max(np.max(np.abs(back[k])), 1e-12)
            assert err < 1e-3, f"{k}: numerical and backprop gradients differ ({err:.3g})"
