"""``retriever`` plugin: a small local RAG. Before generation it retrieves the passages of a folder of text that
best match the prompt and puts them in front of it.

* Index: the folder ``dir`` (``*.txt``, ``*.md``, ``*.jsonl`` with a ``text`` field; recursively), split into
  passages of at most ``max_chars`` characters (paragraphs), encoded by a provider of kind ``retrieval``
  (``provider``; default ``tfidf``, the hashing-trick TF-IDF of :mod:`apt.providers.retrieval`). Built once, at
  the first prompt.
* Query: the last ``query_chars`` characters of the prompt (in a chat transcript: the latest turns).
* Prompt: the top ``k`` passages with cosine score > ``min_score``, best first, rendered as::

      Context:
      [1] <best passage>
      [2] <next passage>

      <prompt>

  (``template`` with ``{context}`` and ``{prompt}``; each passage line is ``passage_template`` with ``{rank}``,
  ``{text}``, ``{source}`` and ``{score}``, joined by newlines). When the model has a window, the lowest-ranked
  passages are dropped until the augmented prompt fits ``window - max_new_tokens`` tokens (the best passage is
  always kept; generation then keeps the prompt's end).
* Failures never stop generation: a missing or empty folder, an unreadable file, a provider that raises — each is
  logged as a warning (once per distinct message) and the prompt goes through unchanged.

Settings (``plugins.retriever``, ``--retrieval-dir`` / ``--plugin-opt retriever.KEY=VALUE`` in the CLI): ``dir``,
``k`` (3), ``max_chars`` (800), ``query_chars`` (1000), ``min_score`` (0.0), ``template``, ``passage_template``,
``provider`` (null = the kind's default), ``provider_config`` (a mapping for the provider), and the ``tfidf``
settings ``n_features``, ``ngrams`` and ``stop_words`` (passed to the provider, as is ``min_score``).

Metrics (``ctx.metrics`` -> :attr:`GenerationResult.metrics`): ``retriever_hits`` (passages added),
``retriever_sources``, ``retriever_top_score``, ``retriever_error`` (why the prompt was left unchanged).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ...core import registry
from ...plugins.base import HookContext, Plugin
from ...providers.retrieval import Hit, load_passages

logger = logging.getLogger(__name__)

TEMPLATE = "Context:\n{context}\n\n{prompt}"
PASSAGE_TEMPLATE = "[{rank}] {text}"
_PROVIDER_KEYS = {"n_features", "ngrams", "min_score", "stop_words"}
_KNOWN = {"dir", "k", "max_chars", "query_chars", "template", "passage_template", "provider", "provider_config"} \
    | _PROVIDER_KEYS


class RetrieverPlugin(Plugin):
    """Local retrieval-augmented generation (settings: dir, k, max_chars, query_chars, min_score, template,
    passage_template, provider, provider_config, n_features, ngrams, stop_words)."""

    name = "retriever"
    description = "local RAG: TF-IDF top-k passages of a folder of text in front of the prompt (never fails)"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - _KNOWN
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KNOWN))})")
        self.dir: Optional[str] = self.config.get("dir")
        self.k = self.number("k", 3, integer=True, low=1)
        self.max_chars = self.number("max_chars", 800, integer=True, low=1)
        self.query_chars = self.number("query_chars", 1000, integer=True, low=1)
        for key, default in (("template", TEMPLATE), ("passage_template", PASSAGE_TEMPLATE)):
            if not isinstance(self.config.get(key, default), str):
                raise ValueError(f"{key}: expected a string, got {self.config[key]!r}")
        self.template = self.config.get("template", TEMPLATE)
        self.passage_template = self.config.get("passage_template", PASSAGE_TEMPLATE)
        try:  # a broken template is a settings error, reported when the plugin is built, not at every prompt
            self.template.format(context="", prompt="")
            self.passage_template.format(rank=1, text="", source="", score=0.0)
        except Exception as exc:  # KeyError, IndexError, ValueError, and AttributeError for '{prompt.x}'
            raise ValueError(f"template: {exc!r} (template may use {{context}} and {{prompt}}; passage_template "
                             "{rank}, {text}, {source}, {score})") from None
        provider_config = self.config.get("provider_config") or {}
        if not isinstance(provider_config, dict):
            raise ValueError(f"provider_config: expected a mapping, got {provider_config!r}")
        provider_config = dict(provider_config)
        provider_config.update({k: self.config[k] for k in _PROVIDER_KEYS if k in self.config})
        self.provider_name: Optional[str] = self.config.get("provider")
        self.provider_config = provider_config
        try:  # build the (empty) provider now: its settings are checked here, not at the first prompt
            registry.get("retrieval", self.provider_name, config=dict(provider_config),
                         strict=self.provider_name is not None)
        except registry.RegistryError as exc:
            raise ValueError(f"provider: {exc}") from None
        self.index: Any = None  # the built provider, once the folder is indexed
        self.last_hits: list[Hit] = []
        self._build_error: Optional[Exception] = None
        self._warned: set[str] = set()

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:  # once per distinct failure: a chat must not repeat it every turn
            self._warned.add(msg)
            logger.warning("retriever: %s; the prompt is used without retrieved context", msg)
        else:
            logger.debug("retriever: %s", msg)

    def build_index(self) -> Any:
        """Index ``dir`` now (raises on failure; :meth:`augment_prompt` catches)."""
        if not self.dir:
            raise ValueError("no folder to index (set plugins.retriever.dir or pass --retrieval-dir)")
        passages = load_passages(self.dir, self.max_chars)
        if not passages:
            raise ValueError(f"no passages in {self.dir} (no non-empty *.txt, *.md or *.jsonl files)")
        index = registry.get("retrieval", self.provider_name, config=dict(self.provider_config))
        index.build(passages)  # type: ignore[attr-defined]
        logger.info("retriever: indexed %d passages from %s with retrieval/%s", len(passages), self.dir, index.name)
        return index

    def retrieve(self, query: str) -> list[Hit]:
        if self.index is None and self._build_error is None:
            try:
                self.index = self.build_index()
            except Exception as exc:
                # build once: a folder that failed to index is not re-read (nor re-reported) for every prompt
                self._build_error = exc
        if self.index is None:
            raise self._build_error  # type: ignore[misc]
        return list(self.index.search(query[-self.query_chars:], self.k))

    def render(self, prompt: str, hits: list[Hit]) -> str:
        lines = [self.passage_template.format(rank=r, text=h.passage.text, source=h.passage.source,
                                              score=h.score) for r, h in enumerate(hits, 1)]
        return self.template.format(context="\n".join(lines), prompt=prompt)

    def _fit(self, prompt: str, hits: list[Hit], ctx: HookContext) -> list[Hit]:
        """Drop the lowest-ranked hits until the augmented prompt fits the model's window (keeps >= 1)."""
        tok, window = ctx.extra.get("tokenizer"), ctx.extra.get("window")
        if tok is None or not window:
            return hits
        budget = max(1, int(window) - int(ctx.extra.get("max_new_tokens") or 0))
        while len(hits) > 1 and len(tok.encode(self.render(prompt, hits))) > budget:
            hits = hits[:-1]
        return hits

    def augment_prompt(self, prompt: str, ctx: HookContext) -> str:
        self.last_hits = []
        try:
            hits = self.retrieve(prompt)
            if not hits:
                ctx.metrics["retriever_hits"] = 0
                logger.info("retriever: no passage matches the prompt")
                return prompt
            hits = self._fit(prompt, hits, ctx)
            out = self.render(prompt, hits)
        except Exception as exc:  # retrieval is best effort: it must never stop generation
            msg = f"{type(exc).__name__}: {exc}"
            ctx.metrics["retriever_hits"] = 0
            ctx.metrics["retriever_error"] = msg
            self._warn(msg)
            return prompt
        self.last_hits = hits
        ctx.metrics["retriever_hits"] = len(hits)
        ctx.metrics["retriever_sources"] = [h.passage.source for h in hits]
        ctx.metrics["retriever_top_score"] = hits[0].score
        return out
