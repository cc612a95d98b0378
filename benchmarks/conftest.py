"""pytest-benchmark suite of fastbp: ``pytest benchmarks/ --benchmark-only``.

Each benchmark group holds one operation at one size and dtype, so the implementations in a group compare
directly: ``fastbp`` (the drop-in layer, new arrays per call like the book), ``fastbp-reuse`` (the same layer
with ``reuse=True`` workspaces, as fastbp.nets uses it), ``numpy`` (fastbp.reference, plain NumPy) and
``torch`` (PyTorch eager on the CPU, skipped when torch is not installed).

Default: a modest grid with short timing (``max_time`` 0.1 s per benchmark, a few warm-up iterations); the
whole suite runs in a few minutes.  ``--bench-full`` (or FASTBP_BENCH_FULL=1) adds the large sizes and
leaves pytest-benchmark's own timing options alone.  Explicit ``--benchmark-max-time`` /
``--benchmark-min-rounds`` / ``--benchmark-warmup`` always win.

NumPy's OpenBLAS, fastbp's own OpenBLAS copy, OpenMP and PyTorch keep separate thread pools whose workers spin
for about 0.1 s after a call; on a small machine that steals a core from the next benchmark.  So every
benchmark starts after an idle gap (``--bench-gap``, default 0.15 s); see ``fastbp/bench/harness.py`` for the
measurement of that effect.
"""

import os
import time

import numpy as np
import pytest

DTYPES = [np.float32, np.float64]

# (N, D, M): batch, input width, output width.  Batch 1..4096, widths 10..4096.
AFFINE_QUICK = [(1, 784, 50), (100, 784, 50), (100, 50, 10), (256, 1024, 1024), (4096, 784, 10), (1, 4096, 4096)]
AFFINE_FULL = AFFINE_QUICK + [(32, 784, 100), (1000, 784, 1000), (4096, 1024, 1024), (4096, 4096, 4096)]
# (N, M) of elementwise layers (ReLU, sigmoid)
EW_QUICK = [(1, 50), (100, 50), (256, 1024), (4096, 1024)]
EW_FULL = EW_QUICK + [(1, 4096), (100, 10), (4096, 4096)]
# (N, M) of the bias reduction db = dout.sum(0)
BIAS_QUICK = [(100, 50), (256, 1024), (4096, 1024)]
BIAS_FULL = BIAS_QUICK + [(1, 10), (4096, 4096)]
# (N, C) of softmax cross-entropy
SOFTMAX_QUICK = [(1, 10), (100, 10), (4096, 1000)]
SOFTMAX_FULL = SOFTMAX_QUICK + [(256, 1000), (4096, 10)]
# parameter shapes and optimizers of the update benchmarks
OPT_SHAPES_QUICK = [(784, 50), (1024, 1024)]
OPT_SHAPES_FULL = OPT_SHAPES_QUICK + [(10,), (4096, 4096)]
OPTIMIZERS_QUICK = ["SGD", "Adam"]
OPTIMIZERS_FULL = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"]

QUICK_TIMING = dict(max_time=0.1, min_rounds=5, warmup=True, warmup_iterations=20)


def pytest_addoption(parser):
    g = parser.getgroup("fastbp benchmarks")
    g.addoption(
        "--bench-full",
        action="store_true",
        default=False,
        help="fastbp benchmarks: full size grid and pytest-benchmark's default timing",
    )
    g.addoption(
        "--bench-gap",
        type=float,
        default=0.15,
        help="fastbp benchmarks: idle seconds before each benchmark (thread pools spin down)",
    )


def full_mode(config):
    return bool(config.getoption("--bench-full")) or os.environ.get("FASTBP_BENCH_FULL", "") not in ("", "0")


def pytest_generate_tests(metafunc):
    full = full_mode(metafunc.config)
    grids = {
        "affine_shape": AFFINE_FULL if full else AFFINE_QUICK,
        "ew_shape": EW_FULL if full else EW_QUICK,
        "bias_shape": BIAS_FULL if full else BIAS_QUICK,
        "softmax_shape": SOFTMAX_FULL if full else SOFTMAX_QUICK,
        "opt_shape": OPT_SHAPES_FULL if full else OPT_SHAPES_QUICK,
        "opt_name": OPTIMIZERS_FULL if full else OPTIMIZERS_QUICK,
    }
    for name, values in grids.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[_shape_id(v) for v in values])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", DTYPES, ids=["float32", "float64"])


def _shape_id(v):
    return "x".join(str(s) for s in v) if isinstance(v, tuple) else str(v)


def pytest_collection_modifyitems(config, items):
    if full_mode(config):
        return
    given = " ".join(str(a) for a in config.invocation_params.args)
    timing = {k: v for k, v in QUICK_TIMING.items() if f"--benchmark-{k.replace('_', '-')}" not in given}
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here) and "benchmark" in getattr(item, "fixturenames", ()):
            if item.get_closest_marker("benchmark") is None:
                item.add_marker(pytest.mark.benchmark(**timing))


@pytest.fixture(autouse=True)
def _idle_gap(request):
    """Let the thread pools of the previous benchmark stop spinning before this one starts."""
    gap = request.config.getoption("--bench-gap")
    if gap > 0 and "benchmark" in request.fixturenames:
        time.sleep(gap)
    yield


@pytest.fixture(scope="session")
def torch_or_none():
    try:
        import torch
    except Exception:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


@pytest.fixture
def need_torch(torch_or_none):
    if torch_or_none is None:
        pytest.skip("torch is not installed (pip install torch) - torch benchmarks skipped")
    return torch_or_none


@pytest.fixture
def rng():
    return np.random.default_rng(0)
