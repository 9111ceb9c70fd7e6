"""generate(): KV-cache equals no cache (greedy, token for token) on GPT and Mamba, batches equal single runs,
seeds, eos / stop strings / max_new_tokens, window overflow, plugin hooks (augment_prompt, select_sample, a failing
plugin is disabled and generation goes on)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from apt.core.config import load_profile
from apt.data.tokenizers import get_tokenizer
from apt.inference import Candidate, generate, generate_tokens
from apt.modeling.compose import ModelBuilder
from apt.plugins.base import Plugin
from apt.plugins.manager import PluginManager

TOK = get_tokenizer("byte")


def tiny(backbone: str = "gpt", window: int = 40) -> nn.Module:
    if backbone == "gpt":
        cfg = load_profile("tiny_debug", ["model.d_model=32", "model.num_layers=2", "model.num_heads=2",
                                          f"model.max_seq_len={window}", "data.seq_len=16"])
    else:
        cfg = load_profile("mamba_tiny", ["model.d_model=16", "model.num_layers=1"])
    torch.manual_seed(0)
    return ModelBuilder(cfg, vocab_size=TOK.vocab_size).build().eval()


class CountingLM(nn.Module):
    """Stand-in: next token = (last token + 1) % V, except that after ``stop_after`` positions it predicts eos.
    No cache support (exercises the uncached path)."""

    def __init__(self, vocab: int = 257, eos: int = 256, stop_after: int = 1000) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab, self.eos, self.stop_after = vocab, eos, stop_after
        self.max_seq_len = None
        self.calls = 0

    def forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        self.calls += 1
        B, T = ids.shape
        nxt = (ids + 1) % (self.vocab - 1)
        pos = torch.arange(T)[None].expand(B, T)
        nxt = torch.where(pos >= self.stop_after - 1, torch.full_like(nxt, self.eos), nxt)
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 10.0 + self.dummy


@pytest.mark.parametrize("backbone", ["gpt", "mamba"])
def test_cache_equals_no_cache_greedy(backbone):
    m = tiny(backbone)
    a = generate(m, TOK, "The cat", max_new_tokens=20, temperature=0, use_cache=True, stop_at_eos=False,
                 return_details=True)
    b = generate(m, TOK, "The cat", max_new_tokens=20, temperature=0, use_cache=False, stop_at_eos=False,
                 return_details=True)
    assert a.tokens == b.tokens and len(a.tokens) == 20 and a.finish_reason == "length"
    # the cached path calls the model once per token (the prefill included), not on the whole context
    calls = []
    h = m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    generate(m, TOK, "The cat", max_new_tokens=5, temperature=0, use_cache=True, stop_at_eos=False)
    h.remove()
    assert calls == [7, 1, 1, 1, 1]


def test_window_overflow_keeps_generating_and_matches_until_full():
    m = tiny("gpt", window=24)
    prompt = "x" * 30  # longer than the window: cropped to the last 24 tokens
    a = generate(m, TOK, prompt, max_new_tokens=30, temperature=0, use_cache=True, stop_at_eos=False,
                 return_details=True)
    b = generate(m, TOK, prompt, max_new_tokens=30, temperature=0, use_cache=False, stop_at_eos=False,
                 return_details=True)
    assert a.prompt_tokens == 24 and len(a.tokens) == len(b.tokens) == 30
    assert a.tokens[0] == b.tokens[0]  # same context (the cropped prompt) for the first token


def test_batch_equals_one_by_one_and_keeps_order():
    m = tiny()
    prompts = ["abc", "hello", "xyz", "", "hey"]
    batch = generate(m, TOK, prompts, max_new_tokens=6, temperature=0, stop_at_eos=False)
    single = [generate(m, TOK, p, max_new_tokens=6, temperature=0, stop_at_eos=False) for p in prompts]
    assert batch == single and isinstance(batch, list) and len(batch) == 5


def test_seed_determinism_and_sampling_settings():
    m = tiny()
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, stop_at_eos=False)
    s1 = generate(m, TOK, ["once upon", "a time"], seed=7, **kw)
    s2 = generate(m, TOK, ["once upon", "a time"], seed=7, **kw)
    s3 = generate(m, TOK, ["once upon", "a time"], seed=8, **kw)
    assert s1 == s2 and s1 != s3
    state = torch.get_rng_state()
    generate(m, TOK, "x", seed=1, **kw)
    assert torch.equal(state, torch.get_rng_state())  # a seeded call leaves the global RNG alone
    # top_k=1 sampling == greedy
    assert generate(m, TOK, "abc", max_new_tokens=8, temperature=0.7, top_k=1, seed=3, stop_at_eos=False) == \
        generate(m, TOK, "abc", max_new_tokens=8, temperature=0, stop_at_eos=False)


def test_eos_stop_strings_and_limits():
    lm = CountingLM(stop_after=8)
    r = generate(lm, TOK, "abc", max_new_tokens=50, temperature=0, return_details=True)
    # positions 3..7 predict d..h, position 7 predicts eos -> 5 tokens
    assert r.text == "defgh" and r.finish_reason == "eos" and TOK.eos_id not in r.tokens
    r = generate(lm, TOK, "abc", max_new_tokens=50, temperature=0, stop_at_eos=False, return_details=True)
    assert r.finish_reason == "length" and len(r.tokens) == 50
    r = generate(lm, TOK, "abc", max_new_tokens=50, temperature=0, stop=["fg"], return_details=True)
    assert r.text == "de" and r.finish_reason == "stop"
    assert generate(lm, TOK, "abc", max_new_tokens=3, temperature=0) == "def"
    assert generate(lm, TOK, "abc", max_new_tokens=0) == ""
    assert generate_tokens(lm, [1, 2], 4, eos_id=None) == [3, 4, 5, 6]
    assert generate_tokens(lm, [1, 2], 0) == []  # looped forever: the limit was checked before marking a row done
    with pytest.raises(ValueError, match="^max_new_tokens: must be an int >= 0"):
        generate_tokens(lm, [1, 2], -1)
    with pytest.raises(ValueError, match="use_cache"):
        generate(lm, TOK, "abc", use_cache=True)
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, TOK, "abc", top_p=1.5)
    with pytest.raises(TypeError, match="prompts"):
        generate(lm, TOK, [b"bytes"])


class Upper(Plugin):
    name = "test_upper"

    def augment_prompt(self, prompt, ctx):
        assert ctx.extra["tokenizer"] is TOK
        return "ab" + prompt


class Broken(Plugin):
    name = "test_broken"

    def augment_prompt(self, prompt, ctx):
        raise RuntimeError("boom")


class Jump(Plugin):
    """select_sample: at the first step, replace the sampled token by a 3-token continuation."""
    name = "test_jump"

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = []

    def select_sample(self, candidates, ctx):
        self.seen.append((ctx.extra["remaining"], round(ctx.extra["entropy"], 3)))
        if len(self.seen) == 1:
            assert len(candidates) == 1 and candidates[0].tokens == [ord("d")]
            return Candidate([ord("X"), ord("Y"), ord("Z")], -1.0)
        return None


def test_plugins_augment_select_and_failure_isolation(caplog):
    lm = CountingLM()
    mgr = PluginManager([Broken(), Upper()])
    out = generate(lm, TOK, "c", max_new_tokens=2, temperature=0, plugins=mgr, return_details=True)
    assert out.prompt == "abc" and out.text == "de"
    assert "test_broken" in mgr.disabled and "boom" in caplog.text
    jump = Jump()
    r = generate(lm, TOK, "abc", max_new_tokens=6, temperature=0, plugins=[jump], return_details=True)
    assert r.text == "XYZ[\\]" and r.selections == 1
    assert [s[0] for s in jump.seen] == [6, 3, 2, 1]


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_vocabulary_never_samples_past_the_tokenizer(use_cache):
    cfg = load_profile("tiny_debug", ["model.d_model=32", "model.num_layers=1", "model.num_heads=2",
                                      "model.max_seq_len=40", "data.seq_len=16", "model.vocab_size=300"])
    m = ModelBuilder(cfg, vocab_size=TOK.vocab_size).build().eval()

    def favour_padding(mod, inp, out):  # all the mass on id 299, a row the byte tokenizer has not got
        out = out.clone()
        out[..., 299] = 1e4
        out[..., 65] = 1e3  # 'A': the best id the tokenizer has
        return out

    m.register_forward_hook(favour_padding)
    toks = generate(m, TOK, "x", max_new_tokens=4, temperature=0, use_cache=use_cache, stop_at_eos=False,
                    return_details=True).tokens
    assert toks == [65] * 4
    m2 = ModelBuilder(cfg, vocab_size=TOK.vocab_size).build().eval()
    m2.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.arange(257, 300), 30.0))
    sampled = generate(m2, TOK, "x", max_new_tokens=16, temperature=1.0, seed=0, use_cache=use_cache,
                       stop_at_eos=False, return_details=True).tokens
    assert len(sampled) == 16 and max(sampled) < TOK.vocab_size
    ids = [ord("x")]  # the tokenizer-free API: told the tokenizer's size, it samples below it too
    free = generate_tokens(m2, ids, 16, temperature=1.0, seed=0, use_cache=use_cache, vocab_size=TOK.vocab_size)
    assert len(free) == 16 and max(free) < TOK.vocab_size
    assert max(generate_tokens(m2, ids, 16, temperature=1.0, seed=0, use_cache=use_cache)) >= TOK.vocab_size
    with pytest.raises(ValueError, match="vocab_size: expected an int in \\[1, 300\\]"):
        generate_tokens(m2, ids, 2, vocab_size=301)


def test_stop_is_a_string_or_a_list_and_temperature_must_be_finite():
    m = CountingLM()
    # 'x' -> 'yz{|...': a single stop string "z{" is one string, not the stop characters 'z' and '{'
    one = generate(m, TOK, "x", max_new_tokens=6, temperature=0, stop="z{", return_details=True)
    listed = generate(m, TOK, "x", max_new_tokens=6, temperature=0, stop=["z{"], return_details=True)
    assert one.text == listed.text == "y" and one.finish_reason == "stop"
    assert generate(m, TOK, "x", max_new_tokens=3, temperature=0, stop="{y") == "yz{"  # never seen: all 3
    with pytest.raises(TypeError, match="stop: expected a string or a list of strings"):
        generate(m, TOK, "x", max_new_tokens=3, stop=[1])
    with pytest.raises(ValueError, match="temperature: expected a finite number >= 0"):
        generate(m, TOK, "x", max_new_tokens=3, temperature=float("nan"))


def test_generate_tokens_checks_the_prompt_ids():
    m = tiny()
    for bad in ([1, 300], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match=r"prompt_ids: token ids must be ints in \[0, 257\)"):
            generate_tokens(m, bad, 3)
