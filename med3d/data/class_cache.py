"""The prepared cache of a classification dataset: one region of interest per case.

``prepare`` cuts each case's region (``crop_mm`` around its ROI centre, or the whole image),
resamples it to the plan spacing and stores it raw; the normalisation statistics are then taken
from the training cases' regions, so they describe what the network sees (a CT window fitted to
lesions, not to whole scans). Loading normalises on the fly, which is cheap for crops.

Layout: ``<cache folder>/plan.json`` and ``cases/<case>.npy`` (C, Z, Y, X float32) with
``cases/<case>.json`` (class, ROI centre, plan hash, and the source files' size and mtime), written
atomically per case, so a killed ``prepare`` resumes where it stopped and writes the same bytes as
a fresh one, and a case whose file, ROI or class changed is cut again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from ..atomic import write_atomic, write_json_atomic
from ..errors import Med3DError
from .cache import cache_folder, source_stamp
from .classification import ClassCase, ClassDataset, load_case_image, read_header, roi_center_mm, roi_crop
from .image import Geometry, Image, shifted_grid
from .plan import default_scheme
from .preprocess import new_shape, normalize, resample

PathLike = Union[str, Path]
CLASS_PREPROCESS_VERSION = 1
CT_PERCENTILES = (0.5, 99.5)
STAT_SAMPLES_PER_CASE = 20000


@dataclass
class ClassCached:
    """One prepared case: its stored region and class (None for unlabelled test cases)."""

    case_id: str
    data: Path
    label: Optional[int]
    props: Dict[str, Any]


def _median_spacing(ds: ClassDataset) -> List[float]:
    """The median (z, y, x) spacing of the training images (headers only; array-backed data: 1 mm)."""
    spacings = [read_header(c.images[0])[0].spacing_zyx if c.images else (1.0, 1.0, 1.0) for c in ds.cases]
    return [float(v) for v in np.median(np.asarray(spacings, dtype=float), axis=0)]


def class_plan(ds: ClassDataset, spacing: Optional[Sequence[float]] = None,
               crop_mm: Optional[Sequence[float]] = None,
               normalization: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """How a classification dataset is prepared (statistics are added after the regions are cut).

    Args:
        ds: the dataset.
        spacing: target spacing (z, y, x) mm; None: the median of the training images.
        crop_mm: region size (z, y, x) mm; None: the dataset's, else the whole image.
        normalization: per channel ``ct`` | ``zscore`` | ``none``; None: ``ct`` for CT channels.

    Returns:
        The plan, with ``plan_hash``.

    Raises:
        Med3DError: a normalisation list of the wrong length or an unknown scheme.
    """
    schemes = list(normalization) if normalization else [default_scheme(n) for n in ds.channel_names]
    if len(schemes) != len(ds.channel_names) or any(s not in ("ct", "zscore", "none") for s in schemes):
        raise Med3DError(f"{ds.root}: normalization {schemes} must give ct, zscore or none for each of the "
                         f"{len(ds.channel_names)} channel(s)")
    plan = {"kind": "classification", "dataset": ds.name, "layout": ds.layout, "channel_names": ds.channel_names,
            "classes": {str(k): v for k, v in sorted(ds.classes.items())},
            "target_spacing": list(spacing) if spacing else _median_spacing(ds),
            "crop_mm": list(crop_mm) if crop_mm else (list(ds.crop_mm) if ds.crop_mm else None),
            "schemes": schemes, "preprocess_version": CLASS_PREPROCESS_VERSION}
    plan["plan_hash"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def cut_region(case: ClassCase, plan: Dict[str, Any]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A case's region of interest at the plan spacing, not yet normalised.

    Returns:
        ``(C, Z, Y, X)`` float32 and what was done (class, ROI centre, source spacing, shape).
    """
    image = load_case_image(case)
    data, props, _ = image_region(image, roi_center_mm(case, image), plan)
    return data, {"case_id": case.case_id, "label": case.label, **props}


def image_region(image: Image, center_mm: Optional[Sequence[float]], plan: Dict[str, Any]
                 ) -> Tuple[np.ndarray, Dict[str, Any], Geometry]:
    """The plan's region of ``image`` around ``center_mm`` (the whole image without a centre or
    ``crop_mm``), resampled to the plan spacing, not yet normalised.

    Args:
        image: the scan.
        center_mm: the ROI centre, world (x, y, z) mm, LPS; None: no region.
        plan: the cache's plan.

    Returns:
        ``(C, Z, Y, X)`` float32, what was done (ROI centre, source spacing, shape, plan hash), and
        the region's grid in world space.
    """
    if plan["crop_mm"] is not None and center_mm is not None:
        image = roi_crop(image, tuple(center_mm), plan["crop_mm"])
    spacing = image.geometry.spacing_zyx
    shape = new_shape(image.array.shape[1:], spacing, plan["target_spacing"])
    data = resample(image.array.astype(np.float32), shape, spacing, plan["target_spacing"], is_label=False)
    props = {"center_mm": [float(v) for v in center_mm] if center_mm is not None else None,
             "spacing_zyx": list(spacing), "shape": list(shape), "plan_hash": plan["plan_hash"]}
    # Interpolation without aligned corners: output voxel i samples input (i + 0.5) * n / m - 0.5.
    scale = [n / m for n, m in zip(image.array.shape[1:], shape)]
    grid = shifted_grid(image.geometry, shape, [0.5 * f - 0.5 for f in scale], scale)
    return np.ascontiguousarray(data, dtype=np.float32), props, grid


def _paths(folder: Path, case_id: str) -> Tuple[Path, Path]:
    return folder / "cases" / f"{case_id}.npy", folder / "cases" / f"{case_id}.json"


def _source(case: ClassCase) -> Dict[str, Any]:
    """What a stored region was cut from: its files (size, mtime), ROI centre, mask and class."""
    files = [*case.images, *([case.mask] if case.mask else [])]
    return {"files": source_stamp(files), "center_mm": list(case.center_mm) if case.center_mm else None,
            "mask": case.mask.name if case.mask else None, "label": case.label}


def _done(folder: Path, case: ClassCase, plan: Dict[str, Any]) -> bool:
    """A region is current when it was cut under this plan from the same files, ROI and class."""
    data, meta = _paths(folder, case.case_id)
    if not (data.is_file() and meta.is_file()):
        return False
    props = json.loads(meta.read_text())
    return props.get("plan_hash") == plan["plan_hash"] and props.get("source") == _source(case)


def _stats(folder: Path, cases: Sequence[ClassCase], schemes: Sequence[str]) -> List[Dict[str, Any]]:
    """Per channel normalisation: CT windows from the percentiles of every stored region."""
    out: List[Dict[str, Any]] = []
    for ch, scheme in enumerate(schemes):
        if scheme != "ct":
            out.append({"scheme": scheme})
            continue
        samples = []
        for case in cases:
            vals = np.load(_paths(folder, case.case_id)[0], mmap_mode="r")[ch].reshape(-1)
            rng = np.random.default_rng(len(samples))
            samples.append(np.asarray(vals[rng.integers(0, vals.size, min(vals.size, STAT_SAMPLES_PER_CASE))]))
        v = np.concatenate(samples)
        lo, hi = (float(x) for x in np.percentile(v, CT_PERCENTILES))
        v = np.clip(v, lo, hi)
        out.append({"scheme": "ct", "clip": [lo, hi], "mean": float(v.mean()), "std": max(float(v.std()), 1e-8)})
    return out


def prepare_classification(ds: ClassDataset, source: PathLike, cache_dir: PathLike,
                           spacing: Optional[Sequence[float]] = None, crop_mm: Optional[Sequence[float]] = None,
                           normalization: Optional[Sequence[str]] = None, progress: bool = False) -> Path:
    """Cut, resample and store every case's region; write the plan with its statistics.

    Args:
        ds: the dataset (``read_classification_dataset``).
        source: the dataset folder, CSV or .npz it was read from (names the cache folder).
        cache_dir: the cache root.
        spacing, crop_mm, normalization: plan overrides (see ``class_plan``).
        progress: show a progress bar.

    Returns:
        The dataset's cache folder.

    Raises:
        Med3DError: a case cannot be read or cut (naming it).
    """
    folder = cache_folder(cache_dir, source)
    plan = class_plan(ds, spacing, crop_mm, normalization)
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    every = ds.cases + ds.val_cases + ds.test_cases
    todo = [c for c in every if not _done(folder, c, plan)]
    for case in tqdm(todo, desc=f"prepare {ds.name}", disable=not progress):
        data, props = cut_region(case, plan)
        props["source"] = _source(case)
        data_path, meta_path = _paths(folder, case.case_id)
        write_atomic(data_path, lambda tmp, d=data: np.save(tmp, d))
        write_json_atomic(meta_path, props)  # last: its presence marks the case complete
    # The dataset's training cases (held-out cases drawn from them by the run's split included, as
    # for segmentation); a fixed validation list and test cases stay out of the statistics.
    plan["normalization"] = _stats(folder, ds.cases, plan["schemes"])
    write_json_atomic(folder / "plan.json", plan)
    return folder


def load_class_cache(folder: PathLike, case_ids: Sequence[str]) -> Tuple[Dict[str, Any], List[ClassCached]]:
    """The plan and the prepared cases ``case_ids`` (in that order) of one classification cache.

    Raises:
        Med3DError: no plan, or a case not prepared under the current plan.
    """
    folder = Path(folder)
    if not (folder / "plan.json").is_file():
        raise Med3DError(f"{folder}: no prepared classification cache here; run 'med3d prepare' on the dataset")
    plan = json.loads((folder / "plan.json").read_text())
    out = []
    for cid in case_ids:
        data, meta = _paths(folder, cid)
        props = json.loads(meta.read_text()) if meta.is_file() else {}
        if props.get("plan_hash") != plan["plan_hash"] or not data.is_file():
            raise Med3DError(f"{folder}: case {cid} is not prepared under the current plan; run 'med3d prepare' "
                             "on the dataset again")
        out.append(ClassCached(cid, data, props.get("label"), props))
    return plan, out


def patch_start(shape: Sequence[int], patch: Sequence[int], offset: Optional[Sequence[int]] = None) -> List[int]:
    """Index (z, y, x) in the region of the network input's first voxel (negative where it pads)."""
    offset = offset or (0, 0, 0)
    return [(n - p) // 2 + int(o) for n, p, o in zip(shape, patch, offset)]


def network_input(data: np.ndarray, plan: Dict[str, Any], patch: Sequence[int],
                  offset: Optional[Sequence[int]] = None) -> np.ndarray:
    """Normalise a stored region and cut it to ``patch`` around its centre (padding with each channel's minimum).

    Args:
        data: the stored region ``(C, Z, Y, X)``.
        plan: the cache's plan (its ``normalization``).
        patch: the network input size (z, y, x).
        offset: a shift of the window from the centre in voxels (training jitter); None: centred.

    Returns:
        ``(C, *patch)`` float32.
    """
    x = normalize(np.asarray(data, dtype=np.float32), plan)
    region, pads = [slice(None)], [(0, 0)]
    for n, p, lo in zip(x.shape[1:], patch, patch_start(x.shape[1:], patch, offset)):
        lo_c, hi_c = max(lo, 0), min(lo + p, n)
        region.append(slice(lo_c, max(hi_c, lo_c)))
        pads.append((lo_c - lo, p - (lo_c - lo) - max(hi_c - lo_c, 0)))
    out = x[tuple(region)]
    if not any(a or b for a, b in pads):
        return np.ascontiguousarray(out)
    # Pad like roi_crop does outside the scan: with each channel's minimum (air for CT), not 0.
    return np.stack([np.pad(c, pads[1:], constant_values=float(c.min()) if c.size else 0.0) for c in out])
