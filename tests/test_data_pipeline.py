"""The data pipeline: a BPE trained from a file reads it as the dataset does, a tokenizer_path the byte tokenizer
would ignore is an error, a validation split too small to keep is warned about, bits per byte counts the scored
bytes only, and a resume whose BPE was retrained on other text is refused."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from apt.core.config import load_profile
from apt.data.datasets import DEFAULT_CORPUS, build_data
from apt.data.tokenizers import BPETokenizer, ByteTokenizer, get_tokenizer
from apt.inference.evaluate import evaluate_text
from apt.modeling.compose import ModelBuilder


def test_bpe_train_file_reads_like_the_dataset(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"\xef\xbb\xbfab ab\r\nab ab\xff\r\n")
    tok = get_tokenizer("bpe", train_file=str(f), vocab_size=300)  # was UnicodeDecodeError
    assert b"\xef\xbb\xbf" not in b"".join(tok.vocab.values())
    assert tok.merges == BPETokenizer.train(f.read_bytes()[3:].decode("utf-8", "surrogateescape"), 300).merges


def test_byte_tokenizer_with_a_path_is_an_error(tmp_path):
    p = tmp_path / "t.json"
    BPETokenizer([(97, 98)]).save(p)
    with pytest.raises(ValueError, match="byte tokenizer"):
        build_data({"tokenizer": "byte", "tokenizer_path": str(p), "seq_len": 8, "batch_size": 2})


@pytest.mark.parametrize("tok", ["byte", "bpe"])
def test_dropped_validation_split_warns(tmp_path, caplog, tok):
    p = tmp_path / "c.txt"
    p.write_text("hello world " * 16)
    with caplog.at_level(logging.WARNING):
        _, _, val = build_data({"path": str(p), "tokenizer": tok, "seq_len": 128, "batch_size": 2,
                                "val_fraction": 0.05})
    assert val is None and "no validation split" in caplog.text


def test_bits_per_byte_counts_the_scored_bytes_only():
    torch.manual_seed(0)
    m = ModelBuilder(load_profile("tiny_debug", ["model.d_model=32", "model.num_layers=1", "model.num_heads=2",
                                                 "model.max_seq_len=16", "data.seq_len=16"]),
                     vocab_size=300).build().eval()
    bpe = BPETokenizer.train("internationalization " * 50, 299)
    text = "internationalization is"
    ids = bpe.encode(text)
    r = evaluate_text(m, bpe, text, context=16)
    scored = len(text.encode()) - len(bpe.vocab[ids[0]])
    assert r.bits_per_byte == pytest.approx(r.nll * r.tokens / math.log(2) / scored)
    rb = evaluate_text(m, ByteTokenizer(), "héllo", context=16)
    assert rb.bits_per_byte == pytest.approx(rb.nll * rb.tokens / math.log(2) / (len("héllo".encode()) - 1))


def test_resume_with_a_different_bpe_is_refused(tmp_path):
    from apt.training import Trainer
    from apt.training.checkpoint import CheckpointError

    corpus = tmp_path / "c.txt"
    text = DEFAULT_CORPUS.read_text()
    corpus.write_text(text)
    over = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1, "model.max_seq_len": 16,
            "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3, "training.max_epochs": 2,
            "training.progress": False, "training.warmup_steps": 2, "data.tokenizer": "bpe",
            "data.bpe_vocab_size": 300, "data.path": str(corpus), "training.out_dir": str(tmp_path / "run")}
    Trainer(load_profile("tiny_debug", over)).fit(stop_at_step=3)
    same = Trainer(load_profile("tiny_debug", {**over, "training.resume": "auto"}))  # same corpus: fine
    assert same.step == 3
    corpus.write_text(text.upper() + "\n" + text)  # edited corpus: same vocab size, other merges
    with pytest.raises(CheckpointError, match="tokenizer this profile builds does not match"):
        Trainer(load_profile("tiny_debug", {**over, "training.resume": "auto"}))
