"""Append-only buffers for incremental decoding (KV caches): one decode step copies its own positions, not the
whole history (growing by ``torch.cat`` copies all L positions at every step, O(L²) over a generation)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["append_kv", "buffer_write", "check_room", "history"]

MIN_CAPACITY = 16


def check_room(length: int, new: int, max_len: Optional[int]) -> None:
    """A cache holding ``length`` positions takes ``new`` more (ValueError past ``max_len``)."""
    if max_len is not None and length + new > max_len:
        raise ValueError(f"cache: {length + new} positions exceed max_len={max_len}")


def buffer_write(buf: Optional[torch.Tensor], x: torch.Tensor, start: int, dim: int,
                 max_len: Optional[int]) -> torch.Tensor:
    """Write ``x`` (detached) at positions ``start .. start + x.shape[dim]`` along ``dim`` of ``buf`` and return
    the buffer, allocated anew when it has no room: ``max_len`` positions when given (more is a ``ValueError``),
    else twice the old capacity (amortised O(1) per position). Positions past the written ones are zeros."""
    end = start + x.shape[dim]
    check_room(start, x.shape[dim], max_len)
    if buf is None or buf.shape[dim] < end:
        cap = max_len if max_len is not None else max(end, 2 * (0 if buf is None else buf.shape[dim]), MIN_CAPACITY)
        shape = list(x.shape)
        shape[dim] = cap
        new = x.new_zeros(shape)
        if buf is not None and start:
            new.narrow(dim, 0, start).copy_(buf.narrow(dim, 0, start))
        buf = new
    buf.narrow(dim, start, x.shape[dim]).copy_(x.detach())
    return buf


def history(buf: torch.Tensor, x: torch.Tensor, start: int, dim: int) -> torch.Tensor:
    """All positions so far, ``buf[..:start + T]`` along ``dim``, after :func:`buffer_write` put ``x`` there.

    Under no_grad / inference_mode (decoding) this is a view of the buffer, no copy. With autograd on, the stored
    history (detached) is concatenated with ``x`` itself: this call's positions keep their graph, and nothing a
    backward may save aliases the buffer that the next call writes into in place."""
    if start == 0:
        return x
    if torch.is_grad_enabled():
        return torch.cat([buf.narrow(dim, 0, start), x], dim=dim)
    return buf.narrow(dim, 0, start + x.shape[dim])


def append_kv(cache, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Store a call's (B, H, T, D) keys and values and (B, T) key padding mask (True = padded) in ``cache`` (any
    object with ``k``, ``v``, ``padding``, ``length`` and ``max_len``) and return all of them so far: keys and
    values through :func:`history`, the padding (B, length), or None while no call has passed a mask. Nothing is
    written when the call does not fit in ``max_len``."""
    start, T = cache.length, k.shape[2]
    check_room(start, T, cache.max_len)
    cache.k = buffer_write(cache.k, k, start, 2, cache.max_len)
    cache.v = buffer_write(cache.v, v, start, 2, cache.max_len)
    if key_padding_mask is not None or cache.padding is not None:
        # positions before the first mask are unpadded: a new buffer starts as zeros (False)
        pad = key_padding_mask if key_padding_mask is not None else k.new_zeros(k.shape[0], T, dtype=torch.bool)
        cache.padding = buffer_write(cache.padding, pad, start, 1, cache.max_len)
    cache.length = start + T
    padding = None
    if cache.padding is not None:
        padding = cache.padding[:, :cache.length]
        if torch.is_grad_enabled():  # the fused op saves the mask for backward: not a view the next call rewrites
            padding = padding.clone()
    return history(cache.k, k, start, 2), history(cache.v, v, start, 2), padding
