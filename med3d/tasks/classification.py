"""Image-level classification: cross-entropy or focal loss, and AUC / balanced accuracy on held-out cases.

A case is its cached region of interest (``med3d.data.class_cache``), cut to the training patch
around its centre; validation scores the softmax of one forward pass per case.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classification_eval import classification_report
from ..data.class_cache import ClassCached, network_input
from .base import TaskKind

class ClsLoss(nn.Module):
    """``loss(logits (N, K), target (N,) or (N, 1) int)``.

    Args:
        kind: ``ce`` (cross-entropy) or ``focal`` (gamma 2, MONAI's FocalLoss).
        label_smoothing: share of the target mass spread evenly over the classes (cross-entropy).
        class_weights: one weight per class, or None.
    """

    def __init__(self, kind: str = "ce", label_smoothing: float = 0.0,
                 class_weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        from monai.losses import FocalLoss

        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("weight", weight, persistent=False)
        self.kind, self.label_smoothing = kind, float(label_smoothing)
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=weight) \
            if kind == "focal" else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # in float32 whatever the autocast dtype
        target = target.reshape(-1).long()
        if self.focal is not None:
            return self.focal(logits, target[:, None])
        return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)


def image_metrics(labels: Sequence[int], probs: np.ndarray, names: Sequence[str]) -> Dict[str, Any]:
    """Validation's entry for one task: ``classification_report`` without a bootstrap, flattened.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``auc`` (NaN where undefined), and ``sensitivity`` /
        ``specificity`` by class name.
    """
    report = classification_report(labels, probs, class_names=names, n_boot=0)
    nan = float("nan")
    return {"accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
            "auc": report["auc"]["value"] if report["auc"]["value"] is not None else nan,
            "sensitivity": {r["name"]: r["sensitivity"] if r["sensitivity"] is not None else nan
                            for r in report["per_class"]},
            "specificity": {r["name"]: r["specificity"] if r["specificity"] is not None else nan
                            for r in report["per_class"]}}


class Classification(TaskKind):
    name = "classification"
    head_types = ("classification",)
    score = "auc"  # validation.class_metric chooses another

    def loss(self, train_cfg: Any) -> nn.Module:
        return ClsLoss(train_cfg.cls_loss, train_cfg.label_smoothing, train_cfg.class_weights)

    def load_case(self, case: ClassCached, plan: Dict[str, Any], patch: Sequence[int]):
        return network_input(np.load(case.data), plan, patch), case.label

    def evaluate_case(self, model: nn.Module, image: torch.Tensor, target: Any, task: str,
                      plan: Dict[str, Any], patch: Sequence[int], val_cfg: Any,
                      amp_dtype: Any) -> Dict[str, List[float]]:
        with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(image, task)
        return {"prob": torch.softmax(logits.float(), 1)[0].tolist(), "label": [int(target)]}

    def summarize(self, rows: List[Dict[str, List[float]]], plan: Dict[str, Any], val_cfg: Any) -> Dict[str, Any]:
        names = [plan["classes"][str(c)] for c in range(len(plan["classes"]))]
        entry = image_metrics([r["label"][0] for r in rows], np.array([r["prob"] for r in rows]), names)
        entry["cases"] = len(rows)
        entry["score"] = entry[getattr(val_cfg, "class_metric", self.score)]
        return entry


CLASSIFICATION = Classification()
