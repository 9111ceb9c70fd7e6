"""Audit of the model layers (TVAAttention, MoEFFN) against TVA.md / MOE.md: argument checks that name the argument,
and layer behaviour the per-op tests do not reach."""
import math

import pytest
import torch

from apt_kernels.layers.moe import MoEFFN
from apt_kernels.layers.tva import TVAAttention


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(d_model=True, num_heads=1), ValueError, "d_model"),
    (dict(num_heads=True), ValueError, "num_heads"),
    (dict(window=True), ValueError, "window"),
    (dict(s=False), ValueError, "s"),
    (dict(tau="0.2"), TypeError, "tau"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(alpha=None), TypeError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(dropout="0.1"), TypeError, "dropout"),
])
def test_tva_constructor_names_bad_argument(kwargs, exc, name):
    args = dict(d_model=16, num_heads=2, core="reference")
    args.update(kwargs)
    with pytest.raises(exc, match=f"^{name}:"):
        TVAAttention(**args)


def test_tva_forward_names_bad_argument():
    layer = TVAAttention(16, 2, core="reference")
    x = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="^x:"):
        layer(x.tolist())
    with pytest.raises(TypeError, match="^x:"):
        layer(torch.zeros(2, 5, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="^key_padding_mask:"):
        layer(x, [[False] * 5] * 2)
    with pytest.raises(TypeError, match="^cache:"):
        layer(x, cache=object())
    with pytest.raises(ValueError, match="^batch_size:"):
        layer.new_cache(True)
    with pytest.raises(ValueError, match="^max_len:"):
        layer.new_cache(2, max_len=True)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(balance_coef="0.01"), TypeError, "balance_coef"),
    (dict(z_coef=None), TypeError, "z_coef"),
    (dict(balance_coef=float("nan")), ValueError, "balance_coef"),
])
def test_moe_constructor_names_bad_argument(kwargs, exc, name):
    with pytest.raises(exc, match=f"^{name}:"):
        MoEFFN(4, 8, 4, router_impl="reference", **kwargs)


def test_moe_forward_names_bad_argument():
    m = MoEFFN(4, 8, 4, router_impl="reference")
    with pytest.raises(TypeError, match="^x:"):
        m(torch.zeros(3, 4, dtype=torch.long))
    m.temperature = math.inf  # would make every router distribution uniform
    with pytest.raises(ValueError, match="^temperature:"):
        m(torch.randn(3, 4))


def test_layers_check_their_settings_at_construction():
    """From a docstring audit: these were accepted and failed at the first forward (or, for the flags, counted a
    string as True)."""
    import pytest
    import torch

    from apt_kernels import MoEFFN, TVAAttention
    from apt_kernels.testing import tolerance

    for kw, exc, frag in [({"capacity_factor": -1.0}, ValueError, "capacity_factor: expected a finite number > 0"),
                          ({"min_capacity": -1}, ValueError, "min_capacity: expected >= 0"),
                          ({"shared_expert": "no"}, TypeError, "shared_expert: expected a bool"),
                          ({"noisy_gating": 1}, TypeError, "noisy_gating: expected a bool")]:
        with pytest.raises(exc, match=frag):
            MoEFFN(8, 16, 4, **kw)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        TVAAttention(8, 2, causal="no")
    with pytest.raises(ValueError, match="head dim above 256"):
        TVAAttention(600, 2)
    layer = TVAAttention(8, 2)
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor, got torch.int64"):
        layer(torch.randn(1, 3, 8), key_padding_mask=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype: no tolerance for torch.int64"):
        tolerance(torch.int64)


def test_float64_layers_keep_float64_in_their_accumulations():
    """A float64 TVA layer's gate mean (non-causal, and a cache's running sum) and a float64 Mamba mixer's A, D and
    dt bias stay float64: they went through .float(), leaving a float64 model 1e-9..1e-7 off its own math and its
    cached decode 4e-9 off its full forward."""
    from apt.modeling.mamba import MambaMixer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g) * 3 + 1
    with torch.no_grad():
        m = TVAAttention(12, 3, causal=False).double()
        assert torch.allclose(m._gate_input(x, None, None), x.mean(1, keepdim=True).expand_as(x), rtol=0, atol=1e-14)
        m = TVAAttention(12, 3).double()
        cache = m.new_cache(2)
        full = m(x)
        parts = torch.cat([m(x[:, :3], cache=cache), m(x[:, 3:], cache=cache)], dim=1)
        assert cache.x_sum.dtype == torch.float64
        assert torch.allclose(parts, full, rtol=0, atol=1e-13)

    mixer = MambaMixer(8, d_state=4, d_conv=4).double()
    seen = []
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=g)
    with torch.no_grad():
        mixer(x)  # picks its scan
        real = mixer.scan_fn

        def spy(u, delta, A, B, C, D, z, delta_bias, **kw):
            seen.append((A.dtype, D.dtype, delta_bias.dtype))
            return real(u, delta, A, B, C, D, z, delta_bias=delta_bias, **kw)
        mixer._select = lambda t: setattr(mixer, "scan_fn", spy)
        mixer(x)
    assert seen == [(torch.float64,) * 3]
    assert mixer.new_cache(2).ssm_state.dtype == torch.float64
    assert MambaMixer(8, d_state=4).new_cache(2).ssm_state.dtype == torch.float32
