"""Fused TVA attention in Triton: FlashAttention-style forward (online softmax over key blocks, masks with block
skipping, perturbation ``coef·gate·delta`` in the epilogue, saved log-sum-exp) and backward (dK/dV and dQ kernels
recomputing P blockwise from the LSE; a preprocess kernel for rowsum(dO·A), dDelta and Σ_d delta·dO).
Layout: q, delta (B, H, Tq, D), k, v (B, H, Tk, D), any strides; gate (B, Tq, H); Tq <= Tk (queries are the last
Tq positions). Limits: head dim <= 128 (padded to a power of two >= 16 internally); fp32/fp16/bf16.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.tva import Coef, check_tva_inputs, register_fused_tva_op

__all__ = ["tva_attention_triton", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128


@triton.jit
def _key_blocks(m_start, Tq, Tk, W, SINKS, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block must visit: sink blocks [0, n_sink·BN) then [start2, start2 + n_main·BN)."""
    off = Tk - Tq
    p_min = m_start + off
    p_max = tl.minimum(m_start + BLOCK_M, Tq) - 1 + off
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, p_max + 1)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, p_min - W + 1)
        if not CAUSAL:
            hi = tl.minimum(Tk, p_max + W)
    sink_hi = tl.minimum(tl.minimum(SINKS, lo), hi)
    n_sink = tl.cdiv(sink_hi, BLOCK_N)
    start2 = tl.maximum((lo // BLOCK_N) * BLOCK_N, n_sink * BLOCK_N)
    n_main = tl.maximum(tl.cdiv(hi - start2, BLOCK_N), 0)
    return n_sink, start2, n_main


@triton.jit
def _visible(pos, j, Tk, W, SINKS, pad_ptr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_PAD: tl.constexpr):
    """(BM, BN) boolean: query at absolute position pos[m] may see key j[n]."""
    ok = (j[None, :] < Tk) & (pos[:, None] >= 0)
    if CAUSAL:
        ok = ok & (j[None, :] <= pos[:, None])
    if HAS_WINDOW:
        if CAUSAL:
            inw = j[None, :] > pos[:, None] - W
        else:
            diff = pos[:, None] - j[None, :]
            inw = (diff < W) & (diff > -W)
        ok = ok & (inw | (j[None, :] < SINKS))
    if HAS_PAD:
        padded = tl.load(pad_ptr + j, mask=j < Tk, other=1)
        ok = ok & (padded == 0)[None, :]
    return ok


@triton.jit
def _tva_fwd_kernel(
    Q, K, V, DELTA, GATE, COEF, PAD, O, LSE,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    sdb, sdh, sdt, sdd, sgb, sgt, sgh, spb, spt, sob, soh, sot, sod,
    H, Tq, Tk, D, W, SINKS, scale,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    # B*H on axis 0 (up to 2^31-1 programs; axes 1-2 stop at 65535); 64-bit, since bh * T * D and b * stride
    # overflow int32 past 2^31 elements
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    pos = tl.where(m_ok, offs_m + (Tk - Tq), -1)
    pad_ptr = PAD + b * spb  # time stride 1: the launcher passes a contiguous int8 copy of the mask
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_sink, start2, n_main = _key_blocks(m_start, Tq, Tk, W, SINKS, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for it in range(0, n_sink + n_main):
        start_n = tl.where(it < n_sink, it * BLOCK_N, start2 + (it - n_sink) * BLOCK_N)
        j = start_n + offs_n
        kv_mask = (j < Tk)[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + j[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        ok = _visible(pos, j, Tk, W, SINKS, pad_ptr, CAUSAL, HAS_WINDOW, HAS_PAD)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet keep m = -inf; subtract 0 there so exp gives 0, never NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + j[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DELTA:
        dl = tl.load(DELTA + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        c = tl.load(COEF).to(tl.float32)
        if HAS_GATE:
            g = tl.load(GATE + b * sgb + offs_m * sgt + h * sgh, mask=m_ok, other=0.0).to(tl.float32)
            out += (c * g)[:, None] * dl
        else:
            out += c * dl
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    # +inf for rows with no visible key: exp(s - lse) is then 0 in the backward for any s
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * Tq + offs_m, lse, mask=m_ok)


@triton.jit
def _tva_bwd_pre_kernel(
    O, DO, DELTA, GATE, COEF, DI, DDELTA, ROWDOT,
    sob, soh, sot, sod, sgb_, sgh_, sgt_, sgd_, sdb, sdh, sdt, sdd, sgb, sgt, sgh,
    H, Tq, D,
    HAS_DELTA: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Di = Σ_d dO·A with A = o - coef·gate·delta; dDelta = coef·gate·dO; rowdot = Σ_d delta·dO."""
    # B*H on axis 0 (up to 2^31-1 programs; axes 1-2 stop at 65535); 64-bit, since bh * T * D and b * stride
    # overflow int32 past 2^31 elements
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sgb_ + h * sgh_ + offs_m[:, None] * sgt_ + offs_d[None, :] * sgd_, mask=mask,
                 other=0.0).to(tl.float32)
    a = o.to(tl.float32)
    if HAS_DELTA:
        dl = tl.load(DELTA + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=mask,
                     other=0.0).to(tl.float32)
        c = tl.load(COEF).to(tl.float32)
        cg = tl.zeros([BLOCK_M], tl.float32) + c
        if HAS_GATE:
            g = tl.load(GATE + b * sgb + offs_m * sgt + h * sgh, mask=offs_m < Tq, other=0.0).to(tl.float32)
            cg = cg * g
        a = a - cg[:, None] * dl
        offs_out = bh * Tq * D + offs_m[:, None] * D + offs_d[None, :]
        tl.store(DDELTA + offs_out, (cg[:, None] * do).to(DDELTA.dtype.element_ty), mask=mask)
        tl.store(ROWDOT + bh * Tq + offs_m, tl.sum(dl * do, 1), mask=offs_m < Tq)
    tl.store(DI + bh * Tq + offs_m, tl.sum(do * a, 1), mask=offs_m < Tq)


@triton.jit
def _tva_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DI, PAD, DK, DV,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb_, sgh_, sgt_, sgd_, spb,
    H, Tq, Tk, D, W, SINKS, scale,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    # B*H on axis 0 (up to 2^31-1 programs; axes 1-2 stop at 65535); 64-bit, since bh * T * D and b * stride
    # overflow int32 past 2^31 elements
    bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_start = pid_n * BLOCK_N
    j = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (j < Tk)[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + j[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + j[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    pad_ptr = PAD + b * spb
    off = Tk - Tq
    n_max = tl.minimum(n_start + BLOCK_N, Tk) - 1
    # queries (absolute positions) that can see some key of this block
    p_lo = 0
    if CAUSAL:
        p_lo = n_start
    elif HAS_WINDOW:
        p_lo = n_start - W + 1
    p_hi = Tk
    if HAS_WINDOW:
        if n_start >= SINKS:  # a block holding sinks is seen by every later query
            p_hi = tl.minimum(Tk, n_max + W)
    i_lo = tl.maximum(p_lo - off, 0)
    i_hi = tl.minimum(p_hi - off, Tq)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = (i_lo // BLOCK_M) * BLOCK_M
    for m_start in range(start, i_hi, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        qmask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask, other=0.0)
        do = tl.load(DO + b * sgb_ + h * sgh_ + offs_m[:, None] * sgt_ + offs_d[None, :] * sgd_, mask=qmask,
                     other=0.0)
        lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
        di = tl.load(DI + bh * Tq + offs_m, mask=m_ok, other=0.0)
        pos = tl.where(m_ok, offs_m + off, -1)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        ok = _visible(pos, j, Tk, W, SINKS, pad_ptr, CAUSAL, HAS_WINDOW, HAS_PAD)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
        ds = p * (dp - di[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    offs_out = bh * Tk * D + j[:, None] * D + offs_d[None, :]
    tl.store(DK + offs_out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _tva_bwd_dq_kernel(
    Q, K, V, DO, LSE, DI, PAD, DQ,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb_, sgh_, sgt_, sgd_, spb,
    H, Tq, Tk, D, W, SINKS, scale,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    # B*H on axis 0 (up to 2^31-1 programs; axes 1-2 stop at 65535); 64-bit, since bh * T * D and b * stride
    # overflow int32 past 2^31 elements
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    qmask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + b * sgb_ + h * sgh_ + offs_m[:, None] * sgt_ + offs_d[None, :] * sgd_, mask=qmask, other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
    di = tl.load(DI + bh * Tq + offs_m, mask=m_ok, other=0.0)
    pos = tl.where(m_ok, offs_m + (Tk - Tq), -1)
    pad_ptr = PAD + b * spb
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_sink, start2, n_main = _key_blocks(m_start, Tq, Tk, W, SINKS, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for it in range(0, n_sink + n_main):
        start_n = tl.where(it < n_sink, it * BLOCK_N, start2 + (it - n_sink) * BLOCK_N)
        j = start_n + offs_n
        kv_mask = (j < Tk)[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + j[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + j[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        ok = _visible(pos, j, Tk, W, SINKS, pad_ptr, CAUSAL, HAS_WINDOW, HAS_PAD)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
        ds = p * (dp - di[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * Tq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qmask)


# ---- launchers --------------------------------------------------------------------------------------------------
def _cfg(q: torch.Tensor, D: int) -> dict:
    block_d = max(16, triton.next_power_of_2(D))
    if q.device.type != "cuda":  # interpreter: small blocks keep it fast
        bm = bn = 16
    else:
        bm, bn = (64, 64) if block_d <= 64 else (64, 32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PREC=prec)


def _s4(t: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _pad_arg(kpm: Optional[torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, int]:
    if kpm is None:
        return torch.zeros(1, dtype=torch.int8, device=q.device), 0
    p = kpm.to(torch.int8).contiguous()
    return p, p.stride(0)


@torch.library.custom_op("apt::tva_attention_triton", mutates_args=())
def _tva_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor],
                gate: Optional[torch.Tensor], coef: torch.Tensor, causal: bool, window: int, sinks: int,
                key_padding_mask: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    pad, spb = _pad_arg(key_padding_mask, q)
    cfg = _cfg(q, D)
    dummy = q
    grid = (B * H, triton.cdiv(Tq, cfg["BLOCK_M"]))
    _tva_fwd_kernel[grid](
        q, k, v, delta if delta is not None else dummy, gate if gate is not None else dummy, coef, pad, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *_s4(delta),
        *(gate.stride() if gate is not None else (0, 0, 0)), spb, 1, *o.stride(),
        H, Tq, Tk, D, max(window, 1), sinks, scale,
        CAUSAL=causal, HAS_WINDOW=window > 0, HAS_PAD=key_padding_mask is not None,
        HAS_DELTA=delta is not None, HAS_GATE=gate is not None, **cfg)
    return o, lse


@torch.library.custom_op("apt::tva_attention_triton_backward", mutates_args=())
def _tva_bwd_op(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, delta: Optional[torch.Tensor], gate: Optional[torch.Tensor], coef: torch.Tensor,
                causal: bool, window: int, sinks: int, key_padding_mask: Optional[torch.Tensor], scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv, ddelta (empty without delta), rowdot = Σ_d delta·dO (B, H, Tq) fp32."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    cfg = _cfg(q, D)
    di = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    has_delta = delta is not None
    ddelta = torch.empty(q.shape, dtype=delta.dtype, device=q.device) if has_delta else q.new_empty(0)
    rowdot = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device) if has_delta else di.new_empty(0)
    grid_m = (B * H, triton.cdiv(Tq, cfg["BLOCK_M"]))
    _tva_bwd_pre_kernel[grid_m](
        o, grad_o, delta if has_delta else q, gate if gate is not None else q, coef, di,
        ddelta if has_delta else di, rowdot if has_delta else di,
        *o.stride(), *grad_o.stride(), *_s4(delta), *(gate.stride() if gate is not None else (0, 0, 0)),
        H, Tq, D, HAS_DELTA=has_delta, HAS_GATE=gate is not None, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_D=cfg["BLOCK_D"])
    pad, spb = _pad_arg(key_padding_mask, q)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    common = dict(CAUSAL=causal, HAS_WINDOW=window > 0, HAS_PAD=key_padding_mask is not None, **cfg)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_o.stride(), spb)
    _tva_bwd_dkdv_kernel[(B * H, triton.cdiv(Tk, cfg["BLOCK_N"]))](
        q, k, v, grad_o, lse, di, pad, dk, dv, *strides, H, Tq, Tk, D, max(window, 1), sinks, scale, **common)
    _tva_bwd_dq_kernel[grid_m](
        q, k, v, grad_o, lse, di, pad, dq, *strides, H, Tq, Tk, D, max(window, 1), sinks, scale, **common)
    return dq, dk, dv, ddelta, rowdot


register_fused_tva_op(_tva_fwd_op, _tva_bwd_op)


def tva_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                         gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                         window: Optional[int] = None, sinks: int = 0,
                         key_padding_mask: Optional[torch.Tensor] = None,
                         softmax_scale: Optional[float] = None) -> torch.Tensor:
    """The fused Triton TVA attention (same contract as ``tva_attention``); head dim <= 128."""
    a = check_tva_inputs(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale)
    if a.D > MAX_HEAD_DIM:
        raise ValueError(f"q: the triton kernel takes head dims <= {MAX_HEAD_DIM}, got {a.D}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the triton kernel takes float32/float16/bfloat16, got {q.dtype}")
    if a.Tq == 0:
        return q.new_zeros(q.shape) + (0.0 if delta is None else 0.0 * delta)
    if not isinstance(coef, torch.Tensor):
        coef = torch.tensor(float(coef), dtype=torch.float32, device=q.device)
    elif coef.device != q.device:
        coef = coef.to(q.device)
    o, _ = _tva_fwd_op(q, k, v, delta, gate, coef, causal, a.window or 0, a.sinks, key_padding_mask, a.scale)
    return o
