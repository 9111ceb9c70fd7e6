"""Append-only buffers for incremental decoding (KV caches): one decode step copies its own positions, not the
whole history (growing by ``torch.cat`` copies all L positions at every step, O(L²) over a generation)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["buffer_write", "history"]

MIN_CAPACITY = 16


def buffer_write(buf: Optional[torch.Tensor], x: torch.Tensor, start: int, dim: int,
                 max_len: Optional[int]) -> torch.Tensor:
    """Write ``x`` (detached) at positions ``start .. start + x.shape[dim]`` along ``dim`` of ``buf`` and return
    the buffer, allocated anew when it has no room: ``max_len`` positions when given (more is a ``ValueError``),
    else twice the old capacity (amortised O(1) per position). Positions past the written ones are zeros."""
    end = start + x.shape[dim]
    if max_len is not None and end > max_len:
        raise ValueError(f"cache: {end} positions exceed max_len={max_len}")
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
