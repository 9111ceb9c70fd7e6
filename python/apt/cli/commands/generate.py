"""``apt generate``: continue a prompt with a model trained by ``apt train``.

    apt generate apt_runs/tiny_debug/last.pt --prompt "Once upon a time" --max-new-tokens 80 --seed 0
    apt generate apt_runs/tiny_debug --prompt "Q: what is TVA?" --plugins voter,retriever --retrieval-dir docs/
    apt generate run/last.pt --prompt a --prompt b --temperature 0 --json

This module also holds what ``apt chat`` and ``apt eval`` share: loading a checkpoint (a missing or broken one
is a one-line error, exit code 2), the sampling options and the generation plugins (``--plugins``,
``--retrieval-dir``, ``--plugin-opt NAME.KEY=VALUE``, over the ``plugins.<name>`` settings stored in the
checkpoint's profile).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import yaml

from ...core.config import yaml_load
from ..main import CLIError

EXAMPLES_EPILOG = "examples:\n  {}"
GENERATION_HOOKS = ("augment_prompt", "select_sample")


# ---- shared by generate / chat / eval ---------------------------------------------------------------------
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint written by `apt train` (last.pt), or its run directory")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    # the names of checkpoint.INFERENCE_DTYPES, written out: importing it here would import torch for --help
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights and activations: auto (default) = bfloat16 on CUDA, float32 on the CPU")


def load_checkpoint(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, profile)``; user errors become :class:`CLIError` (FileNotFoundError is reported by
    the CLI's main the same way)."""
    from ...training.checkpoint import CheckpointError, load_for_inference
    from ...training.trainer import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as exc:
        raise CLIError(str(exc).replace("training.device", "--device")) from None
    try:
        return load_for_inference(args.checkpoint, device=device, dtype=args.dtype)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, default_help: Optional[str] = None) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None if default_help else max_new_tokens,
                   help=f"tokens to generate at most (default {default_help or max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens; 0 = off (default 50)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]; 1 = off "
                                                              "(default 0.95)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--no-cache", action="store_true", help="re-run the whole context every step (no KV-cache)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options as keyword arguments of generate() / ChatSession, checked (CLIError when bad)."""
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):  # not '< 0': NaN passes that
        raise CLIError(f"--temperature: expected a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k: must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p: must be in (0, 1], got {args.top_p}")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k or None,
            "top_p": args.top_p, "seed": args.seed, "use_cache": False if args.no_cache else None}


def add_plugin_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plugins")
    g.add_argument("--plugins", action="append", default=None, metavar="NAMES",
                   help="comma-separated generation plugins, e.g. voter,retriever (see `apt plugin list`)")
    g.add_argument("--retrieval-dir", default=None, metavar="DIR",
                   help="folder of .txt/.md/.jsonl files for the retriever plugin (enables it)")
    g.add_argument("--plugin-opt", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a plugin setting (YAML value), e.g. voter.k=8 or retriever.k=2; repeatable")


def _plugin_names(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    for chunk in args.plugins or []:
        names += [n.strip() for n in chunk.split(",") if n.strip()]
    if args.retrieval_dir and "retriever" not in names:
        names.append("retriever")
    return list(dict.fromkeys(names))  # drop repeats, keep the order


def plugin_settings(args: argparse.Namespace, profile: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``plugins.<name>`` settings: the checkpoint profile's, then ``--plugin-opt``, then ``--retrieval-dir``."""
    section = profile.get("plugins") or {}
    settings = {k: dict(v) for k, v in section.items() if k != "enabled" and isinstance(v, dict)}
    for opt in args.plugin_opt:
        key, sep, raw = opt.partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not name or not field:
            raise CLIError(f"--plugin-opt {opt!r}: expected NAME.KEY=VALUE, e.g. voter.k=8")
        try:
            value = yaml_load(raw)
        except yaml.YAMLError as exc:
            raise CLIError(f"--plugin-opt {opt!r}: bad value: {exc}") from None
        settings.setdefault(name, {})[field] = value
    if args.retrieval_dir:
        settings.setdefault("retriever", {})["dir"] = args.retrieval_dir
    return settings


def build_generation_plugins(args: argparse.Namespace, profile: dict[str, Any]) -> Optional[Any]:
    """A PluginManager with the plugins named on the command line (None when none is), or a CLIError."""
    from ...plugins.base import Plugin
    from ...plugins.manager import PluginError, PluginManager, build_plugins

    names = _plugin_names(args)
    settings = plugin_settings(args, profile)
    stray = sorted({o.split(".", 1)[0].strip() for o in args.plugin_opt} - set(names))
    if stray:
        raise CLIError(f"--plugin-opt names plugin(s) {', '.join(stray)} that are not enabled (add --plugins)")
    if not names:
        return None
    try:
        plugins = build_plugins(names, settings)
    except PluginError as exc:
        raise CLIError(str(exc)) from None
    for plugin in plugins:
        # a training-only plugin (moe, align...) would silently do nothing here: say so instead
        if all(getattr(type(plugin), h) is getattr(Plugin, h) for h in GENERATION_HOOKS):
            raise CLIError(f"plugin {plugin.name!r} has no generation hooks ({', '.join(GENERATION_HOOKS)}); "
                           "it only acts during training")
    return PluginManager(plugins)


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line of plugin metrics (for stderr)."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        elif isinstance(v, list):
            v = ",".join(map(str, v))
        parts.append(f"{k}={v}")
    return " ".join(parts)


# ---- apt generate ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from ...inference.generate import generate

    kwargs = sampling_kwargs(args)
    model, tokenizer, profile = load_checkpoint(args)
    plugins = build_generation_plugins(args, profile)
    stop = list(args.stop or [])
    results = generate(model, tokenizer, list(args.prompt), stop=stop, plugins=plugins, return_details=True,
                       **kwargs)
    if args.json:
        rows = [{"prompt": given, "prompt_seen": r.prompt, "text": r.text, "tokens": len(r.tokens),
                 "finish_reason": r.finish_reason, "selections": r.selections, "metrics": r.metrics}
                for given, r in zip(args.prompt, results)]
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2, default=str))
    else:
        for given, r in zip(args.prompt, results):
            print(given + r.text)
            if r.metrics:
                print(f"[{format_metrics(r.metrics)}]", file=sys.stderr)
    if plugins is not None:
        for name, why in plugins.disabled.items():
            print(f"plugin {name} was disabled: {why}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt with a trained model",
        description="Continue one or more prompts with a model from an `apt train` checkpoint: temperature, "
                    "top-k, top-p, a seed, KV-cache; optional generation plugins (voter: entropy-triggered "
                    "voting; retriever: local RAG over --retrieval-dir). Prints each prompt followed by its "
                    "continuation (plugin metrics go to stderr).",
        epilog=EXAMPLES_EPILOG.format("\n  ".join([
            'apt generate apt_runs/tiny_debug/last.pt --prompt "Once upon a time" --seed 0',
            'apt generate apt_runs/tiny_debug --prompt "The cat" --temperature 0 --max-new-tokens 40',
            'apt generate run/last.pt --prompt "Where is Paris?" --plugins voter --retrieval-dir notes/ '
            '--plugin-opt voter.k=8'])),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="the text to continue (repeat for several prompts; they run as a batch)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the continuation contains TEXT (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON: text, finish reason, plugin metrics")
    add_sampling_args(p, max_new_tokens=64)
    add_plugin_args(p)
    p.set_defaults(func=run)
