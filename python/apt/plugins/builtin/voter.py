"""``voter`` plugin: entropy-triggered K-sample voting during generation.

At every generation step the plugin looks at the next-token distribution ``p = softmax(logits)`` (temperature 1,
no filtering) and its Shannon entropy ``H`` in nats. The *uncertainty* is ``H / log V`` (V = vocabulary size, so
0 = one-hot, 1 = uniform) when ``normalize`` is true (the default), else ``H`` itself in nats. When the
uncertainty is **strictly greater** than ``threshold`` the plugin votes; otherwise it returns nothing and the
step keeps the token the sampler drew (the default sample is left alone).

A vote:

1. samples ``k`` continuations of up to ``horizon`` tokens from the current context (capped at the tokens left to
   generate; a continuation ends early at end-of-text), with the plugin's ``temperature`` (null: the generation's
   temperature) and the generation's top-k / top-p and seeded generator — :func:`apt.inference.generate.rollouts`,
   through ``ctx.extra["rollout"]``;
2. groups them by a key: ``vote_on: token`` (default) — the first token; ``vote_on: text`` — the decoded text of
   the whole continuation;
3. the winning group is the one with the most members; a tie in size goes to the group whose members have the
   higher average *mean log-prob* (:attr:`~apt.inference.generate.Candidate.mean_logprob`: summed model
   log-probability at temperature 1 / number of tokens); a remaining tie to the group sampled first;
4. the winner's representative is its member with the highest mean log-prob (ties: the one sampled first), and
   the step commits ``commit: all`` (default) — its whole continuation — or ``commit: first`` — only its first
   token (a vote then decides one token per triggered step).

Settings (``plugins.voter``, or ``--plugin-opt voter.KEY=VALUE`` in ``apt generate``/``apt chat``): ``k`` (5,
>= 2), ``threshold`` (0.5), ``normalize`` (true), ``horizon`` (4, >= 1), ``temperature`` (1.0; null = the
generation's; voting with temperature 0 would draw k identical samples), ``vote_on`` (token | text), ``commit``
(all | first).

Metrics (``ctx.metrics``, shared by the steps of one prompt: :attr:`GenerationResult.metrics`): ``voter_steps``
(steps seen), ``voter_triggered`` (votes run), ``voter_trigger_rate``, ``voter_changed`` (votes whose committed
first token differs from the default sample), ``voter_last_uncertainty``. The same counts over the plugin's life
(all prompts, all chat turns) are kept in :attr:`VoterPlugin.totals`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from ...plugins.base import HookContext, Plugin

logger = logging.getLogger(__name__)

_KNOWN = {"k", "threshold", "normalize", "horizon", "temperature", "vote_on", "commit"}


def vote(candidates: list[Any], key: Any = None) -> tuple[int, list[int]]:
    """The index of the representative of the winning group and the indices of that group (see the module
    docstring, steps 3-4). ``key(candidate)`` groups candidates (default: the first token)."""
    if not candidates:
        raise ValueError("vote: no candidates")
    key = key or (lambda c: c.tokens[0] if c.tokens else None)
    groups: dict[Any, list[int]] = {}  # insertion order = order of first appearance
    for i, c in enumerate(candidates):
        groups.setdefault(key(c), []).append(i)

    def rank(item: tuple[int, tuple[Any, list[int]]]) -> tuple[int, float, int]:
        order, (_, members) = item
        mean = sum(candidates[i].mean_logprob for i in members) / len(members)
        return (len(members), mean, -order)

    _, (_, members) = max(enumerate(groups.items()), key=rank)
    best = max(members, key=lambda i: (candidates[i].mean_logprob, -i))
    return best, members


class VoterPlugin(Plugin):
    """Entropy-triggered K-sample voting at generation time (settings: k, threshold, normalize, horizon,
    temperature, vote_on, commit)."""

    name = "voter"
    description = "when next-token entropy is high, sample k short continuations and commit the majority vote"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _KNOWN
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KNOWN))})")
        self.k = self.number("k", 5, integer=True, low=2)  # a vote needs several samples
        self.threshold = self.number("threshold", 0.5)
        self.normalize = self.flag("normalize", True)
        self.horizon = self.number("horizon", 4, integer=True, low=1)
        self.temperature: Optional[float] = self.number("temperature", 1.0, low=0, allow_none=True)
        self.vote_on = str(self.config.get("vote_on", "token"))
        self.commit = str(self.config.get("commit", "all"))
        if self.vote_on not in ("token", "text"):
            raise ValueError(f"vote_on: expected 'token' or 'text', got {self.vote_on!r}")
        if self.commit not in ("all", "first"):
            raise ValueError(f"commit: expected 'all' or 'first', got {self.commit!r}")
        if self.normalize and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold: with normalize the uncertainty is in [0, 1], got {self.threshold}")
        self.totals = {"steps": 0, "triggered": 0, "changed": 0}

    def uncertainty(self, entropy_nats: float, vocab_size: int) -> float:
        """``H / log V`` with ``normalize`` (V > 1), else ``H`` (nats)."""
        if self.normalize:
            return entropy_nats / math.log(vocab_size) if vocab_size > 1 else 0.0
        return entropy_nats

    def _key(self, ctx: HookContext) -> Any:
        if self.vote_on == "token":
            return None  # vote()'s default: the first token
        tok = ctx.extra.get("tokenizer")
        # without a tokenizer the token tuple stands in for the text (same grouping for a lossless tokenizer)
        return (lambda c: tok.decode(c.tokens)) if tok is not None else (lambda c: tuple(c.tokens))

    def select_sample(self, candidates: list[Any], ctx: HookContext) -> Optional[Any]:
        rollout = ctx.extra.get("rollout")
        logits = ctx.extra.get("logits")
        if rollout is None or logits is None or "entropy" not in ctx.extra:
            return None  # not called from generate(): nothing to vote with
        m = ctx.metrics
        m["voter_steps"] = m.get("voter_steps", 0) + 1
        m.setdefault("voter_triggered", 0)
        m.setdefault("voter_changed", 0)
        self.totals["steps"] += 1
        u = self.uncertainty(float(ctx.extra["entropy"]), int(logits.shape[-1]))
        m["voter_last_uncertainty"] = u
        m["voter_trigger_rate"] = m["voter_triggered"] / m["voter_steps"]
        if not u > self.threshold:
            return None
        samples = rollout(self.k, self.horizon, temperature=self.temperature)
        samples = [c for c in samples if c.tokens]
        if not samples:
            return None
        best, members = vote(samples, self._key(ctx))
        chosen = samples[best]
        if self.commit == "first":
            # the first token's exact log-prob comes from this step's logits (a rollout keeps only the sum)
            first = chosen.tokens[0]
            chosen = type(chosen)([first], float(torch.log_softmax(logits.float(), -1)[first]))
        m["voter_triggered"] += 1
        m["voter_trigger_rate"] = m["voter_triggered"] / m["voter_steps"]
        self.totals["triggered"] += 1
        default = candidates[0].tokens[:1] if candidates and candidates[0].tokens else None
        if default != chosen.tokens[:1]:
            m["voter_changed"] += 1
            self.totals["changed"] += 1
        logger.debug("voter: uncertainty %.3f > %.3f, %d samples, winning group of %d, commit %s", u,
                     self.threshold, len(samples), len(members), chosen.tokens)
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.update(state.get("totals") or {})

