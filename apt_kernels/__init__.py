"""apt_kernels: fused TVA attention, MoE routing/dispatch/combine and Mamba selective scan, each with a pure-PyTorch
reference, Triton and native (C++/CUDA) implementations. Never imports ``apt``.

Public names are loaded lazily so that ``import apt_kernels`` stays cheap and never fails because an optional back
end (Triton, the compiled module) is missing; ask :mod:`apt_kernels.backends` what is available and why.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (one line per name; each family owns its block). Every name in an
# apt_kernels/ops/*.py ``__all__`` is here, except the back-end introspection helpers (``impl_status``,
# ``resolve_impl``, ``IMPLS``, ``cpu_status``, ``cuda_status``, ``CHUNK``, ``CUDA_MAX_N``): several families define
# them, so they stay qualified (``apt_kernels.ops.tva.impl_status``). tests/test_exports.py checks both halves.
_LAZY: dict[str, str] = {
    # shared
    "running_mean": "apt_kernels.ops.running_mean",
    "running_mean_native": "apt_kernels.ops.running_mean",
    "running_mean_ref": "apt_kernels.reference.common",
    # TVA attention
    "tva_attention": "apt_kernels.ops.tva",
    "tva_attention_cpu": "apt_kernels.ops.tva",
    "tva_attention_cuda": "apt_kernels.ops.tva",
    "flash_attn_func": "apt_kernels.ops.flash_api",
    "flash_attn_varlen_func": "apt_kernels.ops.flash_api",
    "flash_attn_qkvpacked_func": "apt_kernels.ops.flash_api",
    "flash_attn_kvpacked_func": "apt_kernels.ops.flash_api",
    "flash_attn_varlen_qkvpacked_func": "apt_kernels.ops.flash_api",
    "flash_attn_varlen_kvpacked_func": "apt_kernels.ops.flash_api",
    "flash_attn_with_kvcache": "apt_kernels.ops.flash_api",
    "tva_attention_ref": "apt_kernels.reference.tva",
    "TVAAttention": "apt_kernels.layers.tva",
    # MoE
    "Routing": "apt_kernels.ops.moe",
    "moe_route": "apt_kernels.ops.moe",
    "moe_dispatch": "apt_kernels.ops.moe",
    "moe_combine": "apt_kernels.ops.moe",
    "moe_grouped_ffn": "apt_kernels.ops.moe",
    "moe_aux_losses": "apt_kernels.ops.moe",
    "MoEFFN": "apt_kernels.layers.moe",
    # selective scan
    "selective_scan_fn": "apt_kernels.ops.scan",
    "selective_state_update": "apt_kernels.ops.scan",
    "selective_scan_cpu": "apt_kernels.ops.scan",
    "selective_scan_triton": "apt_kernels.ops.scan",
    "selective_scan_cuda": "apt_kernels.ops.scan",
    "selective_state_update_cpu": "apt_kernels.ops.scan",
    "selective_state_update_triton": "apt_kernels.ops.scan",
    "selective_state_update_cuda": "apt_kernels.ops.scan",
    "selective_scan_ref": "apt_kernels.reference.scan",
    "selective_state_update_ref": "apt_kernels.reference.scan",
}

__all__ = sorted(_LAZY) + ["__version__", "backends", "testing", "load_ops"]


def load_ops() -> None:
    """Register every ``torch.ops.apt.*`` custom op now. ``import apt_kernels`` is lazy and registers none, so a
    process that deserializes a program calling them (``torch.export.load``, an AOTInductor package) needs this
    first; otherwise torch fails with "failed to resolve torch.ops.apt.<op>". Besides ``apt_kernels.ops`` it imports
    the Triton TVA module when Triton is installed: its ops (``apt::tva_attention_triton`` and its backward) live
    there, with the kernels, and ``apt_kernels.ops`` imports it only at the first Triton TVA call."""
    importlib.import_module("apt_kernels.ops")
    from .backends import _triton_import

    if _triton_import()[0]:
        importlib.import_module("apt_kernels.triton.tva")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("backends", "testing", "reference", "ops"):
        return importlib.import_module(f"apt_kernels.{name}")
    raise AttributeError(f"module 'apt_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
