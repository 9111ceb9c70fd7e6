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
