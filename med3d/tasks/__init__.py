"""Task kinds: what a head is trained for decides its loss and its validation metric.

Each kind is one module with one object registered here; the trainer asks for a task's kind by
its head type and never hard-codes a loss or a metric: segmentation (``med3d``, ``unet`` heads),
image-level classification (``classification`` heads), and two self-supervised kinds that learn
from unlabelled scans: Models Genesis restoration (``restore`` heads) and contrastive views
(``contrastive`` heads).
"""
from __future__ import annotations

from typing import Any, Dict

from ..errors import Med3DError
from .base import TaskKind
from .classification import CLASSIFICATION
from .contrastive import CONTRASTIVE
from .restore import RESTORE
from .segmentation import SEGMENTATION

KINDS: Dict[str, TaskKind] = {k.name: k for k in (SEGMENTATION, CLASSIFICATION, RESTORE, CONTRASTIVE)}
SELF_SUPERVISED = (RESTORE.name, CONTRASTIVE.name)  # kinds trained on unlabelled scans


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


def self_supervised_line(entry: Dict[str, Any]) -> str:
    """A self-supervised task's validation entry in words (restoration or retrieval), for log lines."""
    if "restoration" in entry:
        return (f"restoration {entry['restoration']:.3f} (MSE {entry['mse']:.4f}, corrupted "
                f"{entry['corrupted_mse']:.4f}; {entry['cases']} held-out scans)")
    return (f"view retrieval top-1 {entry['top1']:.3f} (cosine: pairs {entry['positive_cosine']:.3f}, others "
            f"{entry['negative_cosine']:.3f}; {entry['cases']} held-out scans)")
