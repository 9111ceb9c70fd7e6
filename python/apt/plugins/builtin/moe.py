"""``moe`` plugin: switches the model's MoE-wrapped FFNs on at ``schedules.enable_moe_at_epoch`` (dense FFNs run
before that) and sets their capacity factor from the ``moe_capacity_factor`` schedule at every step.

Which router (MoE layer) the blocks use is the profile's ``model.moe.router_name`` (a provider of kind
``router``); the plugin records it in the ``router`` event. Events: ``("moe", "enabled", epoch, step)`` when the
MoE layers switch on, ``("moe", "no_moe_layers", ...)`` when the model has none (``model.moe.enabled: false`` or
no MoE layer could be built). Metrics: ``moe_active``, ``moe_capacity_factor``.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ...plugins.base import HookContext, Plugin

logger = logging.getLogger(__name__)


class MoEPlugin(Plugin):
    name = "moe"
    description = "enable MoE FFNs at a scheduled epoch; anneal the expert capacity factor"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - {"capacity_factor"}
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} (known: capacity_factor)")
        self.capacity_factor = self.config.get("capacity_factor")
        self._layers: list[Any] = []

    def _moe_layers(self, ctx: HookContext) -> list[Any]:
        model = ctx.model
        return list(model.moe_layers()) if hasattr(model, "moe_layers") else []

    def on_training_start(self, ctx: HookContext) -> None:
        self._layers = self._moe_layers(ctx)
        if not self._layers:
            logger.warning("moe plugin: the model has no MoE layers (model.moe.enabled false, or no MoE provider)")
            self.emit(ctx, "no_moe_layers")
            return
        moe_cfg = ((ctx.config or {}).get("model") or {}).get("moe") or {}
        self.emit(ctx, f"router:{getattr(ctx.model, 'build_report', {}).get('moe', moe_cfg.get('router_name'))}")

    def on_epoch_start(self, ctx: HookContext) -> None:
        if not self._layers:
            return
        on = self.scheduled_on(ctx)
        was = all(layer.active for layer in self._layers)
        for layer in self._layers:
            layer.active = on
        if on and (not was or ctx.epoch == self._enable_epoch(ctx)) and not ctx.extra.get("resumed_mid_epoch"):
            self.emit(ctx, "enabled")
        ctx.metrics["moe_active"] = on

    def _enable_epoch(self, ctx: HookContext) -> int:
        sched = ctx.extra.get("schedules")
        return sched.enable_epoch(self.name) if sched is not None else 0

    def on_step_start(self, ctx: HookContext) -> None:
        if not self._layers:
            return
        sched = ctx.extra.get("schedules")
        cf = sched.value("moe_capacity_factor", ctx.epoch, ctx.step, self.capacity_factor) if sched else \
            self.capacity_factor
        if cf is not None:
            for layer in self._layers:
                layer.capacity_factor = float(cf)
            ctx.metrics["moe_capacity_factor"] = float(cf)
