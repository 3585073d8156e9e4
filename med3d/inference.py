"""Prediction on new scans, returned and written in the scan's own geometry.

Each scan goes through the plan stored in the checkpoint (crop, normalise, resample), MONAI
sliding-window inference with Gaussian blending (optionally averaged over mirrored copies),
then back: class probabilities resampled to the cropped grid, un-cropped into the full grid,
and the label map written with the input's shape, spacing, origin and direction.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data.image import Geometry, Image, read_channels
from .data.preprocess import preprocess, restore_probabilities
from .engine.validate import sliding_window
from .errors import Med3DError
from .models.multitask import MultiTaskModel

PathLike = Union[str, Path]


@dataclass
class Prediction:
    labels: np.ndarray  # (Z, Y, X) integer label map on the input grid
    probabilities: np.ndarray  # (K, Z, Y, X) softmax on the input grid
    geometry: Geometry
    task: str


@dataclass
class Predictor:
    model: MultiTaskModel
    meta: Dict[str, Any]
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: PathLike, device: Optional[str] = None) -> "Predictor":
        from .checkpoint import load_checkpoint

        model, _, meta = load_checkpoint(path)
        if not meta.get("plans"):
            raise Med3DError(f"{path}: checkpoint has no preprocessing plan (was it written by med3d pretrain / "
                             "finetune?); predict needs the plan to prepare scans as in training")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.to(dev).eval(), meta, dev)

    def task(self, task: Optional[str]) -> str:
        tasks = list(self.meta["plans"])
        if task is None:
            if len(tasks) != 1:
                raise Med3DError(f"the checkpoint has tasks {', '.join(tasks)}; choose one with --task")
            return tasks[0]
        if task not in self.meta["plans"]:
            raise Med3DError(f"--task {task}: not in the checkpoint (tasks: {', '.join(tasks)})")
        return task

    def _plan_for(self, image: Image, task: str, where: str) -> Dict[str, Any]:
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

    @torch.no_grad()
    def __call__(self, image: Image, task: Optional[str] = None, overlap: float = 0.5, mirror: bool = False,
                 sw_batch_size: int = 2, where: str = "input") -> Prediction:
        task = self.task(task)
        plan = self._plan_for(image, task, where)
        data, _, props = preprocess(image, None, plan)
        if plan.get("channels") is not None:
            data = data[plan["channels"]]
        x = torch.from_numpy(np.ascontiguousarray(data))[None].to(self.device)
        amp = torch.bfloat16 if self.device.type == "cuda" else None
        patch = self.meta.get("patch_size") or [64, 64, 64]
        axes_sets = [()] + ([c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)] if mirror else [])
        probs = None
        for axes in axes_sets:
            xin = torch.flip(x, axes) if axes else x
            logits = sliding_window(self.model, xin, task, patch, overlap, sw_batch_size, amp)
            p = torch.softmax(logits, 1)
            p = torch.flip(p, axes) if axes else p
            probs = p if probs is None else probs + p
        probs = (probs / len(axes_sets))[0].cpu().numpy()
        full = restore_probabilities(probs, props, plan)
        labels = full.argmax(0).astype(np.uint8 if full.shape[0] < 256 else np.int16)
        return Prediction(labels, full, image.geometry, task)


def predict(model_or_checkpoint: Union[PathLike, Predictor], image: Union[PathLike, Sequence[PathLike], Image],
            task: Optional[str] = None, **kw: Any) -> Prediction:
    """Segment one scan (a path, per-channel paths, a DICOM folder or an ``Image``); for notebooks."""
    predictor = model_or_checkpoint if isinstance(model_or_checkpoint, Predictor) \
        else Predictor.from_checkpoint(model_or_checkpoint)
    if not isinstance(image, Image):
        paths = [image] if isinstance(image, (str, Path)) else list(image)
        image = read_channels(paths)
        kw.setdefault("where", str(paths[0]))
    return predictor(image, task, **kw)


def collect_inputs(inputs: Sequence[PathLike]) -> List[Tuple[str, List[Path]]]:
    """``(case_id, files)`` for files, DICOM series folders, plain image folders and dataset folders."""
    from .data.datalist import cases_from_folder, read_dataset
    from .data.image import strip_suffix

    out: List[Tuple[str, List[Path]]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            out.append((path.name, [path]))  # reported as missing when read
        elif path.is_dir() and (path / "dataset.json").is_file():
            info = read_dataset(path)
            cases = info.test_cases or info.cases
            out += [(c.case_id, list(c.images)) for c in cases]
        elif path.is_dir() and _is_dicom_series(path):
            out.append((path.name, [path]))
        elif path.is_dir():
            out += [(c.case_id, list(c.images)) for c in cases_from_folder(path)]
        else:
            out.append((strip_suffix(path), [path]))
    return out


def _is_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
