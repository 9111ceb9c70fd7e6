"""Arguments of the wrong kind get a TypeError/ValueError naming them: a list for an optional TVA tensor (was an
AttributeError from the device check), None for a grouped-FFN weight, a TVA cache filled by another layer (was a
broadcast RuntimeError from torch, or keys broadcast into the wrong number of heads)."""
from __future__ import annotations

import pytest
import torch

import apt_kernels as ak
from apt_kernels.layers.tva import TVAAttention


def _qkv():
    torch.manual_seed(0)
    q, k, v, d = (torch.randn(1, 2, 4, 8) for _ in range(4))
    return q, k, v, d, torch.randn(1, 4, 2)


@pytest.mark.parametrize("fn", [ak.tva_attention, ak.tva_attention_ref, ak.tva_attention_cpu])
@pytest.mark.parametrize("arg", ["delta", "gate", "key_padding_mask"])
def test_tva_optional_arg_not_a_tensor(fn, arg):
    q, k, v, d, g = _qkv()
    kw = dict(delta=d, gate=g, coef=0.5)
    kw[arg] = [[False] * 4] if arg == "key_padding_mask" else kw[arg].tolist()
    with pytest.raises(TypeError, match=f"^{arg}: expected a torch.Tensor"):
        fn(q, k, v, **kw)


@pytest.mark.parametrize("missing", ["w_in", "w_out"])
def test_grouped_ffn_none_weight(missing):
    kw = dict(w_in=torch.randn(1, 8, 4), w_gate=torch.randn(1, 8, 4), w_out=torch.randn(1, 4, 8))
    kw[missing] = None
    with pytest.raises(TypeError, match=f"^{missing}: expected a torch.Tensor"):
        ak.moe_grouped_ffn(torch.randn(6, 8), torch.tensor([0, 6]), kw["w_in"], kw["w_gate"], kw["w_out"])


@pytest.mark.parametrize("d_model,heads", [(8, 4), (16, 2)])
def test_tva_cache_from_another_layer(d_model, heads):
    a, b = TVAAttention(8, 2), TVAAttention(d_model, heads)
    cache = a.new_cache(1)
    a(torch.randn(1, 3, 8), cache=cache)
    length = cache.length
    with pytest.raises(ValueError, match="^cache: .*another layer"):
        b(torch.randn(1, 1, d_model), cache=cache)
    assert cache.length == length and cache.pending is None
