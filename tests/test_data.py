"""Data: byte tokenizer, BPE (train, round trip, save/load, state), txt/jsonl dataset providers, batching."""
from __future__ import annotations

import json

import pytest
import torch

from apt.core import registry
from apt.data.datasets import DEFAULT_CORPUS, TokenBatches, build_data
from apt.data.tokenizers import BPETokenizer, ByteTokenizer, get_tokenizer, tokenizer_from_state

SAMPLES = ["hello world", "", "héllo wörld ✓ 12345!!", "line\nbreak\ttab  two spaces", "日本語のテキスト"]


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer()
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eos_id == 256
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("a", add_eos=True) == [97, 256]
    assert tok.decode([104, 105, 256]) == "hi"  # special ids are skipped
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut multi-byte character does not raise


def test_bpe_train_round_trip_and_compression(tmp_path):
    text = DEFAULT_CORPUS.read_text()
    tok = get_tokenizer("bpe", train_text=text, vocab_size=400)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 400 and tok.eos_id == 399
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode())  # merges compress
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s  # unseen characters fall back to bytes
    assert max(ids) < tok.eos_id
    path = tmp_path / "bpe.json"
    tok.save(path)
    again = get_tokenizer("bpe", path=str(path))
    assert again.encode(text) == ids
    assert tokenizer_from_state(tok.state_dict()).encode("the keeper") == tok.encode("the keeper")
    assert isinstance(tokenizer_from_state({"type": "byte"}), ByteTokenizer)


def test_bpe_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", vocab_size=100)
    with pytest.raises(ValueError, match="train_text"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="unknown name"):
        get_tokenizer("sentencepiece")


def test_dataset_providers(tmp_path):
    assert registry.get("dataset").name == "txt"
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert registry.get("dataset", "txt").load_texts(tmp_path) == ["alpha", "beta"]
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "2"}) + "\n")
    assert registry.get("dataset", "jsonl").load_texts(j) == ["one", "2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        registry.get("dataset", "jsonl").load_texts(bad)
    with pytest.raises(ValueError, match="no field 'body'"):
        registry.get("dataset", "jsonl").load_texts(j, text_field="body")
    with pytest.raises(FileNotFoundError):
        registry.get("dataset", "txt").load_texts(tmp_path / "nope.txt")


def test_build_data_and_batches_are_deterministic(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(20)))
    cfg = {"dataset": "jsonl", "path": str(j), "seq_len": 8, "batch_size": 3, "val_fraction": 0.2,
           "tokenizer": "bpe", "bpe_vocab_size": 300}
    tok, train, val = build_data(cfg, seed=5)
    assert isinstance(tok, BPETokenizer) and val is not None
    x, y = next(train.batches(0, 1))
    assert x.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    a = list(train.batches(2, 4))
    b = list(train.batches(2, 4, skip=2))
    assert len(b) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(a[2:], b))
    assert not torch.equal(a[0][0], next(train.batches(3, 1))[0])  # epochs differ
    vb = list(val.sequential())
    assert vb and vb[0][0].shape[1] == 8


def test_short_corpus_uses_shorter_windows():
    tb = TokenBatches(torch.arange(5), seq_len=16, batch_size=2)
    x, y = next(tb.batches(0, 1))
    assert x.shape == (2, 4)
    with pytest.raises(ValueError):
        TokenBatches(torch.arange(1), 4, 1)
