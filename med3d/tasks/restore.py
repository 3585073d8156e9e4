"""``restore`` (Models Genesis): a light decoder undoes corruptions of unlabelled patches; L2 loss.

Training patches are corrupted in the data path (``med3d.ssl.corruptions``). A held-out scan is
scored on its central patch, corrupted by every kind at once with a generator seeded by the case:
``restoration`` is the share of the corruption's squared error the model removes
(``1 - MSE(restored) / MSE(corrupted)``; 1 is perfect, 0 is no better than returning the input).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.plan import case_seed
from ..ssl.corruptions import ALWAYS, corrupt
from ..ssl.views import center_crop
from .base import TaskKind


class RestoreLoss(nn.Module):
    """``loss(restored (N, C, ...), original (N, C, ...))``: the mean squared error, in float32."""

    def forward(self, restored: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(restored.float(), original.float())


class Restore(TaskKind):
    name = "restore"
    head_types = ("restore",)
    score = "restoration"

    def loss(self, train_cfg: Any) -> nn.Module:
        return RestoreLoss()

    def load_case(self, case: Any, plan: Dict[str, Any], patch: Sequence[int]) -> Tuple[np.ndarray, int]:
        # The central patch, and the case's seed for its corruption.
        return center_crop(np.load(case.data, mmap_mode="r"), patch), case_seed(case.case_id)

    def evaluate_case(self, model: nn.Module, image: torch.Tensor, target: Any, task: str,
                      plan: Dict[str, Any], patch: Sequence[int], val_cfg: Any,
                      amp_dtype: Any) -> Dict[str, List[float]]:
        original = image[0].float().cpu().numpy()
        damaged = corrupt(original, np.random.default_rng([int(target), 5]), ALWAYS)
        x = torch.from_numpy(damaged)[None].to(image.device)
        with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            restored = model(x, task)
        return {"mse": [float(F.mse_loss(restored.float(), image.float()))],
                "corrupted_mse": [float(np.mean((damaged - original) ** 2))]}

    def summarize(self, rows: List[Dict[str, List[float]]], plan: Dict[str, Any], val_cfg: Any) -> Dict[str, Any]:
        mse = float(np.mean([r["mse"][0] for r in rows]))
        damaged = float(np.mean([r["corrupted_mse"][0] for r in rows]))
        score = 1.0 - mse / damaged if damaged > 0 else float("nan")
        return {"mse": mse, "corrupted_mse": damaged, "restoration": score, "cases": len(rows), "score": score}


RESTORE = Restore()
