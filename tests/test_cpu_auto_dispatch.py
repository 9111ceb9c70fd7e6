"""impl='auto' on the CPU takes the reference where the native kernels measured slower than it (1 thread): a TVA
training step with fewer than 32 queries (the C++ backward works in 64-row query blocks), and running_mean on a
time-innermost layout (a transposed (B, C, T) tensor)."""
from __future__ import annotations

import importlib

import pytest
import torch

import apt_kernels.ops.tva as tva_mod
from apt_kernels.ops import running_mean
from apt_kernels.reference.common import running_mean_ref
from apt_kernels.reference.tva import random_tva_inputs, tva_attention_ref

rm_mod = importlib.import_module("apt_kernels.ops.running_mean")  # the package attribute is the function

pytestmark = pytest.mark.skipif(not tva_mod.impl_status("cpu_native")[0], reason="needs the compiled module")


def _no_native(*a, **k):
    raise AssertionError("the native kernel was called")


def test_running_mean_time_innermost_layout_takes_reference(monkeypatch):
    x = torch.randn(2, 5, 40).transpose(1, 2)  # (B, T=40, C=5), time contiguous
    monkeypatch.setattr(rm_mod, "running_mean_native", _no_native)
    torch.testing.assert_close(running_mean(x), running_mean_ref(x))


@pytest.mark.parametrize("make", [lambda: torch.randn(2, 40, 5), lambda: torch.randn(2, 40, 10)[:, :, ::2],
                                  lambda: torch.randn(40, 2, 5).transpose(0, 1), lambda: torch.randn(2, 1, 5),
                                  # time innermost but more channels than steps: native is faster there
                                  lambda: torch.randn(2, 64, 8).transpose(1, 2)])
def test_running_mean_other_layouts_stay_native(monkeypatch, make):
    x = make()
    called = []
    orig = rm_mod.running_mean_native
    monkeypatch.setattr(rm_mod, "running_mean_native", lambda *a, **k: called.append(1) or orig(*a, **k))
    torch.testing.assert_close(running_mean(x), running_mean_ref(x))
    assert called


@pytest.mark.parametrize("Tq,Tk,grad,native", [(1, 256, True, False), (16, 64, True, False), (32, 64, True, True),
                                               (1, 256, False, True), (16, 64, False, True)])
def test_tva_auto_cpu_short_query_training_takes_reference(monkeypatch, Tq, Tk, grad, native):
    inp = random_tva_inputs(B=1, H=2, Tq=Tq, D=16, Tk=Tk, requires_grad=grad)
    called = []
    orig = tva_mod._run_native
    monkeypatch.setattr(tva_mod, "_run_native", lambda *a, **k: called.append(1) or orig(*a, **k))
    o = tva_mod.tva_attention(**inp)
    ref = tva_attention_ref(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()})
    torch.testing.assert_close(o.detach(), ref, atol=2e-5, rtol=2e-5)
    assert bool(called) == native
    if grad:
        o.sum().backward()
        assert inp["q"].grad is not None


@pytest.mark.parametrize("dtype,native", [(torch.bfloat16, True), (torch.float32, False)])
def test_tva_auto_cpu_lowp_large_kv_training_stays_native(monkeypatch, dtype, native):
    """A low-precision training call with few queries over more than 2**22 k/v elements stays native (the
    reference's fp32 copies of K and V cost more there); fp32 keeps the few-queries rule."""
    q = torch.randn(1, 16, 1, 64, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 16, 4097, 64, dtype=dtype) for _ in range(2))
    called = []
    orig = tva_mod._run_native
    monkeypatch.setattr(tva_mod, "_run_native", lambda *a, **kw: called.append(1) or orig(*a, **kw))
    tva_mod.tva_attention(q, k, v)
    assert bool(called) == native
