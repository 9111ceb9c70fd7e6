"""Rendering of benchmark runs: a Markdown table per (kind, mode), the JSON record, PNG plots (matplotlib, optional),
and benchmarks/RESULTS.md from the committed JSON files of GPU sessions.

Columns: ``median`` time with the inter-quartile range; the kind's metric (TFLOP/s, GB/s or tokens/s); ``% peak``
against the device's datasheet peak (compute-bound modes) or bandwidth (memory-bound modes; on the CPU the measured
copy bandwidth); ``vs ref`` = reference time / provider time (> 1: faster than the reference); ``vs best`` =
provider time / fastest time at that shape (1.00 = fastest); peak memory as defined in :mod:`apt.bench.runner`.
A run of ``apt bench --targets`` starts with a "Targets" table: each performance target of the issues, what was
measured, its threshold and MET / NOT MET / NOT MEASURABLE with the reason (:mod:`apt.bench.targets`).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

from .runner import NOISY_REL_IQR, VERDICTS, BenchResult, BenchRun, TargetResult, is_noisy

logger = logging.getLogger(__name__)


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


fmt_time = _fmt_time


def _fmt_metric(v: Optional[float], metric: str) -> str:
    if v is None:
        return "-"
    if metric == "tokens/s":
        for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if v >= div:
                return f"{v / div:.3g}{unit} tok/s"
        return f"{v:.3g} tok/s"
    return f"{v:.3g} {metric}"


def _fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if b >= div:
            v = b / div  # .3g wrote 999.5..1023 as "1e+03"
            return f"{v:.3g} {unit}" if v < 999.5 else f"{v:.0f} {unit}"
    return f"{b} B"


def _groups(results: Iterable[BenchResult]) -> "OrderedDict[tuple[str, str], list[BenchResult]]":
    out: "OrderedDict[tuple[str, str], list[BenchResult]]" = OrderedDict()
    for r in results:
        if r.mode is not None:
            out.setdefault((r.kind, r.mode), []).append(r)
    return out


def ratios(rows: list[BenchResult]) -> dict[int, tuple[Optional[float], Optional[float]]]:
    """id(row) -> (reference time / row time, row time / fastest time) among rows of the same shape."""
    by_shape: dict[str, list[BenchResult]] = {}
    for r in rows:
        by_shape.setdefault(r.shape_label, []).append(r)
    out: dict[int, tuple[Optional[float], Optional[float]]] = {}
    for same in by_shape.values():
        timed = [r for r in same if r.median_s is not None and r.status in ("ok", "unchecked")]
        ref = next((r for r in timed if r.is_reference), None)
        best = min((r.median_s for r in timed), default=None)
        for r in timed:
            out[id(r)] = (ref.median_s / r.median_s if ref is not None and r.median_s else None,
                          r.median_s / best if best else None)
    return out


def ratios_to(rows: list[BenchResult], name: str) -> dict[int, float]:
    """id(row) -> time of provider ``name`` / row time at the same shape (> 1: the row is faster than ``name``)."""
    other = {r.shape_label: r.median_s for r in rows
             if r.provider == name and r.median_s is not None and r.status in ("ok", "unchecked")}
    return {id(r): other[r.shape_label] / r.median_s for r in rows
            if r.median_s and r.shape_label in other and r.status in ("ok", "unchecked")}


def _ratio_names(kind: str) -> tuple[str, ...]:
    try:
        from .cases import get_case

        return get_case(kind).ratio_to
    except KeyError:
        return ()


def share_rows(results: list[BenchResult]) -> list[tuple[str, str, float, float, float]]:
    """Router: (shape, provider, dispatch+combine time, expert GEMM time, share) for every timed pair."""
    gemm = {r.shape_label: r.median_s for r in results
            if r.kind == "router" and r.mode == "experts" and r.median_s is not None}
    out = []
    for r in results:
        if r.kind == "router" and r.mode == "dispatch+combine" and r.median_s is not None \
                and r.shape_label in gemm and r.status in ("ok", "unchecked"):
            out.append((r.shape_label, r.provider, r.median_s, gemm[r.shape_label], r.median_s / gemm[r.shape_label]))
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def commit_text(meta: dict[str, Any]) -> str:
    """The commit of a run as the report says it: where it was read from, and the build-time commit labelled as
    such when it adds something (no checkout answered, or the working tree has moved on since the build)."""
    commit = str(meta.get("git_commit") or "unknown")
    source, built = meta.get("git_commit_source"), meta.get("build_commit")
    text = f"commit `{commit}`" + (f" ({source})" if source else "")
    if built and built != commit:
        text += f"; package built from `{built}` (recorded at build time; the working tree may differ)"
    return text


def short_commit(meta: dict[str, Any]) -> str:
    """A dozen characters of the run's commit for a table cell; the build-time one, marked, when nothing else."""
    commit = str(meta.get("git_commit") or "unknown")
    if commit == "unknown" and meta.get("build_commit"):
        return f"`{str(meta['build_commit'])[:12]}` (build)"
    return f"`{commit[:12]}`"


def target_summary(targets: Iterable[TargetResult]) -> str:
    """How many targets got each verdict, e.g. "2 MET, 1 NOT MET, 9 NOT MEASURABLE"."""
    n = {v: 0 for v in VERDICTS}
    for t in targets:
        n[t.verdict] = n.get(t.verdict, 0) + 1
    return ", ".join(f"{c} {v}" for v, c in n.items())


def targets_section(targets: list[TargetResult], h: str = "##") -> list[str]:
    """The "Targets" table (target, device, shape, measured, threshold, verdict) and the issues' wording."""
    lines = [f"{h}# Targets", "",
             f"The performance targets of the project's issues ({target_summary(targets)}); the rows they were "
             "measured from are in the tables below.", ""]
    table = []
    for t in targets:
        device = t.measured_on if t.measured_on else {"cuda": "CUDA device", "cpu": "CPU"}.get(t.device, t.device)
        verdict = f"**{t.verdict}**" + (f": {t.reason}" if t.reason else "")
        table.append([f"{t.kind}: {t.title} (#{t.issue})", device, t.shape_label, t.measured, t.threshold, verdict])
    lines += _md_table(["target", "device", "shape", "measured", "threshold", "verdict"], table)
    lines += ["", "In the issues' words:", ""]
    for issue, quote in dict.fromkeys((t.issue, t.quote) for t in targets):
        lines.append(f"- #{issue}: “{quote}”")
    lines.append("")
    return lines


def render_markdown(run: BenchRun, heading_level: int = 2, title: Optional[str] = None) -> str:
    m = run.meta
    h = "#" * heading_level
    lines = [f"{h} {title or 'apt bench'} — {m.get('device_name', '?')}", ""]
    lines.append(f"- when: {m.get('timestamp', '?')}; {commit_text(m)}; "
                 f"apt {m.get('apt', '?')}, torch {m.get('torch', '?')}, triton {m.get('triton') or 'none'}"
                 + (" (TRITON_INTERPRET=1)" if m.get("triton_interpret") else ""))
    lines.append(f"- device: {m.get('device_type', '?')}; CPU threads {m.get('cpu_threads', '?')}"
                 + (f"; grid: {'quick' if m.get('quick') else 'full'}" if "quick" in m else "")
                 + ("; shapes: the issues' performance targets (--targets)" if m.get("targets_only") else "")
                 + (f"; wall time {m['wall_s']:.1f} s" if m.get("wall_s") is not None else ""))
    if m.get("cpu_copy_bandwidth_GBps"):
        lines.append(f"- CPU peak FLOP/s unknown; memory-bound '% peak' is against a measured tensor copy "
                     f"bandwidth of {m['cpu_copy_bandwidth_GBps']:.1f} GB/s (read + write, 64 MB); shapes whose data "
                     "fits in the caches can exceed 100%")
    if m.get("device_type") == "cuda":
        pk = [f"{k} ({v['dtype']}): {v.get('tflops') or '?'} TFLOP/s, {v.get('GBps') or '?'} GB/s"
              for k, v in (m.get("peaks") or {}).items() if v.get("tflops") or v.get("GBps")]
        lines.append("- '% peak' against datasheet peaks (dense): " + "; ".join(pk) if pk else
                     "- '% peak' not given: this device is not in apt.bench.peaks.DEVICE_PEAKS")
    for kind, g in (m.get("grids") or {}).items():
        lines.append(f"- {kind} grid: {g.get('doc', '')}")
    lines.append("- columns: median time [IQR] over n timed calls; `vs ref` = reference time / time (> 1 faster); "
                 "`vs best` = time / fastest time at that shape; `vs <peer>` = that peer's time / time (> 1 faster); "
                 "`peak mem` = memory the call allocates on top of its inputs (CUDA allocator peak; on CPU peak-RSS "
                 "growth); `noisy` = IQR above "
                 f"{NOISY_REL_IQR:.0%} of the median even after more calls: its ratios may move between runs")
    lines.append("")
    if run.targets:
        lines += targets_section(run.targets, h)
    missing = [r for r in run.results if r.mode is None]
    if missing:
        lines.append(f"{h}# Providers not run")
        lines.append("")
        lines += _md_table(["kind", "provider", "status", "reason"],
                           [[r.kind, r.provider + (" (peer)" if r.is_peer else ""), r.status, r.reason or "-"]
                            for r in missing])
        lines.append("")
    for (kind, mode), rows in _groups(run.results).items():
        dtype = rows[0].dtype
        lines.append(f"{h}# {kind}: {mode} ({dtype})")
        lines.append("")
        rat = ratios(rows)
        extra = [(n, ratios_to(rows, n)) for n in _ratio_names(kind)]
        extra = [(n, d) for n, d in extra if d]
        table = []
        for r in rows:
            t = r.timing
            time_s = "-" if t is None else f"{_fmt_time(t['median_s'])} [{_fmt_time(t['q1_s'])}–" \
                                            f"{_fmt_time(t['q3_s'])}] n={t['n']}" + (" noisy" if is_noisy(t) else "")
            vs_ref, vs_best = rat.get(id(r), (None, None))
            status = r.status + (f": {r.reason}" if r.reason else "")
            if r.max_rel_err is not None and (r.max_rel_err > 0 or not r.is_reference):
                status += f" (err {r.max_rel_err:.1e})"
            table.append([r.shape_label, r.provider + (" (peer)" if r.is_peer else ""), status, time_s,
                          _fmt_metric(r.metric_value, r.metric),
                          "-" if r.pct_of_peak is None else f"{r.pct_of_peak:.1f}%",
                          "-" if vs_ref is None else f"{vs_ref:.2f}×",
                          "-" if vs_best is None else f"{vs_best:.2f}"]
                         + [f"{d[id(r)]:.2f}×" if id(r) in d else "-" for _, d in extra]
                         + [_fmt_bytes(r.peak_mem_bytes)])
        lines += _md_table(["shape", "provider", "status", "median [IQR]", rows[0].metric, "% peak", "vs ref",
                            "vs best"] + [f"vs {n}" for n, _ in extra] + ["peak mem"], table)
        lines.append("")
    shares = share_rows(run.results)
    if shares:
        lines.append(f"{h}# router: dispatch+combine time as a share of the expert GEMM time")
        lines.append("")
        lines += _md_table(["shape", "provider", "dispatch+combine", "expert GEMM", "share"],
                           [[s, p, _fmt_time(a), _fmt_time(b), f"{100 * x:.1f}%"] for s, p, a, b, x in shares])
        lines.append("")
    return "\n".join(lines)


def write_json(run: BenchRun, path: str | os.PathLike) -> Path:
    """The run as JSON. A non-finite number (an inf ``max_rel_err`` for non-finite outputs, the row's reason says
    so) is written as null: NaN and Infinity are not JSON, and strict readers (jq, JavaScript) refuse them."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_finite_only(run.as_dict()), indent=1, default=_json_default, allow_nan=False) + "\n")
    return p


def _finite_only(o: Any) -> Any:
    """``o`` with every non-finite float, at any depth, replaced by None (json.dumps writes floats itself, so its
    ``default`` never sees them)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite_only(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_only(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    # numpy scalars and the like: as numbers (non-finite ones as null, as above), not as strings the reader rejects
    if isinstance(o, numbers.Integral):
        return int(o)
    if isinstance(o, numbers.Real):
        return _finite_only(float(o))
    return str(o)


def load_json(path: str | os.PathLike) -> BenchRun:
    """Read a run ``write_json`` wrote; ValueError naming the file (and the field) when it is not one. Malformed
    rows are skipped with a warning (:meth:`BenchRun.from_dict`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    try:
        return BenchRun.from_dict(data, source=str(p))
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower() or "x"


def write_plots(run: BenchRun, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per (kind, mode): median time against the kind's sweep axis (T, L or N), log-log, one line per
    provider and fixed setting of the other shape parameters (a setting with a single point is drawn as a
    marker when no setting has more; next to lines it is left out, and the table has it).
    Returns [] with a logged note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        logger.warning("no plots: matplotlib is unavailable (%s); pip install matplotlib", exc)
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (kind, mode), rows in _groups(run.results).items():
        series: "OrderedDict[str, list[tuple[float, float]]]" = OrderedDict()
        x_name = ""
        for r in rows:
            if r.median_s is None or r.x_value is None or r.shape is None:
                continue
            x_name = r.x_name
            key = f"{r.provider} ({r.series})" if r.series else r.provider
            series.setdefault(key, []).append((float(r.x_value), r.median_s))
        if not series:
            continue
        if any(len(p) > 1 for p in series.values()):
            # sweeps along other axes (batch, dim...) are single points here: keep the lines readable
            series = OrderedDict((k, p) for k, p in series.items() if len(p) > 1)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_name)
        ax.set_ylabel("median time (s)")
        ax.set_title(f"{kind}: {mode} — {run.meta.get('device_name', '')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out / f"{_slug(kind)}_{_slug(mode)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(run: BenchRun, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Any]:
    """bench.md, bench.json and the PNGs into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "bench.md"
    md.write_text(render_markdown(run) + "\n")
    js = write_json(run, out / "bench.json")
    pngs = write_plots(run, out) if plots else []
    return {"markdown": md, "json": js, "plots": pngs}


def result_file_name(run: BenchRun) -> str:
    """benchmarks/results/ file name: device and UTC timestamp, e.g. nvidia_h100_80gb_hbm3_20261122T2100Z.json."""
    ts = re.sub(r"[^0-9T]", "", run.meta.get("timestamp", "")) or "unknown"
    return f"{_slug(run.meta.get('device_name', 'device'))}_{ts}Z.json"


NO_RESULTS_NOTE = ("No result files yet: no GPU session has run `apt bench --save` "
                   "(files land in benchmarks/results/*.json).")


class ResultsReport(NamedTuple):
    """What ``apt bench --report`` rendered: the Markdown, the files in it, and the files skipped with why."""

    text: str
    rendered: list[Path]
    skipped: list[tuple[Path, str]]


def results_report(results_dir: str | os.PathLike, source: Optional[str] = None) -> ResultsReport:
    """benchmarks/RESULTS.md from every benchmarks/results/*.json, newest first, each rendered as by ``apt bench``.
    A file that is not a valid run is skipped with a warning naming it and the bad field; the others render.
    ``source``: how the header names the directory (default benchmarks/results/, the committed one)."""
    d = Path(results_dir)
    files = sorted(d.glob("*.json")) if d.is_dir() else []
    runs, skipped = [], []
    for f in files:
        try:
            run = load_json(f)
            if not any(r.mode is not None for r in run.results):
                raise ValueError(f"{f}: no result row to render (results is empty, or every row was malformed)")
            runs.append((f, run))
            continue
        except OSError as exc:
            why = f"{f}: cannot read it ({exc.strerror or exc})"
        except ValueError as exc:  # load_json's message names the file and the field
            why = str(exc)
        logger.warning("skipping result file %s", why)
        skipped.append((f, why))
    lines = ["# Benchmark results", "",
             f"Rendered by `apt bench --report` from the JSON files in {source or 'benchmarks/results/'} (one per "
             "GPU session, written with `apt bench --save`). Do not edit by hand.", ""]
    if not runs:
        lines += [NO_RESULTS_NOTE, ""]
        return ResultsReport("\n".join(lines), [], skipped)
    runs.sort(key=lambda fr: fr[1].meta.get("timestamp", ""), reverse=True)
    lines.append("| file | device | when | commit | targets |")
    lines.append("|---|---|---|---|---|")
    for f, run in runs:
        lines.append(f"| {f.name} | {run.meta.get('device_name', '?')} | {run.meta.get('timestamp', '?')} | "
                     f"{short_commit(run.meta)} | {target_summary(run.targets) if run.targets else '-'} |")
    lines.append("")
    for f, run in runs:
        lines.append(render_markdown(run, heading_level=2, title=f.name))
        lines.append("")
    return ResultsReport("\n".join(lines), [f for f, _ in runs], skipped)


def render_results(results_dir: str | os.PathLike) -> str:
    """The text of :func:`results_report`."""
    return results_report(results_dir).text
