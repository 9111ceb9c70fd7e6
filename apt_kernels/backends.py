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


def _interpreter():
    """(numpy, triton.language, triton.runtime.interpreter, its InterpreterBuilder) under TRITON_INTERPRET=1 with
    an interpreter to patch, else None."""
    if not triton_interpret():
        return None
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception:  # no interpreter to fix
        return None
    return np, tl, ti, getattr(ti, "InterpreterBuilder", None)


def fix_triton_interpreter_bf16_dot() -> bool:
    """Under TRITON_INTERPRET=1, make the interpreter's ``tl.dot`` right for bfloat16 operands; True when it is.

    Triton's interpreter keeps bfloat16 tensors as their uint16 bit patterns (numpy has no bfloat16) and its dot
    multiplies those integers. This wraps its ``create_dot`` to widen bfloat16 operands to float32 first, which is
    what a GPU computes (a bf16 x bf16 product is exact in fp32, and the accumulator is fp32). Idempotent; other
    dtypes are passed through untouched. Called by the Triton modules that use tl.dot when they are imported."""
    found = _interpreter()
    if found is None:
        return False
    np, tl, ti, builder = found
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


def _f32_to_bf16_bits(a, rtz: bool = False):
    """float32 ndarray -> its bfloat16 bit patterns (uint16): round to nearest even (a GPU's cvt.rn.bf16.f32 and
    torch's ``.to(torch.bfloat16)``), or toward zero with ``rtz``. Subnormals and infinities are exact bit
    operations; NaNs stay (quiet) NaNs with their sign."""
    import numpy as np

    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    hi = bits >> np.uint32(16)
    out = ((bits + (np.uint32(0x7FFF) + (hi & np.uint32(1)))) >> np.uint32(16)) if not rtz else hi  # NaNs may wrap
    out = out.astype(np.uint16)
    nan = np.isnan(a)
    if np.any(nan):
        out[nan] = hi[nan].astype(np.uint16) | np.uint16(0x0040)
    return out.reshape(a.shape)


def fix_triton_interpreter_bf16_casts() -> bool:
    """Under TRITON_INTERPRET=1, make the interpreter's float -> bfloat16 casts round to nearest even, as a GPU does
    (``x.to(tl.bfloat16)``, ``fp_downcast_rounding="rtne"``, and the implicit cast of ``tl.store`` to a bfloat16
    pointer); True when they do.

    Triton's interpreter (3.x, ``_convert_float``) truncates fp32 -> bf16 (about half of all casts one ulp off),
    mangles bf16 subnormals both ways, and casts fp64 -> bf16 with a numeric ``astype(uint16)`` (garbage). This
    wraps ``cast_impl`` and ``create_fp_to_fp`` to do those conversions with exact bit operations: bf16 -> fp32 is
    a 16-bit shift, fp32 -> bf16 rounds to nearest even (toward zero for ``"rtz"``), fp64 -> bf16 goes through
    fp32 as torch does. Idempotent; every other conversion is passed through untouched."""
    found = _interpreter()
    if found is None:
        return False
    np, tl, ti, builder = found
    cast_impl = getattr(builder, "cast_impl", None)
    fp_to_fp = getattr(builder, "create_fp_to_fp", None)
    if cast_impl is None or fp_to_fp is None or not hasattr(ti, "TensorHandle"):
        return False
    if getattr(cast_impl, "_apt_bf16_fix", False):
        return True
    try:
        rtz_mode = ti._ir.ROUNDING_MODE.RTZ
    except Exception:
        rtz_mode = None

    def convert(src, dst_type, rtz=False):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == tl.bfloat16 and d == tl.float32:
            data = (np.ascontiguousarray(src.data).astype(np.uint32) << np.uint32(16)).view(np.float32)
            return ti.TensorHandle(data.reshape(np.shape(src.data)), tl.float32)
        if d == tl.bfloat16 and (s == tl.float32 or (s == tl.float64 and not rtz)):
            return ti.TensorHandle(_f32_to_bf16_bits(np.asarray(src.data).astype(np.float32), rtz), tl.bfloat16)
        return None

    @functools.wraps(cast_impl)
    def patched_cast_impl(self, src, dst_type):
        out = convert(src, dst_type)
        return out if out is not None else cast_impl(self, src, dst_type)

    @functools.wraps(fp_to_fp)
    def patched_fp_to_fp(self, src, dst_type, rounding_mode):
        if rounding_mode is None or rounding_mode == rtz_mode or rounding_mode == ti._ir.ROUNDING_MODE.RTNE:
            out = convert(src, dst_type, rtz=rounding_mode is not None and rounding_mode == rtz_mode)
            if out is not None:
                return out
        return fp_to_fp(self, src, dst_type, rounding_mode)

    patched_cast_impl._apt_bf16_fix = True
    builder.cast_impl = patched_cast_impl
    builder.create_fp_to_fp = patched_fp_to_fp
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
