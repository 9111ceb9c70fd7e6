"""Tied embedding / LM head survives meta-device init and load_state_dict(assign=True); reset_parameters
re-initialises every tensor of a model built on the meta device."""
import copy
import pickle

import pytest
import torch

from apt.core.config import load_profile
from apt.modeling import ModelBuilder


def _build(profile, **overrides):
    torch.manual_seed(0)
    return ModelBuilder(load_profile(profile, overrides=overrides), vocab_size=64).build()


def _tied(m):
    return m.head.weight is m.embed.weight


@pytest.mark.parametrize("profile,overrides", [("tiny_debug", {}), ("tiny_debug", {"model.moe.enabled": True}),
                                               ("mamba_tiny", {})])
def test_meta_init_keeps_tying_and_loads(profile, overrides):
    ref = _build(profile, **overrides).eval()
    sd = ref.state_dict()
    ids = torch.randint(0, 64, (2, 9))
    a = _build(profile, **overrides).to("meta").to_empty(device="cpu")
    a.load_state_dict(sd)
    with torch.device("meta"):
        b = _build(profile, **overrides)
    b.load_state_dict(sd, assign=True)
    for m in (a, b):
        m.eval()
        assert _tied(m)
        assert len(list(m.parameters())) == len(list(ref.parameters()))
        torch.testing.assert_close(m(ids), ref(ids), rtol=0, atol=0)
    pickle.loads(pickle.dumps(b))  # the load hook keeps the model picklable
    assert _tied(copy.deepcopy(b))


def test_untied_stays_untied():
    m = _build("tiny_debug", **{"model.tie_embeddings": False}).to("meta").to_empty(device="cpu")
    assert not _tied(m)


@pytest.mark.parametrize("profile,overrides", [("tiny_debug", {"model.norm": "rmsnorm", "model.moe.enabled": True}),
                                               ("mamba_tiny", {})])
def test_reset_parameters_after_meta(profile, overrides):
    ref = _build(profile, **overrides)
    with torch.device("meta"):
        m = _build(profile, **overrides)
    m.to_empty(device="cpu")
    for t in list(m.parameters()) + list(m.buffers()):  # garbage, as to_empty may leave it
        t.data.fill_(float("nan")) if t.is_floating_point() else t.data.fill_(0)
    m.reset_parameters()
    assert _tied(m)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.isfinite(p).all(), n
        assert p.shape == q.shape
        if n.endswith(("tau", "A_log", ".D")) or (n.endswith("norm_f.weight")):
            torch.testing.assert_close(p, q, msg=n)  # deterministic inits
    for n, b in m.named_buffers():
        if n.endswith("_active"):
            assert bool(b)  # MoE on, as built
    assert abs(m.embed.weight.std().item() - 0.02) < 0.005
    m.eval()(torch.randint(0, 64, (1, 5)))
