"""The public surface of apt_kernels: every op an ``apt_kernels/ops`` module lists in ``__all__`` is reachable as
``apt_kernels.<name>`` (the same object), except the per-family back-end helpers whose names several families share."""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import apt_kernels
import apt_kernels.ops

# defined by several families (ops.tva and ops.moe both have impl_status / resolve_impl / IMPLS), so they stay
# qualified: apt_kernels.ops.<family>.<name>
QUALIFIED_ONLY = {"impl_status", "resolve_impl", "IMPLS", "cpu_status", "cuda_status", "CHUNK", "CUDA_MAX_N"}

OPS_MODULES = ["apt_kernels.ops"] + [f"apt_kernels.ops.{m.name}"
                                     for m in pkgutil.iter_modules(apt_kernels.ops.__path__)]


@pytest.mark.parametrize("modname", OPS_MODULES)
def test_every_public_op_is_exported_at_top_level(modname):
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    assert names, f"{modname} declares no __all__"
    missing = []
    for name in names:
        assert hasattr(mod, name), f"{modname}.__all__ lists {name!r}, which it does not define"
        if name in QUALIFIED_ONLY:
            continue
        if name not in apt_kernels.__all__ or getattr(apt_kernels, name, None) is not getattr(mod, name):
            missing.append(name)
    assert not missing, f"{modname}: public names not exported as apt_kernels.<name>: {missing}"


def test_qualified_only_names_are_real():
    """The exception list stays honest: each name is in some ops module's __all__."""
    listed = set()
    for modname in OPS_MODULES:
        listed |= set(importlib.import_module(modname).__all__)
    assert QUALIFIED_ONLY <= listed, QUALIFIED_ONLY - listed


def test_top_level_all_resolves():
    for name in apt_kernels.__all__:
        assert getattr(apt_kernels, name) is not None, name
    assert set(apt_kernels.__all__) <= set(dir(apt_kernels))


def test_moe_aux_losses_from_the_top_level():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    routing = apt_kernels.moe_route(logits, k=2, impl="reference")
    aux = apt_kernels.moe_aux_losses(logits, routing)
    assert {"balance_loss", "z_loss"} <= set(aux)
    assert torch.isfinite(aux["balance_loss"]) and torch.isfinite(aux["z_loss"])


def test_api_audit_fixes():
    """From a docstring-vs-behaviour audit: one string is a name, not its characters; flags are bools on the
    explicit CPU ops too; generate_tokens checks top_k / top_p as generate does; apt.select / apt.kinds exist."""
    import pytest
    import torch

    import apt
    import apt_kernels as K
    from apt.core.config import load_profile
    from apt.core.registry import Provider, Registry
    from apt.inference import generate_tokens
    from apt.modeling import ModelBuilder

    assert apt.select("scan", "reference").name == "reference" and "scan" in apt.kinds()
    assert load_profile("tiny_debug", plugins="voter")["plugins"]["enabled"] == ["voter"]
    reg = Registry(load_builtin=False)
    reg.register(type("R", (Provider,), dict(kind="scan", name="r", is_default=True, selective_scan_fn=len,
                                               selective_state_update=len)))
    assert reg.select("scan", "r").fallback_reason == ""
    u, d = torch.randn(1, 2, 4), torch.rand(1, 2, 4)
    A, B, C = -torch.rand(2, 3), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    if K.backends.native_status()[0]:
        with pytest.raises(TypeError, match="return_last_state: expected a bool"):
            K.selective_scan_cpu(u, d, A, B, C, return_last_state="no")
        with pytest.raises(TypeError, match="dt_softplus: expected a bool"):
            K.selective_state_update_cpu(torch.zeros(1, 2, 3), u[..., 0], d[..., 0], A, B[..., 0], C[..., 0],
                                         dt_softplus=1)
    m = ModelBuilder(load_profile("tiny_debug", ["model.d_model=32", "model.num_layers=1", "model.num_heads=2"]),
                     vocab_size=257).build()
    for kw, frag in [({"top_k": -1}, "top_k: must be an int >= 0"), ({"top_p": 2.0}, "top_p: must be in"),
                     ({"temperature": -1.0}, "temperature: expected")]:
        with pytest.raises(ValueError, match=frag):
            generate_tokens(m, [1, 2], 3, **kw)
