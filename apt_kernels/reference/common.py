"""Small reference ops shared by the families."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch

from .._validate import check_dtype, check_float, check_ndim, check_same_device, check_shape

F = TypeVar("F", bound=Callable[..., Any])


def without_autocast(fn: F) -> F:
    """Runs ``fn`` with autocast off on its tensors' device (the first tensor argument's) when it is on there: the
    references accumulate in fp32 (fp64) as documented and as the fused kernels do, where autocast would run their
    matmuls / einsums in its low dtype (P rounded to bf16 before P @ V), and the reference would disagree with every
    fused provider."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        dev = x.device.type if x is not None else None
        if dev is not None and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def check_running_mean_args(x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> None:
    """The running mean's argument checks (the reference and the native op)."""
    check_ndim("x", x, 3, "(B, T, C)")
    check_float("x", x)
    if key_padding_mask is not None:
        check_shape("key_padding_mask", key_padding_mask, x.shape[:2], "(B, T)")
        check_dtype("key_padding_mask", key_padding_mask, torch.bool)
        check_same_device("x", x, key_padding_mask=key_padding_mask)


def running_mean_ref(x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal running mean over dim 1 of ``x`` (B, T, C), skipping padded positions (mask True = padded).

    ``out[b, t] = mean(x[b, s] for s <= t if not padded[b, s])``, and 0 before the first kept position.
    Accumulates in fp32 (fp64 for fp64 input); returns x's dtype.
    """
    check_running_mean_args(x, key_padding_mask)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    if key_padding_mask is None:
        keep = torch.ones(x.shape[:2], dtype=acc, device=x.device)
        num = torch.cumsum(xa, dim=1)
    else:
        keep = (~key_padding_mask).to(acc)
        # a select, not x * keep: inf or NaN at a padded position would make 0 * inf = NaN for every later step
        num = torch.cumsum(torch.where(key_padding_mask[..., None], xa.new_zeros(()), xa), dim=1)
    cnt = torch.cumsum(keep, dim=1).clamp_min(1.0)
    return (num / cnt[..., None]).to(x.dtype)
