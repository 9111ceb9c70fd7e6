"""Moving a model built with attention_name / router_name: auto to a device never fails for the ahead-of-time
choice: a device without some dtype (MPS has no float64) is warmed for the dtypes it has."""

import pytest
import torch

from apt.core.config import load_profile
from apt.modeling import ModelBuilder


@pytest.mark.parametrize("over", [{"model.attention_name": "auto"},
                                  {"model.moe.enabled": True, "model.moe.router_name": "auto"}])
def test_move_to_a_device_without_float64_warms_the_other_dtypes(monkeypatch, over):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = ModelBuilder(load_profile("tiny_debug", {"model.num_layers": 1, **over}), vocab_size=257).build()
    real_empty = torch.empty

    def empty(*a, dtype=None, **k):  # as torch.empty(..., dtype=torch.float64, device="mps")
        if dtype is torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64")
        return real_empty(*a, dtype=dtype, **k)

    for chooser in m.auto_choosers:
        chooser._chosen.clear()
    monkeypatch.setattr(torch, "empty", empty)
    m = m.to("cpu")
    monkeypatch.setattr(torch, "empty", real_empty)
    for chooser in m.auto_choosers:
        dtypes = {key[1] for key in chooser._chosen}
        assert dtypes == {torch.float32, torch.bfloat16, torch.float16}
    assert torch.isfinite(m(torch.randint(0, 257, (1, 8)))).all()


def test_a_failing_ahead_of_time_choice_does_not_fail_the_move(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = ModelBuilder(load_profile("tiny_debug", {"model.num_layers": 1, "model.attention_name": "auto"}),
                     vocab_size=257).build()

    def boom(device):
        raise RuntimeError("a third-party provider failed")

    for chooser in m.auto_choosers:
        monkeypatch.setattr(chooser, "warm_device", boom)
    m = m.double()
    assert m.embed.weight.dtype == torch.float64
    assert "ahead of use" in caplog.text
    assert torch.isfinite(m(torch.randint(0, 257, (1, 8)))).all()
