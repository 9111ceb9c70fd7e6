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
import math
import numbers
from typing import Any, Callable, Optional, Union

import torch

from .. import backends
from .._native import cpu_module, current_stream, native_module, view
from .._validate import check_flag, check_ndim
from ..reference.tva import (Coef, TVAArgs, check_tva_inputs, fold_kv_grads, kv_groups, kv_head_views,
                             register_fused_tva_op, repeat_kv,
                             tva_attention_ref)

logger = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cpu_native", "triton", "cuda")

__all__ = ["tva_attention", "tva_attention_cpu", "tva_attention_cuda", "flash_attn_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache", "impl_status", "resolve_impl", "IMPLS", "tva_attention_ref"]

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


def _flash_window(window_size: Any, causal: bool) -> Optional[int]:
    """flash-attn's window_size=(left, right) (-1: unbounded; query i sees keys [p - left, p + right], p its
    position) as tva_attention's window, or ValueError where the two cannot say the same."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size: expected (left, right), each an int >= -1 (-1: unbounded), got "
                         f"{window_size!r}")
    left, right = (int(w) for w in window_size)
    if causal:  # flash-attn: causal sets right = 0
        return None if left < 0 else left + 1
    if left == right:
        return None if left < 0 else left + 1
    raise ValueError(f"window_size: without causal only a symmetric window (left == right) is supported here, got "
                     f"{tuple(window_size)}")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_func`` signature and layout over :func:`tva_attention` (plain attention, no TVA
    term), so code written for flash-attn runs on every device and implementation here: q (B, Tq, H, D), k/v
    (B, Tk, Hkv, D) with Hkv dividing H; returns (B, Tq, H, D), contiguous, and with ``return_attn_probs`` the
    tuple ``(out, softmax_lse (B, H, Tq) fp32, None)`` (flash-attn's third item is the dropout mask's scores,
    only with dropout). Causal with Tq < Tk is aligned to the bottom right, as flash-attn >= 2.1; more queries
    than keys work too (queries that see no key, e.g. the first Tq - Tk under causal: zeros, lse +inf).
    ``window_size=(left, right)`` maps to ``window=left + 1`` (causal; right is 0 there) or, without causal, a
    symmetric ``left == right``. Not supported, with a ValueError naming the argument rather than a silent
    difference: ``dropout_p > 0`` (pass 0 in evaluation, or use an attention dropout outside), ``softcap``,
    ``alibi_slopes``. ``deterministic`` is accepted: these kernels' backward is deterministic."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, t, 4, "(B, T, H, D) (flash-attn's layout)")
    check_flag("causal", causal)
    check_flag("deterministic", deterministic)
    check_flag("return_attn_probs", return_attn_probs)
    _check_flash_unsupported(dropout_p, softcap, alibi_slopes)
    window = _flash_window(window_size, causal)
    Tq, Tk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kpm: Optional[torch.Tensor] = None
    if Tq > Tk:
        # more queries than keys (cross-attention), which tva_attention's contract refuses: Tq - Tk padded keys in
        # front put key j at position j + Tq - Tk, so query i sees exactly flash-attn's keys (p = i + Tk - Tq)
        pad = Tq - Tk
        kt, vt = (torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], 2) for t in (kt, vt))
        kpm = torch.zeros(q.shape[0], Tq, dtype=torch.bool, device=q.device)
        kpm[:, :pad] = True
    out = tva_attention(qt, kt, vt, causal=causal, window=window, key_padding_mask=kpm, softmax_scale=softmax_scale,
                        return_lse=return_attn_probs)
    if return_attn_probs:
        return out[0].transpose(1, 2).contiguous(), out[1], None
    return out.transpose(1, 2).contiguous()


def _check_flash_unsupported(dropout_p: Any = 0.0, softcap: Any = 0.0, alibi_slopes: Any = None) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or dropout_p != 0:
        raise ValueError(f"dropout_p: attention dropout is not supported here (expected 0.0, got {dropout_p!r})")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or softcap != 0:
        raise ValueError(f"softcap: score soft-capping is not supported here (expected 0.0, got {softcap!r})")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: ALiBi is not supported here (expected None)")


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            alibi_slopes: Optional[torch.Tensor] = None, return_softmax_lse: bool = False) -> Any:
    """flash-attn's ``flash_attn_with_kvcache`` for decoding with a KV cache of per-row lengths: q (B, Tq, H, D),
    k_cache/v_cache (B, Tmax, Hkv, D); ``cache_seqlens`` (int or (B,) int32/int64) the tokens already in each
    row's cache (None: every row full). With ``k``/``v`` (B, Tnew, Hkv, D) they are written into the cache in
    place at each row's ``cache_seqlens`` first (no host sync), and attention covers them too. Row b's queries
    sit at its last Tq positions (flash-attn's bottom-right alignment per row). Returns (B, Tq, H, D) (and
    softmax_lse (B, H, Tq) fp32 with ``return_softmax_lse``). Per-row lengths take one query per row (decode);
    more queries per row need equal lengths (cache_seqlens None). Not supported, refused by name: rotary
    embedding, block tables (paged caches), cache_batch_idx, softcap, alibi_slopes."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_ndim(name, t, 4, "(B, T, H, D) (flash-attn's layout)")
    check_flag("causal", causal)
    check_flag("return_softmax_lse", return_softmax_lse)
    _check_flash_unsupported(0.0, softcap, alibi_slopes)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache: expected k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    B, Tq = q.shape[0], q.shape[1]
    Tmax = k_cache.shape[1]
    if k_cache.shape[0] != B:
        raise ValueError(f"k_cache: expected batch {B} (q's), got shape {tuple(k_cache.shape)}")
    lens: Optional[torch.Tensor] = None
    if cache_seqlens is not None:
        if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
            cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int64, device=q.device)
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64) \
                or tuple(cache_seqlens.shape) != (B,):
            got = (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor)
                   else type(cache_seqlens).__name__)
            raise ValueError(f"cache_seqlens: expected an int or a (B,) = ({B},) int32/int64 tensor, got {got}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens: expected device {q.device} (q's), got {cache_seqlens.device}")
        lens = cache_seqlens.long()
        if lens.device.type == "cpu" and not torch.compiler.is_compiling() and B and \
                not (0 <= int(lens.min()) and int(lens.max()) <= Tmax):
            raise ValueError(f"cache_seqlens: expected lengths in [0, {Tmax}] (the cache's), got "
                             f"{int(lens.min())}..{int(lens.max())}")
    if (k is None) != (v is None):
        raise ValueError("k: k and v are given together (the new tokens' keys and values), got only one")
    if k is not None:
        check_ndim("k", k, 4, "(B, Tnew, Hkv, D)")
        if k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"k: expected (B, Tnew, Hkv, D) = ({B}, Tnew, {k_cache.shape[2]}, {k_cache.shape[3]}) "
                             f"with v alike, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if lens is None:
            raise ValueError("cache_seqlens: required with k/v (each row's new tokens go in after its cached ones)")
        start = lens
        if start.device.type == "cpu" and not torch.compiler.is_compiling() and B and \
                int((start + k.shape[1]).max()) > Tmax:
            raise ValueError(f"k: {k.shape[1]} new tokens after cache_seqlens overflow the cache of {Tmax}")
        pos = start[:, None] + torch.arange(k.shape[1], device=q.device)  # (B, Tnew)
        rows = torch.arange(B, device=q.device)[:, None].expand_as(pos)
        k_cache.index_put_((rows, pos), k.to(k_cache.dtype))
        v_cache.index_put_((rows, pos), v.to(v_cache.dtype))
        lens = start + k.shape[1]
    window = _flash_window(window_size, causal)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    if lens is None:
        out = tva_attention(qt, kt, vt, causal=causal, window=window, softmax_scale=softmax_scale,
                            return_lse=return_softmax_lse)
    else:
        if Tq != 1:
            raise ValueError(f"q: per-row cache_seqlens take one query per row (decode), got Tq={Tq}; with more, "
                             "pass equal lengths (cache_seqlens=None over caches cut to the length)")
        # one query per row at position len - 1: which keys it sees depends on the row only, a padding mask
        j = torch.arange(Tmax, device=q.device)[None, :]
        hidden = j >= lens[:, None]
        if window is not None:
            hidden |= j <= lens[:, None] - 1 - window
        out = tva_attention(qt, kt, vt, causal=False, key_padding_mask=hidden, softmax_scale=softmax_scale,
                            return_lse=return_softmax_lse)
    if return_softmax_lse:
        return out[0].transpose(1, 2).contiguous(), out[1]
    return out.transpose(1, 2).contiguous()


def _check_cu_seqlens(name: str, cu: Any, total: int, device: torch.device) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) \
            or cu.shape[0] < 1:
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name}: expected a (batch + 1,) int32/int64 tensor of cumulative lengths, got {got}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} (q's), got {cu.device}")
    bounds = [int(b) for b in cu.tolist()]  # the per-sequence calls need them on the host (flash-attn: max_seqlen)
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds)):
        shown = bounds if len(bounds) <= 12 else bounds[:5] + ["..."] + bounds[-3:]
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total} (the packed length), got {shown}")
    return bounds


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_varlen_func`` for packed sequences: q (total_q, H, D), k/v (total_k, Hkv, D),
    sequence b being rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q (and likewise of k/v); each sequence attends
    only within itself, with :func:`flash_attn_func`'s semantics. Returns (total_q, H, D) and, with
    ``return_attn_probs``, ``(out, softmax_lse (H, total_q) fp32, None)``. One attention call per sequence (the
    kernels here have no packed-batch mode): fine for a packed training batch of a few sequences, slow for
    thousands. ``max_seqlen_q``/``max_seqlen_k`` are checked against the offsets."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, t, 3, "(total, H, D) (flash-attn's packed layout)")
    check_flag("return_attn_probs", return_attn_probs)
    _check_flash_unsupported(dropout_p, softcap, alibi_slopes)
    bq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    bk = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_k: expected {len(bq) - 1} sequences (as cu_seqlens_q), got {len(bk) - 1}")
    for name, mx, b in (("max_seqlen_q", max_seqlen_q, bq), ("max_seqlen_k", max_seqlen_k, bk)):
        longest = max((y - x for x, y in zip(b, b[1:])), default=0)
        if isinstance(mx, bool) or not isinstance(mx, numbers.Integral) or mx < longest:
            raise ValueError(f"{name}: expected an int >= the longest sequence ({longest}), got {mx!r}")
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(zip(bq, bq[1:]), zip(bk, bk[1:])):
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: zeros, lse +inf (flash-attn's empty rows)
            outs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[2]))
            lses.append(torch.full((q.shape[1], q1 - q0), math.inf, dtype=torch.float32, device=q.device))
            continue
        o, lse, _ = flash_attn_func(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale=softmax_scale,
                                    causal=causal, window_size=window_size, deterministic=deterministic,
                                    return_attn_probs=True)
        outs.append(o[0])
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[2])
    if return_attn_probs:
        lse_all = torch.cat(lses, 1) if lses else torch.zeros(q.shape[1], 0, dtype=torch.float32, device=q.device)
        return out, lse_all, None
    return out
