"""apt_kernels.flash_attn_func: flash-attn's signature and (B, T, H, D) layout over tva_attention, checked against
flash-attn's documented semantics written out in float64 (bottom-right causal alignment, window_size=(left, right)
as keys [p - left, p + right] of query position p = i + Tk - Tq, softmax_lse)."""
from __future__ import annotations

import math

import pytest
import torch

import apt_kernels as K


def _flash_semantics(q, k, v, causal, window_size, scale):
    """float64 attention as flash-attn defines it, on (B, T, H, D) tensors (k/v heads repeated for GQA)."""
    B, Tq, H, D = q.shape
    Tk, G = k.shape[1], H // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    left, right = window_size
    if causal:
        right = 0
    p = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None, :]
    ok = torch.ones(Tq, Tk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= p - left
    if right >= 0:
        ok &= j <= p + right
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1).masked_fill(~ok.any(-1), math.inf)  # +inf for a row that sees no key
    out = torch.softmax(s, -1).nan_to_num(0.0) @ v
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("Tq,Tk,H,Hkv,causal,window_size,scale", [
    (9, 9, 4, 4, True, (-1, -1), None), (5, 13, 4, 2, True, (-1, -1), None), (1, 17, 4, 1, True, (-1, -1), 0.3),
    (7, 20, 2, 2, True, (3, 0), None), (7, 20, 2, 2, True, (4, 6), None), (11, 11, 2, 1, False, (-1, -1), None),
    (6, 15, 4, 2, False, (2, 2), None), (33, 40, 2, 2, True, (0, 0), None),  # Tq >= 32: the CPU kernel
    (13, 5, 2, 1, False, (-1, -1), None), (13, 5, 2, 2, True, (-1, -1), None), (9, 4, 2, 2, True, (1, 0), None),
    (8, 5, 2, 2, False, (1, 1), None)])  # more queries than keys
def test_matches_flash_attn_semantics(Tq, Tk, H, Hkv, causal, window_size, scale):
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    q = torch.randn(2, Tq, H, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, Tk, Hkv, 16, generator=g, requires_grad=True) for _ in range(2))
    out, lse, none = K.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window_size,
                                       return_attn_probs=True)
    assert none is None and out.shape == q.shape and out.is_contiguous() and lse.dtype == torch.float32
    want, want_lse = _flash_semantics(q, k, v, causal, window_size, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    gy = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), gy)
    exp = torch.autograd.grad(want, (q, k, v), gy.double())
    for n, a, b in zip("qkv", got, exp):
        assert a.shape == b.shape, n
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=lambda m: f"d{n}: {m}")


def test_unsupported_options_are_refused_by_name():
    q = torch.randn(1, 4, 2, 8)
    for kw, name in ((dict(dropout_p=0.1), "dropout_p"), (dict(softcap=30.0), "softcap"),
                     (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
                     (dict(window_size=(2, 3)), "window_size"), (dict(window_size=(2,)), "window_size"),
                     (dict(window_size=(-2, 0)), "window_size"), (dict(causal=1), "causal")):
        with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
            K.flash_attn_func(q, q, q, **kw)
    with pytest.raises(ValueError, match=r"^q: .*\(B, T, H, D\)"):
        K.flash_attn_func(q[0], q[0], q[0])
    assert K.flash_attn_func(q, q, q, dropout_p=0.0, deterministic=True).shape == q.shape


@pytest.mark.parametrize("window_size,causal", [((-1, -1), True), ((-1, -1), False), ((2, 0), True), ((3, 3), False)])
@pytest.mark.parametrize("new", [0, 1])
def test_kvcache_decode_with_per_row_lengths(window_size, causal, new):
    """flash_attn_with_kvcache: one query per row over its own cache length (0 included), the new token's k/v
    written in place at that length first; as flash-attn's semantics applied to each row's cache prefix."""
    g = torch.Generator().manual_seed(new * 10 + window_size[0])
    B, Tmax, H, Hkv, D = 4, 12, 4, 2, 16
    lens = torch.tensor([0, 3, 7, 12 - new], dtype=torch.int32)
    q = torch.randn(B, 1, H, D, generator=g)
    kc, vc = (torch.randn(B, Tmax, Hkv, D, generator=g) for _ in range(2))
    kn, vn = ((torch.randn(B, new, Hkv, D, generator=g) for _ in range(2)) if new else (None, None))
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = K.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=causal,
                                         window_size=window_size, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (B, H, 1)
    for b in range(B):
        n = int(lens[b]) + new
        if new:
            torch.testing.assert_close(kc[b, int(lens[b])], kn[b, 0])
            torch.testing.assert_close(vc[b, int(lens[b])], vn[b, 0])
        untouched = [t for t in range(Tmax) if not (new and t == int(lens[b]))]
        assert torch.equal(kc[b, untouched], kc0[b, untouched]) and torch.equal(vc[b, untouched], vc0[b, untouched])
        if n == 0:
            assert not out[b].any() and torch.isinf(lse[b]).all()
            continue
        want, want_lse = _flash_semantics(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal, window_size, None)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=2e-5, rtol=2e-5)


def test_kvcache_full_caches_and_bad_input():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, 16, generator=g)
    kc, vc = (torch.randn(2, 9, 2, 16, generator=g) for _ in range(2))
    torch.testing.assert_close(K.flash_attn_with_kvcache(q, kc, vc, causal=True),
                               K.flash_attn_func(q, kc, vc, causal=True))
    one = torch.randn(2, 1, 2, 16)
    for kw, err, msg in ((dict(cache_seqlens=torch.tensor([1.0, 2.0])), ValueError, "^cache_seqlens: "),
                         (dict(rotary_cos=torch.ones(9, 8)), ValueError, "^rotary_cos: not supported"),
                         (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "^block_table: "),
                         (dict(cache_batch_idx=torch.tensor([1, 2])), ValueError, r"^cache_batch_idx: .*\[0, 2\)"),
                         (dict(cache_seqlens=torch.tensor([1, 10])), ValueError, r"^cache_seqlens: .*\[0, 9\]"),
                         (dict(k=one, v=one), ValueError, "^cache_seqlens: required"),
                         (dict(k=one, cache_seqlens=1), ValueError, "^k: k and v"),
                         (dict(k=one, v=one, cache_seqlens=9), ValueError, "^k: 1 new tokens"),
                         (dict(softcap=5.0), ValueError, "^softcap: ")):
        with pytest.raises(err, match=msg):
            K.flash_attn_with_kvcache(q[:, :1] if "k" in kw or "1 new" in msg else q, kc, vc, **kw)


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (-1, -1)), (True, (3, 0))])
def test_varlen_packed_sequences_attend_within_themselves(causal, window_size):
    g = torch.Generator().manual_seed(11)
    lq, lk = [5, 0, 9, 4], [7, 3, 9, 0]  # an empty query run, more queries than keys, no keys
    cq = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lq), 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(sum(lk), 2, 16, generator=g, requires_grad=True) for _ in range(2))
    out, lse, _ = K.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window_size,
                                           return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, sum(lq))
    wants, want_lses = [], []
    for b in range(4):
        qs, ks, vs = q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]]
        if lk[b] == 0:
            wants.append(torch.zeros(lq[b], 4, 16, dtype=torch.float64))
            want_lses.append(torch.full((4, lq[b]), math.inf, dtype=torch.float64))
            continue
        w, wl = _flash_semantics(qs, ks, vs, causal, window_size, None)
        wants.append(w[0])
        want_lses.append(wl[0])
    want = torch.cat(wants)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), torch.cat(want_lses, 1), atol=2e-5, rtol=2e-5)
    gy = torch.randn(out.shape, generator=g)
    for n, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), gy),
                       torch.autograd.grad(want, (q, k, v), gy.double(), allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(a, b.to(a.dtype), atol=5e-5, rtol=5e-5, msg=lambda m: f"d{n}: {m}")


def test_varlen_bad_offsets():
    q, k = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    ok = torch.tensor([0, 2, 6], dtype=torch.int32)
    for cq, ck, mq, err, msg in ((torch.tensor([1, 2, 6]), ok, 4, ValueError, "^cu_seqlens_q: .*from 0 to 6"),
                                 (torch.tensor([0, 4, 2, 6]), torch.tensor([0, 2, 4, 6]), 4, ValueError,
                                  "^cu_seqlens_q: .*non-decreasing"),
                                 (ok, torch.tensor([0, 6]), 4, ValueError, "^cu_seqlens_k: expected 2 sequences"),
                                 (ok.float(), ok, 4, ValueError, "^cu_seqlens_q: expected a"),
                                 (ok, ok, 3, ValueError, r"^max_seqlen_q: .*longest sequence \(4\)")):
        with pytest.raises(err, match=msg):
            K.flash_attn_varlen_func(q, k, k, cq, ck, mq, 4)


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (True, (2, 0)), (False, (-1, -1)), (False, (2, 2))])
def test_kvcache_several_queries_per_row(causal, window_size):
    """Chunked prefill / speculative tokens: Tq new tokens per row appended at per-row lengths, each row's
    queries at its last Tq positions (len_b - Tq + t), a row shorter than Tq included."""
    g = torch.Generator().manual_seed(21)
    B, Tmax, H, Hkv, D, Tq = 3, 14, 4, 2, 16, 3
    lens = torch.tensor([0, 4, 11])
    q = torch.randn(B, Tq, H, D, generator=g)
    kc, vc = (torch.randn(B, Tmax, Hkv, D, generator=g) for _ in range(2))
    kn, vn = (torch.randn(B, Tq, Hkv, D, generator=g) for _ in range(2))
    out, lse = K.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=causal,
                                         window_size=window_size, return_softmax_lse=True)
    for b in range(B):
        n = int(lens[b]) + Tq
        torch.testing.assert_close(kc[b, int(lens[b]):n], kn[b])
        want, want_lse = _flash_semantics(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal, window_size, None)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=2e-5, rtol=2e-5)
    # fewer cached tokens than queries, no append: the first queries of that row see no key
    short = torch.tensor([1, 14, 2])
    out, lse = K.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=short, causal=True, return_softmax_lse=True)
    for b in range(B):
        want, want_lse = _flash_semantics(q[b:b + 1], kc[b:b + 1, :int(short[b])], vc[b:b + 1, :int(short[b])],
                                          True, (-1, -1), None)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=2e-5, rtol=2e-5)


def test_flash_attn_conventions_and_errors_in_its_layout():
    g = torch.Generator().manual_seed(31)
    q, k = torch.randn(1, 7, 4, 16, generator=g), torch.randn(1, 5, 2, 16, generator=g)
    # (left, 0) without causal is causal (flash-attn's is_causal = left < 0 and right == 0); a side >= Tk unbounded
    torch.testing.assert_close(K.flash_attn_func(q, k, k, window_size=(-1, 0)), K.flash_attn_func(q, k, k, causal=True))
    torch.testing.assert_close(K.flash_attn_func(q, k, k, window_size=(2, 0)),
                               K.flash_attn_func(q, k, k, causal=True, window_size=(2, 0)))
    torch.testing.assert_close(K.flash_attn_func(q, k, k, window_size=(5, 5)), K.flash_attn_func(q, k, k))
    want, _ = _flash_semantics(q, k, k, False, (-1, -1), None)
    torch.testing.assert_close(K.flash_attn_func(q, k, k, window_size=(9, 9)).double(), want, atol=2e-5, rtol=2e-5)
    for args, msg in (((q, k, k[..., :8]), r"^v: expected k's shape \(1, 5, 2, 16\)"),
                      ((q, torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16)), r"^k: .*Hkv dividing H=4"),
                      ((q, k.double(), k.double()), "^k: expected q's dtype")):
        with pytest.raises((ValueError, TypeError), match=msg):
            K.flash_attn_func(*args)
    kc = torch.randn(1, 9, 3, 16)
    with pytest.raises(ValueError, match=r"^k_cache: .*Hkv dividing H=4"):
        K.flash_attn_with_kvcache(q, kc, kc)
    # flash-attn's positional order: (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, ...)
    kc, vc = torch.randn(1, 9, 2, 16, generator=g), torch.randn(1, 9, 2, 16, generator=g)
    lens = torch.tensor([6], dtype=torch.int32)
    a = K.flash_attn_with_kvcache(q[:, :1], kc, vc, None, None, None, None, lens)
    b = K.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=lens, num_splits=0, rotary_interleaved=True,
                                  cache_leftpad=None, block_table=None)
    torch.testing.assert_close(a, b)
    # full caches with more queries than cache slots (zeros for queries before every key)
    out = K.flash_attn_with_kvcache(torch.randn(1, 12, 4, 16, generator=g), kc, vc, causal=True)
    assert out.shape == (1, 12, 4, 16) and not out[0, :3].any()


def test_kvcache_cache_batch_idx_picks_pool_rows():
    """cache_batch_idx: row b reads (and appends to) cache row idx[b] of a larger pool; other rows untouched."""
    g = torch.Generator().manual_seed(41)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = (torch.randn(5, 10, 2, 16, generator=g) for _ in range(2))
    kn, vn = (torch.randn(2, 1, 2, 16, generator=g) for _ in range(2))
    idx, lens = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([4, 7], dtype=torch.int32)
    k0, v0 = kc.clone(), vc.clone()
    out = K.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, cache_batch_idx=idx)
    ks, vs = k0[idx.long()].clone(), v0[idx.long()].clone()
    want = K.flash_attn_with_kvcache(q, ks, vs, kn, vn, cache_seqlens=lens)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(kc[idx.long()], ks)
    torch.testing.assert_close(vc[idx.long()], vs)
    assert torch.equal(kc[[1, 2, 4]], k0[[1, 2, 4]]) and torch.equal(vc[[1, 2, 4]], v0[[1, 2, 4]])
    with pytest.raises(ValueError, match="^cache_batch_idx: a cache row appears more than once"):
        K.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, cache_batch_idx=torch.tensor([1, 1]))


def test_window_normalisations_of_varlen_and_decode():
    """varlen bounds a window side by max_seqlen_k (flash-attn's varlen kernels), not by each sequence's length;
    one query per row has no key to its right, so any right side is right = 0; appended k/v keep the cache's
    dtype (no silent cast)."""
    g = torch.Generator().manual_seed(51)
    q, k = torch.randn(10, 2, 16, generator=g), torch.randn(12, 2, 16, generator=g)
    cq, ck = torch.tensor([0, 6, 10]), torch.tensor([0, 2, 12])
    out = K.flash_attn_varlen_func(q, k, k, cq, ck, 6, 10, window_size=(3, 3))
    want0, _ = _flash_semantics(q[None, :6], k[None, :2], k[None, :2], False, (3, 3), None)
    torch.testing.assert_close(out[:6].double(), want0[0], atol=2e-5, rtol=2e-5)
    assert not out[0].any()  # query 0 of sequence 0 (p = -4) sees no key within 3
    qd = torch.randn(2, 1, 2, 16, generator=g)
    kc = torch.randn(2, 9, 2, 16, generator=g)
    lens = torch.tensor([5, 9])
    want = K.flash_attn_with_kvcache(qd, kc, kc, cache_seqlens=lens, causal=True, window_size=(3, 0))
    for ws in ((3, -1), (3, 1)):
        torch.testing.assert_close(K.flash_attn_with_kvcache(qd, kc, kc, cache_seqlens=lens, window_size=ws), want)
    with pytest.raises(TypeError, match="^k: expected the cache's dtype torch.float32"):
        K.flash_attn_with_kvcache(qd, kc, kc, qd[:, :, :2].double(), qd[:, :, :2].double(), cache_seqlens=2)


@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (2, 2)), (True, (4, 0))])
def test_varlen_groups_sequences_by_length(causal, window_size):
    """Similar lengths go through one padded call, a skewed batch through a few (never one call per sequence);
    each sequence still gets flash_attn_func's own answer, bottom-right aligned, and its gradients."""
    from apt_kernels.ops.flash_api import _length_buckets

    lq, lk = [140, 1, 3, 2, 1, 6, 3, 70], [140, 5, 3, 2, 1, 6, 1, 60]
    seqs = [(sum(lq[:b]), lq[b], sum(lk[:b]), lk[b]) for b in range(len(lq))]
    groups = _length_buckets(seqs)
    assert 1 < len(groups) < len(seqs) and sorted(s for grp in groups for s in grp) == seqs
    for grp in groups:  # padding adds at most 25% to a group's work (plus one call's fixed cost)
        own = sum(s[1] * max(s[3], 1) for s in grp)
        assert len(grp) * max(s[1] for s in grp) * max(max(s[3] for s in grp), 1) <= 1.25 * own + 128 * 128
    assert len(_length_buckets([(10 * b, 10, 12 * b, 12) for b in range(6)])) == 1
    g = torch.Generator().manual_seed(5)
    cq, ck = (torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()]) for ls in (lq, lk))
    q = torch.randn(sum(lq), 4, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(sum(lk), 2, 8, generator=g, requires_grad=True) for _ in range(2))
    out, lse, _ = K.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window_size,
                                           return_attn_probs=True)
    wants, want_lses = [], []
    for b in range(len(lq)):
        o, wl, _ = K.flash_attn_func(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                                     causal=causal, window_size=window_size, return_attn_probs=True)
        wants.append(o[0])
        want_lses.append(wl[0])
    want = torch.cat(wants)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.cat(want_lses, 1), atol=1e-5, rtol=1e-5)
    gy = torch.randn(out.shape, generator=g)
    for n, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), gy), torch.autograd.grad(want, (q, k, v), gy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{n}: {m}")


def test_packed_variants_equal_the_unpacked_calls():
    """flash-attn's qkv- and kv-packed entry points: the same answers as flash_attn_func / flash_attn_varlen_func on
    the unpacked views, gradients back into the packed tensor; a wrong packed size is refused by name."""
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 7, 3, 4, 16, generator=g, requires_grad=True)
    out = K.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, 0))
    want = K.flash_attn_func(*qkv.unbind(2), causal=True, window_size=(3, 0))
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0
    q, kv = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 9, 2, 2, 16, generator=g)
    o, lse, _ = K.flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True)
    wo, wl, _ = K.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True, return_attn_probs=True)
    torch.testing.assert_close(o, wo)
    torch.testing.assert_close(lse, wl)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    pk = torch.randn(10, 3, 4, 16, generator=g)
    torch.testing.assert_close(K.flash_attn_varlen_qkvpacked_func(pk, cu, 7, causal=True),
                               K.flash_attn_varlen_func(*pk.unbind(1), cu, cu, 7, 7, causal=True))
    qv, kvv = torch.randn(10, 4, 16, generator=g), torch.randn(12, 2, 2, 16, generator=g)
    ck = torch.tensor([0, 5, 12], dtype=torch.int32)
    torch.testing.assert_close(K.flash_attn_varlen_kvpacked_func(qv, kvv, cu, ck, 7, 7),
                               K.flash_attn_varlen_func(qv, kvv[:, 0], kvv[:, 1], cu, ck, 7, 7))
    with pytest.raises(ValueError, match=r"^qkv: expected \(B, T, 3, H, D\), size 3 at dim 2"):
        K.flash_attn_qkvpacked_func(torch.randn(2, 7, 2, 4, 16))
    with pytest.raises(ValueError, match=r"^kv: expected 4 dims \(total_k, 2, Hkv, D\)"):
        K.flash_attn_varlen_kvpacked_func(qv, torch.randn(12, 2, 16), cu, ck, 7, 7)
    # errors name the argument the caller passed (they named k / cu_seqlens_q, which these functions do not take)
    with pytest.raises(ValueError, match=r"^kv\[:, :, 0\]: expected \(B, Tk, Hkv, D\)"):
        K.flash_attn_kvpacked_func(q, torch.randn(2, 9, 2, 3, 16))
    with pytest.raises(TypeError, match=r"^kv\[:, 0\]: expected q's dtype"):
        K.flash_attn_varlen_kvpacked_func(qv, kvv.double(), cu, ck, 7, 7)
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected non-decreasing"):
        K.flash_attn_varlen_qkvpacked_func(pk, torch.tensor([0, 5, 3, 10]), 7)
    with pytest.raises(ValueError, match=r"^max_seqlen: expected an int >= the longest sequence \(7\)"):
        K.flash_attn_varlen_qkvpacked_func(pk, cu, 6)
