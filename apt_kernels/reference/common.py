"""Small reference ops shared by the families."""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import check_dtype, check_float, check_ndim, check_same_device, check_shape


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
