"""torch.func over the public ops: the native Functions raise the op's clear error under vjp / vmap / jvp / grad and
for forward-AD dual tensors (was torch's "Cannot access data pointer", "does not have vmap support" or "must
implement the jvp function", naming no op), the dispatching entry points (impl='auto': selective_scan_fn,
tva_attention, the MoE ops, running_mean, selective_state_update) take the reference there, and the dropless grouped
FFN's double backward is a clear error (was an internal torch error)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jvp, stack_module_state, vjp, vmap

from apt_kernels.backends import native_status
from apt_kernels.layers.tva import TVAAttention
from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_grouped_ffn, moe_route
from apt_kernels.ops.running_mean import running_mean, running_mean_native
from apt_kernels.ops.scan import (selective_scan_cpu, selective_scan_fn, selective_state_update,
                                  selective_state_update_cpu)
from apt_kernels.ops.tva import tva_attention
from apt_kernels.reference.common import running_mean_ref
from apt_kernels.reference.scan import selective_scan_ref, selective_state_update_ref

native = pytest.mark.skipif(not native_status()[0], reason="native module not built")


def _scan_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 6, generator=g), torch.rand(1, 3, 6, generator=g), -torch.rand(3, 2, generator=g),
            torch.randn(1, 2, 6, generator=g), torch.randn(1, 2, 6, generator=g))


def _calls():
    """(op name in the error, f(x) with the native kernels chosen explicitly, x) per op."""
    u, dt, A, B, C = _scan_inputs()
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    x = torch.randn(6, 4)
    routing = moe_route(torch.randn(6, 3), 2, impl="reference")
    buf = torch.randn(routing.token_of_slot.shape[0], 4)  # dropless: the packed expert-major rows
    calls = [("tva_attention", lambda a: tva_attention(a, k, v, impl="cpu_native"), q),
             ("selective_scan_cpu", lambda d: selective_scan_cpu(u, d, A, B, C, delta_softplus=True), dt),
             ("running_mean_native", lambda a: running_mean_native(a), torch.randn(2, 6, 4)),
             ("moe_dispatch", lambda a: moe_dispatch(a, routing, impl="cpu_native"), x),
             ("moe_combine", lambda a: moe_combine(a, routing, impl="cpu_native"), buf)]
    return calls


@native
@pytest.mark.parametrize("transform", ["vjp", "vmap", "jvp", "grad", "dual"])
def test_native_functions_under_transforms_raise_clearly(transform):
    # was torch's "Cannot access data pointer" (vjp), "does not have vmap support" (vmap) or "must implement the
    # jvp function" (jvp, dual tensors), naming no op and no way out
    for op, f, x in _calls():
        if op == "running_mean_native" and transform in ("vjp", "grad"):
            continue  # its backward is torch ops: grad works (tests/test_autograd_extra.py)
        want = "forward-mode AD" if transform == "dual" else "torch.func"
        # the way out each names exists: selective_scan_cpu and running_mean_native have no impl argument
        instead = {"selective_scan_cpu": "use selective_scan_fn", "running_mean_native": "use running_mean,"}
        with pytest.raises(RuntimeError, match=f"apt_kernels.{op}: .*{want}.*{instead.get(op, 'impl=.auto.')}"):
            if transform == "vjp":
                vjp(f, x)
            elif transform == "vmap":
                vmap(f)(x[None].expand(2, *x.shape))
            elif transform == "jvp":
                jvp(f, (x,), (torch.ones_like(x),))
            elif transform == "grad":
                grad(lambda a: f(a).sum())(x)
            else:
                with fwAD.dual_level():
                    f(fwAD.make_dual(x, torch.ones_like(x)))


@native
def test_coef_cache_keeps_no_transform_wrapper():
    from apt_kernels.ops.tva import _coef_const

    _coef_const.cache_clear()
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="torch.func"):
        vjp(lambda a: tva_attention(a, a, a, coef=0.25, impl="cpu_native"), q)
    # the float coef's cached tensor was the vjp's (dead) wrapper: every later call saw a torch.func input
    torch.testing.assert_close(tva_attention(q, q, q, coef=0.25, impl="cpu_native"),
                               tva_attention(q, q, q, coef=0.25, impl="reference"))
    assert not torch._C._functorch.is_functorch_wrapped_tensor(_coef_const(0.25, q.device))


@native
def test_forward_ad_level_without_dual_inputs_still_runs_native():
    # an open forward-AD level alone is not a reason to refuse: only dual inputs are
    u, dt, A, B, C = _scan_inputs()
    dt.requires_grad_()
    with fwAD.dual_level():
        y = selective_scan_cpu(u, dt, A, B, C)
    y.sum().backward()
    dt2 = dt.detach().clone().requires_grad_()
    selective_scan_ref(u, dt2, A, B, C).sum().backward()
    torch.testing.assert_close(dt.grad, dt2.grad, rtol=1e-5, atol=1e-6)


def test_auto_dispatch_takes_the_reference_under_transforms():
    u, dt, A, B, C = _scan_inputs(1)
    U = torch.randn(3, *u.shape)
    torch.testing.assert_close(vmap(lambda a: selective_scan_fn(a, dt, A, B, C, delta_softplus=True))(U),
                               torch.stack([selective_scan_ref(a, dt, A, B, C, delta_softplus=True) for a in U]))
    t = torch.randn_like(dt)
    f = lambda d: selective_scan_fn(u, d, A, B, C, delta_softplus=True)  # noqa: E731
    fr = lambda d: selective_scan_ref(u, d, A, B, C, delta_softplus=True)  # noqa: E731
    torch.testing.assert_close(jvp(f, (dt,), (t,))[1], jvp(fr, (dt,), (t,))[1])
    torch.testing.assert_close(grad(lambda d: f(d).sum())(dt), grad(lambda d: fr(d).sum())(dt))
    with fwAD.dual_level():
        tan = fwAD.unpack_dual(f(fwAD.make_dual(dt, t))).tangent
    torch.testing.assert_close(tan, jvp(fr, (dt,), (t,))[1])
    q = torch.randn(2, 1, 2, 5, 16)
    torch.testing.assert_close(vmap(lambda a: tva_attention(a, a, a))(q),
                               torch.stack([tva_attention(a, a, a, impl="reference") for a in q]))
    tq = torch.randn_like(q[0])
    torch.testing.assert_close(jvp(lambda a: tva_attention(a, a, a), (q[0],), (tq,))[1],
                               jvp(lambda a: tva_attention(a, a, a, impl="reference"), (q[0],), (tq,))[1])
    x, routing = torch.randn(6, 4), moe_route(torch.randn(6, 3), 2, impl="reference")
    tx = torch.randn_like(x)
    torch.testing.assert_close(jvp(lambda a: moe_dispatch(a, routing), (x,), (tx,))[1],
                               moe_dispatch(tx, routing, impl="reference"))


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


@pytest.mark.parametrize("capacity_factor", [1.0, None])
def test_moe_routing_under_vmap_and_per_sample_grads(capacity_factor):
    """route -> dispatch -> combine under vmap and vmap(grad) (per-sample gradients), as a loop over the batch:
    the reference routing wrote batched results into unbatched buffers in place, and F.one_hot's range check
    read values, which vmap(grad) refuses."""
    torch.manual_seed(3)
    logits, x = torch.randn(3, 16, 4), torch.randn(3, 16, 8)

    def layer(lg, xx):
        r = moe_route(lg, 2, capacity_factor=capacity_factor)
        return moe_combine(moe_dispatch(xx, r) * 2.0, r)

    loop = torch.stack([layer(logits[i], x[i]) for i in range(3)])
    torch.testing.assert_close(vmap(layer)(logits, x), loop, rtol=0, atol=1e-6)
    offsets = vmap(lambda lg: moe_route(lg, 2, capacity_factor=capacity_factor).offsets)(logits)
    assert offsets.tolist() == [moe_route(lg, 2, capacity_factor=capacity_factor).offsets.tolist() for lg in logits]
    loss = torch.func.grad(lambda xx, lg: layer(lg, xx).square().sum())
    want = torch.stack([loss(x[i], logits[i]) for i in range(3)])
    torch.testing.assert_close(vmap(loss)(x, logits), want, rtol=0, atol=1e-6)


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
