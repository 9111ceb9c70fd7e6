"""The ops as drop-in kernels through PyTorch's export stack (CPU): torch.export with dynamic shapes, save/load in a
fresh process, register_fake strides, torch.jit.trace."""
import subprocess
import sys
import textwrap

import pytest
import torch

from apt_kernels.ops import moe as M
from apt_kernels.ops import scan as S

pytestmark = pytest.mark.skipif(not S.cpu_status()[0], reason="needs the compiled apt_kernels._C")
Dim = torch.export.Dim


class _Scan(torch.nn.Module):
    def forward(self, u, dt, A, B, C, D):
        return S.selective_scan_fn(u, dt, A, B, C, D, delta_softplus=True)


class _Step(torch.nn.Module):
    def forward(self, state, x, dt, A, B, C):
        return S.selective_state_update(state, x, dt, A, B, C, dt_softplus=True)


class _MoE(torch.nn.Module):
    def forward(self, x, logits):
        r = M.moe_route(logits, 2, impl="cpu_native")
        return M.moe_combine(M.moe_dispatch(x, r, impl="cpu_native") * 2.0, r, impl="cpu_native")


def _scan_args(b, L, d=4, N=3):
    g = torch.Generator().manual_seed(L)
    return (torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g), -torch.rand(d, N, generator=g),
            torch.randn(b, N, L, generator=g), torch.randn(b, N, L, generator=g), torch.randn(d, generator=g))


def test_scan_export_dynamic_length_across_chunks():
    # the (batch, dim, nchunks, N) checkpoints pinned a dynamic L to one side of CHUNK (L <= 64)
    B, L = Dim("B", min=1, max=16), Dim("L", min=2, max=512)
    ep = torch.export.export(_Scan(), _scan_args(2, 10),
                             dynamic_shapes=({0: B, 2: L}, {0: B, 2: L}, None, {0: B, 2: L}, {0: B, 2: L}, None))
    for b, l in ((2, 10), (3, 77), (1, 300)):
        a = _scan_args(b, l)
        torch.testing.assert_close(ep.module()(*a), _Scan()(*a), rtol=0, atol=0)


def test_state_update_export_mutates_state():
    def args(b):
        g = torch.Generator().manual_seed(b)
        return (torch.randn(b, 4, 3, generator=g), torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g),
                -torch.rand(4, 3, generator=g), torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g))
    ep = torch.export.export(_Step(), args(2), dynamic_shapes=({0: Dim("B", min=1, max=64)},) * 3 + (None,) +
                             ({0: Dim("B", min=1, max=64)},) * 2)
    for b in (2, 5):
        a1, a2 = args(b), args(b)
        torch.testing.assert_close(ep.module()(*a2), _Step()(*a1), rtol=0, atol=0)
        torch.testing.assert_close(a2[0], a1[0], rtol=0, atol=0)  # the state was updated in place alike


@pytest.mark.parametrize("n", [11, 300])  # 300: across router_probs' n >= 256 branch
def test_moe_export_dynamic_tokens(n):
    # Routing.num_tokens was int(shape[0]): the token count was specialised to the example's
    N = Dim("N", min=2, max=1024)
    ep = torch.export.export(_MoE(), (torch.randn(6, 8), torch.randn(6, 4)), dynamic_shapes=({0: N}, {0: N}))
    x, logits = torch.randn(n, 8), torch.randn(n, 4)
    torch.testing.assert_close(ep.module()(x, logits), _MoE()(x, logits))


def test_moe_layer_export_dynamic_batch_and_length():
    # the exported program used to carry a hidden runtime guard B*T < 256 (eval) or on the capacity (train)
    from apt_kernels.layers.moe import MoEFFN
    B, T = Dim("B", min=1, max=16), Dim("T", min=2, max=256)
    for train in (False, True):
        torch.manual_seed(0)
        m = MoEFFN(32, 64, 4, k=2, router_impl="cpu_native").train(train)
        ep = torch.export.export(m, (torch.randn(2, 10, 32),), dynamic_shapes=({0: B, 1: T},))
        x = torch.randn(3, 100, 32)
        torch.testing.assert_close(ep.module()(x)[0], m(x)[0])


def test_export_load_in_fresh_process(tmp_path):
    a = _scan_args(3, 77)
    ep = torch.export.export(_Scan(), _scan_args(2, 10), dynamic_shapes=({0: Dim("B", max=16), 2: Dim("L", max=512)},
                             {0: Dim("B", max=16), 2: Dim("L", max=512)}, None,
                             {0: Dim("B", max=16), 2: Dim("L", max=512)}, {0: Dim("B", max=16), 2: Dim("L", max=512)},
                             None))
    torch.export.save(ep, tmp_path / "scan.pt2")
    torch.save({"args": a, "out": _Scan()(*a)}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, apt_kernels
        apt_kernels.load_ops()
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        ep = torch.export.load({str(tmp_path / 'scan.pt2')!r})
        assert torch.equal(ep.module()(*ref["args"]), ref["out"])
    """)
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and from a source checkout that is the
    # uninstalled apt_kernels (no compiled module) instead of the installed one
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_combine_backward_fake_strides_for_transposed_out():
    op = torch.ops.apt.moe_combine_backward_cpu_native.default
    r = M.moe_route(torch.randn(7, 4), 2, impl="cpu_native")
    out = torch.randn(5, 14).t()
    w = r.weights.detach()
    torch.library.opcheck(op, (torch.randn(7, 5), out, w, r.slot, r.token_of_slot))
    torch.library.opcheck(op, (torch.randn(7, 5), out, w.t().contiguous().t(), r.slot, r.token_of_slot))


def test_jit_trace_records_the_kernels():
    # the eager fast path wrote through raw pointers the tracer cannot see: the traced module returned torch.empty
    from apt_kernels.layers.tva import TVAAttention
    m = TVAAttention(32, 4, core="cpu_native").eval()
    with torch.no_grad():
        tm = torch.jit.trace(m, (torch.randn(2, 10, 32),), check_trace=False)
        x = torch.randn(2, 10, 32)
        torch.testing.assert_close(tm(x), m(x))
    assert any(n.kind() == "apt::tva_attention_native" for n in tm.graph.nodes())
