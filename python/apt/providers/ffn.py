"""FFN providers (kind ``ffn``): ``dense`` (default; GELU / ReLU / SwiGLU MLP) and ``moe`` (a mixture of experts
layer, ``forward(x) -> (y, aux)``, taken from the ``router`` provider named in the profile, else
``apt_kernels.layers.moe.MoEFFN`` directly)."""
from __future__ import annotations

import importlib
import logging
from typing import Any, ClassVar, Optional, Union

from torch import nn

from ..core import registry
from ..core.registry import Provider

logger = logging.getLogger(__name__)


class DenseFFNProvider(Provider):
    kind: ClassVar[str] = "ffn"
    name = "dense"
    is_default = True
    description = "dense MLP (gelu, relu or swiglu), pure PyTorch"

    def create_layer(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0) -> nn.Module:
        from ..modeling.layers import DenseFFN

        return DenseFFN(d_model, d_ff, activation=activation, dropout=dropout)


def _moefnn_class() -> Optional[type]:
    try:
        return importlib.import_module("apt_kernels.layers.moe").MoEFFN
    except (ImportError, AttributeError):
        return None


class MoEFFNProvider(Provider):
    kind: ClassVar[str] = "ffn"
    name = "moe"
    description = "mixture of experts (top-k routing with capacity) from the router provider / apt_kernels MoEFFN"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if _moefnn_class() is not None:
            return True, ""
        try:
            if any(i.available for i in registry.REGISTRY.list_providers("router")):
                return True, ""
        except registry.RegistryError:
            pass
        return False, "apt_kernels.layers.moe.MoEFFN cannot be imported and no 'router' provider is registered"

    def create_layer(self, d_model: int, d_ff: int, num_experts: int = 4, k: int = 2,
                     capacity_factor: Optional[float] = 1.25, min_capacity: int = 4, activation: str = "swiglu",
                     shared_expert: bool = False, noisy_gating: bool = False,
                     router_name: Union[str, Provider, None] = None, router_cfg: Optional[dict[str, Any]] = None,
                     balance_coef: float = 0.01,
                     z_coef: float = 0.001, eval_capacity_factor: Union[float, str, None] = None) -> nn.Module:
        from ..modeling.compose import call_accepting

        kw = dict(capacity_factor=capacity_factor, min_capacity=min_capacity, activation=activation,
                  shared_expert=shared_expert, noisy_gating=noisy_gating, balance_coef=balance_coef, z_coef=z_coef,
                  eval_capacity_factor=eval_capacity_factor)
        kw.update(router_cfg or {})
        why = ""
        if isinstance(router_name, Provider):  # resolved by the caller (once per model, so one fallback warning)
            router: Optional[Provider] = router_name
        else:
            try:
                router = registry.get("router", router_name)
            except registry.RegistryError as exc:
                router = None
                why = str(exc)
        if router is not None and callable(getattr(router, "create_layer", None)):
            self.last_source = f"router/{router.name}"
            return call_accepting(router.create_layer, d_model, d_ff, num_experts, k=k, **kw)
        cls = _moefnn_class()
        if cls is None:
            raise registry.RegistryError(f"no MoE layer: no router provider ({why}) and no apt_kernels MoEFFN")
        if router is not None:  # a router with route/dispatch/combine only: MoEFFN routes through it
            if "router_impl" in kw:
                raise ValueError("router_impl: the router provider sets it; do not pass it")
            self.last_source = f"router/{router.name} (in apt_kernels.layers.moe.MoEFFN)"
            return call_accepting(cls, d_model, d_ff, num_experts, k=k, router_impl=router, **kw)
        self.last_source = "apt_kernels.layers.moe.MoEFFN"
        return call_accepting(cls, d_model, d_ff, num_experts, k=k, **kw)


PROVIDERS = [DenseFFNProvider, MoEFFNProvider]
