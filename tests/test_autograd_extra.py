"""Autograd corners of the native kernels: second derivatives (raise a clear error or are right, never silently
wrong), torch.func over the eager autograd.Functions, and MoE dropless training under autocast."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, grad_and_value, vmap

from apt_kernels._autograd import double_backward_message, no_double_backward
from apt_kernels.backends import native_status
from apt_kernels.layers.moe import MoEFFN
from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_grouped_ffn, moe_route
from apt_kernels.ops.running_mean import running_mean_native
from apt_kernels.ops.scan import selective_scan_cpu
from apt_kernels.ops.tva import tva_attention
from apt_kernels.reference.common import running_mean_ref
from apt_kernels.reference.moe import moe_grouped_ffn_ref
from apt_kernels.reference.scan import selective_scan_ref

native = pytest.mark.skipif(not native_status()[0], reason=native_status()[1] or "native module unavailable")

NO_DOUBLE = "no double backward"


def _second_order(make_loss, wrt):
    """(first-order grad with create_graph, d/dwrt |grad|^2, or the RuntimeError it raised)."""
    leaf = wrt.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(make_loss(leaf), leaf, create_graph=True)
    try:
        (gg,) = torch.autograd.grad(g.pow(2).sum(), leaf, allow_unused=True)
    except RuntimeError as exc:
        return g.detach(), exc
    return g.detach(), gg


def _raises_or_matches(native_res, ref_res, atol=1e-5, rtol=1e-4):
    g_n, gg_n = native_res
    g_r, gg_r = ref_res
    torch.testing.assert_close(g_n, g_r, atol=atol, rtol=rtol)  # first order unchanged
    if isinstance(gg_n, RuntimeError):
        assert NO_DOUBLE in str(gg_n) and "reference provider" in str(gg_n)
    else:
        assert gg_n is not None
        torch.testing.assert_close(gg_n, gg_r, atol=atol, rtol=rtol)


# ---- double backward: the incoming gradient has no graph (a loss linear in the op's output) -------------------

@native
def test_tva_double_backward_linear_loss_raises():
    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(1, 2, 5, 16) for _ in range(3))
    res = {}
    for impl in ("reference", "cpu_native"):
        res[impl] = _second_order(lambda q: (tva_attention(q, k0, v0, causal=True, impl=impl) * v0).sum()
                                  + 0.5 * q.pow(2).sum(), q0)
    assert isinstance(res["cpu_native"][1], RuntimeError)  # the op's Hessian is nonzero: it must raise
    assert "apt_kernels.tva_attention" in str(res["cpu_native"][1])
    _raises_or_matches(res["cpu_native"], res["reference"])


@native
def test_scan_double_backward_linear_loss_raises():
    torch.manual_seed(1)
    b, d, n, L = 1, 3, 2, 6
    u, A, B, C = torch.randn(b, d, L), -torch.rand(d, n), torch.randn(b, n, L), torch.randn(b, n, L)
    dt0 = torch.rand(b, d, L)
    res = {}
    for name, fn in (("reference", selective_scan_ref), ("cpu_native", selective_scan_cpu)):
        res[name] = _second_order(lambda dt: fn(u, dt, A, B, C, delta_softplus=True).sum() + 0.5 * dt.pow(2).sum(),
                                  dt0)
    assert isinstance(res["cpu_native"][1], RuntimeError)
    assert "apt_kernels.selective_scan" in str(res["cpu_native"][1])
    _raises_or_matches(res["cpu_native"], res["reference"])


@native
def test_moe_combine_double_backward_linear_loss_raises():
    """d/dlogits of |dL/dbuf|^2 through combine's bilinear backward: None before (silently), an error now."""
    torch.manual_seed(2)
    x0, lg0 = torch.randn(8, 4), torch.randn(8, 3)
    out = {}
    for impl in ("reference", "cpu_native"):
        logits = lg0.clone().requires_grad_()
        ro = moe_route(logits, 2, 2.0, 4, None, impl=impl)
        buf = moe_dispatch(x0, ro, impl=impl).detach().requires_grad_()
        loss = (moe_combine(buf, ro, impl=impl) * x0).sum() + 0.5 * buf.pow(2).sum()
        (g,) = torch.autograd.grad(loss, buf, create_graph=True)
        try:
            out[impl] = torch.autograd.grad(g.pow(2).sum(), logits, allow_unused=True)[0]
        except RuntimeError as exc:
            out[impl] = exc
    assert torch.is_tensor(out["reference"]) and out["reference"].abs().sum() > 0
    assert isinstance(out["cpu_native"], RuntimeError)
    assert "apt_kernels.moe_combine" in str(out["cpu_native"]) and NO_DOUBLE in str(out["cpu_native"])


@native
def test_moe_dispatch_double_backward_raises_or_is_right():
    torch.manual_seed(3)
    x0, lg = torch.randn(8, 4), torch.randn(8, 3)
    w = torch.randn(moe_route(lg, 2, 2.0, 4, None, impl="reference").buffer_shape(4))
    res = {}
    for impl in ("reference", "cpu_native"):
        ro = moe_route(lg, 2, 2.0, 4, None, impl=impl)
        res[impl] = _second_order(lambda x: (moe_dispatch(x, ro, impl=impl) * w).sum() + x.pow(3).sum(), x0)
    _raises_or_matches(res["cpu_native"], res["reference"])


@native
@pytest.mark.parametrize("padded", [False, True])
def test_running_mean_double_backward_is_right(padded):
    """running_mean is linear: with create_graph its backward runs in torch ops, so second derivatives are right,
    with a constant incoming gradient and with one that requires grad."""
    torch.manual_seed(4)
    x0 = torch.randn(2, 7, 3)
    mask = (torch.rand(2, 7) > 0.7) if padded else None
    w = torch.randn(2, 7, 3)
    res = {}
    for name, fn in (("reference", running_mean_ref), ("native", running_mean_native)):
        res[name] = _second_order(lambda x: (fn(x, mask) * w).sum() + x.pow(3).sum(), x0)
        assert not isinstance(res[name][1], RuntimeError)
    _raises_or_matches(res["native"], res["reference"])
    res = {}
    for name, fn in (("reference", running_mean_ref), ("native", running_mean_native)):
        res[name] = _second_order(lambda x: fn(x, mask).pow(2).sum(), x0)  # grad_out depends on x
    _raises_or_matches(res["native"], res["reference"])


@native
def test_first_order_unchanged_without_create_graph():
    """No create_graph: plain gradients, no error node, the same values as with create_graph."""
    torch.manual_seed(5)
    q0, k0, v0 = (torch.randn(1, 2, 5, 16) for _ in range(3))
    q = q0.clone().requires_grad_()
    (g,) = torch.autograd.grad(tva_attention(q, k0, v0, impl="cpu_native").pow(2).sum(), q)
    assert g.grad_fn is None and not g.requires_grad
    (g2,) = torch.autograd.grad(tva_attention(q, k0, v0, impl="cpu_native").pow(2).sum(), q, create_graph=True)
    assert g2.grad_fn is not None
    torch.testing.assert_close(g2.detach(), g, rtol=0, atol=0)


def test_no_double_backward_helper():
    """The error node sits between the gradients and what they depend on: torch.autograd.grad(..., inputs=[q])
    reaches it (it is not pruned as a node over detached fake leaves would be)."""
    a, q = torch.randn(3), torch.randn(3, requires_grad=True)
    with torch.enable_grad():
        g, none = no_double_backward("some_op", (a, None), (q * 2, None, torch.ones(2)))
        assert no_double_backward("some_op", (a, None), (torch.ones(2),))[0] is a  # nothing to depend on
    assert none is None and g.requires_grad
    torch.testing.assert_close(g.detach(), a, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="apt_kernels.some_op: the native kernels have no double backward"):
        torch.autograd.grad(g.sum() + q.sum(), q)
    assert "reference provider" in double_backward_message("x")


# ---- torch.func ------------------------------------------------------------------------------------------------

@native
@pytest.mark.parametrize("padded", [False, True])
def test_running_mean_torch_func_grad(padded):
    torch.manual_seed(6)
    x0 = torch.randn(2, 6, 4)
    mask = (torch.rand(2, 6) > 0.7) if padded else None

    def f(x):
        return running_mean_native(x, mask).pow(2).sum()

    g, val = grad_and_value(f)(x0)
    x = x0.clone().requires_grad_()
    loss = f(x)
    (ref,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(val, loss.detach(), atol=0, rtol=0)
    # a second level (grad of grad) runs through the torch formula too
    gg = grad(lambda x: grad(f)(x).pow(2).sum())(x0)
    x = x0.clone().requires_grad_()
    (g1,) = torch.autograd.grad(f(x), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g1.pow(2).sum(), x)
    torch.testing.assert_close(gg, gg_ref, atol=1e-5, rtol=1e-4)


@native
def test_running_mean_vmap_raises_clearly():
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(running_mean_native)(torch.randn(2, 2, 5, 3))


@native
def test_tva_layer_torch_func_grad_reference_core():
    """The TVA layer (reference core, native running_mean for its gate) under torch.func.grad: as autograd."""
    from apt_kernels.layers.tva import TVAAttention

    torch.manual_seed(7)
    layer = TVAAttention(16, 2, core="reference")
    x = torch.randn(2, 5, 16)

    def loss(p):
        return functional_call(layer, p, (x,)).pow(2).sum()

    g = grad(loss)({n: p.detach() for n, p in layer.named_parameters()})
    ref = torch.autograd.grad(loss(dict(layer.named_parameters())), list(layer.parameters()))
    for (name, _), r in zip(layer.named_parameters(), ref):
        torch.testing.assert_close(g[name], r, atol=1e-5, rtol=1e-4, msg=name)


@native
def test_native_functions_under_torch_func_raise_clearly():
    torch.manual_seed(8)
    q = torch.randn(3, 1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="vmap"):  # torch's own message about the missing vmap rule
        vmap(lambda a: tva_attention(a, a, a, impl="cpu_native"))(q)
    with pytest.raises(RuntimeError, match="torch.func"):
        grad(lambda a: tva_attention(a, a, a, impl="cpu_native").sum())(q[0])
    u, A, B, C = torch.randn(1, 3, 6), -torch.rand(3, 2), torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    with pytest.raises(RuntimeError, match="apt_kernels.selective_scan.*torch.func"):
        grad(lambda dt: selective_scan_cpu(u, dt, A, B, C, delta_softplus=True).sum())(torch.rand(1, 3, 6))
    moe = MoEFFN(8, 16, 4, k=2, capacity_factor=2.0, router_impl="cpu_native")
    xm = torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="apt_kernels.moe_.*torch.func"):
        grad(lambda p: functional_call(moe, p, (xm,))[0].sum())({n: p.detach() for n, p in moe.named_parameters()})


# ---- MoE dropless under autocast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_ffn_under_autocast_matches_plain_torch(activation):
    torch.manual_seed(9)
    e, c, f, m = 3, 8, 12, 10
    offsets = torch.tensor([0, 4, 4, 10])
    leaves = [torch.randn(m, c), torch.randn(e, c, f) / 3, torch.randn(e, c, f) / 3 if activation == "swiglu"
              else None, torch.randn(e, f, c) / 3]
    go = torch.randn(m, c)
    results = []
    for fn in (lambda *a: moe_grouped_ffn(a[0], offsets, *a[1:], activation=activation),
               lambda *a: moe_grouped_ffn_ref(a[0], offsets, *a[1:])):
        ts = [t.clone().requires_grad_() if t is not None else None for t in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(*ts)
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y, [t for t in ts if t is not None], go.to(y.dtype))
        assert all(g.dtype == torch.float32 for g in grads)  # fp32 leaves get fp32 gradients, as through autocast
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, atol=5e-2, rtol=3e-2)


@pytest.mark.parametrize("router", ["reference", "cpu_native"])
def test_moe_dropless_training_under_autocast(router):
    """Dropless (capacity_factor=None) forward and backward under CPU bf16 autocast (the backward raised 'expected
    scalar type Float but found BFloat16'); equal within bf16 to the capacity path with a capacity that drops
    nothing (same routing, same experts)."""
    if router == "cpu_native" and not native_status()[0]:
        pytest.skip(native_status()[1])
    torch.manual_seed(10)
    n, d, e, k = 12, 16, 4, 2
    x0 = torch.randn(n, d)
    outs = []
    for cf in (None, float(e)):  # capacity e * k * n / e = k * n >= any expert's count: nothing dropped
        torch.manual_seed(11)
        moe = MoEFFN(d, 32, e, k=k, capacity_factor=cf, router_impl=router)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = moe(x)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        outs.append((y.detach().float(), x.grad, {name: p.grad for name, p in moe.named_parameters()}))
    (y, gx, gp), (y_cap, gx_cap, gp_cap) = outs
    torch.testing.assert_close(y, y_cap, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(gx, gx_cap, atol=5e-2, rtol=5e-2)
    for name, g in gp.items():
        assert g is not None and g.dtype == torch.float32, name
        torch.testing.assert_close(g, gp_cap[name], atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.slow
def test_moe_dropless_autocast_compiles():
    """A dropless training step under autocast through torch.compile(backend='aot_eager'), as eager."""
    torch.manual_seed(12)
    moe = MoEFFN(16, 32, 4, k=2, capacity_factor=None, router_impl="reference")
    x0 = torch.randn(10, 16)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(x)
        return y.float().pow(2).sum()

    res = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        res.append((loss.detach(), x.grad, [p.grad.clone() for p in moe.parameters()]))
    (l0, gx0, gp0), (l1, gx1, gp1) = res
    torch.testing.assert_close(l1, l0, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gx1, gx0, atol=2e-2, rtol=2e-2)
    for a, b in zip(gp1, gp0):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
