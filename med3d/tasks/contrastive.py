"""``contrastive``: two augmented views of one scan pulled together against the batch's other scans.

The loss is NT-Xent (SimCLR's normalised temperature-scaled cross-entropy, InfoNCE over the batch):
for each view, the softmax over its cosine similarities to every other view of the batch, divided
by the temperature, should put its mass on the other view(s) of its own scan. A held-out scan is
scored by retrieval: its first view's embedding should be nearest to its own second view among
the second views of all held-out scans (``top1``; with one held-out scan this is trivially 1).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.plan import case_seed
from ..ssl.views import center_crop, two_views, view_transform
from .base import TaskKind


class NTXentLoss(nn.Module):
    """``loss(z (M, D), scan (M,))``: views with equal ``scan`` are positives of each other, every other
    view of the batch a negative.

    Per anchor ``i``: ``-log(sum_pos exp(s_ip / T) / sum_{j != i} exp(s_ij / T))`` with ``s`` the cosine
    similarity; anchors with no positive are left out (and a batch without any gives 0).

    Args:
        temperature: ``T``; lower values weigh the hardest negatives more.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, z: torch.Tensor, scan: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z.float(), dim=1)
        sim = z @ z.t() / self.temperature
        scan = scan.reshape(-1)
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        positive = (scan[:, None] == scan[None, :]) & ~self_mask
        sim = sim.masked_fill(self_mask, float("-inf"))
        has = positive.any(1)
        if not has.any():
            return z.sum() * 0.0
        log_all = torch.logsumexp(sim, dim=1)
        log_pos = torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=1)
        return (log_all - log_pos)[has].mean()


class Contrastive(TaskKind):
    name = "contrastive"
    head_types = ("contrastive",)
    score = "top1"

    def __init__(self) -> None:
        self._views: Dict[Tuple[int, ...], Any] = {}  # view augmentations by patch size, made once

    def loss(self, train_cfg: Any) -> nn.Module:
        return NTXentLoss(train_cfg.contrastive_temperature)

    def load_case(self, case: Any, plan: Dict[str, Any], patch: Sequence[int]) -> Tuple[np.ndarray, int]:
        # The middle of the scan with room for both views' shifts (a quarter patch each way).
        room = [p + p // 2 for p in patch]
        return center_crop(np.load(case.data, mmap_mode="r"), room), case_seed(case.case_id)

    def evaluate_case(self, model: nn.Module, image: torch.Tensor, target: Any, task: str,
                      plan: Dict[str, Any], patch: Sequence[int], val_cfg: Any,
                      amp_dtype: Any) -> Dict[str, List[float]]:
        key = tuple(int(p) for p in patch)
        if key not in self._views:
            self._views[key] = view_transform(key)
        rng = np.random.default_rng([int(target), 6])
        views = two_views(image[0].float().cpu().numpy(), patch, rng, self._views[key])
        x = torch.from_numpy(np.stack(views)).to(image.device)
        with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            z = F.normalize(model(x, task).float(), dim=1)
        return {"z1": z[0].tolist(), "z2": z[1].tolist()}

    def summarize(self, rows: List[Dict[str, List[float]]], plan: Dict[str, Any], val_cfg: Any) -> Dict[str, Any]:
        z1, z2 = np.array([r["z1"] for r in rows]), np.array([r["z2"] for r in rows])
        sim = z1 @ z2.T
        n = len(rows)
        top1 = float(np.mean(sim.argmax(1) == np.arange(n)))
        off = sim[~np.eye(n, dtype=bool)]
        return {"top1": top1, "positive_cosine": float(np.mean(np.diag(sim))),
                "negative_cosine": float(off.mean()) if off.size else float("nan"), "cases": n, "score": top1}


CONTRASTIVE = Contrastive()
