"""Evaluation of label maps against references: Dice, HD95 and normalised surface distance in mm, volumes.

Distances use the physical spacing of the reference grid (MONAI metrics). A class absent from
both maps gets Dice NaN (not counted in means); absent from one only, Dice 0 and distance NaN.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data.image import Image, list_images, read_image, strip_suffix
from .errors import Med3DError
from .atomic import write_text_atomic

FIELDS = ["case", "class", "label", "dice", "hd95_mm", "nsd", "volume_pred_ml", "volume_ref_ml"]


def _onehot(arr: np.ndarray, classes: Sequence[int]) -> torch.Tensor:
    t = torch.as_tensor(arr.astype(np.int64))
    return torch.stack([t == c for c in classes])[None].float()


def pair_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float], classes: Sequence[int],
                 tolerance_mm: float = 2.0, distances: bool = True) -> List[Dict[str, float]]:
    """Per-class metrics of two ``(Z, Y, X)`` label maps on the same grid (``distances=False``: Dice and volumes only)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    p, r = _onehot(pred, classes), _onehot(ref, classes)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    with warnings.catch_warnings():  # MONAI warns on empty classes; those get NaN below
        warnings.simplefilter("ignore")
        dice = compute_dice(p, r, include_background=True, ignore_empty=True)[0]
        nan = torch.full((len(classes),), float("nan"))
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                        spacing=list(spacing_zyx))[0] if distances else nan
        nsd = compute_surface_dice(p, r, class_thresholds=[tolerance_mm] * len(classes), include_background=True,
                                   spacing=list(spacing_zyx))[0] if distances else nan
    rows = []
    for i, c in enumerate(classes):
        in_p, in_r = bool(p[0, i].any()), bool(r[0, i].any())
        d = float(dice[i]) if in_r else (0.0 if in_p else float("nan"))
        h = float(hd[i]) if in_p and in_r and math.isfinite(float(hd[i])) else float("nan")
        s = float(nsd[i]) if in_p and in_r or not distances else (0.0 if in_p or in_r else float("nan"))
        rows.append({"class": int(c), "dice": d, "hd95_mm": h, "nsd": s,
                     "volume_pred_ml": float(p[0, i].sum()) * voxel_ml, "volume_ref_ml": float(r[0, i].sum()) * voxel_ml})
    return rows


def evaluate_images(pred: Image, ref: Image, classes: Sequence[int], tolerance_mm: float = 2.0,
                    where: str = "prediction") -> List[Dict[str, float]]:
    diff = pred.geometry.matches(ref.geometry)
    if diff:
        raise Med3DError(f"{where}: grid differs from its reference ({diff}); predictions must be on the reference grid")
    return pair_metrics(pred.array[0], ref.array[0], ref.geometry.spacing_zyx, classes, tolerance_mm)


def _refs(ref_dir: Path) -> Tuple[Dict[str, Path], Dict[int, str]]:
    """Reference label files by case id, and label names (from a dataset.json when there is one)."""
    labels: Dict[int, str] = {}
    if (ref_dir / "dataset.json").is_file():
        from .data.datalist import read_dataset

        info = read_dataset(ref_dir)
        labels = {k: v for k, v in info.labels.items() if k}
        return {c.case_id: c.label for c in info.cases if c.label}, labels
    return {strip_suffix(p): p for p in list_images(ref_dir)}, labels


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
            pred, ref = read_image(path), read_image(refs[case])
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .atomic import write_atomic

    summary = summarize(rows)
    data = [[r["dice"] for r in rows if r["class"] == s["class"] and math.isfinite(r["dice"])] for s in summary]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(summary) + 2), 3.5))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(summary) + 1), [s["label"] for s in summary], rotation=30, ha="right")
    ax.set(ylabel="Dice", ylim=(0, 1.02), title="Dice per class")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)
    return path
