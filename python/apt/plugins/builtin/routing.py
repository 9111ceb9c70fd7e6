"""``routing`` plugin: anneals the MoE router's softmax temperature from the ``route_temperature`` schedule
(``{start, end, by: step|epoch, kind: linear|cosine}``; a constant ``temperature`` setting when the profile has no
such schedule), setting ``temperature`` on every MoE layer before each optimizer step. A higher temperature
spreads tokens over more experts early in training; annealing it sharpens the routing.
Metric: ``route_temperature``. Event ``("routing", "temperature_start:<t>", ...)`` at the start of training.
"""
from __future__ import annotations

from typing import Any, Optional

from ...plugins.base import HookContext, Plugin


class RoutingPlugin(Plugin):
    name = "routing"
    schedule_names = ("route_temperature",)
    schedule_positive = ("route_temperature",)
    description = "anneal the MoE router temperature (schedule route_temperature)"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - {"temperature"}
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} (known: temperature)")
        self.temperature = self.number("temperature", 1.0, low=0, low_open=True)

    def current(self, ctx: HookContext, step: Optional[int] = None) -> float:
        sched = ctx.extra.get("schedules")
        if sched is None:
            return self.temperature
        return float(sched.value("route_temperature", ctx.epoch, ctx.step if step is None else step,
                                 self.temperature))

    def on_training_start(self, ctx: HookContext) -> None:
        self.emit(ctx, f"temperature_start:{self.current(ctx):.4g}")

    def on_epoch_start(self, ctx: HookContext) -> None:
        if ctx.extra.get("resumed_mid_epoch"):
            # a run resumed after this epoch's last step validates before any step starts: the value that step used
            self._set(ctx, max(ctx.step - 1, 0))

    def on_step_start(self, ctx: HookContext) -> None:
        self._set(ctx, ctx.step)

    def _set(self, ctx: HookContext, step: int) -> None:
        t = self.current(ctx, step)
        if t <= 0:
            raise ValueError(f"route_temperature reached {t} at step {step}; it must stay > 0")
        model = ctx.model
        for layer in (model.moe_layers() if hasattr(model, "moe_layers") else []):
            layer.temperature = t
        ctx.metrics["route_temperature"] = t
