"""Training subcommands: pretrain, finetune, demo."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..engine.resume import RESUME_RULE
from ..errors import Med3DError
from ._common import Handler, Subparsers, add_config_args


def _train_cmd(job: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from ..config import load_config
        from ..engine.trainer import describe, train

        resume = args.resume
        if resume is not None and args.overwrite:
            raise Med3DError("--resume continues the run in run.out_dir and --overwrite replaces it; give one")
        cfg = load_config(args.config, args.set)
        if args.fold is not None or args.folds:
            return _folds(args, cfg, job)
        if resume == "auto":
            resume = str(Path(cfg.run.out_dir) / "checkpoints" / "last.pt")
            if not Path(resume).is_file():
                raise Med3DError(f"--resume: no checkpoint at {resume} to resume from")
        summary = train(cfg, job, resume=resume, progress=not args.quiet, overwrite=args.overwrite)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            print(describe(summary))
            print(f"outputs in {cfg.run.out_dir}")
        return 0

    return handler


def _folds(args: argparse.Namespace, cfg, job: str) -> int:
    """``--fold N`` / ``--folds all``: cross-validation folds into RUN/fold_N, then the fold summary."""
    from ..study.crossval import fold_count, parse_folds, run_folds

    if args.resume not in (None, "auto"):
        raise Med3DError("--resume with --fold/--folds takes no checkpoint: each fold continues from its own "
                         "RUN/fold_N/checkpoints/last.pt")
    k = fold_count(cfg)
    folds = parse_folds(args.folds, k) if args.folds else parse_folds(str(args.fold), k)
    run_folds(cfg, job, folds, progress=not args.quiet, resume=args.resume is not None, overwrite=args.overwrite)
    print(f"fold summary in {Path(cfg.run.out_dir) / 'fold_summary.md'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if any(o.startswith(("run.out_dir=", "data.datasets", "data.cache_dir=")) for o in args.set):
        raise Med3DError("--set: the demo places its runs, data and cache under --out; give --out instead")
    return run_demo(args.set, quick=args.quick, out_dir=args.out, progress=not args.quiet)


def add_train(sub: Subparsers) -> None:
    """Add ``med3d pretrain`` and ``med3d finetune``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    for job, summary in (("pretrain", "train a shared encoder with one head per task over several datasets"),
                         ("finetune", "train a new task from a pretrained encoder")):
        p = sub.add_parser(job, help=summary, description=f"{summary}. Launch with torchrun for several "
                           "processes or nodes.")
        p.add_argument("config", help="YAML config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue a run exactly (default: RUN/checkpoints/last.pt). " + RESUME_RULE)
        folds = p.add_mutually_exclusive_group()
        folds.add_argument("--fold", type=int, metavar="N", help="train cross-validation fold N (of data.folds, "
                           "default 5, or of data.splits_file) into RUN/fold_N")
        folds.add_argument("--folds", metavar="all|N,M", help="train these folds (all: every one) into RUN/fold_N, "
                           "one after another, then write RUN/fold_summary.csv and .md; with --resume, finished "
                           "folds are skipped")
        p.add_argument("--overwrite", action="store_true", help="replace the run already in run.out_dir: its "
                       "checkpoints, metrics, config and summary are removed first (without this or --resume, "
                       "a folder holding a run is refused)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(handler=_train_cmd(job))


def add_demo(sub: Subparsers) -> None:
    """Add ``med3d demo``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("demo", help="the built-in demo on generated data")
    add_config_args(p)
    p.add_argument("--quick", action="store_true", help="a few iterations only, for a smoke test")
    p.add_argument("--out", default="runs/demo", help="folder for data, cache, runs and the exported encoder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_demo)
