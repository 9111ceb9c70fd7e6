"""fit() refuses, before the first step, a profile the checkpoint could not hold; a resume with another run length
says so (README: 'a changed training.lr, betas, weight_decay or run length takes effect and is logged')."""
from __future__ import annotations

import logging

import pytest

from apt.core.config import load_profile
from apt.training import Trainer

SMALL = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1, "model.max_seq_len": 16,
         "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3, "training.max_epochs": 2,
         "training.progress": False, "training.warmup_steps": 1}


def _cfg(out, **over):
    return load_profile("tiny_debug", {**SMALL, "training.out_dir": str(out), **over})


def test_a_profile_weights_only_refuses_fails_before_the_first_step(tmp_path):
    # an unquoted YAML date in an uninstalled plugin's settings is a datetime.date: only warned about at load
    t = Trainer(_cfg(tmp_path, **{"plugins.not_installed.since": "2024-01-01"}))
    with pytest.raises(TypeError, match="'profile'"):
        t.fit()
    assert t.step == 0


def test_resume_with_another_run_length_says_so(tmp_path, caplog):
    Trainer(_cfg(tmp_path)).fit(stop_at_step=2)
    with caplog.at_level(logging.WARNING):
        t = Trainer(_cfg(tmp_path, **{"training.resume": "auto", "training.max_epochs": 4}))
    assert "training.max_epochs" in caplog.text and t.total_steps == 12
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(tmp_path, **{"training.resume": "auto"}))
    assert "training.max_epochs" not in caplog.text
