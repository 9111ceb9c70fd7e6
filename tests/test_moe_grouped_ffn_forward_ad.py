"""moe_grouped_ffn under forward-mode AD and torch.func: tangents are right, never silently zero or dropped."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from apt_kernels.ops.moe import moe_grouped_ffn


def _inputs():
    g = torch.Generator().manual_seed(0)
    E, C, F, M = 2, 4, 8, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(M, C), torch.tensor([0, 2, 5]), r(E, C, F), r(E, C, F), r(E, F, C)


def _ref(x, off, w_in, w_gate, w_out):
    return torch.cat([(torch.nn.functional.silu(x[off[e]:off[e + 1]] @ w_gate[e]) * (x[off[e]:off[e + 1]] @ w_in[e]))
                      @ w_out[e] for e in range(w_in.shape[0])])


def test_func_jvp_wrt_weights_is_not_zero():
    x, off, w_in, w_gate, w_out = _inputs()
    t = torch.randn_like(w_in)
    _, got = torch.func.jvp(lambda w: moe_grouped_ffn(x, off, w, w_gate, w_out), (w_in,), (t,))
    _, want = torch.func.jvp(lambda w: _ref(x, off, w, w_gate, w_out), (w_in,), (t,))
    torch.testing.assert_close(got, want)


def test_dual_tensor_keeps_its_tangent():
    x, off, w_in, w_gate, w_out = _inputs()
    t = torch.randn_like(x)
    _, want = torch.func.jvp(lambda x: _ref(x, off, w_in, w_gate, w_out), (x,), (t,))
    with fwAD.dual_level():
        y = moe_grouped_ffn(fwAD.make_dual(x, t), off, w_in, w_gate, w_out)
        got = fwAD.unpack_dual(y).tangent
    assert got is not None
    torch.testing.assert_close(got, want)


def test_func_grad():
    x, off, w_in, w_gate, w_out = _inputs()
    got = torch.func.grad(lambda w: moe_grouped_ffn(x, off, w, w_gate, w_out).sum())(w_in)
    want = torch.func.grad(lambda w: _ref(x, off, w, w_gate, w_out).sum())(w_in)
    torch.testing.assert_close(got, want)
