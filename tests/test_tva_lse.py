"""tva_attention(..., return_lse=True): the attention's log-sum-exp (B, H, Tq), natural log, +inf on rows with no
visible key (flash-attn's softmax_lse convention), from every implementation, detached; attention over two key
ranges merged with it equals attention over all keys."""
from __future__ import annotations

import math

import pytest
import torch

import apt_kernels as K
from apt_kernels.ops.tva import impl_status, tva_attention
from apt_kernels.reference.tva import random_tva_inputs, tva_visible_mask

IMPLS = ["reference", "cpu_native", "auto"]


def _truth(q, k, v, causal, window, sinks, kpm, scale=None):
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1).double()
    s = (q.double() @ k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
    vis = tva_visible_mask(q.shape[2], k.shape[2], causal, window, sinks, kpm, q.device)
    lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1)
    return lse.masked_fill(~vis.any(-1), float("inf"))


def _need(impl):
    if impl == "cpu_native" and not impl_status(impl)[0]:
        pytest.skip(impl_status(impl)[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal,window,sinks,pad,Tq,Tk,hkv", [
    (True, None, 0, False, 7, 7, 2), (True, 3, 1, True, 9, 9, 2), (False, None, 0, True, 5, 11, 2),
    (True, None, 0, True, 1, 13, 1), (False, None, 0, False, 1, 6, 1), (True, 2, 0, True, 70, 70, 2)])
def test_lse_matches_logsumexp_of_the_visible_scores(impl, causal, window, sinks, pad, Tq, Tk, hkv):
    _need(impl)
    inp = random_tva_inputs(B=2, H=2, Tq=Tq, Tk=Tk, D=16, pad=pad, seed=Tq + Tk)
    if hkv == 1:  # multi-query: the decode fold's path for one query / no causal mask
        inp["k"], inp["v"] = inp["k"][:, :1].contiguous(), inp["v"][:, :1].contiguous()
    kw = dict(causal=causal, window=window, sinks=sinks)
    o, lse = tva_attention(**inp, **kw, impl=impl, return_lse=True)
    torch.testing.assert_close(o, tva_attention(**inp, **kw, impl=impl))
    want = _truth(inp["q"], inp["k"], inp["v"], causal, window, sinks, inp.get("key_padding_mask"))
    assert lse.shape == inp["q"].shape[:3] and lse.dtype == torch.float32 and not lse.requires_grad
    assert torch.equal(torch.isinf(lse), torch.isinf(want)) and (lse[torch.isinf(lse)] > 0).all()
    fin = torch.isfinite(want)
    torch.testing.assert_close(lse[fin].double(), want[fin], atol=2e-5, rtol=2e-5)
    if pad and causal and window is None and Tq == Tk:
        assert torch.isinf(lse).any()  # the padded inputs have rows that see no key: this case tests them


@pytest.mark.parametrize("impl", IMPLS)
def test_merging_two_key_ranges_with_lse_gives_full_attention(impl):
    """o = (o1·e^lse1 + o2·e^lse2) / (e^lse1 + e^lse2): split-KV / cascade attention as vLLM merges it."""
    _need(impl)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 32, generator=g)
    k, v = (torch.randn(1, 4, 50, 32, generator=g) for _ in range(2))
    o1, l1 = tva_attention(q, k[:, :, :20], v[:, :, :20], causal=False, impl=impl, return_lse=True)
    o2, l2 = tva_attention(q, k[:, :, 20:], v[:, :, 20:], causal=False, impl=impl, return_lse=True)
    o, lse = tva_attention(q, k, v, causal=False, impl=impl, return_lse=True)
    m = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - m)[..., None] + o2 * torch.exp(l2 - m)[..., None]
    torch.testing.assert_close(merged, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_lse_with_grad_and_the_tva_term(impl):
    _need(impl)
    inp = random_tva_inputs(B=1, H=2, Tq=40, D=16, requires_grad=True, seed=3)
    o, lse = tva_attention(**inp, impl=impl, return_lse=True)
    assert o.requires_grad and not lse.requires_grad  # detached: no gradient flows (or is silently dropped) there
    o.sum().backward()
    assert inp["q"].grad is not None and inp["delta"].grad is not None
    torch.testing.assert_close(lse.double(), _truth(inp["q"].detach(), inp["k"].detach(), inp["v"], True, None, 0,
                                                    None), atol=2e-5, rtol=2e-5)


def test_lse_fp64_reference_and_flag_check():
    inp = random_tva_inputs(B=1, H=1, Tq=4, D=8, dtype=torch.float64)
    _, lse = tva_attention(**inp, impl="reference", return_lse=True)
    assert lse.dtype == torch.float64
    with pytest.raises(TypeError, match="return_lse: expected a bool"):
        tva_attention(**inp, return_lse=1)


@pytest.mark.parametrize("name", ["tva_attention", "tva_attention_ref", "tva_attention_cpu"])
@pytest.mark.parametrize("flag", ["no", 0, None])
def test_every_entry_point_checks_return_lse(name, flag):
    if name == "tva_attention_cpu" and not impl_status("cpu_native")[0]:
        pytest.skip(impl_status("cpu_native")[1])
    inp = random_tva_inputs(B=1, H=1, Tq=3, D=8)
    with pytest.raises(TypeError, match="return_lse: expected a bool"):
        getattr(K, name)(**inp, return_lse=flag)
