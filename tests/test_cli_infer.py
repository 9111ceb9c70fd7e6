"""CLI: apt generate / chat / eval end to end on a checkpoint trained in the test session (tiny_checkpoint), with
the voter and retriever plugins, and their user errors (one line on stderr, exit code 2, no traceback)."""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

from apt.cli.main import main


def test_generate_runs_and_is_seeded(tiny_checkpoint, capsys):
    argv = ["generate", tiny_checkpoint, "--prompt", "Once upon", "--max-new-tokens", "12", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("Once upon")
    assert main(argv) == 0 and capsys.readouterr().out == first
    # a run directory works as well as the file; several prompts; JSON details
    run_dir = str(Path(tiny_checkpoint).parent)
    assert main(["generate", run_dir, "--prompt", "a", "--prompt", "bc", "--max-new-tokens", "5",
                 "--temperature", "0", "--no-cache", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["a", "bc"] and all(r["tokens"] <= 5 for r in rows)


def test_generate_with_voter_and_retriever(tiny_checkpoint, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Cats purr.\n\nThe Eiffel tower is in Paris.\n")
    assert main(["generate", tiny_checkpoint, "--prompt", "Eiffel tower?", "--max-new-tokens", "6", "--seed", "0",
                 "--plugins", "voter", "--plugin-opt", "voter.threshold=0.0", "--plugin-opt", "voter.k=3",
                 "--retrieval-dir", str(docs), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt_seen"] == "Context:\n[1] The Eiffel tower is in Paris.\n\nEiffel tower?"
    m = row["metrics"]
    # an untrained model is uncertain everywhere: with threshold 0 every step votes
    assert m["retriever_hits"] == 1 and m["voter_triggered"] == m["voter_steps"] > 0 and row["selections"] > 0
    # a missing retrieval folder is a warning, not an error: generation goes on
    assert main(["generate", tiny_checkpoint, "--prompt", "x", "--max-new-tokens", "3",
                 "--retrieval-dir", str(tmp_path / "nope")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("x") and "retriever_error" in captured.err


def test_chat_reads_stdin_until_eof(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nhow are you\n"))
    assert main(["chat", tiny_checkpoint, "--max-new-tokens", "6", "--seed", "0", "--plugins", "voter"]) == 0
    captured = capsys.readouterr()
    assert "history cleared" in captured.out and "chat: 2 replies" in captured.err
    assert "chat: commands" not in captured.out  # piped input: replies only, no banner or prompt
    assert "voter_steps=" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    captured = (main(["chat", tiny_checkpoint]), capsys.readouterr())
    assert captured[0] == 0 and "chat: 0 replies" in captured[1].err and captured[1].out == ""  # no stray newline


def test_chat_default_reply_length_leaves_room_for_the_conversation(tiny_checkpoint, monkeypatch, capsys, caplog):
    # --max-new-tokens defaulted to 128, not below the 64-token window: no earlier turn ever fit (a warning said so)
    import logging

    from apt.inference import chat as chat_mod

    seen = []
    original = chat_mod.ChatSession.__init__

    def spy(self, *a, **kw):
        seen.append(kw["max_new_tokens"])
        original(self, *a, **kw)

    monkeypatch.setattr(chat_mod.ChatSession, "__init__", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n"))
    with caplog.at_level(logging.WARNING):
        assert main(["chat", tiny_checkpoint, "--seed", "0"]) == 0
    assert seen == [32] and "no earlier turn fits" not in caplog.text


def test_eval_prints_perplexity(tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / "held_out.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    assert main(["eval", tiny_checkpoint, "--file", str(f)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "tokens scored, context 64, stride 32" in out
    assert main(["eval", tiny_checkpoint, "--file", str(f), "--context", "32", "--stride", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 179 and res["context"] == 32 and res["stride"] == 8
    # 3 training steps: still close to uniform over 257 bytes
    assert res["perplexity"] == pytest.approx(math.exp(res["nll"])) and 50 < res["perplexity"] < 1000


def test_dtype_option_runs_the_model_in_that_dtype(tiny_checkpoint, tmp_path, capsys):
    """--dtype: generation and evaluation in bf16/fp16 (weights and activations; sampling and the log-softmax in
    fp32); auto is fp32 on the CPU."""
    f = tmp_path / "held_out.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    ppl = {}
    for dt in ("float32", "bfloat16", "float16", "auto"):
        assert main(["generate", tiny_checkpoint, "--prompt", "Once", "--max-new-tokens", "6", "--temperature", "0",
                     "--dtype", dt, "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["prompt"] == "Once" and 0 < row["tokens"] <= 6
        assert main(["eval", tiny_checkpoint, "--file", str(f), "--dtype", dt, "--json"]) == 0
        ppl[dt] = json.loads(capsys.readouterr().out)["perplexity"]
    assert ppl["auto"] == ppl["float32"]
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.03)
    assert ppl["float16"] == pytest.approx(ppl["float32"], rel=0.003)


def test_inference_dtype_resolution(tiny_checkpoint, monkeypatch):
    import torch

    from apt.cli.commands.generate import DTYPE_CHOICES
    from apt.training.checkpoint import INFERENCE_DTYPES, inference_dtype, load_for_inference

    assert DTYPE_CHOICES == ("auto", *INFERENCE_DTYPES)  # the CLI's copy of the names stays in step

    assert inference_dtype("auto", "cpu") == torch.float32 == inference_dtype(None, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference_dtype("auto", "cuda") == torch.float32  # pre-Ampere: fp16 could overflow an fp32-trained model
    assert inference_dtype(torch.float16, "cpu") == torch.float16
    for bad in ("fp8", torch.int8):
        with pytest.raises(ValueError, match="^dtype: expected"):
            inference_dtype(bad, "cpu")
    model, _, _ = load_for_inference(tiny_checkpoint, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "{missing}", "--prompt", "x"], "checkpoint not found"),
    (["chat", "{missing}"], "checkpoint not found"),
    (["eval", "{missing}", "--file", "{text}"], "checkpoint not found"),
    (["eval", "{ckpt}", "--file", "{missing}"], "no such file"),
    (["generate", "{text}", "--prompt", "x"], "cannot read checkpoint"),
    (["eval", "{ckpt}", "--file", "{short}"], "too short"),
    (["eval", "{ckpt}", "--file", "{text}", "--context", "999"], "exceeds the model's window"),
    (["eval", "{ckpt}", "--file", "{text}", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["generate", "{ckpt}", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "{ckpt}", "--prompt", "x", "--plugins", "moe"], "no generation hooks"),
    (["generate", "{ckpt}", "--prompt", "x", "--plugins", "nosuch"], "unknown plugin 'nosuch'"),
    (["generate", "{ckpt}", "--prompt", "x", "--plugin-opt", "voter.k=3"], "not enabled"),
    (["generate", "{ckpt}", "--prompt", "x", "--plugins", "voter", "--plugin-opt", "voter"], "NAME.KEY=VALUE"),
    (["chat", "{ckpt}", "--plugins", "voter", "--plugin-opt", "voter.k=1"], "k: expected an integer >= 2, got 1"),
    (["generate", "{ckpt}", "--prompt", "x", "--device", "tpu"], "--device"),
    (["generate", "{ckpt}", "--prompt", "x", "--temperature", "nan"], "--temperature: expected a finite number"),
])
def test_user_errors_are_one_line_exit_2(argv, fragment, tiny_checkpoint, tmp_path, capsys):
    text, short = tmp_path / "t.txt", tmp_path / "s.txt"
    text.write_text("some text to score " * 3)
    short.write_text("a")
    subs = {"{missing}": str(tmp_path / "missing.pt"), "{ckpt}": tiny_checkpoint, "{text}": str(text),
            "{short}": str(short)}
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"apt {command} " in out.split("examples:")[1] and "CHECKPOINT" in out


@pytest.mark.parametrize("edit, fragment", [
    # a stored profile edited after training: the weights no longer fit (a torch traceback before)
    (lambda b: b["profile"]["model"].update(d_model=64), "the weights do not fit the model the stored profile builds"),
    (lambda b: b["profile"]["model"].update(num_heads=4), "do not fit"),
    (lambda b: b["profile"].update(model={}), "cannot rebuild the model from the stored profile: KeyError"),
    (lambda b: b.update(profile="x"), "'profile' has no 'model' section"),
    (lambda b: b.update(tokenizer="byte"), "'tokenizer' is a str"),
    (lambda b: b.update(tokenizer={"type": "nope"}), "unknown type 'nope'"),
    (lambda b: b.update(format=99), "checkpoint format 99"),
    (lambda b: b.update(model=None), "'model' is a NoneType"),
    (lambda b: b.update(trainer=[1]), "'trainer' is a list"),
])
def test_tampered_checkpoints_are_one_line_errors(edit, fragment, tiny_checkpoint, tmp_path, capsys):
    import torch

    from apt.training import load_for_inference
    from apt.training.checkpoint import CheckpointError

    blob = torch.load(tiny_checkpoint, weights_only=False)
    edit(blob)
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    with pytest.raises(CheckpointError, match=fragment):
        load_for_inference(bad)
    assert main(["generate", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert fragment.split(":")[0] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
