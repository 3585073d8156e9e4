"""Ensembles: several checkpoints trained on one plan (e.g. the folds of a cross-validation), averaged.

Segmentation averages the members' softmax on the preprocessed grid before the argmax (nnU-Net's
rule for fold ensembles); classification averages the class probabilities. Every member must carry
the same plan for the task (same preprocessing, channels and window), since the scan is prepared once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..atomic import write_json_atomic
from ..data.image import Image
from ..errors import Med3DError
from ..values import check_prediction
from .classify import ClassProbabilities, classify, network_region
from .predictor import DEFAULT_PATCH, Prediction, Predictor
from .restore import restore_labels, restore_probabilities
from .window import softmax_tta

PathLike = Union[str, Path]
# What has to agree between members for one prepared input to serve them all.
PLAN_KEYS = ("plan_hash", "kind", "channels", "target_spacing", "normalization", "classes", "labels")


def _plan_key(meta: Dict[str, Any], task: str) -> Dict[str, Any]:
    plan = meta["plans"][task]
    return {k: plan.get(k) for k in PLAN_KEYS}


def check_same_plan(first: Predictor, other: Predictor, first_path: str, other_path: str) -> None:
    """Refuse members whose tasks, plans or windows differ from the first member's.

    Raises:
        Med3DError: naming the checkpoint and what differs.
    """
    if sorted(first.meta["plans"]) != sorted(other.meta["plans"]):
        raise Med3DError(f"{other_path}: its tasks ({', '.join(other.meta['plans'])}) differ from {first_path}'s "
                         f"({', '.join(first.meta['plans'])}); ensemble checkpoints trained on the same plan")
    for task in first.meta["plans"]:
        a, b = _plan_key(first.meta, task), _plan_key(other.meta, task)
        differ = [k for k in PLAN_KEYS if a[k] != b[k]]
        if differ:
            raise Med3DError(f"{other_path}: task {task}'s plan differs from {first_path}'s ({differ[0]} "
                             f"{b[differ[0]]!r} vs {a[differ[0]]!r}); ensemble checkpoints trained on the same plan")
    if (first.meta.get("patch_size") or DEFAULT_PATCH) != (other.meta.get("patch_size") or DEFAULT_PATCH):
        raise Med3DError(f"{other_path}: patch size {other.meta.get('patch_size')} differs from {first_path}'s "
                         f"{first.meta.get('patch_size')}; ensemble checkpoints trained on the same plan")


@dataclass
class Ensemble:
    """Predictors whose probabilities are averaged; used like a ``Predictor`` by ``med3d predict``."""

    members: List[Predictor]
    paths: List[str]

    @classmethod
    def from_checkpoints(cls, paths: Sequence[PathLike], device: Optional[str] = None) -> "Ensemble":
        """Load every checkpoint and check they share the plan.

        Args:
            paths: two or more med3d training checkpoints (one works too).
            device: ``cpu`` or ``cuda``; None picks CUDA when available.

        Returns:
            The ensemble.

        Raises:
            Med3DError: a file is no med3d checkpoint, or the plans differ.
        """
        names = [str(p) for p in paths]
        members = [Predictor.from_checkpoint(p, device) for p in names]
        for member, path in zip(members[1:], names[1:]):
            check_same_plan(members[0], member, names[0], path)
        return cls(members, names)

    @property
    def meta(self) -> Dict[str, Any]:
        return self.members[0].meta

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def task(self, task: Optional[str]) -> str:
        """The task to predict (as ``Predictor.task``)."""
        return self.members[0].task(task)

    @torch.inference_mode()
    def __call__(self, image: Image, task: Optional[str] = None, overlap: float = 0.5, mirror: bool = False,
                 sw_batch_size: int = 2, where: str = "input", probabilities: bool = False) -> Prediction:
        """Segment one scan with the members' averaged softmax (arguments as ``Predictor.__call__``).

        Returns:
            The prediction on the scan's own grid.

        Raises:
            Med3DError: the scan's channel count does not fit the task.
        """
        check_prediction(image, overlap, sw_batch_size, where)
        task = self.task(task)
        x, props, plan = self.members[0].prepare(image, task, where)  # one plan: one prepared input for all
        amp = torch.bfloat16 if self.device.type == "cuda" else None
        patch = self.meta.get("patch_size") or DEFAULT_PATCH
        total = None
        for m in self.members:
            with m.window_threads():
                p = softmax_tta(m.model, x, task, patch, overlap, sw_batch_size, amp, mirror)[0].cpu()
            total = p if total is None else total.add_(p)
        probs = total.div_(len(self.members)).numpy()
        labels = restore_labels(probs, props, plan)
        full = restore_probabilities(probs, props, plan) if probabilities else None
        return Prediction(labels, full, image.geometry, task)

    @torch.inference_mode()
    def classify(self, image: Image, task: Optional[str] = None, center_mm: Optional[Sequence[float]] = None,
                 case_id: str = "case", where: str = "input") -> ClassProbabilities:
        """The members' averaged class probabilities for one scan (arguments as ``inference.classify.classify``).

        Raises:
            Med3DError: the task segments, or the channels do not fit.
        """
        task = self.task(task)
        x, _, used = network_region(self.members[0], image, task, center_mm, where)
        probs = torch.stack([torch.softmax(m.model(x, task).float(), 1)[0].cpu() for m in self.members])
        return ClassProbabilities(case_id, probs.mean(0).numpy(), used)

    def record(self, task: str) -> Dict[str, Any]:
        """Which models made the predictions, for ``ensemble.json`` beside them."""
        return {"task": task, "rule": "mean of the members' softmax probabilities, then argmax",
                "members": [{"checkpoint": str(Path(p).resolve()), "sha256": _sha256(Path(p)),
                             "job": m.meta.get("job")} for p, m in zip(self.paths, self.members)],
                "plan_hash": self.meta["plans"][task].get("plan_hash")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_models(checkpoint: PathLike, extra: Sequence[PathLike] = (), device: Optional[str] = None
                ) -> Union[Predictor, Ensemble]:
    """One checkpoint's ``Predictor``, or with ``extra`` checkpoints their ``Ensemble``.

    Raises:
        Med3DError: a file is no med3d checkpoint, or the plans differ.
    """
    if not extra:
        return Predictor.from_checkpoint(checkpoint, device)
    return Ensemble.from_checkpoints([checkpoint, *extra], device)


def classify_scan(models: Union[Predictor, Ensemble], image: Image, task: str, center_mm: Any, case_id: str,
                  where: str) -> ClassProbabilities:
    """Class probabilities from one checkpoint or an ensemble."""
    if isinstance(models, Ensemble):
        return models.classify(image, task, center_mm, case_id, where)
    return classify(models, image, task, center_mm, case_id, where)


def write_record(models: Union[Predictor, Ensemble], task: str, out: Path) -> Optional[Path]:
    """``out/ensemble.json`` naming the members, for an ensemble (nothing for a single checkpoint)."""
    if not isinstance(models, Ensemble):
        return None
    return write_json_atomic(out / "ensemble.json", models.record(task))

