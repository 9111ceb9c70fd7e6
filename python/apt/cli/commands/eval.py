"""``apt eval``: perplexity of a model trained by ``apt train`` on a text file.

    apt eval apt_runs/tiny_debug/last.pt --file held_out.txt
    apt eval apt_runs/tiny_debug --file held_out.txt --context 64 --stride 16 --json

Sliding-window scoring for windowed models, streaming through the cache for recurrent ones; see
:mod:`apt.inference.evaluate` for exactly which context each token is scored with.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..main import CLIError
from .generate import EXAMPLES_EPILOG, add_checkpoint_args, load_checkpoint


def run(args: argparse.Namespace) -> int:
    from ...inference.evaluate import evaluate_file

    if not Path(args.file).is_file():  # before loading the model: a typo should fail fast
        raise CLIError(f"--file: {args.file} is a directory, not a text file" if Path(args.file).is_dir()
                       else f"--file: no such file: {args.file}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: must be >= 1, got {args.batch_size}")
    model, tokenizer, _ = load_checkpoint(args)
    try:
        res = evaluate_file(model, tokenizer, args.file, context=args.context, stride=args.stride,
                            batch_size=args.batch_size)
    except ValueError as exc:  # too short a text, a context beyond the window, a bad stride
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps({"file": str(args.file), **res.as_dict()}, indent=2))
        return 0
    bpb = f", {res.bits_per_byte:.4f} bits/byte" if res.bits_per_byte is not None else ""
    print(f"perplexity {res.perplexity:.4f} on {args.file} (nll {res.nll:.4f} nats/token{bpb}; {res.tokens} "
          f"tokens scored, context {res.context}, stride {res.stride}, {res.forwards} forwards)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity of a trained model on a text file",
        description="Perplexity (exp of the mean next-token negative log-likelihood) and bits per byte of a "
                    "model from an `apt train` checkpoint on a UTF-8 text file. Windowed models (GPT) are "
                    "scored with a sliding window of --context tokens moved by --stride; recurrent models "
                    "(Mamba) stream the whole text through their state.",
        epilog=EXAMPLES_EPILOG.format("\n  ".join([
            "apt eval apt_runs/tiny_debug/last.pt --file held_out.txt",
            "apt eval apt_runs/tiny_debug --file held_out.txt --context 64 --stride 16 --json"])),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--file", required=True, metavar="TEXT", help="UTF-8 text file to score")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context per window (default: the model's window; 512 for recurrent models)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window (default: context // 2; context for recurrent models)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
