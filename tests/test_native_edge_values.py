"""Inputs at the edges of the C++ CPU kernels' arithmetic, for every kernel build (ISA) this CPU runs: exponents far
below exp's range (the vectorised exp takes its argument's bits apart) and MoE rows of zero channels (null data
pointers). Today's compilers give the right numbers either way; these cases exist so that
``scripts/sanitize_cpu.sh`` (ASan + UBSan, which runs this file) catches undefined behaviour on them: a shift of a
negative int and a signed overflow in exp for x < -87, and memcpy/memset on a null pointer at C == 0, were found that
way. sigmoid(-inf) (NaN, through exp(+inf)) was a wrong number on every build."""
from __future__ import annotations

import pytest
import torch

from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route
from apt_kernels.ops.scan import cpu_status, selective_scan_cpu, selective_state_update_cpu
from apt_kernels.ops.tva import tva_attention
from apt_kernels.reference.scan import selective_scan_ref, selective_state_update_ref
from apt_kernels.reference.tva import tva_attention_ref
from apt_kernels.testing import assert_close

pytestmark = pytest.mark.skipif(not cpu_status()[0], reason=cpu_status()[1] or "native module unavailable")

ISAS = ["generic", "avx2", "avx512"]  # capped to what the CPU runs
# dt * A: around exp's underflow (-87.3), the range where the exponent's bits overflowed int32 (-1.74e7, -8.7e6),
# and beyond
EXPONENTS = [-80.0, -88.0, -104.0, -1e3, -9e6, -1e7, -1.7e7, -1e30]


@pytest.mark.parametrize("isa", ISAS)
def test_scan_and_decode_step_with_exponents_far_below_range(isa, monkeypatch):
    monkeypatch.setenv("APT_SCAN_CPU_ISA", isa)
    N, L = 16, 5
    dim = len(EXPONENTS)
    g = torch.Generator().manual_seed(0)
    A = torch.tensor(EXPONENTS).view(dim, 1).expand(dim, N).contiguous()
    u = torch.randn(1, dim, L, generator=g)
    delta = torch.ones(1, dim, L)
    B = torch.randn(1, N, L, generator=g)
    C = torch.randn(1, N, L, generator=g)
    y = selective_scan_cpu(u, delta, A, B, C)
    assert torch.isfinite(y).all()
    assert_close(y, selective_scan_ref(u, delta, A, B, C), family="scan")

    state = torch.randn(1, dim, N, generator=g)
    ref_state = state.clone()
    x, dt = u[..., 0].contiguous(), delta[..., 0].contiguous()
    Bs, Cs = B[..., 0].contiguous(), C[..., 0].contiguous()
    y = selective_state_update_cpu(state, x, dt, A, Bs, Cs)
    y_ref = selective_state_update_ref(ref_state, x, dt, A, Bs, Cs)
    assert_close(y, y_ref, family="scan")
    assert_close(state, ref_state, family="scan")


@pytest.mark.parametrize("isa", ISAS)
def test_scan_backward_with_raw_delta_of_minus_infinity(isa, monkeypatch):
    """delta = -inf through softplus: dt = 0 there and d softplus = sigmoid(-inf) = 0 (the vectorised exp gives NaN
    for +inf, and sigmoid took exp(-x), so ddelta was NaN where torch gives 0)."""
    monkeypatch.setenv("APT_SCAN_CPU_ISA", isa)
    dim, N, L = 3, 16, 7
    g = torch.Generator().manual_seed(2)
    u = torch.randn(1, dim, L, generator=g)
    delta = torch.randn(1, dim, L, generator=g)
    delta[0, 1, 2] = delta[0, 0, 6] = float("-inf")
    A = -torch.rand(dim, N, generator=g) - 0.5
    B = torch.randn(1, N, L, generator=g)
    C = torch.randn(1, N, L, generator=g)
    dout = torch.randn(1, dim, L, generator=g)
    grads = []
    for fn in (selective_scan_cpu, selective_scan_ref):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
        y = fn(*leaves, delta_softplus=True)
        grads.append((y, *torch.autograd.grad(y, leaves, dout)))
    for ours, ref in zip(*grads):
        assert torch.isfinite(ours).all()
        assert_close(ours, ref, family="scan")
    assert grads[0][2][0, 1, 2] == 0 and grads[0][2][0, 0, 6] == 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_tva_softmax_with_scores_far_apart(isa, scale, monkeypatch):
    """Scores ~1e4 and ~1e7 apart: exp(s - max) of every key but the largest is far below exp's range."""
    monkeypatch.setenv("APT_TVA_CPU_ISA", isa)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 9, 16, generator=g) * scale
    k = torch.randn(1, 2, 9, 16, generator=g) * 10
    v = torch.randn(1, 2, 9, 16, generator=g)
    o = tva_attention(q, k, v, impl="cpu_native")
    assert torch.isfinite(o).all()
    assert_close(o, tva_attention_ref(q, k, v), family="tva")


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_rows_of_zero_channels(capacity_factor):
    r = moe_route(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), 2, capacity_factor=capacity_factor,
                  impl="cpu_native")
    x = torch.randn(5, 0, requires_grad=True)
    buf = moe_dispatch(x, r, impl="cpu_native")
    y = moe_combine(buf, r, impl="cpu_native")
    assert y.shape == (5, 0)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (5, 0)
