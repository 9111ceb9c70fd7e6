"""torch.func over the public ops: vjp on the native Functions raises the op's clear error (was "Cannot access data
pointer of Tensor that doesn't have storage"), the dispatching running_mean / selective_state_update work under
vmap / jvp (they fall back to the reference), and the dropless grouped FFN's double backward is a clear error (was
an internal torch error)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, jvp, stack_module_state, vjp, vmap

from apt_kernels.backends import native_status
from apt_kernels.layers.tva import TVAAttention
from apt_kernels.ops.moe import moe_grouped_ffn
from apt_kernels.ops.running_mean import running_mean
from apt_kernels.ops.scan import selective_scan_cpu, selective_state_update, selective_state_update_cpu
from apt_kernels.ops.tva import tva_attention
from apt_kernels.reference.common import running_mean_ref
from apt_kernels.reference.scan import selective_state_update_ref

native = pytest.mark.skipif(not native_status()[0], reason="native module not built")


@native
def test_vjp_on_native_functions_raises_clearly():
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    out, fn = vjp(lambda a: tva_attention(a, k, v, impl="cpu_native"), q)
    with pytest.raises(RuntimeError, match="apt_kernels.tva_attention: .*torch.func"):
        fn(torch.ones_like(out))
    u, A, B, C = torch.randn(1, 3, 6), -torch.rand(3, 2), torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    out, fn = vjp(lambda dt: selective_scan_cpu(u, dt, A, B, C, delta_softplus=True), torch.rand(1, 3, 6))
    with pytest.raises(RuntimeError, match="apt_kernels.selective_scan: .*torch.func"):
        fn(torch.ones_like(out))


@native
def test_running_mean_and_tva_layer_under_vmap_and_jvp():
    torch.manual_seed(0)
    x, m = torch.randn(3, 2, 6, 4), torch.rand(3, 2, 6) > 0.7
    torch.testing.assert_close(vmap(running_mean)(x, m), vmap(running_mean_ref)(x, m), rtol=0, atol=0)
    t = torch.randn_like(x[0])
    torch.testing.assert_close(jvp(lambda a: running_mean(a, m[0]), (x[0],), (t,))[1],
                               jvp(lambda a: running_mean_ref(a, m[0]), (x[0],), (t,))[1])
    models = [TVAAttention(16, 2, core="reference").eval() for _ in range(3)]
    params, bufs = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    xin = torch.randn(2, 5, 16)
    y = vmap(lambda p, b: functional_call(base, (p, b), (xin,)))(params, bufs)  # model ensembling
    torch.testing.assert_close(y, torch.stack([mm(xin) for mm in models]), atol=1e-6, rtol=1e-5)


@native
def test_selective_state_update_under_vmap():
    torch.manual_seed(1)
    st, x, dt = torch.randn(3, 1, 3, 2), torch.randn(3, 1, 3), torch.rand(3, 1, 3)
    A, B, C = -torch.rand(3, 2), torch.randn(3, 1, 2), torch.randn(3, 1, 2)
    s1, s2 = st.clone(), st.clone()
    y = vmap(lambda s, x, dt, B, C: selective_state_update(s, x, dt, A, B, C, dt_softplus=True))(s1, x, dt, B, C)
    yr = torch.stack([selective_state_update_ref(s2[i], x[i], dt[i], A, B[i], C[i], dt_softplus=True)
                      for i in range(3)])
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(s1, s2)
    with pytest.raises(RuntimeError, match="torch.func"):
        vmap(lambda s, x, dt, B, C: selective_state_update_cpu(s, x, dt, A, B, C))(st.clone(), x, dt, B, C)


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_ffn_double_backward_is_a_clear_error(gated):
    torch.manual_seed(2)
    offs = torch.tensor([0, 2, 2, 5])
    x, w_in, w_out = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4, 6, requires_grad=True), \
        torch.randn(3, 6, 4, requires_grad=True)
    w_g = torch.randn(3, 4, 6, requires_grad=True) if gated else None
    y = moe_grouped_ffn(x, offs, w_in, w_g, w_out, activation="swiglu" if gated else "gelu")
    g = torch.autograd.grad(y.pow(3).sum(), (x, w_in), create_graph=True)
    with pytest.raises(RuntimeError, match="moe_grouped_ffn: the dropless grouped FFN has no double backward"):
        torch.autograd.grad(sum(a.pow(2).sum() for a in g), (x, w_in))
    # first order, as before
    g1 = torch.autograd.grad(moe_grouped_ffn(x, offs, w_in, w_g, w_out, activation="swiglu" if gated else "gelu")
                             .pow(3).sum(), (x, w_in))
    for a, b in zip(g, g1):
        torch.testing.assert_close(a.detach(), b)
