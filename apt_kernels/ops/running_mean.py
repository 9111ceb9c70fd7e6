"""``running_mean``: causal running mean over time (TVA's gate input), end to end through the native module.

The C++ kernel (csrc/common/running_mean_cpu.cpp) takes pointers/shapes/strides; here it is wrapped as the custom op
``apt::running_mean`` with a fake (meta) implementation and an autograd formula whose backward is a second native op,
and, for plain eager calls, as an autograd.Function over the same bodies.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .._native import cpu_module, native_status, view
from .._autograd import refuse_transformed
from ..backends import autograd_free, custom_op_must_dispatch, torch_func_active
from ..reference.common import check_running_mean_args as _check, running_mean_ref

logger = logging.getLogger(__name__)

__all__ = ["running_mean", "running_mean_native"]


def _forward_body(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty_like(x)
    cpu_module().running_mean_cpu(view(x), view(keep), view(out))
    return out


def _backward_body(grad_out: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    # the kernel reads grad_out through its strides (an expanded or transposed gradient is not copied)
    grad_x = torch.empty_like(grad_out)
    cpu_module().running_mean_backward_cpu(view(grad_out), view(keep), view(grad_x))
    return grad_x


_running_mean_op = torch.library.custom_op("apt::running_mean", mutates_args=())(_forward_body)
_running_mean_backward_op = torch.library.custom_op("apt::running_mean_backward", mutates_args=())(_backward_body)


@_running_mean_op.register_fake
def _(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(x)


@_running_mean_backward_op.register_fake
def _(grad_out: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(grad_out)


def _setup_context(ctx, inputs, output) -> None:
    _, keep = inputs
    ctx.save_for_backward(keep)


def _backward(ctx, grad):
    (keep,) = ctx.saved_tensors
    return _running_mean_backward_op(grad, keep), None


_running_mean_op.register_autograd(_backward, setup_context=_setup_context)


class RunningMean(torch.autograd.Function):
    """The same formula straight over the bodies: eager calls skip the custom op's dispatch (backends.
    custom_op_must_dispatch), which cost ~15 µs a call, as much as torch's cumsum takes for a decode step's input."""

    @staticmethod
    def forward(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        return _forward_body(x, keep)

    setup_context = staticmethod(_setup_context)  # a separate setup_context: torch.func transforms need one

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (also how torch.func.grad runs backward, on tensors the kernel cannot read): the
            # same formula in differentiable torch ops, so second derivatives are right instead of silently zero
            return _backward_torch(grad, keep), None
        return _backward_body(grad, keep), None


def _backward_torch(grad: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """The running mean's gradient in torch ops: ``grad_x[s] = keep[s] * sum over t >= s of grad[t] / count[t]``
    (count[t]: kept positions up to t, at least 1), accumulated in fp32 (fp64 for fp64) as the kernel does."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    kept = torch.ones(grad.shape[:2], dtype=acc, device=grad.device) if keep is None else keep.to(acc)
    cnt = torch.cumsum(kept, dim=1).clamp_min(1.0)
    gx = torch.flip(torch.cumsum(torch.flip(g / cnt[..., None], (1,)), dim=1), (1,))
    if keep is not None:
        gx = torch.where(keep[..., None], gx, gx.new_zeros(()))
    return gx.to(grad.dtype)


def running_mean_native(x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The native C++ path, explicitly (raises RuntimeError when the compiled module is unavailable)."""
    _check(x, key_padding_mask)
    ok, why = native_status()
    if not ok:
        raise RuntimeError(f"running_mean_native: {why}")
    if x.device.type != "cpu":
        raise ValueError(f"x: the native running_mean is CPU-only, got device {x.device}")
    keep = None if key_padding_mask is None else (~key_padding_mask).contiguous()
    if custom_op_must_dispatch():
        return _running_mean_op(x, keep)
    if autograd_free(x):  # nothing to differentiate: the body, without Function.apply's per-call bookkeeping
        return _forward_body(x, keep)
    refuse_transformed("running_mean_native", x, keep, grad_ok=True,  # its backward is torch ops: grad works
                       instead="use running_mean, which takes the reference there, or running_mean_ref")
    return RunningMean.apply(x, keep)


def running_mean(x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal running mean of ``x`` (B, T, C) over time, skipping padded positions (mask True = padded).

    Uses the native CPU kernel for CPU tensors when it is built, torch's cumsum otherwise (CUDA tensors, no build,
    and under torch.func transforms or forward-mode AD, which the native kernel does not support).
    """
    # each path checks its arguments (checking here too did it twice, on the decode path of every TVA layer)
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and native_status()[0] \
            and not torch_func_active(forward_ad=True) \
            and not _time_innermost(x):  # torch_func_active: vmap / forward AD over every TVA layer failed on CPU
        return running_mean_native(x, key_padding_mask)
    return running_mean_ref(x, key_padding_mask)


def _time_innermost(x: torch.Tensor) -> bool:
    """Whether ``x`` (B, T, C) has time inner to channels, as a (B, C, T) tensor transposed: the native kernel walks
    time with the channels innermost and there reads one cache line per element (2.6-4.3x slower than torch's
    cumsum along the contiguous time axis, B=1 T=4096 C=64, 1 thread); copying to contiguous first costs more than
    the reference's whole call. Not for an expanded (stride 0) or sliced channel axis, which the kernel reads fast,
    nor with more channels than steps, where the native kernel is the faster one (fwd+bwd, 1 thread, one run:
    T=256 C=1024 2.8x, T=64 C=4096 B=2 2.4x, T=128 C=512 B=4 2.1x, T=512 C=2048 2.0x; the reference won T=4096
    C=64 1.4x, T=1024 C=512 1.9x, T=512 C=256 B=4 1.4x, and T=C=256 by 10%)."""
    return (x.layout == torch.strided and not x.is_nested and x.dim() == 3 and x.shape[1] > 1 and x.shape[2] > 1
            and 0 < x.stride(1) < x.stride(2) and x.shape[1] >= x.shape[2])
