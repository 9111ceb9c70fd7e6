"""Fused TVA attention on a CUDA device: the native CUDA kernels (csrc/tva/tva_cuda.cu) and the compiled Triton kernel
vs the reference, forward and every gradient, plus a peak-memory check. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from apt_kernels import backends
from apt_kernels.reference.tva import random_tva_inputs, tva_attention_ref
from apt_kernels.testing import assert_close

pytestmark = pytest.mark.cuda

NAMES = ("q", "k", "v", "delta", "gate", "coef")
MASKS = [(True, None, 0, False, 0), (True, None, 0, True, 40), (True, 50, 3, True, 0), (False, None, 0, True, 7),
         (False, 33, 1, False, 0)]


def _impls():
    from apt_kernels.ops.tva import impl_status

    out = []
    for impl in ("cuda", "triton"):
        ok, why = impl_status(impl, torch.device("cuda"))
        if impl == "triton" and backends.triton_interpret():
            ok, why = False, "TRITON_INTERPRET=1 is set in this process"
        out.append(pytest.param(impl, marks=pytest.mark.skipif(not ok, reason=why or "unavailable")))
    return out


def _compare(impl, inp, dtype, **kw):
    from apt_kernels.ops.tva import tva_attention

    out = tva_attention(**inp, **kw, impl=impl)
    ref_inp = {k: (v.detach().float().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v) for k, v in inp.items()}
    ref = tva_attention_ref(**ref_inp, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, ref.to(dtype), dtype=dtype, family="attention", msg=f"{impl} o")
    go = torch.randn(out.shape, device=out.device, dtype=dtype)
    names = [n for n in NAMES if isinstance(inp.get(n), torch.Tensor) and inp[n].requires_grad]
    got = torch.autograd.grad(out, [inp[n] for n in names], go)
    exp = torch.autograd.grad(ref, [ref_inp[n] for n in names], go.float())
    for n, g, e in zip(names, got, exp):
        assert torch.isfinite(g).all(), n
        assert_close(g, e.to(dtype), dtype=dtype, family="attention", grad=True, msg=f"{impl} d{n}")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("causal,window,sinks,pad,extra", MASKS)
def test_cuda_matches_reference(impl, dtype, D, causal, window, sinks, pad, extra):
    inp = random_tva_inputs(B=2, H=3, Tq=150, Tk=150 + extra, D=D, dtype=dtype, device="cuda", pad=pad,
                            coef_tensor=True, requires_grad=True, seed=D + extra)
    _compare(impl, inp, dtype, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("impl", _impls())
def test_cuda_decode_and_fully_masked_rows(impl):
    inp = random_tva_inputs(B=2, H=2, Tq=1, Tk=300, D=64, device="cuda", pad=True, coef_tensor=True,
                            requires_grad=True)
    _compare(impl, inp, torch.float32, window=64, sinks=4)
    inp = random_tva_inputs(B=2, H=2, Tq=40, D=64, device="cuda", pad=True, coef_tensor=True, requires_grad=True)
    inp["key_padding_mask"] = inp["key_padding_mask"].clone()
    inp["key_padding_mask"][0] = True
    _compare(impl, inp, torch.float32)


@pytest.mark.parametrize("impl", _impls())
def test_cuda_no_score_matrix(impl):
    from apt_kernels.ops.tva import tva_attention

    T = 16384  # one (T, T) fp32 matrix per head would be 1 GiB
    inp = random_tva_inputs(B=1, H=2, Tq=T, D=64, dtype=torch.float16, device="cuda", coef_tensor=True,
                            requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tva_attention(**inp, impl=impl).sum().backward()
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    assert grown < 64 * 2**20, f"peak grew by {grown / 2**20:.1f} MiB"
