"""``apt bench``: time every available provider of each kernel kind (attention, router, scan) on a documented grid
of shapes, after checking it against the reference on the same inputs; render Markdown/JSON/PNG reports.

Entry points: :func:`apt.bench.runner.run_benchmarks` (the CLI's engine), :func:`apt.bench.runner.run_case`,
:mod:`apt.bench.report`; the shape grids, FLOP/byte formulas and provider calls live in :mod:`apt.bench.cases`.
"""
from __future__ import annotations

from .cases import BenchCase, all_cases, get_case
from .runner import BenchResult, BenchRun, TimingStats, measure_peak_memory, run_benchmarks, run_case, time_fn

__all__ = ["BenchCase", "BenchResult", "BenchRun", "TimingStats", "all_cases", "get_case", "measure_peak_memory",
           "run_benchmarks", "run_case", "time_fn"]
