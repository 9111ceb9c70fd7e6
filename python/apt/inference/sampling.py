"""Next-token sampling: temperature scaling, top-k and top-p (nucleus) filtering, seeded sampling, entropy.

All functions take logits of shape (B, V) (or (V,)) in any float dtype and work in float32. Filtering sets the
removed entries to ``-inf`` so a later softmax gives them probability 0. ``temperature == 0`` means greedy.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(logits) or logits.dim() not in (1, 2):
        raise ValueError(f"logits: expected a (batch, vocab) or (vocab,) tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    return logits.float()


def check_temperature(temperature: float) -> None:
    """A finite temperature >= 0 (0: greedy); ``not >= 0`` rather than ``< 0``, which NaN passes."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 <= temperature < math.inf):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")


def check_top_k_top_p(top_k: object, top_p: object) -> None:
    """top_k: None or an int >= 0 (0: off); top_p: None or a number in (0, 1]."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k: must be an int >= 0 (0 = off) or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: must be in (0, 1] or None, got {top_p!r}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (temperature > 0)."""
    check_temperature(temperature)
    if temperature == 0:
        raise ValueError("temperature: must be > 0 to scale logits (0 means greedy), got 0")
    return _check_logits(logits) / float(temperature)


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row (ties broken by index order of ``torch.topk``);
    ``None``/0 or ``k >= vocab`` keeps everything."""
    logits = _check_logits(logits)
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = torch.topk(logits, int(k), dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus filtering: keep, per row, the smallest set of most probable tokens whose probability mass is
    >= ``p`` (always at least the most probable token). ``None`` or ``p >= 1`` keeps everything."""
    logits = _check_logits(logits)
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p: must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more probable tokens
    # a token is needed while the tokens before it have not reached p yet
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the logits the sampler draws from (temperature must be > 0)."""
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row: argmax when ``temperature == 0``, else a draw from the filtered distribution.
    ``generator`` (a CPU ``torch.Generator``) makes the draw reproducible on any device."""
    logits = _check_logits(logits)
    squeeze = logits.dim() == 1
    if squeeze:
        logits = logits[None]
    check_temperature(temperature)
    if temperature == 0:
        out = logits.argmax(dim=-1)
    else:
        # shifted so that each row's maximum is 0 (the same distribution): a tiny temperature (1e-40) then sends
        # the others to -inf rather than every logit to +-inf, which made the probabilities NaN
        shifted = logits - logits.amax(dim=-1, keepdim=True)
        probs = torch.softmax(filter_logits(shifted, temperature, top_k, top_p), dim=-1)
        # draw on the CPU so one seed gives the same tokens on CPU and GPU
        out = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return out[0] if squeeze else out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row; 0 for a one-hot distribution, log(V) for uniform."""
    logp = torch.log_softmax(_check_logits(logits), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def max_entropy(vocab_size: int) -> float:
    return math.log(vocab_size)


def make_generator(seed: Optional[int]) -> Optional[torch.Generator]:
    """A seeded CPU generator, or None (global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g
