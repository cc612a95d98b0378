"""Book 1, chapter 6 (optimizer_compare_mnist.py) on fastbp: SGD, Momentum, AdaGrad and Adam on MNIST.

The flow of the book's script: one 5-layer MultiLayerNet (784-100-100-100-100-10, ReLU, He init) per
optimizer, the same random mini-batch of 128 for all of them at every iteration, the training loss of
each printed every 100 iterations.  Shorter by default (--iters 500; the book runs 2000).  --rmsprop and
--nesterov add those optimizers; --plot FILE.png draws the book's figure (needs matplotlib).

    python examples/ch06_optimizer_compare.py --iters 2000
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the book's import trick

import numpy as np

from fastbp.datasets import load_mnist
from fastbp.nets import MultiLayerNet
from fastbp.optimizers import SGD, AdaGrad, Adam, Momentum, Nesterov, RMSprop

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=500, help="iterations (book: 2000)")
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--source", choices=("sample", "auto", "full"), default="sample")
parser.add_argument("--seed", type=int, default=None, help="np.random seed (default: unseeded, like the book)")
parser.add_argument("--rmsprop", action="store_true", help="also RMSprop")
parser.add_argument("--nesterov", action="store_true", help="also Nesterov")
parser.add_argument("--plot", metavar="FILE.png", help="save the loss curves (needs matplotlib)")
args = parser.parse_args()
if args.plot:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib (pip install matplotlib)")
if args.seed is not None:
    np.random.seed(args.seed)

# 0: MNIST
(x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, source=args.source)
train_size = x_train.shape[0]
batch_size = args.batch_size
max_iterations = args.iters

# 1: the experiment
optimizers = {"SGD": SGD(), "Momentum": Momentum(), "AdaGrad": AdaGrad(), "Adam": Adam()}
if args.nesterov:
    optimizers["Nesterov"] = Nesterov()
if args.rmsprop:
    optimizers["RMSprop"] = RMSprop()

networks = {}
train_loss = {}
for key in optimizers:
    networks[key] = MultiLayerNet(input_size=784, hidden_size_list=[100, 100, 100, 100], output_size=10)
    train_loss[key] = []

# 2: training
start = time.perf_counter()
for i in range(max_iterations):
    batch_mask = np.random.choice(train_size, batch_size)
    x_batch = x_train[batch_mask]
    t_batch = t_train[batch_mask]

    for key in optimizers:
        grads = networks[key].gradient(x_batch, t_batch)
        optimizers[key].update(networks[key].params, grads)

        loss = networks[key].loss(x_batch, t_batch)
        train_loss[key].append(loss)

    if i % 100 == 0:
        print("===========" + "iteration:" + str(i) + "===========")
        for key in optimizers:
            loss = networks[key].loss(x_batch, t_batch)
            print(key + ":" + str(loss))

elapsed = time.perf_counter() - start
print(f"{max_iterations} iterations x {len(optimizers)} networks in {elapsed:.2f} s")
for key in optimizers:
    print(f"{key:>9}: test accuracy {networks[key].accuracy(x_test, t_test):.4f}")

# 3: the figure
if args.plot:

    def smooth_curve(x, k=11):
        """Moving average (the book smooths with a Kaiser window)."""
        x = np.asarray(x, dtype=np.float64)
        if x.size < k:
            return x
        pad = np.r_[np.full(k // 2, x[0]), x, np.full(k // 2, x[-1])]
        return np.convolve(pad, np.ones(k) / k, mode="valid")

    markers = {"SGD": "o", "Momentum": "x", "AdaGrad": "s", "Adam": "D", "Nesterov": "^", "RMSprop": "v"}
    x = np.arange(max_iterations)
    for key in optimizers:
        plt.plot(x, smooth_curve(train_loss[key]), marker=markers[key], markevery=100, label=key)
    plt.xlabel("iterations")
    plt.ylabel("loss")
    plt.ylim(0, 1)
    plt.legend()
    plt.savefig(args.plot)
    print(f"figure written to {args.plot}")
