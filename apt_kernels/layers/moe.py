"""``MoEFFN``: a mixture-of-experts feed-forward block (top-k router, expert capacity, SwiGLU/GELU experts).

The experts' weights are stacked (E, C, F) / (E, F, C) parameters, so all experts run as one batched GEMM
(``torch.bmm``) over the (E, cap, C) dispatch buffer. Dropless mode packs rows by expert; ``moe_grouped_ffn`` (a
custom op, so the data-dependent segment sizes never reach a compiled graph) pads each expert's segment to the
largest one (one host sync for that size) before the same bmm, again with no loop over experts, unless that
padding would more than double the rows (a skewed routing: one expert holding most tokens), where it runs the
experts one by one instead (their own rows' work, not E times the largest).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_flag, check_float
from ..ops.moe import (IMPLS, check_capacity_args, moe_aux_losses, moe_combine, moe_dispatch, moe_grouped_ffn,
                       moe_route)
from ..reference.moe import Routing

__all__ = ["MoEFFN", "OpsRouter"]


class OpsRouter:
    """Adapter giving the apt_kernels ops the router interface (route / dispatch / combine / aux_losses)."""

    ALIASES = {"topk_default": "reference"}  # the router provider's name for the reference

    def __init__(self, impl: str = "auto") -> None:
        impl = self.ALIASES.get(impl, impl)
        if impl not in IMPLS:
            raise ValueError(f"router_impl: expected one of {', '.join(IMPLS)} or a router object, got {impl!r}")
        self.impl = impl

    def route(self, logits: torch.Tensor, k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
              renormalize: Optional[bool] = None) -> Routing:
        return moe_route(logits, k, capacity_factor, min_capacity, renormalize, impl=self.impl)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return moe_dispatch(x, routing, impl=self.impl)

    def combine(self, expert_out: torch.Tensor, routing: Routing) -> torch.Tensor:
        return moe_combine(expert_out, routing, impl=self.impl)

    def aux_losses(self, logits: torch.Tensor, routing: Routing) -> dict[str, torch.Tensor]:
        return moe_aux_losses(logits, routing)

    def __repr__(self) -> str:
        return f"OpsRouter(impl={self.impl!r})"


def _expert_ffn(h: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor], w_out: torch.Tensor,
                activation: str) -> torch.Tensor:
    """Batched expert FFN on (E, M, C) rows: one bmm per projection for all experts."""
    up = torch.bmm(h, w_in)
    if activation == "swiglu":
        act = F.silu(torch.bmm(h, w_gate)) * up
    else:
        act = F.gelu(up)
    return torch.bmm(act, w_out)


class MoEFFN(nn.Module):
    """Mixture-of-experts FFN: ``forward(x (..., d_model)) -> (y, aux)``.

    ``aux`` holds ``balance_loss`` and ``z_loss`` (already multiplied by ``balance_coef`` / ``z_coef``; add them to
    the training loss), ``tokens_per_expert`` (E,) and ``dropped`` (number of dropped assignments).
    ``capacity_factor`` (None = dropless) and ``temperature`` (router logits are divided by it) are plain mutable
    attributes so schedules can anneal them. In eval mode the capacity is ``eval_capacity_factor``: None (default)
    = dropless, so inference never drops a token and its output does not depend on what else is in the batch (a
    prompt's prefill then decode equals one full forward); ``"train"`` = the training ``capacity_factor``. Tokens
    whose every choice is dropped get a zero MoE output (plus the shared expert's, when enabled); the caller's
    residual connection carries them. The router logits are computed in ``router_dtype`` (fp32 by default, also
    under autocast; None = the input's dtype), the experts in x's dtype.

    For users of other MoE code (design/MOE.md is the contract): the balance loss counts all N·k assignments,
    ``E · Σ_e f_e P_e`` with f_e their share, so for k > 1 it is 1/k of Hugging Face Mixtral's
    ``load_balancing_loss_func`` (multiply ``balance_coef`` by k to port its ``router_aux_loss_coef``), and
    DeepSpeed's top2gating counts first choices only. A dropped choice's weight is not given to the token's kept
    ones (DeepSpeed renormalises after dropping). Noisy gating's noise std (softplus(x W_noise)) is not divided
    by ``temperature``, the clean logits are.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int = 2, capacity_factor: Optional[float] = 1.25,
                 min_capacity: int = 4, activation: str = "swiglu", shared_expert: bool = False,
                 noisy_gating: bool = False, router_impl: Union[str, Any] = "auto", balance_coef: float = 0.01,
                 z_coef: float = 0.001, renormalize: Optional[bool] = None,
                 router_dtype: Optional[torch.dtype] = torch.float32,
                 eval_capacity_factor: Union[float, str, None] = None) -> None:
        super().__init__()
        if not (eval_capacity_factor is None or eval_capacity_factor == "train"
                or (isinstance(eval_capacity_factor, numbers.Real) and not isinstance(eval_capacity_factor, bool)
                    and 0 < eval_capacity_factor < math.inf)):
            raise ValueError(f"eval_capacity_factor: expected None (dropless), 'train' or a finite number > 0, got "
                             f"{eval_capacity_factor!r}")
        if router_dtype is not None and not (isinstance(router_dtype, torch.dtype) and router_dtype.is_floating_point):
            raise TypeError(f"router_dtype: expected None or a floating torch.dtype, got {router_dtype!r}")
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: expected >= 1, got {v}")
        for name, v in (("balance_coef", balance_coef), ("z_coef", z_coef)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v}")
        if k > num_experts:
            raise ValueError(f"k: expected k <= num_experts ({num_experts}), got {k}")
        check_capacity_args(capacity_factor, min_capacity, renormalize)  # at construction, not the first forward
        check_flag("shared_expert", shared_expert)  # "no" built a shared expert
        check_flag("noisy_gating", noisy_gating)
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation: expected 'swiglu' or 'gelu', got {activation!r}")
        if isinstance(router_impl, str):
            router: Any = OpsRouter(router_impl)
        else:
            missing = [m for m in ("route", "dispatch", "combine") if not callable(getattr(router_impl, m, None))]
            if missing:
                raise TypeError(f"router_impl: expected 'auto', an impl name or an object with route/dispatch/"
                                f"combine methods; {type(router_impl).__name__} lacks {', '.join(missing)}")
            router = router_impl
        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.activation = activation
        self.noisy_gating = noisy_gating
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.renormalize = renormalize
        self.temperature = 1.0
        self.router_impl = router
        self.router_dtype = router_dtype

        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # noise std = softplus(x W_noise) (Shazeer et al. 2017); zero init -> softplus(0) = 0.69 std at start
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy_gating else None
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if activation == "swiglu" else None
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        if shared_expert:
            self.shared_in = nn.Linear(d_model, d_ff, bias=False)
            self.shared_gate = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
            self.shared_out = nn.Linear(d_ff, d_model, bias=False)
        self.shared_expert = shared_expert
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std_in, std_out = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_ff)
        nn.init.normal_(self.w_in, std=std_in)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=std_in)
        nn.init.normal_(self.w_out, std=std_out)
        nn.init.normal_(self.gate.weight, std=std_in)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
                f"activation={self.activation}, "
                f"shared_expert={self.shared_expert}, noisy_gating={self.noisy_gating}, router={self.router_impl!r}")

    def router_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean logits / temperature, logits used for routing: plus noise in training with noisy gating)."""
        # inf would pass "> 0" and silently make every token's router uniform
        if isinstance(self.temperature, bool) or not (isinstance(self.temperature, (int, float))
                                                       and 0 < self.temperature < math.inf):
            raise ValueError(f"temperature: expected a finite number > 0, got {self.temperature!r}")
        rd = self.router_dtype
        if rd is None:
            clean = self.gate(x) / self.temperature
            noise = self.noise(x) if self.noise is not None and self.training else None
        else:
            # selective precision (Switch Transformer): logits in bf16 keep ~3 significant digits, so near-ties
            # between experts flip with rounding; the gate is C x E, tiny next to the experts, so run it in
            # router_dtype even under autocast
            with torch.autocast(x.device.type, enabled=False):
                h = x.to(rd)
                clean = F.linear(h, self.gate.weight.to(rd)) / self.temperature
                noise = (F.linear(h, self.noise.weight.to(rd)) if self.noise is not None and self.training
                         else None)
        if noise is not None:
            # in the clean logits' precision, at least fp32 (a float64 router routed on fp32 logits in training)
            acc = torch.promote_types(clean.dtype, torch.float32)
            std = F.softplus(noise.to(acc))
            return clean, clean.to(acc) + torch.randn_like(std) * std
        return clean, clean

    def _experts(self, buf: torch.Tensor, routing: Routing) -> torch.Tensor:
        w_in, w_gate, w_out = self.w_in.to(buf.dtype), None, self.w_out.to(buf.dtype)
        if self.w_gate is not None:
            w_gate = self.w_gate.to(buf.dtype)
        if routing.capacity is not None:
            return _expert_ffn(buf, w_in, w_gate, w_out, self.activation)
        # dropless: packed rows sorted by expert, per-expert counts data-dependent -> the grouped-FFN custom op
        return moe_grouped_ffn(buf, routing.offsets, w_in, w_gate, w_out, self.activation)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        up = self.shared_in(x)
        act = F.silu(self.shared_gate(x)) * up if self.shared_gate is not None else F.gelu(up)
        return self.shared_out(act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (..., {self.d_model}), got {tuple(x.shape)}")
        check_float("x", x)
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        clean, logits = self.router_logits(flat)
        cf = (self.capacity_factor if self.training or self.eval_capacity_factor == "train"
              else self.eval_capacity_factor)
        routing = self.router_impl.route(logits, self.k, cf, self.min_capacity, self.renormalize)
        buf = self.router_impl.dispatch(flat, routing)
        out = self._experts(buf, routing)
        y = self.router_impl.combine(out, routing)
        if self.shared_expert:
            y = y + self._shared(flat)
        aux_fn = getattr(self.router_impl, "aux_losses", None)
        losses = aux_fn(logits, routing) if aux_fn is not None else moe_aux_losses(logits, routing)
        z = moe_aux_losses(clean, routing)["z_loss"] if clean is not logits else losses["z_loss"]
        aux = {
            "balance_loss": self.balance_coef * losses["balance_loss"],
            "z_loss": self.z_coef * z,
            "tokens_per_expert": routing.tokens_per_expert.detach(),
            "dropped": routing.dropped.detach() if isinstance(routing.dropped, torch.Tensor) else routing.dropped,
        }
        return y.reshape(shape), aux
