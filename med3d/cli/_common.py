"""What the subcommand modules share: the handler type and the ``--set`` option."""
from __future__ import annotations

import argparse
from typing import Callable

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction  # argparse has no public name for it


def add_config_args(p: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--set KEY=VALUE`` config override.

    Args:
        p: a subcommand's parser.
    """
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
