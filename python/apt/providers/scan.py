"""Providers of kind "scan": the Mamba selective scan (forward, backward) and its one-step decode update.

reference (default, pure PyTorch, any device), cpu_native (C++/OpenMP, CPU tensors), triton (CUDA tensors, or CPU
under TRITON_INTERPRET=1) and cuda (native CUDA kernels). All share mamba_ssm's signatures, so a Mamba model can
swap them in by name.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from apt.core.registry import Provider

_SCAN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensors(inputs: dict[str, Any]):
    return [(k, v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]


class _ScanProvider(Provider):
    kind = "scan"
    version = "0.1.0"
    # the device type this provider runs on ("cpu", "cuda"), None = any
    device_type: Optional[str] = None
    dtypes: tuple = _SCAN_DTYPES

    def supports(self, **inputs: Any) -> list[str]:
        reasons = []
        for name, t in _tensors(inputs):
            if self.device_type is not None and t.device.type != self.device_type:
                reasons.append(f"{name}: {t.device.type} tensor, the {self.name} provider needs {self.device_type} "
                               f"tensors")
            if t.is_floating_point() and t.dtype not in self.dtypes:
                reasons.append(f"{name}: dtype {t.dtype} is not supported by the {self.name} provider")
        return reasons

    # implemented by subclasses through _impl(): (selective_scan_fn, selective_state_update)
    def _impl(self):
        raise NotImplementedError

    def selective_scan_fn(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        return self._impl()[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    def selective_state_update(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        return self._impl()[1](state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


class ReferenceScan(_ScanProvider):
    """Pure-PyTorch sequential scan (autograd backward); any device, any float dtype."""

    name = "reference"
    is_default = True
    priority = 0
    description = "Mamba selective scan, pure-PyTorch sequential loop (autograd backward)"

    def _impl(self):
        from apt_kernels.reference.scan import selective_scan_ref, selective_state_update_ref

        return selective_scan_ref, selective_state_update_ref


class CpuNativeScan(_ScanProvider):
    """C++/OpenMP kernels (csrc/scan/scan_cpu.cpp): forward, checkpointed backward, decode step; CPU tensors."""

    name = "cpu_native"
    priority = 10
    device_type = "cpu"
    description = "Mamba selective scan, C++/OpenMP CPU kernels (fwd, bwd, decode step)"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from apt_kernels.ops.scan import cpu_status

        return cpu_status()

    def _impl(self):
        from apt_kernels.ops.scan import selective_scan_cpu, selective_state_update_cpu

        return selective_scan_cpu, selective_state_update_cpu


class TritonScan(_ScanProvider):
    """Triton kernels (apt_kernels/triton/scan.py): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    priority = 20
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    description = "Mamba selective scan, Triton kernels (fwd, bwd, decode step)"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from apt_kernels.backends import triton_status

        return triton_status()

    def supports(self, **inputs: Any) -> list[str]:
        # CPU tensors run only in the (slow, test-only) interpreter: say so, so that select() prefers cpu_native.
        reasons = super().supports(**inputs)
        return reasons + [f"{k}: {t.device.type} tensor, the triton provider needs CUDA tensors (CPU ones run only "
                          f"under TRITON_INTERPRET=1, for tests)"
                          for k, t in _tensors(inputs) if t.device.type != "cuda"]

    def _impl(self):
        from apt_kernels.ops.scan import selective_scan_triton, selective_state_update_triton

        return selective_scan_triton, selective_state_update_triton


class CudaScan(_ScanProvider):
    """Native CUDA kernels (csrc/scan/scan_cuda_*.cu): forward split over L when batch x dim is small, checkpointed
    backward, decode step; CUDA tensors, fp32/fp16/bf16 with fp32 accumulation, N <= 128."""

    name = "cuda"
    priority = 30
    device_type = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    description = "Mamba selective scan, native CUDA kernels (fwd, bwd, decode step)"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from apt_kernels.ops.scan import cuda_status

        return cuda_status()

    def supports(self, **inputs: Any) -> list[str]:
        from apt_kernels.ops.scan import CUDA_MAX_N

        reasons = super().supports(**inputs)
        A = inputs.get("A")
        if isinstance(A, torch.Tensor) and A.dim() == 2 and A.shape[1] > CUDA_MAX_N:
            reasons.append(f"A: N={A.shape[1]} states, the cuda provider takes at most {CUDA_MAX_N}")
        return reasons

    def _impl(self):
        from apt_kernels.ops.scan import selective_scan_cuda, selective_state_update_cuda

        return selective_scan_cuda, selective_state_update_cuda


PROVIDERS = [ReferenceScan, CpuNativeScan, TritonScan, CudaScan]
