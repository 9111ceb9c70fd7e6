"""The Mamba (selective state space) mixer used by the ``mamba`` backbone.

Layout as in Mamba v1: in_proj -> (x, z); x -> causal depthwise conv -> silu -> x_proj -> (dt, B, C);
y = selective_scan(x, dt_proj(dt), A=-exp(A_log), B, C, D, z, delta_bias, softplus) -> out_proj. The scan comes
from the registry (kind ``scan``); decoding one token at a time uses the provider's ``selective_state_update``
with a per-layer conv state (the last d_conv inputs) and ssm state (batch, d_inner, d_state).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core import registry

logger = logging.getLogger(__name__)


def _selective_scan_local(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Sequential fp32 scan (mamba_ssm semantics; B, C as (batch, N, L)). Used only when the registry has no
    ``scan`` provider at all."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    Bf, Cf = B.float(), C.float()
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A.float()[None])
        h = dA * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y


def _state_update_local(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[:, :, None] * A.float()[None])
    prev = state.to(torch.float32, copy=True) if torch.is_grad_enabled() else state.float()  # see the reference
    new = dA * prev + (dt * x.float())[:, :, None] * B.float()[:, None, :]
    state.copy_(new.to(state.dtype))
    y = (new * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def resolve_scan(name: Union[str, registry.Provider, None]) -> tuple[Callable[..., Any], Callable[..., Any], str]:
    """(selective_scan_fn, selective_state_update, provider name) for the requested scan provider (a name, or a
    provider the caller resolved already: a model resolves it once for all its layers, so one fallback warning)."""
    try:
        prov = name if isinstance(name, registry.Provider) else registry.get("scan", name)
        return prov.selective_scan_fn, prov.selective_state_update, prov.name  # type: ignore[attr-defined]
    except (registry.RegistryError, AttributeError) as exc:
        logger.warning("apt model: no usable scan provider (%s); using the built-in sequential scan", exc)
        return _selective_scan_local, _state_update_local, "builtin-sequential"


def _acc(p: torch.Tensor) -> torch.Tensor:
    """A, D and the dt bias go to the scan in fp32 whatever the model's low precision (as mamba_ssm keeps them);
    fp64 stays fp64 (.float() rounded a float64 model's to fp32: 3e-9 off its own float64 math)."""
    return p.to(torch.promote_types(p.dtype, torch.float32))


class MambaCache:
    """Per-layer decode state: conv_state (B, d_inner, d_conv) and ssm_state (B, d_inner, d_state)."""

    def __init__(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_state = conv_state
        self.ssm_state = ssm_state
        self.seqlen = 0


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, scan_name: Union[str, registry.Provider, None] = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        if dt_rank is not None and (isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank: expected a positive int or None (ceil(d_model / 16)), got {dt_rank!r}")
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.dt_min, self.dt_max = dt_min, dt_max
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.reset_parameters()
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]  # as mamba_ssm marks them
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # "auto": pick, per input device and dtype, the best scan provider that supports them (at first use)
        self.auto_scan = scan_name == "auto"
        self._auto_cache: dict[tuple[str, Any], tuple[Callable[..., Any], Callable[..., Any], str]] = {}
        self.scan_fn, self.step_fn, self.scan_provider = resolve_scan(None if self.auto_scan else scan_name)
        if self.auto_scan:
            self.scan_provider = "auto"
            self._warm_auto()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation of this layer's own tensors: A = -(1..d_state), D = 1 and the dt bias, the
        inverse softplus of a dt drawn log-uniformly in [dt_min, dt_max] (after building on the meta device and
        ``.to_empty()``; the Linear / Conv1d children reset themselves, and dt_proj's before this)."""
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=self.D.device) * (hi - lo) + lo)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(a).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def _warm_auto(self) -> None:
        # resolve "auto" for the weights' device and dtype now, outside any forward: the registry lookup takes a
        # lock, which torch.compile cannot trace (fullgraph=True failed at the first call, otherwise a graph break)
        w = self.in_proj.weight
        if self.auto_scan and w.device.type != "meta":
            # and the autocast dtypes: under torch.autocast the forward's activations (in_proj's output) are
            # bf16/fp16 while the weights stay fp32, a (device, dtype) pair the lookup would otherwise meet in forward
            others = [dt for dt in (torch.bfloat16, torch.float16) if dt != w.dtype]
            for dt in others + [w.dtype]:  # the weights' dtype last: it is the one selected now
                self._select(torch.empty(1, self.d_inner, 1, device=w.device, dtype=dt))  # (batch, dim, L)

    def _apply(self, fn, *args, **kwargs):  # .to(device / dtype), .cuda(), .half(): warm the new combination
        out = super()._apply(fn, *args, **kwargs)
        self._warm_auto()
        return out

    def _select(self, t: torch.Tensor) -> None:
        if not self.auto_scan:
            return
        key = (str(t.device), t.dtype)
        hit = self._auto_cache.get(key)
        if hit is None:
            try:
                prov = registry.select("scan", None, u=t)
                hit = (prov.selective_scan_fn, prov.selective_state_update, prov.name)  # type: ignore[attr-defined]
                logger.debug("apt model: scan provider for %s %s tensors: %s", t.device, t.dtype, prov.name)
            except (registry.RegistryError, AttributeError):
                hit = (_selective_scan_local, _state_update_local, "builtin-sequential")
            self._auto_cache[key] = hit
        self.scan_fn, self.step_fn, self.scan_provider = hit

    def new_cache(self, batch_size: int, device: Any = None, dtype: Any = None) -> MambaCache:
        w = self.conv1d.weight
        dtype = dtype or w.dtype
        return MambaCache(torch.zeros(batch_size, self.d_inner, self.d_conv, device=device or w.device, dtype=dtype),
                          torch.zeros(batch_size, self.d_inner, self.d_state, device=device or w.device,
                                      dtype=torch.promote_types(dtype, torch.float32)))

    def forward(self, x: torch.Tensor, cache: Optional[MambaCache] = None) -> torch.Tensor:
        if cache is not None and cache.seqlen > 0:
            # continuing from a state: one step per token (the scan starts from a zero state)
            outs = [self.step(x[:, t], cache) for t in range(x.shape[1])]
            return torch.stack(outs, dim=1)
        B, L, _ = x.shape
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2*d_inner, L)
        self._select(xz)
        xi, z = xz.chunk(2, dim=1)
        if cache is not None:
            pad = F.pad(xi, (max(self.d_conv - L, 0), 0))
            # the cache holds values, not graph (as the KV cache does): a later step overwrites it in place
            cache.conv_state.copy_(pad[:, :, -self.d_conv:].detach())
        xc = F.silu(self.conv1d(xi)[..., :L])
        dbc = self.x_proj(xc.transpose(1, 2))  # (B, L, r + 2N)
        dt, Bm, Cm = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias goes in as delta_bias
        A = -torch.exp(_acc(self.A_log))
        out = self.scan_fn(xc.contiguous(), delta.contiguous(), A, Bm.transpose(1, 2).contiguous(),
                           Cm.transpose(1, 2).contiguous(), _acc(self.D), z.contiguous(),
                           delta_bias=_acc(self.dt_proj.bias), delta_softplus=True,
                           return_last_state=cache is not None)
        if cache is not None:
            y, last = out
            cache.ssm_state.copy_(last.detach())
            cache.seqlen += L
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def step(self, x: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One token: x (B, d_model) -> (B, d_model), updating the cache in place."""
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, d_inner) each
        self._select(xi)
        conv = torch.roll(cache.conv_state, shifts=-1, dims=-1)
        conv[:, :, -1] = xi
        cache.conv_state.copy_(conv.detach())
        xc = (conv * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias
        xc = F.silu(xc)
        dt, Bm, Cm = torch.split(self.x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()
        A = -torch.exp(_acc(self.A_log))
        y = self.step_fn(cache.ssm_state, xc, dt, A, Bm, Cm, D=_acc(self.D), z=z,
                         dt_bias=_acc(self.dt_proj.bias), dt_softplus=True)
        if cache.ssm_state.requires_grad:  # written by the reference step under autograd: keep the value only
            cache.ssm_state.detach_()
        cache.seqlen += 1
        return self.out_proj(y)
