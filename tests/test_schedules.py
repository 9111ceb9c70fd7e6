"""Schedules: enable_<plugin>_at_epoch and linear / cosine annealing by epoch or step."""
from __future__ import annotations

import math

import pytest

from apt.core.schedules import Schedules, anneal, validate_schedules


def test_enable_at_epoch():
    s = Schedules({"enable_moe_at_epoch": 2}, total_epochs=4)
    assert [s.enabled("moe", e) for e in range(4)] == [False, False, True, True]
    assert s.enabled("align", 0) and s.enable_epoch("align") == 0


def test_linear_by_epoch_reaches_end_at_last_epoch():
    s = Schedules({"cap": {"start": 2.0, "end": 1.0, "by": "epoch"}}, total_epochs=5)
    assert [s.value("cap", epoch=e) for e in range(6)] == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0, 1.0])


def test_cosine_by_step_with_window():
    s = Schedules({"t": {"start": 2.0, "end": 0.0, "by": "step", "kind": "cosine", "begin": 10, "until": 20}},
                  total_epochs=1, total_steps=100)
    assert s.value("t", step=0) == pytest.approx(2.0)
    assert s.value("t", step=10) == pytest.approx(2.0)
    assert s.value("t", step=15) == pytest.approx(1.0)
    assert s.value("t", step=12) == pytest.approx(1.0 + math.cos(math.pi * 0.2))
    assert s.value("t", step=50) == pytest.approx(0.0)
    # cosine is slower than linear near the ends
    assert s.value("t", step=11) > anneal(2.0, 0.0, 0.1, "linear")


def test_default_until_is_last_step_and_constants():
    s = Schedules({"t": {"start": 1.0, "end": 3.0, "by": "step"}, "c": 0.5}, total_steps=11)
    assert s.value("t", step=5) == pytest.approx(2.0)
    assert s.value("t", step=10) == pytest.approx(3.0)
    assert s.value("c", epoch=3, step=7) == 0.5
    assert s.value("missing", default=7.0) == 7.0 and not s.has("missing")


@pytest.mark.parametrize("section, fragment", [
    ({"x": {"start": 1}}, "missing 'end'"),
    ({"x": {"start": 1, "end": 2, "kind": "exp"}}, "x.kind"),
    ({"x": {"start": 1, "end": 2, "bogus": 1}}, "bogus"),
    ({"x": "fast"}, "schedules.x"),
    ({"enable_moe_at_epoch": 1.5}, "enable_moe_at_epoch"),
    ({"x": {"start": 1, "end": 2, "until": -3}}, "x.until"),
    ({"x": {"start": float("nan"), "end": 2}}, "x.start: expected a finite number"),
    ({"x": {"start": 1, "end": float("inf")}}, "x.end: expected a finite number"),
    ({"x": float("nan")}, "schedules.x: expected a finite number"),
])
def test_invalid(section, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_schedules(section)
