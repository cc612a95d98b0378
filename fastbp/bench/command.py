"""``fastbp bench`` / ``python -m fastbp.bench``: the command line of the benchmark."""

import argparse
import os
import sys

from fastbp.bench.cases import build_cases
from fastbp.bench.harness import DEFAULT_GAP, DEFAULT_ROUNDS, PEAK_SIZE, QUICK_ROUNDS
from fastbp.bench.simdpath import CHILD_VAR, PATHS, run_on_path
from fastbp.bench.report import run


def _peak_size(text):
    v = int(text) if text.strip().lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"expected a size >= 0 (0 skips the peak), got {text!r}")
    return v


DESCRIPTION = (
    "Time fastbp against the plain-NumPy reference (and PyTorch eager when installed) in "
    "interleaved rounds and print a table with the speed targets. Takes about 2 minutes "
    "(--quick: under 1)."
)


def _configure(p):
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROUNDS} rounds instead of {DEFAULT_ROUNDS} and a shorter GEMM-peak measurement",
    )
    from fastbp.cli import _nonneg_float, _positive_int  # the CLI's argument types

    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help=f"interleaved rounds per row (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})",
    )
    p.add_argument(
        "--gap",
        type=_nonneg_float,
        default=DEFAULT_GAP,
        help=f"idle seconds before each timed batch so other thread pools stop spinning (default {DEFAULT_GAP})",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write every number to FILE as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="also sweep the train step over batch sizes (half the rounds) and plot the speedups (needs matplotlib)",
    )
    p.add_argument("--sweep", action="store_true", help="run the batch-size sweep without plotting it")
    p.add_argument(
        "--cases",
        nargs="+",
        metavar="WORD",
        default=None,
        help="run only the rows whose key contains one of these words (e.g. train softmax alloc)",
    )
    p.add_argument(
        "--peak-size",
        type=_peak_size,
        default=PEAK_SIZE,
        help=f"matrix size of the GEMM-peak measurement (default {PEAK_SIZE}; 0 skips it)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns even if torch is installed")
    p.add_argument("--no-probe", action="store_true", help="skip the thread-pool interference probe")
    p.add_argument("--no-alloc", action="store_true", help="skip the NumPy allocation measurement")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--path",
        choices=PATHS,
        default=None,
        help="run the bench in a child process with fastbp, NumPy (OpenBLAS core, SIMD dispatch) and PyTorch (ATen, "
        "oneDNN, MKL) all on this SIMD path, as on a CPU that has nothing more (avx2: a reader's laptop); the "
        "header names the kernels each library ran, and the run is refused if one did not take the path.  "
        "Overrides FASTBP_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE, NPY_DISABLE_CPU_FEATURES, ATEN_CPU_CAPABILITY "
        "and the like of your environment (in the child only; a note names them).  Default: this process, "
        "as the environment leaves it",
    )
    p.set_defaults(func=cmd_bench)
    return p


def add_parser(subparsers):
    """Register the ``bench`` subcommand on an argparse subparsers object (used by fastbp.cli)."""
    p = subparsers.add_parser(
        "bench",
        help="speed benchmark: fastbp vs NumPy (and PyTorch), with the project's speed targets",
        description=DESCRIPTION,
    )
    return _configure(p)


def to_argv(args):
    """The command-line arguments that parse back to `args` (for the child process of --path)."""
    argv = []
    for flag, name in (
        ("--quick", "quick"),
        ("--sweep", "sweep"),
        ("--no-torch", "no_torch"),
        ("--no-probe", "no_probe"),
        ("--no-alloc", "no_alloc"),
        ("--quiet", "quiet"),
    ):
        if getattr(args, name, False):
            argv.append(flag)
    for flag, name in (
        ("--rounds", "rounds"),
        ("--gap", "gap"),
        ("--json", "json"),
        ("--plot", "plot"),
        ("--peak-size", "peak_size"),
        ("--path", "path"),
    ):
        v = getattr(args, name, None)
        if v is not None:
            argv += [flag, repr(v) if isinstance(v, float) else str(v)]
    if getattr(args, "cases", None):
        argv += ["--cases", *args.cases]
    return argv


def cmd_bench(args):
    path = getattr(args, "path", None)
    if path and os.environ.get(CHILD_VAR) != path:
        # NumPy, OpenBLAS and PyTorch read their SIMD settings when they load: a fresh process on the path
        return run_on_path(path, ["fastbp.bench", *to_argv(args)])
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.stderr.write(
                "fastbp: --plot needs matplotlib, which is not installed "
                "(pip install matplotlib, or pip install 'fastbp[plot]')\n"
            )
            return 2
    if args.cases:
        known = [k for k, _ in build_cases(None)] + ["alloc"]
        bad = [w for w in args.cases if not any(w in k for k in known)]
        if bad:
            sys.stderr.write(f"fastbp: --cases {' '.join(bad)} matches no row; rows: {', '.join(known)}\n")
            return 2
    res = run(args)
    if res.get("refused"):
        return 3
    rows = res["rows"] + res["alloc"]
    return 1 if any("error" in r for r in rows) else 0


def main(argv=None):
    """``python -m fastbp.bench [options]`` (same as ``python -m fastbp bench``)."""
    p = _configure(argparse.ArgumentParser(prog="fastbp bench", description=DESCRIPTION))
    return cmd_bench(p.parse_args(argv))
