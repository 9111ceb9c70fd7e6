"""CLI: apt train (overrides, --plugins, errors without tracebacks), apt plugin list / info / enable / disable."""
from __future__ import annotations

import sys

import pytest
import yaml

from apt.cli.commands.plugin import edit_enabled_text
from apt.cli.commands.train import split_overrides
from apt.cli.main import main

FAST = ["--model.d_model", "32", "--model.num_heads=2", "--model.num_layers", "1", "--data.seq_len", "16",
        "--data.batch_size", "4", "--training.steps_per_epoch", "3", "--training.max_epochs", "1",
        "--no-progress"]


def test_train_runs_with_overrides_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "done: 3 steps" in text and (out / "last.pt").is_file()
    assert "components: ffn dense; attention tva_default" in captured.err  # which provider each part came from
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--resume", "auto", *FAST,
                 "--training.max_epochs", "2"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--resume", "auto", *FAST,
                 "--training.max_epochs", "2"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_stop_at_step_then_resume_is_the_uninterrupted_run(tmp_path, capsys):
    """--max-steps would end the run (the LR schedule spans it); --stop-at-step pauses it, and --resume auto goes on
    with the same schedule, ending where the uninterrupted run ends."""
    import torch

    full, parts = tmp_path / "full", tmp_path / "parts"
    args = [*FAST, "--training.max_epochs", "2"]
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(full), *args]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(parts), *args, "--stop-at-step", "4"]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "stopped at step 4 of 6" in out and "--resume auto" in out
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(parts), *args, "--resume", "auto",
                 "--stop-at-step", "4"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(parts), *args, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "stopped at" not in out
    a = torch.load(full / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(parts / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_print_config_applies_overrides_and_plugins(capsys):
    assert main(["train", "-p", "tiny_debug", "--print-config", "--training.max_epochs", "3",
                 "--model.attention_name", "flash_v2", "--plugins", "moe,routing"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["training"]["max_epochs"] == 3 and cfg["model"]["attention_name"] == "flash_v2"
    assert cfg["plugins"]["enabled"] == ["moe", "routing"]
    assert main(["train", "-p", "tiny_debug", "--print-config", "--seed", "7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 7


@pytest.mark.parametrize("argv, fragment", [
    (["train", "-p", "no_such_profile"], "profile 'no_such_profile' not found"),
    (["train", "-p", "tiny_debug", "--model.atention_name", "x"], "did you mean 'model.attention_name'"),
    (["train", "-p", "tiny_debug", "--training.max_epochs", "zero"], "training.max_epochs: expected int"),
    (["train", "-p", "tiny_debug", "--plugins", "nosuch"], "unknown plugin 'nosuch'"),
    (["train", "-p", "tiny_debug", "--training.lr"], "has no value"),
    # a next option was taken as the value: "--training.lr: expected number, got str 'training.max_steps=3'"
    (["train", "-p", "tiny_debug", "--training.lr", "--max-steps", "3"], "override '--training.lr' has no value"),
    (["train", "-p", "tiny_debug", "--training.lr", "--model.d_model", "64"], "override '--training.lr' has no value"),
    (["train", "-p", "tiny_debug", "--data.path", "/nonexistent/corpus.txt"], "no such file"),
    (["train", "-p", "tiny_debug", "--device", "tpu"], "training.device: 'tpu' is not a device"),
    (["plugin", "info", "plugin", "nosuch"], "no provider 'nosuch'"),
    (["plugin", "list", "--kind", "nokind"], "unknown provider kind"),
    (["info", "--kind", "nokind"], "--kind: unknown provider kind 'nokind'"),
    # a setting the layer does not take: an error naming the section (was a TypeError traceback for attention,
    # and for the router a warning and a dense model)
    (["train", "-p", "tiny_debug", "--model.attention.foo", "1"], "model.attention / model.tva: the 'tva_default' "
                                                                    "layer refused its settings"),
    (["train", "-p", "tiny_debug", "--model.moe.enabled", "true", "--model.moe.router.foo", "1"],
     "model.moe: the MoE layer refused its settings"),
    (["bench", "--out", "/dev/null/x", "--kind", "scan", "--quick"], "--out: cannot create /dev/null/x"),
])
def test_user_errors_are_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "--threads", "abc"], "argument --threads: expected an int, got 'abc'"),
    (["bench", "--threads", "0"], "argument --threads: expected >= 1, got 0"),
    (["bench", "--repeats", "0"], "argument --repeats: expected >= 1, got 0"),
    (["bench", "--max-shapes", "-1"], "argument --max-shapes: expected >= 1, got -1"),
    (["bench", "--warmup", "-1"], "argument --warmup: expected >= 0, got -1"),
    (["bench", "--budget", "-1"], "argument --budget: expected a finite number > 0"),
    (["train", "-p", "tiny_debug", "--stop-at-step", "0"], "argument --stop-at-step: expected >= 1, got 0"),
])
def test_bad_bench_numbers_are_argument_errors(argv, fragment, capsys):
    """They ran the whole benchmark first (--repeats 0: every row an error, exit 0; --max-shapes -1 dropped the
    last shape; --threads 0 a traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--training.bogus", "3"], "--training.bogus: unknown key 'training.bogus' (did you mean "),
    (["--trainig.max_epochs", "1"], "--trainig.max_epochs: unknown key 'trainig.max_epochs' (did you mean "
                                    "'training.max_epochs'?)"),
    (["--training.max_epochs", "abc"], "--training.max_epochs: expected int, got str 'abc'"),
    (["--max-steps", "0"], "--max-steps: must be >= 1 or null, got 0"),
])
def test_bad_override_is_blamed_on_the_command_line(argv, message, capsys):
    assert main(["train", "-p", "tiny_debug", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"apt train: error: {message}") and "tiny_debug.yaml" not in err, err


def test_bad_yaml_profile_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1,\n")
    assert main(["train", "-p", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_plugin_list_and_info(capsys):
    assert main(["plugin", "list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("moe", "routing", "align"))
    assert main(["plugin", "list", "--kind", "dataset"]) == 0
    assert "jsonl" in capsys.readouterr().out
    assert main(["plugin", "info", "plugin", "align"]) == 0
    out = capsys.readouterr().out
    assert "plugin/align" in out and "tau_align" in out
    assert main(["plugin"]) == 1


def test_plugin_enable_disable_keeps_comments(tmp_path, capsys):
    f = tmp_path / "p.yaml"
    f.write_text("# top comment\nextends: tiny_debug\nplugins:\n  # which\n  enabled:  # below\n    - routing\n"
                 "  align: {alpha: 2.0}  # settings\ntraining:\n  max_epochs: 1  # one\n")
    assert main(["plugin", "enable", "align", "--profile", str(f)]) == 0
    text = f.read_text()
    assert "# top comment" in text and "# settings" in text and "# one" in text and "# which" in text
    data = yaml.safe_load(text)
    assert data["plugins"]["enabled"] == ["routing", "align"] and data["plugins"]["align"] == {"alpha": 2.0}
    assert main(["plugin", "disable", "routing", "--profile", str(f)]) == 0
    assert yaml.safe_load(f.read_text())["plugins"]["enabled"] == ["align"]
    assert main(["plugin", "disable", "routing", "--profile", str(f)]) == 0
    assert "not enabled" in capsys.readouterr().out
    assert main(["plugin", "enable", "nosuch", "--profile", str(f)]) == 2
    assert main(["plugin", "enable", "moe", "--profile", str(tmp_path / "missing.yaml")]) == 2


def test_edit_enabled_text_layouts():
    assert yaml.safe_load(edit_enabled_text("a: 1\n", ["x"])) == {"a": 1, "plugins": {"enabled": ["x"]}}
    t = edit_enabled_text("plugins:\n  enabled: [a]\nz: 2\n", ["a", "b"])
    assert t == "plugins:\n  enabled: [a, b]\nz: 2\n"
    t = edit_enabled_text("plugins:\n  moe: {}\n", ["moe"])
    assert yaml.safe_load(t) == {"plugins": {"enabled": ["moe"], "moe": {}}}
    assert edit_enabled_text("plugins: {enabled: [a]}\n", ["b"]) is None  # flow style: caller rewrites
    # a block list's item comments and comment lines were dropped with its items: they stay, as comment lines
    t = edit_enabled_text("plugins:\n  enabled:\n    - moe  # the moe\n    # between\n    - align\nz: 1\n", ["moe"])
    assert t == "plugins:\n  enabled: [moe]\n  # the moe\n  # between\nz: 1\n"


def test_plugin_enable_keeps_crlf_line_endings(tmp_path):
    """The file was read with read_text (CRLF -> LF) and written back with LF line endings throughout."""
    f = tmp_path / "p.yaml"
    f.write_bytes(b"extends: tiny_debug  # base\r\nplugins:\r\n  enabled: [routing]\r\ntraining:\r\n"
                  b"  max_epochs: 1\r\n")
    assert main(["plugin", "enable", "align", "--profile", str(f)]) == 0
    raw = f.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") == 5 and b"# base" in raw
    assert yaml.safe_load(raw)["plugins"]["enabled"] == ["routing", "align"]
    g = tmp_path / "q.yaml"  # no plugins section yet: the appended lines use CRLF too
    g.write_bytes(b"extends: tiny_debug\r\n")
    assert main(["plugin", "enable", "align", "--profile", str(g)]) == 0
    raw = g.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") == 3


def test_split_overrides():
    ov, rest = split_overrides(["--a.b", "1", "--c.d=2", "--x", "y", "--e.f"])
    assert ov == ["--a.b", "1", "--c.d=2", "--e.f"] and rest == ["--x", "y"]
    # a flag after a dotted key is not its value; a negative number is
    ov, rest = split_overrides(["--a.b", "--bogus", "--c.d", "--e.f", "-1"])
    assert ov == ["--a.b", "--c.d", "--e.f", "-1"] and rest == ["--bogus"]


def test_negative_override_value_still_parses(capsys):
    assert main(["train", "-p", "tiny_debug", "--print-config", "--training.warmup_steps", "-1"]) == 2
    # -1 was taken as the value (and reached validation)
    assert "--training.warmup_steps: must be >= 0, got -1" in capsys.readouterr().err
    assert main(["train", "-p", "tiny_debug", "--print-config", "--training.betas", "[0.9, 0.99]",
                 "--max-steps", "3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["training"]["max_steps"] == 3 and cfg["training"]["betas"] == [0.9, 0.99]


def test_summary_says_which_step_its_val_loss_is_from(tmp_path, capsys):
    """The last evaluation is an epoch end's: with max_steps mid-epoch the summary's val was step 3's, unlabelled,
    next to step 5's loss. The step survives a resume (the checkpoint stores it)."""
    out = tmp_path / "run"
    args = ["train", "-p", "tiny_debug", "--out-dir", str(out), *FAST, "--training.max_epochs", "2"]
    assert main([*args, "--max-steps", "5", "--stop-at-step", "4"]) == 0
    assert ", val " in (text := capsys.readouterr().out) and " (step 3), " in text, text
    assert main([*args, "--max-steps", "5", "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "done: 5 steps" in text and " (step 3), " in text, text


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: no run lock on Windows")
def test_second_train_into_one_out_dir_fails_while_the_first_runs(tmp_path, capsys, monkeypatch):
    """Two `apt train` runs into one folder replaced each other's last.pt with no word. A run holds an flock on
    <out_dir>/.apt_train.lock; another run there fails at once (exit 2, one line), a reader (generate) does not
    care, and torchrun ranks other than 0 take no lock (every rank writes the run's checkpoint)."""
    import fcntl

    out = tmp_path / "run"
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), *FAST]) == 0
    capsys.readouterr()
    with open(out / ".apt_train.lock", "a+") as held:  # a live run's lock (flock: per open file, so this conflicts)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        before = (out / "last.pt").stat().st_mtime_ns
        assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        line = err.splitlines()[-1]
        assert line.startswith(f"apt train: error: another apt train (pid 4242) is writing to {out}: ") \
            and line.endswith("pick another --out-dir") and "Traceback" not in err and "replaced" not in err, err
        assert (out / "last.pt").stat().st_mtime_ns == before  # nothing written, nothing warned about replacing
        assert main(["generate", str(out), "--prompt", "a", "--max-new-tokens", "2"]) == 0  # readers take no lock
        monkeypatch.setenv("RANK", "1")
        assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--resume", "auto", *FAST,
                     "--training.max_epochs", "2"]) == 0
        monkeypatch.delenv("RANK")
    capsys.readouterr()
    # released: the next run goes ahead, and its own lock is gone when it ends (a third run is not refused)
    for _ in range(2):
        assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--resume", "auto", *FAST,
                     "--training.max_epochs", "3"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_components_line_names_the_router_the_moe_plugin_swaps_in(tmp_path, capsys, monkeypatch):
    """plugins.moe.router replaces the built router at training start: the components line named only the one it
    replaces (every MoE layer ran cpu_native while it said topk_default)."""
    from apt.plugins.builtin.moe import MoEPlugin

    seen = {}
    real = MoEPlugin.on_training_start

    def spy(self, ctx):
        real(self, ctx)
        seen["report"] = dict(ctx.model.build_report)
    monkeypatch.setattr(MoEPlugin, "on_training_start", spy)
    argv = ["train", "-p", "tiny_debug", "--out-dir", str(tmp_path / "run"), *FAST, "--plugins", "moe",
            "--model.moe.enabled", "true", "--model.moe.num_experts", "2", "--plugins.moe.router", "cpu_native"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "moe router/topk_default, replaced at training start by plugins.moe.router cpu_native" in err, err
    assert seen["report"]["moe"].startswith("router/") and "(plugins.moe.router" in seen["report"]["moe"]


def test_an_empty_data_file_names_data_path(tmp_path, capsys):
    # it said "dataset: the training split needs at least 2 tokens, got 1" (the end-of-text token)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "-p", "tiny_debug", "--data.path", str(empty), "--max-steps", "2"]) == 2
    assert f"data.path: {empty} holds no text (empty)" in capsys.readouterr().err
