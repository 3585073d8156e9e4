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
        cfg = load_config(args.config, args.set)
        if resume == "auto":
            resume = str(Path(cfg.run.out_dir) / "checkpoints" / "last.pt")
            if not Path(resume).is_file():
                raise Med3DError(f"--resume: no checkpoint at {resume} to resume from")
        summary = train(cfg, job, resume=resume, progress=not args.quiet)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            print(describe(summary))
            print(f"outputs in {cfg.run.out_dir}")
        return 0

    return handler


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
