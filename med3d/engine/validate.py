"""Validation on held-out cases: whole preprocessed volumes through MONAI sliding-window inference.

Dice and the 95th-percentile Hausdorff distance (in mm, on the plan grid) per class and task,
from MONAI's metrics. Cases are spread over DDP ranks and the results gathered.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..data.cache import CachedCase
from ..evaluate import pair_metrics
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
        classes = sorted(int(v) for v in plans[task]["labels"] if int(v) > 0)
        rows = pair_metrics(pred, seg, plans[task]["target_spacing"], classes, distances=cfg_val.hd95)
        metrics = {"dice": [r["dice"] for r in rows]}
        if cfg_val.hd95:
            metrics["hd95"] = [r["hd95_mm"] for r in rows]
        mine.append((task, metrics))
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
