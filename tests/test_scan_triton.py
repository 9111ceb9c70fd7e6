"""Triton selective scan kernels under TRITON_INTERPRET=1 (tiny shapes; the interpreter is slow) vs the fp64
reference: forward, every gradient, layouts, fp16/bf16, strides, decode step, provider."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the Triton kernels

import pytest  # noqa: E402
import torch  # noqa: E402

import apt_kernels.ops.scan as scan_ops  # noqa: E402
from apt_kernels.backends import triton_status  # noqa: E402
from apt_kernels.ops.scan import selective_scan_triton, selective_state_update_triton  # noqa: E402
from apt_kernels.reference.scan import (check_scan_against_reference, random_scan_inputs,  # noqa: E402
                                        selective_state_update_ref)
from apt_kernels.testing import assert_close  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not triton_status()[0], reason=triton_status()[1] or "n/a")]


@pytest.mark.parametrize("case", [
    ("const", "const", True, True, True, True),
    ("var", "var", True, True, True, True),
    ("group", "group", False, False, False, False),
    ("var", "group", True, False, True, False),
    ("group", "const", False, True, False, True),
])
def test_triton_matches_reference(case, monkeypatch):
    lb, lc, D, z, bias, sp = case
    monkeypatch.setattr(scan_ops, "CHUNK", 4)  # several checkpoints and a ragged last chunk
    x = random_scan_inputs(2, 6, 10, 5, layout_B=lb, layout_C=lc, groups=3, with_D=D, with_z=z, with_bias=bias,
                           generator=torch.Generator().manual_seed(1))
    check_scan_against_reference(selective_scan_triton, x, softplus=sp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype, monkeypatch):
    monkeypatch.setattr(scan_ops, "CHUNK", 4)
    x = random_scan_inputs(1, 4, 7, 4, layout_B="group", layout_C="var", groups=2, dtype=dtype,
                           generator=torch.Generator().manual_seed(2))
    check_scan_against_reference(selective_scan_triton, x, softplus=True)


def test_triton_length_one_and_non_contiguous():
    g = torch.Generator().manual_seed(3)
    x = random_scan_inputs(1, 3, 1, 2, generator=g)
    check_scan_against_reference(selective_scan_triton, x, softplus=True)
    x = random_scan_inputs(2, 4, 6, 3, layout_B="var", layout_C="const", generator=g)
    for k in ("u", "delta", "z"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    x["B"] = torch.randn(2, 6, 3, generator=g).transpose(1, 2)
    x["A"] = (-torch.rand(3, 4, generator=g)).t()
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous()
    check_scan_against_reference(selective_scan_triton, x, softplus=False)


def test_triton_state_update():
    g = torch.Generator().manual_seed(4)
    b, dim, N = 2, 6, 5
    for B, C in [(torch.randn(b, N, generator=g), torch.randn(b, 3, N, generator=g)),
                 (torch.randn(b, 2, N, generator=g), torch.randn(b, N, generator=g))]:
        state = torch.randn(b, dim, N, generator=g)
        x, dt, z = (torch.randn(b, dim, generator=g) for _ in range(3))
        A, D, bias = -torch.rand(dim, N, generator=g), torch.randn(dim, generator=g), torch.randn(dim, generator=g)
        s1, s2 = state.clone(), state.clone()
        y1 = selective_state_update_triton(s1, x, dt, A, B, C, D, z, bias, True)
        y2 = selective_state_update_ref(s2, x, dt, A, B, C, D, z, bias, True)
        assert_close(y1, y2, family="scan")
        assert_close(s1, s2, family="scan")


def test_triton_rejects_fp64_and_provider():
    from apt.core import registry

    x = random_scan_inputs(1, 2, 3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="u: the Triton scan takes float32"):
        selective_scan_triton(**x)
    prov = registry.get("scan", "triton")
    assert registry.get_info("scan", "triton").priority == 20
    assert any("float64" in r for r in prov.supports(**x))
    y = random_scan_inputs(1, 2, 3, 2)
    assert any("u: cpu tensor" in r for r in prov.supports(**y))  # runs, but select() should prefer cpu_native
    assert_close(prov.selective_scan_fn(**y), scan_ops.selective_scan_ref(**y), family="scan")


def test_triton_wide_delta_and_empty_inputs():
    """fp32 delta/z/dt next to fp16 u/x are used at fp32; zero batch, dim or N give empty outputs."""
    from apt_kernels.reference.scan import check_empty_scan, check_wide_delta_next_to_half_u

    check_wide_delta_next_to_half_u(selective_scan_triton, selective_state_update_triton)
    for shape in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        check_empty_scan(selective_scan_triton, selective_state_update_triton, *shape)
