"""MoE Triton kernels (routing positions, dispatch, combine and backwards) vs the reference under
TRITON_INTERPRET=1 on small shapes: identical routing decisions, values/gradients within tolerance."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from apt_kernels.backends import triton_interpret, triton_status  # noqa: E402
from apt_kernels.ops.moe import OPS, moe_combine, moe_dispatch, moe_route  # noqa: E402
from apt_kernels.reference.moe import (check_route_op, check_same_routing, expert_capacity,  # noqa: E402
                                      nan_router_probs, random_router_logits, wild_router_probs)
from apt_kernels.testing import assert_close  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not triton_status()[0], reason=triton_status()[1] or "triton unavailable")]

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret() else "cpu"


# sampled (N, E, k, capacity_factor, kind); kept small for the interpreter
CASES = [(1, 1, 1, None, "random"), (5, 2, 2, 0.5, "equal"), (9, 64, 4, 1.0, "dup"), (70, 8, 2, 1.25, "skew"),
         (130, 8, 1, 2.0, "random"), (260, 64, 2, None, "equal"), (33, 2, 1, 0.5, "dup")]


@pytest.mark.parametrize("n,e,k,cf,kind", CASES)
def test_triton_matches_reference(n, e, k, cf, kind):
    c = 20
    lg_ref = random_router_logits(n, e, kind, n + e + k).requires_grad_()
    lg = lg_ref.detach().to(DEVICE).requires_grad_()
    r_ref = moe_route(lg_ref, k, cf, min_capacity=2, impl="reference")
    r = moe_route(lg, k, cf, min_capacity=2, impl="triton")
    check_same_routing(r, r_ref)
    g = torch.Generator().manual_seed(n)
    x_ref = torch.randn(n, c, generator=g).requires_grad_()
    x = x_ref.detach().to(DEVICE).requires_grad_()
    buf_ref = moe_dispatch(x_ref, r_ref, impl="reference")
    buf = moe_dispatch(x, r, impl="triton")
    assert torch.equal(buf.cpu(), buf_ref)
    scale = torch.randn(buf_ref.shape[:-1] + (1,), generator=g)
    y_ref = moe_combine(buf_ref * scale, r_ref, impl="reference")
    y = moe_combine(buf * scale.to(DEVICE), r, impl="triton")
    assert_close(y.cpu(), y_ref, family="moe")
    gy = torch.randn(n, c, generator=g)
    (y_ref * gy).sum().backward()
    (y * gy.to(DEVICE)).sum().backward()
    assert_close(x.grad.cpu(), x_ref.grad, family="moe", grad=True)
    assert_close(lg.grad.cpu(), lg_ref.grad, family="moe", grad=True)


@pytest.mark.parametrize("n,e,k,cf", [(12, 2, 1, None), (12, 2, 2, 1.0), (15, 8, 4, 0.5), (15, 64, 2, None),
                                      (10, 64, 4, 1.25)])
def test_triton_nonfinite_logits_and_nan_probs(n, e, k, cf):
    """Logits with +inf, -inf and NaN entries through moe_route, probabilities mixing NaN with numbers through the
    route op: the reference's decisions (NaN above every number, NaNs by increasing expert index)."""
    lg = random_router_logits(n, e, "nonfinite", seed=n + e + k)
    check_same_routing(moe_route(lg.to(DEVICE), k, cf, min_capacity=2, impl="triton"),
                       moe_route(lg, k, cf, min_capacity=2, impl="reference"))
    for probs in (nan_router_probs(n, e, seed=n * e + k), wild_router_probs(n, e, seed=n + k)):
        check_route_op(OPS["triton"]["route"], probs.to(DEVICE), k, expert_capacity(n, e, k, cf, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_dtypes(dtype):
    n, e, k, c = 24, 4, 2, 33
    lg = torch.randn(n, e)
    r = moe_route(lg.to(DEVICE), k, 1.0, impl="triton")
    r_ref = moe_route(lg, k, 1.0, impl="reference")
    x = torch.randn(n, c).to(dtype)
    buf = moe_dispatch(x.to(DEVICE), r, impl="triton")
    assert torch.equal(buf.cpu(), moe_dispatch(x, r_ref, impl="reference"))
    assert_close(moe_combine(buf, r, impl="triton").cpu(), moe_combine(buf.cpu(), r_ref, impl="reference"),
                 family="moe")


def test_triton_rejects_fp64():
    lg = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        moe_route(lg.to(DEVICE), 2, 1.0, impl="triton")
