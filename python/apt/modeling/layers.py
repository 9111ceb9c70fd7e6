"""Building blocks the model builder composes: norms, the dense FFN, the MoE wrapper around an FFN, and a plain
causal self-attention used only when no attention provider can be had (same interface as TVAAttention:
``forward(x, key_padding_mask=None, cache=None)`` and ``new_cache(batch_size, max_len=None)``)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from apt_kernels.layers.kv import append_kv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"model.norm: expected 'layernorm' or 'rmsnorm', got {kind!r}")


def default_d_ff(d_model: int, activation: str) -> int:
    if activation == "swiglu":  # same parameter count as a 4x GELU MLP, rounded up to a multiple of 8
        return int(math.ceil(8 * d_model / 3 / 8) * 8)
    return 4 * d_model


class DenseFFN(nn.Module):
    """``W2 act(W1 x)`` (gelu / relu) or ``W2 (silu(W1 x) * W3 x)`` (swiglu), with dropout on the output."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("gelu", "relu", "swiglu"):
            raise ValueError(f"activation: expected gelu, relu or swiglu, got {activation!r}")
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_ff * (2 if activation == "swiglu" else 1))
        self.w2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return self.drop(self.w2(h))


class MoEWrappedFFN(nn.Module):
    """An FFN slot holding both the dense FFN and a mixture-of-experts layer (``forward(x) -> (y, aux)``).

    While ``active`` is False the dense FFN runs (so MoE can be switched on at a scheduled epoch, by the ``moe``
    plugin); once active the MoE runs and its aux losses (``balance_loss``, ``z_loss``, already scaled by their
    coefficients) are kept in ``last_aux`` for the model to collect. ``active`` is a buffer, so it is saved in
    checkpoints. ``capacity_factor`` and ``temperature`` are forwarded to the MoE layer (schedules set them).
    """

    def __init__(self, dense: nn.Module, moe: nn.Module, active: bool = True) -> None:
        super().__init__()
        self.dense = dense
        self.moe = moe
        self.register_buffer("_active", torch.tensor(bool(active)), persistent=True)
        # forward branches on this Python mirror of the buffer: reading the buffer (.item()) would sync the device
        # every step and is a data-dependent branch that torch.compile cannot trace (it guards on the bool instead)
        self._active_flag = bool(active)
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        return self._active_flag

    @active.setter
    def active(self, value: bool) -> None:
        self._active_flag = bool(value)
        self._active.fill_(bool(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._active_flag = bool(self._active.item())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Rewrite the ``_active`` buffer from its Python mirror (``.to_empty()`` leaves it uninitialised)."""
        self._active.fill_(self._active_flag)

    def _set_moe_attr(self, name: str, value: Any) -> None:
        if hasattr(self.moe, name):
            setattr(self.moe, name, value)

    @property
    def capacity_factor(self) -> Optional[float]:
        return getattr(self.moe, "capacity_factor", None)

    @capacity_factor.setter
    def capacity_factor(self, value: Optional[float]) -> None:
        self._set_moe_attr("capacity_factor", value)

    @property
    def temperature(self) -> Optional[float]:
        return getattr(self.moe, "temperature", None)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._set_moe_attr("temperature", value)

    @torch.no_grad()
    def upcycle(self) -> str:
        """Copy the dense FFN's weights into every expert ("sparse upcycling"), so that switching MoE on mid-run
        starts from what the dense FFN learnt instead of random experts. Returns "" on success, else why not
        (a different activation or size, or an MoE layer without stacked ``w_in``/``w_out`` experts). The dense
        biases have no place in the experts and are left out."""
        d, m = self.dense, self.moe
        if not isinstance(d, DenseFFN):
            return f"dense FFN is a {type(d).__name__}, not DenseFFN"
        w_in, w_out, w_gate = getattr(m, "w_in", None), getattr(m, "w_out", None), getattr(m, "w_gate", None)
        if not (torch.is_tensor(w_in) and torch.is_tensor(w_out)):
            return f"{type(m).__name__} has no stacked expert weights w_in / w_out"
        act = getattr(m, "activation", None)
        if act != d.activation:
            return f"activations differ (dense {d.activation}, experts {act})"
        f = d.w2.in_features
        if w_in.shape[1:] != (d.w2.out_features, f) or w_out.shape[1:] != (f, d.w2.out_features):
            return f"sizes differ (dense d_ff {f}, experts {tuple(w_in.shape)})"
        w1 = d.w1.weight  # (F, C) or (2F, C) for swiglu: silu(first half) * second half
        if d.activation == "swiglu":
            if w_gate is None:
                return "swiglu experts without w_gate"
            w_gate.copy_(w1[:f].t().unsqueeze(0).expand_as(w_gate))
            w_in.copy_(w1[f:].t().unsqueeze(0).expand_as(w_in))
        else:
            w_in.copy_(w1.t().unsqueeze(0).expand_as(w_in))
        w_out.copy_(d.w2.weight.t().unsqueeze(0).expand_as(w_out))
        return ""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["last_aux"] = {}  # the last forward's losses, with its graph (see APTModel.__getstate__)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            self.last_aux, self.last_stats = {}, {}
            return self.dense(x)
        shape = x.shape
        out = self.moe(x.reshape(-1, shape[-1]))
        y, aux = (out if isinstance(out, tuple) else (out, {}))
        aux = aux or {}
        self.last_aux = {k: v for k, v in aux.items() if k in ("balance_loss", "z_loss") and torch.is_tensor(v)}
        # routing statistics for monitoring (tokens per expert, dropped assignments), without autograd history
        self.last_stats = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in aux.items()
                           if k not in self.last_aux}
        return y.reshape(shape)


class KVCache:
    """Keys and values seen so far: (B, H, capacity, D) buffers, of which the first ``length`` positions are
    filled (``max_len`` positions when given, else a capacity that doubles when full), and the key padding mask
    (B, capacity) once any call passed one; CausalSelfAttention fills it through apt_kernels.layers.kv.append_kv."""

    def __init__(self, batch_size: int, max_len: Optional[int] = None) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.padding: Optional[torch.Tensor] = None
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Plain causal multi-head attention (torch SDPA). Used when the attention kind has no usable provider.
    ``key_padding_mask`` (B, T) covers this call's positions, with or without a cache, as in TVAAttention."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, **_: Any) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.h = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        return KVCache(batch_size, max_len)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        kpm = key_padding_mask
        if kpm is not None and (kpm.shape != (B, T) or kpm.dtype != torch.bool):
            raise ValueError(f"key_padding_mask: expected a bool tensor of shape ({B}, {T}), got {kpm.dtype} "
                             f"{tuple(kpm.shape)}")
        q, k, v = self.qkv(x).view(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            past = cache.length
            k, v, kpm = append_kv(cache, k, v, kpm)
        L = k.shape[2]
        mask = None
        if past == 0 and kpm is None:
            causal = True
        else:
            causal = False
            qi = torch.arange(past, past + T, device=x.device)[:, None]
            mask = torch.arange(L, device=x.device)[None, :] <= qi  # True = visible
            if kpm is not None:
                mask = mask[None, None] & ~kpm[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        if mask is not None:  # a row with no visible key gives zeros, not NaN
            y = torch.nan_to_num(y, nan=0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
