"""``tva_attention``: fused TVA attention (TVA.md kernel contract), dispatching to the best implementation.

Implementations (``impl``): ``reference`` (dense PyTorch, apt_kernels/reference/tva.py), ``cpu_native`` (C++/OpenMP,
csrc/tva/tva_cpu.cpp), ``triton`` (apt_kernels/triton/tva.py), ``cuda`` (csrc/tva/tva_cuda.cu: fp32 FMA kernels;
tva_cuda_tc.cu: fp16/bf16 on tensor cores). ``auto`` takes, for CUDA tensors, triton then cuda in half precision (both
run on tensor cores; the Triton kernel's tiles are tuned on a GPU, the CUDA one's speed is not measured yet) and cuda
then triton in fp32; for CPU tensors, cpu_native; the reference otherwise. The fused implementations never
build the (T, T) score matrix: online softmax over key blocks forward, blockwise recomputation from the saved
log-sum-exp backward.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import torch

from .. import backends
from .._native import cpu_module, current_stream, native_module, view
from .._validate import check_flag
from ..reference.tva import (Coef, TVAArgs, check_tva_inputs, fold_kv_grads, kv_groups, kv_head_views,
                             register_fused_tva_op, repeat_kv,
                             tva_attention_ref)

logger = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cpu_native", "triton", "cuda")

__all__ = ["tva_attention", "tva_attention_cpu", "tva_attention_cuda", "impl_status", "resolve_impl", "IMPLS",
           "tva_attention_ref"]

# dtypes the fused kernels take (the reference also takes float64)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def impl_status(impl: str, device: Optional[torch.device] = None, head_dim: Optional[int] = None,
                dtype: Optional[torch.dtype] = None) -> tuple[bool, str]:
    """(usable, reason) for an implementation, optionally for inputs on ``device`` with ``head_dim``/``dtype``."""
    if impl == "reference":
        return True, ""
    if impl not in IMPLS or impl == "auto":
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if dtype is not None and dtype not in FUSED_DTYPES:
        return False, f"the {impl} kernels take float32/float16/bfloat16, got {dtype}"
    if impl == "cpu_native":
        ok, why = backends.native_family_status("tva")
        if ok and device is not None and device.type != "cpu":
            return False, f"cpu_native runs on CPU tensors, got device {device}"
        if ok and head_dim is not None and head_dim > 256:
            return False, f"cpu_native takes head dims <= 256, got {head_dim}"
        return ok, why
    if impl == "cuda":
        ok, why = backends.native_cuda_status(device)
        if ok:
            ok, why = backends.native_family_status("tva")
        if ok and not hasattr(native_module(), "tva_forward_cuda"):
            ok, why = False, "apt_kernels._C was built without the TVA CUDA kernels"
        if ok and device is not None and device.type != "cuda":
            return False, f"the cuda kernels need CUDA tensors, got device {device}"
        if ok and head_dim is not None and head_dim not in (32, 64, 128):
            return False, f"the cuda kernels take head dims 32, 64, 128, got {head_dim}"
        return ok, why
    # triton
    ok, why = backends.triton_status()
    if ok and device is not None and device.type != "cuda" and not backends.triton_interpret():
        return False, f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
    if ok and head_dim is not None and head_dim > 128:
        return False, f"the triton kernel takes head dims <= 128, got {head_dim}"
    return ok, why


def _unusable(impl: str, why: str, dtype: Optional[torch.dtype]) -> Exception:
    """The error for an explicit implementation that cannot run: RuntimeError when it is not usable here at all
    (not built, no device), else the inputs' fault: TypeError (dtype) or ValueError (device, head dim) naming q."""
    msg = f"tva impl {impl!r} is unavailable: {why}"
    if not impl_status(impl)[0]:
        return RuntimeError(msg)
    return TypeError(f"q: {msg}") if dtype is not None and dtype not in FUSED_DTYPES else ValueError(f"q: {msg}")


def resolve_impl(impl: str, device: torch.device, head_dim: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None) -> str:
    """The concrete implementation for ``impl``. An explicit one that cannot take the inputs raises (_unusable):
    RuntimeError when it is unavailable here, TypeError/ValueError when the inputs are what it cannot take."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        ok, why = impl_status(impl, device, head_dim, dtype)
        if not ok:
            raise _unusable(impl, why, dtype)
        return impl
    if backends.torch_func_active(forward_ad=True):  # vmap / jvp / forward AD: only the reference reads wrapped tensors
        return "reference"
    if device.type == "cpu":
        order: tuple[str, ...] = ("cpu_native",)
    elif dtype in (torch.float16, torch.bfloat16, None):
        # both on tensor cores; Triton's tiles are tuned (benchmarks/tune_tva_triton.py), the CUDA kernel's are not
        order = ("triton", "cuda")
    else:
        order = ("cuda", "triton")  # fp32: both are FMA (Triton's fp32 dot is IEEE, not TF32)
    for cand in order:
        if impl_status(cand, device, head_dim, dtype)[0]:
            return cand
    return "reference"


def _impl_fn(impl: str) -> Callable[..., torch.Tensor]:
    if impl == "reference":
        return tva_attention_ref
    if impl == "triton":
        from ..triton.tva import tva_attention_triton

        return tva_attention_triton
    if impl == "cpu_native":
        return tva_attention_cpu
    return tva_attention_cuda


# ---- native (C++ CPU / CUDA) implementation as a custom op ---------------------------------------------------
def _native_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor],
                     gate: Optional[torch.Tensor], coef: torch.Tensor, causal: bool, window: int, sinks: int,
                     key_padding_mask: Optional[torch.Tensor], scale: float, save_attn: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _native_forward(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, save_attn,
                           cuda=q.device.type != "cpu")


_native_fwd_op = torch.library.custom_op("apt::tva_attention_native", mutates_args=())(_native_fwd_impl)


# The ops' bodies, with the kernel family chosen by `cuda`, not by the device: tests/test_cuda_emu.py runs the
# CUDA branch on CPU tensors against the emulated kernels.
def _native_forward(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, save_attn=False, *,
                    cuda: bool):
    B, H, Tq, _ = q.shape
    k, v = repeat_kv(q, k, v)  # grouped-query k/v: the kernels read one k/v head per query head
    # contiguous, as the fakes; empty_like: torch.empty(q.shape, dtype=, device=) cost 2.4 µs a call, this 1.0
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    save_attn = save_attn and delta is not None  # without delta the attention part is o itself
    attn = torch.empty_like(o) if save_attn else q.new_empty(0)
    C = native_module() if cuda else cpu_module()
    if not cuda:
        C.tva_forward_cpu(view(q), view(k), view(v), view(delta), view(gate), float(coef), causal, window, sinks,
                          view(key_padding_mask), scale, view(o), view(lse), view(attn) if save_attn else None)
    else:
        C.tva_forward_cuda(view(q), view(k), view(v), view(delta), view(gate), view(coef), causal, window, sinks,
                           view(key_padding_mask), scale, view(o), view(lse), view(attn) if save_attn else None,
                           current_stream(q.device))
    return o, lse, attn


def _native_bwd_impl(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: torch.Tensor,
                     lse: torch.Tensor, delta: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                     coef: torch.Tensor, causal: bool, window: int, sinks: int,
                     key_padding_mask: Optional[torch.Tensor], scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, ddelta (empty without delta), rowdot = Σ_d delta·dO (B, H, Tq) fp32 (empty without delta);
    attn: the attention part of the output (the forward's attn; o without delta)."""
    return _native_backward(grad_o, q, k, v, attn, lse, delta, gate, coef, causal, window, sinks, key_padding_mask,
                            scale, cuda=q.device.type != "cpu")


_native_bwd_op = torch.library.custom_op("apt::tva_attention_native_backward", mutates_args=())(_native_bwd_impl)


def _native_backward(grad_o, q, k, v, attn, lse, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, *,
                     cuda: bool):
    k_given = k
    k, v = repeat_kv(q, k, v)  # grouped-query k/v: repeated for the kernels, dk/dv folded back below
    dq, dk, dv = q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)  # contiguous, as the fakes
    if delta is not None:
        ddelta = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rowdot = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    else:
        ddelta, rowdot = q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    has = delta is not None
    C = native_module() if cuda else cpu_module()
    args = (view(grad_o), view(q), view(k), view(v), view(attn), view(lse), view(delta), view(gate))
    tail = (causal, window, sinks, view(key_padding_mask), scale, view(dq), view(dk), view(dv),
            view(ddelta) if has else None, view(rowdot) if has else None)
    if not cuda:
        C.tva_backward_cpu(*args, float(coef), *tail)
    else:
        di = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # kernel scratch, torch's allocator
        C.tva_backward_cuda(*args, view(coef), *tail, view(di), current_stream(q.device))
    return (dq, *fold_kv_grads(dk, dv, k_given), ddelta, rowdot)


_native_run = register_fused_tva_op(_native_fwd_op, _native_bwd_op, _native_fwd_impl, _native_bwd_impl)


@functools.lru_cache(maxsize=64)
def _coef_const(value: float, device: torch.device) -> torch.Tensor:
    # never an inference tensor, even when first made under torch.inference_mode(): autograd saves coef, and a
    # cached inference tensor would break every later training call with this value
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=torch.float32, device=device)


def _coef_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A float coef as the 0-dim fp32 tensor the ops take, made once per (value, device): a new one per call cost
    ~15 µs on the CPU (a third of a small call's Python overhead), and on CUDA a host-to-device copy each time."""
    # a fake or traced tensor must neither be cached nor meet a cached real one; one made under a torch.func
    # transform is the transform's wrapper, which stayed cached (dead) for every later call with this value
    if backends.custom_op_must_dispatch() or torch._C._are_functorch_transforms_active():
        return torch.tensor(value, dtype=torch.float32, device=device)
    return _coef_const(value, device)


# The device type each native implementation runs on (tests/test_cuda_emu.py runs "cuda" on CPU tensors).
_NATIVE_DEVICE = {"cpu_native": "cpu", "cuda": "cuda"}


def _run_native(impl: str, q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale,
                checked: Optional[TVAArgs] = None, return_lse: bool = False):
    """``checked``: the inputs' TVAArgs when the caller (tva_attention) has validated them and resolved ``impl``."""
    a = checked
    device_type = _NATIVE_DEVICE[impl]
    if a is None:
        check_flag("return_lse", return_lse)
        device = torch.device(device_type)
        # grouped-query k/v go to the op unrepeated (it repeats them for the kernels, and autograd saves them so)
        a = check_tva_inputs(q, *kv_head_views(q, k, v), delta, gate, coef, causal, window, sinks, key_padding_mask,
                             softmax_scale)
        ok, why = impl_status(impl, q.device if q.device.type == device.type else device, a.D, q.dtype)
        if not ok:
            raise _unusable(impl, why, q.dtype)
    if q.device.type != device_type:
        raise ValueError(f"q: the {impl} kernels need {device_type} tensors, got device {q.device}")
    if gate is not None and gate.dtype != q.dtype:
        gate = gate.to(q.dtype)  # the kernels read gate in the inputs' dtype
    # the kernels read coef as an fp32 scalar (CUDA: on the device, so no host sync); .to keeps its gradient
    if not isinstance(coef, torch.Tensor):
        coef = _coef_tensor(float(coef), q.device)
    else:
        coef = coef.to(device=q.device, dtype=torch.float32)
    return _native_run(q, k, v, delta, gate, coef, causal, a.window or 0, a.sinks, key_padding_mask, a.scale,
                       return_lse)


def tva_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                      gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                      window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                      softmax_scale: Optional[float] = None, return_lse: bool = False) -> Any:
    """The fused C++/OpenMP kernel (csrc/tva/tva_cpu.cpp) on CPU tensors; raises RuntimeError when not built,
    TypeError for a float64 input, ValueError for head dims > 256."""
    return _run_native("cpu_native", q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask,
                       softmax_scale, return_lse=return_lse)


def tva_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                       gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                       window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                       softmax_scale: Optional[float] = None, return_lse: bool = False) -> Any:
    """The fused CUDA kernel (csrc/tva/tva_cuda.cu) on CUDA tensors; raises RuntimeError when not built/no GPU."""
    return _run_native("cuda", q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale,
                       return_lse=return_lse)


# The C++ CPU backward packs q and dO into panels of whole 64-row query blocks: with fewer queries than about half a
# block it computes mostly padding, and a training step (forward + backward) ran 1.2-1.9x slower than the reference
# (Tq=1, Tk=1024, B=1, H=8, D=64: 6.6 ms vs 3.4-4.0 ms; 128 sequences of T=8: 1.4-1.9x; 1 thread). Below this many
# queries, ``auto`` takes the reference when autograd will record the call (the forward alone stays native).
_CPU_BWD_MIN_TQ = 32
# Except in fp16/bf16 with a large K/V: the reference upcasts q, k, v to fp32 copies (and its backward again), and
# with more than 2**22 k/v elements (B·H·Tk·D) lost to the native kernels at any query count (bf16, 1 thread, one
# run: B=4 H=8 D=64 Tk=4096 Tq=1/4/8/16/31 1.25/1.7/1.4/2.0/2.2x slower; B=1 H=32 D=128 Tk=4096 Tq=1/16 1.6/1.75x;
# at 2**22 itself, B=2 Tk=4096 Tq=2/4, it was still 6-12% faster). fp32 keeps the rule above.
_CPU_BWD_LOWP_MAX_KV = 1 << 22


def _records_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in xs)


def _gqa_fold(q, k, v, delta, gate, causal, window):
    """Grouped-query attention where every query row sees the same keys -- one query (decode) with causal masking,
    or any number without, and no window (sinks only matter with one) -- as plain attention over the Hkv k/v heads:
    the G query heads of a group become G·Tq rows of one head (q, delta (B, Hkv, G·Tq, D), gate (B, G·Tq, Hkv)).
    Then K and V are read once per group, not repeated G times per call (a whole KV cache per decode step).
    None where that does not apply (repeat_kv then repeats k and v); validation happens in the folded call."""
    G = kv_groups(q, k, v)
    # isinstance, not `in (False, True)`: 0, 1, 1.0, np.bool_ and tensor(True) compare equal and would skip check_flag
    if G == 1 or window is not None or not isinstance(causal, bool) or (causal and q.shape[2] != 1):
        return None
    B, H, Tq, D = q.shape
    Hkv = H // G
    if G * Tq > k.shape[2]:  # more rows than keys: the op refuses Tq > Tk
        return None
    if delta is not None and (not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(q.shape)):
        return None
    if gate is not None and (not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (B, Tq, H)):
        return None
    qf = q.reshape(B, Hkv, G * Tq, D)  # head h = kv·G + g, row g·Tq + t
    df = None if delta is None else delta.reshape(B, Hkv, G * Tq, D)
    gf = None if gate is None else gate.reshape(B, Tq, Hkv, G).permute(0, 3, 1, 2).reshape(B, G * Tq, Hkv)
    return qf, df, gf, G


def tva_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                  gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                  window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                  softmax_scale: Optional[float] = None, impl: str = "auto", return_lse: bool = False) -> Any:
    """TVA attention ``o = softmax(q kᵀ·scale + mask) v + coef · gate[..., None] · delta``.

    Layout (B, H, T, D), not flash-attn's (B, T, H, D): shapes alone cannot tell them apart in self-attention, so a
    (B, T, H, D) tensor passed as is runs without error and attends over the heads; pass ``x.transpose(1, 2)``
    (read through its strides, no copy). k/v may have fewer heads than q, dividing H (GQA / MQA: query head h
    reads k/v head h // (H / Hkv)): a decode step (one query, no window) or a call without causal mask or window
    runs each group's query heads as rows of one head, reading K/V once per group; otherwise one k/v head is
    expanded without a copy and more are repeated for the kernels, transiently: autograd keeps k and v as given
    (the backward repeats them again and sums dk/dv over each group). ``window=W`` keeps
    keys ``i - W < j <= i``: flash-attn's ``window_size=(left, 0)`` is ``window=left + 1``.

    q (B, H, Tq, D); k, v (B, H, Tk, D) with Tq <= Tk (queries are the last Tq positions); delta (B, H, Tq, D);
    gate (B, Tq, H); coef float or 0-dim tensor; key_padding_mask (B, Tk) bool, True = padded. Rows with no visible
    key give zero attention. Differentiable in q, k, v, delta, gate and coef (tensor). ``impl="auto"`` on the CPU
    is the native kernel, except for a call autograd records with fewer than 32 queries (the reference, faster
    there; in fp16/bf16 only up to 2**22 k/v elements) and under torch.func transforms (the reference).

    ``return_lse=True`` returns ``(o, lse)``: lse (B, H, Tq) fp32 (fp64 for fp64 inputs), the attention's
    natural-log log-sum-exp ``ln Σ_visible exp(scale·q·k_j)`` (+inf on a row with no visible key), as flash-attn's
    ``softmax_lse``, e.g. to merge attention computed over separate key ranges; it carries no gradient (detached).

    Precision: the fused backwards (CPU, CUDA, Triton) take FlashAttention's row term ``Σ dO·(attention output)``
    from the attention part of the output, which their forward saves (in the inputs' dtype, as flash-attn saves
    its output) when training with delta, so a perturbation ``coef·gate·delta`` much larger than the attention
    costs dq and dk no precision (tests/test_lowp_accuracy.py). As in flash-attn, the backward recomputes the
    probabilities from the saved fp32 log-sum-exp, so rows whose scores share a large offset lose dq precision
    with its size (fp16, scores around -3600: dq relative error ~1e-2 where the reference has ~5e-4; offsets of a
    few hundred cost ~1e-3); qk-normalised or ordinary activations are far from that.
    """
    check_flag("return_lse", return_lse)
    folded = _gqa_fold(q, k, v, delta, gate, causal, window)
    if folded is not None:  # grouped-query decode: the query heads sharing a k/v head as rows of one (no copy of K/V)
        qf, df, gf, G = folded
        out = tva_attention(qf, k, v, df, gf, coef, False, None, sinks, key_padding_mask, softmax_scale, impl,
                            return_lse)
        o = out[0] if return_lse else out
        B, Hkv, _, D = o.shape
        o = o.view(B, Hkv, G, q.shape[2], D).reshape(q.shape)
        return (o, out[1].view(B, Hkv, G, q.shape[2]).reshape(q.shape[:3])) if return_lse else o
    # grouped-query k/v are checked as views, passed on unrepeated: the fused ops repeat them for their kernels
    # but save them as given (G times less memory for K/V in training), the reference repeats them itself
    a = check_tva_inputs(q, *kv_head_views(q, k, v), delta, gate, coef, causal, window, sinks, key_padding_mask,
                         softmax_scale)
    chosen = resolve_impl(impl, q.device, q.shape[-1], q.dtype)
    if impl == "auto" and chosen == "cpu_native" and a.Tq < _CPU_BWD_MIN_TQ \
            and (q.dtype == torch.float32 or a.B * a.H * a.Tk * a.D <= _CPU_BWD_LOWP_MAX_KV) \
            and _records_grad(q, k, v, delta, gate, coef):
        chosen = "reference"
    if chosen in ("cpu_native", "cuda"):  # checked and resolved: skip the wrapper's second pass over both
        return _run_native(chosen, q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask,
                           softmax_scale, checked=a, return_lse=return_lse)
    fn = _impl_fn(chosen)
    if return_lse:
        return fn(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale, return_lse=True)
    return fn(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale)
