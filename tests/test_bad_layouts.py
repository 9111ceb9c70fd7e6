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


def _shared(*shape):
    return torch.zeros(1).expand(*shape)  # every element at one address


@pytest.mark.skipif(not native_status()[0], reason="no native module")
def test_raw_bindings_refuse_outputs_whose_elements_share_memory():
    """The compiled module checks its outputs as the MoE bindings already did: an expanded (or otherwise
    overlapping) output took racing writes silently. The public wrappers allocate fresh outputs; this is for
    callers of apt_kernels._C."""
    from apt_kernels._native import cpu_module, view
    from apt_kernels.ops import scan as S

    # view() takes only a pointer: every tensor a call writes is held in a local (a temporary was freed before the
    # kernel wrote into it)
    m = cpu_module()
    x, out, shared3 = torch.randn(2, 5, 3), torch.empty(2, 5, 3), _shared(2, 5, 3)
    m.running_mean_cpu(view(x), None, view(out))
    with pytest.raises(ValueError, match="^out: is an output, so its elements must not share memory"):
        m.running_mean_cpu(view(x), None, view(shared3))
    with pytest.raises(ValueError, match="^grad_x: is an output"):
        m.running_mean_backward_cpu(view(x), None, view(shared3))

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    o, lse, go, shared4 = torch.empty(1, 2, 4, 8), torch.empty(1, 2, 4), torch.randn(1, 2, 4, 8), _shared(1, 2, 4, 8)
    fwd = (view(q), view(k), view(v), None, None, 0.0, True, 0, 0, None, 0.35)
    with pytest.raises(ValueError, match="^o: is an output"):
        m.tva_forward_cpu(*fwd, view(shared4), view(lse))
    m.tva_forward_cpu(*fwd, view(o), view(lse))
    for bad in ("dq", "dk", "dv"):
        grads = {n: torch.empty(1, 2, 4, 8) for n in ("dq", "dk", "dv")}
        grads[bad] = shared4
        with pytest.raises(ValueError, match=f"^{bad}: is an output"):
            m.tva_backward_cpu(view(go), view(q), view(k), view(v), view(o), view(lse), None,
                               None, 0.0, True, 0, 0, None, 0.35, *(view(grads[n]) for n in ("dq", "dk", "dv")),
                               None, None)

    a = _scan()
    Ap, Bp, Cp, Dp, bp = S._pack_params(a["A"], a["B"], a["C"], a["D"], a["delta_bias"], torch.float32)
    _, last, ckpt = S._fwd_outputs(a["u"], a["A"], S.CHUNK)
    shared_out = _shared(2, 4, 8)
    with pytest.raises(ValueError, match="^out: is an output"):
        m.selective_scan_fwd_cpu(view(a["u"]), view(a["delta"]), view(Ap), view(Bp), view(Cp), view(Dp),
                                 view(a["z"]), view(bp), view(shared_out), view(last), view(ckpt), True,
                                 S.CHUNK)
    s = _step()
    Ap, Bp, Cp, Dp, bp = S._pack_step_params(s["A"], s["B"], s["C"], s["D"], s["dt_bias"], torch.float32)
    shared_y = _shared(2, 4)
    with pytest.raises(ValueError, match="^y: is an output"):
        m.selective_state_update_cpu(view(s["state"]), view(s["x"]), view(s["dt"]), view(Ap), view(Bp), view(Cp),
                                     view(Dp), view(s["z"]), view(bp), view(shared_y), True)


def test_in_place_caches_and_state_pools_refuse_expanded_views():
    """flash_attn_with_kvcache writes k/v into the caches and selective_state_update(state_batch_indices=) into the
    pool: an expanded (stride-0) one is refused by name. The cache took every row's new keys in one slot and
    answered silently wrong; the pool failed in torch's index_copy_."""
    from apt_kernels.ops.flash_api import flash_attn_with_kvcache

    cache = torch.randn(1, 10, 2, 16).expand(2, 10, 2, 16)
    q, k = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="^k_cache: is updated in place"):
        flash_attn_with_kvcache(q, cache, torch.randn(2, 10, 2, 16), k=k, v=k.clone(), cache_seqlens=lens)
    with pytest.raises(ValueError, match="^v_cache: is updated in place"):
        flash_attn_with_kvcache(q, torch.randn(2, 10, 2, 16), cache, k=k, v=k.clone(), cache_seqlens=lens)
    with pytest.raises(ValueError, match="^k_cache: is updated in place"):  # a pool written back through rows
        flash_attn_with_kvcache(q, torch.randn(1, 10, 2, 16).expand(3, 10, 2, 16), torch.randn(3, 10, 2, 16), k=k,
                                v=k.clone(), cache_seqlens=lens, cache_batch_idx=torch.tensor([0, 2]))
    pool = torch.randn(1, 4, 3).expand(5, 4, 3)
    x, dt = torch.randn(2, 4), torch.rand(2, 4)
    args = (x, dt, -torch.rand(4, 3), torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="^state: is updated in place"):
        K.selective_state_update(pool, *args, state_batch_indices=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        K.selective_state_update(torch.randn(5, 4, 3), None, *args[1:], state_batch_indices=torch.tensor([0, 3]))


@pytest.mark.parametrize("sinks", [2**62, 2**63, 2**64])
def test_huge_sinks_mean_every_key_is_a_sink(sinks):
    # as a huge window means no window; 2**63 and up failed in the C++ binding's int64 with a signature dump
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    want = K.tva_attention_ref(q, k, v, window=3, sinks=8)
    for fn in (K.tva_attention, K.tva_attention_ref):
        torch.testing.assert_close(fn(q, k, v, window=3, sinks=sinks), want)
