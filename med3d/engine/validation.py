"""Validation on held-out cases: each task's kind scores them (whole preprocessed volumes for
segmentation, the regions of interest for classification).

Cases are spread over DDP ranks and the per-case rows gathered, so every rank returns the same
summary. The model's modes are left exactly as they were (``inference.evaluating``): frozen
stages stay in eval mode and their BatchNorm statistics never move.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..inference.window import evaluating
from ..tasks.base import TaskKind
from ..tasks.segmentation import nanmean
from .distributed import DistInfo, gather_objects


def _load_case(kind: TaskKind, case: Any, plan: Dict[str, Any], patch: Sequence[int], device: torch.device):
    data, target = kind.load_case(case, plan, patch)
    if plan.get("channels") is not None:
        data = data[plan["channels"]]
    return torch.from_numpy(np.ascontiguousarray(data))[None].to(device), target


@torch.no_grad()
def run_validation(model: nn.Module, val: Dict[str, List[Any]], plans: Dict[str, Dict[str, Any]],
                   kinds: Dict[str, TaskKind], patch: Sequence[int], val_cfg: Any, info: DistInfo,
                   amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Score every task on its held-out cases.

    Args:
        model: the multi-task model (not the DDP wrapper).
        val: held-out cached cases per task (segmentation volumes or classification regions).
        plans: each task's plan, with ``channels`` (the channel selection, or None).
        kinds: each task's kind.
        patch: the sliding window (the training patch size).
        val_cfg: the ``validation`` config section.
        info: this process's rank, world size and device.
        amp_dtype: autocast dtype for the forward passes, or None.

    Returns:
        ``{"tasks": {task: entry}, "score": mean of the tasks' scores, "mean_dice": mean over
        segmentation tasks}``; an entry holds the kind's per-class metrics and ``score``.
    """
    jobs = [(t, c) for t, cases in val.items() for c in cases[: val_cfg.max_cases or None]]
    mine = []
    with evaluating(model):
        for i, (task, case) in enumerate(jobs):
            if i % info.world == info.rank:
                image, target = _load_case(kinds[task], case, plans[task], patch, info.device)
                mine.append((task, kinds[task].evaluate_case(model, image, target, task, plans[task], patch,
                                                             val_cfg, amp_dtype)))
    rows = [r for part in gather_objects(info, mine) for r in part]
    tasks: Dict[str, Any] = {}
    for task in val:
        own = [m for t, m in rows if t == task]
        if own:
            tasks[task] = kinds[task].summarize(own, plans[task], val_cfg)
    seg = [e["mean_dice"] for e in tasks.values() if "mean_dice" in e]
    return {"tasks": tasks, "score": float(nanmean(np.array([e["score"] for e in tasks.values()]))),
            "mean_dice": float(nanmean(np.array(seg)))}
