"""``python -m fastbp bench``: the curated speed benchmark of fastbp against plain NumPy (and PyTorch).

Every row times fastbp, the NumPy baseline and, when it is installed, PyTorch eager on the CPU, on the same
inputs, after checking once that they compute the same thing (``allclose`` on the gradients or outputs).  The
speed targets of the project are printed next to each row with PASS/MISS.

How the numbers are taken (interleaved rounds)
----------------------------------------------
* A row is measured in R rounds.  In each round every implementation times one batch of ``number`` calls back
  to back (``number`` is calibrated once so that a batch lasts about 20 ms), in an order that rotates from
  round to round, so slow drifts of the machine hit all implementations alike.
* The reported time of an implementation is the median over the rounds of its per-call time; the reported
  speedup ``fastbp vs X`` is the median over the rounds of the per-round ratio ``t_X / t_fastbp``.  A median
  ignores the rounds spoilt by other processes of a shared machine.
* Thread pools do not leak into each other's timings.  NumPy's OpenBLAS pool, fastbp's OpenMP team (which also
  runs fastbp's GEMM pieces, see :mod:`fastbp._blas`) and PyTorch's pool are separate sets of threads; an
  OpenBLAS worker keeps spinning on a core for about 0.1 s after a GEMM, and on a 2-core machine that steals a core from
  whatever runs next (the ``interference`` line of the header measures it: fastbp's step timed right after a
  NumPy batch against after an idle gap, and the reverse).  Measured on the project's 2-core machine: the
  TwoLayerNet batch-100 step of fastbp ran 1.9-2.0x slower right after a NumPy batch, NumPy's 1.85-2.4x slower
  right after fastbp's, and NumPy's OpenBLAS worker kept a CPU busy for 105 ms after its last call.  So before
  each timed batch the process sleeps ``--gap`` seconds (default 0.15 s, longer than the measured spin-down;
  the header prints the spin-down of the run and warns when it exceeds the gap), then makes untimed warm-up
  calls of the same implementation for about 20 ms (at least 2, at most one batch's worth; they wake its own pool
  and bring it back to the back-to-back regime of a training loop), then times the batch.
  The garbage collector is off during the timed batches only.
* GFLOP/s of the GEMM-bound rows count the matrix products a training step needs: forward ``x @ W`` of every
  layer, ``dW`` of every layer and ``dx`` of all layers but the first.  The GEMM peak is the best rate of a
  2048^3 ``sgemm``/``dgemm`` through fastbp's BLAS (``fastbp._kernels.gemm``) and through NumPy's
  (``np.matmul``), best of several calls; the "GEMM floor" of a step is its GEMM FLOPs over the best sgemm
  rate of the two.
* NumPy allocation in a fastbp training step is measured with :mod:`tracemalloc` (NumPy's own tracing domain,
  so Python objects do not count) over 10 steps after warm-up, sampling the live NumPy bytes at every Python
  and C function call and return, so temporaries freed within the step are seen too.

The NumPy baseline is :mod:`fastbp.reference` (the same layers in plain NumPy) with the book's SGD update
(``p -= lr * g``), and, for the "book" row, a transcription of the book's own ``ch05/two_layer_net.py`` with
its ``common/layers.py`` (:class:`BookLayers`) against the same class with :mod:`fastbp.layers` dropped in.

The package: :mod:`~fastbp.bench.harness` (interleaving, calibration, allocation probe, machine probes),
:mod:`~fastbp.bench.book` (the book's code, transcribed once), :mod:`~fastbp.bench.cases` (the rows: fastbp,
NumPy and PyTorch on the same inputs, with their checks and targets; also used by ``benchmarks/``),
:mod:`~fastbp.bench.report` (running, table, JSON, plot), :mod:`~fastbp.bench.command` (the command line) and
:mod:`~fastbp.bench.simdpath` (``--path``: the child process with fastbp, NumPy and PyTorch all on one SIMD path,
and the check of the kernels each really ran).
Every name of the former single module is importable from ``fastbp.bench``.
"""

from fastbp.bench import book, cases, command, harness, report  # noqa: F401
from fastbp.bench.book import BookLayers, BookSGD, BookTwoLayerNet, book_train_step  # noqa: F401
from fastbp.bench.cases import (  # noqa: F401
    SWEEP_BATCHES,
    Case,
    Target,
    book_case,
    build_cases,
    gemm_only_step,
    mnist_batch,
    net_batch,
    relu_case,
    softmax_case,
    step_gemm_flops,
    sweep_cases,
    train_case,
)
from fastbp.bench.command import DESCRIPTION, add_parser, cmd_bench, main  # noqa: F401
from fastbp.bench.harness import (  # noqa: F401
    BASE,
    BATCH_TIME,
    BUSY,
    DEFAULT_GAP,
    DEFAULT_ROUNDS,
    PEAK_SIZE,
    QUICK_ROUNDS,
    WARM_TIME,
    calibrate,
    check_case,
    gemm_peak,
    interference_probe,
    interleave,
    measure_case,
    median,
    numpy_alloc_per_call,
    summarize,
)
from fastbp.bench.report import (  # noqa: F401
    evaluate_targets,
    fmt_time,
    format_alloc,
    format_table,
    machine_info,
    run,
)

__all__ = [
    "add_parser",
    "main",
    "run",
    "BookLayers",
    "BookTwoLayerNet",
    "Case",
    "Target",
    "interleave",
    "summarize",
    "format_table",
    "numpy_alloc_per_call",
    "step_gemm_flops",
    "fmt_time",
    "build_cases",
    "train_case",
    "book_case",
    "softmax_case",
    "relu_case",
    "gemm_only_step",
    "mnist_batch",
    "BookSGD",
    "DEFAULT_GAP",
    "DEFAULT_ROUNDS",
    "QUICK_ROUNDS",
]
