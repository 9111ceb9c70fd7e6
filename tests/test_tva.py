"""TVA attention: reference vs an independent loop formulation, masks, gradients, errors, layer + KV cache,
providers."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from apt_kernels.layers.tva import TVAAttention
from apt_kernels.reference.tva import random_tva_inputs, tva_attention_ref
from apt_kernels.testing import assert_close

MASKS = list(itertools.product([True, False], [None, 3], [0, 2], [False, True], [0, 3]))


def loop_attention(q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                   key_padding_mask=None, softmax_scale=None):
    """Row by row in float64 with the visibility rule spelled out per (query, key) pair."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = softmax_scale or 1.0 / math.sqrt(D)
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                p = i + Tk - Tq
                keys = []
                for j in range(Tk):
                    if causal and j > p:
                        continue
                    if window is not None and j >= sinks:
                        if causal and not (j > p - window):
                            continue
                        if not causal and abs(p - j) >= window:
                            continue
                    if key_padding_mask is not None and bool(key_padding_mask[b, j]):
                        continue
                    keys.append(j)
                if keys:
                    scores = torch.stack([(q[b, h, i] * k[b, h, j]).sum() * scale for j in keys])
                    w = torch.exp(scores - scores.max())
                    w = w / w.sum()
                    out[b, h, i] = sum(w[n] * v[b, h, j] for n, j in enumerate(keys))
                if delta is not None:
                    g = 1.0 if gate is None else float(gate[b, i, h])
                    out[b, h, i] += float(coef) * g * delta[b, h, i].double()
    return out


@pytest.mark.parametrize("causal,window,sinks,pad,extra", MASKS)
def test_reference_matches_loops(causal, window, sinks, pad, extra):
    inp = random_tva_inputs(B=2, H=2, Tq=6, Tk=6 + extra, D=8, pad=pad, seed=extra + 7 * sinks)
    kw = dict(causal=causal, window=window, sinks=sinks)
    out = tva_attention_ref(**inp, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, loop_attention(**inp, **kw).float(), family="attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_matches_fp64(dtype):
    inp = random_tva_inputs(B=1, H=3, Tq=33, D=24, pad=True, dtype=dtype, seed=3)
    out = tva_attention_ref(**inp, window=7, sinks=1)
    assert out.dtype == dtype
    exp = tva_attention_ref(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                               for k, v in inp.items()}, window=7, sinks=1)
    assert_close(out, exp.to(dtype), family="attention")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_delta_equals_sdpa(causal, dtype):
    inp = random_tva_inputs(B=2, H=3, Tq=11, D=16, dtype=dtype)
    q, k, v = inp["q"], inp["k"], inp["v"]
    exp = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(tva_attention_ref(q, k, v, causal=causal), exp, family="attention")
    # a custom scale, and a head dim above 128
    q2, k2, v2 = (torch.randn(1, 2, 5, 200, dtype=dtype) for _ in range(3))
    exp = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=causal, scale=0.05)
    assert_close(tva_attention_ref(q2, k2, v2, causal=causal, softmax_scale=0.05), exp, family="attention")


def test_fully_masked_rows_are_zero_with_finite_grads():
    inp = random_tva_inputs(B=2, H=2, Tq=5, D=8, pad=True, requires_grad=True, coef_tensor=True)
    out = tva_attention_ref(**inp, window=2)
    # batch 1: keys 0 and 1 padded, so causal queries 0 and 1 see nothing: attention part is 0
    pert = inp["coef"] * inp["gate"].permute(0, 2, 1)[..., None] * inp["delta"]
    assert (out - pert)[1, :, :2].abs().max() < 1e-6
    assert (out - pert)[1, :, 2:].abs().max() > 1e-3  # later rows do see keys
    all_pad = torch.ones(2, 5, dtype=torch.bool)
    o2 = tva_attention_ref(inp["q"], inp["k"], inp["v"], key_padding_mask=all_pad)
    assert torch.equal(o2, torch.zeros_like(o2))
    (out.sum() + o2.sum()).backward()
    for name in ("q", "k", "v", "delta", "gate", "coef"):
        assert torch.isfinite(inp[name].grad).all(), name


@pytest.mark.parametrize("causal,window,sinks,pad,extra",
                         [(True, None, 0, False, 0), (True, 2, 1, True, 0), (False, 2, 0, True, 2),
                          (True, 3, 2, True, 2)])
def test_gradcheck_float64(causal, window, sinks, pad, extra):
    inp = random_tva_inputs(B=2, H=2, Tq=4, Tk=4 + extra, D=3, pad=pad, dtype=torch.float64, coef_tensor=True,
                            requires_grad=True)
    names = ["q", "k", "v", "delta", "gate", "coef"]
    kpm = inp.get("key_padding_mask")

    def f(*ts):
        return tva_attention_ref(*ts[:5], ts[5], causal=causal, window=window, sinks=sinks, key_padding_mask=kpm)

    assert torch.autograd.gradcheck(f, tuple(inp[n] for n in names))


def test_bad_inputs_name_the_argument():
    inp = random_tva_inputs(B=1, H=2, Tq=4, D=8)
    q, k, v, d, g = inp["q"], inp["k"], inp["v"], inp["delta"], inp["gate"]
    cases = [
        (ValueError, "q: expected 4 dims", dict(q=q[0])),
        (ValueError, "k: expected shape", dict(k=k[:, :1])),
        (ValueError, "v: expected shape", dict(v=v[..., :4])),
        (TypeError, "k: expected dtype", dict(k=k.double())),
        (TypeError, "q: expected dtype in", dict(q=q.int(), k=k.int(), v=v.int())),
        (ValueError, "delta: expected shape", dict(delta=d[:, :, :2])),
        (ValueError, "gate: expected shape", dict(delta=d, gate=g.transpose(1, 2))),
        (ValueError, "gate: given without delta", dict(gate=g)),
        (ValueError, "coef: expected a python float or a 0-dim tensor", dict(delta=d, coef=torch.ones(2))),
        (TypeError, "coef: expected", dict(delta=d, coef="x")),
        (ValueError, "coef: expected a finite", dict(delta=d, coef=float("nan"))),
        (ValueError, "window: expected None or a positive int", dict(window=0)),
        (TypeError, "window: expected", dict(window=2.5)),
        (ValueError, "sinks: expected a non-negative int", dict(sinks=-1)),
        (ValueError, "key_padding_mask: expected shape", dict(key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))),
        (TypeError, "key_padding_mask: expected dtype torch.bool", dict(key_padding_mask=torch.zeros(1, 4))),
        (ValueError, "softmax_scale: expected a positive", dict(softmax_scale=-1.0)),
        (ValueError, "q: head dim must be in", dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
                                                    v=torch.randn(1, 1, 2, 300))),
        (ValueError, "q: expected no more queries than keys", dict(k=k[:, :, :2], v=v[:, :, :2])),
        (TypeError, "causal: expected a bool", dict(causal=1)),
    ]
    for exc, msg, over in cases:
        args = dict(q=q, k=k, v=v)
        args.update(over)
        with pytest.raises(exc, match=msg):
            tva_attention_ref(**args)


# ---- layer ----------------------------------------------------------------------------------------------------
def _manual_layer(layer: TVAAttention, x, kpm=None):
    """TVA.md's module-level math written out directly (dense masked softmax, cumsum running mean)."""
    B, T, C = x.shape
    H, D = layer.num_heads, layer.head_dim
    q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).split(C, dim=-1)
    heads = lambda t: t.view(B, T, H, D).transpose(1, 2)  # noqa: E731
    keep = torch.ones(B, T) if kpm is None else (~kpm).float()
    if layer.causal:
        m = torch.cumsum(x * keep[..., None], 1) / torch.cumsum(keep, 1).clamp_min(1)[..., None]
    else:
        m = ((x * keep[..., None]).sum(1, keepdim=True) / keep.sum(1).clamp_min(1)[:, None, None]).expand_as(x)
    g = torch.sigmoid(m @ layer.gate.weight.T + layer.gate.bias)
    delta = heads(x @ layer.U.weight.T @ layer.V.weight.T)
    a = loop_attention(heads(q), heads(k), heads(v), causal=layer.causal, window=layer.window,
                       sinks=layer.sinks if layer.window else 0, key_padding_mask=kpm).float()
    c = layer.alpha * math.tanh(float(layer.tau))
    out = a + c * g.permute(0, 2, 1)[..., None] * delta
    return out.transpose(1, 2).reshape(B, T, C) @ layer.out.weight.T + layer.out.bias


@pytest.mark.parametrize("causal,window,pad", [(True, None, False), (True, 3, True), (False, None, True)])
def test_layer_matches_manual_math(causal, window, pad):
    torch.manual_seed(0)
    layer = TVAAttention(16, 2, r=4, s=1, tau=0.5, window=window, causal=causal, core="reference")
    assert layer.rank == 4 and layer.U.weight.shape == (4, 16) and layer.V.weight.shape == (16, 4)
    assert layer.U.bias is None and layer.gate.weight.shape == (2, 16) and layer.qkv.bias is not None
    x = torch.randn(2, 7, 16)
    kpm = None
    if pad:
        kpm = torch.zeros(2, 7, dtype=torch.bool)
        kpm[1, :2] = True
        kpm[0, 5:] = True
    with torch.no_grad():
        assert_close(layer(x, kpm), _manual_layer(layer, x, kpm), family="attention")


@pytest.mark.parametrize("window,pad,max_len", [(None, False, None), (3, True, None), (4, True, 16)])
def test_layer_kv_cache_matches_full_forward(window, pad, max_len):
    torch.manual_seed(1)
    layer = TVAAttention(24, 3, r=2, s=2, window=window, core="reference").eval()
    x = torch.randn(2, 11, 24)
    kpm = None
    if pad:  # left padding on batch 1, as batched generation does
        kpm = torch.zeros(2, 11, dtype=torch.bool)
        kpm[1, :3] = True
    with torch.no_grad():
        full = layer(x, kpm)
        cache = layer.new_cache(2, max_len=max_len)
        outs, t = [], 0
        for n in (4, 1, 1, 3, 2):
            outs.append(layer(x[:, t:t + n], None if kpm is None else kpm[:, t:t + n], cache=cache))
            t += n
    assert cache.length == 11
    assert_close(torch.cat(outs, 1), full, family="attention")


def test_layer_backward_and_errors():
    layer = TVAAttention(16, 4, core="reference")
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.tau.grad is not None and layer.U.weight.grad is not None
    with pytest.raises(ValueError, match="num_heads"):
        TVAAttention(10, 3)
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="cache: incremental decoding needs a causal layer"):
        TVAAttention(16, 4, causal=False).new_cache(2)
    with pytest.raises(ValueError, match="max_len"):
        c = layer.new_cache(2, max_len=3)
        layer(torch.randn(2, 4, 16), cache=c)
    with pytest.raises(ValueError, match="core"):
        TVAAttention(16, 4, core="nope")


def test_layer_takes_a_callable_core():
    calls = []

    def core(q, k, v, delta=None, gate=None, coef=0.0, **kw):
        calls.append(kw)
        return tva_attention_ref(q, k, v, delta, gate, coef, **kw)

    layer = TVAAttention(16, 2, window=4, s=1, core=core)
    layer(torch.randn(1, 6, 16))
    assert calls and calls[0]["window"] == 4 and calls[0]["sinks"] == 1


# ---- providers ------------------------------------------------------------------------------------------------
def test_attention_providers():
    from apt.core.registry import REGISTRY

    names = {i.name: i for i in REGISTRY.list_providers("attention")}
    assert {"tva_default", "sdpa", "flash_v2", "tva_cpu", "tva_triton", "tva_cuda"} <= set(names)
    assert names["tva_default"].is_default
    assert names["flash_v2"].priority == 25 and names["tva_cuda"].priority == 30
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert names["flash_v2"].reason == "flash-attn is not installed"
    inp = random_tva_inputs(B=2, H=2, Tq=6, D=8)
    flash = REGISTRY.provider_class("attention", "flash_v2")()
    assert not any("perturbation" in r for r in flash.supports(**inp))  # added outside the core, as in sdpa
    assert any("cpu tensor" in r for r in flash.supports(**inp))
    assert REGISTRY.provider_class("attention", "tva_cuda")().supports(q=torch.randn(1, 1, 2, 48))
    layer = REGISTRY.get("attention", "sdpa").create_layer(16, 2, window=3)
    assert isinstance(layer, TVAAttention) and layer.window == 3
    layer(torch.randn(1, 5, 16))


@pytest.mark.parametrize("causal,window,sinks,pad,extra", MASKS[::3])
def test_sdpa_provider_matches_reference(causal, window, sinks, pad, extra):
    from apt.core.registry import REGISTRY

    sdpa = REGISTRY.get("attention", "sdpa", strict=True)
    inp = random_tva_inputs(B=2, H=2, Tq=6, Tk=6 + extra, D=8, pad=pad, seed=5)
    kw = dict(causal=causal, window=window, sinks=sinks)
    out = sdpa.forward(**inp, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, tva_attention_ref(**inp, **kw), family="attention")


@pytest.mark.parametrize("impl", ["reference", "cpu_native", "sdpa"])
@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("window,causal,tq", [(5, True, 7), (None, False, 7), (None, True, 9)])
def test_grouped_query_attention(impl, hkv, window, causal, tq, monkeypatch):
    """k/v with fewer heads (dividing q's): query head h reads k/v head h // (H / Hkv), as SDPA's enable_gqa;
    forward and gradients (dk, dv summed over the heads sharing them). Without a mask the sdpa provider hands
    the groups to SDPA (enable_gqa) instead of repeating k and v."""
    import apt_kernels.reference.tva as ref_tva
    from apt.core.registry import REGISTRY
    from apt_kernels.ops.tva import impl_status, tva_attention

    if impl == "cpu_native" and not impl_status(impl)[0]:
        pytest.skip(impl_status(impl)[1])
    fn = REGISTRY.get("attention", "sdpa", strict=True).forward if impl == "sdpa" else \
        (lambda *a, **kw: tva_attention(*a, impl=impl, **kw))
    if impl == "sdpa" and window is None:
        monkeypatch.setattr(ref_tva, "repeat_kv", lambda *a: pytest.fail("sdpa repeated k/v for an unmasked call"))
    g = torch.Generator().manual_seed(hkv)
    q = torch.randn(2, 4, tq, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, hkv, 9, 16, generator=g, requires_grad=True) for _ in range(2))
    o = fn(q, k, v, window=window, causal=causal)
    mask = tva_visible_mask_for_test(tq, 9, window) if causal else None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad(o, (q, k, v), gy)
    want = torch.autograd.grad(ref, (q, k, v), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k: expected shape"):  # 3 k/v heads do not divide 4
        fn(q, torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16))


def tva_visible_mask_for_test(tq, tk, window):
    from apt_kernels.reference.tva import tva_visible_mask

    return tva_visible_mask(tq, tk, True, window, 0, None, torch.device("cpu"))


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("shape", [(2, 2, 6, 8), (3, 2, 6, 16), (3, 1, 6, 16)])
def test_gqa_bad_shape_reports_shape_as_passed(impl, shape):
    from apt_kernels.ops.tva import tva_attention

    q, k = torch.randn(2, 4, 6, 16), torch.randn(*shape)
    with pytest.raises(ValueError) as e:  # was: the shape after repeating k's heads, e.g. (2, 4, 6, 8)
        tva_attention(q, k, k.clone(), impl=impl)
    assert f"got {tuple(shape)}" in str(e.value) and "Hkv dividing H" in str(e.value)


@pytest.mark.parametrize("impl", ["reference", "cpu_native", "auto"])
@pytest.mark.parametrize("Tq,causal,pad", [(1, True, False), (1, True, True), (3, False, True), (1, False, False)])
def test_gqa_decode_folds_heads_without_copying_kv(impl, Tq, causal, pad, monkeypatch):
    """One query (or no causal mask) and no window: the G query heads of a group run as G rows of one head, so K
    and V are read once per group instead of repeated per call (at Tk 4096, H 32, Hkv 8, D 128, one thread: 3.8
    ms per decode step instead of 77). Same results and gradients as repeating them."""
    import apt_kernels.ops.tva as tva_ops
    from apt_kernels.reference.tva import repeat_kv

    if impl == "cpu_native" and not tva_ops.impl_status(impl)[0]:
        pytest.skip(tva_ops.impl_status(impl)[1])
    g = torch.Generator().manual_seed(Tq)
    B, H, Hkv, Tk, D = 2, 8, 2, 13, 16
    q, delta = (torch.randn(B, H, Tq, D, generator=g, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g, requires_grad=True) for _ in range(2))
    gate = torch.rand(B, Tq, H, generator=g, requires_grad=True)
    kpm = (torch.rand(B, Tk, generator=g) < 0.3) if pad else None
    kr, vr = repeat_kv(q, k, v)
    want = tva_ops.tva_attention(q, kr, vr, delta, gate, 0.3, causal, key_padding_mask=kpm, impl="reference")

    def no_repeat(q_, k_, v_):
        assert k_.shape[1] == q_.shape[1], "k/v were repeated"
        return k_, v_

    monkeypatch.setattr(tva_ops, "repeat_kv", no_repeat)
    o = tva_ops.tva_attention(q, k, v, delta, gate, 0.3, causal, key_padding_mask=kpm, impl=impl)
    torch.testing.assert_close(o, want, atol=2e-6, rtol=2e-6)
    gy = torch.randn(o.shape, generator=g)
    for a, b in zip(torch.autograd.grad(o, (q, k, v, delta, gate), gy),
                    torch.autograd.grad(want, (q, k, v, delta, gate), gy)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("impl", ["cpu_native", "auto"])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_training_saves_kv_unrepeated(impl, Hkv):
    """The fused ops repeat grouped-query k/v for their kernels only: autograd keeps them as given (Hkv heads), the
    backward sums dk/dv over each group (was: a repeated copy of K and V saved per layer, G times the memory)."""
    import apt_kernels.ops.tva as tva_ops
    from apt_kernels.reference.tva import check_gqa_saves_kv_unrepeated

    if not tva_ops.impl_status("cpu_native")[0]:
        pytest.skip(tva_ops.impl_status("cpu_native")[1])
    for kw in (dict(causal=True), dict(causal=True, window=5, sinks=1), dict(causal=False)):
        check_gqa_saves_kv_unrepeated(lambda *a, **k: tva_ops.tva_attention(*a, **k, impl=impl), Hkv, **kw)


@pytest.mark.parametrize("flag", [0, 1, 1.0, torch.tensor(True)])
def test_gqa_decode_still_checks_the_causal_flag(flag):
    from apt_kernels.ops.tva import tva_attention

    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="causal: expected a bool"):  # the head fold had skipped check_flag
        tva_attention(q, k, k, causal=flag)


def test_reference_scales_before_the_product():
    """fp32 q·k past 3.4e38 whose scaled scores fit: the reference multiplied after the product (inf, a NaN
    output); SDPA's math path scales first."""
    from apt_kernels.ops.tva import tva_attention

    g = torch.Generator().manual_seed(3)
    q = (torch.randn(1, 2, 5, 16, generator=g) * 2e18).clamp(min=1e18)  # every q·k ~ 1e38..1e39
    o = tva_attention(q, q, q, impl="reference")
    assert torch.isfinite(o).all()
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
    torch.testing.assert_close(o.double(), want, rtol=1e-4, atol=0)
