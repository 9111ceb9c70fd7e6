"""One module per ``apt`` subcommand; each defines ``add_parser(subparsers)``."""
from __future__ import annotations

import argparse
from typing import Callable


def count_type(minimum: int) -> Callable[[str], int]:
    """argparse type: an int >= minimum (a bad value is argparse's one-line usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected >= {minimum}, got {value}")
        return value
    return parse
