"""Evaluation of label maps against references: Dice, HD95 and normalised surface distance in mm, volumes.

Distances use the physical spacing of the reference grid (MONAI metrics). A class absent from
both maps gets Dice NaN (not counted in means); absent from one only, Dice 0 and distance NaN.

Prediction and reference are compared on the physical grid: a reference stored with its axes in
another order or direction (the same voxels, flipped or permuted) is reoriented onto the
prediction's grid; any other difference is refused with what differs (size, spacing, origin,
direction) and by how much. A reference dataset folder's label mapping applies to its label files.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data.image import Geometry, Image, list_images, read_image, strip_suffix
from .data.labelmap import apply_table
from .errors import Med3DError
from .atomic import write_text_atomic
from .plotting import pyplot, save_png

log = logging.getLogger("med3d.evaluate")
FIELDS = ["case", "class", "label", "dice", "hd95_mm", "nsd", "volume_pred_ml", "volume_ref_ml"]


def _union_box(p: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both ``(1, 1, Z, Y, X)`` masks cut to the bounding box of their union plus one voxel (clipped to the grid).

    MONAI's surface metrics crop to that same box (margin 1) before measuring, so the distances do
    not change; only MONAI's float copies of its inputs shrink to the box.
    """
    union = torch.logical_or(p, r)[0, 0]
    box = []
    for axis in range(3):
        hit = torch.nonzero(union.any(dim=[a for a in range(3) if a != axis])).flatten()
        box.append(slice(max(0, int(hit[0]) - 1), min(union.shape[axis], int(hit[-1]) + 2)))
    del union
    region = (slice(None), slice(None), *box)
    return p[region].contiguous(), r[region].contiguous()


def _class_metrics(p: torch.Tensor, r: torch.Tensor, spacing_zyx: Sequence[float], tolerance_mm: float,
                   distances: bool) -> Tuple[float, float, float]:
    """Dice, HD95 and surface Dice of one class's ``(1, 1, Z, Y, X)`` boolean masks (NaN where undefined)."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    n_p, n_r = int(p.count_nonzero()), int(r.count_nonzero())
    inter = int(torch.logical_and(p, r).count_nonzero())
    dice = 2.0 * inter / (n_p + n_r) if n_r else (0.0 if n_p else float("nan"))
    if not distances:
        return dice, float("nan"), float("nan")
    if not (n_p and n_r):  # a surface distance needs both surfaces
        return dice, float("nan"), 0.0 if n_p or n_r else float("nan")
    p, r = _union_box(p, r)  # MONAI converts its inputs to float: give it the classes' box, not the volume
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                              spacing=list(spacing_zyx))[0, 0])
        nsd = float(compute_surface_dice(p, r, class_thresholds=[tolerance_mm], include_background=True,
                                         spacing=list(spacing_zyx))[0, 0])
    return dice, hd if math.isfinite(hd) else float("nan"), nsd


_TORCH_INT = (np.uint8, np.int8, np.int16, np.int32, np.int64)


def _label_tensor(arr: np.ndarray) -> torch.Tensor:
    """A label map as an integer tensor, sharing memory where torch has the dtype (float maps truncated)."""
    if arr.dtype.type in _TORCH_INT and arr.dtype.isnative:  # torch refuses big-endian arrays (from NIfTI files)
        return torch.as_tensor(np.ascontiguousarray(arr))
    if arr.dtype.type in _TORCH_INT:
        return torch.as_tensor(arr.astype(arr.dtype.newbyteorder("=")))
    return torch.as_tensor(arr.astype(np.int32 if arr.dtype.type == np.uint16 else np.int64))


def _class_mask(t: torch.Tensor, value: int) -> torch.Tensor:
    """``(1, 1, Z, Y, X)`` mask of ``value``; empty when the dtype cannot hold it (torch would wrap it around)."""
    info = torch.iinfo(t.dtype)
    if not info.min <= value <= info.max:
        return torch.zeros((1, 1, *t.shape), dtype=torch.bool)
    return (t == value)[None, None]


def pair_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], classes: Sequence[int],
                 tolerance_mm: float = 2.0, distances: bool = True) -> List[Dict[str, float]]:
    """Per-class metrics of two ``(Z, Y, X)`` label maps on the same grid (``distances=False``: Dice and volumes only).

    One class at a time, as two boolean masks: memory is a fixed number of one-byte volumes (plus
    MONAI's distance maps over the class's bounding box), not a float one-hot of every class.

    Args:
        pred: predicted label map.
        ref: reference label map (same shape).
        spacing_zyx: voxel size in mm.
        classes: label values to score.
        tolerance_mm: surface-Dice tolerance.
        distances: also HD95 and surface Dice (slower).

    Returns:
        One row per class: Dice (NaN when absent from both; 0 when absent from one), HD95 mm and
        surface Dice (NaN unless the class is in both; surface Dice 0 when in one only), volumes in ml.
    """
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    pt, rt = _label_tensor(pred), _label_tensor(ref)
    rows = []
    for c in classes:
        p, r = _class_mask(pt, int(c)), _class_mask(rt, int(c))
        dice, hd, nsd = _class_metrics(p, r, spacing_zyx, tolerance_mm, distances)
        rows.append({"class": int(c), "dice": dice, "hd95_mm": hd, "nsd": nsd,
                     "volume_pred_ml": float(p.count_nonzero()) * voxel_ml,
                     "volume_ref_ml": float(r.count_nonzero()) * voxel_ml})
        del p, r
    return rows


def _axis_map(pred: Geometry, ref: Geometry) -> Optional[Tuple[List[int], List[bool]]]:
    """How ``ref``'s voxel axes lie on ``pred``'s grid, when both are the same voxels in another order.

    Returns:
        For each of ``pred``'s axes (x, y, z), the ``ref`` axis holding it and whether it runs the
        other way; None when the grids are not a permutation / flip of each other.
    """
    index = np.linalg.inv(ref.affine_lps()) @ pred.affine_lps()  # pred voxel (x, y, z) -> ref voxel
    rot, shift = index[:3, :3], index[:3, 3]
    if not np.allclose(np.abs(rot).sum(axis=0), 1, atol=1e-3) or not np.allclose(np.abs(rot), np.round(np.abs(rot)),
                                                                                  atol=1e-3):
        return None
    size_ref = list(reversed(ref.shape))  # (x, y, z)
    size_pred = list(reversed(pred.shape))
    axes, flips = [], []
    for a in range(3):
        r = int(np.argmax(np.abs(rot[:, a])))
        sign = rot[r, a] > 0
        if size_ref[r] != size_pred[a] or not np.isclose(shift[r], 0 if sign else size_ref[r] - 1, atol=1e-2):
            return None
        axes.append(r)
        flips.append(not sign)
    return (axes, flips) if sorted(axes) == [0, 1, 2] else None


def reorient_to(ref: Image, grid: Geometry) -> Optional[Image]:
    """``ref`` on ``grid`` when it holds the same voxels stored in another axis order or direction.

    Args:
        ref: a label map (``(1, Z, Y, X)``).
        grid: the grid to put it on (the prediction's).

    Returns:
        The reoriented image, or None when ``ref``'s grid is not a permutation / flip of ``grid``.
    """
    found = _axis_map(grid, ref.geometry)
    if found is None:
        return None
    axes, flips = found
    xyz = np.transpose(ref.array[0], (2, 1, 0))  # (X, Y, Z) of the reference
    out = np.transpose(xyz, axes)  # the reference's axes in the grid's order
    out = np.flip(out, axis=[a for a in range(3) if flips[a]]) if any(flips) else out
    return Image(np.ascontiguousarray(np.transpose(out, (2, 1, 0)))[None], grid)


def _angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest angle between corresponding axes of two direction matrices."""
    da, db = np.asarray(a).reshape(3, 3), np.asarray(b).reshape(3, 3)
    cos = np.clip(np.sum(da * db, axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())


def describe_mismatch(pred: Geometry, ref: Geometry) -> str:
    """Every way two grids differ, with the amounts (empty when they agree).

    Args:
        pred: the prediction's grid.
        ref: the reference's grid.

    Returns:
        E.g. ``"origin differs by 5 mm (reference minus prediction (0, 0, 5) mm in x, y, z)"``; parts
        joined by ``; ``.
    """
    parts = []
    if pred.shape != ref.shape:
        parts.append(f"size {tuple(reversed(pred.shape))} vs {tuple(reversed(ref.shape))} voxels (x, y, z)")
    ds = np.asarray(pred.spacing) - np.asarray(ref.spacing)
    if not np.allclose(pred.spacing, ref.spacing, rtol=1e-4, atol=1e-6):
        parts.append(f"spacing {_mm(pred.spacing)} vs {_mm(ref.spacing)} mm (up to {np.abs(ds).max():.4g} mm)")
    do = np.asarray(ref.origin) - np.asarray(pred.origin)
    if not np.allclose(pred.origin, ref.origin, atol=max(1e-3, 1e-3 * float(min(ref.spacing)))):
        parts.append(f"origin differs by {np.linalg.norm(do):.4g} mm (reference minus prediction {_mm(do)} mm "
                     "in x, y, z)")
    if not np.allclose(pred.direction, ref.direction, atol=1e-3):
        parts.append(f"direction differs by up to {_angle_deg(pred.direction, ref.direction):.3g} degrees")
    return "; ".join(parts)


def _mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def evaluate_images(pred: Image, ref: Image, classes: Sequence[int], tolerance_mm: float = 2.0,
                    where: str = "prediction") -> List[Dict[str, float]]:
    """Per-class metrics of a prediction against its reference, on the physical grid.

    Args:
        pred: the predicted label map.
        ref: the reference label map; reoriented onto ``pred``'s grid when it stores the same
            voxels in another axis order or direction.
        classes: label values to score.
        tolerance_mm: surface-Dice tolerance.
        where: how errors name the prediction.

    Returns:
        One row per class.

    Raises:
        Med3DError: the grids differ physically (naming size, spacing, origin or direction and by how much).
    """
    if pred.geometry.matches(ref.geometry):
        moved = reorient_to(ref, pred.geometry)
        if moved is None:
            raise Med3DError(f"{where}: not on its reference's grid: {describe_mismatch(pred.geometry, ref.geometry)}; "
                             "predictions must be on the reference's physical grid")
        log.info("%s: reference stored in another axis order or direction; reoriented onto the prediction's grid",
                 where)
        ref = moved
    return pair_metrics(pred.array[0], ref.array[0], ref.geometry.spacing_zyx, classes, tolerance_mm)


def _refs(ref_dir: Path) -> Tuple[Dict[str, Tuple[Path, Optional[Dict[int, int]]]], Dict[int, str]]:
    """Reference label files by case id with their value tables, and label names (from a dataset.json)."""
    labels: Dict[int, str] = {}
    if (ref_dir / "dataset.json").is_file():
        from .data.datalist import read_dataset

        info = read_dataset(ref_dir)  # with its label_map: references read as the model was trained
        labels = {k: v for k, v in info.labels.items() if k}
        return {c.case_id: (c.label, c.label_map) for c in info.cases if c.label}, labels
    return {strip_suffix(p): (p, None) for p in list_images(ref_dir)}, labels


def evaluate_folders(pred_dir: Path, ref_dir: Path, classes: Optional[Sequence[int]] = None,
                     tolerance_mm: float = 2.0, progress: bool = True) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Rows for every prediction with a reference; problems (missing references, bad files) as lines."""
    from tqdm import tqdm

    refs, names = _refs(ref_dir)
    preds = {strip_suffix(p): p for p in list_images(pred_dir) if "_probs" not in p.name}
    if not preds:
        raise Med3DError(f"{pred_dir}: no label maps found")
    rows: List[Dict[str, Any]] = []
    problems: List[str] = []
    for case, path in tqdm(sorted(preds.items()), desc="evaluate", unit="case", disable=not progress, leave=False):
        if case not in refs:
            problems.append(f"{path}: no reference for case {case} in {ref_dir}")
            continue
        try:
            ref_path, table = refs[case]
            pred, ref = read_image(path), read_image(ref_path)
            ref = Image(apply_table(ref.array, table), ref.geometry)
            use = classes or sorted(set(np.unique(ref.array).tolist()) | set(np.unique(pred.array).tolist())
                                    | set(names))
            use = [int(c) for c in use if int(c) != 0]
            for row in evaluate_images(pred, ref, use, tolerance_mm, str(path)):
                rows.append({"case": case, "label": names.get(row["class"], str(row["class"])), **row})
        except Med3DError as err:
            problems.append(str(err))
    return rows, problems


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean, std and median of each metric per class (NaN values left out)."""
    out = []
    for c in sorted({r["class"] for r in rows}):
        sel = [r for r in rows if r["class"] == c]
        entry: Dict[str, Any] = {"class": c, "label": sel[0]["label"], "cases": len(sel)}
        for m in ("dice", "hd95_mm", "nsd"):
            v = np.array([r[m] for r in sel], float)
            v = v[np.isfinite(v)]
            entry.update({f"{m}_mean": float(v.mean()) if v.size else float("nan"),
                          f"{m}_std": float(v.std()) if v.size else float("nan"),
                          f"{m}_median": float(np.median(v)) if v.size else float("nan")})
        out.append(entry)
    return out


def write_csv(path: Path, rows: List[Dict[str, Any]], fields: Optional[List[str]] = None) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields or list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def dice_boxplot(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Box plot of Dice per class (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None

    summary = summarize(rows)
    data = [[r["dice"] for r in rows if r["class"] == s["class"] and math.isfinite(r["dice"])] for s in summary]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(summary) + 2), 3.5))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(summary) + 1), [s["label"] for s in summary], rotation=30, ha="right")
    ax.set(ylabel="Dice", ylim=(0, 1.02), title="Dice per class")
    return save_png(fig, path)
