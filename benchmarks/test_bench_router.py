"""pytest-benchmark: every router provider on the router grid of apt.bench.cases.router (correctness-checked first)."""
from apt.bench.pytest_support import run_item

KIND = "router"


def test_router(benchmark, bench_item):
    run_item(benchmark, bench_item)
