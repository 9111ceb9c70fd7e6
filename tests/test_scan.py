"""Selective scan (SCAN.md): the reference vs an independent closed-form formulation, gradcheck in float64 for
every B/C layout, bad-input errors, and every provider (cpu_native, ...) vs the reference, forward and backward."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from apt_kernels.reference.scan import (random_scan_inputs, selective_scan_ref, selective_state_update_ref)
from apt_kernels.testing import assert_close

LAYOUTS = ["const", "var", "group"]


def closed_form_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """h_t = sum_{s<=t} exp(A * (S_t - S_s)) dt_s B_s u_s with S the cumulative sum of dt: no recurrence, explicit
    group indexing, float64. Returns (y, last_state)."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, L = u.shape
    N = A.shape[1]
    dt = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    if delta_softplus:
        dt = torch.log1p(torch.exp(dt))
    S = torch.cumsum(dt, -1)  # (b, d, L)

    def per_channel(M):  # -> (b, d, N, L)
        M = M.double()
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, N, L)
        if M.dim() == 3:
            return M[:, None].expand(batch, dim, N, L)
        G = M.shape[1]
        idx = torch.tensor([d // (dim // G) for d in range(dim)])
        return M[:, idx]

    Bx, Cx = per_channel(B), per_channel(C)
    diff = S[..., :, None] - S[..., None, :]  # (b, d, t, s)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    decay = torch.exp(A[None, :, :, None, None] * diff[:, :, None]) * causal  # (b, d, N, t, s)
    decay = torch.where(causal, decay, torch.zeros(()))
    inp = (dt * u)[:, :, None, :] * Bx  # (b, d, N, s)
    h = (decay * inp[:, :, :, None, :]).sum(-1)  # (b, d, N, t)
    y = (h * Cx).sum(2)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        zz = z.double()
        y = y * zz * torch.sigmoid(zz)
    return y, h[..., -1]


@pytest.mark.parametrize("lb,lc", [("const", "var"), ("var", "var"), ("group", "group"), ("var", "const"),
                                   ("group", "const")])
@pytest.mark.parametrize("opts", [(True, True, True, True), (False, False, False, False), (True, False, True, False)])
def test_reference_matches_closed_form(lb, lc, opts):
    with_D, with_z, with_bias, softplus = opts
    gen = torch.Generator().manual_seed(1)
    x = random_scan_inputs(2, 6, 9, 3, layout_B=lb, layout_C=lc, groups=3, dtype=torch.float64, with_D=with_D,
                           with_z=with_z, with_bias=with_bias, generator=gen)
    y, last = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    y2, last2 = closed_form_scan(**x, delta_softplus=softplus)
    assert y.dtype == torch.float64 and last.shape == (2, 6, 3)
    assert_close(y, y2)
    assert_close(last, last2)


def test_reference_matches_per_element_loop():
    """Explicit per-(b, d, n) scalar loops, grouped B/C, on a tiny fp32 input (output in fp32, state fp32)."""
    gen = torch.Generator().manual_seed(2)
    x = random_scan_inputs(1, 4, 5, 2, layout_B="group", layout_C="var", groups=2, generator=gen)
    y, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    u, delta, A, B, C, D, z, db = (x[k].double() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    for d in range(4):
        g = d // 2
        hs = [0.0, 0.0]
        for t in range(5):
            dt = F.softplus(delta[0, d, t] + db[d]).item()
            acc = 0.0
            for n in range(2):
                hs[n] = torch.exp(dt * A[d, n]).item() * hs[n] + dt * B[0, g, n, t].item() * u[0, d, t].item()
                acc += C[0, n, t].item() * hs[n]
            acc += D[d].item() * u[0, d, t].item()
            acc *= F.silu(z[0, d, t]).item()
            assert abs(y[0, d, t].item() - acc) < 1e-5 * (1 + abs(acc))
        assert last.dtype == torch.float32
        assert abs(last[0, d, 1].item() - hs[1]) < 1e-5 * (1 + abs(hs[1]))


@pytest.mark.parametrize("lb,lc", [("const", "const"), ("var", "var"), ("group", "group"), ("var", "group")])
def test_reference_gradcheck(lb, lc):
    gen = torch.Generator().manual_seed(3)
    x = random_scan_inputs(2, 4, 5, 3, layout_B=lb, layout_C=lc, groups=2, dtype=torch.float64, generator=gen)
    names = list(x)
    vals = [x[k].clone().requires_grad_() for k in names]

    def f(*args):
        y, last = selective_scan_ref(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)
        return y, last

    assert torch.autograd.gradcheck(f, vals)


def test_reference_state_update_matches_scan_steps():
    """Decoding step by step with selective_state_update_ref equals the full scan (and its last state)."""
    gen = torch.Generator().manual_seed(4)
    b, dim, L, N, G = 2, 6, 7, 4, 3
    x = random_scan_inputs(b, dim, L, N, layout_B="group", layout_C="var", groups=G, generator=gen)
    y, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    state = torch.zeros(b, dim, N)
    ys = []
    for t in range(L):
        ys.append(selective_state_update_ref(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                             x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True))
    assert_close(torch.stack(ys, -1), y, family="scan")
    assert_close(state, last, family="scan")


def _bad(**over):
    x = random_scan_inputs(2, 4, 5, 3, layout_B="var", layout_C="group", groups=2)
    x.update(over)
    return x


@pytest.mark.parametrize("over,exc,match", [
    (dict(u=torch.randn(2, 4)), ValueError, r"u: expected 3 dims"),
    (dict(u=torch.ones(2, 4, 5, dtype=torch.int64)), TypeError, r"u: expected dtype in"),
    (dict(delta=torch.randn(2, 4, 6)), ValueError, r"delta: expected shape \(2, 4, 5\)"),
    (dict(A=torch.randn(3, 3)), ValueError, r"A: expected shape \(dim=4, N\)"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, r"A: complex"),
    (dict(B=torch.randn(2, 3, 6)), ValueError, r"B: expected shape \(2, 3, 5\)"),
    (dict(B=torch.randn(4, 2)), ValueError, r"B: expected shape \(4, 3\)"),
    (dict(C=torch.randn(2, 3, 3, 5)), ValueError, r"C: number of groups 3 .* must divide dim=4"),
    (dict(C=torch.randn(2, 2, 3, 5, 1)), ValueError, r"C: expected shape"),
    (dict(D=torch.randn(5)), ValueError, r"D: expected shape \(4,\)"),
    (dict(z=torch.randn(2, 4, 4)), ValueError, r"z: expected shape \(2, 4, 5\)"),
    (dict(delta_bias=torch.ones(4, dtype=torch.int32)), TypeError, r"delta_bias: expected dtype in"),
    (dict(B=torch.randn(2, 3, 5, device="meta")), ValueError, r"B: expected device cpu"),
    (dict(delta=[1.0]), TypeError, r"delta: expected a torch.Tensor"),
])
def test_reference_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        selective_scan_ref(**_bad(**over))


def test_reference_state_update_bad_input():
    s = torch.zeros(2, 4, 3)
    args = dict(x=torch.randn(2, 4), dt=torch.rand(2, 4), A=-torch.rand(4, 3), B=torch.randn(2, 3), C=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"state: expected 3 dims"):
        selective_state_update_ref(torch.zeros(2, 4), **args)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 4\)"):
        selective_state_update_ref(s, **{**args, "x": torch.randn(2, 5)})
    with pytest.raises(ValueError, match=r"B: number of groups 3"):
        selective_state_update_ref(s, **{**args, "B": torch.randn(2, 3, 3)})
    with pytest.raises(TypeError, match=r"dt_bias: expected dtype in"):
        selective_state_update_ref(s, **args, dt_bias=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"A: expected device cpu \(same as state\), got meta"):
        selective_state_update_ref(s, **{**args, "A": args["A"].to("meta")})


def test_provider_registry_reference():
    from apt.core import registry

    info = {p.name: p for p in registry.list_providers("scan")}
    assert info["reference"].is_default and info["reference"].available
    prov = registry.get("scan", "reference")
    x = random_scan_inputs(1, 3, 4, 2, generator=torch.Generator().manual_seed(5))
    assert_close(prov.selective_scan_fn(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True))
    assert prov.supports(**x) == []


def test_state_update_reference_gradcheck_through_the_in_place_state():
    """The decode step writes the state in place after reading it: with dt or A requiring grad autograd saved the
    old state, and the write made backward fail ("modified by an inplace operation")."""
    g = torch.Generator().manual_seed(9)
    x, dt = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.rand(2, 3, generator=g, dtype=torch.float64)
    A = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    B, C = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    s0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)

    def f(x, dt, A, B, C, s):
        state = s.clone()
        y = selective_state_update_ref(state, x, dt, A, B, C, dt_softplus=True)
        return y, state

    assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in (x, dt, A, B, C, s0)))


def test_bool_flags_must_be_bools():
    from apt_kernels import selective_scan_fn, selective_state_update

    x = random_scan_inputs(1, 3, 4, 2, generator=torch.Generator().manual_seed(2))
    for kw in ({"delta_softplus": "no"}, {"return_last_state": "no"}, {"delta_softplus": None}):
        for fn in (selective_scan_fn, selective_scan_ref):  # "no" counted as True
            with pytest.raises(TypeError, match=f"{next(iter(kw))}: expected a bool"):
                fn(**x, **kw)
    s = torch.zeros(1, 3, 2)
    step = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])
    for fn in (selective_state_update, selective_state_update_ref):
        with pytest.raises(TypeError, match="dt_softplus: expected a bool"):
            fn(s, *step, dt_softplus="no")
