"""Checks for the free-form settings of plugins and providers (``plugins.<name>``, ``model.attention``...): the
profile schema passes those sections through, so their owners check them when built, with messages that name the
setting. Strict on purpose: a quoted ``"false"`` is not a bool (``bool("false")`` is True), a NaN passes every
``<``/``>`` range test, and a bad value found only in the middle of a run costs the run.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

Number = Union[int, float]


def as_bool(key: str, value: Any) -> bool:
    """``value`` if it is a bool, else ValueError naming ``key``."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


def as_number(key: str, value: Any, *, integer: bool = False, low: Optional[Number] = None,
              high: Optional[Number] = None, low_open: bool = False, high_open: bool = False,
              allow_none: bool = False) -> Optional[Number]:
    """``value`` as a finite int (``integer``) or float within [low, high] (an end excluded with ``low_open`` /
    ``high_open``); None passes with ``allow_none``. Anything else (a string, a bool, NaN, inf, out of range)
    raises ValueError naming ``key`` and the expected range."""
    what = "an integer" if integer else "a finite number"
    if low is not None:
        what += f" {'>' if low_open else '>='} {low}"
    if high is not None:
        what += f"{' and' if low is not None else ''} {'<' if high_open else '<='} {high}"
    if allow_none:
        what += " or null"
    if value is None and allow_none:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"{key}: expected {what}, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise ValueError(f"{key}: expected {what}, got {value!r}")
    return int(value) if integer else float(value)
