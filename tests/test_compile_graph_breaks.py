"""Module/model-level torch.compile: the default compile (fullgraph=False) of the MoE layer and the MoE model
has no graph break, in training (capacity routing) and in eval (dropless, the default eval_capacity_factor), with
the reference router (the default router provider) and the native one."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from apt.core import registry
from apt.core.config import load_profile
from apt.modeling.compose import ModelBuilder
from apt_kernels.ops.moe import _grouped_ffn_infer_op, impl_status


def _routers():
    return ["topk_default"] + (["cpu_native"] if impl_status("cpu_native")[0] else [])


def _breaks(fn, *args):
    dynamo.reset()
    ex = dynamo.explain(fn)(*args)
    return ex.graph_break_count, [b.reason.splitlines()[0] for b in ex.break_reasons]


# not dropless training: its grouped FFN saves (E, width, .) buffers for the backward, whose width is data-dependent
@pytest.mark.parametrize("router", _routers())
@pytest.mark.parametrize("capacity_factor, train", [(1.25, True), (1.25, False), (None, False)])
def test_moeffn_has_no_graph_break(router, capacity_factor, train):
    torch.manual_seed(0)
    m = registry.get("router", router).create_layer(32, 64, 4, k=2, capacity_factor=capacity_factor)
    m.train(train)
    x = torch.randn(2, 8, 32)
    with torch.set_grad_enabled(train):
        n, why = _breaks(m, x)
    assert n == 0, why


@pytest.mark.parametrize("router", _routers())
@pytest.mark.parametrize("train", [True, False])
def test_moe_model_has_no_graph_break(router, train):
    torch.manual_seed(0)
    cfg = load_profile("gpt5_moe_reasoning", {"model.d_model": 32, "model.num_heads": 4, "model.num_layers": 2,
                                              "model.max_seq_len": 64, "data.seq_len": 64,
                                              "model.moe.router_name": router})
    model = ModelBuilder(cfg).build().train(train)
    with torch.set_grad_enabled(train):
        n, why = _breaks(model, torch.randint(0, 257, (2, 8)))
    assert n == 0, why


def test_moe_model_default_compile_matches_eager_in_eval():
    torch.manual_seed(0)
    cfg = load_profile("gpt5_moe_reasoning", {"model.d_model": 32, "model.num_heads": 4, "model.num_layers": 2,
                                              "model.max_seq_len": 64, "data.seq_len": 64})
    model = ModelBuilder(cfg).build().eval()
    x = torch.randint(0, 257, (2, 8))
    dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), model(x))


def test_grouped_ffn_inference_op_opcheck():
    torch.manual_seed(0)
    e, c, f, m = 3, 8, 16, 10
    x = torch.randn(m, c)
    offsets = torch.tensor([0, 4, 4, m])
    w_in, w_gate, w_out = torch.randn(e, c, f), torch.randn(e, c, f), torch.randn(e, f, c)
    torch.library.opcheck(_grouped_ffn_infer_op, (x, offsets, w_in, w_gate, w_out),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_tva_cache_keeps_only_the_running_sum_and_decode_compiles_once():
    """After a prefill the gate's running sum / count in the cache are (B, C) / (B,) tensors of their own (a view of
    the last position kept the whole (B, T, C) fp32 cumsum alive), and a compiled decode step after a compiled
    prefill needs one graph for the steps (the prefill view's stride forced a recompile)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from apt_kernels.layers.tva import TVAAttention

    torch.manual_seed(0)
    a = TVAAttention(32, 4, core="reference").eval()
    cache = a.new_cache(2, max_len=32)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        a(x[:, :16], cache=cache)
    assert cache.x_sum.untyped_storage().nbytes() == cache.x_sum.numel() * 4
    assert cache.count.untyped_storage().nbytes() == cache.count.numel() * 4
    dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    c = torch.compile(a, backend=cnt, fullgraph=True)
    cache = a.new_cache(2, max_len=32)
    with torch.no_grad():
        full = a(x)
        outs = [c(x[:, :16], cache=cache)] + [c(x[:, t:t + 1], cache=cache) for t in range(16, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    assert cnt.frame_count == 2  # the prefill, then one (dynamic) graph for every decode step


def test_mamba_auto_scan_compiles_fullgraph_at_the_first_call():
    """scan_name "auto" is resolved for the weights' device/dtype at construction and after .to(): the first
    forward used to run the registry lookup (a lock) inside the trace: fullgraph=True raised 'Unsupported context
    manager', fullgraph=False broke the graph."""
    torch.manual_seed(0)
    cfg = load_profile("mamba_tiny", {"model.d_model": 32, "model.mamba.scan_name": "auto"})
    model = ModelBuilder(cfg).build()
    x = torch.randint(0, 257, (2, 8))
    dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, model(x))
    model = model.double()
    n, why = _breaks(model, x)
    assert n == 0, why


@pytest.mark.parametrize("hkv", [4, 2])
def test_tva_attention_compiles_fullgraph_with_dynamic_shapes(hkv):
    """dynamic=True turns python floats into symbolic ones: math.isfinite(coef) broke the graph (fullgraph failed
    with "torch.* op returned non-Tensor") for every call, the default coef=0.0 included."""
    from apt_kernels.ops.tva import tva_attention

    def f(q, k, v):
        return tva_attention(q, k, v, coef=0.5, delta=q, softmax_scale=0.3)

    cf = torch.compile(f, dynamic=True, backend="eager", fullgraph=True)
    for T in (8, 11):
        q, k = torch.randn(1, 4, T, 16), torch.randn(1, hkv, T, 16)
        torch.testing.assert_close(cf(q, k, k), f(q, k, k))
    with pytest.raises(ValueError, match="coef: expected a finite number"):
        tva_attention(q, q, q, coef=float("nan"))
