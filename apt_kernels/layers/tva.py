"""``TVAAttention``: the TVA layer of TVA.md (module level) with an exchangeable attention core and a KV cache.

``y = W_o · merge_heads(softmax(q kᵀ/√D + mask) v + c · g · Δ) + b_o`` with ``Δ = (x U) V``,
``g = sigmoid(W_g m + b_g)`` (``m``: causal running mean of x over non-padded positions; the plain mean over them
in non-causal mode) and ``c = alpha · tanh(tau)``. The core is any callable with the kernel-contract signature
(``tva_attention``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import nn

from .._validate import check_flag, check_float, check_tensor
from ..ops.running_mean import running_mean
from .kv import append_kv, check_room

__all__ = ["TVAAttention", "TVACache"]

Core = Callable[..., torch.Tensor]


@dataclasses.dataclass
class TVACache:
    """State for incremental decoding, updated in place by ``TVAAttention.forward(x, cache=...)``.

    ``k``/``v``: (B, H, capacity, D) buffers whose first ``length`` positions are the keys/values so far
    (``max_len`` positions when given, else a capacity that doubles when full);
    ``x_sum``/``count``: fp32 (fp64 for fp64 inputs) running sum of the non-padded inputs and their number (the
    gate's running mean);
    ``padding``: (B, capacity) key padding mask, the same way; ``length``: number of positions seen.
    The buffers hold detached values: under autograd a call's outputs give gradients to that call's inputs only,
    not to the positions of earlier calls (truncated backpropagation; the outputs equal a full forward's).
    """

    batch_size: int
    max_len: Optional[int] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    padding: Optional[torch.Tensor] = None
    x_sum: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None
    pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # this call's x_sum/count until it succeeds
    length: int = 0

    @property
    def any_padding(self) -> bool:
        """Whether any call has passed a key padding mask (the padding buffer exists from then on)."""
        return self.padding is not None

    def reset(self) -> None:
        self.length = 0
        self.k = self.v = self.padding = self.x_sum = self.count = self.pending = None


def _kept(x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep (B, T): 1 where not padded, x with padded positions 0), both in the accumulation dtype (fp32, fp64 for
    fp64 x, as running_mean): a select, since x * keep would turn an inf or NaN at a padded position into NaN."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if key_padding_mask is None:
        return torch.ones(x.shape[:2], dtype=xf.dtype, device=x.device), xf
    return (~key_padding_mask).to(xf.dtype), torch.where(key_padding_mask[..., None], xf.new_zeros(()), xf)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve_core(core: Union[str, Core]) -> Core:
    if callable(core):
        return core
    if not isinstance(core, str):
        raise TypeError(f"core: expected 'auto', an implementation name or a callable, got {type(core).__name__}")
    if core == "reference":
        from ..reference.tva import tva_attention_ref

        return tva_attention_ref
    from ..ops import tva as tva_ops

    if core not in tva_ops.IMPLS:
        raise ValueError(f"core: expected one of {', '.join(tva_ops.IMPLS)} or a callable, got {core!r}")
    return _ImplCore(core)


class _ImplCore:
    """``tva_attention(..., impl=<name>)`` as a core: a module-level class, not a closure, so that a layer built
    with a core name (the default "auto" included) pickles (torch.save(model), spawn / forkserver workers)."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.__name__ = self.__qualname__ = f"tva_attention[{impl}]"

    def __call__(self, *args, **kwargs):
        from ..ops import tva as tva_ops

        return tva_ops.tva_attention(*args, impl=self.impl, **kwargs)

    def __repr__(self) -> str:
        return self.__name__


class TVAAttention(nn.Module):
    """TVA attention layer: ``forward(x (B, T, C), key_padding_mask=None (B, T) True = padded, cache=None) -> y``.

    With a ``window``, the ``s`` sink keys are absolute positions 0..s-1 (TVA.md): in a left-padded row they are
    padding, so pad on the right where sinks matter. The window counts buffer positions too, pad slots included:
    after a right-padded prefill a shorter row's decode steps count its pad slots inside the window, so with a
    ``cache`` and a window, decode rows of equal length (or pad on the left with s = 0)."""

    def __init__(self, d_model: int, num_heads: int, r: int = 4, s: int = 1, tau: float = 0.18, alpha: float = 0.1,
                 window: Optional[int] = None, causal: bool = True, dropout: float = 0.0,
                 core: Union[str, Core] = "auto") -> None:
        super().__init__()
        # bool is an int subclass: True would pass as 1 (d_model, window) and then fail far from here
        if not _is_int(d_model) or d_model < 1:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        if not _is_int(num_heads) or num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of d_model={d_model}, got {num_heads!r}")
        if not _is_int(r) or r < 1:
            raise ValueError(f"r: expected a positive int (rank ratio), got {r!r}")
        if not _is_int(s) or s < 0:
            raise ValueError(f"s: expected a non-negative int (sink tokens), got {s!r}")
        if window is not None and (not _is_int(window) or window < 1):
            raise ValueError(f"window: expected None or a positive int, got {window!r}")
        for name, value in (("tau", tau), ("alpha", alpha), ("dropout", dropout)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        check_flag("causal", causal)  # "no" was stored and failed at the first forward
        if d_model // num_heads > 256:
            raise ValueError(f"num_heads: d_model / num_heads = {d_model // num_heads} is a head dim above 256, "
                             f"the most the attention cores take; use more heads")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.rank = max(4, d_model // r)
        self.sinks, self.window, self.causal, self.alpha = s, window, causal, float(alpha)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=True)
        self.out = nn.Linear(d_model, d_model, bias=True)
        self.U = nn.Linear(d_model, self.rank, bias=False)
        self.V = nn.Linear(self.rank, d_model, bias=False)
        self.gate = nn.Linear(d_model, num_heads, bias=True)
        self.tau_init = float(tau)
        self.tau = nn.Parameter(torch.tensor(self.tau_init))
        self.dropout = nn.Dropout(dropout)
        self.core_spec = core
        self.core = _resolve_core(core)

    def extra_repr(self) -> str:
        core = self.core_spec if isinstance(self.core_spec, str) else getattr(self.core, "__qualname__", "callable")
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, rank={self.rank}, window={self.window}, "
                f"sinks={self.sinks}, causal={self.causal}, alpha={self.alpha}, core={core}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """tau back to its initial value (after building on the meta device and ``.to_empty()``); the Linear
        children reset themselves."""
        self.tau.fill_(self.tau_init)

    def coef(self) -> torch.Tensor:
        """``c = alpha · tanh(tau)`` (0-dim tensor, differentiable in tau)."""
        return self.alpha * torch.tanh(self.tau)

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> TVACache:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if max_len is not None and (not _is_int(max_len) or max_len < 1):
            raise ValueError(f"max_len: expected None or a positive int, got {max_len!r}")
        if not self.causal:
            raise ValueError("cache: incremental decoding needs a causal layer (causal=True)")
        return TVACache(batch_size=batch_size, max_len=max_len)

    # ---- pieces ------------------------------------------------------------------------------------------
    def _gate_input(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                    cache: Optional[TVACache]) -> torch.Tensor:
        if cache is None:
            if self.causal:
                return running_mean(x, key_padding_mask)
            keep, xk = _kept(x, key_padding_mask)
            mean = xk.sum(1, keepdim=True) / keep.sum(1).clamp_min(1.0)[:, None, None]
            return mean.expand_as(x).to(x.dtype)
        # cached: continue the running mean from the stored sum and count
        keep, xk = _kept(x, key_padding_mask)
        xs = torch.cumsum(xk, dim=1)
        cnt = torch.cumsum(keep, dim=1)
        if cache.x_sum is not None:
            xs = xs + cache.x_sum[:, None, :]
            cnt = cnt + cache.count[:, None]
        # kept aside and committed by forward only once the call has succeeded: a call that fails later (the
        # KV write, the core) must leave the cache as it was, or a retry reads a running mean one call ahead
        # contiguous copies: a view of the last position kept the whole (B, T, C) fp32 cumsum of a prefill alive in
        # the cache, and its stride (T) differed from a decode step's (1), a recompile under torch.compile
        cache.pending = (xs[:, -1].detach().contiguous(), cnt[:, -1].detach().contiguous())
        return (xs / cnt.clamp_min(1.0)[..., None]).to(x.dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                cache: Optional[TVACache] = None) -> torch.Tensor:
        check_tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        check_float("x", x)
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        if key_padding_mask is not None:
            check_tensor("key_padding_mask", key_padding_mask)
            if key_padding_mask.dtype != torch.bool:  # a TypeError, as the ops raise for a wrong dtype
                raise TypeError(f"key_padding_mask: expected a bool tensor, got {key_padding_mask.dtype}")
            if key_padding_mask.shape != (B, T):
                raise ValueError(f"key_padding_mask: expected a bool tensor of shape ({B}, {T}), got "
                                 f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if cache is not None:
            if not isinstance(cache, TVACache):
                raise TypeError(f"cache: expected a TVACache (from new_cache), got {type(cache).__name__}")
            if not self.causal:
                raise ValueError("cache: incremental decoding needs a causal layer (causal=True)")
            if cache.batch_size != B:
                raise ValueError(f"cache: made for batch size {cache.batch_size}, got x with B={B}")
            # a cache filled by another layer (other heads / head dim / width) failed in torch's copy_ or add
            # with a broadcast RuntimeError, or broadcast its keys silently into the wrong number of heads
            if cache.k is not None and (cache.k.shape[1] != H or cache.k.shape[3] != D):
                raise ValueError(f"cache: holds keys of {cache.k.shape[1]} heads of dim {cache.k.shape[3]}, this "
                                 f"layer has {H} heads of dim {D} (a cache from another layer?)")
            if cache.x_sum is not None and cache.x_sum.shape[-1] != C:
                raise ValueError(f"cache: holds a running sum of width {cache.x_sum.shape[-1]}, this layer's "
                                 f"d_model is {C} (a cache from another layer?)")
            check_room(cache.length, T, cache.max_len)  # before the gate's running sum changes
            if T == 0:
                raise ValueError(f"x: no tokens to append to the cache (shape {tuple(x.shape)})")
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        delta = self.V(self.U(x)).view(B, T, H, D).transpose(1, 2)
        g = torch.sigmoid(self.gate(self._gate_input(x, key_padding_mask, cache)))
        kpm = key_padding_mask
        saved = (cache.length, cache.k, cache.v, cache.padding) if cache is not None else None
        try:
            if cache is not None:
                k, v, kpm = append_kv(cache, k, v, key_padding_mask)
            o = self.core(q, k, v, delta, g, self.coef(), causal=self.causal, window=self.window,
                          sinks=self.sinks if self.window is not None else 0, key_padding_mask=kpm,
                          softmax_scale=1.0 / math.sqrt(D))
        except Exception:
            if cache is not None:  # as before the call: what was written past the old length is never read
                cache.length, cache.k, cache.v, cache.padding = saved  # type: ignore[misc]
                cache.pending = None
            raise
        if cache is not None:
            cache.x_sum, cache.count = cache.pending
            cache.pending = None
        y = self.out(o.transpose(1, 2).reshape(B, T, C))
        return self.dropout(y)
