"""Data: byte tokenizer, BPE (train, round trip, save/load, state), txt/jsonl dataset providers, batching."""
from __future__ import annotations

import json

import pytest
import torch

from apt.core import registry
from apt.data.datasets import DEFAULT_CORPUS, TokenBatches, build_data, split_texts
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


def test_a_trained_tokenizer_never_sees_the_validation_text(tmp_path):
    """The BPE merges were learnt from the whole corpus, validation tail included: a word found only there came
    out as one token."""
    rare = "zyzzyvaqx"
    body = "".join(f"the cat sat on mat number {i}. " for i in range(300))
    path = tmp_path / "c.txt"
    path.write_text(body + (rare + " ") * 30)  # the rare word only in the last ~6%
    cfg = {"path": str(path), "seq_len": 8, "batch_size": 2, "val_fraction": 0.1, "tokenizer": "bpe",
           "bpe_vocab_size": 400}
    tok, train, val = build_data(cfg)
    assert val is not None and len(tok.encode(rare)) > 3  # the word is not a merge
    assert tok.decode(val.tokens.tolist()).count(rare) == 30 and rare not in tok.decode(train.tokens.tolist())
    byte_tok, byte_train, byte_val = build_data({**cfg, "tokenizer": "byte"})  # the byte path is as before
    assert byte_val.tokens.numel() == int((byte_train.tokens.numel() + byte_val.tokens.numel()) * 0.1)


def test_training_reads_a_text_file_as_eval_does(tmp_path):
    """The txt dataset read with universal newlines and errors="replace" (CRLF became LF, a bad byte three bytes of
    U+FFFD) while apt eval scores the file's bytes: the model was trained on other bytes than it was scored on."""
    body = b"\xef\xbb\xbfline one\r\nbad \xff\xfe byte\r\n" * 20
    path = tmp_path / "w.txt"
    path.write_bytes(body)
    tok, train, val = build_data({"path": str(path), "seq_len": 8, "batch_size": 2})
    assert bytes(train.tokens[:-1].tolist()) == body[3:]  # the bytes after the BOM, then the end-of-text id
    assert train.tokens[-1].item() == tok.eos_id


def test_split_texts():
    assert split_texts(["abcd", "efgh"], 0.5) == (["abcd"], ["efgh"])
    assert split_texts(["abcdefgh"], 0.5) == (["abcd"], ["efgh"])  # 9 characters with the separator: cut at 4
    assert split_texts(["ab", "cd"], 0.0) == (["ab", "cd"], [])


def test_short_corpus_uses_shorter_windows():
    tb = TokenBatches(torch.arange(5), seq_len=16, batch_size=2)
    x, y = next(tb.batches(0, 1))
    assert x.shape == (2, 4)
    with pytest.raises(ValueError):
        TokenBatches(torch.arange(1), 4, 1)


def test_tokenizers_encode_lone_surrogates():
    # invalid UTF-8 in a command-line argument reaches Python as U+DC80..U+DCFF: encode the bytes it stood for
    for tok in (ByteTokenizer(), BPETokenizer.train("ab cd ab cd ab cd", vocab_size=260)):
        ids = tok.encode("ab\udcffcd")
        assert 0xFF in ids and tok.decode(ids) == "ab\ufffdcd"
        assert tok.decode(tok.encode("x\ud800y")).startswith("x")  # other lone surrogates: no exception


def test_bpe_file_errors_name_the_file(tmp_path):
    for body, fragment in [('{"type": "bpe"}', "'merges' must be a list"), ('{"type": "bpe", "merges": [[1, 999]]}',
                           r"merges\[0\]: expected two token ids in \[0, 256\)"), ("[1]", "not a BPE tokenizer"),
                           ("{", "cannot read")]:
        f = tmp_path / "tok.json"
        f.write_text(body)
        with pytest.raises(ValueError, match=f"{f}: .*{fragment}"):
            BPETokenizer.load(f)


def test_jsonl_documents_must_be_strings_and_utf8(tmp_path):
    ds = registry.get("dataset", "jsonl")
    p = tmp_path / "d.jsonl"
    for line, fragment in [('{"text": null}', "field 'text' is NoneType None, expected a string"),
                           ('{"text": 5}', "field 'text' is int 5"), ('{"text": ["a"]}', "field 'text' is list")]:
        p.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"{p}:2: {fragment}"):
            ds.load_texts(p)
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=f"{p}:2: not UTF-8"):
        ds.load_texts(p)
    p.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\r\n' + json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode()
                  + b"\n")
    assert ds.load_texts(p) == ["bom", "a\u2028b"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "t" / "sub.txt").mkdir()  # a folder named *.txt is not a document
    assert registry.get("dataset", "txt").load_texts(tmp_path / "t") == ["hello"]


def test_data_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="data.dataset: .*'jsnol' is not registered.*did you mean 'jsonl'"):
        build_data({"dataset": "jsnol"})
    for cfg, fragment in [({"seq_len": -3}, "seq_len: expected an integer >= 1, got -3"),
                          ({"batch_size": 0}, "batch_size: expected an integer >= 1"),
                          ({"val_fraction": float("nan")}, "val_fraction: expected a number in"),
                          ({"val_fraction": 1.0}, "val_fraction")]:
        with pytest.raises(ValueError, match=fragment):
            build_data(cfg)
    for args, fragment in [((torch.arange(10), 0, 4), "seq_len"), ((torch.arange(10), 4, 0), "batch_size"),
                           ((torch.arange(10), -1, 4), "seq_len")]:
        with pytest.raises(ValueError, match=fragment):
            TokenBatches(*args)
    # a seed past 64 bits after the epoch mix (10**14 * 1_000_003) overflowed the generator
    x, y = next(TokenBatches(torch.arange(100), 4, 2, seed=10**14).batches(0, 1))
    assert x.shape == (2, 4) and torch.equal(x[:, 1:], y[:, :-1])
    a = next(TokenBatches(torch.arange(100), 4, 2, seed=3).batches(1, 1))[0]
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1)  # small seeds draw exactly as before
    assert torch.equal(a[:, 0], torch.randint(0, 96, (2,), generator=g))


def test_bpe_long_words_encode_like_short_ones():
    """Words over 64 bytes take the heap merge (O(n log n); the pass-per-merge loop took seconds on a 200k-byte
    word): the same ids as the pass-per-merge loop, overlaps (aaaa) included."""
    import random

    from apt.data.tokenizers import _merge

    rng = random.Random(0)
    alpha = "aab\u00e9\u4e2d"
    text = " ".join("".join(rng.choice(alpha) for _ in range(rng.randint(1, 200))) for _ in range(150))
    tok = BPETokenizer.train(text, vocab_size=330)

    def by_passes(word):
        seq = list(word.encode("utf-8"))
        while len(seq) > 1:
            rank, pair = min((tok.ranks.get(p, len(tok.ranks)), p) for p in zip(seq, seq[1:]))
            if rank == len(tok.ranks):
                return seq
            seq = _merge(seq, pair, 256 + rank)
        return seq

    for _ in range(100):
        w = "".join(rng.choice(alpha) for _ in range(rng.randint(65, 300)))
        assert tok._merge_long(list(w.encode("utf-8"))) == by_passes(w)
        assert tok.decode(tok.encode(w)) == w
    assert tok._merge_long(list(b"a" * 101)) == by_passes("a" * 101)


def test_short_split_warning_names_the_split(caplog):
    from apt.data.datasets import TokenBatches

    with caplog.at_level("WARNING", logger="apt.data.datasets"):
        TokenBatches(torch.arange(10), 64, 2, split="validation")
    assert "the validation split has only 10 tokens; using windows of 9 instead of 64" in caplog.text


@pytest.mark.parametrize("n", [16 * 5 + 1, 16 * 5 + 8, 16 + 2, 17 * 3])
def test_validation_windows_score_every_target_once(n):
    """The tokens past the last whole window were never scored (up to seq_len - 1 of them)."""
    from apt.data.datasets import IGNORE_INDEX, TokenBatches

    tokens = torch.arange(n)  # token t at position t: a window's start is its first token
    scored = torch.zeros(n, dtype=torch.long)
    for x, y in TokenBatches(tokens, 16, 3).sequential():
        assert x.shape == y.shape and x.shape[1] == 16  # every window, the tail's too, has a full context
        keep = y != IGNORE_INDEX
        assert torch.equal(y[keep], (x + 1)[keep])  # each target is the token after its input
        for row_x, row_keep in zip(x, keep):
            start = int(row_x[0])
            scored[start + 1:start + 17] += row_keep.long()
    assert scored[0] == 0 and torch.all(scored[1:] == 1)
