"""Pure-PyTorch reference of MoE top-k routing, dispatch and combine with expert capacity (design/MOE.md).

Every fast implementation (C++, Triton, CUDA) is tested against these functions: routing decisions (experts, queue
positions, kept/dropped) must match exactly, values and gradients within the dtype tolerance.

Conventions used by all implementations:
  * probabilities ``p = softmax(logits)`` in fp32 (fp64 when the logits are fp64, so gradcheck works);
  * top-k by ``p`` with ties going to the lower expert index, NaN ranked above every number (NaNs by index);
  * GShard priority: assignment (token n, choice j) has priority index ``j * N + n``; an expert's queue position is
    the number of earlier assignments (in that order) to the same expert, computed by a prefix sum;
  * capacity mode: buffer (E, cap, C), row ``e * cap + pos``; dropless mode: packed buffer (N * k, C) sorted by
    expert, row ``offsets[e] + pos``. ``slot[n, j]`` is that row (-1 when dropped), ``token_of_slot`` its inverse.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .common import without_autocast


@dataclasses.dataclass
class Routing:
    """The routing decisions for N tokens over E experts with k choices each (all tensors on the logits' device).

    expert_idx (N, k) int64 chosen experts, best first; weights (N, k) gate weights (differentiable, fp32/fp64);
    probs (N, E) router softmax; position (N, k) int64 queue position of each assignment in its expert (also for
    dropped ones); kept (N, k) bool; capacity per expert (None = dropless); tokens_per_expert (E,) assignments routed
    to each expert before dropping; kept_per_expert (E,) after dropping; dropped 0-dim int64 number of dropped
    assignments; offsets (E+1,) start row of each expert in the packed buffer (exclusive prefix sum of
    kept_per_expert); slot (N, k) int64 buffer row of each assignment (-1 = dropped); token_of_slot (num_slots,)
    int64 token held by each buffer row (-1 = empty).
    """

    expert_idx: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    position: torch.Tensor
    kept: torch.Tensor
    capacity: Optional[int]
    tokens_per_expert: torch.Tensor
    kept_per_expert: torch.Tensor
    dropped: torch.Tensor
    offsets: torch.Tensor
    slot: torch.Tensor
    token_of_slot: torch.Tensor
    num_experts: int

    @property
    def num_tokens(self) -> int:
        # not int(): under torch.export / torch.compile with a dynamic token count this is a SymInt, and int()
        # specialised it to the example's value ("You marked N as dynamic but your code specialized it")
        return self.expert_idx.shape[0]

    @property
    def k(self) -> int:
        return self.expert_idx.shape[1]

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    @property
    def num_slots(self) -> int:
        """Rows of the dispatch buffer: E * cap (capacity mode) or N * k (dropless: every assignment is kept)."""
        return self.num_tokens * self.k if self.capacity is None else self.num_experts * self.capacity

    def buffer_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of the dispatch output / combine input for ``channels`` features."""
        if self.capacity is None:
            return (self.num_tokens * self.k, channels)
        return (self.num_experts, self.capacity, channels)


_MAX_SLOTS = 2 ** 62  # buffer rows (num_experts * capacity): well inside int64


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: Optional[float],
                    min_capacity: int = 4) -> Optional[int]:
    """``max(min_capacity, ceil(capacity_factor * k * N / E))``, or None (dropless) when capacity_factor is None."""
    if capacity_factor is None:
        return None
    want = float(capacity_factor) * k * num_tokens / num_experts
    # the buffer has num_experts * capacity rows, indexed by int64: a capacity_factor so large that this overflows
    # failed deep inside torch.empty/torch.full (OverflowError, or a TypeError with a C++ trace from cpu_native)
    if not want < _MAX_SLOTS / max(num_experts, 1) or min_capacity * max(num_experts, 1) >= _MAX_SLOTS:
        raise ValueError(f"capacity_factor: {capacity_factor} (with min_capacity={min_capacity}) gives a capacity of "
                         f"{max(min_capacity, want):.3g} rows per expert, more than a buffer of {num_experts} experts "
                         f"can index; an expert never takes more than num_tokens={num_tokens} rows")
    # sym_max, not max(int(...)): with a dynamic token count (torch.export / torch.compile) want is a SymFloat and
    # int() / max() specialised the capacity, so the token count, to the example's value
    return torch.sym_max(int(min_capacity), math.ceil(want))


def default_renormalize(k: int, renormalize: Optional[bool]) -> bool:
    return (k > 1) if renormalize is None else bool(renormalize)


def router_probs(logits: torch.Tensor) -> torch.Tensor:
    """softmax over experts in fp32 (fp64 for fp64 logits). Every provider routes on these probabilities, so their
    decisions agree exactly with the reference's."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    l = logits.to(acc)
    n, e = l.shape
    # (not while tracing: a branch on n specialised a dynamic token count to one side of 256 under torch.export)
    if not torch.compiler.is_compiling() and l.device.type == "cpu" and e <= 32 and n >= 256:
        # torch's CPU softmax vectorises along the row, so with few experts it costs ~100 ns a row (1.7 ms at
        # N 16K, E 8); the same formula in whole-tensor ops is 4-6x faster, forward and backward. The shift by the
        # row max is a constant for the gradient (softmax does not depend on it), hence detached. Non-finite rows
        # give NaN rows as torch.softmax does (inf - inf, -inf - -inf, NaN max).
        x = (l - l.amax(-1, keepdim=True).detach()).exp()
        return x * x.sum(-1, keepdim=True).reciprocal()
    return torch.softmax(l, dim=-1)


def topk_ref(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of the k largest probabilities per row, ties to the lower index (stable descending sort, which
    ranks NaN above every number)."""
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k].contiguous()


def gate_weights(probs: torch.Tensor, expert_idx: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The chosen probabilities, renormalised to sum to 1 per token when asked (differentiable w.r.t. probs)."""
    w = probs.gather(1, expert_idx)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def queue_positions_ref(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queue position of every assignment in GShard order, and the per-expert totals, by one prefix sum.

    Assignments are laid out rank-major (all 1st choices by token, then all 2nd choices, ...); the inclusive cumsum
    of their one-hot expert codes, read at each assignment's own expert, minus one, is its position.
    """
    n, k = expert_idx.shape
    order = expert_idx.t().reshape(-1)                    # (k*N,) priority order
    # (k*N, E) int64; a comparison, not F.one_hot, whose range check reads values (.item()), which
    # vmap(grad(...)) refuses (order comes from top-k: always in range)
    onehot = (order[:, None] == torch.arange(num_experts, device=order.device)).to(torch.int64)
    running = onehot.cumsum(dim=0)
    pos = running.gather(1, order[:, None]).squeeze(1) - 1
    counts = running[-1] if order.numel() else torch.zeros(num_experts, dtype=torch.int64, device=order.device)
    return pos.view(k, n).t().contiguous(), counts


def finish_routing(probs: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, position: torch.Tensor,
                   tokens_per_expert: torch.Tensor, num_experts: int, capacity: Optional[int]) -> Routing:
    """Kept mask, buffer rows and their inverse from the discrete decisions (shared by the reference and tests)."""
    n, k = expert_idx.shape
    dev = expert_idx.device
    if capacity is None:
        kept = torch.ones_like(expert_idx, dtype=torch.bool)
        kept_per_expert = tokens_per_expert
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        slot = starts[expert_idx] + position
        num_slots = n * k
    else:
        kept = position < capacity
        kept_per_expert = torch.clamp(tokens_per_expert, max=capacity)
        slot = torch.where(kept, expert_idx * capacity + position, torch.full_like(position, -1))
        num_slots = num_experts * capacity
    # out of place throughout (cat, scatter): under torch.func.vmap a batched result cannot go into an
    # unbatched buffer in place
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(kept_per_expert, 0)])
    # a scatter into one spare row for the dropped assignments (each kept slot is unique), not
    # token_of_slot[slot[kept]] = tokens[kept]: boolean-mask indexing has a data-dependent size (nonzero), so
    # torch.compile broke the graph there (fullgraph=False, the default) or traced an unbacked size (fullgraph=True)
    tokens = torch.arange(n, device=dev).unsqueeze(1).expand(n, k)
    token_of_slot = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=dev).scatter(
        0, torch.where(kept, slot, num_slots).reshape(-1), torch.where(kept, tokens, -1).reshape(-1))
    token_of_slot = token_of_slot[:num_slots]
    dropped = (n * k - kept_per_expert.sum()).to(torch.int64)
    return Routing(expert_idx=expert_idx, weights=weights, probs=probs, position=position, kept=kept,
                   capacity=capacity, tokens_per_expert=tokens_per_expert, kept_per_expert=kept_per_expert,
                   dropped=dropped, offsets=offsets, slot=slot, token_of_slot=token_of_slot, num_experts=num_experts)


def moe_route_ref(logits: torch.Tensor, k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
                  renormalize: Optional[bool] = None) -> Routing:
    """Top-k routing with GShard-priority capacity (see module docstring). ``logits``: (N, E)."""
    n, e = logits.shape
    probs = router_probs(logits)
    expert_idx = topk_ref(probs.detach(), k)
    weights = gate_weights(probs, expert_idx, default_renormalize(k, renormalize))
    position, counts = queue_positions_ref(expert_idx, e)
    cap = expert_capacity(n, e, k, capacity_factor, min_capacity)
    return finish_routing(probs, expert_idx, weights, position, counts, e, cap)


def moe_dispatch_ref(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather tokens into the expert buffer: (E, cap, C) in capacity mode, packed (N*k, C) in dropless mode.
    Empty rows are zero."""
    n, c = x.shape
    src = routing.token_of_slot
    if n == 0:  # nothing to gather from: every row is empty (a zero row keeps the result connected to x)
        return torch.cat([x, x.new_zeros(1, c)])[torch.zeros_like(src)].view(routing.buffer_shape(c)) * 0
    rows = x[src.clamp(min=0)]
    rows = torch.where((src >= 0).unsqueeze(1), rows, torch.zeros((), dtype=x.dtype, device=x.device))
    return rows.view(routing.buffer_shape(c))


@without_autocast
def moe_combine_ref(expert_out: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``y[n] = sum over kept j of w[n, j] * expert_out[slot[n, j]]`` in fp32 (fp64 for fp64), expert_out's dtype."""
    acc = torch.promote_types(routing.weights.dtype, expert_out.dtype)
    flat = expert_out.flatten(0, -2)  # (rows, C); reshape(-1, C) cannot infer rows when C is 0
    zero = torch.zeros((), dtype=acc, device=flat.device)
    # a dropped choice reads no row: masked by a select, since 0 * a non-finite row 0 would be NaN
    picked = torch.where(routing.kept[..., None], flat[routing.slot.clamp(min=0)].to(acc), zero)  # (N, k, C)
    w = torch.where(routing.kept, routing.weights.to(acc), zero)
    return torch.einsum("nk,nkc->nc", w, picked).to(expert_out.dtype)


def moe_grouped_ffn_ref(x: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_gate: Optional[torch.Tensor],
                        w_out: torch.Tensor) -> torch.Tensor:
    """The grouped expert FFN as a loop over the packed segments in plain torch ops (the definition
    ``apt_kernels.ops.moe.moe_grouped_ffn`` matches): rows ``offsets[e]:offsets[e+1]`` of x go through expert e,
    ``silu(h W_gate[e]) * (h W_in[e])`` (swiglu; gelu(h W_in[e]) when w_gate is None), then ``W_out[e]``."""
    outs = []
    for e in range(w_in.shape[0]):
        h = x[int(offsets[e]):int(offsets[e + 1])]
        up = h @ w_in[e]
        act = torch.nn.functional.silu(h @ w_gate[e]) * up if w_gate is not None else torch.nn.functional.gelu(up)
        outs.append(act @ w_out[e])
    return torch.cat(outs) if outs else x.new_zeros(0, w_out.shape[2])


def moe_aux_losses_ref(logits: torch.Tensor, routing: Routing) -> dict[str, torch.Tensor]:
    """Unscaled auxiliary losses: ``balance_loss = E * sum_e f_e * P_e`` (f_e: share of the N*k assignments routed to
    e before dropping, P_e: mean router probability) and ``z_loss = mean_n logsumexp(logits_n)^2``."""
    n, e = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    f = routing.tokens_per_expert.to(acc) / max(n * routing.k, 1)
    p_mean = routing.probs.mean(dim=0) if n else torch.zeros(e, dtype=acc, device=logits.device)
    balance = e * torch.sum(f * p_mean.to(acc))
    z = torch.logsumexp(logits.to(acc), dim=-1)
    z_loss = (z * z).mean() if n else torch.zeros((), dtype=acc, device=logits.device)
    return {"balance_loss": balance, "z_loss": z_loss}


# ---- test helpers (shared by the tests of every router implementation) --------------------------------------
def random_router_logits(n: int, e: int, kind: str = "random", seed: int = 0) -> torch.Tensor:
    """(n, e) fp32 router logits of a kind that stresses routing: ``random``; ``equal`` (all zero: every choice a
    tie, broken by the lower expert index); ``dup`` (pairs of identical columns: exact ties between two experts);
    ``skew`` (expert 0 favoured: heavy dropping at small capacity); ``nonfinite`` (rows cycling through: finite, one
    +inf, one NaN, every other entry -inf (probability 0: ties), all -inf, +inf next to -inf; softmax makes a row
    with +inf, NaN or only -inf all NaN)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "equal":
        return torch.zeros(n, e)
    lg = torch.randn(n, e, generator=g)
    if kind == "dup":
        lg = lg[:, torch.arange(e) // 2]
    elif kind == "skew":
        lg[:, 0] += 4
    elif kind == "nonfinite":
        inf = float("inf")
        for r, c in enumerate(torch.randint(0, e, (n,), generator=g).tolist()):
            case = r % 6
            if case == 1:
                lg[r, c] = inf
            elif case == 2:
                lg[r, c] = float("nan")
            elif case == 3:
                lg[r, (torch.arange(e) + r) % 2 == 0] = -inf
            elif case == 4:
                lg[r] = -inf
            elif case == 5:
                lg[r, c] = inf
                lg[r, (c + 1) % e] = -inf
    elif kind != "random":
        raise ValueError(f"kind: expected random, equal, dup, skew or nonfinite, got {kind!r}")
    return lg


def nan_router_probs(n: int, e: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, e) router probabilities (softmax of ``dup`` logits: exact ties) with NaN entries, for the route ops
    themselves (softmax never mixes NaN with numbers in a row, the ops take any probabilities): rows cycle through
    none, one, about a third, about two thirds and all entries NaN; ranked like the reference, a NaN comes before
    every number and NaNs come by increasing expert index."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(random_router_logits(n, e, "dup", seed).to(dtype), dim=-1)
    rows = torch.arange(n)
    case = rows % 5
    frac = torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0])[case]
    nan = torch.rand(n, e, generator=g) < frac[:, None]  # rand < 1: case 4 all NaN
    nan[rows, torch.randint(0, e, (n,), generator=g)] |= case == 1
    return p.masked_fill(nan, float("nan"))


def wild_router_probs(n: int, e: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, e) values a route op may be given besides probabilities (the ops take any values): exact ties, numbers
    below -1, and by row: some -inf, only -inf, some +inf, some NaN. Ranked like the reference's stable descending
    sort: NaN, +inf, the numbers, -inf, ties by increasing expert index."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-3, 3, (n, e), generator=g).to(dtype) * 0.75
    case = (torch.arange(n) % 4)[:, None]
    r = torch.rand(n, e, generator=g)
    v = v.masked_fill((case == 0) & (r < 0.5), float("-inf")).masked_fill(case == 1, float("-inf"))
    return v.masked_fill((case == 2) & (r < 0.25), float("inf")).masked_fill((case == 3) & (r < 0.3), float("nan"))


def check_route_op(route, probs: torch.Tensor, k: int, capacity: Optional[int]) -> None:
    """Test helper: a back end's route op ``route(probs, k, cap) -> (expert_idx, position, slot, token_of_slot,
    tokens_per_expert)`` (cap -1: dropless) makes exactly the reference's decisions on ``probs`` (any values, NaN
    included)."""
    e = probs.shape[1]
    p = probs.detach().cpu()
    idx_ref = topk_ref(p, k)
    pos_ref, counts_ref = queue_positions_ref(idx_ref, e)
    ref = finish_routing(p, idx_ref, p.gather(1, idx_ref), pos_ref, counts_ref, e, capacity)
    idx, pos, slot, tos, counts = route(probs, k, -1 if capacity is None else capacity)
    for name, got, want in (("expert_idx", idx, ref.expert_idx), ("position", pos, ref.position),
                            ("kept", slot >= 0, ref.kept), ("slot", slot, ref.slot),
                            ("token_of_slot", tos, ref.token_of_slot), ("tokens_per_expert", counts,
                                                                         ref.tokens_per_expert)):
        got = got.cpu()
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        if not torch.equal(got, want):
            bad = (got != want).reshape(got.shape[0], -1).any(1).nonzero()[:3, 0]
            rows = "; ".join(f"{int(i)}: {got[i].tolist()} != {want[i].tolist()}" for i in bad)
            raise AssertionError(f"{name} differs from the reference (row: got != expected) {rows}")


def check_same_routing(a: Routing, b: Routing) -> None:
    """Test helper: two routings make exactly the same decisions (experts, queue positions, kept set, buffer
    slots, counts, drops) and the same weights within fp32 tolerance (NaN where the other has NaN: a row of
    non-finite logits)."""
    from ..testing import assert_close

    assert a.capacity == b.capacity, (a.capacity, b.capacity)
    for f in ("expert_idx", "position", "kept", "slot", "token_of_slot", "tokens_per_expert", "kept_per_expert",
              "offsets"):
        assert torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()), f
    assert int(a.dropped) == int(b.dropped)
    assert_close(a.weights.cpu(), b.weights.cpu(), equal_nan=True)


def check_moe_impl(impl: str, n: int, e: int, k: int, cf: Optional[float], kind: str, dtype: torch.dtype,
                   device: str = "cpu", c: int = 24) -> None:
    """Test helper: ``impl``'s route, dispatch and combine on ``device`` vs the reference on the CPU, for logits of
    :func:`random_router_logits` ``kind``: the same routing decisions, a bit-exact dispatch buffer, the combined
    output within the "moe" tolerance of ``dtype``, and the gradients of x and the logits."""
    from ..ops.moe import moe_combine, moe_dispatch, moe_route
    from ..testing import assert_close

    lg_ref = random_router_logits(n, e, kind, seed=n * 7 + e + k).requires_grad_()
    lg = lg_ref.detach().to(device).requires_grad_()
    r_ref = moe_route(lg_ref, k, cf, min_capacity=2, impl="reference")
    r = moe_route(lg, k, cf, min_capacity=2, impl=impl)
    check_same_routing(r, r_ref)
    g = torch.Generator().manual_seed(n)
    x_ref = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    x = x_ref.detach().to(device).requires_grad_()
    buf_ref = moe_dispatch(x_ref, r_ref, impl="reference")
    buf = moe_dispatch(x, r, impl=impl)
    assert buf.shape == buf_ref.shape and buf.dtype == dtype
    assert torch.equal(buf.cpu(), buf_ref)  # a pure copy: bit-exact
    # expert "compute": scale rows so gradients through dispatch and combine differ per row
    scale = torch.randn(buf_ref.shape[:-1] + (1,), generator=g).to(dtype)
    out_ref = buf_ref * scale
    out = buf * scale.to(device)
    y_ref = moe_combine(out_ref, r_ref, impl="reference")
    y = moe_combine(out, r, impl=impl)
    assert y.dtype == dtype
    assert_close(y.cpu(), y_ref, family="moe")
    gy = torch.randn(n, c, generator=g).to(dtype)
    (y_ref.float() * gy.float()).sum().backward()
    (y.float() * gy.to(device).float()).sum().backward()
    assert_close(x.grad.cpu(), x_ref.grad, family="moe", grad=True)
    assert_close(lg.grad.cpu(), lg_ref.grad, dtype=torch.float32 if dtype == torch.float64 else dtype,
                 family="moe", grad=True)


def check_moe_nonfinite(impl: str, n: int, e: int, k: int, cf: Optional[float], dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> None:
    """Test helper: logits with +inf, -inf and NaN entries (all-NaN softmax rows, zero-probability ties) through
    moe_route, and probabilities mixing NaN with numbers through ``impl``'s route op itself: the reference's
    decisions, NaN ranked above every number and NaNs by increasing expert index."""
    from ..ops.moe import OPS, moe_route

    lg = random_router_logits(n, e, "nonfinite", seed=n + e + k).to(dtype)
    check_same_routing(moe_route(lg.to(device), k, cf, min_capacity=2, impl=impl),
                       moe_route(lg, k, cf, min_capacity=2, impl="reference"))
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    for probs in (nan_router_probs(n, e, seed=n * e + k, dtype=pdt), wild_router_probs(n, e, seed=n + k, dtype=pdt)):
        check_route_op(OPS[impl]["route"], probs.to(device), k, expert_capacity(n, e, k, cf, 2))
