"""Fused TVA attention in Triton: FlashAttention-2-style forward (online softmax over key blocks in base 2, masks
with block skipping, perturbation ``coef·gate·delta`` in the epilogue, saved log-sum-exp) and backward (dK/dV and dQ
kernels recomputing P blockwise from the LSE; a preprocess kernel for rowsum(dO·A), dDelta and Σ_d delta·dO, with
A the attention part that the forward also writes when training with delta).
Layout: q, delta (B, H, Tq, D), k, v (B, H, Tk, D), any strides; gate (B, Tq, H); Tq <= Tk (queries are the last
Tq positions). Limits: head dim <= 128 (padded to a power of two >= 16 internally); fp32/fp16/bf16.

How the loops are laid out (the same in the forward, dK/dV and dQ kernels): the blocks a program visits come in
runs. *Full* blocks — no padding mask, every key < Tk and every (query, key) pair of the tile visible (causal: the
tile lies at or below the diagonal, window: inside the window) — skip the mask work (``_visible``) and, when the head
dim is a power of two, load their tiles without masks; the boundary runs (causal diagonal, window edges, sink blocks,
the ragged last block, every block under a padding mask) take the masked path. Each run is its own loop, so Triton
software-pipelines each. Softmax runs in base 2 (scores scaled by scale·log2(e), ``exp2``); the saved LSE stays in
natural log, ``lse = ln Σ_j exp(scale·q·k_j)`` (+inf for a row that sees no key), the convention of the CUDA and CPU
kernels, and the backward converts it with one multiply per row. The grid is 1-D with the block index fastest, so
programs running together share one head's K/V (dK/dV: Q/dO) in L2; causal query blocks go longest first.

Launch configs (``kernel_configs``; the built-in ones ``table_configs``): BLOCK_M, BLOCK_N, num_warps, num_stages
per kernel ("fwd", "dkdv", "dq"), picked by GPU (an sm_90 table, a default table sized for ~100 KB of shared memory,
an fp32 table) and head dim, with shared-memory estimates beside them (``smem_estimate``); the interpreter uses 16x16
blocks. For tuning they can be overridden, for every call, by the module dict
``CONFIG_OVERRIDES`` (``{"fwd": KernelConfig(128, 64, 8, 3)}``) or by the environment variable
``APT_TVA_TRITON_CONFIG="fwd=128,64,8,3;dkdv=32,128,8,3;dq=128,32,8,3"`` (each ``BLOCK_M,BLOCK_N,num_warps,
num_stages``; any subset of the kernels; the dict wins over the variable). ``benchmarks/tune_tva_triton.py`` times
candidates against torch SDPA on a CUDA machine.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._validate import check_flag
from ..backends import fix_triton_interpreter_bf16_dot
from ..reference.tva import (Coef, check_tva_inputs, fold_kv_grads, kv_head_views, register_fused_tva_op, repeat_kv,
                             tva_attention_ref)

fix_triton_interpreter_bf16_dot()  # a no-op on GPUs; makes bfloat16 tl.dot right under TRITON_INTERPRET=1

__all__ = ["tva_attention_triton", "MAX_HEAD_DIM", "KernelConfig", "CONFIG_OVERRIDES", "kernel_configs",
           "table_configs", "parse_config_spec", "smem_estimate"]

MAX_HEAD_DIM = 128
CONFIG_ENV = "APT_TVA_TRITON_CONFIG"

_LOG2E = tl.constexpr(1.4426950408889634)  # scores · scale · log2(e) feed exp2
_LN2 = tl.constexpr(0.6931471805599453)    # the saved LSE: (m + log2 l) · ln 2, natural log


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
            # non-causal: sinks past the window's right edge stay visible too (they merge with the window run,
            # which starts at or before them whenever SINKS > lo)
            hi = tl.maximum(tl.minimum(Tk, p_max + W), tl.minimum(SINKS, Tk))
    sink_hi = tl.minimum(tl.minimum(SINKS, lo), hi)
    n_sink = tl.cdiv(sink_hi, BLOCK_N)
    start2 = tl.maximum((lo // BLOCK_N) * BLOCK_N, n_sink * BLOCK_N)
    n_main = tl.maximum(tl.cdiv(hi - start2, BLOCK_N), 0)
    return n_sink, start2, n_main


@triton.jit
def _key_runs(m_start, Tq, Tk, W, SINKS, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks of the query block at m_start as iterations it in [0, n): it < n_sink is sink block it, later
    ones main block start2 + (it - n_sink)·BN. Iterations [a, b) are full blocks (no padding mask, keys < Tk, every
    pair of the (BM, BN) tile visible, rows past Tq included); [0, a) and [b, n) need the mask."""
    n_sink, start2, n_main = _key_blocks(m_start, Tq, Tk, W, SINKS, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    off = Tk - Tq
    # bounds on a full block's first key start_n
    lo_ok = start2
    if HAS_WINDOW:  # inside the window for the last row: start_n > m_start + BM - 1 + off - W
        lo_ok = tl.maximum(lo_ok, m_start + BLOCK_M + off - W)
    hi_ok = Tk - BLOCK_N  # keys < Tk
    if CAUSAL:  # at or below the diagonal for the first row: start_n + BN - 1 <= m_start + off
        hi_ok = tl.minimum(hi_ok, m_start + off + 1 - BLOCK_N)
    if HAS_WINDOW:
        if not CAUSAL:  # inside the window's right edge for the first row
            hi_ok = tl.minimum(hi_ok, m_start + off + W - BLOCK_N)
    f_lo = tl.minimum(tl.cdiv(lo_ok - start2, BLOCK_N), n_main)
    f_hi = tl.minimum(tl.maximum(hi_ok - start2 + BLOCK_N, 0) // BLOCK_N, n_main)
    f_hi = tl.maximum(f_hi, f_lo)
    if HAS_PAD:
        f_hi = f_lo
    return n_sink, start2, n_sink + f_lo, n_sink + f_hi, n_sink + n_main


@triton.jit
def _visible(pos, j, Tk, W, SINKS, pad_ptr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_PAD: tl.constexpr):
    """Boolean tile: query at absolute position pos may see key j. pos and j come pre-broadcast ((BM, 1) and
    (1, BN), or transposed for a (BN, BM) tile); pos = -1 marks rows past Tq."""
    ok = (j < Tk) & (pos >= 0)
    if CAUSAL:
        ok = ok & (j <= pos)
    if HAS_WINDOW:
        if CAUSAL:
            inw = j > pos - W
        else:
            diff = pos - j
            inw = (diff < W) & (diff > -W)
        ok = ok & (inw | (j < SINKS))
    if HAS_PAD:
        padded = tl.load(pad_ptr + j, mask=j < Tk, other=1)
        ok = ok & (padded == 0)
    return ok


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; zeros where a row is out of range (CHECK_ROWS) or d >= D (unless EVEN_D)."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _off2(rows, cols, s_row, s_col):
    """Element offsets of a (rows, cols) tile in 64 bits: Triton types a stride that fits int32 as i32, and a row
    index times it wraps past 2^31 elements (a (B, T, H, D) tensor viewed as (B, H, T, D) has time stride H*D). The
    index vectors themselves stay int32 for the masks of the hot loops."""
    return rows[:, None].to(tl.int64) * s_row + cols[None, :].to(tl.int64) * s_col


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, it_lo, it_hi, n_sink, start2,
                Tk, W, SINKS, pad_ptr, qk_scale, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_PAD: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr):
    """Online softmax over key-block iterations [it_lo, it_hi) (see _key_runs); m_i is in log2 units."""
    for it in range(it_lo, it_hi):
        start_n = tl.where(it < n_sink, it * BLOCK_N, start2 + (it - n_sink) * BLOCK_N)
        j = start_n + offs_n
        k = _load_tile(k_ptrs + tl.cast(start_n, tl.int64) * skt, j < Tk, d_ok, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            ok = _visible(pos[:, None], j[None, :], Tk, W, SINKS, pad_ptr, CAUSAL, HAS_WINDOW, HAS_PAD)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows that have seen no key yet keep m = -inf; subtract 0 there so exp2 gives 0, never NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every score is finite: m_new is, and exp2(m_i - m_new) = 0 for a row's first keys (m_i = -inf)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + tl.cast(start_n, tl.int64) * svt, j < Tk, d_ok, MASKED, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _tva_fwd_kernel(
    Q, K, V, DELTA, GATE, COEF, PAD, O, LSE, ATTN,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    sdb, sdh, sdt, sdd, sgb, sgt, sgh, spb, spt, sob, soh, sot, sod,
    H, Tq, Tk, D, W, SINKS, qk_scale,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_GATE: tl.constexpr, SAVE_ATTN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    # 1-D grid, query block fastest: B*H*n_m programs (up to 2^31-1; axes 1-2 would stop at 65535); 64-bit bh,
    # since bh * T * D and b * stride overflow int32 past 2^31 elements
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    if CAUSAL:  # the last query blocks see the most keys: start them first
        pid_m = n_m - 1 - pid_m
    bh = (pid // n_m).to(tl.int64)
    nb = bh // H
    h = bh % H
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q = _load_tile(Q + nb * sqb + h * sqh + _off2(offs_m, offs_d, sqt, sqd), m_ok, d_ok, True, EVEN_D)
    pos = tl.where(m_ok, offs_m + (Tk - Tq), -1)
    pad_ptr = PAD + nb * spb  # time stride 1: the launcher passes a contiguous int8 copy of the mask
    k_ptrs = K + nb * skb + h * skh + _off2(offs_n, offs_d, skt, skd)
    v_ptrs = V + nb * svb + h * svh + _off2(offs_n, offs_d, svt, svd)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_sink, start2, a, b, n = _key_runs(m_start, Tq, Tk, W, SINKS, CAUSAL, HAS_WINDOW, HAS_PAD, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, 0, a, n_sink, start2,
                                Tk, W, SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, True, EVEN_D,
                                BLOCK_N, PREC)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, a, b, n_sink, start2,
                                Tk, W, SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, False, EVEN_D,
                                BLOCK_N, PREC)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, b, n, n_sink, start2,
                                Tk, W, SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, True, EVEN_D,
                                BLOCK_N, PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SAVE_ATTN:  # the attention part for the backward's Di (contiguous, as o): o - perturbation lost its digits
        tl.store(ATTN + bh * Tq * D + _off2(offs_m, offs_d, D, 1), out.to(ATTN.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
    if HAS_DELTA:
        dl = _load_tile(DELTA + nb * sdb + h * sdh + _off2(offs_m, offs_d, sdt, sdd), m_ok, d_ok,
                        True, EVEN_D).to(tl.float32)
        c = tl.load(COEF).to(tl.float32)
        if HAS_GATE:
            g = tl.load(GATE + nb * sgb + offs_m.to(tl.int64) * sgt + h * sgh, mask=m_ok, other=0.0).to(tl.float32)
            out += (c * g)[:, None] * dl
        else:
            out += c * dl
    tl.store(O + nb * sob + h * soh + _off2(offs_m, offs_d, sot, sod), out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    # natural log; +inf for rows with no visible key: exp(s - lse) is then 0 in the backward for any s
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(LSE + bh * Tq + offs_m, lse, mask=m_ok)


@triton.jit
def _tva_bwd_pre_kernel(
    ATTN, DO, DELTA, GATE, COEF, DI, DDELTA, ROWDOT,
    sab, sah, sat, sad, sgb_, sgh_, sgt_, sgd_, sdb, sdh, sdt, sdd, sgb, sgt, sgh,
    H, Tq, D,
    HAS_DELTA: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Di = Σ_d dO·A (A: the attention part the forward saved); dDelta = coef·gate·dO; rowdot = Σ_d delta·dO."""
    # 1-D grid, query block fastest, as the forward (axes 1-2 stop at 65535 programs: Tq > 65535 * BLOCK_M failed
    # to launch); 64-bit bh, since bh * T * D and b * stride overflow int32 past 2^31 elements
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    bh = (pid // n_m).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    a = tl.load(ATTN + b * sab + h * sah + _off2(offs_m, offs_d, sat, sad), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sgb_ + h * sgh_ + _off2(offs_m, offs_d, sgt_, sgd_), mask=mask,
                 other=0.0).to(tl.float32)
    if HAS_DELTA:
        dl = tl.load(DELTA + b * sdb + h * sdh + _off2(offs_m, offs_d, sdt, sdd), mask=mask,
                     other=0.0).to(tl.float32)
        c = tl.load(COEF).to(tl.float32)
        cg = tl.zeros([BLOCK_M], tl.float32) + c
        if HAS_GATE:
            g = tl.load(GATE + b * sgb + offs_m.to(tl.int64) * sgt + h * sgh, mask=offs_m < Tq,
                        other=0.0).to(tl.float32)
            cg = cg * g
        offs_out = bh * Tq * D + _off2(offs_m, offs_d, D, 1)
        tl.store(DDELTA + offs_out, (cg[:, None] * do).to(DDELTA.dtype.element_ty), mask=mask)
        tl.store(ROWDOT + bh * Tq + offs_m, tl.sum(dl * do, 1), mask=offs_m < Tq)
    tl.store(DI + bh * Tq + offs_m, tl.sum(do * a, 1), mask=offs_m < Tq)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, sqt, sgt_, lse_ptr, di_ptr, j, offs_mb, d_ok, lo, hi, Tq, Tk, off,
                 W, SINKS, pad_ptr, qk_scale, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_PAD: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 PREC: tl.constexpr):
    """dK, dV of one key block over the query blocks [lo, hi), in the transposed (BN, BM) orientation (no register
    transposes of P or dS)."""
    for m_start in range(lo, hi, BLOCK_M):
        offs_m = m_start + offs_mb
        m_ok = offs_m < Tq
        q = _load_tile(q_ptrs + tl.cast(m_start, tl.int64) * sqt, m_ok, d_ok, MASKED, EVEN_D)
        do = _load_tile(do_ptrs + tl.cast(m_start, tl.int64) * sgt_, m_ok, d_ok, MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))
            di = tl.load(di_ptr + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
            di = tl.load(di_ptr + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        p_t = tl.exp2(s_t - (lse * _LOG2E)[None, :])
        if MASKED:
            pos = tl.where(m_ok, offs_m + off, -1)
            ok = _visible(pos[None, :], j[:, None], Tk, W, SINKS, pad_ptr, CAUSAL, HAS_WINDOW, HAS_PAD)
            p_t = tl.where(ok, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC).to(tl.float32)
        ds_t = p_t * (dp_t - di[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _tva_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DI, PAD, DK, DV,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb_, sgh_, sgt_, sgd_, spb,
    H, Tq, Tk, D, W, SINKS, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    # 1-D grid, key block fastest (causal: the first key blocks, seen by the most queries, start first); 64-bit bh
    n_n = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    bh = (pid // n_n).to(tl.int64)
    nb = bh // H
    h = bh % H
    n_start = pid_n * BLOCK_N
    j = n_start + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = _load_tile(K + nb * skb + h * skh + _off2(j, offs_d, skt, skd), j < Tk, d_ok, True, EVEN_D)
    v = _load_tile(V + nb * svb + h * svh + _off2(j, offs_d, svt, svd), j < Tk, d_ok, True, EVEN_D)
    pad_ptr = PAD + nb * spb
    off = Tk - Tq
    n_max = tl.minimum(n_start + BLOCK_N, Tk) - 1
    # queries (absolute positions) that can see some key of this block; a block holding sinks is seen by every
    # later query (non-causal: by every query)
    p_lo = 0
    if CAUSAL:
        p_lo = n_start
    elif HAS_WINDOW:
        p_lo = tl.where(n_start < SINKS, 0, n_start - W + 1)
    p_hi = Tk
    if HAS_WINDOW:
        if n_start >= SINKS:
            p_hi = tl.minimum(Tk, n_max + W)
    i_lo = tl.maximum(p_lo - off, 0)
    i_hi = tl.minimum(p_hi - off, Tq)
    start = (i_lo // BLOCK_M) * BLOCK_M
    # query blocks [f_lo, f_hi) are full: no padding mask, keys < Tk, rows < Tq, every pair visible
    n_tot = tl.cdiv(tl.maximum(i_hi - start, 0), BLOCK_M)
    lo_ok = start
    if CAUSAL:  # first row at or past the block's last key: m_start + off >= n_start + BN - 1
        lo_ok = tl.maximum(lo_ok, n_start + BLOCK_N - 1 - off)
    hi_ok = Tq - BLOCK_M
    if HAS_WINDOW:  # unless every key of the block is a sink: all rows inside the window
        edge = n_start + BLOCK_N > SINKS
        hi_ok = tl.where(edge, tl.minimum(hi_ok, n_start + W - BLOCK_M - off), hi_ok)
        if not CAUSAL:
            lo_ok = tl.where(edge, tl.maximum(lo_ok, n_start + BLOCK_N - W - off), lo_ok)
    c_lo = tl.minimum(tl.cdiv(lo_ok - start, BLOCK_M), n_tot)
    c_hi = tl.minimum(tl.maximum(hi_ok - start + BLOCK_M, 0) // BLOCK_M, n_tot)
    c_hi = tl.where(n_start + BLOCK_N <= Tk, tl.maximum(c_hi, c_lo), c_lo)
    if HAS_PAD:
        c_hi = c_lo
    f_lo = start + c_lo * BLOCK_M
    f_hi = start + c_hi * BLOCK_M
    q_ptrs = Q + nb * sqb + h * sqh + _off2(offs_mb, offs_d, sqt, sqd)
    do_ptrs = DO + nb * sgb_ + h * sgh_ + _off2(offs_mb, offs_d, sgt_, sgd_)
    lse_ptr = LSE + bh * Tq
    di_ptr = DI + bh * Tq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, sqt, sgt_, lse_ptr, di_ptr, j, offs_mb, d_ok, start, f_lo,
                          Tq, Tk, off, W, SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, True, EVEN_D,
                          BLOCK_M, PREC)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, sqt, sgt_, lse_ptr, di_ptr, j, offs_mb, d_ok, f_lo, f_hi,
                          Tq, Tk, off, W, SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, False, EVEN_D,
                          BLOCK_M, PREC)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, sqt, sgt_, lse_ptr, di_ptr, j, offs_mb, d_ok, f_hi, i_hi,
                          Tq, Tk, off, W, SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, True, EVEN_D,
                          BLOCK_M, PREC)
    offs_out = bh * Tk * D + _off2(j, offs_d, D, 1)
    kv_mask = (j < Tk)[:, None] & d_ok[None, :]
    tl.store(DK + offs_out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse2, di, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, it_lo, it_hi, n_sink, start2, Tk,
               W, SINKS, pad_ptr, qk_scale, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """dQ of one query block over key-block iterations [it_lo, it_hi) (see _key_runs); lse2 = LSE · log2(e)."""
    for it in range(it_lo, it_hi):
        start_n = tl.where(it < n_sink, it * BLOCK_N, start2 + (it - n_sink) * BLOCK_N)
        j = start_n + offs_n
        k = _load_tile(k_ptrs + tl.cast(start_n, tl.int64) * skt, j < Tk, d_ok, MASKED, EVEN_D)
        v = _load_tile(v_ptrs + tl.cast(start_n, tl.int64) * svt, j < Tk, d_ok, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            ok = _visible(pos[:, None], j[None, :], Tk, W, SINKS, pad_ptr, CAUSAL, HAS_WINDOW, HAS_PAD)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
        ds = p * (dp - di[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _tva_bwd_dq_kernel(
    Q, K, V, DO, LSE, DI, PAD, DQ,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb_, sgh_, sgt_, sgd_, spb,
    H, Tq, Tk, D, W, SINKS, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    # 1-D grid, query block fastest, causal longest first (as the forward); 64-bit bh
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    if CAUSAL:
        pid_m = n_m - 1 - pid_m
    bh = (pid // n_m).to(tl.int64)
    nb = bh // H
    h = bh % H
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q = _load_tile(Q + nb * sqb + h * sqh + _off2(offs_m, offs_d, sqt, sqd), m_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO + nb * sgb_ + h * sgh_ + _off2(offs_m, offs_d, sgt_, sgd_), m_ok, d_ok, True,
                    EVEN_D)
    lse2 = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
    di = tl.load(DI + bh * Tq + offs_m, mask=m_ok, other=0.0)
    pos = tl.where(m_ok, offs_m + (Tk - Tq), -1)
    pad_ptr = PAD + nb * spb
    k_ptrs = K + nb * skb + h * skh + _off2(offs_n, offs_d, skt, skd)
    v_ptrs = V + nb * svb + h * svh + _off2(offs_n, offs_d, svt, svd)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_sink, start2, a, b, n = _key_runs(m_start, Tq, Tk, W, SINKS, CAUSAL, HAS_WINDOW, HAS_PAD, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse2, di, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, 0, a, n_sink, start2, Tk, W,
                    SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, True, EVEN_D, BLOCK_N, PREC)
    dq = _dq_blocks(dq, q, do, lse2, di, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, a, b, n_sink, start2, Tk, W,
                    SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, False, EVEN_D, BLOCK_N, PREC)
    dq = _dq_blocks(dq, q, do, lse2, di, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, b, n, n_sink, start2, Tk, W,
                    SINKS, pad_ptr, qk_scale, CAUSAL, HAS_WINDOW, HAS_PAD, True, EVEN_D, BLOCK_N, PREC)
    tl.store(DQ + bh * Tq * D + _off2(offs_m, offs_d, D, 1), (dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# ---- launch configs ---------------------------------------------------------------------------------------------
class KernelConfig(NamedTuple):
    """One kernel's launch shape: BLOCK_M (query rows) x BLOCK_N (key rows) tiles, num_warps, num_stages."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


KERNELS = ("fwd", "dkdv", "dq")

# Shared-memory estimates (smem_estimate; an upper bound: one buffer per pipeline stage, P and dS in registers):
#   fwd:  Q tile + stages·(K + V tiles)       = (BM·Dp + S·2·BN·Dp)·bytes
#   dkdv: K, V tiles + stages·(Q + dO tiles)  = (2·BN·Dp + S·2·BM·Dp)·bytes
#   dq:   Q, dO tiles + stages·(K + V tiles)  = (2·BM·Dp + S·2·BN·Dp)·bytes
# (Dp = head dim padded to a power of two). Limits per block: 227 KB sm_90, 163 KB sm_80, 99 KB sm_86/89/120.
# Triton 3.9's own figure (kernels compiled for the target on a machine without a GPU) equals the estimate on sm_90
# and is ~20-30% lower on sm_80/86. "regs" = ptxas registers per thread of those builds (causal); no entry spills.
# Nothing here has been timed on a GPU yet: benchmarks/tune_tva_triton.py does that.
# Keys: (kernel, Dp bucket: 64 = Dp <= 64, 128).
_SM90_16BIT = {  # H100/H200, fp16/bf16
    ("fwd", 64): KernelConfig(128, 64, 4, 3),    # 16 + 3·16 = 64 KB, 250 regs
    ("fwd", 128): KernelConfig(128, 64, 8, 3),   # 32 + 3·32 = 128 KB, 212 regs
    ("dkdv", 64): KernelConfig(64, 128, 8, 3),   # 32 + 3·16 = 80 KB, 231 regs
    ("dkdv", 128): KernelConfig(64, 64, 8, 3),   # 32 + 3·32 = 128 KB, 248 regs
    ("dq", 64): KernelConfig(128, 64, 8, 3),     # 32 + 3·16 = 80 KB, 128 regs
    ("dq", 128): KernelConfig(128, 32, 8, 3),    # 64 + 3·16 = 112 KB, 141 regs
}
_DEFAULT_16BIT = {  # other GPUs, fp16/bf16: fits ~100 KB (sm_86/89); regs for sm_80
    ("fwd", 64): KernelConfig(128, 64, 4, 3),    # 16 + 3·16 = 64 KB, 255 regs
    ("fwd", 128): KernelConfig(128, 32, 8, 2),   # 32 + 2·16 = 64 KB, 203 regs
    ("dkdv", 64): KernelConfig(32, 64, 4, 3),    # 16 + 3·8 = 40 KB, 182 regs
    ("dkdv", 128): KernelConfig(32, 64, 8, 2),   # 32 + 2·16 = 64 KB, 220 regs
    ("dq", 64): KernelConfig(64, 32, 4, 3),      # 16 + 3·8 = 40 KB, 163 regs
    ("dq", 128): KernelConfig(64, 32, 4, 2),     # 32 + 2·16 = 64 KB, 220 regs
}
_FP32 = {  # any GPU, fp32 (ieee dots: FMA, register-hungry; 4-byte tiles); regs for sm_90
    ("fwd", 64): KernelConfig(64, 32, 8, 2),     # 16 + 2·16 = 48 KB, 94 regs
    ("fwd", 128): KernelConfig(16, 16, 4, 2),    # 8 + 2·16 = 40 KB, 80 regs
    ("dkdv", 64): KernelConfig(32, 32, 8, 2),    # 16 + 2·16 = 48 KB, 120 regs
    ("dkdv", 128): KernelConfig(16, 32, 8, 2),   # 32 + 2·16 = 64 KB, 158 regs
    ("dq", 64): KernelConfig(32, 32, 4, 2),      # 16 + 2·16 = 48 KB, 104 regs
    ("dq", 128): KernelConfig(32, 16, 8, 2),     # 32 + 2·16 = 64 KB, 75 regs
}
_INTERPRET = KernelConfig(16, 16, 4, 1)  # the CPU interpreter: small blocks keep tests fast
_PRE_BLOCK_M = {64: 128, 128: 64}  # the (memory-bound) preprocess kernel

# Per-call overrides for tuning, kernel name -> KernelConfig (or a 4-tuple); wins over APT_TVA_TRITON_CONFIG.
CONFIG_OVERRIDES: dict[str, KernelConfig] = {}


def smem_estimate(kernel: str, cfg: KernelConfig, head_dim: int, elem_bytes: int = 2) -> int:
    """Bytes of shared memory ``kernel`` needs with ``cfg`` (the formulas above)."""
    dp = max(16, triton.next_power_of_2(head_dim))
    bm, bn, s = cfg.block_m, cfg.block_n, cfg.num_stages
    tiles = {"fwd": bm + s * 2 * bn, "dkdv": 2 * bn + s * 2 * bm, "dq": 2 * bm + s * 2 * bn}[kernel]
    return tiles * dp * elem_bytes


def _check_config(name: str, cfg, source: str = CONFIG_ENV) -> KernelConfig:
    if name not in KERNELS:
        raise ValueError(f"{source}: unknown kernel {name!r}, expected one of {', '.join(KERNELS)}")
    try:
        vals = [int(x) for x in cfg]
        if len(vals) != 4:
            raise ValueError
        cfg = KernelConfig(*vals)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name} needs BLOCK_M,BLOCK_N,num_warps,num_stages, got {cfg!r}") from None

    def pow2(x: int) -> bool:
        return x > 0 and x & (x - 1) == 0

    if not (pow2(cfg.block_m) and pow2(cfg.block_n) and 16 <= min(cfg.block_m, cfg.block_n)
            and max(cfg.block_m, cfg.block_n) <= 256):
        raise ValueError(f"{source}: {name} blocks must be powers of two in [16, 256], got {cfg}")
    if not (pow2(cfg.num_warps) and cfg.num_warps <= 16 and 1 <= cfg.num_stages <= 8):
        raise ValueError(f"{source}: {name} needs num_warps in 1..16 (a power of two), num_stages in 1..8, "
                         f"got {cfg}")
    return cfg


@functools.lru_cache(maxsize=8)
def parse_config_spec(spec: str) -> dict[str, KernelConfig]:
    """``"fwd=128,64,8,3;dq=128,32,8,3"`` -> {"fwd": KernelConfig(128, 64, 8, 3), "dq": ...}."""
    out: dict[str, KernelConfig] = {}
    for part in spec.replace(" ", "").split(";"):
        if not part:
            continue
        name, eq, vals = part.partition("=")
        if not eq:
            raise ValueError(f"{CONFIG_ENV}: expected kernel=BLOCK_M,BLOCK_N,num_warps,num_stages, got {part!r}")
        out[name] = _check_config(name, vals.split(","))
    return out


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def table_configs(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> dict[str, KernelConfig]:
    """The built-in GPU launch config of each kernel ("fwd", "dkdv", "dq") for a device of ``capability``."""
    bucket = 64 if triton.next_power_of_2(head_dim) <= 64 else 128
    if dtype == torch.float32:
        table = _FP32
    else:
        table = _SM90_16BIT if capability[0] == 9 else _DEFAULT_16BIT
    return {k: table[(k, bucket)] for k in KERNELS}


def kernel_configs(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, KernelConfig]:
    """The launch config of each kernel ("fwd", "dkdv", "dq") for inputs on ``device`` of ``dtype``, with
    CONFIG_OVERRIDES and APT_TVA_TRITON_CONFIG applied."""
    if device.type != "cuda":
        cfgs = {k: _INTERPRET for k in KERNELS}
    else:
        cfgs = table_configs(_capability(device.index if device.index is not None else torch.cuda.current_device()),
                             dtype, head_dim)
    spec = os.environ.get(CONFIG_ENV, "")
    if spec:
        cfgs.update(parse_config_spec(spec))
    for name, cfg in CONFIG_OVERRIDES.items():
        cfgs[name] = _check_config(name, cfg, "CONFIG_OVERRIDES")
    return cfgs


def _launch_args(cfg: KernelConfig, block_d: int, D: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, EVEN_D=block_d == D,
                PREC="ieee" if dtype == torch.float32 else "tf32", num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


# ---- launchers --------------------------------------------------------------------------------------------------
def _s4(t: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _pad_arg(kpm: Optional[torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, int]:
    if kpm is None:
        return torch.zeros(1, dtype=torch.int8, device=q.device), 0
    p = kpm.to(torch.int8).contiguous()
    return p, p.stride(0)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _tva_fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor],
                  gate: Optional[torch.Tensor], coef: torch.Tensor, causal: bool, window: int, sinks: int,
                  key_padding_mask: Optional[torch.Tensor], scale: float, save_attn: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    k, v = repeat_kv(q, k, v)  # grouped-query k/v: the kernels read one k/v head per query head
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    save_attn = save_attn and delta is not None  # without delta the attention part is o itself
    attn = torch.empty(q.shape, dtype=q.dtype, device=q.device) if save_attn else q.new_empty(0)
    pad, spb = _pad_arg(key_padding_mask, q)
    cfg = kernel_configs(q.device, q.dtype, D)["fwd"]
    block_d = _block_d(D)
    dummy = q
    grid = (B * H * triton.cdiv(Tq, cfg.block_m),)
    _tva_fwd_kernel[grid](
        q, k, v, delta if delta is not None else dummy, gate if gate is not None else dummy, coef, pad, o, lse,
        attn if save_attn else o,
        *q.stride(), *k.stride(), *v.stride(), *_s4(delta),
        *(gate.stride() if gate is not None else (0, 0, 0)), spb, 1, *o.stride(),
        H, Tq, Tk, D, max(window, 1), sinks, scale * math.log2(math.e),
        CAUSAL=causal, HAS_WINDOW=window > 0, HAS_PAD=key_padding_mask is not None,
        HAS_DELTA=delta is not None, HAS_GATE=gate is not None, SAVE_ATTN=save_attn,
        **_launch_args(cfg, block_d, D, q.dtype))
    return o, lse, attn


_tva_fwd_op = torch.library.custom_op("apt::tva_attention_triton", mutates_args=())(_tva_fwd_impl)


def _tva_bwd_impl(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: torch.Tensor,
                  lse: torch.Tensor, delta: Optional[torch.Tensor], gate: Optional[torch.Tensor], coef: torch.Tensor,
                  causal: bool, window: int, sinks: int, key_padding_mask: Optional[torch.Tensor], scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv, ddelta (empty without delta), rowdot = Σ_d delta·dO (B, H, Tq) fp32; attn: the
    attention part of the output (o without delta)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    k_given = k
    k, v = repeat_kv(q, k, v)  # grouped-query k/v: repeated for the kernels, dk/dv folded back below
    cfgs = kernel_configs(q.device, q.dtype, D)
    block_d = _block_d(D)
    di = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    has_delta = delta is not None
    ddelta = torch.empty(q.shape, dtype=delta.dtype, device=q.device) if has_delta else q.new_empty(0)
    rowdot = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device) if has_delta else di.new_empty(0)
    pre_bm = 16 if q.device.type != "cuda" else _PRE_BLOCK_M[64 if block_d <= 64 else 128]
    _tva_bwd_pre_kernel[(B * H * triton.cdiv(Tq, pre_bm),)](
        attn, grad_o, delta if has_delta else q, gate if gate is not None else q, coef, di,
        ddelta if has_delta else di, rowdot if has_delta else di,
        *attn.stride(), *grad_o.stride(), *_s4(delta), *(gate.stride() if gate is not None else (0, 0, 0)),
        H, Tq, D, HAS_DELTA=has_delta, HAS_GATE=gate is not None, BLOCK_M=pre_bm, BLOCK_D=block_d, num_warps=4)
    pad, spb = _pad_arg(key_padding_mask, q)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)  # contiguous (k may be an expanded view)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    common = dict(CAUSAL=causal, HAS_WINDOW=window > 0, HAS_PAD=key_padding_mask is not None)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_o.stride(), spb)
    scalars = (H, Tq, Tk, D, max(window, 1), sinks, scale * math.log2(math.e), scale)
    c = cfgs["dkdv"]
    _tva_bwd_dkdv_kernel[(B * H * triton.cdiv(Tk, c.block_n),)](
        q, k, v, grad_o, lse, di, pad, dk, dv, *strides, *scalars, **common,
        **_launch_args(c, block_d, D, q.dtype))
    c = cfgs["dq"]
    _tva_bwd_dq_kernel[(B * H * triton.cdiv(Tq, c.block_m),)](
        q, k, v, grad_o, lse, di, pad, dq, *strides, *scalars, **common, **_launch_args(c, block_d, D, q.dtype))
    return (dq, *fold_kv_grads(dk, dv, k_given), ddelta, rowdot)


_tva_bwd_op = torch.library.custom_op("apt::tva_attention_triton_backward", mutates_args=())(_tva_bwd_impl)
_tva_run = register_fused_tva_op(_tva_fwd_op, _tva_bwd_op, _tva_fwd_impl, _tva_bwd_impl)


def tva_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                         gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                         window: Optional[int] = None, sinks: int = 0,
                         key_padding_mask: Optional[torch.Tensor] = None,
                         softmax_scale: Optional[float] = None, return_lse: bool = False) -> Any:
    """The fused Triton TVA attention (same contract as ``tva_attention``); head dim <= 128."""
    check_flag("return_lse", return_lse)
    # grouped-query k/v go to the op unrepeated (it repeats them for the kernels, and autograd saves them so)
    a = check_tva_inputs(q, *kv_head_views(q, k, v), delta, gate, coef, causal, window, sinks, key_padding_mask,
                         softmax_scale)
    if a.D > MAX_HEAD_DIM:
        raise ValueError(f"q: the triton kernel takes head dims <= {MAX_HEAD_DIM}, got {a.D}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: the triton kernel takes float32/float16/bfloat16, got {q.dtype}")
    if a.Tq == 0:
        # no queries: the (empty) reference, which stays connected to q, k, v, gate and coef (zeros(q.shape) was
        # not: without delta the output did not require grad, and q/k/v/gate got no gradient at all)
        return tva_attention_ref(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale,
                                 return_lse)
    if not isinstance(coef, torch.Tensor):
        coef = torch.tensor(float(coef), dtype=torch.float32, device=q.device)
    elif coef.device != q.device:
        coef = coef.to(q.device)
    return _tva_run(q, k, v, delta, gate, coef, causal, a.window or 0, a.sinks, key_padding_mask, a.scale,
                    return_lse)
