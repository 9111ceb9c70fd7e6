"""MoE router benchmark: top-k routing with expert capacity (capacity_factor 1.25, min_capacity 4), dispatch into
the (E, cap, C) buffer, the experts as one batched GEMM, combine.

Modes:
  route+dispatch+experts+combine : the whole MoE layer from router logits to output; metric tokens/s (N / time)
  dispatch+combine               : with a precomputed routing, combine(dispatch(x)); metric GB/s over
                                   2·(N·C + E·cap·C) elements (x read, buffer written, buffer read, y written)
  experts                        : the expert GEMMs alone, bmm(E,cap,C × E,C,F) → GELU → bmm(E,cap,F × E,F,C); the same
                                   torch ops whatever the provider, so timed once ("torch.bmm"); metric TFLOP/s over
                                   4·E·cap·C·F. The report gives dispatch+combine time as a share of this time.
Router logits (N, E) are fp32 (made once, outside the timing); expert hidden size F = 2·C.
Grids:
  GPU full : N sweep {4K, 16K, 64K} at C 2048, E 8, k 2; C sweep {1024, 4096} at N 16K, E 8, k 2;
             E sweep {16, 32, 64} at N 16K, C 2048, k 2; k = 1 at N 16K, C 2048, E 64
  GPU quick: N ∈ {4K, 16K} at C 1024, E 8, k 2; k = 1 at N 16K
  CPU full : N ∈ {256, 1K, 4K} at C 128, E 8, k 2; E 32 and k 1 at N 1K
  CPU quick: N ∈ {512, 2K} at C 64, E 8, k 2; k 1 at N 2K
Targets (issue #4, ``apt bench --targets``): CPU ``cpu_native`` dispatch+combine ≥ 5× the reference at N 4K, C 1024,
E 8, k 2; GPU dispatch+combine (cuda, triton) under 10% of the expert GEMM time at N 16K, C 4096, E 8, k 2.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..targets import REFERENCE, Target, speedup, time_share
from . import BenchCase, dtype_size

CAPACITY_FACTOR = 1.25
MIN_CAPACITY = 4
FULL, DC, EXPERTS = "route+dispatch+experts+combine", "dispatch+combine", "experts"


_ISSUE = 4
_CPU_QUOTE = "CPU native dispatch+combine ≥ 5× the reference on this machine"
_GPU_QUOTE = "on a GPU, dispatch+combine under 10% of the expert GEMM time at N=16K, C=4096, E=8, k=2"


def _shape(N: int, C: int, E: int, k: int) -> dict[str, Any]:
    return dict(N=N, C=C, E=E, k=k, F=2 * C)


def capacity(shape: dict[str, Any]) -> int:
    """Slots per expert (design/MOE.md): max(min_capacity, ceil(capacity_factor · k · N / E))."""
    return max(MIN_CAPACITY, math.ceil(CAPACITY_FACTOR * shape["k"] * shape["N"] / shape["E"]))


class RouterCase(BenchCase):
    kind = "router"
    family = "moe"
    ratio_to = ("vllm_fused_moe", "megablocks_dmoe")
    modes = (FULL, DC, EXPERTS)
    provider_independent_modes = frozenset({EXPERTS})

    def grid(self, device: torch.device, quick: bool) -> list[dict[str, Any]]:
        if torch.device(device).type == "cuda":
            if quick:
                return [_shape(n, 1024, 8, 2) for n in (4096, 16384)] + [_shape(16384, 1024, 8, 1)]
            s = [_shape(n, 2048, 8, 2) for n in (4096, 16384, 65536)]
            s += [_shape(16384, c, 8, 2) for c in (1024, 4096)]
            s += [_shape(16384, 2048, e, 2) for e in (16, 32, 64)]
            s += [_shape(16384, 2048, 64, 1)]
            return s
        if quick:
            return [_shape(n, 64, 8, 2) for n in (512, 2048)] + [_shape(2048, 64, 8, 1)]
        return ([_shape(n, 128, 8, 2) for n in (256, 1024, 4096)]
                + [_shape(1024, 128, 32, 2), _shape(1024, 128, 8, 1)])

    def grid_doc(self, device: torch.device, quick: bool) -> str:
        if torch.device(device).type == "cuda":
            g = ("N in {4K, 16K} at C 1024, E 8, k 2; k 1 at N 16K" if quick else
                 "N 4K..64K at C 2048, E 8, k 2; C 1024..4096; E 8..64; k 1..2")
        else:
            g = ("N in {512, 2K} at C 64, E 8, k 2; k 1 at N 2K" if quick else
                 "N in {256, 1K, 4K} at C 128, E 8, k 2; E 32 and k 1 at N 1K")
        return g + f"; F = 2C, capacity_factor {CAPACITY_FACTOR}, min_capacity {MIN_CAPACITY}"

    def label(self, shape: dict[str, Any]) -> str:
        return f"N={shape['N']} C={shape['C']} E={shape['E']} k={shape['k']}"

    def x_axis(self, shape: dict[str, Any]) -> tuple[str, float]:
        return "N", shape["N"]

    def make_inputs(self, shape: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> dict[str, Any]:
        g = torch.Generator(device="cpu").manual_seed(seed)
        N, C, E, Fh = shape["N"], shape["C"], shape["E"], shape["F"]
        x = torch.randn(N, C, generator=g)
        w_r = torch.randn(C, E, generator=g) / math.sqrt(C)
        logits = x @ w_r  # fp32, so that no provider sees near-ties that bf16 rounding would create
        cap = capacity(shape)
        to = dict(device=device, dtype=dtype)
        return {
            "x": x.to(**to), "logits": logits.to(device=device), "k": shape["k"], "ffn_hidden": Fh,
            "w1": (torch.randn(E, C, Fh, generator=g) / math.sqrt(C)).to(**to),
            "w2": (torch.randn(E, Fh, C, generator=g) / math.sqrt(Fh)).to(**to),
            "buffer": torch.randn(E, cap, C, generator=g).to(**to),
        }

    def provider_label(self, name: str, mode: str) -> str:
        return "torch.bmm" if mode == EXPERTS else name

    def unsupported(self, provider: Any, inputs: dict[str, Any], mode: str) -> list[str]:
        if mode == EXPERTS:
            return []
        if callable(getattr(provider, "moe_full", None)):
            return [] if mode == FULL else ["a whole-MoE peer: only the full layer is timed"]
        missing = [m for m in ("route", "dispatch", "combine") if not callable(getattr(provider, m, None))]
        if missing:
            return [f"no {', '.join(missing)} method"]
        return list(provider.supports(x=inputs["x"], logits=inputs["logits"], k=inputs["k"],
                                      num_experts=inputs["logits"].shape[1], capacity_factor=CAPACITY_FACTOR))

    @staticmethod
    def _experts(buf: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return torch.bmm(F.gelu(torch.bmm(buf, inputs["w1"])), inputs["w2"])

    def _route(self, provider: Any, inputs: dict[str, Any]) -> Any:
        return provider.route(inputs["logits"], inputs["k"], capacity_factor=CAPACITY_FACTOR,
                              min_capacity=MIN_CAPACITY)

    def build(self, provider: Any, inputs: dict[str, Any], mode: str) -> Callable[[], Any]:
        x = inputs["x"]
        if mode == EXPERTS:
            buf = inputs["buffer"]

            def experts() -> Any:
                with torch.no_grad():
                    return self._experts(buf, inputs)
            return experts
        if callable(getattr(provider, "moe_full", None)):
            def peer() -> Any:
                with torch.no_grad():
                    return provider.moe_full(x, inputs["logits"], inputs["k"], inputs["ffn_hidden"])
            return peer
        if mode == FULL:
            def full() -> Any:
                with torch.no_grad():
                    r = self._route(provider, inputs)
                    return provider.combine(self._experts(provider.dispatch(x, r), inputs), r)
            return full
        with torch.no_grad():
            routing = self._route(provider, inputs)

        def dispatch_combine() -> Any:
            with torch.no_grad():
                return provider.combine(provider.dispatch(x, routing), routing)
        return dispatch_combine

    def outputs(self, provider: Any, inputs: dict[str, Any], mode: str) -> dict[str, torch.Tensor]:
        return {"y": self.build(provider, inputs, mode)()}

    def work(self, shape: dict[str, Any], mode: str, dtype: torch.dtype) -> dict[str, float]:
        N, C, E, Fh = shape["N"], shape["C"], shape["E"], shape["F"]
        cap = capacity(shape)
        flops = 4.0 * E * cap * C * Fh
        nbytes = dtype_size(dtype) * 2.0 * (N * C + E * cap * C)
        return {"tokens": float(N), "flops": flops, "bytes": nbytes}

    def metric(self, mode: str) -> str:
        return {FULL: "tokens/s", DC: "GB/s", EXPERTS: "TFLOP/s"}[mode]

    def targets(self) -> list[Target]:
        out = [Target("router.cpu.dispatch+combine", self.kind, "cpu", _ISSUE, _CPU_QUOTE,
                      f"cpu_native vs the reference, {DC}", _shape(4096, 1024, 8, 2), (DC,), ("cpu_native",),
                      speedup(("cpu_native",), DC, at_least=5))]
        for p in ("cuda", "triton"):
            out.append(Target(f"router.cuda.{p}.share_of_experts", self.kind, "cuda", _ISSUE, _GPU_QUOTE,
                              f"{p} {DC} vs the expert GEMM ({EXPERTS})", _shape(16384, 4096, 8, 2), (DC, EXPERTS),
                              (p,), time_share((p,), DC, REFERENCE, EXPERTS, under=0.10, what="the expert GEMM")))
        return out
