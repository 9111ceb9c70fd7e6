"""Autoregressive generation for any model with the apt model API: ``model(input_ids (B, T), cache=None) ->
logits (B, T, V)`` and, optionally, ``model.new_cache(batch_size)`` (a cache that forward fills in place).

* Sampling: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed`` (a private CPU generator: the same seed
  gives the same text on CPU and GPU and does not touch the global RNG; the prompts of one call draw from that
  one generator, so a prompt's sampled text also depends on the prompts beside it, as in HF's generate).
* KV-cache: used when the model has ``new_cache`` (``use_cache=None``/True); the prompt is prefilled in one
  forward, then one token per forward. Without a cache every step re-runs the whole (cropped) context.
* Context window: ``model.max_seq_len`` (None = unlimited, e.g. Mamba). A prompt longer than the window keeps its
  last ``window`` tokens. Without a cache each step sees the last ``window`` tokens; with a cache, when the
  window is full the cache is rebuilt from the last ``3/4 * window`` tokens (so cached and uncached generation are
  identical token for token until the window first fills, and stay close after).
* Batches: prompts of equal token length run together as one batch (no padding: the model API has no attention
  mask, and left padding would shift learned positions); other lengths run as separate batches.
* Stops: at ``tokenizer.eos_id`` (not included in the text) when ``stop_at_eos``, at any of the ``stop`` strings
  (the text is cut before it), or after ``max_new_tokens``.
* Plugins (a list of :class:`~apt.plugins.base.Plugin` or a :class:`~apt.plugins.manager.PluginManager`): each
  prompt goes through ``augment_prompt`` (e.g. retrieval); at every step ``select_sample([default], ctx)`` may
  replace the sampled token by a chosen continuation (e.g. voting), see :func:`_hook_context`. A plugin that
  raises is logged and disabled; generation goes on. With plugins that select samples, prompts run one at a time.
  The hook contexts of one prompt share one ``metrics`` dict (plugins count there, e.g. how often a vote ran); it
  comes back as :attr:`GenerationResult.metrics`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence, Union

import torch

from ..plugins.base import HookContext, Plugin
from ..plugins.manager import PluginManager
from .sampling import check_temperature, check_top_k_top_p, entropy, make_generator, sample_next

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
    """A proposed continuation: its tokens and their summed log-probability under the model (temperature 1,
    no filtering), so candidates sampled with different settings compare fairly."""

    tokens: list[int]
    logprob: float = 0.0

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


@dataclasses.dataclass
class GenerationResult:
    prompt: str  # the prompt the model saw (after plugins)
    text: str  # the continuation only
    tokens: list[int]  # the continuation's token ids (eos excluded)
    prompt_tokens: int  # prompt length in tokens (after cropping to the window)
    finish_reason: str  # "eos", "stop" or "length"
    selections: int = 0  # steps where a plugin chose the continuation (e.g. a vote)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # what plugins recorded for this prompt


def model_window(model: torch.nn.Module) -> Optional[int]:
    """The model's context length (``max_seq_len``), or None when it has none (recurrent models)."""
    w = getattr(model, "max_seq_len", None)
    return int(w) if w else None


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def supports_cache(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "new_cache", None))


class _Stepper:
    """The running state of a batch of equal-length sequences: the tokens so far and (optionally) the cache,
    with the logits for the next token of every row."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, use_cache: bool,
                 vocab: Optional[int] = None) -> None:
        self.model = model
        self.vocab = vocab  # the tokenizer's ids: a padded embedding's extra rows are never sampled
        self.window = model_window(model)
        self.use_cache = use_cache
        self.ids = ids
        self.cache: Any = None
        self._last: Optional[torch.Tensor] = None
        if use_cache:
            self._prefill(self._crop(ids))

    def _crop(self, ids: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        keep = keep if keep is not None else self.window
        return ids if keep is None or ids.shape[1] <= keep else ids[:, -keep:]

    def _prefill(self, ids: torch.Tensor) -> None:
        self.cache = self.model.new_cache(ids.shape[0])
        self._last = self._head(self.model(ids, cache=self.cache))

    def _head(self, out: torch.Tensor) -> torch.Tensor:
        last = out[:, -1]
        return (last if self.vocab is None or last.shape[-1] <= self.vocab else last[:, :self.vocab]).float()

    def logits(self) -> torch.Tensor:
        """(B, V) float32 logits for the next token of every row."""
        if self.use_cache:
            assert self._last is not None
            return self._last
        return self._head(self.model(self._crop(self.ids)))

    def append(self, new: torch.Tensor) -> None:
        """Add tokens (B, n) to every row."""
        self.ids = torch.cat([self.ids, new], dim=1)
        if not self.use_cache:
            return
        pos = getattr(self.cache, "pos", None)
        if self.window is not None and (pos if pos is not None else 0) + new.shape[1] > self.window:
            # window full: rebuild the cache from the recent tokens (amortised: not on every step)
            self._prefill(self._crop(self.ids, max(1, (3 * self.window) // 4)))
        else:
            self._last = self._head(self.model(new, cache=self.cache))


@torch.inference_mode()  # as generation: no autograd graph for the k x length forwards
def rollouts(model: torch.nn.Module, context: Sequence[int], k: int, length: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
             use_cache: Optional[bool] = None, vocab: Optional[int] = None) -> list[Candidate]:
    """``k`` independent sampled continuations of ``context`` of up to ``length`` tokens each (a rollout ends
    at ``eos_id``, which it keeps), run as one batch, each scored by its model log-probability. ``vocab``: sample
    only ids below it (the tokenizer's size, when the model's vocabulary is padded)."""
    if k < 1 or length < 1:
        raise ValueError(f"rollouts: k and length must be >= 1, got k={k}, length={length}")
    device = model_device(model)
    window = model_window(model)
    ctx = list(context)
    if window is not None and len(ctx) + length > window:
        ctx = ctx[-max(1, window - length):]
    ids = torch.tensor([ctx] * k, dtype=torch.long, device=device)
    cache_ok = supports_cache(model) if use_cache is None else (use_cache and supports_cache(model))
    stepper = _Stepper(model, ids, cache_ok, vocab)
    cands = [Candidate([], 0.0) for _ in range(k)]
    live = [True] * k
    for _ in range(length):
        logits = stepper.logits()
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        for i in range(k):
            if live[i]:
                t = int(tok[i])
                cands[i].tokens.append(t)
                cands[i].logprob += float(logp[i])
                if eos_id is not None and t == eos_id:
                    live[i] = False
        if not any(live):
            break
        stepper.append(tok[:, None])
    return cands


def _as_manager(plugins: Union[None, PluginManager, Sequence[Plugin]]) -> Optional[PluginManager]:
    if plugins is None:
        return None
    if isinstance(plugins, PluginManager):
        return plugins
    return PluginManager(list(plugins))


def _selects_samples(manager: Optional[PluginManager]) -> bool:
    return manager is not None and any(type(p).select_sample is not Plugin.select_sample for p in manager.active)


def _hook_context(model: torch.nn.Module, tokenizer: Any, metrics: Optional[dict[str, Any]] = None,
                  **extra: Any) -> HookContext:
    """The context generation hooks see. ``extra`` holds, for ``select_sample``: ``logits`` (V,) next-token
    logits, ``entropy`` (nats), ``context`` (token ids so far), ``remaining`` (tokens left to generate),
    ``sampling`` (temperature, top_k, top_p), ``rollout(k, length, temperature=None) -> list[Candidate]``
    (k sampled continuations with the same settings and generator; ``temperature`` overrides the sampling
    temperature), plus ``tokenizer``; for ``augment_prompt``: ``tokenizer``, ``window`` (the model's context
    length or None) and ``max_new_tokens``. ``metrics`` is shared by the contexts of one prompt."""
    return HookContext(model=model, config=getattr(model, "config", None),
                       metrics=metrics if metrics is not None else {}, extra={"tokenizer": tokenizer, **extra})


def _encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    ids = list(tokenizer.encode(prompt))
    # an empty prompt starts from end-of-text, the separator the model saw between documents
    return ids if ids else [int(tokenizer.eos_id)]


@torch.inference_mode()
def _generate_group(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int,
                    temperature: float, top_k: Optional[int], top_p: Optional[float],
                    generator: Optional[torch.Generator], use_cache: bool, stop_at_eos: bool,
                    stop: Sequence[str], manager: Optional[PluginManager], voting: bool,
                    metrics: Optional[dict[str, Any]] = None) -> list[tuple[list[int], str, int, Optional[str]]]:
    """Generate for prompts of equal length; per row (tokens, finish_reason, selections, text cut at a stop
    string or None)."""
    device = model_device(model)
    B = len(prompt_ids)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    vocab = getattr(tokenizer, "vocab_size", None)
    stepper = _Stepper(model, ids, use_cache, int(vocab) if vocab else None)
    eos = int(tokenizer.eos_id) if stop_at_eos and getattr(tokenizer, "eos_id", None) is not None else None
    out: list[list[int]] = [[] for _ in range(B)]
    reason = ["length"] * B
    done = [False] * B
    selections = [0] * B
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    def accept(b: int, toks: list[int]) -> None:
        for t in toks:
            if len(out[b]) >= max_new_tokens:
                done[b] = True
                return
            if eos is not None and t == eos:
                done[b], reason[b] = True, "eos"
                return
            out[b].append(t)
            if stop and tokenizer is not None:
                text = tokenizer.decode(out[b])
                if any(s in text for s in stop):
                    done[b], reason[b] = True, "stop"
                    return
        if len(out[b]) >= max_new_tokens:
            done[b] = True

    while not all(done):
        logits = stepper.logits()
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        if voting and manager is not None:  # B == 1 here
            context = stepper.ids[0].tolist()
            default = Candidate([int(tok[0])], float(torch.log_softmax(logits[0], -1)[tok[0]]))
            left = max_new_tokens - len(out[0])

            def rollout(k: int, length: int, temperature: Optional[float] = None, _ctx: list[int] = context,
                        _left: int = left, _temp: float = sampling["temperature"]) -> list[Candidate]:
                return rollouts(model, _ctx, k, min(length, _left), _temp if temperature is None else temperature,
                                top_k, top_p, generator, eos, use_cache, stepper.vocab)

            ctx = _hook_context(
                model, tokenizer, metrics, logits=logits[0], entropy=float(entropy(logits[0])), context=context,
                remaining=left, sampling=sampling, rollout=rollout)
            choice = manager.select_sample([default], ctx)
            if isinstance(choice, Candidate) and choice.tokens and choice is not default:
                selections[0] += 1
                before = len(out[0])
                accept(0, choice.tokens)
                new = out[0][before:]
                if not done[0] and new:
                    stepper.append(torch.tensor([new], dtype=torch.long, device=device))
                continue
            elif choice is not None and not isinstance(choice, Candidate):
                logger.warning("generation: select_sample returned %s, expected a Candidate; ignored",
                               type(choice).__name__)
        for b in range(B):
            if not done[b]:
                accept(b, [int(tok[b])])
        if all(done):
            break
        stepper.append(tok[:, None])
    results: list[tuple[list[int], str, int, Optional[str]]] = []
    for b in range(B):
        toks = out[b]
        if reason[b] == "stop":
            text = tokenizer.decode(toks)
            cut = min(text.find(s) for s in stop if s in text)
            results.append((toks, "stop", selections[b], text[:cut]))
        else:
            results.append((toks, reason[b], selections[b], None))
    return results


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Union[str, Sequence[str]],
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, use_cache: Optional[bool] = None,
             stop_at_eos: bool = True, stop: Union[None, str, Sequence[str]] = None,
             plugins: Union[None, PluginManager, Sequence[Plugin]] = None, batch_size: int = 16,
             return_details: bool = False) -> Any:
    """Continue ``prompts`` (a string -> a string; a list -> a list). See the module docstring for the rules.
    With ``return_details`` the result is a :class:`GenerationResult` (or a list of them)."""
    single = isinstance(prompts, str)
    plist = [prompts] if single else list(prompts)
    if not all(isinstance(p, str) for p in plist):
        raise TypeError("prompts: expected a string or a list of strings")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    check_temperature(temperature)
    check_top_k_top_p(top_k, top_p)
    if use_cache and not supports_cache(model):
        raise ValueError("use_cache: the model has no new_cache(); pass use_cache=None or False")
    cache = supports_cache(model) if use_cache is None else bool(use_cache)
    manager = _as_manager(plugins)
    window = model_window(model)
    if isinstance(stop, str):  # one stop string, not its characters
        stop = [stop]
    if not all(isinstance(s, str) for s in (stop or [])):
        raise TypeError(f"stop: expected a string or a list of strings, got {stop!r}")
    stop = [s for s in (stop or []) if s]

    final_prompts = []
    metrics: list[dict[str, Any]] = [{} for _ in plist]
    for i, p in enumerate(plist):
        if manager is not None:
            p = manager.augment_prompt(p, _hook_context(model, tokenizer, metrics[i], window=window,
                                                        max_new_tokens=max_new_tokens))
        final_prompts.append(p)
    encoded = []
    for p in final_prompts:
        ids = _encode_prompt(tokenizer, p)
        if window is not None and len(ids) > window:
            logger.info("prompt of %d tokens is longer than the model's window %d: keeping the last %d",
                        len(ids), window, window)
            ids = ids[-window:]
        encoded.append(ids)

    generator = make_generator(seed)
    voting = _selects_samples(manager)
    results: list[Optional[GenerationResult]] = [None] * len(plist)
    # group equal-length prompts (in order of first appearance), one group per batch
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    was_training = model.training
    model.eval()
    try:
        for idxs in groups.values():
            step = 1 if voting else max(1, batch_size)
            for start in range(0, len(idxs), step):
                chunk = idxs[start:start + step]
                if max_new_tokens == 0:
                    rows = [([], "length", 0, None)] * len(chunk)
                else:
                    # with voting the chunk is one prompt, so its step contexts share that prompt's metrics
                    rows = _generate_group(model, tokenizer, [encoded[i] for i in chunk], max_new_tokens,
                                           temperature, top_k, top_p, generator, cache, stop_at_eos, stop,
                                           manager, voting, metrics[chunk[0]] if voting else None)
                for i, (toks, why, sel, text) in zip(chunk, rows):
                    results[i] = GenerationResult(prompt=final_prompts[i],
                                                  text=text if text is not None else tokenizer.decode(toks),
                                                  tokens=toks, prompt_tokens=len(encoded[i]), finish_reason=why,
                                                  selections=sel, metrics=metrics[i])
    finally:
        model.train(was_training)
    final = [r for r in results if r is not None]
    if return_details:
        return final[0] if single else final
    texts = [r.text for r in final]
    return texts[0] if single else texts


def generate_tokens(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    seed: Optional[int] = None, use_cache: Optional[bool] = None,
                    eos_id: Optional[int] = None, vocab_size: Optional[int] = None) -> list[int]:
    """Token-level generation for one prompt (no tokenizer needed): the new token ids (eos excluded).

    ``vocab_size``: sample only ids below it, the tokenizer's size when the model's embedding is padded past it
    (``model.vocab_size`` larger than the tokenizer's); default every id of the model's vocabulary."""

    class _Ids:
        def __init__(self, eos: Optional[int], size: Optional[int]) -> None:
            self.eos_id = eos
            self.vocab_size = size

        def decode(self, ids: Sequence[int]) -> str:
            return ""

    if not prompt_ids:
        raise ValueError("prompt_ids: must not be empty")
    vocab = getattr(model, "vocab_size", None)
    bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0
                or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise ValueError(f"prompt_ids: token ids must be ints in [0, {vocab if vocab is not None else 'vocab'}), "
                         f"got {bad!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be an int >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    check_top_k_top_p(top_k, top_p)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or not 1 <= vocab_size <= (vocab or vocab_size)):
        raise ValueError(f"vocab_size: expected an int in [1, {vocab or 'the model vocabulary'}] or None, got "
                         f"{vocab_size!r}")
    if max_new_tokens == 0:
        return []
    cache = supports_cache(model) if use_cache is None else bool(use_cache)
    was_training = model.training
    model.eval()
    try:
        rows = _generate_group(model, _Ids(eos_id, vocab_size), [list(prompt_ids)], max_new_tokens, temperature,
                               top_k, top_p, make_generator(seed), cache, eos_id is not None, [], None, False)
    finally:
        model.train(was_training)
    return rows[0][0]

