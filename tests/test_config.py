"""Profiles: extends-inheritance, dotted overrides, validation errors that name the key, shipped profiles."""
from __future__ import annotations

import pytest
import yaml

from apt.core.config import (ConfigError, builtin_profiles, deep_merge, load_profile, parse_overrides,
                             resolve_profile_path)


def test_shipped_profiles_load_and_validate():
    names = builtin_profiles()
    for want in ("base", "tiny_debug", "gpt5_moe_reasoning", "mamba_tiny"):
        assert want in names
    for n in names:
        cfg = load_profile(n)
        assert cfg["name"] == n
    moe = load_profile("gpt5_moe_reasoning")
    assert moe["model"]["moe"]["enabled"] is True
    assert moe["plugins"]["enabled"] == ["moe", "routing", "align"]
    assert moe["schedules"]["enable_moe_at_epoch"] == 1
    # inherited from base, not restated in the child
    assert moe["training"]["weight_decay"] == 0.1
    assert load_profile("mamba_tiny")["model"]["backbone"] == "mamba"


def test_extends_chain_relative_and_deep_merge(tmp_path):
    (tmp_path / "parent.yaml").write_text("extends: tiny_debug\nmodel:\n  d_model: 32\n  num_heads: 2\n")
    (tmp_path / "child.yaml").write_text("# comment\nextends: parent.yaml\ntraining:\n  lr: 0.01\n")
    cfg = load_profile(tmp_path / "child.yaml")
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["num_layers"] == 2  # parent, grandparent
    assert cfg["training"]["lr"] == 0.01 and cfg["training"]["max_epochs"] == 2
    # the name is the file's own or its stem, never a parent's: it names the run directory (apt_runs/<name>/), and
    # an inherited one made the child overwrite (and --resume auto continue) its parent's run
    assert cfg["name"] == "child"
    (tmp_path / "named.yaml").write_text("extends: child.yaml\nname: my_run\n")
    assert load_profile(tmp_path / "named.yaml")["name"] == "my_run"
    assert load_profile(tmp_path / "parent.yaml")["name"] == "parent"


def test_extends_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_profile(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ConfigError, match="nowhere"):
        load_profile(tmp_path / "c.yaml")


def test_overrides_cli_style_and_mapping():
    cfg = load_profile("tiny_debug", ["--model.attention_name", "flash_v2", "--training.max_epochs=3",
                                      "training.lr=1e-3", "--training.betas", "[0.8, 0.9]"])
    assert cfg["model"]["attention_name"] == "flash_v2"
    assert cfg["training"]["max_epochs"] == 3
    assert cfg["training"]["lr"] == pytest.approx(1e-3)
    assert cfg["training"]["betas"] == [0.8, 0.9]
    cfg = load_profile("tiny_debug", {"model.d_model": 32, "data.path": "x.txt"})
    assert cfg["model"]["d_model"] == 32 and cfg["data"]["path"] == "x.txt"
    assert parse_overrides(["--plugins.align.alpha", "0.5"]) == {"plugins.align.alpha": 0.5}
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--training.lr"])
    with pytest.raises(ConfigError, match="'--training.lr' has no value"):  # the next flag is not its value
        parse_overrides(["--training.lr", "--model.d_model", "64"])


def test_plugins_argument_appends():
    cfg = load_profile("tiny_debug", plugins=["moe,align", "routing"])
    assert cfg["plugins"]["enabled"] == ["moe", "align", "routing"]


@pytest.mark.parametrize("override, fragment", [
    ({"model.atention_name": "x"}, "'model.atention_name' (did you mean 'model.attention_name'?)"),
    ({"training.max_epochs": "abc"}, "training.max_epochs: expected int"),
    ({"training.max_epochs": 0}, "training.max_epochs: must be >= 1"),
    ({"model.norm": "batchnorm"}, "model.norm: 'batchnorm' is not one of"),
    ({"model.d_model": 30}, "model.d_model (30) must be divisible by model.num_heads"),
    ({"model.moe.k": 9}, "model.moe.k (9) must be <="),
    ({"data.seq_len": 1000}, "data.seq_len (1000) exceeds model.max_seq_len"),
    ({"model.dropout": True}, "model.dropout: expected"),
    ({"schedules.route_temperature": {"start": 1.0}}, "schedules.route_temperature: missing 'end'"),
    ({"schedules.route_temperature": {"start": 1, "end": 2, "by": "batch"}}, "route_temperature.by"),
    ({"schedules.enable_moe_at_epoch": -1}, "schedules.enable_moe_at_epoch"),
    ({"plugins.enabled": "moe"}, "plugins.enabled: expected list"),
    ({"model.d_model": None}, "model.d_model must be set"),
    # numbers the trainer would take silently and misuse (a negative grad_clip flips the gradient's sign)
    ({"training.grad_clip": -1.0}, "training.grad_clip: must be >= 0 or null (0 or null: no clipping), got -1.0"),
    ({"training.warmup_steps": -5}, "training.warmup_steps: must be >= 0, got -5"),
    ({"training.weight_decay": -0.1}, "training.weight_decay: must be >= 0, got -0.1"),
    ({"training.min_lr_ratio": 1.5}, "training.min_lr_ratio: must be in [0, 1], got 1.5"),
    ({"model.dropout": 1.0}, "model.dropout: must be in [0, 1), got 1.0"),
    ({"model.norm_eps": 0}, "model.norm_eps: must be > 0, got 0"),
    ({"plugins.enabled": ["routing", "moe", "routing"]}, "plugins.enabled: 'routing' is listed twice"),
])
def test_validation_names_the_bad_key(override, fragment):
    with pytest.raises(ConfigError) as ei:
        load_profile("tiny_debug", override)
    assert fragment in str(ei.value)


def test_free_sections_pass_through():
    cfg = load_profile("tiny_debug", {"model.attention.foo": 1, "plugins.myplugin.anything": [1, 2]})
    assert cfg["model"]["attention"]["foo"] == 1
    assert cfg["plugins"]["myplugin"]["anything"] == [1, 2]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_profile(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_profile(tmp_path / "list.yaml")
    assert resolve_profile_path("tiny_debug.yaml").name == "tiny_debug.yaml"


def test_deep_merge_does_not_alias():
    a = {"x": {"y": [1]}}
    b = deep_merge(a, {"x": {"z": 2}})
    b["x"]["y"].append(3)
    assert a == {"x": {"y": [1]}} and b["x"]["z"] == 2


def test_an_empty_section_keeps_the_parents_settings(tmp_path):
    # every line under training: commented out leaves 'training: null'; the defaults stay
    (tmp_path / "p.yaml").write_text("extends: tiny_debug\ntraining:\n  # lr: 0.1\nmodel:\n  tva:\n")
    cfg, parent = load_profile(tmp_path / "p.yaml"), load_profile("tiny_debug")
    assert cfg["training"] == parent["training"] and cfg["model"]["tva"] == parent["model"]["tva"]
    assert deep_merge({"a": {"b": 1}, "c": 2}, {"a": None, "c": None}) == {"a": {"b": 1}, "c": None}


@pytest.mark.parametrize("override, message", [
    (["--training.bogus", "3"], "--training.bogus: unknown key 'training.bogus'"),
    (["--trainig.max_epochs", "1"], "--trainig.max_epochs: unknown key 'trainig.max_epochs' "
                                    "(did you mean 'training.max_epochs'?)"),
    (["--training.max_epochs", "abc"], "--training.max_epochs: expected int, got str 'abc'"),
    (["--training.max_epochs=0"], "--training.max_epochs: must be >= 1, got 0"),
    (["--model.norm", "batchnorm"], "--model.norm: 'batchnorm' is not one of"),
    (["--model.num_heads", "5"], "--model.num_heads: model.d_model (64) must be divisible by model.num_heads (5)"),
    (["--training", "{max_epochs: x}"], "--training: training.max_epochs: expected int"),
    (["--schedules.route_temperature", "{start: 1}"], "--schedules.route_temperature: "),
    (["training.max_epochs=abc"], "override training.max_epochs: expected int"),
    ({"training.bogus": 1}, "override training.bogus: unknown key 'training.bogus'"),
])
def test_override_errors_name_the_override_not_the_file(override, message):
    with pytest.raises(ConfigError) as ei:
        load_profile("tiny_debug", override)
    assert str(ei.value).startswith(message), str(ei.value)
    assert "tiny_debug.yaml" not in str(ei.value)


def test_errors_in_the_file_still_name_the_file(tmp_path):
    (tmp_path / "p.yaml").write_text("extends: tiny_debug\ntraining:\n  bogus: 1\n  max_epochs: 0\n")
    with pytest.raises(ConfigError) as ei:  # an unrelated override does not take the blame
        load_profile(tmp_path / "p.yaml", ["--training.lr", "0.1", "--training.max_epochs", "2"])
    assert str(ei.value) == f"{tmp_path / 'p.yaml'}: unknown key 'training.bogus' (did you mean 'training.betas'?)"
    (tmp_path / "q.yaml").write_text("extends: tiny_debug\ntraining:\n  max_epochs: 0\n")
    with pytest.raises(ConfigError, match=r"q\.yaml: training\.max_epochs: must be >= 1, got 0"):
        load_profile(tmp_path / "q.yaml", ["--training.lr", "0.1"])
    assert load_profile(tmp_path / "q.yaml", ["--training.max_epochs", "2"])["training"]["max_epochs"] == 2
    with pytest.raises(ConfigError, match=r"^--max-steps: must be >= 1 or null, got 0$"):
        load_profile("tiny_debug", ["training.max_steps=0"], override_labels={"training.max_steps": "--max-steps"})


def test_profile_file_numbers_read_the_yaml_1_2_way(tmp_path):
    # PyYAML alone reads 1e-3 (no dot) as the string '1e-3' and the profile was rejected
    (tmp_path / "p.yaml").write_text("extends: tiny_debug\ntraining:\n  lr: 1e-3\n  weight_decay: 5E-2\n"
                                     "  betas: [0.9, 95e-2]\nplugins:\n  align:\n    alpha: 2e-1\n")
    cfg = load_profile(tmp_path / "p.yaml")
    assert cfg["training"]["lr"] == 1e-3 and cfg["training"]["weight_decay"] == 0.05
    assert cfg["training"]["betas"] == [0.9, 0.95] and cfg["plugins"]["align"]["alpha"] == 0.2
    assert parse_overrides(["--training.lr", "-.5", "x.y=3E4", "x.z=1e", "x.w=1.5"]) == \
        {"training.lr": -0.5, "x.y": 30000.0, "x.z": "1e", "x.w": 1.5}


@pytest.mark.parametrize("key, value", [("training.lr", ".nan"), ("training.grad_clip", ".inf"),
                                        ("model.dropout", ".nan"), ("training.betas", "[.nan, 0.9]"),
                                        ("training.betas", "[0.9, 1.0]"), ("model.moe.capacity_factor", ".inf")])
def test_non_finite_and_out_of_range_numbers_are_rejected(key, value):
    with pytest.raises(ConfigError, match=f"--{key}"):
        load_profile("tiny_debug", [f"--{key}", value])


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "a\\b"])
def test_run_name_that_is_a_path_is_refused(tmp_path, name):
    """name: ../escape made apt train write ./escape/last.pt, outside apt_runs/."""
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"extends": "tiny_debug", "name": name}))
    with pytest.raises(ConfigError, match=r"p\.yaml: name: .* names the run directory apt_runs/<name>/"):
        load_profile(str(prof))
    with pytest.raises(ConfigError, match="^override name: "):
        load_profile("tiny_debug", {"name": name})
    # with training.out_dir set the name is only a label; a plain name (dots inside included) is fine
    assert load_profile(str(prof), {"training.out_dir": str(tmp_path / "run")})["name"] == name
    assert load_profile("tiny_debug", {"name": "exp..v2"})["name"] == "exp..v2"


def test_trainer_refuses_a_path_name_from_an_unvalidated_mapping(tmp_path):
    from apt.training import Trainer

    cfg = load_profile("tiny_debug", {"model.d_model": 16, "model.num_heads": 2, "model.num_layers": 1})
    with pytest.raises(ValueError, match="names the run directory"):
        Trainer({**cfg, "name": "../escape"})
