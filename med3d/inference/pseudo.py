"""Pseudo-labels: a trained model's label maps and per-voxel confidence, for a student to learn from.

``med3d pseudo-label`` runs a segmentation checkpoint over scans without labels and writes, for
each scan in its own geometry, the label map and a confidence map: the probability of the chosen
class (the maximum of the softmax), multiplied, with ``--mirror``, by the share of the 8 mirrored
predictions whose label agrees with the averaged one. ``pseudo_labels.json``, written last, lists
the scans with their image files and the teacher, so that ``data.datasets.<task>.pseudo`` can train
a student on them (``med3d.data.pseudo``) with voxels under a confidence threshold left out of the loss.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.image import Geometry, Image
from ..errors import Med3DError
from ..values import check_prediction
from .predictor import DEFAULT_PATCH, Predictor
from .restore import restore_labels_and_confidence, restore_volume
from .window import add_pass, mirror_axes, sliding_window, softmax_

MANIFEST = "pseudo_labels.json"
FORMAT = "med3d-pseudo-labels"


@dataclass
class PseudoLabel:
    """One scan's pseudo-label on its own grid."""

    labels: np.ndarray  # (Z, Y, X) class indices
    confidence: np.ndarray  # (Z, Y, X) float32 in [0, 1]
    geometry: Geometry
    task: str


def _votes_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int16


def averaged_probabilities(model: Any, x: torch.Tensor, task: str, patch: Sequence[int], overlap: float,
                           sw_batch_size: int, amp: Optional[torch.dtype], mirror: bool
                           ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Softmax ``(K, z, y, x)`` on the plan grid, averaged over mirrored copies when ``mirror``, and then the
    share of copies whose argmax agrees with the average's (None without ``mirror``).

    Args:
        model: called as ``model(x, task)``.
        x: the preprocessed ``(1, C, z, y, x)`` volume.
        task, patch, overlap, sw_batch_size, amp: as for ``window.sliding_window``.
        mirror: average the 8 mirrored copies and measure their agreement.

    Returns:
        Float32 probabilities and the agreement (float32 in [1/8, 1]) as numpy arrays.
    """
    axes_sets = mirror_axes(mirror)
    total, votes = None, []
    for axes in axes_sets:
        p = softmax_(sliding_window(model, torch.flip(x, axes) if axes else x, task, patch, overlap, sw_batch_size,
                                    amp))
        p = torch.flip(p, axes) if axes else p
        if mirror:  # each copy's labels, one byte a voxel, to count agreement once the average is known
            votes.append(p[0].argmax(0).to(_votes_dtype(p.shape[1])).cpu())
        total = add_pass(total, p)
        del p
    total = total.div_(len(axes_sets))[0].cpu()
    if not mirror:
        return total.numpy(), None
    final = total.argmax(0).to(votes[0].dtype)
    agreement = torch.zeros(final.shape, dtype=torch.float32)
    for vote in votes:
        agreement += vote == final
    return total.numpy(), agreement.div_(len(votes)).numpy()


@torch.inference_mode()
def pseudo_label(predictor: Predictor, image: Image, task: Optional[str] = None, overlap: float = 0.5,
                 sw_batch_size: int = 2, mirror: bool = False, where: str = "input") -> PseudoLabel:
    """Label map and confidence of one scan, on its own grid.

    Args:
        predictor: a segmentation checkpoint (``Predictor.from_checkpoint``).
        image: the scan.
        task: which head (None: the checkpoint's only task).
        overlap: sliding-window overlap in [0, 1).
        sw_batch_size: windows per forward pass.
        mirror: average the 8 mirrored copies; the confidence is then the averaged probability of the
            chosen class times the share of copies that agree with it.
        where: how errors name the scan.

    Returns:
        The pseudo-label.

    Raises:
        Med3DError: a classification task, or a scan whose channels do not fit the task.
    """
    check_prediction(image, overlap, sw_batch_size, where)
    task = predictor.task(task)
    if predictor.meta["plans"][task].get("kind") == "classification":
        raise Med3DError(f"task {task}: a classification head; pseudo-labels are label maps, so give a "
                         "segmentation checkpoint or task")
    x, props, plan = predictor.prepare(image, task, where)
    amp = torch.bfloat16 if predictor.device.type == "cuda" else None
    patch = predictor.meta.get("patch_size") or DEFAULT_PATCH
    probs, agreement = averaged_probabilities(predictor.model, x, task, patch, overlap, sw_batch_size, amp, mirror)
    del x
    labels, confidence = restore_labels_and_confidence(probs, props, plan)
    del probs
    if agreement is not None:
        confidence *= restore_volume(agreement, props, plan, outside=1.0)
    np.clip(confidence, 0.0, 1.0, out=confidence)  # trilinear resampling stays in range; float rounding need not
    return PseudoLabel(labels, confidence, image.geometry, task)


def output_names(case_id: str) -> Tuple[str, str]:
    """The label and confidence files of a case in the output folder."""
    return f"{case_id}.nii.gz", f"{case_id}_confidence.nii.gz"


def case_record(case_id: str, files: Sequence[Path], series: Optional[str], result: PseudoLabel) -> Dict[str, Any]:
    """A case's entry in ``pseudo_labels.json``: its image files (absolute), outputs and a summary."""
    label_name, conf_name = output_names(case_id)
    counts = np.zeros(int(result.labels.max()) + 1, np.int64)
    for z in range(result.labels.shape[0]):  # a slice at a time: no int64 copy of a whole label map
        counts += np.bincount(result.labels[z].reshape(-1), minlength=len(counts))
    return {"case_id": case_id, "images": [str(Path(f).resolve()) for f in files], "series": series,
            "label": label_name, "confidence": conf_name,
            "mean_confidence": float(result.confidence.mean(dtype=np.float64)),
            "voxels_per_class": {str(k): int(v) for k, v in enumerate(counts) if v}}


def file_stamp(path: str) -> List[int]:
    """Size and mtime (ns) of a file: taken before a checkpoint is read, it names the weights that were used."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def teacher_record(checkpoint: str, stamp: List[int], task: str, labels: Dict[str, str], mirror: bool,
                   overlap: float) -> Dict[str, Any]:
    """Who made the pseudo-labels and how: the checkpoint (resolved, with its stamp), its task and labels, and,
    from the run folder it sits in (``RUN/checkpoints/``), the dataset and the training cases it learnt
    from, so that a student can refuse validation cases its teacher saw."""
    path = Path(checkpoint).resolve()
    record = {"checkpoint": str(path), "stamp": stamp, "task": task, "labels": labels, "mirror": mirror,
              "overlap": overlap, "confidence": "max_probability" + ("_x_mirror_agreement" if mirror else "")}
    return {**record, **_teacher_run(path.parent.parent, task)}


def _teacher_run(run: Path, task: str) -> Dict[str, Any]:
    """The dataset folder and training case ids of ``task`` in the run folder ``run`` (nothing when absent)."""
    import yaml

    try:
        split = json.loads((run / "split.json").read_text())[task]
        dataset = yaml.safe_load((run / "config.yaml").read_text())["data"]["datasets"][task]["path"]
        return {"dataset": str(dataset), "train_cases": list(split["train"])}
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return {}


def manifest(teacher: Dict[str, Any], inputs: Sequence[str], cases: List[Dict[str, Any]],
             failed: Sequence[str] = ()) -> Dict[str, Any]:
    """The content of ``pseudo_labels.json``: the teacher, the inputs as given (resolved), each case, and the
    scans that failed (a set with failures is incomplete: the rounds runner makes it again)."""
    return {"format": FORMAT, "version": 1, "teacher": teacher, "inputs": [str(Path(i).resolve()) for i in inputs],
            "cases": cases, "failed": list(failed)}


def write_pseudo_labels(checkpoint: str, inputs: Sequence[str], out: str, task: Optional[str] = None,
                        mirror: bool = False, overlap: float = 0.5, sw_batch_size: int = 2,
                        device: Optional[str] = None, series: Optional[str] = None, overwrite: bool = False,
                        progress: bool = True) -> Tuple[Dict[str, Any], List[str]]:
    """Pseudo-label every scan of ``inputs`` into ``out``: label and confidence maps, then ``pseudo_labels.json``.

    Output checks come first (``out`` outside the inputs, no output replacing an input or, without
    ``overwrite``, an existing file), so a refused run writes nothing. A scan that fails is reported and
    left out of the manifest; the others are written.

    Args:
        checkpoint: a segmentation checkpoint (or its ONNX export).
        inputs: image files, DICOM series folders, image folders or dataset folders (their test images,
            else their training images).
        out: the output folder.
        task: which head (None: the only one).
        mirror, overlap, sw_batch_size: as for ``pseudo_label``.
        device: ``cpu`` or ``cuda`` (None: CUDA when available).
        series: the DICOM series to read from folders holding several.
        overwrite: replace earlier outputs.
        progress: show a progress bar.

    Returns:
        The manifest written, and ``"case: error"`` per scan that failed.

    Raises:
        Med3DError: a bad output folder, no input scan, or a checkpoint that is not a segmentation model.
    """
    from tqdm import tqdm

    from ..atomic import write_json_atomic
    from ..data.image import read_channels, write_image
    from ..paths import check_output_dir, check_targets
    from ..values import check_window
    from .inputs import collect_inputs

    check_window(overlap, sw_batch_size)
    folder = check_output_dir(out, inputs)
    cases = collect_inputs(inputs)
    if not cases:
        raise Med3DError("no input scans found in " + ", ".join(str(i) for i in inputs))
    targets = [folder / MANIFEST] + [folder / n for case, _ in cases for n in output_names(case)]
    check_targets(targets, [*(f for _, files in cases for f in files), checkpoint])
    if not overwrite:
        existing = [t for t in targets if t.exists()]
        if existing:
            raise Med3DError(f"{existing[0]}: already exists; pass --overwrite to replace the pseudo-labels there")
    stamp = file_stamp(checkpoint)  # the file as it is before it is read
    predictor = Predictor.from_checkpoint(checkpoint, device)
    task = predictor.task(task)
    if predictor.meta["plans"][task].get("kind") == "classification":  # before anything in --out is touched
        raise Med3DError(f"task {task}: a classification head; pseudo-labels are label maps, so give a "
                         "segmentation checkpoint or task")
    teacher = teacher_record(checkpoint, stamp, task, predictor.meta["plans"][task]["labels"], mirror, overlap)
    # An old manifest would vouch for label files while they are being replaced: gone until the new one.
    (folder / MANIFEST).unlink(missing_ok=True)
    records, failed = [], []
    for case_id, files in tqdm(cases, desc="pseudo-label", unit="case", disable=not progress):
        try:
            image = read_channels(files, series=series)
            result = pseudo_label(predictor, image, task, overlap, sw_batch_size, mirror, where=str(files[0]))
            label_name, conf_name = output_names(case_id)
            write_image(folder / label_name, result.labels, result.geometry, overwrite=True)
            write_image(folder / conf_name, result.confidence, result.geometry, overwrite=True)
            records.append(case_record(case_id, files, series, result))
        except Med3DError as err:
            failed.append(f"{case_id}: {err}")
            tqdm.write(f"error: {err}")
    record = manifest(teacher, inputs, records, failed)
    write_json_atomic(folder / MANIFEST, record)  # last: the folder is complete once it names its cases
    return record, failed
