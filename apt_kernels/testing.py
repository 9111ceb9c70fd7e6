"""Test helpers and THE tolerance table: every kernel-vs-reference comparison in tests/ and in `apt bench`
takes its tolerances from here, keyed by dtype with per-family overrides, so they are stated in one place.

Why these numbers: fp32 kernels reorder sums (blocked softmax, chunked scans), giving ~1e-5 relative error;
fp16 has a 10-bit mantissa (~1e-3), bf16 an 7-bit one (~8e-3) and both are compared after the kernel's output is
rounded to that dtype; long recurrences (the scan) and long softmax rows accumulate a bit more.
"""
from __future__ import annotations

from typing import Optional

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


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / (max |e| + tiny), a scale-free error figure used by `apt bench`'s correctness check."""
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / (e.abs().max() + 1e-12)) if e.numel() else 0.0
