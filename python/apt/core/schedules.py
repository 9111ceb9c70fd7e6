"""Schedules: when a plugin switches on, and how a parameter moves during training.

The ``schedules:`` section of a profile holds two kinds of entries::

    schedules:
      enable_moe_at_epoch: 1          # the plugin "moe" is active from epoch 1 (0-based) on
      enable_align_at_epoch: 2
      route_temperature: {start: 2.0, end: 1.0, by: step, kind: cosine}
      moe_capacity_factor: {start: 2.0, end: 1.25, by: epoch}      # kind: linear by default
      align_beta: 0.5                 # a plain number is a constant

An annealed parameter ``{start, end, by, kind, begin, until}`` goes from ``start`` at ``begin`` (default 0) to
``end`` at ``until`` (default: the last epoch, or the last optimizer step, of the run) and stays at ``end`` after;
``by: epoch`` moves once per epoch, ``by: step`` once per optimizer step. ``kind: linear`` interpolates linearly,
``kind: cosine`` follows half a cosine (slow, fast, slow). If ``until <= begin`` the value is ``end`` from
``begin`` on. Plugins read values through :class:`Schedules` (the trainer gives them one in ``ctx.extra``).
``enable_<plugin>_at_epoch`` holds for any plugin: before that epoch the plugin manager gives it no epoch/step hooks
and no ``compute_loss`` (plugins with ``manages_schedule``, moe and align, get them and check it themselves).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

_ENABLE = re.compile(r"^enable_(\w+?)_at_epoch$")
_SPEC_KEYS = {"start", "end", "by", "kind", "begin", "until"}


def validate_schedules(section: Mapping[str, Any]) -> None:
    """Raise ValueError naming the bad entry of a ``schedules:`` section."""
    if not isinstance(section, Mapping):
        raise ValueError(f"schedules: expected a mapping, got {type(section).__name__}")
    for key, spec in section.items():
        where = f"schedules.{key}"
        if _ENABLE.match(str(key)):
            if isinstance(spec, bool) or not isinstance(spec, int) or spec < 0:
                raise ValueError(f"{where}: expected an epoch number >= 0, got {spec!r}")
            continue
        if isinstance(spec, bool):
            raise ValueError(f"{where}: expected a number or {{start, end, by}}, got {spec!r}")
        if isinstance(spec, (int, float)):
            if not math.isfinite(spec):
                raise ValueError(f"{where}: expected a finite number, got {spec!r}")
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a number or {{start, end, by}}, got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))} "
                             f"(allowed: {', '.join(sorted(_SPEC_KEYS))})")
        for f in ("start", "end"):
            if f not in spec:
                raise ValueError(f"{where}: missing {f!r}")
            if isinstance(spec[f], bool) or not isinstance(spec[f], (int, float)) or not math.isfinite(spec[f]):
                raise ValueError(f"{where}.{f}: expected a finite number, got {spec[f]!r}")
        if spec.get("by", "epoch") not in ("epoch", "step"):
            raise ValueError(f"{where}.by: expected 'epoch' or 'step', got {spec.get('by')!r}")
        if spec.get("kind", "linear") not in ("linear", "cosine"):
            raise ValueError(f"{where}.kind: expected 'linear' or 'cosine', got {spec.get('kind')!r}")
        for f in ("begin", "until"):
            v = spec.get(f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{where}.{f}: expected an integer >= 0, got {v!r}")


def anneal(start: float, end: float, progress: float, kind: str = "linear") -> float:
    """Value at ``progress`` in [0, 1] (clamped) between ``start`` and ``end``."""
    t = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "linear":
        return start + (end - start) * t
    raise ValueError(f"kind: expected 'linear' or 'cosine', got {kind!r}")


class Schedules:
    """Evaluates a ``schedules:`` section for a run of ``total_epochs`` epochs / ``total_steps`` optimizer steps."""

    def __init__(self, section: Optional[Mapping[str, Any]] = None, total_epochs: int = 1,
                 total_steps: Optional[int] = None) -> None:
        self.section = dict(section or {})
        validate_schedules(self.section)
        self.total_epochs = max(int(total_epochs), 1)
        self.total_steps = total_steps

    def enable_epoch(self, plugin: str) -> int:
        """The epoch from which ``plugin`` is active (0 when no ``enable_<plugin>_at_epoch`` entry)."""
        return int(self.section.get(f"enable_{plugin}_at_epoch", 0))

    def enabled(self, plugin: str, epoch: int) -> bool:
        return epoch >= self.enable_epoch(plugin)

    def has(self, name: str) -> bool:
        return name in self.section

    def value(self, name: str, epoch: int = 0, step: int = 0, default: Optional[float] = None) -> Optional[float]:
        """The parameter ``name`` at (epoch, optimizer step); ``default`` when the section does not define it."""
        spec = self.section.get(name)
        if spec is None:
            return default
        if isinstance(spec, (int, float)):
            return float(spec)
        by = spec.get("by", "epoch")
        x = epoch if by == "epoch" else step
        total = self.total_epochs if by == "epoch" else (self.total_steps or 1)
        begin = int(spec.get("begin", 0) or 0)
        until = spec.get("until")
        until = int(until) if until is not None else max(total - 1, 0)
        if x < begin:
            progress = 0.0
        elif until <= begin:
            progress = 1.0
        else:
            progress = (x - begin) / (until - begin)
        return anneal(float(spec["start"]), float(spec["end"]), progress, spec.get("kind", "linear"))

    def lowest(self, name: str) -> Optional[float]:
        """The lowest value the parameter ``name`` takes over the run (None when not defined): a schedule is monotone
        in its epoch / step (start before ``begin``, end after ``until``), so it is the lower of its values at the
        run's first and last epoch / step (an ``until`` past the run's end never reaches ``end``)."""
        if name not in self.section:
            return None
        first = self.value(name, 0, 0)
        last = self.value(name, self.total_epochs - 1, max((self.total_steps or 1) - 1, 0))
        assert first is not None and last is not None
        return min(first, last)

    def __repr__(self) -> str:
        return f"Schedules({self.section!r}, total_epochs={self.total_epochs}, total_steps={self.total_steps})"
