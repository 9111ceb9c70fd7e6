"""Low-precision accuracy, the flash-attn / mamba-ssm way: run the provider in fp16/bf16, run the reference on the
same low-precision inputs (it computes in fp32 and rounds its results: the error a correct fp32-accumulating
kernel cannot avoid), and compute the truth in float64 from the same rounded inputs. For the output AND every
gradient, the provider's max and mean error against the truth must be at most ``LOWP_FACTOR`` times the
reference's (plus an fp32-level epsilon; both in apt_kernels/testing.py). Unlike the tolerance table (where a 10x
worse kernel still passes), this catches an accumulator or state kept in the input dtype, a lost fp32 upcast, or
a gradient summed in bf16."""
from __future__ import annotations

import pytest
import torch

from apt_kernels.backends import native_family_status, native_status
from apt_kernels.testing import assert_lowp_accurate, assert_lowp_pipeline

LOWP = [torch.bfloat16, torch.float16]
pytestmark = [pytest.mark.native, pytest.mark.skipif(not native_status()[0], reason="apt_kernels._C is not built")]


# ----------------------------------------------------------------------------------------------------------- scan
def _scan_cpu_ok():
    from apt_kernels.ops.scan import cpu_status
    return cpu_status()


scan_ok = pytest.mark.skipif(not _scan_cpu_ok()[0], reason=_scan_cpu_ok()[1] or "native scan unavailable")


@scan_ok
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("L,N,lb,lc,G,opts", [
    (37, 8, "var", "var", 1, True), (37, 8, "group", "group", 3, True), (37, 8, "const", "var", 1, False),
    (1, 16, "var", "var", 1, True), (65, 16, "var", "const", 1, True), (300, 16, "group", "var", 2, True)])
def test_scan_cpu_lowp(dtype, L, N, lb, lc, G, opts):
    from apt_kernels.ops.scan import selective_scan_cpu
    from apt_kernels.reference.scan import random_scan_inputs, selective_scan_ref
    x = random_scan_inputs(2, 6, L, N, layout_B=lb, layout_C=lc, groups=G, dtype=dtype, with_D=opts, with_z=opts,
                           with_bias=opts, generator=torch.Generator().manual_seed(L + N))
    assert_lowp_pipeline(lambda a: selective_scan_cpu(**a, delta_softplus=opts),
                   lambda a: selective_scan_ref(**a, delta_softplus=opts), x, list(x), x["u"].shape, dtype)


@scan_ok
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("state_fp32", [False, True])
@pytest.mark.parametrize("layout", ["var", "group"])
def test_state_update_cpu_lowp(dtype, state_fp32, layout):
    """16 decode steps, the state carried in its dtype by each implementation."""
    from apt_kernels.ops.scan import selective_state_update_cpu
    from apt_kernels.reference.scan import selective_state_update_ref
    g = torch.Generator().manual_seed(3)
    b, dim, N, sdt = 3, 6, 16, (torch.float32 if state_fp32 else dtype)
    st0 = torch.randn(b, dim, N, generator=g).to(sdt)
    A = -torch.rand(dim, N, generator=g) * 2 - 0.1
    D, bias = torch.randn(dim, generator=g), torch.rand(dim, generator=g) - .5
    bc = ((lambda: torch.randn(b, N, generator=g).to(dtype)) if layout == "var"
          else (lambda: torch.randn(b, 3, N, generator=g)))
    steps = [(torch.randn(b, dim, generator=g).to(dtype), (torch.rand(b, dim, generator=g) * .5).to(dtype), bc(), bc(),
              torch.randn(b, dim, generator=g).to(dtype)) for _ in range(16)]

    def go(fn, wide):
        s, ys = st0.clone().to(torch.float64 if wide else sdt), []
        c = (lambda t: t.double()) if wide else (lambda t: t)
        for x, dt, B, C, z in steps:
            ys.append(fn(s, c(x), c(dt), c(A), c(B), c(C), c(D), c(z), c(bias), True))
        return torch.stack(ys), s
    (yt, st), (yk, sk), (yr, sr) = go(selective_state_update_ref, True), go(selective_state_update_cpu, False), \
        go(selective_state_update_ref, False)
    assert_lowp_accurate("y", yk, yr, yt)
    assert_lowp_accurate("state", sk, sr, st)


# ------------------------------------------------------------------------------------------------------------ tva
@pytest.mark.skipif(not native_family_status("tva")[0], reason="native tva unavailable")
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", [(2, 2, 131, 131, 24), (1, 2, 1, 150, 32), (1, 2, 37, 100, 64)])
@pytest.mark.parametrize("causal,window,sinks,pad", [(True, None, 0, True), (True, 9, 2, True),
                                                     (False, 17, 1, True), (False, 5, 40, False)])
def test_tva_cpu_lowp(dtype, shape, causal, window, sinks, pad):
    from apt_kernels.ops.tva import tva_attention_cpu
    from apt_kernels.reference.tva import random_tva_inputs, tva_attention_ref
    B, H, Tq, Tk, D = shape
    inp = random_tva_inputs(B=B, H=H, Tq=Tq, Tk=Tk, D=D, pad=pad, coef_tensor=True, dtype=dtype, seed=Tq + 1)
    kw = dict(causal=causal, window=window, sinks=sinks)
    assert_lowp_pipeline(lambda a: tva_attention_cpu(**a, **kw), lambda a: tva_attention_ref(**a, **kw), inp,
                   ["q", "k", "v", "delta", "gate", "coef"], (B, H, Tq, D), dtype)


@pytest.mark.skipif(not native_family_status("tva")[0], reason="native tva unavailable")
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("Tq,Tk,window,pad", [(50, 50, None, True), (3, 70, 8, False)])
def test_tva_cpu_lowp_dominant_perturbation(dtype, Tq, Tk, window, pad):
    """A perturbation ~40x the attention part: dq/dk come from Di = Σ dO·A, and A recovered as o - coef·gate·delta
    from the rounded o kept only o's digits (bf16 dq 10% off, the reference 0.4%); the kernel saves A."""
    from apt_kernels.ops.tva import tva_attention_cpu
    from apt_kernels.reference.tva import (check_grads_ignore_the_perturbation, dominant_perturbation_inputs,
                                           tva_attention_ref)
    inp = dominant_perturbation_inputs(B=2, H=2, Tq=Tq, Tk=Tk, D=32, pad=pad, dtype=dtype)
    kw = dict(causal=True, window=window, sinks=1 if window else 0)
    assert_lowp_pipeline(lambda a: tva_attention_cpu(**a, **kw), lambda a: tva_attention_ref(**a, **kw), inp,
                         ["q", "k", "v", "delta", "gate", "coef"], (2, 2, Tq, 32), dtype)
    check_grads_ignore_the_perturbation(tva_attention_cpu, inp, **kw)


# ------------------------------------------------------------------------------------------------------------ moe
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("logits_fp32", [False, True])
@pytest.mark.parametrize("n,e,k,cf,kind", [(77, 8, 2, None, "random"), (257, 8, 4, 0.5, "equal"),
                                           (300, 8, 2, 1.25, "dup")])
def test_moe_cpu_native_lowp(dtype, logits_fp32, n, e, k, cf, kind):
    from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route
    from apt_kernels.reference.moe import check_same_routing, random_router_logits
    g = torch.Generator().manual_seed(n)
    inputs = {"logits": random_router_logits(n, e, kind, seed=n + e).to(torch.float32 if logits_fp32 else dtype),
              "x": torch.randn(n, 64, generator=g).to(dtype)}
    routings = []

    def pipeline(impl):
        def fn(a):
            r = moe_route(a["logits"], k, cf, min_capacity=2, impl=impl)
            routings.append(r)
            buf = moe_dispatch(a["x"], r, impl=impl)
            scale = torch.linspace(-1.5, 1.5, buf[..., 0].numel()).view(buf[..., :1].shape).to(buf.dtype)
            return moe_combine(buf * scale, r, impl=impl)
        return fn
    assert_lowp_pipeline(pipeline("cpu_native"), pipeline("reference"), inputs, ["logits", "x"], (n, 64), dtype)
    truth, kern, ref = routings
    check_same_routing(kern, ref)                      # identical decisions in the low-precision dtype
    assert torch.equal(kern.expert_idx, truth.expert_idx)  # and the fp64 truth routed alike (comparison meaningful)


# ------------------------------------------------------------------------------------------------- running_mean
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("T,pad", [(64, True), (2048, True), (4096, False)])
def test_running_mean_native_lowp(dtype, T, pad):
    from apt_kernels.ops.running_mean import running_mean_native
    from apt_kernels.reference.common import running_mean_ref
    g = torch.Generator().manual_seed(T)
    kpm = (torch.rand(2, T, generator=g) < 0.2) if pad else None
    inputs = {"x": (torch.randn(2, T, 16, generator=g) + 3).to(dtype)}
    assert_lowp_pipeline(lambda a: running_mean_native(a["x"], kpm), lambda a: running_mean_ref(a["x"], kpm), inputs,
                   ["x"], (2, T, 16), dtype)


# ------------------------------------------------------------------------------ the criterion has teeth (self-test)
@pytest.mark.parametrize("dtype", LOWP)
def test_criterion_rejects_state_in_input_dtype(dtype):
    """A scan whose recurrence runs in the input dtype (the mistake mamba_ssm's fp32 state avoids) passes the
    tolerance table but not this criterion."""
    from apt_kernels.reference.scan import random_scan_inputs, selective_scan_ref
    x = random_scan_inputs(2, 5, 29, 8, dtype=dtype, generator=torch.Generator().manual_seed(7))

    def lowp_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        A, D, delta_bias = A.to(u.dtype), D.to(u.dtype), delta_bias.to(u.dtype)
        dt = delta + delta_bias[:, None]
        dt = torch.nn.functional.softplus(dt) if delta_softplus else dt
        h, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
        for t in range(u.shape[-1]):
            h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * B[:, None, :, t]
            ys.append((h * C[:, None, :, t]).sum(-1))
        return (torch.stack(ys, -1) + u * D[:, None]) * torch.nn.functional.silu(z)
    with pytest.raises(AssertionError, match="x the low-precision"):
        assert_lowp_pipeline(lambda a: lowp_scan(**a, delta_softplus=True),
                       lambda a: selective_scan_ref(**a, delta_softplus=True), x, list(x), x["u"].shape, dtype)
