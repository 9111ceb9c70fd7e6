"""From a profile's ``data:`` section to batches: documents (a ``dataset`` provider) -> token ids (the tokenizer,
documents joined with end-of-text) -> a train/validation split -> (input, target) windows.

Batches are random windows of ``seq_len + 1`` tokens drawn with a generator seeded by (seed, epoch), so an epoch's
batch order is a pure function of the seed and the epoch number: a resumed run skips the batches it already
consumed and sees exactly what an uninterrupted run would.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from ..core import registry
from ..core.settings import as_number
from .tokenizers import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
DEFAULT_CORPUS = CORPUS_DIR / "tiny.txt"


def load_texts(data_cfg: Mapping[str, Any]) -> list[str]:
    path = data_cfg.get("path") or DEFAULT_CORPUS
    name = data_cfg.get("dataset") or "txt"
    try:  # strict: a misspelt 'jsnol' fell back to txt and trained on the raw JSON markup
        provider = registry.get("dataset", name, strict=True)
    except registry.RegistryError as exc:
        raise ValueError(f"data.dataset: {exc}") from None
    texts = provider.load_texts(path, text_field=data_cfg.get("text_field", "text"))  # type: ignore[attr-defined]
    if not any(texts):  # an empty file: "the training split needs at least 2 tokens, got 1" named neither
        raise ValueError(f"data.path: {path} holds no text (empty)")
    return texts


def build_tokenizer(data_cfg: Mapping[str, Any], texts: Optional[list[str]] = None) -> Tokenizer:
    name = data_cfg.get("tokenizer", "byte")
    if name == "bpe" and not data_cfg.get("tokenizer_path"):
        if texts is None:
            texts = load_texts(data_cfg)
        return get_tokenizer("bpe", train_text="\n".join(texts), vocab_size=int(data_cfg.get("bpe_vocab_size", 512)))
    return get_tokenizer(name, path=data_cfg.get("tokenizer_path"))


def encode_texts(texts: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


IGNORE_INDEX = -100  # a target not to score (torch's cross_entropy default)


class TokenBatches:
    """Random (input, target) windows over a 1-D token tensor. ``batches(epoch, n)`` yields ``n`` batches."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0,
                 split: str = "training") -> None:
        as_number("seq_len", seq_len, integer=True, low=1)
        as_number("batch_size", batch_size, integer=True, low=1)
        if tokens.numel() < 2:
            raise ValueError(f"dataset: the {split} split needs at least 2 tokens, got {tokens.numel()}")
        # A corpus shorter than a window: train on shorter windows rather than fail.
        self.seq_len = min(seq_len, tokens.numel() - 1)
        if self.seq_len < seq_len:
            logger.warning("dataset: the %s split has only %d tokens; using windows of %d instead of %d "
                           "(data.seq_len)", split, tokens.numel(), self.seq_len, seq_len)
        self.tokens = tokens
        self.batch_size = batch_size
        self.seed = seed

    @property
    def num_windows(self) -> int:
        return self.tokens.numel() - self.seq_len

    def default_batches_per_epoch(self) -> int:
        """About one pass over the tokens."""
        return max(1, self.tokens.numel() // (self.seq_len * self.batch_size))

    def batch_at(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.num_windows, (self.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        win = self.tokens[idx]
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def batches(self, epoch: int, num_batches: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # mod 2**64: manual_seed takes 64 bits, and a large seed (10**14) overflowed; small seeds are unchanged
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 64))
        for i in range(num_batches):
            b = self.batch_at(gen)
            if i >= skip:
                yield b

    def sequential(self, max_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in order (for validation): every target token once. The tokens past the last
        whole window come in one more window, the last ``seq_len + 1`` tokens, whose targets already scored are
        ``IGNORE_INDEX`` (cross_entropy's default ignore_index), so they keep a full window of context."""
        n = (self.tokens.numel() - 1) // self.seq_len
        rest = self.tokens.numel() - 1 - n * self.seq_len
        pairs = [(w[:-1], w[1:]) for w in (self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1]
                                           for i in range(n))]
        if rest:  # the tail was never scored: (n-1) % seq_len tokens, up to a window's worth
            tail = self.tokens[-(self.seq_len + 1):]
            y = tail[1:].clone()
            y[:self.seq_len - rest] = IGNORE_INDEX
            pairs.append((tail[:-1], y))
        count = 0
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            yield torch.stack([x for x, _ in chunk]), torch.stack([y for _, y in chunk])
            count += 1
            if max_batches is not None and count >= max_batches:
                return


def build_data(data_cfg: Mapping[str, Any], seed: int = 0, tokenizer: Optional[Tokenizer] = None
               ) -> tuple[Tokenizer, TokenBatches, Optional[TokenBatches]]:
    """(tokenizer, train batches, validation batches or None) for a profile's ``data:`` section."""
    texts = load_texts(data_cfg)
    seq_len, bs = data_cfg.get("seq_len", 128), data_cfg.get("batch_size", 8)
    as_number("seq_len", seq_len, integer=True, low=1)
    as_number("batch_size", bs, integer=True, low=1)
    vf = data_cfg.get("val_fraction", 0.0) or 0.0
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:  # NaN fails too
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {vf!r}")
    min_val = 2 * min(seq_len, 8) + 2
    if tokenizer is None and vf > 0 and _trains_tokenizer(data_cfg):
        # a tokenizer trained on the corpus sees the training text only: the last val_fraction of the characters
        # is the validation split (the BPE merges were learnt from the validation text too)
        train_texts, val_texts = split_texts(texts, vf)
        tok = build_tokenizer(data_cfg, train_texts)
        train, held = encode_texts(train_texts, tok), encode_texts(val_texts, tok)
        if held.numel() >= min_val and train.numel() > 2:
            return tok, TokenBatches(train, seq_len, bs, seed), TokenBatches(held, seq_len, bs, seed, "validation")
        _warn_no_validation(vf, held.numel(), min_val)
        return tok, TokenBatches(torch.cat([train, held]), seq_len, bs, seed), None
    tok = tokenizer if tokenizer is not None else build_tokenizer(data_cfg, texts)
    tokens = encode_texts(texts, tok)
    n_val = int(tokens.numel() * vf)
    val = None
    if n_val > 0 and n_val >= min_val and tokens.numel() - n_val > 2:
        val = TokenBatches(tokens[-n_val:], seq_len, bs, seed, "validation")
        tokens = tokens[:-n_val]
    elif vf > 0:
        _warn_no_validation(vf, n_val, min_val)
    return tok, TokenBatches(tokens, seq_len, bs, seed), val


def _warn_no_validation(vf: float, n_val: int, min_val: int) -> None:
    # val_fraction > 0 with too small a corpus used to train on everything with no validation, silently
    logger.warning("dataset: val_fraction=%g leaves %d validation tokens (at least %d needed): no validation split, "
                   "every token is trained on", vf, n_val, min_val)


def _trains_tokenizer(data_cfg: Mapping[str, Any]) -> bool:
    return data_cfg.get("tokenizer", "byte") == "bpe" and not data_cfg.get("tokenizer_path")


def split_texts(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(head, tail) of the documents with the tail holding the last ``fraction`` of the characters (counting one
    separator per document); the document at the cut is cut in two."""
    total = sum(len(t) + 1 for t in texts)
    cut = int(round(total * (1.0 - fraction)))
    seen = 0
    for i, text in enumerate(texts):
        if seen + len(text) + 1 > cut:
            k = max(cut - seen, 0)
            head = texts[:i] + ([text[:k]] if k > 0 else [])
            return head, ([text[k:]] if k < len(text) else []) + texts[i + 1:]
        seen += len(text) + 1
    return list(texts), []
