"""Under torch.autocast the reference TVA attention and MoE combine keep their documented fp32 accumulation, so they
agree with the native (cpu_native) kernels as they do without autocast (autocast ran their matmul/einsum in bf16)."""
import pytest
import torch

from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route
from apt_kernels.ops.tva import impl_status, tva_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tva_reference_autocast_keeps_fp32_accumulation(dtype):
    torch.manual_seed(0)
    q, k, v, delta = [torch.randn(1, 2, 64, 32).to(dtype) for _ in range(4)]
    plain = tva_attention(q, k, v, delta, None, 0.3, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = tva_attention(q, k, v, delta, None, 0.3, impl="reference")
    assert amp.dtype == plain.dtype == dtype
    torch.testing.assert_close(amp, plain, rtol=0, atol=0)
    if impl_status("cpu_native")[0]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nat = tva_attention(q, k, v, delta, None, 0.3, impl="cpu_native")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(nat.float(), amp.float(), rtol=tol, atol=tol)


def test_tva_reference_autocast_gradients():
    torch.manual_seed(0)
    ins = [torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(4)]
    def grads(ac):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            o = tva_attention(*ins, None, 0.3, impl="reference")
        return torch.autograd.grad((o * o).sum(), ins)
    for a, b in zip(grads(True), grads(False)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_moe_combine_reference_autocast_keeps_fp32():
    torch.manual_seed(0)
    x, logits = torch.randn(16, 8), torch.randn(16, 4)
    r = moe_route(logits, 2, capacity_factor=None, impl="reference")
    buf = moe_dispatch(x, r, impl="reference") * 1.37
    plain = moe_combine(buf, r, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = moe_combine(buf, r, impl="reference")
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, plain, rtol=0, atol=0)
