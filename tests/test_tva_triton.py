"""Fused Triton TVA attention vs the reference, in the Triton CPU interpreter (tiny shapes; block size 16 there)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from apt_kernels import backends  # noqa: E402
from apt_kernels.reference.tva import (  # noqa: E402
    check_gqa_saves_kv_unrepeated, check_grads_ignore_the_perturbation, check_tva_against_reference,
    dominant_perturbation_inputs, random_tva_inputs, tva_attention_ref)
from apt_kernels.testing import assert_close, assert_lowp_pipeline  # noqa: E402

pytestmark = pytest.mark.triton
if not backends.triton_status()[0]:
    pytest.skip(f"triton unavailable: {backends.triton_status()[1]}", allow_module_level=True)

from apt_kernels.triton.tva import tva_attention_triton  # noqa: E402


def _compare(inp, dtype=torch.float32, **kw):
    check_tva_against_reference(tva_attention_triton, inp, dtype, **kw)


@pytest.mark.parametrize("causal,window,sinks,pad,extra", [
    (True, None, 0, False, 0), (True, None, 0, True, 5), (True, 5, 0, False, 0), (True, 5, 2, True, 0),
    (True, 3, 17, False, 12), (False, None, 0, True, 3), (False, 4, 1, True, 7), (False, 6, 0, False, 0)])
def test_triton_matches_reference(causal, window, sinks, pad, extra):
    # T = 21 is not a multiple of the block (16); D = 24 is not a power of two
    inp = random_tva_inputs(B=2, H=2, Tq=21, Tk=21 + extra, D=24, pad=pad, coef_tensor=True, requires_grad=True,
                            seed=extra)
    _compare(inp, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 37), (3, 3)])
def test_triton_short_sequences(Tq, Tk):
    inp = random_tva_inputs(B=1, H=3, Tq=Tq, Tk=Tk, D=16, pad=False, coef_tensor=True, requires_grad=True)
    _compare(inp, window=4, sinks=1)
    _compare(inp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    inp = random_tva_inputs(B=1, H=2, Tq=19, D=32, dtype=dtype, pad=True, coef_tensor=True, requires_grad=True)
    _compare(inp, dtype=dtype, window=6, sinks=1)
    inp = random_tva_inputs(B=1, H=2, Tq=64, D=32, dtype=dtype, coef_tensor=True, requires_grad=True)
    _compare(inp, dtype=dtype)  # with full (unmasked) blocks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_lowp_dominant_perturbation(dtype):
    """The perturbation ~40x the attention part: the backward's Di comes from the attention part the forward
    saved, as accurate as the reference's (from o - coef·gate·delta it kept only o's digits)."""
    inp = dominant_perturbation_inputs(B=1, H=2, Tq=37, D=32, pad=True, dtype=dtype)
    assert_lowp_pipeline(lambda a: tva_attention_triton(**a, window=9, sinks=1),
                         lambda a: tva_attention_ref(**a, window=9, sinks=1), inp,
                         ["q", "k", "v", "delta", "gate", "coef"], (1, 2, 37, 32), dtype)
    check_grads_ignore_the_perturbation(tva_attention_triton, inp, window=9, sinks=1)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_triton_gqa_training_saves_kv_unrepeated(Hkv):
    check_gqa_saves_kv_unrepeated(tva_attention_triton, Hkv, window=6, sinks=1)


def test_triton_no_delta_and_float_coef_and_scale():
    inp = random_tva_inputs(B=2, H=1, Tq=18, D=64, requires_grad=True)
    qkv = {n: inp[n] for n in ("q", "k", "v")}
    _compare(qkv, softmax_scale=0.3)
    exp = torch.nn.functional.scaled_dot_product_attention(*qkv.values(), is_causal=True)
    assert_close(tva_attention_triton(**qkv), exp, family="attention")
    inp.pop("gate")  # delta without gate: gate = 1
    _compare(inp)


@pytest.mark.parametrize("hkv", [1, 2])
def test_triton_grouped_query_attention(hkv):
    g = torch.Generator().manual_seed(hkv)
    q = torch.randn(1, 4, 5, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, hkv, 6, 16, generator=g, requires_grad=True) for _ in range(2))
    delta = torch.randn(1, 4, 5, 16, generator=g)
    o = tva_attention_triton(q, k, v, delta=delta, coef=0.3)
    ref = tva_attention_ref(q, k, v, delta=delta, coef=0.3)  # repeats k/v as SDPA's enable_gqa
    assert_close(o, ref, family="attention")
    gy = torch.randn(o.shape, generator=g)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), gy), torch.autograd.grad(ref, (q, k, v), gy)):
        assert_close(a, b, family="attention", grad=True)


def test_triton_fully_masked_rows_and_noncontiguous():
    inp = random_tva_inputs(B=2, H=2, Tq=20, D=16, pad=True, coef_tensor=True, requires_grad=True)
    inp["key_padding_mask"] = inp["key_padding_mask"].clone()
    inp["key_padding_mask"][0] = True  # batch 0: nothing visible at all
    out = tva_attention_triton(**inp, window=3)
    pert = inp["coef"] * inp["gate"].permute(0, 2, 1)[..., None] * inp["delta"]
    assert (out - pert)[0].abs().max() < 1e-6
    _compare(inp, window=3)
    # (B, T, H, D) storage viewed as (B, H, T, D): strided inputs
    base = torch.randn(2, 20, 2, 3, 16)
    q, k, v = (base[..., i, :].transpose(1, 2).requires_grad_(True) for i in range(3))
    _compare(dict(q=q, k=k, v=v))


def test_triton_dispatch_through_op():
    from apt_kernels.ops.tva import impl_status, tva_attention

    assert impl_status("triton", torch.device("cpu"), 24, torch.float32)[0]
    assert not impl_status("triton", torch.device("cpu"), 256, torch.float32)[0]
    inp = random_tva_inputs(B=1, H=2, Tq=9, D=16)
    assert_close(tva_attention(**inp, impl="triton"), tva_attention_ref(**inp), family="attention")
    with pytest.raises(ValueError, match="^q: .*head dims"):
        q = torch.randn(1, 1, 4, 160)
        tva_attention(q, q, q, impl="triton")


def test_triton_opcheck():
    from apt_kernels.triton.tva import _tva_fwd_op

    inp = random_tva_inputs(B=1, H=1, Tq=5, D=16, pad=True, coef_tensor=True, requires_grad=True)
    args = (inp["q"], inp["k"], inp["v"], inp["delta"], inp["gate"], inp["coef"], True, 3, 1,
            inp["key_padding_mask"], 0.25, True)
    torch.library.opcheck(_tva_fwd_op, args, test_utils=("test_schema", "test_faketensor"))


def test_triton_skips_fully_masked_key_blocks():
    """Keys in blocks that no query of a block can see hold NaN: visiting such a block would poison the output
    (0·NaN in P·V) and dQ; the sink block and the window's blocks are still used."""
    from apt_kernels.triton.tva import kernel_configs

    q = torch.randn(1, 1, 1, 16)
    cfgs = kernel_configs(q.device, q.dtype, 16)
    bn = cfgs["fwd"].block_n
    assert cfgs["dq"].block_n == bn
    Tk = 5 * bn
    k, v = torch.randn(1, 1, Tk, 16), torch.randn(1, 1, Tk, 16)
    k[:, :, bn:4 * bn] = float("nan")
    v[:, :, bn:4 * bn] = float("nan")
    q.requires_grad_(True)
    kw = dict(window=bn // 2, sinks=2)
    out = tva_attention_triton(q, k, v, **kw)
    assert torch.isfinite(out).all()
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert_close(out, tva_attention_ref(q, k0, v0, **kw), family="attention")
    (gq,) = torch.autograd.grad(out.sum(), q)
    (eq,) = torch.autograd.grad(tva_attention_ref(q, k0, v0, **kw).sum(), q)
    assert_close(gq, eq, family="attention", grad=True)


# Interior ("full") blocks: T of a few blocks so that tiles wholly below the diagonal / inside the window exist and
# take the unmasked path; Tq < Tk shifts the diagonal; T = 96 is a multiple of every block size used here.
# (64, 64, False, 2, 40): non-causal, sinks reaching past the window's right edge (once missed by the key ranges).
FULL_BLOCK_CASES = [  # Tq, Tk, causal, window, sinks, pad, D
    (96, 96, True, None, 0, False, 32), (37, 101, True, None, 0, False, 24), (80, 100, True, 40, 2, False, 16),
    (96, 96, True, 33, 20, False, 16), (70, 96, False, 30, 1, False, 16), (64, 64, False, 2, 40, False, 16),
    (96, 96, True, 24, 3, True, 24)]


@pytest.mark.parametrize("blocks", [None, "fwd=32,16,4,2;dkdv=16,32,4,2;dq=16,32,4,2",
                                    "fwd=16,32,4,2;dkdv=32,16,4,2;dq=32,16,4,2"])
@pytest.mark.parametrize("Tq,Tk,causal,window,sinks,pad,D", FULL_BLOCK_CASES)
def test_triton_full_blocks(monkeypatch, blocks, Tq, Tk, causal, window, sinks, pad, D):
    """Interior blocks with the interpreter's 16x16 blocks and with BLOCK_M != BLOCK_N (as on GPUs, where the
    full-block bounds of the query and key sides differ)."""
    if blocks is not None:
        monkeypatch.setenv("APT_TVA_TRITON_CONFIG", blocks)
    inp = random_tva_inputs(B=2, H=1, Tq=Tq, Tk=Tk, D=D, pad=pad, coef_tensor=True, requires_grad=True,
                            seed=Tq + Tk)
    _compare(inp, causal=causal, window=window, sinks=sinks)


def test_triton_full_blocks_skip_the_mask(monkeypatch):
    """Causal T = 96 in 16x16 blocks: only the 6 diagonal blocks of each kernel go through the mask (21 visited);
    an all-False padding mask sends every block through it, with the same result."""
    from apt_kernels.triton import tva

    monkeypatch.delenv("APT_TVA_TRITON_CONFIG", raising=False)
    calls = [0]
    visible = tva._visible

    def counting(*args, **kw):
        calls[0] += 1
        return visible(*args, **kw)

    monkeypatch.setattr(tva, "_visible", counting)
    inp = random_tva_inputs(B=1, H=1, Tq=96, D=16, requires_grad=True)
    qkv = [inp[n] for n in ("q", "k", "v")]
    go = torch.randn(1, 1, 96, 16)
    got = []
    for kpm in (None, torch.zeros(1, 96, dtype=torch.bool)):
        calls[0] = 0
        out = tva_attention_triton(*qkv, key_padding_mask=kpm)
        fwd_calls = calls[0]
        grads = torch.autograd.grad(out, qkv, go)
        got.append((fwd_calls, calls[0] - fwd_calls, out, grads))
    assert got[0][:2] == (6, 12) and got[1][:2] == (21, 42)
    assert_close(got[0][2], got[1][2], family="attention")
    for g, e in zip(got[0][3], got[1][3]):
        assert_close(g, e, family="attention", grad=True)


def test_triton_config_override(monkeypatch):
    from apt_kernels.triton import tva

    cpu = torch.device("cpu")
    monkeypatch.delenv("APT_TVA_TRITON_CONFIG", raising=False)
    assert set(tva.kernel_configs(cpu, torch.float32, 64).values()) == {tva.KernelConfig(16, 16, 4, 1)}
    monkeypatch.setenv("APT_TVA_TRITON_CONFIG", "fwd=32,16,8,3; dq=16,32,4,2")
    cfgs = tva.kernel_configs(cpu, torch.float16, 64)
    assert cfgs["fwd"] == (32, 16, 8, 3) and cfgs["dq"] == (16, 32, 4, 2) and cfgs["dkdv"] == (16, 16, 4, 1)
    monkeypatch.setitem(tva.CONFIG_OVERRIDES, "fwd", (64, 16, 4, 2))  # the dict wins over the variable
    assert tva.kernel_configs(cpu, torch.float16, 64)["fwd"] == (64, 16, 4, 2)
    for bad in ("fwd=48,16,4,2", "bwd=16,16,4,2", "fwd=16,16", "fwd", "dq=16,16,3,2"):
        with pytest.raises(ValueError, match="APT_TVA_TRITON_CONFIG"):
            tva.parse_config_spec(bad)


def test_triton_gpu_configs_fit_shared_memory():
    """The GPU tables' shared-memory estimates: sm_90 within 227 KB, the default and fp32 tables within ~100 KB
    (sm_86/89), for every head dim up to 128."""
    from apt_kernels.triton import tva

    for table, elem, limit in ((tva._SM90_16BIT, 2, 227), (tva._DEFAULT_16BIT, 2, 96), (tva._FP32, 4, 96)):
        for (kernel, bucket), cfg in table.items():
            for D in (16, 32, 64) if bucket == 64 else (96, 128):
                assert tva.smem_estimate(kernel, cfg, D, elem) <= limit * 1024, (kernel, D, cfg)


@pytest.mark.parametrize("causal,window,pad,Tq,Tk", [(True, None, True, 9, 9), (True, 3, False, 5, 12),
                                                     (False, None, True, 1, 7)])
def test_triton_returns_the_reference_lse(causal, window, pad, Tq, Tk):
    """return_lse: the Triton kernel's saved log-sum-exp, +inf on rows with no visible key, as the reference's."""
    inp = random_tva_inputs(B=2, H=2, Tq=Tq, Tk=Tk, D=16, pad=pad, seed=Tq)
    kw = dict(causal=causal, window=window)
    o, lse = tva_attention_triton(**inp, **kw, return_lse=True)
    o_ref, lse_ref = tva_attention_ref(**inp, **kw, return_lse=True)
    assert_close(o, o_ref, family="attention")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and not lse.requires_grad
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[fin], lse_ref[fin], atol=2e-5, rtol=2e-5)
