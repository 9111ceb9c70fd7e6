"""Generation plugins: the voter votes above its entropy threshold and not below, and the vote picks the majority
(mean log-prob breaking ties); the retrieval provider finds the right passage of a tiny folder, the retriever puts
it in front of the prompt, and a failing retriever (missing folder, an exception inside) leaves generation going."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from apt.core import registry
from apt.data.tokenizers import get_tokenizer
from apt.inference import Candidate, generate
from apt.plugins.base import HookContext
from apt.plugins.builtin.retriever import RetrieverPlugin
from apt.plugins.builtin.voter import VoterPlugin, vote
from apt.plugins.manager import PluginError, PluginManager, build_plugins
from apt.providers.retrieval import load_passages, split_passages

TOK = get_tokenizer("byte")
A, B, C, BANG, QMARK = ord("A"), ord("B"), ord("C"), ord("!"), ord("?")


class ForkLM(nn.Module):
    """Stand-in with controlled logits: after "?" the next token is A (p=0.6), B or C (0.2 each) — entropy
    0.95 nats; after any other token it is "!" with near certainty (entropy ~0). No cache."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.max_seq_len = None
        self.calls = 0

    def forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        self.calls += 1
        out = torch.full((*ids.shape, 257), -30.0)
        out[..., BANG] = 20.0
        fork = torch.full((257,), -30.0)
        fork[A], fork[B], fork[C] = math.log(0.6), math.log(0.2), math.log(0.2)
        out[ids == QMARK] = fork
        return out + self.dummy


FORK_ENTROPY = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))


def voter(**cfg) -> VoterPlugin:
    return registry.get("plugin", "voter", config=cfg, strict=True)  # type: ignore[return-value]


# ---- voter -----------------------------------------------------------------------------------------------
def test_voter_triggers_above_threshold_only():
    lm = ForkLM()
    # absolute entropy (nats): the fork step (0.95) is above 0.5, the "!" steps (~0) are not
    v = voter(k=9, threshold=0.5, normalize=False, horizon=1)
    r = generate(lm, TOK, "?", max_new_tokens=4, seed=0, plugins=[v], return_details=True)
    assert r.metrics["voter_steps"] == 4 and r.metrics["voter_triggered"] == 1 and r.selections == 1
    assert r.metrics["voter_trigger_rate"] == pytest.approx(0.25)
    assert r.text[1:] == "!!!" and v.totals["triggered"] == 1
    # just above the fork's entropy: never triggers, and the text equals plain sampling with the same seed
    # (no rollout ran, so the seeded generator was not touched)
    quiet = voter(k=9, threshold=FORK_ENTROPY + 1e-3, normalize=False)
    for seed in range(5):
        lm.calls = 0
        r = generate(lm, TOK, "?", max_new_tokens=4, seed=seed, plugins=[quiet], return_details=True)
        calls = lm.calls
        lm.calls = 0
        assert r.text == generate(lm, TOK, "?", max_new_tokens=4, seed=seed)
        assert r.metrics["voter_triggered"] == 0 and r.selections == 0 and calls == lm.calls


def test_voter_normalized_entropy():
    v = voter()
    assert v.normalize and v.uncertainty(math.log(257), 257) == pytest.approx(1.0)
    # normalised: 0.95 / ln 257 = 0.17 -> triggers at 0.1, not at 0.2
    for threshold, fired in ((0.1, 1), (0.2, 0)):
        r = generate(ForkLM(), TOK, "?", max_new_tokens=2, seed=0, plugins=[voter(threshold=threshold)],
                     return_details=True)
        assert r.metrics["voter_triggered"] == fired


def test_voting_picks_the_majority_where_sampling_does_not():
    lm = ForkLM()
    plain = {generate(lm, TOK, "?", max_new_tokens=1, seed=s) for s in range(20)}
    voted = {generate(lm, TOK, "?", max_new_tokens=1, seed=s,
                      plugins=[voter(k=15, threshold=0.5, normalize=False, horizon=1)]) for s in range(20)}
    assert plain > {"A"} and voted == {"A"}  # plain sampling draws B or C sometimes; the majority is A


def test_vote_rule_majority_then_mean_logprob_then_order():
    c = lambda toks, lp: Candidate(list(toks), lp)  # noqa: E731
    # majority wins even against better log-probs
    cands = [c([7, 1], -10.0), c([5, 1], -4.0), c([7, 2], -8.0), c([5, 2], -1.0), c([7, 3], -6.0)]
    best, members = vote(cands)
    assert members == [0, 2, 4] and best == 4  # group 7 (3 votes); its member with the best mean log-prob
    # a 2-2 tie goes to the group with the higher average mean log-prob
    best, members = vote([c([7], -3.0), c([5], -1.0), c([7], -3.0), c([5], -2.0)])
    assert members == [1, 3] and best == 1
    # a full tie goes to the group sampled first
    best, members = vote([c([5], -1.0), c([7], -1.0)])
    assert members == [0] and best == 0
    # vote on the whole text: "ab" x2 beats "a?" even though all share the first token
    best, members = vote([c([1, 2], -1.0), c([1, 3], -0.5), c([1, 2], -2.0)], key=lambda x: tuple(x.tokens))
    assert members == [0, 2] and best == 0
    with pytest.raises(ValueError):
        vote([])


def _ctx_with(samples, logits):
    return HookContext(metrics={}, extra={"logits": logits, "entropy": 5.0, "tokenizer": TOK,
                                          "rollout": lambda k, length, temperature=None: list(samples)})


def test_voter_commit_modes_and_text_vote():
    logits = torch.zeros(257)
    samples = [Candidate([A, B], -2.0), Candidate([C, B], -1.0), Candidate([A, C], -1.0)]
    default = [Candidate([C], -0.1)]
    ctx = _ctx_with(samples, logits)
    got = voter(threshold=0.1).select_sample(default, ctx)
    assert got.tokens == [A, C] and ctx.metrics["voter_changed"] == 1  # first-token vote: A (2) over C (1)
    got = voter(threshold=0.1, commit="first").select_sample(default, _ctx_with(samples, logits))
    assert got.tokens == [A] and got.logprob == pytest.approx(-math.log(257))
    text_vote = [Candidate([A, B], -2.0), Candidate([C, B], -1.0), Candidate([A, C], -1.5), Candidate([C, B], -3.0)]
    got = voter(threshold=0.1, vote_on="text").select_sample(default, _ctx_with(text_vote, logits))
    assert got.tokens == [C, B] and got.logprob == -1.0


@pytest.mark.parametrize("cfg, fragment", [
    ({"k": 1}, "k: expected an integer >= 2, got 1"), ({"horizon": 0}, "horizon"), ({"vote_on": "x"}, "vote_on"),
    ({"commit": "x"}, "commit"), ({"threshold": 2.0}, "threshold"), ({"kk": 1}, "unknown setting"),
    ({"k": 2.5}, "k: expected an integer"), ({"normalize": "false"}, "normalize: expected true or false"),
    ({"temperature": float("nan")}, "temperature: expected a finite number >= 0 or null, got nan"),
    ({"threshold": float("nan")}, "threshold: expected a finite number")])
def test_voter_bad_settings(cfg, fragment):
    with pytest.raises(PluginError, match=fragment):
        build_plugins(["voter"], {"voter": cfg})


# ---- retrieval provider and retriever plugin --------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "animals.txt").write_text("Cats are small furry animals that purr and chase mice.\n\n"
                                   "Dogs bark at the postman and love long walks.\n")
    (d / "sub" / "travel.md").write_text("# Travel\n\nThe Eiffel tower stands in Paris, the capital of France.\n")
    (d / "facts.jsonl").write_text('{"text": "The Nile is the longest river in Africa."}\n'
                                   'not json\n{"title": "no text field"}\n'
                                   '{"text": "Mount Everest is the highest mountain on Earth."}\n')
    (d / "ignored.csv").write_text("Eiffel,Eiffel,Eiffel\n")
    return d


def test_passages_and_provider_find_the_right_one(corpus, caplog):
    with caplog.at_level(logging.WARNING):
        ps = load_passages(corpus)
    assert "invalid JSON" in caplog.text and "no string field" in caplog.text
    assert [p.source for p in ps] == ["animals.txt", "animals.txt", "facts.jsonl:1", "facts.jsonl:4",
                                      "sub/travel.md", "sub/travel.md"]
    index = registry.get("retrieval")
    assert index.name == "tfidf"
    index.build(ps)
    for query, source, word in [("Where is the Eiffel tower?", "sub/travel.md", "Paris"),
                                ("which river is the longest", "facts.jsonl:1", "Nile"),
                                ("why do dogs bark", "animals.txt", "postman")]:
        hits = index.search(query, 2)
        assert hits[0].passage.source == source and word in hits[0].passage.text
        assert 0 < hits[0].score <= 1 and (len(hits) < 2 or hits[0].score >= hits[1].score)
    assert index.search("quantum chromodynamics", 3) == []
    # best first; equal scores (one shared word each) keep index order
    hits = index.search("cats chase dogs in Paris", 5)
    assert [h.passage.text.split()[0] for h in hits] == ["Cats", "Dogs", "The"]
    assert hits[0].score > hits[1].score == pytest.approx(hits[2].score)
    # deterministic: a fresh index gives the same scores
    again = registry.get("retrieval")
    again.build(load_passages(corpus))
    assert [h.score for h in again.search("Eiffel tower Paris", 3)] == \
        [h.score for h in index.search("Eiffel tower Paris", 3)]


def test_jsonl_passages_may_hold_unicode_line_separators(tmp_path):
    # valid JSON may carry U+2028 / U+2029 / U+0085 raw: splitlines() cut the document there (two "invalid JSON"
    # warnings, the document lost, the next one labelled with the wrong line)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "Berlin\u2028is in\x85Germany"}, ensure_ascii=False)
                                         + "\r\n" + json.dumps({"text": "Rome has the Tiber"}) + "\n",
                                         encoding="utf-8", newline="")
    assert [(p.text, p.source) for p in load_passages(tmp_path)] == \
        [("Berlin is in Germany", "docs.jsonl:1"), ("Rome has the Tiber", "docs.jsonl:2")]  # whitespace folded


def test_split_passages_respects_max_chars():
    text = "one two three four five six\n\n\nseven " + "x" * 25
    parts = split_passages(text, max_chars=10)
    assert all(len(p) <= 10 for p in parts) and parts[:3] == ["one two", "three four", "five six"]
    assert "".join(parts[3:]).replace(" ", "") == "seven" + "x" * 25


def test_retriever_augments_the_prompt(corpus):
    r = RetrieverPlugin({"dir": str(corpus), "k": 2})
    lm = ForkLM()
    out = generate(lm, TOK, "Where is the Eiffel tower?", max_new_tokens=3, temperature=0, plugins=[r],
                   return_details=True)
    assert out.prompt.startswith("Context:\n[1] The Eiffel tower stands in Paris")
    assert out.prompt.endswith("\n\nWhere is the Eiffel tower?") and out.text == "A!!"  # "?" forks to A
    assert out.metrics["retriever_hits"] >= 1 and out.metrics["retriever_sources"][0] == "sub/travel.md"
    custom = RetrieverPlugin({"dir": str(corpus), "k": 1, "template": "{prompt} <<{context}>>",
                              "passage_template": "{source}: {text}"})
    assert custom.augment_prompt("dogs", HookContext()) == \
        "dogs <<animals.txt: Dogs bark at the postman and love long walks.>>"
    # no match: the prompt goes through as it is
    assert r.augment_prompt("zzz qqq", HookContext()) == "zzz qqq"


def test_retriever_fits_the_window(corpus):
    r = RetrieverPlugin({"dir": str(corpus), "k": 3})
    prompt = "Eiffel tower, Nile river, dogs"
    full = r.augment_prompt(prompt, HookContext(extra={"tokenizer": TOK}))
    assert full.count("\n[") == 3  # three passages
    ctx = HookContext(extra={"tokenizer": TOK, "window": len(full) - 5, "max_new_tokens": 0})
    fitted = r.augment_prompt(prompt, ctx)
    assert len(TOK.encode(fitted)) <= len(full) - 5 and fitted.count("\n[") < 3 and "[1]" in fitted


def test_failing_retriever_never_stops_generation(corpus, tmp_path, caplog, monkeypatch):
    lm = ForkLM()
    missing = RetrieverPlugin({"dir": str(tmp_path / "nope")})
    with caplog.at_level(logging.WARNING):
        out = generate(lm, TOK, "?", max_new_tokens=2, temperature=0, plugins=[missing], return_details=True)
        generate(lm, TOK, "?", max_new_tokens=2, temperature=0, plugins=[missing])
    assert out.prompt == "?" and out.text == "A!" and "no such directory" in out.metrics["retriever_error"]
    assert caplog.text.count("no such directory") == 1  # warned once, not at every prompt
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RetrieverPlugin({"dir": str(empty)}).augment_prompt("x", HookContext()) == "x"
    assert RetrieverPlugin({}).augment_prompt("x", HookContext()) == "x"  # no folder configured
    # an exception inside the provider: logged, the prompt is unchanged, the plugin stays enabled
    broken = RetrieverPlugin({"dir": str(corpus)})
    broken.augment_prompt("warm up the index", HookContext())

    def boom(query, k):
        raise RuntimeError("index exploded")

    monkeypatch.setattr(broken.index, "search", boom)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mgr = PluginManager([broken])
        out = generate(lm, TOK, ["?", "?"], max_new_tokens=2, temperature=0, plugins=mgr, return_details=True)
    assert [o.text for o in out] == ["A!", "A!"] and all(o.prompt == "?" for o in out)
    assert not mgr.disabled and "index exploded" in out[1].metrics["retriever_error"]
    assert "index exploded" in caplog.text
    with pytest.raises(PluginError, match="template"):
        build_plugins(["retriever"], {"retriever": {"template": "{nope}"}})
    with pytest.raises(PluginError, match="unknown setting"):
        build_plugins(["retriever"], {"retriever": {"folder": "x"}})


def test_both_plugins_listed():
    names = {i.name for i in registry.list_providers("plugin")}
    assert {"voter", "retriever"} <= names
    assert registry.get_info("retrieval", "tfidf").is_default
