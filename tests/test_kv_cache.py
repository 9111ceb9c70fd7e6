"""KV caches for incremental decoding: a decode step writes its own positions into a buffer (fixed max_len or a
doubling capacity) and reads the history as a view, instead of re-concatenating all of it every step."""
from __future__ import annotations

import pytest
import torch

from apt.modeling.layers import CausalSelfAttention
from apt_kernels.layers.kv import MIN_CAPACITY, buffer_write, history
from apt_kernels.layers.tva import TVAAttention


def _full_vs_stepped(layer, x, prefill, max_len):
    """Checks that a prefill of ``prefill`` positions then one position at a time through a cache gives the
    full forward's output (inference mode, as generation runs); returns the cache."""
    with torch.inference_mode():
        full = layer(x)
        cache = layer.new_cache(x.shape[0], max_len=max_len)
        outs = [layer(x[:, :prefill], cache=cache)]
        outs += [layer(x[:, t:t + 1], cache=cache) for t in range(prefill, x.shape[1])]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    return cache


def test_buffer_write_grows_by_doubling_and_keeps_the_history():
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, n, 4) for n in (5, 1, 13, 1, 40)]
    buf, start, caps = None, 0, []
    for x in xs:
        buf = buffer_write(buf, x, start, 2, None)
        start += x.shape[2]
        caps.append(buf.shape[2])
    assert caps == [MIN_CAPACITY, MIN_CAPACITY, 32, 32, 64]
    torch.testing.assert_close(buf[:, :, :start], torch.cat(xs, 2), rtol=0, atol=0)
    assert not buf[:, :, start:].any()  # unwritten positions are zeros


def test_buffer_write_fixed_capacity_and_overflow():
    buf = buffer_write(None, torch.ones(1, 3, dtype=torch.bool), 0, 1, 8)
    assert buf.shape == (1, 8) and buf[0, :3].all() and not buf[0, 3:].any()
    buf = buffer_write(buf, torch.ones(1, 5, dtype=torch.bool), 3, 1, 8)
    assert buf.all()
    with pytest.raises(ValueError, match=r"^cache: 9 positions exceed max_len=8"):
        buffer_write(buf, torch.ones(1, 1, dtype=torch.bool), 8, 1, 8)


def test_history_is_a_view_without_grad_mode_and_keeps_this_calls_graph_with_it():
    old, new = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 1, 4, requires_grad=True)
    buf = buffer_write(buffer_write(None, old, 0, 2, None), new, 3, 2, None)
    with torch.no_grad():
        h = history(buf, new, 3, 2)
    assert h.data_ptr() == buf.data_ptr() and h.shape == (1, 2, 4, 4)
    h = history(buf, new, 3, 2)
    assert h.requires_grad and h.data_ptr() != buf.data_ptr()
    assert history(buf, new.detach(), 3, 2).data_ptr() != buf.data_ptr()  # grad mode on: never an alias
    h.sum().backward()
    torch.testing.assert_close(new.grad, torch.ones_like(new))
    assert history(buf, new, 0, 2) is new


@pytest.mark.parametrize("max_len", [None, 64])
def test_tva_decode_reads_the_cache_without_copying_it(max_len):
    """50 decode steps: the k/v buffers are reallocated at most log2(L) times (never with max_len) and the
    attention core sees views of them, not per-step copies; the logits equal one full forward."""
    torch.manual_seed(0)
    seen = []

    def core(q, k, v, *args, **kwargs):
        seen.append(k.untyped_storage().data_ptr())
        from apt_kernels.reference.tva import tva_attention_ref
        return tva_attention_ref(q, k, v, *args, **kwargs)

    cache = _full_vs_stepped(TVAAttention(16, 2, core=core).eval(), torch.randn(1, 53, 16), 3, max_len)
    assert cache.length == 53 and cache.padding is None
    decode = seen[2:]  # after the full forward and the prefill (which passes its own k)
    assert all(p == cache.k.untyped_storage().data_ptr() for p in decode[-10:])
    assert len(set(decode)) <= (1 if max_len else 3)  # capacities 16 -> 32 -> 64


def test_tva_cache_padding_appears_mid_stream():
    """A padding mask given only from the second call on: the earlier positions count as not padded."""
    torch.manual_seed(0)
    layer = TVAAttention(16, 2, core="reference").eval()
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4] = True
    with torch.no_grad():
        full = layer(x, kpm)
        cache = layer.new_cache(2)
        a = layer(x[:, :4], cache=cache)
        assert cache.padding is None
        b = layer(x[:, 4:], kpm[:, 4:], cache=cache)
    assert cache.padding[:, :6].equal(kpm)
    torch.testing.assert_close(torch.cat([a, b], 1)[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([a, b], 1)[1, :4], full[1, :4], rtol=1e-5, atol=1e-5)


def test_tva_cache_with_grad_matches_full_forward_gradients():
    """With autograd on, a chunk continuing from the cache gets the gradients a full forward gives its own
    positions (the stored history is detached; this call's keys and values keep their graph)."""
    torch.manual_seed(0)
    layer = TVAAttention(16, 2, core="reference")
    x = torch.randn(1, 9, 16)
    x_tail = x[:, 6:].clone().requires_grad_(True)
    full = layer(torch.cat([x[:, :6], x_tail], 1))[:, 6:]
    g_full = torch.autograd.grad(full.square().sum(), x_tail)[0]
    cache = layer.new_cache(1)
    with torch.no_grad():
        layer(x[:, :6], cache=cache)
    x_tail2 = x[:, 6:].clone().requires_grad_(True)
    part = layer(x_tail2, cache=cache)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(part.square().sum(), x_tail2)[0], g_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_len", [None, 40])
def test_fallback_attention_cache_matches_full_forward(max_len):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2).eval()
    cache = _full_vs_stepped(attn, torch.randn(2, 37, 16), 5, max_len)
    assert cache.length == 37 and cache.k.shape[2] == (max_len or 64)
    if max_len:
        with pytest.raises(ValueError, match="exceed max_len=40"), torch.inference_mode():
            attn(torch.randn(2, 4, 16), cache=cache)


def test_a_call_past_max_len_leaves_the_cache_as_it_was():
    """The gate's running sum and count were updated before the k/v buffers refused the call, so the next valid
    call continued from a count ahead of the keys (output off by ~0.02)."""
    torch.manual_seed(0)
    layer = TVAAttention(8, 2, tau=1.0, alpha=1.0).eval()
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(1, max_len=4)
        layer(x[:, :3], cache=cache)
        count, x_sum = cache.count.clone(), cache.x_sum.clone()
        with pytest.raises(ValueError, match="^cache: 5 positions exceed max_len=4"):
            layer(torch.randn(1, 2, 8), cache=cache)
        assert cache.length == 3 and cache.count.equal(count) and cache.x_sum.equal(x_sum)
        torch.testing.assert_close(layer(x[:, 3:], cache=cache), full[:, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_len", [None, 12])
def test_fallback_attention_takes_chunk_padding_masks_like_tva(max_len):
    """Left padding given per call, as TVAAttention takes it: the cache keeps it, so prefill + steps equal one
    masked forward (the fallback wanted a (B, all positions so far) mask with a cache)."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2).eval()
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, :3] = True
    with torch.inference_mode():
        full = attn(x, key_padding_mask=kpm)
        cache = attn.new_cache(2, max_len=max_len)
        outs = [attn(x[:, :4], key_padding_mask=kpm[:, :4], cache=cache)]
        outs += [attn(x[:, t:t + 1], cache=cache) for t in range(4, 9)]  # no padding in the new tokens
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.padding[:, :9].equal(kpm)
    with pytest.raises(ValueError, match=r"^key_padding_mask: expected a bool tensor of shape \(2, 9\)"):
        attn(x, key_padding_mask=torch.zeros(2, 10, dtype=torch.bool))


def test_cache_with_padding_trains_and_a_failed_call_leaves_the_cache_as_it_was():
    from apt_kernels.layers.tva import TVAAttention

    torch.manual_seed(0)
    for core in ("reference", "cpu_native"):
        m = TVAAttention(16, 2, core=core)
        x = torch.randn(1, 6, 16, requires_grad=True)
        kpm = torch.zeros(1, 6, dtype=torch.bool)
        kpm[0, 1] = True
        cache = m.new_cache(1)
        # the padding handed to the core was a view of the buffer the next call rewrote: backward failed
        ys = [m(x[:, a:b], kpm[:, a:b], cache=cache) for a, b in ((0, 2), (2, 4), (4, 6))]
        (gx,) = torch.autograd.grad(sum(y.sum() for y in ys), x)
        assert torch.isfinite(gx).all()
    m = TVAAttention(16, 2).eval()
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        full = m(x)
    cache = m.new_cache(1)
    with torch.no_grad():
        m(x[:, :3], cache=cache)
    real_core = m.core

    def boom(*a, **k):
        raise RuntimeError("core failed")

    m.core = boom
    with torch.no_grad(), pytest.raises(RuntimeError, match="core failed"):
        m(x[:, 3:], cache=cache)
    assert cache.length == 3 and float(cache.count[0]) == 3.0  # the running mean did not move ahead
    m.core = real_core
    with torch.no_grad():
        torch.testing.assert_close(m(x[:, 3:], cache=cache), full[:, 3:])
    with pytest.raises(ValueError, match="x: no tokens to append"):
        m(torch.randn(1, 0, 16), cache=cache)


def test_cache_holds_values_not_graph():
    """Documented (TVACache, apt.modeling.model): a call's outputs match a full forward's, but give gradients to that
    call's inputs only; the positions fed by earlier calls get none (the cache is for decoding)."""
    from apt_kernels.layers.tva import TVAAttention

    torch.manual_seed(0)
    layer = TVAAttention(32, 4)
    x = torch.randn(1, 6, 32, requires_grad=True)
    c = layer.new_cache(1)
    layer(x[:, :3], cache=c)
    second = layer(x[:, 3:], cache=c)
    torch.testing.assert_close(second, layer(x)[:, 3:], rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(second.sum(), x)
    assert g[:, :3].abs().max() == 0 and g[:, 3:].abs().max() > 0
