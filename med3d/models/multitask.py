"""One shared encoder, one named head per task."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..errors import Med3DError
from ..registry import HEADS
from .resnet3d import ResNet3D


class MultiTaskModel(nn.Module):
    """A shared encoder with a head per task; ``model(x, task="liver")`` runs the encoder once and that head."""

    def __init__(self, encoder: ResNet3D, heads: Optional[Mapping[str, nn.Module]] = None,
                 adapters: Optional[Mapping[str, int]] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads or {}))
        # Per-task input adapters: a 1x1x1 conv from the task's channels to the encoder's.
        self.adapters = nn.ModuleDict({t: nn.Conv3d(c, encoder.in_channels, 1) for t, c in (adapters or {}).items()})

    @property
    def tasks(self) -> list:
        return list(self.heads.keys())

    def add_head(self, task: str, head: nn.Module) -> None:
        """Attach a head for a new task (e.g. a new organ to fine-tune on)."""
        if task in self.heads:
            raise Med3DError(f"task '{task}' already has a head; remove it first")
        self.heads[task] = head

    def remove_head(self, task: str) -> nn.Module:
        """Detach and return the head of ``task``."""
        self._check_task(task)
        return self.heads.pop(task)

    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise Med3DError(f"no head for task '{task}'; the model has: {', '.join(self.heads) or 'none'}")

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        if task is None:
            if len(self.heads) != 1:
                raise Med3DError(f"the model has heads {', '.join(self.heads)}; name the task")
            task = next(iter(self.heads))
        self._check_task(task)
        if task in self.adapters:
            x = self.adapters[task](x)
        features = self.encoder(x)
        return self.heads[task](features, x.shape[2:])


def build_head(kind: str, encoder: ResNet3D, num_classes: int, **kw) -> nn.Module:
    """Build a registered head (``med3d``, ``unet``, ``classification``) for ``encoder``."""
    return HEADS.get(kind)(encoder.feature_info, num_classes, **kw)


def build_heads(encoder: ResNet3D, specs: Mapping[str, Mapping]) -> Dict[str, nn.Module]:
    """Heads from a ``{task: {type, num_classes, ...}}`` mapping."""
    heads = {}
    for task, spec in specs.items():
        options = {k: v for k, v in spec.items() if k not in ("type", "num_classes") and v is not None}
        try:
            heads[task] = build_head(spec["type"], encoder, spec["num_classes"], **options)
        except TypeError as err:  # an option this kind of head does not take
            raise Med3DError(f"model.heads.{task}: {spec['type']} head does not accept {sorted(options)} ({err})")
    return heads
