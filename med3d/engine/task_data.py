"""From the config's ``data`` section to training tasks, validation cases and plans.

A prepared cache is a precondition of training: a single-process run prepares it first (check,
plan, preprocess; a no-op when it is current); under torchrun every rank only checks that
``med3d prepare`` finished it before the ranks started, so no rank waits on another's
preprocessing. Each dataset is then split into training and held-out cases with a seeded shuffle.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..config import Config
from ..data.cache import CachedCase, cache_folder, check_prepared, load_cache, prepare_dataset
from ..data.class_cache import class_plan, load_class_cache, prepare_classification
from ..data.classification import (is_classification_dataset, read_classification_dataset,
                                   require_valid_classification)
from ..data.datalist import read_dataset
from ..data.sampler import TaskData
from ..errors import Med3DError
from ..tasks import kind_for_head
from .distributed import DistInfo

log = logging.getLogger("med3d.train")


@dataclass
class DataSetup:
    tasks: List[TaskData]
    val: Dict[str, List[CachedCase]]
    plans: Dict[str, Dict[str, Any]]
    channels: Dict[str, Optional[List[int]]]  # channel selection per task (None: all)
    adapters: Dict[str, int]  # tasks that need an input adapter -> their channel count


def check_tasks(cfg: Config) -> None:
    """Fail before any work when datasets and heads do not correspond or a dataset folder is missing."""
    datasets, heads = cfg.data.datasets, cfg.model.heads
    if not datasets:
        raise Med3DError("config key 'data.datasets' is empty; name at least one dataset (task name: {path: ...})")
    for task, entry in datasets.items():
        if task not in heads:
            raise Med3DError(f"data.datasets.{task}: no head for this task in model.heads "
                             f"(heads: {', '.join(heads) or 'none'}); add one or rename the dataset entry")
        if not Path(entry.path).exists():
            raise Med3DError(f"data.datasets.{task}.path: dataset {entry.path} not found")
        _check_kind(task, entry.path, heads[task].type)
        if entry.descriptor and not Path(entry.descriptor).is_file():
            raise Med3DError(f"data.datasets.{task}.descriptor: {entry.descriptor} not found")
    for task in heads:
        if task not in datasets:
            raise Med3DError(f"model.heads.{task}: no dataset for this head in data.datasets; add one or drop the head")


def is_classification(cfg: Config, task: str) -> bool:
    """Whether ``task``'s head is trained as an image-level classifier."""
    return kind_for_head(cfg.model.heads[task].type, f"model.heads.{task}.type").name == "classification"


def _check_kind(task: str, path: str, head_type: str) -> None:
    """A classification head needs a classification dataset, and a segmentation head a segmentation one."""
    wants = kind_for_head(head_type, f"model.heads.{task}.type").name == "classification"
    has = is_classification_dataset(path)
    if wants and not has:
        raise Med3DError(f"task {task}: a '{head_type}' head needs a classification dataset (dataset.json entries "
                         f"with 'class', a CSV or a MedMNIST .npz) but {path} is not one")
    if has and not wants:
        raise Med3DError(f"task {task}: {path} is a classification dataset but its head is '{head_type}'; "
                         "use a 'classification' head")
    if not has and not Path(path).is_dir():
        raise Med3DError(f"data.datasets.{task}.path: {path} is a file; a segmentation dataset is a folder")


def _channels(cfg: Config, task: str, n: int) -> Optional[List[int]]:
    entry, want = cfg.data.datasets[task], cfg.model.encoder.in_channels
    if entry.channel is not None:
        chosen = [entry.channel] if isinstance(entry.channel, int) else list(entry.channel)
        bad = [c for c in chosen if not 0 <= c < n]
        if bad:
            raise Med3DError(f"data.datasets.{task}.channel: channel {bad[0]} does not exist ({n} channels)")
        return chosen
    if n == want or cfg.data.input_policy == "adapter":
        return None
    if want == 1:
        if not 0 <= cfg.data.select_channel < n:
            raise Med3DError(f"data.select_channel {cfg.data.select_channel}: task {task} has {n} channels")
        return [cfg.data.select_channel]
    raise Med3DError(f"task {task} has {n} channels but the encoder takes {want}; set data.datasets.{task}.channel, "
                     "or data.input_policy: adapter")


def _held_out_count(n: int, fraction: float) -> int:
    """``fraction`` of ``n`` cases, at least one of two or more when ``fraction`` > 0, never all of them."""
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = max(1, k)
    return min(k, n - 1)


def _split(cases: List[CachedCase], cfg: Config, task: str):
    order = np.random.default_rng([cfg.run.seed, 11]).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    n_val = _held_out_count(len(cases), cfg.data.val_fraction)
    return _limit(shuffled[n_val:], cfg, task), shuffled[:n_val]


def _class_split(cases: List[Any], cfg: Config, task: str):
    """A split stratified by class: each class gives ``val_fraction`` of its cases (at least one of two
    or more) to the held-out set; the training list interleaves the classes, so ``data.train_cases``
    keeps their proportions."""
    rng = np.random.default_rng([cfg.run.seed, 11])
    train_by, held = [], []
    for label in sorted({c.label for c in cases}):
        own = [cases[i] for i in rng.permutation([i for i, c in enumerate(cases) if c.label == label])]
        n_val = _held_out_count(len(own), cfg.data.val_fraction)
        held += own[:n_val]
        train_by.append(own[n_val:])
    train = [c for group in zip_longest(*train_by) for c in group if c is not None]
    return _limit(train, cfg, task), held


def _limit(train: List[Any], cfg: Config, task: str) -> List[Any]:
    """The first ``data.train_cases`` training cases (a count or a fraction), for small-data studies."""
    limit = cfg.data.train_cases
    if limit is None:
        return train
    k = int(limit) if isinstance(limit, int) else int(round(limit * len(train)))
    if k < 1:
        raise Med3DError(f"data.train_cases {limit} leaves no training case for task {task}")
    return train[:k]


def _prepare_classes(entry: Any, cache_dir: str, prepare: bool, check: bool, progress: bool) -> Path:
    """A classification dataset's cache folder: prepared here, or (DDP ranks) checked to hold this plan."""
    ds = read_classification_dataset(entry.path)
    if not prepare:
        folder = cache_folder(cache_dir, entry.path)
        want = class_plan(ds, entry.spacing, entry.crop_mm, entry.normalization)["plan_hash"]
        have = json.loads((folder / "plan.json").read_text()).get("plan_hash") \
            if (folder / "plan.json").is_file() else None
        if have != want:
            raise Med3DError(f"dataset {entry.path} is not prepared in {cache_dir} under this config's plan; run "
                             "'med3d prepare --config CONFIG' before starting the ranks")
        return folder
    if check:
        require_valid_classification(ds)
    return prepare_classification(ds, entry.path, cache_dir,
                                  spacing=entry.spacing, crop_mm=entry.crop_mm,
                                  normalization=entry.normalization, progress=progress)


def ensure_prepared(cfg: Config, prepare: bool, progress: bool = True) -> Dict[str, Path]:
    """Each task's cache folder, preparing it first when ``prepare`` (else only checking it is complete).

    Args:
        cfg: the run's config (datasets, cache folder, per-dataset plan overrides).
        prepare: prepare missing or stale cases (single process); False: refuse them (DDP ranks).
        progress: show progress bars while preparing.

    Returns:
        ``{task: cache folder}``.

    Raises:
        Med3DError: a dataset fails to prepare, or (without ``prepare``) is not prepared.
    """
    folders = {}
    for task, entry in cfg.data.datasets.items():
        if is_classification(cfg, task):
            folders[task] = _prepare_classes(entry, cfg.data.cache_dir, prepare, cfg.data.check, progress)
            continue
        overrides = dict(descriptor=entry.descriptor, spacing=entry.spacing, normalization=entry.normalization)
        if not prepare:
            folders[task] = check_prepared(entry.path, cfg.data.cache_dir, **overrides)
            continue
        result = prepare_dataset(entry.path, cfg.data.cache_dir, workers=cfg.data.workers, progress=progress,
                                 check=cfg.data.check, **overrides)
        if result.failed:
            raise Med3DError(f"dataset {entry.path}: {len(result.failed)} case(s) failed to prepare; first: "
                             f"{result.failed[0]}")
        folders[task] = result.folder
    return folders


def _class_task(cfg: Config, task: str, folder: Path, val: Dict[str, Any], plans: Dict[str, Any],
                channels: Dict[str, Any], adapters: Dict[str, int]) -> TaskData:
    """One classification task: its cached regions, split (the dataset's own validation cases if it has them)."""
    entry = cfg.data.datasets[task]
    ds = read_classification_dataset(entry.path)
    plan, cases = load_class_cache(folder, [c.case_id for c in ds.cases])
    n_cls = len(plan["classes"])
    if cfg.model.heads[task].num_classes != n_cls:
        raise Med3DError(f"model.heads.{task}.num_classes is {cfg.model.heads[task].num_classes} but dataset "
                         f"{entry.path} declares {n_cls} classes")
    bad = [c for c in cases if c.label is None or not 0 <= c.label < n_cls]
    if bad:
        raise Med3DError(f"task {task}: case {bad[0].case_id} has class {bad[0].label}, outside the declared "
                         f"0..{n_cls - 1}; fix {entry.path}")
    if not cases:
        raise Med3DError(f"task {task}: {entry.path} has no training case with a class; check it with "
                         "'med3d check-data'")
    if n_cls < 2:
        raise Med3DError(f"task {task}: {entry.path} declares {n_cls} class; a classifier needs at least two")
    if ds.val_cases:  # the dataset's own split; the training subset is still a seeded, stratified draw
        train = _class_split(cases, replace(cfg, data=replace(cfg.data, val_fraction=0.0)), task)[0]
        held = load_class_cache(folder, [c.case_id for c in ds.val_cases])[1]
    else:
        train, held = _class_split(cases, cfg, task)
    missing = sorted(set(range(n_cls)) - {c.label for c in held})
    if held and missing:
        log.warning("task %s: no held-out case of class(es) %s, so its AUC is undefined; raise data.val_fraction",
                    task, ", ".join(plan["classes"][str(m)] for m in missing))
    channels[task] = _channels(cfg, task, len(plan["channel_names"]))
    if channels[task] is None and len(plan["channel_names"]) != cfg.model.encoder.in_channels:
        adapters[task] = len(plan["channel_names"])
    plans[task] = {**plan, "channels": channels[task]}
    val[task] = held
    return TaskData(task, train, plan, channels[task], entry.loss_weight, kind="classification",
                    class_balance=cfg.data.class_balance)


def setup_data(cfg: Config, info: DistInfo, progress: bool = True) -> DataSetup:
    """Make sure every dataset is prepared, then build tasks and the validation split on every rank.

    Args:
        cfg: the run's config.
        info: the process's rank and world size (more than one rank: the cache must be ready).
        progress: show progress bars while preparing.

    Returns:
        Training tasks, held-out cases, plans, channel selections and the input adapters needed.

    Raises:
        Med3DError: a dataset or head does not fit, or the cache is not ready.
    """
    check_tasks(cfg)
    folders = ensure_prepared(cfg, prepare=info.world == 1, progress=progress and info.is_main)
    tasks, val, plans, channels, adapters = [], {}, {}, {}, {}
    for task, entry in cfg.data.datasets.items():
        if is_classification(cfg, task):
            tasks.append(_class_task(cfg, task, folders[task], val, plans, channels, adapters))
            continue
        declared = [c.case_id for c in read_dataset(entry.path).cases]
        plan, cases = load_cache(folders[task], declared)
        n_labels = len(plan["labels"])
        if cfg.model.heads[task].num_classes != n_labels:
            raise Med3DError(f"model.heads.{task}.num_classes is {cfg.model.heads[task].num_classes} but dataset "
                             f"{entry.path} declares {n_labels} labels (with background)")
        n_ch = len(plan["channel_names"])
        channels[task] = _channels(cfg, task, n_ch)
        if channels[task] is None and n_ch != cfg.model.encoder.in_channels:
            adapters[task] = n_ch
        train, held = _split(cases, cfg, task)
        plans[task] = {**plan, "channels": channels[task]}
        tasks.append(TaskData(task, train, plan, channels[task], entry.loss_weight))
        val[task] = held
    return DataSetup(tasks, val, plans, channels, adapters)
