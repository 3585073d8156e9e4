"""Cross-validation splits: k folds of one dataset's training cases, in nnU-Net's ``splits_final.json`` shape.

A splits file is a JSON list with one ``{"train": [case ids], "val": [case ids]}`` entry per fold.
``make_folds`` draws one: cases of one patient (or site, or any group) always land in the same fold,
so no patient is on both sides of a fold, and for classification the classes are spread evenly over
the folds. The draw depends only on the case ids, their groups and classes, and the seed.

Where a dataset declares groups (``read_groups``):

* ``dataset.json`` with a top-level ``"groups": {case id: group}`` mapping (any layout);
* ``dataset.json`` ``"training"`` entries (Decathlon layout, segmentation or classification) with a
  ``"patient"`` or ``"group"`` key;
* nnU-Net's ``dataset.json`` ``"dataset": {case id: {..., "patient": ...}}`` entries;
* a classification CSV with a ``patient`` or ``group`` column.

A case without a declared group is a group of its own.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from ..atomic import write_json_atomic
from ..errors import Med3DError
from .image import strip_suffix

log = logging.getLogger("med3d.data")
PathLike = Union[str, Path]
Fold = Dict[str, List[str]]
GROUP_KEYS = ("patient", "group")
DEFAULT_FOLDS = 5  # nnU-Net's default


def _entry_group(entry: object) -> Optional[str]:
    if not isinstance(entry, dict):
        return None
    for key in GROUP_KEYS:
        if entry.get(key) is not None:
            return str(entry[key])
    return None


def _json_groups(path: Path) -> Dict[str, str]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Med3DError(f"{path}: not valid JSON ({err}); fix the file")
    if not isinstance(meta, dict):
        return {}
    groups: Dict[str, str] = {}
    for entry in meta.get("training") or []:
        group = _entry_group(entry)
        image = entry.get("image") if isinstance(entry, dict) else None
        image = image[0] if isinstance(image, list) and image else image
        if group is not None and isinstance(image, str):
            groups[strip_suffix(image)] = group
    nnunet = meta.get("dataset") or {}
    for cid, entry in (nnunet.items() if isinstance(nnunet, dict) else ()):
        group = _entry_group(entry)
        if group is not None:
            groups[str(cid)] = group
    declared = meta.get("groups")
    if declared is not None and not isinstance(declared, dict):
        raise Med3DError(f"{path}: 'groups' must map case ids to patient or group ids")
    groups.update({str(k): str(v) for k, v in (declared or {}).items()})
    return groups


def _csv_groups(path: Path) -> Dict[str, str]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
        key = next((header[k] for k in GROUP_KEYS if k in header), None)
        if key is None or "image" not in header:
            return {}
        groups = {}
        for row in reader:
            image, group = (row.get(header["image"]) or "").strip(), (row.get(key) or "").strip()
            if image and group:
                groups[strip_suffix(image.split(";")[0].strip())] = group
    return groups


def read_groups(path: PathLike) -> Dict[str, str]:
    """The patient (or site) each training case belongs to, where the dataset declares it.

    Args:
        path: a dataset folder or its ``dataset.json``, a classification CSV, or a ``.npz`` (no groups).

    Returns:
        ``{case id: group id}`` for the cases that declare one (empty when none do).

    Raises:
        Med3DError: the dataset.json cannot be read, or its ``groups`` is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if path.name == "dataset.json" and path.is_file():
        return _json_groups(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _csv_groups(path)
    return {}


def make_folds(case_ids: Sequence[str], k: int, seed: int, groups: Optional[Mapping[str, str]] = None,
               labels: Optional[Mapping[str, int]] = None) -> List[Fold]:
    """``k`` folds: each group's cases in one fold, classes spread evenly, fold sizes balanced.

    Groups are shuffled with ``seed``, then placed largest first (among equal sizes, those holding the
    largest share of a class first), each into the fold where its classes are least represented so far
    (relative to each class's total), ties going to the smaller fold.
    Without ``labels`` this balances fold sizes alone.

    Args:
        case_ids: the dataset's training cases (their order does not matter).
        k: number of folds, at least 2 and at most the number of groups.
        seed: the draw's seed; the same inputs and seed give the same folds.
        groups: case id -> patient/group id; cases not in it are groups of their own.
        labels: case id -> class, to stratify by; None: no stratification.

    Returns:
        One ``{"train": [...], "val": [...]}`` per fold (ids sorted); every case is validated in exactly one.

    Raises:
        Med3DError: ``k`` is below 2 or above the number of groups.
    """
    groups = groups or {}
    members: Dict[str, List[str]] = {}
    for cid in sorted(set(case_ids)):
        # A case without a group stands alone; the prefix keeps it from joining a declared group's name.
        members.setdefault(f"patient {groups[cid]}" if cid in groups else f"case {cid}", []).append(cid)
    if k < 2 or k > len(members):
        raise Med3DError(f"data.folds {k}: cross-validation needs at least 2 folds and at most one per patient/"
                         f"group ({len(members)} here); choose k between 2 and {len(members)}")
    classes = sorted({labels[c] for c in case_ids}) if labels else [0]
    column = {c: i for i, c in enumerate(classes)}

    def counts(ids: List[str]) -> np.ndarray:
        out = np.zeros(len(classes))
        for cid in ids:
            out[column[labels[cid]] if labels else 0] += 1
        return out

    names = sorted(members)
    shuffled = [names[i] for i in np.random.default_rng([seed, 12]).permutation(len(names))]
    totals = counts(list(case_ids))
    # The hardest groups to place go first: the largest, then (among equal sizes) those holding most of
    # a rare class, so the later, easier ones can even out the folds. Stable: ties keep the shuffled order.
    order = sorted(shuffled, key=lambda g: (-len(members[g]), -float((counts(members[g]) / totals).max())))
    fill = np.zeros((k, len(classes)))
    val: List[List[str]] = [[] for _ in range(k)]
    for g in order:
        own = counts(members[g])
        cost = (fill / totals) @ own  # how much of this group's classes each fold already holds
        f = min(range(k), key=lambda i: (round(float(cost[i]), 12), len(val[i]), i))
        fill[f] += own
        val[f] += members[g]
    every = sorted(set(case_ids))
    return [{"train": [c for c in every if c not in v], "val": sorted(v)} for v in map(set, val)]


SPLITS_SHAPE = 'a JSON list of {"train": [case ids], "val": [case ids]}, one per fold'


def load_split_list(path: PathLike) -> List[Any]:
    """The folds of a ``splits_final.json`` as stored (a non-empty JSON list), not yet checked against a dataset.

    Raises:
        Med3DError: the file is missing, unreadable, not JSON or not a non-empty list.
    """
    path = Path(path)
    if not path.is_file():
        raise Med3DError(f"data.splits_file: {path} not found")
    try:
        folds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Med3DError(f"data.splits_file: {path} cannot be read as JSON ({err}); fix the file")
    if not isinstance(folds, list) or not folds:
        raise Med3DError(f"data.splits_file: {path} must be {SPLITS_SHAPE}")
    return folds


def read_splits(path: PathLike, case_ids: Sequence[str]) -> List[Fold]:
    """A user's ``splits_final.json``, checked against the dataset's cases.

    Args:
        path: the JSON list of ``{"train": [...], "val": [...]}``.
        case_ids: the dataset's training cases.

    Returns:
        The folds as written.

    Raises:
        Med3DError: the file is missing or malformed, names an unknown case, or a fold has a case on both sides.
    """
    path = Path(path)
    folds = load_split_list(path)
    known = set(case_ids)
    for i, fold in enumerate(folds):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(s), list) for s in ("train", "val")):
            raise Med3DError(f"data.splits_file: {path} fold {i} must have 'train' and 'val' lists ({SPLITS_SHAPE})")
        for side in ("train", "val"):
            unknown = [c for c in fold[side] if str(c) not in known]
            if unknown:
                raise Med3DError(f"data.splits_file: {path} fold {i} {side} names case '{unknown[0]}', which is not "
                                 "a training case of the dataset; fix the file or the dataset")
        both = sorted(set(map(str, fold["train"])) & set(map(str, fold["val"])))
        if both:
            raise Med3DError(f"data.splits_file: {path} fold {i} has case '{both[0]}' in both train and val")
    return [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]} for f in folds]


def groups_on_both_sides(fold: Fold, groups: Mapping[str, str]) -> List[str]:
    """Patients/groups with cases in both the training and the validation side of ``fold``.

    Returns:
        Their ids, sorted (empty for a clean split).
    """
    train = {groups[c] for c in fold["train"] if c in groups}
    return sorted(train & {groups[c] for c in fold["val"] if c in groups})


def write_splits(path: PathLike, folds: Sequence[Fold]) -> Path:
    """Write folds as ``splits_final.json`` (atomically).

    Args:
        path: the file to write.
        folds: one ``{"train", "val"}`` per fold.

    Returns:
        ``path``.
    """
    return write_json_atomic(Path(path), list(folds))
