"""``selective_scan_fn`` / ``selective_state_update``: the Mamba selective scan (SCAN.md) with mamba_ssm's signatures,
dispatching to the fastest implementation for the inputs' device:

- CUDA tensors: native CUDA kernels (csrc/scan/*.cu) > Triton (apt_kernels/triton/scan.py) > reference;
- CPU tensors: native C++ (csrc/scan/scan_cpu.cpp) > reference.

Native and Triton paths are ``torch.library`` custom ops (``apt::selective_scan_fwd`` / ``_bwd``, ``apt::
selective_scan_triton_fwd`` / ``_bwd``, ``apt::selective_state_update``, ...) with fake implementations and an autograd
formula, so they work under autograd and torch.compile. The forward saves the state every ``CHUNK`` steps; the backward
recomputes states chunk by chunk from those checkpoints instead of storing all (batch, dim, L, N) of them.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional, Union, overload

import torch

from .._autograd import first_order_only, refuse_transformed
from .._native import cpu_module, current_stream, native_family_status, native_module, view
from .._validate import check_flag, check_no_overlap, check_tensor
from ..backends import (autograd_free, custom_op_must_dispatch, native_cuda_status, torch_func_active, triton_interpret,
                        triton_status)
from ..reference.scan import (check_scan_args, check_state_update_args, selective_scan_ref,
                              selective_state_update_ref, state_update_heads)

logger = logging.getLogger(__name__)

__all__ = ["selective_scan_fn", "selective_state_update", "selective_scan_cpu", "selective_scan_triton",
           "selective_scan_cuda", "selective_state_update_cpu", "selective_state_update_triton",
           "selective_state_update_cuda", "cpu_status", "cuda_status", "CHUNK", "CUDA_MAX_N"]

# Time steps between saved states: backward memory is batch*dim*N*L/CHUNK; recomputation work does not depend on it.
CHUNK = 64

ScanResult = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nchunks(L: int, chunk: int) -> int:
    return (L + chunk - 1) // chunk


# The forward ops return the checkpoints flattened to 1-D (batch*dim*nchunks*N,), and the backward ops view them
# back: a (batch, dim, nchunks, N) output made torch.export / torch.compile guard on nchunks == 1 (tracing asks
# whether each output dim is 1 for its contiguity), so a sequence length marked dynamic was pinned to one side of
# CHUNK ("satisfy the generated guard L <= 64"). The kernels still see the 4-D buffer.
def _flat_ckpt(ckpt: torch.Tensor) -> torch.Tensor:
    return ckpt.view(-1)


def _ckpt_4d(ckpt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, chunk: int) -> torch.Tensor:
    batch, dim, L = u.shape
    return ckpt.view(batch, dim, _nchunks(L, chunk), A.shape[1])


def pack_bc(M: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """B/C in the scan's layouts -> the kernels' contiguous layouts: (dim, N) stays, (batch, N, L) and
    (batch, G, N, L) become (batch, G, L, N) so that one time step's N values are contiguous."""
    if M.dim() == 2:
        return M.to(acc).contiguous()
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.to(acc).transpose(-1, -2).contiguous()


def unpack_bc(dM: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bc` for gradients: back to ``like``'s layout and dtype."""
    if like.dim() == 2:
        return dM.to(like.dtype)
    g = dM.transpose(-1, -2)
    if like.dim() == 3:
        g = g.squeeze(1)
    return g.to(like.dtype)


def _opt(t: Optional[torch.Tensor], acc: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else _acc_contig(t, acc)


def _acc_contig(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``t.to(acc).contiguous()``, without the no-op ``.to``: on a tensor already in ``acc`` it still cost ~1 µs of
    dispatch (a decode step packs five or six of them)."""
    if t.dtype != acc:
        t = t.to(acc)
    return t.contiguous()


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


# ---------------------------------------------------------------------------------------------------------------
# native ops (CPU kernel here; the CUDA kernel is registered for the same op below)
def _scan_fwd_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                  delta_softplus: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, last, ckpt = _fwd_outputs(u, A, chunk)
    # keep every converted tensor in a local: view() only takes its pointer
    Ap, Bp, Cp, Dp, bp = _pack_params(A, B, C, D, delta_bias, _acc(u.dtype))
    cpu_module().selective_scan_fwd_cpu(
        view(u), view(delta), view(Ap), view(Bp), view(Cp), view(Dp), view(z), view(bp), view(out), view(last),
        view(ckpt), bool(delta_softplus), int(chunk))
    return out, last, _flat_ckpt(ckpt)


def _fwd_outputs(u: torch.Tensor, A: torch.Tensor, chunk: int):
    """y (u's layout and dtype), last state (batch, dim, N) and checkpoints (batch, dim, nchunks, N) in fp32/fp64."""
    acc = _acc(u.dtype)
    batch, dim, L = u.shape
    N = A.shape[1]
    return (torch.empty_like(u), u.new_empty(batch, dim, N, dtype=acc),
            u.new_empty(batch, dim, _nchunks(L, chunk), N, dtype=acc))


def _pack_params(A, B, C, D, delta_bias, acc):
    """A, B, C, D, delta_bias in the kernels' layouts (contiguous, accumulation dtype; B/C through pack_bc)."""
    return A.to(acc).contiguous(), pack_bc(B, acc), pack_bc(C, acc), _opt(D, acc), _opt(delta_bias, acc)


_scan_fwd_op = torch.library.custom_op("apt::selective_scan_fwd", mutates_args=())(_scan_fwd_cpu)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    out, last, ckpt = _fwd_outputs(u, A, chunk)
    return out, last, ckpt.new_empty(ckpt.numel())


def _scan_bwd_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                  dout: torch.Tensor, dlast: Optional[torch.Tensor], ckpt: torch.Tensor, delta_softplus: bool,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the inputs' layouts and dtypes; the gradient of an
    absent optional input is an empty tensor."""
    acc = _acc(u.dtype)
    ckpt = _ckpt_4d(ckpt, u, A, chunk)
    Ap, Bp, Cp, Dp, bp = _pack_params(A, B, C, D, delta_bias, acc)
    dlp = _opt(dlast, acc)
    du, ddelta, dz, dA, dBp, dCp, dD, dbias = _bwd_buffers(u, Ap, Bp, Cp, Dp, z, bp, torch.empty)
    cpu_module().selective_scan_bwd_cpu(
        view(u), view(delta), view(Ap), view(Bp), view(Cp), view(Dp), view(z), view(bp), view(dout), view(dlp),
        view(ckpt), view(du), view(ddelta), view(dA), view(dBp), view(dCp), view(dD), view(dz), view(dbias),
        bool(delta_softplus), int(chunk))
    return _grads_out(u, A, B, C, D, z, delta_bias, du, ddelta, dA, dBp, dCp, dD, dz, dbias)


_scan_bwd_op = torch.library.custom_op("apt::selective_scan_bwd", mutates_args=())(_scan_bwd_cpu)


def _bwd_buffers(u, Ap, Bp, Cp, Dp, z, bp, alloc):
    """du, ddelta, dz (u's layout and dtype; dz None without z) and the packed parameter gradients dA, dB, dC, dD,
    ddelta_bias (None when absent), allocated by ``alloc`` (torch.empty, or torch.zeros for kernels that add)."""
    def like(t):
        return alloc(t.shape, dtype=t.dtype, device=t.device) if t is not None else None

    return (torch.empty_like(u), torch.empty_like(u), torch.empty_like(u) if z is not None else None,
            like(Ap), like(Bp), like(Cp), like(Dp), like(bp))


def _grads_out(u, A, B, C, D, z, delta_bias, du, ddelta, dA, dBp, dCp, dD, dz, dbias):
    return (du, ddelta, dA.to(A.dtype), unpack_bc(dBp, B).contiguous(), unpack_bc(dCp, C).contiguous(),
            dD.to(D.dtype) if D is not None else _empty(u),
            dz if z is not None else _empty(u),
            dbias.to(delta_bias.dtype) if delta_bias is not None else _empty(u))


def _bwd_fake(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt, delta_softplus, chunk):
    # dA/dB/dC/dD/ddelta_bias are contiguous whatever the inputs' strides (the kernels write packed buffers), so not
    # empty_like (which keeps a transposed A's strides); du/ddelta/dz are empty_like(u) as in the kernels
    return (torch.empty_like(u), torch.empty_like(u), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), D.new_empty(D.shape) if D is not None else _empty(u),
            torch.empty_like(u) if z is not None else _empty(u),
            delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else _empty(u))


_scan_bwd_op.register_fake(_bwd_fake)


def _scan_grads(bwd, saved, delta_softplus: bool, chunk: int, dout, dlast) -> tuple:
    """The gradients of (u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk) from the backward ``bwd``
    (an op, or an op's body)."""
    u, delta, A, B, C, D, z, delta_bias, ckpt = saved
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias = bwd(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt,
                                                delta_softplus, chunk)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None)


def _scan_setup_context(ctx, inputs, output) -> None:
    """What a scan op's backward keeps: the inputs, the checkpoints (output[2]) and the two flags."""
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
    ctx.set_materialize_grads(False)


def _make_autograd(fwd_op, bwd_op):
    def backward(ctx, dout, dlast, _dckpt):
        return _scan_grads(bwd_op, ctx.saved_tensors, ctx.delta_softplus, ctx.chunk, dout, dlast)

    fwd_op.register_autograd(backward, setup_context=_scan_setup_context)


class _EagerScan(torch.autograd.Function):
    """A scan op's forward and backward bodies (``fwd``, ``bwd``) under the op's autograd formula, for plain eager
    calls (see _eager_scan)."""

    @staticmethod
    def forward(fwd, bwd, *inputs):
        return fwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate from forward: torch.func transforms need it
        ctx.mark_non_differentiable(output[2])
        _scan_setup_context(ctx, inputs[2:], output)
        ctx.bwd = inputs[1]

    @staticmethod
    @first_order_only("selective_scan")  # the kernels' backward has no backward of its own
    def backward(ctx, dout, dlast, _dckpt):
        return (None, None, *_scan_grads(ctx.bwd, ctx.saved_tensors, ctx.delta_softplus, ctx.chunk, dout, dlast))


_make_autograd(_scan_fwd_op, _scan_bwd_op)


def _state_update_cpu(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                      dt_bias: Optional[torch.Tensor], dt_softplus: bool) -> torch.Tensor:
    y = torch.empty_like(x)
    Ap, Bp, Cp, Dp, bp = _pack_step_params(A, B, C, D, dt_bias, _acc(x.dtype))
    cpu_module().selective_state_update_cpu(
        view(state), view(x), view(dt), view(Ap), view(Bp), view(Cp), view(Dp), view(z), view(bp), view(y),
        bool(dt_softplus))
    return y


_state_update_op = torch.library.custom_op("apt::selective_state_update", mutates_args=("state",))(
    _state_update_cpu)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x)


def _pack_step_bc(M: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(batch, N) or (batch, G, N) -> contiguous (batch, G, 1, N)."""
    # one view of the contiguous fp32 copy, not two unsqueezes and a no-op .to (each ~1 µs of dispatch per step)
    M = _acc_contig(M, acc)
    return M.view(M.shape[0], 1 if M.dim() == 2 else M.shape[1], 1, M.shape[-1])


def _pack_step_params(A, B, C, D, dt_bias, acc):
    return _acc_contig(A, acc), _pack_step_bc(B, acc), _pack_step_bc(C, acc), _opt(D, acc), _opt(dt_bias, acc)


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels (csrc/scan/scan_cuda_*.cu) for the same native ops: torch dispatches CUDA tensors here, so the fakes
# and the autograd formula above serve both devices. B/C/A/D/bias are packed in fp32 exactly as for the CPU kernels.

# Splitting time into parallel pieces costs a first pass over the input (about half a forward; in the backward a
# pass over dt, dy and C), so both directions split only when batch x dim x lanes leaves the GPU idle: None = choose
# (_cuda_chunks_per_split), an int forces it.
CUDA_CHUNKS_PER_SPLIT: Optional[int] = None
# csrc/scan/scan_cuda.h kMaxN: lanes per channel (<= 32) x states per lane (<= 4)
CUDA_MAX_N = 128
_CUDA_THREADS_PER_SM = 512  # threads per SM below which time is split (16 warps; an SM holds 64)


def _cuda_lanes(N: int) -> int:
    """Threads per channel in the CUDA kernels: the next power of two >= N, between 4 and 32."""
    return min(32, max(4, 1 << (N - 1).bit_length()))


def _cuda_chunks_per_split(rows: int, N: int, nchunks: int, device: torch.device) -> int:
    if CUDA_CHUNKS_PER_SPLIT is not None:
        return max(1, int(CUDA_CHUNKS_PER_SPLIT))
    threads = rows * _cuda_lanes(N)
    if threads == 0 or nchunks == 1:  # batch or dim 0: nothing runs (and no division by zero below)
        return max(nchunks, 1)
    target = torch.cuda.get_device_properties(device).multi_processor_count * _CUDA_THREADS_PER_SM
    if threads >= target:
        return nchunks
    splits = min(nchunks, -(-target // threads), 65535)
    return -(-nchunks // splits)


def _cuda_split_workspace(u: torch.Tensor, N: int, chunk: int
                          ) -> tuple[int, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """chunks_per_split and the kernels' workspace for it: (rows, splits-1, N) states (forward) or adjoints
    (backward), (rows, splits-1) sums of dt; None with one split."""
    batch, dim, L = u.shape
    nch = _nchunks(L, chunk)
    cps = _cuda_chunks_per_split(batch * dim, N, nch, u.device)
    splits = -(-nch // cps)
    if splits == 1:
        return cps, None, None
    f32 = torch.float32
    return cps, u.new_empty(batch * dim, splits - 1, N, dtype=f32), u.new_empty(batch * dim, splits - 1, dtype=f32)


def _require_cuda_module(name: str) -> None:
    ok, why = cuda_status()
    if not ok:
        raise RuntimeError(f"{name}: {why}")


# Named (not `_`) so that tests/test_cuda_emu.py can run them on CPU tensors against the emulated kernels.
@_scan_fwd_op.register_kernel("cuda")
def _scan_fwd_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    _require_cuda_module("apt::selective_scan_fwd (cuda)")
    f32 = torch.float32
    out, last, ckpt = _fwd_outputs(u, A, chunk)
    cps, seg_state, seg_dt = _cuda_split_workspace(u, A.shape[1], chunk)
    Ap, Bp, Cp, Dp, bp = _pack_params(A, B, C, D, delta_bias, f32)
    native_module().selective_scan_fwd_cuda(
        view(u), view(delta), view(Ap), view(Bp), view(Cp), view(Dp), view(z), view(bp), view(out), view(last),
        view(ckpt), view(seg_state), view(seg_dt), bool(delta_softplus), int(chunk), int(cps),
        current_stream(u.device))
    return out, last, _flat_ckpt(ckpt)


@_scan_bwd_op.register_kernel("cuda")
def _scan_bwd_cuda(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt, delta_softplus, chunk):
    _require_cuda_module("apt::selective_scan_bwd (cuda)")
    f32 = torch.float32
    ckpt = _ckpt_4d(ckpt, u, A, chunk)
    Ap, Bp, Cp, Dp, bp = _pack_params(A, B, C, D, delta_bias, f32)
    dlp = _opt(dlast, f32)
    # the kernel adds the parameter gradients up with atomics: they start from zero
    du, ddelta, dz, dA, dBp, dCp, dD, dbias = _bwd_buffers(u, Ap, Bp, Cp, Dp, z, bp, torch.zeros)
    cps, seg_state, seg_dt = _cuda_split_workspace(u, A.shape[1], chunk)
    native_module().selective_scan_bwd_cuda(
        view(u), view(delta), view(Ap), view(Bp), view(Cp), view(Dp), view(z), view(bp), view(dout), view(dlp),
        view(ckpt), view(du), view(ddelta), view(dA), view(dBp), view(dCp), view(dD), view(dz), view(dbias),
        view(seg_state), view(seg_dt), bool(delta_softplus), int(chunk), int(cps), current_stream(u.device))
    return _grads_out(u, A, B, C, D, z, delta_bias, du, ddelta, dA, dBp, dCp, dD, dz, dbias)


@_state_update_op.register_kernel("cuda")
def _state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    _require_cuda_module("apt::selective_state_update (cuda)")
    y = torch.empty_like(x)
    Ap, Bp, Cp, Dp, bp = _pack_step_params(A, B, C, D, dt_bias, torch.float32)
    native_module().selective_state_update_cuda(
        view(state), view(x), view(dt), view(Ap), view(Bp), view(Cp), view(Dp), view(z), view(bp), view(y),
        bool(dt_softplus), current_stream(x.device))
    return y


# ---------------------------------------------------------------------------------------------------------------
# Triton ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1). The Triton module is imported on first use only.
def _triton_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                delta_softplus: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton.scan import selective_scan_fwd_triton

    out, last, ckpt = selective_scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    return out, last, _flat_ckpt(ckpt)


_triton_fwd_op = torch.library.custom_op("apt::selective_scan_triton_fwd", mutates_args=())(_triton_fwd)


@_triton_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    batch, dim, L = u.shape
    N = A.shape[1]
    return (torch.empty_like(u), u.new_empty(batch, dim, N, dtype=torch.float32),
            u.new_empty(batch * dim * _nchunks(L, chunk) * N, dtype=torch.float32))


def _triton_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                dout: torch.Tensor, dlast: Optional[torch.Tensor], ckpt: torch.Tensor, delta_softplus: bool,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton.scan import selective_scan_bwd_triton

    dl = dlast.float().contiguous() if dlast is not None else None
    ckpt = _ckpt_4d(ckpt, u, A, chunk)
    du, ddelta, dA, dB, dC, dD, dz, dbias = selective_scan_bwd_triton(
        u, delta, A, B, C, D, z, delta_bias, dout, dl, ckpt, delta_softplus, chunk)
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else _empty(u), dz if z is not None else _empty(u),
            dbias.to(delta_bias.dtype) if delta_bias is not None else _empty(u))


_triton_bwd_op = torch.library.custom_op("apt::selective_scan_triton_bwd", mutates_args=())(_triton_bwd)
_triton_bwd_op.register_fake(_bwd_fake)
_make_autograd(_triton_fwd_op, _triton_bwd_op)


def _triton_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                 dt_bias: Optional[torch.Tensor], dt_softplus: bool) -> torch.Tensor:
    from ..triton.scan import selective_state_update_triton as step

    return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


_triton_step_op = torch.library.custom_op("apt::selective_state_update_triton", mutates_args=("state",))(
    _triton_step)


@_triton_step_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x)


# what each decode-step op runs per device, for _eager_step
_EAGER_STEPS = {_state_update_op: {"cpu": _state_update_cpu, "cuda": _state_update_cuda},
                _triton_step_op: {"cpu": _triton_step, "cuda": _triton_step}}
# the scan ops' (forward, backward) bodies by device type, for _eager_scan
_EAGER_SCANS = {_scan_fwd_op: {"cpu": (_scan_fwd_cpu, _scan_bwd_cpu), "cuda": (_scan_fwd_cuda, _scan_bwd_cuda)},
                _triton_fwd_op: {"cpu": (_triton_fwd, _triton_bwd), "cuda": (_triton_fwd, _triton_bwd)}}


_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_gpu_impl(name: str, what: str, ok_why: tuple[bool, str], t: torch.Tensor, cpu_ok: bool = False,
                    hint: str = "") -> None:
    """For the Triton and CUDA scans: the implementation is usable, and t has a dtype it takes and a CUDA device
    (or cpu_ok)."""
    ok, why = ok_why
    if not ok:
        raise RuntimeError(f"{name}: {why}")
    if t.dtype not in _GPU_DTYPES:
        raise TypeError(f"u: the {what} scan takes float32/float16/bfloat16 (it accumulates in fp32), got {t.dtype}")
    if t.device.type != "cuda" and not cpu_ok:
        raise ValueError(f"u: the {what} scan needs CUDA tensors{hint}, got device {t.device}")


def _check_triton(name: str, t: torch.Tensor) -> None:
    _check_gpu_impl(name, "Triton", triton_status(), t, cpu_ok=triton_interpret(), hint=" (or TRITON_INTERPRET=1)")


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                          delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                          return_last_state: bool = False) -> ScanResult:
    """The Triton scan, explicitly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    u0, (u, delta, z) = u, _prepare(u, delta, A, B, C, D, z, delta_bias)
    _check_triton("selective_scan_triton", u0)
    return _run(_triton_fwd_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, u0.dtype)


def selective_state_update_triton(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                  B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                                  z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                                  dt_softplus: bool = False) -> torch.Tensor:
    """The Triton decode step, explicitly (in place on state; returns y); state (batch, dim, N) or mamba_ssm's
    Mamba-2 head layout (batch, nheads, headdim, N), as selective_state_update."""
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        return state_update_heads(selective_state_update_triton, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    _check_triton("selective_state_update_triton", x)
    return _run_step(_triton_step_op, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _check_cuda(name: str, t: torch.Tensor, N: int) -> None:
    _check_gpu_impl(name, "CUDA", cuda_status(t.device), t)
    if N > CUDA_MAX_N:
        raise ValueError(f"A: the CUDA scan takes N <= {CUDA_MAX_N} states, got N={N}")


def selective_scan_cuda(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                        delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                        return_last_state: bool = False) -> ScanResult:
    """The native CUDA scan, explicitly (RuntimeError when it is unavailable, ValueError for non-CUDA tensors,
    TypeError for fp64)."""
    u0, (u, delta, z) = u, _prepare(u, delta, A, B, C, D, z, delta_bias)
    _check_cuda("selective_scan_cuda", u0, A.shape[1])
    return _run(_scan_fwd_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, u0.dtype)


def selective_state_update_cuda(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                                B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                                z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                                dt_softplus: bool = False) -> torch.Tensor:
    """The native CUDA decode step, explicitly (in place on state; returns y); state (batch, dim, N) or mamba_ssm's
    Mamba-2 head layout (batch, nheads, headdim, N), as selective_state_update."""
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        return state_update_heads(selective_state_update_cuda, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    _check_cuda("selective_state_update_cuda", x, A.shape[1])
    if state.dtype not in _GPU_DTYPES:
        raise TypeError(f"state: the CUDA decode step takes float32/float16/bfloat16 states, got {state.dtype}")
    return _run_step(_state_update_op, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


# ---------------------------------------------------------------------------------------------------------------
# availability
def cpu_status() -> tuple[bool, str]:
    """(available, reason) of the native CPU scan."""
    return native_family_status("scan_cpu")


def cuda_status(device: Optional[torch.device] = None) -> tuple[bool, str]:
    """(available, reason) of the native CUDA scan (on ``device``'s GPU when given)."""
    ok, why = native_cuda_status(device)
    if not ok:
        return ok, why
    return native_family_status("scan_cuda")


def _common_io(x: torch.Tensor, *others: Optional[torch.Tensor], acc_from: tuple = ()) -> list:
    """[x, *others] in one dtype, as the kernels take one dtype for these: unchanged when they share x's dtype;
    else all in the reference's accumulation dtype (of x and acc_from), so that an fp32 delta next to an fp16 u is
    not rounded to fp16 (the reference computes it in fp32). The caller casts the output back to x's dtype."""
    if all(t is None or t.dtype == x.dtype for t in others):
        return [x, *others]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (x, *acc_from)) else torch.float32
    return [t if t is None else t.to(acc) for t in (x, *others)]


def _step_needs_grad(*ts: Optional[torch.Tensor]) -> bool:
    """An input requires grad, or a forward-mode AD level is open (torch.autograd.forward_ad: the kernels would
    drop the tangents of dual inputs silently)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
        return True
    # (not under torch.compile, which traces forward AD itself and cannot trace the level's global)
    return not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0 and \
        any(_is_dual(t) for t in ts)


def _is_dual(t: Optional[torch.Tensor]) -> bool:
    return t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _run_step(step_op, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, checked: bool = False) -> torch.Tensor:
    """A fast decode step on validated inputs: x/dt/z in one dtype (_common_io), y back in x's dtype; empty inputs
    (batch, dim or N of 0) go to the reference. The fast steps are inference kernels without a backward, so an
    input that requires grad is an error here (selective_state_update sends those to the reference)."""
    # checked: selective_state_update has sent inputs that need autograd to the reference already
    if not checked and _step_needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("dt_bias", dt_bias)):
            if _step_needs_grad(t):
                what = "requires grad" if t is not None and t.requires_grad else "is a forward-mode AD dual tensor"
                raise ValueError(f"{name}: {what}, but the fast decode steps are inference kernels without a "
                                 "backward; run under torch.no_grad(), or use selective_state_update_ref")
    if not checked and torch_func_active():
        raise RuntimeError("the fast decode steps do not run under torch.func transforms (vmap, grad, jvp): their "
                           "kernels cannot read the transforms' wrapped tensors; use selective_state_update (which "
                           "falls back to the reference there) or selective_state_update_ref")
    if state.numel() == 0:
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    x_io, dt, z = _common_io(x, dt, z, acc_from=(state,))
    if state.dtype == torch.float64 and x_io.dtype != torch.float64 and state.device.type == "cpu":
        # the reference computes in fp64 for an fp64 state; the CPU kernel takes its precision from x's dtype,
        # so an fp32 x rounded the fp64 state through fp32 on every step
        x_io, dt, z = (t if t is None else t.to(torch.float64) for t in (x_io, dt, z))
    fn = _eager_step(step_op, state)
    y = fn(state, x_io, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    if fn is not step_op:  # what the op's ADInplaceOrView kernel does: autograd sees that state changed
        torch.autograd.graph.increment_version(state)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _eager_step(step_op, state: torch.Tensor):
    """The op's kernel itself in plain eager mode, else the op. A decode step runs once per layer per token, and
    the custom-op dispatch (defaults, autograd and in-place-view keys, device dispatch) cost ~100 µs of Python per
    call, several times the kernel's own launch. The op stays in the path under torch.compile and under any
    dispatch mode (FakeTensorMode, FlopCounterMode, opcheck), which must see it; autograd has nothing to do here
    (_run_step has refused inputs that require grad)."""
    if custom_op_must_dispatch():
        return step_op
    impls = _EAGER_STEPS.get(step_op)
    return impls.get(state.device.type, step_op) if impls else step_op


def _eager_scan(fwd_op, u: torch.Tensor):
    """The scan op itself where it must be seen (torch.compile, dispatch modes), else its bodies for u's device
    through _EagerScan: the op's dispatch cost ~25 µs of Python in the forward and ~170 µs in the backward
    (CPU, torch 2.13, a tiny scan: 585 -> 389 µs for both)."""
    impls = None if custom_op_must_dispatch() else _EAGER_SCANS.get(fwd_op, {}).get(u.device.type)
    if impls is None:
        return fwd_op
    # the explicit entry point whose Function this is (it has no impl argument)
    name = "selective_scan_triton" if fwd_op is _triton_fwd_op else f"selective_scan_{u.device.type}"

    def run(*args):
        # nothing to differentiate (inference, a prefill): the forward body alone, without Function.apply's
        # per-call bookkeeping (inspect.signature); the tensors are args[:8] (u, delta, A, B, C, D, z, delta_bias)
        if autograd_free(*args[:8]):
            return impls[0](*args)
        refuse_transformed(name, *args[:8],
                           instead="use selective_scan_fn, which takes the reference there, or selective_scan_ref")
        return _EagerScan.apply(*impls, *args)
    return run


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Validate; u, delta and z in one dtype (_common_io)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    return _common_io(u, delta, z)


def _run(fwd_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
         out_dtype: torch.dtype) -> ScanResult:
    if u.numel() == 0 or A.shape[1] == 0:  # nothing to scan: the kernels assume L, N >= 1 and dense strides
        y, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    else:
        y, last, _ = _eager_scan(fwd_op, u)(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), CHUNK)
    y = y.to(out_dtype)
    return (y, last) if return_last_state else y


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> ScanResult:
    """The native C++ scan, explicitly (RuntimeError when it is unavailable, ValueError for non-CPU tensors)."""
    check_flag("delta_softplus", delta_softplus)  # "no" counted as True here, unlike selective_scan_fn
    check_flag("return_last_state", return_last_state)
    u0, (u, delta, z) = u, _prepare(u, delta, A, B, C, D, z, delta_bias)
    ok, why = cpu_status()
    if not ok:
        raise RuntimeError(f"selective_scan_cpu: {why}")
    if u.device.type != "cpu":
        raise ValueError(f"u: selective_scan_cpu needs CPU tensors, got device {u.device}")
    return _run(_scan_fwd_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, u0.dtype)


def selective_state_update_cpu(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                               z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                               dt_softplus: bool = False) -> torch.Tensor:
    """The native C++ decode step, explicitly (in place on state; returns y); state (batch, dim, N) or mamba_ssm's
    Mamba-2 head layout (batch, nheads, headdim, N), as selective_state_update."""
    check_flag("dt_softplus", dt_softplus)
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        return state_update_heads(selective_state_update_cpu, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    ok, why = cpu_status()
    if not ok:
        raise RuntimeError(f"selective_state_update_cpu: {why}")
    if x.device.type != "cpu":
        raise ValueError(f"x: selective_state_update_cpu needs CPU tensors, got device {x.device}")
    return _run_step(_state_update_op, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@overload
def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor] = ..., z: Optional[torch.Tensor] = ...,
                      delta_bias: Optional[torch.Tensor] = ..., delta_softplus: bool = ...,
                      return_last_state: Literal[False] = ...) -> torch.Tensor: ...
@overload
def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                      delta_softplus: bool, return_last_state: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor] = ..., z: Optional[torch.Tensor] = ...,
                      delta_bias: Optional[torch.Tensor] = ..., delta_softplus: bool = ..., *,
                      return_last_state: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor] = ..., z: Optional[torch.Tensor] = ...,
                      delta_bias: Optional[torch.Tensor] = ..., delta_softplus: bool = ...,
                      return_last_state: bool = ...) -> ScanResult: ...


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                      delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False) -> ScanResult:
    """Mamba selective scan (mamba_ssm's signature; SCAN.md). u, delta, z: (batch, dim, L); A: (dim, N); B, C:
    (dim, N), (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,). Returns y (u's dtype) and, with
    ``return_last_state``, the final state (batch, dim, N) in fp32 (fp64 for fp64 u). Differentiable in every
    tensor argument.

    Determinism: on the CPU the output, the last state and the gradients of u, delta and z are bit-identical run to
    run and for any thread count. The gradients of the parameters summed over (batch, dim) -- A, D, delta_bias,
    and B / C (summed over the channels sharing them) -- are summed per thread and then across threads, so they are
    bit-identical run to run at one ``torch.set_num_threads`` count but may differ in the last bits (within fp32
    rounding) between counts. The CUDA backward adds those gradients with float atomics: not bit-reproducible
    run to run on a GPU (as mamba_ssm's)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_flag("delta_softplus", delta_softplus)
    check_flag("return_last_state", return_last_state)
    if torch_func_active(forward_ad=True):  # vmap / jvp / forward AD: the kernels cannot read wrapped tensors
        impl, fn = "reference (under a torch.func transform or forward AD)", selective_scan_ref
    else:
        impl, fn = _choose_scan(u, A.shape[-1])
    if not torch.compiler.is_compiling():  # dynamo cannot trace a logger call (fullgraph would fail)
        logger.debug("selective_scan_fn: using %s for %s %s input", impl, u.device.type, u.dtype)
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                           z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                           dt_softplus: bool = False, state_batch_indices: Optional[torch.Tensor] = None
                           ) -> torch.Tensor:
    """One decode step (mamba_ssm's signature): updates ``state`` (batch, dim, N) in place and returns y
    (batch, dim). B, C: (batch, N) or (batch, G, N). mamba_ssm's Mamba-2 head layout works too: state
    (batch, nheads, headdim, N), x/dt/z (batch, nheads, headdim), A (nheads, headdim, N), D/dt_bias
    (nheads, headdim), B/C (batch, ngroups, N) with ngroups dividing nheads, or (batch, N) for one group; y is then
    (batch, nheads, headdim).

    ``state_batch_indices`` (batch,) int32/int64, as mamba_ssm's (continuous batching over a pool of states):
    row i reads and updates ``state[state_batch_indices[i]]`` of a state (pool, ...) instead of ``state[i]``; a
    negative index is a padding row: its y row is zeros and no state is touched. Each slot may appear once. On
    the CPU the indices are checked (range, repeats: ValueError); on a GPU that check would wait for the device,
    so an index past the pool fails in torch's indexing and a repeated slot keeps one row's update.

    With an input that requires grad the differentiable reference runs. Compiled so, its backward works with the
    aot_eager backend but fails with inductor ("modified by an inplace operation": torch 2.13's inductor and an
    input updated in place from a value that requires grad, reproduced without apt); compile decode steps under
    torch.no_grad() (the fused kernels then run) or with backend="aot_eager"."""
    check_flag("dt_softplus", dt_softplus)
    if state_batch_indices is not None:
        return _step_on_slots(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        return state_update_heads(selective_state_update, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    if _step_needs_grad(state, x, dt, A, B, C, D, z, dt_bias):
        impl, fn = "reference (an input requires grad)", selective_state_update_ref  # the one with a backward
        _warn_step_with_grad_once()
    elif torch_func_active():  # vmap: the kernels cannot read batched tensors ("Cannot access data pointer")
        impl, fn = "reference (under a torch.func transform)", selective_state_update_ref
    else:
        impl, fn = _choose_step(x, A.shape[-1], state.dtype)
    if not torch.compiler.is_compiling():
        logger.debug("selective_state_update: using %s for %s %s input", impl, x.device.type, x.dtype)
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _step_on_slots(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, idx) -> torch.Tensor:
    """selective_state_update with state_batch_indices: the rows' slots gathered, stepped, scattered back. No
    host sync (CUDA graphs, decode loops): padding rows read the first valid row's slot (the "anchor") and write
    back that row's own new value, so the repeated writes there all agree."""
    check_tensor("state", state)
    check_tensor("x", x)  # before its batch size is read (None was blamed on state_batch_indices)
    if state.dim() not in (3, 4):
        raise ValueError(f"state: expected (pool, dim, N) or (pool, nheads, headdim, N) with state_batch_indices, "
                         f"got shape {tuple(state.shape)}")
    check_no_overlap("state", state)  # as without indices (torch's index_copy_ error, before)
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"state_batch_indices: expected a tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state_batch_indices: expected int32 or int64, got {idx.dtype}")
    batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else None
    if idx.dim() != 1 or idx.shape[0] != batch:
        raise ValueError(f"state_batch_indices: expected shape (batch,) = ({batch},), got {tuple(idx.shape)}")
    if idx.device != state.device:
        raise ValueError(f"state_batch_indices: expected device {state.device} (state's), got {idx.device}")
    pool = state.shape[0]
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and batch:
        hi = int(idx.max())
        if hi >= pool:
            raise ValueError(f"state_batch_indices: index {hi} past the state pool of {pool} slots")
        used = idx[idx >= 0]
        if used.unique().numel() != used.numel():
            raise ValueError("state_batch_indices: a slot appears more than once; each row needs its own state")
    if batch == 0:
        return selective_state_update(state[:0], x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if pool == 0:  # every row a padding row (checked on the CPU): zeros, with the step's checks of the rest
        return selective_state_update(state.new_zeros(batch, *state.shape[1:]), x, dt, A, B, C, D, z, dt_bias,
                                      dt_softplus).zero_()
    valid = idx >= 0
    # index_select with 1-element tensors, never t[first]: a 0-d tensor index is an .item() (a host sync per step
    # on a GPU, a failed CUDA-graph capture, a torch.compile graph break)
    first = valid.to(torch.int8).argmax().view(1)  # the first valid row (0 when none is)
    anchor = idx.index_select(0, first).clamp_min(0)
    rows = torch.where(valid, idx, anchor).long()
    sub = state.index_select(0, rows)
    before = state.index_select(0, anchor)  # what the anchor slot holds, kept when no row is valid
    y = selective_state_update(sub, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    shape = (-1,) + (1,) * (state.dim() - 1)
    fill = torch.where(valid.index_select(0, first).view(shape), sub.index_select(0, first), before)
    # the padding rows' writes to the anchor repeat a value; only one source per slot may carry its gradient
    # (index_copy_'s backward gives every repeat the slot's whole gradient: x6 with five padding rows)
    own = valid | (torch.arange(batch, device=idx.device) == first)
    src = torch.where(own.view(shape), torch.where(valid.view(shape), sub, fill), fill.detach())
    state.index_copy_(0, rows, src)
    return torch.where(valid.view((-1,) + (1,) * (y.dim() - 1)), y, torch.zeros((), dtype=y.dtype, device=y.device))


_warned_step_with_grad = False


def _warn_step_with_grad_once() -> None:
    # mamba_ssm's step() passes D and dt_bias, nn.Parameters: outside no_grad every decode step would silently
    # take the reference (~10x slower at dim 1536), where mamba_ssm's inference kernel runs without a gradient
    global _warned_step_with_grad
    if _warned_step_with_grad or torch.compiler.is_compiling():
        return
    _warned_step_with_grad = True
    logger.warning("selective_state_update: an input requires grad (nn.Parameters such as D or dt_bias do, "
                   "outside torch.no_grad()), so the differentiable reference runs, several times slower than the "
                   "fused decode step; decode under torch.no_grad() or torch.inference_mode() for it (logged once)")


# The dispatching entry points have validated their inputs already: what they choose runs the op without the
# explicit functions' second pass over the arguments (tens of µs of Python on a decode step).
def _checked_scan(fwd_op):
    def run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        u_io, delta, z = _common_io(u, delta, z)
        return _run(fwd_op, u_io, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, u.dtype)
    return run


def _checked_step(step_op):
    return lambda *args: _run_step(step_op, *args, checked=True)


def _choose_scan(u: torch.Tensor, N: int):
    """(impl, fn) for inputs check_scan_args has passed; the same conditions as the explicit functions check."""
    if u.device.type == "cuda" and u.dtype in _GPU_DTYPES:
        if cuda_status(u.device)[0] and N <= CUDA_MAX_N:
            return "cuda", _checked_scan(_scan_fwd_op)
        if triton_status()[0]:
            return "triton", _checked_scan(_triton_fwd_op)
    elif u.device.type == "cpu" and cpu_status()[0]:
        return "cpu_native", _checked_scan(_scan_fwd_op)
    return "reference", selective_scan_ref


def _choose_step(x: torch.Tensor, N: int, state_dtype: torch.dtype = torch.float32):
    """(impl, fn) for inputs check_state_update_args has passed (see _choose_scan)."""
    if x.device.type == "cuda" and x.dtype in _GPU_DTYPES:
        # the CUDA decode step raises TypeError for an fp64 state: not chosen for one
        if cuda_status(x.device)[0] and N <= CUDA_MAX_N and state_dtype in _GPU_DTYPES:
            return "cuda", _checked_step(_state_update_op)
        if triton_status()[0]:
            return "triton", _checked_step(_triton_step_op)
    elif x.device.type == "cpu" and cpu_status()[0]:
        return "cpu_native", _checked_step(_state_update_op)
    return "reference", selective_state_update_ref
