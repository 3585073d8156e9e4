"""Subcommands for data and training: check-data, prepare, pretrain, finetune."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict

from .errors import Med3DError


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.check import check_dataset
    from .data.datalist import read_dataset

    total_err = total_warn = 0
    for root in args.datasets:
        info = read_dataset(root)
        problems = check_dataset(info, workers=args.workers, progress=not args.quiet)
        errors = [p for p in problems if p.severity == "error"]
        warnings = [p for p in problems if p.severity == "warning"]
        for p in problems:
            print(p)
        n = len(info.cases) + len(info.test_cases)
        print(f"{info.name}: {n} case(s) checked ({info.layout} layout, {info.num_channels} channel(s), "
              f"{len(info.labels)} labels): {len(errors)} error(s), {len(warnings)} warning(s)")
        total_err += len(errors)
        total_warn += len(warnings)
    return 1 if total_err else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.cache import prepare_dataset

    failed = 0
    for root in args.datasets:
        r = prepare_dataset(root, args.cache, workers=args.workers, progress=not args.quiet,
                            descriptor=args.descriptor, spacing=args.spacing)
        plan = r.plan
        norm = ", ".join(n["scheme"] for n in plan["normalization"])
        print(f"{plan['dataset']}: {r.done} case(s) prepared, {r.skipped} already cached, {len(r.failed)} failed; "
              f"spacing {[round(s, 3) for s in plan['target_spacing']]} mm (z, y, x), normalisation {norm}, "
              f"median shape {plan['median_shape_resampled']} -> {r.folder}")
        for line in r.failed:
            print(f"error: {line}")
        failed += len(r.failed)
    return 1 if failed else 0


def _train_cmd(job: str):
    def handler(args: argparse.Namespace) -> int:
        from .config import load_config
        from .engine.trainer import describe, train

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


def add_parsers(sub) -> Dict[str, object]:
    handlers: Dict[str, object] = {}
    p = sub.add_parser("check-data", help="validate datasets (files, geometry, labels) before training")
    p.add_argument("datasets", nargs="+", help="dataset folders (Decathlon or nnU-Net v2 layout)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    handlers["check-data"] = cmd_check_data

    p = sub.add_parser("prepare", help="check, plan and preprocess datasets into the on-disk cache")
    p.add_argument("datasets", nargs="+", help="dataset folders")
    p.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--descriptor", help="descriptor YAML overriding the shipped one (single dataset)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="target spacing in mm")
    p.add_argument("--quiet", action="store_true")
    handlers["prepare"] = cmd_prepare

    for job, summary in (("pretrain", "train a shared encoder with one head per task over several datasets"),
                         ("finetune", "train a new task from a pretrained encoder")):
        p = sub.add_parser(job, help=summary, description=f"{summary}. Launch with torchrun for several "
                           "processes or nodes.")
        p.add_argument("config", help="YAML config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue a run exactly (default: RUN/checkpoints/last.pt)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        handlers[job] = _train_cmd(job)
    return handlers
