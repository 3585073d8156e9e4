"""From the config's ``data`` section to training tasks, validation cases and plans.

A prepared cache is a precondition of training: a single-process run prepares it first (check,
plan, preprocess; a no-op when it is current); under torchrun every rank only checks that
``med3d prepare`` finished it before the ranks started, so no rank waits on another's
preprocessing. Each dataset is then split into training and held-out cases: one cross-validation
fold (``med3d.data.splits``), named validation cases, the dataset's own validation split, or a
seeded hold-out; ``split.json`` in the run folder records the case ids each side got.

Self-supervised tasks (``restore``, ``contrastive`` heads) read their dataset as unlabelled
(``med3d.data.unlabelled``): a folder of images, or a dataset folder's images with labels withheld.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..config import Config
from ..data.cache import CachedCase, cache_folder, check_prepared, load_cache, prepare_dataset
from ..data.class_cache import class_plan, load_class_cache, prepare_classification
from ..data.classification import (is_classification_dataset, read_classification_dataset,
                                   require_valid_classification)
from ..data.datalist import DatasetInfo, read_dataset
from ..data.sampler import TaskData
from ..data.pseudo import IGNORE, PseudoSet, pseudo_cache, read_pseudo_set, shared_scans, teacher_saw
from ..data.unlabelled import case_ids, check_unlabelled, prepare_unlabelled
from ..ssl.corruptions import CorruptionRates
from ..data.splits import (DEFAULT_FOLDS, Fold, groups_on_both_sides, make_folds, read_groups,
                           read_splits)
from ..errors import Med3DError
from ..tasks import SELF_SUPERVISED, kind_for_head
from .distributed import DistInfo

log = logging.getLogger("med3d.train")


@dataclass
class DataSetup:
    tasks: List[TaskData]
    val: Dict[str, List[CachedCase]]
    plans: Dict[str, Dict[str, Any]]
    channels: Dict[str, Optional[List[int]]]  # channel selection per task (None: all)
    adapters: Dict[str, int]  # tasks that need an input adapter -> their channel count
    # The case ids each task trains and validates on, and how they were chosen (written as split.json).
    splits: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    folds: Optional[List[Fold]] = None  # every cross-validation fold (written as splits_final.json)


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
        if is_self_supervised(cfg, task):
            if entry.pseudo is not None:
                raise Med3DError(f"data.datasets.{task}.pseudo: pseudo-labels train a segmentation head, and task "
                                 f"{task} has a self-supervised '{heads[task].type}' head; remove the entry")
            _check_unlabelled(cfg, task)
            continue
        for key in ("images", "modality"):
            if getattr(entry, key) is not None:
                raise Med3DError(f"data.datasets.{task}.{key}: only self-supervised tasks (restore, contrastive "
                                 f"heads) read unlabelled images; task {task} has a '{heads[task].type}' head")
        _check_kind(task, entry.path, heads[task].type)
        if entry.pseudo is not None:
            _check_pseudo(cfg, task)
        if entry.descriptor and not Path(entry.descriptor).is_file():
            raise Med3DError(f"data.datasets.{task}.descriptor: {entry.descriptor} not found")
    for task in heads:
        if task not in datasets:
            raise Med3DError(f"model.heads.{task}: no dataset for this head in data.datasets; add one or drop the head")


def _check_pseudo(cfg: Config, task: str) -> None:
    """Pseudo-labels join a segmentation task, from a folder that exists."""
    entry = cfg.data.datasets[task]
    if is_classification(cfg, task):
        raise Med3DError(f"data.datasets.{task}.pseudo: pseudo-labels are label maps and task {task} is a "
                         "classification task; remove the entry")
    if not Path(entry.pseudo.path).is_dir():
        raise Med3DError(f"data.datasets.{task}.pseudo.path: {entry.pseudo.path} not found; write it with "
                         "'med3d pseudo-label CHECKPOINT SCANS... --out FOLDER'")


def is_classification(cfg: Config, task: str) -> bool:
    """Whether ``task``'s head is trained as an image-level classifier."""
    return kind_for_head(cfg.model.heads[task].type, f"model.heads.{task}.type").name == "classification"


def is_self_supervised(cfg: Config, task: str) -> bool:
    """Whether ``task``'s head learns from unlabelled images (``restore``, ``contrastive``)."""
    return kind_for_head(cfg.model.heads[task].type, f"model.heads.{task}.type").name in SELF_SUPERVISED


def _check_unlabelled(cfg: Config, task: str) -> None:
    """A self-supervised task's dataset is a folder of images or a segmentation dataset folder (the config
    loader has checked the ranges of ``data.restore`` and ``train.contrastive_temperature``).

    Raises:
        Med3DError: naming the key at fault.
    """
    path = cfg.data.datasets[task].path
    if is_classification_dataset(path) or not Path(path).is_dir():
        raise Med3DError(f"data.datasets.{task}.path: {path} is not a folder of images or a segmentation dataset "
                         "folder; a self-supervised task learns from unlabelled 3D images")


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
    if k > len(train):  # e.g. a study size above a small fold's training set: same run as "all cases"
        log.warning("task %s: data.train_cases %s is more than its %d training cases; training on all of them",
                    task, limit, len(train))
    return train[:k]


def uses_folds(cfg: Config) -> bool:
    """Whether the run trains one cross-validation fold (``data.folds``, ``data.fold`` or ``data.splits_file``)."""
    d = cfg.data
    return d.folds is not None or d.fold is not None or d.splits_file is not None


def check_split_keys(cfg: Config) -> None:
    """The split keys fit together, and the run will have validation cases unless ``validation.allow_none``.

    Raises:
        Med3DError: naming the key at fault.
    """
    d = cfg.data
    named = d.val_cases is not None
    if (uses_folds(cfg) or named) and len(d.datasets) != 1:
        key = "data.val_cases" if named else "data.folds / data.fold / data.splits_file"
        raise Med3DError(f"{key}: cross-validation and named validation cases split one dataset, but "
                         f"data.datasets has {len(d.datasets)}; train one task, or use data.val_fraction")
    if uses_folds(cfg) and named:
        raise Med3DError("data.val_cases and cross-validation (data.folds / data.fold / data.splits_file) both "
                         "choose the validation cases; keep one")
    if d.folds is not None and d.splits_file is not None:
        raise Med3DError("data.folds and data.splits_file both define the folds; keep one (the file's folds count)")
    if d.folds is not None and d.folds < 2:
        raise Med3DError(f"data.folds {d.folds}: cross-validation needs at least 2 folds")
    if uses_folds(cfg) and d.fold is None:
        raise Med3DError("data.folds / data.splits_file is set but data.fold is not; pick the fold to train "
                         "(data.fold, or med3d finetune --fold N / --folds all)")
    k = None if d.splits_file else d.folds or DEFAULT_FOLDS  # a splits file's count is known when it is read
    if d.fold is not None and (d.fold < 0 or (k is not None and d.fold >= k)):
        raise Med3DError(f"data.fold {d.fold}: folds are numbered 0..{(k or DEFAULT_FOLDS) - 1}")
    if named and not d.val_cases and not cfg.validation.allow_none:
        raise Med3DError("data.val_cases is empty: the run would have no validation case; name some, or set "
                         "validation.allow_none: true to train without validation")
    # A classification dataset may bring its own validation split (MedMNIST); check_validation sees to it.
    own_split = any(is_classification(cfg, t) for t in d.datasets if t in cfg.model.heads)
    if not (uses_folds(cfg) or named or own_split) and d.val_fraction <= 0 and not cfg.validation.allow_none:
        raise Med3DError(f"data.val_fraction is {d.val_fraction}: the run would have no validation case; hold "
                         "some out (data.val_fraction, data.val_cases or data.folds), or set "
                         "validation.allow_none: true to train without validation")


def _fold_split(cases: List[Any], cfg: Config, task: str, stratify: bool):
    """Training and validation cases of fold ``data.fold``, and every fold.

    Raises:
        Med3DError: the fold does not exist in the splits file.
    """
    d, path = cfg.data, cfg.data.datasets[task].path
    ids = [c.case_id for c in cases]
    groups = read_groups(path)
    if d.splits_file:
        folds = read_splits(d.splits_file, ids)
        how = f"fold {d.fold} of {len(folds)} from {d.splits_file}"
    else:
        labels = {c.case_id: c.label for c in cases} if stratify else None
        folds = make_folds(ids, d.folds or DEFAULT_FOLDS, cfg.run.seed, groups, labels)
        how = (f"fold {d.fold} of {len(folds)} (seed {cfg.run.seed}" + (", stratified by class" if stratify else "")
               + (f", grouped by the {len(set(groups.values()))} declared patients/groups" if groups else "") + ")")
    if d.fold >= len(folds):  # only a splits file can have fewer folds than asked (check_split_keys)
        raise Med3DError(f"data.fold {d.fold}: {d.splits_file} has {len(folds)} folds (0..{len(folds) - 1})")
    fold = folds[d.fold]
    shared = groups_on_both_sides(fold, groups)
    if shared:
        log.warning("task %s: patient/group %s has cases in both training and validation of %s", task, shared[0], how)
    by_id = {c.case_id: c for c in cases}
    return [by_id[i] for i in fold["train"]], [by_id[i] for i in fold["val"]], how, folds


def _named_split(cases: List[Any], cfg: Config, task: str):
    """``data.val_cases`` validate, every other case trains.

    Raises:
        Med3DError: a named case is not a training case of the dataset.
    """
    names = list(dict.fromkeys(cfg.data.val_cases or []))
    ids = {c.case_id for c in cases}
    unknown = [n for n in names if n not in ids]
    if unknown:
        raise Med3DError(f"data.val_cases: '{unknown[0]}' is not a training case of task {task} "
                         f"({cfg.data.datasets[task].path}); name cases by their id (e.g. {sorted(ids)[0]})")
    chosen = set(names)
    val = [c for c in cases if c.case_id in chosen]
    return [c for c in cases if c.case_id not in chosen], val, f"data.val_cases ({len(val)} named cases)"


def choose_split(cases: List[Any], cfg: Config, task: str, classify: bool, own_val: Optional[List[Any]] = None):
    """A task's training and validation cases, and how they were chosen.

    The validation cases come from, in order: the cross-validation fold, ``data.val_cases``, the dataset's
    own validation split (``own_val``), or a seeded ``data.val_fraction`` hold-out. The training cases
    are then put in a seeded order (classes interleaved for classification) and cut to ``data.train_cases``,
    so a smaller training set is part of a larger one.

    Returns:
        ``(train, val, how, folds)``; ``folds`` is None unless cross-validating.
    """
    reorder = _class_split if classify else _split
    no_hold_out = replace(cfg, data=replace(cfg.data, val_fraction=0.0))
    folds = None
    if uses_folds(cfg):
        train, val, how, folds = _fold_split(cases, cfg, task, stratify=classify)
    elif cfg.data.val_cases is not None:
        train, val, how = _named_split(cases, cfg, task)
    elif own_val:
        train, val, how = cases, own_val, "the dataset's own validation cases"
    else:
        train, val = reorder(cases, cfg, task)
        return train, val, f"data.val_fraction {cfg.data.val_fraction} (seed {cfg.run.seed})", None
    return reorder(train, no_hold_out, task)[0], val, how, folds


def split_record(train: List[Any], val: List[Any], how: str) -> Dict[str, Any]:
    """What ``split.json`` says about one task."""
    return {"how": how, "train": [c.case_id for c in train], "val": [c.case_id for c in val]}


def check_validation(cfg: Config, val: Dict[str, List[Any]]) -> None:
    """Refuse a run in which a task has no validation case, unless ``validation.allow_none``.

    Raises:
        Med3DError: naming the task and the keys that give it validation cases.
    """
    empty = [t for t, cases in val.items() if not cases]
    if empty and not cfg.validation.allow_none:
        raise Med3DError(f"task {empty[0]} has no validation case; hold some out (data.val_fraction, data.val_cases "
                         "or data.folds), or set validation.allow_none: true to train without validation")


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
        if is_self_supervised(cfg, task):
            folders[task] = prepare_unlabelled(entry, cfg.data.cache_dir, cfg.data.workers, progress, cfg.data.check,
                                               f"data.datasets.{task}") if prepare \
                else check_unlabelled(entry, cfg.data.cache_dir)
            continue
        overrides = dict(descriptor=entry.descriptor, spacing=entry.spacing, normalization=entry.normalization,
                         label_map=entry.label_map, ct_window=entry.ct_window)
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


def _class_task(cfg: Config, task: str, folder: Path, setup: DataSetup) -> TaskData:
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
    own = load_class_cache(folder, [c.case_id for c in ds.val_cases])[1] if ds.val_cases else None
    train, held, how, folds = choose_split(cases, cfg, task, classify=True, own_val=own)
    setup.splits[task] = split_record(train, held, how)
    setup.folds = folds
    missing = sorted(set(range(n_cls)) - {c.label for c in held})
    if held and missing:
        log.warning("task %s: no held-out case of class(es) %s, so its AUC is undefined; raise data.val_fraction "
                    "(or, cross-validating, use fewer data.folds)",
                    task, ", ".join(plan["classes"][str(m)] for m in missing))
    channels = setup.channels
    channels[task] = _channels(cfg, task, len(plan["channel_names"]))
    if channels[task] is None and len(plan["channel_names"]) != cfg.model.encoder.in_channels:
        setup.adapters[task] = len(plan["channel_names"])
    setup.plans[task] = {**plan, "channels": channels[task]}
    setup.val[task] = held
    return TaskData(task, train, plan, channels[task], entry.loss_weight, kind="classification",
                    class_balance=cfg.data.class_balance)


def _ssl_task(cfg: Config, task: str, folder: Path, setup: DataSetup, world: int) -> TaskData:
    """One self-supervised task: its unlabelled cached scans, split like a segmentation dataset's.

    Raises:
        Med3DError: a restore head's channels do not match the task's input, or a contrastive task's
            micro-batch holds fewer than two scans (it would have no negatives).
    """
    entry, head = cfg.data.datasets[task], cfg.model.heads[task]
    plan, cases = load_cache(folder, case_ids(entry))
    n_ch = len(plan["channel_names"])
    chosen = _channels(cfg, task, n_ch)
    if chosen is None and n_ch != cfg.model.encoder.in_channels:
        setup.adapters[task] = n_ch
    fed = len(chosen) if chosen is not None else n_ch
    if head.type == "restore" and head.num_classes != fed:
        raise Med3DError(f"model.heads.{task}.num_classes is {head.num_classes} but a restore head reconstructs "
                         f"the {fed} channel(s) task {task} feeds; set it to {fed}")
    micro = cfg.train.batch_size / (world * cfg.train.accumulate)
    if head.type == "contrastive" and micro < 2:
        raise Med3DError(f"task {task}: a contrastive task compares the scans of a micro-batch, but train.batch_size "
                         f"{cfg.train.batch_size} over {world} rank(s) x {cfg.train.accumulate} accumulation step(s) "
                         "gives fewer than 2; raise train.batch_size")
    if head.type == "contrastive" and head.num_classes < 16:
        log.warning("model.heads.%s.num_classes is %d: a contrastive projection that small separates few scans; "
                    "128 is usual", task, head.num_classes)
    train, held, how, setup.folds = choose_split(cases, cfg, task, classify=False)
    setup.splits[task] = split_record(train, held, how)
    setup.channels[task] = chosen
    kind = kind_for_head(head.type, f"model.heads.{task}.type").name
    setup.plans[task] = {**plan, "channels": chosen, "kind": kind}  # tells later tools this head is no predictor
    setup.val[task] = held
    rates = CorruptionRates(**dataclasses.asdict(cfg.data.restore))
    return TaskData(task, train, plan, chosen, entry.loss_weight, kind=kind, corruption=rates)


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
    setup = DataSetup([], {}, {}, {}, {})
    tasks, val, plans, channels, adapters = setup.tasks, setup.val, setup.plans, setup.channels, setup.adapters
    for task, entry in cfg.data.datasets.items():
        if is_classification(cfg, task):
            tasks.append(_class_task(cfg, task, folders[task], setup))
            continue
        if is_self_supervised(cfg, task):
            tasks.append(_ssl_task(cfg, task, folders[task], setup, info.world))
            continue
        info_ds = read_dataset(entry.path)
        plan, cases = load_cache(folders[task], [c.case_id for c in info_ds.cases])
        n_labels = len(plan["labels"])
        if cfg.model.heads[task].num_classes != n_labels:
            raise Med3DError(f"model.heads.{task}.num_classes is {cfg.model.heads[task].num_classes} but dataset "
                             f"{entry.path} declares {n_labels} labels (with background)")
        n_ch = len(plan["channel_names"])
        channels[task] = _channels(cfg, task, n_ch)
        if channels[task] is None and n_ch != cfg.model.encoder.in_channels:
            adapters[task] = n_ch
        train, held, how, setup.folds = choose_split(cases, cfg, task, classify=False)
        setup.splits[task] = split_record(train, held, how)
        plans[task] = {**plan, "channels": channels[task]}
        tasks.append(TaskData(task, train, plan, channels[task], entry.loss_weight))
        val[task] = held
        if entry.pseudo is not None:
            tasks.append(_pseudo_task(cfg, task, folders[task], info_ds, setup, prepare=info.world == 1,
                                      progress=progress and info.is_main))
    check_validation(cfg, val)
    return setup


def pseudo_name(task: str) -> str:
    """The name of a task's pseudo-labelled batches (in logs and ``split.json``); they train ``task``'s head."""
    return f"{task}:pseudo"


def prepare_pseudo(cfg: Config, task: str, labelled: Path, prepare: bool, progress: bool,
                   pset: Optional[PseudoSet] = None) -> Path:
    """The cache folder of ``task``'s pseudo-labelled scans, under the plan of its labelled cache ``labelled``.

    Args:
        cfg: the run's config (``data.datasets.<task>.pseudo``).
        task: a segmentation task with a ``pseudo`` entry.
        labelled: the labelled dataset's cache folder.
        prepare: prepare missing cases (False: DDP ranks only check).
        progress: show a progress bar.
        pset: the pseudo-labelled set already read (None: read it from the config's path).

    Returns:
        The folder.

    Raises:
        Med3DError: a bad pseudo-label folder, other classes than the task's, or a case that fails.
    """
    entry, where = cfg.data.datasets[task].pseudo, f"data.datasets.{task}.pseudo.path"
    pset = pset or read_pseudo_set(entry.path, where)
    plan = json.loads((labelled / "plan.json").read_text())
    return pseudo_cache(pset, plan, entry.threshold, cfg.data.cache_dir, cfg.data.workers, progress, where, prepare,
                        also_ignored=cfg.train.ignore_label)


def _pseudo_task(cfg: Config, task: str, labelled: Path, info: DatasetInfo, setup: DataSetup, prepare: bool,
                 progress: bool) -> TaskData:
    """A segmentation task's pseudo-labelled scans as a task of their own that trains ``task``'s head.

    Every scan trains (validation stays on the labelled cases, of the labelled dataset ``info``), with the
    pseudo entry's loss weight and the student's augmentation; voxels under the confidence threshold carry
    ``IGNORE``. The leak checks come before any preprocessing.

    Raises:
        Med3DError: a pseudo-labelled scan is one of the task's validation scans, or the teacher trained on one
            of them (the score would be measured on what the student learnt from); or what
            ``prepare_pseudo`` raises.
    """
    entry = cfg.data.datasets[task]
    pseudo = entry.pseudo
    pset = read_pseudo_set(pseudo.path, f"data.datasets.{task}.pseudo.path")
    held = set(setup.splits[task]["val"])
    leaked = shared_scans(pset, [img for c in info.cases if c.case_id in held for img in c.images[:1]])
    if leaked:
        raise Med3DError(f"data.datasets.{task}.pseudo.path: pseudo-labelled scan {leaked[0]} is a validation case "
                         f"of task {task}; its score would be measured on a scan the student trained on. "
                         "Pseudo-label only scans outside the validation split")
    taught = teacher_saw(pset, entry.path, held)
    if taught:
        raise Med3DError(f"data.datasets.{task}.pseudo.path: the teacher of {pseudo.path} trained on {taught[0]}, a "
                         f"validation case of task {task} here (another fold or split); the student would learn its "
                         "labels through the teacher. Pseudo-label with a teacher trained on this split's training "
                         "cases")
    folder = prepare_pseudo(cfg, task, labelled, prepare, progress, pset)  # after the checks: no work in vain
    plan, cases = load_cache(folder, [c.case_id for c in pset.cases])
    name = pseudo_name(task)
    setup.splits[name] = {"how": f"every scan of {pseudo.path} (threshold {pseudo.threshold})",
                          "train": [c.case_id for c in cases], "val": [], "pseudo": True}
    kept = [c.props.get("trained_share", 1.0) for c in cases]
    log.info("task %s: %d pseudo-labelled scan(s), %.1f%% of their voxels at confidence >= %g", task, len(cases),
             100 * float(np.mean(kept)), pseudo.threshold)
    return TaskData(name, cases, plan, setup.channels[task], entry.loss_weight * pseudo.loss_weight,
                    head=task, augment=pseudo.student_augment(cfg.data.augment), ignore_label=IGNORE)
