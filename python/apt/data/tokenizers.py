"""Tokenizers: byte-level (the default, no training, every string round-trips) and a byte-level BPE that is
trained on a text, saved as JSON and stored inside checkpoints.

Both expose ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size``, ``eos_id`` and
``state_dict()``; :func:`tokenizer_from_state` rebuilds either from its state.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Union

logger = logging.getLogger(__name__)

# Pre-tokenisation for BPE: words with their leading space, runs of digits, punctuation, whitespace.
_PRETOKEN = re.compile(r" ?[A-Za-z\u00C0-\uFFFF]+| ?\d{1,3}| ?[^\sA-Za-z\d\u00C0-\uFFFF]+|\s+")


def read_text_file(path: Union[str, os.PathLike]) -> str:
    """A text file as training and evaluation both read it: its bytes as they are (CRLF stays CRLF), a UTF-8 BOM
    skipped, invalid UTF-8 kept as surrogate escapes, which :func:`utf8_bytes` turns back into the same bytes. (The
    txt dataset read with universal newlines and errors="replace" while ``apt eval`` read the bytes: a CRLF file
    was scored on other bytes than it was trained on.)"""
    raw = Path(path).read_bytes()
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    return raw.decode("utf-8", errors="surrogateescape")


def utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8. A lone surrogate (what Python makes of invalid UTF-8 in a command-line argument or a
    file read with ``errors="surrogateescape"``) becomes the byte it stands for, or, outside U+DC80..U+DCFF, its
    3-byte form, instead of a UnicodeEncodeError."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


class ByteTokenizer:
    """UTF-8 bytes 0..255 are the tokens; 256 is end-of-text. Invalid UTF-8 decodes with U+FFFD."""

    name = "byte"

    def __init__(self) -> None:
        self.eos_id = 256
        self.vocab_size = 257

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = list(utf8_bytes(text))
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in (int(t) for t in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        return {"type": "byte"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class BPETokenizer:
    """Byte-level BPE: starts from the 256 bytes and learns ``vocab_size - 257`` merges of adjacent pairs (the most
    frequent pair first, ties by the smaller pair) inside pre-tokenised words; id ``vocab_size - 1`` is
    end-of-text. Encoding applies the merges by rank, so any string (unseen characters included) encodes."""

    name = "bpe"

    def __init__(self, merges: Optional[list[tuple[int, int]]] = None) -> None:
        self.merges: list[tuple[int, int]] = [tuple(m) for m in (merges or [])]  # type: ignore[misc]
        for i, m in enumerate(self.merges):  # a merge may join bytes and the tokens of earlier merges only
            if len(m) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256 + i for t in m):
                raise ValueError(f"merges[{i}]: expected two token ids in [0, {256 + i}), got {list(m)!r}")
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(self.merges):
            self.vocab[256 + i] = self.vocab[a] + self.vocab[b]
        self.eos_id = 256 + len(self.merges)
        self.vocab_size = self.eos_id + 1
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> "BPETokenizer":
        if vocab_size < 257:
            raise ValueError(f"vocab_size: must be >= 257 (256 bytes + end-of-text), got {vocab_size}")
        words = Counter(_PRETOKEN.findall(text))
        seqs = [list(utf8_bytes(w)) for w in words]
        counts = list(words.values())
        # pair counts over all words, and which words hold each pair; a merge only revisits those words
        pairs: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for i, seq in enumerate(seqs):
            for p in zip(seq, seq[1:]):
                pairs[p] += counts[i]
                where.setdefault(p, set()).add(i)
        merges: list[tuple[int, int]] = []
        for new_id in range(256, vocab_size - 1):
            if not pairs:
                break
            best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            if pairs[best] < 2:
                break  # merging a pair seen once does not compress anything
            merges.append(best)
            for i in where.pop(best, ()):
                old = seqs[i]
                new = _merge(old, best, new_id)
                if len(new) == len(old):
                    continue  # stale index entry: the pair is no longer in this word
                c = counts[i]
                for p in zip(old, old[1:]):
                    pairs[p] -= c
                    if pairs[p] <= 0:
                        del pairs[p]
                for p in zip(new, new[1:]):
                    pairs[p] += c
                    where.setdefault(p, set()).add(i)
                seqs[i] = new
            pairs.pop(best, None)
        logger.info("trained BPE: %d merges (vocab %d)", len(merges), len(merges) + 257)
        return cls(merges)

    def _encode_word(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        seq = list(utf8_bytes(word))
        if len(seq) > 64:  # a long word (a CJK line, base64): the loop below is O(len * merges) there
            seq = self._merge_long(seq)
        while len(seq) > 1:
            ranked = [(self.ranks.get(p, len(self.ranks)), p) for p in zip(seq, seq[1:])]
            rank, pair = min(ranked)
            if rank == len(self.ranks):
                break
            seq = _merge(seq, pair, 256 + rank)
        if len(self._cache) < 100_000:
            self._cache[word] = seq
        return seq

    def _merge_long(self, seq: list[int]) -> list[int]:
        """The merges of _encode_word in O(n log n): a heap of (rank, position) over a linked list. Same result:
        the lowest-ranked pair first and, for one rank, its occurrences left to right (overlaps: the left one),
        as each pass of _merge does; a merge only makes pairs of a higher rank (they hold the new token)."""
        ranks, n = self.ranks, len(seq)
        val, nxt, prv = list(seq), list(range(1, n + 1)), list(range(-1, n - 1))
        alive = [True] * n
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((val[i], val[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or ranks.get((val[i], val[j])) != r:
                continue  # stale: i or its right neighbour changed since this entry was pushed
            val[i], alive[j] = 256 + r, False
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                if (rr := ranks.get((val[i], val[nxt[i]]))) is not None:
                    heapq.heappush(heap, (rr, i))
            if prv[i] >= 0 and (rr := ranks.get((val[prv[i]], val[i]))) is not None:
                heapq.heappush(heap, (rr, prv[i]))
        return [val[i] for i in range(n) if alive[i]]

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in _PRETOKEN.finditer(text):
            if m.start() > pos:  # characters the pattern skipped (none expected) are kept as bytes
                ids.extend(utf8_bytes(text[pos:m.start()]))
            ids.extend(self._encode_word(m.group()))
            pos = m.end()
        if pos < len(text):
            ids.extend(utf8_bytes(text[pos:]))
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.vocab[i] for i in (int(t) for t in ids) if i in self.vocab).decode(
            "utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "merges": [list(m) for m in self.merges]}

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.state_dict(), f)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "BPETokenizer":
        try:
            with open(path, "r", encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a BPE tokenizer: {exc}") from None
        if not isinstance(state, dict) or state.get("type") != "bpe":
            raise ValueError(f"{path}: not a BPE tokenizer file (expected a JSON object with \"type\": \"bpe\")")
        try:
            return tokenizer_from_state(state)  # type: ignore[return-value]
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _merge(seq: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out = []
    i = 0
    n = len(seq)
    while i < n:
        if i + 1 < n and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


Tokenizer = Union[ByteTokenizer, BPETokenizer]


def get_tokenizer(name: str = "byte", path: Optional[str] = None, train_text: Optional[str] = None,
                  train_file: Optional[str] = None, vocab_size: int = 512) -> Tokenizer:
    """``byte`` (default) or ``bpe``: a BPE loads from ``path`` (a saved JSON), or is trained on ``train_text`` /
    ``train_file`` with ``vocab_size`` tokens."""
    if name == "byte":
        if path:  # a saved BPE file with the default name: it was silently ignored for the byte tokenizer
            raise ValueError(f"tokenizer: a tokenizer path ({path}) was given with the byte tokenizer, which loads "
                             "nothing; set the tokenizer to 'bpe' to load it, or drop the path")
        return ByteTokenizer()
    if name == "bpe":
        if path:
            return BPETokenizer.load(path)
        if train_text is None and train_file is not None:
            # as the txt dataset and `apt eval` read a file: a BOM skipped, CRLF kept, invalid UTF-8 as its bytes
            # (open(encoding="utf-8") raised UnicodeDecodeError, kept the BOM and turned CRLF into LF)
            train_text = read_text_file(train_file)
        if train_text is None:
            raise ValueError("bpe tokenizer: give path (a saved tokenizer) or train_text / train_file")
        return BPETokenizer.train(train_text, vocab_size)
    raise ValueError(f"tokenizer: unknown name {name!r} (expected 'byte' or 'bpe')")


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    kind = state.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        merges = state.get("merges")
        if not isinstance(merges, list) or not all(isinstance(m, (list, tuple)) for m in merges):
            raise ValueError(f"tokenizer state: 'merges' must be a list of [id, id] pairs, got {type(merges).__name__}")
        return BPETokenizer([tuple(m) for m in merges])
    raise ValueError(f"tokenizer state: unknown type {kind!r}")
