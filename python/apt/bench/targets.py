"""Performance targets that the project's issues set, as data, and ``apt bench --targets``.

Each benchmark case lists its targets (``BenchCase.targets()``): a :class:`Target` holds the issue's wording, the
shape, the modes and the providers (and peers) to run besides the reference, and a :class:`Check` over the rows of
that run which gives the verdict MET, NOT MET or NOT MEASURABLE with the reason (a provider or peer that is not
installed, no CUDA device, no known peak bandwidth). A provider that gives wrong results fails its target (NOT MET).

:func:`run_targets` runs each target shape once through the ordinary runner (:func:`apt.bench.runner.run_case`:
correctness check against the reference, warm-up, repeats, median) with the union of the modes and providers that
the targets at that shape need, without peak-memory calls, then evaluates each target's check on those rows.
Targets set for another device type than the run's are not run: NOT MEASURABLE, "needs a CUDA device".
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional

import torch

from . import runner as _runner
from .runner import MET, NOT_MEASURABLE, NOT_MET, VERDICTS, BenchResult, BenchRun, TargetResult

REFERENCE = "<reference>"  # in a check: the kind's reference provider, whatever its name
_TIMED = ("ok", "unchecked")


@dataclasses.dataclass(frozen=True)
class Outcome:
    verdict: str
    measured: str = "-"
    value: Optional[float] = None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Check:
    """``fn(rows, meta) -> Outcome`` over the rows of the target's run; ``threshold`` says what it asks, for the
    report."""

    threshold: str
    fn: Callable[[list[BenchResult], dict[str, Any]], Outcome]

    def __call__(self, rows: list[BenchResult], meta: dict[str, Any]) -> Outcome:
        return self.fn(rows, meta)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # stable id, e.g. "scan.cpu.fwd"
    kind: str
    device: str  # the device type it is set for: "cpu" or "cuda"
    issue: int
    quote: str  # the issue's wording
    title: str  # what is compared
    shape: dict[str, Any]
    modes: tuple[str, ...]
    providers: tuple[str, ...]  # providers and peers to run besides the reference
    check: Check

    @property
    def threshold(self) -> str:
        return self.check.threshold


# ---- picking rows ------------------------------------------------------------------------------------------
def _name(provider: str) -> str:
    return "the reference" if provider == REFERENCE else provider


def _find(rows: list[BenchResult], provider: str, mode: str) -> tuple[Optional[BenchResult], str, bool]:
    """(the timed row of ``provider`` in ``mode`` or None, why not, whether it is because it is wrong)."""
    if provider == REFERENCE:
        row = next((r for r in rows if r.mode == mode and r.is_reference), None)
        if row is None:
            return None, "no reference provider ran", False
    else:
        row = next((r for r in rows if r.mode == mode and r.provider == provider), None)
        if row is None:
            gone = next((r for r in rows if r.mode is None and r.provider == provider), None)
            if gone is not None:
                return None, f"{provider} {gone.status}: {gone.reason}", False
            return None, f"{provider} is not registered", False
    if row.status in _TIMED and row.median_s is not None:
        return row, "", False
    name = _name(provider)
    if row.status == "wrong":
        return None, f"{name} gives wrong results ({row.reason})", True
    return None, f"{name} {row.status}" + (f": {row.reason}" if row.reason else ""), False


def _best(rows: list[BenchResult], providers: Iterable[str], mode: str) -> tuple[Optional[BenchResult], list[str],
                                                                                  bool]:
    """The fastest timed row among ``providers`` in ``mode``; the reasons of those not timed; whether one is wrong."""
    found, why, wrong = [], [], False
    for p in providers:
        row, reason, bad = _find(rows, p, mode)
        if row is None:
            why.append(reason)
            wrong = wrong or bad
        else:
            found.append(row)
    best = min(found, key=lambda r: r.median_s, default=None)
    return best, why, wrong


def _fmt_s(s: float) -> str:
    from .report import fmt_time  # report imports runner only, never this module

    return fmt_time(s)


def _missing(why: list[str], wrong: bool) -> Outcome:
    return Outcome(NOT_MET if wrong else NOT_MEASURABLE, reason="; ".join(why))


def _notes(providers: tuple[str, ...], best: BenchResult, why: list[str]) -> str:
    """For a best-of check: which provider was the best, and why the others did not count."""
    if len(providers) < 2:
        return ""
    return "; ".join([f"best of {', '.join(providers)}: {best.provider}"] + why)


def _noisy_notes(*rows: BenchResult) -> list[str]:
    """A note for each row whose timing is too spread to trust a verdict that is close to its threshold."""
    out: list[str] = []
    for i, r in enumerate(rows):
        t = r.timing
        if any(r is o for o in rows[:i]):
            continue
        if _runner.is_noisy(t):
            assert t is not None
            out.append(f"{r.provider} timing noisy (IQR {_runner.rel_iqr(t):.0%} of the median)")
    return out


def _time_ratio(ours: Iterable[str], mode: str, baseline: str, baseline_mode: Optional[str], threshold: str,
                value: Callable[[float, float], float], passes: Callable[[float], bool],
                show: Callable[[float], str]) -> Check:
    ours = tuple(ours)
    bmode = baseline_mode or mode

    def fn(rows: list[BenchResult], meta: dict[str, Any]) -> Outcome:
        best, why, wrong = _best(rows, ours, mode)
        if best is None:
            return _missing(why, wrong)
        base, bwhy, bwrong = _find(rows, baseline, bmode)
        if base is None:
            return _missing([bwhy], False)
        v = value(best.median_s, base.median_s)
        measured = f"{show(v)} ({best.provider} {_fmt_s(best.median_s)}, {base.provider} {_fmt_s(base.median_s)})"
        notes = [n for n in (_notes(ours, best, why),) if n]
        notes += [f"{r.provider}: {r.status} ({r.reason})" for r in (best, base) if r.status == "unchecked"]
        notes += _noisy_notes(best, base)
        return Outcome(MET if passes(v) else NOT_MET, measured, v, "; ".join(notes))
    return Check(threshold, fn)


def _x(v: float) -> str:
    return f"{v:.2f}×" if v < 10 else f"{v:.1f}×"


def speedup(ours: Iterable[str], mode: str, baseline: str = REFERENCE, baseline_mode: Optional[str] = None, *,
            at_least: float) -> Check:
    """MET when baseline time / our time >= ``at_least`` (ours: the fastest of ``ours``)."""
    return _time_ratio(ours, mode, baseline, baseline_mode, f"≥ {at_least:g}× vs {_name(baseline)}",
                       lambda t, b: b / t, lambda v: v >= at_least, _x)


def time_within(ours: Iterable[str], mode: str, baseline: str, baseline_mode: Optional[str] = None, *,
                at_most: float) -> Check:
    """MET when our time / baseline time <= ``at_most``."""
    return _time_ratio(ours, mode, baseline, baseline_mode,
                       f"time ≤ {at_most:g}× {_name(baseline)}'s" + (f" ({baseline_mode})" if baseline_mode else ""),
                       lambda t, b: t / b, lambda v: v <= at_most, _x)


def time_share(ours: Iterable[str], mode: str, baseline: str, baseline_mode: Optional[str] = None, *,
               under: float, what: str = "") -> Check:
    """MET when our time / baseline time < ``under`` (shown as a percentage)."""
    return _time_ratio(ours, mode, baseline, baseline_mode,
                       f"< {100 * under:g}% of {what or _name(baseline)} time",
                       lambda t, b: t / b, lambda v: v < under, lambda v: f"{100 * v:.1f}%")


def bandwidth(ours: Iterable[str], mode: str, *, at_least_pct: float) -> Check:
    """MET when the fastest of ``ours`` moves >= ``at_least_pct`` % of the device's datasheet memory bandwidth
    (:mod:`apt.bench.peaks`), from the case's byte count (the GB/s column)."""
    ours = tuple(ours)

    def fn(rows: list[BenchResult], meta: dict[str, Any]) -> Outcome:
        if meta.get("device_type") != "cuda":
            return Outcome(NOT_MEASURABLE, reason="HBM bandwidth: needs a CUDA device")
        best, why, wrong = _best(rows, ours, mode)
        if best is None:
            return _missing(why, wrong)
        peak = ((meta.get("peaks") or {}).get(best.kind) or {}).get("GBps")
        if not peak:
            return Outcome(NOT_MEASURABLE, reason=f"no peak bandwidth known for this device "
                                                  f"({meta.get('device_name', '?')}; apt.bench.peaks.DEVICE_PEAKS)")
        if best.metric != "GB/s" or best.metric_value is None:
            return Outcome(NOT_MEASURABLE, reason=f"{best.provider}: no GB/s figure for mode {mode}")
        v = 100.0 * best.metric_value / peak
        measured = f"{v:.1f}% ({best.metric_value:.4g} of {peak:.4g} GB/s, {best.provider})"
        notes = "; ".join(n for n in [_notes(ours, best, why)] + _noisy_notes(best) if n)
        return Outcome(MET if v >= at_least_pct else NOT_MET, measured, v, notes)
    return Check(f"≥ {at_least_pct:g}% of HBM bandwidth", fn)


# ---- the run -----------------------------------------------------------------------------------------------
def all_targets(kinds: Iterable[str], cases: Optional[dict[str, Any]] = None) -> list[Target]:
    from .cases import get_case

    out: list[Target] = []
    for kind in kinds:
        case = cases[kind] if cases and kind in cases else get_case(kind)
        out.extend(case.targets())
    return out


def _result(t: Target, label: str, outcome: Outcome, measured_on: str = "") -> TargetResult:
    return TargetResult(name=t.name, kind=t.kind, device=t.device, issue=t.issue, quote=t.quote, title=t.title,
                        shape=dict(t.shape), shape_label=label, modes=list(t.modes), providers=list(t.providers),
                        threshold=t.threshold, verdict=outcome.verdict, measured=outcome.measured,
                        value=outcome.value, reason=outcome.reason, measured_on=measured_on)


def not_run_reason(target_device: str, device: torch.device) -> str:
    if target_device == "cuda":
        return "needs a CUDA device" + (" (run with --device cuda)" if torch.cuda.is_available() else "")
    return f"a {target_device.upper()} target (run with --device {target_device})"


def evaluate(t: Target, rows: list[BenchResult], meta: dict[str, Any], label: str = "") -> TargetResult:
    """The verdict of ``t`` on the rows of its run (a check that raises reads NOT MEASURABLE, with the error)."""
    try:
        outcome = t.check(rows, meta)
    except Exception as exc:
        outcome = Outcome(NOT_MEASURABLE, reason=f"the check failed: {type(exc).__name__}: {exc}")
    if outcome.verdict not in VERDICTS:
        raise ValueError(f"target {t.name}: verdict {outcome.verdict!r} is none of {VERDICTS}")
    return _result(t, label, outcome, measured_on=str(meta.get("device_name", "")))


def run_targets(kinds: Iterable[str] = ("attention", "router", "scan"), device: torch.device | str = "cpu", *,
                targets: Optional[list[Target]] = None, registry: Any = None, cases: Optional[dict[str, Any]] = None,
                dtype: Optional[torch.dtype] = None, warmup: Optional[int] = None, repeats: Optional[int] = None,
                budget_s: Optional[float] = None, progress: Optional[Callable[[str], None]] = None,
                measure_cpu_bandwidth: bool = True) -> BenchRun:
    """Run the targets of ``kinds`` (or ``targets``) that are set for ``device``'s type, one runner call per shape,
    and return the run with its rows and a verdict per target (those of other device types NOT MEASURABLE)."""
    from .cases import get_case

    device = torch.device(device)
    kinds = list(kinds)
    todo = all_targets(kinds, cases) if targets is None else list(targets)
    names = [t.name for t in todo]
    if len(set(names)) != len(names):
        raise ValueError(f"targets: names must be unique, got {names}")
    kinds = list(dict.fromkeys(kinds + [t.kind for t in todo]))
    meta = _runner.run_meta(kinds, device, registry=registry, cases=cases, dtype=dtype,
                            measure_cpu_bandwidth=measure_cpu_bandwidth)
    meta["targets_only"] = True

    def case_of(kind: str) -> Any:
        return cases[kind] if cases and kind in cases else get_case(kind)

    groups: "OrderedDict[tuple[str, str], list[Target]]" = OrderedDict()
    for t in todo:
        if t.device == device.type:
            groups.setdefault((t.kind, case_of(t.kind).label(t.shape)), []).append(t)
    results: list[BenchResult] = []
    seen_missing: set[tuple[str, str]] = set()
    verdicts: dict[str, TargetResult] = {}
    t0 = time.perf_counter()
    for (kind, label), ts in groups.items():
        case = case_of(kind)
        modes = [m for m in case.modes if any(m in t.modes for t in ts)]
        providers = list(dict.fromkeys(p for t in ts for p in t.providers))
        rows = _runner.run_case(case, device, registry=registry, providers=providers, dtype=dtype,
                                shapes=[dict(ts[0].shape)], modes=modes, warmup=warmup, repeats=repeats,
                                budget_s=budget_s, include_peers=True, measure_memory=False, progress=progress)
        for r in rows:
            if r.mode is None:  # an unavailable provider: listed once per kind, not once per target shape
                if (r.kind, r.provider) in seen_missing:
                    continue
                seen_missing.add((r.kind, r.provider))
            results.append(r)
        grid = meta["grids"].setdefault(kind, {"shapes": [], "doc": ""})
        grid["shapes"].append(label)
        grid["doc"] = "the issues' target shapes: " + "; ".join(grid["shapes"])
        for t in ts:
            verdicts[t.name] = evaluate(t, rows, meta, label)
    meta["wall_s"] = time.perf_counter() - t0
    out = [verdicts.get(t.name) or _result(t, case_of(t.kind).label(t.shape),
                                           Outcome(NOT_MEASURABLE, reason=not_run_reason(t.device, device)))
           for t in todo]
    return BenchRun(meta=meta, results=results, targets=out)

