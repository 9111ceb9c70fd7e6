"""``apt chat``: a chat loop on stdin/stdout with a model trained by ``apt train``.

    apt chat apt_runs/tiny_debug/last.pt
    echo "hello" | apt chat apt_runs/tiny_debug --temperature 0 --max-new-tokens 40
    apt chat run/last.pt --system "Answer briefly." --retrieval-dir notes/ --plugins voter

Each stdin line is a message; each reply is written to stdout followed by a newline (a reply may itself hold
newlines: the model's text up to the next "User:" turn). ``/reset`` forgets the conversation, ``/exit`` (or end
of input) ends it. The history is trimmed to fit the model's window (:mod:`apt.inference.chat`);
``--max-new-tokens`` defaults to 128, or half the window for a model whose window is shorter than 256, so that
earlier turns fit beside the reply.
"""
from __future__ import annotations

import argparse
import sys

from .generate import (EXAMPLES_EPILOG, add_checkpoint_args, add_plugin_args, add_sampling_args,
                       build_generation_plugins, format_metrics, load_checkpoint, sampling_kwargs)


def run(args: argparse.Namespace) -> int:
    from ...inference.chat import ChatSession, run_chat

    from ...inference.generate import model_window

    model, tokenizer, profile = load_checkpoint(args)
    if args.max_new_tokens is None:  # 128 left no room for history in a 64-token window (tiny_debug)
        window = model_window(model)
        args.max_new_tokens = 128 if window is None else max(1, min(128, window // 2))
    kwargs = sampling_kwargs(args)
    plugins = build_generation_plugins(args, profile)
    session = ChatSession(model, tokenizer, system=args.system, plugins=plugins, **kwargs)
    # the banner and the "> " prompt only help a person typing; piped input gets the replies alone
    interactive = sys.stdin.isatty()
    turns = run_chat(session, sys.stdin, sys.stdout, prompt="> " if interactive else "", banner=interactive)
    print(f"chat: {turns} replies", file=sys.stderr)
    if plugins is not None:
        voter = plugins.get("voter")
        if voter is not None:
            print(f"[{format_metrics({'voter_' + k: v for k, v in voter.totals.items()})}]", file=sys.stderr)
        for name, why in plugins.disabled.items():
            print(f"plugin {name} was disabled: {why}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help="chat with a trained model (stdin -> stdout)",
        description="Chat with a model from an `apt train` checkpoint: every line read from stdin is a message, "
                    "every reply is written to stdout. Commands: /reset (forget the conversation), /help, "
                    "/exit or /quit; end of input ends the chat cleanly.",
        epilog=EXAMPLES_EPILOG.format("\n  ".join([
            "apt chat apt_runs/tiny_debug/last.pt",
            'printf "hello\\nhow are you?\\n" | apt chat apt_runs/tiny_debug --temperature 0',
            'apt chat run/last.pt --system "Answer briefly." --retrieval-dir notes/'])),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--system", default="", help="a system line put at the top of every prompt")
    add_sampling_args(p, max_new_tokens=128, default_help="128, or half the model's window if that is less")
    add_plugin_args(p)
    p.set_defaults(func=run)
