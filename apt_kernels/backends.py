"""Which kernel back ends this process can use, each as ``(available, reason)``.

Providers (in ``apt``) and frontends that use ``apt_kernels`` directly ask here instead of probing themselves,
so every "unavailable" carries the same, specific reason.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from ._native import CPU_ISA_ENV, env_flag, native_cuda_status, native_family_status, native_module, native_status

__all__ = ["custom_op_must_dispatch", "autograd_free", "native_status", "native_family_status", "native_cuda_status",
           "triton_status", "compiled_triton_status", "cuda_device_status", "triton_interpret", "cpu_kernel_isas",
           "CPU_ISA_ENV"]



def cpu_kernel_isas() -> dict[str, str]:
    """The instruction-set build (generic, avx2, avx512) each C++ CPU kernel family runs now: the widest this CPU
    has, capped by its CPU_ISA_ENV variable. Empty without the compiled module; a family missing from an older
    build is left out."""
    if not native_status()[0]:
        return {}
    mod = native_module()
    return {fam: getattr(mod, f"{fam}_cpu_isa")() for fam in CPU_ISA_ENV if hasattr(mod, f"{fam}_cpu_isa")}


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, or any value Triton reads as on)."""
    return env_flag("TRITON_INTERPRET")


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


def fix_triton_interpreter_bf16_dot() -> bool:
    """Under TRITON_INTERPRET=1, make the interpreter's ``tl.dot`` right for bfloat16 operands; True when it is.

    Triton's interpreter keeps bfloat16 tensors as their uint16 bit patterns (numpy has no bfloat16) and its dot
    multiplies those integers. This wraps its ``create_dot`` to widen bfloat16 operands to float32 first, which is
    what a GPU computes (a bf16 x bf16 product is exact in fp32, and the accumulator is fp32). Idempotent; other
    dtypes are passed through untouched. Called by the Triton modules that use tl.dot when they are imported."""
    if not triton_interpret():
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception:  # no interpreter to fix
        return False
    builder = getattr(ti, "InterpreterBuilder", None)
    orig = getattr(builder, "create_dot", None)
    if orig is None or not hasattr(ti, "TensorHandle"):
        return False
    if getattr(orig, "_apt_bf16_fix", False):
        return True

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    @functools.wraps(orig)
    def create_dot(self, a, b, d, *args, **kwargs):
        return orig(self, widen(a), widen(b), d, *args, **kwargs)

    create_dot._apt_bf16_fix = True
    builder.create_dot = create_dot
    return True


def custom_op_must_dispatch() -> bool:
    """Whether a call must go through its torch custom op rather than straight to the kernel's body: under
    torch.compile, torch.jit.trace and under any dispatch mode (FakeTensorMode, FlopCounterMode, opcheck), which
    must see the op. Elsewhere, plain eager calls skip the custom op's dispatch, ~60-100 µs of Python per call
    (torch 2.13), more than a decode step's kernel."""
    # torch.jit.trace too: the kernels write their outputs through raw pointers, which the tracer cannot see, so a
    # traced body recorded only the torch.empty of each output and the traced module returned uninitialised memory
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 or torch.jit.is_tracing()


def torch_func_active(forward_ad: bool = False) -> bool:
    """Whether a torch.func transform (vmap, grad, jvp) is active, or with ``forward_ad`` also an open forward-mode
    AD level (torch.autograd.forward_ad), outside torch.compile (which traces both itself): the kernels cannot read
    the transforms' wrapped tensors, and the custom ops have no batching rule and no jvp."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or (forward_ad and torch.autograd.forward_ad._current_level >= 0)


def autograd_free(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a plain eager call on ``tensors`` (None entries skipped) has nothing for autograd to record, so an
    op's body may run without its autograd.Function: ``Function.apply`` binds its arguments through
    ``inspect.signature`` on every call (a Function with its own setup_context), ~15-20 µs of Python, as much as a
    decode step's kernel. False under a torch.func transform (its wrapped tensors only the Function unwraps or
    refuses) and inside a forward-mode AD level (torch.autograd.forward_ad), where the Function raises for the
    missing jvp instead of dropping the tangents; True under inference mode, where autograd records nothing."""
    if torch._C._are_functorch_transforms_active():
        return False
    if torch.is_inference_mode_enabled():
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)
