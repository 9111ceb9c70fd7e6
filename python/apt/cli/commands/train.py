"""``apt train``: train a model from a profile.

    apt train -p tiny_debug
    apt train -p gpt5_moe_reasoning --plugins moe,align --training.max_epochs 3 --model.attention_name flash_v2
    apt train -p my.yaml --resume auto
    apt train -p tiny_debug --stop-at-step 100     # then --resume auto continues the same run

Any profile key inside a section can be overridden as ``--section.key VALUE`` (or ``--section.key=VALUE``); values
are YAML (``3``, ``1e-3``, ``[0.9, 0.95]``, ``null``). The run writes ``<training.out_dir>/last.pt`` (default
``apt_runs/<profile name>/last.pt``), which ``--resume`` continues and the generation commands load. A resumed
run must build the same model (shapes) and tokenizer as the checkpoint (else a one-line error); training.lr, betas,
weight_decay and the schedule's length (max_epochs, max_steps) are the profile's, a change from the stored value is
logged; other model settings that keep the shapes (dropout, activation) are accepted with a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from typing import Any, Optional, Sequence

from ...core.config import ConfigError, builtin_profiles, dump_profile, load_profile
from ..main import CLIError
from . import count_type

logger = logging.getLogger("apt.cli.train")


def split_overrides(extras: Sequence[str]) -> tuple[list[str], list[str]]:
    """(dotted overrides, other leftovers) from argparse's unrecognised arguments."""
    overrides: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(extras):
        a = extras[i]
        key = a.split("=", 1)[0]
        if a.startswith("--") and "." in key:
            # a next option is not this key's value: '--training.lr --max-steps 3' made 'training.max_steps=3'
            # the LR; alone, the key fails as "has no value" (a negative number, '-1', still is a value)
            if "=" in a or i + 1 >= len(extras) or extras[i + 1].startswith("--"):
                overrides.append(a)
                i += 1
            else:
                overrides += [a, extras[i + 1]]
                i += 2
        else:
            rest.append(a)
            i += 1
    return overrides, rest


def accept_overrides(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` take ``--section.key VALUE`` arguments into ``args.overrides``."""
    original = parser.parse_known_args

    def parse_known_args(args: Optional[Sequence[str]] = None, namespace: Any = None):  # type: ignore[override]
        ns, extras = original(args, namespace)
        overrides, rest = split_overrides(extras)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + overrides
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def load_cli_profile(args: argparse.Namespace, extra: Optional[dict[str, Any]] = None,
                     extra_labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The profile with the ``--section.key`` overrides and ``extra`` (profile keys set by named options; an error
    about one names the option in ``extra_labels``, e.g. ``--max-steps``) applied."""
    overrides = list(args.overrides or [])
    for key, value in (extra or {}).items():
        if value is not None:  # as '--key=value': never taken as the value of a dotted override typed last
            overrides.append(f"--{key}={json.dumps(value) if not isinstance(value, str) else value}")
    try:
        return load_profile(args.profile, overrides, plugins=args.plugins, override_labels=extra_labels)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ...plugins.manager import PluginError
    from ...training.checkpoint import CheckpointError, out_of_memory_reason, run_lock
    from ...training.trainer import Trainer

    extra = {"training.out_dir": args.out_dir, "training.resume": args.resume, "training.max_steps": args.max_steps,
             "training.device": args.device, "seed": args.seed}
    if args.no_progress:
        extra["training.progress"] = False
    labels = {"training.out_dir": "--out-dir", "training.resume": "--resume", "training.max_steps": "--max-steps",
              "training.device": "--device", "training.progress": "--no-progress", "seed": "--seed"}
    cfg = load_cli_profile(args, extra, labels)
    if args.print_config:
        sys.stdout.write(dump_profile(cfg))
        return 0
    try:
        trainer = Trainer(cfg)
    except (ConfigError, PluginError, CheckpointError) as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # bad values that only show when building (device, tokenizer, data)
        raise CLIError(f"cannot set up training: {exc}") from None
    except RuntimeError as exc:  # a model too big for this machine (model.d_model: 1e6 typed for 1e3)
        why = out_of_memory_reason(exc)
        if why is None:
            raise
        raise CLIError(f"cannot set up training: out of memory building the model ({why}); check the model sizes "
                       "(model.d_model, model.num_layers, model.d_ff, model.vocab_size, model.moe.num_experts)"
                       ) from None
    print(f"training {cfg.get('name')}: {trainer.model.num_parameters() / 1e6:.2f}M parameters on "
          f"{trainer.device}, {trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch), "
          f"plugins: {', '.join(p.name for p in trainer.plugins.plugins) or 'none'}", file=sys.stderr)
    report = getattr(trainer.model, "build_report", None) or {}
    if report:  # which provider each component came from (a fallback says so, and why)
        parts = dict(report)
        swap = ((cfg.get("plugins") or {}).get("moe") or {}).get("router")
        if swap and "moe" in parts and trainer.plugins.get("moe") is not None:
            # the moe plugin replaces the router at training start: the line named the one it replaces
            parts["moe"] = f"{parts['moe']}, replaced at training start by plugins.moe.router {swap}"
        print("components: " + "; ".join(f"{k} {v}" for k, v in parts.items()), file=sys.stderr)
    if trainer.step >= trainer.total_steps:
        print(f"nothing to do: the run in {trainer.out_dir} is already at step {trainer.step} of "
              f"{trainer.total_steps} (raise --max-steps or --training.max_epochs to continue)")
        return 0
    if args.stop_at_step is not None and trainer.step >= args.stop_at_step:
        print(f"nothing to do: the run in {trainer.out_dir} is already at step {trainer.step} "
              f"(--stop-at-step {args.stop_at_step})")
        return 0
    if args.stop_at_step is not None and args.stop_at_step > trainer.total_steps:
        print(f"apt train: --stop-at-step {args.stop_at_step} is past the run's last step ({trainer.total_steps}); "
              "the run goes to its end", file=sys.stderr)
    label = "--out-dir" if args.out_dir else "training.out_dir"
    if trainer.out_dir.exists() and not trainer.out_dir.is_dir():
        raise CLIError(f"{label}: {trainer.out_dir} is a file, not a directory")
    try:  # fail now, not after the whole run, when the checkpoint cannot be written there
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=trainer.out_dir, prefix=".apt_write_test"):
            pass
    except OSError as exc:
        raise CLIError(f"{label}: cannot write checkpoints to {trainer.out_dir}: {exc.strerror or exc}") from None
    # held until the run ends (or the process dies): a second run into this folder fails here, before it warns
    # about or replaces the first one's checkpoint
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(run_lock(trainer.out_dir))
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    existing = trainer.checkpoint_path
    if not cfg.get("training", {}).get("resume") and (existing.is_file() or existing.is_symlink()):
        # a second `apt train -p tiny_debug` (the --resume auto forgotten) replaced the first run's checkpoint
        # with no word; say so before its first save does it
        print(f"apt train: warning: {existing} (a previous run's checkpoint) is replaced by this run, which starts "
              f"at step 0; --resume auto continues that run instead, --out-dir keeps both", file=sys.stderr)
    try:
        with lock:
            summary = trainer.fit(stop_at_step=args.stop_at_step)
    except (FloatingPointError, CheckpointError) as exc:
        raise CLIError(str(exc)) from None
    except TypeError as exc:  # fit()'s up-front check: a profile value a checkpoint cannot hold (a YAML date)
        if not str(exc).startswith("checkpoint part "):
            raise
        hint = "; quote such a value in the profile (since: '2024-01-01')" if "'profile'" in str(exc) else ""
        raise CLIError(f"{exc}{hint}") from None
    except RuntimeError as exc:  # CPU allocator / CUDA out of memory mid-run (data.batch_size: 1e6 meant 16)
        why = out_of_memory_reason(exc)
        if why is None:
            raise
        raise CLIError(f"training stopped: out of memory at step {trainer.step} ({why}); lower data.batch_size or "
                       "data.seq_len (training.grad_accum keeps the batch)") from None
    except OSError as exc:  # the checkpoint could not be written (disk full, ...): save() says which file
        raise CLIError(str(exc) if "checkpoint" in str(exc) else f"training stopped: {exc}") from None
    first, last = summary["first_loss"], summary["final_loss"]
    val = summary["val_losses"][-1] if summary["val_losses"] else None
    # the last evaluation's (an epoch end), which may be steps before the last loss: say which step it is
    val_at = f" (step {summary['val_step']})" if summary.get("val_step") is not None else ""
    print(f"done: {summary['steps']} steps in {summary['wall_s']:.1f}s, loss {first:.4f} -> {last:.4f}"
          + (f", val {val:.4f}{val_at}" if val is not None else "")
          + f", {summary['tokens_per_s']:,.0f} tokens/s; checkpoint {summary['checkpoint']}")
    if summary["stopped_early"]:
        print(f"stopped at step {summary['steps']} of {trainer.total_steps}; continue the same run (same schedule) "
              f"with --resume auto and the same options")
    if summary["disabled_plugins"]:
        for name, why in summary["disabled_plugins"].items():
            print(f"plugin {name} was disabled: {why}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model from a profile",
        description="Train a model from a YAML profile (a built-in name or a path). Any profile key inside a "
                    "section can be overridden as --section.key VALUE, e.g. --training.max_epochs 3 "
                    f"--model.attention_name flash_v2. Built-in profiles: {', '.join(builtin_profiles())}.",
        epilog="The run writes <training.out_dir>/last.pt (default apt_runs/<profile>/last.pt).",
        allow_abbrev=False)
    p.add_argument("-p", "--profile", required=True, help="profile name (e.g. tiny_debug) or path to a YAML file")
    p.add_argument("--plugins", action="append", default=None, metavar="NAMES",
                   help="comma-separated plugins to enable in addition to the profile's plugins.enabled")
    p.add_argument("--out-dir", default=None, help="output directory (training.out_dir)")
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="resume from a checkpoint, or 'auto' for <out_dir>/last.pt when it exists")
    p.add_argument("--max-steps", type=int, default=None,
                   help="total optimizer steps (training.max_steps); the LR schedule spans them")
    p.add_argument("--stop-at-step", type=count_type(1), default=None, metavar="N",
                   help="stop after optimizer step N and save a checkpoint, as an interrupted run would: the LR "
                        "schedule still spans the whole run, and --resume auto continues it exactly")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (training.device)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the run (the profile's top-level seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the merged, validated profile and exit")
    p.set_defaults(func=run, overrides=[])
    accept_overrides(p)
