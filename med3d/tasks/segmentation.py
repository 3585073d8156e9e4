"""Segmentation: MONAI losses (Dice+CE by default, focal, Dice+focal) and per-class Dice / HD95.

Validation runs each held-out volume through the same sliding window as ``med3d predict`` and
scores the argmax against the cached label map on the plan grid (distances in mm).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..evaluate import pair_metrics
from ..inference.window import sliding_window
from .base import TaskKind

LOSSES = ("dice_ce", "focal", "dice_focal")


class SegLoss(nn.Module):
    """``loss(logits (N, K, ...), target (N, 1, ...) int)``; voxels equal to ``ignore_label`` count in no term.

    Args:
        kind: ``dice_ce`` (default), ``focal`` or ``dice_focal``.
        ignore_label: a label value whose voxels are left out of every term (None: none).
    """

    def __init__(self, kind: str = "dice_ce", ignore_label: Optional[int] = None) -> None:
        super().__init__()
        from monai.losses import FocalLoss, MaskedDiceLoss

        self.kind, self.ignore_label = kind, ignore_label
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5,
                                   smooth_dr=1e-5) if kind in ("dice_ce", "dice_focal") else None
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, reduction="none") \
            if kind in ("focal", "dice_focal") else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in float32 whatever the autocast dtype
        target = target.long()
        if self.ignore_label is not None:
            mask = target != self.ignore_label
            target = torch.where(mask, target, torch.zeros_like(target))
        else:
            mask = torch.ones_like(target, dtype=torch.bool)
        loss = logits.new_zeros(())
        if self.dice is not None:
            loss = loss + self.dice(logits, target, mask=mask.float())
        if self.kind == "dice_ce":
            ce = F.cross_entropy(logits, target[:, 0], reduction="none")
            loss = loss + (ce * mask[:, 0]).sum() / mask.sum().clamp_min(1)
        if self.focal is not None:
            focal = self.focal(logits, target).sum(1, keepdim=True)
            loss = loss + (focal * mask).sum() / mask.sum().clamp_min(1)
        return loss


def nanmean(arr: np.ndarray, axis: Optional[int] = None) -> Any:
    """Mean ignoring NaN; NaN (without a warning) where everything is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(arr, axis=axis) if arr.size else float("nan")


def _foreground(plan: Dict[str, Any]) -> List[tuple]:
    """``(value, name)`` of every labelled class except background, by value."""
    return [(v, n) for v, n in sorted((int(k), n) for k, n in plan["labels"].items()) if v > 0]


class Segmentation(TaskKind):
    name = "segmentation"
    head_types = ("med3d", "unet")
    score = "mean_dice"

    def loss(self, train_cfg: Any) -> nn.Module:
        return SegLoss(train_cfg.loss, train_cfg.ignore_label)

    def load_case(self, case: Any, plan: Dict[str, Any], patch: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        return np.load(case.data), np.load(case.seg)[0]  # the whole volume: validation slides a window

    def evaluate_case(self, model: nn.Module, image: torch.Tensor, target: Any, task: str,
                      plan: Dict[str, Any], patch: Sequence[int], val_cfg: Any,
                      amp_dtype: Any) -> Dict[str, List[float]]:
        # Labels only: the unnormalised blend has the same argmax and skips the weight sum and the division.
        scores = sliding_window(model, image, task, patch, val_cfg.overlap, val_cfg.sw_batch_size, amp_dtype,
                                normalise=False)
        pred = scores.argmax(1)[0].cpu().numpy()
        classes = [v for v, _ in _foreground(plan)]
        rows = pair_metrics(pred, target, plan["target_spacing"], classes, distances=val_cfg.hd95)
        metrics = {"dice": [r["dice"] for r in rows]}
        if val_cfg.hd95:
            metrics["hd95"] = [r["hd95_mm"] for r in rows]
        return metrics

    def summarize(self, rows: List[Dict[str, List[float]]], plan: Dict[str, Any], val_cfg: Any) -> Dict[str, Any]:
        names = [n for _, n in _foreground(plan)]
        entry: Dict[str, Any] = {}
        for metric in rows[0]:
            means = nanmean(np.array([r[metric] for r in rows], dtype=float), axis=0)
            entry[metric] = {n: float(v) for n, v in zip(names, means)}
        entry["mean_dice"] = float(nanmean(np.array(list(entry["dice"].values()))))
        entry["score"] = entry["mean_dice"]
        return entry


SEGMENTATION = Segmentation()
