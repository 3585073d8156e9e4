"""The ``med3d`` command: argparse subcommands over the library, one module per group.

Bad input raises ``Med3DError``; ``main`` prints it as one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, List, Optional

from .. import __version__
from ..errors import Med3DError
from . import analyze, data, explain, misc, new, predict, pseudo, study, train, transfer
from ._common import Subparsers

# The order of `med3d --help`.
ADDERS: List[Callable[[Subparsers], None]] = [
    train.add_demo, data.add_demo_data, misc.add_config, transfer.add_encoders, misc.add_bench,
    new.add_new_dataset, new.add_new_config, data.add_check_data, data.add_prepare, train.add_train, study.add_study, predict.add_predict, predict.add_evaluate,
    pseudo.add_pseudo_label, pseudo.add_teacher_student,
    explain.add_explain, analyze.add_analyze, transfer.add_export, transfer.add_inflate, transfer.add_weights,
]


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are the CLI's one line, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``med3d`` parser; each subcommand sets its handler as ``args.handler``.

    Returns:
        The parser.
    """
    parser = _Parser(prog="med3d", description="Med3D-style 3D-ResNet pretraining and transfer "
                                     "for medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"med3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in ADDERS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``med3d`` with ``argv`` (default: the command line).

    Args:
        argv: the arguments after the program name.

    Returns:
        The exit status: 0 done, 1 some inputs failed, 2 bad input (one line on stderr), 130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return status
    except Med3DError as err:
        print(f"med3d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"med3d {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`med3d ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
