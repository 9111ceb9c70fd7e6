"""pytest-benchmark: every attention provider on the attention grid of apt.bench.cases.attention (checked first)."""
from apt.bench.pytest_support import run_item

KIND = "attention"


def test_attention(benchmark, bench_item):
    run_item(benchmark, bench_item)
