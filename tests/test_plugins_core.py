"""Built-in plugins moe / routing / align, schedules driving them (asserted from hook events and per-step
metrics), the bistate alignment loss, plugin auto-discovery and the manager's isolation."""
from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from apt.core import registry
from apt.core.config import load_profile
from apt.modeling.toy import register_toy_router
from apt.plugins import HookContext, Plugin, PluginError, PluginManager
from apt.plugins.manager import build_plugins
from apt.providers.align import bistate_alignment_loss
from apt.training import Trainer


def _router() -> str:
    """The real default router when the MoE layer is installed, else the test-only toy one."""
    ok = any(i.name == "topk_default" and i.available for i in registry.list_providers("router"))
    return "topk_default" if ok else register_toy_router()

SMALL = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 2, "model.max_seq_len": 16,
         "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3, "training.max_epochs": 3,
         "training.progress": False, "training.warmup_steps": 1}


class MetricsLog(Plugin):
    name = "metrics_log"

    def __init__(self, config=None):
        super().__init__(config)
        self.rows = []

    def on_step_end(self, ctx):
        self.rows.append((ctx.epoch, ctx.step, dict(ctx.metrics)))


def _run(tmp_path, plugins, **over):
    router = _router()
    cfg = load_profile("tiny_debug", {**SMALL, "model.moe.enabled": True, "model.moe.router_name": router,
                                      "training.out_dir": str(tmp_path), **over}, plugins=plugins)
    log = MetricsLog()
    tr = Trainer(cfg, plugins=build_plugins(cfg["plugins"]["enabled"], cfg["plugins"]) + [log])
    tr.fit()
    return tr, log.rows


def test_builtin_plugins_are_registered():
    names = {i.name for i in registry.list_providers("plugin")}
    assert {"moe", "routing", "align"} <= names
    assert registry.get_info("align", "bistate").is_default


def test_autodiscovery_of_a_new_builtin_module(tmp_path, monkeypatch):
    from apt.plugins import builtin
    from apt.providers import plugins as prov_plugins

    (tmp_path / "hello_plugin_mod.py").write_text(
        "from apt.plugins.base import Plugin\nclass Hello(Plugin):\n    name = 'hello_test'\n")
    monkeypatch.setattr(builtin, "__path__", list(builtin.__path__) + [str(tmp_path)])
    try:
        found = {c.name for c in prov_plugins.discover()}
    finally:
        sys.modules.pop("apt.plugins.builtin.hello_plugin_mod", None)
    assert {"hello_test", "moe", "align", "routing"} <= found


def test_moe_enabled_at_scheduled_epoch_with_capacity_and_temperature_schedules(tmp_path):
    tr, rows = _run(tmp_path, ["moe", "routing"], **{
        "schedules.enable_moe_at_epoch": 1,
        "schedules.moe_capacity_factor": {"start": 2.0, "end": 1.0, "by": "epoch"},
        "schedules.route_temperature": {"start": 2.0, "end": 0.5, "by": "step", "kind": "cosine"}})
    events = tr.ctx.events
    enabled = [e for e in events if e[0] == "moe" and e[1] in ("enabled", "upcycled")]
    assert enabled == [("moe", "upcycled", 1, 3), ("moe", "enabled", 1, 3)]  # epoch 1 starts after 3 steps
    for epoch, step, m in rows:
        assert ("loss_moe_balance" in m) == (epoch >= 1), (epoch, step, m)
        assert m["moe_capacity_factor"] == pytest.approx([2.0, 1.5, 1.0][epoch])
    temps = [m["route_temperature"] for _, _, m in rows]
    assert temps[0] == pytest.approx(2.0)
    assert temps[-1] == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 8 / 8)))
    assert all(a >= b for a, b in zip(temps, temps[1:]))
    layer = tr.model.moe_layers()[0]
    assert layer.moe.temperature == pytest.approx(temps[-1]) and layer.moe.capacity_factor == pytest.approx(1.0)
    assert ("routing", "temperature_start:2", 0, 0) in events
    if tr.model.build_report["moe"].startswith("router/"):  # the real MoE layer reports routing statistics
        last = rows[-1][2]
        assert last["moe_load_max"] >= 1.0 and last["moe_dropped"] >= 0


def test_moe_plugin_puts_another_router_behind_the_layers(tmp_path, monkeypatch):
    # other test modules set TRITON_INTERPRET=1 process-wide; "auto" must not pick the (slow) interpreter here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not any(i.name == "topk_default" and i.available for i in registry.list_providers("router")):
        pytest.skip("apt_kernels MoE layer not installed")
    tr, _ = _run(tmp_path, ["moe"], **{"training.max_epochs": 1, "plugins.moe.router": "auto"})
    chosen = [e[1] for e in tr.ctx.events if e[1].startswith("router:")]
    assert len(chosen) == 1
    name = chosen[0].split(":", 1)[1]
    assert registry.get_info("router", name).available
    assert all(layer.moe.router_impl.name == name for layer in tr.model.moe_layers())


def test_align_enabled_at_scheduled_epoch(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="apt.plugins"):
        tr, rows = _run(tmp_path, ["align"], **{"schedules.enable_align_at_epoch": 2, "model.moe.enabled": False,
                                               "plugins.align.weight": 0.5, "plugins.align.tau_align": 0.2})
    assert [e for e in tr.ctx.events if e[0] == "align"] == [("align", "enabled", 2, 6)]
    # recorded, and logged too (it was in ctx.events only, which no user sees)
    assert "plugin align: enabled at epoch 2, step 6" in [r.getMessage() for r in caplog.records]
    for epoch, _, m in rows:
        assert ("loss_align" in m) == (epoch >= 2)
        if epoch >= 2:
            assert m["loss_align"] > 0 and 0 <= m["align_stable"] <= 2


def test_moe_plugin_without_moe_layers_reports_it(tmp_path):
    tr, _ = _run(tmp_path, ["moe"], **{"model.moe.enabled": False, "training.max_epochs": 1})
    assert any(e[:2] == ("moe", "no_moe_layers") for e in tr.ctx.events)


def test_gpt5_moe_reasoning_profile_trains_a_few_steps(tmp_path):
    router = _router()
    cfg = load_profile("gpt5_moe_reasoning", {
        "model.d_model": 32, "model.num_heads": 2, "model.num_layers": 2, "model.max_seq_len": 16,
        "model.moe.router_name": router, "model.moe.num_experts": 4, "data.seq_len": 16, "data.batch_size": 2,
        "training.steps_per_epoch": 1, "training.max_epochs": 3, "training.grad_accum": 1,
        "training.warmup_steps": 1, "training.progress": False, "training.out_dir": str(tmp_path)})
    tr = Trainer(cfg)
    summary = tr.fit()
    assert summary["steps"] == 3 and not summary["disabled_plugins"]
    kinds = [(e[0], e[1], e[2]) for e in tr.ctx.events]
    assert ("moe", "enabled", 1) in kinds and ("align", "enabled", 2) in kinds
    assert "loss_align" in tr.ctx.metrics and "loss_moe_balance" in tr.ctx.metrics


# ---- the bistate alignment loss --------------------------------------------------------------------------
def test_bistate_loss_definition():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    total, parts = bistate_alignment_loss(a, b, alpha=0.3, beta=2.0, tau_align=0.5)
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    stable = (1 - (an * bn).sum(-1)).mean()
    align = F.cross_entropy(an @ bn.t() / 0.5, torch.arange(6))
    torch.testing.assert_close(parts["stable"], stable)
    torch.testing.assert_close(parts["align"], align)
    torch.testing.assert_close(total, 0.3 * stable + 2.0 * align)


def test_bistate_loss_properties():
    eye = torch.eye(4, 8) * 3.0
    total, parts = bistate_alignment_loss(eye, eye, tau_align=0.01)
    assert parts["stable"].abs() < 1e-6 and parts["align"] < 1e-6  # matched, distinct states: ~0
    same = torch.ones(4, 8)
    _, parts = bistate_alignment_loss(same, same, tau_align=0.1)
    assert parts["stable"].abs() < 1e-6 and parts["align"] == pytest.approx(math.log(4), rel=1e-5)  # collapse
    _, swapped = bistate_alignment_loss(eye, eye.flip(0), tau_align=0.1)
    assert swapped["stable"] == pytest.approx(1.0) and swapped["align"] > 5
    a = torch.randn(3, 5, 8, requires_grad=True)
    b = torch.randn(3, 5, 8, requires_grad=True)
    total, _ = bistate_alignment_loss(a, b, max_tokens=7, detach_b=True)
    total.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and b.grad is None
    with pytest.raises(ValueError, match="tau_align"):
        bistate_alignment_loss(a, b, tau_align=0.0)
    with pytest.raises(ValueError, match="shape"):
        bistate_alignment_loss(a, b[:, :2])
    with pytest.raises(ValueError, match="tau_align"):
        bistate_alignment_loss(a, b, tau_align=float("nan"))
    with pytest.raises(ValueError, match="a: no tokens"):  # the mean over no tokens was a silent NaN
        bistate_alignment_loss(a[:, :0], b[:, :0])


# ---- manager ----------------------------------------------------------------------------------------------
class Shout(Plugin):
    name = "shout"

    def augment_prompt(self, prompt, ctx):
        return prompt.upper()


class Broken(Plugin):
    name = "broken"

    def augment_prompt(self, prompt, ctx):
        raise KeyError("nope")

    def select_sample(self, candidates, ctx):
        raise RuntimeError("nope")


class First(Plugin):
    name = "first"

    def select_sample(self, candidates, ctx):
        return candidates[0]


def test_manager_generation_hooks_are_isolated():
    mgr = PluginManager([Broken(), Shout(), First()])
    ctx = HookContext()
    assert mgr.augment_prompt("hi", ctx) == "HI"
    assert "broken" in mgr.disabled and ("broken", "failed:augment_prompt", 0, 0) in ctx.events
    assert mgr.select_sample(["a", "b"], ctx) == "a"


def test_unknown_plugin_and_bad_settings():
    with pytest.raises(PluginError, match="unknown plugin 'nosuch'.*align"):
        build_plugins(["nosuch"])
    with pytest.raises(PluginError, match="plugins.routing"):
        build_plugins(["routing"], {"routing": {"temperatur": 2.0}})
    with pytest.raises(PluginError, match="tau_align"):
        build_plugins(["align"], {"align": {"tau_align": -1}})
    # a value of the wrong type names the setting (it said only "invalid literal for int()")
    with pytest.raises(PluginError, match=r"plugins.voter: k: expected an integer >= 2, got 'abc'"):
        build_plugins(["voter"], {"voter": {"k": "abc"}})
    with pytest.raises(PluginError, match=r"plugins.routing: temperature: expected a finite number > 0, got \[1\]"):
        build_plugins(["routing"], {"routing": {"temperature": [1]}})
    with pytest.raises(PluginError, match="unknown plugin 'auto'"):  # not the registry's pick of the best one
        build_plugins(["auto"])


@pytest.mark.parametrize("name, settings, fragment", [
    # each was accepted when built and then stopped the run from the model's forward (or made the loss NaN)
    ("routing", {"temperature": float("nan")}, "temperature: expected a finite number > 0, got nan"),
    ("routing", {"temperature": float("inf")}, "temperature: expected a finite number > 0, got inf"),
    ("moe", {"capacity_factor": -1}, "capacity_factor: expected a finite number > 0 or null, got -1"),
    ("moe", {"capacity_factor": "abc"}, "capacity_factor: expected a finite number"),
    ("moe", {"upcycle": "false"}, "upcycle: expected true or false"),  # bool("false") is True
    ("moe", {"router": 3}, "router: expected a router provider name"),
    ("align", {"tau_align": float("nan")}, "tau_align: expected a finite number > 0"),
    ("align", {"weight": float("nan")}, "weight: expected a finite number >= 0"),
    ("align", {"max_tokens": 0}, "max_tokens: expected an integer >= 1 or null, got 0"),
    ("align", {"max_tokens": "12"}, "max_tokens: expected an integer"),
    ("align", {"detach_b": "false"}, "detach_b: expected true or false"),
    ("align", {"alpha": -1}, "alpha: expected a finite number >= 0"),
    ("retriever", {"template": "{prompt.x}"}, "template: AttributeError"),
    ("retriever", {"template": 3}, "template: expected a string"),
    ("retriever", {"provider": "nope"}, "provider: .*'nope' is not registered"),
    ("retriever", {"n_features": "abc"}, "n_features: expected an integer >= 1"),
    ("retriever", {"ngrams": 3}, "ngrams: expected 1"),
    ("retriever", {"provider_config": [1]}, "provider_config: expected a mapping"),
])
def test_bad_plugin_settings_are_refused_when_built(name, settings, fragment):
    with pytest.raises(PluginError, match=f"plugins.{name}: {fragment}"):
        build_plugins([name], {name: settings})


def test_a_scheduled_capacity_factor_that_leaves_the_range_disables_only_the_plugin():
    moe = build_plugins(["moe"])[0]
    layer = type("L", (), {"capacity_factor": 1.25})()
    moe._layers = [layer]
    sched = type("S", (), {"value": lambda self, key, epoch, step, default: -0.5})()
    mgr = PluginManager([moe])
    mgr.broadcast("on_step_start", HookContext(extra={"schedules": sched}))
    assert "moe_capacity_factor reached -0.5" in mgr.disabled["moe"] and layer.capacity_factor == 1.25


def test_resume_with_scheduled_plugins_equals_uninterrupted(tmp_path):
    router = _router()
    over = {**SMALL, "model.moe.enabled": True, "model.moe.router_name": router, "model.dropout": 0.1,
            "schedules.enable_moe_at_epoch": 1, "schedules.enable_align_at_epoch": 1,
            "schedules.route_temperature": {"start": 2.0, "end": 1.0, "by": "step"},
            "schedules.moe_capacity_factor": {"start": 2.0, "end": 1.0, "by": "epoch"}}
    plugins = ["moe", "routing", "align"]
    a = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path / "a")}, plugins=plugins))
    a.fit()
    b = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path / "b")}, plugins=plugins))
    b.fit(stop_at_step=5)  # after MoE and align switched on (epoch 1 = steps 4..6)
    c = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path / "b"),
                                            "training.resume": "auto"}, plugins=plugins))
    c.fit()
    assert c.history == a.history and len(a.history) == 9
    for (n, pa), (_, pc) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(pa, pc), n
    assert not [e for e in c.ctx.events if e[1] in ("enabled", "upcycled")]  # nothing switched on twice


def test_resume_at_an_epoch_end_validates_with_the_scheduled_values(tmp_path):
    """Stopped after an epoch's last step, before its validation: the resumed run validates that epoch first, with
    no optimizer step in between, so the plugins must restore the capacity factor and router temperature of the
    last step there (they set them only at each step's start, and the val loss of epoch 1 differed)."""
    router = _router()
    over = {**SMALL, "model.moe.enabled": True, "model.moe.router_name": router,
            "schedules.route_temperature": {"start": 3.0, "end": 0.5, "by": "step"},
            "schedules.moe_capacity_factor": {"start": 2.0, "end": 0.2, "by": "epoch"}}  # binding at epoch 1
    plugins = ["moe", "routing"]
    a = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path / "a")}, plugins=plugins))
    a.fit()
    b = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path / "b")}, plugins=plugins))
    b.fit(stop_at_step=6)  # the last step of epoch 1 (steps 4..6), before its validation
    c = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path / "b"),
                                            "training.resume": "auto"}, plugins=plugins))
    c.fit()
    assert len(a.val_history) == 3
    assert c.val_history[-2:] == a.val_history[-2:]
    assert c.history == a.history


def test_enable_at_epoch_gates_every_plugin(tmp_path):
    """schedules.enable_<name>_at_epoch holds for any plugin: before that epoch the manager gives it no epoch/step
    hooks and no compute_loss (it still gets on_training_start/end); a plugin that manages its schedule (moe)
    gets them always. In a run, routing leaves the router temperature alone until its epoch."""
    from apt.core.schedules import Schedules

    class Rec(Plugin):
        name = "rec"

        def __init__(self):
            super().__init__()
            self.seen = []

        def on_training_start(self, ctx):
            self.seen.append(("start", ctx.epoch))

        def on_epoch_start(self, ctx):
            self.seen.append(("epoch", ctx.epoch))

        def on_step_start(self, ctx):
            self.seen.append(("step", ctx.epoch))

        def compute_loss(self, ctx):
            self.seen.append(("loss", ctx.epoch))

    class Managed(Rec):
        name = "managed"
        manages_schedule = True

    rec, managed = Rec(), Managed()
    mgr = PluginManager([rec, managed])
    ctx = HookContext(extra={"schedules": Schedules({"enable_rec_at_epoch": 1, "enable_managed_at_epoch": 1}, 3)})
    for epoch in range(2):
        ctx.epoch = epoch
        for hook in ("on_training_start", "on_epoch_start", "on_step_start", "compute_loss"):
            mgr.broadcast(hook, ctx)
    assert rec.seen == [("start", 0), ("start", 1), ("epoch", 1), ("step", 1), ("loss", 1)]
    assert len(managed.seen) == 8

    over = {**SMALL, "model.moe.enabled": True, "model.moe.router_name": _router(),
            "schedules.route_temperature": 4.0, "schedules.enable_routing_at_epoch": 1}
    tr = Trainer(load_profile("tiny_debug", {**over, "training.out_dir": str(tmp_path)},
                              plugins=["routing"]))
    temps = []
    orig = tr.plugins.broadcast

    def spy(hook, c):
        orig(hook, c)
        if hook == "on_step_start":
            temps.append((c.epoch, {float(m.temperature) for m in tr.model.moe_layers()}))

    tr.plugins.broadcast = spy
    tr.fit()
    assert {e for e, _ in temps} == {0, 1, 2}
    assert all(t != {4.0} for e, t in temps if e == 0) and all(t == {4.0} for e, t in temps if e >= 1)


def test_a_plugin_disabled_before_a_resume_is_reported_when_resuming(caplog):
    import logging

    mgr = PluginManager([Broken(), Shout()])
    mgr.augment_prompt("x", HookContext())
    state = mgr.state_dict()
    fresh = PluginManager([Broken(), Shout()])
    with caplog.at_level(logging.WARNING):
        fresh.load_state_dict(state)
    assert "broken" in fresh.disabled and "apt plugin broken: disabled earlier in this run" in caplog.text


def test_a_misspelt_hook_is_warned_about(caplog):
    import logging

    class Typo(Plugin):
        name = "typo_plugin"

        def on_step_ended(self, ctx):  # never called: the hook is on_step_end
            pass

        def on_step_end(self, ctx):
            pass

    with caplog.at_level(logging.WARNING, logger="apt.plugins.manager"):
        PluginManager([Typo()])
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "typo_plugin: on_step_ended is not a hook" in msgs[0]
    assert "did you mean on_step_end?" in msgs[0]


def test_moe_active_metric_reaches_the_step_hooks(tmp_path):
    """It was set at epoch start, and the trainer clears the metrics at each step's start."""
    seen = []

    class Watch(Plugin):
        name = "watch"

        def on_step_end(self, ctx):
            seen.append(ctx.metrics.get("moe_active"))

    cfg = load_profile("tiny_debug", {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1,
                                      "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 2,
                                      "training.max_epochs": 2, "training.progress": False,
                                      "training.out_dir": str(tmp_path), "model.moe.enabled": True,
                                      "model.moe.router_name": register_toy_router(), "plugins.enabled": ["moe"],
                                      "schedules": {"enable_moe_at_epoch": 1}})
    tr = Trainer(cfg)
    tr.plugins = PluginManager([*tr.plugins.plugins, Watch()])
    tr.fit()
    assert seen == [False, False, True, True]


def test_align_provider_max_tokens_none_override_means_no_subsampling():
    torch.manual_seed(0)
    a, b = torch.randn(600, 8), torch.randn(600, 8)
    p = registry.get("align", "bistate")  # default max_tokens=512
    got, _ = p.loss(a, b, max_tokens=None)  # was: the 512-token subsample, silently
    torch.testing.assert_close(got, bistate_alignment_loss(a, b, max_tokens=None)[0])
    # a None for the other settings still keeps the configured value (what the align plugin's schedules rely on)
    torch.testing.assert_close(p.loss(a, b, alpha=None, beta=None, tau_align=None)[0], bistate_alignment_loss(a, b)[0])
