"""Data subcommands: demo-data, check-data, prepare."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Med3DError
from ._common import Subparsers, add_config_args


def _demo_data(args: argparse.Namespace) -> int:
    from ..data.demo import NODULE_DEMO, TASK_NAMES, write_demo_data, write_nodule_demo

    every = [*TASK_NAMES, NODULE_DEMO]
    unknown = [t for t in args.tasks or [] if t not in every]
    if unknown:
        raise Med3DError(f"--tasks: unknown demo task {unknown[0]}; choose from {', '.join(every)}")
    out, tasks = Path(args.out), args.tasks or every
    existing = [out / t for t in tasks if (out / t).exists()]
    if existing and not args.overwrite:
        raise Med3DError(f"{existing[0]}: already exists; pass --overwrite to write the demo data again")
    seg = [t for t in tasks if t in TASK_NAMES]
    paths = write_demo_data(out, seed=args.seed, n_train=args.train or 10, n_test=args.test, tasks=seg) if seg else []
    if NODULE_DEMO in tasks:  # classification needs more cases than segmentation to say anything
        paths.append(write_nodule_demo(out, n_train=args.train or 32, n_test=args.test, seed=args.seed))
    for p in paths:
        print(p)
    return 0


def _check_classes(root: str) -> int:
    """check-data for a classification dataset; returns its error count."""
    from ..data.classification import check_classification_dataset, read_classification_dataset

    ds = read_classification_dataset(root)
    lines = check_classification_dataset(ds)
    for line in lines:
        print(line)
    errors = sum(line.startswith("error") for line in lines)
    n = len(ds.cases) + len(ds.val_cases) + len(ds.test_cases)
    print(f"{ds.name}: {n} case(s) checked ({ds.layout} classification layout, {len(ds.channel_names)} channel(s), "
          f"{ds.num_classes} classes): {errors} error(s), {len(lines) - errors} warning(s)")
    return errors


def _check_data(args: argparse.Namespace) -> int:
    from ..data.check import check_dataset
    from ..data.classification import is_classification_dataset
    from ..data.datalist import read_dataset

    total_err = 0
    for root in args.datasets:
        if is_classification_dataset(root):
            total_err += _check_classes(root)
            continue
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
    return 1 if total_err else 0


def _prepare_jobs(args: argparse.Namespace) -> list:
    """``(dataset, cache, plan overrides)`` for each dataset named on the line or in ``--config``."""
    if args.config and (args.datasets or args.descriptor or args.spacing or args.cache != "cache"):
        raise Med3DError("prepare: --config takes the datasets, cache folder and plan overrides from the config; "
                         "give either --config or dataset folders with --cache/--descriptor/--spacing")
    if args.set and not args.config:
        raise Med3DError("prepare: --set overrides keys of --config; give the config too")
    if args.config:
        from ..config import load_config

        from ..engine.task_data import is_self_supervised

        cfg = load_config(args.config, args.set)
        # Self-supervised tasks read their dataset as unlabelled images, into a cache of their own.
        return [(e.path, cfg.data.cache_dir, {"unlabelled": e, "task": t, "check": cfg.data.check})
                if t in cfg.model.heads and is_self_supervised(cfg, t) else
                (e.path, cfg.data.cache_dir, dict(descriptor=e.descriptor, spacing=e.spacing,
                                                  normalization=e.normalization, check=cfg.data.check,
                                                  crop_mm=e.crop_mm, label_map=e.label_map, ct_window=e.ct_window,
                                                  pseudo=(cfg, t) if e.pseudo is not None else None))
                for t, e in cfg.data.datasets.items()]
    if not args.datasets:
        raise Med3DError("prepare: name the dataset folders, or --config CONFIG for the datasets a config trains on")
    return [(root, args.cache, dict(descriptor=args.descriptor, spacing=args.spacing)) for root in args.datasets]


def _prepare_classes(root: str, cache: str, overrides: dict, progress: bool) -> None:
    """prepare for a classification dataset: every case's region, then the plan's statistics."""
    from ..data.class_cache import load_class_cache, prepare_classification
    from ..data.classification import read_classification_dataset, require_valid_classification

    ds = read_classification_dataset(root)
    if overrides.get("check", True):
        require_valid_classification(ds)
    folder = prepare_classification(ds, root, cache, spacing=overrides.get("spacing"),
                                    crop_mm=overrides.get("crop_mm"), normalization=overrides.get("normalization"),
                                    progress=progress)
    plan, cases = load_class_cache(folder, [c.case_id for c in ds.cases + ds.val_cases + ds.test_cases])
    norm = ", ".join(n["scheme"] for n in plan["normalization"])
    print(f"{ds.name}: {len(cases)} case(s) prepared (classification regions of {plan['crop_mm'] or 'whole images'} "
          f"mm); spacing {[round(v, 3) for v in plan['target_spacing']]} mm (z, y, x), normalisation {norm} "
          f"-> {folder}")


def _prepare(args: argparse.Namespace) -> int:
    from ..data.cache import prepare_dataset
    from ..data.classification import is_classification_dataset

    failed = 0
    for root, cache, overrides in _prepare_jobs(args):
        if "unlabelled" in overrides:
            from ..data.unlabelled import prepare_unlabelled

            folder = prepare_unlabelled(overrides["unlabelled"], cache, args.workers, not args.quiet,
                                        overrides["check"], f"data.datasets.{overrides['task']}")
            print(f"{overrides['task']}: unlabelled images of {root} prepared -> {folder}")
            continue
        if is_classification_dataset(root):
            _prepare_classes(root, cache, overrides, progress=not args.quiet)
            continue
        overrides.pop("crop_mm", None)
        pseudo = overrides.pop("pseudo", None)
        r = prepare_dataset(root, cache, workers=args.workers, progress=not args.quiet, **overrides)
        if pseudo is not None and not r.failed:  # under the plan just made: the student's scans join the task's
            from ..engine.task_data import prepare_pseudo

            cfg, task = pseudo
            folder = prepare_pseudo(cfg, task, r.folder, prepare=True, progress=not args.quiet)
            print(f"{task}: pseudo-labelled scans of {cfg.data.datasets[task].pseudo.path} prepared -> {folder}")
        plan = r.plan
        norm = ", ".join(n["scheme"] for n in plan["normalization"])
        print(f"{plan['dataset']}: {r.done} case(s) prepared, {r.skipped} already cached, {len(r.failed)} failed; "
              f"spacing {[round(s, 3) for s in plan['target_spacing']]} mm (z, y, x), normalisation {norm}, "
              f"median shape {plan['median_shape_resampled']} -> {r.folder}")
        for line in r.failed:
            print(f"error: {line}")
        failed += len(r.failed)
    return 1 if failed else 0


def add_demo_data(sub: Subparsers) -> None:
    """Add ``med3d demo-data``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("demo-data", help="write the synthetic demo datasets in Decathlon (MSD) layout: four "
                       "segmentation tasks and a nodule classification task")
    p.add_argument("out", help="folder to write the task folders into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, help="training cases per task (default 10; 32 for the nodule task)")
    p.add_argument("--test", type=int, default=2, help="test cases per task")
    p.add_argument("--tasks", nargs="+", help="only these task folders")
    p.add_argument("--overwrite", action="store_true", help="write over existing task folders")
    p.set_defaults(handler=_demo_data)


def add_check_data(sub: Subparsers) -> None:
    """Add ``med3d check-data``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("check-data", help="validate datasets (files, geometry, labels) before training")
    p.add_argument("datasets", nargs="+", help="dataset folders (Decathlon or nnU-Net v2 layout)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_check_data)


def add_prepare(sub: Subparsers) -> None:
    """Add ``med3d prepare``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("prepare", help="check, plan and preprocess datasets into the on-disk cache",
                       description="Prepare dataset folders, or (--config) the datasets of a training config with "
                                   "its cache folder and plan overrides: run this before launching torchrun with "
                                   "several processes, whose ranks only check that the cache is ready.")
    p.add_argument("datasets", nargs="*", help="dataset folders")
    p.add_argument("--config", help="prepare the datasets this training config names (its data.cache_dir too)")
    add_config_args(p)
    p.add_argument("--cache", default="cache", help="cache folder (default: ./cache)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--descriptor", help="descriptor YAML overriding the shipped one (single dataset)")
    from ..values import cli_type, positive  # a NaN or non-positive spacing is refused here, not mid-resampling

    p.add_argument("--spacing", type=cli_type(positive, "--spacing"), nargs=3, metavar=("Z", "Y", "X"),
                   help="target spacing in mm")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_prepare)
