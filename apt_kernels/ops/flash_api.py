"""flash-attn 2's Python entry points (``flash_attn_func``, ``flash_attn_varlen_func``, ``flash_attn_with_kvcache``
and the qkv- / kv-packed variants) over :func:`apt_kernels.tva_attention`: the same names, argument order,
defaults, (B, T, H, D) layouts, causal bottom-right alignment, window_size and softmax_lse conventions, so code
written for flash-attn runs on every device and implementation here. Plain attention only (no TVA term). What
flash-attn offers and these kernels do not (dropout, softcap, ALiBi, rotary embedding, paged caches,
cache_leftpad) is refused by name when asked for, never silently ignored; its no-op defaults are accepted."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

import torch

from .._validate import check_flag, check_ndim, check_no_overlap, check_tensor
from .tva import tva_attention

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def _check_unsupported(dropout_p: Any = 0.0, softcap: Any = 0.0, **must_be_none: Any) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or dropout_p != 0:
        raise ValueError(f"dropout_p: attention dropout is not supported here (expected 0.0, got {dropout_p!r})")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or softcap != 0:
        raise ValueError(f"softcap: score soft-capping is not supported here (expected 0.0, got {softcap!r})")
    for name, value in must_be_none.items():
        if value is not None:
            raise ValueError(f"{name}: not supported here (expected None)")


def _check_qkv(q: Any, k: Any, v: Any, names: tuple[str, str, str] = ("q", "k", "v"), same_batch: bool = True) -> None:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with Hkv dividing H, all one dtype and device: checked in
    flash-attn's layout, so an error names the argument and the shapes the caller passed."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        check_ndim(name, t, 4, "(B, T, H, D) (flash-attn's layout)")
    B, _, H, D = q.shape
    if (same_batch and k.shape[0] != B) or k.shape[3] != D or k.shape[2] < 1 or H % k.shape[2]:
        raise ValueError(f"{nk}: expected (B, Tk, Hkv, D) = ({B if same_batch else 'pool'}, Tk, Hkv, {D}) with Hkv "
                         f"dividing H={H} ({nq}'s), got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{nv}: expected {nk}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in ((nk, k), (nv, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected {nq}'s dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected {nq}'s device {q.device}, got {t.device}")


def _window(window_size: Any, causal: bool, tk: int, tq: int = 2) -> tuple[bool, Optional[int]]:
    """flash-attn's (causal, window_size=(left, right)) -- query position p sees keys [p - left, p + right], -1
    unbounded, a side >= Tk unbounded too (flash-attn's kernels; varlen: max_seqlen_k), right = 0 with causal,
    and (left, 0) itself causal -- as tva_attention's (causal, window); ValueError where tva_attention cannot say
    the same. One query (``tq`` 1, at the last position) has no key to its right: any right is right = 0."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size: expected (left, right), each an int >= -1 (-1: unbounded), got "
                         f"{window_size!r}")
    left, right = (-1 if w >= tk else int(w) for w in window_size)
    if causal or right == 0 or tq == 1:
        return True, (None if left < 0 else left + 1)
    if left == right:
        return False, (None if left < 0 else left + 1)
    raise ValueError(f"window_size: without causal only (left, 0) or a symmetric window (left == right) is supported "
                     f"here, got {tuple(window_size)}")


def _attend(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, kpm: Optional[torch.Tensor], causal: bool,
            window: Optional[int], scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """tva_attention on (B, H, T, D) views with flash-attn's bottom-right alignment also for Tq > Tk: Tq - Tk
    padded keys in front put key j at position j + Tq - Tk, so query i sees the keys flash-attn's does
    (p = i + Tk - Tq); queries seeing no key give zeros and lse +inf. -> (o (B, H, Tq, D), lse)."""
    tq, tk = qt.shape[2], kt.shape[2]
    if tq > tk:
        pad = tq - tk
        kt, vt = (torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], 2) for t in (kt, vt))
        front = torch.ones(qt.shape[0], pad, dtype=torch.bool, device=qt.device)
        kpm = torch.cat([front, kpm if kpm is not None else front.new_zeros(qt.shape[0], tk)], 1)
    return tva_attention(qt, kt, vt, causal=causal, window=window, key_padding_mask=kpm, softmax_scale=scale,
                         return_lse=True)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_func``: q (B, Tq, H, D), k/v (B, Tk, Hkv, D) with Hkv dividing H; returns
    (B, Tq, H, D), contiguous, and with ``return_attn_probs`` ``(out, softmax_lse (B, H, Tq) fp32, None)``
    (flash-attn's third item holds dropout's scores). Causal with Tq != Tk is aligned to the bottom right, as
    flash-attn >= 2.1 (queries before every key output zeros, lse +inf). ``window_size=(left, right)``: causal
    (or right = 0) -> ``window=left + 1``; without causal a symmetric ``left == right``; other asymmetric windows
    are refused. Refused by name: ``dropout_p > 0``, ``softcap``, ``alibi_slopes``. ``deterministic`` is
    accepted: these kernels' backward is deterministic."""
    return _flash(q, k, v, ("q", "k", "v"), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs)


def _flash(q: Any, k: Any, v: Any, names: tuple[str, str, str], dropout_p: Any, softmax_scale: Any, causal: Any,
           window_size: Any, softcap: Any, alibi_slopes: Any, deterministic: Any, return_attn_probs: Any) -> Any:
    """flash_attn_func's body; ``names``: what the errors call q, k, v (a packed caller's views)."""
    _check_qkv(q, k, v, names)
    check_flag("causal", causal)
    check_flag("deterministic", deterministic)
    check_flag("return_attn_probs", return_attn_probs)
    _check_unsupported(dropout_p, softcap, alibi_slopes=alibi_slopes)
    causal, window = _window(window_size, causal, k.shape[1], q.shape[1])
    o, lse = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, causal, window, softmax_scale)
    out = o.transpose(1, 2).contiguous()
    return (out, lse, None) if return_attn_probs else out


def _cu_seqlens(name: str, cu: Any, total: int, device: torch.device) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) \
            or cu.shape[0] < 1:
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name}: expected a (batch + 1,) int32/int64 tensor of cumulative lengths, got {got}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} (q's), got {cu.device}")
    bounds = [int(b) for b in cu.tolist()]  # the length grouping needs them on the host (flash-attn: max_seqlen)
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds)):
        shown = bounds if len(bounds) <= 12 else bounds[:5] + ["..."] + bounds[-3:]
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total} (the packed length), got {shown}")
    return bounds


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Optional[torch.Tensor] = None) -> Any:
    """flash-attn's ``flash_attn_varlen_func`` for packed sequences: q (total_q, H, D), k/v (total_k, Hkv, D),
    sequence b being rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q (and of k/v by cu_seqlens_k); each attends
    only within itself, with :func:`flash_attn_func`'s semantics. Returns (total_q, H, D) and, with
    ``return_attn_probs``, ``(out, softmax_lse (H, total_q) fp32, None)``. The kernels here have no packed mode:
    sequences of similar lengths run as one batched call, padded on the left to the longest (padded keys masked),
    a skewed batch as a few such calls (grouped by length, padding adding at most 25% work).
    ``max_seqlen_q``/``max_seqlen_k`` are checked against the offsets; ``block_table`` (paged KV) is refused when
    given."""
    return _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                         causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table)


def _flash_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any,
                  max_seqlen_k: Any, dropout_p: Any, softmax_scale: Any, causal: Any, window_size: Any, softcap: Any,
                  alibi_slopes: Any, deterministic: Any, return_attn_probs: Any, block_table: Any,
                  names: tuple[str, str, str] = ("q", "k", "v"),
                  seq_names: tuple[str, str, str, str] = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                          "max_seqlen_k")) -> Any:
    """flash_attn_varlen_func's body; ``names`` / ``seq_names``: what the errors call q, k, v and the offset and
    length arguments (a packed caller's views, a qkv-packed caller's single cu_seqlens / max_seqlen)."""
    for name, t in zip(names, (q, k, v)):
        check_ndim(name, t, 3, "(total, H, D) (flash-attn's packed layout)")
    _check_qkv(q[None], k[None], v[None], names)  # batch 1 of the packed rows: heads, head dim, dtype, device
    check_flag("causal", causal)
    check_flag("return_attn_probs", return_attn_probs)
    _check_unsupported(dropout_p, softcap, alibi_slopes=alibi_slopes, block_table=block_table)
    cu_q_name, cu_k_name, max_q_name, max_k_name = seq_names
    bq = _cu_seqlens(cu_q_name, cu_seqlens_q, q.shape[0], q.device)
    bk = _cu_seqlens(cu_k_name, cu_seqlens_k, k.shape[0], q.device)
    if len(bq) != len(bk):
        raise ValueError(f"{cu_k_name}: expected {len(bq) - 1} sequences (as {cu_q_name}), got {len(bk) - 1}")
    for name, mx, b in ((max_q_name, max_seqlen_q, bq), (max_k_name, max_seqlen_k, bk)):
        longest = max((y - x for x, y in zip(b, b[1:])), default=0)
        if isinstance(mx, bool) or not isinstance(mx, numbers.Integral) or mx < longest:
            raise ValueError(f"{name}: expected an int >= the longest sequence ({longest}), got {mx!r}")
    check_flag("deterministic", deterministic)
    # normalised once, with max_seqlen_k as flash-attn's varlen kernels do (not per sequence)
    causal, window = _window(window_size, causal, max_seqlen_k, 2 if max_seqlen_q > 1 else 1)
    seqs = [(q0, q1 - q0, k0, k1 - k0) for (q0, q1), (k0, k1) in zip(zip(bq, bq[1:]), zip(bk, bk[1:])) if q1 > q0]
    outs, lses, rows = [], [], []
    for bucket in _length_buckets(seqs):
        o, lse, src = _attend_bucket(q, k, v, bucket, causal, window, softmax_scale)
        outs.append(o)
        lses.append(lse)
        rows.append(src)
    H, Dv = q.shape[1], v.shape[2]
    if len(outs) == 1 and len(rows[0]) == q.shape[0]:
        out, lse_all = outs[0], lses[0]  # one bucket in packed order (the common training batch): no scatter
    elif outs:
        # each bucket's rows back to their packed places (every row of q lies in exactly one sequence)
        where = torch.tensor([r for src in rows for r in src], dtype=torch.int64, device=q.device)
        out = q.new_zeros(q.shape[0], H, Dv).index_copy(0, where, torch.cat(outs))
        lse_all = torch.zeros(H, q.shape[0], dtype=torch.float32, device=q.device).index_copy(
            1, where, torch.cat(lses, 1))
    else:
        out, lse_all = q.new_zeros(0, H, Dv), torch.zeros(H, 0, dtype=torch.float32, device=q.device)
    return (out, lse_all, None) if return_attn_probs else out


# a call's fixed cost in score elements (a launch, the per-call Python): short sequences join a group even where
# their padding is more than their own work
_CALL_WORK = 128 * 128


def _length_buckets(seqs: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Sequences (q start, q length, k start, k length) grouped for one padded attention call per group: longest
    first, a sequence joining the current group while the group's padded work (count x longest q x longest k)
    stays within 1.25 times its sequences' own plus one call's fixed cost. So a packed batch of similar lengths is
    one call and a skewed one (one long, many short) a few, never a call per sequence. (A looser 2x let [1024, 512]
    share a call: 2.1x the time of two calls on the CPU.)"""
    out: list[list[tuple[int, int, int, int]]] = []
    mq = mk = own = 0
    for seq in sorted(seqs, key=lambda t: (t[1], t[3]), reverse=True):
        _, lq, _, lk = seq
        lk = max(lk, 1)  # a sequence without keys still costs its queries
        nq, nk = max(mq, lq), max(mk, lk)
        if out and 4 * (len(out[-1]) + 1) * nq * nk <= 5 * (own + lq * lk) + 4 * _CALL_WORK:
            out[-1].append(seq)
            mq, mk, own = nq, nk, own + lq * lk
        else:
            out.append([seq])
            mq, mk, own = lq, lk, lq * lk
    for group in out:
        group.sort()  # packed order inside a group
    return out


def _attend_bucket(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[tuple[int, int, int, int]],
                   causal: bool, window: Optional[int], scale: Optional[float]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One attention call over sequences padded on the left to the group's longest q and k, the padded keys
    hidden by the key padding mask. Left padding keeps each sequence's bottom-right alignment: its query i and
    key j sit at i + (Tq - lq) and j + (Tk - lk), so causality and the window compare i + lk - lq with j, as
    flash-attn's per-sequence rule (no sinks here, so absolute key positions never matter).
    -> (o (rows, H, Dv), lse (H, rows) fp32, the rows' indices in the packed q)."""
    n, H, D, Hk, Dv = len(seqs), q.shape[1], q.shape[2], k.shape[1], v.shape[2]
    mq, mk = max(s[1] for s in seqs), max(s[3] for s in seqs)
    src_q = [r for q0, lq, _, _ in seqs for r in range(q0, q0 + lq)]
    dev = q.device
    if mk == 0:  # no keys in any of them: zeros, lse +inf (flash-attn's empty rows)
        return (q.new_zeros(len(src_q), H, Dv),
                torch.full((H, len(src_q)), math.inf, dtype=torch.float32, device=dev), src_q)
    dst_q = [b * mq + mq - lq + i for b, (_, lq, _, _) in enumerate(seqs) for i in range(lq)]
    src_k = [r for _, _, k0, lk in seqs for r in range(k0, k0 + lk)]
    dst_k = [b * mk + mk - lk + j for b, (_, _, _, lk) in enumerate(seqs) for j in range(lk)]
    sq, dq, sk, dk = (torch.tensor(t, dtype=torch.int64, device=dev) for t in (src_q, dst_q, src_k, dst_k))
    qp = q.new_zeros(n * mq, H, D).index_copy(0, dq, q.index_select(0, sq)).view(n, mq, H, D)
    kp, vp = (t.new_zeros(n * mk, Hk, t.shape[2]).index_copy(0, dk, t.index_select(0, sk)).view(n, mk, Hk, t.shape[2])
              for t in (k, v))
    kpm = torch.arange(mk, device=dev)[None, :] < torch.tensor([mk - s[3] for s in seqs], device=dev)[:, None]
    o, lse = _attend(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), kpm, causal, window, scale)
    o = o.transpose(1, 2).reshape(n * mq, H, Dv).index_select(0, dq)
    lse = lse.permute(1, 0, 2).reshape(H, n * mq).index_select(1, dq)
    return o, lse, src_q


def _unpack(name: str, t: Any, dim: int, n: int, layout: str) -> tuple[torch.Tensor, ...]:
    """The views of a packed qkv / kv tensor along ``dim`` (no copy: gradients flow back into the packed one)."""
    check_ndim(name, t, dim + 3, layout)
    if t.shape[dim] != n:
        raise ValueError(f"{name}: expected {layout}, size {n} at dim {dim}, got shape {tuple(t.shape)}")
    return t.unbind(dim)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (B, T, 3, H, D) -> :func:`flash_attn_func` on its three
    views (the gradient comes back as one (B, T, 3, H, D) tensor)."""
    q, k, v = _unpack("qkv", qkv, 2, 3, "(B, T, 3, H, D)")
    return _flash(q, k, v, ("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"), dropout_p, softmax_scale, causal,
                  window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_kvpacked_func``: q (B, Tq, H, D), kv (B, Tk, 2, Hkv, D) -> :func:`flash_attn_func`."""
    k, v = _unpack("kv", kv, 2, 2, "(B, Tk, 2, Hkv, D)")
    return _flash(q, k, v, ("q", "kv[:, :, 0]", "kv[:, :, 1]"), dropout_p, softmax_scale, causal, window_size,
                  softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                     deterministic: bool = False, return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D), one ``cu_seqlens`` for q and k ->
    :func:`flash_attn_varlen_func`."""
    q, k, v = _unpack("qkv", qkv, 1, 3, "(total, 3, H, D)")
    return _flash_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                         window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None,
                         ("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"),
                         ("cu_seqlens", "cu_seqlens", "max_seqlen", "max_seqlen"))


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                    deterministic: bool = False, return_attn_probs: bool = False) -> Any:
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, H, D), kv (total_k, 2, Hkv, D) ->
    :func:`flash_attn_varlen_func`."""
    k, v = _unpack("kv", kv, 1, 2, "(total_k, 2, Hkv, D)")
    return _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                         causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None,
                         ("q", "kv[:, 0]", "kv[:, 1]"))


def _seqlens(cache_seqlens: Any, batch: int, tmax: int, device: torch.device) -> Optional[torch.Tensor]:
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int64, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64) \
            or tuple(cache_seqlens.shape) != (batch,):
        got = (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor)
               else type(cache_seqlens).__name__)
        raise ValueError(f"cache_seqlens: expected an int or a (B,) = ({batch},) int32/int64 tensor, got {got}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: expected device {device} (q's), got {cache_seqlens.device}")
    lens = cache_seqlens.long()
    if lens.device.type == "cpu" and not torch.compiler.is_compiling() and batch and \
            not (0 <= int(lens.min()) and int(lens.max()) <= tmax):
        raise ValueError(f"cache_seqlens: expected lengths in [0, {tmax}] (the cache's), got "
                         f"{int(lens.min())}..{int(lens.max())}")
    return lens


def _on_cache_rows(q, k_cache, v_cache, k, v, cache_seqlens, idx, softmax_scale, causal, window_size, with_lse):
    """flash_attn_with_kvcache with cache_batch_idx: row b uses cache row idx[b] of caches (pool, Tmax, Hkv, D)
    (continuous batching): those rows gathered, attended (and appended to), the appended rows written back."""
    B = q.shape[0]
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) or tuple(idx.shape) != (B,):
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"cache_batch_idx: expected a (B,) = ({B},) int32/int64 tensor, got {got}")
    if idx.device != q.device:
        raise ValueError(f"cache_batch_idx: expected device {q.device} (q's), got {idx.device}")
    pool = k_cache.shape[0]
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and B:
        if not (0 <= int(idx.min()) and int(idx.max()) < pool):
            raise ValueError(f"cache_batch_idx: expected rows in [0, {pool}) (the caches'), got "
                             f"{int(idx.min())}..{int(idx.max())}")
        if k is not None and idx.unique().numel() != B:
            raise ValueError("cache_batch_idx: a cache row appears more than once; with k/v each row needs its own")
    rows = idx.long()
    kc, vc = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
    out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                                  causal=causal, window_size=window_size, return_softmax_lse=with_lse)
    if k is not None:  # the appended tokens back into the pool's rows
        k_cache.index_copy_(0, rows, kc)
        v_cache.index_copy_(0, rows, vc)
    return out


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                            rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[torch.Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False) -> Any:
    """flash-attn's ``flash_attn_with_kvcache`` (its argument order): q (B, Tq, H, D) over caches
    k_cache/v_cache (B, Tmax, Hkv, D) holding ``cache_seqlens`` tokens per row (int or (B,) int32/int64; None:
    every row full). With ``k``/``v`` (B, Tnew, Hkv, D) those are first written into the caches in place at each
    row's length (no host sync) and attended too. Row b's queries are its last Tq positions, ``len_b - Tq ..
    len_b - 1`` (flash-attn's bottom-right alignment, per row): decode, chunked prefill, speculative tokens.
    Returns (B, Tq, H, D) (and softmax_lse (B, H, Tq) fp32 with ``return_softmax_lse``). One query per row reads
    the caches in place; more, with per-row lengths, gather each row's keys right-aligned first (a copy of the
    caches). ``cache_batch_idx`` (B,) picks each row's cache row in caches of another batch size (a copy of those
    rows). Refused by name when given: rotary_cos/rotary_sin (apply rotary before), cache_leftpad, block_table
    (paged caches), softcap, alibi_slopes; ``num_splits`` and ``rotary_interleaved`` are accepted and have no
    effect."""
    _check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"), same_batch=cache_batch_idx is None)
    check_flag("causal", causal)
    check_flag("return_softmax_lse", return_softmax_lse)
    check_flag("rotary_interleaved", rotary_interleaved)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected an int, got {type(num_splits).__name__}")
    _check_unsupported(0.0, softcap, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_leftpad=cache_leftpad,
                       block_table=block_table, alibi_slopes=alibi_slopes)
    B, Tq, Tmax = q.shape[0], q.shape[1], k_cache.shape[1]
    if k is not None:
        # written in place (with cache_batch_idx: the pool rows, written back): an expanded cache (stride 0 over
        # the batch) had every row's new keys land in one slot
        check_no_overlap("k_cache", k_cache)
        check_no_overlap("v_cache", v_cache)
    if cache_batch_idx is not None:
        return _on_cache_rows(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, softmax_scale, causal,
                              window_size, return_softmax_lse)
    lens = _seqlens(cache_seqlens, B, Tmax, q.device)
    if (k is None) != (v is None):
        raise ValueError("k: k and v are given together (the new tokens' keys and values), got only one")
    if k is not None:
        check_tensor("k", k)
        check_tensor("v", v)
        if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"k: expected (B, Tnew, Hkv, D) = ({B}, Tnew, {k_cache.shape[2]}, {k_cache.shape[3]}) "
                             f"with v alike, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        for name, t, c in (("k", k, k_cache), ("v", v, v_cache)):
            if t.dtype != c.dtype:  # flash-attn refuses it too; a silent cast would round the new tokens
                raise TypeError(f"{name}: expected the cache's dtype {c.dtype}, got {t.dtype}")
            if t.device != c.device:
                raise ValueError(f"{name}: expected the cache's device {c.device}, got {t.device}")
        if lens is None:
            raise ValueError("cache_seqlens: required with k/v (each row's new tokens go in after its cached ones)")
        if lens.device.type == "cpu" and not torch.compiler.is_compiling() and B and \
                int((lens + k.shape[1]).max()) > Tmax:
            raise ValueError(f"k: {k.shape[1]} new tokens after cache_seqlens overflow the cache of {Tmax}")
        pos = lens[:, None] + torch.arange(k.shape[1], device=q.device)  # (B, Tnew)
        rows = torch.arange(B, device=q.device)[:, None].expand_as(pos)
        k_cache.index_put_((rows, pos), k)
        v_cache.index_put_((rows, pos), v)
        lens = lens + k.shape[1]
    causal, window = _window(window_size, causal, Tmax, Tq)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    if lens is None:
        o, lse = _attend(qt, kt, vt, None, causal, window, softmax_scale)
    elif Tq == 1:
        # one query per row at position len - 1: which keys it sees depends on the row only, a padding mask
        j = torch.arange(Tmax, device=q.device)[None, :]
        hidden = j >= lens[:, None]
        if window is not None:
            hidden |= j <= lens[:, None] - 1 - window
        o, lse = tva_attention(qt, kt, vt, causal=False, key_padding_mask=hidden, softmax_scale=softmax_scale,
                               return_lse=True)
    else:
        # each row's len keys right-aligned to Tmax (masked keys in front): tva_attention's bottom-right alignment
        # over Tmax is then flash-attn's per row (query t at len - Tq + t)
        j = torch.arange(Tmax, device=q.device)[None, :]
        shift = Tmax - lens[:, None]
        src = (j - shift).clamp_min(0)  # (B, Tmax): the cache row each aligned slot reads
        kt, vt = (t.gather(2, src[:, None, :, None].expand(t.shape)) for t in (kt, vt))
        o, lse = _attend(qt, kt, vt, j < shift, causal, window, softmax_scale)
    out = o.transpose(1, 2).contiguous()
    return (out, lse) if return_softmax_lse else out
