"""Which kernel back ends this process can use, each as ``(available, reason)``.

Providers (in ``apt``) and frontends that use ``apt_kernels`` directly ask here instead of probing themselves,
so every "unavailable" carries the same, specific reason.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ._native import native_cuda_status, native_family_status, native_status

__all__ = ["native_status", "native_family_status", "native_cuda_status", "triton_status", "compiled_triton_status",
           "cuda_device_status", "triton_interpret"]


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install should read as unavailable, not crash
        return False, f"triton failed to import ({exc})"
    return True, ""


def triton_status() -> tuple[bool, str]:
    """Triton kernels run on CUDA devices, or anywhere under TRITON_INTERPRET=1."""
    ok, why = _triton_import()
    if not ok:
        return ok, why
    if torch.cuda.is_available() or triton_interpret():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"


def compiled_triton_status() -> tuple[bool, str]:
    """Triton kernels compiled for a CUDA device (not the CPU interpreter): what GPU tests of the Triton paths need."""
    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    if triton_interpret():
        return False, "TRITON_INTERPRET=1 is set in this process"
    return triton_status()


def cuda_device_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "torch reports no CUDA device"
    return True, ""


def triton_version() -> str | None:
    ok, _ = _triton_import()
    if not ok:
        return None
    import triton

    return getattr(triton, "__version__", "unknown")
