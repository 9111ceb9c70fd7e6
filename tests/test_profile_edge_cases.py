"""Hand-written profiles and overrides: duplicate YAML keys, YAML 1.2 integers, mapping overrides merged key by key
and their bad inner keys named, required keys without base, MoE placed nowhere, ffn_name moe, negative aux
coefficients, seed range, "did you mean" for other frameworks' key names, plugins enabled past the run."""
from __future__ import annotations

import logging

import pytest

from apt.core.config import ConfigError, load_profile, yaml_load


def test_duplicate_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("extends: tiny_debug\nmodel:\n  d_model: 128\ntraining:\n  lr: 1.0e-3\nmodel:\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'model'"):
        load_profile(p)


def test_merge_key_override_is_not_a_duplicate():
    assert yaml_load("b: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n")["c"] == {"x": 1, "y": 3}


def test_yaml12_integers(tmp_path):
    assert yaml_load("a: 010\nb: 0o10\nc: 0x10\nd: -5\n") == {"a": 10, "b": 8, "c": 16, "d": -5}
    p = tmp_path / "sexa.yaml"
    p.write_text("extends: tiny_debug\ntraining:\n  steps_per_epoch: 1:30\n")
    with pytest.raises(ConfigError, match="steps_per_epoch: expected int, got str '1:30'"):
        load_profile(p)


def test_mapping_override_names_the_bad_inner_key():
    with pytest.raises(ConfigError, match=r"--model\.tva: unknown key 'model\.tva\.bogus'"):
        load_profile("tiny_debug", ["--model.tva", "{r: 2, bogus: 1}"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.moe\.enabld' \(did you mean 'model\.moe\.enabled'"):
        load_profile("tiny_debug", ["--model.moe", "{enabld: true}"])


def test_mapping_override_merges_into_the_section():
    cfg = load_profile("gpt5_moe_reasoning", ["--plugins.align", "{weight: 0.2}"])
    assert cfg["plugins"]["align"] == {"alpha": 1.0, "beta": 0.5, "tau_align": 0.1, "weight": 0.2}
    cfg = load_profile("tiny_debug", ["--model.moe", "{enabled: true}"])
    assert cfg["model"]["moe"]["enabled"] is True and cfg["model"]["moe"]["num_experts"] == 4


def test_missing_required_keys_without_base():
    with pytest.raises(ConfigError, match="missing required key"):
        load_profile({"extends": None, "model": {"d_model": 64, "num_layers": 1, "num_heads": 2}})


def test_moe_every_past_num_layers():
    with pytest.raises(ConfigError, match=r"model\.moe\.every \(3\) exceeds model\.num_layers \(2\)"):
        load_profile("tiny_debug", ["model.moe.enabled=true", "model.moe.every=3"])
    load_profile("tiny_debug", ["model.moe.every=3"])  # MoE off: every does not matter


def test_ffn_name_moe_is_refused():
    with pytest.raises(ConfigError, match="model.moe.enabled"):
        load_profile("tiny_debug", ["model.ffn_name=moe"])
    # the builder refuses it too, for a config that skipped validation (its layer returns (y, aux))
    from apt.modeling.compose import ModelBuilder

    cfg = load_profile("tiny_debug")
    cfg["model"]["ffn_name"] = "moe"
    with pytest.raises(ValueError, match="model.ffn_name: 'moe' is the mixture-of-experts layer"):
        ModelBuilder(cfg, vocab_size=64).build()


@pytest.mark.parametrize("key", ["model.moe.balance_coef", "model.moe.z_coef"])
def test_negative_aux_coefficients(key):
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_profile("tiny_debug", [f"{key}=-1"])


def test_seed_out_of_range_names_seed():
    with pytest.raises(ConfigError, match="seed"):
        load_profile("tiny_debug", ["seed=99999999999999999999"])


@pytest.mark.parametrize("typo,meant", [("training.learning_rate", "training.lr"), ("model.n_embd", "model.d_model"),
                                        ("lr", "training.lr"), ("training.clip_grad", "training.grad_clip"),
                                        ("model.moe.top_k", "model.moe.k"), ("training.d_model", "model.d_model")])
def test_did_you_mean(typo, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        load_profile("tiny_debug", [f"{typo}=1"])


def test_enable_epoch_past_the_run_warns(caplog):
    from apt.training.trainer import Trainer

    cfg = load_profile("tiny_debug", ["model.moe.enabled=true", "plugins.enabled=[moe]",
                                      "schedules.enable_moe_at_epoch=5", "training.progress=false"])
    with caplog.at_level(logging.WARNING, logger="apt.training.trainer"):
        Trainer(cfg)
    assert any("never switches on" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text", ["0x_", "0o_", "0b_", "0x", "0o"])
def test_integer_prefix_without_digits_is_a_string(text):
    assert yaml_load(f"a: {text}") == {"a": text}  # was a ValueError from int() (not a ConfigError)


def test_signed_prefixed_integers():
    assert yaml_load("a: -0x10\nb: +0o10\nc: -0b11\n") == {"a": -16, "b": 8, "c": -3}


def test_override_emptying_a_section_is_named():
    with pytest.raises(ConfigError, match=r"^--model\.moe: leaves required key 'model\.moe\.enabled' unset"):
        load_profile("tiny_debug", ["--model.moe", "null"])


def test_explicit_int_tag_on_a_non_number_is_a_config_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("extends: tiny_debug\nseed: !!int abc\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_profile(p)


@pytest.mark.parametrize("plugin,key", [("routing", "route_temperature"), ("moe", "moe_capacity_factor")])
def test_schedule_that_must_stay_positive_is_checked_at_setup(plugin, key):
    """route_temperature / moe_capacity_factor reaching 0 disabled the plugin at that step (a traceback in the log)
    and the run still finished with success; now the trainer refuses it before training."""
    from apt.training.trainer import Trainer

    base = ["model.moe.enabled=true", f"plugins.enabled=[{plugin}]", "training.progress=false",
            "training.max_steps=4"]
    cfg = load_profile("tiny_debug", base + [f"schedules.{key}={{start: 1.0, end: 0.0, by: step}}"])
    with pytest.raises(ValueError, match=f"schedules.{key}: reaches 0 during the run"):
        Trainer(cfg)
    # an 'until' past the run's end never reaches the end value: the run's own range is what counts
    Trainer(load_profile("tiny_debug", base + [f"schedules.{key}={{start: 1.0, end: 0.0, by: step, until: 100}}"]))
