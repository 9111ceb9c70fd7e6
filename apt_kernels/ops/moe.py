"""MoE routing, dispatch and combine: public ops ``moe_route``, ``moe_dispatch``, ``moe_combine``, ``moe_aux_losses``,
and ``moe_grouped_ffn`` (the experts' FFN on the packed dropless buffer, a grouped matmul per projection, compilable).

Implementations (``impl``): ``reference`` (pure PyTorch, apt_kernels/reference/moe.py), ``cpu_native`` (C++/OpenMP,
csrc/moe/moe_cpu.cpp), ``triton`` (apt_kernels/triton/moe.py), ``cuda`` (csrc/moe/moe_cuda.cu); ``auto`` picks the
fastest one available for the tensors' device. The kernels make the discrete routing decisions (top-k, queue
positions, drops) and move rows; the differentiable gate weights are gathered from the fp32 softmax in PyTorch, so
autograd reaches the router without a hand-written softmax backward. Dispatch and combine of every back end are
``torch.library`` custom ops with fake implementations and autograd formulas whose backwards are kernels too.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import backends
from .._autograd import first_order_only, no_double_backward, refuse_transformed
from .._native import cpu_module, current_stream, host_empty, native_module, view
from .._validate import check_float, check_ndim, check_tensor
from ..reference.moe import (Routing, default_renormalize, expert_capacity, gate_weights, moe_aux_losses_ref,
                             moe_combine_ref, moe_dispatch_ref, moe_route_ref, router_probs)

logger = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cpu_native", "triton", "cuda")

__all__ = ["Routing", "moe_route", "moe_dispatch", "moe_combine", "moe_grouped_ffn", "moe_aux_losses",
           "impl_status", "resolve_impl", "IMPLS"]


# ---------------------------------------------------------------------------------------------------------------
# back ends: each provides five kernels with the same signatures (all index tensors int64, contiguous)
#   route(probs (N,E), k, cap) -> expert_idx, position, slot (N,k), token_of_slot (S,), tokens_per_expert (E,)
#   dispatch(x (N,C), token_of_slot) -> buf (S, C)
#   dispatch_backward(grad_buf (S,C), slot, N) -> grad_x (N, C)
#   combine(out (S,C), weights (N,k) acc dtype, slot) -> y (N, C)
#   combine_backward(grad_y, out, weights, slot, token_of_slot) -> grad_out (S, C), grad_weights (N, k)
# cap = -1 means dropless.
# ---------------------------------------------------------------------------------------------------------------

# what the GPU kernels take (csrc/moe/moe_cuda.h, apt_kernels/triton/moe.py): fp32/fp16/bf16 values, fp32
# probabilities (so no float64 logits), k <= 16 and E <= 8192 (CUDA), E <= 4096 (Triton)
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_MAX_K, _CUDA_MAX_EXPERTS, _TRITON_MAX_EXPERTS = 16, 8192, 4096


def impl_status(impl: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                num_experts: Optional[int] = None, k: Optional[int] = None) -> tuple[bool, str]:
    """(usable, reason) for an implementation, optionally for tensors on ``device`` of ``dtype`` (values, or the
    logits for routing) and routing over ``num_experts`` with ``k`` choices."""
    if impl == "reference":
        return True, ""
    if impl == "cpu_native":
        ok, why = backends.native_status()
        if ok and device is not None and device.type != "cpu":
            return False, f"cpu_native runs on CPU tensors, got device {device}"
        return ok, why
    if impl == "cuda":
        ok, why = backends.native_cuda_status(device)
        if ok and device is not None and device.type != "cuda":
            return False, f"the cuda kernels need CUDA tensors, got device {device}"
        if ok and dtype is not None and dtype not in _GPU_DTYPES:
            return False, f"the cuda kernels take float32/float16/bfloat16, got {dtype}"
        if ok and num_experts is not None and num_experts > _CUDA_MAX_EXPERTS:
            return False, f"the cuda router takes at most {_CUDA_MAX_EXPERTS} experts, got {num_experts}"
        if ok and k is not None and k > _CUDA_MAX_K:
            return False, f"the cuda router takes k <= {_CUDA_MAX_K}, got {k}"
        return ok, why
    if impl == "triton":
        ok, why = backends.triton_status()
        if ok and device is not None and device.type != "cuda" and not backends.triton_interpret():
            return False, f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        if ok and dtype is not None and dtype not in _GPU_DTYPES:
            return False, f"the Triton kernels take float32/float16/bfloat16, got {dtype}"
        if ok and num_experts is not None and num_experts > _TRITON_MAX_EXPERTS:
            return False, f"the Triton router takes at most {_TRITON_MAX_EXPERTS} experts, got {num_experts}"
        return ok, why
    raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")


def resolve_impl(impl: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                 num_experts: Optional[int] = None, k: Optional[int] = None, arg: str = "inputs") -> str:
    """The concrete implementation for ``impl`` on ``device`` (and ``dtype`` / ``num_experts`` / ``k`` when given);
    an explicit one raises RuntimeError when its back end is unavailable here, and, naming ``arg`` (the tensor
    the op was given), ValueError when it cannot take the device, TypeError the dtype, ValueError when
    ``num_experts`` / ``k`` exceed its limits; ``auto`` falls back to the next (finally the reference)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        ok, why = impl_status(impl)
        if not ok:
            raise RuntimeError(f"moe impl {impl!r} is unavailable: {why}")
        # the back end exists but cannot take these inputs: a device or size is a ValueError, a dtype a TypeError
        ok, why = impl_status(impl, device)
        if not ok:
            raise ValueError(f"{arg}: moe impl {impl!r}: {why}")
        ok, why = impl_status(impl, device, dtype)
        if not ok:
            raise TypeError(f"{arg}: moe impl {impl!r}: {why}")
        ok, why = impl_status(impl, device, dtype, num_experts, k)
        if not ok:
            raise ValueError(f"{arg}: moe impl {impl!r}: {why}")
        return impl
    if backends.torch_func_active(forward_ad=True):  # vmap / jvp / forward AD: only the reference reads wrapped tensors
        return "reference"
    order = ("cpu_native",) if device.type == "cpu" else ("cuda", "triton")
    for cand in order:
        if impl_status(cand, device, dtype, num_experts, k)[0]:
            return cand
    return "reference"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as row-major rows, the layout the GPU kernels (and the CUDA bindings' checks) want. ``.contiguous()``
    alone is not enough for an empty tensor: torch calls every empty tensor contiguous and returns it as it is, so the
    gradient of ``y.sum()`` for 0 tokens (expanded, strides (0, 0)) or a 0-row slice of a transposed buffer reached
    the CUDA bindings with a channel stride != 1 and was refused ("expected unit stride along the channel dim").
    clone, not new_empty: it keeps the forward's autograd graph (x's gradient, an empty tensor, still flows)."""
    return t.contiguous() if t.numel() else t.clone(memory_format=torch.contiguous_format)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _NativeCPU:
    """csrc/moe/moe_cpu.cpp through apt_kernels._C."""

    @staticmethod
    def route(probs, k, cap):
        n, e = probs.shape
        m = cpu_module()
        idx = torch.empty(n, k, dtype=torch.int64)
        pos = torch.empty_like(idx)
        slot = torch.empty_like(idx)
        tos = torch.empty(n * k if cap < 0 else e * cap, dtype=torch.int64)
        counts = torch.empty(e, dtype=torch.int64)
        m.moe_route_cpu(view(probs), int(k), int(cap), view(idx), view(pos), view(slot), view(tos), view(counts))
        return idx, pos, slot, tos, counts

    @staticmethod
    def dispatch(x, token_of_slot):
        buf = host_empty((token_of_slot.shape[0], x.shape[1]), x.dtype)
        cpu_module().moe_dispatch_cpu(view(x), view(token_of_slot), view(buf))
        return buf

    @staticmethod
    def dispatch_backward(grad_buf, slot, n):
        gx = host_empty((n, grad_buf.shape[1]), grad_buf.dtype)
        cpu_module().moe_dispatch_backward_cpu(view(grad_buf), view(slot), view(gx))
        return gx

    @staticmethod
    def combine(out, weights, slot):
        y = host_empty((slot.shape[0], out.shape[1]), out.dtype)
        cpu_module().moe_combine_cpu(view(out), view(weights), view(slot), view(y))
        return y

    @staticmethod
    def combine_backward(grad_y, out, weights, slot, token_of_slot):
        g_out = host_empty(tuple(out.shape), out.dtype)
        g_w = torch.empty(weights.shape, dtype=weights.dtype)  # contiguous, as the kernel and the fake want
        cpu_module().moe_combine_backward_cpu(view(grad_y), view(out), view(weights), view(slot),
                                                 view(token_of_slot), view(g_out), view(g_w))
        return g_out, g_w


class _NativeCUDA:
    """csrc/moe/moe_cuda.cu through apt_kernels._C, on torch's current stream."""

    @staticmethod
    def route(probs, k, cap):
        n, e = probs.shape
        d = probs.device
        idx = torch.empty(n, k, dtype=torch.int64, device=d)
        pos = torch.empty_like(idx)
        slot = torch.empty_like(idx)
        tos = torch.empty(n * k if cap < 0 else e * cap, dtype=torch.int64, device=d)
        counts = torch.empty(e, dtype=torch.int64, device=d)
        nb = max(1, (n + 255) // 256)
        work = torch.empty(k * nb * e + e, dtype=torch.int64, device=d)
        native_module().moe_route_cuda(view(probs), int(k), int(cap), view(idx), view(pos), view(slot), view(tos),
                                       view(counts), view(work), current_stream(d))
        return idx, pos, slot, tos, counts

    @staticmethod
    def dispatch(x, token_of_slot):
        buf = torch.empty(token_of_slot.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        native_module().moe_dispatch_cuda(view(x), view(token_of_slot), view(buf), current_stream(x.device))
        return buf

    @staticmethod
    def dispatch_backward(grad_buf, slot, n):
        gx = torch.empty(n, grad_buf.shape[1], dtype=grad_buf.dtype, device=grad_buf.device)
        native_module().moe_dispatch_backward_cuda(view(grad_buf), view(slot), view(gx),
                                                   current_stream(grad_buf.device))
        return gx

    @staticmethod
    def combine(out, weights, slot):
        y = torch.empty(slot.shape[0], out.shape[1], dtype=out.dtype, device=out.device)
        native_module().moe_combine_cuda(view(out), view(weights), view(slot), view(y), current_stream(out.device))
        return y

    @staticmethod
    def combine_backward(grad_y, out, weights, slot, token_of_slot):
        g_out = torch.empty(out.shape, dtype=out.dtype, device=out.device)  # contiguous, as the fake says
        g_w = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
        native_module().moe_combine_backward_cuda(view(grad_y), view(out), view(weights), view(slot),
                                                  view(token_of_slot), view(g_out), view(g_w),
                                                  current_stream(out.device))
        return g_out, g_w


def _triton_backend():
    from ..triton import moe as triton_moe

    return triton_moe


_BACKENDS: dict[str, Callable[[], Any]] = {
    "cpu_native": lambda: _NativeCPU,
    "cuda": lambda: _NativeCUDA,
    "triton": _triton_backend,
}


# ---- custom ops: one set per back end, same names with the back end's suffix ------------------------------------

def _register_ops(name: str) -> dict[str, Any]:
    get = _BACKENDS[name]
    # the C++ kernels take any strides (e.g. the expanded ones of sum()'s gradient); the GPU ones want unit stride
    as_rows = (lambda t: t) if name == "cpu_native" else _rows

    @torch.library.custom_op(f"apt::moe_route_{name}", mutates_args=())
    def route_op(probs: torch.Tensor, k: int, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
        return get().route(probs, k, cap)

    @route_op.register_fake
    def _(probs, k, cap):
        n, e = probs.shape
        idx = probs.new_empty((n, k), dtype=torch.int64)
        s = n * k if cap < 0 else e * cap
        return (idx, torch.empty_like(idx), torch.empty_like(idx), probs.new_empty((s,), dtype=torch.int64),
                probs.new_empty((e,), dtype=torch.int64))

    @torch.library.custom_op(f"apt::moe_dispatch_{name}", mutates_args=())
    def dispatch_op(x: torch.Tensor, slot: torch.Tensor, token_of_slot: torch.Tensor) -> torch.Tensor:
        return get().dispatch(x, token_of_slot)

    @dispatch_op.register_fake
    def _(x, slot, token_of_slot):
        return x.new_empty((token_of_slot.shape[0], x.shape[1]))

    @torch.library.custom_op(f"apt::moe_dispatch_backward_{name}", mutates_args=())
    def dispatch_bwd_op(grad_buf: torch.Tensor, slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return get().dispatch_backward(grad_buf, slot, num_tokens)

    @dispatch_bwd_op.register_fake
    def _(grad_buf, slot, num_tokens):
        return grad_buf.new_empty((num_tokens, grad_buf.shape[1]))

    def dispatch_setup(ctx, inputs, output):
        x, slot, _ = inputs
        ctx.save_for_backward(slot)
        ctx.num_tokens = x.shape[0]

    def dispatch_backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        return dispatch_bwd_op(as_rows(grad), slot, ctx.num_tokens), None, None

    dispatch_op.register_autograd(dispatch_backward, setup_context=dispatch_setup)

    @torch.library.custom_op(f"apt::moe_combine_{name}", mutates_args=())
    def combine_op(out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor,
                   token_of_slot: torch.Tensor) -> torch.Tensor:
        return get().combine(out, weights, slot)

    @combine_op.register_fake
    def _(out, weights, slot, token_of_slot):
        return out.new_empty((slot.shape[0], out.shape[1]))

    @torch.library.custom_op(f"apt::moe_combine_backward_{name}", mutates_args=())
    def combine_bwd_op(grad_y: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor,
                       token_of_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return get().combine_backward(grad_y, out, weights, slot, token_of_slot)

    @combine_bwd_op.register_fake
    def _(grad_y, out, weights, slot, token_of_slot):
        # new_empty, not empty_like: every back end allocates both gradients contiguous, whatever out's strides
        return out.new_empty(out.shape), weights.new_empty(weights.shape)

    def combine_setup(ctx, inputs, output):
        out, weights, slot, tos = inputs
        ctx.save_for_backward(out, weights, slot, tos)

    def combine_backward(ctx, grad):
        out, weights, slot, tos = ctx.saved_tensors
        g_out, g_w = combine_bwd_op(as_rows(grad), out, weights, slot, tos)
        return g_out, g_w, None, None

    combine_op.register_autograd(combine_backward, setup_context=combine_setup)

    # Plain eager calls skip the custom ops' dispatch (see _op): the same bodies and backward formulas.
    # New-style Functions (setup_context apart from forward), so torch.func.grad works over them.
    class Dispatch(torch.autograd.Function):
        @staticmethod
        def forward(x, slot, token_of_slot):
            return get().dispatch(x, token_of_slot)

        setup_context = staticmethod(dispatch_setup)

        @staticmethod
        @first_order_only("moe_dispatch")
        def backward(ctx, grad):
            (slot,) = ctx.saved_tensors
            return get().dispatch_backward(as_rows(grad), slot, ctx.num_tokens), None, None

    class Combine(torch.autograd.Function):
        @staticmethod
        def forward(out, weights, slot, token_of_slot):
            return get().combine(out, weights, slot)

        setup_context = staticmethod(combine_setup)

        @staticmethod
        @first_order_only("moe_combine")
        def backward(ctx, grad):
            out, weights, slot, tos = ctx.saved_tensors
            g_out, g_w = get().combine_backward(as_rows(grad), out, weights, slot, tos)
            return g_out, g_w, None, None

    def dispatch(x, slot, token_of_slot):
        if backends.autograd_free(x):  # nothing to differentiate (decode, evaluation): skip Function.apply
            return get().dispatch(x, token_of_slot)
        refuse_transformed("moe_dispatch", x, slot, token_of_slot)
        return Dispatch.apply(x, slot, token_of_slot)

    def combine(out, weights, slot, token_of_slot):
        if backends.autograd_free(out, weights):
            return get().combine(out, weights, slot)
        refuse_transformed("moe_combine", out, weights, slot, token_of_slot)
        return Combine.apply(out, weights, slot, token_of_slot)

    _EAGER[name] = {"route": lambda probs, k, cap: get().route(probs, k, cap), "dispatch": dispatch,
                    "combine": combine}
    return {"route": route_op, "dispatch": dispatch_op, "dispatch_backward": dispatch_bwd_op,
            "combine": combine_op, "combine_backward": combine_bwd_op}


_EAGER: dict[str, dict[str, Callable[..., Any]]] = {}
OPS: dict[str, dict[str, Any]] = {name: _register_ops(name) for name in _BACKENDS}


def _op(impl: str, name: str) -> Callable[..., Any]:
    """OPS[impl][name] where the op must be seen (torch.compile, dispatch modes), else its body through an
    autograd.Function with the op's backward: the custom op's dispatch costs ~60 µs of Python per call and
    direction (torch 2.13), three forward calls per MoE layer."""
    if name == "route" and torch._C._are_functorch_transforms_active():
        # the routing has no gradient; torch.func's wrapped tensors have no data for the kernel, the op unwraps them
        return OPS[impl][name]
    return OPS[impl][name] if backends.custom_op_must_dispatch() else _EAGER[impl][name]


# ---- grouped expert FFN on the packed dropless buffer ------------------------------------------------------------
# Expert e's rows are x[offsets[e]:offsets[e+1]]. Each projection is one bmm over an (E, width, .) zero-padded
# buffer (width = the largest segment) while the padding at most doubles the rows, else
# the FFN runs expert by expert (_ffn_per_expert). A skewed routing (a collapsing router: every token on experts 0 and
# 1 of 32, N=2048, k=2) made the padded bmm E/2 times the work: 385 ms against 22 ms for per-expert matmuls, and an
# (E, width, .) buffer of 235 MB saved for the backward. One host sync for the segment bounds. The per-expert row
# counts are data, so this is a custom op: its outputs, and what its backward needs (x, up, gate, act, all packed
# (M, .)), have static sizes under torch.compile. w_gate None means gelu, else swiglu. Not twice differentiable.

class _Groups(NamedTuple):
    bounds: list[int]  # the offsets, on the host
    rows: Optional[torch.Tensor]  # each packed row's row in the (E * width) padded buffer; None: per-expert matmuls
    width: int


def _groups(offsets: torch.Tensor, m: int, bounds: Optional[list[int]] = None) -> _Groups:
    """The segments of ``offsets``; ``bounds``: its values already on the host (the backward gets them from the
    forward, so only the forward syncs)."""
    if bounds is None:
        bounds = [int(b) for b in offsets.tolist()]  # the one host sync
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != m or min(counts) < 0:
        # checked here, on the host copy, before anything indexes with them: bad offsets made torch's
        # repeat_interleave write past its output (heap corruption, a later abort) or fail with an unclear error
        shown = bounds if len(bounds) <= 16 else (bounds[0], "...", bounds[-1])
        raise ValueError(f"offsets: expected non-decreasing row offsets from 0 to M={m}, got {shown}")
    e, width = len(counts), max(max(counts), 1)
    # the batched GEMM over experts padded to the widest, as long as the padding at most doubles the rows; past
    # that (a skewed routing) expert by expert, whose work is the rows' own
    if e * width > 2 * max(m, 1):
        return _Groups(bounds, None, width)
    counts_t = offsets[1:] - offsets[:-1]
    expert_of_row = torch.repeat_interleave(torch.arange(e, device=offsets.device), counts_t, output_size=m)
    pos_of_row = torch.arange(m, device=offsets.device) - offsets[expert_of_row]
    return _Groups(bounds, expert_of_row * width + pos_of_row, width)


def _pad(t: torch.Tensor, g: _Groups, inplace: bool = True) -> torch.Tensor:
    """Packed rows (M, K) -> (E, width, K), zeros in the padding. ``inplace=False`` for torch.func / forward AD (an
    in-place write of a batched or dual tensor into a plain buffer is refused there)."""
    h = t.new_zeros((len(g.bounds) - 1) * g.width, t.shape[1])
    h = h.index_copy_(0, g.rows, t) if inplace else h.index_copy(0, g.rows, t)
    return h.view(len(g.bounds) - 1, g.width, t.shape[1])


def _segments(g: _Groups):
    return [(e, a, b) for e, (a, b) in enumerate(zip(g.bounds, g.bounds[1:])) if b > a]


def _ffn_per_expert(x: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor], w_out: torch.Tensor,
                    g: _Groups, saved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward segment by segment, each expert's whole FFN at once (its activations stay in cache)."""
    outs, ups, gates, acts = [], [], [], []
    for e, lo, hi in _segments(g):
        h = x[lo:hi]
        up = h @ w_in[e]
        gate = h @ w_gate[e] if w_gate is not None else None
        act = F.silu(gate) * up if gate is not None else F.gelu(up)
        outs.append(act @ w_out[e])
        if saved:
            ups.append(up)
            acts.append(act)
            if gate is not None:
                gates.append(gate)

    def cat(parts: list, width: int) -> torch.Tensor:
        return torch.cat(parts) if parts else x.new_empty((0, width))
    f = w_in.shape[2]
    out = cat(outs, w_out.shape[2])
    if not saved:
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return out, cat(ups, f), (cat(gates, f) if w_gate is not None else x.new_empty(0)), cat(acts, f)


def _ffn_per_expert_backward(grad_out, x, up, gate, act, w_in, w_gate, w_out, g: _Groups):
    g_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
    g_w_in = w_in.new_zeros(w_in.shape)
    g_w_gate = w_gate.new_zeros(w_gate.shape) if w_gate is not None else x.new_empty(0)
    g_w_out = w_out.new_zeros(w_out.shape)
    for e, lo, hi in _segments(g):
        h, g_o, a = x[lo:hi], grad_out[lo:hi], act[lo:hi]
        g_w_out[e] = a.t() @ g_o
        g_act = g_o @ w_out[e].t()
        if w_gate is not None:
            gt, u = gate[lo:hi], up[lo:hi]
            g_up = g_act * F.silu(gt)
            g_gate = torch.ops.aten.silu_backward(g_act * u, gt)
            g_w_gate[e] = h.t() @ g_gate
            g_x[lo:hi] = torch.addmm(g_gate @ w_gate[e].t(), g_up, w_in[e].t())
        else:
            g_up = torch.ops.aten.gelu_backward(g_act, up[lo:hi])
            g_x[lo:hi] = g_up @ w_in[e].t()
        g_w_in[e] = h.t() @ g_up
    return g_x, g_w_in, g_w_gate, g_w_out


def _grouped_ffn_fwd(x: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor],
                     w_out: torch.Tensor, inplace: bool = True, saved: bool = True, g: Optional[_Groups] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (M, C_out), up, gate (empty for gelu) and activation (M, F), packed as x; with ``saved=False`` only
    out (the rest empty). Padded, the activation runs on the padded buffers (no unpadding and repadding between
    the projections: 20-45% of a balanced call's time on the CPU)."""
    g = _groups(offsets, x.shape[0]) if g is None else g
    if g.rows is None:
        return _ffn_per_expert(x, w_in, w_gate, w_out, g, saved)
    h = _pad(x, g, inplace)
    up = torch.bmm(h, w_in)
    gate = torch.bmm(h, w_gate) if w_gate is not None else x.new_empty(0)
    act = F.silu(gate) * up if w_gate is not None else F.gelu(up)
    out = _unpad(torch.bmm(act, w_out), g)
    if not saved:
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return out, _unpad(up, g), (_unpad(gate, g) if w_gate is not None else gate), _unpad(act, g)


def _unpad(t: torch.Tensor, g: _Groups) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).index_select(0, g.rows)


@torch.library.custom_op("apt::moe_grouped_ffn", mutates_args=())
def _grouped_ffn_op(x: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor],
                    w_out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out, up, gate, act and the offsets on the host (int64 CPU): the backward's segments without a second
    device sync."""
    g = _groups(offsets, x.shape[0])
    return (*_grouped_ffn_fwd(x, offsets, w_in, w_gate, w_out, g=g), torch.tensor(g.bounds, dtype=torch.int64))


@_grouped_ffn_op.register_fake
def _(x, offsets, w_in, w_gate, w_out):
    m, f = x.shape[0], w_in.shape[2]
    gate = x.new_empty((m, f)) if w_gate is not None else x.new_empty(0)
    bounds = offsets.new_empty(offsets.shape, dtype=torch.int64, device="cpu")
    return x.new_empty((m, w_out.shape[2])), x.new_empty((m, f)), gate, x.new_empty((m, f)), bounds


@torch.library.custom_op("apt::moe_grouped_ffn_inference", mutates_args=())
def _grouped_ffn_infer_op(x: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor],
                          w_out: torch.Tensor) -> torch.Tensor:
    """The forward of moe_grouped_ffn without what its backward needs, when nothing needs a gradient (eval /
    generation, where MoEFFN is dropless by default)."""
    # the body: no second op dispatch inside this one
    return _grouped_ffn_fwd(x, offsets, w_in, w_gate, w_out, saved=False)[0]


@_grouped_ffn_infer_op.register_fake
def _(x, offsets, w_in, w_gate, w_out):
    return x.new_empty((x.shape[0], w_out.shape[2]))


@torch.library.custom_op("apt::moe_grouped_ffn_backward", mutates_args=())
def _grouped_ffn_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, up: torch.Tensor,
                        gate: torch.Tensor, act: torch.Tensor, bounds: torch.Tensor, w_in: torch.Tensor,
                        w_gate: Optional[torch.Tensor], w_out: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad of x (M, C), w_in, w_gate (empty for gelu), w_out: the forward's autograd formulas, per expert
    (padded: on the padded buffers, whose zero rows add nothing to the weight gradients). ``bounds``: the
    offsets on the host, from the forward."""
    g = _groups(offsets, x.shape[0], bounds.tolist())
    grad_out = grad_out.contiguous()
    if g.rows is None:
        return _ffn_per_expert_backward(grad_out, x, up, gate, act, w_in, w_gate, w_out, g)
    x, up, act, grad_out = (_pad(t, g) for t in (x, up, act, grad_out))
    gate = _pad(gate, g) if w_gate is not None else gate
    g_w_out = torch.bmm(act.transpose(1, 2), grad_out)
    g_act = torch.bmm(grad_out, w_out.transpose(1, 2))
    ht = x.transpose(1, 2)
    if w_gate is not None:
        g_up = g_act * F.silu(gate)
        g_gate = torch.ops.aten.silu_backward(g_act * up, gate)
        g_w_gate = torch.bmm(ht, g_gate)
        g_x = torch.baddbmm(torch.bmm(g_gate, w_gate.transpose(1, 2)), g_up, w_in.transpose(1, 2))
    else:
        g_up = torch.ops.aten.gelu_backward(g_act, up)
        g_w_gate = x.new_empty(0)
        g_x = torch.bmm(g_up, w_in.transpose(1, 2))
    return _unpad(g_x, g), torch.bmm(ht, g_up), g_w_gate, g_w_out


@_grouped_ffn_bwd_op.register_fake
def _(grad_out, x, offsets, up, gate, act, bounds, w_in, w_gate, w_out):
    # new_empty, not empty_like: the real gradients are contiguous whatever the weights' strides
    g_w_gate = w_gate.new_empty(w_gate.shape) if w_gate is not None else x.new_empty(0)
    return x.new_empty(x.shape), w_in.new_empty(w_in.shape), g_w_gate, w_out.new_empty(w_out.shape)


def _grouped_ffn_setup(ctx, inputs, output):
    x, offsets, w_in, w_gate, w_out = inputs
    ctx.has_gate = w_gate is not None
    ctx.save_for_backward(x, offsets, *output[1:], w_in, w_gate, w_out)


def _grouped_ffn_backward(ctx, grad_out, *_):
    g_x, g_in, g_gate, g_out = _grouped_ffn_bwd_op(grad_out, *ctx.saved_tensors)
    grads = (g_x, None, g_in, (g_gate if ctx.has_gate else None), g_out)
    if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
        # create_graph=True: the backward op has no autograd formula of its own, and differentiating these
        # gradients failed inside torch ("Trying to backward through apt.moe_grouped_ffn_backward"); a clear error
        # instead (keeping the layer's x alive for a recompute would cost an (M, C) buffer in every training step)
        grads = no_double_backward("moe_grouped_ffn", grads, (*ctx.saved_tensors, grad_out), message=(
            "apt_kernels.moe_grouped_ffn: the dropless grouped FFN has no double backward; for higher-order "
            "gradients route with a capacity (capacity_factor set) and the reference router"))
    return grads


_grouped_ffn_op.register_autograd(_grouped_ffn_backward, setup_context=_grouped_ffn_setup)


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------

def _check_route_args(logits: Any, k: Any, capacity_factor: Any, min_capacity: Any, renormalize: Any) -> None:
    check_ndim("logits", logits, 2, "(N, E)")
    check_float("logits", logits)
    n, e = logits.shape
    if e < 1:
        raise ValueError(f"logits: expected at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 1 or k > e:
        raise ValueError(f"k: expected 1 <= k <= num_experts ({e}), got {k}")
    check_capacity_args(capacity_factor, min_capacity, renormalize)


def _check_routing(routing: Any) -> Routing:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing: expected an apt_kernels Routing (from moe_route), got {type(routing).__name__}")
    return routing


def _check_same_device(name: str, t: torch.Tensor, routing: Routing) -> None:
    if t.device != routing.slot.device:
        raise ValueError(f"{name}: expected device {routing.slot.device} (the routing's device), got {t.device}")


# ---------------------------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------------------------

def check_capacity_args(capacity_factor: Optional[float], min_capacity: int, renormalize: Optional[bool]) -> None:
    """The routing settings' checks (moe_route, and MoEFFN at construction rather than at its first forward)."""
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real):
            raise TypeError(f"capacity_factor: expected a float or None, got {type(capacity_factor).__name__}")
        # comparisons, not math.isnan/isinf: under torch.compile a dynamic float is a SymFloat, which math.* reject
        if not (0.0 < capacity_factor < math.inf):
            raise ValueError(f"capacity_factor: expected a finite number > 0 or None (dropless), got {capacity_factor}")
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, numbers.Integral):
        raise TypeError(f"min_capacity: expected an int, got {type(min_capacity).__name__}")
    if min_capacity < 0:
        raise ValueError(f"min_capacity: expected >= 0, got {min_capacity}")
    if renormalize is not None and not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool or None, got {type(renormalize).__name__}")


def moe_route(logits: torch.Tensor, k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
              renormalize: Optional[bool] = None, impl: str = "auto") -> Routing:
    """Top-k routing of N tokens over E experts with GShard-priority expert capacity (design/MOE.md).

    ``logits``: (N, E) router logits. ``capacity_factor=None`` is dropless; otherwise each expert keeps at most
    ``max(min_capacity, ceil(capacity_factor * k * N / E))`` assignments. ``renormalize`` defaults to ``k > 1``.
    Returns a :class:`Routing` whose ``weights`` carry gradients to ``logits``.

    Non-finite logits are not checked (that would cost a host sync): as in ``torch.softmax``, a row holding +inf or
    NaN, or only -inf, gets NaN probabilities, so NaN gate weights and a NaN combined output for that token; it
    is still routed, deterministically and alike in every implementation (all its probabilities NaN: to experts
    0..k-1, ties going to the lower index). -inf entries next to finite ones are fine (probability 0).
    """
    _check_route_args(logits, k, capacity_factor, min_capacity, renormalize)
    impl = resolve_impl(impl, logits.device, logits.dtype, int(logits.shape[1]), int(k), arg="logits")
    if impl == "reference":
        return moe_route_ref(logits, int(k), capacity_factor, int(min_capacity), renormalize)
    n, e = logits.shape
    k = int(k)
    probs = router_probs(logits)
    cap = expert_capacity(n, e, k, capacity_factor, int(min_capacity))
    idx, pos, slot, tos, counts = _op(impl, "route")(probs.detach().contiguous(), k, -1 if cap is None else cap)
    weights = gate_weights(probs, idx, default_renormalize(k, renormalize))
    kept = slot >= 0
    kept_per_expert = counts if cap is None else counts.clamp(max=cap)
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=logits.device)
    offsets[1:] = torch.cumsum(kept_per_expert, 0)
    dropped = n * k - offsets[-1]
    return Routing(expert_idx=idx, weights=weights, probs=probs, position=pos, kept=kept, capacity=cap,
                   tokens_per_expert=counts, kept_per_expert=kept_per_expert, dropped=dropped, offsets=offsets,
                   slot=slot, token_of_slot=tos, num_experts=e)


def moe_dispatch(x: torch.Tensor, routing: Routing, impl: str = "auto") -> torch.Tensor:
    """Gather the tokens ``x`` (N, C) into the expert buffer: (E, cap, C) in capacity mode, packed (N*k, C) sorted
    by expert in dropless mode (rows ``routing.offsets[e]:routing.offsets[e+1]`` belong to expert e)."""
    _check_routing(routing)
    check_ndim("x", x, 2, "(N, C)")
    check_float("x", x)
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"x: expected {routing.num_tokens} tokens (rows) to match the routing, got {x.shape[0]}")
    _check_same_device("x", x, routing)
    impl = resolve_impl(impl, x.device, x.dtype, arg="x")
    if impl == "reference":
        return moe_dispatch_ref(x, routing)
    buf = _op(impl, "dispatch")(_rows(x), routing.slot, routing.token_of_slot)
    return buf.view(routing.buffer_shape(x.shape[1]))


def moe_combine(expert_out: torch.Tensor, routing: Routing, impl: str = "auto") -> torch.Tensor:
    """``y[n] = sum over kept choices j of weights[n, j] * expert_out[row of (n, j)]``: (N, C) in expert_out's dtype.
    ``expert_out`` has the dispatch buffer's shape. Gradients flow to expert_out and to ``routing.weights``."""
    _check_routing(routing)
    check_tensor("expert_out", expert_out)
    check_float("expert_out", expert_out)
    c = expert_out.shape[-1] if expert_out.dim() else 0
    want = routing.buffer_shape(c)
    if expert_out.dim() != len(want) or tuple(expert_out.shape) != want:
        raise ValueError(f"expert_out: expected shape {want} (the dispatch buffer), got {tuple(expert_out.shape)}")
    _check_same_device("expert_out", expert_out, routing)
    impl = resolve_impl(impl, expert_out.device, expert_out.dtype, arg="expert_out")
    if impl == "reference":
        return moe_combine_ref(expert_out, routing)
    weights = routing.weights.to(_acc_dtype(expert_out.dtype))
    flat = _rows(expert_out.flatten(0, -2))  # not reshape(-1, c): with c = 0 the -1 is ambiguous
    return _op(impl, "combine")(flat, weights.contiguous(), routing.slot, routing.token_of_slot)


def moe_grouped_ffn(x: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor],
                    w_out: torch.Tensor, activation: str = "swiglu") -> torch.Tensor:
    """Expert FFN on packed rows: rows ``offsets[e]:offsets[e+1]`` of ``x`` (M, C) go through expert e,
    ``act(x W_in[e]) W_out[e]`` with ``act(u) = silu(x W_gate[e]) * u`` (swiglu) or ``gelu(u)``: (M, C_out).

    ``offsets`` (E+1,) int64 starts at 0 and ends at M (``routing.offsets`` of a dropless routing); ``w_in`` /
    ``w_gate`` (E, C, F), ``w_out`` (E, F, C_out), all in x's dtype and on its device; ``w_gate`` is None for gelu.
    Each projection runs as one batched GEMM over the experts' rows padded to the widest expert, or as one matmul
    per expert where that padding would more than double the rows (a skewed routing). A custom op: the output
    shapes never depend on the routing, so it compiles (fullgraph, static or dynamic shapes). Differentiable once
    (x and the weights). Under autocast it computes in the autocast dtype, as torch.bmm would (floating inputs
    other than fp64 cast to it, gradients back in each input's own dtype), and returns that dtype."""
    check_ndim("x", x, 2, "(M, C)")
    check_float("x", x)
    check_tensor("w_in", w_in)  # None here failed with an AttributeError on .shape below
    check_tensor("w_out", w_out)
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation: expected 'swiglu' or 'gelu', got {activation!r}")
    if (w_gate is None) != (activation == "gelu"):
        raise ValueError(f"w_gate: expected {'None' if activation == 'gelu' else 'a tensor'} for {activation}")
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        # what autocast does for the bmm inside: the inputs in the autocast dtype (fp32/fp16/bf16 ones; fp64
        # stays). The casts are recorded by autograd, so fp32 weights get fp32 gradients; the op then runs with
        # autocast off on one dtype (its backward got a bf16 gradient and fp32 weights and failed in bmm).
        low = torch.get_autocast_dtype(dev)
        x, w_in, w_gate, w_out = (t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                  and t.dtype != torch.float64 else t for t in (x, w_in, w_gate, w_out))
        with torch.autocast(dev, enabled=False):
            return moe_grouped_ffn(x, offsets, w_in, w_gate, w_out, activation)
    check_ndim("offsets", offsets, 1, "(E+1,)")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets: expected int64, got {offsets.dtype}")
    if offsets.shape[0] < 2:
        raise ValueError(f"offsets: expected E+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    e, c = offsets.shape[0] - 1, x.shape[1]
    for name, t in (("offsets", offsets), ("w_in", w_in), ("w_gate", w_gate), ("w_out", w_out)):
        if t is None:
            continue
        if name != "offsets":
            check_ndim(name, t, 3, "(E, C, F)" if name != "w_out" else "(E, F, C_out)")
            if t.dtype != x.dtype:
                raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected x's device {x.device}, got {t.device}")
    f = w_in.shape[2]
    if tuple(w_in.shape) != (e, c, f) or (w_gate is not None and tuple(w_gate.shape) != (e, c, f)) \
            or tuple(w_out.shape[:2]) != (e, f):
        raise ValueError(f"weights: expected w_in/w_gate ({e}, {c}, F) and w_out ({e}, F, C_out) for {e} experts "
                         f"and {c} channels, got w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
    if backends.torch_func_active(forward_ad=True):
        # torch.func (jvp, grad, vmap) and forward-mode AD: the body in differentiable torch ops, out of place.
        # The custom ops have no jvp and no batching rule: their tangents came back silently zero (jvp) or None
        return _grouped_ffn_fwd(x, offsets, w_in, w_gate, w_out, inplace=False, saved=False)[0]
    if not backends.custom_op_must_dispatch() and backends.autograd_free(x, w_in, w_gate, w_out):
        # plain eager with nothing to differentiate (generation): the body, without the custom op's dispatch
        # (~100 µs of Python per call, once per MoE layer per decode step)
        return _grouped_ffn_fwd(x, offsets, w_in, w_gate, w_out, saved=False)[0]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_in, w_gate, w_out))):
        return _grouped_ffn_infer_op(x, offsets, w_in, w_gate, w_out)
    return _grouped_ffn_op(x, offsets, w_in, w_gate, w_out)[0]


def moe_aux_losses(logits: torch.Tensor, routing: Routing) -> dict[str, torch.Tensor]:
    """Unscaled ``balance_loss`` (E * sum_e f_e P_e) and ``z_loss`` (mean logsumexp^2); cheap, PyTorch only."""
    _check_routing(routing)
    check_ndim("logits", logits, 2, "(N, E)")
    check_float("logits", logits)  # int logits were computed on
    if tuple(logits.shape) != (routing.num_tokens, routing.num_experts):
        raise ValueError(f"logits: expected shape {(routing.num_tokens, routing.num_experts)}, got "
                         f"{tuple(logits.shape)}")
    return moe_aux_losses_ref(logits, routing)
