"""Router providers (kind "router"): MoE top-k routing, dispatch and combine with expert capacity.

All four share one interface and differ only in the apt_kernels implementation they call:
``topk_default`` (pure PyTorch reference, always available), ``cpu_native`` (C++/OpenMP), ``triton``, ``cuda``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from apt.core.registry import Provider

__all__ = ["PROVIDERS", "TopKDefaultRouter", "CpuNativeRouter", "TritonRouter", "CudaRouter"]


class _RouterBase(Provider):
    kind = "router"
    impl = "reference"
    # dtypes this implementation takes for x / expert_out
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    devices: tuple[str, ...] = ("cpu", "cuda")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from apt_kernels.ops.moe import impl_status

        return impl_status(cls.impl)

    def supports(self, **inputs: Any) -> list[str]:
        """Reasons this provider cannot take these inputs (tensors under any name, or device= / dtype= / k= /
        num_experts=)."""
        from apt_kernels.ops.moe import impl_status

        reasons: list[str] = []
        devices, dtypes = set(), set()
        for name, v in inputs.items():
            if isinstance(v, torch.Tensor):
                devices.add(v.device)
                if v.is_floating_point():
                    dtypes.add((name, v.dtype))
        if "device" in inputs and inputs["device"] is not None:
            devices.add(torch.device(inputs["device"]))
        if "dtype" in inputs and inputs["dtype"] is not None:
            dtypes.add(("dtype", inputs["dtype"]))
        for d in sorted(devices, key=str):
            if d.type not in self.devices:
                reasons.append(f"{self.name}: device {d} not supported (takes {', '.join(self.devices)})")
            else:
                ok, why = impl_status(self.impl, d)
                if not ok:
                    reasons.append(f"{self.name}: {why}")
        for name, dt in sorted(dtypes, key=str):
            if dt not in self.dtypes:
                reasons.append(f"{self.name}: {name} dtype {str(dt).replace('torch.', '')} not supported")
        k, e = inputs.get("k"), inputs.get("num_experts")
        if isinstance(k, int) and isinstance(e, int) and not 1 <= k <= e:
            reasons.append(f"{self.name}: k={k} must be in [1, num_experts={e}]")
        return reasons

    def route(self, logits: torch.Tensor, k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
              renormalize: Optional[bool] = None):
        from apt_kernels.ops.moe import moe_route

        return moe_route(logits, k, capacity_factor, min_capacity, renormalize, impl=self.impl)

    def dispatch(self, x: torch.Tensor, routing) -> torch.Tensor:
        from apt_kernels.ops.moe import moe_dispatch

        return moe_dispatch(x, routing, impl=self.impl)

    def combine(self, expert_out: torch.Tensor, routing) -> torch.Tensor:
        from apt_kernels.ops.moe import moe_combine

        return moe_combine(expert_out, routing, impl=self.impl)

    def aux_losses(self, logits: torch.Tensor, routing) -> dict[str, torch.Tensor]:
        from apt_kernels.ops.moe import moe_aux_losses

        return moe_aux_losses(logits, routing)

    def create_layer(self, d_model: int, d_ff: int, num_experts: int, k: int = 2, **cfg: Any):
        """An ``apt_kernels.layers.moe.MoEFFN`` routed by this provider; ``cfg`` = MoEFFN's keyword arguments."""
        from apt_kernels.layers.moe import MoEFFN

        if "router_impl" in cfg:
            raise ValueError("router_impl: create_layer sets it to this provider; do not pass it")
        return MoEFFN(d_model, d_ff, num_experts, k=k, router_impl=self, **cfg)


class TopKDefaultRouter(_RouterBase):
    """Pure-PyTorch top-k router with GShard-priority capacity (the reference; always available)."""

    name = "topk_default"
    is_default = True
    priority = 0
    impl = "reference"
    description = "MoE top-k routing/dispatch/combine, pure PyTorch reference"


class CpuNativeRouter(_RouterBase):
    """C++/OpenMP routing, dispatch and combine for CPU tensors."""

    name = "cpu_native"
    priority = 10
    impl = "cpu_native"
    devices = ("cpu",)
    description = "MoE routing/dispatch/combine, C++ OpenMP kernels (CPU)"


class TritonRouter(_RouterBase):
    """Triton routing positions, dispatch and combine (CUDA, or CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    priority = 20
    impl = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    description = "MoE routing/dispatch/combine, Triton kernels"


class CudaRouter(_RouterBase):
    """CUDA routing, dispatch and combine kernels from apt_kernels._C."""

    name = "cuda"
    priority = 30
    impl = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    description = "MoE routing/dispatch/combine, CUDA kernels"


PROVIDERS = [TopKDefaultRouter, CpuNativeRouter, TritonRouter, CudaRouter]
