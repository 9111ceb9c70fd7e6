"""cpu_native selective scan (csrc/scan/scan_cpu.cpp) vs the reference: forward, every gradient, decode step,
layouts, dtypes, strides, chunk boundaries, long sequences; custom-op checks; dispatch; bad input."""
from __future__ import annotations

import logging

import pytest
import torch

import apt_kernels.ops.scan as scan_ops
from apt_kernels import selective_scan_fn, selective_state_update
from apt_kernels.ops.scan import cpu_status, selective_scan_cpu, selective_state_update_cpu
from apt_kernels.reference.scan import SCAN_CASES as CASES
from apt_kernels.reference.scan import (check_empty_scan, check_scan_against_reference as check_against_reference,
                                       check_scan_then_decode, check_state_update_against_reference,
                                       check_wide_delta_next_to_half_u, random_scan_inputs, selective_scan_ref,
                                       selective_state_update_ref)
from apt_kernels.testing import assert_close

pytestmark = [pytest.mark.native, pytest.mark.skipif(not cpu_status()[0], reason=cpu_status()[1] or "n/a")]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N", [16, 5])
def test_cpu_matches_reference(case, N, monkeypatch):
    lb, lc, D, z, bias, sp = case
    monkeypatch.setattr(scan_ops, "CHUNK", 8)  # several checkpoints, and a ragged last chunk
    x = random_scan_inputs(2, 6, 37, N, layout_B=lb, layout_C=lc, groups=3, with_D=D, with_z=z, with_bias=bias,
                           generator=torch.Generator().manual_seed(N))
    check_against_reference(selective_scan_cpu, x, softplus=sp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N", [8, 3, 64])
def test_cpu_dtypes(dtype, N):
    x = random_scan_inputs(2, 5, 29, N, layout_B="group", layout_C="var", groups=5, dtype=dtype,
                           generator=torch.Generator().manual_seed(7))
    check_against_reference(selective_scan_cpu, x, softplus=True)


@pytest.mark.parametrize("L", [1, 2, 65])
def test_cpu_short_and_chunk_edges(L):
    x = random_scan_inputs(1, 3, L, 4, generator=torch.Generator().manual_seed(L))
    check_against_reference(selective_scan_cpu, x, softplus=True)


def test_cpu_long_sequence():
    """L = 2048 (32 checkpoints of 64 steps) stays within fp32 tolerance of the fp64 reference."""
    x = random_scan_inputs(1, 3, 2048, 16, layout_B="var", layout_C="var", generator=torch.Generator().manual_seed(9))
    check_against_reference(selective_scan_cpu, x, softplus=True)


def test_cpu_non_contiguous():
    g = torch.Generator().manual_seed(11)
    x = random_scan_inputs(2, 6, 13, 4, layout_B="group", layout_C="var", groups=2, generator=g)
    # (batch, L, dim) storage seen as (batch, dim, L); B/C with a padded N axis
    for k in ("u", "delta", "z"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    x["B"] = torch.randn(2, 2, 8, 13, generator=g)[:, :, ::2]
    x["C"] = torch.randn(2, 13, 4, generator=g).transpose(1, 2)
    x["A"] = (-torch.rand(4, 6, generator=g)).t()
    x["D"] = torch.randn(12, generator=g)[::2]
    assert not any(x[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "A", "D"))
    check_against_reference(selective_scan_cpu, x, softplus=True)


def test_cpu_mixed_dtypes():
    """mamba_ssm-style mixed dtypes: bf16 u/delta/z/B/C with fp32 A, D, delta_bias; fp32 delta with fp16 u."""
    x = random_scan_inputs(2, 4, 21, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(12))
    assert x["A"].dtype == torch.float32
    check_against_reference(selective_scan_cpu, x, softplus=True)
    x = random_scan_inputs(1, 4, 9, 4, dtype=torch.float16, generator=torch.Generator().manual_seed(13))
    x["delta"] = x["delta"].float()
    check_against_reference(selective_scan_cpu, x, softplus=True, dtype=torch.float16)


ISAS = ["generic", "avx2", "avx512"]  # APT_SCAN_CPU_ISA caps the kernel build used (to what the CPU runs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch,dim,L,N,groups", [
    (2, 7, 70, 16, 1),    # odd dim, L with a ragged last chunk and a remainder of the 8-step lane reduction
    (1, 1, 9, 16, 1),     # dim = 1
    (3, 6, 131, 32, 3),   # N = 32 (several vectors per step), groups, rows split across threads
    (2, 3, 70, 64, 1),    # N = 64 and 128 (Mamba-2 sizes): compiled N, the state in several vectors
    (1, 2, 66, 128, 2),
    (2, 4, 67, 8, 2),     # N = 8: 8 lanes in every build
    (2, 3, 66, 12, 1),    # N = 12: 4 lanes
    (1, 2, 40, 5, 1),     # runtime N: one lane
])
def test_cpu_lane_layouts_and_isas(isa, batch, dim, L, N, groups, monkeypatch):
    """The per-step dot products are kept as W-lane partial sums (W = 16, 8, 4 or 1 by N and the build) and reduced
    8 steps at a time: every W, chunk tails, and every kernel build this CPU runs, forward and all gradients."""
    monkeypatch.setenv("APT_SCAN_CPU_ISA", isa)
    x = random_scan_inputs(batch, dim, L, N, layout_B="group" if groups > 1 else "var", layout_C="var",
                           groups=groups, generator=torch.Generator().manual_seed(L + N))
    check_against_reference(selective_scan_cpu, x, softplus=True)
    x = random_scan_inputs(batch, dim, L, N, layout_B="const", layout_C="group" if groups > 1 else "const",
                           groups=groups, with_z=False, with_bias=False, generator=torch.Generator().manual_seed(L))
    check_against_reference(selective_scan_cpu, x, softplus=False)


def test_cpu_extreme_delta():
    """softplus(delta) for huge |delta| (the vectorised softplus, and exp of very negative dt * A) stays finite."""
    x = random_scan_inputs(1, 4, 20, 16, generator=torch.Generator().manual_seed(3))
    x["delta"] = x["delta"] * 0 + torch.tensor([-1e30, -50.0, 30.0, 1e20]).view(1, 4, 1)
    y = selective_scan_cpu(**x, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), family="scan")


def test_cpu_without_last_state_and_no_grad_inputs():
    x = random_scan_inputs(2, 4, 17, 8, generator=torch.Generator().manual_seed(14))
    y = selective_scan_cpu(**x, delta_softplus=True)
    assert isinstance(y, torch.Tensor)
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), family="scan")
    u = x["u"].clone().requires_grad_()
    out = selective_scan_cpu(**{**x, "u": u}, delta_softplus=True)
    out.sum().backward()
    u2 = x["u"].clone().requires_grad_()
    selective_scan_ref(**{**x, "u": u2}, delta_softplus=True).sum().backward()
    assert_close(u.grad, u2.grad, family="scan", grad=True)


@pytest.mark.parametrize("lb,lc", [("var", "var"), ("group", "var")])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16), (torch.float64, torch.float64)])
def test_cpu_state_update_matches_reference(lb, lc, dtype, state_dtype):
    check_state_update_against_reference(selective_state_update_cpu, 16, lb, lc, dtype, state_dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("N", [16, 8, 12, 5, 32, 64, 128])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_cpu_state_update_lanes_tiles_and_isas(isa, N, dtype, state_dtype, monkeypatch):
    """The decode step in tiles of 64 rows (dim 135: two full tiles and a ragged one; at N 16 dim 2049, whose
    2 x 2049 x 16 states take the multi-threaded path) with W-lane partial sums (W = 16, 8, 4 or 1 by N and the
    build), in every build this CPU runs; contiguous and strided states, in and not in the accumulation dtype."""
    monkeypatch.setenv("APT_SCAN_CPU_ISA", isa)
    check_state_update_against_reference(selective_state_update_cpu, N, "group", "var", dtype, state_dtype, seed=N,
                                         batch=2, dim=2049 if N == 16 else 135)


def test_cpu_chunked_scan_carries_state():
    """Scanning the first part, then decoding the rest step by step from the returned state, equals one whole scan."""
    x = random_scan_inputs(2, 4, 30, 8, layout_B="group", layout_C="var", groups=2,
                           generator=torch.Generator().manual_seed(16))
    check_scan_then_decode(selective_scan_cpu, selective_state_update_cpu, x, 19)


def test_cpu_opcheck_and_compile():
    x = random_scan_inputs(2, 4, 9, 4, generator=torch.Generator().manual_seed(17))
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, 4)
    torch.library.opcheck(torch.ops.apt.selective_scan_fwd.default, args)
    targs = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.apt.selective_scan_fwd.default, targs)
    s = torch.randn(2, 4, 4)
    torch.library.opcheck(torch.ops.apt.selective_state_update.default,
                          (s, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"],
                           None, None, True))
    f = torch.compile(selective_scan_cpu, backend="eager", fullgraph=True)
    assert_close(f(**x), selective_scan_ref(**x), family="scan")


def test_dispatch_picks_cpu_native(caplog):
    x = random_scan_inputs(1, 2, 5, 4, generator=torch.Generator().manual_seed(18))
    with caplog.at_level(logging.DEBUG, logger="apt_kernels.ops.scan"):
        y = selective_scan_fn(**x)
        s = torch.zeros(1, 2, 4)
        selective_state_update(s, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])
    assert "selective_scan_fn: using cpu_native" in caplog.text
    assert "selective_state_update: using cpu_native" in caplog.text
    assert_close(y, selective_scan_ref(**x), family="scan")
    y0 = selective_scan_fn(**{k: (v[..., :0] if v.dim() >= 3 else v) for k, v in x.items()})
    assert y0.shape == (1, 2, 0)


def test_provider_cpu_native():
    from apt.core import registry

    info = registry.get_info("scan", "cpu_native")
    assert info.available and info.priority == 10
    prov = registry.get("scan", "cpu_native")
    x = random_scan_inputs(1, 3, 6, 4, generator=torch.Generator().manual_seed(19))
    assert_close(prov.selective_scan_fn(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True),
                 family="scan")
    assert prov.supports(**x) == []
    assert any("u: meta tensor" in r for r in prov.supports(u=torch.empty(1, 2, 3, device="meta")))
    assert registry.select("scan", **x).name == "cpu_native"


def test_bad_input_is_a_clear_error():
    x = random_scan_inputs(2, 4, 5, 3)
    with pytest.raises(ValueError, match=r"B: expected shape \(2, 3, 5\)"):
        selective_scan_fn(**{**x, "B": torch.randn(2, 3, 6)})
    with pytest.raises(ValueError, match=r"C: number of groups 3"):
        selective_scan_cpu(**{**x, "C": torch.randn(2, 3, 3, 5)})
    with pytest.raises(TypeError, match=r"u: expected dtype in"):
        selective_scan_cpu(**{**x, "u": x["u"].int()})


def test_native_module_checks_its_inputs():
    from apt_kernels._native import native_module, view

    m = native_module()
    u = torch.randn(2, 4, 5)
    A, B = torch.randn(4, 3), torch.randn(2, 1, 5, 3)
    out, last, ck = torch.empty_like(u), torch.empty(2, 4, 3), torch.empty(2, 4, 1, 3)
    ok = [view(u), view(u), view(A), view(B), view(B), None, None, None, view(out), view(last), view(ck), False, 64]
    m.selective_scan_fwd_cpu(*ok)  # the well-formed call works
    bad = list(ok)
    bad[3] = view(torch.randn(2, 1, 5, 4))
    with pytest.raises(ValueError, match="B: expected size 3 in dim 3"):
        m.selective_scan_fwd_cpu(*bad)
    bad = list(ok)
    bad[2] = view(A.double())
    with pytest.raises(TypeError, match="A: expected dtype float32"):
        m.selective_scan_fwd_cpu(*bad)
    bad = list(ok)
    bad[3] = view(torch.randn(2, 5, 3).transpose(1, 2)[:, None])
    with pytest.raises(ValueError, match="B: expected"):
        m.selective_scan_fwd_cpu(*bad)
    bad = list(ok)
    bad[10] = view(torch.empty(2, 4, 2, 3))
    with pytest.raises(ValueError, match="checkpoints: expected size 1 in dim 2"):
        m.selective_scan_fwd_cpu(*bad)
    bad = list(ok)
    bad[12] = 0
    with pytest.raises(ValueError, match="chunk: expected >= 1"):
        m.selective_scan_fwd_cpu(*bad)
    bad = list(ok)
    bad[4] = view(torch.randn(2, 3, 5, 3))
    with pytest.raises(ValueError, match="C: number of groups 3 must divide dim=4"):
        m.selective_scan_fwd_cpu(*bad)


def test_cpu_fp32_delta_next_to_half_u_is_not_rounded():
    """An fp32 delta/z (and decode dt) next to fp16 u/x is used at fp32, as the reference does. It used to be rounded
    to fp16 first: the fp32 last state was then 3e-4 off the reference on the same inputs."""
    for scan, step in ((selective_scan_cpu, selective_state_update_cpu), (selective_scan_fn, selective_state_update)):
        check_wide_delta_next_to_half_u(scan, step)


@pytest.mark.parametrize("batch,dim,N", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_cpu_empty_batch_dim_or_state(batch, dim, N):
    """Zero batch, dim or N: empty outputs as the reference gives, and a working backward (the native checks used to
    reject torch's strides of empty tensors as non-contiguous)."""
    for scan, step in ((selective_scan_cpu, selective_state_update_cpu), (selective_scan_fn, selective_state_update)):
        check_empty_scan(scan, step, batch, dim, N)


def test_cpu_zero_length_scan_backward():
    """L = 0 with neither D nor z: y is empty but still part of the graph, so backward works (it did not)."""
    u = torch.randn(2, 3, 0, requires_grad=True)
    for fn in (selective_scan_cpu, selective_scan_fn, selective_scan_ref):
        y = fn(u, u, -torch.rand(3, 2), torch.randn(2, 2, 0), torch.randn(2, 2, 0))
        y.sum().backward()
        assert u.grad.shape == u.shape


def test_dispatch_compiles_fullgraph():
    """selective_scan_fn and selective_state_update trace whole (their debug log of the choice is skipped while
    compiling: dynamo cannot trace a logger call)."""
    x = random_scan_inputs(2, 4, 9, 4, generator=torch.Generator().manual_seed(33))
    f = torch.compile(selective_scan_fn, backend="eager", fullgraph=True)
    assert_close(f(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True), family="scan")
    s = torch.randn(2, 4, 4)
    sr = s.clone()
    step = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"])
    g = torch.compile(selective_state_update, backend="eager", fullgraph=True)
    assert_close(g(s, *step), selective_state_update_ref(sr, *step), family="scan")
    assert_close(s, sr, family="scan")


@pytest.mark.parametrize("layout", ["channels", "channels_transposed", "heads"])
def test_decode_step_compiles_with_dynamic_batch(layout):
    """A decode loop whose batch changes compiles as one dynamic graph: the in-place state's overlap check sorted
    symbolic strides with sorted(), which dynamo refuses (a graph break, an error under fullgraph)."""
    g = torch.compile(selective_state_update, backend="eager", fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(5)
    for b in (2, 3, 5):
        r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        if layout == "heads":
            s, step = r(b, 2, 3, 4), (r(b, 2, 3), r(b, 2, 3).sigmoid(), -r(2, 3, 4).exp(), r(b, 1, 4), r(b, 1, 4))
        else:
            s = r(b, 4, 3).transpose(1, 2) if layout == "channels_transposed" else r(b, 3, 4)
            step = (r(b, 3), r(b, 3).sigmoid(), -r(3, 4).exp(), r(b, 4), r(b, 4))
        sr = s.clone()
        assert_close(g(s, *step), selective_state_update(sr, *step), family="scan")
        assert_close(s, sr, family="scan")
    bad = torch.zeros(1, 1, 3, 1).expand(5, 2, 3, 4) if layout == "heads" else torch.zeros(1, 3, 1).expand(5, 3, 4)
    # the check still runs on the traced shapes (fullgraph turns the ValueError into dynamo's Unsupported)
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="state: is updated in place"):
        g(bad, *step)


def test_decode_step_with_inputs_that_require_grad():
    """The fast decode steps have no backward: selective_state_update takes the reference for inputs that require
    grad (a backward then works); the explicit cpu step raises naming the argument; under no_grad it runs."""
    g = torch.Generator().manual_seed(34)
    x, dt = torch.randn(2, 4, generator=g, requires_grad=True), torch.rand(2, 4, generator=g)
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    s0 = torch.randn(2, 4, 3, generator=g)
    s, sr = s0.clone(), s0.clone()
    y = selective_state_update(s, x, dt, A, B, C)  # s is now part of the graph (the reference writes it in place)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(selective_state_update_ref(sr, xr, dt, A, B, C).sum(), [xr])
    assert_close(gx, gr, family="scan", grad=True)
    with pytest.raises(ValueError, match="x: requires grad, but the fast decode steps are inference kernels"):
        selective_state_update_cpu(s0.clone(), x, dt, A, B, C)
    with pytest.raises(ValueError, match="state: requires grad"):
        selective_state_update_cpu(s0.clone().requires_grad_(), x.detach(), dt, A, B, C)
    with torch.no_grad():
        s1, s2 = s0.clone(), s0.clone()
        assert_close(selective_state_update_cpu(s1, x, dt, A, B, C), selective_state_update_ref(s2, x, dt, A, B, C),
                     family="scan")


def test_decode_step_eager_path_skips_the_op_but_not_autograd_or_dispatch_modes(monkeypatch):
    """In plain eager mode the decode step calls its kernel directly (the custom-op dispatch cost ~100 µs a call);
    the in-place write still bumps state's version, so autograd refuses a backward through a value saved before
    it; under a dispatch mode (FlopCounterMode here) and torch.compile the op itself runs."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(35)
    x, dt = torch.randn(2, 4, generator=g), torch.rand(2, 4, generator=g)
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    calls = []
    real = scan_ops._state_update_op
    monkeypatch.setattr(scan_ops, "_state_update_op", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(scan_ops._EAGER_STEPS, scan_ops._state_update_op, {"cpu": scan_ops._state_update_cpu})
    s = torch.randn(2, 4, 3, generator=g)
    w = torch.randn(3, requires_grad=True)
    saved = s * w  # autograd saves s for w's gradient
    v0 = s._version
    with torch.no_grad():
        y = selective_state_update(s, x, dt, A, B, C)
    assert calls == [] and s._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    s2 = torch.randn(2, 4, 3, generator=g)
    with torch.no_grad(), FlopCounterMode(display=False):
        selective_state_update(s2, x, dt, A, B, C)
    assert calls == [1]
    assert y.shape == (2, 4)


def test_scan_eager_path_skips_the_op_but_not_dispatch_modes():
    """In plain eager mode the scan runs its bodies through the providers' autograd.Function (the op's dispatch
    cost ~200 µs of Python per forward and backward); gradients as through the op (compared under FlopCounterMode,
    which sees the op); its backward is once-differentiable."""
    from torch.utils.flop_counter import FlopCounterMode

    x = random_scan_inputs(2, 3, 37, 4, generator=torch.Generator().manual_seed(40))
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if isinstance(v, torch.Tensor)}
    y = selective_scan_cpu(**{**x, **leaves}, delta_softplus=True)
    assert "EagerScan" in y.grad_fn.name()
    with FlopCounterMode(display=False):
        y_op = selective_scan_cpu(**{**x, **leaves}, delta_softplus=True)
    assert "EagerScan" not in y_op.grad_fn.name()
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(41))
    names = list(leaves)
    for a, b, n in zip(torch.autograd.grad(y, [leaves[n] for n in names], go, retain_graph=True),
                       torch.autograd.grad(y_op, [leaves[n] for n in names], go), names):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    go = go.clone().requires_grad_(True)
    (du,) = torch.autograd.grad(y, leaves["u"], go, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        du.sum().backward()


@pytest.mark.parametrize("groups,sliced", [(1, False), (2, False), (4, True)])
def test_decode_step_mamba2_head_layout(groups, sliced):
    """mamba_ssm's Mamba-2 decode layout (state (b, h, p, n), A (h, p, n), B/C (b, g, n), D/dt_bias (h, p)) equals
    the 3-d step run head by head; a state whose head axis cannot merge with its rows is updated in place too."""
    g = torch.Generator().manual_seed(35)
    b, H, P, N = 2, 4, 3, 5
    big = torch.randn(b, 2 * H, P, N, generator=g)
    state = big[:, ::2] if sliced else big[:, :H].clone()
    x, dt, z = (torch.randn(b, H, P, generator=g) for _ in range(3))
    A = (-torch.rand(H, 1, 1, generator=g)).expand(H, P, N)  # Mamba-2 ties A over headdim and N (stride 0)
    B, C = torch.randn(b, groups, N, generator=g), torch.randn(b, groups, N, generator=g)
    D, dt_bias = torch.randn(H, P, generator=g), torch.randn(H, P, generator=g)
    ref_state = state.clone()
    ys = []
    for h in range(H):
        s3 = ref_state[:, h].clone()
        gi = h // (H // groups)
        ys.append(selective_state_update_ref(s3, x[:, h], dt[:, h], A[h].contiguous(), B[:, gi], C[:, gi], D[h],
                                             z[:, h], dt_bias[h], True))
        ref_state[:, h] = s3
    y = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    assert y.shape == (b, H, P)
    assert_close(y, torch.stack(ys, 1), family="scan")
    assert_close(state, ref_state, family="scan")
    if sliced:
        assert_close(big[:, ::2], ref_state, family="scan")  # written through to the caller's storage
    with pytest.raises(ValueError, match=r"A: with a 4-d state .* expected shape \(nheads, headdim, N\)"):
        selective_state_update(state, x, dt, A[:, :, :2], B, C)
    with pytest.raises(ValueError, match="B: ngroups=3 must divide nheads=4"):
        selective_state_update(state, x, dt, A, torch.randn(b, 3, N), C)


@pytest.mark.parametrize("sliced", [False, True])
def test_decode_step_mamba2_head_layout_compiles(sliced):
    """The head layout under torch.compile(fullgraph=True): a sliced head axis was a hard error (a failing view
    tried inside try/except), and with grad and dynamic shapes the backward failed ("modified by an inplace
    operation", a write through a view of the state)."""
    g = torch.Generator().manual_seed(36)
    b, H, P, N = 3, 2, 3, 4
    big = torch.randn(b, 2 * H, P, N, generator=g)
    x, dt, z = (torch.randn(b, H, P, generator=g) for _ in range(3))
    A, B, C = -torch.rand(H, P, N, generator=g), torch.randn(b, 1, N, generator=g), torch.randn(b, 1, N, generator=g)
    D, dt_bias = torch.randn(H, P, generator=g), torch.randn(H, P, generator=g)
    # a sliced head axis of a pool, or a state of its own
    fresh = (lambda: big.clone()[:, ::2]) if sliced else (lambda: big[:, :H].clone())  # noqa: E731
    step = lambda st, *a: selective_state_update(st, *a, dt_softplus=True)  # noqa: E731
    with torch.no_grad():
        want_state, got_state = fresh(), fresh()
        want = step(want_state, x, dt, A, B, C, D, z, dt_bias)
        got = torch.compile(step, backend="eager", fullgraph=True)(got_state, x, dt, A, B, C, D, z, dt_bias)
    assert_close(got, want, family="scan")
    assert_close(got_state, want_state, family="scan")
    params = [t.clone().requires_grad_() for t in (x, dt, A, D, dt_bias)]
    y = step(fresh(), params[0], params[1], params[2], B, C, params[3], z, params[4])
    want_grads = torch.autograd.grad(y.sum(), params)
    torch._dynamo.reset()
    f = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    y = f(fresh(), params[0], params[1], params[2], B, C, params[3], z, params[4])
    for a, w in zip(torch.autograd.grad(y.sum(), params), want_grads):
        assert_close(a, w, family="scan")


def test_decode_step_refuses_a_state_whose_elements_share_memory():
    """An expanded (stride-0) or overlapping state is updated in place: batch 1 read batch 0's new state (y off by
    ~3, silently). Every entry point and the C++ binding refuse it, naming state; a sliced or permuted state whose
    elements are distinct is fine."""
    from apt_kernels import selective_state_update, selective_state_update_cpu, selective_state_update_ref
    from apt_kernels._native import cpu_module, view

    torch.manual_seed(1)
    b, d, N = 2, 4, 3
    args = dict(x=torch.randn(b, d), dt=torch.rand(b, d), A=-torch.rand(d, N), B=torch.randn(b, N),
                C=torch.randn(b, N))
    bad = [torch.zeros(1, d, N).expand(b, d, N), torch.zeros(20).as_strided((b, d, N), (1, 2, 3))]
    for st in bad:
        for fn in (selective_state_update, selective_state_update_cpu, selective_state_update_ref):
            with pytest.raises(ValueError, match="^state: is updated in place"):
                fn(st, **args)
    with pytest.raises(ValueError, match="^state: is updated in place"):  # Mamba-2 head layout
        selective_state_update(torch.zeros(1, 2, 2, N).expand(b, 2, 2, N), x=args["x"].view(b, 2, 2),
                               dt=args["dt"].view(b, 2, 2), A=args["A"].view(2, 2, N), B=args["B"][:, None],
                               C=args["C"][:, None])
    y = torch.empty(b, d)
    pack = lambda m: m[:, None, None].contiguous()  # noqa: E731 (batch, N) -> packed (batch, 1, 1, N)
    with pytest.raises(ValueError, match="state: is updated in place"):
        cpu_module().selective_state_update_cpu(view(bad[0]), view(args["x"]), view(args["dt"]), view(args["A"]),
                                                view(pack(args["B"])), view(pack(args["C"])), None, None, None,
                                                view(y), False)
    ok = torch.zeros(d, b, 2 * N).permute(1, 0, 2)[:, :, ::2]  # strided, transposed, distinct elements
    want = torch.zeros(b, d, N)
    assert_close(selective_state_update_cpu(ok, **args), selective_state_update_ref(want, **args), family="scan")
    assert_close(ok, want, family="scan")


def test_fp64_state_with_fp32_inputs_matches_reference():
    """An fp64 decode state next to fp32 inputs is updated in fp64, as the reference does, not rounded through fp32
    on every step."""
    from apt_kernels.reference.scan import selective_state_update_ref

    g = torch.Generator().manual_seed(0)
    b, dim, N = 2, 4, 16
    st = torch.randn(b, dim, N, generator=g, dtype=torch.float64)
    x, dt = torch.randn(b, dim, generator=g), torch.rand(b, dim, generator=g)
    A, B, C = -torch.rand(dim, N, generator=g), torch.randn(b, N, generator=g), torch.randn(b, N, generator=g)
    ref = st.clone()
    y_ref = selective_state_update_ref(ref, x, dt, A, B, C)
    for fn in (selective_state_update_cpu, selective_state_update):
        s = st.clone()
        y = fn(s, x, dt, A, B, C)
        torch.testing.assert_close(s, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(y, y_ref)
