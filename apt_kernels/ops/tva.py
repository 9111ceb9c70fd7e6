"""``tva_attention``: fused TVA attention (TVA.md kernel contract), dispatching to the best implementation.

Implementations (``impl``): ``reference`` (dense PyTorch, apt_kernels/reference/tva.py), ``cpu_native`` (C++/OpenMP,
csrc/tva/tva_cpu.cpp), ``triton`` (apt_kernels/triton/tva.py), ``cuda`` (csrc/tva/tva_cuda.cu). ``auto`` takes, for
CUDA tensors, cuda then triton; for CPU tensors, cpu_native; the reference otherwise. The fused implementations never
build the (T, T) score matrix: online softmax over key blocks forward, blockwise recomputation from the saved
log-sum-exp backward.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .. import backends
from .._native import native_module
from ..reference.tva import Coef, check_tva_inputs, tva_attention_ref

logger = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cpu_native", "triton", "cuda")

__all__ = ["tva_attention", "impl_status", "resolve_impl", "IMPLS", "tva_attention_ref"]

# dtypes the fused kernels take (the reference also takes float64)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def impl_status(impl: str, device: Optional[torch.device] = None, head_dim: Optional[int] = None,
                dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """(usable, reason) for an implementation, optionally for inputs on ``device`` with ``head_dim``/``dtype``."""
    if impl == "reference":
        return True, ""
    if impl not in IMPLS or impl == "auto":
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if dtype is not None and dtype not in FUSED_DTYPES:
        return False, f"the {impl} kernels take float32/float16/bfloat16, got {dtype}"
    if impl == "cpu_native":
        ok, why = backends.native_family_status("tva")
        if ok and device is not None and device.type != "cpu":
            return False, f"cpu_native runs on CPU tensors, got device {device}"
        if ok and head_dim is not None and head_dim > 256:
            return False, f"cpu_native takes head dims <= 256, got {head_dim}"
        return ok, why
    if impl == "cuda":
        ok, why = backends.native_cuda_status()
        if ok:
            ok, why = backends.native_family_status("tva")
        if ok and not hasattr(native_module(), "tva_forward_cuda"):
            ok, why = False, "apt_kernels._C was built without the TVA CUDA kernels"
        if ok and device is not None and device.type != "cuda":
            return False, f"the cuda kernels need CUDA tensors, got device {device}"
        if ok and head_dim is not None and head_dim not in (32, 64, 128):
            return False, f"the cuda kernels take head dims 32, 64, 128, got {head_dim}"
        return ok, why
    # triton
    ok, why = backends.triton_status()
    if ok and device is not None and device.type != "cuda" and not backends.triton_interpret():
        return False, f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
    if ok and head_dim is not None and head_dim > 128:
        return False, f"the triton kernel takes head dims <= 128, got {head_dim}"
    if ok and dtype == torch.bfloat16 and backends.triton_interpret() and (device is None or device.type == "cpu"):
        return False, "the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 tl.dot wrongly"
    return ok, why


def resolve_impl(impl: str, device: torch.device, head_dim: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> str:
    """The concrete implementation for ``impl``; raises RuntimeError when an explicit one cannot take the inputs."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        ok, why = impl_status(impl, device, head_dim, dtype)
        if not ok:
            raise RuntimeError(f"tva impl {impl!r} is unavailable: {why}")
        return impl
    order = ("cpu_native",) if device.type == "cpu" else ("cuda", "triton")
    for cand in order:
        if impl_status(cand, device, head_dim, dtype)[0]:
            return cand
    return "reference"


def _impl_fn(impl: str) -> Callable[..., torch.Tensor]:
    if impl == "reference":
        return tva_attention_ref
    if impl == "triton":
        from ..triton.tva import tva_attention_triton

        return tva_attention_triton
    if impl == "cpu_native":
        from .tva_native import tva_attention_cpu

        return tva_attention_cpu
    from .tva_native import tva_attention_cuda

    return tva_attention_cuda


def tva_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                  gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                  window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                  softmax_scale: Optional[float] = None, impl: str = "auto") -> torch.Tensor:
    """TVA attention ``o = softmax(q kᵀ·scale + mask) v + coef · gate[..., None] · delta``.

    q (B, H, Tq, D); k, v (B, H, Tk, D) with Tq <= Tk (queries are the last Tq positions); delta (B, H, Tq, D);
    gate (B, Tq, H); coef float or 0-dim tensor; key_padding_mask (B, Tk) bool, True = padded. Rows with no visible
    key give zero attention. Differentiable in q, k, v, delta, gate and coef (tensor).
    """
    check_tva_inputs(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale)
    chosen = resolve_impl(impl, q.device, q.shape[-1], q.dtype)
    return _impl_fn(chosen)(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale)
