"""Found in review: scan_name auto under autocast and torch.compile, plugin state a weights_only checkpoint cannot
hold, the name of a profile given as a mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apt.core.config import load_profile
from apt.modeling.mamba import MambaMixer
from apt.plugins.base import Plugin
from apt.training.trainer import Trainer

SMALL = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1, "model.max_seq_len": 16,
         "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3, "training.max_epochs": 1,
         "training.progress": False, "training.warmup_steps": 0}


def test_mamba_auto_scan_compiles_fullgraph_under_autocast():
    m = MambaMixer(16, scan_name="auto").eval()
    f = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f(torch.randn(1, 8, 16))  # was: Unsupported context manager (the registry lock, first met in forward)
    assert m.scan_fn is m._auto_cache[("cpu", torch.bfloat16)][0]


class _CounterState(Plugin):
    name = "counter_state"

    def __init__(self, config=None):
        super().__init__(config)
        self.best = np.float64(1.0)  # e.g. from np.mean / np.min

    def state_dict(self):
        return {"best": self.best}  # a numpy scalar: torch.load(weights_only=True) refuses it


def test_a_plugin_state_that_load_would_refuse_fails_before_training_and_at_save(tmp_path):
    from apt.training import checkpoint as ckpt

    cfg = load_profile("tiny_debug", {**SMALL, "training.out_dir": str(tmp_path / "run")})
    tr = Trainer(cfg, plugins=[_CounterState()])
    with pytest.raises(TypeError, match="checkpoint part 'plugins'.*weights_only"):
        tr.fit(stop_at_step=1)
    assert tr.step == 0  # refused before the first step, not at the first save
    with pytest.raises(TypeError, match="checkpoint part 'plugins'.*weights_only"):
        tr.save_checkpoint()
    assert not (tmp_path / "run" / "last.pt.tmp").exists() and not (tmp_path / "run" / "last.pt").exists()
    ckpt.check_weights_only({"plugins": {"counter_state": {"best": 1.0}}})  # a float is fine


def test_mapping_profile_does_not_inherit_its_parents_name():
    assert load_profile({"extends": "tiny_debug"})["name"] != "tiny_debug"
    assert load_profile({"extends": "tiny_debug", "name": "mine"})["name"] == "mine"
