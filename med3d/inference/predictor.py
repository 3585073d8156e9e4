"""Prediction on new scans, returned in the scan's own geometry.

Each scan goes through the plan stored in the checkpoint (crop, normalise, resample), sliding-
window inference with Gaussian blending (optionally averaged over mirrored copies), then back
to the input grid (``restore``): the label map always, full-size probabilities only on request.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.image import Geometry, Image, read_channels, strip_suffix
from ..data.preprocess import preprocess
from ..device import resolve_device
from ..errors import Med3DError
from ..values import check_prediction, check_scan
from ..models.multitask import MultiTaskModel
from .restore import restore_labels, restore_probabilities
from .window import sliding_window, softmax_tta

PathLike = Union[str, Path]
DEFAULT_PATCH = [64, 64, 64]


@dataclass
class Prediction:
    """One scan's prediction on its own grid."""

    labels: np.ndarray  # (Z, Y, X) integer label map on the input grid
    probabilities: Optional[np.ndarray]  # (K, Z, Y, X) softmax on the input grid, when asked for
    geometry: Geometry
    task: str


@dataclass
class Predictor:
    """A model in eval mode with the plans and window it was trained with."""

    model: MultiTaskModel
    meta: Dict[str, Any]
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: PathLike, device: Optional[str] = None) -> "Predictor":
        """Rebuild the model of a med3d training checkpoint.

        Args:
            path: a checkpoint written by ``med3d pretrain`` / ``finetune``, or an ``.onnx`` export of one
                (``med3d export --format onnx``; run by onnxruntime, see ``onnx_runtime``).
            device: ``cpu`` or ``cuda``; None picks CUDA when available.

        Returns:
            The predictor.

        Raises:
            Med3DError: an unknown or absent device, or the file is no med3d checkpoint or carries no
                preprocessing plan.
        """
        from ..checkpoint import load_checkpoint

        if str(path).lower().endswith(".onnx"):  # an ONNX export: onnxruntime replaces only the network call
            from .onnx_runtime import onnx_predictor

            return onnx_predictor(path, device)
        dev = resolve_device(device)  # before reading the file: a wrong device costs nothing
        model, _, meta = load_checkpoint(path)
        if not meta.get("plans"):
            raise Med3DError(f"{path}: checkpoint has no preprocessing plan (was it written by med3d pretrain / "
                             "finetune?); predict needs the plan to prepare scans as in training")
        return cls(model.to(dev).eval(), meta, dev)

    def window_threads(self) -> ContextManager[None]:
        """The threading the sliding window runs under: PyTorch's as set (``OnnxPredictor`` changes it)."""
        return contextlib.nullcontext()

    def task(self, task: Optional[str]) -> str:
        """The task to predict: ``task`` checked against the checkpoint, or its only task."""
        tasks = list(self.meta["plans"])
        if task is None:
            if len(tasks) != 1:
                raise Med3DError(f"the checkpoint has tasks {', '.join(tasks)}; choose one with --task")
            task = tasks[0]
        if task not in self.meta["plans"]:
            raise Med3DError(f"--task {task}: not in the checkpoint (tasks: {', '.join(tasks)})")
        kind = self.meta["plans"][task].get("kind")
        if kind in ("restore", "contrastive"):  # their heads reconstruct or embed: no labels to write
            predictors = [t for t in tasks if self.meta["plans"][t].get("kind") not in ("restore", "contrastive")]
            raise Med3DError(f"task {task}: a self-supervised '{kind}' head, which predicts no labels; choose a "
                             f"segmentation or classification task with --task (this checkpoint's: "
                             f"{', '.join(predictors) or 'none'}), or fine-tune its encoder first")
        return task

    def plan_for(self, image: Image, task: str, where: str) -> Dict[str, Any]:
        """``task``'s plan for a scan with ``image``'s channels (all of the training channels, or the ones it read).

        Raises:
            Med3DError: the channel count fits neither.
        """
        plan = dict(self.meta["plans"][task])
        n_plan, chosen = len(plan["channel_names"]), plan.get("channels")
        if image.channels == n_plan:
            return plan
        if chosen is not None and image.channels == len(chosen):
            # The scan holds just the channels the model reads: normalise them as those channels.
            plan["normalization"] = [plan["normalization"][c] for c in chosen]
            plan["channels"] = None
            return plan
        want = f"{n_plan}" + (f" (or the {len(chosen)} it reads)" if chosen is not None else "")
        raise Med3DError(f"{where}: {image.channels} channel(s), but task {task} was trained on {want} "
                         f"({', '.join(plan['channel_names'])})")

    def prepare(self, image: Image, task: str, where: str = "input"
                ) -> Tuple[torch.Tensor, Dict[str, Any], Dict[str, Any]]:
        """A scan as the network sees it under ``task``'s plan (crop, normalise, resample, channels).

        Returns:
            ``(1, C, Z, Y, X)`` on this predictor's device, what ``restore`` needs to go back to the
            scan's grid, and the plan used.

        Raises:
            Med3DError: the scan's channel count does not fit the task.
        """
        plan = self.plan_for(image, task, where)
        data, _, props = preprocess(image, None, plan)
        if plan.get("channels") is not None:
            data = data[plan["channels"]]
        return torch.from_numpy(np.ascontiguousarray(data))[None].to(self.device), props, plan

    @torch.inference_mode()
    def __call__(self, image: Image, task: Optional[str] = None, overlap: float = 0.5, mirror: bool = False,
                 sw_batch_size: int = 2, where: str = "input", probabilities: bool = False) -> Prediction:
        """Segment one scan.

        Args:
            image: the scan, ``(C, Z, Y, X)`` with its geometry.
            task: which head (None: the checkpoint's only task).
            overlap: sliding-window overlap in [0, 1).
            mirror: average over the 8 mirrored copies (test-time augmentation).
            sw_batch_size: windows per forward pass.
            where: how errors name the scan (its path).
            probabilities: also return full-size class probabilities (K float32 volumes).

        Returns:
            The prediction on the scan's own grid.

        Raises:
            Med3DError: the scan's channel count does not fit the task.
        """
        check_prediction(image, overlap, sw_batch_size, where)  # the API's and CLI's values, before any work
        task = self.task(task)
        x, props, plan = self.prepare(image, task, where)
        amp = torch.bfloat16 if self.device.type == "cuda" else None
        patch = self.meta.get("patch_size") or DEFAULT_PATCH
        with self.window_threads():
            if probabilities or mirror or props["resampled_shape"] != props["cropped_shape"]:
                scores = softmax_tta(self.model, x, task, patch, overlap, sw_batch_size, amp, mirror)
            else:
                # Labels alone on the scan's own grid: the argmax of the blended logits is the argmax of the
                # softmax, and needs no division by the summed window weights either.
                scores = sliding_window(self.model, x, task, patch, overlap, sw_batch_size, amp, normalise=False)
        del x
        scores = scores[0].cpu().numpy()
        labels = restore_labels(scores, props, plan)
        full = restore_probabilities(scores, props, plan) if probabilities else None
        return Prediction(labels, full, image.geometry, task)


def predict(model_or_checkpoint: Union[PathLike, Predictor], image: Union[PathLike, Sequence[PathLike], Image],
            task: Optional[str] = None, series: Optional[str] = None, **kw: Any) -> Any:
    """Segment or classify one scan (a path, per-channel paths, a DICOM folder or an ``Image``); for notebooks.

    Args:
        model_or_checkpoint: a checkpoint path or a ``Predictor`` (reuse it for many scans).
        image: the scan.
        task: which head (None: the only one).
        series: the SeriesInstanceUID to read from a DICOM folder that holds several (``--series`` of
            ``med3d predict``); a folder holding several is refused without it.
        **kw: ``Predictor.__call__`` options (overlap, mirror, sw_batch_size, probabilities) for a
            segmentation task; ``center_mm`` (the ROI centre, world x, y, z mm, LPS) for a
            classification task.

    Returns:
        A ``Prediction`` on the scan's own grid, or for a classification task the class
        probabilities (``med3d.inference.classify.ClassProbabilities``).

    Raises:
        Med3DError: an unreadable scan (a DICOM folder of several series without ``series``, or without
            that series), ``series`` with an ``Image`` already read, or a scan that does not fit the task.
    """
    from .classify import classify, is_classifier

    if series is not None and isinstance(image, Image):
        raise Med3DError("series: chooses a series in a DICOM folder; this scan is an Image already read, give "
                         "the folder instead")

    predictor = model_or_checkpoint if isinstance(model_or_checkpoint, Predictor) \
        else Predictor.from_checkpoint(model_or_checkpoint)
    if not isinstance(image, Image):
        if not isinstance(image, (str, Path, list, tuple)):  # e.g. a bare array: it has no geometry to predict in
            check_scan(image)
        paths = [image] if isinstance(image, (str, Path)) else list(image)
        image = read_channels(paths, series=series)
        kw.setdefault("where", str(paths[0]))
        kw.setdefault("case_id", strip_suffix(paths[0]))
    if is_classifier(predictor, predictor.task(task)):
        return classify(predictor, image, task, kw.get("center_mm"), kw.get("case_id", "case"),
                        kw.get("where", "input"))
    kw.pop("case_id", None)
    return predictor(image, task, **kw)
