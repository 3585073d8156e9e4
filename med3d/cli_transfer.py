"""Transfer subcommands (export, inflate, weights); filled in by the transfer toolkit."""
from __future__ import annotations

import argparse
from typing import Callable, Dict


def add_parsers(sub: argparse._SubParsersAction) -> Dict[str, Callable[[argparse.Namespace], int]]:
    return {}
