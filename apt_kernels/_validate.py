"""Argument checks shared by the public ops: each raises ValueError/TypeError naming the argument and what was
expected."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    # the kernels read strided memory: a sparse or nested tensor failed deep inside (a data-pointer RuntimeError, or
    # an op the sparse backend lacks) or, in some references, ran on
    if t.is_nested:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a nested tensor")
    if t.layout is not torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {str(t.layout).replace('torch.', '')}")
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
    if allowed is FLOAT_DTYPES and t.dtype in FLOAT_DTYPES:  # the default: no tuple() of it per call
        return
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
        if t is not None and check_tensor(name, t).device != ref.device:  # a list/array: TypeError, not AttributeError
            raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {t.device}")


def check_finite_scalar(name: str, value: float) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value}")


def check_flag(name: str, value: object) -> None:
    """A bool option: a string such as "no" would otherwise count as True. The type in the message is qualified
    outside builtins: numpy's bool is named ``bool`` too ("expected a bool, got bool np.True_")."""
    if not isinstance(value, bool):
        tp = type(value)
        what = tp.__name__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
        raise TypeError(f"{name}: expected a bool (True or False), got {what} {value!r}")


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """``t`` is written in place, so no two of its elements may share memory (an expanded view, stride 0, or an
    overlapping as_strided view would have one element's update read as another's). Sufficient test: with the
    dims of size > 1 by increasing stride, each stride passes the span of the dims before it."""
    if t.is_contiguous():  # the common case, and decided without comparing symbolic strides under torch.compile
        return
    # an insertion sort by stride, not sorted(): dynamo cannot trace sorted() over symbolic sizes (dynamic shapes);
    # equal strides need no order between them, the second fails the test either way
    dims: list[tuple[int, int]] = []
    for st, sz in zip(t.stride(), t.shape):
        if sz > 1:
            i = len(dims)
            while i > 0 and dims[i - 1][0] > st:
                i -= 1
            dims.insert(i, (st, sz))
    span = 1
    for stride, size in dims:
        if stride < span:
            raise ValueError(f"{name}: is updated in place, so its elements must not share memory; got shape "
                             f"{tuple(t.shape)} with strides {tuple(t.stride())} (an expanded or overlapping view); "
                             "pass a tensor of its own, e.g. .clone()")
        span += (size - 1) * stride
