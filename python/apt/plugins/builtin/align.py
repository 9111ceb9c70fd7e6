"""``align`` plugin: adds ``weight · (alpha·stable + beta·align)`` — the bistate alignment loss of
:mod:`apt.providers.align` between the hidden states after the middle block and the final hidden states — to
the training loss from ``schedules.enable_align_at_epoch`` on. Settings (``plugins.align``): ``alpha``, ``beta``,
``tau_align``, ``weight`` (default 0.1), ``max_tokens``, ``detach_b``, ``provider`` (kind ``align``, default
``bistate``). Schedules ``align_alpha``, ``align_beta``, ``align_tau`` override those settings over time.
Event ``("align", "enabled", epoch, step)`` at the first step it adds its loss; aux loss name ``align``.
"""
from __future__ import annotations

from typing import Any, Optional

from ...core import registry
from ...plugins.base import HookContext, Plugin

_KNOWN = {"alpha", "beta", "tau_align", "weight", "max_tokens", "detach_b", "provider"}


class AlignPlugin(Plugin):
    name = "align"
    schedule_names = ("align_alpha", "align_beta", "align_tau")
    manages_schedule = True  # acts on scheduled_on() itself
    description = "bistate alignment loss (alpha*stable + beta*align, temperature tau_align) from a scheduled epoch"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _KNOWN
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KNOWN))})")
        self.weight = self.number("weight", 0.1, low=0)
        cfg = {k: v for k, v in self.config.items() if k not in ("weight", "provider")}
        self.loss_fn = registry.get("align", self.config.get("provider"), config=cfg)
        self._announced = False

    def on_training_start(self, ctx: HookContext) -> None:
        if ctx.model is not None:
            ctx.model.record_hidden = True

    def compute_loss(self, ctx: HookContext) -> None:
        if not self.scheduled_on(ctx):
            return
        hs = getattr(ctx.model, "hidden_states", {}) or {}
        if "mid" not in hs or "final" not in hs:
            raise RuntimeError("align plugin: the model did not record hidden states (needs model.record_hidden)")
        sched = ctx.extra.get("schedules")
        over = {}
        if sched is not None:
            over = {"alpha": sched.value("align_alpha", ctx.epoch, ctx.step),
                    "beta": sched.value("align_beta", ctx.epoch, ctx.step),
                    "tau_align": sched.value("align_tau", ctx.epoch, ctx.step)}
        loss, parts = self.loss_fn.loss(hs["mid"], hs["final"], **over)  # type: ignore[attr-defined]
        ctx.aux_losses["align"] = self.weight * loss
        ctx.metrics["align_stable"] = float(parts["stable"])
        ctx.metrics["align_align"] = float(parts["align"])
        if not self._announced:
            self._announced = True
            self.emit(ctx, "enabled")

    def state_dict(self) -> dict[str, Any]:
        return {"announced": self._announced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._announced = bool(state.get("announced", False))
