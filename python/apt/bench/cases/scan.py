"""Selective-scan benchmark (Mamba): input-dependent B and C (batch, N, L), z gating, D skip, delta_bias with
softplus, the usual Mamba block call. Forward and forward+backward.

Bytes (the metric is GB/s, the scan being memory-bound) count every tensor read or written once:
  forward      : u, delta, z read and y written (4·b·d·L elements of the input dtype) + B, C read (2·b·N·L)
                 + A, D, delta_bias (fp32, d·N + 2·d)
  forward+bwd  : forward + backward reading u, delta, z, dy (4·b·d·L) and B, C (2·b·N·L), writing du, ddelta, dz
                 (3·b·d·L) and dB, dC (2·b·N·L)  => 11·b·d·L + 6·b·N·L in total (+ the small fp32 parameters ×3)
Grids (N = 16, Mamba-1's state size, unless a state sweep says otherwise):
  GPU full : L sweep {256, 512, 1K, 2K, 4K, 8K} at batch 4, dim 1536; batch sweep {2, 4, 8, 16} at dim 768, L 2K;
             dim sweep {768, 1024, 1536, 2048} at batch 4, L 2K; state sweep N ∈ {32, 64, 128} (Mamba-2 sizes)
             at L {512, 2K}, batch 4, dim 1536
  GPU quick: L ∈ {256, 2K} at batch 4, dim 1536
  CPU full : L ∈ {128, 256, 512, 1024} at batch 2, dim 128; L 2K at batch 2, dim 256; N ∈ {64, 128} at
             L {256, 1024}, batch 2, dim 128
  CPU quick: L ∈ {128, 512} at batch 1, dim 64
Targets (issue #3, ``apt bench --targets``): CPU ``cpu_native`` ≥ 10× the reference at batch 2, dim 768, L 2K (fwd,
fwd+bwd); GPU fwd+bwd of the best of cuda/triton at least as fast as mamba_ssm and ≥ 60% of HBM bandwidth at batch 2,
dim 768 and batch 16, dim 2048, L 2K.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..targets import Target, bandwidth, speedup
from . import BenchCase, dtype_size

_N = 16
_N_SWEEP_GPU = (32, 64, 128)  # Mamba-2's state sizes (the CUDA kernel's limit is 128)
_N_SWEEP_CPU = (64, 128)
_ISSUE = 3
_CPU_QUOTE = "CPU native ≥ 10× faster than the reference at L=2048 on this machine"
_GPU_QUOTE = "on a GPU, forward+backward at least as fast as mamba_ssm's CUDA kernel and ≥ 60% of HBM bandwidth"
_GPU_OURS = ("cuda", "triton")


class ScanCase(BenchCase):
    kind = "scan"
    family = "scan"
    ratio_to = ("mamba_ssm",)
    modes = ("fwd", "fwd+bwd")

    def grid(self, device: torch.device, quick: bool) -> list[dict[str, Any]]:
        if torch.device(device).type == "cuda":
            if quick:
                return [dict(batch=4, dim=1536, N=_N, L=L) for L in (256, 2048)]
            shapes = [dict(batch=4, dim=1536, N=_N, L=L) for L in (256, 512, 1024, 2048, 4096, 8192)]
            shapes += [dict(batch=b, dim=768, N=_N, L=2048) for b in (2, 4, 8, 16)]
            shapes += [dict(batch=4, dim=d, N=_N, L=2048) for d in (768, 1024, 1536, 2048)]
            shapes += [dict(batch=4, dim=1536, N=n, L=L) for n in _N_SWEEP_GPU for L in (512, 2048)]
            out, seen = [], set()
            for s in shapes:
                key = tuple(s.items())
                if key not in seen:
                    seen.add(key)
                    out.append(s)
            return out
        if quick:
            return [dict(batch=1, dim=64, N=_N, L=L) for L in (128, 512)]
        # plus the L = 2K point the CPU kernel's speed target is set at (dim 256: the reference is slow on a CPU)
        return [dict(batch=2, dim=128, N=_N, L=L) for L in (128, 256, 512, 1024)] + \
            [dict(batch=2, dim=256, N=_N, L=2048)] + \
            [dict(batch=2, dim=128, N=n, L=L) for n in _N_SWEEP_CPU for L in (256, 1024)]

    def grid_doc(self, device: torch.device, quick: bool) -> str:
        if torch.device(device).type == "cuda":
            return ("L in {256, 2K} at batch 4, dim 1536; N=16" if quick else
                    "L 256..8K at batch 4, dim 1536; batch 2..16 at dim 768, L 2K; dim 768..2048 at batch 4, L 2K "
                    "(N=16); N 32, 64, 128 at L 512, 2K, batch 4, dim 1536") \
                + "; B/C input-dependent, z, D, delta_bias, softplus"
        return ("L in {128, 512} at batch 1, dim 64; N=16" if quick else
                "L in {128..1024} at batch 2, dim 128; L 2K at batch 2, dim 256 (N=16); N 64, 128 at L 256, 1K, "
                "batch 2, dim 128") + "; B/C input-dependent, z, D, delta_bias, softplus"

    def x_axis(self, shape: dict[str, Any]) -> tuple[str, float]:
        return "L", shape["L"]

    def make_inputs(self, shape: dict[str, Any], device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> dict[str, Any]:
        g = torch.Generator(device="cpu").manual_seed(seed)
        b, d, n, L = shape["batch"], shape["dim"], shape["N"], shape["L"]

        def rnd(*s: int, scale: float = 1.0) -> torch.Tensor:
            return torch.randn(*s, generator=g) * scale

        # Mamba's initialisation: A = -(1..N), dt in [1e-3, 1e-1] through softplus(delta + delta_bias)
        A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
        dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        to = dict(device=device)
        return {
            "u": rnd(b, d, L).to(dtype=dtype, **to),
            "delta": rnd(b, d, L, scale=0.5).to(dtype=dtype, **to),
            "A": A.to(**to),
            "B": rnd(b, n, L).to(dtype=dtype, **to),
            "C": rnd(b, n, L).to(dtype=dtype, **to),
            "D": torch.ones(d).to(**to),
            "z": rnd(b, d, L).to(dtype=dtype, **to),
            "delta_bias": delta_bias.to(**to),
            "grad": rnd(b, d, L).to(dtype=dtype, **to),
        }

    @staticmethod
    def _args(inputs: dict[str, Any]) -> dict[str, Any]:
        args = {k: inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
        args["delta_softplus"] = True
        return args

    def unsupported(self, provider: Any, inputs: dict[str, Any], mode: str) -> list[str]:
        if not callable(getattr(provider, "selective_scan_fn", None)):
            return ["no selective_scan_fn() method"]
        return list(provider.supports(**self._args(inputs)))

    _GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def _leaves(self, inputs: dict[str, Any]) -> dict[str, Any]:
        args = self._args(inputs)
        for name in self._GRAD_NAMES:
            args[name] = args[name].detach().clone().requires_grad_(True)
        return args

    def build(self, provider: Any, inputs: dict[str, Any], mode: str) -> Callable[[], Any]:
        if mode == "fwd":
            args = self._args(inputs)

            def fwd() -> Any:
                with torch.no_grad():
                    return provider.selective_scan_fn(**args)
            return fwd
        args = self._leaves(inputs)
        leaves = [args[n] for n in self._GRAD_NAMES]
        grad = inputs["grad"]

        def fwd_bwd() -> Any:
            for t in leaves:
                t.grad = None
            y = provider.selective_scan_fn(**args)
            y.backward(grad)
            return y
        fwd_bwd.reset = lambda: [setattr(t, "grad", None) for t in leaves]  # type: ignore[attr-defined]
        return fwd_bwd

    def outputs(self, provider: Any, inputs: dict[str, Any], mode: str) -> dict[str, torch.Tensor]:
        if mode == "fwd":
            with torch.no_grad():
                return {"y": provider.selective_scan_fn(**self._args(inputs))}
        args = self._leaves(inputs)
        y = provider.selective_scan_fn(**args)
        y.backward(inputs["grad"])
        out = {"y": y.detach()}
        out.update({f"grad_{n}": args[n].grad for n in self._GRAD_NAMES})
        return out

    def work(self, shape: dict[str, Any], mode: str, dtype: torch.dtype) -> dict[str, float]:
        b, d, n, L = shape["batch"], shape["dim"], shape["N"], shape["L"]
        es = dtype_size(dtype)
        params = 4.0 * (d * n + 2 * d)
        if mode == "fwd":
            nbytes = es * (4.0 * b * d * L + 2.0 * b * n * L) + params
        else:
            nbytes = es * (11.0 * b * d * L + 6.0 * b * n * L) + 3 * params
        return {"bytes": nbytes, "tokens": float(b * L)}

    def metric(self, mode: str) -> str:
        return "GB/s"

    def targets(self) -> list[Target]:
        cpu = dict(batch=2, dim=768, N=_N, L=2048)
        out = [Target(f"scan.cpu.{mode}", self.kind, "cpu", _ISSUE, _CPU_QUOTE, f"cpu_native vs the reference, {mode}",
                      cpu, (mode,), ("cpu_native",), speedup(("cpu_native",), mode, at_least=10))
               for mode in self.modes]
        ours = ", ".join(_GPU_OURS)
        for b, d in ((2, 768), (16, 2048)):
            shape = dict(batch=b, dim=d, N=_N, L=2048)
            out.append(Target(f"scan.cuda.vs_mamba_ssm.b{b}_d{d}", self.kind, "cuda", _ISSUE, _GPU_QUOTE,
                              f"best of {ours} vs mamba_ssm, fwd+bwd", shape, ("fwd+bwd",),
                              _GPU_OURS + ("mamba_ssm",), speedup(_GPU_OURS, "fwd+bwd", "mamba_ssm", at_least=1)))
            out.append(Target(f"scan.cuda.hbm.b{b}_d{d}", self.kind, "cuda", _ISSUE, _GPU_QUOTE,
                              f"best of {ours}: HBM bandwidth, fwd+bwd", shape, ("fwd+bwd",), _GPU_OURS,
                              bandwidth(_GPU_OURS, "fwd+bwd", at_least_pct=60)))
        return out
