"""Argument checks shared by the public ops: each raises ValueError/TypeError naming the argument and what was
expected."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str = "") -> None:
    check_tensor(name, t)
    if t.dim() != ndim:
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected {ndim} dims{hint}, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], layout: str = "") -> None:
    check_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected shape {tuple(shape)}{hint}, got {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    check_tensor(name, t)
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    check_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {t.device}")


def check_finite_scalar(name: str, value: float) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value}")
