"""The shared running-mean op: reference vs a per-timestep loop, native C++ vs reference, gradcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from apt_kernels import running_mean, running_mean_ref
from apt_kernels.ops.running_mean import running_mean_native
from apt_kernels.backends import native_status
from apt_kernels.testing import assert_close

requires_native = pytest.mark.skipif(not native_status()[0], reason="apt_kernels._C is not built")


def naive_running_mean(x, mask):
    B, T, C = x.shape
    out = torch.zeros_like(x, dtype=torch.float64)
    for b in range(B):
        seen = []
        for t in range(T):
            if mask is None or not mask[b, t]:
                seen.append(x[b, t].double())
            if seen:
                out[b, t] = torch.stack(seen).mean(0)
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 3), (3, 33, 17)])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_loop(shape, masked, seed):
    x = torch.randn(shape, dtype=torch.float64)
    mask = torch.rand(shape[:2]) < 0.4 if masked else None
    assert_close(running_mean_ref(x, mask), naive_running_mean(x, mask))


def test_reference_gradcheck(seed):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, False, True, False], [False] * 5])
    assert torch.autograd.gradcheck(lambda t: running_mean_ref(t, mask), (x,))


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 9, 5), (3, 64, 31)])
def test_native_matches_reference_fwd_bwd(dtype, shape, seed):
    x = torch.randn(shape, dtype=dtype)
    mask = torch.rand(shape[:2]) < 0.3
    mask[0, :] = True if shape[1] > 3 else mask[0, :]  # a fully padded row stays zero
    for m in (None, mask):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya = running_mean_native(xa, m)
        yb = running_mean_ref(xb, m)
        assert_close(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad, grad=True)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, T, C", [(1, 5, 300), (2, 1, 130), (3, 40, 64), (1, 33, 1), (5, 7, 200)])
def test_native_rows_cut_into_chunks(dtype, B, T, C, seed):
    # The kernel gives each task a batch row, cut into channel chunks when there are fewer rows than ~2 tasks per
    # thread: every thread count must give the same bits (each channel's sum runs in time order either way), and
    # unit-stride and strided channels (the two instantiations) the reference's values, forward and backward.
    before = torch.get_num_threads()
    x = torch.randn(B, T, C, dtype=dtype)
    mask = torch.rand(B, T) < 0.3
    cases = [
        (x, torch.randn(B, T, C, dtype=dtype)),
        (torch.randn(B, T, 2 * C, dtype=dtype)[..., ::2], torch.randn(B, C, T, dtype=dtype).transpose(1, 2)),
        (x, torch.randn(1, 1, 1, dtype=dtype).expand(B, T, C)),  # an expanded gradient, channel stride 0
    ]
    try:
        for xin, g in cases:
            for m in (None, mask):
                runs = []
                for n in (1, 2, 3, 5):
                    torch.set_num_threads(n)
                    xa = xin.detach().requires_grad_()  # a leaf with xin's strides
                    y = running_mean_native(xa, m)
                    y.backward(g)
                    runs.append((y.detach(), xa.grad))
                for y, gx in runs[1:]:
                    assert torch.equal(y, runs[0][0]) and torch.equal(gx, runs[0][1])
                xb = xin.detach().requires_grad_()
                yb = running_mean_ref(xb, m)
                yb.backward(g)
                assert_close(runs[0][0], yb)
                assert_close(runs[0][1], xb.grad, grad=True)
    finally:
        torch.set_num_threads(before)


@requires_native
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 4), (2, 0, 4), (0, 0, 0)])
def test_native_empty_inputs(shape):
    x = torch.randn(shape, requires_grad=True)
    y = running_mean_native(x, torch.zeros(shape[:2], dtype=torch.bool))
    y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape


@requires_native
def test_native_eager_and_custom_op_paths_agree(seed):
    # plain eager calls skip the custom op (an autograd.Function over the same bodies); torch.compile and dispatch
    # modes go through it: both give the same bits and gradients
    x = torch.randn(2, 9, 70)
    mask = torch.rand(2, 9) < 0.3
    g = torch.randn(2, 9, 70)
    outs = []
    for f in (running_mean_native, torch.compile(running_mean_native, backend="aot_eager", fullgraph=True)):
        xa = x.clone().requires_grad_()
        y = f(xa, mask)
        y.backward(g)
        outs.append((y.detach(), xa.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    from torch.utils.flop_counter import FlopCounterMode

    xa = x.clone().requires_grad_()
    assert "RunningMean" in running_mean_native(xa).grad_fn.name()
    with FlopCounterMode(display=False):  # a dispatch mode sees the op
        assert "RunningMean" not in running_mean_native(xa).grad_fn.name()


@requires_native
def test_native_non_contiguous_and_opcheck(seed):
    base = torch.randn(4, 10, 6)
    x = base.transpose(0, 1).transpose(0, 1)[:, ::2, 1:]  # strided, non-contiguous
    assert not x.is_contiguous()
    assert_close(running_mean_native(x), running_mean_ref(x))
    torch.library.opcheck(torch.ops.apt.running_mean.default, (torch.randn(2, 5, 3), None))
    torch.library.opcheck(torch.ops.apt.running_mean.default,
                          (torch.randn(2, 5, 3, requires_grad=True), torch.rand(2, 5) > 0.5))


@requires_native
def test_native_under_torch_compile(seed):
    x = torch.randn(2, 8, 4)
    f = torch.compile(running_mean_native, backend="eager", fullgraph=True)
    assert_close(f(x), running_mean_ref(x))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_value_at_a_padded_position_is_skipped(bad):
    """The reference multiplied x by the keep mask: 0 * inf = NaN at every later step. Reference, native and the
    TVA layer's gate input (non-causal mean, and the cached running mean) skip it."""
    from apt_kernels.layers.tva import TVAAttention

    x = torch.randn(2, 5, 4)
    x[0, 2, 1] = bad
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[0, 2] = True
    want = naive_running_mean(torch.where(m[..., None], 0.0, x), m).float()
    assert_close(running_mean_ref(x, m), want)
    assert_close(running_mean(x, m), want)
    layer = TVAAttention(4, 1, causal=False)
    assert torch.isfinite(layer._gate_input(x, m, None)).all()
    layer = TVAAttention(4, 1)
    cache = layer.new_cache(2)
    assert_close(layer._gate_input(x, m, cache), want)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x: expected 3 dims \(B, T, C\)"):
        running_mean(torch.randn(3, 4))
    with pytest.raises(TypeError, match="x: expected dtype in"):
        running_mean(torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, 3\)"):
        running_mean(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype torch.bool"):
        running_mean(torch.randn(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        running_mean([1, 2, 3])


@requires_native
def test_native_module_checks_its_inputs():
    from apt_kernels._native import native_module, view

    C = native_module()
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="out: expected size 3 in dim 1"):
        C.running_mean_cpu(view(x), None, view(torch.empty(2, 4, 4)))
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        C.running_mean_cpu(view(x), None, view(torch.empty(2, 3, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="x: expected 3 dims"):
        C.running_mean_cpu(view(torch.randn(2, 3)), None, view(torch.empty(2, 3)))
    with pytest.raises(TypeError, match="keep: expected dtype bool"):
        C.running_mean_cpu(view(x), view(torch.ones(2, 3)), view(torch.empty_like(x)))
    with pytest.raises(TypeError, match="tensor view tuple"):
        C.running_mean_cpu(x, None, None)
