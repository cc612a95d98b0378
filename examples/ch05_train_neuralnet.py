"""Book 1, chapter 5 (train_neuralnet.py) on fastbp: a two-layer net trained by backpropagation.

The flow of the book's script -- TwoLayerNet(784, 50, 10), mini-batches of 100 drawn with
np.random.choice, learning rate 0.1, train/test accuracy printed once per epoch -- with two changes:
the network comes from fastbp.nets and the update is fastbp's in-place SGD (the book's loop
`network.params[key] -= learning_rate * grad[key]` works too, it just allocates a temporary per array).

    python examples/ch05_train_neuralnet.py                 # the bundled 4,000/1,000 MNIST sample
    python examples/ch05_train_neuralnet.py --source full   # 60,000/10,000 (downloaded if missing)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the book's import trick

import numpy as np

from fastbp.datasets import load_mnist
from fastbp.nets import TwoLayerNet
from fastbp.optimizers import SGD

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=10000, help="iterations (book: 10000)")
parser.add_argument("--source", choices=("sample", "auto", "full"), default="sample")
parser.add_argument("--seed", type=int, default=None, help="np.random seed (default: unseeded, like the book)")
args = parser.parse_args()
if args.seed is not None:
    np.random.seed(args.seed)

# data (one-hot labels, as in the book)
(x_train, t_train), (x_test, t_test) = load_mnist(normalize=True, one_hot_label=True, source=args.source)

network = TwoLayerNet(input_size=784, hidden_size=50, output_size=10)
optimizer = SGD(lr=0.1)

iters_num = args.iters
train_size = x_train.shape[0]
batch_size = 100
learning_rate = 0.1

train_loss_list = []
train_acc_list = []
test_acc_list = []

iter_per_epoch = max(train_size // batch_size, 1)

start = time.perf_counter()
for i in range(iters_num):
    batch_mask = np.random.choice(train_size, batch_size)
    x_batch = x_train[batch_mask]
    t_batch = t_train[batch_mask]

    grad = network.gradient(x_batch, t_batch)  # backpropagation
    optimizer.update(network.params, grad)  # params -= lr * grad, in place

    loss = network.loss(x_batch, t_batch)
    train_loss_list.append(loss)

    if i % iter_per_epoch == 0:
        train_acc = network.accuracy(x_train, t_train)
        test_acc = network.accuracy(x_test, t_test)
        train_acc_list.append(train_acc)
        test_acc_list.append(test_acc)
        print(f"iter {i:>6}  loss {loss:.4f}  train acc {train_acc:.4f}  test acc {test_acc:.4f}")

print(
    f"final: train acc {network.accuracy(x_train, t_train):.4f}, "
    f"test acc {network.accuracy(x_test, t_test):.4f} after {iters_num} iterations "
    f"({time.perf_counter() - start:.2f} s)"
)
