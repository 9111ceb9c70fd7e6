"""Triton kernels for MoE routing (top-k, GShard-priority queue positions by a two-pass count/scan), dispatch and
combine with their backwards (design/MOE.md). Rows are (N, C) / (S, C) with unit stride along C; index tensors are
contiguous int64; values fp32/fp16/bf16 (accumulation in fp32). E is padded to a power of two (at most 4096).

Positions: pass 1 counts each expert's assignments per (choice rank j, token block b) unit; a scan kernel turns the
counts into exclusive per-unit bases (units in priority order j-major) and per-expert totals; pass 2 numbers each
block's assignments with ``tl.cumsum`` over the one-hot codes and adds the base.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["route", "dispatch", "dispatch_backward", "combine", "combine_backward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_EXPERTS = 4096


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: the Triton MoE kernels take float32/float16/bfloat16, got {t.dtype}")


def _block_c(c: int) -> int:
    return max(16, min(triton.next_power_of_2(max(c, 1)), 1024))


@triton.jit
def _topk_kernel(p_ptr, idx_ptr, N, E, stride_n, stride_e, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    # 64-bit rows: rows * stride_n (and cols * stride_e for a transposed probs) overflow int32 past 2^31 elements
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    m = rmask[:, None] & (cols[None, :] < E)
    p = tl.load(p_ptr + rows[:, None] * stride_n + cols[None, :].to(tl.int64) * stride_e, mask=m,
                other=-1.0).to(tl.float32)
    # the reference's order (a stable descending sort) ranks NaN above every number, NaNs by increasing expert:
    # take a row's lowest-index NaN while it has one, else the argmax of its numbers; argmax itself never sees a NaN
    # Padding columns and taken experts are never chosen (avail), whatever the values: -inf (or any number, since
    # the back-end op takes any values) must still beat them. Among the numbers, the argmax with ties to the lowest
    # index; when every number left is -inf, the lowest available index (the reference's order too).
    nan = p != p
    avail = m
    for j in tl.static_range(K):
        first_nan = tl.min(tl.where(nan & avail, cols[None, :], BLOCK_E), axis=1)  # BLOCK_E: no NaN left
        num = avail & ~nan
        key = tl.where(num, p, float("-inf"))
        top = tl.argmax(key, axis=1, tie_break_left=True)  # ties -> lowest expert index
        first_num = tl.min(tl.where(num, cols[None, :], BLOCK_E), axis=1)
        top = tl.where(tl.max(key, axis=1) == float("-inf"), first_num, top)
        best = tl.where(first_nan < BLOCK_E, first_nan, top)
        tl.store(idx_ptr + rows * K + j, best.to(tl.int64), mask=rmask)
        taken = cols[None, :] == best[:, None]
        avail = avail & ~taken
        nan = nan & ~taken


@triton.jit
def _count_kernel(idx_ptr, cnt_ptr, N, E, NB, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)  # token blocks on axis 0: axes 1-2 stop at 65535 programs
    j = tl.program_id(1)
    rows = b * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # 64-bit: rows * K
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(idx_ptr + rows * K + j, mask=rows < N, other=-1)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    cnt = tl.sum(onehot, axis=0)
    unit = (j * NB + b).to(tl.int64)  # 64-bit: unit * E passes 2^31 at E = 4096 (block_n 2) from N > 2^19, k = 2
    tl.store(cnt_ptr + unit * E + cols, cnt.to(tl.int64), mask=cols < E)


@triton.jit
def _scan_kernel(cnt_ptr, tot_ptr, start_ptr, U, E, BLOCK_U: tl.constexpr, BLOCK_E: tl.constexpr):
    # one program: exclusive scan of the (U, E) unit counts down the units, in place; totals and dropless starts
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    run = tl.zeros([BLOCK_E], dtype=tl.int64)
    for u0 in range(0, U, BLOCK_U):
        us = (u0 + tl.arange(0, BLOCK_U)).to(tl.int64)  # 64-bit: us * E, as the count kernel's unit * E
        m = (us[:, None] < U) & cmask[None, :]
        c = tl.load(cnt_ptr + us[:, None] * E + cols[None, :], mask=m, other=0)
        incl = tl.cumsum(c, axis=0)
        tl.store(cnt_ptr + us[:, None] * E + cols[None, :], incl - c + run[None, :], mask=m)
        run += tl.sum(c, axis=0)
    tl.store(tot_ptr + cols, run, mask=cmask)
    start = tl.cumsum(run, axis=0) - run
    tl.store(start_ptr + cols, start, mask=cmask)


@triton.jit
def _position_kernel(idx_ptr, base_ptr, start_ptr, pos_ptr, slot_ptr, tos_ptr, N, E, NB, cap,
                     K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)  # token blocks on axis 0: axes 1-2 stop at 65535 programs
    j = tl.program_id(1)
    rows = b * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # 64-bit: rows * K
    rmask = rows < N
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(idx_ptr + rows * K + j, mask=rmask, other=-1)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    before = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # same-expert rows earlier in block
    ec = tl.where(rmask, e, 0)
    unit = (j * NB + b).to(tl.int64)  # 64-bit: unit * E (see the count kernel)
    pos = tl.load(base_ptr + unit * E + ec, mask=rmask, other=0) + before.to(tl.int64)
    start = tl.load(start_ptr + ec, mask=rmask, other=0)
    slot = tl.where(cap < 0, start + pos, tl.where(pos < cap, ec * cap + pos, -1))
    tl.store(pos_ptr + rows * K + j, pos, mask=rmask)
    tl.store(slot_ptr + rows * K + j, slot, mask=rmask)
    tl.store(tos_ptr + slot, rows.to(tl.int64), mask=rmask & (slot >= 0))


def route(probs: torch.Tensor, k: int, cap: int):
    """expert_idx, position, slot, token_of_slot, tokens_per_expert for probs (N, E) fp32 (cap -1: dropless)."""
    n, e = probs.shape
    if probs.dtype != torch.float32:
        raise TypeError(f"probs: the Triton router takes float32 probabilities, got {probs.dtype}")
    if e > _MAX_EXPERTS:
        raise ValueError(f"probs: the Triton router handles at most {_MAX_EXPERTS} experts, got {e}")
    dev = probs.device
    block_e = triton.next_power_of_2(e)
    block_n = max(1, min(128, 8192 // block_e))
    nb = triton.cdiv(n, block_n)
    idx = torch.empty(n, k, dtype=torch.int64, device=dev)
    pos = torch.empty_like(idx)
    slot = torch.empty_like(idx)
    tos = torch.full((n * k if cap < 0 else e * cap,), -1, dtype=torch.int64, device=dev)
    counts = torch.empty(e, dtype=torch.int64, device=dev)
    start = torch.empty(e, dtype=torch.int64, device=dev)
    if n == 0:
        counts.zero_()
        return idx, pos, slot, tos, counts
    work = torch.empty(k * nb * e, dtype=torch.int64, device=dev)
    # 8 warps for the big (BLOCK_N, BLOCK_E) tiles: at 4, 64 values per thread spilled (K=3, E 33..64; sm_90 AOT)
    _topk_kernel[(nb,)](probs, idx, n, e, probs.stride(0), probs.stride(1), K=k, BLOCK_N=block_n, BLOCK_E=block_e,
                        num_warps=8 if block_n * block_e >= 8192 else 4)
    _count_kernel[(nb, k)](idx, work, n, e, nb, K=k, BLOCK_N=block_n, BLOCK_E=block_e)
    _scan_kernel[(1,)](work, counts, start, k * nb, e, BLOCK_U=max(1, min(64, 8192 // block_e)), BLOCK_E=block_e)
    _position_kernel[(nb, k)](idx, work, start, pos, slot, tos, n, e, nb, cap, K=k, BLOCK_N=block_n,
                              BLOCK_E=block_e)
    return idx, pos, slot, tos, counts


@triton.jit
def _dispatch_kernel(x_ptr, tos_ptr, buf_ptr, C, stride_x, BLOCK_C: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)  # s * stride overflows int32 past 2^31 elements
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    t = tl.load(tos_ptr + s)
    row = tl.load(x_ptr + tl.maximum(t, 0) * stride_x + cols, mask=cm & ((cols * 0 + t) >= 0), other=0.0)
    tl.store(buf_ptr + s.to(tl.int64) * C + cols, row, mask=cm)


@triton.jit
def _dispatch_bwd_kernel(g_ptr, slot_ptr, gx_ptr, C, stride_g, K: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # n * stride overflows int32 past 2^31 elements
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        s = tl.load(slot_ptr + n * K + j)
        acc += tl.load(g_ptr + tl.maximum(s, 0) * stride_g + cols, mask=cm & ((cols * 0 + s) >= 0),
                       other=0.0).to(tl.float32)
    tl.store(gx_ptr + n.to(tl.int64) * C + cols, acc.to(gx_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _combine_kernel(out_ptr, w_ptr, slot_ptr, y_ptr, C, stride_o, K: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # n * stride overflows int32 past 2^31 elements
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        s = tl.load(slot_ptr + n * K + j)
        w = tl.load(w_ptr + n * K + j).to(tl.float32)
        row = tl.load(out_ptr + tl.maximum(s, 0) * stride_o + cols, mask=cm & ((cols * 0 + s) >= 0),
                      other=0.0).to(tl.float32)
        acc += tl.where(s >= 0, w, 0.0) * row
    tl.store(y_ptr + n.to(tl.int64) * C + cols, acc.to(y_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _combine_bwd_out_kernel(gy_ptr, w_ptr, slot_ptr, tos_ptr, go_ptr, C, stride_gy, K: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)  # s * stride overflows int32 past 2^31 elements
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < C
    t = tl.load(tos_ptr + s)
    tc = tl.maximum(t, 0)
    w = 0.0
    for j in tl.static_range(K):
        match = (t >= 0) & (tl.load(slot_ptr + tc * K + j) == s)
        w = tl.where(match, tl.load(w_ptr + tc * K + j).to(tl.float32), w)
    g = tl.load(gy_ptr + tc * stride_gy + cols, mask=cm & ((cols * 0 + t) >= 0), other=0.0).to(tl.float32)
    tl.store(go_ptr + s.to(tl.int64) * C + cols, (w * g).to(go_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _combine_bwd_w_kernel(gy_ptr, out_ptr, slot_ptr, gw_ptr, C, stride_gy, stride_o, K: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # n * stride overflows int32 past 2^31 elements
    for j in tl.static_range(K):
        s = tl.load(slot_ptr + n * K + j)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m = (cols < C) & ((cols * 0 + s) >= 0)
            a = tl.load(gy_ptr + n * stride_gy + cols, mask=m, other=0.0).to(tl.float32)
            b = tl.load(out_ptr + tl.maximum(s, 0) * stride_o + cols, mask=m, other=0.0).to(tl.float32)
            acc += a * b
        tl.store(gw_ptr + n * K + j, tl.sum(acc, axis=0))


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    _check_dtype(name, t)
    return t if t.stride(-1) == 1 else t.contiguous()


def dispatch(x: torch.Tensor, token_of_slot: torch.Tensor) -> torch.Tensor:
    x = _rows("x", x)
    s, c = token_of_slot.shape[0], x.shape[1]
    buf = torch.empty(s, c, dtype=x.dtype, device=x.device)
    if s and c:
        bc = _block_c(c)
        _dispatch_kernel[(s, triton.cdiv(c, bc))](x, token_of_slot, buf, c, x.stride(0), BLOCK_C=bc)
    return buf


def dispatch_backward(grad_buf: torch.Tensor, slot: torch.Tensor, n: int) -> torch.Tensor:
    g = _rows("grad_buf", grad_buf)
    c = g.shape[1]
    gx = torch.empty(n, c, dtype=g.dtype, device=g.device)
    if n and c:
        bc = _block_c(c)
        _dispatch_bwd_kernel[(n, triton.cdiv(c, bc))](g, slot, gx, c, g.stride(0), K=slot.shape[1], BLOCK_C=bc)
    return gx


def combine(out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    out = _rows("expert_out", out)
    n, c = slot.shape[0], out.shape[1]
    y = torch.empty(n, c, dtype=out.dtype, device=out.device)
    if n and c:
        bc = _block_c(c)
        _combine_kernel[(n, triton.cdiv(c, bc))](out, weights.contiguous(), slot, y, c, out.stride(0),
                                                 K=slot.shape[1], BLOCK_C=bc)
    return y


def combine_backward(grad_y: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor,
                     token_of_slot: torch.Tensor):
    gy = _rows("grad_y", grad_y)
    out = _rows("expert_out", out)
    w = weights.contiguous()
    s, c = out.shape
    n, k = slot.shape
    g_out = torch.empty(s, c, dtype=out.dtype, device=out.device)
    g_w = torch.empty(n, k, dtype=w.dtype, device=w.device)
    if s and c and n:  # with no tokens (capacity mode still has E*cap slots) the kernel read slot/weights row 0
        bc = _block_c(c)
        _combine_bwd_out_kernel[(s, triton.cdiv(c, bc))](gy, w, slot, token_of_slot, g_out, c, gy.stride(0), K=k,
                                                         BLOCK_C=bc)
    elif s:
        g_out.zero_()
    if n:
        _combine_bwd_w_kernel[(n,)](gy, out, slot, g_w, c, gy.stride(0), out.stride(0), K=k,
                                    BLOCK_C=min(_block_c(c), 256))
    return g_out, g_w
