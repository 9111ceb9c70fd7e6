"""Outside input that reached the user as a Python traceback (or silently): each now one line, exit code 2."""
from __future__ import annotations

import datetime
import json

import pytest
import torch

from apt.cli.main import main
from apt.core.config import ConfigError, load_profile
from apt.training import checkpoint as ckpt
from apt.training.trainer import pick_device

SMALL = ["--model.d_model", "16", "--model.num_heads", "2", "--model.num_layers", "1", "--model.max_seq_len", "16",
         "--data.seq_len", "16", "--data.batch_size", "2", "--training.warmup_steps", "0", "--no-progress"]


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_a_profile_that_is_not_utf8_is_a_config_error(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"extends: tiny_debug\ndescription: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_profile(p)
    err = _one_line_error(capsys, main(["train", "-p", str(p), "--print-config"]))
    assert "not UTF-8" in err
    err = _one_line_error(capsys, main(["plugin", "enable", "align", "--profile", str(p)]))
    assert "not UTF-8" in err


def test_a_yaml_date_in_plugin_settings_is_one_line(tmp_path, capsys):
    rc = main(["train", "-p", "tiny_debug", "--out-dir", str(tmp_path / "run"), "--max-steps", "1", *SMALL,
               "--plugins.not_installed", "{since: 2024-01-01}"])
    err = _one_line_error(capsys, rc)
    assert "GLOBAL datetime.date" in err and "add_safe_globals" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_refused_global_is_named_without_torchs_allowlist_advice(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"model": {}, "profile": {"model": {}}, "x": datetime.date(2020, 1, 1)}, p)
    with pytest.raises(ckpt.CheckpointError, match=r"pickled Python objects \(GLOBAL datetime\.date\)") as info:
        ckpt.load(p)
    assert "add_safe_globals" not in str(info.value)


@pytest.mark.parametrize("name", ["mps", "xpu", "meta"])
def test_a_device_apt_does_not_run_on_is_a_value_error(name):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        pick_device(name)


def test_generate_on_an_unsupported_device_is_one_line(tiny_checkpoint, capsys):
    err = _one_line_error(capsys, main(["generate", str(tiny_checkpoint), "--prompt", "hi", "--device", "mps"]))
    assert "--device: 'mps'" in err


def test_training_over_an_earlier_run_says_it_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--max-steps", "1", *SMALL]) == 0
    assert "replaced" not in capsys.readouterr().err
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--max-steps", "1", *SMALL]) == 0
    assert "is replaced by this run" in capsys.readouterr().err
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(out), "--max-steps", "2", "--resume", "auto",
                 *SMALL]) == 0
    assert "replaced" not in capsys.readouterr().err


def test_a_model_too_big_to_allocate_is_one_line(tmp_path, capsys):
    rc = main(["train", "-p", "tiny_debug", "--out-dir", str(tmp_path / "r"), "--max-steps", "1", *SMALL,
               "--model.d_model", "1000000000000", "--model.num_heads", "1"])
    err = _one_line_error(capsys, rc)
    assert "out of memory building the model" in err


def test_resuming_another_backbone_says_so_briefly(tmp_path, capsys):
    m = tmp_path / "m"
    assert main(["train", "-p", "mamba_tiny", "--out-dir", str(m), "--max-steps", "1", *SMALL]) == 0
    capsys.readouterr()
    rc = main(["train", "-p", "tiny_debug", "--out-dir", str(tmp_path / "g"), "--max-steps", "1", *SMALL,
               "--resume", str(m / "last.pt")])
    err = _one_line_error(capsys, rc)
    assert "holds a 'mamba' model, this profile builds a 'gpt' one" in err and len(err) < 900


def _a_result(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rc = main(["bench", "--kind", "router", "--quick", "--max-shapes", "1", "--no-plots", "--no-peers", "--repeats",
               "3", "--warmup", "1", "-q", "--threads", "1", "--out", str(tmp_path / "bo"), "--save",
               "--results-dir", str(results)])
    assert rc == 0
    assert len(list(results.glob("*.json"))) == 1
    json.loads(next(results.glob("*.json")).read_text())
    return results


def test_bench_report_out_a_directory_is_one_line(tmp_path, capsys):
    results = _a_result(tmp_path)
    capsys.readouterr()
    err = _one_line_error(capsys, main(["bench", "--report", "--results-dir", str(results),
                                        "--report-out", str(tmp_path)]))
    assert "--report-out" in err and "is a directory" in err


def test_bench_save_to_a_file_fails_before_the_run(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("")
    rc = main(["bench", "--kind", "router", "--quick", "--max-shapes", "1", "--no-plots", "--no-peers", "-q",
               "--out", str(tmp_path / "bo"), "--save", "--results-dir", str(f)])
    err = _one_line_error(capsys, rc)
    assert "--results-dir" in err and not (tmp_path / "bo" / "bench.json").exists()


def test_a_tampered_trainer_or_rng_part_names_the_part(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(run), "--max-steps", "1", *SMALL]) == 0
    blob = torch.load(run / "last.pt", weights_only=True)
    for part, key, bad in (("trainer", "history", 5), ("trainer", "step", "x"), ("rng", "torch", torch.zeros(3))):
        b = dict(blob)
        b[part] = {**blob[part], key: bad}
        p = tmp_path / f"{part}_{key}.pt"
        torch.save(b, p)
        capsys.readouterr()
        rc = main(["train", "-p", "tiny_debug", "--out-dir", str(tmp_path / "r2"), "--max-steps", "2", *SMALL,
                   "--resume", str(p)])
        assert f"'{part}'" in _one_line_error(capsys, rc)


def test_a_checkpoint_too_big_to_build_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-p", "tiny_debug", "--out-dir", str(run), "--max-steps", "1", *SMALL]) == 0
    blob = torch.load(run / "last.pt", weights_only=True)
    blob["profile"]["model"]["d_model"] = 10 ** 12
    torch.save(blob, tmp_path / "big.pt")
    capsys.readouterr()
    err = _one_line_error(capsys, main(["generate", str(tmp_path / "big.pt"), "--prompt", "hi"]))
    assert "not enough memory" in err


def test_a_size_past_int64_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.vocab_size: .* out of range"):
        load_profile("tiny_debug", {"model.vocab_size": 10 ** 30})
    load_profile("tiny_debug", {"seed": 2 ** 64 - 1})  # the seed keeps its own range


def test_running_out_of_memory_mid_run_is_one_line(tmp_path, capsys):
    rc = main(["train", "-p", "tiny_debug", "--out-dir", str(tmp_path / "r"), "--max-steps", "1", *SMALL,
               "--data.batch_size", "1000000000000"])
    assert "out of memory at step 0" in _one_line_error(capsys, rc)
