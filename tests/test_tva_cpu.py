"""Fused C++ CPU TVA attention (csrc/tva/tva_cpu.cpp) vs the reference: masks, dtypes, gradients, memory."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from apt_kernels.backends import native_family_status
from apt_kernels.reference.tva import check_tva_against_reference, random_tva_inputs, tva_attention_ref
from apt_kernels.testing import assert_close

if not native_family_status("tva")[0]:
    pytest.skip(f"native tva ops unavailable: {native_family_status('tva')[1]}", allow_module_level=True)

from apt_kernels.ops.tva import resolve_impl, tva_attention, tva_attention_cpu  # noqa: E402

NAMES = ("q", "k", "v", "delta", "gate", "coef")


def _compare(inp, dtype=torch.float32, **kw):
    check_tva_against_reference(tva_attention_cpu, inp, dtype, **kw)


_MASKS = [(True, None, 0, False, 0), (True, None, 0, True, 70), (True, 20, 0, False, 0), (True, 9, 2, True, 0),
          (True, 30, 70, False, 13), (False, None, 0, True, 5), (False, 17, 1, True, 66), (False, 40, 0, False, 0),
          # non-causal, sinks past the window's right edge: the key range and the dK/dV query range used to stop at
          # the window and miss them (o off by 0.8)
          (False, 5, 120, False, 0), (False, 6, 100, True, 9)]


@pytest.mark.parametrize("causal,window,sinks,pad,extra", _MASKS)
@pytest.mark.parametrize("pack", ["0", "1"])
def test_cpu_matches_reference(monkeypatch, pack, causal, window, sinks, pad, extra):
    """T = 131 crosses two 64-row blocks and ends in a partial one; D = 24. APT_TVA_CPU_PACK: the forward packs K
    and V first (1; by default past 8 query blocks) or converts each key block inside every task that uses it
    (0)."""
    monkeypatch.setenv("APT_TVA_CPU_PACK", pack)
    inp = random_tva_inputs(B=2, H=2, Tq=131, Tk=131 + extra, D=24, pad=pad, coef_tensor=True, requires_grad=True,
                            seed=extra)
    _compare(inp, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("causal,window,sinks,pad,extra", _MASKS)
@pytest.mark.parametrize("Tq,D", [(1, 24), (1, 32), (3, 32), (37, 24), (64, 32)])
def test_cpu_short_queries_match_reference(Tq, D, causal, window, sinks, pad, extra):
    """Tq <= 64 (decode, short prompts): one query block, each key block converted inside its task (Tq <= 4:
    scores by dot products; fp32 with D a multiple of 16: key rows read in place): the same mask matrix,
    against caches of 131+ keys."""
    inp = random_tva_inputs(B=2, H=2, Tq=Tq, Tk=131 + extra, D=D, pad=pad, coef_tensor=True, requires_grad=True,
                            seed=Tq + extra)
    _compare(inp, causal=causal, window=window, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_short_queries_strided(dtype):
    """The short-query forward reads q, k, v, delta, gate and writes o through their strides (fp32: K and V rows in
    place, time stride 2·H·D)."""
    g = torch.Generator().manual_seed(2)
    B, H, Tk, D = 2, 3, 150, 32
    kv = torch.randn(B, Tk, 2, H, D, generator=g).to(dtype)
    k, v = (kv[:, :, i].transpose(1, 2).requires_grad_(True) for i in range(2))
    qd = torch.randn(B, 1, 2, H, D, generator=g).to(dtype)
    q, delta = (qd[:, :, i].transpose(1, 2).requires_grad_(True) for i in range(2))
    gate = torch.rand(B, H, 1, generator=g).to(dtype).permute(0, 2, 1).requires_grad_(True)
    assert not any(t.is_contiguous() for t in (k, v))
    inp = dict(q=q, k=k, v=v, delta=delta, gate=gate, coef=torch.tensor(0.3).requires_grad_(True),
               key_padding_mask=None)
    _compare(inp, dtype=dtype, window=40, sinks=2)


def test_cpu_scratch_reused_across_shapes(monkeypatch):
    """The packed panels are kept between calls (per thread) and not cleared: packing writes every element,
    padding included. A call after a bigger one with other paddings (T, D not multiples of the blocks) still
    matches the reference, forward and backward, and repeats exactly."""
    monkeypatch.setenv("APT_TVA_CPU_PACK", "1")  # the forward's panels too
    big = random_tva_inputs(B=2, H=3, Tq=200, Tk=260, D=40, pad=True, coef_tensor=True, requires_grad=True, seed=21)
    small = random_tva_inputs(B=1, H=2, Tq=70, Tk=90, D=24, pad=True, coef_tensor=True, requires_grad=True, seed=22)
    _compare(big, window=50, sinks=3)
    _compare(small)
    with torch.no_grad():
        first = tva_attention_cpu(**small)
        tva_attention_cpu(**big)
        assert torch.equal(tva_attention_cpu(**small), first)


def test_cpu_nan_of_an_earlier_call_stays_in_that_call(monkeypatch):
    """The kept panels' padding (rows past T, head dims past D) is rewritten by every call: NaN in the last rows
    and columns of one call's inputs must not reach a later, smaller call through it (0 · NaN = NaN)."""
    monkeypatch.setenv("APT_TVA_CPU_PACK", "1")
    bad = random_tva_inputs(B=1, H=2, Tq=128, Tk=128, D=32, coef_tensor=True, requires_grad=True, seed=30)
    with torch.no_grad():
        for name in ("q", "k", "v", "delta"):
            bad[name][:, :, 70:] = float("nan")
            bad[name][..., 24:] = float("nan")
    out = tva_attention_cpu(**bad)
    out.backward(torch.full_like(out, float("nan")))
    small = random_tva_inputs(B=1, H=2, Tq=70, Tk=70, D=24, coef_tensor=True, requires_grad=True, seed=31)
    _compare(small)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision(dtype):
    inp = random_tva_inputs(B=1, H=2, Tq=70, D=32, dtype=dtype, pad=True, coef_tensor=True, requires_grad=True)
    _compare(inp, dtype=dtype, window=20, sinks=1)


@pytest.mark.parametrize("Tq,Tk,D", [(1, 1, 8), (1, 130, 64), (2, 2, 200)])
def test_cpu_short_sequences_and_head_dims(Tq, Tk, D):
    inp = random_tva_inputs(B=1, H=2, Tq=Tq, Tk=Tk, D=D, coef_tensor=True, requires_grad=True)
    _compare(inp)
    _compare(inp, window=7, sinks=1)


def test_cpu_training_after_an_inference_mode_call():
    """A float coef's tensor is cached per value: made first under inference_mode, it must still be savable for
    backward in a later training call (an inference tensor raised 'Inference tensors cannot be saved for
    backward')."""
    inp = random_tva_inputs(B=1, H=2, Tq=9, D=16, seed=13)
    args = {k: inp[k] for k in ("q", "k", "v", "delta", "gate")}
    with torch.inference_mode():
        tva_attention(**args, coef=0.123, impl="cpu_native")
    q = args["q"].clone().requires_grad_()
    out = tva_attention(**{**args, "q": q}, coef=0.123, impl="cpu_native")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("go_layout", ["expanded", "transposed"])
def test_cpu_strided_output_gradient(go_layout):
    """dO as autograd hands it over from o.sum(2) (stride 0 over time) or through a transpose: read through its
    strides, not copied."""
    inp = random_tva_inputs(B=2, H=2, Tq=70, Tk=80, D=24, pad=True, coef_tensor=True, requires_grad=True, seed=9)
    _compare(inp, window=30, sinks=1, go_layout=go_layout)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_cpu_every_build_and_backward_form(monkeypatch, isa, bwd):
    """APT_TVA_CPU_ISA caps the kernel build (to what the CPU runs); APT_TVA_CPU_BWD picks the backward's form
    (fused: dQ accumulated in the key-block pass, one task per batch·head; split: dK/dV then dQ), and with it the
    forward's (fused: K and V packed first; split: each key block converted in its task). D = 40 pads to 48, so the
    AVX-512 column tiles take their 32- and 16-wide tails; Tq < Tk, a window with sinks and padding; and a
    decode-shaped calls (1 and 3 queries: scores by dot products with K's rows)."""
    monkeypatch.setenv("APT_TVA_CPU_ISA", isa)
    monkeypatch.setenv("APT_TVA_CPU_BWD", bwd)
    monkeypatch.setenv("APT_TVA_CPU_PACK", "1" if bwd == "fused" else "0")
    inp = random_tva_inputs(B=2, H=3, Tq=150, Tk=190, D=40, pad=True, coef_tensor=True, requires_grad=True, seed=3)
    _compare(inp, window=50, sinks=2)
    _compare(inp)
    _compare(random_tva_inputs(B=2, H=2, Tq=3, Tk=200, D=64, pad=True, coef_tensor=True, requires_grad=True, seed=4))
    # decode with a padded head dim (the dot products' lane sums over 48 columns), converted blocks only (bf16)
    _compare(random_tva_inputs(B=1, H=2, Tq=1, Tk=131, D=40, dtype=torch.bfloat16, coef_tensor=True,
                               requires_grad=True, seed=6), dtype=torch.bfloat16)
    inp = random_tva_inputs(B=1, H=1, Tq=70, Tk=70, D=64, coef_tensor=True, requires_grad=True, seed=5)
    _compare(inp, causal=False)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_decode_reads_the_cache_in_place(monkeypatch, isa, dtype):
    """Decode-shaped calls (1-4 queries) read K and V rows with a unit head-dim stride in place, in their dtype
    (fp16/bf16: K at one query, V up to four), score only the keys a block has (whole groups of the build's vector
    width in place, the last partial group from a copy) and stop P·V at the block's last key. The caches here are
    the first Tk rows of longer ones whose rows past Tk are NaN, in the (B, H, T, D) and (B, T, H, D) layouts: a read
    past Tk would make o or a gradient NaN. Tk covers a partial group of every vector width (4, 8, 16 floats), a
    whole block, a block and one key, and several blocks."""
    monkeypatch.setenv("APT_TVA_CPU_ISA", isa)
    B, H, D = 1, 2, 64
    g = torch.Generator().manual_seed(8)
    for Tq, Tk, layout in [(1, 1, "bhtd"), (1, 5, "bthd"), (1, 16, "bhtd"), (1, 27, "bthd"), (1, 64, "bhtd"),
                           (1, 65, "bthd"), (1, 150, "bhtd"), (2, 79, "bthd"), (3, 64, "bhtd"), (4, 131, "bthd")]:
        caches = []
        for _ in range(2):
            full = torch.randn(B, Tk + 9, H, D, generator=g)
            full[:, Tk:] = float("nan")
            full = full.to(dtype)
            kv = full.transpose(1, 2) if layout == "bthd" else full.transpose(1, 2).contiguous()
            caches.append(kv[:, :, :Tk].requires_grad_(True))
        inp = random_tva_inputs(B=B, H=H, Tq=Tq, Tk=Tk, D=D, dtype=dtype, coef_tensor=True, requires_grad=True,
                                seed=Tk)
        inp["k"], inp["v"] = caches
        _compare(inp, dtype=dtype, msg=f"Tq {Tq} Tk {Tk} {layout}")
        _compare(inp, dtype=dtype, window=9, sinks=1, msg=f"Tq {Tq} Tk {Tk} {layout} window")


_GUARD_SCRIPT = r"""
import ctypes, mmap, os, torch
from apt_kernels.ops.tva import tva_attention_cpu
from apt_kernels.reference.tva import tva_attention_ref
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []
def guarded(shape, dtype):
    # a tensor whose last byte is the last byte before a PROT_NONE page: any read past it faults
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    n = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    m = mmap.mmap(-1, n + mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(addr + n, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()
    keep.append(m)
    t = torch.frombuffer(m, dtype=torch.uint8, count=n)[n - nbytes:].view(dtype).view(shape)
    t.copy_(torch.randn(shape))
    return t
for isa in ("generic", "avx2", "avx512"):
    os.environ["APT_TVA_CPU_ISA"] = isa
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for Tq, Tk in ((1, 1), (1, 5), (1, 27), (1, 65), (3, 27), (4, 150)):
            q = torch.randn(1, 2, Tq, 64).to(dtype)
            k, v = guarded((1, 2, Tk, 64), dtype), guarded((1, 2, Tk, 64), dtype)
            o = tva_attention_cpu(q, k, v)
            r = tva_attention_ref(q.float(), k.float(), v.float())
            assert (o.float() - r).abs().max() < 0.05, (isa, dtype, Tq, Tk)
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard pages through ctypes: Linux")
def test_cpu_decode_never_reads_past_the_cache(tmp_path):
    """The in-place decode reads stop at the cache's last row: K and V end right before a PROT_NONE page, so a read
    of a key past Tk (a whole vector group where only a partial one is left) would crash the process. In a
    subprocess, so that a crash fails this test instead of the run; started outside the checkout, whose
    apt_kernels/ (without the compiled module) would otherwise shadow the installed package."""
    r = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def test_cpu_fully_masked_rows_noncontiguous_and_no_delta():
    inp = random_tva_inputs(B=2, H=2, Tq=20, D=16, pad=True, coef_tensor=True, requires_grad=True)
    inp["key_padding_mask"] = inp["key_padding_mask"].clone()
    inp["key_padding_mask"][0] = True
    out = tva_attention_cpu(**inp, window=3)
    pert = inp["coef"] * inp["gate"].permute(0, 2, 1)[..., None] * inp["delta"]
    assert (out - pert)[0].abs().max() < 1e-6
    _compare(inp, window=3)
    base = torch.randn(2, 70, 2, 3, 16)
    q, k, v = (base[..., i, :].transpose(1, 2).requires_grad_(True) for i in range(3))
    _compare(dict(q=q, k=k, v=v))
    exp = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(tva_attention_cpu(q, k, v), exp, family="attention")
    _compare(dict(q=q, k=k, v=v, delta=torch.randn(2, 2, 70, 16, requires_grad=True), coef=0.5))  # no gate


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq", [1, 3, 100])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_non_finite_key_in_a_padded_slot_is_ignored(causal, Tq, bad):
    """A padded key (e.g. an unwritten KV-cache slot) holding NaN/inf: its score was masked by adding -inf to it,
    and NaN + -inf is NaN, so every row seeing that key block came out NaN (the reference was finite)."""
    torch.manual_seed(0)
    T = 100
    q, k, v = torch.randn(1, 2, Tq, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    k[0, :, T - 1, 3] = bad
    k[0, 1, 40] = bad
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, [40, T - 1]] = True
    out = tva_attention_cpu(q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert_close(out, tva_attention_ref(q, k, v, causal=causal, key_padding_mask=mask), family="attention")


def test_cpu_skips_fully_masked_key_blocks():
    """NaN keys/values in blocks outside the window band (and not sinks) must never be read."""
    q = torch.randn(1, 1, 1, 16, requires_grad=True)
    k, v = torch.randn(1, 1, 5 * 64, 16), torch.randn(1, 1, 5 * 64, 16)
    k[:, :, 64:256] = float("nan")
    v[:, :, 64:256] = float("nan")
    kw = dict(window=32, sinks=2)
    out = tva_attention_cpu(q, k, v, **kw)
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    assert torch.isfinite(out).all()
    assert_close(out, tva_attention_ref(q, k0, v0, **kw), family="attention")
    (gq,) = torch.autograd.grad(out.sum(), q)
    (eq,) = torch.autograd.grad(tva_attention_ref(q, k0, v0, **kw).sum(), q)
    assert_close(gq, eq, family="attention", grad=True)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cpu_never_allocates_the_score_matrix():
    """T = 8192: one (T, T) fp32 matrix is 256 MiB; forward + backward must peak far below that."""
    T = 8192
    inp = random_tva_inputs(B=1, H=1, Tq=T, D=16, coef_tensor=True, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    base = _peak_rss()
    out = tva_attention_cpu(**inp)
    out.sum().backward()
    grown = _peak_rss() - base
    assert grown < 32 * 2**20, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    assert torch.isfinite(inp["q"].grad).all()


def test_gpu_auto_order_by_dtype(monkeypatch):
    """On CUDA tensors auto takes Triton first in half precision (both on tensor cores, Triton's tiles tuned) and
    the CUDA kernel first in fp32 (both FMA there); each falls back to the other, then to the reference."""
    from apt_kernels.ops import tva as tva_ops

    up = {"cuda": True, "triton": True}
    monkeypatch.setattr(tva_ops, "impl_status", lambda impl, *a: (up[impl], "" if up[impl] else "down"))
    gpu = torch.device("cuda")
    assert resolve_impl("auto", gpu, 64, torch.bfloat16) == "triton"
    assert resolve_impl("auto", gpu, 64, torch.float16) == "triton"
    assert resolve_impl("auto", gpu, 64, torch.float32) == "cuda"
    up["triton"] = False
    assert resolve_impl("auto", gpu, 64, torch.float16) == "cuda"
    up["triton"], up["cuda"] = True, False
    assert resolve_impl("auto", gpu, 64, torch.float32) == "triton"
    up["triton"] = False
    assert resolve_impl("auto", gpu, 64, torch.float32) == "reference"


def test_cpu_dispatch_opcheck_and_native_checks():
    from apt_kernels._native import native_module, view
    from apt_kernels.ops.tva import _native_fwd_op

    assert resolve_impl("auto", torch.device("cpu"), 64, torch.float32) == "cpu_native"
    assert resolve_impl("auto", torch.device("cpu"), 64, torch.float64) == "reference"
    q64 = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="^q: .*float64"):  # the inputs' fault: not a RuntimeError "unavailable"
        tva_attention_cpu(q64, q64, q64)
    with pytest.raises(TypeError, match="^q: .*float64"):
        tva_attention(q64, q64, q64, impl="cpu_native")
    q300 = torch.randn(1, 1, 2, 300)
    with pytest.raises(ValueError, match=r"^q: head dim must be in \[1, 256\]"):
        tva_attention_cpu(q300, q300, q300)
    inp = random_tva_inputs(B=1, H=2, Tq=9, D=16, pad=True)
    assert_close(tva_attention(**inp), tva_attention_ref(**inp), family="attention")
    inp = random_tva_inputs(B=1, H=1, Tq=5, D=8, pad=True, coef_tensor=True, requires_grad=True)
    args = (inp["q"], inp["k"], inp["v"], inp["delta"], inp["gate"], inp["coef"], True, 3, 1,
            inp["key_padding_mask"], 0.3, True)
    torch.library.opcheck(_native_fwd_op, args)
    C = native_module()
    q = torch.randn(1, 2, 4, 8)
    o, lse = torch.empty_like(q), torch.empty(1, 2, 4)
    with pytest.raises(ValueError, match="k: expected size"):
        C.tva_forward_cpu(view(q), view(q[:, :1]), view(q), None, None, 0.0, True, 0, 0, None, 1.0, view(o),
                          view(lse))
    with pytest.raises(TypeError, match="lse: expected dtype float32"):
        C.tva_forward_cpu(view(q), view(q), view(q), None, None, 0.0, True, 0, 0, None, 1.0, view(o),
                          view(lse.double()))
    with pytest.raises(ValueError, match="gate: given without delta"):
        C.tva_forward_cpu(view(q), view(q), view(q), None, view(torch.rand(1, 4, 2)), 0.0, True, 0, 0, None, 1.0,
                          view(o), view(lse))


def test_layer_and_provider_use_the_cpu_kernel():
    from apt.core.registry import REGISTRY
    from apt_kernels.layers.tva import TVAAttention

    prov = REGISTRY.get("attention", "tva_cpu", strict=True)
    assert prov.supports(q=torch.randn(1, 1, 2, 64)) == []
    assert prov.supports(q=torch.randn(1, 1, 2, 64, dtype=torch.float64))
    torch.manual_seed(0)
    layer = prov.create_layer(32, 4, window=8, s=1)
    ref = TVAAttention(32, 4, window=8, s=1, core="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 40, 32)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1, :5] = True
    assert_close(layer(x, kpm), ref(x, kpm), family="attention")
    with torch.no_grad():  # incremental decoding through the fused kernel (Tq < Tk)
        cache = layer.new_cache(2)
        outs = [layer(x[:, a:b], kpm[:, a:b], cache=cache) for a, b in ((0, 17), (17, 18), (18, 40))]
        assert_close(torch.cat(outs, 1), ref(x, kpm), family="attention")


def test_native_op_under_torch_compile():
    """fullgraph torch.compile (aot_eager: dynamo tracing, fake tensors, the registered autograd) gives the eager
    output and gradients, masks and padding included."""
    inp = random_tva_inputs(B=2, H=2, Tq=33, Tk=33, D=16, coef_tensor=True, requires_grad=True, pad=True, seed=4)

    def f(q, k, v, delta, gate, coef, key_padding_mask):
        return tva_attention(q, k, v, delta=delta, gate=gate, coef=coef, key_padding_mask=key_padding_mask,
                             window=8, sinks=1, impl="cpu_native")

    leaves = [inp[n] for n in NAMES]
    eager = f(**inp)
    g_eager = torch.autograd.grad(eager.sum(), leaves)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(**inp)
    g_comp = torch.autograd.grad(compiled.sum(), leaves)
    torch.testing.assert_close(compiled, eager)
    for n, a, b in zip(NAMES, g_comp, g_eager):
        torch.testing.assert_close(a, b, msg=n)


def test_float_coef_cache_is_not_poisoned_by_fake_tensor_mode():
    """A float coef is cached as a 0-dim tensor per value; a FakeTensor made under FakeTensorMode went into that
    cache (every later eager backward with the value then failed), and a cached real one failed under the mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, d = (torch.randn(1, 2, 5, 8) for _ in range(4))
    g = torch.rand(1, 5, 2)
    tva_attention(q, k, v, delta=d, gate=g, coef=0.25)  # a real tensor cached for 0.25 first
    for coef in (0.5, 0.25):
        with FakeTensorMode() as mode:
            out = tva_attention(*map(mode.from_tensor, (q, k, v)), delta=mode.from_tensor(d),
                                gate=mode.from_tensor(g), coef=coef)
        assert out.shape == q.shape
        qg = q.clone().requires_grad_()
        tva_attention(qg, k, v, delta=d, gate=g, coef=coef).sum().backward()
        assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_eager_calls_skip_the_custom_op_dispatch():
    """Eager calls run the kernels' bodies through an autograd.Function (the custom op's dispatch costs ~60 µs of
    Python each way, more than the kernel at decode); the op itself serves torch.compile (the test above compares
    the two) and dispatch modes. Its backward is once-differentiable: a double backward raises instead of
    returning zeros."""
    inp = random_tva_inputs(B=1, H=2, Tq=9, D=16, coef_tensor=True, requires_grad=True, seed=6)
    out = tva_attention_cpu(**inp)
    assert "TVAAttentionFused" in out.grad_fn.name()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):  # a dispatch mode sees the op
        seen = tva_attention_cpu(**inp)
    assert "TVAAttentionFused" not in seen.grad_fn.name()
    torch.testing.assert_close(seen, out, rtol=0, atol=0)
    go = torch.ones_like(out, requires_grad=True)
    (gq,) = torch.autograd.grad(out, inp["q"], go, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()
    # nothing to differentiate: the body alone, the same values
    with torch.no_grad():
        plain = tva_attention_cpu(**inp)
    frozen = tva_attention_cpu(**{n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in inp.items()})
    for o in (plain, frozen):
        assert o.grad_fn is None and not o.requires_grad
        torch.testing.assert_close(o, out.detach(), rtol=0, atol=0)
