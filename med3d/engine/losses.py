"""Segmentation losses from MONAI (Dice+CE default, focal, Dice+focal), with an optional ignore label."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class SegLoss(nn.Module):
    """``loss(logits (N, K, ...), target (N, 1, ...) int)``; voxels equal to ``ignore_label`` count in no term."""

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
            mask = (target != self.ignore_label)
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
