"""One shared encoder, one named head per task."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import Med3DError
from ..registry import HEADS
from .resnet3d import ResNet3D, Triple


def pad_to_multiple(x: torch.Tensor, divisibility: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of ``x`` (N, C, D, H, W) at their far ends up to multiples of ``divisibility``.

    The amounts are computed from ``x.shape`` with operations that tracing records, so an ONNX or
    TorchScript export pads whatever size it is given (not only the traced one).

    Args:
        x: the batch.
        divisibility: per spatial axis.

    Returns:
        ``x`` itself when no axis needs padding, else the padded batch.
    """
    if all(d == 1 for d in divisibility):
        return x
    pads: List[Any] = []
    for size, d in zip(reversed(x.shape[2:]), reversed(list(divisibility))):
        pads += [0, (d - size % d) % d]  # F.pad lists the last axis first
    # Skipping a zero pad saves a copy of the batch, but a tracer would freeze that choice: always pad there.
    if not torch.jit.is_tracing() and not any(pads):
        return x
    return F.pad(x, pads)


def crop_to(y: torch.Tensor, size: Sequence[Any]) -> torch.Tensor:
    """The first ``size`` voxels of each spatial axis of ``y`` (undoes ``pad_to_multiple``)."""
    return y[:, :, : size[0], : size[1], : size[2]]


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

    def task_divisibility(self, task: str) -> Triple:
        """Per axis (D, H, W): the input sizes ``task``'s head needs (1 where any size works).

        Raises:
            Med3DError: the model has no head for ``task``.
        """
        self._check_task(task)
        return tuple(getattr(self.heads[task], "size_divisibility", (1, 1, 1)))  # type: ignore[return-value]

    @property
    def size_divisibility(self) -> Triple:
        """Per axis (D, H, W): input sizes that suit every head; training patches should be multiples of it.

        The least common multiple of the heads' needs, which they derive from the encoder's
        stage strides (``encoder.size_divisibility`` is the strictest a head can ask); the
        encoder's own when there are no heads yet. ``forward`` pads other sizes up to it.
        """
        if not self.heads:
            return self.encoder.size_divisibility
        out = (1, 1, 1)
        for task in self.heads:
            out = tuple(math.lcm(a, b) for a, b in zip(out, self.task_divisibility(task)))  # type: ignore[assignment]
        return out

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        """Logits of ``task``'s head (the only head when None) for the batch ``x`` (N, C, D, H, W).

        A spatial size that is not a multiple of the head's ``size_divisibility`` is zero-padded
        up to one and the logits cropped back, so every size gives aligned outputs; exports keep
        this behaviour (the padding follows the input's shape).

        Raises:
            Med3DError: no such task, or the model has several heads and none is named.
        """
        if task is None:
            if len(self.heads) != 1:
                raise Med3DError(f"the model has heads {', '.join(self.heads)}; name the task")
            task = next(iter(self.heads))
        self._check_task(task)
        if task in self.adapters:
            x = self.adapters[task](x)
        size = x.shape[2:]
        x = pad_to_multiple(x, self.task_divisibility(task))
        out = self.heads[task](self.encoder(x), x.shape[2:])
        return crop_to(out, size) if out.ndim == x.ndim else out


def build_head(kind: str, encoder: ResNet3D, num_classes: int, where: Optional[str] = None, **kw: Any) -> nn.Module:
    """Build a registered head (``med3d``, ``unet``, ``classification``, ...) for ``encoder``.

    Args:
        kind: the registered head type.
        encoder: the encoder whose ``feature_info`` the head is built for.
        num_classes: output channels.
        where: config key prefix for errors, e.g. ``model.heads.liver``.
        **kw: the head's other declared arguments.

    Returns:
        The head.

    Raises:
        Med3DError: unknown head type, or an argument that head does not declare.
    """
    return HEADS.build(kind, encoder.feature_info, where=where, num_classes=num_classes, **kw)


def build_heads(encoder: ResNet3D, specs: Mapping[str, Mapping[str, Any]]) -> Dict[str, nn.Module]:
    """Heads from a ``{task: {type, num_classes, ...}}`` mapping (``model.heads`` of a resolved config).

    Raises:
        Med3DError: naming ``model.heads.<task>.<key>`` for an argument the head type does not declare.
    """
    heads = {}
    for task, spec in specs.items():
        options = {k: v for k, v in spec.items() if k not in ("type", "num_classes")}
        heads[task] = build_head(spec.get("type", "med3d"), encoder, spec.get("num_classes", 2),
                                 where=f"model.heads.{task}", **options)
    return heads
