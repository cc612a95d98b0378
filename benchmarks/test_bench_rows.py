"""The rows of ``python -m fastbp bench``, each implementation a pytest-benchmark: the same cases
(:mod:`fastbp.bench.cases`: same inputs, same check before timing) measured by pytest-benchmark's own timer, so
the two harnesses can be compared on one machine.  Group = one row; ``gemm-only`` is the step's GEMMs alone."""

import pytest

pytest.importorskip("fastbp.layers")

from fastbp.bench import cases  # noqa: E402

ROWS = [key for key, _ in cases.build_cases(None)]
IMPLS = ["fastbp", "numpy", "torch", "gemm-only"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", ROWS)
def test_bench_row(benchmark, request, torch_or_none, row, impl):
    if impl == "torch":
        request.getfixturevalue("need_torch")
    (build,) = [b for k, b in cases.build_cases(torch_or_none if impl == "torch" else None, [row]) if k == row]
    case = build()
    if impl not in case.impls:
        pytest.skip(f"row {row} has no {impl} implementation")
    if case.check:
        case.check()  # before any timed call: the training steps change the weights
    benchmark.group = f"bench-row {case.title}"
    benchmark(case.impls[impl])
