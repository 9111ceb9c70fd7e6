"""Perplexity against hand-computed values on stand-in models (window placement included), the Mamba streaming
path, and the chat loop driven by scripted input streams."""
from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from torch import nn

from apt.core.config import load_profile
from apt.data.tokenizers import get_tokenizer
from apt.inference import ChatSession, evaluate_file, evaluate_text, perplexity, run_chat
from apt.modeling.compose import ModelBuilder

TOK = get_tokenizer("byte")


class BigramPosLM(nn.Module):
    """Stand-in: logits[t] = table[ids[t]] + pos_bias[t] (position within the input), window ``max_seq_len``."""

    def __init__(self, vocab: int = 6, window: int = 4, pos_weight: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.pos_bias = nn.Parameter(torch.randn(window, vocab, generator=g) * pos_weight)
        self.max_seq_len = window

    def forward(self, ids, cache=None):
        assert ids.shape[1] <= self.max_seq_len
        return self.table[ids] + self.pos_bias[: ids.shape[1]][None]


def _nll(model, prev, nxt, pos):
    return -torch.log_softmax(model.table[prev] + model.pos_bias[pos], -1)[nxt].item()


def test_bigram_perplexity_is_window_independent():
    m = BigramPosLM(pos_weight=0.0)
    ids = [0, 3, 1, 5, 2, 2, 4, 0, 1, 3, 5]
    expect = sum(_nll(m, a, b, 0) for a, b in zip(ids, ids[1:])) / (len(ids) - 1)
    for context, stride in [(4, 1), (4, 2), (4, 4), (2, 1), (1, 1)]:
        r = perplexity(m, ids, context=context, stride=stride, batch_size=3)
        assert r.tokens == len(ids) - 1
        assert r.nll == pytest.approx(expect, rel=1e-6)
        assert r.perplexity == pytest.approx(math.exp(expect), rel=1e-6)


def test_sliding_window_positions_hand_computed():
    # N=9, context=4, stride=2: forwards over ids[0:2], ids[0:4], ids[2:6], ids[4:8];
    # targets 1..8 are predicted at input positions 0,1 | 2,3 | 2,3 | 2,3
    m = BigramPosLM()
    ids = [1, 4, 2, 0, 5, 3, 3, 1, 2]
    positions = [0, 1, 2, 3, 2, 3, 2, 3]
    expect = sum(_nll(m, ids[t - 1], ids[t], p) for t, p in zip(range(1, 9), positions)) / 8
    r = perplexity(m, ids, context=4, stride=2, batch_size=1)
    assert r.nll == pytest.approx(expect, rel=1e-6) and r.forwards == 4
    # default: context = window (4), stride = 2 -> same; batching windows does not change the value
    assert perplexity(m, ids, batch_size=8).nll == pytest.approx(expect, rel=1e-6)
    # stride == context: targets [1,5) from ids[0:4] (positions 0..3), targets [5,9) from ids[4:8] (0..3)
    expect4 = sum(_nll(m, ids[t - 1], ids[t], p) for t, p in zip(range(1, 9), [0, 1, 2, 3, 0, 1, 2, 3])) / 8
    assert perplexity(m, ids, context=4, stride=4).nll == pytest.approx(expect4, rel=1e-6)


def test_perplexity_errors():
    m = BigramPosLM()
    with pytest.raises(ValueError, match="context"):
        perplexity(m, [1, 2, 3], context=5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, [1, 2, 3], context=4, stride=5)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(m, [1])


def test_perplexity_batch_size_must_be_positive():
    m = BigramPosLM()
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"batch_size: must be >= 1, got " + str(bad)):
            perplexity(m, [1, 2, 3, 4], context=2, batch_size=bad)


def test_real_models_eval_file(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 6
    f = tmp_path / "t.txt"
    f.write_text(text)
    for name, ov in [("tiny_debug", ["model.d_model=32", "model.num_layers=1", "model.num_heads=2",
                                      "model.max_seq_len=32", "data.seq_len=16"]),
                     ("mamba_tiny", ["model.d_model=16", "model.num_layers=1"])]:
        torch.manual_seed(0)
        m = ModelBuilder(load_profile(name, ov), vocab_size=257).build()
        r = evaluate_file(m, TOK, f, context=32 if name == "tiny_debug" else 64)
        # an untrained model is close to uniform over 257 tokens
        assert r.tokens == len(text) - 1 and 100 < r.perplexity < 1000
        assert r.bits_per_byte == pytest.approx(r.nll * r.tokens / math.log(2) / (len(text) - 1))  # first byte unscored
        if name == "mamba_tiny":
            # streaming through the cache == one full forward
            ids = torch.tensor([TOK.encode(text)])
            full = -torch.log_softmax(m(ids[:, :-1])[0].float(), -1).gather(-1, ids[0, 1:, None]).mean().item()
            assert r.nll == pytest.approx(full, rel=1e-4)
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate_file(m, TOK, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="too short"):
        evaluate_text(m, TOK, "a")


class EchoLM(nn.Module):
    """Stand-in that always answers "ok" then a new "User:" line (so the reply stops at the stop string)."""

    def __init__(self, window=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.max_seq_len = window
        self.reply = [ord(c) for c in " ok\nUser: more"]
        self.prompts = []

    def forward(self, ids, cache=None):
        B, T = ids.shape
        self.prompts.append(TOK.decode(ids[0].tolist()))
        # predict the next char of the reply from how many reply chars are already at the end of the input
        seq = ids[0].tolist()
        done = 0
        for j in range(len(self.reply), 0, -1):
            if seq[-j:] == self.reply[:j]:
                done = j
                break
        nxt = self.reply[done] if done < len(self.reply) else 256
        logits = torch.full((B, T, 257), -10.0)
        logits[:, -1, nxt] = 10.0
        return logits + self.dummy


def test_chat_loop_commands_history_and_eof():
    lm = EchoLM()
    s = ChatSession(lm, TOK, system="Be brief.", temperature=0, max_new_tokens=20)
    out = io.StringIO()
    n = run_chat(s, io.StringIO("hello\n\n/help\n/nope\nhow are you\n/reset\nagain\n/exit\nnot read\n"), out)
    text = out.getvalue()
    assert n == 3 and text.count("ok\n") == 3 and "unknown command /nope" in text and "history cleared" in text
    assert s.history == [("again", "ok")]
    # the second turn saw the first in its prompt
    assert any(p.startswith("Be brief.\nUser: hello\nAssistant: ok\nUser: how are you\nAssistant:")
               for p in lm.prompts)
    # end of input without /exit ends cleanly
    s2 = ChatSession(EchoLM(), TOK, temperature=0, max_new_tokens=20)
    assert run_chat(s2, io.StringIO("hi"), io.StringIO()) == 1


def test_chat_history_fits_window():
    lm = EchoLM(window=96)
    s = ChatSession(lm, TOK, temperature=0, max_new_tokens=16)
    for i in range(6):
        assert s.reply(f"message number {i}") == "ok"
    prompt = s.build_prompt("last")
    assert len(TOK.encode(prompt)) <= 96 - 16 and s.dropped > 0
    assert prompt.endswith("User: last\nAssistant:") and "message number 5" in prompt


@pytest.mark.parametrize("length, fragment", [(40, "its start leaves the window as the reply grows"),
                                              (80, "its start is cut")])
def test_chat_long_message_warning_says_what_happens(caplog, length, fragment):
    """A message longer than window - max_new_tokens but within the window is read whole (it was said to be cut)."""
    lm = EchoLM(window=64)
    s = ChatSession(lm, TOK, temperature=0, max_new_tokens=16)
    with caplog.at_level(logging.WARNING, logger="apt.inference.chat"):
        s.build_prompt("x" * length)
    assert fragment in caplog.text and "longer than the model's window (64 tokens) minus max_new_tokens (16)" in \
        caplog.text


def test_chat_warns_once_when_max_new_tokens_fills_the_window(caplog):
    s = ChatSession(EchoLM(window=32), TOK, temperature=0, max_new_tokens=40)
    with caplog.at_level(logging.WARNING, logger="apt.inference.chat"):
        for msg in ("hi", "there", "again"):
            assert s.reply(msg) == "ok"
    msgs = [r.getMessage() for r in caplog.records if r.name == "apt.inference.chat"]
    assert len(msgs) == 1 and "max_new_tokens (40) is not below the model's window (32" in msgs[0], msgs


def test_chat_on_real_model_runs():
    torch.manual_seed(0)
    m = ModelBuilder(load_profile("tiny_debug", ["model.d_model=32", "model.num_layers=1", "model.num_heads=2"]),
                     vocab_size=257).build()
    s = ChatSession(m, TOK, max_new_tokens=8, seed=0)
    out = io.StringIO()
    assert run_chat(s, io.StringIO("hi\nthere\n"), out) == 2
    assert s.turns == 2 and s.history[-1][0] == "there"


def test_evaluate_file_scores_the_files_bytes(tmp_path):
    lm = BigramPosLM(vocab=257, window=8)
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xff\xfe\x00abc")  # not UTF-8: scored as these 6 bytes, not as 10 bytes of U+FFFD
    res = evaluate_file(lm, TOK, f)
    assert res.tokens == 5 and res.bits_per_byte == pytest.approx(res.nll * 5 / math.log(2) / 5)
    want = perplexity(lm, list(b"\xff\xfe\x00abc"))
    assert res.nll == pytest.approx(want.nll)
    f.write_bytes(b"\xef\xbb\xbfabcd")  # a byte-order mark is not text (training skips it too)
    assert evaluate_file(lm, TOK, f).nll == pytest.approx(perplexity(lm, list(b"abcd")).nll)
    with pytest.raises(TypeError, match="context: expected an int, got float 4.0"):
        perplexity(lm, list(b"abcdef"), context=4.0)
    with pytest.raises(TypeError, match="stride: expected an int"):
        perplexity(lm, list(b"abcdef"), stride=2.5)


def test_stride_of_a_streamed_model_is_ignored_with_a_warning(caplog):
    cfg = load_profile("mamba_tiny", ["model.d_model=16", "model.num_layers=1"])
    m = ModelBuilder(cfg, vocab_size=257).build().eval()
    ids = list(b"some text to score")
    with caplog.at_level(logging.WARNING):
        a = perplexity(m, ids, context=8, stride=2)
    assert "stride 2 ignored" in caplog.text and a.stride == 8
    assert a.nll == pytest.approx(perplexity(m, ids, context=8).nll)


def test_chat_session_checks_its_sampling_settings_at_construction():
    for kw, frag in [({"temperature": -1.0}, "temperature"), ({"top_p": 2.0}, "top_p"), ({"top_k": -3}, "top_k"),
                     ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=frag):
            ChatSession(EchoLM(), TOK, **kw)
