"""pytest-benchmark: every scan provider on the scan grid of apt.bench.cases.scan (correctness-checked first)."""
from apt.bench.pytest_support import run_item

KIND = "scan"


def test_scan(benchmark, bench_item):
    run_item(benchmark, bench_item)
