"""Every public op refuses a sparse or nested tensor in any tensor argument with a TypeError naming it (the native
ops failed deep inside on a data pointer, the MoE reference in an op the sparse backend lacks, and the scan
reference ran on)."""
from __future__ import annotations

import warnings

import pytest
import torch

import apt_kernels as K
from apt_kernels.backends import native_status


def _tva():
    t = 8
    return dict(q=torch.randn(1, 2, t, 16), k=torch.randn(1, 2, t, 16), v=torch.randn(1, 2, t, 16),
                delta=torch.randn(1, 2, t, 16), gate=torch.rand(1, t, 2),
                key_padding_mask=torch.ones(1, t, dtype=torch.bool))


def _scan():
    return dict(u=torch.randn(2, 4, 8), delta=torch.rand(2, 4, 8), A=-torch.rand(4, 3), B=torch.randn(2, 3, 8),
                C=torch.randn(2, 3, 8), D=torch.randn(4), z=torch.randn(2, 4, 8), delta_bias=torch.randn(4))


def _step():
    return dict(state=torch.randn(2, 4, 3), x=torch.randn(2, 4), dt=torch.rand(2, 4), A=-torch.rand(4, 3),
                B=torch.randn(2, 3), C=torch.randn(2, 3), D=torch.randn(4), z=torch.randn(2, 4), dt_bias=torch.randn(4))


def _mean():
    return dict(x=torch.randn(2, 5, 4), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


def _native(case):
    return pytest.param(*case, marks=pytest.mark.skipif(not native_status()[0], reason="no native module"))


OPS = [
    (K.tva_attention_ref, _tva, dict(causal=True, coef=0.1)),
    _native((K.tva_attention_cpu, _tva, dict(causal=True, coef=0.1))),
    (K.tva_attention, _tva, dict(causal=True, coef=0.1)),
    (K.selective_scan_ref, _scan, {}),
    _native((K.selective_scan_cpu, _scan, {})),
    (K.selective_scan_fn, _scan, {}),
    (K.selective_state_update_ref, _step, {}),
    _native((K.selective_state_update_cpu, _step, {})),
    (K.running_mean_ref, _mean, {}),
    (K.running_mean, _mean, {}),
]


def _bad(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "sparse":
        return t.to_sparse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are a prototype"
        return torch.nested.nested_tensor(list(t.unbind(0)))


@pytest.mark.parametrize("how", ["sparse", "nested"])
@pytest.mark.parametrize("fn, make, kw", OPS)
def test_ops_refuse_sparse_and_nested_tensors(fn, make, kw, how):
    fn(**make(), **kw)  # the dense call runs
    for arg in make():
        args = make()
        args[arg] = _bad(args[arg], how)
        with pytest.raises(TypeError, match=f"^{arg}: expected a dense \\(strided\\) tensor"):
            fn(**args, **kw)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu_native", marks=pytest.mark.skipif(
    not native_status()[0], reason="no native module"))])
def test_moe_ops_refuse_sparse_tensors(impl):
    logits, x = torch.randn(10, 4), torch.randn(10, 6)
    with pytest.raises(TypeError, match="^logits: expected a dense"):
        K.moe_route(logits.to_sparse(), 2, impl=impl)
    r = K.moe_route(logits, 2, capacity_factor=1.0, impl=impl)
    with pytest.raises(TypeError, match="^x: expected a dense"):
        K.moe_dispatch(x.to_sparse(), r, impl=impl)
    with pytest.raises(TypeError, match="^expert_out: expected a dense"):
        K.moe_combine(K.moe_dispatch(x, r, impl=impl).to_sparse(), r, impl=impl)
    with pytest.raises(TypeError, match="^logits: expected a dense"):
        K.moe_aux_losses(logits.to_sparse(), r)
