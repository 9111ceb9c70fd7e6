"""Attention benchmark: TVA attention (delta, gate, coef) and plain causal attention, forward and forward+backward.

FLOPs follow FlashAttention's benchmark convention: forward = 4·B·H·T²·D (two matmuls), halved for causal masks;
backward = 2.5 × forward; the TVA epilogue adds 3·B·H·T·D (gate·delta·coef + add), negligible but counted.
Grids (B·T kept at 16K tokens on GPU so every T costs about the same memory; hidden size H·D = 2048):
  GPU full : T ∈ {512, 1K, 2K, 4K, 8K, 16K} × D ∈ {64, 128}, B = 16384 / T, H = 2048 / D
  GPU quick: T ∈ {1K, 4K} × D ∈ {64, 128}, same B, H rule
  CPU full : T ∈ {128, 256, 512, 1024}, B = 1, H = 4, D = 64
  CPU quick: T ∈ {128, 512}, B = 1, H = 2, D = 64
Mode "gqa decode": one decode step of grouped-query attention, the query of the last position over a T-key cache
with Hkv = max(1, H // 4) key/value heads (GPU: 8 for D 64, 4 for D 128; CPU: 1, multi-query), no TVA term and
causal=False (one query sees every cached key; SDPA's is_causal would align it top-left). Memory-bound: GB/s over
the K/V cache read plus q read and o written, 2·B·Hkv·T·D + 2·B·H·D elements.
Targets (issue #5, set "on an H100", measured on any CUDA device, ``apt bench --targets``): tva_triton and tva_cuda
"tva fwd+bwd" within 1.15× the time of torch SDPA's flash backend ("causal fwd+bwd") at T 4K, 8K × D 64, 128 (the GPU
grid's B, H rule), and ≥ 5× faster than the reference (tva_default) at T 8K.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..targets import Target, speedup, time_within
from . import BenchCase, dtype_size

_TVA_COEF = 0.05
_ISSUE = 5
_SDPA_QUOTE = ("Targets on an H100: fused TVA fwd+bwd within 1.15× the time of SDPA-flash for plain causal attention "
               "of the same shape (the perturbation nearly free)")
_REF_QUOTE = "Targets on an H100: [fused TVA fwd+bwd] ≥ 5× faster than the reference at T=8K"


def kv_heads(H: int) -> int:
    """Key/value heads of the "gqa decode" mode: a quarter of the query heads (GQA as in Llama-2/3 70B), one if
    there are fewer than four or four does not divide them."""
    return H // 4 if H >= 4 and H % 4 == 0 else 1


class AttentionCase(BenchCase):
    kind = "attention"
    family = "attention"
    ratio_to = ("torch_sdpa", "flash_attn")
    modes = ("tva fwd", "tva fwd+bwd", "causal fwd", "causal fwd+bwd", "gqa decode")

    def grid(self, device: torch.device, quick: bool) -> list[dict[str, Any]]:
        if torch.device(device).type == "cuda":
            ts = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
            return [dict(B=max(1, 16384 // t), H=2048 // d, T=t, D=d) for d in (64, 128) for t in ts]
        if quick:
            return [dict(B=1, H=2, T=t, D=64) for t in (128, 512)]
        return [dict(B=1, H=4, T=t, D=64) for t in (128, 256, 512, 1024)]

    def grid_doc(self, device: torch.device, quick: bool) -> str:
        if torch.device(device).type == "cuda":
            return ("T in {1K, 4K}" if quick else "T in 512..16K (powers of 2)") + \
                " x D in {64, 128}; B = 16384 / T, H = 2048 / D; causal"
        return ("T in {128, 512}, B=1, H=2, D=64" if quick else "T in {128, 256, 512, 1024}, B=1, H=4, D=64") + \
            "; causal"

    def x_axis(self, shape: dict[str, Any]) -> tuple[str, float]:
        return "T", shape["T"]

    def series(self, shape: dict[str, Any]) -> str:
        # B and H follow from T and D on the GPU grid (B·T and H·D fixed): one line per head size
        return f"D={shape['D']}"

    def make_inputs(self, shape: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> dict[str, Any]:
        g = torch.Generator(device="cpu").manual_seed(seed)
        B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]

        def rnd(*s: int) -> torch.Tensor:
            return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

        hkv = kv_heads(H)
        return {"q": rnd(B, H, T, D), "k": rnd(B, H, T, D), "v": rnd(B, H, T, D), "delta": rnd(B, H, T, D),
                "gate": torch.sigmoid(rnd(B, T, H).float()).to(dtype), "coef": _TVA_COEF, "grad": rnd(B, H, T, D),
                "q_decode": rnd(B, H, 1, D), "k_cache": rnd(B, hkv, T, D), "v_cache": rnd(B, hkv, T, D)}

    @staticmethod
    def _args(inputs: dict[str, Any], mode: str) -> dict[str, Any]:
        if mode == "gqa decode":
            return {"q": inputs["q_decode"], "k": inputs["k_cache"], "v": inputs["v_cache"], "causal": False}
        args = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "causal": True}
        if mode.startswith("tva"):
            args.update(delta=inputs["delta"], gate=inputs["gate"], coef=inputs["coef"])
        return args

    def unsupported(self, provider: Any, inputs: dict[str, Any], mode: str) -> list[str]:
        if not callable(getattr(provider, "forward", None)):
            return ["no forward() method"]
        return list(provider.supports(**self._args(inputs, mode)))

    def _leaves(self, inputs: dict[str, Any], mode: str) -> dict[str, Any]:
        args = self._args(inputs, mode)
        for name in ("q", "k", "v", "delta", "gate"):
            if name in args:
                args[name] = args[name].detach().clone().requires_grad_(True)
        return args

    def build(self, provider: Any, inputs: dict[str, Any], mode: str) -> Callable[[], Any]:
        if not mode.endswith("bwd"):
            args = self._args(inputs, mode)

            def fwd() -> Any:
                with torch.no_grad():
                    return provider.forward(**args)
            return fwd
        args = self._leaves(inputs, mode)
        grad = inputs["grad"]
        leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]

        def fwd_bwd() -> Any:
            for t in leaves:
                t.grad = None
            o = provider.forward(**args)
            o.backward(grad)
            return o
        fwd_bwd.reset = lambda: [setattr(t, "grad", None) for t in leaves]  # type: ignore[attr-defined]
        return fwd_bwd

    def outputs(self, provider: Any, inputs: dict[str, Any], mode: str) -> dict[str, torch.Tensor]:
        if not mode.endswith("bwd"):
            with torch.no_grad():
                return {"o": provider.forward(**self._args(inputs, mode))}
        args = self._leaves(inputs, mode)
        o = provider.forward(**args)
        o.backward(inputs["grad"])
        out = {"o": o.detach()}
        for name in ("q", "k", "v", "delta", "gate"):
            if name in args:
                out[f"grad_{name}"] = args[name].grad
        return out

    def work(self, shape: dict[str, Any], mode: str, dtype: torch.dtype) -> dict[str, float]:
        B, H, T, D = shape["B"], shape["H"], shape["T"], shape["D"]
        if mode == "gqa decode":
            elems = 2.0 * B * kv_heads(H) * T * D + 2.0 * B * H * D
            return {"flops": 4.0 * B * H * T * D, "bytes": elems * dtype_size(dtype), "tokens": float(B)}
        fwd = 4.0 * B * H * T * T * D / 2.0  # causal: half of the score matrix
        if mode.startswith("tva"):
            fwd += 3.0 * B * H * T * D
        flops = fwd * (3.5 if mode.endswith("bwd") else 1.0)
        return {"flops": flops, "tokens": float(B * T)}

    def metric(self, mode: str) -> str:
        return "GB/s" if mode == "gqa decode" else "TFLOP/s"

    def reference_peer(self) -> Optional[str]:
        return "torch_sdpa"

    def targets(self) -> list[Target]:
        out = []
        for d in (64, 128):
            for t in (4096, 8192):
                shape = dict(B=16384 // t, H=2048 // d, T=t, D=d)
                for p in ("tva_triton", "tva_cuda"):
                    out.append(Target(f"attention.cuda.{p}.vs_sdpa.T{t}_D{d}", self.kind, "cuda", _ISSUE, _SDPA_QUOTE,
                                      f"{p} tva fwd+bwd vs torch_sdpa (flash) causal fwd+bwd", shape,
                                      ("tva fwd+bwd", "causal fwd+bwd"), (p, "torch_sdpa"),
                                      time_within((p,), "tva fwd+bwd", "torch_sdpa", "causal fwd+bwd", at_most=1.15)))
                    if t == 8192:
                        out.append(Target(f"attention.cuda.{p}.vs_reference.T{t}_D{d}", self.kind, "cuda", _ISSUE,
                                          _REF_QUOTE, f"{p} vs the reference, tva fwd+bwd", shape, ("tva fwd+bwd",),
                                          (p,), speedup((p,), "tva fwd+bwd", at_least=5)))
        return out
