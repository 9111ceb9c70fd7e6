"""Benchmark cases: one per provider kind (attention, router, scan). A case owns its shape grids, input builder,
FLOP/byte formulas, how to call a provider in each mode, and which outputs the correctness check compares.
The same case objects drive ``apt bench`` and the pytest-benchmark tests under benchmarks/."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch


class BenchCase:
    kind: ClassVar[str] = ""
    family: ClassVar[str] = ""  # key of apt_kernels.testing's tolerance table
    modes: ClassVar[tuple[str, ...]] = ()
    # modes whose timed work does not depend on the provider (run once, with the reference)
    provider_independent_modes: ClassVar[frozenset[str]] = frozenset()
    # providers/peers the report gives an extra "vs <name>" ratio column for, when they were timed
    ratio_to: ClassVar[tuple[str, ...]] = ()

    # ---- grids -----------------------------------------------------------------------------------------
    def grid(self, device: torch.device, quick: bool) -> list[dict[str, Any]]:
        raise NotImplementedError

    def grid_doc(self, device: torch.device, quick: bool) -> str:
        raise NotImplementedError

    def label(self, shape: dict[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in shape.items())

    def x_axis(self, shape: dict[str, Any]) -> tuple[str, float]:
        raise NotImplementedError

    def series(self, shape: dict[str, Any]) -> str:
        """Which line of the plots a shape belongs to: the shape parameters other than the x axis, by default."""
        x = self.x_axis(shape)[0]
        return ", ".join(f"{k}={v}" for k, v in shape.items() if k != x)

    def default_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    # ---- inputs and calls --------------------------------------------------------------------------------
    def make_inputs(self, shape: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def unsupported(self, provider: Any, inputs: dict[str, Any], mode: str) -> list[str]:
        """Reasons ``provider`` cannot run ``mode`` on ``inputs`` (its ``supports()`` plus missing methods)."""
        raise NotImplementedError

    def build(self, provider: Any, inputs: dict[str, Any], mode: str) -> Callable[[], Any]:
        """A zero-argument callable doing the timed work once."""
        raise NotImplementedError

    def outputs(self, provider: Any, inputs: dict[str, Any], mode: str) -> dict[str, torch.Tensor]:
        """Named outputs compared with the reference's (``grad_*`` names use the gradient tolerance)."""
        raise NotImplementedError

    def provider_label(self, name: str, mode: str) -> str:
        return name

    # ---- work and metrics -----------------------------------------------------------------------------
    def work(self, shape: dict[str, Any], mode: str, dtype: torch.dtype) -> dict[str, float]:
        raise NotImplementedError

    def metric(self, mode: str) -> str:
        raise NotImplementedError

    def metric_value(self, work: dict[str, float], mode: str, seconds: float) -> Optional[float]:
        if seconds <= 0:
            return None
        m = self.metric(mode)
        if m == "TFLOP/s":
            return work["flops"] / seconds / 1e12
        if m == "GB/s":
            return work["bytes"] / seconds / 1e9
        if m == "tokens/s":
            return work["tokens"] / seconds
        raise ValueError(f"unknown metric {m!r}")

    def bound(self, mode: str) -> str:
        """"compute" or "memory": which device peak the "% of peak" column is taken against; "" for a metric with
        no device peak (tokens/s: the work of such a mode has no byte or FLOP count of its own)."""
        return {"TFLOP/s": "compute", "GB/s": "memory"}.get(self.metric(mode), "")

    # ---- performance targets ------------------------------------------------------------------------------
    def targets(self) -> list[Any]:
        """The performance targets the project's issues set for this kind, as :class:`apt.bench.targets.Target`
        records (shape, modes, providers, the issue's wording, a check); run by ``apt bench --targets``."""
        return []


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cases() -> dict[str, BenchCase]:
    from .attention import AttentionCase
    from .router import RouterCase
    from .scan import ScanCase

    return {"attention": AttentionCase(), "router": RouterCase(), "scan": ScanCase()}


CASES: dict[str, BenchCase] = {}


def get_case(kind: str) -> BenchCase:
    if not CASES:
        CASES.update(_cases())
    if kind not in CASES:
        raise KeyError(f"kind: no benchmark case for {kind!r}; known: {', '.join(sorted(CASES))}")
    return CASES[kind]


def all_cases() -> dict[str, BenchCase]:
    get_case("attention")
    return dict(CASES)
