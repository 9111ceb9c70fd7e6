"""Loader of the compiled module ``apt_kernels._C`` and the tensor-view convention it uses.

The native module never sees a ``torch.Tensor``: Python hands it ``(data_ptr, dtype_code, shape, strides, device)``
tuples (see :func:`view`) plus a CUDA stream as an integer, so the same build works across torch versions.
Loading never raises: when the module is missing or broken, :func:`native_status` says why and callers fall back.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Must match apt::DType in csrc/common/apt_common.h.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.bool: 6,
}

_module: Optional[ModuleType] = None
_reason: str = ""


def _load() -> None:
    global _module, _reason
    if os.environ.get("APT_DISABLE_NATIVE", "").lower() in ("1", "true", "yes"):
        _reason = "disabled by APT_DISABLE_NATIVE"
        return
    try:
        _module = importlib.import_module("apt_kernels._C")
    except ImportError as exc:  # not built (APT_NATIVE=OFF) or built for another Python
        _reason = f"compiled module apt_kernels._C not importable ({exc})"
        logger.debug("apt_kernels: %s", _reason)


# Load at import, not on first use: the first use may be inside torch.compile, where dynamo cannot trace an
# import (fullgraph=True fails, otherwise the graph breaks). Importing the .so is cheap and never raises.
_load()


def native_module() -> Optional[ModuleType]:
    """The compiled module, or None when it is unavailable (see :func:`native_status`)."""
    return _module


# torch.get_num_threads() last mirrored into the module, per Python thread (OpenMP's count is per calling thread).
_threads = threading.local()


def cpu_module() -> Optional[ModuleType]:
    """:func:`native_module`, for a call of its CPU kernels. Their OpenMP runtime is torch's only when both load
    the same ``libgomp.so.1`` (torch's CPU wheel); beside a runtime of another name (a wheel's hashed libgomp,
    Intel's libiomp5) ``torch.set_num_threads`` does not reach them. So this first gives the module torch's
    intra-op thread count for the calling thread: a data-loader worker's 1 or a benchmark's choice holds for the
    kernels as for torch's ops."""
    if _module is not None:
        n = torch.get_num_threads()
        if getattr(_threads, "n", None) != n and hasattr(_module, "set_num_threads"):
            _module.set_num_threads(n)
            _threads.n = n
    return _module


def native_status() -> tuple[bool, str]:
    """(available, reason) for the compiled CPU module."""
    return (_module is not None, _reason)


def native_family_status(family: str) -> tuple[bool, str]:
    """(available, reason) for one op family (csrc/<family>/) inside the compiled module: a module built from an
    older checkout may lack it."""
    ok, why = native_status()
    if not ok:
        return False, why
    if family not in list(getattr(_module, "families", [])):
        return False, f"apt_kernels._C was built without the {family!r} ops (rebuild: pip install .)"
    return True, ""


def native_cuda_status() -> tuple[bool, str]:
    """(available, reason) for the CUDA kernels inside the compiled module."""
    ok, why = native_status()
    if not ok:
        return False, why
    if not getattr(_module, "with_cuda", False):
        return False, "apt_kernels._C was built without CUDA (no nvcc at build time, or APT_CUDA=OFF)"
    if not torch.cuda.is_available():
        return False, "torch reports no CUDA device"
    return True, ""


def view(t: Optional[torch.Tensor]):
    """The tuple the native module takes for a tensor (None passes through as None)."""
    if t is None:
        return None
    try:
        code = DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels do not take dtype {t.dtype}") from None
    dev = -1 if t.device.type == "cpu" else (t.device.index if t.device.index is not None else torch.cuda.current_device())
    return (t.data_ptr(), code, tuple(t.shape), tuple(t.stride()), dev)


def current_stream(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device`` (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)
