"""Test helpers and THE tolerance table: every kernel-vs-reference comparison in tests/ and in `apt bench`
takes its tolerances from here, keyed by dtype with per-family overrides, so they are stated in one place.

Why these numbers: fp32 kernels reorder sums (blocked softmax, chunked scans), giving ~1e-5 relative error;
fp16 has a 10-bit mantissa (~1e-3), bf16 an 7-bit one (~8e-3) and both are compared after the kernel's output is
rounded to that dtype; long recurrences (the scan) and long softmax rows accumulate a bit more.

The table holds for moderately sharp softmax (the default scale 1/sqrt(D), random inputs). Fused attention kernels
in fp16/bf16 round P and dS to the input dtype before their matmuls, as flash-attn does, so with a sharper softmax
(a scale well above 1/sqrt(D)) a few dq/dk/dv elements leave the table while staying within the low-precision
criterion below (assert_lowp_accurate: at most LOWP_FACTOR x the error of the reference run in that dtype), which
is the test of record for those gradients (tests/test_lowp_accuracy.py, tests/test_triton_lowp.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-9, "rtol": 1e-7},
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}

# Gradients go through one more reduction (over T or over tokens) than outputs.
GRAD_SCALE = 4.0

FAMILY_OVERRIDES: dict[tuple[str, torch.dtype], dict[str, float]] = {
    ("scan", torch.float32): {"atol": 3e-4, "rtol": 3e-4},
    ("scan", torch.float16): {"atol": 1e-2, "rtol": 1e-2},
    ("scan", torch.bfloat16): {"atol": 5e-2, "rtol": 5e-2},
    ("attention", torch.float16): {"atol": 4e-3, "rtol": 4e-3},
    ("attention", torch.bfloat16): {"atol": 3e-2, "rtol": 3e-2},
}


def tolerance(dtype: torch.dtype, family: Optional[str] = None, grad: bool = False) -> dict[str, float]:
    """atol/rtol for comparing a kernel's output (or gradient, with ``grad=True``) to the reference."""
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype: no tolerance for {dtype} (the table has {', '.join(map(str, TOLERANCES))})")
    tol = dict(FAMILY_OVERRIDES.get((family, dtype), TOLERANCES[dtype]))
    if grad:
        tol = {k: v * GRAD_SCALE for k, v in tol.items()}
    return tol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 family: Optional[str] = None, grad: bool = False, msg: str = "", equal_nan: bool = False) -> None:
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's dtype); with
    ``equal_nan`` a NaN matches a NaN in the same place."""
    dtype = dtype or expected.dtype
    tol = tolerance(dtype, family, grad)
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=tol["atol"], rtol=tol["rtol"],
                               equal_nan=equal_nan, msg=(lambda m: f"{msg}: {m}") if msg else None)


# The low-precision criterion (tests/test_lowp_accuracy.py), as flash-attn and mamba-ssm test their kernels: a
# kernel run in fp16/bf16 may be at most LOWP_FACTOR times as far from the float64 truth (computed from the same
# rounded inputs) as the reference run on those low-precision inputs, plus LOWP_EPS x max|truth| (fp32 reordering
# noise on tensors kept in fp32: dA, dD, ...). The table above let a kernel 10x less accurate pass.
LOWP_FACTOR = 2.0
LOWP_EPS = 1e-5


def assert_lowp_accurate(name: str, kernel: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                         factor: float = LOWP_FACTOR) -> None:
    """Max and mean |kernel - truth| within ``factor`` x those of |ref - truth| (+ LOWP_EPS x max|truth|)."""
    kernel, ref, truth = kernel.detach(), ref.detach(), truth.detach().double()
    ek, er = (kernel.double() - truth).abs(), (ref.double() - truth).abs()
    eps = LOWP_EPS * float(truth.abs().max()) + 1e-30
    for what, a, b in (("max", ek.max(), er.max()), ("mean", ek.mean(), er.mean())):
        if not a <= factor * b + eps:
            raise AssertionError(f"{name}: {what} error {float(a):.3e} > {factor} x the low-precision reference's "
                                 f"{float(b):.3e} (+{eps:.1e}); ratio {float(a / (b + eps)):.2f}")


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / (max |e| + tiny), a scale-free error figure used by `apt bench`'s correctness check."""
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / (e.abs().max() + 1e-12)) if e.numel() else 0.0


def run_with_grads(fn: Callable[[dict], Any], inputs: dict, dtype: Optional[torch.dtype], grad_out: torch.Tensor,
                    names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fn(inputs, floating tensors cast to ``dtype`` (None: kept)) -> (output, grads of the tensors in names)."""
    a = {k: (v.detach().to(dtype or v.dtype).requires_grad_(k in names)
             if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    out = fn(a)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out, [a[n] for n in names], grad_out.to(out.dtype))
    return out, dict(zip(names, grads))


def assert_lowp_pipeline(kern_fn: Callable[[dict], Any], ref_fn: Callable[[dict], Any], inputs: dict,
                         names: Sequence[str], gout_shape: Sequence[int], dtype: torch.dtype, seed: int = 1,
                         checked: Optional[Sequence[str]] = None) -> None:
    """The low-precision criterion for a whole call, output and the gradients of ``names`` (those of ``checked``
    only, when given; all are differentiated): ``kern_fn`` and ``ref_fn`` on the (low-precision) inputs, the truth
    from ``ref_fn`` on them in float64, one rounded upstream gradient for all three."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(tuple(gout_shape), generator=g).to(dtype)  # rounded: the truth sees the same upstream gradient
    yt, gt = run_with_grads(ref_fn, inputs, torch.float64, go, names)
    yk, gk = run_with_grads(kern_fn, inputs, None, go, names)
    yr, gr = run_with_grads(ref_fn, inputs, None, go, names)
    assert yk.dtype == yr.dtype, f"output dtype {yk.dtype}, the reference's {yr.dtype}"
    assert_lowp_accurate("out", yk, yr, yt)
    for n in (names if checked is None else checked):
        assert gk[n].dtype == gr[n].dtype, f"d{n} dtype {gk[n].dtype}, the reference's {gr[n].dtype}"
        assert_lowp_accurate(f"d{n}", gk[n], gr[n], gt[n])
