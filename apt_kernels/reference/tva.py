"""Reference TVA attention (TVA.md, kernel contract): dense masked softmax attention plus the gated perturbation.

``o = softmax(q kᵀ · scale + mask) v + coef · gate[..., None] · delta``, softmax accumulated in fp32 (fp64 for fp64
inputs), autograd for the backward. This is the obviously-right version the fused kernels are tested against; it
materialises the (Tq, Tk) score matrix, so it is O(T²) in memory.

Queries may be fewer than keys (``Tq <= Tk``, incremental decoding with a KV cache): query ``i`` then sits at
absolute position ``i + Tk - Tq`` (bottom-right alignment, as in FlashAttention), and the masks use that position.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Union

import torch

from .._autograd import first_order_only, refuse_transformed
from .._validate import check_dtype, check_flag, check_float, check_ndim, check_same_device, check_shape, check_tensor
from ..backends import autograd_free, custom_op_must_dispatch
from .common import without_autocast

__all__ = ["tva_attention_ref", "tva_visible_mask", "check_tva_inputs", "TVAArgs", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_HUGE_WINDOW = 1 << 30  # windows this large are clamped to "no window" when they cover every key

Coef = Union[float, torch.Tensor]


class TVAArgs:
    """Normalised scalar arguments after validation (shared by every implementation)."""

    __slots__ = ("B", "H", "Tq", "Tk", "D", "causal", "window", "sinks", "scale", "coef_is_tensor")

    def __init__(self, B: int, H: int, Tq: int, Tk: int, D: int, causal: bool, window: Optional[int], sinks: int,
                 scale: float, coef_is_tensor: bool) -> None:
        self.B, self.H, self.Tq, self.Tk, self.D = B, H, Tq, Tk, D
        self.causal, self.window, self.sinks, self.scale = causal, window, sinks, scale
        self.coef_is_tensor = coef_is_tensor


def kv_groups(q: Any, k: Any, v: Any) -> int:
    """G, the query heads per k/v head, when k and v have fewer heads than q that divide its H and otherwise
    match it (B, D), as grouped-query / multi-query attention takes (query head h reads k/v head h // G, as
    flash-attn and SDPA's enable_gqa); 1 for anything else (as many heads, or a bad shape for check_tva_inputs to
    report as passed)."""
    try:  # the common case first, cheaply (this runs on every decode step): as many k/v heads as q heads
        if k.shape[1] == q.shape[1]:
            return 1
    except (AttributeError, IndexError, RuntimeError, TypeError):  # not tensors, too few dims, nested
        return 1
    if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_nested for t in (q, k, v)) \
            or q.dim() != 4 or k.dim() != 4 or v.shape != k.shape \
            or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        return 1
    H, Hkv = q.shape[1], k.shape[1]
    return H // Hkv if Hkv and H % Hkv == 0 else 1


def repeat_kv(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """k, v with as many heads as q for grouped-query attention (:func:`kv_groups`), else as given. One k/v head
    is expanded (a stride-0 view, no copy); more are repeated (a copy: the kernels read one k/v head per q head)."""
    G = kv_groups(q, k, v)
    if G == 1:
        _check_grouped_v(q, k, v)
        return k, v
    if k.shape[1] == 1:
        shape = (k.shape[0], q.shape[1], k.shape[2], k.shape[3])
        return k.expand(shape), v.expand(shape)
    return k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)


def fold_kv_grads(dk: torch.Tensor, dv: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv computed per query head (B, H, Tk, D) summed over each group onto k's (B, Hkv, Tk, D), in fp32 (fp64
    for fp64); as given when they already have k's shape. The fused ops' backward for grouped-query k/v."""
    if dk.shape == k.shape:
        return dk, dv
    B, Hkv, Tk, D = k.shape
    acc = torch.promote_types(dk.dtype, torch.float32)

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, Hkv, t.shape[1] // Hkv, Tk, D).sum(2, dtype=acc).to(t.dtype)
    return fold(dk), fold(dv)


def kv_head_views(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """k, v seen with q's head count for validation only, without copying: for grouped-query attention
    (:func:`kv_groups` > 1) a stride-0 expansion of their first head (same dtype, device, B, Tk, D), else as given.
    For a core that reads the groups itself (flash-attn, SDPA's enable_gqa), so :func:`check_tva_inputs` can check
    the call without :func:`repeat_kv`'s copy."""
    if kv_groups(q, k, v) == 1:
        _check_grouped_v(q, k, v)
        return k, v
    shape = (k.shape[0], q.shape[1], k.shape[2], k.shape[3])
    return k[:, :1].expand(shape), v[:, :1].expand(shape)


def _check_grouped_v(q: Any, k: Any, v: Any) -> None:
    """A grouped-query k with a v that fits neither it nor q's head count: blame v (check_tva_inputs would report
    k, whose shape is fine, against q's head count)."""
    if isinstance(v, torch.Tensor) and kv_groups(q, k, k) > 1 and v.shape != k.shape \
            and tuple(v.shape) != (q.shape[0], q.shape[1], k.shape[2], q.shape[3]):
        raise ValueError(f"v: expected shape {tuple(k.shape)} (B, Hkv, Tk, D), same as k, got {tuple(v.shape)}")


def check_tva_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                     gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                     window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                     softmax_scale: Optional[float] = None) -> TVAArgs:
    """Validate the kernel-contract arguments; raise ValueError/TypeError naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(name, t, 4, "(B, H, T, D)")
        check_float(name, t)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    check_shape("k", k, (B, H, Tk, D), "(B, H, Tk, D) matching q's B, H, D, or (B, Hkv, Tk, D) with Hkv dividing H"
                " (grouped-query attention)")
    check_shape("v", v, (B, H, Tk, D), "(B, H, Tk, D), same as k")
    if Tq > Tk:
        raise ValueError(f"q: expected no more queries than keys (Tq <= Tk), got Tq={Tq}, Tk={Tk}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"q: head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    check_same_device("q", q, k=k, v=v, delta=delta, gate=gate, key_padding_mask=key_padding_mask)
    if delta is not None:
        check_shape("delta", delta, q.shape, "(B, H, T, D), same as q")
        check_float("delta", delta)
        if delta.dtype != q.dtype:
            raise TypeError(f"delta: expected dtype {q.dtype} (same as q), got {delta.dtype}")
    if gate is not None:
        if delta is None:
            raise ValueError("gate: given without delta (the gate only scales the perturbation delta)")
        check_shape("gate", gate, (B, Tq, H), "(B, T, H)")
        check_float("gate", gate)
    coef_is_tensor = isinstance(coef, torch.Tensor)
    if coef_is_tensor:
        if coef.dim() != 0:
            raise ValueError(f"coef: expected a python float or a 0-dim tensor, got shape {tuple(coef.shape)}")
        check_float("coef", coef)
        if coef.device.type != "cpu":  # a CPU 0-dim coef is fine with CUDA inputs (read as a scalar)
            check_same_device("q", q, coef=coef)
    elif isinstance(coef, bool) or not isinstance(coef, numbers.Real):
        raise TypeError(f"coef: expected a python float or a 0-dim tensor, got {type(coef).__name__}")
    elif not -math.inf < coef < math.inf:  # NaN too; not math.isfinite: dynamo (dynamic=True) breaks the graph on it
        raise ValueError(f"coef: expected a finite number, got {coef}")
    check_flag("causal", causal)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window: expected None or a positive int, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window: expected None or a positive int, got {window}")
        window = int(window)
        if window >= _HUGE_WINDOW and window >= Tk:
            # every key lies inside the window: the same mask as no window. A "no window" sentinel such as
            # 2**31 - 1 or sys.maxsize overflowed the kernels' index arithmetic (p + W: int32 in Triton, int64 in
            # C++) in non-causal mode and silently hid keys. The first test is a plain int, so an ordinary window
            # adds no guard on a symbolic Tk under torch.compile.
            window = None
    if isinstance(sinks, bool) or not isinstance(sinks, numbers.Integral):
        raise TypeError(f"sinks: expected a non-negative int, got {type(sinks).__name__}")
    if sinks < 0:
        raise ValueError(f"sinks: expected a non-negative int, got {sinks}")
    if sinks >= _HUGE_WINDOW and sinks >= Tk:
        sinks = Tk  # every key a sink; 2**63 and up did not fit the kernels' int64 (a pybind signature error)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        check_shape("key_padding_mask", key_padding_mask, (B, Tk), "(B, Tk), True = padded")
        check_dtype("key_padding_mask", key_padding_mask, torch.bool)
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale: expected None or a float, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not 0 < scale < math.inf:  # NaN too (see coef above)
            raise ValueError(f"softmax_scale: expected a positive finite number, got {softmax_scale}")
    return TVAArgs(B, H, Tq, Tk, D, causal, window, int(sinks), scale, coef_is_tensor)


def tva_visible_mask(Tq: int, Tk: int, causal: bool = True, window: Optional[int] = None, sinks: int = 0,
                     key_padding_mask: Optional[torch.Tensor] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean (B or 1, 1, Tq, Tk) mask, True where query i may attend to key j.

    Query i sits at absolute position ``p = i + Tk - Tq``. Causal: ``j <= p``; window W: additionally ``p - W < j``
    (non-causal: ``|p - j| < W``); the first ``sinks`` keys stay visible through the window (never through
    causality or padding); padded keys (mask True) are hidden.
    """
    if key_padding_mask is not None:
        device = key_padding_mask.device
    pos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    vis = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= pos)  # out of place: torch.func.functionalize has no rule for __iand__
    if window is not None:
        in_win = (pos - window < j) if causal else ((pos - j).abs() < window)
        vis = vis & (in_win | (j < sinks))
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask[:, None, None, :]
    return vis


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def perturbation(delta: torch.Tensor, gate: Optional[torch.Tensor], coef: Coef, acc: torch.dtype) -> torch.Tensor:
    """``coef · gate[..., None] · delta`` in the accumulation dtype; gate (B, T, H) -> (B, H, T, 1)."""
    term = delta.to(acc)
    if gate is not None:
        term = term * gate.to(acc).permute(0, 2, 1)[..., None]
    if isinstance(coef, torch.Tensor):
        return term * coef.to(device=delta.device, dtype=acc)
    return term * float(coef)


@without_autocast
def tva_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: Optional[torch.Tensor] = None,
                      gate: Optional[torch.Tensor] = None, coef: Coef = 0.0, causal: bool = True,
                      window: Optional[int] = None, sinks: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                      softmax_scale: Optional[float] = None, return_lse: bool = False) -> Any:
    """TVA attention, dense reference. q (B, H, Tq, D); k, v (B, H, Tk, D); delta (B, H, Tq, D); gate (B, Tq, H);
    coef float or 0-dim tensor; key_padding_mask (B, Tk) bool, True = padded. Returns o in q's dtype, and with
    ``return_lse`` also the attention's log-sum-exp (B, H, Tq) fp32, fp64 for fp64 inputs (see
    ``apt_kernels.tva_attention``).

    A query row with no visible key gets zero attention output (its perturbation is still added). k, v may have
    fewer heads, dividing H (grouped-query attention, :func:`repeat_kv`).
    """
    check_flag("return_lse", return_lse)  # a string such as "no" returned (o, lse)
    k, v = repeat_kv(q, k, v)
    a = check_tva_inputs(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, softmax_scale)
    acc = _acc_dtype(q.dtype)
    # scaled before the product, as SDPA's math path: q·k of fp32 magnitudes near 1e19 overflowed to inf (a NaN
    # output) where the scaled scores fit
    s = torch.matmul(q.to(acc) * a.scale, k.to(acc).transpose(-1, -2))
    vis = tva_visible_mask(a.Tq, a.Tk, causal, a.window, a.sinks, key_padding_mask, q.device)
    row_any = vis.any(dim=-1, keepdim=True)
    # Fully masked rows: softmax over finite zeros, then multiplied by 0, so neither output nor grads are NaN.
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~row_any, 0.0)
    p = torch.softmax(s, dim=-1) * row_any.to(acc)
    o = torch.matmul(p, v.to(acc))
    if delta is not None:
        o = o + perturbation(delta, gate, coef, acc)
    if not return_lse:
        return o.to(q.dtype)
    with torch.no_grad():  # +inf on rows with no visible key, as the kernels (and flash-attn) write it
        lse = torch.logsumexp(s.detach(), dim=-1).masked_fill(~row_any[..., 0], float("inf"))
    lse = lse if q.dtype == torch.float64 else lse.float()
    return o.to(q.dtype), lse


def random_tva_inputs(B: int = 2, H: int = 2, Tq: int = 5, D: int = 16, Tk: Optional[int] = None,
                      dtype: torch.dtype = torch.float32, device: str = "cpu", pad: bool = False,
                      coef_tensor: bool = False, seed: int = 0, requires_grad: bool = False) -> dict:
    """Random kernel-contract inputs (for tests and benchmarks). With ``pad``, batch 0 has its last key padded and,
    when B > 1, batch 1 its first two keys (so early causal rows there see no key at all)."""
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    inputs = dict(q=rnd(B, H, Tq, D), k=rnd(B, H, Tk, D), v=rnd(B, H, Tk, D), delta=rnd(B, H, Tq, D))
    inputs["gate"] = torch.rand(B, Tq, H, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    coef = 0.37
    inputs["coef"] = (torch.tensor(coef, dtype=dtype, device=device).requires_grad_(requires_grad)
                      if coef_tensor else coef)
    if pad:
        kpm = torch.zeros(B, Tk, dtype=torch.bool)
        kpm[0, -1] = True
        if B > 1:
            kpm[1, : min(2, Tk)] = True
        inputs["key_padding_mask"] = kpm.to(device)
    return inputs


def dominant_perturbation_inputs(scale: float = 64.0, **kw: Any) -> dict:
    """random_tva_inputs (coef a tensor) with delta scaled by ``scale``: the perturbation coef·gate·delta then
    outweighs the attention part ~40x, where a fused backward that recovers the attention part from o loses it."""
    inp = random_tva_inputs(coef_tensor=True, **kw)
    inp["delta"] = (inp["delta"].float() * scale).to(inp["delta"].dtype)
    return inp


def check_grads_ignore_the_perturbation(fn, inp: dict, msg: str = "", **kw: Any) -> None:
    """dq, dk, dv do not depend on delta, gate or coef (o = attention + coef·gate·delta): a fused kernel must give
    the same ones, bit for bit, with the perturbation (however large) as without it, for one upstream gradient.
    Its backward's Di = Σ dO·A must come from the attention part A, not from o minus the perturbation."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (inp[n].detach().requires_grad_() for n in ("q", "k", "v"))
    go = torch.randn(q.shape, generator=g).to(q.dtype)
    extra = {n: inp[n] for n in ("key_padding_mask",) if inp.get(n) is not None}
    o = fn(q, k, v, delta=inp["delta"].detach(), gate=inp["gate"].detach(), coef=inp["coef"], **extra, **kw)
    with_pert = torch.autograd.grad(o, (q, k, v), go)
    without = torch.autograd.grad(fn(q, k, v, **extra, **kw), (q, k, v), go)
    for n, a, b in zip("qkv", with_pert, without):
        assert torch.equal(a, b), f"{msg} d{n}: differs with the perturbation by {float((a - b).abs().max()):.3e}"


def check_gqa_saves_kv_unrepeated(fn, Hkv: int, dtype: torch.dtype = torch.float32, head_dim: int = 16,
                                  **kw: Any) -> None:
    """A grouped-query training call through ``fn`` must leave autograd holding k/v with their Hkv heads (never
    a (B, H, Tk, D) copy: G times the memory), and give the reference's gradients."""
    from ..testing import assert_close

    g = torch.Generator().manual_seed(Hkv)
    # Tq != Tk: a saved (B, H, Tk, D) tensor can only be repeated K or V; Tq >= 32: "auto" on the CPU takes the
    # reference for a training call with fewer queries
    B, H, Tq, Tk, D = 2, 4, 37, 45, head_dim
    q, delta = (torch.randn(B, H, Tq, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    gate = torch.rand(B, Tq, H, generator=g).to(dtype).requires_grad_()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = fn(q, k, v, delta, gate, 0.3, **kw)
    assert (B, H, Tk, D) not in shapes, f"autograd saved a repeated K/V: {shapes}"
    assert (B, Hkv, Tk, D) in shapes, shapes
    go = torch.randn(o.shape, generator=g).to(dtype)
    want = tva_attention_ref(q, k, v, delta, gate, 0.3, **kw)
    for n, a, b in zip(("q", "k", "v", "delta", "gate"), torch.autograd.grad(o, (q, k, v, delta, gate), go),
                       torch.autograd.grad(want, (q, k, v, delta, gate), go)):
        assert a.shape == b.shape, f"d{n}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert_close(a, b, dtype=dtype, family="attention", grad=True, msg=f"d{n}")


def check_tva_against_reference(fn, inp: dict, dtype: torch.dtype = torch.float32, msg: str = "",
                                go_layout: str = "dense", **kw) -> None:
    """Test helper: ``fn(**inp, **kw)`` vs :func:`tva_attention_ref` on fp32 copies of the same inputs. Checks the
    output (dtype, finite, the tolerance table's "attention" entry for ``dtype``) and, for one random dO, the
    gradient of every floating input that requires grad (q, k, v, delta, gate, coef). ``go_layout``: dO "dense",
    "expanded" (stride 0 over time, as from ``o.sum(2)``) or "transposed" (time innermost)."""
    from ..testing import assert_close

    out = fn(**inp, **kw)
    ref_inp = {k: (v.detach().float().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v) for k, v in inp.items()}
    ref = tva_attention_ref(**ref_inp, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{msg} o: dtype {out.dtype} or not finite"
    assert_close(out, ref.to(dtype), dtype=dtype, family="attention", msg=f"{msg} o")
    g = torch.Generator().manual_seed(1)
    B, H, T, D = out.shape
    if go_layout == "expanded":
        go = torch.randn(B, H, 1, D, generator=g).to(device=out.device, dtype=dtype).expand(out.shape)
    elif go_layout == "transposed":
        go = torch.randn(B, H, D, T, generator=g).to(device=out.device, dtype=dtype).transpose(2, 3)
    else:
        go = torch.randn(out.shape, generator=g).to(device=out.device, dtype=dtype)
    names = [n for n in ("q", "k", "v", "delta", "gate", "coef")
             if isinstance(inp.get(n), torch.Tensor) and inp[n].requires_grad]
    got = torch.autograd.grad(out, [inp[n] for n in names], go)
    exp = torch.autograd.grad(ref, [ref_inp[n] for n in names], go.float())
    for n, g, e in zip(names, got, exp):
        assert torch.isfinite(g).all(), f"{msg} d{n} not finite"
        assert_close(g, e.to(dtype), dtype=dtype, family="attention", grad=True, msg=f"{msg} d{n}")


def perturbation_grads(rowdot: torch.Tensor, gate: Optional[torch.Tensor], coef: torch.Tensor
                       ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Gradients of ``coef · gate · delta`` for gate and coef from ``rowdot = Σ_d delta·dO`` (B, H, T) fp32:
    dGate = coef · rowdot (as (B, T, H)), dCoef = Σ gate · rowdot. Used by the fused kernels' backward."""
    c = coef.to(device=rowdot.device, dtype=torch.float32)
    if gate is None:
        return None, rowdot.sum().to(coef.dtype)
    g = gate.to(torch.float32).permute(0, 2, 1)
    return (c * rowdot).permute(0, 2, 1).to(gate.dtype), (rowdot * g).sum().to(coef.dtype)


def register_fused_tva_op(fwd_op, bwd_op, fwd_impl: Callable[..., Any],
                          bwd_impl: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """The fake implementations and the autograd formula shared by the fused TVA custom ops (native C++/CUDA,
    Triton; k and v may have fewer heads, :func:`kv_groups`: the ops repeat them for their kernels and fold dk and
    dv back, :func:`fold_kv_grads`, so autograd saves them unrepeated, G times less memory for K and V under
    grouped-query attention): ``fwd_op(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale,
    save_attn) ->
    (o, lse, attn)``, ``bwd_op(grad_o, q, k, v, attn, lse, delta, gate, coef, causal, window, sinks,
    key_padding_mask, scale) -> (dq, dk, dv, ddelta, rowdot)`` (ddelta and rowdot empty without delta). attn is
    the attention part of o, before the perturbation, written with ``save_attn`` and delta (empty otherwise; o
    itself without delta): the backward's Di = Σ dO·attn. Recovering it as o - coef·gate·delta in fp16/bf16 kept
    only o's digits: where the perturbation outweighed the attention, dq and dk lost precision with the ratio
    (bf16, perturbation ~50x: 10% error, the reference 0.4%). The real ops allocate every output contiguous, so
    the fakes do too (``empty_like`` would copy a transposed q's strides).

    Returns ``run(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, with_lse=False) -> o``
    (``(o, lse)``, lse detached, with ``with_lse``): the custom op
    where it must be seen (torch.compile, dispatch modes: backends.custom_op_must_dispatch); otherwise an
    autograd.Function over the ops' bodies ``fwd_impl`` / ``bwd_impl`` with the same formula. The custom op's
    dispatch costs ~60 µs of Python per call and direction (CPU, torch 2.13): more than the kernel at decode, and
    on a GPU the device waits on it."""

    @fwd_op.register_fake
    def _fwd_fake(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, save_attn):
        attn = q.new_empty(q.shape) if save_attn and delta is not None else q.new_empty(0)
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), attn

    @bwd_op.register_fake
    def _bwd_fake(grad_o, q, k, v, attn, lse, delta, gate, coef, causal, window, sinks, key_padding_mask, scale):
        has = delta is not None
        dd = q.new_empty(q.shape) if has else q.new_empty(0)
        rd = q.new_empty(q.shape[:3], dtype=torch.float32) if has else q.new_empty(0, dtype=torch.float32)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dd, rd

    def grads(bwd, saved, args, grad_o):
        q, k, v, attn, lse, delta, gate, coef, kpm = saved
        causal, window, sinks, scale, attn_is_o = args
        if attn_is_o and delta is not None:
            # a forward that did not save the attention part (it saw no gradient coming): the old, lossy way
            attn = (attn.to(torch.float32) - perturbation(delta, gate, coef, torch.float32)).to(attn.dtype)
        # every kernel reads dO through its strides: no copy of an expanded (stride-0) or transposed gradient
        dq, dk, dv, ddelta, rowdot = bwd(grad_o, q, k, v, attn, lse, delta, gate, coef, causal, window, sinks, kpm,
                                         scale)
        dgate = dcoef = None
        if delta is None:
            ddelta = None
        else:
            dgate, dcoef = perturbation_grads(rowdot, gate, coef)
        return dq, dk, dv, ddelta, dgate, dcoef, None, None, None, None, None, None

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, delta, gate, coef, causal, window, sinks, kpm, scale, _save_attn = inputs
        o, lse, attn = output
        attn_is_o = attn.shape != o.shape  # no delta (attn is o), or not saved (an empty placeholder)
        ctx.save_for_backward(q, k, v, o if attn_is_o else attn, lse, delta, gate, coef, kpm)
        ctx.args = (causal, window, sinks, scale, attn_is_o)

    def backward(ctx, grad_o, grad_lse, grad_attn):
        return grads(bwd_op, ctx.saved_tensors, ctx.args, grad_o)

    fwd_op.register_autograd(backward, setup_context=setup_context)

    class TVAAttentionFused(torch.autograd.Function):  # the name profilers show
        @staticmethod
        def forward(*inputs):
            return fwd_impl(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:  # separate from forward: torch.func transforms need it
            setup_context(ctx, inputs, output)
            ctx.mark_non_differentiable(output[1], output[2])

        @staticmethod
        @first_order_only("tva_attention")  # the kernels' backward has no backward of its own
        def backward(ctx, grad_o, _grad_lse, _grad_attn):
            return grads(bwd_impl, ctx.saved_tensors, ctx.args, grad_o)

    def run(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, with_lse: bool = False):
        if custom_op_must_dispatch():
            save = delta is not None and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (q, k, v, delta, gate, coef))
            out = fwd_op(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, save)
        elif autograd_free(q, k, v, delta, gate, coef):
            # nothing to differentiate (decode, evaluation): the body alone, without the Function's bookkeeping;
            # not under a torch.func transform (vmap) or a forward-AD level (see backends.autograd_free)
            out = fwd_impl(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale, False)
        else:
            refuse_transformed("tva_attention", q, k, v, delta, gate, coef, key_padding_mask)
            out = TVAAttentionFused.apply(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale,
                                          delta is not None)
        # the lse carries no gradient (the backward takes none for it, as flash-attn's): detached, not ignored
        return (out[0], out[1].detach()) if with_lse else out[0]

    return run
