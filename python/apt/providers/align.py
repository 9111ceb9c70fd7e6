"""Alignment-loss providers (kind ``align``). ``bistate`` (default): the bistate alignment loss.

Bistate alignment loss
----------------------
Two states of the same N tokens, ``a`` and ``b`` (N, C) — in training, the hidden states after the middle block
(``a``) and the final normalised hidden states (``b``) of one forward pass. With unit vectors
``â_n = a_n / |a_n|`` and ``b̂_n = b_n / |b_n|``::

    L = alpha · stable + beta · align
    stable = mean_n (1 − â_n · b̂_n)                                    (in [0, 2]; 0 when each pair agrees)
    align  = mean_n −log softmax_j(â_n · b̂_j / tau_align)[j = n]      (InfoNCE over the N tokens)

``stable`` pulls the two states of each token together; ``align`` asks each token's first state to be closer to
its own second state than to any other token's, which rules out the collapsed solution (all states equal) that
``stable`` alone allows. ``tau_align`` > 0 is the contrastive temperature (smaller = sharper). With
``detach_b`` the second state is a fixed target (no gradient). At most ``max_tokens`` tokens (a fixed-stride
subsample) enter the N×N similarity matrix.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from ..core.registry import Provider
from ..core.settings import as_bool, as_number


def bistate_alignment_loss(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, beta: float = 1.0,
                           tau_align: float = 0.1, max_tokens: Optional[int] = 512,
                           detach_b: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(alpha·stable + beta·align, {"stable": ..., "align": ...})`` for states a, b of shape (..., C)."""
    if a.shape != b.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if not tau_align > 0 or not math.isfinite(tau_align):  # not <= 0: NaN passes that
        raise ValueError(f"tau_align: expected a finite number > 0, got {tau_align}")
    if a.numel() == 0:
        raise ValueError(f"a: no tokens to align (shape {tuple(a.shape)})")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens: expected >= 1 or None, got {max_tokens}")
    a2, b2 = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    if detach_b:
        b2 = b2.detach()
    n = a2.shape[0]
    if max_tokens is not None and n > max_tokens:
        idx = torch.arange(0, n, n / max_tokens, device=a2.device).long()[:max_tokens]
        a2, b2 = a2[idx], b2[idx]
    an, bn = F.normalize(a2, dim=-1, eps=1e-6), F.normalize(b2, dim=-1, eps=1e-6)
    stable = (1.0 - (an * bn).sum(-1)).mean()
    logits = an @ bn.t() / tau_align
    align = F.cross_entropy(logits, torch.arange(an.shape[0], device=an.device))
    return alpha * stable + beta * align, {"stable": stable.detach(), "align": align.detach()}


class BistateAlign(Provider):
    kind: ClassVar[str] = "align"
    name = "bistate"
    is_default = True
    description = "bistate alignment loss: alpha*stable + beta*InfoNCE(tau_align) between two token states"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        c = self.config
        self.alpha = as_number("alpha", c.get("alpha", 1.0), low=0)
        self.beta = as_number("beta", c.get("beta", 1.0), low=0)
        self.tau_align = as_number("tau_align", c.get("tau_align", 0.1), low=0, low_open=True)
        self.max_tokens = as_number("max_tokens", c.get("max_tokens", 512), integer=True, low=1, allow_none=True)
        self.detach_b = as_bool("detach_b", c.get("detach_b", False))

    def loss(self, a: torch.Tensor, b: torch.Tensor, **over: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`bistate_alignment_loss` with this provider's settings; a keyword in ``over`` replaces one (a None
        keeps the setting, except ``max_tokens=None``: no subsampling, as for the function)."""
        kw = dict(alpha=self.alpha, beta=self.beta, tau_align=self.tau_align, max_tokens=self.max_tokens,
                  detach_b=self.detach_b)
        kw.update({k: v for k, v in over.items() if v is not None or k == "max_tokens"})
        return bistate_alignment_loss(a, b, **kw)


PROVIDERS = [BistateAlign]
