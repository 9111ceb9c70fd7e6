"""A small, slow, pure-PyTorch mixture of experts with the MoEFFN interface (``forward(x) -> (y, aux)`` with
scaled ``balance_loss`` / ``z_loss``, mutable ``capacity_factor`` and ``temperature``), registered on demand as
the ``router`` provider ``toy``. For tests of the model builder, trainer and plugins on machines where the fast
MoE layer is missing; it loops over experts and ignores capacity, so it is not for real runs."""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core import registry
from ..core.registry import Provider


class ToyMoE(nn.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, k: int = 2,
                 capacity_factor: Optional[float] = 1.25, balance_coef: float = 0.01, z_coef: float = 0.001,
                 **_: Any) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * d_model ** -0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, d_ff, d_model) * d_ff ** -0.5)
        self.k, self.E = k, num_experts
        self.capacity_factor = capacity_factor
        self.temperature = 1.0
        self.balance_coef, self.z_coef = balance_coef, z_coef

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.router(x) / self.temperature
        p = logits.float().softmax(-1)
        w, idx = p.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(self.E):
            hit = (idx == e)
            rows = hit.any(-1).nonzero(as_tuple=True)[0]
            if rows.numel():
                h = F.gelu(x[rows] @ self.w1[e]) @ self.w2[e]
                y = y.index_add(0, rows, h * (w * hit).sum(-1)[rows, None].to(h.dtype))
        f = F.one_hot(idx, self.E).float().sum((0, 1)) / idx.numel()
        balance = self.E * (f * p.mean(0)).sum()
        z = torch.logsumexp(logits.float(), -1).pow(2).mean()
        return y, {"balance_loss": self.balance_coef * balance, "z_loss": self.z_coef * z}


class ToyRouterProvider(Provider):
    kind: ClassVar[str] = "router"
    name = "toy"
    description = "test-only pure-PyTorch MoE (expert loop, no capacity)"

    def create_layer(self, d_model: int, d_ff: int, num_experts: int, k: int = 2, **cfg: Any) -> nn.Module:
        return ToyMoE(d_model, d_ff, num_experts, k, **cfg)


def register_toy_router() -> str:
    registry.REGISTRY.register(ToyRouterProvider)
    return ToyRouterProvider.name
