"""Trainer: tiny_debug trains end to end on CPU with a falling loss; resume equals an uninterrupted run; hooks are
broadcast in order; a failing plugin is disabled while training goes on; plugin aux losses join the loss."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from apt.core.config import load_profile
from apt.plugins.base import Plugin
from apt.training import Trainer, load_for_inference
from apt.training.trainer import amp_dtype, lr_factor

SMALL = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1, "model.max_seq_len": 16,
         "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3, "training.max_epochs": 2,
         "training.progress": False, "training.warmup_steps": 2, "training.log_every": 1}


def _cfg(tmp_path, **over):
    return load_profile("tiny_debug", {**SMALL, "training.out_dir": str(tmp_path / "run"), **over})


class Recorder(Plugin):
    name = "recorder"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = []

    def _rec(self, hook, ctx):
        self.calls.append((hook, ctx.epoch, ctx.step))

    def on_training_start(self, ctx): self._rec("on_training_start", ctx)
    def on_epoch_start(self, ctx): self._rec("on_epoch_start", ctx)
    def on_step_start(self, ctx): self._rec("on_step_start", ctx)
    def on_step_end(self, ctx): self._rec("on_step_end", ctx)
    def on_epoch_end(self, ctx): self._rec("on_epoch_end", ctx)
    def on_training_end(self, ctx): self._rec("on_training_end", ctx)
    def compute_loss(self, ctx): self._rec("compute_loss", ctx)


class Boom(Plugin):
    name = "boom"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def on_step_end(self, ctx):
        self.calls += 1
        if ctx.step == 2:
            raise RuntimeError("boom at step 2")


class ConstLoss(Plugin):
    name = "const"

    def compute_loss(self, ctx):
        ctx.aux_losses["const"] = torch.tensor(5.0)


def test_tiny_debug_trains_and_loss_falls(tmp_path):
    cfg = load_profile("tiny_debug", {"training.steps_per_epoch": 15, "training.out_dir": str(tmp_path / "r"),
                                      "training.progress": False})
    summary = Trainer(cfg).fit()
    hist = summary["steps"], summary["first_loss"], summary["final_loss"]
    assert summary["steps"] == 30 and summary["epochs"] == 2, hist
    assert summary["first_loss"] > 5.0  # ~ln(257) at initialisation
    assert summary["final_loss"] < summary["first_loss"] - 1.5, hist
    assert len(summary["val_losses"]) == 2 and summary["val_losses"][-1] < summary["first_loss"] - 1.5
    model, tok, prof = load_for_inference(tmp_path / "r" / "last.pt")
    ids = torch.tensor([tok.encode("The keeper")])
    assert model(ids).shape == (1, ids.shape[1], tok.vocab_size)
    assert prof["name"] == "tiny_debug" and not model.training


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, accum):
    over = {"model.dropout": 0.1, "training.grad_accum": accum}
    a = Trainer(_cfg(tmp_path / "a", **over))
    sa = a.fit()
    b = Trainer(_cfg(tmp_path / "b", **over))
    sb = b.fit(stop_at_step=4)  # mid epoch 1 (3 steps per epoch)
    assert sb["stopped_early"] and sb["steps"] == 4
    torch.manual_seed(1234)  # a fresh process would not share RNG state with the interrupted one
    c = Trainer(_cfg(tmp_path / "b", **over, **{"training.resume": "auto"}))
    assert c.step == 4 and c.epoch == 1
    sc = c.fit()
    assert sc["steps"] == sa["steps"] == 6
    assert c.history == a.history
    for (n, pa), (_, pc) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(pa, pc), n
    assert c.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("stop, exc, fragment", [
    (0, ValueError, "expected a step after the current one (0), got 0"),
    (-3, ValueError, "got -3"),
    (True, TypeError, "expected an int or None, got bool"),
    (2.0, TypeError, "got float"),
])
def test_fit_checks_stop_at_step(tmp_path, stop, exc, fragment):
    """A stop at or before the current step trained one step anyway (the check ran after the step)."""
    tr = Trainer(_cfg(tmp_path))
    with pytest.raises(exc, match="stop_at_step: ") as info:
        tr.fit(stop_at_step=stop)
    assert fragment in str(info.value) and tr.step == 0


def test_hook_order_and_counts(tmp_path):
    rec = Recorder()
    tr = Trainer(_cfg(tmp_path, **{"training.grad_accum": 2}), plugins=[rec])
    tr.fit()
    hooks = [c[0] for c in rec.calls]
    assert hooks[0] == "on_training_start" and hooks[-1] == "on_training_end"
    assert hooks.count("on_epoch_start") == hooks.count("on_epoch_end") == 2
    assert hooks.count("on_step_start") == hooks.count("on_step_end") == 6
    assert hooks.count("compute_loss") == 12  # every micro-batch
    ends = [c for c in rec.calls if c[0] == "on_step_end"]
    assert [c[2] for c in ends] == [1, 2, 3, 4, 5, 6] and [c[1] for c in ends] == [0, 0, 0, 1, 1, 1]


def test_failing_plugin_is_disabled_and_training_goes_on(tmp_path, caplog):
    boom, rec = Boom(), Recorder()
    summary = Trainer(_cfg(tmp_path), plugins=[boom, rec]).fit()
    assert summary["steps"] == 6
    assert "boom" in summary["disabled_plugins"] and "boom at step 2" in summary["disabled_plugins"]["boom"]
    assert boom.calls == 2  # not called after it failed
    assert [c[0] for c in rec.calls].count("on_step_end") == 6  # the other plugin still gets every hook
    assert any("boom" in r.getMessage() and "disabled" in r.getMessage() for r in caplog.records)


def test_plugin_aux_loss_joins_the_loss(tmp_path):
    tr = Trainer(_cfg(tmp_path, **{"training.max_epochs": 1, "training.steps_per_epoch": 1}),
                 plugins=[ConstLoss()])
    tr.fit()
    m = tr.ctx.metrics
    assert m["loss_const"] == pytest.approx(5.0)
    assert m["loss"] == pytest.approx(m["loss_lm"] + 5.0, rel=1e-5)


class BadAux(Plugin):
    def __init__(self, name, make):
        super().__init__()
        self.name, self.make = name, make

    def compute_loss(self, ctx):
        ctx.aux_losses[self.name] = self.make(ctx)


@pytest.mark.parametrize("make, what", [
    (lambda ctx: ctx.extra["logits"].mean(-1).flatten(), "tensor of shape (64,)"),  # stopped the run in backward
    (lambda ctx: 123.0, "float 123.0"),  # was dropped without a word
    (lambda ctx: torch.tensor(3), "torch.int64 tensor"),
])
def test_a_plugin_aux_loss_that_is_no_scalar_loss_disables_only_that_plugin(tmp_path, make, what):
    bad = BadAux("bad", make)
    tr = Trainer(_cfg(tmp_path, **{"training.max_epochs": 1, "training.steps_per_epoch": 2}),
                 plugins=[bad, ConstLoss()])
    summary = tr.fit()
    assert summary["steps"] == 2 and "aux_losses['bad']: expected a one-element float tensor" in \
        summary["disabled_plugins"]["bad"] and what in summary["disabled_plugins"]["bad"]
    m = tr.ctx.metrics
    assert "loss_bad" not in m and m["loss"] == pytest.approx(m["loss_lm"] + 5.0, rel=1e-5)


def test_lr_schedule_and_amp_policy():
    """Warmup to the full LR at step `warmup` (used once), a cosine that reaches the floor at the last step (it
    ended at step `total`, which never runs: the floor was never reached, and the peak was used twice)."""
    f = [lr_factor(s, 3, 10, 0.1) for s in range(10)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and f[4] < 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[3:], f[4:]))  # strictly down after the peak
    assert lr_factor(6, 3, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    g = [lr_factor(s, 0, 5, 0.0) for s in range(5)]
    assert g[0] == 1.0 and g[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 0, 1, 0.1) == 1.0 and lr_factor(7, 3, 10, 0.1) >= 0.1
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) is None


def test_max_steps_stops_mid_epoch(tmp_path):
    summary = Trainer(_cfg(tmp_path, **{"training.max_steps": 4})).fit()
    assert summary["steps"] == 4 and (tmp_path / "run" / "last.pt").is_file()
    assert not summary["stopped_early"]  # it ran every step it was asked for, though mid-epoch


def test_mamba_backbone_trains(tmp_path):
    cfg = load_profile("mamba_tiny", {"model.d_model": 32, "data.seq_len": 16, "data.batch_size": 8,
                                      "training.steps_per_epoch": 16, "training.warmup_steps": 2, "training.lr": 1e-2,
                                      "training.out_dir": str(tmp_path), "training.progress": False})
    summary = Trainer(cfg).fit()
    assert summary["final_loss"] < summary["first_loss"] - 0.8, (summary["first_loss"], summary["final_loss"])
    model, tok, _ = load_for_inference(tmp_path / "last.pt")
    assert model.backbone == "mamba"


def test_progress_bar_shows_loss_and_tokens_per_second(tmp_path, capsys):
    pytest.importorskip("tqdm")
    Trainer(_cfg(tmp_path, **{"training.progress": True, "training.max_epochs": 1})).fit()
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err


@pytest.mark.cuda
def test_cuda_amp_training_and_resume(tmp_path):
    over = {"training.device": "cuda", "training.amp": "auto", "training.grad_accum": 2}
    a = Trainer(_cfg(tmp_path / "a", **over))
    assert a.amp_dtype in (torch.bfloat16, torch.float16)
    sa = a.fit()
    assert math.isfinite(sa["final_loss"])
    b = Trainer(_cfg(tmp_path / "b", **over))
    b.fit(stop_at_step=4)
    c = Trainer(_cfg(tmp_path / "b", **over, **{"training.resume": "auto"}))
    c.fit()
    for (n, pa), (_, pc) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        torch.testing.assert_close(pa, pc, msg=n)


class GradGrab(Plugin):
    name = "gradgrab"

    def on_step_end(self, ctx):  # gradients of the step just taken are still in .grad here
        self.grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # Two micro-batches of 4 draw the same windows as one batch of 8 (same generator stream), so the accumulated
    # gradient must equal the big batch's gradient up to float summation order.
    over = {"training.max_epochs": 1, "training.steps_per_epoch": 1, "training.grad_clip": None}
    gb, gs = GradGrab(), GradGrab()
    big = Trainer(_cfg(tmp_path / "big", **over, **{"data.batch_size": 8}), plugins=[gb])
    small = Trainer(_cfg(tmp_path / "small", **over, **{"data.batch_size": 4, "training.grad_accum": 2}),
                    plugins=[gs])
    xb, _ = next(big.data.batches(0, 1))
    xs = torch.cat([b[0] for b in small.data.batches(0, 2)])
    assert torch.equal(xb, xs)
    big.fit()
    small.fit()
    assert big.history == pytest.approx(small.history, rel=1e-5)
    assert gb.grads.keys() == gs.grads.keys() and len(gb.grads) > 5
    for n in gb.grads:
        torch.testing.assert_close(gs.grads[n], gb.grads[n], atol=1e-6, rtol=1e-4, msg=n)


class NaNLoss(Plugin):
    name = "nanloss"

    def compute_loss(self, ctx):
        if ctx.step >= 1:
            ctx.aux_losses["bad"] = torch.tensor(float("nan"))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 0, step 2"):
        Trainer(_cfg(tmp_path), plugins=[NaNLoss()]).fit()


def test_default_out_dir_and_save_every(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_profile("tiny_debug", {**SMALL, "training.max_epochs": 1, "training.save_every": 2})
    saved = []
    tr = Trainer(cfg)
    orig = tr.save_checkpoint
    tr.save_checkpoint = lambda path=None: saved.append(tr.step) or orig(path)
    tr.fit()
    assert saved == [2, 3]  # every 2 steps, and at the epoch end
    assert (tmp_path / "apt_runs" / "tiny_debug" / "last.pt").is_file()


class CtrlC(Plugin):
    name = "ctrlc"

    def on_step_end(self, ctx):
        if ctx.step == 2:
            raise KeyboardInterrupt


def test_keyboard_interrupt_saves_a_resumable_checkpoint(tmp_path):
    tr = Trainer(_cfg(tmp_path), plugins=[CtrlC()])  # KeyboardInterrupt is not isolated like plugin errors
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    again = Trainer(_cfg(tmp_path, **{"training.resume": "auto"}), plugins=[])
    assert again.step == 2 and again.batch_in_epoch == 2
    assert again.fit()["steps"] == 6


class CtrlCMidStep(Plugin):
    """Ctrl-C while the second micro-batch of step ``at`` is in flight (its forward has drawn dropout masks)."""
    name = "ctrlc_mid"

    def __init__(self, at):
        super().__init__(None)
        self.at, self.seen = at, 0

    def compute_loss(self, ctx):
        if ctx.step == self.at:
            self.seen += 1
            if self.seen == 2:
                raise KeyboardInterrupt


def _assert_same_run(x, y):
    assert x.history == y.history and x.val_history == y.val_history and x.tokens_seen == y.tokens_seen
    for (n, px), (_, py) in zip(x.model.state_dict().items(), y.model.state_dict().items()):
        assert torch.equal(px, py), n


def _resume_after_interrupt(tmp_path, over, interrupted):
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    torch.manual_seed(99)  # a fresh process would not share RNG state with the interrupted one
    c = Trainer(_cfg(tmp_path / "b", **over, **{"training.resume": "auto"}))
    c.fit()
    return c


def test_ctrl_c_mid_grad_accumulation_resumes_exactly(tmp_path):
    over = {"model.dropout": 0.1, "training.grad_accum": 2}
    a = Trainer(_cfg(tmp_path / "a", **over))
    a.fit()
    b = Trainer(_cfg(tmp_path / "b", **over), plugins=[CtrlCMidStep(at=4)])
    c = _resume_after_interrupt(tmp_path, over, b)
    assert b.step == 4 and c.step == 6
    _assert_same_run(a, c)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the test's wrapper
def test_ctrl_c_during_the_optimizer_step_is_held_until_the_step_is_whole(tmp_path):
    import signal

    over = {"model.dropout": 0.1, "training.grad_accum": 2}
    a = Trainer(_cfg(tmp_path / "a", **over))
    a.fit()
    b = Trainer(_cfg(tmp_path / "b", **over))
    opt_step = b.optimizer.step

    def step_then_ctrl_c(*args, **kw):
        out = opt_step(*args, **kw)
        if b.step == 3:  # the parameters have moved, the scheduler and the step counter not yet
            signal.raise_signal(signal.SIGINT)
        return out

    b.optimizer.step = step_then_ctrl_c
    # Python's own handler, whatever this process inherited: started in the background by a shell without job
    # control, SIGINT is ignored (SIG_IGN), the trainer rightly leaves that alone, and no Ctrl-C would arrive
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        c = _resume_after_interrupt(tmp_path, over, b)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert b.step == 4 and c.step == 6  # the step in flight was finished, then the run stopped
    _assert_same_run(a, c)


def test_bpe_tokenizer_travels_in_the_checkpoint(tmp_path):
    tr = Trainer(_cfg(tmp_path, **{"data.tokenizer": "bpe", "data.bpe_vocab_size": 300,
                                   "training.max_epochs": 1, "training.steps_per_epoch": 1}))
    tr.fit()
    assert tr.model.vocab_size == 300
    model, tok, prof = load_for_inference(tmp_path / "run" / "last.pt")
    assert tok.state_dict() == tr.tokenizer.state_dict() and tok.vocab_size == 300
    text = "The keeper climbed the stairs"
    assert tok.decode(tok.encode(text)) == text
    assert model(torch.tensor([tok.encode(text)[:16]])).shape[-1] == 300


class LrAtStepEnd(Plugin):
    name = "lrgrab"

    def __init__(self, config=None):
        super().__init__(config)
        self.reported, self.used = [], []

    def on_step_start(self, ctx):  # the LR the coming optimizer step uses
        self.used.append(ctx.trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, ctx):
        self.reported.append(ctx.metrics["lr"])


def test_lr_metric_is_the_lr_the_step_used(tmp_path):
    grab = LrAtStepEnd()
    tr = Trainer(_cfg(tmp_path, **{"training.warmup_steps": 3}), plugins=[grab])
    tr.fit()
    base = float(tr.t["lr"])
    # linear warmup, step 1 at lr / (warmup + 1), the full lr at step warmup + 1 (once)
    assert grab.used[:4] == pytest.approx([base / 4, 2 * base / 4, 3 * base / 4, base]) and grab.used[4] < base
    assert grab.reported == pytest.approx(grab.used)


def test_resume_from_another_models_checkpoint_names_the_mismatch(tmp_path):
    from apt.training.checkpoint import CheckpointError

    Trainer(_cfg(tmp_path, **{"training.max_steps": 1})).fit()
    with pytest.raises(CheckpointError, match=r"last\.pt.*does not match.*model\.d_model"):
        Trainer(_cfg(tmp_path, **{"model.d_model": 48, "training.resume": "auto"}))


def test_val_loss_is_the_mean_over_tokens(tmp_path):
    from apt.data.datasets import TokenBatches

    g = torch.Generator().manual_seed(0)
    train = TokenBatches(torch.randint(0, 256, (400,), generator=g), 16, 4)
    val = TokenBatches(torch.randint(0, 256, (16 * 5 + 1,), generator=g), 16, 4)  # 5 windows: batches of 4 and 1
    tr = Trainer(_cfg(tmp_path), data=train, val_data=val)
    batches = list(val.sequential(20))
    assert [x.shape[0] for x, _ in batches] == [4, 1]  # a mean of the two batch means would weigh 1 window as 4
    tr.model.eval()
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(tr.model(x).flatten(0, 1), y.flatten(), reduction="sum")
               for x, y in batches]
    expect = float(sum(nll)) / sum(y.numel() for _, y in batches)
    assert tr.evaluate() == pytest.approx(expect, rel=1e-5)


def test_configured_vocab_size_pads_the_embedding_and_must_cover_the_tokenizer(tmp_path):
    tr = Trainer(_cfg(tmp_path, **{"model.vocab_size": 320, "training.max_epochs": 1,
                                   "training.steps_per_epoch": 1}))
    assert tr.model.vocab_size == 320 and tr.cfg["model"]["vocab_size"] == 320
    tr.fit()
    model, tok, _ = load_for_inference(tmp_path / "run" / "last.pt")
    assert model.vocab_size == 320 and tok.vocab_size == 257
    with pytest.raises(ValueError, match=r"model.vocab_size: 100 is smaller than the tokenizer's vocabulary \(257"):
        Trainer(_cfg(tmp_path, **{"model.vocab_size": 100}))


def test_warmup_longer_than_the_run_is_warned_about(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="apt.training.trainer"):
        Trainer(_cfg(tmp_path, **{"training.warmup_steps": 20, "training.max_steps": 5}))
    assert "training.warmup_steps (20) >= the run's 5 steps" in caplog.text


def test_a_prebuilt_model_keeps_the_profiles_plugins_and_schedules(tmp_path):
    """Trainer(cfg, model=m) took m's whole config: the plugins, schedules and name of cfg were dropped."""
    from apt.modeling import ModelBuilder

    model = ModelBuilder(_cfg(tmp_path), vocab_size=257).build()
    cfg = _cfg(tmp_path, **{"plugins.enabled": ["align"], "schedules": {"align_beta": 0.5}})
    cfg["name"] = "other_name"
    tr = Trainer(cfg, model=model)
    assert [p.name for p in tr.plugins.plugins] == ["align"] and tr.cfg["schedules"] == {"align_beta": 0.5}
    assert tr.cfg["name"] == "other_name" and tr.cfg["model"]["vocab_size"] == 257


def test_mamba_a_log_and_d_get_no_weight_decay(tmp_path):
    cfg = load_profile("mamba_tiny", {"model.d_model": 32, "data.seq_len": 16, "training.weight_decay": 0.1,
                                      "training.out_dir": str(tmp_path), "training.progress": False})
    tr = Trainer(cfg)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in tr.optimizer.param_groups)
    assert not any(n.endswith(("A_log", ".D")) for n in decay)
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith("in_proj.weight") for n in decay)


def test_validation_covers_the_whole_split_unless_capped(tmp_path):
    tr = Trainer(_cfg(tmp_path, **{"data.val_fraction": 0.5}))
    n = sum(1 for _ in tr.val_data.sequential())
    assert n > 20  # the loss stopped at 20 batches
    full, capped = tr.evaluate(), tr.evaluate(max_batches=2)
    tr.t["eval_batches"] = 2
    assert tr.evaluate() == capped and full != capped


def test_the_run_does_not_depend_on_global_rng_use_before_fit(tmp_path):
    """The seed was applied in __init__ only: a torch.rand (or another Trainer) between __init__ and fit() changed
    the run's dropout draws."""
    over = {"model.dropout": 0.1, "training.max_steps": 3}
    a = Trainer(_cfg(tmp_path / "a", **over))
    sa = a.fit()
    b = Trainer(_cfg(tmp_path / "b", **over))
    Trainer(_cfg(tmp_path / "c", **over))
    torch.rand(100)
    sb = b.fit()
    assert sa["final_loss"] == sb["final_loss"] and a.history == b.history


def test_evaluate_checks_max_batches_and_keeps_the_models_mode(tmp_path):
    """evaluate(0) and evaluate(-1) scored one batch; the model was always left in training mode."""
    tr = Trainer(_cfg(tmp_path, **{"data.val_fraction": 0.5}))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_batches: expected an int >= 1 or None"):
            tr.evaluate(bad)
    tr.model.eval()
    tr.evaluate(1)
    assert not tr.model.training


def test_a_schedule_no_enabled_plugin_reads_is_warned_about(tmp_path, caplog):
    """A misspelt schedule name was accepted and had no effect, without a word (Plugin.schedule_names)."""
    cfg = _cfg(tmp_path, **{"plugins.enabled": ["routing"],
                            "schedules.route_temprature": {"start": 2.0, "end": 1.0},
                            "schedules.align_beta": 0.5, "schedules.someone_elses": 1.0})
    with caplog.at_level("WARNING", logger="apt.training.trainer"):
        Trainer(cfg)
    assert ("schedules.route_temprature: no plugin reads a schedule of that name (did you mean "
            "'route_temperature', read by 'routing'?)") in caplog.text
    assert "schedules.align_beta: read by plugin 'align', which is not enabled" in caplog.text
    assert "someone_elses" not in caplog.text  # undeclared: perhaps a third-party plugin's
    caplog.clear()
    with caplog.at_level("WARNING", logger="apt.training.trainer"):
        Trainer(_cfg(tmp_path, **{"plugins.enabled": ["routing"], "schedules.route_temperature": 2.0}))
    assert "schedules." not in caplog.text


def test_explicit_amp_on_cpu_warns(caplog):
    """An explicit training.amp: bf16 / fp16 on a CPU run was ignored with only an INFO log; auto / off stay silent."""
    with caplog.at_level(logging.WARNING, logger="apt.training.trainer"):
        assert amp_dtype("bf16", torch.device("cpu")) is None
        assert amp_dtype("auto", torch.device("cpu")) is None
        assert amp_dtype("off", torch.device("cpu")) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "training.amp: bf16 asked for" in warned[0] and "float32" in warned[0] \
        and "CUDA only" in warned[0], warned


def test_the_step_log_shows_the_losss_parts(tmp_path, caplog):
    """The MoE balance and z losses join the loss; the step's log line shows each part (it showed the total only,
    so a collapsing router was invisible without a plugin). A loss of one part shows no breakdown."""
    cfg = _cfg(tmp_path, **{"model.moe.enabled": True, "model.moe.num_experts": 2, "training.max_epochs": 1,
                            "training.steps_per_epoch": 1})
    with caplog.at_level(logging.INFO, logger="apt.training.trainer"):
        Trainer(cfg).fit()
    line = next(r.getMessage() for r in caplog.records if "step 1/1" in r.getMessage())
    assert "(lm " in line and " moe_balance " in line and " moe_z " in line, line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apt.training.trainer"):
        Trainer(_cfg(tmp_path / "dense", **{"training.max_epochs": 1, "training.steps_per_epoch": 1})).fit()
    line = next(r.getMessage() for r in caplog.records if "step 1/1" in r.getMessage())
    assert "(lm" not in line, line
