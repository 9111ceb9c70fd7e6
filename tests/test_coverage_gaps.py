"""Coverage gaps (each of these tests fails on a deliberate bug that the rest of the suite let through): aux-loss
gradients in float64, a tensor coef without a gate in the fused TVA backward, aux losses of mismatched logits, the
grouped FFN in every dtype on non-contiguous inputs."""
from __future__ import annotations

import pytest
import torch

from apt_kernels.ops.moe import moe_aux_losses, moe_route
from apt_kernels.reference.tva import check_tva_against_reference, random_tva_inputs


# moe_aux_losses: the suite checked the loss values and only "grad is not None and nonzero" for the gradient, so a
# balance-loss or z-loss gradient off by 2x passed everything.
@pytest.mark.parametrize("cf,k", [(None, 2), (1.0, 2), (0.5, 1)])
def test_aux_losses_gradcheck_float64(cf, k):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    r = moe_route(logits.detach(), k, cf, min_capacity=1, impl="reference")  # routing decisions: fixed

    def f(lg):
        rr = moe_route(lg, k, cf, min_capacity=1, impl="reference")
        assert torch.equal(rr.expert_idx, r.expert_idx)  # gradcheck's perturbation must not flip a decision
        aux = moe_aux_losses(lg, rr)
        return aux["balance_loss"], aux["z_loss"]

    assert torch.autograd.gradcheck(f, (logits,))


# tva_attention: every fused-kernel test passes a gate (random_tva_inputs always makes one) or a float coef, so the
# gradient of a tensor coef without a gate (dcoef = sum(delta * dO)) was never compared: halving it passed.
@pytest.mark.parametrize("impl", ["cpu_native"])
@pytest.mark.parametrize("Tq,D", [(1, 16), (37, 24)])
def test_fused_no_gate_tensor_coef_gradient(impl, Tq, D):
    from apt_kernels.ops.tva import impl_status, tva_attention

    ok, why = impl_status(impl, torch.device("cpu"), D, torch.float32)
    if not ok:
        pytest.skip(why)
    inp = random_tva_inputs(B=2, H=2, Tq=Tq, D=D, coef_tensor=True, requires_grad=True, pad=True)
    inp.pop("gate")
    check_tva_against_reference(lambda **a: tva_attention(**a, impl=impl), inp, window=5, sinks=1)


def test_aux_losses_refuse_logits_of_another_routing():
    """Removing the shape check made moe_aux_losses silently compute the z-loss over other logits: no test noticed."""
    logits = torch.randn(6, 4)
    r = moe_route(logits, 2, 1.0, impl="reference")
    for bad in (torch.randn(5, 4), torch.randn(6, 3)):
        with pytest.raises(ValueError, match=r"logits: expected shape \(6, 4\)"):
            moe_aux_losses(bad, r)


# moe_grouped_ffn was tested in fp32 only (plus an fp64 gradcheck and bf16 under autocast), on contiguous inputs.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_ffn_dtypes_and_non_contiguous(dtype, activation):
    from apt_kernels.ops.moe import moe_grouped_ffn
    from apt_kernels.reference.moe import moe_grouped_ffn_ref
    from apt_kernels.testing import assert_close

    g = torch.Generator().manual_seed(5)
    e, c, f, co = 3, 5, 7, 3
    offsets = torch.tensor([0, 1, 1, 6])  # length-1, empty and odd segments
    x = torch.randn(c, 6, generator=g).t().to(dtype)  # non-contiguous (M, C)
    w_in = (torch.randn(e, f, c, generator=g) / 2).transpose(1, 2).to(dtype)  # (E, C, F) stored transposed
    w_gate = (torch.randn(e, c, f, generator=g) / 2).to(dtype) if activation == "swiglu" else None
    w_out = (torch.randn(e, f, co, generator=g) / 2).to(dtype)
    leaves = [t.requires_grad_() for t in (x, w_in, w_gate, w_out) if t is not None]
    assert not x.is_contiguous() and not w_in.is_contiguous()
    y = moe_grouped_ffn(x, offsets, w_in, w_gate, w_out, activation)
    assert y.dtype == dtype
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, wir, *rest = ref_leaves
    wgr, wor = (rest if activation == "swiglu" else [None, rest[0]])
    want = moe_grouped_ffn_ref(xr, offsets, wir, wgr, wor)
    assert_close(y, want.to(dtype), dtype=dtype, msg="y")
    gy = torch.randn(y.shape, generator=g).to(dtype)
    grads = zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(want, ref_leaves, gy.double()))
    for i, (a, b) in enumerate(grads):
        assert a.dtype == dtype
        assert_close(a, b.to(dtype), dtype=dtype, grad=True, msg=f"grad {i}")
