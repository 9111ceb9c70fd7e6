"""Checkpoints: never executed as pickles, never half-written, never silently resumed into a different run."""
from __future__ import annotations

import errno
import io
import logging
import os

import pytest
import torch

from apt.cli.main import main
from apt.core.config import load_profile
from apt.training import Trainer
from apt.training import checkpoint as ckpt
from apt.training.checkpoint import CheckpointError

SMALL = {"model.d_model": 32, "model.num_heads": 2, "model.num_layers": 1, "model.max_seq_len": 16,
         "data.seq_len": 16, "data.batch_size": 4, "training.steps_per_epoch": 3, "training.max_epochs": 2,
         "training.progress": False, "training.warmup_steps": 1}


def _cfg(out, **over):
    return load_profile("tiny_debug", {**SMALL, "training.out_dir": str(out), **over})


@pytest.fixture
def run(tmp_path):
    t = Trainer(_cfg(tmp_path / "run"))
    t.fit(stop_at_step=2)
    return tmp_path / "run"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ["APT_TEST_PWNED"],))


def test_a_checkpoint_with_pickled_code_is_refused_not_run(run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("APT_TEST_PWNED", str(marker))
    blob = torch.load(run / "last.pt", weights_only=True)  # what apt writes loads with weights_only
    blob["trainer"]["x"] = _Evil()
    bad = tmp_path / "evil.pt"
    torch.save(blob, bad)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        ckpt.load(bad)
    assert main(["generate", str(bad), "--prompt", "a", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and len(err.strip().splitlines()) == 1 and "evil.pt" in err


@pytest.mark.parametrize("content", [b"", b"hello\n", None])
def test_broken_files_are_one_line_errors(run, tmp_path, content, capsys):
    bad = tmp_path / "bad.pt"
    data = (run / "last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content is None else content)
    assert main(["generate", str(bad), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_resume_auto_onto_a_directory_named_last_pt_fails_before_training(tmp_path):
    (tmp_path / "run" / "last.pt").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        Trainer(_cfg(tmp_path / "run", **{"training.resume": "auto"}))


def test_a_failed_save_keeps_the_previous_checkpoint_and_no_tmp(run, monkeypatch):
    before = (run / "last.pt").read_bytes()
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(f, io.BytesIO):  # the in-memory weights_only check: no disk involved
            return real(obj, f, *a, **k)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    t = Trainer(_cfg(run, **{"training.resume": "auto"}))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="cannot write checkpoint .*last.pt.*intact"):
        t.fit()
    monkeypatch.setattr(torch, "save", real)
    assert (run / "last.pt").read_bytes() == before and sorted(os.listdir(run)) == ["last.pt"]


def _save_repeatedly(path, width, n, errors):
    torch.set_num_threads(1)
    m = torch.nn.Linear(64, width)
    for _ in range(n):
        try:
            ckpt.save(path, m, {"model": {"d_model": 1}}, None, rng=False)
        except OSError as e:
            errors.put(str(e))
    errors.put(None)


def test_processes_saving_to_one_path_do_not_collide(tmp_path):
    """Every rank of a torchrun job saving last.pt: with one shared temp name each writer renamed or unlinked the
    other's file mid-write (9-15 of 40 saves failed per process)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    path, errors = tmp_path / "last.pt", ctx.Queue()
    procs = [ctx.Process(target=_save_repeatedly, args=(path, 64 * (r + 1), 30, errors)) for r in range(2)]
    for p in procs:
        p.start()
    failed, done = [], 0
    while done < len(procs):
        e = errors.get(timeout=120)
        if e is None:
            done += 1
        else:
            failed.append(e)
    for p in procs:
        p.join(timeout=60)
    assert not failed, failed[:2]
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert ckpt.load(path)["model"]["weight"].shape[1] == 64


def test_resume_with_a_new_lr_uses_it_and_says_so(run, caplog):
    with caplog.at_level(logging.WARNING):
        t = Trainer(_cfg(run, **{"training.resume": "auto", "training.lr": 1e-5}))
    assert "training.lr" in caplog.text
    assert t.scheduler.base_lrs == [1e-5, 1e-5]
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * t.scheduler.lr_lambdas[0](t.step))
    t.fit()
    assert ckpt.load(run / "last.pt")["profile"]["training"]["lr"] == 1e-5  # the record matches what ran


def test_resume_unchanged_keeps_the_stored_lr_exactly(run):
    stored = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    t = Trainer(_cfg(run, **{"training.resume": "auto"}))
    assert t.optimizer.param_groups[0]["lr"] == stored


def test_resume_refuses_a_retrained_bpe_tokenizer(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 200
    a.write_text(text)
    b.write_text(text.upper()[::-1])
    bpe = {"data.tokenizer": "bpe", "data.bpe_vocab_size": 300}
    Trainer(_cfg(tmp_path / "run", **bpe, **{"data.path": str(a)})).fit(stop_at_step=1)
    with pytest.raises(CheckpointError, match="tokenizer"):
        Trainer(_cfg(tmp_path / "run", **bpe, **{"data.path": str(b), "training.resume": "auto"}))
    Trainer(_cfg(tmp_path / "run", **bpe, **{"data.path": str(a), "training.resume": "auto"}))  # same text: fine


def test_resume_with_a_tokenizer_of_another_vocab_size_names_the_tokenizer(run):
    """A byte run resumed with a BPE of 300 ids failed on embed.weight's size, blamed on model.d_model /
    num_layers; the tokenizer is compared first, so it gets the message a same-size tokenizer gets."""
    with pytest.raises(CheckpointError, match="it is 'bpe', the checkpoint's is 'byte'") as exc:
        Trainer(_cfg(run, **{"data.tokenizer": "bpe", "data.bpe_vocab_size": 300, "training.resume": "auto"}))
    assert "model.d_model" not in str(exc.value)


def test_resume_with_other_parameters_is_a_checkpoint_error(run):
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        Trainer(_cfg(run, **{"training.resume": "auto", "model.tie_embeddings": False}))


def test_a_save_killed_mid_write_leaves_no_lasting_temp_file(tmp_path):
    """A writer killed mid-write (preempted, OOM-killed) cannot unlink its temp file; with a fresh temp name per
    save each such crash left a checkpoint-sized file that no later save removed. A later save on the same host
    removes the temp files of writers that no longer run (and never a live one's)."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "last.pt"
    crash = textwrap.dedent(f"""
        import io, os, torch
        from apt.training import checkpoint as ckpt
        real = torch.save
        def dying_save(obj, f, *a, **k):
            if not isinstance(f, io.BufferedWriter):
                return real(obj, f, *a, **k)
            f.write(b"x" * 4096); f.flush(); os._exit(137)
        torch.save = dying_save
        ckpt.save({str(path)!r}, torch.nn.Linear(4, 4), {{"model": {{}}}}, None, rng=False)
    """)
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", crash]).returncode == 137
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".tmp")]) == 2
    live = tmp_path / f"last.pt.{ckpt._HOST}.{os.getpid()}.0123abcd.tmp"  # a live writer's (this process)
    live.write_bytes(b"in progress")
    ckpt.save(path, torch.nn.Linear(4, 4), {"model": {"d_model": 1}}, None, rng=False)
    assert sorted(os.listdir(tmp_path)) == sorted(["last.pt", live.name])


def _unused_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def test_a_live_writers_temp_file_is_kept_even_when_its_pid_is_not_visible(tmp_path):
    """Another PID namespace with the same host name (containers on the node's hostname): the sweep of dead
    writers' temp files must not take a file its writer still holds locked (that writer's save then failed)."""
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "last.pt"
    other = tmp_path / f"last.pt.{ckpt._HOST}.{_unused_pid()}.0123abcd.tmp"
    with open(other, "xb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        ckpt.save(path, torch.nn.Linear(2, 2), {"model": {}}, None, rng=False)
        assert other.exists()
    ckpt.save(path, torch.nn.Linear(2, 2), {"model": {}}, None, rng=False)  # writer gone: lock released
    assert not other.exists()


def test_a_stray_temp_name_with_a_non_ascii_digit_does_not_break_save(tmp_path):
    path = tmp_path / "last.pt"
    (tmp_path / f"last.pt.{ckpt._HOST}.\u00b2.tmp").write_bytes(b"")
    ckpt.save(path, torch.nn.Linear(2, 2), {"model": {}}, None, rng=False)
    assert path.exists()


@pytest.mark.parametrize("override,named", [({"seed": 5}, "seed: 0 -> 5"),
                                            ({"data.batch_size": 2}, "data.batch_size: 4 -> 2"),
                                            ({"training.grad_accum": 2}, "training.grad_accum: 1 -> 2"),
                                            ({"training.warmup_steps": 7}, "training.warmup_steps")])
def test_resume_with_other_data_or_schedule_settings_says_so(run, caplog, override, named):
    """A changed seed, batch size, accumulation or warmup changes the resumed steps (another data order, another
    schedule): it takes effect, and is said, as a changed lr is. The same profile says nothing."""
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(run, **{"training.resume": "auto"}))
    assert "differ from the run's" not in caplog.text
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(run, **{"training.resume": "auto", **override}))
    assert "differ from the run's" in caplog.text and named in caplog.text


def test_resume_from_a_checkpoint_without_newer_profile_keys_says_nothing(run, caplog):
    # a checkpoint written before a data / plugins key existed: the key it lacks is not a change
    blob = torch.load(run / "last.pt", weights_only=True)
    del blob["profile"]["data"]["val_fraction"]
    blob["profile"]["plugins"].pop("enabled", None)
    torch.save(blob, run / "last.pt")
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(run, **{"training.resume": "auto"}))
    assert "differ from the run's" not in caplog.text
