"""Providers of kind "attention": TVA attention cores (TVA.md kernel contract) and the TVAAttention layer built on them.

tva_default (dense PyTorch reference, any device/dtype), sdpa (torch scaled_dot_product_attention core, perturbation
added outside), flash_v2 (flash-attn core without padding mask or sinks, perturbation added outside), tva_cpu
(C++/OpenMP fused kernel), tva_triton (fused Triton kernel), tva_cuda (fused CUDA kernel). Every provider has
``forward(q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0, key_padding_mask=None,
softmax_scale=None) -> o``, ``supports(**inputs) -> list[str]`` and ``create_layer(d_model, num_heads, **cfg)``.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

from apt.core.registry import Provider

_ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FUSED = (torch.float32, torch.float16, torch.bfloat16)


class _AttentionProvider(Provider):
    kind = "attention"
    version = "0.1.0"
    device_types: Optional[tuple[str, ...]] = None  # None = any device
    dtypes: tuple = _ALL_FLOATS
    head_dims: Optional[tuple[int, ...]] = None  # None = any up to max_head_dim
    max_head_dim = 256

    def supports(self, **inputs: Any) -> list[str]:
        reasons = []
        for name in ("q", "k", "v", "delta", "gate", "key_padding_mask"):
            t = inputs.get(name)
            if not isinstance(t, torch.Tensor):
                continue
            if self.device_types is not None and t.device.type not in self.device_types:
                reasons.append(f"{name}: {t.device.type} tensor, {self.name} needs {'/'.join(self.device_types)}")
            if name in ("q", "k", "v", "delta") and t.dtype not in self.dtypes:
                reasons.append(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported by {self.name}")
        q = inputs.get("q")
        if isinstance(q, torch.Tensor) and q.dim() == 4:
            d = q.shape[-1]
            if d > self.max_head_dim or (self.head_dims is not None and d not in self.head_dims):
                allowed = self.head_dims or f"<= {self.max_head_dim}"
                reasons.append(f"q: head dim {d} is not supported by {self.name} (supports {allowed})")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                gate: Optional[torch.Tensor] = None, coef: Any = 0.0, causal: bool = True,
                window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                softmax_scale: Optional[float] = None) -> torch.Tensor:
        raise NotImplementedError

    def create_layer(self, d_model: int, num_heads: int, *, dropout: float = 0.0, **cfg: Any) -> torch.nn.Module:
        """A TVAAttention layer whose attention core is this provider's ``forward``. Keys: TVAAttention's (r, s,
        tau, alpha, window, causal, dropout: on the layer's output); ``core`` is refused."""
        from apt.modeling.compose import core_layer  # what the model builder gives a provider with a core only

        return core_layer(self.forward)(d_model, num_heads, dropout=dropout, **cfg)


class TVADefault(_AttentionProvider):
    """Dense PyTorch reference: masked softmax attention plus the gated perturbation; any device and dtype."""

    name = "tva_default"
    is_default = True
    priority = 0
    description = "TVA attention, dense PyTorch reference (fp32 softmax, autograd backward)"

    def forward(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                key_padding_mask=None, softmax_scale=None):
        from apt_kernels.reference.tva import tva_attention_ref

        return tva_attention_ref(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask,
                                 softmax_scale)


class SDPA(_AttentionProvider):
    """torch's scaled_dot_product_attention as the core (explicit boolean mask for window/sinks/padding)."""

    name = "sdpa"
    priority = 5
    description = "torch scaled_dot_product_attention core, TVA perturbation added outside"

    def forward(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                key_padding_mask=None, softmax_scale=None):
        from apt_kernels.reference.tva import (check_tva_inputs, kv_groups, kv_head_views, perturbation, repeat_kv,
                                               tva_visible_mask)

        a = check_tva_inputs(q, *kv_head_views(q, k, v), delta, gate, coef, causal, window, sinks, key_padding_mask,
                             softmax_scale)
        simple = window is None and key_padding_mask is None and (not causal or a.Tq == a.Tk)
        if simple:
            # grouped-query k/v go in as they are: SDPA reads each group's head itself (no copy of a KV cache)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=a.scale,
                                                                 enable_gqa=kv_groups(q, k, v) > 1)
        else:
            k, v = repeat_kv(q, k, v)  # masked: SDPA's memory-efficient backend (the one taking a mask) has no GQA
            vis = tva_visible_mask(a.Tq, a.Tk, causal, a.window, a.sinks, key_padding_mask, q.device)
            row_any = vis.any(dim=-1, keepdim=True)
            # rows with no visible key: let SDPA see every key (finite), then zero them, as the contract says
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=vis | ~row_any, scale=a.scale)
            o = o * row_any.to(o.dtype)
        if delta is not None:
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            o = (o.to(acc) + perturbation(delta, gate, coef, acc)).to(q.dtype)
        return o


class FlashV2(_AttentionProvider):
    """flash-attn 2 (CUDA, fp16/bf16) as the core, for inputs without a padding mask or sinks; the TVA perturbation
    is added outside, as in ``sdpa``."""

    name = "flash_v2"
    priority = 25
    device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    description = "flash-attn 2 core (causal/windowed, no padding mask or sinks), TVA perturbation added outside"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("flash_attn") is None:
            return False, "flash-attn is not installed"
        if not torch.cuda.is_available():
            return False, "torch reports no CUDA device"
        return True, ""

    def supports(self, **inputs: Any) -> list[str]:
        reasons = super().supports(**inputs)
        if inputs.get("key_padding_mask") is not None:
            reasons.append("key_padding_mask: flash_v2 (dense API) takes no key padding mask")
        if inputs.get("window") is not None and inputs.get("sinks", 0):
            reasons.append("sinks: flash_v2 has no attention sinks")
        if inputs.get("window") is not None and not inputs.get("causal", True):
            reasons.append("window: flash_v2 here only takes causal sliding windows")
        return reasons

    def forward(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                key_padding_mask=None, softmax_scale=None):
        from apt_kernels.reference.tva import check_tva_inputs, kv_head_views, perturbation

        # flash-attn reads grouped-query k/v heads itself (no copy)
        a = check_tva_inputs(q, *kv_head_views(q, k, v), delta, gate, coef, causal, window, sinks, key_padding_mask,
                             softmax_scale)
        not_ok = self.supports(q=q, k=k, v=v, key_padding_mask=key_padding_mask, window=window, sinks=sinks,
                               causal=causal)
        if not_ok:
            raise ValueError("flash_v2 cannot take these inputs: " + "; ".join(not_ok))
        from flash_attn import flash_attn_func

        win = (-1, -1) if window is None else (window - 1, 0)
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=a.scale,
                            causal=causal, window_size=win).transpose(1, 2)
        if delta is not None:
            o = (o.float() + perturbation(delta, gate, coef, torch.float32)).to(q.dtype)
        return o


class _FusedProvider(_AttentionProvider):
    impl = ""
    dtypes = _FUSED

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from apt_kernels.ops.tva import impl_status

        return impl_status(cls.impl)

    def supports(self, **inputs: Any) -> list[str]:
        reasons = super().supports(**inputs)
        q = inputs.get("q")
        if isinstance(q, torch.Tensor) and q.dim() == 4:
            from apt_kernels.ops.tva import impl_status

            ok, why = impl_status(self.impl, q.device, q.shape[-1], q.dtype)
            if not ok and why not in " ".join(reasons):
                reasons.append(f"q: {why}")
        return reasons

    def forward(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                key_padding_mask=None, softmax_scale=None):
        from apt_kernels.ops.tva import tva_attention

        return tva_attention(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale,
                             impl=self.impl)


class TVACpu(_FusedProvider):
    """Fused C++/OpenMP kernel on CPU tensors (online softmax, no T×T matrix)."""

    name = "tva_cpu"
    impl = "cpu_native"
    priority = 10
    device_types = ("cpu",)
    description = "TVA attention, fused C++/OpenMP CPU kernel (forward + backward from saved LSE)"


class TVATriton(_FusedProvider):
    """Fused Triton kernel (FlashAttention-style forward and backward)."""

    name = "tva_triton"
    impl = "triton"
    priority = 20
    max_head_dim = 128
    description = "TVA attention, fused Triton kernel (online softmax, perturbation in the epilogue)"


class TVACuda(_FusedProvider):
    """Fused CUDA kernel (FlashAttention-2 style tiles in shared memory)."""

    name = "tva_cuda"
    impl = "cuda"
    priority = 30
    device_types = ("cuda",)
    head_dims = (32, 64, 128)
    description = "TVA attention, fused CUDA kernel (FlashAttention-2 style, fp32 accumulation)"


PROVIDERS = [TVADefault, SDPA, FlashV2, TVACpu, TVATriton, TVACuda]
