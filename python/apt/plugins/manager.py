"""PluginManager: builds the enabled plugins from a profile and broadcasts hooks to them in order.

A hook that raises is logged with its traceback, the plugin is disabled for the rest of the run (recorded in
``disabled`` and as a ``("<name>", "failed:<hook>", epoch, step)`` event), and the broadcast goes on to the next
plugin: one broken plugin never stops training or generation.
"""
from __future__ import annotations

import difflib
import logging
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from ..core import registry
from .base import GENERATION_HOOKS, LOSS_HOOKS, TRAINING_HOOKS, HookContext, Plugin

logger = logging.getLogger(__name__)


class PluginError(ValueError):
    """A plugin named in a profile cannot be found or built."""


def build_plugins(names: Iterable[str], settings: Optional[Mapping[str, Any]] = None) -> list[Plugin]:
    settings = settings or {}
    out = []
    for name in names:
        try:
            if name == "auto":  # the registry's "best available provider": for plugins a silent pick of one
                raise registry.RegistryError("'auto' names no plugin")
            plugin = registry.get("plugin", name, config=dict(settings.get(name) or {}), strict=True)
        except registry.RegistryError:
            known = ", ".join(sorted(i.name for i in registry.list_providers("plugin"))) or "none"
            raise PluginError(f"unknown plugin {name!r} (registered plugins: {known})") from None
        except (TypeError, ValueError) as exc:
            raise PluginError(f"plugin {name!r}: bad settings plugins.{name}: {exc}") from None
        out.append(plugin)  # type: ignore[arg-type]
    return out


def _check_aux_losses(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """What a compute_loss put into ``ctx.aux_losses`` must be a one-element float tensor: a vector stopped the run
    in backward ("grad can be implicitly created only for scalar outputs"), a Python float was silently dropped."""
    for key, value in after.items():
        if key in before and value is before[key]:
            continue
        if not torch.is_tensor(value) or value.numel() != 1 or not value.is_floating_point():
            what = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if torch.is_tensor(value)
                    else f"{type(value).__name__} {value!r}")
            raise TypeError(f"aux_losses[{key!r}]: expected a one-element float tensor (a loss term with its "
                            f"graph), got {what}")


def _warn_unknown_hooks(plugin: Plugin) -> None:
    """A misspelt hook (on_step_ended) is a method nothing calls: say so rather than never call it."""
    hooks = TRAINING_HOOKS + LOSS_HOOKS + GENERATION_HOOKS
    for attr in dir(type(plugin)):
        if attr.startswith("on_") and attr not in hooks and callable(getattr(type(plugin), attr, None)):
            close = difflib.get_close_matches(attr, hooks, n=1)
            logger.warning("plugin %s: %s is not a hook and is never called%s (hooks: %s)", plugin.name, attr,
                           f"; did you mean {close[0]}?" if close else "", ", ".join(hooks))


class PluginManager:
    def __init__(self, plugins: Sequence[Plugin] = ()) -> None:
        self.plugins: list[Plugin] = list(plugins)
        self.disabled: dict[str, str] = {}
        for plugin in self.plugins:
            _warn_unknown_hooks(plugin)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PluginManager":
        section = cfg.get("plugins") or {}
        known = {i.name for i in registry.list_providers("plugin")}
        for key in section:  # settings under a misspelt plugin name were silently ignored
            if key != "enabled" and key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                what = (f"plugins.{key}: settings for an unknown plugin"
                        + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; registered plugins: {', '.join(sorted(known)) or 'none'}")
                if close:  # next to a registered name: a typo, whose settings would be lost
                    raise PluginError(what)
                # perhaps a third-party plugin that is not installed here: its settings cannot matter to this run
                logger.warning("%s; ignoring them", what)
        return cls(build_plugins(section.get("enabled") or [], section))

    @property
    def active(self) -> list[Plugin]:
        return [p for p in self.plugins if p.name not in self.disabled]

    def get(self, name: str) -> Optional[Plugin]:
        return next((p for p in self.plugins if p.name == name), None)

    def _fail(self, plugin: Plugin, hook: str, exc: BaseException, ctx: Optional[HookContext]) -> None:
        logger.error("apt plugin %s: hook %s raised %s: %s; plugin disabled, continuing", plugin.name, hook,
                     type(exc).__name__, exc, exc_info=exc)
        self.disabled[plugin.name] = f"{hook}: {type(exc).__name__}: {exc}"
        if ctx is not None:
            ctx.events.append((plugin.name, f"failed:{hook}", ctx.epoch, ctx.step))

    # hooks a plugin gets only in its scheduled epochs (unless it manages its schedule itself)
    _SCHEDULED_HOOKS = frozenset({"on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end", "compute_loss"})

    def broadcast(self, hook: str, ctx: HookContext) -> None:
        for plugin in self.active:
            fn = getattr(plugin, hook, None)
            if fn is None:
                continue
            if hook in self._SCHEDULED_HOOKS and not plugin.manages_schedule and not plugin.scheduled_on(ctx):
                continue
            before = dict(ctx.aux_losses) if hook == "compute_loss" else None
            try:
                fn(ctx)
                if before is not None:
                    _check_aux_losses(before, ctx.aux_losses)
            except Exception as exc:  # plugin code is isolated: log, disable, go on
                # and adds nothing to the loss of the micro-batch it failed in (with grad_accum, what it added to
                # the step's earlier micro-batches has been backpropagated already and stays)
                if before is not None:
                    ctx.aux_losses.clear()
                    ctx.aux_losses.update(before)
                self._fail(plugin, hook, exc, ctx)

    def augment_prompt(self, prompt: str, ctx: HookContext) -> str:
        """Each active plugin's ``augment_prompt`` in turn (a failing one is skipped and disabled)."""
        for plugin in self.active:
            try:
                out = plugin.augment_prompt(prompt, ctx)
                if not isinstance(out, str):
                    raise TypeError(f"augment_prompt returned {type(out).__name__}, expected str")
                prompt = out
            except Exception as exc:
                self._fail(plugin, "augment_prompt", exc, ctx)
        return prompt

    def select_sample(self, candidates: list[Any], ctx: HookContext) -> Optional[Any]:
        """The first non-None choice of an active plugin's ``select_sample``, else None."""
        for plugin in self.active:
            try:
                choice = plugin.select_sample(candidates, ctx)
            except Exception as exc:
                self._fail(plugin, "select_sample", exc, ctx)
                continue
            if choice is not None:
                return choice
        return None

    def state_dict(self) -> dict[str, Any]:
        states = {}
        for p in self.plugins:
            try:
                states[p.name] = p.state_dict()
            except Exception as exc:
                self._fail(p, "state_dict", exc, None)
        return {"plugins": states, "disabled": dict(self.disabled)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        disabled = dict(state.get("disabled") or {})
        for name, why in disabled.items():  # said now, not only in the summary at the end of the resumed run
            if self.get(name) is not None:
                logger.warning("apt plugin %s: disabled earlier in this run (%s); it stays disabled after the resume",
                               name, why)
        self.disabled.update(disabled)
        for p in self.plugins:
            if p.name in (state.get("plugins") or {}):
                try:
                    p.load_state_dict(state["plugins"][p.name])
                except Exception as exc:
                    self._fail(p, "load_state_dict", exc, None)
