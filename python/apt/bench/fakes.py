"""Small, plain-PyTorch providers of the three benchmarked kinds for testing the harness without the real kernels:
a correct one per kind (the "reference" of a private registry), a deliberately wrong one, and an unavailable one.

Use :func:`fake_registry` to get an ``apt.core.registry.Registry(load_builtin=False)`` holding them; the harness
tests and ``apt bench`` smoke tests run against it, so they do not depend on which real providers are built.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..core.registry import Provider, Registry


# ---- attention ---------------------------------------------------------------------------------------------
def attention_math(q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                   key_padding_mask=None, softmax_scale=None):
    """Materialised-softmax TVA attention (design/TVA.md) for small shapes."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if k.shape[1] != q.shape[1]:  # grouped-query: query head h reads k/v head h // (H / Hkv)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        Tq, Tk = q.shape[-2], k.shape[-2]  # aligned bottom-right, as a decode step over a cache
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1), float("-inf"))
    o = torch.softmax(s, dim=-1) @ v.float()
    if delta is not None:
        o = o + coef * gate.float().transpose(1, 2)[..., None] * delta.float()
    return o.to(q.dtype)


class FakeAttention(Provider):
    kind, name, is_default = "attention", "fake_ref", True
    description = "test double: materialised-softmax attention"

    def forward(self, q, k, v, **kw: Any):
        return attention_math(q, k, v, **kw)


class FakeAttentionWrong(Provider):
    kind, name = "attention", "fake_wrong"
    description = "test double: off by 0.1"
    calls = 0  # counts forward() calls, so a test can tell whether it was timed

    def forward(self, q, k, v, **kw: Any):
        type(self).calls += 1
        return attention_math(q, k, v, **kw) + 0.1


class FakeAttentionUnavailable(Provider):
    kind, name = "attention", "fake_gone"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return False, "fake_gone needs hardware this test machine does not have"

    def forward(self, q, k, v, **kw: Any):
        raise AssertionError("an unavailable provider is never called")


class FakeAttentionPicky(Provider):
    kind, name = "attention", "fake_picky"

    def supports(self, **inputs: Any) -> list[str]:
        return ["no TVA term"] if inputs.get("delta") is not None else []

    def forward(self, q, k, v, **kw: Any):
        return attention_math(q, k, v, **kw)


# ---- scan --------------------------------------------------------------------------------------------------
def scan_math(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """Sequential selective scan with input-dependent B, C (batch, N, L) (design/SCAN.md), fp32 accumulation."""
    dt = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        dt = F.softplus(dt)
    uf, Bf, Cf = u.float(), B.float(), C.float()
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


class FakeScan(Provider):
    kind, name, is_default = "scan", "fake_ref", True

    def selective_scan_fn(self, *a: Any, **kw: Any):
        return scan_math(*a, **kw)

    def selective_state_update(self, *a: Any, **kw: Any):  # the kind's interface; the bench times the scan only
        raise NotImplementedError("the fake scans have no decode step")


class FakeScanWrong(FakeScan):
    kind, name, is_default = "scan", "fake_wrong", False

    def selective_scan_fn(self, u, *a: Any, **kw: Any):
        return scan_math(u * 1.5, *a, **kw)


# ---- router ------------------------------------------------------------------------------------------------
def route_math(logits: torch.Tensor, k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
               renormalize: Optional[bool] = None) -> SimpleNamespace:
    """Top-k routing with GShard priority and capacity (design/MOE.md), capacity mode only."""
    N, E = logits.shape
    p = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(p, k, dim=-1)
    if renormalize if renormalize is not None else k > 1:
        w = w / w.sum(-1, keepdim=True)
    cap = max(min_capacity, math.ceil((capacity_factor or 1.0) * k * N / E))
    order = idx.t().reshape(-1)  # choice-major: every 1st choice before any 2nd choice
    onehot = F.one_hot(order, E)
    pos = (onehot.cumsum(0) * onehot).sum(-1) - 1
    pos = pos.view(k, N).t()
    kept = pos < cap
    slot = torch.where(kept, idx * cap + pos, torch.full_like(pos, -1))
    return SimpleNamespace(expert_idx=idx, weights=w, position=pos, kept=kept, slot=slot, capacity=cap,
                           num_experts=E)


def dispatch_math(x: torch.Tensor, r: SimpleNamespace) -> torch.Tensor:
    tok = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(r.slot)
    buf = x.new_zeros(r.num_experts * r.capacity, x.shape[1])
    buf[r.slot[r.kept]] = x[tok[r.kept]]
    return buf.view(r.num_experts, r.capacity, x.shape[1])


def combine_math(expert_out: torch.Tensor, r: SimpleNamespace) -> torch.Tensor:
    flat = expert_out.reshape(-1, expert_out.shape[-1])
    tok = torch.arange(r.slot.shape[0], device=flat.device)[:, None].expand_as(r.slot)
    y = flat.new_zeros(r.slot.shape[0], flat.shape[1], dtype=torch.float32)
    y.index_add_(0, tok[r.kept], flat[r.slot[r.kept]].float() * r.weights[r.kept][:, None])
    return y.to(expert_out.dtype)


class FakeRouter(Provider):
    kind, name, is_default = "router", "fake_ref", True

    def route(self, logits, k, capacity_factor=None, min_capacity=4, renormalize=None):
        return route_math(logits, k, capacity_factor, min_capacity, renormalize)

    def dispatch(self, x, routing):
        return dispatch_math(x, routing)

    def combine(self, expert_out, routing):
        return combine_math(expert_out, routing)


class FakeRouterWrong(FakeRouter):
    kind, name, is_default = "router", "fake_wrong", False

    def combine(self, expert_out, routing):
        return 2 * combine_math(expert_out, routing)


ALL_FAKES = [FakeAttention, FakeAttentionWrong, FakeAttentionUnavailable, FakeAttentionPicky, FakeScan,
             FakeScanWrong, FakeRouter, FakeRouterWrong]


def fake_registry(*classes: type[Provider]) -> Registry:
    """A private registry holding the given fake providers (all of them by default)."""
    reg = Registry(load_builtin=False)
    for cls in classes or ALL_FAKES:
        reg.register(cls)
    return reg
