"""Eager fast paths that skip autograd.Function.apply / custom-op dispatch when nothing is differentiated: same
results as the differentiable paths, and forward-mode AD is never silently dropped."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import apt_kernels.ops.running_mean  # noqa: F401  (the module, shadowed by the function in apt_kernels.ops)
from apt_kernels import backends
from apt_kernels.ops import moe as M
from apt_kernels.ops import scan as S
from apt_kernels.ops.running_mean import running_mean
from apt_kernels.ops.tva import tva_attention
from apt_kernels.reference.scan import selective_state_update_ref

RM = sys.modules["apt_kernels.ops.running_mean"]
native = pytest.mark.skipif(not backends.native_status()[0], reason="needs the compiled apt_kernels._C")


def _no_apply(monkeypatch, cls):
    def boom(*a, **k):
        raise AssertionError(f"{cls.__name__}.apply called under inference mode")
    monkeypatch.setattr(cls, "apply", boom)


@native
def test_running_mean_inference_skips_function(monkeypatch):
    x = torch.randn(2, 5, 8)
    want = running_mean(x.clone().requires_grad_()).detach()
    _no_apply(monkeypatch, RM.RunningMean)
    with torch.inference_mode():
        assert torch.equal(running_mean(x), want)
    with torch.no_grad():
        assert torch.equal(running_mean(x), want)


@native
@pytest.mark.parametrize("n", [1, 4, 8])
def test_moe_fast_paths_equal(n):
    torch.manual_seed(n)
    logits, x = torch.randn(n, 8), torch.randn(n, 16)
    wi, wg, wo = torch.randn(8, 16, 32), torch.randn(8, 16, 32), torch.randn(8, 32, 16)
    xg = x.clone().requires_grad_()
    r = M.moe_route(logits, 2)
    buf = M.moe_dispatch(xg, r)
    want_y = M.moe_combine(buf, r).detach()
    want_f = M.moe_grouped_ffn(buf, r.offsets, wi, wg, wo).detach()
    assert buf.grad_fn is not None
    with torch.inference_mode():
        r2 = M.moe_route(logits, 2)
        b2 = M.moe_dispatch(x, r2)
        assert torch.equal(M.moe_combine(b2, r2), want_y)
        assert torch.equal(M.moe_grouped_ffn(b2, r2.offsets, wi, wg, wo), want_f)


@native
def test_scan_prefill_fast_path_equal(monkeypatch):
    torch.manual_seed(0)
    u, dl = torch.randn(1, 8, 5), torch.rand(1, 8, 5)
    A, B, C, D = -torch.rand(8, 4), torch.randn(1, 4, 5), torch.randn(1, 4, 5), torch.randn(8)
    y, last = S.selective_scan_fn(u.clone().requires_grad_(), dl, A, B, C, D, return_last_state=True)
    _no_apply(monkeypatch, S._EagerScan)
    with torch.inference_mode():
        y2, last2 = S.selective_scan_fn(u, dl, A, B, C, D, return_last_state=True)
    assert torch.equal(y.detach(), y2) and torch.equal(last, last2)


@native
def test_tva_forward_ad_is_not_dropped():
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    t = torch.randn_like(q)
    with fwAD.dual_level():
        dq = fwAD.make_dual(q, t)
        # was: a result with no tangent, silently; then torch's "must implement the jvp function"
        with pytest.raises(RuntimeError, match="apt_kernels.tva_attention: .*forward-mode AD"):
            tva_attention(dq, k, v, impl="cpu_native")
        got = fwAD.unpack_dual(tva_attention(dq, k, v)).tangent  # auto: the reference
        want = fwAD.unpack_dual(tva_attention(dq, k, v, impl="reference")).tangent
    assert got is not None and torch.equal(got, want)


@native
def test_state_update_forward_ad():
    torch.manual_seed(0)
    st = torch.randn(1, 8, 4)
    x, dt, A, B, C = torch.randn(1, 8), torch.randn(1, 8), -torch.rand(8, 4), torch.randn(1, 4), torch.randn(1, 4)
    tx = torch.randn_like(x)
    with fwAD.dual_level():
        want = fwAD.unpack_dual(selective_state_update_ref(st.clone(), fwAD.make_dual(x, tx), dt, A, B, C)).tangent
        got = fwAD.unpack_dual(S.selective_state_update(st.clone(), fwAD.make_dual(x, tx), dt, A, B, C)).tangent
        assert got is not None and torch.allclose(got, want)  # was: None (tangent dropped by the kernel)
        with pytest.raises(ValueError, match="x: is a forward-mode AD dual tensor"):
            S.selective_state_update_cpu(st.clone(), fwAD.make_dual(x, tx), dt, A, B, C)
        # a dual level with no dual input: the kernel still runs
        S.selective_state_update_cpu(st.clone(), x, dt, A, B, C)

