"""Determinism of the native CPU kernels and of the Trainer's seed (README: "Determinism on the CPU")."""
from __future__ import annotations

import random

import pytest
import torch

from apt_kernels.backends import native_family_status
from apt_kernels.ops.moe import moe_combine, moe_dispatch, moe_route
from apt_kernels.ops.scan import selective_scan_fn

needs_native = pytest.mark.skipif(not native_family_status("tva")[0], reason="needs the compiled module")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _at_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _tva():
    g = torch.Generator().manual_seed(0)
    q, k, v, d = (torch.randn(1, 3, 333, 32, generator=g).requires_grad_() for _ in range(4))
    gate = torch.rand(1, 333, 3, generator=g).requires_grad_()
    from apt.core.registry import REGISTRY
    o = REGISTRY.get("attention", "tva_cpu").forward(q, k, v, delta=d, gate=gate, coef=0.3)
    o.backward(torch.randn(o.shape, generator=g))
    return [o, q.grad, k.grad, v.grad, d.grad, gate.grad]


def _moe():
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 2, (9999, 7), generator=g).float().requires_grad_()  # many exact ties
    x = torch.randn(9999, 16, generator=g).requires_grad_()
    r = moe_route(logits, 3, 0.7, 4, None, impl="cpu_native")
    y = moe_combine(moe_dispatch(x, r, impl="cpu_native") * 2 - 1, r, impl="cpu_native")
    y.backward(torch.randn(y.shape, generator=g))
    return [r.expert_idx, r.slot, r.position, r.kept, r.token_of_slot, r.weights, y, x.grad, logits.grad]


def _scan():
    g = torch.Generator().manual_seed(2)
    u, dt, z = (torch.randn(3, 17, 129, generator=g).requires_grad_() for _ in range(3))
    A = (-torch.rand(17, 4, generator=g) - 0.1).requires_grad_()
    B, C = (torch.randn(3, 4, 129, generator=g).requires_grad_() for _ in range(2))
    D, bias = (torch.randn(17, generator=g).requires_grad_() for _ in range(2))
    y, last = selective_scan_fn(u, dt, A, B, C, D, z, bias, True, True)
    (y.sum() + last.sum()).backward()
    return [y, last, u.grad, dt.grad, z.grad], [A.grad, B.grad, C.grad, D.grad, bias.grad]


@needs_native
@pytest.mark.parametrize("make", [_tva, _moe])
def test_thread_count_invariant(make):
    one, two, again = _at_threads(1, make), _at_threads(2, make), _at_threads(2, make)
    for a, b, c in zip(one, two, again):
        assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(b), _bits(c))


@needs_native
def test_scan_thread_counts():
    (o1, p1), (o2, p2), (o2b, p2b) = _at_threads(1, _scan), _at_threads(2, _scan), _at_threads(2, _scan)
    for a, b in zip(o1, o2):  # output, last state, du, ddelta, dz: thread-count invariant
        assert torch.equal(_bits(a), _bits(b))
    for a, b in zip(o2 + p2, o2b + p2b):  # one thread count: run to run identical
        assert torch.equal(_bits(a), _bits(b))
    for a, b in zip(p1, p2):  # parameter gradients: reduction order only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trainer_seeds_python_random(tmp_path):
    from apt.core.config import load_profile
    from apt.training.trainer import Trainer

    draws = []
    for i in range(2):
        random.seed(1000 + i)  # whatever state the process had
        cfg = load_profile("tiny_debug", ["training.max_steps=1", "training.progress=false", "training.eval=false",
                                          f"training.out_dir={tmp_path / str(i)}"])
        Trainer(cfg)
        draws.append(random.random())
    assert draws[0] == draws[1]
