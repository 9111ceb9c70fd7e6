"""``moe`` plugin: switches the model's MoE-wrapped FFNs on at ``schedules.enable_moe_at_epoch`` (dense FFNs run
before that), sets their capacity factor from the ``moe_capacity_factor`` schedule at every step, and can put a
different router provider (kind ``router``) behind the MoE layers.

Settings (``plugins.moe``): ``router`` — null (keep the one the model was built with, ``model.moe.router_name``),
``auto`` (the highest-priority router provider that supports the model's device and dtype, e.g. ``cuda`` or
``triton`` on a GPU) or a provider name; ``capacity_factor`` — the value used when the profile has no
``moe_capacity_factor`` schedule (null: leave the model's); ``upcycle`` (default true) — when MoE switches on
after dense training (enable epoch > 0), copy each dense FFN's weights into its experts first
(:meth:`~apt.modeling.layers.MoEWrappedFFN.upcycle`), so the switch does not restart those blocks from scratch.

Events: ``("moe", "router:<name>", ...)`` at the start, ``("moe", "enabled", epoch, step)`` when the MoE layers
switch on, ``("moe", "no_moe_layers", ...)`` when the model has none (``model.moe.enabled: false`` or no MoE layer
could be built). Metrics: ``moe_active``, ``moe_capacity_factor``, ``moe_dropped`` (assignments dropped by the
capacity limit in the step's last micro-batch, all MoE layers), ``moe_load_max`` (busiest expert's share of the
tokens / the even share; 1.0 = perfectly balanced).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ...core import registry
from ...plugins.base import HookContext, Plugin

logger = logging.getLogger(__name__)


class MoEPlugin(Plugin):
    name = "moe"
    schedule_names = ("moe_capacity_factor",)
    schedule_positive = ("moe_capacity_factor",)
    manages_schedule = True  # acts on scheduled_on() itself
    description = "enable MoE FFNs at a scheduled epoch; anneal the expert capacity factor; pick the router"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - {"capacity_factor", "router", "upcycle"}
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} "
                             "(known: capacity_factor, router, upcycle)")
        self.upcycle = self.flag("upcycle", True)
        # checked here, not first by the MoE layer in the middle of a forward pass, outside the plugin's isolation
        self.capacity_factor = self.number("capacity_factor", None, low=0, low_open=True, allow_none=True)
        self.router = self.config.get("router")
        if self.router is not None and not isinstance(self.router, str):
            raise ValueError(f"router: expected a router provider name, 'auto' or null, got {self.router!r}")
        self._layers: list[Any] = []

    def _moe_layers(self, ctx: HookContext) -> list[Any]:
        model = ctx.model
        return list(model.moe_layers()) if hasattr(model, "moe_layers") else []

    def _swap_router(self, ctx: HookContext) -> Optional[str]:
        targets = [layer.moe for layer in self._layers if hasattr(layer.moe, "router_impl")]
        if not self.router or not targets:
            return None
        if self.router == "auto":
            p = next(ctx.model.parameters())
            prov = registry.select("router", None, device=p.device, dtype=p.dtype)
        else:
            prov = registry.get("router", self.router)
        for moe in targets:
            moe.router_impl = prov
        report = getattr(ctx.model, "build_report", None)
        if isinstance(report, dict) and "moe" in report:  # what the layers run now, for whoever reads it later
            why = getattr(prov, "fallback_reason", "")
            report["moe"] = f"router/{prov.name} (plugins.moe.router{'; fallback: ' + why if why else ''})"
        return prov.name

    def on_training_start(self, ctx: HookContext) -> None:
        self._layers = self._moe_layers(ctx)
        if not self._layers:
            logger.warning("moe plugin: the model has no MoE layers (model.moe.enabled false, or no MoE provider)")
            self.emit(ctx, "no_moe_layers")
            return
        swapped = self._swap_router(ctx)
        built = getattr(ctx.model, "build_report", {}).get("moe")
        self.emit(ctx, f"router:{swapped or built}")

    def _enable_epoch(self, ctx: HookContext) -> int:
        sched = ctx.extra.get("schedules")
        return sched.enable_epoch(self.name) if sched is not None else 0

    def on_epoch_start(self, ctx: HookContext) -> None:
        if not self._layers:
            return
        on = self.scheduled_on(ctx)
        was = all(layer.active for layer in self._layers)
        if on and not was and self.upcycle:
            failed: dict[str, list[int]] = {}  # one warning per reason, not one per layer (a config-wide mismatch)
            for i, layer in enumerate(self._layers):
                why = layer.upcycle()
                if why:
                    failed.setdefault(why, []).append(i)
            for why, idx in failed.items():
                logger.warning("moe plugin: MoE layer%s %s not upcycled from %s dense FFN%s: %s",
                               "s" if len(idx) > 1 else "", ", ".join(map(str, idx)),
                               "their" if len(idx) > 1 else "its", "s" if len(idx) > 1 else "", why)
            self.emit(ctx, "upcycled")
        for layer in self._layers:
            layer.active = on
        if on and (not was or ctx.epoch == self._enable_epoch(ctx)) and not ctx.extra.get("resumed_mid_epoch"):
            self.emit(ctx, "enabled")
        ctx.metrics["moe_active"] = on
        if ctx.extra.get("resumed_mid_epoch"):
            # a run resumed after this epoch's last step validates before any step starts: the value that step used
            self._set_capacity(ctx, max(ctx.step - 1, 0))

    def on_step_start(self, ctx: HookContext) -> None:
        if self._layers:
            # metrics describe one step (the trainer clears them at each step's start): set it per step, or the
            # value set at epoch start never reached a step's hooks
            ctx.metrics["moe_active"] = all(getattr(layer, "active", True) for layer in self._layers)
            self._set_capacity(ctx, ctx.step)

    def _set_capacity(self, ctx: HookContext, step: int) -> None:
        sched = ctx.extra.get("schedules")
        cf = sched.value("moe_capacity_factor", ctx.epoch, step, self.capacity_factor) if sched else \
            self.capacity_factor
        if cf is not None:
            if not cf > 0:  # raised in the hook (the plugin is disabled), not later by the layer's forward
                raise ValueError(f"moe_capacity_factor reached {cf} at step {step}; it must stay > 0")
            for layer in self._layers:
                layer.capacity_factor = float(cf)
            ctx.metrics["moe_capacity_factor"] = float(cf)

    def on_step_end(self, ctx: HookContext) -> None:
        stats = [layer.last_stats for layer in self._layers if getattr(layer, "last_stats", None)]
        if not stats:
            return
        dropped = [s["dropped"] for s in stats if "dropped" in s]
        if dropped:
            ctx.metrics["moe_dropped"] = float(sum(float(d) for d in dropped))
        loads = [s["tokens_per_expert"].float() for s in stats if torch.is_tensor(s.get("tokens_per_expert"))]
        if loads:
            ctx.metrics["moe_load_max"] = max(float(t.max() / t.mean().clamp_min(1e-9)) for t in loads)
