"""Dataset fingerprint and preprocessing plan.

The fingerprint summarises what a dataset is (spacings, shapes after cropping, foreground
intensity statistics, label frequencies). The plan decides how to preprocess it, following
the field's defaults (nnU-Net's scheme):

- target spacing: the median spacing; when the median grid is strongly anisotropic (largest
  spacing more than 3x the smallest) the coarse axis gets the 10th percentile of its spacings
  instead, so thick-slice outliers do not blur the rest;
- CT channels: clip to the 0.5-99.5 percentiles of foreground intensities, then z-score with
  the dataset's foreground mean and std; other channels (MR): z-score per case inside the
  non-zero region;
- crop every case to the bounding box of its non-zero voxels.

CT offers a second scheme beside the percentiles: a fixed HU window (``ct_window: [lo, hi]``),
``x -> (clip(x, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)``, so the window spans exactly [-1, 1].
Percentiles adapt to the training scans, which is right when they are many and varied; with a
handful of scans (or a scanner whose calibration differs) a window chosen for the anatomy, as
radiologists read it (abdomen: -160..240), carries over to new scans unchanged. The plan warns
when percentile statistics rest on fewer than ``FEW_CASES`` scans.

The fingerprint also keeps the 1st, 50th and 99th intensity percentiles of each training scan (inside
its non-zero box): ``predict`` compares a new scan's with them to warn about scans unlike the training
ones (``med3d.inference.drift``).

A descriptor in ``datasets/`` (or the config) can override spacing and normalisation.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from ..errors import Med3DError
from ..resources import resource_dir
from .datalist import Case, DatasetInfo
from .image import read_channels

PREPROCESS_VERSION = 1  # bump when the preprocessing code changes what it writes
ANISOTROPY_RATIO = 3.0
FG_SAMPLES_PER_CASE = 10000
NORM_SCHEMES = ("ct", "zscore", "none")
DESCRIPTOR_KEYS = {"key", "title", "modality", "labels", "target_spacing", "normalization", "ct_window", "notes",
                   "source"}
FEW_CASES = 5  # below this many training scans, percentile statistics describe the scans more than the modality
DRIFT_PERCENTILES = (1, 50, 99)  # per scan, for predict's drift check
DRIFT_SAMPLE = 200_000  # voxels per scan the percentiles are taken over (evenly strided)


# ---------------------------------------------------------------- cropping

# Voxels per slab when a whole-volume pass walks z-slabs: bounds its temporaries to a few MB.
PASS_VOXELS = 1 << 20


def z_slabs(shape_zyx: Sequence[int], voxels: Optional[int] = None) -> List[slice]:
    """Slices along z that cut a ``(Z, Y, X)`` volume into slabs of at most ``voxels`` voxels (one plane at least).

    Args:
        shape_zyx: the volume's shape.
        voxels: the most voxels per slab (None: ``PASS_VOXELS``).

    Returns:
        The slices, in order, covering all of z.
    """
    step = max(1, int(voxels or PASS_VOXELS) // max(1, int(np.prod([int(s) for s in shape_zyx[1:]]))))
    return [slice(z, z + step) for z in range(0, int(shape_zyx[0]), step)]


def nonzero_bbox(array: np.ndarray) -> List[Tuple[int, int]]:
    """Bounding box ``[(lo, hi), ...]`` over (Z, Y, X) of voxels non-zero in any channel.

    Walks z-slabs, so its temporaries are one slab's mask, not a volume-sized one.
    """
    shape = array.shape[1:]
    hit = [np.zeros(n, bool) for n in shape]
    for s in z_slabs(shape):
        mask = array[0, s] != 0
        for ch in range(1, array.shape[0]):
            mask |= array[ch, s] != 0
        hit[0][s] = mask.any(axis=(1, 2))
        hit[1] |= mask.any(axis=(0, 2))
        hit[2] |= mask.any(axis=(0, 1))
    if not hit[0].any():
        return [(0, int(s)) for s in shape]
    box = []
    for h in hit:
        idx = np.flatnonzero(h)
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def crop(array: np.ndarray, box: Sequence[Tuple[int, int]]) -> np.ndarray:
    return array[(slice(None),) + tuple(slice(lo, hi) for lo, hi in box)]


# ---------------------------------------------------------------- fingerprint

def intensity_percentiles(array: np.ndarray, box: Optional[Sequence[Tuple[int, int]]] = None
                          ) -> List[Dict[str, float]]:
    """Per channel, the ``DRIFT_PERCENTILES`` of a ``(C, Z, Y, X)`` scan inside its non-zero box.

    Taken over an evenly strided sample of at most ``DRIFT_SAMPLE`` voxels, so the figure is the
    same for the same scan wherever it is computed (fingerprint or predict). The sample is picked
    by index from the box, so a box smaller than the scan is not copied whole.

    Args:
        array: the scan as read.
        box: its ``nonzero_bbox`` when already known (None: computed here).

    Returns:
        One ``{"p01": ..., "p50": ..., "p99": ...}`` per channel.
    """
    data = crop(array, box if box is not None else nonzero_bbox(array))
    size = int(np.prod(data.shape[1:]))
    where = np.unravel_index(np.arange(0, size, max(1, size // DRIFT_SAMPLE)), data.shape[1:])
    out = []
    for ch in range(data.shape[0]):
        sample = data[ch][where].astype(np.float64)  # the C-order flat sample data[ch].reshape(-1)[::step]
        values = np.percentile(sample, DRIFT_PERCENTILES)
        out.append({f"p{q:02d}": float(v) for q, v in zip(DRIFT_PERCENTILES, values)})
    return out


def case_seed(case_id: str) -> int:
    """A seed that depends on the case id alone (not on its position in any list)."""
    return int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16)


def case_fingerprint(case: Case) -> Dict[str, Any]:
    """Spacing, cropped shape, foreground intensity samples and label counts of one case.

    Every pass walks z-slabs or picks voxels by index, so beside the image and its label map the
    temporaries are a slab's (no volume-sized masks, index arrays or flattened copies).
    """
    image = read_channels(case.images)
    label = case.read_label(np.int16).array if case.label else None
    box = nonzero_bbox(image.array)
    data = crop(image.array, box)
    out: Dict[str, Any] = {"case_id": case.case_id, "spacing": list(image.geometry.spacing_zyx),
                           "shape": list(image.array.shape[1:]), "cropped_shape": list(data.shape[1:]),
                           "percentiles": intensity_percentiles(image.array, box)}
    if label is not None:
        seg = crop(label, box)[0]
        rng = np.random.default_rng(case_seed(case.case_id))
        where = _foreground_sample(seg, rng, FG_SAMPLES_PER_CASE)
        out["fg_samples"] = [data[c][where].astype(float).tolist() for c in range(data.shape[0])]
        out["label_voxels"] = _value_counts(seg)
    return out


def _foreground_sample(seg: np.ndarray, rng: np.random.Generator, k: int) -> Tuple[np.ndarray, ...]:
    """Indices (z, y, x) of ``min(k, n)`` of the ``n`` voxels of ``seg`` > 0, drawn without replacement.

    The same voxels, in the same order, as ``rng.choice(np.flatnonzero(seg > 0), k, replace=False)``
    (which draws positions in the list of foreground voxels from its length alone), without the
    list: each drawn position is found in the z-slab that holds it.
    """
    slabs = z_slabs(seg.shape)
    counts = np.array([np.count_nonzero(seg[s] > 0) for s in slabs], dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return tuple(np.zeros(0, np.intp) for _ in range(3))
    pos = rng.choice(n, min(k, n), replace=False)
    flat = np.empty(pos.size, np.intp)
    starts = np.concatenate([[0], np.cumsum(counts)])
    slab_of = np.searchsorted(starts, pos, side="right") - 1
    plane = int(np.prod(seg.shape[1:]))
    for i, s in enumerate(slabs):
        hit = slab_of == i
        if hit.any():
            fg = np.flatnonzero(seg[s] > 0)
            flat[hit] = fg[pos[hit] - starts[i]] + s.start * plane
    return np.unravel_index(flat, seg.shape)


def _value_counts(seg: np.ndarray) -> Dict[int, int]:
    """``{value: voxels}`` of a label map, counted slab by slab (``np.unique`` would sort a copy of it)."""
    total: Dict[int, int] = {}
    for s in z_slabs(seg.shape):
        values, counts = np.unique(seg[s], return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            total[int(v)] = total.get(int(v), 0) + int(c)
    return dict(sorted(total.items()))


def dataset_fingerprint(info: DatasetInfo, per_case: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Aggregate per-case fingerprints into the dataset's fingerprint."""
    spacings = np.array([c["spacing"] for c in per_case], dtype=float)
    shapes = np.array([c["cropped_shape"] for c in per_case], dtype=float)
    median = np.median(spacings, axis=0)
    intensity = []
    for ch in range(info.num_channels):
        vals = np.concatenate([np.asarray(c.get("fg_samples", [[]] * info.num_channels)[ch], float)
                               for c in per_case]) if per_case else np.zeros(0)
        if vals.size == 0:
            intensity.append(None)
            continue
        intensity.append({"mean": float(vals.mean()), "std": float(vals.std()), "median": float(np.median(vals)),
                          "p00_5": float(np.percentile(vals, 0.5)), "p99_5": float(np.percentile(vals, 99.5)),
                          "min": float(vals.min()), "max": float(vals.max())})
    labels = {}
    for value, name in info.labels.items():
        if value == 0:
            continue
        present = [c for c in per_case if c.get("label_voxels", {}).get(value, 0) > 0]
        share = [c["label_voxels"].get(value, 0) / max(1, sum(c["label_voxels"].values())) for c in per_case
                 if "label_voxels" in c]
        labels[name] = {"value": value, "cases_with": len(present),
                        "mean_voxel_share": float(np.mean(share)) if share else 0.0}
    return {"dataset": info.name, "num_cases": len(per_case), "channel_names": info.channel_names,
            "scan_percentiles": _percentile_ranges(per_case, info.num_channels),
            "spacing": {"median": median.tolist(), "p10": np.percentile(spacings, 10, axis=0).tolist(),
                        "min": spacings.min(0).tolist(), "max": spacings.max(0).tolist(),
                        "anisotropy": float(median.max() / median.min())},
            "cropped_shape": {"median": np.median(shapes, axis=0).tolist(), "min": shapes.min(0).tolist(),
                              "max": shapes.max(0).tolist()},
            "intensity": intensity, "labels": labels}


def _percentile_ranges(per_case: Sequence[Dict[str, Any]], channels: int) -> Optional[List[Dict[str, List[float]]]]:
    """Per channel and percentile, the lowest and highest value over the training scans (None: not recorded)."""
    if not per_case or any("percentiles" not in c for c in per_case):
        return None
    out = []
    for ch in range(channels):
        keys = per_case[0]["percentiles"][ch]
        out.append({k: [min(c["percentiles"][ch][k] for c in per_case), max(c["percentiles"][ch][k] for c in per_case)]
                    for k in keys})
    return out


# ---------------------------------------------------------------- descriptors

def _descriptor_key(name: str) -> str:
    return re.sub(r"^(Task\d+|Dataset\d+)_", "", name)


def load_descriptor(path: Path) -> Dict[str, Any]:
    """Read and check a dataset descriptor YAML (unknown keys are refused)."""
    if not path.is_file():
        raise Med3DError(f"{path}: dataset descriptor not found")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - DESCRIPTOR_KEYS)
    if unknown:
        raise Med3DError(f"{path}: unknown descriptor key '{unknown[0]}'; valid keys: {', '.join(sorted(DESCRIPTOR_KEYS))}")
    for scheme in data.get("normalization") or []:
        if scheme not in NORM_SCHEMES:
            raise Med3DError(f"{path}: normalization '{scheme}' unknown; choose from {', '.join(NORM_SCHEMES)}")
    return data


def find_descriptor(dataset_name: str, folder: Optional[Path] = None) -> Optional[Path]:
    """The shipped descriptor for a dataset folder name (``Task09_Spleen`` and ``Dataset009_Spleen`` -> Spleen).

    ``folder`` defaults to the shipped ``datasets/``; an install without it is a ``Med3DError``.
    """
    key = _descriptor_key(dataset_name)
    for path in sorted((folder or resource_dir("datasets")).glob("**/*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("key") == key:
            return path
    return None


# ---------------------------------------------------------------- plan

def default_scheme(channel_name: str) -> str:
    return "ct" if re.search(r"\bct\b", channel_name, re.IGNORECASE) else "zscore"


def target_spacing(fp: Dict[str, Any]) -> Tuple[List[float], Optional[int]]:
    """Median spacing, with the coarse axis at its 10th percentile when the grid is strongly anisotropic."""
    median = list(fp["spacing"]["median"])
    axis = int(np.argmax(median))
    if max(median) / min(median) > ANISOTROPY_RATIO:
        median[axis] = float(max(fp["spacing"]["p10"][axis], min(median)))
        return median, axis
    return median, None


def _ct_entry(info: DatasetInfo, fp: Dict[str, Any], ch: int, window: Optional[Sequence[float]],
              warnings: List[str]) -> Dict[str, Any]:
    """A CT channel's normalisation: the fixed HU window when given, else the foreground percentiles."""
    if window is not None:
        if len(window) != 2 or not window[0] < window[1]:
            raise Med3DError(f"dataset {info.name}: ct_window must be [low, high] HU with low < high, got "
                             f"{list(window)}")
        lo, hi = float(window[0]), float(window[1])
        # Centre and half-width as mean and std: the window maps exactly onto [-1, 1].
        return {"scheme": "ct", "window": [lo, hi], "clip": [lo, hi], "mean": (lo + hi) / 2, "std": (hi - lo) / 2}
    stats = fp["intensity"][ch]
    if stats is None:
        raise Med3DError(f"dataset {info.name}: CT normalisation needs foreground voxels; no label has any "
                         "(or set ct_window for a fixed HU window)")
    if fp["num_cases"] < FEW_CASES:
        warnings.append(f"dataset {info.name}: the CT intensity statistics (clip {stats['p00_5']:.0f}.."
                        f"{stats['p99_5']:.0f}, mean {stats['mean']:.0f}, std {stats['std']:.0f}) come from "
                        f"{fp['num_cases']} scan(s) only; new scans may fall outside them. A fixed HU window "
                        "(ct_window: [-160, 240] for the abdomen) does not depend on the training scans")
    return {"scheme": "ct", "clip": [stats["p00_5"], stats["p99_5"]], "mean": stats["mean"],
            "std": max(stats["std"], 1e-6)}


def label_numbering_problem(info: DatasetInfo) -> Optional[str]:
    """Why the dataset's labels cannot be trained on as they are numbered, or None when they are 0..K-1.

    The network has one output per class, numbered 0..K-1: a declared set such as {0, 1, 5} or
    {0, 200} would give label 5 (or 200) no output and fail the loss at step 1, and a negative value
    has none at all. A label map renumbers the structures to keep.

    Args:
        info: the dataset (its labels after any label mapping).

    Returns:
        The problem as one line naming dataset.json and the labels, or None.
    """
    values = sorted(info.labels)
    if values == list(range(len(values))):
        return None
    return (f"{info.root / 'dataset.json'}: labels {values[:12]}{' ...' if len(values) > 12 else ''} are not "
            "numbered 0..N without gaps, which training needs; add a label_map that names the structures to keep "
            "(med3d new-dataset --labels liver=5 ..., or data.datasets.<task>.label_map in the config)")


def make_plan(info: DatasetInfo, fp: Dict[str, Any], descriptor: Optional[Dict[str, Any]] = None,
              spacing: Optional[Sequence[float]] = None,
              normalization: Optional[Sequence[str]] = None,
              ct_window: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The preprocessing plan: fingerprint defaults, then the descriptor, then explicit overrides.

    Args:
        info: the dataset (its labels after any label mapping).
        fp: its fingerprint.
        descriptor: a dataset descriptor's contents.
        spacing: target spacing (z, y, x) mm, overriding the fingerprint's and descriptor's.
        normalization: one scheme per channel, overriding the defaults.
        ct_window: a fixed HU window ``[low, high]`` for the CT channels instead of percentiles.

    Returns:
        The plan (``warnings`` lists what the user should know, e.g. statistics from few scans).

    Raises:
        Med3DError: an override is malformed, or the labels are not numbered 0..K-1.
    """
    numbering = label_numbering_problem(info)  # also when check-data was skipped (data.check: false)
    if numbering:
        raise Med3DError(numbering)
    descriptor = descriptor or {}
    ct_window = ct_window if ct_window is not None else descriptor.get("ct_window")
    spacing_zyx, aniso_axis = target_spacing(fp)
    explicit = spacing or descriptor.get("target_spacing")
    if explicit is not None:
        if len(explicit) != 3 or min(explicit) <= 0:
            raise Med3DError(f"dataset {info.name}: target spacing must be three positive numbers (z, y, x), "
                             f"got {explicit}")
        spacing_zyx = [float(s) for s in explicit]
        aniso_axis = int(np.argmax(spacing_zyx)) if max(spacing_zyx) / min(spacing_zyx) > ANISOTROPY_RATIO else None
    schemes = list(normalization or descriptor.get("normalization") or
                   [default_scheme(n) for n in info.channel_names])
    if len(schemes) != info.num_channels:
        raise Med3DError(f"dataset {info.name}: {len(schemes)} normalization scheme(s) for "
                         f"{info.num_channels} channel(s)")
    norm, warnings = [], []
    for ch, scheme in enumerate(schemes):
        if scheme not in NORM_SCHEMES:
            raise Med3DError(f"dataset {info.name}: normalization '{scheme}' unknown; choose from "
                             f"{', '.join(NORM_SCHEMES)}")
        norm.append(_ct_entry(info, fp, ch, ct_window, warnings) if scheme == "ct" else {"scheme": scheme})
    if ct_window is not None and not any(n["scheme"] == "ct" for n in norm):
        raise Med3DError(f"dataset {info.name}: ct_window is set but no channel is normalised as CT "
                         f"(schemes: {', '.join(schemes)}); set normalization: [ct] or drop ct_window")
    ratio = np.asarray(fp["spacing"]["median"]) / np.asarray(spacing_zyx)
    resampled = np.round(np.asarray(fp["cropped_shape"]["median"]) * ratio).astype(int)
    return {"dataset": info.name, "layout": info.layout, "channel_names": info.channel_names,
            "labels": {str(k): v for k, v in info.labels.items()}, "target_spacing": spacing_zyx,
            "anisotropic_axis": aniso_axis, "crop_nonzero": True, "normalization": norm,
            "median_shape_resampled": resampled.tolist(), "preprocess_version": PREPROCESS_VERSION,
            "label_map": {str(k): v for k, v in info.label_map.items()} if info.label_map else None,
            "warnings": warnings}


def plan_hash(plan: Dict[str, Any]) -> str:
    """Hash of the plan fields that change the preprocessed arrays (not notes or statistics shown only)."""
    keys = ("target_spacing", "anisotropic_axis", "crop_nonzero", "normalization", "channel_names",
            "preprocess_version")
    if plan.get("label_map"):  # only when set, so caches prepared before label maps keep their hash
        keys += ("label_map", "labels")
    blob = json.dumps({k: plan.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
