"""The interface of a task kind (segmentation and classification; self-supervised kinds next)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn


class TaskKind:
    """What the engine needs to know about one kind of task.

    Attributes:
        name: the kind's name.
        head_types: registered head types this kind trains.
        score: name of the validation score (higher is better) that picks the best checkpoint.
    """

    name: str = ""
    head_types: Tuple[str, ...] = ()
    score: str = ""

    def loss(self, train_cfg: Any) -> nn.Module:
        """The training loss, called as ``loss(logits, target)``."""
        raise NotImplementedError

    def load_case(self, case: Any, plan: Dict[str, Any], patch: Sequence[int]) -> Tuple[Any, Any]:
        """A held-out cached case as the network input ``(C, ...)`` array and the target to score it against."""
        raise NotImplementedError

    def evaluate_case(self, model: nn.Module, image: torch.Tensor, target: Any, task: str,
                      plan: Dict[str, Any], patch: Sequence[int], val_cfg: Any,
                      amp_dtype: Any) -> Dict[str, List[float]]:
        """Metrics of one held-out case (lists per class), with the model already in eval mode."""
        raise NotImplementedError

    def summarize(self, rows: List[Dict[str, List[float]]], plan: Dict[str, Any], val_cfg: Any) -> Dict[str, Any]:
        """One task's validation entry from its cases' rows; holds ``score``."""
        raise NotImplementedError
