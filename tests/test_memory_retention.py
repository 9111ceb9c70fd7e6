"""Memory: a forward's autograd graph does not outlive the next forward (model.hidden_states / aux_losses held it)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from apt.core.config import load_profile
from apt.modeling.compose import ModelBuilder


@pytest.mark.parametrize("profile,overrides", [("tiny_debug", {}), ("tiny_debug", {"model.moe.enabled": True}),
                                               ("mamba_tiny", {})])
def test_a_dropped_forward_graph_is_freed_by_the_next_forward(profile, overrides):
    # model.hidden_states / aux_losses (and MoE last_aux) held the previous forward's graph until the new one was
    # built: a forward under grad with no backward (eval loop without no_grad) doubled the peak activation memory
    torch.manual_seed(0)
    model = ModelBuilder(load_profile(profile, overrides=overrides), vocab_size=64).build().train()
    x = torch.randint(0, 64, (2, 16))
    saved = []

    def pack(t):  # a detached alias: returning t itself would tie a saved output to its node in a cycle
        d = t.detach()
        saved.append(weakref.ref(d))
        return d

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    seen = []

    def probe(*_):
        gc.collect()
        # (a parameter's detached alias dies too: the graph holds the only reference to it)
        seen.append(sum(1 for r in saved if r() is not None))

    h = model.norm_f.register_forward_hook(probe)
    try:
        model(x)
    finally:
        h.remove()
    assert seen == [0], f"{seen[0]} activations of the previous forward still alive during the next one"
