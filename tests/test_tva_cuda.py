"""Fused TVA attention on a CUDA device: the native CUDA kernels (csrc/tva/tva_cuda.cu) and the compiled Triton kernel
vs the reference, forward and every gradient, plus a peak-memory check; the GPU tests (marked ``cuda``) are skipped
without a GPU. Also the native op's fake (meta) outputs and the no-query edge case, which run on the CPU build."""
from __future__ import annotations

import pytest
import torch

from apt_kernels import backends
from apt_kernels.reference.tva import check_tva_against_reference, random_tva_inputs, tva_attention_ref
from apt_kernels.testing import assert_close

cuda = pytest.mark.cuda

MASKS = [(True, None, 0, False, 0), (True, None, 0, True, 40), (True, 50, 3, True, 0), (False, None, 0, True, 7),
         (False, 33, 1, False, 0), (False, 6, 130, False, 0)]  # the last: sinks past the window's right edge


def _impls():
    from apt_kernels.ops.tva import impl_status

    out = []
    for impl in ("cuda", "triton"):
        ok, why = impl_status(impl, torch.device("cuda"))
        if impl == "triton" and backends.triton_interpret():
            ok, why = False, "TRITON_INTERPRET=1 is set in this process"
        out.append(pytest.param(impl, marks=pytest.mark.skipif(not ok, reason=why or "unavailable")))
    return out


def _compare(impl, inp, dtype, **kw):
    from apt_kernels.ops.tva import tva_attention

    check_tva_against_reference(lambda **a: tva_attention(**a, impl=impl), inp, dtype, msg=impl, **kw)


@cuda
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("causal,window,sinks,pad,extra", MASKS)
def test_cuda_matches_reference(impl, dtype, D, causal, window, sinks, pad, extra):
    inp = random_tva_inputs(B=2, H=3, Tq=150, Tk=150 + extra, D=D, dtype=dtype, device="cuda", pad=pad,
                            coef_tensor=True, requires_grad=True, seed=D + extra)
    _compare(impl, inp, dtype, causal=causal, window=window, sinks=sinks)


@cuda
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,window,sinks,Tq", [(True, None, 0, 1024), (True, 300, 0, 900), (False, 300, 64, 1000)])
def test_cuda_long_sequences_interior_tiles(impl, dtype, causal, window, sinks, Tq):
    """T 1024: most tiles lie wholly inside the causal/window band (the CUDA kernels skip their per-element mask)."""
    inp = random_tva_inputs(B=2, H=2, Tq=Tq, Tk=1024, D=128, dtype=dtype, device="cuda", coef_tensor=True,
                            requires_grad=True, seed=Tq)
    _compare(impl, inp, dtype, causal=causal, window=window, sinks=sinks)


@cuda
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("go_layout", ["expanded", "transposed"])
def test_cuda_strided_output_gradient(impl, go_layout):
    """dO with stride 0 over time (from o.sum(2)) or time innermost: the kernels read it through its strides."""
    inp = random_tva_inputs(B=2, H=2, Tq=100, Tk=130, D=64, dtype=torch.float16, device="cuda", pad=True,
                            coef_tensor=True, requires_grad=True, seed=11)
    _compare(impl, inp, torch.float16, window=40, sinks=2, go_layout=go_layout)


@cuda
@pytest.mark.parametrize("impl", _impls())
def test_cuda_decode_and_fully_masked_rows(impl):
    inp = random_tva_inputs(B=2, H=2, Tq=1, Tk=300, D=64, device="cuda", pad=True, coef_tensor=True,
                            requires_grad=True)
    _compare(impl, inp, torch.float32, window=64, sinks=4)
    inp = random_tva_inputs(B=2, H=2, Tq=40, D=64, device="cuda", pad=True, coef_tensor=True, requires_grad=True)
    inp["key_padding_mask"] = inp["key_padding_mask"].clone()
    inp["key_padding_mask"][0] = True
    _compare(impl, inp, torch.float32)


@cuda
@pytest.mark.parametrize("impl", _impls())
def test_cuda_no_score_matrix(impl):
    from apt_kernels.ops.tva import tva_attention

    T = 16384  # one (T, T) fp32 matrix per head would be 1 GiB
    inp = random_tva_inputs(B=1, H=2, Tq=T, D=64, dtype=torch.float16, device="cuda", coef_tensor=True,
                            requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tva_attention(**inp, impl=impl).sum().backward()
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    assert grown < 64 * 2**20, f"peak grew by {grown / 2**20:.1f} MiB"


def _transposed_inputs(B, H, T, D, dtype, device, seed=0):
    """q, k, v, delta as (B, H, T, D) views of (B, T, ..., H, D) storage (what a fused qkv projection gives), gate a
    permuted (B, H, T) tensor, key_padding_mask a strided slice: every input non-contiguous."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, 4, H, D, generator=g).to(device=device, dtype=dtype)
    q, k, v, delta = (base[:, :, i].transpose(1, 2).requires_grad_(True) for i in range(4))
    gate = torch.rand(B, H, T, generator=g).to(device=device, dtype=dtype).permute(0, 2, 1).requires_grad_(True)
    kpm = torch.zeros(B, 2 * T, dtype=torch.bool)
    kpm[0, 2 * (T - 3):] = True  # keys T-3.. of batch 0 padded (every other column is read)
    kpm[-1, :4] = True
    coef = torch.tensor(0.41, device=device).requires_grad_(True)
    inp = dict(q=q, k=k, v=v, delta=delta, gate=gate, coef=coef, key_padding_mask=kpm.to(device)[:, ::2])
    assert not any(t.is_contiguous() for t in (q, k, v, delta, gate, inp["key_padding_mask"]))
    return inp


def _native_ops_on(device):
    from apt_kernels.ops.tva import impl_status

    impl = "cpu_native" if device == "cpu" else "cuda"
    ok, why = impl_status(impl, torch.device(device))
    if not ok:
        pytest.skip(why)


def test_native_fake_outputs_match_real_strides():
    """The fake (meta) implementations must give the real ops' (contiguous) output strides for a transposed q,
    or torch.compile plans the wrong layout (opcheck's faketensor test)."""
    _native_ops_on("cpu")
    from apt_kernels.ops.tva import _native_bwd_op, _native_fwd_op

    inp = _transposed_inputs(1, 2, 9, 8, torch.float32, "cpu")
    args = (inp["q"], inp["k"], inp["v"], inp["delta"], inp["gate"], inp["coef"], True, 3, 1,
            inp["key_padding_mask"], 0.3, True)
    torch.library.opcheck(_native_fwd_op, args)
    o, lse, attn = _native_fwd_op(*args)
    assert attn.shape == o.shape and attn.is_contiguous()  # saved for the backward (training with delta)
    det = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]]
    bargs = (torch.randn_like(o), *det[:3], attn.detach(), lse.detach(), *det[3:])
    torch.library.opcheck(_native_bwd_op, bargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_native_no_queries(device):
    """Tq = 0 < Tk: empty output, and dk = dv = 0 (the backward must still write them)."""
    _native_ops_on(device)
    from apt_kernels.ops.tva import tva_attention

    impl = "cpu_native" if device == "cpu" else "cuda"
    q = torch.randn(2, 2, 0, 32, device=device, requires_grad=True)
    k = torch.randn(2, 2, 70, 32, device=device, requires_grad=True)
    v = torch.randn(2, 2, 70, 32, device=device, requires_grad=True)
    delta = torch.randn(2, 2, 0, 32, device=device, requires_grad=True)
    gate = torch.rand(2, 0, 2, device=device, requires_grad=True)
    out = tva_attention(q, k, v, delta=delta, gate=gate, coef=0.3, impl=impl)
    assert out.shape == (2, 2, 0, 32)
    gq, gk, gv = torch.autograd.grad(out.sum(), [q, k, v])
    assert gq.shape == q.shape and torch.equal(gk, torch.zeros_like(k)) and torch.equal(gv, torch.zeros_like(v))


@cuda
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_noncontiguous_inputs(impl, dtype):
    """The kernels read every input through its strides (no .contiguous() in Python): transposed q/k/v/delta, a
    permuted gate, a strided padding mask, a non-contiguous grad_o."""
    from apt_kernels.ops.tva import tva_attention

    inp = _transposed_inputs(2, 3, 77, 64, dtype, "cuda", seed=3)
    _compare(impl, inp, dtype, window=20, sinks=2)
    _compare(impl, inp, dtype, causal=False)
    out = tva_attention(**inp, impl=impl)
    go = torch.randn(out.shape[::-1], device="cuda", dtype=dtype).permute(3, 2, 1, 0)  # non-contiguous grad
    got = torch.autograd.grad(out, [inp["q"], inp["k"]], go)
    ref_inp = {k: (v.detach().float().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v) for k, v in inp.items()}
    exp = torch.autograd.grad(tva_attention_ref(**ref_inp), [ref_inp["q"], ref_inp["k"]], go.float())
    for g, e in zip(got, exp):
        assert_close(g, e.to(dtype), dtype=dtype, family="attention", grad=True)


@cuda
@pytest.mark.parametrize("impl", _impls())
def test_cuda_more_than_65535_heads(impl):
    """B·H = 65600 > gridDim.y's 65535: the grid must not put batch·head on axis 1 or 2."""
    inp = random_tva_inputs(B=2, H=32800, Tq=5, Tk=9, D=32, device="cuda", pad=True, coef_tensor=True,
                            requires_grad=True, seed=11)
    _compare(impl, inp, torch.float32)


@cuda
@pytest.mark.parametrize("impl", _impls())
def test_cuda_block_edges_and_sink_blocks(impl):
    """Lengths around the 32/64-row tiles, Tq < Tk, a window whose band starts mid-block and sinks spanning a
    block: every key-block range (sink blocks, skipped blocks, band) and partial tile."""
    for T, extra, window, sinks in ((63, 1, 17, 33), (64, 0, 64, 1), (65, 31, 5, 40), (129, 64, 96, 0)):
        inp = random_tva_inputs(B=1, H=2, Tq=T, Tk=T + extra, D=32, device="cuda", pad=True, coef_tensor=True,
                                requires_grad=True, seed=T)
        _compare(impl, inp, torch.float32, window=window, sinks=sinks)
        _compare(impl, inp, torch.float32, causal=False, window=window, sinks=sinks)


@cuda
@pytest.mark.parametrize("impl", _impls())
def test_cuda_side_stream_graph_and_current_device(impl):
    """Every launch goes on torch's current stream: the op runs on a side stream and inside a CUDA graph capture
    (a launch on another stream breaks the capture), and it leaves torch's current device unchanged."""
    from apt_kernels.ops.tva import tva_attention

    inp = random_tva_inputs(B=2, H=2, Tq=96, D=64, device="cuda", pad=True, coef_tensor=True, requires_grad=True)
    inp["coef"] = inp["coef"].detach().float()  # a device fp32 coef: nothing to copy during capture
    exp = tva_attention_ref(**inp, window=40, sinks=2).detach()
    dev = torch.cuda.current_device()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = tva_attention(**inp, window=40, sinks=2, impl=impl)
        (gq,) = torch.autograd.grad(out.sum(), [inp["q"]])
    torch.cuda.current_stream().wait_stream(side)
    assert torch.cuda.current_device() == dev
    assert_close(out.detach(), exp, family="attention")
    (eq,) = torch.autograd.grad(tva_attention_ref(**inp, window=40, sinks=2).sum(), [inp["q"]])
    assert_close(gq, eq, family="attention", grad=True)
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    with torch.cuda.stream(side):
        tva_attention(**plain, window=40, sinks=2, impl=impl)  # warm-up (kernel loading) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tva_attention(**plain, window=40, sinks=2, impl=impl)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, exp, family="attention")


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device_keeps_current_device():
    from apt_kernels.ops.tva import impl_status, tva_attention

    ok, why = impl_status("cuda", torch.device("cuda:1"))
    if not ok:
        pytest.skip(why)
    torch.cuda.set_device(0)
    inp = random_tva_inputs(B=1, H=2, Tq=70, D=64, device="cuda:1", coef_tensor=True, requires_grad=True)
    out = tva_attention(**inp, impl="cuda")
    (gq,) = torch.autograd.grad(out.sum(), [inp["q"]])
    assert torch.cuda.current_device() == 0
    assert_close(out, tva_attention_ref(**inp), family="attention")
    (eq,) = torch.autograd.grad(tva_attention_ref(**inp).sum(), [inp["q"]])
    assert_close(gq, eq, family="attention", grad=True)
