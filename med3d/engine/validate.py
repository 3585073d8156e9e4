"""Validation on held-out cases: whole preprocessed volumes through MONAI sliding-window inference.

Dice and the 95th-percentile Hausdorff distance (in mm, on the plan grid) per class and task,
from MONAI's metrics. Cases are spread over DDP ranks and the results gathered.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..data.cache import CachedCase
from .distributed import DistInfo, gather_objects


def sliding_window(model: torch.nn.Module, image: torch.Tensor, task: str, patch: Sequence[int],
                   overlap: float, sw_batch_size: int, amp_dtype=None) -> torch.Tensor:
    """Logits for a whole ``(1, C, Z, Y, X)`` volume (Gaussian-weighted window blending)."""
    from monai.inferers import sliding_window_inference

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x, task).float()

    return sliding_window_inference(image, roi_size=tuple(patch), sw_batch_size=sw_batch_size, predictor=run,
                                    overlap=overlap, mode="gaussian", padding_mode="constant")


def case_metrics(pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: Sequence[float],
                 hd95: bool = True) -> Dict[str, List[float]]:
    """Per-class (1..K-1) Dice and HD95 of label maps ``(Z, Y, X)``; NaN where a class is absent from both."""
    from monai.metrics import compute_hausdorff_distance, compute_dice

    p = torch.nn.functional.one_hot(torch.as_tensor(pred).long(), num_classes).permute(3, 0, 1, 2)[None]
    r = torch.nn.functional.one_hot(torch.as_tensor(ref).long(), num_classes).permute(3, 0, 1, 2)[None]
    dice = compute_dice(p, r, include_background=False, ignore_empty=True)[0].tolist()
    out = {"dice": dice}
    if hd95:
        import warnings

        with warnings.catch_warnings():  # MONAI warns for classes empty in one of the maps; they give NaN/inf
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(p.float(), r.float(), include_background=False, percentile=95,
                                            spacing=list(spacing))[0].tolist()
        out["hd95"] = [v if math.isfinite(v) else float("nan") for v in hd]
    return out


@torch.no_grad()
def validate(model: torch.nn.Module, val: Dict[str, List[CachedCase]], plans: Dict[str, Dict[str, Any]],
             channels: Dict[str, Any], patch: Sequence[int], cfg_val: Any, info: DistInfo,
             amp_dtype=None) -> Dict[str, Any]:
    """Mean Dice / HD95 per task and class over the validation cases, plus ``mean_dice`` over tasks."""
    was_training = model.training
    model.eval()
    mine = []
    jobs = [(task, case) for task, cases in val.items() for case in cases[: cfg_val.max_cases or None]]
    for i, (task, case) in enumerate(jobs):
        if i % info.world != info.rank:
            continue
        data = np.load(case.data)
        if channels.get(task) is not None:
            data = data[channels[task]]
        seg = np.load(case.seg)[0]
        x = torch.from_numpy(np.ascontiguousarray(data))[None].to(info.device)
        logits = sliding_window(model, x, task, patch, cfg_val.overlap, cfg_val.sw_batch_size, amp_dtype)
        pred = logits.argmax(1)[0].cpu().numpy()
        k = len(plans[task]["labels"])
        mine.append((task, case_metrics(pred, seg, max(k, int(seg.max()) + 1), plans[task]["target_spacing"],
                                        cfg_val.hd95)))
    results = [r for part in gather_objects(info, mine) for r in part]
    model.train(was_training)
    summary: Dict[str, Any] = {"tasks": {}}
    for task in val:
        rows = [m for t, m in results if t == task]
        if not rows:
            continue
        names = [n for v, n in sorted((int(k), n) for k, n in plans[task]["labels"].items()) if v > 0]
        entry = {}
        for metric in rows[0]:
            means = nanmean(np.array([r[metric] for r in rows], dtype=float), axis=0)
            entry[metric] = {n: float(v) for n, v in zip(names, means)}
        entry["mean_dice"] = float(nanmean(np.array(list(entry["dice"].values()))))
        summary["tasks"][task] = entry
    summary["mean_dice"] = float(nanmean(np.array([e["mean_dice"] for e in summary["tasks"].values()])))
    return summary


def nanmean(arr: np.ndarray, axis=None):
    """Mean ignoring NaN; NaN (without a warning) where everything is NaN."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(arr, axis=axis) if arr.size else float("nan")
