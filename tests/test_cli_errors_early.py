"""Errors that came only after the work (a whole training run), or never: bad output folders, misspelt plugin
settings, a mistyped results folder, an unknown CPU ISA cap."""
from __future__ import annotations

from apt.cli.main import main

FAST = ["--model.d_model", "32", "--model.num_heads=2", "--model.num_layers", "1", "--data.seq_len", "16",
        "--data.batch_size", "4", "--training.steps_per_epoch", "3", "--training.max_epochs", "1",
        "--no-progress"]


def test_unwritable_out_dir_fails_before_training(tmp_path, capsys, monkeypatch):
    from apt.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self, **kw: (_ for _ in ()).throw(AssertionError("trained")))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main(["train", "-p", "tiny_debug", *FAST, "--out-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "--out-dir" in err and "not a directory" in err and "Traceback" not in err
    assert main(["train", "-p", "tiny_debug", *FAST, "--out-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out-dir: cannot write checkpoints" in err and "Traceback" not in err


def test_misspelt_plugin_settings_section_is_an_error(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("extends: tiny_debug\nplugins:\n  enabled: [moe]\n  mo: {capacity_factor: 2.0}\n")
    assert main(["train", "-p", str(prof), *FAST, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "plugins.mo" in err and "did you mean 'moe'" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_settings_of_a_plugin_not_installed_here_are_ignored_with_a_warning(caplog):
    from apt.plugins.manager import PluginManager

    with caplog.at_level("WARNING", logger="apt.plugins.manager"):
        PluginManager.from_config({"plugins": {"enabled": [], "someone_elses_plugin": {"x": 1}}})
    assert "plugins.someone_elses_plugin: settings for an unknown plugin" in caplog.text and "ignoring" in caplog.text


def test_report_with_missing_results_dir_writes_nothing(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("keep me\n")
    assert main(["bench", "--report", "--results-dir", str(tmp_path / "resluts"), "--report-out", str(out)]) == 2
    assert out.read_text() == "keep me\n"
    assert "--results-dir: no such directory" in capsys.readouterr().err
    # the default output (beside the results folder) is not written either
    assert main(["bench", "--report", "--results-dir", str(tmp_path / "x" / "results")]) == 2
    assert not (tmp_path / "x").exists()


def test_an_unknown_cpu_isa_cap_is_warned_about(monkeypatch, caplog):
    """The C++ side takes any value but generic/avx2 (lower case) as no cap: APT_TVA_CPU_ISA=AVX2 capped nothing."""
    from apt_kernels import _native

    monkeypatch.setenv("APT_TVA_CPU_ISA", "AVX2")
    monkeypatch.setenv("APT_SCAN_CPU_ISA", "avx2")
    with caplog.at_level("WARNING", logger="apt_kernels._native"):
        _native._warn_bad_isa_caps()
    assert "APT_TVA_CPU_ISA='AVX2' is not one of generic, avx2, avx512" in caplog.text
    assert "APT_SCAN_CPU_ISA" not in caplog.text


def test_stop_at_step_past_the_end_is_said(tmp_path, capsys):
    assert main(["train", "-p", "tiny_debug", *FAST, "--out-dir", str(tmp_path / "run"), "--stop-at-step", "999"]) == 0
    assert "--stop-at-step 999 is past the run's last step (3); the run goes to its end" in capsys.readouterr().err


def test_eval_of_a_directory_says_so(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no_checkpoint"), "--file", str(tmp_path)]) == 2
    assert f"--file: {tmp_path} is a directory, not a text file" in capsys.readouterr().err


def test_bench_grid_from_the_environment_is_checked(monkeypatch):
    import pytest

    from apt.bench import pytest_support

    monkeypatch.setenv("APT_BENCH_GRID", "bogus")
    with pytest.raises(ValueError, match="APT_BENCH_GRID: expected quick or full, got 'bogus'"):
        pytest_support.items("scan", device="cpu")
    monkeypatch.setenv("APT_BENCH_GRID", "full")
    assert pytest_support.items("scan", device="cpu", grid="quick")[0].quick
