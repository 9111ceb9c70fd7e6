"""The benchmark harness (apt.bench): timing statistics, the correctness gate (a wrong provider is reported wrong and
never timed), report rendering, `apt bench --report`, and `apt bench` end to end on tiny grids. Fake providers in a
private registry keep these tests independent of which real kernels are built."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from apt.bench import fakes, peaks, report, runner
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


def test_peak_memory_cpu_sees_a_large_allocation():
    def alloc():
        x = torch.ones(16 << 20)  # 64 MiB, touched
        return float(x[-1])
    got = runner.measure_peak_memory(alloc, "cpu")
    if got is None:
        pytest.skip("no /proc peak-RSS reset on this system")
    assert got >= 48 << 20


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
    assert all(r.metric == "TFLOP/s" and r.metric_value > 0 for r in ok)
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
