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
