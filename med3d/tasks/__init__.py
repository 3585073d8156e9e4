"""Task kinds: what a head is trained for decides its loss and its validation metric.

Each kind is one module with one object registered here; the trainer asks for a task's kind by
its head type and never hard-codes a loss or a metric: segmentation (``med3d``, ``unet`` heads)
and image-level classification (``classification`` heads).
"""
from __future__ import annotations

from typing import Dict

from ..errors import Med3DError
from .base import TaskKind
from .classification import CLASSIFICATION
from .segmentation import SEGMENTATION

KINDS: Dict[str, TaskKind] = {SEGMENTATION.name: SEGMENTATION, CLASSIFICATION.name: CLASSIFICATION}


def kind_for_head(head_type: str, where: str) -> TaskKind:
    """The task kind that trains heads of ``head_type``.

    Args:
        head_type: a registered head name (``med3d``, ``unet``, ``classification``, ...).
        where: the config key to name in an error (``model.heads.<task>.type``).

    Returns:
        The kind whose ``head_types`` include ``head_type``.

    Raises:
        Med3DError: no trainable kind takes this head.
    """
    for kind in KINDS.values():
        if head_type in kind.head_types:
            return kind
    trainable = sorted(h for k in KINDS.values() for h in k.head_types)
    raise Med3DError(f"{where}: '{head_type}' heads cannot be trained by med3d yet; trainable head types: "
                     f"{', '.join(trainable)}")
