"""Book 1, chapter 7 (train_convnet.py) on fastbp: the book's SimpleConvNet trained with Adam.

The book's script with its imports swapped -- `from fastbp.nets import SimpleConvNet` and
`from fastbp.trainer import Trainer` -- and the same settings: 30 filters 5x5, hidden 100, Adam lr 0.001,
batch 100, 1,000 samples evaluated per epoch, 20 epochs, then the book's save_params('params.pkl').
On the bundled 4,000/1,000 MNIST sample it reaches about 0.97 test accuracy (full MNIST: the book's 0.99).

    python examples/ch07_train_convnet.py                   # the bundled sample
    python examples/ch07_train_convnet.py --source full     # 60,000/10,000 (downloaded if missing)
    python examples/ch07_train_convnet.py --params /work/shared/data/book/book1-ch07-params.pkl --epochs 0
                                                            # the book's trained params: accuracy only
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the book's import trick

import numpy as np

from fastbp.datasets import load_mnist
from fastbp.nets import SimpleConvNet
from fastbp.trainer import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=20, help="epochs (book: 20; 0: only evaluate)")
parser.add_argument("--source", choices=("sample", "auto", "full"), default="sample")
parser.add_argument(
    "--dtype", choices=("float64", "float32"), default="float64", help="parameter dtype (book: float64)"
)
parser.add_argument("--params", default=None, help="load a params pickle (the book's format) before training")
parser.add_argument("--save", default=None, help="save the trained params (the book writes params.pkl)")
parser.add_argument("--seed", type=int, default=None, help="np.random seed (default: unseeded, like the book)")
args = parser.parse_args()
if args.seed is not None:
    np.random.seed(args.seed)

(x_train, t_train), (x_test, t_test) = load_mnist(flatten=False, source=args.source)

network = SimpleConvNet(
    input_dim=(1, 28, 28),
    conv_param={"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1},
    hidden_size=100,
    output_size=10,
    weight_init_std=0.01,
    dtype=args.dtype,
)
if args.params:
    network.load_params(args.params)
if args.epochs > 0:
    trainer = Trainer(
        network,
        x_train,
        t_train,
        x_test,
        t_test,
        epochs=args.epochs,
        mini_batch_size=100,
        optimizer="Adam",
        optimizer_param={"lr": 0.001},
        evaluate_sample_num_per_epoch=1000,
    )
    trainer.train()
else:
    print(f"test acc: {network.accuracy(x_test, t_test):.4f}")
if args.save:
    network.save_params(args.save)
    print(f"Saved Network Parameters to {args.save}")
