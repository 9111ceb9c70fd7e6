"""model.attention_name: auto picks, per call, the best attention provider that supports the inputs (as
scan_name: auto does), and the build report says the choice is per call / per device instead of naming a
provider the model may not run."""
import copy

import torch

from apt.core import registry
from apt.core.config import load_profile
from apt.modeling import ModelBuilder
from apt.providers.attention import TVADefault


def _build(profile, **over):
    torch.manual_seed(0)
    return ModelBuilder(load_profile(profile, {"model.num_layers": 1, **over}), vocab_size=257).build()


def test_auto_attention_runs_float64_like_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ref = _build("tiny_debug", **{"model.attention_name": "tva_default"}).double()
    auto = _build("tiny_debug", **{"model.attention_name": "auto"}).double()
    auto.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(auto(x), ref(x))  # was: TypeError from tva_cpu (no float64)


def test_auto_attention_skips_a_provider_that_refuses_the_inputs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []

    class Picky(TVADefault):  # stands in for tva_cuda on a GPU machine with head dim 16 / CPU tensors
        name, is_default, priority = "test_picky_auto", False, 1000

        def supports(self, **inputs):
            return ["q: not for these inputs"]

        def forward(self, *a, **k):
            calls.append(1)
            raise ValueError("q: the kernels cannot take these inputs")

    registry.register(Picky)
    try:
        model = _build("tiny_debug", **{"model.attention_name": "auto"})
        model(torch.randint(0, 257, (1, 8)))
        assert not calls
        assert model.build_report["attention"].startswith("auto")
    finally:
        registry.REGISTRY.unregister("attention", "test_picky_auto")


def test_auto_scan_report_says_it_is_chosen_per_device():
    model = _build("mamba_tiny", **{"model.mamba.scan_name": "auto"})
    assert model.build_report["scan"].startswith("auto (")
