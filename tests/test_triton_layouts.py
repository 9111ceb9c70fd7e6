"""Triton kernels (TRITON_INTERPRET=1, tiny shapes) on unusual layouts and empty inputs, vs the reference:
strided / expanded per-channel vectors (D, delta_bias, dt_bias), an empty MoE batch in capacity mode, no queries."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the Triton kernels

import pytest  # noqa: E402
import torch  # noqa: E402

import apt_kernels as ak  # noqa: E402
from apt_kernels.backends import triton_status  # noqa: E402
from apt_kernels.ops.tva import tva_attention  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not triton_status()[0], reason=triton_status()[1] or "n/a")]


def _vec(kind: str, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "strided":
        return torch.randn(2 * d, generator=g)[::2]
    return torch.randn(1, generator=g).expand(d)  # mamba_ssm-style repeat: stride 0


@pytest.mark.parametrize("kind", ["strided", "expanded"])
@pytest.mark.parametrize("which", ["D", "delta_bias"])
def test_scan_strided_channel_vectors(kind, which):
    g = torch.Generator().manual_seed(0)
    b, d, L, N = 1, 4, 3, 2
    base = dict(u=torch.randn(b, d, L, generator=g), delta=torch.rand(b, d, L, generator=g),
                A=-torch.rand(d, N, generator=g), B=torch.randn(b, N, L, generator=g),
                C=torch.randn(b, N, L, generator=g))
    vec = _vec(kind, d, g)
    outs = []
    for fn in (ak.selective_scan_ref, ak.selective_scan_triton):
        args = {k: v.clone().requires_grad_() for k, v in base.items()}
        if kind == "strided":  # a view of a leaf: the gradient flows back through the slice
            leaf = torch.randn(2 * d, generator=torch.Generator().manual_seed(2)).requires_grad_()
            args[which] = leaf[::2]
        else:
            leaf = vec[:1].clone().requires_grad_()
            args[which] = leaf.expand(d)
        y, last = fn(**args, delta_softplus=True, return_last_state=True)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(last.sum()).backward()
        outs.append((y.detach(), last.detach(), [args[k].grad for k in base], leaf.grad))
    (yr, lr, gr, vr), (yt, lt, gt, vt) = outs
    torch.testing.assert_close(yt, yr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lt, lr, atol=1e-5, rtol=1e-4)
    for a, c in zip(gt, gr):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vt, vr, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["strided", "expanded"])
@pytest.mark.parametrize("which", ["D", "dt_bias"])
def test_state_update_strided_channel_vectors(kind, which):
    g = torch.Generator().manual_seed(1)
    b, d, N = 2, 4, 3
    args = dict(x=torch.randn(b, d, generator=g), dt=torch.rand(b, d, generator=g), A=-torch.rand(d, N, generator=g),
                B=torch.randn(b, N, generator=g), C=torch.randn(b, N, generator=g))
    args[which] = _vec(kind, d, g)
    st = torch.randn(b, d, N, generator=g)
    s_ref, s_tri = st.clone(), st.clone()
    y_ref = ak.selective_state_update_ref(s_ref, **args, dt_softplus=True)
    y_tri = ak.selective_state_update_triton(s_tri, **args, dt_softplus=True)
    torch.testing.assert_close(y_tri, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s_tri, s_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cf", [None, 1.25])
def test_moe_empty_batch_backward(cf):
    """0 tokens in capacity mode: E*cap slots but no token rows; the combine backward read slot/weights row 0 of
    empty tensors (a segfault in the interpreter, an out-of-bounds read on a GPU)."""
    lg = torch.randn(0, 4, requires_grad=True)
    x = torch.randn(0, 8, requires_grad=True)
    r = ak.moe_route(lg, 2, cf, impl="triton")
    buf = ak.moe_dispatch(x, r, impl="triton")
    y = ak.moe_combine(buf * 2, r, impl="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)


def test_tva_no_queries_keeps_the_graph():
    q = torch.randn(1, 2, 0, 8, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, requires_grad=True)
    v = torch.randn(1, 2, 3, 8, requires_grad=True)
    o = tva_attention(q, k, v, impl="triton")
    assert o.shape == q.shape and o.requires_grad
    o.sum().backward()
    assert q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))
