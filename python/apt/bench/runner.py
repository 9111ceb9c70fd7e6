"""The benchmark runner: for each kind, each shape of its grid and each provider (plus optional peers such as
flash-attn or mamba_ssm), check the provider against the reference on the same inputs, then time it.

Timing: ``warmup`` untimed calls (Triton compiles, caches warm), then up to ``repeats`` timed calls, each timed on
its own (CUDA events around the call on GPU, ``time.perf_counter`` on CPU) so the median and the inter-quartile
range describe the spread; a per-measurement time budget lowers the number of repeats for slow calls (never below
``min_repeats``), and a correctness call slower than the budget counts as the warm-up (no untimed call more).
A measurement whose IQR exceeds ``NOISY_REL_IQR`` of its median takes more calls while the budget allows (up to
``NOISY_EXTRA`` times ``repeats`` in all); if it stays that spread it is marked noisy in the report, whose ratios
then deserve less trust. On CUDA the L2 cache is flushed before every timed call (a write of twice its size,
outside the timed events, as triton.testing.do_bench does), so small shapes are not timed from a warm L2 that a
model's real call would not find.

Correctness gate: a provider whose outputs (and gradients, for fwd+bwd modes) differ from the reference's beyond
:func:`apt_kernels.testing.tolerance` is reported as ``wrong`` with its error and is not timed. When the reference
itself cannot run a shape (out of memory, too slow) the provider is timed and reported as ``unchecked``.

Peak memory (``peak_mem_bytes``), measured on one extra call after timing:
  * CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated just before it, i.e. the
    temporaries and outputs the call allocates on top of its inputs (the caching allocator's reserved memory is not
    counted);
  * CPU (Linux): the growth of the process's peak resident set (``VmHWM`` in /proc/self/status, reset through
    /proc/self/clear_refs just before the call) over the resident set before it. This counts pages the call touches
    that were not resident: the C heap's free pages are first handed back to the OS (glibc ``malloc_trim``), so
    the memory the timed calls freed is counted again, not reused unseen. Page-granular, and it includes pages
    other threads touch meanwhile; without glibc, memory the allocator reuses reads as 0. ``None`` where /proc is
    unavailable.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from apt_kernels.backends import triton_interpret

from ..core import registry as _registry
from . import peaks as _peaks
from . import peers as _peers
from .cases import CASES, BenchCase, get_case

logger = logging.getLogger(__name__)

STATUSES = ("ok", "unchecked", "wrong", "unsupported", "unavailable", "error", "skipped")
MET, NOT_MET, NOT_MEASURABLE = "MET", "NOT MET", "NOT MEASURABLE"
VERDICTS = (MET, NOT_MET, NOT_MEASURABLE)  # of a performance target (apt.bench.targets)


# ---- timing ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TimingStats:
    """Per-call times in seconds and their summary (median, quartiles by linear interpolation)."""

    times: list[float]
    warmup: int = 0
    l2_flushed: bool = False

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def q1(self) -> float:
        return _quantile(self.times, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.times, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    @property
    def noisy(self) -> bool:
        return is_noisy(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "iqr_s": self.iqr, "min_s": self.min,
                "max_s": self.max, "mean_s": self.mean, "n": self.n, "warmup": self.warmup,
                "times_s": list(self.times), "l2_flushed": self.l2_flushed}


NOISY_REL_IQR = 0.25  # IQR above a quarter of the median: the median may move that much between runs
NOISY_EXTRA = 3  # a noisy measurement takes up to this many times `repeats` calls, budget allowing


def rel_iqr(timing: dict[str, Any]) -> float:
    """A row's IQR / median (``TimingStats.as_dict``, also as read back from a JSON file, which may lack iqr_s)."""
    return (timing["q3_s"] - timing["q1_s"]) / timing["median_s"]


def is_noisy(timing: Optional[dict[str, Any]]) -> bool:
    """Whether a row's timing is too spread to trust its ratios: IQR above ``NOISY_REL_IQR`` of the median, with
    at least 3 calls (fewer have no spread to judge)."""
    if not timing or timing.get("n", 0) < 3 or not timing.get("median_s"):
        return False
    return rel_iqr(timing) > NOISY_REL_IQR


def _quantile(xs: Sequence[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's default method)."""
    if not xs:
        raise ValueError("times: need at least one measurement")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_BUFFERS: dict[Any, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> Optional[torch.Tensor]:
    """A buffer twice the device's L2 size (256 MiB when the size is unknown), one per device, kept for the run."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _L2_BUFFERS.get(idx)
    if buf is None:
        l2 = int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 0)
        nbytes = 2 * l2 if l2 > 0 else 256 << 20
        buf = _L2_BUFFERS[idx] = torch.empty(nbytes // 4, dtype=torch.int32, device=torch.device("cuda", idx))
    return buf


def time_fn(fn: Callable[[], Any], device: torch.device | str = "cpu", *, warmup: int = 2, repeats: int = 10,
            min_repeats: int = 3, budget_s: Optional[float] = None, flush_l2: bool = True,
            clock: Callable[[], float] = time.perf_counter) -> TimingStats:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` individually timed calls (fewer when the calls
    would exceed ``budget_s`` in total, but at least ``min_repeats``; more, up to ``NOISY_EXTRA * repeats``, while
    they are noisy and the budget allows). On CUDA with ``flush_l2`` the L2 cache is overwritten before each timed
    call, outside the timed events."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    for i in range(max(0, warmup)):
        t0 = clock()
        fn()
        _sync(device)
        # the first call pays for compilation; after a warm call slower than the whole budget, more warm-up is waste
        if i >= 1 and budget_s is not None and clock() - t0 > budget_s:
            break
    flush = _l2_flush_buffer(device) if flush_l2 else None
    _sync(device)
    times: list[float] = []
    spent = 0.0
    n_target = repeats
    while True:
        while len(times) < n_target:
            if device.type == "cuda":
                if flush is not None:
                    flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = clock()
                fn()
                dt = clock() - t0
            times.append(dt)
            spent += dt
            if budget_s is not None and len(times) == 1:
                # one call tells how many fit in the budget
                fit = int(budget_s / max(dt, 1e-9))
                n_target = max(min(repeats, min_repeats), min(repeats, fit))
        stats = TimingStats(times, warmup=max(0, warmup), l2_flushed=flush is not None)
        cap = NOISY_EXTRA * repeats
        if len(times) >= cap or len(times) < 3 or not stats.noisy:
            return stats
        # noisy: take as many calls again (up to the cap), if they fit in what is left of the budget
        more = min(len(times), cap - len(times))
        if budget_s is not None:
            more = min(more, int((budget_s - spent) / max(stats.mean, 1e-9)))  # the mean: what calls cost
        if more < 1:
            return stats
        n_target = len(times) + more


# ---- peak memory -------------------------------------------------------------------------------------------
_KB = re.compile(r"^(VmHWM|VmRSS):\s+(\d+)\s+kB", re.M)


def _proc_mem() -> Optional[dict[str, int]]:
    try:
        with open("/proc/self/status") as f:
            found = {k: int(v) * 1024 for k, v in _KB.findall(f.read())}
    except OSError:
        return None
    return found if len(found) == 2 else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


_libc_trim: Any = None


def _malloc_trim() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``), so that memory freed by the timed
    calls is faulted in afresh by the measured one and shows in its peak RSS; False where there is no glibc."""
    global _libc_trim
    if _libc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _libc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc_trim = False
    if not _libc_trim:
        return False
    _libc_trim(0)
    return True


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> Optional[int]:
    """Bytes one call of ``fn`` needs on top of what was allocated before it (see the module docstring for what
    this means on CUDA and on CPU); None when it cannot be measured here."""
    device = torch.device(device)
    reset = getattr(fn, "reset", None)
    if reset is not None:
        reset()  # drop state the timed calls left behind (gradients), so it is not counted as "before"
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return max(0, int(peak - before))
    # without this, the call reuses the pages the timed calls freed and reads as 0 bytes
    _malloc_trim()
    if not _reset_peak_rss():
        return None
    base = _proc_mem()
    if base is None:
        return None
    out = fn()
    after = _proc_mem()
    del out
    if after is None:
        return None
    return max(0, after["VmHWM"] - base["VmRSS"])


# ---- results -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchResult:
    """One (kind, mode, shape, provider) measurement, or one provider that could not run at all (shape None)."""

    kind: str
    mode: Optional[str]
    provider: str
    status: str
    reason: str = ""
    shape: Optional[dict[str, Any]] = None
    shape_label: str = ""
    x_name: str = ""
    x_value: Optional[float] = None
    series: str = ""
    dtype: str = ""
    device: str = ""
    is_reference: bool = False
    is_peer: bool = False
    max_rel_err: Optional[float] = None
    tolerance: Optional[dict[str, float]] = None
    timing: Optional[dict[str, Any]] = None
    peak_mem_bytes: Optional[int] = None
    work: dict[str, float] = dataclasses.field(default_factory=dict)
    metric: str = ""
    metric_value: Optional[float] = None
    pct_of_peak: Optional[float] = None

    @property
    def median_s(self) -> Optional[float]:
        return None if self.timing is None else self.timing["median_s"]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TargetResult:
    """The verdict on one performance target of an issue (see :mod:`apt.bench.targets`): MET, NOT MET or
    NOT MEASURABLE, what was measured against which threshold, and why when it could not be measured."""

    name: str
    kind: str
    device: str  # the device type the target is set for: "cpu" or "cuda"
    issue: int
    quote: str  # the issue's wording
    title: str  # what is compared, e.g. "cpu_native vs reference, fwd"
    shape: dict[str, Any]
    shape_label: str
    modes: list[str]
    providers: list[str]
    threshold: str
    verdict: str
    measured: str = "-"
    value: Optional[float] = None
    reason: str = ""
    measured_on: str = ""  # the device name of the run, when the target was run

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- reading a run back (bench.json, benchmarks/results/*.json) ---------------------------------------------
# A field's check: (what it must be, for the message; test). Rows are checked on load so that the report only ever
# formats well-formed values (a string median or a NaN time used to end `apt bench --report` in a traceback).
_Check = tuple[str, Callable[[Any], bool]]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _num(v) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_STR: _Check = ("a string", lambda v: isinstance(v, str))
_OPT_STR: _Check = ("a string or null", lambda v: v is None or isinstance(v, str))
_BOOL: _Check = ("true or false", lambda v: isinstance(v, bool))
_INT: _Check = ("an integer", _int)
_OBJ: _Check = ("an object", lambda v: isinstance(v, dict))
_OPT_OBJ: _Check = ("an object or null", lambda v: v is None or isinstance(v, dict))
_LIST: _Check = ("a list", lambda v: isinstance(v, list))
_OPT_LIST: _Check = ("a list or null", lambda v: v is None or isinstance(v, list))
# max_rel_err and a target's value may be inf in memory (non-finite outputs); files of older writers hold Infinity
_OPT_NUM: _Check = ("a number or null", lambda v: v is None or _num(v))
_OPT_FINITE: _Check = ("a finite number or null", lambda v: v is None or _finite(v))
_OPT_BYTES: _Check = ("an integer >= 0 or null", lambda v: v is None or (_int(v) and v >= 0))
_SECONDS: _Check = ("a finite number of seconds > 0", lambda v: _finite(v) and v > 0)
_COUNT: _Check = ("an integer >= 1", lambda v: _int(v) and v >= 1)

_RESULT_FIELDS: dict[str, _Check] = {
    "kind": _STR, "mode": _OPT_STR, "provider": _STR, "status": _STR, "reason": _STR, "shape": _OPT_OBJ,
    "shape_label": _STR, "x_name": _STR, "x_value": _OPT_FINITE, "series": _STR, "dtype": _STR, "device": _STR,
    "is_reference": _BOOL, "is_peer": _BOOL, "max_rel_err": _OPT_NUM, "tolerance": _OPT_OBJ, "timing": _OPT_OBJ,
    "peak_mem_bytes": _OPT_BYTES, "work": _OBJ, "metric": _STR, "metric_value": _OPT_FINITE,
    "pct_of_peak": _OPT_FINITE,
}
_TIMING_FIELDS: dict[str, _Check] = {"median_s": _SECONDS, "q1_s": _SECONDS, "q3_s": _SECONDS, "n": _COUNT}
_TARGET_FIELDS: dict[str, _Check] = {
    "name": _STR, "kind": _STR, "device": _STR, "issue": _INT, "quote": _STR, "title": _STR, "shape": _OBJ,
    "shape_label": _STR, "modes": _LIST, "providers": _LIST, "threshold": _STR, "verdict": _STR, "measured": _STR,
    "value": _OPT_NUM, "reason": _STR, "measured_on": _STR,
}
# meta fields the report formats or sorts by; absent is fine (the report says "?"), a wrong type is not
_META_FIELDS: dict[str, _Check] = {
    "timestamp": _STR, "wall_s": _OPT_FINITE, "cpu_copy_bandwidth_GBps": _OPT_FINITE, "grids": _OPT_OBJ,
    "peaks": _OPT_OBJ,
}
_PEAK_FIELDS: dict[str, _Check] = {"dtype": _STR, "tflops": _OPT_NUM, "GBps": _OPT_NUM}


def _json_type(v: Any) -> str:
    """``v`` as a message names it: null, a list, the string 'fast', the number nan..."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if _num(v):
        return f"the number {v!r}"
    return {dict: "an object", list: "a list"}.get(type(v), type(v).__name__)


def _check_fields(d: dict[str, Any], checks: dict[str, _Check], where: str, required: Iterable[str] = ()) -> None:
    """Raise ValueError naming ``where + field``, what it must be and what it is, for the first bad field of ``d``."""
    for name in required:
        if name not in d:
            raise ValueError(f"{where}{name}: missing (expected {checks[name][0]})")
    for name, (expected, ok) in checks.items():
        if name in d and not ok(d[name]):
            raise ValueError(f"{where}{name}: expected {expected}, got {_json_type(d[name])}")


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _result_from_dict(r: Any) -> "BenchResult":
    if not isinstance(r, dict):
        raise ValueError(f"expected an object (one result row), got {_json_type(r)}")
    _check_fields(r, _RESULT_FIELDS, "", _required(BenchResult))
    if r.get("timing") is not None:
        _check_fields(r["timing"], _TIMING_FIELDS, "timing.", _TIMING_FIELDS)
    return BenchResult(**{k: v for k, v in r.items() if k in _RESULT_FIELDS})


def _target_from_dict(t: Any) -> "TargetResult":
    if not isinstance(t, dict):
        raise ValueError(f"expected an object (one target), got {_json_type(t)}")
    _check_fields(t, _TARGET_FIELDS, "", _required(TargetResult))
    return TargetResult(**{k: v for k, v in t.items() if k in _TARGET_FIELDS})


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ValueError(f"meta: expected an object, got {_json_type(meta)}")
    _check_fields(meta, _META_FIELDS, "meta.")
    for kind, grid in (meta.get("grids") or {}).items():
        if not isinstance(grid, dict):
            raise ValueError(f"meta.grids.{kind}: expected an object (shapes, doc), got {_json_type(grid)}")
    for kind, peak in (meta.get("peaks") or {}).items():
        if not isinstance(peak, dict):
            raise ValueError(f"meta.peaks.{kind}: expected an object (dtype, tflops, GBps), got {_json_type(peak)}")
        _check_fields(peak, _PEAK_FIELDS, f"meta.peaks.{kind}.", ("dtype",))
    return dict(meta)


def _entries(items: list[Any], parse: Callable[[Any], Any], field: str, source: str) -> list[Any]:
    """The well-formed entries of ``items``; each malformed one is skipped with a warning naming its index."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse(item))
        except ValueError as exc:
            logger.warning("%s: skipping %s[%d]: %s", source, field, i, exc)
    return out


@dataclasses.dataclass
class BenchRun:
    meta: dict[str, Any]
    results: list[BenchResult]
    targets: Optional[list[TargetResult]] = None  # set by `apt bench --targets`

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"meta": self.meta, "results": [r.as_dict() for r in self.results]}
        if self.targets is not None:
            d["targets"] = [t.as_dict() for t in self.targets]
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "bench run") -> "BenchRun":
        """The run ``as_dict`` wrote. A malformed run (not an object, no results list, a meta field of the wrong
        type) raises ValueError naming the field; a malformed result row or target is skipped with a warning
        naming ``source`` (the file) and its index. What comes back is well-formed: timings finite and > 0,
        numbers are numbers, strings strings."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object with meta and results, got {_json_type(d)}")
        meta = _check_meta(d.get("meta", {}))
        _check_fields(d, {"results": _LIST, "targets": _OPT_LIST}, "", ("results",))
        targets = None if d.get("targets") is None else _entries(d["targets"], _target_from_dict, "targets", source)
        return cls(meta=meta, results=_entries(d["results"], _result_from_dict, "results", source), targets=targets)


# ---- correctness -------------------------------------------------------------------------------------------
def compare_outputs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype: torch.dtype,
                    family: str) -> tuple[bool, float, str, dict[str, float]]:
    """(ok, worst max-relative error, reason, tolerance) comparing named outputs; names starting with ``grad_`` use
    the gradient tolerance. Uses the project's one tolerance table (apt_kernels.testing)."""
    from apt_kernels.testing import max_rel_error, tolerance

    worst, bad = 0.0, []
    tol_out = tolerance(dtype, family)
    for name, exp in expected.items():
        tol = tolerance(dtype, family, grad=name.startswith("grad_"))
        act = actual.get(name)
        if act is None:
            bad.append(f"{name}: missing")
            continue
        if tuple(act.shape) != tuple(exp.shape):
            bad.append(f"{name}: shape {tuple(act.shape)} != reference {tuple(exp.shape)}")
            continue
        a, e = act.detach().double(), exp.detach().double()
        if not torch.isfinite(a).all() and torch.isfinite(e).all():
            bad.append(f"{name}: non-finite values")
            worst = math.inf
            continue
        err = max_rel_error(a, e)
        worst = max(worst, err)
        if not torch.allclose(a, e, atol=tol["atol"], rtol=tol["rtol"]):
            absdiff = float((a - e).abs().max())
            bad.append(f"{name}: max abs diff {absdiff:.3g} (max rel {err:.3g}) beyond atol={tol['atol']:g} "
                       f"rtol={tol['rtol']:g}")
    if len(bad) > 3:
        bad = bad[:3] + [f"and {len(bad) - 3} more"]
    return (not bad), worst, "; ".join(bad), tol_out


_HALF = (torch.float16, torch.bfloat16)


def upcast(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with fp16/bf16 tensors converted to fp32 (other entries unchanged)."""
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype in _HALF else v) for k, v in inputs.items()}


# ---- environment -------------------------------------------------------------------------------------------
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _git(path: str, *args: str) -> Optional[str]:
    import subprocess

    try:
        r = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _checkout_commit(path: str) -> Optional[str]:
    """HEAD of the git checkout holding ``path``, with "+dirty" when tracked files have local changes."""
    sha = _git(path, "rev-parse", "HEAD")
    if not sha:
        return None
    dirty = _git(path, "status", "--porcelain", "--untracked-files=no")
    return sha + ("+dirty" if dirty else "")


def _project_checkout(path: str) -> Optional[str]:
    """The top of the git checkout holding ``path`` when that checkout is this project's (its pyproject.toml names
    the apt-kernels distribution), else None: never the commit of some unrelated repository around a venv."""
    top = _git(path, "rev-parse", "--show-toplevel")
    if not top:
        return None
    try:
        with open(os.path.join(top, "pyproject.toml"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    return top if re.search(r'(?m)^name\s*=\s*"apt-kernels"\s*$', text) else None


def build_commit() -> Optional[str]:
    """The commit the installed package was built from (recorded in apt_kernels/_build_info.py by the wheel build,
    with "+dirty" for uncommitted changes then), or None for an in-place build or one from outside a checkout."""
    import importlib

    try:
        _build_info = importlib.import_module("apt_kernels._build_info")
    except ImportError:
        return None
    sha = getattr(_build_info, "GIT_COMMIT", None)
    if not sha:
        return None
    return str(sha) + ("+dirty" if getattr(_build_info, "GIT_DIRTY", False) else "")


def commit_info(cwd: Optional[str] = None) -> dict[str, Optional[str]]:
    """Which commit a run comes from, and how that is known:

    * ``git_commit``: the checkout holding the running package (a source tree or an editable install:
      ``git_commit_source`` "package checkout"), else the checkout of the working directory when it is this
      project's (after a plain ``pip install .`` run inside the checkout: "working-directory checkout"; the
      installed package may have been built from another commit), else ``$APT_GIT_COMMIT`` when it looks like a
      commit (a copy of the tree without .git, as on the GPU device tool: "APT_GIT_COMMIT"), else "unknown"
      (source None);
    * ``build_commit``: the commit the installed package was built from, whatever the working tree holds now; None
      without a wheel's record."""
    out: dict[str, Optional[str]] = {"git_commit": "unknown", "git_commit_source": None,
                                     "build_commit": build_commit()}
    top = _project_checkout(_PACKAGE_DIR)
    # the package must be the checkout's own python/apt, not a venv's site-packages that happens to lie inside it
    if top and Path(_PACKAGE_DIR).resolve().is_relative_to(Path(top).resolve() / "python" / "apt"):
        out["git_commit"], out["git_commit_source"] = _checkout_commit(top) or "unknown", "package checkout"
        return out
    top = _project_checkout(cwd or os.getcwd())
    if top:
        out["git_commit"], out["git_commit_source"] = _checkout_commit(top) or "unknown", "working-directory checkout"
        return out
    # a copy of the tree without its .git (the GPU device tool's): the caller names the commit it sent
    given = os.environ.get("APT_GIT_COMMIT", "").strip()
    if re.fullmatch(r"[0-9a-f]{7,40}(\+dirty)?", given):
        out["git_commit"], out["git_commit_source"] = given, "APT_GIT_COMMIT"
    return out


def git_commit(start: Optional[str] = None) -> str:
    """The commit of the checkout holding ``start`` ("+dirty" with local changes; "unknown" outside a checkout),
    or without ``start`` the one :func:`commit_info` reports."""
    if start is not None:
        return _checkout_commit(start) or "unknown"
    return commit_info()["git_commit"] or "unknown"


def auto_threads() -> int:
    """CPU threads for timing: torch's default, lowered to the cores that are idle right now (cpu_count minus the
    1-minute load average). On a busy machine, intra-op threads wait on each other at every barrier while the
    cores serve other processes, and a 25 µs op can read as 12 ms; one thread per idle core avoids that."""
    n = torch.get_num_threads()
    try:
        idle = (os.cpu_count() or n) - os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    return max(1, min(n, int(idle + 0.5)))


def environment(device: torch.device) -> dict[str, Any]:
    import datetime
    import platform

    from apt_kernels import backends

    try:
        import apt

        apt_version = getattr(apt, "__version__", "unknown")
    except Exception:  # pragma: no cover - apt is importable whenever this module is
        apt_version = "unknown"
    meta: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "device_name": _peaks.device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": backends.triton_version(),
        "triton_interpret": backends.triton_interpret(),
        "apt": apt_version,
        **commit_info(),
    }
    return meta


# ---- the run -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Candidate:
    name: str
    impl: Any  # a Provider instance or a peer adapter
    is_reference: bool
    is_peer: bool
    checked: bool = True  # False for peers with different semantics: timed, reported "unchecked"
    note: str = ""


def check_provider_names(kinds: Iterable[str], providers: Optional[Iterable[str]],
                         registry: Optional[_registry.Registry] = None) -> None:
    """Raise ``ValueError`` when a name in ``providers`` is neither a provider nor a peer of any of ``kinds``
    (a name valid for one of the kinds is fine: ``--kind all --providers cpu_native``). The message lists the
    unknown names and the valid ones of each kind."""
    if providers is None:
        return
    reg = registry if registry is not None else _registry.REGISTRY
    kinds = list(kinds)
    valid: dict[str, list[str]] = {}
    for kind in kinds:
        names = [i.name for i in reg.list_providers(kind)]
        valid[kind] = names + [p.name for p in _peers.peers_for(kind) if p.name not in names]
    known = {n for names in valid.values() for n in names}
    unknown = [n for n in dict.fromkeys(providers) if n not in known]
    if unknown:
        listing = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in valid.items())
        raise ValueError(f"providers: unknown name(s) {', '.join(repr(n) for n in unknown)} for kind(s) "
                         f"{', '.join(kinds)}; valid names (providers and peers) are {listing}")


def _candidates(case: BenchCase, reg: _registry.Registry, device: torch.device, providers: Optional[Iterable[str]],
                include_peers: bool) -> tuple[list[_Candidate], list[BenchResult]]:
    wanted = set(providers) if providers is not None else None
    ref_name = reg.default_name(case.kind)
    out: list[_Candidate] = []
    missing: list[BenchResult] = []
    infos = reg.list_providers(case.kind)
    if not infos:
        missing.append(BenchResult(kind=case.kind, mode=None, provider="-", status="unavailable",
                                   reason=f"no provider of kind {case.kind!r} is registered", device=str(device)))
    for info in infos:
        if wanted is not None and info.name not in wanted and info.name != ref_name:
            continue
        if not info.available:
            missing.append(BenchResult(kind=case.kind, mode=None, provider=info.name, status="unavailable",
                                       reason=info.reason, device=str(device)))
            continue
        if (device.type == "cpu" and "triton" in info.name and wanted is None
                and triton_interpret()):
            missing.append(BenchResult(kind=case.kind, mode=None, provider=info.name, status="skipped",
                                       reason="TRITON_INTERPRET=1: its timing would measure Triton's interpreter "
                                              "(name it in --providers to run it anyway)", device=str(device)))
            continue
        try:
            impl = reg.get(case.kind, info.name, strict=True)
        except Exception as exc:
            missing.append(BenchResult(kind=case.kind, mode=None, provider=info.name, status="error",
                                       reason=f"{type(exc).__name__}: {exc}", device=str(device)))
            continue
        out.append(_Candidate(info.name, impl, is_reference=(info.name == ref_name), is_peer=False))
    if include_peers:
        for peer in _peers.peers_for(case.kind):
            if wanted is not None and peer.name not in wanted:
                continue
            ok, why = peer.available(device)
            if not ok:
                missing.append(BenchResult(kind=case.kind, mode=None, provider=peer.name, status="unavailable",
                                           reason=why, device=str(device), is_peer=True))
                continue
            out.append(_Candidate(peer.name, peer, is_reference=False, is_peer=True, checked=peer.checked,
                                  note=peer.note))
    # the reference first: its outputs are the yardstick for the others
    out.sort(key=lambda c: (not c.is_reference, c.is_peer, c.name))
    return out, missing


def _err(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) < 300 else msg[:297] + "..."


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: BenchCase, device: torch.device | str = "cpu", *, quick: bool = False,
             registry: Optional[_registry.Registry] = None, providers: Optional[Iterable[str]] = None,
             dtype: Optional[torch.dtype] = None, shapes: Optional[list[dict[str, Any]]] = None,
             modes: Optional[Iterable[str]] = None, warmup: Optional[int] = None, repeats: Optional[int] = None,
             budget_s: Optional[float] = None, include_peers: bool = True, max_shapes: Optional[int] = None,
             measure_memory: bool = True, progress: Optional[Callable[[str], None]] = None) -> list[BenchResult]:
    """Benchmark every available provider of ``case.kind`` on its grid; see the module docstring."""
    device = torch.device(device)
    reg = registry if registry is not None else _registry.REGISTRY
    dtype = dtype or case.default_dtype(device)
    warmup = (1 if quick else 2) if warmup is None else warmup
    repeats = (5 if quick else 10) if repeats is None else repeats
    budget_s = (0.5 if quick else 2.0) if budget_s is None else budget_s
    grid = shapes if shapes is not None else case.grid(device, quick)
    if max_shapes is not None:
        grid = grid[:max_shapes]
    mode_list = [m for m in case.modes if modes is None or m in set(modes)]
    cands, results = _candidates(case, reg, device, providers, include_peers)
    say = progress or (lambda s: logger.info("%s", s))
    peak_flops, peak_bw = _peaks.device_peaks(device, dtype)
    ref = next((c for c in cands if c.is_reference), None)
    if ref is None:
        say(f"{case.kind}: no reference provider available; providers are timed unchecked")
    for shape in grid:
        inputs = case.make_inputs(shape, device, dtype, seed=0)
        x_name, x_value = case.x_axis(shape)
        for mode in mode_list:
            base = dict(kind=case.kind, mode=mode, shape=dict(shape), shape_label=case.label(shape), x_name=x_name,
                        x_value=x_value, series=case.series(shape), dtype=str(dtype).replace("torch.", ""),
                        device=str(device),
                        metric=case.metric(mode), work=case.work(shape, mode, dtype))
            expected: Optional[dict[str, torch.Tensor]] = None
            ref_problem = "no reference provider" if ref is None else ""
            mode_cands = cands
            if mode in case.provider_independent_modes:
                # e.g. the expert GEMM of the router: the same torch op whichever provider routes
                mode_cands = [c for c in cands if c.is_reference][:1]
            for cand in mode_cands:
                label = case.provider_label(cand.name, mode)
                row = BenchResult(provider=label, status="", is_reference=cand.is_reference, is_peer=cand.is_peer,
                                  **base)
                results.append(row)
                say(f"{case.kind} {mode} {row.shape_label} {label}")
                try:
                    why_not = case.unsupported(cand.impl, inputs, mode)
                except Exception as exc:
                    why_not = [f"supports() raised {_err(exc)}"]
                if why_not:
                    row.status, row.reason = "unsupported", "; ".join(why_not)
                    continue
                # correctness gate, on the same inputs as the timing
                ref_got, fp32_note = None, ""
                try:
                    t_check = time.perf_counter()
                    got = case.outputs(cand.impl, inputs, mode)
                    _sync(device)
                    check_s = time.perf_counter() - t_check
                    if cand.is_reference and dtype in _HALF:
                        # the yardstick is the reference run in fp32 on the same (upcast) inputs, so the half
                        # reference's own rounding is not charged to the provider under test
                        try:
                            ref_got, got = got, case.outputs(cand.impl, upcast(inputs), mode)
                        except Exception as exc:  # e.g. out of memory: fall back to the half reference
                            fp32_note = f"note: fp32 run failed ({_err(exc)}); checks use the {base['dtype']} run"
                            _free(device)
                except Exception as exc:
                    row.status, row.reason = "error", _err(exc)
                    logger.debug("provider %s failed", label, exc_info=True)
                    _free(device)
                    if cand.is_reference:
                        ref_problem = f"reference failed: {row.reason}"
                    continue
                if cand.is_reference:
                    expected = got
                    row.status, row.max_rel_err, row.reason = "ok", 0.0, fp32_note
                    if ref_got is not None:
                        ok, err, why, tol = compare_outputs(ref_got, expected, dtype, case.family)
                        row.max_rel_err, row.tolerance = err, tol
                        if not ok:
                            row.reason = f"note: differs from its own fp32 run: {why}"
                    del ref_got
                elif not cand.checked:
                    row.status, row.reason = "unchecked", cand.note
                elif expected is None:
                    row.status, row.reason = "unchecked", ref_problem or "reference unavailable"
                else:
                    ok, err, why, tol = compare_outputs(got, expected, dtype, case.family)
                    row.max_rel_err, row.tolerance = err, tol
                    if not ok:
                        row.status, row.reason = "wrong", why
                        continue
                    row.status = "ok"
                del got
                try:
                    fn = case.build(cand.impl, inputs, mode)
                    # a correctness call slower than the whole budget has compiled what the timed calls run, on the
                    # same inputs (its time may be mostly a JIT compile): one warm-up call is then enough, and more
                    # would only cost time (slow reference rows)
                    row_warmup = min(warmup, 1) if check_s > budget_s else warmup
                    stats = time_fn(fn, device, warmup=row_warmup, repeats=repeats, budget_s=budget_s)
                    row.timing = stats.as_dict()
                    if measure_memory:
                        row.peak_mem_bytes = measure_peak_memory(fn, device)
                    del fn
                except Exception as exc:
                    row.status, row.reason = "error", _err(exc)
                    logger.debug("provider %s failed while timed", label, exc_info=True)
                    _free(device)
                    continue
                row.metric_value = case.metric_value(row.work, mode, stats.median)
                row.pct_of_peak = _pct_of_peak(case, mode, row.work, stats.median, peak_flops, peak_bw)
            expected = None
        del inputs
        _free(device)
    return results


def _pct_of_peak(case: BenchCase, mode: str, work: dict[str, float], seconds: float, peak_flops: Optional[float],
                 peak_bw: Optional[float]) -> Optional[float]:
    bound = case.bound(mode)
    if seconds <= 0:
        return None
    if bound == "compute" and peak_flops and work.get("flops"):
        return 100.0 * work["flops"] / seconds / peak_flops
    if bound == "memory" and peak_bw and work.get("bytes"):
        return 100.0 * work["bytes"] / seconds / peak_bw
    return None


def run_meta(kinds: Iterable[str], device: torch.device | str, *, registry: Optional[_registry.Registry] = None,
             cases: Optional[dict[str, BenchCase]] = None, dtype: Optional[torch.dtype] = None,
             measure_cpu_bandwidth: bool = True) -> dict[str, Any]:
    """The environment of a run over ``kinds`` (:func:`environment`) plus each kind's dtype and device peaks, the
    providers and peers with their availability, and (CPU) the measured copy bandwidth; ``grids`` is left empty
    for the caller."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch reports no CUDA device")
    kinds = list(kinds)
    table = cases or CASES
    meta = environment(device)
    meta["kinds"] = kinds
    meta["grids"] = {}
    meta["peaks"] = {}
    if device.type == "cpu" and measure_cpu_bandwidth:
        meta["cpu_copy_bandwidth_GBps"] = _peaks.measure_cpu_copy_bandwidth() / 1e9
    meta["providers"] = {k: [i.as_dict() for i in (registry or _registry.REGISTRY).list_providers(k)]
                         for k in kinds}
    meta["peers"] = [p for p in _peers.peer_status(device) if p["kind"] in kinds]
    for kind in kinds:
        case = table[kind] if kind in table else get_case(kind)
        dt = dtype or case.default_dtype(device)
        flops, bw = _peaks.device_peaks(device, dt)
        meta["peaks"][kind] = {"dtype": str(dt).replace("torch.", ""), "tflops": flops and flops / 1e12,
                               "GBps": bw and bw / 1e9}
    return meta


def run_benchmarks(kinds: Iterable[str] = ("attention", "router", "scan"), device: torch.device | str = "cpu", *,
                   quick: bool = False, registry: Optional[_registry.Registry] = None,
                   cases: Optional[dict[str, BenchCase]] = None, measure_cpu_bandwidth: bool = True,
                   **kw: Any) -> BenchRun:
    """Run :func:`run_case` for each kind and wrap the results with the environment (device, versions, commit,
    device peaks)."""
    device = torch.device(device)
    kinds = list(kinds)
    if kw.get("providers") is not None:
        kw["providers"] = list(kw["providers"])
        check_provider_names(kinds, kw["providers"], registry)
    meta = run_meta(kinds, device, registry=registry, cases=cases, dtype=kw.get("dtype"),
                    measure_cpu_bandwidth=measure_cpu_bandwidth)
    meta["quick"] = quick
    table = cases or CASES
    results: list[BenchResult] = []
    t0 = time.perf_counter()
    for kind in kinds:
        case = table[kind] if kind in table else get_case(kind)
        grid = kw.get("shapes") or case.grid(device, quick)
        if kw.get("max_shapes") is not None:
            grid = grid[: kw["max_shapes"]]
        meta["grids"][kind] = {"shapes": [case.label(s) for s in grid], "doc": case.grid_doc(device, quick)}
        results.extend(run_case(case, device, quick=quick, registry=registry, **kw))
    meta["wall_s"] = time.perf_counter() - t0
    return BenchRun(meta=meta, results=results)
