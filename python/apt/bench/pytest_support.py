"""Glue between the benchmark cases and pytest-benchmark (benchmarks/test_bench_*.py): the same grids, inputs,
provider calls and correctness gate as ``apt bench``, one pytest item per (shape, mode, provider), so that
``pytest benchmarks --benchmark-autosave`` then ``pytest benchmarks --benchmark-compare`` compares commits.

Device and grid come from pytest options defined in benchmarks/conftest.py (--apt-device, --apt-grid,
--apt-providers) or the environment (APT_BENCH_DEVICE, APT_BENCH_GRID = quick | full).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

import torch

from apt_kernels.backends import triton_interpret

from ..core import registry as _registry
from . import peers as _peers
from .cases import get_case
from .runner import compare_outputs, upcast


@dataclasses.dataclass(frozen=True)
class Item:
    kind: str
    mode: str
    shape: tuple[tuple[str, Any], ...]
    provider: str
    device: str
    quick: bool
    named: bool = False  # asked for by name (--apt-providers)

    @property
    def shape_dict(self) -> dict[str, Any]:
        return dict(self.shape)

    @property
    def id(self) -> str:
        label = get_case(self.kind).label(self.shape_dict)
        return re.sub(r"[^A-Za-z0-9=+.]+", "_", f"{self.mode}-{label}-{self.provider}")


def default_device() -> str:
    env = os.environ.get("APT_BENCH_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def grid_name(grid: Optional[str] = None) -> str:
    """``grid``, else APT_BENCH_GRID, else "quick"; anything but quick / full is a ValueError (it meant quick)."""
    grid = grid or os.environ.get("APT_BENCH_GRID") or "quick"
    if grid not in ("quick", "full"):
        raise ValueError(f"APT_BENCH_GRID: expected quick or full, got {grid!r}")
    return grid


def items(kind: str, device: Optional[str] = None, grid: Optional[str] = None,
          providers: Optional[list[str]] = None) -> list[Item]:
    """Every (shape, mode, provider) of ``kind``; providers include unavailable ones (they are skipped with their
    reason at run time, so the skip list documents them) and the optional peers."""
    device = device or default_device()
    quick = grid_name(grid) == "quick"
    case = get_case(kind)
    names = [i.name for i in _registry.list_providers(kind)] + [p.name for p in _peers.peers_for(kind)]
    if providers:
        ref = _registry.REGISTRY.default_name(kind)
        names = [n for n in names if n in providers or n == ref]
    out = []
    for shape in case.grid(torch.device(device), quick):
        for mode in case.modes:
            mode_names = names
            if mode in case.provider_independent_modes:
                ref = _registry.REGISTRY.default_name(kind)
                mode_names = [ref] if ref else []
            for name in mode_names:
                out.append(Item(kind, mode, tuple(shape.items()), name, device, quick,
                                named=bool(providers) and name in providers))
    return out


_cache: dict[str, Any] = {"key": None}


def _impl(item: Item) -> Any:
    import pytest

    peer = next((p for p in _peers.peers_for(item.kind) if p.name == item.provider), None)
    if peer is not None:
        ok, why = peer.available(torch.device(item.device))
        if not ok:
            pytest.skip(f"{item.provider}: {why}")
        return peer
    info = _registry.get_info(item.kind, item.provider)
    if not info.available:
        pytest.skip(f"{item.provider}: {info.reason}")
    if item.device == "cpu" and "triton" in item.provider and not item.named and \
            triton_interpret():
        pytest.skip(f"{item.provider}: TRITON_INTERPRET=1 would time the interpreter (name it in --apt-providers)")
    return _registry.get(item.kind, item.provider, strict=True)


def _inputs_and_expected(item: Item, case: Any, dtype: torch.dtype) -> tuple[dict[str, Any], Any]:
    """Inputs and the reference's outputs for (shape, mode), cached for consecutive items of the same shape."""
    key = (item.kind, item.shape, item.device, str(dtype))
    if _cache["key"] != key:
        _cache.clear()
        _cache["key"] = key
        _cache["inputs"] = case.make_inputs(item.shape_dict, torch.device(item.device), dtype, seed=0)
        _cache["expected"] = {}
    inputs = _cache["inputs"]
    if item.mode not in _cache["expected"]:
        ref_name = _registry.REGISTRY.default_name(item.kind)
        try:
            ref = _registry.get(item.kind, ref_name, strict=True)
            # fp32 yardstick for half inputs, as in `apt bench`
            _cache["expected"][item.mode] = case.outputs(ref, upcast(inputs), item.mode)
        except Exception as exc:  # the reference cannot run this shape: providers are timed unchecked
            _cache["expected"][item.mode] = f"reference failed: {type(exc).__name__}: {exc}"
    return inputs, _cache["expected"][item.mode]


def run_item(benchmark: Any, item: Item) -> None:
    """Correctness-check ``item``'s provider against the reference, then time it with pytest-benchmark."""
    import pytest

    case = get_case(item.kind)
    device = torch.device(item.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dtype = case.default_dtype(device)
    impl = _impl(item)
    inputs, expected = _inputs_and_expected(item, case, dtype)
    why = case.unsupported(impl, inputs, item.mode)
    if why:
        pytest.skip(f"{item.provider} does not support these inputs: {'; '.join(why)}")
    checked = getattr(impl, "checked", True) and isinstance(expected, dict)
    if checked:
        ok, err, reason, _ = compare_outputs(case.outputs(impl, inputs, item.mode), expected, dtype, case.family)
        if not ok:
            pytest.fail(f"{item.provider} is WRONG against the reference (not timed): {reason}")
    fn = case.build(impl, inputs, item.mode)

    def call() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    benchmark.group = f"{item.kind} {item.mode} {case.label(item.shape_dict)}"
    benchmark.extra_info.update({"provider": item.provider, "device": item.device, "dtype": str(dtype),
                                 "checked": checked, **{f"work_{k}": v for k, v in
                                                        case.work(item.shape_dict, item.mode, dtype).items()}})
    rounds, warmup = (5, 1) if item.quick else (10, 2)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info[case.metric(item.mode)] = case.metric_value(
            case.work(item.shape_dict, item.mode, dtype), item.mode, median)
