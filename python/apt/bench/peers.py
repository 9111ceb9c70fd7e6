"""Outside implementations ("peers") timed next to our providers when they are installed: torch SDPA and
flash-attn for attention, mamba_ssm's selective scan, vLLM's fused_moe and MegaBlocks' dMoE for the router.

A peer looks like a provider to the cases (same method names: ``forward``, ``selective_scan_fn``, or ``moe_full``
for whole-MoE peers) plus ``available(device) -> (ok, reason)`` and ``supports(**inputs) -> reasons``. Peers that
compute the same function as our reference (SDPA, flash-attn, mamba_ssm) are correctness-checked like providers;
the MoE peers compute a different function (dropless routing, SwiGLU experts, their own weight layout) and are
timed only, reported as ``unchecked`` with that note.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _find(module: str) -> tuple[bool, str]:
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return False, f"{top} is not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken optional install reads as unavailable
        return False, f"{module} failed to import ({type(exc).__name__}: {exc})"
    return True, ""


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(pkg)
    except Exception:
        return None


class Peer:
    kind = ""
    name = ""
    module = ""
    package = ""
    checked = True
    note = ""
    cuda_only = True

    def available(self, device: torch.device) -> tuple[bool, str]:
        if self.cuda_only and device.type != "cuda":
            return False, f"{self.name} runs on CUDA only"
        return _find(self.module)

    def version(self) -> Optional[str]:
        return _version(self.package) if self.package else None

    def supports(self, **inputs: Any) -> list[str]:
        return []


class TorchSDPA(Peer):
    """torch.nn.functional.scaled_dot_product_attention; on CUDA with fp16/bf16 pinned to the flash backend."""

    kind, name, module, package, cuda_only = "attention", "torch_sdpa", "torch", "torch", False

    def supports(self, **inputs: Any) -> list[str]:
        if inputs.get("delta") is not None:
            return ["plain attention only (no TVA delta/gate term)"]
        return []

    def forward(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, **_: Any):
        gqa = k.shape[1] != q.shape[1]  # fewer k/v heads: SDPA reads them per group itself (torch >= 2.5)
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            except RuntimeError:
                if not gqa:
                    raise
                # a torch whose flash backend takes no GQA: let SDPA choose (never seen, the GPU runs decide)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


class FlashAttn(Peer):
    """flash_attn.flash_attn_func (layout (B, T, H, D); fp16/bf16, CUDA)."""

    kind, name, module, package = "attention", "flash_attn", "flash_attn", "flash-attn"

    def supports(self, **inputs: Any) -> list[str]:
        why = []
        if inputs.get("delta") is not None:
            why.append("plain attention only (no TVA delta/gate term)")
        q = inputs.get("q")
        if q is not None and q.dtype not in (torch.float16, torch.bfloat16):
            why.append(f"flash_attn needs fp16/bf16, got {q.dtype}")
        return why

    def forward(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, **_: Any):
        from flash_attn import flash_attn_func

        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return o.transpose(1, 2)


class MambaSSM(Peer):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn (the CUDA kernel of the Mamba authors)."""

    kind, name, module, package = "scan", "mamba_ssm", "mamba_ssm.ops.selective_scan_interface", "mamba-ssm"

    def selective_scan_fn(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                 return_last_state=return_last_state)


class VLLMFusedMoE(Peer):
    """vLLM's fused_moe: softmax top-k routing, dropless, SwiGLU experts, fused Triton grouped GEMMs."""

    kind, name, module, package = "router", "vllm_fused_moe", "vllm.model_executor.layers.fused_moe", "vllm"
    checked = False
    note = "different function (dropless routing, SwiGLU experts): timed, not checked against the reference"

    def moe_full(self, x: torch.Tensor, logits: torch.Tensor, k: int, ffn_hidden: int):
        from vllm.model_executor.layers.fused_moe import fused_moe

        E, C = logits.shape[1], x.shape[1]
        key = (E, C, ffn_hidden, x.dtype, x.device)
        if getattr(self, "_key", None) != key:  # weights built once per shape, outside the timing
            self._w1 = torch.randn(E, 2 * ffn_hidden, C, device=x.device, dtype=x.dtype) / C ** 0.5
            self._w2 = torch.randn(E, C, ffn_hidden, device=x.device, dtype=x.dtype) / ffn_hidden ** 0.5
            self._key = key
        return fused_moe(x, self._w1, self._w2, logits.to(x.dtype), k, True)


class MegaBlocksDMoE(Peer):
    """MegaBlocks' dMoE layer (dropless, block-sparse grouped GEMMs), built once per shape."""

    kind, name, module, package = "router", "megablocks_dmoe", "megablocks.layers.dmoe", "megablocks"
    checked = False
    note = "different function (dropless, its own router and GELU MLP): timed, not checked against the reference"

    def moe_full(self, x: torch.Tensor, logits: torch.Tensor, k: int, ffn_hidden: int):
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        E, C = logits.shape[1], x.shape[1]
        key = (E, C, ffn_hidden, k, x.dtype, x.device)
        if getattr(self, "_key", None) != key:
            args = Arguments(hidden_size=C, ffn_hidden_size=ffn_hidden, moe_num_experts=E, moe_top_k=k,
                             bf16=x.dtype == torch.bfloat16, fp16=x.dtype == torch.float16,
                             device=x.device)
            self._layer = dMoE(args).to(device=x.device, dtype=x.dtype)
            self._key = key
        with torch.no_grad():
            out = self._layer(x.unsqueeze(1))
        return out[0] if isinstance(out, tuple) else out


PEERS: list[Peer] = [TorchSDPA(), FlashAttn(), MambaSSM(), VLLMFusedMoE(), MegaBlocksDMoE()]


def peers_for(kind: str) -> list[Peer]:
    return [p for p in PEERS if p.kind == kind]


def peer_status(device: torch.device | str) -> list[dict[str, Any]]:
    """Every peer with whether it can run here and why not (for the report)."""
    device = torch.device(device)
    out = []
    for p in PEERS:
        ok, why = p.available(device)
        out.append({"kind": p.kind, "name": p.name, "available": ok, "reason": why,
                    "version": p.version() if ok else None})
    return out
