"""Loader of the compiled module ``apt_kernels._C`` and the tensor-view convention it uses.

The native module never sees a ``torch.Tensor``: Python hands it ``(data_ptr, dtype_code, shape, strides, device)``
tuples (see :func:`view`) plus a CUDA stream as an integer, so the same build works across torch versions.
Loading never raises: when the module is missing or broken, :func:`native_status` says why and callers fall back.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import threading
from pathlib import Path
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


# Boolean environment variables, spelt as Triton reads its own (TRITON_INTERPRET: triton/_C getenv_bool): the
# project's flags and its reading of TRITON_INTERPRET must agree with Triton's, or apt says "set TRITON_INTERPRET=1"
# to a process that Triton already runs in the interpreter (TRITON_INTERPRET=on).
ENV_TRUE = ("1", "true", "yes", "on", "y")
ENV_FALSE = ("", "0", "false", "no", "off", "n")
_env_warned: set[tuple[str, str]] = set()


def env_flag(name: str, default: bool = False) -> bool:
    """The boolean environment variable ``name`` (case-insensitive 1/true/yes/on/y, or 0/false/no/off/n/empty;
    unset: ``default``). Any other value logs one warning per value and reads as ``default``, not silently."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    v = raw.lower()
    if v in ENV_TRUE:
        return True
    if v in ENV_FALSE:
        return False
    if (name, raw) not in _env_warned:
        _env_warned.add((name, raw))
        logger.warning("apt_kernels: %s=%r is not a boolean (1/true/yes/on or 0/false/no/off); read as %s", name, raw,
                       "on" if default else "off")
    return default


def _load() -> None:
    global _module, _reason
    if env_flag("APT_DISABLE_NATIVE"):
        _reason = "disabled by APT_DISABLE_NATIVE"
        return
    try:
        _module = importlib.import_module("apt_kernels._C")
    except ImportError as exc:  # not built (APT_NATIVE=OFF) or built for another Python
        _reason = f"compiled module apt_kernels._C not importable ({exc})"
        # a module that is there but does not load (another Python's build, a missing libgomp) is worth a warning:
        # every op would run on the reference, silently; a build without one (APT_NATIVE=OFF) is a choice. Found
        # but failing to load is any ImportError other than "no module named apt_kernels._C" (an editable install
        # keeps _C in site-packages, not next to this file); another Python's build is a file beside this one.
        present = not (isinstance(exc, ModuleNotFoundError) and exc.name == "apt_kernels._C") \
            or any(Path(__file__).parent.glob("_C.*"))
        (logger.warning if present else logger.debug)("apt_kernels: %s; the ops use the reference "
                                                      "implementations", _reason)


# The C++ CPU kernel families built once per instruction set, and the variable that caps each (generic|avx2).
CPU_ISA_ENV = {"tva": "APT_TVA_CPU_ISA", "scan": "APT_SCAN_CPU_ISA", "moe": "APT_MOE_CPU_ISA"}


def _warn_bad_isa_caps() -> None:
    """The C++ side reads the CPU_ISA_ENV variables and takes any value other than generic / avx2 (case-sensitive)
    as no cap: say so rather than run the widest build silently (APT_TVA_CPU_ISA=AVX2 looked like a cap)."""
    for var in CPU_ISA_ENV.values():
        value = os.environ.get(var)
        if value is not None and value not in ("", "generic", "avx2", "avx512"):
            logger.warning("apt_kernels: %s=%r is not one of generic, avx2, avx512 (lower case); it caps nothing",
                           var, value)


# Load at import, not on first use: the first use may be inside torch.compile, where dynamo cannot trace an
# import (fullgraph=True fails, otherwise the graph breaks). Importing the .so is cheap and never raises.
_load()
_warn_bad_isa_caps()


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


def _serial_after_fork() -> None:
    # A fork()ed child has none of its parent's OpenMP threads, but GNU libgomp still counts on them: the child's
    # first parallel region waits on them forever (torch's own ops as well; its DataLoader workers call
    # torch.set_num_threads(1) for that reason). So in a child the kernels run on the calling thread until torch's
    # thread count is changed there (the mirror above then passes it on; set back to the parent's count, it is
    # not seen as a change). Where the module shares torch's libgomp this also makes torch's own ops in the child
    # serial, which keeps them from the same hang.
    if _module is not None and hasattr(_module, "set_num_threads"):
        _module.set_num_threads(1)
        _threads.n = torch.get_num_threads()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_after_fork)


def native_status() -> tuple[bool, str]:
    """(available, reason) for the compiled CPU module."""
    return (_module is not None, _reason)


# the op families csrc/ registers (APT_REGISTER_OPS); a module built from an older checkout may lack some
FAMILIES = ("common", "host_pool", "tva", "scan_cpu", "scan_cuda", "moe", "moe_cuda")


def native_family_status(family: str) -> tuple[bool, str]:
    """(available, reason) for one op family (:data:`FAMILIES`) inside the compiled module: a module built from an
    older checkout may lack it."""
    if family not in FAMILIES:  # a typo ("scan") read as a module to rebuild
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    ok, why = native_status()
    if not ok:
        return False, why
    if family not in list(getattr(_module, "families", [])):
        return False, f"apt_kernels._C was built without the {family!r} ops (rebuild: pip install .)"
    return True, ""


def native_cuda_status(device: Optional[torch.device] = None) -> tuple[bool, str]:
    """(available, reason) for the CUDA kernels inside the compiled module (on ``device``'s GPU when given, else
    the current one)."""
    ok, why = native_status()
    if not ok:
        return False, why
    if not getattr(_module, "with_cuda", False):
        return False, "apt_kernels._C was built without CUDA (no nvcc at build time, or APT_CUDA=OFF)"
    if not torch.cuda.is_available():
        return False, "torch reports no CUDA device"
    # The kernels are built for sm_80 and up (APT_CUDA_ARCHS, default 80;90: sm_80/sm_90 images + compute_80/90
    # PTX, which the driver cannot JIT for an older GPU; tva_cuda_tc.cu needs mma.sync m16n8k16 and cp.async, so no
    # build for sm_7x compiles at all). On a T4 / V100 every launch would fail with "no kernel image is available":
    # report them unavailable so that impl="auto" falls back to Triton / the references. Only once CUDA is
    # initialised (a CUDA tensor exists): asking for the capability initialises it, which must not happen here before
    # a fork.
    if torch.cuda.is_initialized():
        index = device.index if device is not None and device.type == "cuda" and device.index is not None \
            else torch.cuda.current_device()
        major, minor = _capability(index)
        if (major, minor) < MIN_CUDA_CAPABILITY:
            return False, (f"the CUDA kernels need compute capability {MIN_CUDA_CAPABILITY[0]}."
                           f"{MIN_CUDA_CAPABILITY[1]} or newer (sm_80+), GPU {index} is sm_{major}{minor}")
    return True, ""


MIN_CUDA_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def view(t: Optional[torch.Tensor]):
    """The tuple the native module takes for a tensor (None passes through as None)."""
    if t is None:
        return None
    try:
        code = DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"native kernels do not take dtype {t.dtype}") from None
    # get_device(): -1 on the CPU, else the CUDA index; torch.Size passes as the tuple it is. A decode step makes
    # five to ten of these per call: t.device and tuple() copies made each ~1.9 µs, this ~1.1 µs.
    return (t.data_ptr(), code, t.shape, t.stride(), t.get_device())


def current_stream(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device`` (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)


# ---- pooled host outputs (csrc/common/host_pool.cpp) --------------------------------------------------------------
# Large CPU outputs come from the module's caching pool instead of torch.empty: torch's allocator hands every block
# over 32 MB back to the OS (glibc maps each afresh), so a kernel that writes such an output first waits for the OS
# to fault in and zero its pages, which for the MoE dispatch buffer takes as long as the copy itself. Smaller
# blocks stay in glibc's heap and gain nothing.
HOST_POOL_MIN_BYTES = 1 << 20
HOST_CACHE_ENV = "APT_HOST_CACHE_MB"
_DEFAULT_HOST_CACHE = 1 << 30
# the module when it has the pool (a module built from an older checkout may not)
_pool_module: Optional[ModuleType] = _module if hasattr(_module, "host_empty") else None
_host_pool = False  # outputs come from the pool: it exists, its cap is > 0, and torch took its capsules
_host_pool_refused: Optional[str] = None  # why torch.from_dlpack refused the pool's capsule, once it did


# the pool counts bytes in an int64: a larger cap (APT_HOST_CACHE_MB=1e30, "no limit") is that cap, which no
# machine reaches (it failed the import with a pybind "incompatible function arguments" TypeError)
_MAX_HOST_CACHE = (1 << 63) - 1


def _host_cache_limit_from_env() -> int:
    raw = os.environ.get(HOST_CACHE_ENV)
    if raw is None or raw.strip() == "":
        return _DEFAULT_HOST_CACHE
    try:
        mb = float(raw)
        if not mb >= 0 or mb == float("inf"):
            raise ValueError
    except ValueError:
        # import never raises (module docstring): say what was wrong and keep the default
        logger.warning("apt_kernels: %s=%r is not a number of MiB >= 0; using the default %d MiB", HOST_CACHE_ENV,
                       raw, _DEFAULT_HOST_CACHE >> 20)
        return _DEFAULT_HOST_CACHE
    return min(int(mb * (1 << 20)), _MAX_HOST_CACHE)


def set_host_cache_limit(nbytes: int) -> None:
    """Caps the bytes the host pool keeps for reuse once their tensors are freed (default 1 GiB, or
    ``APT_HOST_CACHE_MB``); 0 turns the pool off, so later outputs come from ``torch.empty``. Blocks held beyond the
    new cap are freed now."""
    global _host_pool, _host_pool_refused
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes: expected an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes: expected a byte count >= 0, got {nbytes}")
    if _pool_module is None:
        return
    nbytes = min(nbytes, _MAX_HOST_CACHE)
    _pool_module.host_pool_set_limit(nbytes)
    _trim_malloc()  # the blocks over the new cap were freed: give their pages back (see empty_host_cache)
    _host_pool = nbytes > 0
    _host_pool_refused = None  # asked for again: the next large output tries torch.from_dlpack again


def empty_host_cache() -> None:
    """Frees every block the host pool holds for reuse (as ``torch.cuda.empty_cache`` does for the GPU); blocks of
    live tensors go back when torch frees those tensors."""
    if _pool_module is not None:
        _pool_module.host_pool_empty_cache()
        _trim_malloc()


def _trim_malloc() -> None:
    # The pool's blocks come from aligned_alloc: glibc keeps the ones it served from its heap after free() (its
    # mmap threshold rises to 32 MiB once a large block was freed), so emptying the pool lowered the RSS by a
    # fraction of what it held. malloc_trim hands the free pages back to the OS.
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS; CDLL(None) is a TypeError on Windows)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def host_cache_stats() -> dict[str, int]:
    """The host pool's counters: ``limit_bytes``, ``cached_bytes`` / ``cached_blocks`` (held for reuse),
    ``in_use_bytes`` (in live tensors), ``hits`` and ``misses`` (requests served from a held block or not). Empty
    without the compiled module."""
    if _pool_module is None:
        return {}
    return dict(_pool_module.host_pool_stats())


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, contiguous, for a kernel that writes every element. From
    :data:`HOST_POOL_MIN_BYTES` on, the memory is a pooled block that torch hands back (through the DLPack deleter)
    when the tensor's storage dies, so reuse never races a live tensor. Unlike ``torch.empty``'s, its storage cannot
    be resized in place (``resize_`` raises)."""
    global _host_pool, _host_pool_refused
    if _host_pool and math.prod(shape) * dtype.itemsize >= HOST_POOL_MIN_BYTES:
        capsule = _pool_module.host_empty(list(shape), DTYPE_CODES[dtype])
        try:
            return torch.from_dlpack(capsule)
        except Exception as exc:  # a torch that no longer takes unversioned DLPack capsules: off for good
            _host_pool = False
            _host_pool_refused = f"{type(exc).__name__}: {exc}"
            del capsule  # unconsumed, it gives its block back now (the traceback would keep it alive)
            _pool_module.host_pool_set_limit(0)  # the blocks it held go back too, and its stats say it is off
            logger.warning("apt_kernels: the host pool is off: torch.from_dlpack refused its capsule (%s); large "
                           "CPU outputs come from torch.empty", _host_pool_refused)
    return torch.empty(shape, dtype=dtype)


def host_pool_status() -> tuple[bool, str]:
    """(on, why): whether large native CPU outputs come from the host pool now, and what it keeps or why it is
    off (no compiled module, a cap of 0, or a torch that refused its DLPack capsules)."""
    if _pool_module is None:
        return False, "unavailable (needs apt_kernels._C)"
    if _host_pool_refused is not None:
        return False, f"off: torch.from_dlpack refused its capsule ({_host_pool_refused}); outputs use torch.empty"
    if not _host_pool:  # with the module there and no refusal, only a cap of 0 turns it off
        return False, f"off (cap 0: {HOST_CACHE_ENV}=0 or set_host_cache_limit(0))"
    limit = int(_pool_module.host_pool_stats()["limit_bytes"])
    return True, f"keeps up to {limit / 2**20:g} MiB of freed native CPU outputs for reuse ({HOST_CACHE_ENV})"


if _pool_module is not None:
    set_host_cache_limit(_host_cache_limit_from_env())
