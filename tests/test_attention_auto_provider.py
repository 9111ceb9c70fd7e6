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


def test_auto_router_skips_a_router_that_refuses_the_device(monkeypatch):
    """model.moe.router_name: auto routes each call through the best router supporting the tensors' device and
    dtype (a CUDA router on a GPU machine is skipped for a model run on the CPU), and the report says so."""
    from apt.providers.router import TopKDefaultRouter

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else auto takes the Triton router (interpreted, slow)
    calls = []

    class GpuOnly(TopKDefaultRouter):  # stands in for the cuda router on a GPU machine
        name, is_default, priority = "test_gpu_only_router", False, 1000
        devices = ("cuda",)

        def route(self, *a, **k):
            calls.append(1)
            raise ValueError("logits: the CUDA router needs CUDA tensors")

    registry.register(GpuOnly)
    try:
        over = {"model.moe.enabled": True, "model.moe.router_name": "auto"}
        model = _build("tiny_debug", **over)
        ref = _build("tiny_debug", **{**over, "model.moe.router_name": "topk_default"})
        ref.load_state_dict(model.state_dict())
        x = torch.randint(0, 257, (2, 9))
        torch.testing.assert_close(model(x), ref(x))
        assert not calls
        assert model.build_report["moe"].startswith("router/auto (per device/dtype; ")
        assert "test_gpu_only_router" not in model.build_report["moe"]
        model.double()(x)  # a new (device, dtype): chosen again
        assert not calls
    finally:
        registry.REGISTRY.unregister("router", "test_gpu_only_router")
