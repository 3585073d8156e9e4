"""Image-level prediction with a classification head: class probabilities per scan, and their CSV.

A scan is prepared exactly as training prepared its cases (``med3d.data.class_cache``): the
region of the plan's ``crop_mm`` around the ROI centre (given in world mm, or a mask's centroid),
resampled to the plan spacing, normalised with the training statistics and cut to the patch.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..atomic import write_text_atomic
from ..data.class_cache import image_region, network_input, patch_start
from ..data.image import Geometry, Image, shifted_grid
from ..errors import Med3DError
from .predictor import DEFAULT_PATCH, Predictor

PathLike = Union[str, Path]


@dataclass
class ClassProbabilities:
    """One scan's prediction."""

    case_id: str
    probabilities: np.ndarray  # (K,), summing to 1
    center_mm: Optional[List[float]]

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))


def is_classifier(predictor: Predictor, task: str) -> bool:
    """Whether ``task`` of the loaded checkpoint is an image-level classification task."""
    return predictor.meta["plans"][task].get("kind") == "classification"


@torch.inference_mode()
def classify(predictor: Predictor, image: Image, task: Optional[str] = None,
             center_mm: Optional[Sequence[float]] = None, case_id: str = "case", where: str = "input"
             ) -> ClassProbabilities:
    """Class probabilities of one scan.

    Args:
        predictor: a loaded checkpoint (``Predictor.from_checkpoint``).
        image: the scan ``(C, Z, Y, X)`` with its geometry.
        task: which head (None: the checkpoint's only task).
        center_mm: the ROI centre, world (x, y, z) mm in LPS; None: the whole scan.
        case_id: the name the result carries.
        where: how errors name the scan.

    Returns:
        The probabilities, and the centre used.

    Raises:
        Med3DError: the task is not a classification task, or the channels do not fit.
    """
    task = predictor.task(task)
    x, _, used = network_region(predictor, image, task, center_mm, where)
    probs = torch.softmax(predictor.model(x, task).float(), 1)[0].cpu().numpy()
    return ClassProbabilities(case_id, probs, used)


def network_region(predictor: Predictor, image: Image, task: str, center_mm: Optional[Sequence[float]],
                   where: str = "input") -> Tuple[torch.Tensor, Geometry, Optional[List[float]]]:
    """The network input for a scan, as training built it, and where it lies in world space.

    Args:
        predictor: a loaded checkpoint.
        image: the scan.
        task: a classification task of the checkpoint.
        center_mm: the ROI centre (world x, y, z mm, LPS), or None for the whole scan.
        where: how errors name the scan.

    Returns:
        ``(1, C, *patch)`` on the predictor's device, the input's grid (so a map over it can be
        put back on the scan's grid), and the centre used.

    Raises:
        Med3DError: the task segments, or the channels do not fit.
    """
    if not is_classifier(predictor, task):
        raise Med3DError(f"task {task} of this checkpoint segments; classification options do not apply")
    plan = predictor.plan_for(image, task, where)
    region, props, grid = image_region(image, center_mm, plan)
    patch = predictor.meta.get("patch_size") or DEFAULT_PATCH
    x = network_input(region, plan, patch)
    if plan.get("channels") is not None:
        x = x[plan["channels"]]
    grid = shifted_grid(grid, patch, patch_start(region.shape[1:], patch), (1.0, 1.0, 1.0))
    tensor = torch.from_numpy(np.ascontiguousarray(x))[None].to(predictor.device)
    return tensor, grid, props["center_mm"]


def write_predictions_csv(path: PathLike, rows: Sequence[ClassProbabilities], overwrite: bool = False) -> Path:
    """Write ``case,predicted,prob_0,...,prob_{K-1}`` (the format ``med3d evaluate`` reads), atomically.

    Raises:
        Med3DError: the file exists and ``overwrite`` is False, or there is nothing to write.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise Med3DError(f"{path}: already exists; pass --overwrite to replace it")
    if not rows:
        raise Med3DError(f"{path}: no case was classified; nothing written")
    k = len(rows[0].probabilities)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "predicted"] + [f"prob_{c}" for c in range(k)])
    for r in rows:
        w.writerow([r.case_id, r.predicted] + [f"{float(p):.6f}" for p in r.probabilities])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, buf.getvalue())
