"""Fused Triton TVA attention vs the reference, in the Triton CPU interpreter (tiny shapes; block size 16 there)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from apt_kernels import backends  # noqa: E402
from apt_kernels.reference.tva import check_tva_against_reference, random_tva_inputs, tva_attention_ref  # noqa: E402,E501
from apt_kernels.testing import assert_close  # noqa: E402

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
    if dtype == torch.bfloat16 and backends.triton_interpret():
        pytest.skip("the Triton interpreter computes bfloat16 tl.dot wrongly (fine on GPUs)")
    inp = random_tva_inputs(B=1, H=2, Tq=19, D=32, dtype=dtype, pad=True, coef_tensor=True, requires_grad=True)
    _compare(inp, dtype=dtype, window=6, sinks=1)


def test_triton_no_delta_and_float_coef_and_scale():
    inp = random_tva_inputs(B=2, H=1, Tq=18, D=64, requires_grad=True)
    qkv = {n: inp[n] for n in ("q", "k", "v")}
    _compare(qkv, softmax_scale=0.3)
    exp = torch.nn.functional.scaled_dot_product_attention(*qkv.values(), is_causal=True)
    assert_close(tva_attention_triton(**qkv), exp, family="attention")
    inp.pop("gate")  # delta without gate: gate = 1
    _compare(inp)


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
    with pytest.raises(RuntimeError, match="head dims"):
        q = torch.randn(1, 1, 4, 160)
        tva_attention(q, q, q, impl="triton")


def test_triton_opcheck():
    from apt_kernels.triton.tva import _tva_fwd_op

    inp = random_tva_inputs(B=1, H=1, Tq=5, D=16, pad=True, coef_tensor=True, requires_grad=True)
    args = (inp["q"], inp["k"], inp["v"], inp["delta"], inp["gate"], inp["coef"], True, 3, 1,
            inp["key_padding_mask"], 0.25)
    torch.library.opcheck(_tva_fwd_op, args, test_utils=("test_schema", "test_faketensor"))


def test_triton_skips_fully_masked_key_blocks():
    """Keys in blocks that no query of a block can see hold NaN: visiting such a block would poison the output
    (0·NaN in P·V) and dQ; the sink block and the window's blocks are still used."""
    from apt_kernels.triton.tva import _cfg

    q = torch.randn(1, 1, 1, 16)
    bn = _cfg(q, 16)["BLOCK_N"]
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
