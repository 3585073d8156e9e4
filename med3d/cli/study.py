"""Subcommand study: a grid of fine-tuning runs on one task, resumable, with its report."""
from __future__ import annotations

import argparse

from ._common import Subparsers, add_config_args


def _study(args: argparse.Namespace) -> int:
    from ..study.grid import load_study
    from ..study.runner import run_study

    study = load_study(args.config, args.set)
    rows = run_study(study, progress=not args.quiet)
    skipped = sum(r["skipped"] for r in rows)
    print(f"{len(rows)} run(s), {skipped} already finished before; report in {study.out_dir / 'summary.md'}, "
          f"every run in {study.out_dir / 'runs.csv'}")
    return 0


def add_study(sub: Subparsers) -> None:
    """Add ``med3d study``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("study", help="fine-tune a grid (initialisations x training-set sizes x folds or seeds) "
                       "under one budget; runs.csv, summary.md (intervals, gains, speed-ups) and plots",
                       description="Runs every cell of the study file's 'study:' section one after another; a "
                       "second call skips finished runs and continues an interrupted one from its checkpoint.")
    p.add_argument("config", help="study YAML: a fine-tuning config with a 'study:' section")
    add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_study)
