"""MoE routing reference vs an independent per-token loop (top-k, GShard priority, capacity), gradchecks through
dispatch/combine and the gate weights, MoEFFN forward/backward, the dropless grouped expert FFN (vs a per-expert
loop; fullgraph torch.compile with inductor), the router providers and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from apt_kernels.layers.moe import MoEFFN
from apt_kernels.ops import moe as moe_ops
from apt_kernels.ops.moe import moe_aux_losses, moe_combine, moe_dispatch, moe_grouped_ffn, moe_route
from apt_kernels.reference.moe import (expert_capacity, moe_combine_ref, moe_dispatch_ref, moe_route_ref, router_probs,
                                      topk_ref, moe_grouped_ffn_ref)
from apt_kernels.testing import assert_close


def loop_route(logits, k, capacity_factor, min_capacity=4, renormalize=None):
    """Written from MOE.md with plain Python loops: per token top-k by (prob desc, index asc), then choice rank by
    choice rank, token by token, a counter per expert."""
    n, e = logits.shape
    p = torch.softmax(logits.double(), dim=-1).tolist()
    pf = torch.softmax(logits.float(), dim=-1).tolist()  # the decisions use the fp32 probabilities
    choices = [sorted(range(e), key=lambda j: (-pf[t][j], j))[:k] for t in range(n)]
    cap = None if capacity_factor is None else max(min_capacity, math.ceil(capacity_factor * k * n / e))
    counter = [0] * e
    pos = [[0] * k for _ in range(n)]
    for j in range(k):
        for t in range(n):
            ex = choices[t][j]
            pos[t][j] = counter[ex]
            counter[ex] += 1
    kept = [[cap is None or pos[t][j] < cap for j in range(k)] for t in range(n)]
    renorm = (k > 1) if renormalize is None else renormalize
    w = []
    for t in range(n):
        row = [p[t][ex] for ex in choices[t]]
        s = sum(row) if renorm else 1.0
        w.append([v / s for v in row])
    return choices, pos, kept, cap, counter, w


def loop_combine(expert_out, choices, pos, kept, w, cap, counts):
    n = len(choices)
    c = expert_out.shape[-1]
    y = torch.zeros(n, c, dtype=torch.float64)
    starts = [sum(counts[:ex]) for ex in range(len(counts))]
    for t in range(n):
        for j, ex in enumerate(choices[t]):
            if kept[t][j]:
                row = expert_out[ex, pos[t][j]] if cap is not None else expert_out[starts[ex] + pos[t][j]]
                y[t] += w[t][j] * row.double()
    return y


def make_logits(n, e, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, e, generator=g)
    if kind == "equal":
        return torch.zeros(n, e)
    if kind == "dup":  # duplicated columns and rows: many exact ties
        base = torch.randn(n, max(e // 2, 1), generator=g).repeat_interleave(2, dim=1)[:, :e]
        if e > base.shape[1]:
            base = torch.cat([base, base[:, :1]], dim=1)
        return base
    if kind == "skew":  # everyone wants expert 0 -> heavy dropping
        lg = torch.randn(n, e, generator=g)
        lg[:, 0] += 5
        return lg
    raise ValueError(kind)


CASES = [  # (N, E, k, capacity_factor, logits kind)
    (1, 1, 1, None, "random"), (1, 1, 1, 1.0, "random"), (7, 2, 1, 0.5, "random"), (7, 2, 2, 1.0, "equal"),
    (33, 8, 2, 1.25, "random"), (33, 8, 2, 0.5, "skew"), (50, 8, 4, 2.0, "dup"), (64, 64, 4, 1.0, "random"),
    (65, 64, 1, None, "dup"), (100, 8, 2, None, "skew"), (129, 2, 2, 0.5, "equal"), (17, 64, 2, 1.25, "equal"),
]


@pytest.mark.parametrize("n,e,k,cf,kind", CASES)
def test_reference_matches_loop(n, e, k, cf, kind):
    logits = make_logits(n, e, kind, seed=n + e + k)
    r = moe_route_ref(logits, k, cf, min_capacity=2)
    choices, pos, kept, cap, counts, w = loop_route(logits, k, cf, min_capacity=2)
    assert r.capacity == cap
    assert r.expert_idx.tolist() == choices
    assert r.position.tolist() == pos
    assert r.kept.tolist() == kept
    assert r.tokens_per_expert.tolist() == counts
    n_drop = sum(not v for row in kept for v in row)
    assert int(r.dropped) == n_drop
    assert_close(r.weights.double(), torch.tensor(w, dtype=torch.float64), dtype=torch.float32)
    x = torch.randn(n, 5)
    buf = moe_dispatch_ref(x, r)
    assert buf.shape == r.buffer_shape(5)
    # each kept assignment's row holds its token; everything else is zero
    flat = buf.reshape(-1, 5)
    for t in range(n):
        for j in range(k):
            if kept[t][j]:
                assert torch.equal(flat[r.slot[t, j]], x[t])
    assert int((r.token_of_slot >= 0).sum()) == n * k - n_drop
    assert torch.all(flat[r.token_of_slot < 0] == 0)
    out = torch.randn(buf.shape)
    assert_close(moe_combine_ref(out, r).double(), loop_combine(out, choices, pos, kept, w, cap, counts),
                 dtype=torch.float32)


def test_capacity_formula():
    assert expert_capacity(16, 8, 2, 1.25, 4) == 5
    assert expert_capacity(16, 8, 2, 0.5, 4) == 4
    assert expert_capacity(10, 3, 1, 1.0, 0) == 4
    assert expert_capacity(10, 3, 1, None, 4) is None


def test_priority_first_choices_before_second():
    # token 0 prefers expert 0 second; tokens 1, 2 prefer expert 0 first: with cap 2, token 0's 2nd choice drops.
    logits = torch.tensor([[2.0, 3.0], [3.0, 0.0], [3.0, 0.0]])
    r = moe_route_ref(logits, 2, capacity_factor=0.5, min_capacity=2)
    assert r.capacity == 2
    assert r.position.tolist() == [[0, 2], [0, 1], [1, 2]]
    assert r.kept.tolist() == [[True, False], [True, True], [True, False]]
    # all-dropped token gets zero output
    r1 = moe_route_ref(torch.zeros(5, 2), 1, capacity_factor=0.1, min_capacity=1)
    out = moe_combine_ref(torch.ones(r1.buffer_shape(3)), r1)
    assert r1.capacity == 1 and r1.kept[:, 0].tolist() == [True, False, False, False, False]
    assert torch.all(out[1:] == 0) and torch.all(out[0] == 0.5)


def test_ties_go_to_lower_index():
    r = moe_route_ref(torch.zeros(4, 8), 3, None)
    assert r.expert_idx.tolist() == [[0, 1, 2]] * 4
    assert_close(r.weights, torch.full((4, 3), 1 / 3))
    r = moe_route_ref(torch.tensor([[1.0, 5.0, 5.0, 1.0]]), 2, None)
    assert r.expert_idx.tolist() == [[1, 2]]


def test_nan_ranks_first():
    """The reference's stable descending sort ranks NaN above every number, NaNs by increasing expert index (the
    rule every provider follows); softmax turns a row with a +inf or NaN logit, or only -inf ones, into all NaN."""
    nan, inf = float("nan"), float("inf")
    assert topk_ref(torch.tensor([[0.2, nan, 0.8, nan, 0.8]]), 5).tolist() == [[1, 3, 2, 4, 0]]
    assert topk_ref(torch.tensor([[nan] * 4], dtype=torch.float64), 3).tolist() == [[0, 1, 2]]
    for row in ([1.0, inf, 2.0], [nan, 0.0, 1.0], [-inf] * 3):
        assert torch.isnan(router_probs(torch.tensor([row]))).all()
    r = moe_route_ref(torch.tensor([[1.0, -inf, -inf, 2.0]]), 3, None)  # -inf: probability 0, ties to the lower
    assert r.expert_idx.tolist() == [[3, 0, 1]]


@pytest.mark.parametrize("cf", [None, 0.5, 1.25])
def test_gradcheck_dispatch_combine_weights(cf):
    torch.manual_seed(1)
    n, e, k, c = 9, 4, 2, 3
    logits = torch.randn(n, e, dtype=torch.float64)
    x = torch.randn(n, c, dtype=torch.float64)
    w_exp = torch.randn(e, c, c, dtype=torch.float64)

    def f(lg, xx, ww):
        r = moe_route(lg, k, cf, min_capacity=1, impl="reference")
        buf = moe_dispatch(xx, r, impl="reference")
        if r.capacity is None:  # packed: expert e's rows at offsets[e]..offsets[e+1]
            ex = torch.repeat_interleave(torch.arange(e), r.kept_per_expert)
            out = torch.einsum("rc,rcd->rd", buf, ww[ex])
        else:
            out = torch.bmm(buf, ww)
        return moe_combine(out, r, impl="reference")

    args = (logits.requires_grad_(), x.requires_grad_(), w_exp.requires_grad_())
    assert torch.autograd.gradcheck(f, args)


def test_aux_losses_formula():
    torch.manual_seed(2)
    logits = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    r = moe_route(logits, 2, 1.0, impl="reference")
    aux = moe_aux_losses(logits, r)
    p = torch.softmax(logits, -1)
    counts = torch.zeros(4, dtype=torch.float64)
    for t in range(20):
        for j in range(2):
            counts[r.expert_idx[t, j]] += 1
    want = 4 * sum(counts[i] / 40 * p[:, i].mean() for i in range(4))
    assert_close(aux["balance_loss"], want)
    assert_close(aux["z_loss"], (torch.logsumexp(logits, -1) ** 2).mean())
    (aux["balance_loss"] + aux["z_loss"]).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("activation,cf,shared,noisy", [("swiglu", 1.25, False, False), ("gelu", None, True, False),
                                                        ("swiglu", None, False, True), ("gelu", 0.5, True, True)])
def test_moeffn_forward_backward(activation, cf, shared, noisy):
    torch.manual_seed(3)
    m = MoEFFN(8, 12, 4, k=2, capacity_factor=cf, activation=activation, shared_expert=shared, noisy_gating=noisy,
               router_impl="reference")
    x = torch.randn(2, 7, 8, requires_grad=True)
    y, aux = m(x)
    assert y.shape == x.shape
    assert set(aux) == {"balance_loss", "z_loss", "tokens_per_expert", "dropped"}
    assert int(aux["tokens_per_expert"].sum()) == 28
    (y.square().sum() + aux["balance_loss"] + aux["z_loss"]).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_moeffn_matches_per_token_loop():
    """The batched-expert layer equals a direct per-token sum over kept experts (eval mode, no noise)."""
    torch.manual_seed(4)
    for cf in (None, 0.5):
        m = MoEFFN(6, 10, 4, k=2, capacity_factor=cf, min_capacity=1, activation="swiglu", router_impl="reference",
                   eval_capacity_factor="train")
        m.eval()
        m.temperature = 0.7
        x = torch.randn(11, 6)
        y, aux = m(x)
        logits = m.gate(x) / 0.7
        r = moe_route_ref(logits, 2, cf, min_capacity=1)
        want = torch.zeros(11, 6)
        for t in range(11):
            for j in range(2):
                if r.kept[t, j]:
                    ex = int(r.expert_idx[t, j])
                    h = torch.nn.functional.silu(x[t] @ m.w_gate[ex]) * (x[t] @ m.w_in[ex])
                    want[t] += r.weights[t, j] * (h @ m.w_out[ex])
        assert_close(y, want)
        assert int(aux["dropped"]) == int(r.dropped)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [5], [0, 0, 2], [0, 0, 0], [1, 1, 1, 1]])
def test_grouped_ffn_matches_per_expert_loop(activation, counts):
    """Values and gradients (x and every weight) equal the per-expert loop; empty experts, one expert, no rows."""
    g = torch.Generator().manual_seed(sum(counts) + len(counts))
    e, c, f, c_out = len(counts), 5, 7, 3
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(sum(counts), c, generator=g, requires_grad=True)
    w_in = torch.randn(e, c, f, generator=g, requires_grad=True)
    w_gate = torch.randn(e, c, f, generator=g, requires_grad=True) if activation == "swiglu" else None
    w_out = torch.randn(e, f, c_out, generator=g, requires_grad=True)
    leaves = [t for t in (x, w_in, w_gate, w_out) if t is not None]
    y = moe_grouped_ffn(x, offsets, w_in, w_gate, w_out, activation)
    want = moe_grouped_ffn_ref(x, offsets, w_in, w_gate, w_out)
    assert y.shape == (sum(counts), c_out)
    assert_close(y, want)
    gy = torch.randn(y.shape, generator=g)
    for a, b in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        assert_close(a, b)
    with torch.no_grad():
        assert_close(moe_grouped_ffn(x, offsets, w_in, w_gate, w_out, activation), want)


def test_grouped_ffn_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 0, 5, 7])
    x = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w_in, w_gate = (torch.randn(3, 3, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w_out = torch.randn(3, 4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: moe_grouped_ffn(a[0], offsets, *a[1:], "swiglu"),
                                    (x, w_in, w_gate, w_out))
    assert torch.autograd.gradcheck(lambda a, b, d: moe_grouped_ffn(a, offsets, b, None, d, "gelu"), (x, w_in, w_out))
    for gate in (w_gate, None):
        torch.library.opcheck(moe_ops._grouped_ffn_op, (x, offsets, w_in, gate, w_out))
        saved = [x.detach(), offsets, *(t.detach() for t in moe_ops._grouped_ffn_op(x, offsets, w_in, gate, w_out)[1:])]
        torch.library.opcheck(moe_ops._grouped_ffn_bwd_op,
                              (torch.randn(7, 2, dtype=torch.float64, generator=g), *saved, w_in.detach(),
                               None if gate is None else gate.detach(), w_out.detach()))
    # weights stored transposed (a (E, F, C) parameter used as .transpose(1, 2)): the fake gradients must have the
    # real ones' (contiguous) strides, or inductor's stride asserts fail in the backward
    w_in_t = torch.randn(3, 4, 3, dtype=torch.float64, generator=g).transpose(1, 2)
    for gate in (w_gate.detach(), None):
        saved = [x.detach(), offsets,
                 *(t.detach() for t in moe_ops._grouped_ffn_op(x.detach(), offsets, w_in_t, gate, w_out.detach())[1:])]
        torch.library.opcheck(moe_ops._grouped_ffn_bwd_op,
                              (torch.randn(7, 2, dtype=torch.float64, generator=g), *saved, w_in_t, gate,
                               w_out.detach()))


def test_grouped_ffn_bad_inputs():
    x, off = torch.randn(6, 4), torch.tensor([0, 2, 6])
    w, wo = torch.randn(2, 4, 5), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="activation"):
        moe_grouped_ffn(x, off, w, w, wo, "relu")
    with pytest.raises(ValueError, match="w_gate"):
        moe_grouped_ffn(x, off, w, None, wo, "swiglu")
    with pytest.raises(TypeError, match="offsets"):
        moe_grouped_ffn(x, off.int(), w, w, wo)
    with pytest.raises(ValueError, match="offsets"):
        moe_grouped_ffn(x, torch.tensor([0]), w, w, wo)
    with pytest.raises(TypeError, match="w_out"):
        moe_grouped_ffn(x, off, w, w, wo.double())
    with pytest.raises(ValueError, match="w_in"):
        moe_grouped_ffn(x, off, w.to("meta"), w, wo)
    with pytest.raises(ValueError, match="weights"):
        moe_grouped_ffn(x, off, torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 5, 4))


def _compiled_vs_eager(m, shapes, dynamic, backend="inductor"):
    """A fullgraph compile (default: inductor) of MoEFFN (output + aux losses) equals eager, values and gradients to
    x and every parameter, for each input shape in turn; returns the number of compiled frames."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(x):
        y, aux = m(x)
        return y, aux["balance_loss"] + aux["z_loss"]

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=dynamic)
    for i, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i), requires_grad=True)
        leaves = [x] + list(m.parameters())
        results = []
        for fn in (f, compiled):
            y, loss = fn(x)
            results.append([y.detach(), loss.detach()] +
                           list(torch.autograd.grad(y.square().sum() + loss, leaves)))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a)
    return counter.frame_count


@pytest.mark.parametrize("activation,e,k,shape,shared,backend", [("swiglu", 4, 2, (2, 16, 32), False, "inductor"),
                                                                ("gelu", 1, 1, (1, 1, 32), True, "aot_eager")])
def test_moeffn_dropless_compiles_fullgraph(activation, e, k, shape, shared, backend):
    """Dropless mode under fullgraph torch.compile (static shapes): the per-expert row counts are data, the grouped
    FFN custom op keeps them out of the graph's shapes. Edge cases (E = k = 1, one token) with aot_eager to save
    an inductor compile: the shapes are traced the same way."""
    torch.manual_seed(11)
    m = MoEFFN(32, 64, e, k=k, capacity_factor=None, activation=activation, shared_expert=shared)
    assert _compiled_vs_eager(m, [shape], dynamic=False, backend=backend) == 1


def test_moeffn_dropless_compiles_fullgraph_dynamic():
    """dynamic=True: one graph serves several token counts (k = E: every expert takes every token)."""
    torch.manual_seed(12)
    m = MoEFFN(32, 64, 3, k=3, capacity_factor=None, activation="swiglu")
    assert _compiled_vs_eager(m, [(2, 8, 32), (3, 5, 32)], dynamic=True) == 1


def test_moeffn_capacity_mode_compiles_fullgraph_with_an_annealed_capacity_factor():
    """Capacity mode with dynamic=True, where dynamo makes capacity_factor a SymFloat: the argument check used
    math.isnan/isinf, which fullgraph rejected ("torch.* op returned non-Tensor"). Changing the factor (annealing,
    as the layer invites) must still equal eager."""
    torch.manual_seed(13)
    m = MoEFFN(32, 64, 4, k=2, capacity_factor=1.25, activation="swiglu")
    assert _compiled_vs_eager(m, [(2, 8, 32)], dynamic=True, backend="aot_eager") >= 1
    m.capacity_factor = 0.7
    _compiled_vs_eager(m, [(2, 8, 32)], dynamic=True, backend="aot_eager")


def test_moeffn_eval_is_dropless_unless_told():
    """Eval mode routes with eval_capacity_factor: None (default) drops nothing, so a token's output does not
    depend on the rest of the batch (one token at a time equals the whole batch); 'train' or a number cap it."""
    torch.manual_seed(12)
    m = MoEFFN(8, 16, 4, k=2, capacity_factor=0.5, min_capacity=1, router_impl="reference")
    x = torch.randn(40, 8)
    m.train()
    assert int(m(x)[1]["dropped"]) > 0
    m.eval()
    y, aux = m(x)
    assert int(aux["dropped"]) == 0
    assert_close(torch.cat([m(x[i:i + 1])[0] for i in range(40)]), y)
    m.eval_capacity_factor = "train"
    assert int(m(x)[1]["dropped"]) > 0
    m.eval_capacity_factor = 4.0
    assert int(m(x)[1]["dropped"]) == 0
    for bad in (0.0, -1.0, float("inf"), True, "dropless"):
        with pytest.raises(ValueError, match="^eval_capacity_factor:"):
            MoEFFN(8, 16, 4, eval_capacity_factor=bad)


def test_moeffn_temperature_and_capacity_are_mutable():
    m = MoEFFN(4, 8, 4, k=1, capacity_factor=1.0, router_impl="reference")
    x = torch.randn(32, 4)
    m.capacity_factor = 0.25
    _, aux = m(x)
    m.capacity_factor = None
    _, aux2 = m(x)
    assert int(aux2["dropped"]) == 0
    for bad in (0.0, True):  # True is an int to isinstance, and was taken as 1
        m.temperature = bad
        with pytest.raises(ValueError, match="temperature"):
            m(x)


def test_noisy_gating_routes_in_the_router_dtype():
    """A float64 router with noisy gating routed on fp32 logits in training (the noise was added in fp32)."""
    m = MoEFFN(4, 8, 4, k=2, noisy_gating=True, router_dtype=torch.float64, router_impl="reference").train()
    clean, noisy = m.router_logits(torch.randn(6, 4))
    assert clean.dtype == noisy.dtype == torch.float64 and not torch.equal(clean, noisy)


def test_bad_inputs():
    lg = torch.randn(5, 4)
    with pytest.raises(ValueError, match="k"):
        moe_route(lg, 5)
    with pytest.raises(ValueError, match="k"):
        moe_route(lg, 0)
    with pytest.raises(TypeError, match="k"):
        moe_route(lg, 1.5)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_route(lg, 1, -1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe_route(lg, 1, float("nan"))
    with pytest.raises(ValueError, match="min_capacity"):
        moe_route(lg, 1, 1.0, min_capacity=-1)
    with pytest.raises(ValueError, match="logits"):
        moe_route(torch.randn(5), 1)
    with pytest.raises(TypeError, match="logits"):
        moe_route(torch.zeros(5, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="impl"):
        moe_route(lg, 1, impl="nope")
    r = moe_route(lg, 2, 1.0)
    with pytest.raises(ValueError, match="x"):
        moe_dispatch(torch.randn(6, 3), r)
    with pytest.raises(TypeError, match="x"):
        moe_dispatch(torch.zeros(5, 3, dtype=torch.int32), r)
    with pytest.raises(TypeError, match="routing"):
        moe_dispatch(torch.randn(5, 3), "routing")
    with pytest.raises(ValueError, match="expert_out"):
        moe_combine(torch.randn(4, r.capacity + 1, 3), r)
    with pytest.raises(ValueError, match="x: expected device cpu"):
        moe_dispatch(torch.empty(5, 3, device="meta"), r)
    with pytest.raises(ValueError, match="expert_out: expected device cpu"):
        moe_combine(torch.empty(4, r.capacity, 3, device="meta"), r)
    with pytest.raises(TypeError, match="renormalize"):
        moe_route(lg, 2, renormalize="yes")
    with pytest.raises(TypeError, match="capacity_factor"):
        moe_route(lg, 2, capacity_factor="1.0")
    with pytest.raises(ValueError, match="temperature|d_model|k"):
        MoEFFN(4, 8, 2, k=3)
    with pytest.raises(ValueError, match="activation"):
        MoEFFN(4, 8, 2, activation="relu")
    with pytest.raises(TypeError, match="router_impl"):
        MoEFFN(4, 8, 2, router_impl=object())


def test_router_providers_registered():
    from apt.core import registry

    names = {i.name: i for i in registry.list_providers("router")}
    assert set(names) >= {"topk_default", "cpu_native", "triton", "cuda"}
    assert names["topk_default"].is_default and names["topk_default"].priority == 0
    assert (names["cpu_native"].priority, names["triton"].priority, names["cuda"].priority) == (10, 20, 30)
    p = registry.get("router", "topk_default")
    lg = torch.randn(12, 4)
    r = p.route(lg, 2, 1.0)
    x = torch.randn(12, 5)
    y = p.combine(p.dispatch(x, r), r)
    assert y.shape == (12, 5)
    assert set(p.aux_losses(lg, r)) == {"balance_loss", "z_loss"}
    layer = p.create_layer(5, 8, 4, k=2, capacity_factor=None)
    out, _ = layer(torch.randn(3, 5))
    assert out.shape == (3, 5)
    assert p.supports(x=x) == []
    reasons = registry.REGISTRY.provider_class("router", "cuda")(None).supports(x=x)
    assert any("device cpu" in s for s in reasons), reasons  # the cuda router never takes CPU tensors
    assert registry.REGISTRY.provider_class("router", "triton")(None).supports(x=x.double())


def test_noisy_gating_only_in_training():
    torch.manual_seed(7)
    m = MoEFFN(6, 8, 4, k=2, capacity_factor=None, noisy_gating=True, router_impl="reference")
    x = torch.randn(30, 6)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    b = m(x)[0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("noisy", [False, True])
def test_router_logits_in_fp32_for_low_precision_inputs(noisy):
    """bf16 inputs or bf16 autocast: the router logits are fp32 (selective precision: bf16 logits keep ~3 digits,
    so near-ties between experts flip and exact ties appear), unless router_dtype=None; gradients still reach the
    bf16 gate and x."""
    torch.manual_seed(8)
    m = MoEFFN(64, 32, 8, k=2, capacity_factor=None, noisy_gating=noisy, router_impl="reference")
    m.to(torch.bfloat16).train()
    x = torch.randn(200, 64).bfloat16()
    clean, routed = m.router_logits(x)
    assert clean.dtype == routed.dtype == torch.float32
    torch.testing.assert_close(clean, x.float() @ m.gate.weight.float().t(), rtol=1e-6, atol=1e-6)
    m.router_dtype = None
    assert m.router_logits(x)[0].dtype == torch.bfloat16
    m.router_dtype = torch.float32
    m32 = MoEFFN(64, 32, 8, k=2, noisy_gating=noisy, router_impl="reference").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the gate's linear in bf16
        assert all(t.dtype == torch.float32 for t in m32.router_logits(x.float()))
        assert m32(x.float())[0].shape == (200, 64)
    x.requires_grad_(True)
    y, aux = m(x)
    (y.float().square().sum() + aux["balance_loss"] + aux["z_loss"]).backward()
    assert m.gate.weight.grad.dtype == torch.bfloat16 and m.gate.weight.grad.abs().sum() > 0
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    with pytest.raises(TypeError, match="^router_dtype:"):
        MoEFFN(8, 8, 2, router_dtype=torch.int32)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_combine_of_dropped_tokens_and_zero_width(impl):
    """A token with every choice dropped gets exactly zeros even when the row its slot index points at (row 0) is
    not finite (the reference multiplied it by 0: NaN); C = 0 combines to (N, 0) (the reference's reshape(-1, 0)
    raised)."""
    lg = torch.zeros(8, 2)
    lg[:, 0] = 5.0
    r = moe_route(lg, 1, capacity_factor=0.5, min_capacity=1, impl=impl)
    dropped = ~r.kept.any(1)
    assert dropped.any()
    eo = torch.randn(r.buffer_shape(3))
    eo.view(-1, 3)[0, 1] = float("inf")
    y = moe_combine(eo, r, impl=impl)
    assert y[dropped].eq(0).all() and not y[dropped].isnan().any()
    for cf in (1.0, None):
        r = moe_route(torch.randn(6, 4), 2, capacity_factor=cf, impl=impl)
        x = torch.randn(6, 0, requires_grad=True)
        y = moe_combine(moe_dispatch(x, r, impl=impl), r, impl=impl)
        assert y.shape == (6, 0)
        y.sum().backward()
        assert x.grad.shape == (6, 0)


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("cf", [None, 1.0])
def test_empty_batch(impl, cf):
    lg = torch.randn(0, 4, requires_grad=True)
    r = moe_route(lg, 2, cf, impl=impl)
    x = torch.randn(0, 3, requires_grad=True)
    buf = moe_dispatch(x, r, impl=impl)
    assert buf.shape == ((0, 3) if cf is None else (4, 4, 3)) and not buf.any()
    y = moe_combine(buf, r, impl=impl)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert int(r.dropped) == 0 and r.tokens_per_expert.tolist() == [0] * 4
    m = MoEFFN(3, 5, 4, k=2, capacity_factor=cf, router_impl=impl)
    out, aux = m(torch.randn(2, 0, 3))
    assert out.shape == (2, 0, 3)


@pytest.mark.parametrize("offsets", [[0, 10, 4], [0, 3, 1], [1, 2, 4], [0, 1, 2]])
def test_grouped_ffn_refuses_bad_offsets(offsets):
    # [0, 10, 4] made torch's repeat_interleave write past its output: heap corruption, an abort later
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="offsets: expected non-decreasing row offsets from 0 to M=4"):
        moe_grouped_ffn(x, torch.tensor(offsets), torch.randn(2, 2, 3), torch.randn(2, 2, 3), torch.randn(2, 3, 2))


@pytest.mark.parametrize("counts,per_expert", [([3, 3, 2, 4], False), ([0, 11, 0, 1], True), ([12, 0, 0, 0], True),
                                               ([0, 0, 0, 0], True)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_ffn_padded_and_per_expert_paths(counts, per_expert, activation):
    """Balanced rows: one bmm over experts padded to the widest; skewed ones (a collapsing router), where padding
    would more than double the rows: a matmul per expert (the padded bmm was E/2 times the work there). Both
    give the reference's output and gradients."""
    from apt_kernels.reference.moe import moe_grouped_ffn_ref

    g = torch.Generator().manual_seed(sum(counts))
    offsets = torch.tensor([0, *counts]).cumsum(0)
    m = int(offsets[-1])
    assert (moe_ops._groups(offsets, m).rows is None) == per_expert
    x = torch.randn(m, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w_in, w_gate = (torch.randn(4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    w_out = torch.randn(4, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w_gate = w_gate if activation == "swiglu" else None
    params = [t for t in (x, w_in, w_gate, w_out) if t is not None]
    got = moe_grouped_ffn(x, offsets, w_in, w_gate, w_out, activation)
    want = moe_grouped_ffn_ref(x, offsets, w_in, w_gate, w_out)
    torch.testing.assert_close(got, want)
    gy = torch.randn(got.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(got, params, gy, allow_unused=True),
                    torch.autograd.grad(want, params, gy, allow_unused=True)):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b)
    if m:
        def f(*p):
            gate = p[2] if w_gate is not None else None
            return moe_grouped_ffn(p[0], offsets, p[1], gate, p[-1], activation)
        assert torch.autograd.gradcheck(f, params)


def test_grouped_ffn_backward_reuses_the_forwards_host_offsets(monkeypatch):
    """The offsets reach the host once per training step: the forward returns its host copy for the backward (a
    second device sync per MoE layer in every backward, before), and the checks run on that same copy."""
    calls = []
    real = moe_ops._groups

    def counting(offsets, m, bounds=None):
        calls.append(bounds is None)
        return real(offsets, m, bounds)
    monkeypatch.setattr(moe_ops, "_groups", counting)
    x = torch.randn(7, 3, requires_grad=True)
    w_in, w_gate = (torch.randn(3, 3, 4, requires_grad=True) for _ in range(2))
    w_out = torch.randn(3, 4, 2, requires_grad=True)
    moe_grouped_ffn(x, torch.tensor([0, 2, 5, 7]), w_in, w_gate, w_out).sum().backward()
    assert calls == [True, False]
    assert x.grad is not None and w_gate.grad is not None
