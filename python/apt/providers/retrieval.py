"""Retrieval providers (kind ``retrieval``): index passages of local text and return the top-k for a query.

``tfidf`` (default): a hashing-trick TF-IDF encoder with cosine similarity, in pure Python (no vocabulary to fit
or store, no downloads, deterministic across processes and machines).

* Tokens: lower-cased ``\\w+`` runs (Unicode letters, digits, underscore), without a short list of English
  function words (``stop_words: english``, default; ``none`` keeps every token) — on a small folder idf alone
  cannot tell "is the" from content. Features: the tokens and, with ``ngrams: 2`` (default), adjacent token
  pairs, each hashed with CRC-32 (not Python's ``hash``, which is salted per process) into ``n_features``
  buckets (default 2**20).
* Weights: ``tf = 1 + ln(count)`` (sublinear), ``idf = ln((1 + N) / (1 + df)) + 1`` (smoothed, N passages,
  df = passages holding the bucket), vector L2-normalised; the query uses the index's idf (buckets no passage
  has are ignored), so the score is the cosine similarity in [0, 1].
* Search: every passage with score > ``min_score`` (default 0), best first; equal scores keep index order.

Passages come from :func:`load_passages`: a folder's ``*.txt``, ``*.md`` and ``*.jsonl`` files (recursively, in
sorted path order); text files are split at blank lines into paragraphs, JSONL files give one document per line
(field ``text``) split the same way, and a paragraph longer than ``max_chars`` (default 800) is cut at whitespace
into pieces of at most ``max_chars``. An unreadable file or a bad JSONL line is logged as a warning and skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional, Sequence, Union

from ..core.registry import Provider
from ..core.settings import as_number

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
_WORD = re.compile(r"\w+", re.UNICODE)
_PARA = re.compile(r"\n\s*\n")
STOP_WORDS = frozenset("""a an and are as at be been but by can did do does for from had has have he her his how i
if in into is it its me my no not of on or our she so than that the their them then there these they this to was we
were what when where which who why will with you your""".split())


@dataclasses.dataclass(frozen=True)
class Passage:
    text: str
    source: str  # the file it came from (relative to the indexed folder), with ":line" for JSONL
    index: int  # position in the index


@dataclasses.dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # cosine similarity in [0, 1]


def split_passages(text: str, max_chars: int = 800) -> list[str]:
    """Paragraphs of ``text`` (split at blank lines, whitespace collapsed); a paragraph longer than
    ``max_chars`` is cut at whitespace into pieces of at most ``max_chars`` (a single longer word is cut)."""
    if max_chars < 1:
        raise ValueError(f"max_chars: must be >= 1, got {max_chars}")
    out: list[str] = []
    for para in _PARA.split(text):
        words = para.split()
        piece = ""
        for w in words:
            while len(w) > max_chars:  # a "word" longer than a passage (e.g. a URL or base64): hard cut
                if piece:
                    out.append(piece)
                    piece = ""
                out.append(w[:max_chars])
                w = w[max_chars:]
            if not piece:
                piece = w
            elif len(piece) + 1 + len(w) <= max_chars:
                piece += " " + w
            else:
                out.append(piece)
                piece = w
        if piece:
            out.append(piece)
    return out


def load_passages(folder: Union[str, os.PathLike], max_chars: int = 800,
                  text_field: str = "text") -> list[Passage]:
    """Passages of every supported file under ``folder`` (see the module docstring). FileNotFoundError when the
    folder does not exist or is not a directory."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"retrieval: no such directory: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
    out: list[Passage] = []

    def add(text: str, source: str) -> None:
        for piece in split_passages(text, max_chars):
            out.append(Passage(piece, source, len(out)))

    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            raw = f.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            logger.warning("retrieval: cannot read %s: %s; skipped", f, exc)
            continue
        if f.suffix.lower() in TEXT_SUFFIXES:
            add(raw, rel)
            continue
        # split("\n"), not splitlines(): JSON strings may hold U+2028, U+0085 etc. raw, which splitlines() cuts at
        for lineno, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                logger.warning("retrieval: %s:%d: invalid JSON (%s); line skipped", f, lineno, exc)
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                logger.warning("retrieval: %s:%d: no string field %r; line skipped", f, lineno, text_field)
                continue
            add(obj[text_field], f"{rel}:{lineno}")
    return out


def tokenize(text: str, stop_words: frozenset = frozenset()) -> list[str]:
    return [t for t in _WORD.findall(text.lower()) if t not in stop_words]


class RetrievalProvider(Provider):
    """Interface of kind ``retrieval``: ``build(passages)`` then ``search(query, k) -> list[Hit]``."""

    kind: ClassVar[str] = "retrieval"

    def build(self, passages: Sequence[Passage]) -> None:
        raise NotImplementedError

    def search(self, query: str, k: int = 3) -> list[Hit]:
        raise NotImplementedError

    def __len__(self) -> int:
        return 0


class HashingTfidfRetriever(RetrievalProvider):
    """Hashing-trick TF-IDF with cosine similarity (settings: n_features, ngrams, min_score, stop_words)."""

    name = "tfidf"
    is_default = True
    description = "hashing-trick TF-IDF (unigrams + bigrams), cosine top-k; pure Python, no downloads"

    _KNOWN = {"n_features", "ngrams", "min_score", "stop_words"}

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        unknown = set(self.config) - self._KNOWN
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(self._KNOWN))})")
        self.n_features = as_number("n_features", self.config.get("n_features", 1 << 20), integer=True, low=1)
        self.ngrams = as_number("ngrams", self.config.get("ngrams", 2), integer=True)
        self.min_score = as_number("min_score", self.config.get("min_score", 0.0))
        sw = self.config.get("stop_words", "english")
        if sw not in ("english", "none", None):
            raise ValueError(f"stop_words: expected 'english' or 'none', got {sw!r}")
        self.stop_words = STOP_WORDS if sw == "english" else frozenset()
        if self.ngrams not in (1, 2):
            raise ValueError(f"ngrams: expected 1 (words) or 2 (words and word pairs), got {self.ngrams}")
        self.passages: list[Passage] = []
        self.idf: dict[int, float] = {}
        self.postings: dict[int, list[tuple[int, float]]] = {}  # bucket -> [(passage index, weight)]

    def __len__(self) -> int:
        return len(self.passages)

    def _counts(self, text: str) -> Counter:
        toks = tokenize(text, self.stop_words)
        feats: Iterable[str] = toks
        if self.ngrams == 2:
            feats = toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]
        return Counter(zlib.crc32(f.encode("utf-8")) % self.n_features for f in feats)

    @staticmethod
    def _normalise(vec: dict[int, float]) -> dict[int, float]:
        norm = math.sqrt(sum(w * w for w in vec.values()))
        return {b: w / norm for b, w in vec.items()} if norm > 0 else {}

    def build(self, passages: Sequence[Passage]) -> None:
        self.passages = list(passages)
        counts = [self._counts(p.text) for p in self.passages]
        df: Counter = Counter()
        for c in counts:
            df.update(c.keys())
        n = len(self.passages)
        self.idf = {b: math.log((1 + n) / (1 + d)) + 1.0 for b, d in df.items()}
        self.postings = {}
        for i, c in enumerate(counts):
            vec = self._normalise({b: (1.0 + math.log(t)) * self.idf[b] for b, t in c.items()})
            for b in sorted(vec):  # sorted: postings (and float sums below) in a fixed order
                self.postings.setdefault(b, []).append((i, vec[b]))

    def encode_query(self, query: str) -> dict[int, float]:
        c = self._counts(query)
        return self._normalise({b: (1.0 + math.log(t)) * self.idf[b] for b, t in c.items() if b in self.idf})

    def search(self, query: str, k: int = 3) -> list[Hit]:
        if k < 1:
            raise ValueError(f"k: must be >= 1, got {k}")
        scores: dict[int, float] = {}
        for b, qw in sorted(self.encode_query(query).items()):
            for i, w in self.postings.get(b, ()):
                scores[i] = scores.get(i, 0.0) + qw * w
        ranked = sorted((i for i, s in scores.items() if s > self.min_score), key=lambda i: (-scores[i], i))
        return [Hit(self.passages[i], min(1.0, scores[i])) for i in ranked[:k]]


PROVIDERS = [HashingTfidfRetriever]
