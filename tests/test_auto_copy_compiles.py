"""A deep-copied or unpickled model built with attention_name / router_name: auto compiles with fullgraph=True,
as the original does (the copy's choices are made again when it is unpickled, not in its first traced forward)."""
import copy
import io

import pytest
import torch

from apt.core.config import load_profile
from apt.modeling import ModelBuilder


@pytest.mark.parametrize("over", [{"model.attention_name": "auto"},
                                  {"model.moe.enabled": True, "model.moe.router_name": "auto"}])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "float64", "moved"])
def test_copy_of_an_auto_model_compiles_fullgraph(monkeypatch, over, how):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    m = ModelBuilder(load_profile("tiny_debug", {"model.num_layers": 1, **over}), vocab_size=257).build()
    if how == "float64":  # warmed for float64 too: the dtype auto was made to run on the CPU
        c = m = m.double()
    elif how == "moved":  # a model moved to a device is warmed there (as .to("cuda:1") of a model built on the CPU)
        for chooser in m.auto_choosers:
            chooser._chosen.clear()
        c = m = m.to("cpu")
        assert all(chooser._chosen for chooser in m.auto_choosers)
    elif how == "deepcopy":
        c = copy.deepcopy(m)
    else:
        b = io.BytesIO()
        torch.save(m, b)
        b.seek(0)
        c = torch.load(b, weights_only=False)
    x = torch.randint(0, 257, (2, 9))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(c, fullgraph=True)(x), m(x))


def test_auto_attention_skips_a_provider_whose_layer_is_its_own(monkeypatch):
    """A registered provider with a create_layer of its own (no core) is never the core of an auto layer: float64
    on the CPU (tva_cpu refuses it) went to it and failed with a bare NotImplementedError."""
    from apt.core import registry
    from apt.providers.attention import _AttentionProvider
    from apt_kernels.layers.tva import TVAAttention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    class LayerOnly(_AttentionProvider):
        name, priority = "test_layer_only_auto", 7

        def create_layer(self, d_model, num_heads, **cfg):
            return TVAAttention(d_model, num_heads, **cfg)

    registry.register(LayerOnly)
    try:
        torch.manual_seed(0)
        cfg = load_profile("tiny_debug", {"model.num_layers": 1, "model.attention_name": "auto"})
        m = ModelBuilder(cfg, vocab_size=257).build().double()
        assert torch.isfinite(m(torch.randint(0, 257, (1, 8)))).all()
    finally:
        registry.REGISTRY.unregister("attention", "test_layer_only_auto")


def test_auto_model_built_on_the_meta_device_chooses_for_real_devices(monkeypatch):
    """Built under torch.device("meta") (then to_empty): nothing is chosen for meta tensors (the report's probe
    was made on the meta device, and the registry warned that no router supports it)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    over = {"model.num_layers": 1, "model.attention_name": "auto", "model.moe.enabled": True,
            "model.moe.router_name": "auto"}
    with torch.device("meta"):
        m = ModelBuilder(load_profile("tiny_debug", over), vocab_size=257).build()
    assert all("meta" not in str(key[0]) for ch in m.auto_choosers for key in ch._chosen)
    assert "meta" not in m.build_report["moe"]
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.isfinite(m(torch.randint(0, 257, (1, 5)))).all()
