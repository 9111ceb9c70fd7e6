"""Pure-PyTorch reference of the Mamba selective scan and its one-step decode update (SCAN.md).

A plain sequential loop over time in fp32 (fp64 for fp64 inputs): slow, obviously right, and differentiable by
autograd, so it is the ground truth every kernel (C++, Triton, CUDA) is tested against. Signatures and semantics
follow mamba_ssm's ``selective_scan_ref`` / ``selective_state_update_ref``.
"""
from __future__ import annotations

from typing import Literal, Optional, Union, overload

import torch
import torch.nn.functional as F

from .._validate import check_flag, check_float, check_ndim, check_no_overlap, check_shape, check_tensor
from ..testing import assert_close as _assert_close

__all__ = ["selective_scan_ref", "selective_state_update_ref", "check_scan_args", "check_state_update_args",
           "expand_bc", "state_update_heads",
           "random_scan_inputs", "check_scan_against_reference", "check_wide_delta_next_to_half_u", "check_empty_scan"]


def _check_same_device(ref: torch.Tensor, ref_name: str, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {t.device}")


def _check_bc(name: str, t: torch.Tensor, batch: int, dim: int, N: int, L: Optional[int]) -> int:
    """Validate one of B/C and return its number of groups (0 for the constant (dim, N) layout)."""
    check_tensor(name, t)
    check_float(name, t)
    if L is not None:  # scan: (dim, N) | (batch, N, L) | (batch, G, N, L)
        if t.dim() == 2:
            check_shape(name, t, (dim, N), "(dim, N) for a constant B/C")
            return 0
        tail, lay = (L,), ", L"
    else:  # decode step: (batch, N) | (batch, G, N)
        tail, lay = (), ""
    if t.dim() == 2 + len(tail):
        check_shape(name, t, (batch, N) + tail, f"(batch, N{lay})")
        return 1
    if t.dim() == 3 + len(tail):
        G = t.shape[1]
        if G < 1 or dim % G != 0:
            raise ValueError(f"{name}: number of groups {G} (dim 1 of shape {tuple(t.shape)}) must divide dim={dim}")
        check_shape(name, t, (batch, G, N) + tail, f"(batch, G, N{lay})")
        return G
    layouts = f"(dim, N), (batch, N{lay}) or (batch, G, N{lay})" if L is not None else "(batch, N) or (batch, G, N)"
    raise ValueError(f"{name}: expected shape {layouts}, got {tuple(t.shape)}")


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> tuple[int, int]:
    """Validate selective_scan arguments (raising ValueError/TypeError naming the argument).
    Returns (groups of B, groups of C), 0 meaning the constant (dim, N) layout."""
    check_ndim("u", u, 3, "(batch, dim, L)")
    check_float("u", u)
    batch, dim, L = u.shape
    check_shape("delta", check_tensor("delta", delta), u.shape, "(batch, dim, L)")
    check_float("delta", delta)
    check_tensor("A", A)
    if A.is_complex():
        raise TypeError("A: complex A is not supported (real A only)")
    check_ndim("A", A, 2, "(dim, N)")
    check_float("A", A)
    if A.shape[0] != dim:
        raise ValueError(f"A: expected shape (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    gb = _check_bc("B", B, batch, dim, N, L)
    gc = _check_bc("C", C, batch, dim, N, L)
    if D is not None:
        check_shape("D", check_tensor("D", D), (dim,), "(dim,)")
        check_float("D", D)
    if z is not None:
        check_shape("z", check_tensor("z", z), u.shape, "(batch, dim, L)")
        check_float("z", z)
    if delta_bias is not None:
        check_shape("delta_bias", check_tensor("delta_bias", delta_bias), (dim,), "(dim,)")
        check_float("delta_bias", delta_bias)
    _check_same_device(u, "u", delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    return gb, gc


def check_state_update_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> None:
    """Validate selective_state_update arguments (raising ValueError/TypeError naming the argument)."""
    check_ndim("state", state, 3, "(batch, dim, N)")
    check_float("state", state)
    check_no_overlap("state", state)
    batch, dim, N = state.shape
    check_shape("x", x, (batch, dim), "(batch, dim)")
    check_float("x", x)
    check_shape("dt", dt, (batch, dim), "(batch, dim)")
    check_float("dt", dt)
    check_shape("A", A, (dim, N), "(dim, N)")
    check_float("A", A)
    _check_bc("B", B, batch, dim, N, None)
    _check_bc("C", C, batch, dim, N, None)
    if D is not None:
        check_shape("D", D, (dim,), "(dim,)")
        check_float("D", D)
    if z is not None:
        check_shape("z", z, (batch, dim), "(batch, dim)")
        check_float("z", z)
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (dim,), "(dim,)")
        check_float("dt_bias", dt_bias)
    _check_same_device(state, "state", x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def _drop_head_axis(A, B, C, D, z, dt_bias) -> tuple:
    """A (1, dim, N), B/C (batch, 1, N), D/dt_bias (1, dim), z (batch, 1, dim) -> the channel layout's; arguments
    already in it (or not tensors: the step's checks name them) pass unchanged."""
    def drop(t, nd, axis):
        return t.squeeze(axis) if isinstance(t, torch.Tensor) and t.dim() == nd and t.shape[axis] == 1 else t
    return drop(A, 3, 0), drop(B, 3, 1), drop(C, 3, 1), drop(D, 2, 0), drop(z, 3, 1), drop(dt_bias, 2, 0)


def state_update_heads(step, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus) -> torch.Tensor:
    """mamba_ssm's Mamba-2 decode layout (state (batch, nheads, headdim, N), x/dt/z (batch, nheads, headdim),
    A (nheads, headdim, N), D/dt_bias (nheads, headdim), B/C (batch, ngroups, N) or (batch, N) for one group) run
    by ``step`` (a decode step taking the channel layout) as the channel layout: head h, row i is channel
    h·headdim + i. With G groups over nheads heads, channel c reads group c // (nheads·headdim / G) = h // (nheads / G),
    the group of its head, so B/C pass unchanged. Returns y (batch, nheads, headdim); state is updated in place."""
    check_tensor("state", state)
    b, H, P, N = state.shape
    if H == 1 and isinstance(x, torch.Tensor) and x.dim() == 2:
        # one head and a channel-layout x: mamba_ssm adds the head axis per argument, so such a call mixes the
        # layouts; y is (batch, 1, dim) as there (it squeezes the head axis only for a 3-d state)
        return step(state[:, 0], x, dt, *_drop_head_axis(A, B, C, D, z, dt_bias), dt_softplus).unsqueeze(1)
    check_no_overlap("state", state)  # before the copy fallback below, which would write through the overlap
    for name, t, shape, what in (("x", x, (b, H, P), "(batch, nheads, headdim)"),
                                 ("dt", dt, (b, H, P), "(batch, nheads, headdim)"),
                                 ("A", A, (H, P, N), "(nheads, headdim, N)"),
                                 ("D", D, (H, P), "(nheads, headdim)"), ("z", z, (b, H, P), "(batch, nheads, headdim)"),
                                 ("dt_bias", dt_bias, (H, P), "(nheads, headdim)")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: with a 4-d state (batch, nheads, headdim, N) = {tuple(state.shape)}, expected "
                             f"shape {what} = {shape}, got {tuple(t.shape)}")
    bc = []
    for name, t in (("B", B), ("C", C)):
        if isinstance(t, torch.Tensor) and t.dim() == 2:  # (batch, N): one group, as mamba_ssm reads it
            t = t.unsqueeze(1)
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != b or t.shape[2] != N:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: with a 4-d state, expected shape (batch, ngroups, N) = ({b}, G, {N}) or "
                             f"(batch, N), got {got}")
        if t.shape[1] < 1 or H % t.shape[1] != 0:
            raise ValueError(f"{name}: ngroups={t.shape[1]} must divide nheads={H}")
        bc.append(t)
    # decided from the strides, not by trying the view: dynamo cannot trace a failing view inside try/except
    # (a hard error under torch.compile for a sliced head axis)
    mergeable = H == 1 or P == 1 or state.stride(1) == P * state.stride(2)
    if not mergeable:  # heads and rows not mergeable (e.g. a sliced head axis): work on a copy
        flat, copied = state.reshape(b, H * P, N), True
    elif torch.compiler.is_compiling() and torch.is_grad_enabled():
        # the step's in-place write through a view of the state failed in the compiled backward with dynamic
        # shapes (torch 2.13's AOTAutograd: "modified by an inplace operation"); a copy written back does not
        flat, copied = state.view(b, H * P, N).clone(), True
    else:
        flat, copied = state.view(b, H * P, N), False
    chan = lambda t: None if t is None else t.reshape(*t.shape[:-2], H * P)  # noqa: E731 (…, H, P) -> (…, H·P)
    y = step(flat, chan(x), chan(dt), A.reshape(H * P, N), bc[0], bc[1], chan(D), chan(z), chan(dt_bias),
             dt_softplus)
    if copied:
        state.copy_(flat.view(b, H, P, N))
    return y.view(b, H, P)


def expand_bc(t: torch.Tensor, batch: int, dim: int, time: bool = True) -> torch.Tensor:
    """B or C in any layout -> (batch, dim, N[, L]) (a view or a repeat), channel d using group d // (dim // G).
    ``time``: the layouts of the scan (True: (dim, N) | (batch, N, L) | (batch, G, N, L)) or of the decode step
    (False: (batch, N) | (batch, G, N))."""
    nd = t.dim() - (1 if time else 0)
    if time and t.dim() == 2:  # constant (dim, N): no time axis
        return t.unsqueeze(0).expand(batch, *t.shape)
    if nd == 2:  # (batch, N[, L]): shared by every channel
        return t.unsqueeze(1).expand(batch, dim, *t.shape[1:])
    G = t.shape[1]
    return t.repeat_interleave(dim // G, dim=1)


@overload
def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor] = ..., z: Optional[torch.Tensor] = ...,
                       delta_bias: Optional[torch.Tensor] = ..., delta_softplus: bool = ...,
                       return_last_state: Literal[False] = ...) -> torch.Tensor: ...
@overload
def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                       delta_softplus: bool, return_last_state: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor] = ..., z: Optional[torch.Tensor] = ...,
                       delta_bias: Optional[torch.Tensor] = ..., delta_softplus: bool = ..., *,
                       return_last_state: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor] = ..., z: Optional[torch.Tensor] = ...,
                       delta_bias: Optional[torch.Tensor] = ..., delta_softplus: bool = ...,
                       return_last_state: bool = ...) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False
                       ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """y = selective scan of u (batch, dim, L); see SCAN.md. Returns y in u's dtype, plus the last state
    (batch, dim, N) in fp32 (fp64 for fp64 u) when ``return_last_state``."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_flag("delta_softplus", delta_softplus)
    check_flag("return_last_state", return_last_state)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    N = A.shape[1]
    uf = u.to(acc)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(acc)

    # Per-step views made once with unbind (whose backward is one stack), never by indexing an expanded (b, d, N, L)
    # tensor per step (whose backward would materialise that whole tensor L times).
    def steps(M):  # B or C -> list over t of a tensor broadcastable to (batch, dim, N)
        M = M.to(acc)
        if M.dim() == 2:
            return [M] * L
        if M.dim() == 3:
            return [m.unsqueeze(1) for m in M.unbind(-1)]
        return [m.repeat_interleave(dim // M.shape[1], dim=1) for m in M.unbind(-1)]

    Bs, Cs = steps(B), steps(C)
    dts, us = dt.unbind(-1), uf.unbind(-1)
    h = torch.zeros(batch, dim, N, dtype=acc, device=u.device)
    ys = []
    for t in range(L):
        dt_t = dts[t][..., None]  # (batch, dim, 1)
        h = torch.exp(dt_t * Af) * h + (dt_t * us[t][..., None]) * Bs[t]
        ys.append((h * Cs[t]).sum(-1))
    # L = 0: an empty y that still hangs off u and delta, so that a backward through it works (and gives zeros)
    y = torch.stack(ys, dim=-1) if ys else (uf + dt) * 0
    if D is not None:
        y = y + uf * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out


def selective_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                               z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                               dt_softplus: bool = False) -> torch.Tensor:
    """One decode step: state (batch, dim, N) is updated in place, y (batch, dim) in x's dtype is returned.
    B, C: (batch, N) or (batch, G, N). mamba_ssm's Mamba-2 head layout (state (batch, nheads, headdim, N)) works too,
    as in selective_state_update (see state_update_heads)."""
    if isinstance(state, torch.Tensor) and state.dim() == 4:
        check_flag("dt_softplus", dt_softplus)
        return state_update_heads(selective_state_update_ref, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    check_flag("dt_softplus", dt_softplus)
    acc = torch.float64 if x.dtype == torch.float64 or state.dtype == torch.float64 else torch.float32
    batch, dim, N = state.shape
    d = dt.to(acc)
    if dt_bias is not None:
        d = d + dt_bias.to(acc)
    if dt_softplus:
        d = F.softplus(d)
    xf = x.to(acc)
    Bf = expand_bc(B.to(acc), batch, dim, time=False)  # (batch, dim, N)
    Cf = expand_bc(C.to(acc), batch, dim, time=False)
    # a copy when autograd may save it: the in-place write below would otherwise change the saved old state
    # (dt or A requiring grad: "modified by an inplace operation" in backward)
    prev = state.to(acc, copy=True) if torch.is_grad_enabled() else state.to(acc)
    h = torch.exp(d[..., None] * A.to(acc)) * prev + (d * xf)[..., None] * Bf
    y = (h * Cf).sum(-1)
    if D is not None:
        y = y + xf * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    state.copy_(h.to(state.dtype))
    return y.to(x.dtype)


def random_scan_inputs(batch: int, dim: int, L: int, N: int, *, layout_B: str = "var", layout_C: str = "var",
                       groups: int = 1, dtype: torch.dtype = torch.float32, with_D: bool = True,
                       with_z: bool = True, with_bias: bool = True, device: Union[str, torch.device] = "cpu",
                       generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """Random, well-conditioned selective_scan inputs (as used by tests and benchmarks).

    layout_B / layout_C: "const" (dim, N), "var" (batch, N, L) or "group" (batch, groups, N, L). A is negative
    (a decaying state, as in Mamba's S4D-real init); u, delta, z, B and C take ``dtype``; A, D and delta_bias fp32
    (fp64 when dtype is fp64), as mamba_ssm keeps them.
    """
    g = generator
    pdt = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=pdt) * scale + shift).to(dt).to(device)

    def bc(layout):
        if layout == "const":
            return rnd(dim, N)
        if layout == "var":
            return rnd(batch, N, L)
        if layout == "group":
            return rnd(batch, groups, N, L)
        raise ValueError(f"layout: expected 'const', 'var' or 'group', got {layout!r}")

    out = {
        "u": rnd(batch, dim, L),
        "delta": (torch.rand(batch, dim, L, generator=g, dtype=pdt) * 0.5 + 0.01).to(dtype).to(device),
        "A": -(torch.rand(dim, N, generator=g, dtype=pdt) * 2 + 0.1).to(device),
        "B": bc(layout_B),
        "C": bc(layout_C),
    }
    if with_D:
        out["D"] = rnd(dim, dt=pdt)
    if with_z:
        out["z"] = rnd(batch, dim, L)
    if with_bias:
        out["delta_bias"] = (torch.rand(dim, generator=g, dtype=pdt) * 0.5 - 0.25).to(device)
    return out


# Test cases shared by every scan implementation's tests: (layout_B, layout_C, with_D, with_z, with_bias, softplus),
# covering each B/C layout pair and each optional input on and off.
SCAN_CASES = [
    ("const", "const", True, True, True, True),
    ("var", "var", True, True, True, True),
    ("group", "group", False, False, False, False),
    ("var", "group", True, False, True, False),
    ("group", "const", False, True, False, True),
    ("const", "var", True, True, False, False),
]


def check_scan_against_reference(fn, x: dict, *, softplus: bool, last: bool = True,
                                 dtype: Optional[torch.dtype] = None, seed: int = 0) -> None:
    """Test helper: run fn and the fp64 reference on the same inputs; compare y, the last state and every gradient
    (including the last state's) at the tolerance of the inputs' dtype (``dtype`` overrides it)."""
    dtype = dtype or x["u"].dtype

    def tol_dtype(t: torch.Tensor) -> torch.dtype:
        # an fp32 tensor next to fp16/bf16 ones (A, D, delta_bias as mamba_ssm keeps them, the fp32 state, an fp32
        # delta) is computed in fp32 from the same rounded inputs: hold it to fp32's tolerance, not to ``dtype``'s
        # (bf16's gradient tolerance, 0.2 + 0.2*|e|, let fp32 dA/dD/ddelta_bias computed in bf16 pass, 1e4x worse)
        return t.dtype if torch.finfo(t.dtype).eps < torch.finfo(dtype).eps else dtype

    a = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    r = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    y, h = fn(**a, delta_softplus=softplus, return_last_state=True)
    ye, he = selective_scan_ref(**r, delta_softplus=softplus, return_last_state=True)
    assert y.dtype == x["u"].dtype and y.shape == x["u"].shape
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(y, ye.to(y.dtype), dtype=dtype, family="scan", msg="y")
    _assert_close(h, he.to(h.dtype), dtype=tol_dtype(h), family="scan", msg="last_state")
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64) if last else torch.zeros(h.shape, dtype=torch.float64)
    ((y.double() * gy).sum() + (h.double() * gh).sum() * last).backward()
    ((ye * gy.to(y.dtype).double()).sum() + (he * gh).sum()).backward()
    for k in x:
        assert a[k].grad is not None, k
        assert a[k].grad.dtype == x[k].dtype and a[k].grad.shape == x[k].shape, k
        _assert_close(a[k].grad, r[k].grad.to(x[k].dtype), dtype=tol_dtype(x[k]), family="scan", grad=True,
                      msg=f"d{k}")


def check_scan_then_decode(scan_fn, step_fn, x: dict, split: int) -> None:
    """Test helper: scanning ``x[..., :split]`` with ``scan_fn`` and decoding the remaining steps one by one with
    ``step_fn`` from the returned state equals one whole scan (y and the last state), with softplus on."""
    whole, last = scan_fn(**x, delta_softplus=True, return_last_state=True)
    first, state = scan_fn(**{k: (v[..., :split] if v.dim() >= 3 else v) for k, v in x.items()},
                           delta_softplus=True, return_last_state=True)
    ys = [first]
    for t in range(split, x["u"].shape[-1]):
        ys.append(step_fn(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
                          x["z"][..., t], x["delta_bias"], True)[..., None])
    _assert_close(torch.cat(ys, -1), whole, family="scan")
    _assert_close(state, last, family="scan")


def check_state_update_against_reference(step_fn, N: int, layout_B: str, layout_C: str, dtype: torch.dtype,
                                        state_dtype: torch.dtype, device: Union[str, torch.device] = "cpu",
                                        seed: int = 15, batch: int = 3, dim: int = 6) -> None:
    """Test helper: ``step_fn`` (selective_state_update's signature) vs the reference on (batch, dim) (dim a
    multiple of 3) with B/C ``"var"`` (batch, N) in ``dtype`` or ``"group"`` (batch, 3, N) in fp32, D, z, dt_bias
    and softplus: y and the in-place state (dtypes kept), then without the optional inputs on a strided state
    (every other column of a bigger cache), whose other columns stay untouched."""
    g = torch.Generator().manual_seed(seed)
    b, G = batch, 3
    state = torch.randn(b, dim, N, generator=g).to(state_dtype)
    x, dt, z = (torch.randn(b, dim, generator=g).to(dtype) for _ in range(3))
    A = -torch.rand(dim, N, generator=g)
    mk = {"var": lambda: torch.randn(b, N, generator=g).to(dtype), "group": lambda: torch.randn(b, G, N, generator=g)}
    B, C = mk[layout_B](), mk[layout_C]()
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    state = state.to(device)
    args = [t.to(device) for t in (x, dt, A, B, C, D, z, bias)]
    wide = max(dtype, state_dtype, key=lambda t: torch.finfo(t).eps)
    s1, s2 = state.clone(), state.clone()
    y1 = step_fn(s1, *args, True)
    y2 = selective_state_update_ref(s2, *args, True)
    assert y1.dtype == dtype and s1.dtype == state_dtype
    _assert_close(y1, y2, dtype=dtype, family="scan")
    _assert_close(s1, s2, dtype=wide, family="scan")
    cache = torch.zeros(b, dim, 2 * N, dtype=state_dtype, device=device)
    cache[..., ::2] = state
    y3 = step_fn(cache[..., ::2], *args[:5])
    s4 = state.clone()
    _assert_close(y3, selective_state_update_ref(s4, *args[:5]), dtype=dtype, family="scan")
    _assert_close(cache[..., ::2], s4, dtype=wide, family="scan")
    assert (cache[..., 1::2] == 0).all()


def check_wide_delta_next_to_half_u(scan_fn, step_fn, device: Union[str, torch.device] = "cpu") -> None:
    """Test helper: an fp32 delta and z next to fp16 u (and an fp32 dt next to fp16 x in the decode step) are used at
    fp32, as the reference uses them: the fp32 last state and decode state match it at fp32 tolerance, y at fp16's;
    y and du keep u's dtype, ddelta delta's."""
    g = torch.Generator().manual_seed(31)
    x = random_scan_inputs(1, 4, 256, 4, dtype=torch.float16, generator=g)
    x["delta"] = torch.rand(1, 4, 256, generator=g) * 0.5 + 0.01
    x["z"] = x["z"].float()
    x = {k: v.to(device).requires_grad_() for k, v in x.items()}
    yr, hr = selective_scan_ref(**x, return_last_state=True)
    gr = torch.autograd.grad(hr.sum() + yr.float().sum(), [x["delta"], x["u"]])
    y, h = scan_fn(**x, return_last_state=True)
    assert y.dtype == torch.float16 and h.dtype == torch.float32
    _assert_close(h, hr, dtype=torch.float32, family="scan", msg="last_state")
    _assert_close(y, yr, dtype=torch.float16, family="scan", msg="y")
    dd, du = torch.autograd.grad(h.sum() + y.float().sum(), [x["delta"], x["u"]])
    assert dd.dtype == torch.float32 and du.dtype == torch.float16
    _assert_close(dd, gr[0], dtype=torch.float16, family="scan", grad=True, msg="ddelta")
    _assert_close(du, gr[1], dtype=torch.float16, family="scan", grad=True, msg="du")
    s0 = torch.randn(1, 4, 4, generator=g).to(device)
    args = [t.detach() for t in (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])]
    sr, s = s0.clone(), s0.clone()
    y_ref = selective_state_update_ref(sr, *args, dt_softplus=True)
    y = step_fn(s, *args, dt_softplus=True)
    assert y.dtype == torch.float16
    _assert_close(s, sr, dtype=torch.float32, family="scan", msg="state")
    _assert_close(y, y_ref, dtype=torch.float16, family="scan", msg="decode y")


def check_empty_scan(scan_fn, step_fn, batch: int, dim: int, N: int,
                     device: Union[str, torch.device] = "cpu") -> None:
    """Test helper: with batch, dim or N of 0 the scan gives empty y / last state of the right shapes with a working
    backward, and the decode step an empty y."""
    g = torch.Generator().manual_seed(32)
    leaf = lambda t: t.to(device).requires_grad_()  # noqa: E731
    u, delta = leaf(torch.randn(batch, dim, 5, generator=g)), leaf(torch.rand(batch, dim, 5, generator=g))
    A, D = leaf(-torch.rand(dim, N, generator=g)), leaf(torch.randn(dim, generator=g))
    B, C = (torch.randn(batch, N, 5, generator=g).to(device) for _ in range(2))
    y, h = scan_fn(u, delta, A, B, C, D, delta_softplus=True, return_last_state=True)
    assert y.shape == (batch, dim, 5) and h.shape == (batch, dim, N)
    (y.sum() + h.sum()).backward()
    assert u.grad.shape == u.shape and A.grad.shape == A.shape
    state = torch.zeros(batch, dim, N, device=device)
    y = step_fn(state, u[..., 0].detach(), delta[..., 0].detach(), A.detach(), B[..., 0], C[..., 0], D.detach())
    assert y.shape == (batch, dim)
