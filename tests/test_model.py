"""ModelBuilder / APTModel: gpt and mamba backbones, incremental decoding == full forward, MoE wrapper and aux
losses, provider fallback."""
from __future__ import annotations

import pytest
import torch

from apt.core import registry
from apt.core.config import load_profile
from apt.modeling import ModelBuilder
from apt.modeling.layers import CausalSelfAttention, MoEWrappedFFN
from apt.modeling.toy import register_toy_router


def _router() -> str:
    """The real default router when the MoE layer is installed, else the test-only toy one."""
    ok = any(i.name == "topk_default" and i.available for i in registry.list_providers("router"))
    return "topk_default" if ok else register_toy_router()

TINY = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 2, "model.max_seq_len": 32,
        "data.seq_len": 16}


def _model(profile: str, **over):
    cfg = load_profile(profile, {**TINY, **over})
    torch.manual_seed(0)
    return ModelBuilder(cfg).build().eval()


def _incremental(model, x, prefill):
    cache = model.new_cache(x.shape[0])
    outs = [model(x[:, :prefill], cache=cache)]
    outs += [model(x[:, t:t + 1], cache=cache) for t in range(prefill, x.shape[1])]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("profile, over", [
    ("tiny_debug", {}),
    ("tiny_debug", {"model.norm": "rmsnorm", "model.ffn.activation": "swiglu", "model.tie_embeddings": False}),
    ("mamba_tiny", {}),
    ("mamba_tiny", {"model.mamba.scan_name": "auto"}),
    # a capacity that drops tokens in training: eval is dropless, so stepping equals the full forward
    ("tiny_debug", {"model.moe.enabled": True, "model.moe.capacity_factor": 0.5, "model.moe.min_capacity": 1}),
])
def test_incremental_decoding_matches_full_forward(profile, over, monkeypatch):
    # other test modules set TRITON_INTERPRET=1 for the whole process; "auto" must not pick the (slow) interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _model(profile, **over)
    x = torch.randint(0, model.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, 11, model.vocab_size)
        for prefill in (1, 5):
            inc, cache = _incremental(model, x, prefill)
            torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)
            assert cache.pos == 11


def test_mamba_chunked_prefill_after_state_matches():
    model = _model("mamba_tiny")
    x = torch.randint(0, model.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1)
        a = model(x[:, :4], cache=cache)
        b = model(x[:, 4:], cache=cache)  # several tokens continuing from a state
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=2e-5, rtol=1e-4)


def test_backward_and_config():
    model = _model("tiny_debug").train()
    x = torch.randint(0, model.vocab_size, (2, 8))
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    assert model.head.weight is model.embed.weight  # tied
    assert model.config["model"]["vocab_size"] == 257
    assert model.hidden_states["final"].shape == (2, 8, 32)
    assert model.aux_losses == {}


def test_positions_beyond_max_seq_len_raise():
    model = _model("tiny_debug")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(4, dtype=torch.long))


def test_unknown_attention_provider_falls_back():
    model = _model("tiny_debug", **{"model.attention_name": "flash_v2"})
    x = torch.randint(0, 257, (1, 5))
    assert model(x).shape == (1, 5, 257)
    assert "attention" in model.build_report


def test_moe_wrapper_switch_and_aux_losses():
    name = _router()
    model = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": name,
                                    "model.moe.num_experts": 4, "model.moe.every": 2})
    moes = model.moe_layers()
    assert len(moes) == 1 and isinstance(moes[0], MoEWrappedFFN)  # every 2nd of 2 blocks
    x = torch.randint(0, 257, (2, 6))
    model(x)
    assert set(model.aux_losses) == {"moe_balance", "moe_z"}
    assert model.aux_losses["moe_balance"].item() > 0
    moes[0].active = False
    model(x)
    assert model.aux_losses == {}
    assert "_active" in "".join(model.state_dict())  # the switch is saved in checkpoints
    fresh = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": name,
                                    "model.moe.num_experts": 4, "model.moe.every": 2})
    assert fresh.moe_layers()[0].active
    fresh.load_state_dict(model.state_dict())  # ... and restored from them
    assert not fresh.moe_layers()[0].active
    fresh(x)
    assert fresh.aux_losses == {}
    moes[0].capacity_factor = 2.0
    moes[0].temperature = 0.5
    assert moes[0].moe.capacity_factor == 2.0 and moes[0].moe.temperature == 0.5


def test_builtin_attention_fallback_padding_mask():
    attn = CausalSelfAttention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    torch.testing.assert_close(attn(x, key_padding_mask=kpm), attn(x))
    kpm[:, 0] = True
    y = attn(x, key_padding_mask=kpm)
    assert torch.isfinite(y).all()


def test_bad_backbone():
    cfg = load_profile("tiny_debug", validate_cfg=False)
    cfg["model"]["backbone"] = "rnn"
    with pytest.raises(ValueError, match="backbone"):
        ModelBuilder(cfg).build()


def test_upcycle_copies_the_dense_ffn_into_every_expert():
    if not any(i.name == "topk_default" and i.available for i in registry.list_providers("router")):
        pytest.skip("apt_kernels MoE layer not installed")
    for act in ("swiglu", "gelu"):
        model = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": "topk_default",
                                        "model.moe.activation": act, "model.ffn.activation": act,
                                        "model.moe.capacity_factor": None})
        layer = model.moe_layers()[0]
        with torch.no_grad():
            layer.dense.w1.bias.zero_()
            layer.dense.w2.bias.zero_()
        assert layer.upcycle() == ""
        x = torch.randn(10, 32)
        y, _ = layer.moe(x)  # dropless; the top-k weights sum to 1 and every expert is the dense FFN
        torch.testing.assert_close(y, layer.dense(x), atol=1e-5, rtol=1e-4)
    model = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": "topk_default",
                                    "model.moe.activation": "gelu", "model.ffn.activation": "swiglu"})
    assert "activations differ" in model.moe_layers()[0].upcycle()


def test_attention_provider_gets_tva_settings_it_accepts():
    from apt.core.registry import Provider

    seen = {}

    class RecordingAttention(Provider):
        kind = "attention"
        name = "test_recording_attention"

        def create_layer(self, d_model, num_heads, r=4, s=1, tau=0.5, alpha=0.1, window=None, extra=None):
            seen.update(d_model=d_model, num_heads=num_heads, r=r, s=s, tau=tau, alpha=alpha, window=window,
                        extra=extra)
            return CausalSelfAttention(d_model, num_heads)

    registry.REGISTRY.register(RecordingAttention)
    try:
        model = _model("tiny_debug", **{"model.attention_name": "test_recording_attention",
                                        "model.tva.r": 8, "model.tva.window": 4, "model.attention.extra": "x"})
    finally:
        registry.REGISTRY.unregister("attention", "test_recording_attention")
    # dropout (not in the signature) is filtered out; tva keys and model.attention keys are passed
    assert seen == {"d_model": 32, "num_heads": 2, "r": 8, "s": 1, "tau": 0.18, "alpha": 0.1, "window": 4,
                    "extra": "x"}
    assert model.build_report["attention"] == "test_recording_attention"


@pytest.mark.parametrize("capacity_factor", [1.25, None])
def test_moe_model_under_torch_compile_fullgraph(capacity_factor):
    """A GPT with MoE blocks (capacity or dropless) compiles as one graph (aot_eager: fake tensors and autograd of
    every op) and gives the eager logits and gradients; switching MoE off recompiles instead of reading a device
    flag in forward."""
    model = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": _router(),
                                    "model.moe.num_experts": 4, "model.moe.every": 2,
                                    "model.moe.capacity_factor": capacity_factor})
    x = torch.randint(0, 257, (2, 8))
    eager = model(x)
    g_eager = torch.autograd.grad(eager.square().mean(), list(model.parameters()), allow_unused=True)
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled_model(x)
    g_comp = torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        if b is not None:
            torch.testing.assert_close(a, b)
    model.moe_layers()[0].active = False
    torch.testing.assert_close(compiled_model(x), model(x))


def test_bad_input_ids_and_cache_batch_are_clear_errors():
    for profile in ("tiny_debug", "mamba_tiny"):
        m = _model(profile)
        for ids, err, fragment in [(torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids: no tokens"),
                                   (torch.tensor([[1, 999]]), ValueError, r"token ids must be in \[0, 257\)"),
                                   (torch.tensor([[-1]]), ValueError, "got -1"),
                                   (torch.tensor([[1.0]]), TypeError, "expected int64 or int32")]:
            with pytest.raises(err, match=fragment):
                m(ids)
        cache = m.new_cache(2)  # the Mamba state broadcast a batch of 1 into both rows silently
        with pytest.raises(ValueError, match="cache: made for batch size 2, got input_ids with batch 1"):
            m(torch.tensor([[1, 2, 3]]), cache=cache)
        assert m(torch.tensor([[1, 2], [3, 4]]), cache=cache).shape == (2, 2, 257)


def test_training_through_a_mamba_cache_backpropagates():
    """Prefill then steps under autograd (as a recurrent training loop would): the cache kept graph, which the
    next step overwrote in place ("modified by an inplace operation" in backward), and the reference decode step
    wrote the state autograd had saved. The cache now holds values, like the KV cache."""
    m = _model("mamba_tiny").train()
    cache = m.new_cache(1)
    loss = m(torch.tensor([[1, 2]]), cache=cache).sum() + m(torch.tensor([[3]]), cache=cache).sum() \
        + m(torch.tensor([[4]]), cache=cache).sum()
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert not cache.layers[0].ssm_state.requires_grad and not cache.layers[0].conv_state.requires_grad


@pytest.mark.parametrize("override, fragment", [
    ({"model.mamba.dt_rank": 0}, "model.mamba.dt_rank: must be >= 1 or null"),  # 0 meant the default silently
    ({"model.init_std": -1.0}, "model.init_std: must be > 0"),
    ({"model.tva.s": -1}, "model.tva.s: must be >= 0"),
    ({"model.tva.r": 0}, "model.tva.r: must be >= 1"),
    ({"model.tva.window": 0}, "model.tva.window: must be >= 1 or null"),
])
def test_model_settings_out_of_range_are_profile_errors(override, fragment):
    from apt.core.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        load_profile("mamba_tiny" if "mamba" in next(iter(override)) else "tiny_debug", override)


def test_layer_errors_name_the_profile_section():
    with pytest.raises(ValueError, match="model.moe: the MoE layer refused its settings"):
        _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.activation": "tanh"})
    with pytest.raises(ValueError, match="model.attention / model.tva: .*refused its settings: tau"):
        _model("tiny_debug", **{"model.attention": {"tau": "x"}})


def test_attention_provider_with_only_a_core_gets_a_tva_layer_around_it():
    """A provider with forward() and no create_layer gave plain causal attention (not its core, not the default)."""
    from apt.core.registry import Provider
    from apt_kernels.reference.tva import tva_attention_ref

    calls = []

    class CoreOnly(Provider):
        kind, name = "attention", "test_core_only"

        def forward(self, q, k, v, *args, **kw):  # the core contract of TVA.md (apt_kernels.layers.tva)
            calls.append(q.shape)
            return tva_attention_ref(q, k, v, *args, **kw)

    registry.REGISTRY.register(CoreOnly)
    try:
        model = _model("tiny_debug", **{"model.attention_name": "test_core_only"})
        ref = _model("tiny_debug")
    finally:
        registry.REGISTRY.unregister("attention", "test_core_only")
    x = torch.randint(0, 257, (2, 8))
    torch.testing.assert_close(model(x), ref(x))  # the same TVA layer, the same weights, another core
    assert len(calls) == 2  # one call per layer


@pytest.mark.parametrize("name", ["tva_default", "sdpa", "test_core_only"])
def test_model_dropout_reaches_the_tva_attention_layers(name):
    """The built-in providers' create_layer took only **cfg, so the builder (which passes model.dropout to a
    create_layer that names it) left their TVAAttention output dropout at 0 while the FFNs had model.dropout."""
    from apt.core.registry import Provider
    from apt_kernels.layers.tva import TVAAttention
    from apt_kernels.reference.tva import tva_attention_ref

    class CoreOnly(Provider):
        kind, name = "attention", "test_core_only"

        def forward(self, *args, **kw):
            return tva_attention_ref(*args, **kw)

    registry.REGISTRY.register(CoreOnly)
    try:
        model = _model("tiny_debug", **{"model.attention_name": name, "model.dropout": 0.25})
    finally:
        registry.REGISTRY.unregister("attention", "test_core_only")
    layers = [m for m in model.modules() if isinstance(m, TVAAttention)]
    assert layers and all(m.dropout.p == 0.25 for m in layers)
    # an explicit model.attention.dropout wins; core= is refused, not dropped
    model = _model("tiny_debug", **{"model.dropout": 0.25, "model.attention": {"dropout": 0.5}})
    assert {m.dropout.p for m in model.modules() if isinstance(m, TVAAttention)} == {0.5}
    with pytest.raises(TypeError, match="core: create_layer builds the layer on its provider's own core"):
        registry.REGISTRY.get("attention", "sdpa").create_layer(16, 2, core="tva_default")


def test_model_attention_keys_the_provider_does_not_take_are_an_error():
    """They were dropped with a debug log, so a typo under model.attention went unnoticed."""
    from apt.core.registry import Provider

    class Narrow(Provider):
        kind, name = "attention", "test_narrow"

        def create_layer(self, d_model, num_heads):
            return CausalSelfAttention(d_model, num_heads)

    registry.REGISTRY.register(Narrow)
    try:
        _model("tiny_debug", **{"model.attention_name": "test_narrow", "model.tva.r": 8})  # tva keys: dropped
        with pytest.raises(ValueError, match="refused its settings: create_layer takes no 'my_typo' "
                                             "\\(from model.attention\\)"):
            _model("tiny_debug", **{"model.attention_name": "test_narrow", "model.attention": {"my_typo": 1}})
    finally:
        registry.REGISTRY.unregister("attention", "test_narrow")


def test_router_provider_without_create_layer_routes_the_moe_layer():
    """Such a router was passed over silently: the MoE layer used the built-in ops."""
    from apt.core.registry import Provider
    from apt_kernels.ops import moe as ops

    calls = []

    class OpsOnly(Provider):
        kind, name = "router", "test_ops_only"

        def route(self, logits, k, capacity_factor=None, min_capacity=4, renormalize=None):
            calls.append("route")
            return ops.moe_route(logits, k, capacity_factor, min_capacity, renormalize)

        def dispatch(self, x, routing):
            return ops.moe_dispatch(x, routing)

        def combine(self, expert_out, routing):
            return ops.moe_combine(expert_out, routing)

    registry.REGISTRY.register(OpsOnly)
    try:
        model = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": "test_ops_only"})
    finally:
        registry.REGISTRY.unregister("router", "test_ops_only")
    model(torch.randint(0, 257, (2, 8)))
    assert calls == ["route", "route"] and "router/test_ops_only" in model.build_report["moe"]


@pytest.mark.parametrize("profile, over, kind", [
    ("tiny_debug", {"model.moe.enabled": True, "model.moe.router_name": "no_such_router"}, "router"),
    ("mamba_tiny", {"model.mamba.scan_name": "no_such_scan"}, "scan"),
])
def test_a_fallback_is_warned_once_per_model(profile, over, kind, caplog):
    """It was warned once per layer."""
    import logging

    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        model = _model(profile, **over)
    assert len([r for r in caplog.records if f"asked for {kind}/no_such" in r.getMessage()]) == 1
    report = model.build_report["moe" if kind == "router" else "scan"]
    assert "(fallback: 'no_such_" in report


@pytest.mark.parametrize("over", [{}, {"model.moe.enabled": True, "model.moe.router_name": "topk_default"}])
def test_deepcopy_and_pickle_after_a_training_forward(over):
    """An EMA copy mid-training: the last forward's hidden states and aux losses (non-leaf tensors) made
    copy.deepcopy raise; the copy now leaves them out, and the original keeps them."""
    import copy
    import pickle

    model = _model("tiny_debug", **over).train()
    x = torch.randint(0, 257, (2, 8))
    model(x).sum().backward()
    twin = copy.deepcopy(model)
    assert model.hidden_states and twin.hidden_states == {} and twin.aux_losses == {}
    assert bool(model.aux_losses) == bool(over)
    pickle.loads(pickle.dumps(model))
    twin.eval(), model.eval()
    torch.testing.assert_close(twin(x), model(x))


def test_moe_aux_losses_without_a_graph_under_a_reentrant_checkpoint_are_warned_about(caplog):
    import logging

    from torch.utils.checkpoint import checkpoint

    model = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": "topk_default"}).train()
    block = model.blocks[0]
    plain = block.forward
    block.forward = lambda x, cache=None: checkpoint(plain, x, use_reentrant=True)
    x = torch.randint(0, 257, (2, 8))
    with caplog.at_level(logging.WARNING, logger="apt.modeling.model"):
        model(x)
        model(x)
    assert [r.getMessage() for r in caplog.records].count(
        next(r.getMessage() for r in caplog.records if "have no autograd graph" in r.getMessage())) == 1
    caplog.clear()
    block.forward = plain
    with caplog.at_level(logging.WARNING, logger="apt.modeling.model"):
        fresh = _model("tiny_debug", **{"model.moe.enabled": True, "model.moe.router_name": "topk_default"}).train()
        fresh(x)
        with torch.no_grad():
            fresh(x)  # no graph wanted: nothing to warn about
    assert not caplog.records


def test_model_builder_without_backbone_builds_gpt():
    # ModelBuilder defaulted the backbone to gpt, APTModel read m["backbone"]: a KeyError after building every layer
    cfg = {"model": {"d_model": 16, "num_layers": 1, "num_heads": 2, "max_seq_len": 8, "vocab_size": 32}}
    model = ModelBuilder(cfg).build()
    assert model.backbone == "gpt" and model.max_seq_len == 8
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 32)
