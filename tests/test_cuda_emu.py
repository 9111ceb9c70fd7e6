"""The CUDA kernels (csrc/*/*.cu) on this machine's CPU, through the emulator of tests/cuda_emu: the same sources,
launches rewritten, compiled by the host compiler into ``_C_cuda_emu``, each CUDA thread a fiber (see
tests/cuda_emu/include/apt_cuda_emu.h for what it models and checks). The cuda providers' own Python glue runs on
CPU tensors with the module, the device checks and the device properties swapped (fixture ``emulated``), and their
results are compared with the references as tests/test_*_cuda.py compare them on a GPU.

What this proves without a GPU: the kernels' indexing, tiling, time splits, barriers, shuffles and atomics, the
launch configurations, the bindings' checks and the Python glue. What it does not: speed, nvcc-specific code
generation, memory outside the tensors, warp-synchronous code between barriers."""
import importlib.util
import types
from pathlib import Path
from typing import Optional

import pytest
import torch

import apt_kernels.ops.moe as moe_ops
import apt_kernels.ops.scan as scan_ops
import apt_kernels.ops.tva as tva_ops
from apt_kernels._native import DTYPE_CODES
from apt_kernels.reference.moe import check_moe_impl, check_moe_nonfinite, check_same_routing
from apt_kernels.reference.scan import SCAN_CASES as CASES
from apt_kernels.reference.scan import (check_empty_scan, check_scan_against_reference, check_scan_then_decode,
                                        check_state_update_against_reference, check_wide_delta_next_to_half_u,
                                        random_scan_inputs, selective_scan_ref)
from apt_kernels.reference.tva import check_tva_against_reference, random_tva_inputs
from apt_kernels.reference.tva import (check_gqa_saves_kv_unrepeated, check_grads_ignore_the_perturbation,
                                       dominant_perturbation_inputs,
                                       register_fused_tva_op)
from apt_kernels.testing import assert_close

_spec = importlib.util.spec_from_file_location("apt_cuda_emu_build",
                                               Path(__file__).parent / "cuda_emu" / "emu_build.py")
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

Tensor = torch.Tensor


@pytest.fixture(scope="session")
def emu_module():
    try:
        out = emu_build.build()
    except RuntimeError as exc:
        if "no C++ compiler" in str(exc):  # no g++, or tests run outside a source checkout
            pytest.skip(str(exc))
        raise
    return emu_build.load(out)


def _view(t: Optional[Tensor]):
    """apt_kernels._native.view with device 0 for CPU tensors: what the CUDA bindings take."""
    if t is None:
        return None
    return (t.data_ptr(), DTYPE_CODES[t.dtype], tuple(t.shape), tuple(t.stride()), 0)


# ---- the CUDA branches of the providers as custom ops on CPU tensors, with the providers' autograd formulas -----
@torch.library.custom_op("apt_cuda_emu::selective_scan_fwd", mutates_args=())
def _emu_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                  chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    return scan_ops._scan_fwd_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)


@torch.library.custom_op("apt_cuda_emu::selective_scan_bwd", mutates_args=())
def _emu_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], dout: Tensor, dlast: Optional[Tensor],
                  ckpt: Tensor, delta_softplus: bool, chunk: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return scan_ops._scan_bwd_cuda(u, delta, A, B, C, D, z, delta_bias, dout, dlast, ckpt, delta_softplus, chunk)


scan_ops._make_autograd(_emu_scan_fwd, _emu_scan_bwd)


@torch.library.custom_op("apt_cuda_emu::selective_state_update", mutates_args=("state",))
def _emu_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool) -> Tensor:
    return scan_ops._state_update_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _emu_tva_fwd_impl(q: Tensor, k: Tensor, v: Tensor, delta: Optional[Tensor], gate: Optional[Tensor],
                      coef: Tensor, causal: bool, window: int, sinks: int, key_padding_mask: Optional[Tensor],
                      scale: float, save_attn: bool) -> tuple[Tensor, Tensor, Tensor]:
    return tva_ops._native_forward(q, k, v, delta, gate, coef, causal, window, sinks, key_padding_mask, scale,
                                   save_attn, cuda=True)


def _emu_tva_bwd_impl(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, lse: Tensor,
                      delta: Optional[Tensor], gate: Optional[Tensor], coef: Tensor, causal: bool, window: int,
                      sinks: int, key_padding_mask: Optional[Tensor], scale: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tva_ops._native_backward(grad_o, q, k, v, attn, lse, delta, gate, coef, causal, window, sinks,
                                    key_padding_mask, scale, cuda=True)


# as tva_ops registers the real ones: the custom ops for torch.compile, the eager autograd.Function over the bodies
_emu_tva_fwd = torch.library.custom_op("apt_cuda_emu::tva_fwd", mutates_args=())(_emu_tva_fwd_impl)
_emu_tva_bwd = torch.library.custom_op("apt_cuda_emu::tva_bwd", mutates_args=())(_emu_tva_bwd_impl)
_emu_tva_run = register_fused_tva_op(_emu_tva_fwd, _emu_tva_bwd, _emu_tva_fwd_impl, _emu_tva_bwd_impl)


@pytest.fixture
def emulated(monkeypatch, emu_module):
    """The cuda providers (scan, router, attention) run their kernels in the emulator, on CPU tensors."""
    for mod in (scan_ops, moe_ops, tva_ops):
        monkeypatch.setattr(mod, "native_module", lambda: emu_module)
        monkeypatch.setattr(mod, "view", _view)
        monkeypatch.setattr(mod, "current_stream", lambda device: 0)
    # an H100's 132 SMs for the scan's time-split heuristic: small batch x dim splits time into many pieces
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=132, name="emulated"))
    monkeypatch.setattr(moe_ops.backends, "native_cuda_status", lambda device=None: (True, ""))  # tva_ops.backends too
    # scan: its checks without the device test; the CPU-dispatching op names bound to the emulated ops
    monkeypatch.setattr(scan_ops, "cuda_status", lambda device=None: (True, ""))
    check_gpu = scan_ops._check_gpu_impl
    monkeypatch.setattr(scan_ops, "_check_gpu_impl", lambda *a, **kw: check_gpu(*a, **{**kw, "cpu_ok": True}))
    monkeypatch.setattr(scan_ops, "_scan_fwd_op", _emu_scan_fwd)
    # eager calls run the CUDA bodies through the providers' autograd.Function, as on a GPU
    monkeypatch.setitem(scan_ops._EAGER_SCANS, _emu_scan_fwd,
                        {"cpu": (scan_ops._scan_fwd_cuda, scan_ops._scan_bwd_cuda)})
    monkeypatch.setattr(scan_ops, "_state_update_op", _emu_step)
    # router, attention: impl "cuda" is available for CPU tensors
    for mod in (moe_ops, tva_ops):
        status = mod.impl_status
        monkeypatch.setattr(mod, "impl_status", lambda impl, device=None, *a, _s=status, **kw: _s(
            impl, torch.device("cuda") if impl == "cuda" and device is not None else device, *a, **kw))
    monkeypatch.setitem(tva_ops._NATIVE_DEVICE, "cuda", "cpu")
    monkeypatch.setattr(tva_ops, "_native_run", _emu_tva_run)
    return emu_module


# ---- the emulator itself ------------------------------------------------------------------------------------------
def test_emulator_runs_a_correct_kernel_and_catches_a_race(emu_module):
    x = torch.arange(256, dtype=torch.float32)
    out = torch.empty(256)
    emu_module.emu_block_sum(_view(x), _view(out), 256, True)
    assert (out == x.sum()).all()
    # without the barrier, the first thread to run reads slots nobody has written yet (0xff bytes: NaN)
    emu_module.emu_block_sum(_view(x), _view(out), 256, False)
    assert out.isnan().any()


def test_emulator_catches_divergent_barriers_and_bad_shuffles(emu_module):
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match="__syncthreads reached by 32 threads while 32 of the block have exited"):
        emu_module.emu_divergent_barrier(_view(out), 64)
    emu_module.emu_shuffle_after_exit(_view(out), 32)
    assert (out[:32] == 32).all()
    with pytest.raises(RuntimeError, match="has exited"):
        emu_module.emu_shuffle_after_exit(_view(out), 20)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulator_mma_tile(emu_module, dtype):
    """The emulated ldmatrix (plain and transposed) and mma.sync m16n8k16 against a matmul, with the fragments
    addressed as csrc/common/apt_mma.cuh documents; a warp with exited lanes is reported (undefined on a GPU)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(dtype) for _ in range(2))
    bt = b.t().contiguous()
    c, c2 = torch.empty(16, 16), torch.empty(16, 16)
    emu_module.emu_mma_tile(_view(a), _view(b), _view(bt), _view(c), _view(c2), dtype == torch.bfloat16, 32)
    expected = a.float() @ b.float() + 1
    torch.testing.assert_close(c, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="in a warp with 16 live lanes"):
        emu_module.emu_mma_tile(_view(a), _view(b), _view(bt), _view(c), _view(c2), False, 16)


def test_emulator_poisons_dynamic_smem_and_checks_launches(emu_module):
    out = torch.zeros(32)
    emu_module.emu_uninitialised_smem(_view(out))
    assert out.isnan().all()
    for grid, threads, smem, what in ((0, 32, 128, "empty grid"), (1, 1025, 128, "1025 threads"),
                                      (1, 32, 49 * 1024, "dynamic shared memory")):
        with pytest.raises(RuntimeError, match=what):
            emu_module.emu_launch(_view(out), grid, threads, smem)
    # the ASan build's redzones between statics do not count against the limit, nor may its failure path read as
    # an overrun (the stand-in the kernel goes on with is unpoisoned)
    with pytest.raises(RuntimeError, match="more than 48 KB of static shared memory"):
        emu_module.emu_big_static(_view(out))
    out = torch.zeros(128)
    emu_module.emu_bounded(_view(out), 64)
    with pytest.raises(RuntimeError, match=r"128 threads for a kernel declared __launch_bounds__\(64\)"):
        emu_module.emu_bounded(_view(out), 128)


# ---- selective scan (csrc/scan/scan_cuda_*.cu) --------------------------------------------------------------------
def _inputs(batch, dim, L, N, case, dtype=torch.float32, groups=2, seed=0):
    lb, lc, D, z, bias, _ = case
    return random_scan_inputs(batch, dim, L, N, layout_B=lb, layout_C=lc, groups=groups, dtype=dtype, with_D=D,
                              with_z=z, with_bias=bias, generator=torch.Generator().manual_seed(seed))


def _scan(**kw):
    return scan_ops.selective_scan_cuda(**kw)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N", [16, 4])
def test_scan_matches_reference(emulated, case, N):
    dim = 6 if "group" in case[:2] else 7
    check_scan_against_reference(_scan, _inputs(2, dim, 65, N, case, seed=N), softplus=case[5])


@pytest.mark.parametrize("L", [1, 63, 64, 65, 300])
def test_scan_lengths_with_automatic_split(emulated, L):
    """10 channels x 16 lanes leave an H100 idle: time is split into one piece per 64-step chunk."""
    assert scan_ops._cuda_split_workspace(torch.empty(2, 5, L), 16, scan_ops.CHUNK)[0] == 1
    check_scan_against_reference(_scan, _inputs(2, 5, L, 16, CASES[1], seed=L), softplus=True)


@pytest.mark.parametrize("cps", [1, 2, 3, 100])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_scan_forced_splits(emulated, cps, case, monkeypatch):
    """L = 300 is 5 chunks: 5, 3, 2 and 1 pieces, forward and backward (pre-pass, fold, main pass), with a
    last-state gradient flowing through every piece."""
    monkeypatch.setattr(scan_ops, "CUDA_CHUNKS_PER_SPLIT", cps)
    check_scan_against_reference(_scan, _inputs(3, 6, 300, 16, case, groups=3, seed=cps), softplus=case[5])


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_scan_chunk_sizes(emulated, chunk, monkeypatch):
    monkeypatch.setattr(scan_ops, "CHUNK", chunk)
    check_scan_against_reference(_scan, _inputs(2, 6, 70, 8, CASES[3], seed=chunk), softplus=False)


@pytest.mark.parametrize("N", [1, 3, 5, 8, 32, 33, 64, 100, 128])
def test_scan_lane_layouts(emulated, N):
    """Every (lanes, states per lane) layout, with padding lanes when N is not a power of two."""
    x = _inputs(2, 6, 80, N, ("var", "group", True, True, True, True), groups=3, seed=N)
    check_scan_against_reference(_scan, x, softplus=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,L", [(16, 65), (4, 65), (16, 2048)])
def test_scan_low_precision(emulated, dtype, N, L):
    x = _inputs(2, 6, L, N, CASES[1], dtype=dtype, seed=N + L)
    check_scan_against_reference(_scan, x, softplus=True)


def test_scan_mixed_dtypes_grouped_lcm_and_non_contiguous(emulated):
    g = torch.Generator().manual_seed(3)
    x = random_scan_inputs(2, 12, 90, 16, dtype=torch.float16, layout_B="group", layout_C="group", groups=2,
                           generator=g)
    x["C"] = torch.randn(2, 3, 16, 90, generator=g).half()  # B in 2 groups, C in 3: blocks tile by lcm = 6
    x["delta"] = x["delta"].float()
    check_scan_against_reference(_scan, x, softplus=True, dtype=torch.float16)

    def gapped(t):
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        return big[..., ::2]

    def strided(**d):
        for k in ("u", "delta", "z"):
            d[k] = gapped(d[k].transpose(1, 2).contiguous().transpose(1, 2))
        d["B"], d["C"] = gapped(d["B"]), d["C"].transpose(-1, -2).contiguous().transpose(-1, -2)
        d["A"], d["D"] = d["A"].t().contiguous().t(), gapped(d["D"])
        assert not any(d[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "A", "D"))
        return _scan(**d)

    x = _inputs(2, 6, 77, 4, CASES[3], groups=2, seed=11)
    x["z"] = torch.randn(2, 6, 77, generator=torch.Generator().manual_seed(12))
    check_scan_against_reference(strided, x, softplus=True)


def test_scan_without_last_state_and_partial_grads(emulated):
    x = _inputs(2, 8, 130, 16, CASES[0], seed=14)
    y = scan_ops.selective_scan_cuda(**x, delta_softplus=True)
    assert isinstance(y, torch.Tensor)
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), family="scan")
    u, A = x["u"].clone().requires_grad_(), x["A"].clone().requires_grad_()
    scan_ops.selective_scan_cuda(**{**x, "u": u, "A": A}, delta_softplus=True).square().sum().backward()
    ref = {k: v.double() for k, v in x.items()}
    u2, A2 = ref["u"].requires_grad_(), ref["A"].requires_grad_()
    selective_scan_ref(**ref, delta_softplus=True).square().sum().backward()
    assert_close(u.grad, u2.grad.float(), family="scan", grad=True)
    assert_close(A.grad, A2.grad.float(), family="scan", grad=True)


@pytest.mark.parametrize("lb,lc", [("var", "var"), ("group", "var")])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("N", [16, 5, 64])
def test_scan_state_update(emulated, lb, lc, dtype, state_dtype, N):
    check_state_update_against_reference(scan_ops.selective_state_update_cuda, N, lb, lc, dtype, state_dtype,
                                         seed=15 + N)


def test_scan_step_binding_refuses_a_state_whose_elements_share_memory(emulated):
    """The CUDA binding's own check (the Python entry points refuse it first): an expanded state would have every
    batch row update the same memory."""
    b, d, N = 2, 4, 3
    with pytest.raises(ValueError, match="state: is updated in place"):
        scan_ops._state_update_cuda(torch.zeros(1, d, N).expand(b, d, N), torch.randn(b, d), torch.rand(b, d),
                                    -torch.rand(d, N), torch.randn(b, N), torch.randn(b, N), None, None, None, False)


def test_scan_then_decode_wide_delta_and_empty(emulated):
    scan, step = scan_ops.selective_scan_cuda, scan_ops.selective_state_update_cuda
    check_scan_then_decode(scan, step, _inputs(2, 4, 150, 8, ("group", "var", True, True, True, True), seed=16), 131)
    check_wide_delta_next_to_half_u(scan, step)
    for shape in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        check_empty_scan(scan, step, *shape)


def test_scan_bindings_check_their_arguments(emulated):
    x = _inputs(1, 2, 10, 4, CASES[1], seed=1)
    with pytest.raises(ValueError, match="chunk"):
        scan_ops._scan_fwd_cuda(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
                                10_000)


# ---- MoE routing, dispatch, combine (csrc/moe/moe_cuda.cu) --------------------------------------------------------
MOE_CASES = [
    (1, 1, 1, None, "random"), (1, 2, 2, 0.5, "equal"), (3, 64, 4, 1.0, "random"), (17, 2, 1, 2.0, "skew"),
    (100, 8, 2, 1.25, "dup"), (257, 8, 4, 0.5, "equal"), (513, 64, 2, None, "random"), (1000, 2, 2, 1.0, "skew"),
    (2049, 8, 1, 1.25, "random"), (3000, 64, 1, 0.5, "dup"), (64, 1, 1, 0.5, "random"),
    (600, 1000, 16, 1.0, "dup"),     # k at the limit, E > blockDim in the count kernel
    (64, 8192, 16, None, "random"),  # E at the limit (32 KB of shared counts)
    (20001, 8, 4, 1.25, "dup"),      # 79 token blocks x 4 ranks: 316 units, more than the block scan's 256 threads
    (5000, 16, 4, 0.25, "skew"),     # heavy dropping
    (200, 8, 3, 1.0, "dup"), (150, 12, 6, None, "equal"), (100, 20, 11, 0.5, "random"),  # k below its top-k bound
]


@pytest.mark.parametrize("n,e,k,cf,kind", MOE_CASES)
def test_moe_matches_reference(emulated, n, e, k, cf, kind):
    check_moe_impl("cuda", n, e, k, cf, kind, torch.float32, c=8 if n > 4000 else 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_moe_dtypes(emulated, dtype):
    check_moe_impl("cuda", 300, 8, 2, 1.0, "random", dtype)
    check_moe_impl("cuda", 300, 8, 2, None, "dup", dtype)


@pytest.mark.parametrize("n,e,k,cf", [(30, 1, 1, None), (30, 2, 2, 1.0), (60, 8, 1, 0.5), (60, 8, 4, None),
                                      (90, 64, 2, 1.25), (90, 64, 4, 0.5), (300, 1000, 16, 1.0)])
def test_moe_nonfinite_logits_and_nan_probs(emulated, n, e, k, cf):
    check_moe_nonfinite("cuda", n, e, k, cf)


def test_moe_non_contiguous_inputs_expanded_grads_and_zero_channels(emulated):
    from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route

    lg = torch.randn(8, 40)[:, ::5]
    r = moe_route(lg, 2, 1.0, impl="cuda")
    r_ref = moe_route(lg, 2, 1.0, impl="reference")
    check_same_routing(r, r_ref)
    x = torch.randn(24, 8).t()
    assert torch.equal(moe_dispatch(x, r, impl="cuda"), moe_dispatch(x, r_ref, impl="reference"))
    out = torch.randn(r.buffer_shape(15) + (2,))[..., 0]
    assert_close(moe_combine(out, r, impl="cuda"), moe_combine(out, r_ref, impl="reference"))
    grads = []
    for impl in ("reference", "cuda"):
        xx = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = torch.randn(40, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
        rr = moe_route(w, 2, 1.0, impl=impl)
        moe_combine(moe_dispatch(xx, rr, impl=impl) * 2, rr, impl=impl).sum().backward()  # expanded grad_y
        grads.append((xx.grad, w.grad))
    assert_close(grads[1][0], grads[0][0], grad=True)
    assert_close(grads[1][1], grads[0][1], grad=True)
    r = moe_route(torch.randn(6, 4), 2, 1.0, impl="cuda")
    buf = moe_dispatch(torch.randn(6, 0), r, impl="cuda")
    assert buf.shape == r.buffer_shape(0) and moe_combine(buf, r, impl="cuda").shape == (6, 0)


@pytest.mark.parametrize("cf", [None, 1.25])
def test_moe_zero_tokens_with_expanded_or_transposed_empty_inputs(emulated, cf):
    """0 tokens (an empty batch, an expert-parallel rank with none): y.sum()'s gradient is an expanded (0, C) tensor
    (strides (0, 0)) and .contiguous() returns any empty tensor as it is, so the CUDA bindings refused it ("expected
    unit stride along the channel dim"); a 0-row slice of a transposed activation likewise in the forward."""
    from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route

    for impl in ("reference", "cuda"):
        r = moe_route(torch.randn(0, 4), 2, cf, impl=impl)
        x = torch.randn(0, 8, requires_grad=True)
        y = moe_combine(moe_dispatch(x, r, impl=impl), r, impl=impl)
        y.sum().backward()
        assert y.shape == (0, 8) and x.grad.shape == (0, 8)
        x = torch.randn(0, 8, requires_grad=True)
        moe_dispatch(x, r, impl=impl).sum().backward()  # dropless: the buffer is (0, 8) too
        assert x.grad.shape == (0, 8)
        xt = torch.randn(8, 5).t()[:0]  # (0, 8), strides (1, 5)
        buf = moe_dispatch(xt, r, impl=impl)
        assert buf.shape == r.buffer_shape(8)
        if cf is None:
            assert moe_combine(xt, r, impl=impl).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,offset", [(16, 0), (16, 1), (24, 0), (13, 0)])
def test_moe_row_kernels_with_and_without_16_byte_packs(emulated, dtype, c, offset):
    """dispatch / combine and their backward move 16-byte packs when every row is 16-byte aligned (C a multiple of
    16 / itemsize, aligned base pointers), else single elements: x starting one element into its buffer, or C = 13,
    takes the scalar path; both equal the reference."""
    from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route

    n = 37
    g = torch.Generator().manual_seed(c + offset)
    lg = torch.randn(n, 4, generator=g)
    r, r_ref = moe_route(lg, 2, 1.0, impl="cuda"), moe_route(lg, 2, 1.0, impl="reference")
    flat = torch.randn(n * c + offset, generator=g).to(dtype)
    x = flat[offset:].view(n, c).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    buf, buf_ref = moe_dispatch(x, r, impl="cuda"), moe_dispatch(x_ref, r_ref, impl="reference")
    assert torch.equal(buf, buf_ref)
    y, y_ref = moe_combine(buf * 3, r, impl="cuda"), moe_combine(buf_ref * 3, r_ref, impl="reference")
    assert_close(y, y_ref, dtype=dtype, family="moe")
    gy = torch.randn(n, c, generator=g).to(dtype)
    (gx,) = torch.autograd.grad(y, [x], gy)
    (gx_ref,) = torch.autograd.grad(y_ref, [x_ref], gy)
    assert_close(gx, gx_ref, dtype=dtype, family="moe", grad=True)


# ---- fused TVA attention (csrc/tva/tva_cuda.cu) -------------------------------------------------------------------
MASKS = [(True, None, 0, False, 0), (True, None, 0, True, 40), (True, 50, 3, True, 0), (False, None, 0, True, 7),
         (False, 33, 1, False, 0), (False, 6, 130, False, 0)]  # the last: sinks past the window's right edge


def _tva(**kw):
    return tva_ops.tva_attention_cuda(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("causal,window,sinks,pad,extra", MASKS)
def test_tva_matches_reference(emulated, dtype, D, causal, window, sinks, pad, extra):
    inp = random_tva_inputs(B=1, H=2, Tq=100, Tk=100 + extra, D=D, dtype=dtype, pad=pad, coef_tensor=True,
                            requires_grad=True, seed=D + extra)
    check_tva_against_reference(_tva, inp, dtype, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tva_gqa_training_saves_kv_unrepeated(emulated, dtype):
    check_gqa_saves_kv_unrepeated(tva_ops.tva_attention_cuda, 2, dtype, 32, causal=True, window=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # fp32: the FMA kernels
def test_tva_grads_ignore_a_dominant_perturbation(emulated, dtype):
    """A perturbation ~40x the attention part leaves dq, dk, dv bit for bit as without it: Di comes from the
    attention part the forward saved (tensor-core and FMA epilogues, the backward's preprocess)."""
    inp = dominant_perturbation_inputs(B=1, H=2, Tq=70, D=32, pad=True, dtype=dtype)
    check_grads_ignore_the_perturbation(tva_ops.tva_attention_cuda, inp, window=33, sinks=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,window,sinks,Tq", [(True, None, 0, 256), (True, 150, 0, 192), (False, None, 0, 256),
                                                    (False, 150, 64, 200)])
def test_tva_interior_tiles(emulated, dtype, causal, window, sinks, Tq):
    """Long enough for tiles wholly inside the causal/window band, which the tensor-core kernels compute without
    the per-element mask (tile_unmasked), next to tiles that need it."""
    inp = random_tva_inputs(B=1, H=1, Tq=Tq, Tk=256, D=64, dtype=dtype, coef_tensor=True, requires_grad=True,
                            seed=Tq + sinks)
    check_tva_against_reference(_tva, inp, dtype, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("go_layout", ["expanded", "transposed"])
def test_tva_strided_output_gradient(emulated, go_layout):
    inp = random_tva_inputs(B=2, H=2, Tq=70, Tk=90, D=64, dtype=torch.float16, pad=True, coef_tensor=True,
                            requires_grad=True, seed=11)
    check_tva_against_reference(_tva, inp, torch.float16, window=40, sinks=2, go_layout=go_layout)


def test_tva_decode_fully_masked_rows_and_no_queries(emulated):
    inp = random_tva_inputs(B=2, H=2, Tq=1, Tk=300, D=64, pad=True, coef_tensor=True, requires_grad=True)
    check_tva_against_reference(_tva, inp, window=64, sinks=4)
    inp = random_tva_inputs(B=2, H=2, Tq=40, D=64, pad=True, coef_tensor=True, requires_grad=True)
    inp["key_padding_mask"] = inp["key_padding_mask"].clone()
    inp["key_padding_mask"][0] = True
    check_tva_against_reference(_tva, inp)
    inp = random_tva_inputs(B=1, H=2, Tq=0, Tk=9, D=32, requires_grad=True)
    o = _tva(**inp, causal=False)
    assert o.shape == (1, 2, 0, 32)
    dk, dv = torch.autograd.grad(o.sum(), [inp["k"], inp["v"]], allow_unused=True)
    assert dk is None or not dk.any()


def test_tva_block_edges_sink_blocks_and_non_contiguous(emulated):
    for T, extra, window, sinks in ((63, 1, 17, 33), (64, 0, 64, 1), (65, 31, 5, 40), (129, 64, 96, 0)):
        inp = random_tva_inputs(B=1, H=1, Tq=T, Tk=T + extra, D=32, pad=True, coef_tensor=True, requires_grad=True,
                                seed=T)
        check_tva_against_reference(_tva, inp, window=window, sinks=sinks)
        check_tva_against_reference(_tva, inp, causal=False, window=window, sinks=sinks)
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 2, 45, 64
    base = torch.randn(B, T, 4, H, D, generator=g).to(torch.bfloat16)
    q, k, v, delta = (base[:, :, i].transpose(1, 2).requires_grad_(True) for i in range(4))
    gate = torch.rand(B, H, T, generator=g).to(torch.bfloat16).permute(0, 2, 1).requires_grad_(True)
    kpm = torch.zeros(B, 2 * T, dtype=torch.bool)
    kpm[0, 2 * (T - 3):] = True
    inp = dict(q=q, k=k, v=v, delta=delta, gate=gate, coef=torch.tensor(0.41).requires_grad_(True),
               key_padding_mask=kpm[:, ::2])
    assert not any(t.is_contiguous() for t in (q, k, v, delta, gate, inp["key_padding_mask"]))
    check_tva_against_reference(_tva, inp, torch.bfloat16, window=20, sinks=2)
