"""``med3d prepare``: preprocess every case once into an on-disk cache.

Layout, one folder per dataset::

    CACHE/<name>-<hash>/plan.json           the plan (fingerprint inside), its hash
    CACHE/<name>-<hash>/cases/<id>_data.npy float32 (C, Z, Y, X) on the plan grid
    CACHE/<name>-<hash>/cases/<id>_seg.npy  int8/int16 (1, Z, Y, X)
    CACHE/<name>-<hash>/cases/<id>_locs.npz per-class voxel coordinates, for foreground sampling
    CACHE/<name>-<hash>/cases/<id>.json     properties: original geometry, crop box, plan hash
    CACHE/<name>-<hash>/manifest.json       the finished cases

``cache_folder`` alone names a dataset's folder (``<name>-<hash>``: the resolved folder's name and
a hash of its resolved path), so a symlink and its target share one cache and two datasets with
the same folder name in different places never do.

Every file is written atomically and a case's ``.json`` is written last, so it marks a case
complete: a run killed mid-case leaves at most a temp file, never a case that looks done.
Re-running skips cases whose ``.json`` carries the current plan hash and source file stamps;
a changed plan (of the fields that change the arrays) redoes only that dataset's cases.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import Med3DError
from ..atomic import write_atomic, write_json_atomic
from ..workers import map_cases
from .check import require_valid
from .datalist import Case, DatasetInfo, read_dataset
from .image import read_channels
from .plan import (case_seed, case_fingerprint, dataset_fingerprint, find_descriptor, label_numbering_problem,
                   load_descriptor, make_plan, plan_hash)
from .preprocess import preprocess

log = logging.getLogger("med3d.data")

PathLike = Union[str, Path]
MAX_LOCS_PER_CLASS = 10000


def source_stamp(paths: Sequence[Path]) -> List[List[Any]]:
    """Size and mtime of the source files: a replaced file invalidates its cached case."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _case_sources(case: Case) -> List[Path]:
    return [*case.images, *([case.label] if case.label else [])]


def cache_folder(cache_dir: PathLike, dataset_root: PathLike) -> Path:
    """The one cache folder of the dataset at ``dataset_root`` (``prepare`` and training both use this).

    Args:
        cache_dir: the cache root (``--cache`` / ``data.cache_dir``).
        dataset_root: the raw dataset folder, possibly through a symlink.

    Returns:
        ``cache_dir/<resolved folder name>-<8 hex digits of the resolved path's hash>``.
    """
    real = Path(dataset_root).resolve()
    return Path(cache_dir) / f"{real.name}-{hashlib.sha256(str(real).encode()).hexdigest()[:8]}"


def case_files(folder: Path, case_id: str) -> Dict[str, Path]:
    base = folder / "cases"
    return {"data": base / f"{case_id}_data.npy", "seg": base / f"{case_id}_seg.npy",
            "locs": base / f"{case_id}_locs.npz", "props": base / f"{case_id}.json"}


def is_done(folder: Path, case: Case, phash: str) -> bool:
    """Whether ``case`` is cached completely under the plan with hash ``phash``."""
    return case_done(folder, case.case_id, _case_sources(case), phash)


def case_done(folder: Path, case_id: str, sources: Sequence[Path], phash: str) -> bool:
    """Whether case ``case_id`` is cached completely in ``folder`` under plan hash ``phash``, from ``sources`` as
    they are now (their sizes and mtimes)."""
    files = case_files(folder, case_id)
    if not files["props"].is_file():
        return False
    try:
        props = json.loads(files["props"].read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (props.get("plan_hash") == phash and props.get("sources") == source_stamp(sources)
            and all(files[k].is_file() for k in ("data", "seg", "locs")))


def class_locations(seg: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    """Up to ``MAX_LOCS_PER_CLASS`` voxel coordinates (Z, Y, X) of every label present (excluding 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    flat = seg.reshape(-1)
    for value in np.unique(flat):
        if value <= 0:
            continue
        idx = np.flatnonzero(flat == value)
        if idx.size > MAX_LOCS_PER_CLASS:
            idx = np.sort(rng.choice(idx, MAX_LOCS_PER_CLASS, replace=False))
        out[str(int(value))] = np.stack(np.unravel_index(idx, seg.shape), axis=1).astype(np.int32)
    return out


def training_label(case: Case, n_labels: int) -> np.ndarray:
    """The case's label map as training values 0..``n_labels``-1, or one line naming the file and the bad value.

    The file is read as stored and only then narrowed: a cast first would wrap a value such as
    40000 into int16's range (-25536) and a label map would miss it. This check runs in ``prepare``
    itself, so a dataset prepared with ``data.check: false`` cannot reach training with a label value
    the network has no output for (that fails the loss at step 1, or on a GPU asserts in CUDA).

    Args:
        case: the case (its label map, if any, is applied).
        n_labels: the number of classes, background included; the declared labels are 0..n_labels-1.

    Returns:
        The label array, int16.

    Raises:
        Med3DError: a value that is not an integer in 0..n_labels-1, naming the file and the value.
    """
    arr = case.read_label(None).array  # as stored, through the dataset's label map
    if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr))):
        raise Med3DError(f"{case.label}: label values are not integers; a label map holds whole class numbers")
    if arr.size and (arr.min() < 0 or arr.max() >= n_labels):
        bad = np.unique(arr[(arr < 0) | (arr >= n_labels)])
        mapped = " after the label_map" if case.label_map is not None else ""
        raise Med3DError(f"{case.label}: label value(s) {[int(v) for v in bad[:8]]} outside the declared labels "
                         f"0..{n_labels - 1}{mapped}; declare them in dataset.json 'labels' or map them with a "
                         "label_map (data.datasets.<task>.label_map)")
    return arr.astype(np.int16)


def prepare_case(case: Case, plan: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """Preprocess one case into the cache; returns its properties.

    Everything written depends on the case and the plan only (the foreground sample is seeded by
    the case id), so a resumed ``prepare`` writes the same bytes as a fresh one.
    """
    image = read_channels(case.images)
    label = training_label(case, len(plan["labels"])) if case.label else None
    data, seg, props = preprocess(image, label, plan)
    seg = seg if seg is not None else np.zeros((1, *data.shape[1:]), np.int16)
    props.update(plan_hash=plan_hash(plan), sources=source_stamp(_case_sources(case)))
    return write_case(folder, case.case_id, data, seg, props)


def write_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray, props: Dict[str, Any]
               ) -> Dict[str, Any]:
    """Write one preprocessed case: its arrays, foreground locations and, last, its properties.

    Args:
        folder: the dataset's cache folder.
        case_id: the case.
        data: float32 ``(C, Z, Y, X)``.
        seg: integer ``(1, Z, Y, X)``, values below 127 stored as int8 (negative values: never sampling centres).
        props: what ``preprocess`` recorded plus the plan hash and source stamps; completed here.

    Returns:
        ``props`` with the case id, present classes and shape.
    """
    files = case_files(folder, case_id)
    write_atomic(files["data"], lambda tmp: np.save(tmp, data))
    seg = seg.astype(np.int8 if seg.max() < 127 else np.int16)
    write_atomic(files["seg"], lambda tmp: np.save(tmp, seg))
    locs = class_locations(seg[0], case_seed(case_id))
    write_atomic(files["locs"], lambda tmp: np.savez(tmp, **locs))
    props.update(case_id=case_id, classes=sorted(int(k) for k in locs), shape=list(data.shape[1:]))
    write_json_atomic(files["props"], props)  # last: marks the case complete
    return props


def _prepare_one(args) -> Tuple[str, Optional[str]]:
    case, plan, folder = args
    try:
        prepare_case(case, plan, folder)
        return case.case_id, None
    except Med3DError as err:
        return case.case_id, str(err)


def _fingerprint_one(case: Case) -> Dict[str, Any]:
    return case_fingerprint(case)


@dataclass
class PrepareResult:
    folder: Path
    plan: Dict[str, Any]
    done: int
    skipped: int
    failed: List[str]


def _map_key(info: DatasetInfo) -> Optional[Dict[str, int]]:
    return {str(k): v for k, v in info.label_map.items()} if info.label_map else None


def plan_dataset(info: DatasetInfo, folder: Path, workers: int = 0, progress: bool = False,
                 descriptor: Optional[PathLike] = None, spacing: Optional[Sequence[float]] = None,
                 normalization: Optional[Sequence[str]] = None, read_only: bool = False,
                 ct_window: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """Fingerprint (reused when its sources are unchanged) and plan for one dataset.

    With ``read_only`` nothing is computed or written: a missing or stale fingerprint is an error
    (DDP ranks check a cache that ``prepare`` wrote before they started).
    """
    stamps = {c.case_id: source_stamp(_case_sources(c)) for c in info.cases}
    fp_path = folder / "fingerprint.json"
    fp = None
    if fp_path.is_file():
        old = json.loads(fp_path.read_text())
        # The label map decides which voxels are foreground: another map, another fingerprint.
        if old.get("sources") == stamps and old.get("label_map") == _map_key(info):
            fp = old
    if fp is None and read_only:
        raise Med3DError(f"dataset {info.root}: not prepared in {folder.parent}, or changed since; run "
                         "'med3d prepare --config CONFIG' (the training config) before starting the ranks")
    if fp is None:
        per_case = map_cases(_fingerprint_one, info.cases, workers, f"fingerprint {info.name}", progress)
        fp = dataset_fingerprint(info, per_case)
        fp["sources"], fp["label_map"] = stamps, _map_key(info)
        write_json_atomic(fp_path, fp)
    desc_path = Path(descriptor) if descriptor else find_descriptor(info.name)
    desc = load_descriptor(desc_path) if desc_path else None
    plan = make_plan(info, fp, desc, spacing, normalization, ct_window)
    if not read_only:  # said where the plan is made, not again on every DDP rank that checks it
        for line in plan["warnings"]:
            log.warning("warning: %s", line)
    plan["descriptor"] = str(desc_path) if desc_path else None
    plan["fingerprint"] = {k: v for k, v in fp.items() if k != "sources"}
    return plan


def prepare_dataset(root: PathLike, cache_dir: PathLike, workers: int = 0, progress: bool = True,
                    descriptor: Optional[PathLike] = None, spacing: Optional[Sequence[float]] = None,
                    normalization: Optional[Sequence[str]] = None, check: bool = True,
                    label_map: Optional[Dict[str, Any]] = None,
                    ct_window: Optional[Sequence[float]] = None) -> PrepareResult:
    """Check, plan and preprocess one dataset into ``cache_folder(cache_dir, root)`` (resumable, idempotent).

    ``label_map`` (name -> label file value(s)) replaces dataset.json's; ``ct_window`` is a fixed HU window.
    """
    info = read_dataset(root, label_map)
    if check:
        require_valid(info, workers)
    numbering = label_numbering_problem(info)  # before any case is read, also with check off
    if numbering:
        raise Med3DError(numbering)
    folder = cache_folder(cache_dir, root)
    plan = plan_dataset(info, folder, workers, progress, descriptor, spacing, normalization, ct_window=ct_window)
    todo, failed = cache_cases(info, folder, plan, root, workers, progress, f"prepare {info.name}")
    return PrepareResult(folder, plan, todo - len(failed), len(info.cases) - todo, failed)


def cache_cases(info: DatasetInfo, folder: Path, plan: Dict[str, Any], root: PathLike, workers: int,
                progress: bool, desc: str, **manifest: Any) -> Tuple[int, List[str]]:
    """Preprocess the cases of ``info`` not yet cached under ``plan``, then write ``plan.json`` and ``manifest.json``.

    Args:
        info: the dataset as read.
        folder: its cache folder.
        plan: its plan.
        root: the dataset folder (recorded in the manifest).
        workers: worker processes (see ``workers.worth_a_pool``).
        progress: show a progress bar.
        desc: the progress bar's label.
        **manifest: further manifest entries (e.g. the kind of an unlabelled dataset).

    Returns:
        How many cases were to be prepared, and ``"case: error"`` for each that failed.
    """
    phash = plan_hash(plan)
    write_json_atomic(folder / "plan.json", {**plan, "plan_hash": phash})
    todo = [c for c in info.cases if not is_done(folder, c, phash)]
    results = map_cases(_prepare_one, [(c, plan, folder) for c in todo], workers, desc, progress)
    failed = [f"{cid}: {err}" for cid, err in results if err]
    done_ids = [c.case_id for c in info.cases if is_done(folder, c, phash)]
    write_json_atomic(folder / "manifest.json", {"dataset": info.name, "root": str(Path(root).resolve()), **manifest,
                                                 "plan_hash": phash, "cases": done_ids,
                                                 "num_channels": info.num_channels, "labels": plan["labels"]})
    return len(todo), failed


def check_prepared(root: PathLike, cache_dir: PathLike, descriptor: Optional[PathLike] = None,
                   spacing: Optional[Sequence[float]] = None,
                   normalization: Optional[Sequence[str]] = None, label_map: Optional[Dict[str, Any]] = None,
                   ct_window: Optional[Sequence[float]] = None) -> Path:
    """The cache folder of a dataset that is fully prepared under its current plan; writes nothing.

    Args:
        root, cache_dir, descriptor, spacing, normalization: as for ``prepare_dataset``.

    Returns:
        The dataset's cache folder.

    Raises:
        Med3DError: the cache is missing, stale, or lacks a case; the message says what to run.
    """
    info = read_dataset(root, label_map)
    return require_prepared(info, cache_folder(cache_dir, root), f"dataset {root}", descriptor=descriptor,
                            spacing=spacing, normalization=normalization, ct_window=ct_window)


def require_prepared(info: DatasetInfo, folder: Path, what: str, **plan_args: Any) -> Path:
    """``folder`` when every case of ``info`` is cached there under its current plan; writes nothing.

    Args:
        info: the dataset as read.
        folder: its cache folder.
        what: how the message names the dataset.
        **plan_args: ``plan_dataset``'s keyword arguments (descriptor, spacing, normalization, ct_window).

    Returns:
        ``folder``.

    Raises:
        Med3DError: a case is missing or stale; the message says what to run.
    """
    phash = plan_hash(plan_dataset(info, folder, read_only=True, **plan_args))
    missing = [c.case_id for c in info.cases if not is_done(folder, c, phash)]
    if missing:
        raise Med3DError(f"{what}: {len(missing)} case(s) not prepared under the current plan in {folder.parent} "
                         f"(first: {missing[0]}); run 'med3d prepare --config CONFIG' (the training config) before "
                         "starting the ranks")
    return folder


@dataclass
class CachedCase:
    case_id: str
    data: Path
    seg: Path
    locs: Path
    props: Dict[str, Any]


def load_cache(folder: PathLike, case_ids: Optional[Sequence[str]] = None) -> Tuple[Dict[str, Any], List[CachedCase]]:
    """Plan and complete cases of one prepared dataset (cases not marked complete are not returned).

    Args:
        folder: the dataset's cache folder (``cache_folder``).
        case_ids: only these cases (the dataset's current list; cases since removed from it stay
            out); None: the cases of the last ``prepare`` (its manifest), or every complete case in
            a folder without one.

    Returns:
        The plan and the cases, by case id.

    Raises:
        Med3DError: no plan or no complete case in the folder.
    """
    folder = Path(folder)
    plan_path = folder / "plan.json"
    if not plan_path.is_file():
        raise Med3DError(f"{folder}: no prepared cache here; run 'med3d prepare' on the dataset first")
    plan = json.loads(plan_path.read_text())
    manifest = folder / "manifest.json"
    if case_ids is None and manifest.is_file():  # the cases dataset.json declared at the last prepare
        case_ids = json.loads(manifest.read_text()).get("cases")
    wanted = set(case_ids) if case_ids is not None else None
    cases = []
    for props_path in sorted((folder / "cases").glob("*.json")):
        props = json.loads(props_path.read_text())
        if props.get("plan_hash") != plan["plan_hash"] or (wanted is not None and props["case_id"] not in wanted):
            continue
        files = case_files(folder, props["case_id"])
        cases.append(CachedCase(props["case_id"], files["data"], files["seg"], files["locs"], props))
    if not cases:
        raise Med3DError(f"{folder}: the cache holds no complete case; run 'med3d prepare' again")
    return plan, cases
