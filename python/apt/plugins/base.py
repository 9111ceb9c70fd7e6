"""The plugin contract.

A plugin is a :class:`~apt.core.registry.Provider` of kind ``plugin``. The trainer broadcasts each hook to every
enabled plugin in order; a hook that raises is logged and the plugin is disabled, training goes on
(:class:`apt.training.trainer.Trainer` enforces this). Generation calls the generation hooks the same way.

Training hooks (all optional; default no-ops), each receiving the shared :class:`HookContext`:
``on_training_start``, ``on_epoch_start``, ``on_step_start``, ``on_step_end``, ``on_epoch_end``, ``on_training_end``.
A plugin adds to the loss by putting tensors into ``ctx.aux_losses`` during ``compute_loss(ctx)``, which the
trainer calls for every micro-batch after the forward pass (``ctx.extra["logits"]``, ``ctx.extra["targets"]``
and ``model.hidden_states`` are then set) and before the backward pass; ``ctx.aux_losses`` is emptied before
each micro-batch. Parameters that follow a schedule are read from ``ctx.extra["schedules"]``
(:class:`apt.core.schedules.Schedules`) and named in ``schedule_names``. A plugin that keeps state across a
resume returns it from ``state_dict()`` and takes it back in ``load_state_dict()``; hooks should be idempotent
for the epoch they are in (after a resume in the middle of an epoch, ``on_epoch_start`` is broadcast again
for that epoch).

Generation hooks: ``augment_prompt(prompt, ctx) -> str`` (e.g. retrieval), ``select_sample(candidates, ctx)``
(e.g. voting over K samples). What ``ctx.extra`` holds for each is listed in
:func:`apt.inference.generate._hook_context`; the contexts of one prompt share ``ctx.metrics``, which comes back
as ``GenerationResult.metrics``. Built-in generation plugins: ``voter`` and ``retriever``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, ClassVar, Optional

from ..core.registry import Provider
from ..core.settings import as_bool, as_number

logger = logging.getLogger(__name__)

TRAINING_HOOKS = ("on_training_start", "on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end",
                  "on_training_end")
LOSS_HOOKS = ("compute_loss",)
GENERATION_HOOKS = ("augment_prompt", "select_sample")


@dataclasses.dataclass
class HookContext:
    """What a hook sees. Fields the trainer does not know yet are None."""

    trainer: Any = None
    model: Any = None
    config: Any = None
    epoch: int = 0
    step: int = 0  # global optimizer step
    batch: Any = None
    loss: Optional[float] = None
    aux_losses: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    events: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)  # (plugin, hook, epoch, step)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Plugin(Provider):
    """Base class of plugins. Subclasses set ``name`` (and ``description``) and override the hooks they need."""

    kind: ClassVar[str] = "plugin"
    # False: the manager gives the epoch/step hooks and compute_loss only in the epochs that
    # ``schedules.enable_<name>_at_epoch`` allows. True: the plugin gets them always and checks scheduled_on()
    # itself (moe switches its layers off before its epoch, align keeps its state).
    manages_schedule: ClassVar[bool] = False
    # the ``schedules:`` entries the plugin reads (Schedules.value): a schedule entry that no enabled plugin reads
    # is warned about, with the closest declared name when it looks like a typo of one
    schedule_names: ClassVar[tuple[str, ...]] = ()
    # of those, the ones that must stay > 0 over the whole run: checked when the trainer is set up (a schedule
    # reaching 0 at its end otherwise disabled the plugin mid-run, and the run still finished with success)
    schedule_positive: ClassVar[tuple[str, ...]] = ()

    def on_training_start(self, ctx: HookContext) -> None: ...
    def on_epoch_start(self, ctx: HookContext) -> None: ...
    def on_step_start(self, ctx: HookContext) -> None: ...
    def on_step_end(self, ctx: HookContext) -> None: ...
    def on_epoch_end(self, ctx: HookContext) -> None: ...
    def on_training_end(self, ctx: HookContext) -> None: ...
    def compute_loss(self, ctx: HookContext) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def setting(self, key: str, default: Any, cast: Callable[[Any], Any]) -> Any:
        """``config[key]`` (``default`` when absent) through ``cast``; a value ``cast`` rejects raises ValueError
        naming the setting and the value (build_plugins adds ``plugins.<name>``)."""
        value = self.config.get(key, default)
        try:
            return cast(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {getattr(cast, '__name__', 'a valid value')}, got {value!r}") from None

    def number(self, key: str, default: Any, **limits: Any) -> Any:
        """``config[key]`` (``default`` when absent) checked by :func:`apt.core.settings.as_number` (``integer``,
        ``low``, ``high``, ``low_open``, ``high_open``, ``allow_none``): a finite number in range, else ValueError."""
        return as_number(key, self.config.get(key, default), **limits)

    def flag(self, key: str, default: bool) -> bool:
        """``config[key]`` (``default`` when absent), which must be a bool: a quoted "false" would read as True."""
        return as_bool(key, self.config.get(key, default))

    def emit(self, ctx: HookContext, event: str) -> None:
        """Record ``event`` (e.g. "enabled") in ``ctx.events`` as (plugin, event, epoch, step)."""
        ctx.events.append((self.name, event, ctx.epoch, ctx.step))
        # a plugin switching on mid-run (moe, align at their schedules' epoch) changes the loss curve: say so
        logger.info("plugin %s: %s at epoch %d, step %d", self.name, event, ctx.epoch, ctx.step)

    def scheduled_on(self, ctx: HookContext) -> bool:
        """Whether the profile's ``schedules.enable_<name>_at_epoch`` lets this plugin act in ``ctx.epoch``."""
        sched = ctx.extra.get("schedules")
        return True if sched is None else sched.enabled(self.name, ctx.epoch)

    def augment_prompt(self, prompt: str, ctx: HookContext) -> str:
        return prompt

    def select_sample(self, candidates: list[Any], ctx: HookContext) -> Optional[Any]:
        return None
