"""Perplexity of a model on a text: ``ppl = exp(mean NLL)`` over every token after the first (the first token has
no context to be predicted from).

Sliding window (models with a context length ``window``, e.g. GPT): targets are scored in chunks of ``stride``
tokens; the chunk of targets ``[s, e)`` is predicted from one forward over ``ids[max(0, e-1-context) : e-1]``, so
each target sees at least ``context - stride + 1`` tokens of context (all earlier tokens near the start) and is
scored exactly once. ``stride == context`` is plain chunked evaluation (cheapest); smaller strides give more
context per token at more compute. Defaults: ``context`` = the model's window, ``stride`` = context // 2.

Recurrent models (no window, with ``new_cache``, e.g. Mamba) are streamed through their cache in chunks of
``context`` tokens (default 512), so every token sees the whole text before it; ``stride`` has no meaning there
(a stride other than ``context`` is ignored with a warning).

``bits_per_byte`` = total NLL / ln 2 / UTF-8 bytes of the scored tokens (the text less its first token, which is
not predicted): comparable across tokenizers. A file is scored
as its bytes: a leading byte-order mark is skipped (training skips it too) and bytes that are not UTF-8 reach the
tokenizer as they are (not as the 3 bytes of U+FFFD each).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..data.tokenizers import read_text_file, utf8_bytes
from .generate import model_device, model_window, supports_cache

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    perplexity: float
    tokens: int  # predicted tokens (all but the first)
    forwards: int  # model calls
    context: int
    stride: int
    bits_per_byte: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(b, s, e): forward over ids[b:e-1], score targets s..e-1."""
    out = []
    s = 1
    while s < n:
        e = min(s + stride, n)
        out.append((max(0, e - 1 - context), s, e))
        s = e
    return out


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: Union[Sequence[int], torch.Tensor], context: Optional[int] = None,
               stride: Optional[int] = None, batch_size: int = 8) -> EvalResult:
    """Perplexity of ``model`` on the token sequence ``ids`` (see the module docstring for the windows)."""
    ids_t = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
    n = ids_t.numel()
    if n < 2:
        raise ValueError(f"ids: need at least 2 tokens to score, got {n}")
    window = model_window(model)
    device = model_device(model)
    streaming = window is None and supports_cache(model)
    for name, value in (("context", context), ("stride", stride), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if context is None:
        context = window if window is not None else 512
    if context < 1:
        raise ValueError(f"context: must be >= 1, got {context}")
    if window is not None and context > window:
        raise ValueError(f"context: {context} exceeds the model's window (max_seq_len {window})")
    if stride is None:
        stride = context if streaming else max(1, context // 2)
    if not 1 <= stride <= context:
        raise ValueError(f"stride: must be in [1, context={context}], got {stride}")
    if streaming and stride != context:
        logger.warning("perplexity: stride %d ignored: a recurrent model is streamed through its cache in chunks of "
                       "context=%d tokens, every token seeing the whole text before it", stride, context)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total = 0.0
    forwards = 0
    try:
        if streaming:
            cache = model.new_cache(1)
            for start in range(0, n - 1, context):
                x = ids_t[start:min(start + context, n - 1)].to(device)
                y = ids_t[start + 1:start + 1 + x.numel()].to(device)
                logp = torch.log_softmax(model(x[None], cache=cache)[0].float(), -1)
                total -= float(logp.gather(-1, y[:, None]).sum())
                forwards += 1
            stride = context
        else:
            wins = _windows(n, context, stride)
            by_len: dict[int, list[tuple[int, int, int]]] = {}
            for b, s, e in wins:
                by_len.setdefault(e - 1 - b, []).append((b, s, e))
            for length, group in by_len.items():
                for i in range(0, len(group), batch_size):
                    part = group[i:i + batch_size]
                    x = torch.stack([ids_t[b:e - 1] for b, _, e in part]).to(device)
                    logp = torch.log_softmax(model(x).float(), -1)
                    forwards += 1
                    for row, (b, s, e) in enumerate(part):
                        pos = torch.arange(s - 1 - b, e - 1 - b, device=device)
                        tgt = ids_t[s:e].to(device)
                        total -= float(logp[row, pos, tgt].sum())
    finally:
        model.train(was_training)
    count = n - 1
    nll = total / count
    return EvalResult(nll=nll, perplexity=math.exp(min(nll, 700.0)), tokens=count, forwards=forwards,
                      context=int(context), stride=int(stride))


def evaluate_text(model: torch.nn.Module, tokenizer: Any, text: str, context: Optional[int] = None,
                  stride: Optional[int] = None, batch_size: int = 8) -> EvalResult:
    ids = list(tokenizer.encode(text))
    if len(ids) < 2:
        raise ValueError("text: too short to evaluate (needs at least 2 tokens)")
    res = perplexity(model, ids, context=context, stride=stride, batch_size=batch_size)
    # the bytes the NLL covers: the first token is not scored (a BPE's first token may be a whole word: counting
    # its bytes made bits_per_byte of a 23-byte text whose first token held 20 of them 8x too small)
    nbytes = len(utf8_bytes(text)) - _token_bytes(tokenizer, ids[0])
    if nbytes > 0:
        res.bits_per_byte = res.nll * res.tokens / math.log(2) / nbytes
    return res


def _token_bytes(tokenizer: Any, token: int) -> int:
    """UTF-8 bytes of one token id: a BPE's ``vocab`` entry, one byte for a byte-level id, else its decoding."""
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(vocab, dict) and token in vocab:
        return len(vocab[token])
    if getattr(tokenizer, "name", None) == "byte":
        return 1 if 0 <= token < 256 else 0
    return len(utf8_bytes(tokenizer.decode([token])))


def evaluate_file(model: torch.nn.Module, tokenizer: Any, path: Union[str, os.PathLike],
                  context: Optional[int] = None, stride: Optional[int] = None, batch_size: int = 8) -> EvalResult:
    """Perplexity on a UTF-8 text file (FileNotFoundError when missing, ValueError when too short)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    text = read_text_file(p)  # as the txt dataset reads it for training
    try:
        return evaluate_text(model, tokenizer, text, context, stride, batch_size)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None
