"""First-order-only backwards for the eager autograd.Functions over the native kernels.

The kernels' backwards are kernels too, with no backward of their own. torch's ``once_differentiable`` attaches its
"differentiate twice" error only when an incoming gradient requires grad; when it does not (a loss linear in the
op's output, then ``torch.autograd.grad(..., create_graph=True)``), the gradients came back without a graph and a
second derivative through them was silently wrong (the op's own second-order terms dropped) or None.
:func:`first_order_only` raises instead whenever backward runs with ``create_graph=True``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch

# what once_differentiable uses: a node whose backward raises the given message (None: a torch without it)
_DelayedError = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)

__all__ = ["first_order_only", "no_double_backward", "double_backward_message", "refuse_transformed"]


def double_backward_message(op: str) -> str:
    return (f"apt_kernels.{op}: the native kernels have no double backward (their backward is once_differentiable); "
            "use the reference provider (impl='reference'; a layer's reference core or router, e.g. "
            "MoEFFN(router_impl='reference')) for higher-order gradients")


class _RaiseOnBackward(torch.autograd.Function):
    """The fallback for a torch without DelayedError: the first ``n`` tensors through, a backward that raises."""

    @staticmethod
    def forward(message: str, n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def no_double_backward(op: str, grads: Any, anchors: Sequence[Any] = (), message: Optional[str] = None) -> Any:
    """``grads`` (a backward's return: a tensor, or a tuple of tensors and None) with every tensor given a grad_fn
    that raises :func:`double_backward_message` when it is differentiated. ``anchors``: what the gradients depend
    on (the saved inputs, the incoming gradients); those that require grad become the error node's inputs, so that
    it lies on every path from the gradients to them (with fake leaves, as once_differentiable makes them, a
    ``torch.autograd.grad(..., inputs=[q])`` prunes the node and returns a wrong second derivative). Without an
    anchor that requires grad the gradients are constants, which is right, and are returned as they are."""
    single = not isinstance(grads, tuple)
    out = [grads] if single else list(grads)
    idx = [i for i, g in enumerate(out) if isinstance(g, torch.Tensor)]
    deps = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    if not idx or not deps:
        return grads
    message = message or double_backward_message(op)
    tensors = [out[i] for i in idx] + deps
    if _DelayedError is not None:
        wrapped = _DelayedError(message.encode(), len(tensors))(*tensors)
    else:
        wrapped = _RaiseOnBackward.apply(message, len(idx), *tensors)
    if isinstance(wrapped, torch.Tensor):
        wrapped = (wrapped,)
    for i, w in zip(idx, wrapped):
        out[i] = w
    return out[0] if single else tuple(out)


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _functorch_wrapped(tensors: Sequence[Any]) -> bool:
    """Whether any of ``tensors`` is a torch.func wrapper (live or dead), or a legacy batched gradient
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``torch.autograd.functional.jacobian(vectorize=True)``),
    which has no storage to read."""
    return any(isinstance(t, torch.Tensor) and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                                                or _is_legacy_batched(t)) for t in tensors)


_USE_AUTO = "use impl='auto', which takes the reference there, or impl='reference'"


def refuse_transformed(op: str, *tensors: Optional[torch.Tensor], grad_ok: bool = False,
                       instead: str = _USE_AUTO) -> None:
    """Raise the op's clear error where its Function cannot run: under vmap (no batching rule) and jvp (no jvp),
    for forward-mode AD dual tensors, and, unless ``grad_ok`` (a backward in torch ops), under grad / vjp /
    jacrev, whose wrapped gradients the kernels' backward cannot read. torch's own errors ("does not have vmap
    support", "must implement the jvp function", "Cannot access data pointer") named only the Function. The
    dispatching entry points (impl='auto') take the reference there; ``instead`` says what to call (an op
    without an ``impl`` argument names its dispatching and reference functions)."""
    if torch.compiler.is_compiling():  # dynamo traces transforms itself
        return
    # the interpreter stack only when a transform is active: building it cost more than this whole check
    stack = (torch._C._functorch.get_interpreter_stack() or ()) if torch._C._are_functorch_transforms_active() else ()
    keys = {i.key() for i in stack}
    tt = torch._C._functorch.TransformType
    if tt.Vmap in keys or tt.Jvp in keys or (tt.Grad in keys and not grad_ok) \
            or (not stack and _functorch_wrapped(tensors)):  # a dead wrapper: kept from a transform that has exited
        raise RuntimeError(f"apt_kernels.{op}: the native and Triton kernels do not run under torch.func transforms "
                           "(vmap, grad, jvp, jacrev: their wrapped tensors have no data to read); " + instead)
    if torch.autograd.forward_ad._current_level >= 0 and any(
            t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"apt_kernels.{op}: the native and Triton kernels have no forward-mode AD (jvp) for dual "
                           "tensors; " + instead)


class _SavedOnce:
    """A backward ctx whose ``saved_tensors`` were unpacked already (every other attribute is the ctx's)."""

    def __init__(self, ctx: Any, saved: tuple) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", saved)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._ctx, name, value)


def first_order_only(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an autograd.Function's ``backward(ctx, *grads)`` whose body is kernels autograd cannot see:
    the body runs under no_grad, and when backward runs with grad mode on (``create_graph=True``), whether or not
    the incoming gradients require grad, the returned gradients raise on differentiation instead of carrying no
    graph (a silently wrong or None second derivative). Replaces ``once_differentiable``. Under a torch.func
    transform it raises a clear error (the kernels cannot read the transforms' wrapped tensors)."""

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            # unpack the saved tensors once: non-reentrant activation checkpointing (torch.utils.checkpoint,
            # use_reentrant=False) recomputes them and allows one unpack per backward ("Unpack is being triggered
            # for a tensor that was already unpacked once"); the body reads them through _SavedOnce
            saved = ctx.saved_tensors
            if torch._C._are_functorch_transforms_active() or _functorch_wrapped((*saved, *grads)):
                # torch.func.grad/vjp hand backward wrapped tensors, which have no data for the kernels to read;
                # torch.func.vjp's vjp_fn runs backward after the transform has exited (no transform active), on
                # the now dead wrappers saved in its forward: the kernels failed with "Cannot access data pointer"
                raise RuntimeError(f"apt_kernels.{op}: the native kernels' backward does not run under torch.func "
                                   "transforms (grad, vjp, jacrev) nor on batched gradients (is_grads_batched=True, "
                                   "jacobian(vectorize=True)); use torch.autograd without batching, or the reference "
                                   "provider (impl='reference')")
            with torch.no_grad():
                out = backward(_SavedOnce(ctx, saved), *grads)
            if not torch.is_grad_enabled():
                return out
            return no_double_backward(op, out, (*saved, *grads))

        return wrapper

    return decorate
