"""Triton kernels of the Mamba selective scan (SCAN.md): forward (saving the state every CHUNK steps), backward
(reverse walk over chunks, recomputing each chunk's states from its checkpoint) and the one-step decode update.
One program per (batch, channel block); the (BLOCK_D, N) state stays in registers over the loop in time; fp32
accumulation; u/delta/z any float dtype and strides. A channel block never straddles a B or C group, so the
per-time-step gradients of B and C reduce over the block before one atomic add per (b, group, t).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_fwd_triton", "selective_scan_bwd_triton", "selective_state_update_triton"]


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _scan_fwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ck_ptr,
                     s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_a0, s_a1,
                     s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
                     s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                     dim, L, N, dpg, dpg_b, dpg_c, nchunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     B_VAR: tl.constexpr, C_VAR: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid_b * stride overflows int32 past 2^31 elements
    pid_g = tl.program_id(1)
    pid_d = tl.program_id(2)
    loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = loc < dpg
    d = (pid_g * dpg + loc).to(tl.int64)  # 64-bit: d * s_ud overflows int32 past 2^31 elements
    n = tl.arange(0, BLOCK_N).to(tl.int64)  # n * s_bn = n * L for a (batch, G, N, L) B
    mask_n = n < N
    m2 = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + d[:, None] * s_a0 + n[None, :] * s_a1, mask=m2, other=0.0).to(tl.float32)
    d0 = tl.cast(pid_g * dpg, tl.int64)  # the block's first channel: its B/C group is the whole block's
    if B_VAR:
        b_base = B_ptr + pid_b * s_bb + (d0 // dpg_b) * s_bg + n * s_bn
    else:
        Bc = tl.load(B_ptr + d[:, None] * s_bb + n[None, :] * s_bn, mask=m2, other=0.0).to(tl.float32)
    if C_VAR:
        c_base = C_ptr + pid_b * s_cb + (d0 // dpg_c) * s_cg + n * s_cn
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_cb + n[None, :] * s_cn, mask=m2, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    row = pid_b * dim + d  # (b, d) row index into last / checkpoints
    for c in range(0, nchunks):
        tl.store(ck_ptr + (row[:, None] * nchunks + c) * N + n[None, :], h, mask=m2)
        for k in range(0, CHUNK):
            t = tl.cast(c * CHUNK + k, tl.int64)  # 64-bit: t * s_ul overflows int32 ((batch, L, dim) views)
            if t < L:
                dt = tl.load(dl_ptr + pid_b * s_db + d * s_dd + t * s_dl, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                uu = tl.load(u_ptr + pid_b * s_ub + d * s_ud + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
                if B_VAR:
                    Bt = tl.load(b_base + t * s_bl, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Bt = Bc
                if C_VAR:
                    Ct = tl.load(c_base + t * s_cl, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Ct = Cc
                h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bt
                y = tl.sum(h * Ct, axis=1)
                if HAS_D:
                    y += Dv * uu
                if HAS_Z:
                    zz = tl.load(z_ptr + pid_b * s_zb + d * s_zd + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
                    y = y * zz * tl.sigmoid(zz)
                tl.store(out_ptr + pid_b * s_ob + d * s_od + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_ptr + row[:, None] * N + n[None, :], h, mask=m2)


@triton.jit
def _scan_bwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, ck_ptr,
                     hs_ptr, du_ptr, ddl_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
                     s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_a0, s_a1,
                     s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
                     s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
                     s_xb, s_xd, s_xl,  # du, ddelta, dz share these strides (allocated alike)
                     dim, L, N, dpg, dpg_b, dpg_c, nchunks, G_b, G_c,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_DLAST: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid_b * stride overflows int32 past 2^31 elements
    pid_g = tl.program_id(1)
    pid_d = tl.program_id(2)
    loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = loc < dpg
    d = (pid_g * dpg + loc).to(tl.int64)  # 64-bit: d * s_ud overflows int32 past 2^31 elements
    n = tl.arange(0, BLOCK_N).to(tl.int64)  # n * s_bn = n * L for a (batch, G, N, L) B
    mask_n = n < N
    m2 = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + d[:, None] * s_a0 + n[None, :] * s_a1, mask=m2, other=0.0).to(tl.float32)
    d0 = tl.cast(pid_g * dpg, tl.int64)  # 64-bit: (d0 // dpg_b) * s_bg = g * N * L
    # gradient buffers of variable B/C: contiguous fp32 (batch, G, N, L)
    if B_VAR:
        b_base = B_ptr + pid_b * s_bb + (d0 // dpg_b) * s_bg + n * s_bn
        db_base = dB_ptr + ((pid_b * G_b + d0 // dpg_b) * N + n) * L
    else:
        Bc = tl.load(B_ptr + d[:, None] * s_bb + n[None, :] * s_bn, mask=m2, other=0.0).to(tl.float32)
    if C_VAR:
        c_base = C_ptr + pid_b * s_cb + (d0 // dpg_c) * s_cg + n * s_cn
        dc_base = dC_ptr + ((pid_b * G_c + d0 // dpg_c) * N + n) * L
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_cb + n[None, :] * s_cn, mask=m2, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    row = pid_b * dim + d
    if HAS_DLAST:
        g = tl.load(dlast_ptr + row[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dBc_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dCc_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    hs_row = hs_ptr + (row[:, None] * CHUNK) * N + n[None, :]  # this row's (CHUNK, N) scratch of states
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        # recompute the chunk's states h_{t-1} from its checkpoint
        h = tl.load(ck_ptr + (row[:, None] * nchunks + c) * N + n[None, :], mask=m2, other=0.0)
        for k in range(0, CHUNK):
            t = tl.cast(c * CHUNK + k, tl.int64)  # 64-bit: t * s_ul overflows int32 ((batch, L, dim) views)
            if t < L:
                tl.store(hs_row + k * N, h, mask=m2)
                dt = tl.load(dl_ptr + pid_b * s_db + d * s_dd + t * s_dl, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    dt = _softplus(dt)
                uu = tl.load(u_ptr + pid_b * s_ub + d * s_ud + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
                if B_VAR:
                    Bt = tl.load(b_base + t * s_bl, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Bt = Bc
                h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bt
        # walk it backwards
        for kk in range(0, CHUNK):
            k = CHUNK - 1 - kk
            t = tl.cast(c * CHUNK + k, tl.int64)  # 64-bit: t * s_ul overflows int32 ((batch, L, dim) views)
            if t < L:
                hp = tl.load(hs_row + k * N, mask=m2, other=0.0)
                raw = tl.load(dl_ptr + pid_b * s_db + d * s_dd + t * s_dl, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    raw = raw + bias
                dt = raw
                if SOFTPLUS:
                    dt = _softplus(raw)
                uu = tl.load(u_ptr + pid_b * s_ub + d * s_ud + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
                if B_VAR:
                    Bt = tl.load(b_base + t * s_bl, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Bt = Bc
                if C_VAR:
                    Ct = tl.load(c_base + t * s_cl, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                else:
                    Ct = Cc
                e = tl.exp(dt[:, None] * A)
                hc = e * hp + (dt * uu)[:, None] * Bt
                dy = tl.load(dout_ptr + pid_b * s_gb + d * s_gd + t * s_gl, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    y = tl.sum(hc * Ct, axis=1)
                    if HAS_D:
                        y += Dv * uu
                    zz = tl.load(z_ptr + pid_b * s_zb + d * s_zd + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
                    sg = tl.sigmoid(zz)
                    dzv = dy * y * sg * (1.0 + zz * (1.0 - sg))
                    tl.store(dz_ptr + pid_b * s_xb + d * s_xd + t * s_xl, dzv.to(dz_ptr.dtype.element_ty),
                             mask=mask_d)
                    dy = dy * zz * sg
                gn = g + Ct * dy[:, None]
                geh = gn * e * hp
                dC_t = tl.where(m2, dy[:, None] * hc, 0.0)
                dB_t = tl.where(m2, gn * (dt * uu)[:, None], 0.0)
                if C_VAR:
                    tl.atomic_add(dc_base + t, tl.sum(dC_t, axis=0), mask=mask_n)
                else:
                    dCc_acc += dC_t
                if B_VAR:
                    tl.atomic_add(db_base + t, tl.sum(dB_t, axis=0), mask=mask_n)
                else:
                    dBc_acc += dB_t
                dA_acc += geh * dt[:, None]
                sum_gB = tl.sum(gn * Bt, axis=1)
                duv = dt * sum_gB
                if HAS_D:
                    duv += dy * Dv
                    dD_acc += dy * uu
                ddt = sum_gB * uu + tl.sum(geh * A, axis=1)
                if SOFTPLUS:
                    ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
                dbias_acc += ddt
                tl.store(du_ptr + pid_b * s_xb + d * s_xd + t * s_xl, duv.to(du_ptr.dtype.element_ty), mask=mask_d)
                tl.store(ddl_ptr + pid_b * s_xb + d * s_xd + t * s_xl, ddt.to(ddl_ptr.dtype.element_ty), mask=mask_d)
                g = gn * e
    # per-channel parameters: summed over batch by atomics into fp32 buffers
    tl.atomic_add(dA_ptr + d[:, None] * N + n[None, :], dA_acc, mask=m2)
    if not B_VAR:
        tl.atomic_add(dB_ptr + d[:, None] * N + n[None, :], dBc_acc, mask=m2)
    if not C_VAR:
        tl.atomic_add(dC_ptr + d[:, None] * N + n[None, :], dCc_acc, mask=m2)
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias_acc, mask=mask_d)


@triton.jit
def _state_update_kernel(s_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         s_sb, s_sd, s_sn, s_xb, s_xd, s_tb, s_td, s_a0, s_a1,
                         s_bb, s_bg, s_bn, s_cb, s_cg, s_cn, s_zb, s_zd, s_yb, s_yd,
                         dim, N, dpg_b, dpg_c,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: pid_b * stride overflows int32 past 2^31 elements
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # 64-bit: d * s_xd, d * s_sd
    mask_d = d < dim
    n = tl.arange(0, BLOCK_N).to(tl.int64)  # n * s_bn = n * L for a (batch, G, N, L) B
    m2 = mask_d[:, None] & (n < N)[None, :]
    dt = tl.load(dt_ptr + pid_b * s_tb + d * s_td, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    xx = tl.load(x_ptr + pid_b * s_xb + d * s_xd, mask=mask_d, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * s_a0 + n[None, :] * s_a1, mask=m2, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + pid_b * s_bb + (d // dpg_b)[:, None] * s_bg + n[None, :] * s_bn, mask=m2,
                 other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * s_cb + (d // dpg_c)[:, None] * s_cg + n[None, :] * s_cn, mask=m2,
                 other=0.0).to(tl.float32)
    sp = s_ptr + pid_b * s_sb + d[:, None] * s_sd + n[None, :] * s_sn
    h = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * xx)[:, None] * Bt
    tl.store(sp, h.to(s_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(h * Ct, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) * xx
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * s_zb + d * s_zd, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(y_ptr + pid_b * s_yb + d * s_yd, y.to(y_ptr.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------------------------------------------------------
def _bc4(M: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L) view; (dim, N) and (batch, G, N, L) unchanged."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _groups(M: torch.Tensor) -> int:
    return 0 if M.dim() == 2 else _bc4(M).shape[1]


def _bc_strides(M4: torch.Tensor):
    if M4.dim() == 2:  # (dim, N): "batch" stride = channel stride
        return (M4.stride(0), 0, M4.stride(1), 0)
    return tuple(M4.stride())


def _layout(dim: int, B: torch.Tensor, C: torch.Tensor):
    gb, gc = _groups(B), _groups(C)
    gp = 1
    for g in (gb, gc):
        if g:
            gp = gp * g // math.gcd(gp, g)  # lcm: divides dim because each group count does
    return gb, gc, gp, dim // gp


def _block_d(dpg: int, BLOCK_N: int) -> int:
    return max(1, min(triton.next_power_of_2(dpg), max(1, 2048 // BLOCK_N), 32))


def _dummy(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(1)


def _vec(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel vector (D, delta_bias / dt_bias) as the kernels index it: unit stride (D_ptr + d). A strided
    view (D[::2]) or an expanded one (mamba_ssm repeats D / dt_bias per head with einops, a stride-0 view) was read
    as if contiguous: wrong values, and past the end of an expanded tensor's storage."""
    return t if t is None or t.stride(-1) == 1 or t.numel() <= 1 else t.contiguous()


def selective_scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """Returns (out, last_state, checkpoints (batch, dim, nchunks, N) fp32)."""
    D, delta_bias = _vec(D), _vec(delta_bias)
    batch, dim, L = u.shape
    N = A.shape[1]
    nchunks = (L + chunk - 1) // chunk
    out = torch.empty_like(u)
    last = torch.empty(batch, dim, N, dtype=torch.float32, device=u.device)
    ckpt = torch.empty(batch, dim, nchunks, N, dtype=torch.float32, device=u.device)
    gb, gc, gp, dpg = _layout(dim, B, C)
    B4, C4 = _bc4(B), _bc4(C)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = _block_d(dpg, BLOCK_N)
    grid = (batch, gp, triton.cdiv(dpg, BLOCK_D))
    _scan_fwd_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else _dummy(u), z if z is not None else _dummy(u),
        delta_bias if delta_bias is not None else _dummy(u), out, last, ckpt,
        *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B4), *_bc_strides(C4),
        *(z.stride() if z is not None else (0, 0, 0)), *out.stride(),
        dim, L, N, dpg, dim // gb if gb else 1, dim // gc if gc else 1, nchunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        B_VAR=gb > 0, C_VAR=gc > 0, CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
    return out, last, ckpt


def selective_scan_bwd_triton(u, delta, A, B, C, D, z, delta_bias, dout, dlast: Optional[torch.Tensor], ckpt,
                              delta_softplus: bool, chunk: int):
    """Returns fp32 grads (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) with du/ddelta/dz in u's dtype and dB/dC in
    the layout of B4 = B viewed as (batch, G, N, L) (or (dim, N)); absent optional inputs give None."""
    D, delta_bias = _vec(D), _vec(delta_bias)
    batch, dim, L = u.shape
    N = A.shape[1]
    nchunks = ckpt.shape[2]
    gb, gc, gp, dpg = _layout(dim, B, C)
    B4, C4 = _bc4(B), _bc4(C)
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if z is not None else None
    dA = torch.zeros(dim, N, **f32)
    dB = torch.zeros(B4.shape, **f32)  # contiguous: the kernel indexes it as such
    dC = torch.zeros(C4.shape, **f32)
    dD = torch.zeros(dim, **f32) if D is not None else None
    dbias = torch.zeros(dim, **f32) if delta_bias is not None else None
    hs = torch.empty(batch, dim, chunk, N, **f32)  # per-row scratch of one chunk's states
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = _block_d(dpg, BLOCK_N)
    grid = (batch, gp, triton.cdiv(dpg, BLOCK_D))
    dm = _dummy(dA)
    _scan_bwd_kernel[grid](
        u, delta, A, B4, C4, D if D is not None else dm, z if z is not None else dm,
        delta_bias if delta_bias is not None else dm, dout, dlast if dlast is not None else dm, ckpt, hs,
        du, ddelta, dA, dB, dC, dD if dD is not None else dm, dz if dz is not None else dm,
        dbias if dbias is not None else dm,
        *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B4), *_bc_strides(C4),
        *(z.stride() if z is not None else (0, 0, 0)), *dout.stride(), *du.stride(),
        dim, L, N, dpg, dim // gb if gb else 1, dim // gc if gc else 1, nchunks, max(gb, 1), max(gc, 1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_DLAST=dlast is not None, B_VAR=gb > 0, C_VAR=gc > 0, CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
    if B.dim() == 3:
        dB = dB.squeeze(1)
    if C.dim() == 3:
        dC = dC.squeeze(1)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool) -> torch.Tensor:
    """In place on state (batch, dim, N); returns y (batch, dim) in x's dtype. B, C: (batch, N) or (batch, G, N)."""
    D, dt_bias = _vec(D), _vec(dt_bias)
    batch, dim, N = state.shape
    B3 = B.unsqueeze(1) if B.dim() == 2 else B
    C3 = C.unsqueeze(1) if C.dim() == 2 else C
    y = torch.empty_like(x)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = max(1, min(triton.next_power_of_2(dim), max(1, 2048 // BLOCK_N), 32))
    dm = _dummy(x)
    _state_update_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
        state, x, dt, A, B3, C3, D if D is not None else dm, z if z is not None else dm,
        dt_bias if dt_bias is not None else dm, y,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B3.stride(), *C3.stride(),
        *(z.stride() if z is not None else (0, 0)), *y.stride(),
        dim, N, dim // B3.shape[1], dim // C3.shape[1],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
    return y
