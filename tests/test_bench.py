"""The benchmark harness (apt.bench): timing statistics, the correctness gate (a wrong provider is reported wrong and
never timed), report rendering, `apt bench --report`, and `apt bench` end to end on tiny grids. Fake providers in a
private registry keep these tests independent of which real kernels are built."""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math

import numpy as np
import pytest
import torch

from apt.bench import fakes, peaks, report, runner
from apt.bench import targets as tg
from apt.bench.cases import get_case
from apt.bench.cases.router import capacity
from apt.cli.main import main

TINY = {
    "attention": [dict(B=1, H=2, T=16, D=8), dict(B=1, H=1, T=33, D=8)],
    "scan": [dict(batch=1, dim=4, N=4, L=8)],
    "router": [dict(N=32, C=8, E=4, k=2, F=16), dict(N=40, C=8, E=4, k=1, F=16)],
}
FAST = dict(warmup=1, repeats=3, budget_s=0.05, include_peers=False, progress=lambda s: None)


# ---- timing ------------------------------------------------------------------------------------------------
def test_timing_stats_match_numpy():
    xs = [0.5, 0.1, 0.3, 0.9, 0.2, 0.4]
    st = runner.TimingStats(xs)
    assert st.n == 6 and st.min == 0.1 and st.max == 0.9
    assert st.median == pytest.approx(np.median(xs))
    assert st.q1 == pytest.approx(np.percentile(xs, 25)) and st.q3 == pytest.approx(np.percentile(xs, 75))
    assert st.iqr == pytest.approx(np.percentile(xs, 75) - np.percentile(xs, 25))
    d = st.as_dict()
    assert d["median_s"] == st.median and d["times_s"] == xs
    with pytest.raises(ValueError):
        runner.TimingStats([]).q1


def _fake_clock(step):
    t = [0.0]

    def clock():
        t[0] += step  # every read advances `step`: each timed call lasts `step` seconds
        return t[0]
    return clock


def test_time_fn_warmup_repeats_and_budget():
    calls = []
    st = runner.time_fn(lambda: calls.append(1), "cpu", warmup=2, repeats=7, clock=_fake_clock(0.01))
    assert len(calls) == 9 and st.n == 7 and st.warmup == 2
    assert st.median == pytest.approx(0.01)
    # a 1 s call with a 2.5 s budget: 2 fit, but never fewer than min_repeats=3
    calls.clear()
    st = runner.time_fn(lambda: calls.append(1), "cpu", warmup=0, repeats=10, budget_s=2.5, clock=_fake_clock(1.0))
    assert st.n == 3 and len(calls) == 3
    st = runner.time_fn(lambda: None, "cpu", warmup=0, repeats=10, budget_s=5.5, clock=_fake_clock(1.0))
    assert st.n == 5
    with pytest.raises(ValueError, match="repeats"):
        runner.time_fn(lambda: None, "cpu", repeats=0)


def _timed_sequence(durations):
    """fn and clock for time_fn: each call of fn lasts the next of ``durations`` (cycled); reading the clock is free."""
    t, it = [0.0], itertools.cycle(durations)

    def fn():
        t[0] += next(it)
    return fn, (lambda: t[0])


def test_time_fn_noisy_measurement_takes_more_calls():
    assert not runner.is_noisy(runner.TimingStats([1.0, 1.1, 0.9]).as_dict())
    # times alternating 1 s and 3 s: IQR 2 s of a 2 s median, noisy
    fn, clock = _timed_sequence([1.0, 3.0])
    st = runner.time_fn(fn, "cpu", warmup=0, repeats=4, clock=clock)
    assert st.noisy and st.n == runner.NOISY_EXTRA * 4  # no budget: up to the cap
    # with a budget, only what fits in it: 4 calls take 8 s of 14 s, at a mean of 2 s 3 more fit
    fn, clock = _timed_sequence([1.0, 3.0])
    assert runner.time_fn(fn, "cpu", warmup=0, repeats=4, budget_s=14.0, clock=clock).n == 7
    # a steady measurement stops at `repeats`; fewer than 3 calls are never judged noisy
    fn, clock = _timed_sequence([1.0, 1.01])
    assert runner.time_fn(fn, "cpu", warmup=0, repeats=4, clock=clock).n == 4
    fn, clock = _timed_sequence([1.0, 3.0])
    st = runner.time_fn(fn, "cpu", warmup=0, repeats=2, clock=clock)
    assert st.n == 2 and not st.noisy
    # a JSON row from before the flag (no iqr_s / l2_flushed fields) is judged from its quartiles
    assert runner.is_noisy({"median_s": 1.0, "q1_s": 0.5, "q3_s": 1.5, "n": 5})
    assert not runner.is_noisy(None) and not runner.is_noisy({"median_s": 1.0, "q1_s": 0.9, "q3_s": 1.1, "n": 5})


def test_time_fn_flushes_l2_outside_the_timed_events_on_cuda(monkeypatch):
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            log.append("record")
            self.t = len(log)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    class Buf:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(runner, "_sync", lambda device: None)
    monkeypatch.setattr(runner, "_l2_flush_buffer", lambda device: Buf())
    st = runner.time_fn(lambda: log.append("call"), "cuda", warmup=1, repeats=3)
    assert log == ["call"] + ["flush", "record", "call", "record"] * 3
    assert st.l2_flushed and st.as_dict()["l2_flushed"] is True and st.median == pytest.approx(1e-3)
    log.clear()
    st = runner.time_fn(lambda: log.append("call"), "cuda", warmup=0, repeats=2, flush_l2=False)
    assert "flush" not in log and not st.l2_flushed
    monkeypatch.undo()
    assert runner._l2_flush_buffer(torch.device("cpu")) is None


def test_peak_memory_cpu_sees_a_large_allocation():
    def alloc():
        x = torch.ones(16 << 20)  # 64 MiB, touched
        return float(x[-1])
    got = runner.measure_peak_memory(alloc, "cpu")
    if got is None:
        pytest.skip("no /proc peak-RSS reset on this system")
    assert got >= 48 << 20


def test_peak_memory_cpu_counts_memory_the_timed_calls_freed():
    # small pieces come from malloc's heap: after warm calls they are free pages the measured call reuses (a hole
    # below a live block); it used to read 0 B, as for most providers in `apt bench` on the CPU
    pins = []

    def many_small():
        xs = [torch.ones(4096) for _ in range(1024)]  # 16 MiB in 16 KiB pieces
        pins.append(torch.ones(4096))  # outlives the call, above the pieces
        return len(xs)

    for _ in range(3):
        many_small()
    got = runner.measure_peak_memory(many_small, "cpu")
    if got is None or not runner._malloc_trim():
        pytest.skip("no /proc peak-RSS reset or no glibc malloc_trim on this system")
    assert got >= 12 << 20


# ---- the correctness gate ----------------------------------------------------------------------------------
def test_wrong_provider_is_reported_and_not_timed():
    fakes.FakeAttentionWrong.calls = 0
    reg = fakes.fake_registry()
    case = get_case("attention")
    rows = runner.run_case(case, "cpu", registry=reg, shapes=TINY["attention"], **FAST)
    by = {}
    for r in rows:
        by.setdefault((r.provider, r.status), []).append(r)
    n_checks = len(TINY["attention"]) * len(case.modes)
    wrong = by[("fake_wrong", "wrong")]
    assert len(wrong) == n_checks
    assert all(r.timing is None and r.metric_value is None for r in wrong)
    assert all("o: max abs diff" in r.reason and r.max_rel_err > 1e-3 for r in wrong)
    # one forward per correctness check and none for timing
    assert fakes.FakeAttentionWrong.calls == n_checks
    ok = by[("fake_ref", "ok")]
    assert len(ok) == n_checks and all(r.is_reference and r.timing["n"] >= 3 for r in ok)
    assert all(r.metric == case.metric(r.mode) and r.metric_value > 0 for r in ok)
    assert {r.metric for r in ok} == {"TFLOP/s", "GB/s"}  # GB/s: the memory-bound decode step
    # an unavailable provider is listed once, with its reason, and never called
    gone = [r for r in rows if r.provider == "fake_gone"]
    assert len(gone) == 1 and gone[0].status == "unavailable" and "hardware" in gone[0].reason
    # supports() reasons are reported per mode
    picky = {r.mode: r for r in rows if r.provider == "fake_picky" and r.shape_label == rows[-1].shape_label}
    assert picky["tva fwd"].status == "unsupported" and "no TVA term" in picky["tva fwd"].reason
    assert picky["causal fwd+bwd"].status == "ok" and picky["causal fwd+bwd"].max_rel_err < 1e-5


def test_scan_and_router_cases_against_fakes():
    reg = fakes.fake_registry()
    rows = runner.run_case(get_case("scan"), "cpu", registry=reg, shapes=TINY["scan"], **FAST)
    st = {(r.provider, r.mode): r for r in rows}
    assert st[("fake_ref", "fwd")].status == "ok" and st[("fake_ref", "fwd+bwd")].status == "ok"
    assert st[("fake_wrong", "fwd+bwd")].status == "wrong" and "grad_" in st[("fake_wrong", "fwd+bwd")].reason
    assert st[("fake_ref", "fwd")].metric == "GB/s" and st[("fake_ref", "fwd")].metric_value > 0
    rows = runner.run_case(get_case("router"), "cpu", registry=reg, shapes=TINY["router"], **FAST)
    modes = {(r.provider, r.mode, r.shape_label): r.status for r in rows}
    assert modes[("fake_ref", "route+dispatch+experts+combine", "N=32 C=8 E=4 k=2")] == "ok"
    assert modes[("fake_wrong", "dispatch+combine", "N=40 C=8 E=4 k=1")] == "wrong"
    # the expert GEMM does not depend on the provider: timed once per shape
    gemm = [r for r in rows if r.mode == "experts"]
    assert [r.provider for r in gemm] == ["torch.bmm", "torch.bmm"] and all(r.status == "ok" for r in gemm)
    shares = report.share_rows(rows)
    assert {s[1] for s in shares} == {"fake_ref"} and len(shares) == 2 and all(s[4] > 0 for s in shares)


def test_half_inputs_are_checked_against_the_fp32_reference():
    reg = fakes.fake_registry(fakes.FakeAttention, fakes.FakeAttentionWrong)
    rows = runner.run_case(get_case("attention"), "cpu", registry=reg, dtype=torch.bfloat16,
                           shapes=TINY["attention"][:1], modes=["causal fwd"], **FAST)
    st = {r.provider: r for r in rows}
    ref = st["fake_ref"]
    # the bf16 reference is compared with its own fp32 run: a small, nonzero error within the bf16 tolerance
    assert ref.status == "ok" and 0 < ref.max_rel_err < 2e-2 and ref.dtype == "bfloat16" and ref.timing
    assert st["fake_wrong"].status == "wrong"


def test_gqa_decode_mode_runs_the_real_providers_and_sdpa():
    """Every installed CPU attention provider and torch's SDPA (enable_gqa) agree on a grouped-query decode step
    with the reference: one query over the whole cache, 8 query heads reading 2 k/v heads."""
    case = get_case("attention")
    shape = dict(B=2, H=8, T=37, D=16)
    inputs = case.make_inputs(shape, torch.device("cpu"), torch.float32)
    assert inputs["q_decode"].shape == (2, 8, 1, 16) and inputs["k_cache"].shape == (2, 2, 37, 16)
    rows = runner.run_case(case, "cpu", shapes=[shape], modes=["gqa decode"],
                           **{**FAST, "include_peers": True})
    st = {r.provider: r for r in rows}
    assert st["tva_default"].status == "ok" and st["tva_default"].is_reference
    assert st["sdpa"].status == "ok" and st["torch_sdpa"].status == "ok"
    assert st["tva_cpu"].status in ("ok", "unavailable")
    assert all(r.max_rel_err < 1e-5 for r in rows if r.status == "ok")


def test_triton_interpreter_providers_are_skipped_unless_named(monkeypatch):
    class Interp(fakes.FakeScan):
        name, is_default = "triton", False

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reg = fakes.fake_registry(fakes.FakeScan, Interp)
    kw = dict(registry=reg, shapes=TINY["scan"], modes=["fwd"], **FAST)
    rows = runner.run_case(get_case("scan"), "cpu", **kw)
    st = {r.provider: r for r in rows}
    assert st["triton"].status == "skipped" and "interpreter" in st["triton"].reason
    rows = runner.run_case(get_case("scan"), "cpu", providers=["triton"], **kw)
    assert {r.provider: r.status for r in rows} == {"fake_ref": "ok", "triton": "ok"}


def test_reference_failure_makes_others_unchecked():
    class Broken(fakes.FakeScan):
        name = "broken_ref"

        def selective_scan_fn(self, *a, **kw):
            raise RuntimeError("out of memory (simulated)")

    class Other(fakes.FakeScan):
        name, is_default = "other", False

    reg = fakes.fake_registry(Broken, Other)
    rows = runner.run_case(get_case("scan"), "cpu", registry=reg, shapes=TINY["scan"], modes=["fwd"], **FAST)
    st = {r.provider: r for r in rows}
    assert st["broken_ref"].status == "error" and "simulated" in st["broken_ref"].reason
    assert st["other"].status == "unchecked" and "reference failed" in st["other"].reason
    assert st["other"].timing is not None


# ---- formulas ----------------------------------------------------------------------------------------------
def test_work_formulas():
    att = get_case("attention")
    s = dict(B=2, H=3, T=128, D=64)
    assert att.work(s, "causal fwd", torch.float16)["flops"] == 4 * 2 * 3 * 128 * 128 * 64 / 2
    assert att.work(s, "causal fwd+bwd", torch.float16)["flops"] == pytest.approx(3.5 * 4 * 2 * 3 * 128 ** 2 * 64 / 2)
    assert att.metric_value({"flops": 2e12}, "tva fwd", 2.0) == pytest.approx(1.0)
    # the decode step reads the K/V cache of H/4 heads (8 query heads -> 2) once, plus q and o
    s8 = dict(B=2, H=8, T=128, D=64)
    assert att.work(s8, "gqa decode", torch.bfloat16)["bytes"] == 2 * (2 * 2 * 2 * 128 * 64 + 2 * 2 * 8 * 64)
    assert att.metric("gqa decode") == "GB/s" and att.bound("gqa decode") == "memory"
    sc = get_case("scan")
    s = dict(batch=2, dim=8, N=16, L=32)
    want = 2 * (4 * 2 * 8 * 32 + 2 * 2 * 16 * 32) + 4 * (8 * 16 + 16)
    assert sc.work(s, "fwd", torch.bfloat16)["bytes"] == want
    assert capacity(dict(N=1000, E=8, k=2)) == math.ceil(1.25 * 2 * 1000 / 8)
    assert capacity(dict(N=4, E=64, k=1)) == 4
    ro = get_case("router")
    assert ro.metric_value({"tokens": 1000.0}, "route+dispatch+experts+combine", 0.5) == 2000.0


def test_grids_scale_down_for_cpu_and_quick():
    for kind in ("attention", "router", "scan"):
        case = get_case(kind)
        gpu, cpu, quick = case.grid("cuda", False), case.grid("cpu", False), case.grid("cpu", True)
        assert len(quick) <= len(cpu) and quick and gpu and case.grid("cuda", True)
        size = lambda g: max(math.prod(v for v in s.values()) for s in g)  # noqa: E731
        assert size(quick) <= size(cpu) < size(gpu)
        assert case.grid_doc("cpu", True) and case.grid_doc("cuda", False)
    att = get_case("attention").grid("cuda", False)
    assert {s["T"] for s in att} == {512, 1024, 2048, 4096, 8192, 16384} and {s["D"] for s in att} == {64, 128}
    scan = get_case("scan").grid("cuda", False)
    assert min(s["L"] for s in scan) == 256 and max(s["L"] for s in scan) == 8192
    assert {s["batch"] for s in scan} >= {2, 16} and {s["dim"] for s in scan} >= {768, 2048}
    router = get_case("router").grid("cuda", False)
    assert {s["N"] for s in router} >= {4096, 65536} and {s["E"] for s in router} >= {8, 64}
    assert {s["k"] for s in router} == {1, 2} and {s["C"] for s in router} >= {1024, 4096}


def test_device_peaks_table():
    assert peaks.lookup("NVIDIA H100 80GB HBM3") == (989.0, 67.0, 3350.0)
    assert peaks.lookup("NVIDIA H100 PCIe")[2] == 2000.0
    assert peaks.lookup("NVIDIA H200")[2] == 4800.0
    assert peaks.lookup("NVIDIA A100-SXM4-80GB")[2] == 2039.0
    assert peaks.lookup("NVIDIA GeForce GTX 1080") is None
    assert peaks.device_peaks("cpu", torch.float32)[0] is None
    assert peaks.measure_cpu_copy_bandwidth(nbytes=1 << 20, repeats=2) > 0


# ---- reports -----------------------------------------------------------------------------------------------
def _synthetic_run():
    def row(provider, t, ref=False, status="ok", mode="causal fwd", shape="B=1 H=1 T=64 D=8", **kw):
        timing = None if t is None else runner.TimingStats([t, t * 1.1, t * 0.9]).as_dict()
        return runner.BenchResult(kind="attention", mode=mode, provider=provider, status=status, shape_label=shape,
                                  shape=dict(B=1, H=1, T=64, D=8), x_name="T", x_value=64, dtype="float32",
                                  is_reference=ref, timing=timing, metric="TFLOP/s",
                                  metric_value=None if t is None else 1e-3 / t, **kw)
    results = [row("ref", 2e-3, ref=True), row("fast", 1e-3), row("bad", None, status="wrong", reason="o: off"),
               runner.BenchResult(kind="attention", mode=None, provider="gone", status="unavailable",
                                  reason="needs a GPU")]
    meta = {"device_name": "NVIDIA H100 80GB HBM3", "timestamp": "2026-11-22T20:00:00Z", "git_commit": "abc123",
            "torch": "2.13", "apt": "0.1.0", "triton": "3.9", "device_type": "cuda", "cpu_threads": 16,
            "quick": False, "grids": {"attention": {"doc": "tiny"}},
            "peaks": {"attention": {"dtype": "bfloat16", "tflops": 989.0, "GBps": 3350.0}}}
    return runner.BenchRun(meta=meta, results=results)


def test_ratios_and_markdown():
    run = _synthetic_run()
    rat = report.ratios([r for r in run.results if r.mode])
    ref, fast = run.results[0], run.results[1]
    assert rat[id(fast)][0] == pytest.approx(2.0) and rat[id(fast)][1] == pytest.approx(1.0)
    assert rat[id(ref)][0] == pytest.approx(1.0) and rat[id(ref)][1] == pytest.approx(2.0)
    assert id(run.results[2]) not in rat
    md = report.render_markdown(run)
    assert "NVIDIA H100 80GB HBM3" in md and "abc123" in md and "attention (bfloat16): 989.0 TFLOP/s" in md
    assert "| B=1 H=1 T=64 D=8 | fast | ok | 1 ms" in md and "2.00×" in md
    assert "wrong: o: off" in md and "| attention | gone | unavailable | needs a GPU |" in md
    assert "vs torch_sdpa" not in md  # no SDPA timings, no column
    run.results.append(dataclasses.replace(run.results[0], provider="torch_sdpa", is_reference=False,
                                           timing=runner.TimingStats([4e-3]).as_dict()))
    md = report.render_markdown(run)
    assert "| vs torch_sdpa |" in md and "| 4.00× |" in md  # fast (1 ms) vs SDPA (4 ms)


def test_markdown_marks_noisy_rows():
    run = _synthetic_run()
    run.results[1].timing = runner.TimingStats([1e-3, 2e-3, 1e-3, 3e-3, 1e-3]).as_dict()
    md = report.render_markdown(run)
    assert "| fast | ok | 1 ms [1 ms–2 ms] n=5 noisy |" in md and "`noisy` = IQR above 25% of the median" in md
    assert "n=3 noisy" not in md  # the reference's 10% spread is not noisy


def test_json_round_trip(tmp_path):
    run = _synthetic_run()
    p = report.write_json(run, tmp_path / "r.json")
    back = report.load_json(p)
    assert back.meta == run.meta and [r.as_dict() for r in back.results] == [r.as_dict() for r in run.results]
    assert report.result_file_name(run) == "nvidia_h100_80gb_hbm3_20261122T200000Z.json"


def test_apt_bench_report(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "RESULTS.md"
    assert main(["bench", "--report", "--results-dir", str(results), "--report-out", str(out)]) == 0
    assert "no GPU session has run" in out.read_text()
    report.write_json(_synthetic_run(), results / report.result_file_name(_synthetic_run()))
    assert main(["bench", "--report", "--results-dir", str(results), "--report-out", str(out)]) == 0
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "nvidia_h100_80gb_hbm3_20261122T200000Z.json" in text
    assert "### attention: causal fwd (float32)" in text and "no GPU session" not in text
    assert "rendered 1 result file(s)" in capsys.readouterr().out
    assert f"from the JSON files in {results} " in text  # not the committed directory's name
    assert "from the JSON files in benchmarks/results/ " in report.render_results(results)


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_has_no_nan_or_infinity(tmp_path):
    # a provider with non-finite outputs gets max_rel_err = inf (runner.compare_outputs); bench.json had `Infinity`
    run = _synthetic_run()
    run.results[2].max_rel_err = math.inf
    run.results[1].metric_value = math.nan
    run.results[1].timing["times_s"].append(math.inf)
    run.results[1].tolerance = {"atol": -math.inf, "rtol": np.float32(0.5)}
    run.meta.update(wall_s=math.nan, nested={"x": [1.0, (math.inf, 2)]}, np_scalar=np.float64(math.inf))
    p = report.write_json(run, tmp_path / "r.json")
    data = _strict_json(p.read_text())
    rows = data["results"]
    assert rows[2]["max_rel_err"] is None and rows[1]["metric_value"] is None
    assert rows[1]["timing"]["times_s"][-1] is None
    assert rows[1]["tolerance"] == {"atol": None, "rtol": 0.5}  # a numpy scalar as a number, not a string
    assert data["meta"]["wall_s"] is None and data["meta"]["nested"] == {"x": [1.0, [None, 2]]}
    assert data["meta"]["np_scalar"] is None
    # the reader takes what the writer writes: every row back, and the report renders it
    back = report.load_json(p)
    assert [r.provider for r in back.results] == [r.provider for r in run.results]
    assert back.results[2].max_rel_err is None and "wrong: o: off" in report.render_markdown(back)
    # in memory the values are untouched
    assert run.results[2].max_rel_err == math.inf


def _run_dict():
    return json.loads(json.dumps(_synthetic_run().as_dict()))


def _set(path, value):
    """A mutation of the synthetic run's dict: ``path`` like "results.1.timing.median_s"; value ... deletes."""
    def mutate(d):
        *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in head:
            d = d[k]
        if value is ...:
            del d[last]
        else:
            d[last] = value
    return mutate


# a malformed file: skipped with a warning naming it and the field, the others render
BAD_FILES = {
    "toplevel_list": ("[1, 2]", "expected an object with meta and results, got a list"),
    "toplevel_null": ("null", "got null"),
    "toplevel_string": ('"hi"', "got the string 'hi'"),
    "invalid_json": ("{not json", "not valid JSON"),
    "empty_file": ("", "not valid JSON"),
    "meta_list": (_set("meta", [1, 2]), "meta: expected an object, got a list"),
    "results_missing": (_set("results", ...), "results: missing"),
    "results_null": (_set("results", None), "results: expected a list, got null"),
    "targets_string": (_set("targets", "all met"), "targets: expected a list or null"),
    "grids_list": (_set("meta.grids", ["a"]), "meta.grids: expected an object or null, got a list"),
    "grid_not_dict": (_set("meta.grids.attention", "tiny"), "meta.grids.attention: expected an object"),
    "cuda_peaks_not_dict": (_set("meta.peaks.attention", 5), "meta.peaks.attention: expected an object"),
    "peaks_no_dtype": (_set("meta.peaks.attention.dtype", ...), "meta.peaks.attention.dtype: missing"),
    "wall_s_string": (_set("meta.wall_s", "3s"), "meta.wall_s: expected a finite number or null, got the string"),
    "bandwidth_string": (_set("meta.cpu_copy_bandwidth_GBps", "fast"), "meta.cpu_copy_bandwidth_GBps: expected"),
    "timestamp_null": (_set("meta.timestamp", None), "meta.timestamp: expected a string, got null"),
    "timestamp_int": (_set("meta.timestamp", 20260101), "meta.timestamp: expected a string, got the number"),
}


def _write_bad(path, bad):
    if isinstance(bad, str):
        path.write_text(bad)
    else:
        d = _run_dict()
        bad(d)
        path.write_text(json.dumps(d))  # Python's json writes NaN/Infinity: files of older writers or by hand


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_apt_bench_report_skips_a_malformed_file(case, tmp_path, capsys, caplog):
    bad, message = BAD_FILES[case]
    results, out = tmp_path / "results", tmp_path / "RESULTS.md"
    results.mkdir()
    report.write_json(_synthetic_run(), results / "good.json")
    _write_bad(results / "bad.json", bad)
    assert main(["bench", "--report", "--results-dir", str(results), "--report-out", str(out)]) == 0
    warning = next(r.getMessage() for r in caplog.records if "bad.json" in r.getMessage())
    assert message in warning and str(results / "bad.json") in warning
    text = out.read_text()
    assert "| good.json |" in text and "bad.json" not in text and "### attention: causal fwd" in text
    said = capsys.readouterr().out
    assert "rendered 1 result file(s)" in said and "skipped 1 malformed file(s): bad.json" in said


# a malformed row: skipped with a warning naming the file and the row's index, the rest of the file renders.
# Rows of the synthetic run: 0 ref (the reference), 1 fast, 2 bad (wrong, untimed), 3 gone (not run)
_MEDIAN = "timing.median_s: expected a finite number of seconds"
BAD_ROWS = {
    "row_not_dict": (_set("results.1", "garbage"), "expected an object (one result row), got the string"),
    "row_missing_kind": (_set("results.1.kind", ...), "kind: missing (expected a string)"),
    "row_missing_status": (_set("results.1.status", ...), "status: missing"),
    "mode_number": (_set("results.1.mode", 5), "mode: expected a string or null, got the number 5"),
    "timing_list": (_set("results.1.timing", [1, 2]), "timing: expected an object or null, got a list"),
    "timing_empty": (_set("results.1.timing", {}), "timing.median_s: missing"),
    "timing_missing_median": (_set("results.1.timing.median_s", ...), "timing.median_s: missing"),
    "timing_missing_q1": (_set("results.1.timing.q1_s", ...), "timing.q1_s: missing"),
    "timing_n_zero": (_set("results.1.timing.n", 0), "timing.n: expected an integer >= 1"),
    "median_string": (_set("results.1.timing.median_s", "fast"), "timing.median_s: expected a finite number of "
                                                                  "seconds > 0, got the string 'fast'"),
    "median_nan": (_set("results.1.timing.median_s", math.nan), f"{_MEDIAN} > 0, got the number nan"),
    "median_inf": (_set("results.1.timing.median_s", math.inf), f"{_MEDIAN} > 0, got the number inf"),
    "median_zero": (_set("results.1.timing.median_s", 0.0), f"{_MEDIAN} > 0, got the number 0.0"),
    "median_negative": (_set("results.1.timing.median_s", -1e-3), f"{_MEDIAN} > 0, got the number -0.001"),
    "q3_nan": (_set("results.1.timing.q3_s", math.nan), "timing.q3_s: expected a finite number"),
    "max_rel_err_string": (_set("results.1.max_rel_err", "tiny"), "max_rel_err: expected a number or null"),
    "peak_mem_string": (_set("results.1.peak_mem_bytes", "lots"), "peak_mem_bytes: expected an integer >= 0"),
    "metric_value_nan": (_set("results.1.metric_value", math.nan), "metric_value: expected a finite number"),
    "pct_of_peak_inf": (_set("results.1.pct_of_peak", math.inf), "pct_of_peak: expected a finite number"),
    "shape_label_list": (_set("results.1.shape_label", ["T=64"]), "shape_label: expected a string, got a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_report_skips_a_malformed_row(case, tmp_path, caplog):
    bad, message = BAD_ROWS[case]
    p = tmp_path / "run.json"
    _write_bad(p, bad)
    run = report.load_json(p)
    assert [r.provider for r in run.results] == ["ref", "bad", "gone"]
    assert f"{p}: skipping results[1]: {message}" in caplog.text
    md = report.render_results(tmp_path)
    assert "| ref |" in md and "| fast |" not in md and " nan" not in md and " inf" not in md


def test_report_rejects_garbage_reference_timings(tmp_path, caplog):
    # a NaN reference time made every row's `vs best` nan (min() with a NaN depends on the order)
    d = _run_dict()
    d["results"][0]["timing"]["median_s"] = math.nan
    d["results"].append({**d["results"][1], "provider": "slow", "timing": {**d["results"][1]["timing"],
                                                                            "median_s": 4e-3}})
    (tmp_path / "run.json").write_text(json.dumps(d))
    run = report.load_json(tmp_path / "run.json")
    assert "skipping results[0]: timing.median_s" in caplog.text and "ref" not in [r.provider for r in run.results]
    md = report.render_markdown(run)
    assert "nan" not in md and "| fast | ok | 1 ms" in md and "| 4.00 |" in md  # slow: 4 ms vs the fastest 1 ms


def test_report_skips_a_malformed_target(tmp_path, caplog):
    d = json.loads(json.dumps(_targets_run().as_dict()))
    d["targets"][1] = {"name": "x"}
    d["targets"][2]["issue"] = "five"
    (tmp_path / "t.json").write_text(json.dumps(d))
    run = report.load_json(tmp_path / "t.json")
    assert [t.name for t in run.targets] == ["a.met"]
    assert "skipping targets[1]: kind: missing" in caplog.text
    assert "skipping targets[2]: issue: expected an integer, got the string 'five'" in caplog.text


def test_apt_bench_report_counts_what_it_rendered(tmp_path, capsys, caplog):
    results, out = tmp_path / "results", tmp_path / "RESULTS.md"
    results.mkdir()
    argv = ["bench", "--report", "--results-dir", str(results), "--report-out", str(out)]
    (results / "broken.json").write_text("{not json")
    out.write_text("the previous report\n")
    # every file skipped: an error, and RESULTS.md is left as it was (not replaced by "no result files yet")
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert "none of the 1 result file(s)" in cap.err and "not written" in cap.err and "rendered" not in cap.out
    assert "broken.json: not valid JSON" in caplog.text and out.read_text() == "the previous report\n"
    report.write_json(_synthetic_run(), results / "good.json")
    (results / "b2.json").write_text("[]")
    assert main(argv) == 0
    assert ("rendered 1 result file(s)" in (o := capsys.readouterr().out)
            and "skipped 2 malformed file(s): b2.json, broken.json" in o)
    assert "| good.json |" in out.read_text()
    rep = report.results_report(results)
    assert rep.rendered == [results / "good.json"] and [f.name for f, _ in rep.skipped] == ["b2.json", "broken.json"]
    # a well-formed file with no row to render is skipped too, not counted as rendered
    empty = _synthetic_run()
    empty.results = [r for r in empty.results if r.mode is None]
    report.write_json(empty, results / "empty.json")
    rep = report.results_report(results)
    assert rep.rendered == [results / "good.json"] and "empty.json" not in rep.text
    assert any(f.name == "empty.json" and "no result row to render" in why for f, why in rep.skipped)


# ---- the CLI end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["attention", "router", "scan"])
def test_apt_bench_quick_with_fakes(kind, tmp_path, monkeypatch, capsys, caplog):
    from apt.core import registry

    monkeypatch.setattr(registry, "REGISTRY", fakes.fake_registry())
    out = tmp_path / "out"
    rc = main(["bench", "--quick", "--kind", kind, "--device", "cpu", "--max-shapes", "1", "--repeats", "2",
               "--warmup", "0", "--budget", "0.05", "--out", str(out), "-q", "--save", "--results-dir",
               str(tmp_path / "results"), "--fail-on-wrong"])
    assert rc == 1  # fake_wrong is wrong, and --fail-on-wrong says so
    data = json.loads((out / "bench.json").read_text())
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "apt", "git_commit", "cpu_threads", "timestamp"):
        assert key in meta
    assert meta["device_name"].startswith("CPU") and meta["quick"] is True and meta["kinds"] == [kind]
    statuses = {(r["provider"], r["status"]) for r in data["results"]}
    assert ("fake_ref", "ok") in statuses and ("fake_wrong", "wrong") in statuses
    assert (out / "bench.md").read_text().startswith("## apt bench")
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(out.glob("*.png")), "matplotlib is installed: plots expected"
    else:
        assert "no plots: matplotlib is unavailable" in caplog.text
    assert len(list((tmp_path / "results").glob("cpu_*.json"))) == 1
    assert "WRONG" in capsys.readouterr().out


def test_apt_bench_gives_the_callers_thread_count_back(tmp_path, monkeypatch):
    """--threads sets torch's thread count for the run only: an in-process caller (this suite) gets its own back,
    also when the run fails."""
    from apt.core import registry

    monkeypatch.setattr(registry, "REGISTRY", fakes.fake_registry())
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    seen = []
    monkeypatch.setattr(runner, "run_benchmarks", lambda *a, **k: seen.append(torch.get_num_threads()) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["bench", "--quick", "--kind", "scan", "--device", "cpu", "--threads", str(other), "-q",
              "--out", str(tmp_path)])
    assert seen == [other] and torch.get_num_threads() == before


def test_apt_bench_quick_real_registry(tmp_path):
    """Whatever real providers this build has: the default of each kind runs and is 'ok' on one quick shape."""
    from apt.core import registry

    out = tmp_path / "out"
    assert main(["bench", "--quick", "--device", "cpu", "--max-shapes", "1", "--repeats", "1", "--warmup", "0",
                 "--budget", "0.05", "--no-plots", "--no-peers", "--out", str(out), "-q"]) == 0
    data = json.loads((out / "bench.json").read_text())
    for kind in ("attention", "router", "scan"):
        default = registry.REGISTRY.default_name(kind)
        rows = [r for r in data["results"] if r["kind"] == kind]
        assert rows, kind
        if default is None:
            assert any("no provider" in r["reason"] or r["status"] == "unavailable" for r in rows)
            continue
        ref_rows = [r for r in rows if r["provider"] in (default, "torch.bmm") and r["mode"]]
        assert ref_rows and all(r["status"] == "ok" for r in ref_rows), ref_rows


# ---- the pytest-benchmark glue -----------------------------------------------------------------------------
class _FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: records what run_item asks of it."""

    def __init__(self):
        self.group, self.extra_info, self.calls = None, {}, 0
        self.stats = None

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(rounds + warmup_rounds):
            fn()
        self.calls = rounds
        self.stats = type("S", (), {"stats": type("M", (), {"median": 1e-3})()})()


def test_pytest_support_items_and_run(monkeypatch):
    from apt.bench import pytest_support
    from apt.core import registry

    monkeypatch.setattr(registry, "REGISTRY", fakes.fake_registry())
    found = pytest_support.items("router", device="cpu", grid="quick")
    ids = [i.id for i in found]
    assert len(ids) == len(set(ids))
    # the expert GEMM is one item per shape, run with the reference
    assert {i.provider for i in found if i.mode == "experts"} == {"fake_ref"}
    assert {"fake_ref", "fake_wrong", "vllm_fused_moe"} <= {i.provider for i in found}
    item = next(i for i in found if i.provider == "fake_ref" and i.mode == "dispatch+combine")
    bm = _FakeBenchmark()
    pytest_support.run_item(bm, item)
    assert bm.calls == 5 and bm.group.startswith("router dispatch+combine N=")
    assert bm.extra_info["provider"] == "fake_ref" and bm.extra_info["GB/s"] > 0
    wrong = next(i for i in found if i.provider == "fake_wrong" and i.shape == item.shape and i.mode == item.mode)
    with pytest.raises(pytest.fail.Exception, match="WRONG"):
        pytest_support.run_item(_FakeBenchmark(), wrong)
    peer = next(i for i in found if i.provider == "vllm_fused_moe")
    with pytest.raises(pytest.skip.Exception, match="CUDA only"):
        pytest_support.run_item(_FakeBenchmark(), peer)


def test_apt_bench_list(monkeypatch, capsys):
    from apt.core import registry

    monkeypatch.setattr(registry, "REGISTRY", fakes.fake_registry())
    assert main(["bench", "--list", "--quick", "--kind", "attention", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "attention (quick cpu grid, 2 shapes" in out and "provider fake_ref (reference): available" in out
    assert "provider fake_gone: unavailable: fake_gone needs hardware" in out and "peer torch_sdpa: available" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--kind", "scan", "--providers", "bogus"], "'bogus' for kind(s) scan"),
    (["--kind", "all", "--providers", "fake_ref,bogus,nope"], "'bogus', 'nope' for kind(s) attention, router, scan"),
    (["--kind", "scan", "--providers", "bogus", "--list"], "'bogus'"),
])
def test_apt_bench_unknown_provider_is_an_error(argv, fragment, monkeypatch, tmp_path, capsys):
    """A misspelt --providers name stops the run (exit 2) and lists the valid names; nothing is written."""
    from apt.core import registry

    monkeypatch.setattr(registry, "REGISTRY", fakes.fake_registry())
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out), "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apt bench: error: --providers: unknown name(s) ") and fragment in err
    assert "scan: fake_ref, fake_wrong, mamba_ssm" in err  # the valid names: providers, then peers
    assert not out.exists()


def test_bench_provider_names_valid_for_one_kind_are_accepted():
    reg = fakes.fake_registry()
    runner.check_provider_names(["attention", "scan"], ["torch_sdpa", "mamba_ssm", "fake_wrong"], reg)
    runner.check_provider_names(["scan"], None, reg)
    with pytest.raises(ValueError, match=r"providers: unknown name\(s\) 'torch_sdpa' for kind\(s\) scan"):
        runner.check_provider_names(["scan"], ["torch_sdpa"], reg)  # an attention peer, not a scan one
    with pytest.raises(ValueError, match="'bogus'"):
        runner.run_benchmarks(["scan"], "cpu", registry=reg, providers=["bogus"], measure_cpu_bandwidth=False)


# ---- performance targets (apt bench --targets) -------------------------------------------------------------
def _trow(provider, t, mode="fwd", ref=False, status="ok", reason="", kind="scan", metric="GB/s", value=None):
    """A result row at one shape: timed in ``t`` seconds (None: not timed), or, with mode None, a provider that
    could not run at all."""
    return runner.BenchResult(kind=kind, mode=mode, provider=provider, status=status, reason=reason,
                              shape_label="" if mode is None else "batch=1 dim=4 N=4 L=8", is_reference=ref,
                              timing=None if t is None else runner.TimingStats([t]).as_dict(), metric=metric,
                              metric_value=value)


_TROWS = [_trow("ref", 10e-3, ref=True), _trow("fast", 1e-3), _trow("slow", 20e-3),
          _trow("bad", None, status="wrong", reason="y: max abs diff 0.5"),
          _trow("picky", None, status="unsupported", reason="no fp64"),
          _trow("gone", None, mode=None, status="unavailable", reason="gone is not installed"),
          _trow("ref", 40e-3, mode="experts", ref=True)]


@pytest.mark.parametrize("check, verdict, value, fragments", [
    (tg.speedup(["fast"], "fwd", at_least=5), "MET", 10.0, ["10.0× (fast 1 ms, ref 10 ms)"]),
    (tg.speedup(["fast"], "fwd", at_least=20), "NOT MET", 10.0, ["10.0×"]),
    (tg.speedup(["slow"], "fwd", "fast", at_least=1), "NOT MET", 0.05, ["0.05× (slow 20 ms, fast 1 ms)"]),
    # the best of several: the fastest counts, the others' reasons are noted
    (tg.speedup(["gone", "slow", "fast"], "fwd", at_least=5), "MET", 10.0,
     ["best of gone, slow, fast: fast", "gone unavailable: gone is not installed"]),
    (tg.time_within(["slow"], "fwd", "ref", at_most=1.15), "NOT MET", 2.0, ["2.00×"]),
    (tg.time_within(["fast"], "fwd", "ref", at_most=1.15), "MET", 0.1, []),
    # a share of another mode's time (the router's dispatch+combine vs the expert GEMM)
    (tg.time_share(["fast"], "fwd", tg.REFERENCE, "experts", under=0.10), "MET", 0.025,
     ["2.5% (fast 1 ms, ref 40 ms)"]),
    (tg.time_share(["ref"], "fwd", tg.REFERENCE, "experts", under=0.10), "NOT MET", 0.25, ["25.0%"]),
    # a wrong provider fails its target; one that cannot run makes it unmeasurable, with the reason
    (tg.speedup(["bad"], "fwd", at_least=1), "NOT MET", None, ["bad gives wrong results (y: max abs diff 0.5)"]),
    (tg.speedup(["gone"], "fwd", at_least=1), "NOT MEASURABLE", None, ["gone unavailable: gone is not installed"]),
    (tg.speedup(["picky"], "fwd", at_least=1), "NOT MEASURABLE", None, ["picky unsupported: no fp64"]),
    (tg.speedup(["fast"], "fwd", "mamba_ssm", at_least=1), "NOT MEASURABLE", None, ["mamba_ssm is not registered"]),
    (tg.speedup(["fast"], "fwd+bwd", at_least=1), "NOT MEASURABLE", None, ["fast is not registered"]),
])
def test_target_check_verdicts(check, verdict, value, fragments):
    out = check(_TROWS, {"device_type": "cpu"})
    assert out.verdict == verdict, out
    assert (out.value is None) if value is None else out.value == pytest.approx(value)
    text = out.measured + " | " + out.reason
    assert all(f in text for f in fragments), text
    assert (out.measured == "-") == (value is None)


def test_target_notes_a_noisy_timing():
    noisy = runner.TimingStats([1e-3, 3e-3, 1e-3, 3e-3]).as_dict()
    rows = [_trow("ref", 10e-3, ref=True), dataclasses.replace(_trow("fast", 1e-3), timing=noisy)]
    out = tg.speedup(["fast"], "fwd", at_least=1)(rows, {"device_type": "cpu"})
    assert out.verdict == "MET" and "fast timing noisy (IQR 100% of the median)" in out.reason
    assert "ref timing noisy" not in out.reason
    out = tg.speedup(["fast"], "fwd", at_least=1)(rows[:1] + [_trow("fast", 1e-3)], {"device_type": "cpu"})
    assert "noisy" not in out.reason


def test_target_bandwidth_check():
    rows = [_trow("ref", 1.0, ref=True, value=10.0), _trow("fast", 0.1, value=3000.0), _trow("slow", 0.2, value=1500.0)]
    check = tg.bandwidth(["slow", "fast"], "fwd", at_least_pct=60)
    assert check.threshold == "≥ 60% of HBM bandwidth"
    out = check(rows, {"device_type": "cpu"})
    assert out.verdict == "NOT MEASURABLE" and "needs a CUDA device" in out.reason
    cuda = {"device_type": "cuda", "device_name": "NVIDIA GeForce GTX 1080", "peaks": {"scan": {"GBps": None}}}
    out = check(rows, cuda)
    assert out.verdict == "NOT MEASURABLE" and "no peak bandwidth known for this device (NVIDIA GeForce" in out.reason
    h200 = {"device_type": "cuda", "device_name": "NVIDIA H200", "peaks": {"scan": {"GBps": 4800.0}}}
    out = check(rows, h200)
    assert out.verdict == "MET" and out.value == pytest.approx(62.5)
    assert "62.5% (3000 of 4800 GB/s, fast)" in out.measured
    out = check(rows, {**h200, "peaks": {"scan": {"GBps": 6000.0}}})
    assert out.verdict == "NOT MET" and out.value == pytest.approx(50.0)


def _tiny_target(name, check, providers, device="cpu", modes=("fwd",), kind="scan", shape=None):
    return tg.Target(name, kind, device, 3, f"the issue's words for {name}", f"title of {name}",
                     shape or dict(TINY[kind][0]), tuple(modes), tuple(providers), check)


def test_evaluate_a_check_that_raises_is_not_measurable():
    def boom(rows, meta):
        raise KeyError("peaks")

    res = tg.evaluate(_tiny_target("boom", tg.Check("≥ 1", boom), ["fast"]), _TROWS, {"device_name": "CPU x"}, "s")
    assert res.verdict == "NOT MEASURABLE" and "the check failed: KeyError" in res.reason and res.measured_on == "CPU x"


class _FastScan(fakes.FakeScan):
    name, is_default = "fake_fast", False


def _tiny_targets():
    """Deterministic verdicts whatever the timings: thresholds far from any ratio two equal fakes can have."""
    scan = [
        _tiny_target("scan.met", tg.speedup(["fake_fast"], "fwd", at_least=1e-6), ["fake_fast"]),
        _tiny_target("scan.not_met", tg.speedup(["fake_fast"], "fwd", at_least=1e6), ["fake_fast"]),
        _tiny_target("scan.wrong", tg.speedup(["fake_wrong"], "fwd+bwd", at_least=1e-6), ["fake_wrong"],
                     modes=("fwd+bwd",)),
        _tiny_target("scan.peer", tg.speedup(["fake_fast"], "fwd", "mamba_ssm", at_least=1),
                     ["fake_fast", "mamba_ssm"]),
        _tiny_target("scan.gpu", tg.speedup(["fake_fast"], "fwd", at_least=1), ["fake_fast"], device="cuda"),
    ]
    router = [_tiny_target("router.met", tg.time_share(["fake_ref"], "dispatch+combine", tg.REFERENCE, "experts",
                                                       under=1e6), ["fake_ref"], kind="router",
                           modes=("dispatch+combine", "experts"))]
    return scan, router


def test_run_targets_with_fakes():
    scan, router = _tiny_targets()
    reg = fakes.fake_registry(fakes.FakeScan, fakes.FakeScanWrong, _FastScan, fakes.FakeRouter)
    run = tg.run_targets(["scan", "router"], "cpu", targets=scan + router, registry=reg, warmup=0, repeats=2,
                         budget_s=0.05, progress=lambda s: None, measure_cpu_bandwidth=False)
    got = {t.name: t for t in run.targets}
    assert [t.name for t in run.targets] == [t.name for t in scan + router]
    assert {n: t.verdict for n, t in got.items()} == {
        "scan.met": "MET", "scan.not_met": "NOT MET", "scan.wrong": "NOT MET", "scan.peer": "NOT MEASURABLE",
        "scan.gpu": "NOT MEASURABLE", "router.met": "MET"}
    assert "mamba_ssm unavailable: mamba_ssm runs on CUDA only" in got["scan.peer"].reason
    assert got["scan.gpu"].reason.startswith("needs a CUDA device") and got["scan.gpu"].measured_on == ""
    assert "gives wrong results" in got["scan.wrong"].reason and got["scan.met"].measured_on.startswith("CPU")
    assert got["scan.met"].shape_label == "batch=1 dim=4 N=4 L=8"
    assert got["scan.met"].threshold == "≥ 1e-06× vs the reference"
    # the four CPU scan targets share a shape: one runner call, each (provider, mode) measured once
    rows = [(r.provider, r.mode) for r in run.results if r.kind == "scan"]
    assert sorted(rows) == sorted([("fake_ref", "fwd"), ("fake_ref", "fwd+bwd"), ("fake_fast", "fwd"),
                                   ("fake_fast", "fwd+bwd"), ("fake_wrong", "fwd"), ("fake_wrong", "fwd+bwd"),
                                   ("mamba_ssm", None)])
    assert all(r.peak_mem_bytes is None for r in run.results)  # no memory calls in a targets run
    assert {(r.provider, r.mode) for r in run.results if r.kind == "router"} == {
        ("fake_ref", "dispatch+combine"), ("torch.bmm", "experts")}
    assert run.meta["targets_only"] and "batch=1 dim=4 N=4 L=8" in run.meta["grids"]["scan"]["doc"]
    with pytest.raises(ValueError, match="unique"):
        tg.run_targets(["scan"], "cpu", targets=scan[:1] * 2, registry=reg, measure_cpu_bandwidth=False)


def test_slow_correctness_call_is_the_warmup():
    import time as _time

    class Slow(fakes.FakeScan):
        name, is_default, calls = "slow_ref", True, 0

        def selective_scan_fn(self, *a, **kw):
            type(self).calls += 1
            _time.sleep(0.06)
            return super().selective_scan_fn(*a, **kw)

    rows = runner.run_case(get_case("scan"), "cpu", registry=fakes.fake_registry(Slow), shapes=TINY["scan"],
                           modes=["fwd"], warmup=2, repeats=10, budget_s=0.05, measure_memory=False,
                           include_peers=False, progress=lambda s: None)
    assert rows[0].status == "ok" and rows[0].timing["warmup"] == 1 and rows[0].timing["n"] == 3
    assert Slow.calls == 1 + 1 + 3  # the correctness call, one warm-up call (not 2), the minimum of timed calls
    rows = runner.run_case(get_case("scan"), "cpu", registry=fakes.fake_registry(fakes.FakeScan), shapes=TINY["scan"],
                           modes=["fwd"], warmup=2, repeats=3, budget_s=10.0, measure_memory=False,
                           include_peers=False, progress=lambda s: None)
    assert rows[0].timing["warmup"] == 2


def _targets_run():
    run = _synthetic_run()
    base = dict(kind="attention", device="cuda", issue=5, quote="fused TVA fwd+bwd within 1.15× the time of SDPA",
                shape=dict(B=1, H=1, T=64, D=8), shape_label="B=1 H=1 T=64 D=8", modes=["tva fwd+bwd"],
                providers=["fast"], threshold="time ≤ 1.15× torch_sdpa's")
    run.targets = [
        runner.TargetResult(name="a.met", title="fast vs sdpa", verdict="MET", measured="0.50× (fast 1 ms, sdpa 2 ms)",
                            value=0.5, measured_on="NVIDIA H100 80GB HBM3", **base),
        runner.TargetResult(name="a.gone", title="gone vs sdpa", verdict="NOT MEASURABLE",
                            reason="gone unavailable: needs a GPU", measured_on="NVIDIA H100 80GB HBM3", **base),
        runner.TargetResult(name="s.cpu", title="cpu_native vs the reference", verdict="NOT MEASURABLE",
                            reason="a CPU target (run with --device cpu)",
                            **{**base, "kind": "scan", "device": "cpu", "issue": 3, "quote": "CPU native ≥ 10×"}),
    ]
    return run


def test_targets_markdown_json_and_results_report(tmp_path):
    run = _targets_run()
    md = report.render_markdown(run)
    assert md.index("### Targets") < md.index("### Providers not run") < md.index("### attention: causal fwd")
    assert "(1 MET, 0 NOT MET, 2 NOT MEASURABLE)" in md
    assert "| target | device | shape | measured | threshold | verdict |" in md
    assert ("| attention: fast vs sdpa (#5) | NVIDIA H100 80GB HBM3 | B=1 H=1 T=64 D=8 | 0.50× (fast 1 ms, sdpa 2 ms) "
            "| time ≤ 1.15× torch_sdpa's | **MET** |") in md
    assert "| CPU | B=1 H=1 T=64 D=8 | - | time ≤ 1.15× torch_sdpa's | **NOT MEASURABLE**: a CPU target" in md
    assert md.count("- #5: “fused TVA fwd+bwd within 1.15× the time of SDPA”") == 1 and "- #3: “CPU native ≥ 10×”" in md
    assert "### Targets" not in report.render_markdown(_synthetic_run())
    # JSON: a "targets" list next to the results, read back as the same records; absent without --targets
    p = report.write_json(run, tmp_path / "results" / "t.json")
    data = json.loads(p.read_text())
    assert [t["verdict"] for t in data["targets"]] == ["MET", "NOT MEASURABLE", "NOT MEASURABLE"]
    assert report.load_json(p).targets == run.targets
    assert "targets" not in _synthetic_run().as_dict() and report.load_json(
        report.write_json(_synthetic_run(), tmp_path / "plain.json")).targets is None
    # benchmarks/RESULTS.md: the targets of the files that have them
    report.write_json(_synthetic_run(), tmp_path / "results" / "plain.json")
    text = report.render_results(tmp_path / "results")
    assert "| file | device | when | commit | targets |" in text
    assert "| t.json | NVIDIA H100 80GB HBM3 |" in text and "| 1 MET, 0 NOT MET, 2 NOT MEASURABLE |" in text
    assert "`abc123` | - |" in text and text.count("### Targets") == 1


def test_apt_bench_targets_end_to_end(tmp_path, monkeypatch, capsys):
    from apt.bench.cases.attention import AttentionCase
    from apt.bench.cases.router import RouterCase
    from apt.bench.cases.scan import ScanCase
    from apt.core import registry

    scan, router = _tiny_targets()
    monkeypatch.setattr(ScanCase, "targets", lambda self: scan)
    monkeypatch.setattr(RouterCase, "targets", lambda self: router)
    monkeypatch.setattr(AttentionCase, "targets", lambda self: [])
    monkeypatch.setattr(registry, "REGISTRY", fakes.fake_registry(*fakes.ALL_FAKES, _FastScan))
    out, results = tmp_path / "out", tmp_path / "results"
    argv = ["bench", "--targets", "--device", "cpu", "--repeats", "2", "--warmup", "0", "--budget", "0.05",
            "--no-plots", "--out", str(out), "--save", "--results-dir", str(results)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "### Targets" in stdout and "apt bench: targets: 2 MET, 2 NOT MET, 2 NOT MEASURABLE" in stdout
    data = json.loads((out / "bench.json").read_text())
    assert {t["name"]: t["verdict"] for t in data["targets"]}["scan.gpu"] == "NOT MEASURABLE"
    assert {r["provider"] for r in data["results"]} >= {"fake_ref", "fake_fast", "torch.bmm"}
    md = (out / "bench.md").read_text()
    assert md.index("### Targets") < md.index("### scan: fwd (float32)")
    assert "**NOT MEASURABLE**: needs a CUDA device" in md
    saved = list(results.glob("cpu_*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["targets"] == data["targets"]
    assert main(["bench", "--report", "--results-dir", str(results), "--report-out", str(tmp_path / "R.md")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "### Targets" in text and "| 2 MET, 2 NOT MET, 2 NOT MEASURABLE |" in text
    # --list --targets says what would run, and runs nothing
    assert main(["bench", "--targets", "--list", "--kind", "scan", "--device", "cpu"]) == 0
    listing = capsys.readouterr().out
    assert "scan.met (issue #3; runs): title of scan.met at batch=1 dim=4 N=4 L=8" in listing
    assert "scan.gpu (issue #3; not run: needs a CUDA device" in listing


@pytest.mark.parametrize("flag", [["--quick"], ["--providers", "fake_ref"], ["--max-shapes", "1"], ["--no-peers"]])
def test_apt_bench_targets_rejects_grid_flags(flag, tmp_path, capsys):
    assert main(["bench", "--targets", "--device", "cpu", "--out", str(tmp_path / "o"), "-q", *flag]) == 2
    assert f"cannot be combined with {flag[0]}" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_issues_targets_are_well_formed():
    """The real target list: unique names, the issues' shapes, and only provider/peer names the kinds know."""
    from apt.bench import peers
    from apt.core import registry

    every = tg.all_targets(["attention", "router", "scan"])
    assert len({t.name for t in every}) == len(every)
    by = {t.name: t for t in every}
    assert by["scan.cpu.fwd+bwd"].shape == dict(batch=2, dim=768, N=16, L=2048)
    assert by["scan.cpu.fwd"].threshold == "≥ 10× vs the reference"
    assert by["router.cpu.dispatch+combine"].shape == dict(N=4096, C=1024, E=8, k=2, F=2048)
    assert by["router.cuda.triton.share_of_experts"].shape["N"] == 16384
    att = [t for t in every if t.kind == "attention"]
    assert {(t.shape["T"], t.shape["D"]) for t in att} == {(4096, 64), (8192, 64), (4096, 128), (8192, 128)}
    assert all(t.shape["B"] * t.shape["T"] == 16384 and t.shape["H"] * t.shape["D"] == 2048 for t in att)
    assert {t.device for t in every} == {"cpu", "cuda"} and {t.issue for t in every} == {3, 4, 5}
    for t in every:
        case = get_case(t.kind)
        known = {i.name for i in registry.list_providers(t.kind)} | {p.name for p in peers.peers_for(t.kind)}
        assert set(t.providers) <= known, (t.name, set(t.providers) - known)
        assert set(t.modes) <= set(case.modes) and t.quote and t.threshold


def test_pct_of_peak_only_for_modes_with_a_peak_metric(monkeypatch):
    # the whole MoE layer is reported in tokens/s: no bandwidth figure of its own, so no "% peak" (it used to be the
    # dispatch+combine bytes over the whole layer's time, against the memory bandwidth)
    monkeypatch.setattr(peaks, "_cpu_bandwidth", 1e10)
    reg = fakes.fake_registry(fakes.FakeRouter)
    rows = runner.run_case(get_case("router"), "cpu", registry=reg, shapes=TINY["router"][:1], **FAST)
    pct = {r.mode: r.pct_of_peak for r in rows if r.timing}
    assert pct["route+dispatch+experts+combine"] is None
    assert pct["dispatch+combine"] is not None and pct["dispatch+combine"] > 0
    assert get_case("router").bound("route+dispatch+experts+combine") == ""
    assert get_case("scan").bound("fwd") == "memory" and get_case("attention").bound("causal fwd") == "compute"
