"""A pseudo-labelled set (``med3d pseudo-label``'s folder) read and cached for a student's training.

The scans are preprocessed under the plan of the labelled task they join (its spacing, crop and
normalisation), never under a plan of their own: the head sees one kind of input. Each case's
confidence map is resampled with the image and every voxel whose confidence is below the threshold
gets the label ``IGNORE`` (-1), which the pseudo-labelled batches' loss leaves out of every term;
foreground sampling never centres a patch on such a voxel. The cache folder follows the layout of
``data.cache`` (so ``load_cache`` and the patch reader read it) and is named by a hash of the labelled
plan, the threshold, the teacher and its settings, and the stamps of every file listed: a new threshold,
plan or round is a new cache (and a resumed run refuses to continue on it), and two runs that differ in
them never write over each other's cases.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import write_json_atomic
from ..errors import Med3DError
from ..workers import map_cases
from .cache import case_done, source_stamp, write_case
from .image import read_channels, read_image
from .plan import crop
from .preprocess import new_shape, preprocess, resample_channel

IGNORE = -1  # the label of voxels under the confidence threshold
MANIFEST = "pseudo_labels.json"  # the same name as inference.pseudo.MANIFEST (data does not import inference)


@dataclass
class PseudoCase:
    case_id: str
    images: List[Path]
    series: Optional[str]
    label: Path
    confidence: Path

    def sources(self) -> List[Path]:
        return [*self.images, self.label, self.confidence]


@dataclass
class PseudoSet:
    root: Path
    teacher: Dict[str, Any]
    cases: List[PseudoCase]


def read_pseudo_set(root: str, where: str) -> PseudoSet:
    """The pseudo-labelled scans listed by ``root/pseudo_labels.json``.

    Args:
        root: the folder ``med3d pseudo-label`` wrote.
        where: the config key naming it, for messages.

    Returns:
        The set.

    Raises:
        Med3DError: no manifest (the run did not finish), a manifest of another kind, or a listed file missing.
    """
    from ..paths import safe_name

    folder = Path(root)
    path = folder / MANIFEST
    if not path.is_file():
        raise Med3DError(f"{where}: {folder} has no {MANIFEST}; write it with 'med3d pseudo-label CHECKPOINT "
                         f"SCANS... --out {folder}' (a run that did not finish leaves none)")
    try:
        record = json.loads(path.read_text())
        teacher, entries = record["teacher"], record["cases"]
        if record.get("format") != "med3d-pseudo-labels":
            raise KeyError("format")
        cases = [PseudoCase(safe_name(e["case_id"], str(path)), [Path(p) for p in e["images"]], e.get("series"),
                            folder / safe_name(e["label"], str(path)), folder / safe_name(e["confidence"], str(path)))
                 for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise Med3DError(f"{path}: not a med3d pseudo-label manifest ({err}); write it with 'med3d pseudo-label'")
    for case in cases:
        missing = [p for p in case.sources() if not p.exists()]
        if missing:
            raise Med3DError(f"{where}: {missing[0]} (case {case.case_id} of {path}) not found; pseudo-label the "
                             "scans again or restore the file")
    if not cases:
        raise Med3DError(f"{where}: {path} lists no scan; pseudo-label some first")
    return PseudoSet(folder, teacher, cases)


def check_labels(pset: PseudoSet, plan: Dict[str, Any], where: str) -> None:
    """The teacher's classes are the task's (same values, same names).

    Raises:
        Med3DError: naming both label lists.
    """
    theirs = {str(k): v for k, v in pset.teacher.get("labels", {}).items()}
    ours = {str(k): v for k, v in plan["labels"].items()}
    if theirs != ours:
        raise Med3DError(f"{where}: the pseudo-labels in {pset.root} have labels {theirs} but the task's dataset has "
                         f"{ours}; pseudo-label with a teacher of this task")


def pseudo_hash(plan: Dict[str, Any], threshold: float, pset: PseudoSet, also_ignored: Optional[int] = None) -> str:
    """The cache's plan hash: the labelled plan's, the threshold, the teacher and how it labelled (mirroring,
    overlap), and the size and mtime of every listed file, so pseudo-labels written again are new data."""
    teacher = {k: v for k, v in pset.teacher.items() if k != "labels"}
    stamps = [[c.case_id, [str(p) for p in c.sources()], source_stamp(c.sources())] for c in pset.cases]
    blob = json.dumps({"plan": plan["plan_hash"], "threshold": threshold, "ignore": IGNORE, "also": also_ignored,
                       "teacher": teacher, "cases": stamps}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def thresholded(seg: np.ndarray, confidence: np.ndarray, threshold: float,
                also_ignored: Optional[int] = None) -> np.ndarray:
    """``seg`` with ``IGNORE`` wherever ``confidence`` is below ``threshold`` (in place; returned).

    Args:
        seg: label map on the plan grid, any signed integer dtype.
        confidence: the confidence on the same grid.
        threshold: the lowest confidence whose label is trained on.
        also_ignored: a class the labelled cases leave out of the loss (``train.ignore_label``): left out here too.

    Returns:
        ``seg``.
    """
    if also_ignored is not None:
        seg[seg == also_ignored] = IGNORE
    seg[confidence < threshold] = IGNORE
    return seg


def _confidence_on_plan_grid(path: Path, props: Dict[str, Any], plan: Dict[str, Any]) -> np.ndarray:
    """The confidence map cropped and resampled (trilinear) as the image was."""
    conf = read_image(path, np.float32).array
    box = props["crop_box"]
    cropped = crop(conf, box)[0]
    shape = new_shape(cropped.shape, props["spacing_zyx"], plan["target_spacing"])
    return resample_channel(cropped, shape, props["spacing_zyx"], plan["target_spacing"])


def prepare_pseudo_case(case: PseudoCase, plan: Dict[str, Any], threshold: float, folder: Path,
                        also_ignored: Optional[int] = None) -> Dict[str, Any]:
    """Preprocess one pseudo-labelled scan under the labelled plan into the cache; returns its properties.

    Raises:
        Med3DError: a file that cannot be read, or a label or confidence map on another grid than the scan.
    """
    image = read_channels(case.images, series=case.series)
    if image.channels != len(plan["channel_names"]):
        raise Med3DError(f"{case.images[0]}: {image.channels} channel(s), but the task's scans have "
                         f"{len(plan['channel_names'])} ({', '.join(plan['channel_names'])})")
    label = read_image(case.label)
    for path, found in ((case.label, label.geometry.shape), (case.confidence, _header_shape(case.confidence))):
        if tuple(found) != tuple(image.geometry.shape):
            raise Med3DError(f"{path}: grid {tuple(found)} differs from its scan's {tuple(image.geometry.shape)} "
                             f"({case.images[0]}); pseudo-label the scan again")
    if label.array.size and (label.array.min() < 0 or label.array.max() >= len(plan["labels"])):
        raise Med3DError(f"{case.label}: label values outside the task's 0..{len(plan['labels']) - 1}; "
                         "pseudo-label the scan again with a teacher of this task")
    seg_in = label.array.astype(np.int16)
    data, seg, props = preprocess(image, seg_in, plan)
    del image, seg_in
    seg = thresholded(seg, _confidence_on_plan_grid(case.confidence, props, plan)[None], threshold, also_ignored)
    props.update(plan_hash=plan["plan_hash"], sources=source_stamp(case.sources()),
                 trained_share=float(np.count_nonzero(seg != IGNORE)) / max(1, seg.size))
    return write_case(folder, case.case_id, data, seg, props)  # IGNORE (< 0) is never a sampling centre


def _header_shape(path: Path) -> Tuple[int, ...]:
    """The (z, y, x) grid an image file declares, reading no voxels."""
    import nibabel as nib

    if str(path).endswith((".nii", ".nii.gz")):
        return tuple(int(n) for n in reversed(nib.load(str(path)).shape[:3]))
    return tuple(read_image(path).geometry.shape)


def _prepare_one(job: Tuple[PseudoCase, Dict[str, Any], float, Path, Optional[int]]) -> Tuple[str, Optional[str]]:
    case, plan, threshold, folder, also_ignored = job
    try:
        prepare_pseudo_case(case, plan, threshold, folder, also_ignored)
        return case.case_id, None
    except Med3DError as err:
        return case.case_id, str(err)


def pseudo_cache(pset: PseudoSet, plan: Dict[str, Any], threshold: float, cache_dir: str, workers: int,
                 progress: bool, where: str, prepare: bool = True, also_ignored: Optional[int] = None) -> Path:
    """The cache folder of ``pset`` under the labelled ``plan`` and ``threshold``, prepared first when ``prepare``.

    Args:
        pset: the pseudo-labelled set.
        plan: the labelled task's plan (its cache's ``plan.json``).
        threshold: the confidence below which voxels are ignored.
        cache_dir: the cache root.
        workers: worker processes.
        progress: show a progress bar.
        where: the config key, for messages.
        prepare: False (DDP ranks): only check that ``med3d prepare --config`` finished it.
        also_ignored: ``train.ignore_label``, left out of the pseudo-labels' loss as of the labelled cases'.

    Returns:
        The folder (``load_cache`` reads it).

    Raises:
        Med3DError: other classes than the task's, a case that fails, or (without ``prepare``) a case not cached.
    """
    from .cache import cache_folder

    check_labels(pset, plan, where)
    phash = pseudo_hash(plan, threshold, pset, also_ignored)
    base = cache_folder(cache_dir, pset.root)
    folder = base.with_name(f"{base.name}-pseudo-{phash}")  # its own: never another threshold's or task's cases
    own = {**{k: v for k, v in plan.items() if k != "plan_hash"}, "plan_hash": phash,
           "pseudo": {"threshold": threshold, "ignore_label": IGNORE, "also_ignored": also_ignored,
                      "teacher": pset.teacher}}
    todo = [c for c in pset.cases if not case_done(folder, c.case_id, c.sources(), phash)]
    if not prepare:
        stored = folder / "plan.json"
        if todo or not stored.is_file() or json.loads(stored.read_text()).get("plan_hash") != phash:
            raise Med3DError(f"{where}: the pseudo-labelled scans of {pset.root} are not prepared in {cache_dir} "
                             "under this plan and threshold; run 'med3d prepare --config CONFIG' before starting "
                             "the ranks")
        return folder
    write_json_atomic(folder / "plan.json", own)  # load_cache keeps the cases of this hash only
    results = map_cases(_prepare_one, [(c, own, threshold, folder, also_ignored) for c in todo], workers,
                        f"prepare pseudo-labels {pset.root.name}", progress)
    failed = [f"{cid}: {err}" for cid, err in results if err]
    if failed:
        raise Med3DError(f"{where}: {len(failed)} pseudo-labelled scan(s) failed to prepare; first: {failed[0]}")
    write_json_atomic(folder / "manifest.json", {"dataset": pset.root.name, "root": str(pset.root.resolve()),
                                                 "kind": "pseudo", "plan_hash": phash,
                                                 "cases": [c.case_id for c in pset.cases]})
    return folder


def teacher_saw(pset: PseudoSet, dataset: str, held: Sequence[str]) -> List[str]:
    """Which of ``held`` (a split's validation case ids of ``dataset``) the teacher trained on, as its run recorded.

    Args:
        pset: the pseudo-labelled set (its teacher record names the dataset and training cases of its run).
        dataset: the student's labelled dataset folder.
        held: the student's validation case ids.

    Returns:
        The shared case ids (none when the teacher trained on another dataset or did not record its cases).
    """
    same = pset.teacher.get("dataset") and str(Path(pset.teacher["dataset"]).resolve()) == str(Path(dataset).resolve())
    trained = set(pset.teacher.get("train_cases") or [])
    return sorted(trained & set(held)) if same else []


def image_sources(pset: PseudoSet) -> Dict[str, str]:
    """Each pseudo-labelled scan's first image file (resolved) -> its case id, to find scans shared with a split."""
    return {str(c.images[0].resolve()): c.case_id for c in pset.cases}


def shared_scans(pset: PseudoSet, images: Sequence[Path]) -> List[str]:
    """Case ids of pseudo-labelled scans whose image is one of ``images``."""
    mine = image_sources(pset)
    return [mine[str(Path(p).resolve())] for p in images if str(Path(p).resolve()) in mine]
