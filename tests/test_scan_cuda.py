"""Native CUDA selective scan (csrc/scan/scan_cuda_*.cu) vs the fp64 reference: forward, last state and every gradient
for every B/C layout, lengths around the 64-step checkpoint chunks, the time-split forward, dtypes, lane layouts
(N = 4 ... 128), strides, decode step, custom-op checks, dispatch, bad input. Tests marked ``cuda`` need a device
(tests/conftest.py skips them otherwise); the others run everywhere and check what a machine without a GPU reports."""
from __future__ import annotations

import logging

import pytest
import torch

import apt_kernels.ops.scan as scan_ops
from apt_kernels import selective_scan_fn, selective_state_update
from apt_kernels.backends import compiled_triton_status
from apt_kernels.ops.scan import cuda_status, selective_scan_cuda, selective_state_update_cuda
from apt_kernels.reference.scan import SCAN_CASES as CASES
from apt_kernels.reference.scan import (check_scan_against_reference, check_scan_then_decode,
                                        check_state_update_against_reference, random_scan_inputs, selective_scan_ref,
                                        selective_state_update_ref)
from apt_kernels.testing import assert_close

requires_compiled_triton = pytest.mark.skipif(not compiled_triton_status()[0],
                                              reason=compiled_triton_status()[1] or "triton")


def _gapped(t: torch.Tensor) -> torch.Tensor:
    """The same values with a stride-2 last dim (a view into a twice bigger buffer); differentiable."""
    big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    big[..., ::2] = t
    return big[..., ::2]


def on_cuda(fn, transform=None):
    """fn run on CUDA copies of CPU inputs, outputs back on the CPU, so that check_scan_against_reference compares
    against the fp64 reference on the CPU and the gradients flow back to the CPU leaves. ``transform`` edits the
    CUDA inputs (strides) before the call."""
    def run(**kw):
        d = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        if transform is not None:
            d = transform(d)
        y, last = fn(**d)
        return y.cpu(), last.cpu()
    return run


def _inputs(batch, dim, L, N, case, dtype=torch.float32, groups=2, seed=0):
    lb, lc, D, z, bias, _ = case
    return random_scan_inputs(batch, dim, L, N, layout_B=lb, layout_C=lc, groups=groups, dtype=dtype, with_D=D,
                              with_z=z, with_bias=bias, generator=torch.Generator().manual_seed(seed))


def _opcheck_bwd_with_transposed_A(x: dict) -> None:
    """opcheck of apt::selective_scan_bwd (fake vs real outputs, strides included) with a transposed A."""
    A = x["A"].t().contiguous().t()
    _, _, ck = torch.ops.apt.selective_scan_fwd(x["u"], x["delta"], A, x["B"], x["C"], x["D"], x["z"],
                                                x["delta_bias"], True, 64)
    torch.library.opcheck(torch.ops.apt.selective_scan_bwd.default,
                          (x["u"], x["delta"], A, x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                           torch.randn_like(x["u"]), None, ck, True, 64))


# ---------------------------------------------------------------------------------------------------------------
# on a CUDA device
@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N", [16, 4])
def test_cuda_matches_reference(case, N):
    dim = 6 if "group" in case[:2] else 7  # odd dim where no group has to divide it; G = 2 otherwise
    x = _inputs(2, dim, 65, N, case, seed=N)
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=case[5])


@pytest.mark.cuda
@pytest.mark.parametrize("L", [1, 63, 64, 65, 300, 2048])
def test_cuda_lengths(L):
    """Around the checkpoint chunk (64 steps) and long: with the automatic split over L (small batch x dim)."""
    x = _inputs(2, 5, L, 16, CASES[1], seed=L)
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=True)


@pytest.mark.cuda
@pytest.mark.parametrize("cps", [1, 2, 3, 100])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_cuda_forced_splits(cps, case, monkeypatch):
    """L = 300 is 5 chunks: 5, 3, 2 and 1 parallel pieces, forward and backward (each direction's pre-pass, the
    combine and the main pass), with a last-state gradient flowing through every piece."""
    monkeypatch.setattr(scan_ops, "CUDA_CHUNKS_PER_SPLIT", cps)
    x = _inputs(3, 6, 300, 16, case, groups=3, seed=cps)
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=case[5])


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_cuda_chunk_sizes(chunk, monkeypatch):
    monkeypatch.setattr(scan_ops, "CHUNK", chunk)
    x = _inputs(2, 6, 70, 8, CASES[3], seed=chunk)
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=False)


@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 3, 5, 8, 32, 33, 64, 100, 128])
def test_cuda_lane_layouts(N):
    """Every (lanes, states per lane) layout, with padding lanes when N is not a power of two."""
    x = _inputs(2, 6, 80, N, ("var", "group", True, True, True, True), groups=3, seed=N)
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [16, 4])
@pytest.mark.parametrize("L", [65, 2048])
def test_cuda_low_precision(dtype, N, L):
    """bf16/fp16 u/delta/z/B/C with fp32 A, D, delta_bias (mamba_ssm's mix), fp32 accumulation."""
    x = _inputs(2, 6, L, N, CASES[1], dtype=dtype, seed=N + L)
    assert x["A"].dtype == torch.float32
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=True)


@pytest.mark.cuda
def test_cuda_mixed_dtypes_and_grouped_lcm():
    """fp32 delta with fp16 u (delta is converted); B in 2 groups and C in 3 (blocks tile by lcm = 6)."""
    g = torch.Generator().manual_seed(3)
    x = random_scan_inputs(2, 12, 90, 16, dtype=torch.float16, layout_B="group", layout_C="group", groups=2,
                           generator=g)
    x["C"] = torch.randn(2, 3, 16, 90, generator=g).half()
    x["delta"] = x["delta"].float()
    check_scan_against_reference(on_cuda(selective_scan_cuda), x, softplus=True, dtype=torch.float16)


@pytest.mark.cuda
def test_cuda_non_contiguous():
    def strided(d):
        d = dict(d)
        for k in ("u", "delta", "z"):  # (batch, L, dim) storage seen as (batch, dim, L), then a gap along L
            d[k] = _gapped(d[k].transpose(1, 2).contiguous().transpose(1, 2))
        d["B"], d["C"], d["A"], d["D"] = _gapped(d["B"]), d["C"].transpose(-1, -2).contiguous().transpose(-1, -2), \
            d["A"].t().contiguous().t(), _gapped(d["D"])
        assert not any(d[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "A", "D"))
        return d

    x = _inputs(2, 6, 77, 4, CASES[3], groups=2, seed=11)
    x["z"] = torch.randn(2, 6, 77, generator=torch.Generator().manual_seed(12))
    check_scan_against_reference(on_cuda(selective_scan_cuda, strided), x, softplus=True)


@pytest.mark.cuda
def test_cuda_without_last_state_and_partial_grads():
    """return_last_state=False (no dlast in the backward), and gradients for only some inputs."""
    x = {k: v.cuda() for k, v in _inputs(2, 8, 130, 16, CASES[0], seed=14).items()}
    y = selective_scan_cuda(**x, delta_softplus=True)
    assert isinstance(y, torch.Tensor)
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), family="scan")
    u = x["u"].clone().requires_grad_()
    A = x["A"].clone().requires_grad_()
    selective_scan_cuda(**{**x, "u": u, "A": A}, delta_softplus=True).square().sum().backward()
    u2 = x["u"].double().requires_grad_()
    A2 = x["A"].double().requires_grad_()
    ref = {k: v.double() for k, v in x.items()}
    selective_scan_ref(**{**ref, "u": u2, "A": A2}, delta_softplus=True).square().sum().backward()
    assert_close(u.grad, u2.grad.float(), family="scan", grad=True)
    assert_close(A.grad, A2.grad.float(), family="scan", grad=True)


@pytest.mark.cuda
def test_cuda_benchmark_shape_and_repeatability():
    """The bench's Mamba block shape (batch 4, dim 1536, N 16, L 2048, one split): matches the reference on a slice
    of channels, and the atomics-summed gradients agree between two runs to fp32 rounding."""
    g = torch.Generator().manual_seed(21)
    x = random_scan_inputs(4, 1536, 2048, 16, dtype=torch.bfloat16, generator=g, device="cuda")
    y, last = selective_scan_cuda(**x, delta_softplus=True, return_last_state=True)
    sl = {k: (v[:, 100:104] if k in ("u", "delta", "z") else v[100:104] if k in ("A", "D", "delta_bias") else v)
          for k, v in x.items()}
    ye, le = selective_scan_ref(**{k: v.double() for k, v in sl.items()}, delta_softplus=True,
                                return_last_state=True)
    assert_close(y[:, 100:104], ye.to(y.dtype), dtype=torch.bfloat16, family="scan")
    assert_close(last[:, 100:104], le.float(), dtype=torch.bfloat16, family="scan")
    grads = []
    for _ in range(2):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        selective_scan_cuda(**leaves, delta_softplus=True).float().square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in x:  # atomics add in any order: fp32 rounding, then maybe one ulp of the gradient's dtype
        assert torch.isfinite(grads[0][k].float()).all(), k
        torch.testing.assert_close(grads[0][k].float(), grads[1][k].float(), rtol=1e-2, atol=1e-3, msg=k)


@pytest.mark.cuda
def test_cuda_int64_indexing():
    """batch*dim*L > 2^31 elements (fp16 u is 4.3 GB): offsets are int64 throughout. Checked on the last rows."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free device memory")
    batch, dim, L, N = 2, 1024 * 512 + 3, 2048, 4
    g = torch.Generator(device="cuda").manual_seed(5)
    u = torch.randn(batch, dim, L, device="cuda", dtype=torch.float16, generator=g)
    delta = (torch.rand(batch, dim, L, device="cuda", generator=g) * 0.5).half()
    A = -torch.rand(dim, N, device="cuda", generator=g) - 0.1
    B = torch.randn(batch, N, L, device="cuda", generator=g).half()
    C = torch.randn(batch, N, L, device="cuda", generator=g).half()
    y, last = selective_scan_cuda(u, delta, A, B, C, return_last_state=True)
    rows = slice(dim - 3, dim)
    ye, le = selective_scan_ref(u[:, rows].double(), delta[:, rows].double(), A[rows].double(), B.double(),
                                C.double(), return_last_state=True)
    assert_close(y[:, rows], ye.half(), dtype=torch.float16, family="scan")
    assert_close(last[:, rows], le.float(), dtype=torch.float16, family="scan")


@pytest.mark.cuda
@pytest.mark.parametrize("batch,dim", [(0, 4), (2, 0)])
def test_cuda_empty_batch_or_dim(batch, dim):
    """No rows with L > 64 (several chunks): empty y and last state, zero parameter gradients (the split heuristic
    once divided by the zero thread count)."""
    x = {k: v.cuda().requires_grad_() for k, v in _inputs(batch, dim, 130, 16, CASES[1], seed=23).items()}
    y, last = selective_scan_cuda(**x, delta_softplus=True, return_last_state=True)
    assert y.shape == (batch, dim, 130) and last.shape == (batch, dim, 16)
    (y.float().sum() + last.sum()).backward()
    for k, v in x.items():
        assert v.grad is not None and v.grad.shape == v.shape and not v.grad.any(), k


@pytest.mark.cuda
def test_cuda_side_stream():
    x = {k: v.cuda() for k, v in _inputs(2, 6, 100, 16, CASES[1], seed=22).items()}
    expect = selective_scan_ref(**x, delta_softplus=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = selective_scan_cuda(**x, delta_softplus=True)
    torch.cuda.current_stream().wait_stream(s)
    assert_close(y, expect, family="scan")


@pytest.mark.cuda
def test_cuda_graph_capture():
    """Forward, backward (whose shared-memory opt-in may be raised while capturing) and decode step captured in one
    CUDA graph and replayed: the same results as eager. Fails if a host call in the launchers is illegal while a
    stream is being captured."""
    x = {k: v.cuda() for k, v in _inputs(2, 6, 100, 16, CASES[1], seed=26).items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, 64)
    fwd, bwd = torch.ops.apt.selective_scan_fwd.default, torch.ops.apt.selective_scan_bwd.default
    dout = torch.randn_like(x["u"])
    step = tuple(t[..., 0].contiguous() for t in (x["u"], x["delta"])) + (x["A"],) + \
        tuple(t[..., 0].contiguous() for t in (x["B"], x["C"])) + (x["D"], x["z"][..., 0].contiguous(), x["delta_bias"])
    state0 = torch.randn(2, 6, 16, device="cuda")
    y0, l0, ck0 = fwd(*args)
    g0 = bwd(*args[:8], dout, l0, ck0, True, 64)
    s0 = state0.clone()
    ys0 = selective_state_update_cuda(s0, *step, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        _, l1, ck1 = fwd(*args)
        bwd(*args[:8], dout, l1, ck1, True, 64)
    torch.cuda.current_stream().wait_stream(side)
    state = state0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, last, ck = fwd(*args)
        grads = bwd(*args[:8], dout, last, ck, True, 64)
        ys = selective_state_update_cuda(state, *step, True)
    state.copy_(state0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(last, l0, rtol=0, atol=0)
    torch.testing.assert_close(ys, ys0, rtol=0, atol=0)
    torch.testing.assert_close(state, s0, rtol=0, atol=0)
    for a, b in zip(grads, g0):  # atomics: any order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: every launch goes to cuda:1 (the launchers' device guard, the
    stream of cuda:1), and the current device is cuda:0 again after."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = _inputs(2, 6, 130, 16, CASES[1], seed=27)

    def run(**kw):
        d = {k: (v.to("cuda:1") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        y, last = selective_scan_cuda(**d)
        return y.cpu(), last.cpu()

    with torch.cuda.device(0):
        check_scan_against_reference(run, x, softplus=True)
        state = torch.randn(2, 6, 16, device="cuda:1")
        ref = state.cpu().clone()
        args = [x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"], x["z"][..., 0],
                x["delta_bias"]]
        y = selective_state_update_cuda(state, *[t.to("cuda:1") for t in args], True)
        assert_close(y.cpu(), selective_state_update_ref(ref, *args, True), family="scan")
        assert_close(state.cpu(), ref, family="scan")
        assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("lb,lc", [("var", "var"), ("group", "var"), ("var", "group")])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("N", [16, 5, 64])
def test_cuda_state_update_matches_reference(lb, lc, dtype, state_dtype, N):
    check_state_update_against_reference(selective_state_update_cuda, N, lb, lc, dtype, state_dtype, device="cuda",
                                         seed=15 + N)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", pytest.param("triton", marks=requires_compiled_triton)])
def test_gpu_chunked_scan_carries_state(impl):
    """Scanning the first part, then decoding the rest from the returned state, equals one whole scan (native CUDA
    and compiled Triton)."""
    scan, step = {"cuda": (selective_scan_cuda, selective_state_update_cuda),
                  "triton": (scan_ops.selective_scan_triton, scan_ops.selective_state_update_triton)}[impl]
    x = {k: v.cuda() for k, v in _inputs(2, 4, 150, 8, ("group", "var", True, True, True, True), seed=16).items()}
    check_scan_then_decode(scan, step, x, 131)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", pytest.param("triton", marks=requires_compiled_triton)])
def test_gpu_wide_delta_and_empty_inputs(impl):
    """fp32 delta/z/dt next to fp16 u/x are used at fp32 (not rounded to fp16); zero batch, dim or N give empty
    outputs with a working backward (native CUDA and compiled Triton)."""
    from apt_kernels.reference.scan import check_empty_scan, check_wide_delta_next_to_half_u

    scan, step = {"cuda": (selective_scan_cuda, selective_state_update_cuda),
                  "triton": (scan_ops.selective_scan_triton, scan_ops.selective_state_update_triton)}[impl]
    check_wide_delta_next_to_half_u(scan, step, device="cuda")
    for shape in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        check_empty_scan(scan, step, *shape, device="cuda")


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x = {k: v.cuda() for k, v in _inputs(2, 4, 70, 4, CASES[1], seed=17).items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, 64)
    torch.library.opcheck(torch.ops.apt.selective_scan_fwd.default, args)
    targs = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.apt.selective_scan_fwd.default, targs)
    s = torch.randn(2, 4, 4, device="cuda")
    torch.library.opcheck(torch.ops.apt.selective_state_update.default,
                          (s, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"],
                           None, None, True))
    f = torch.compile(selective_scan_cuda, backend="eager", fullgraph=True)
    assert_close(f(**x), selective_scan_ref(**x), family="scan")


@pytest.mark.cuda
def test_cuda_bwd_fake_strides_with_transposed_A():
    """The backward's fake gives a contiguous dA, as the kernel does, also for a transposed A (it copied A's
    strides)."""
    _opcheck_bwd_with_transposed_A({k: v.cuda() for k, v in _inputs(2, 4, 70, 4, CASES[1], seed=24).items()})


@pytest.mark.cuda
def test_cuda_dispatch_and_provider(caplog):
    from apt.core import registry

    x = {k: v.cuda() for k, v in _inputs(1, 2, 5, 4, CASES[1], seed=18).items()}
    with caplog.at_level(logging.DEBUG, logger="apt_kernels.ops.scan"):
        y = selective_scan_fn(**x)
        s = torch.zeros(1, 2, 4, device="cuda")
        selective_state_update(s, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])
    assert "selective_scan_fn: using cuda" in caplog.text
    assert "selective_state_update: using cuda" in caplog.text
    assert_close(y, selective_scan_ref(**x), family="scan")
    info = registry.get_info("scan", "cuda")
    assert info.available and info.priority == 30
    prov = registry.get("scan", "cuda")
    assert prov.supports(**x) == []
    assert registry.select("scan", **x).name == "cuda"
    assert_close(prov.selective_scan_fn(**x, delta_softplus=True), selective_scan_ref(**x, delta_softplus=True),
                 family="scan")
    assert any("float64" in r for r in prov.supports(**{k: v.double() for k, v in x.items()}))
    assert any("N=200" in r for r in prov.supports(A=torch.zeros(2, 200, device="cuda")))
    assert any("u: cpu tensor" in r for r in prov.supports(u=x["u"].cpu()))
    # N > 128 on CUDA: selective_scan_fn goes to Triton (or the reference), not to the CUDA kernels
    big = {k: v.cuda() for k, v in _inputs(1, 2, 5, 130, CASES[1], seed=19).items()}
    with caplog.at_level(logging.DEBUG, logger="apt_kernels.ops.scan"):
        caplog.clear()
        selective_scan_fn(**big)
    assert "selective_scan_fn: using cuda" not in caplog.text


@pytest.mark.cuda
def test_cuda_bad_input_is_a_clear_error(monkeypatch):
    x = {k: v.cuda() for k, v in _inputs(2, 4, 5, 3, CASES[1]).items()}
    with pytest.raises(TypeError, match="u: the CUDA scan takes float32/float16/bfloat16"):
        selective_scan_cuda(**{k: v.double() for k, v in x.items()})
    with pytest.raises(ValueError, match="u: the CUDA scan needs CUDA tensors"):
        selective_scan_cuda(**{k: v.cpu() for k, v in x.items()})
    with pytest.raises(ValueError, match=r"A: the CUDA scan takes N <= 128 states, got N=129"):
        selective_scan_cuda(**{k: v.cuda() for k, v in _inputs(1, 2, 3, 129, CASES[1]).items()})
    with pytest.raises(ValueError, match=r"C: number of groups 3"):
        selective_scan_cuda(**{**x, "C": torch.randn(2, 3, 3, 5, device="cuda")})
    with pytest.raises(ValueError, match="device"):
        selective_scan_cuda(**{**x, "D": x["D"].cpu()})
    monkeypatch.setattr(scan_ops, "CHUNK", 65)
    with pytest.raises(ValueError, match="chunk: the CUDA scan takes 1 <= chunk <= 64"):
        selective_scan_cuda(**x)
    with pytest.raises(TypeError, match="state: the CUDA decode step takes"):
        selective_state_update_cuda(torch.zeros(2, 4, 3, device="cuda", dtype=torch.float64), x["u"][..., 0],
                                    x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])


@pytest.mark.cuda
def test_cuda_native_module_checks_its_inputs():
    from apt_kernels._native import current_stream, native_module, view

    m = native_module()
    dev = torch.device("cuda")
    st = current_stream(dev)
    u = torch.randn(2, 4, 5, device=dev)
    A, B = torch.randn(4, 3, device=dev), torch.randn(2, 1, 5, 3, device=dev)
    out, last, ck = torch.empty_like(u), torch.empty(2, 4, 3, device=dev), torch.empty(2, 4, 1, 3, device=dev)
    ok = [view(u), view(u), view(A), view(B), view(B), None, None, None, view(out), view(last), view(ck), None, None,
          False, 64, 1, st]
    m.selective_scan_fwd_cuda(*ok)  # the well-formed call works

    def bad(i, v, exc, match):
        args = list(ok)
        args[i] = v
        with pytest.raises(exc, match=match):
            m.selective_scan_fwd_cuda(*args)

    bad(3, view(torch.randn(2, 1, 5, 4, device=dev)), ValueError, "B: expected size 3 in dim 3")
    bad(2, view(A.double()), TypeError, "A: expected dtype float32")
    bad(2, view(A.t().contiguous().t()), ValueError, "A: expected a contiguous tensor")
    bad(1, view(u.half()), TypeError, "delta: expected dtype float32")
    bad(0, view(u.cpu()), ValueError, "u: expected a CUDA tensor")
    bad(10, view(torch.empty(2, 4, 2, 3, device=dev)), ValueError, "checkpoints: expected size 1 in dim 2")
    bad(14, 0, ValueError, "chunk: the CUDA scan takes 1 <= chunk <= 64")
    bad(15, 0, ValueError, "chunks_per_split: expected >= 1")
    split = list(ok)  # chunk 2: 3 chunks, one per split, which needs the workspace
    split[10], split[14] = view(torch.empty(2, 4, 3, 3, device=dev)), 2
    with pytest.raises(ValueError, match="seg_state, seg_dt: needed with 3 splits"):
        m.selective_scan_fwd_cuda(*split)
    split[11], split[12] = view(torch.empty(8, 2, 3, device=dev)), view(torch.empty(8, 3, device=dev))
    with pytest.raises(ValueError, match="seg_dt: expected size 2 in dim 1"):
        m.selective_scan_fwd_cuda(*split)
    split[12] = view(torch.empty(8, 2, device=dev))
    m.selective_scan_fwd_cuda(*split)
    bad(4, view(torch.randn(2, 3, 5, 3, device=dev)), ValueError, "C: number of groups 3 must divide dim=4")
    bad(2, view(torch.randn(4, 129, device=dev)), ValueError, "A: the CUDA scan takes 1 <= N <= 128")


@pytest.mark.cuda
def test_cuda_native_backward_checks_its_split_workspace():
    """The backward binding: a split over time needs the (rows, splits-1, N) adjoints and (rows, splits-1) dt sums;
    each split count gives the same gradients as one piece."""
    from apt_kernels._native import current_stream, native_module, view

    m = native_module()
    dev = torch.device("cuda")
    st = current_stream(dev)
    g = torch.Generator(device=dev).manual_seed(3)
    u, delta, dout = (torch.randn(2, 4, 6, device=dev, generator=g) for _ in range(3))
    A = -torch.rand(4, 3, device=dev, generator=g)
    B, C = torch.randn(2, 1, 6, 3, device=dev, generator=g), torch.randn(4, 3, device=dev, generator=g)
    ck = torch.empty(2, 4, 3, 3, device=dev)  # chunk 2: 3 chunks
    last = torch.empty(2, 4, 3, device=dev)
    m.selective_scan_fwd_cuda(view(u), view(delta), view(A), view(B), view(C), None, None, None,
                              view(torch.empty_like(u)), view(last), view(ck), None, None, False, 2, 3, st)
    dlast = torch.randn(2, 4, 3, device=dev, generator=g)

    def bwd(cps, seg_state, seg_dt):
        out = [torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)]
        m.selective_scan_bwd_cuda(view(u), view(delta), view(A), view(B), view(C), None, None, None, view(dout),
                                  view(dlast), view(ck), *map(view, out[:2]), *map(view, out[2:]), None, None, None,
                                  view(seg_state), view(seg_dt), False, 2, cps, st)
        return out

    whole = bwd(3, None, None)
    with pytest.raises(ValueError, match="seg_state, seg_dt: needed with 3 splits"):
        bwd(1, None, None)
    with pytest.raises(ValueError, match="seg_state: expected size 3 in dim 2"):
        bwd(1, torch.empty(8, 2, 4, device=dev), torch.empty(8, 2, device=dev))
    with pytest.raises(ValueError, match="chunks_per_split: expected >= 1"):
        bwd(0, None, None)
    for cps in (1, 2):
        splits = -(-3 // cps)
        got = bwd(cps, torch.empty(8, splits - 1, 3, device=dev), torch.empty(8, splits - 1, device=dev))
        for name, a, b in zip(("du", "ddelta", "dA", "dB", "dC"), got, whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name, c=cps: f"{n} cps={c}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# everywhere (no device needed)
def test_without_a_device_the_cuda_provider_says_why(monkeypatch, caplog):
    """A module built with CUDA on a machine torch sees no GPU on: the cuda provider is unavailable with the reason,
    and the CPU path still runs cpu_native."""
    from apt.core import registry
    from apt_kernels._native import native_module, native_status

    if not native_status()[0]:
        pytest.skip(native_status()[1])
    monkeypatch.setattr(native_module(), "with_cuda", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_status() == (False, "torch reports no CUDA device")
    info = registry.get_info("scan", "cuda")
    assert not info.available and info.reason == "torch reports no CUDA device"
    x = random_scan_inputs(1, 3, 6, 4, generator=torch.Generator().manual_seed(20))
    with caplog.at_level(logging.DEBUG, logger="apt_kernels.ops.scan"):
        y = selective_scan_fn(**x, delta_softplus=True)
    assert "selective_scan_fn: using cpu_native" in caplog.text
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), family="scan")
    assert registry.select("scan", **x).name == "cpu_native"
    with pytest.raises(RuntimeError, match="selective_scan_cuda: torch reports no CUDA device"):
        selective_scan_cuda(**x)
    with pytest.raises(RuntimeError, match="selective_state_update_cuda: torch reports no CUDA device"):
        selective_state_update_cuda(torch.zeros(1, 3, 4), x["u"][..., 0], x["delta"][..., 0], x["A"],
                                    x["B"][..., 0], x["C"][..., 0])


def test_cuda_provider_reports_a_reason_here():
    from apt.core import registry

    info = registry.get_info("scan", "cuda")
    ok, why = cuda_status()
    assert info.available == ok and info.reason == why
    if not ok:
        assert why, "an unavailable cuda provider must say why"


def test_cuda_bindings_reject_cpu_tensors():
    from apt_kernels._native import native_module, native_status, view

    if not native_status()[0] or not getattr(native_module(), "with_cuda", False):
        pytest.skip("apt_kernels._C built without CUDA")
    m = native_module()
    assert "scan_cuda" in list(m.families)
    u = torch.randn(2, 4, 5)
    A, B = torch.randn(4, 3), torch.randn(2, 1, 5, 3)
    with pytest.raises(ValueError, match="u: expected a CUDA tensor"):
        m.selective_scan_fwd_cuda(view(u), view(u), view(A), view(B), view(B), None, None, None, view(u),
                                  view(torch.empty(2, 4, 3)), view(torch.empty(2, 4, 1, 3)), None, None, False, 64, 1,
                                  0)
    gA, gB = torch.zeros(4, 3), torch.zeros(2, 1, 5, 3)
    with pytest.raises(ValueError, match="u: expected a CUDA tensor"):
        m.selective_scan_bwd_cuda(view(u), view(u), view(A), view(B), view(B), None, None, None, view(u), None,
                                  view(torch.empty(2, 4, 1, 3)), view(u), view(u), view(gA), view(gB), view(gB), None,
                                  None, None, None, None, False, 64, 1, 0)
    with pytest.raises(ValueError, match="state: expected a CUDA tensor"):
        m.selective_state_update_cuda(view(torch.zeros(2, 4, 3)), view(u[..., 0]), view(u[..., 0]), view(A),
                                      view(B[:, :, :1]), view(B[:, :, :1]), None, None, None, view(u[..., 0]), False,
                                      0)


def test_bwd_fake_matches_the_kernels_strides():
    """The backward's fake (shared by the CPU and CUDA kernels) returns contiguous parameter gradients, as both kernels
    do: empty_like(A) kept a transposed A's strides, a mismatch torch.compile asserts on."""
    from apt_kernels.ops.scan import cpu_status

    if not cpu_status()[0]:
        pytest.skip(cpu_status()[1])
    _opcheck_bwd_with_transposed_A(_inputs(2, 4, 10, 3, CASES[1], seed=25))


def test_decode_dispatch_skips_cuda_for_an_fp64_state(monkeypatch):
    """selective_state_update on CUDA with an fp64 state: not the CUDA kernel, which raises TypeError for it."""
    from types import SimpleNamespace

    monkeypatch.setattr(scan_ops, "cuda_status", lambda device=None: (True, ""))
    monkeypatch.setattr(scan_ops, "triton_status", lambda: (False, "no"))
    x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert scan_ops._choose_step(x, 16, torch.float32)[0] == "cuda"
    assert scan_ops._choose_step(x, 16, torch.bfloat16)[0] == "cuda"
    assert scan_ops._choose_step(x, 16, torch.float64)[0] == "reference"


def test_split_heuristic(monkeypatch):
    """Time is split only when batch x dim x lanes leaves the GPU underused; a forced value wins."""
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    dev = torch.device("cuda")
    assert scan_ops._cuda_lanes(16) == 16 and scan_ops._cuda_lanes(3) == 4 and scan_ops._cuda_lanes(100) == 32
    nch = 32  # L = 2048
    assert scan_ops._cuda_chunks_per_split(4 * 1536, 16, nch, dev) == nch  # the bench shape: one piece
    cps = scan_ops._cuda_chunks_per_split(64, 16, nch, dev)  # 1024 threads on 132 SMs: split
    assert 1 <= cps < nch
    assert scan_ops._cuda_chunks_per_split(64, 16, 1, dev) == 1
    assert scan_ops._cuda_chunks_per_split(0, 16, nch, dev) == nch  # batch or dim 0: no split (was a ZeroDivisionError)
    monkeypatch.setattr(scan_ops, "CUDA_CHUNKS_PER_SPLIT", 3)
    assert scan_ops._cuda_chunks_per_split(4 * 1536, 16, nch, dev) == 3


# ---------------------------------------------------------------------------------------------------------------
# the compiled Triton scan on the same device (tests/test_scan_triton.py runs it only in the CPU interpreter)


@pytest.mark.cuda
@requires_compiled_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("L", [1, 65, 2048])
def test_compiled_triton_matches_reference(case, L):
    from apt_kernels.ops.scan import selective_scan_triton

    dim = 6 if "group" in case[:2] else 7
    x = _inputs(2, dim, L, 16, case, seed=L)
    check_scan_against_reference(on_cuda(selective_scan_triton), x, softplus=case[5])


@pytest.mark.cuda
@requires_compiled_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_triton_half_dtypes(dtype):
    from apt_kernels.ops.scan import selective_scan_triton

    x = _inputs(2, 8, 130, 16, CASES[1], dtype=dtype, seed=3)
    check_scan_against_reference(on_cuda(selective_scan_triton), x, softplus=True)

