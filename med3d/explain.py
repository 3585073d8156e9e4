"""Class-activation maps (Grad-CAM, Grad-CAM++): which parts of a scan raised a class's score.

Grad-CAM weights the feature maps of one encoder stage by the gradient of a class score and keeps
the positive part; MONAI computes it (``monai.visualize``) and upsamples it to the network input.
From there the map goes back to the scan's own grid the way a prediction does (``inference.restore``)
and is scaled to [0, 1], so it overlays the scan in any viewer.

A classification head scores each class directly. A segmentation head has no single score per
class, so a class's score is its logit averaged over the volume (the sum, scaled): the map shows what
raised that class anywhere in the scan, not why one voxel was labelled.

The network sees what ``med3d predict`` gives it: for a segmentation task the whole scan prepared by
the checkpoint's plan (crop, normalise, resample), in one forward and backward pass rather than
sliding windows, because a class's score is taken over the whole volume, so memory grows with the
volume (see ``max_voxels``); for a classification task the plan's region around the ROI centre, cut
to the training patch, whose map is zero outside that region on the scan's grid.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.image import Image
from . import values as V
from .errors import Med3DError
from .inference.predictor import Predictor
from .inference.restore import restore_probabilities
from .choices import EXPLAIN_LAYERS as LAYERS, EXPLAIN_MAX_VOXELS as DEFAULT_MAX_VOXELS
from .choices import EXPLAIN_METHODS as METHODS
from .inference.window import evaluating
from .plotting import pyplot, save_png
from .preview import lps_view

PathLike = Union[str, Path]
log = logging.getLogger(__name__)


@dataclass
class ExplainResult:
    """What ``explain`` wrote for one scan."""

    case: str
    task: str
    class_index: int  # the class explained
    score: float  # its score: the logit (classification) or its mean over the volume (segmentation)
    peak_zyx: Tuple[int, int, int]  # voxel of the map's maximum on the scan's grid
    cam_path: Path  # <case>_cam.nii.gz: float32 map in [0, 1] on the scan's grid
    png_path: Optional[Path]  # <case>_cam.png (None without matplotlib)


class ClassScores(nn.Module):
    """``model(x, task)`` as the ``(B, K)`` class scores that MONAI's CAM classes call ``nn_module(x)`` for.

    Classification logits are the scores; segmentation logits ``(B, K, Z, Y, X)`` are averaged over the volume.

    Args:
        model: a multi-task model.
        task: the head to explain.
        foreground_only: score background as -inf, so that MONAI's argmax picks the largest foreground
            class of a segmentation head (no effect on classification heads).
    """

    def __init__(self, model: nn.Module, task: str, foreground_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.foreground_only = foreground_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x, self.task)
        if logits.ndim == 2:
            return logits
        # The mean ranks classes as the sum does and gives Grad-CAM the same map; unlike the sum it stays
        # small enough for Grad-CAM++, which takes exp(score).
        scores = logits.flatten(2).mean(2)
        if self.foreground_only and scores.shape[1] > 1:
            scores = torch.cat([torch.full_like(scores[:, :1], float("-inf")), scores[:, 1:]], dim=1)
        return scores


def _cam_class(method: str) -> type:
    from monai.visualize import GradCAM, GradCAMpp

    if method not in METHODS:
        raise Med3DError(f"--method {method}: unknown; choose {' or '.join(METHODS)}")
    return GradCAM if method == "gradcam" else GradCAMpp


def _target_layer(layer: str) -> str:
    """The module MONAI hooks, named inside ``ClassScores`` (the stem's output is the encoder's first ReLU)."""
    if layer not in LAYERS:
        raise Med3DError(f"--layer {layer}: unknown; choose one of {', '.join(LAYERS)}")
    return "model.encoder.relu" if layer == "stem" else f"model.encoder.{layer}"


@contextlib.contextmanager
def _hooks_removed_after(module: nn.Module) -> Iterator[None]:
    """Take off the hooks MONAI puts on ``module`` (it keeps no handles) and give back its ``inplace`` flag.

    Without this every call would leave a forward and a backward hook on the caller's model.
    """
    before = {name: set(getattr(module, name)) for name in ("_forward_hooks", "_backward_hooks")}
    inplace = getattr(module, "inplace", None)
    try:
        yield
    finally:
        for name, keys in before.items():
            hooks = getattr(module, name)
            for key in set(hooks) - keys:
                del hooks[key]
        if inplace is not None:
            module.inplace = inplace


def aligned_upsampler(stride: Sequence[int]) -> Callable[[Sequence[int]], Callable[[torch.Tensor], torch.Tensor]]:
    """An ``upsampler`` for MONAI's CAM that puts feature ``i`` of a stage at input voxel ``stride * i``.

    The encoder's strided convolutions and pooling (odd kernels padded by half) centre feature ``i`` on
    input voxel ``stride * i``; MONAI's default (``align_corners=False``) centres it on
    ``stride * i + (stride - 1) / 2``, which would shift the map by 3.5 voxels per axis at a stride of 8.

    Args:
        stride: the stage's stride per axis (z, y, x), from the encoder's ``feature_info``.

    Returns:
        ``upsampler(input_size)(cam)``, as MONAI calls it.
    """
    def for_size(size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def up(cam: torch.Tensor) -> torch.Tensor:
            exact = [s * (n - 1) + 1 for s, n in zip(stride, cam.shape[2:])]
            cam = F.interpolate(cam, size=exact, mode="trilinear", align_corners=True)
            cam = cam[:, :, : size[0], : size[1], : size[2]]  # the cells over the model's own padding
            # Past the last feature centre the map is held constant, as the default's edge handling does.
            pads = [p for n, want in zip(reversed(cam.shape[2:]), reversed(list(size))) for p in (0, want - n)]
            return F.pad(cam, pads, mode="replicate") if any(pads) else cam
        return up
    return for_size


def _upsampler(model: nn.Module, layer: str) -> Callable:
    from monai.visualize.visualizer import default_upsampler

    info = getattr(getattr(model, "encoder", None), "feature_info", None)
    return aligned_upsampler(info[LAYERS.index(layer)].stride) if info else default_upsampler


def _num_classes(model: nn.Module, task: str, in_channels: int) -> int:
    """How many classes ``task``'s head scores, from one pass over a tiny input.

    Args:
        model: a multi-task model.
        task: the head.
        in_channels: channels of the network input for this task.

    Returns:
        K, the head's output channels.
    """
    size = getattr(model, "task_divisibility", lambda t: (8, 8, 8))(task)
    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model):
        return int(model(torch.zeros(1, in_channels, *size, device=device), task).shape[1])


def _check_class(class_index: Optional[int], k: int) -> None:
    if class_index is not None and not 0 <= class_index < k:
        raise Med3DError(f"--class {class_index}: out of range; the head has {k} classes (0..{k - 1})")


def explain_tensor(model: nn.Module, x: torch.Tensor, task: str, class_index: Optional[int] = None,
                   method: str = "gradcam", layer: str = "layer4") -> Tuple[torch.Tensor, int, float]:
    """``class_activation_map`` that also says which class it explained and that class's score.

    Args:
        model, x, task, class_index, method, layer: as for ``class_activation_map``.

    Returns:
        The map ``(B, 1, Z, Y, X)``, the class index and its score (summed over the batch).

    Raises:
        Med3DError: as for ``class_activation_map``.
    """
    cam_cls, target = _cam_class(method), _target_layer(layer)
    if class_index is None and x.shape[0] != 1:
        raise Med3DError(f"input batch of {x.shape[0]}: the default class is chosen per volume; pass a class "
                         "index or one volume at a time")
    _check_class(class_index, _num_classes(model, task, x.shape[1]))
    hooked = model.get_submodule(target.split(".", 1)[1])
    with _hooks_removed_after(hooked), evaluating(model), torch.inference_mode(False), torch.enable_grad():
        # In eval mode, so that MONAI (which puts the wrapper back in its mode afterwards) leaves it there.
        scorer = ClassScores(model, task, foreground_only=class_index is None).eval()
        # x requires grad so the graph reaches the target layer even when the encoder is frozen.
        x = x.detach().clone().requires_grad_(True)
        cam = cam_cls(nn_module=scorer, target_layers=target, upsampler=_upsampler(model, layer),
                      postprocessing=lambda m: m)  # scaled later, on the scan's grid
        acti_map = cam(x, class_idx=class_index).detach()
        chosen = int(cam.nn_module.class_idx) if class_index is None else class_index
        score = float(cam.nn_module.score.detach().sum())
    model.zero_grad(set_to_none=True)  # drop the parameter gradients the backward pass left
    if not torch.isfinite(acti_map).all():
        raise Med3DError(f"--method {method}: the map is not finite for class {chosen} (score {score:.4g}); "
                         "use --method gradcam")
    return acti_map, chosen, score


def class_activation_map(model: nn.Module, x: torch.Tensor, task: str, class_index: Optional[int] = None,
                         method: str = "gradcam", layer: str = "layer4") -> torch.Tensor:
    """Grad-CAM (or Grad-CAM++) of one class for a network input.

    Args:
        model: a multi-task model, called as ``model(x, task)``; its modes and hooks are left as they were.
        x: the preprocessed input ``(B, C, Z, Y, X)`` on the model's device.
        task: the head to explain (classification or segmentation).
        class_index: the class; None picks the predicted class (classification) or the foreground class
            with the largest mean logit (segmentation), and then needs ``B == 1``.
        method: ``gradcam`` or ``gradcam++``.
        layer: the encoder stage whose features are weighted: ``stem``, ``layer1`` .. ``layer4``.

    Returns:
        The map ``(B, 1, Z, Y, X)`` on ``x``'s grid: non-negative, not normalised (``explain`` scales it).

    Raises:
        Med3DError: unknown method or layer, class index out of range, no head for ``task``, no class
            index for a batch of several volumes, or a map that is not finite (Grad-CAM++ overflowing).
    """
    return explain_tensor(model, x, task, class_index, method, layer)[0]


Job = Tuple[str, List[Path], Optional[Path], Optional[Sequence[float]]]  # case, files, ROI mask, ROI centre
ToScanGrid = Callable[[np.ndarray], np.ndarray]


def _segmentation_input(predictor: Predictor, image: Image, task: str, where: str) -> Tuple[torch.Tensor, ToScanGrid]:
    """The whole scan as ``Predictor`` prepares it (crop, normalise, resample), and the way back (``restore``)."""
    x, props, plan = predictor.prepare(image, task, where)
    # Restored as the foreground channel of a two-class map: resampled like a probability, zero outside the crop.
    return x, lambda cam: restore_probabilities(np.stack([np.zeros_like(cam), cam]), props, plan)[1]


def _network_input(predictor: Predictor, image: Image, task: str, where: str,
                   center_mm: Optional[Sequence[float]]) -> Tuple[torch.Tensor, ToScanGrid]:
    """The network input for ``image`` as prediction builds it, and a function that puts a map on its grid
    back on the scan's grid (zero where the network saw nothing of the scan)."""
    from .inference.classify import is_classifier, network_region
    from .inference.restore import resample_onto

    if not is_classifier(predictor, task):
        return _segmentation_input(predictor, image, task, where)
    x, grid, _ = network_region(predictor, image, task, center_mm, where)  # the ROI region, cut to the patch
    return x, lambda cam: resample_onto(cam, grid, image.geometry)


def _unit(cam: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] by its maximum (zero stays zero: no evidence), float32."""
    top = float(cam.max())
    return (cam / top if top > 0 else cam).astype(np.float32)


def _check_size(x: torch.Tensor, where: str, max_voxels: Optional[int]) -> None:
    voxels = int(np.prod(x.shape[2:]))
    if max_voxels is not None and voxels > max_voxels:
        raise Med3DError(f"{where}: network input of {tuple(x.shape[2:])} voxels ({voxels / 1e6:.1f} M) exceeds "
                         f"--max-voxels {max_voxels}; raise it if memory allows (one pass over the whole volume)")


def save_cam_png(image: np.ndarray, cam: np.ndarray, peak: Sequence[int], spacing_zyx: Sequence[float],
                 path: PathLike, title: str = "", direction: Optional[Sequence[float]] = None) -> Optional[Path]:
    """Axial, coronal and sagittal slices through ``peak`` with the map blended over the image.

    Args:
        image: one channel of the scan, ``(Z, Y, X)``.
        cam: the map in [0, 1] on the same grid.
        peak: the (z, y, x) voxel the slices go through.
        spacing_zyx: voxel size, for the aspect ratio.
        path: the PNG to write (atomically).
        title: figure title.
        direction: the grid's direction, to show every scan in one orientation (``preview.lps_view``);
            None: as stored.

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    plt = pyplot(warn=True)
    if plt is None:
        return None
    if direction is not None:
        (image, cam), spacing_zyx, peak = lps_view([image, cam], direction, spacing_zyx, peak)

    z, y, x = peak
    sz, sy, sx = spacing_zyx
    lo, hi = np.percentile(image, [1, 99])
    flipped_z = image.shape[0] - 1 - z  # coronal and sagittal views put the top slice at the top
    views = [("axial", np.s_[z, :, :], sy / sx, (x, y)), ("coronal", np.s_[::-1, y, :], sz / sx, (x, flipped_z)),
             ("sagittal", np.s_[::-1, :, x], sz / sy, (y, flipped_z))]
    heat = plt.get_cmap("jet")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, (name, sl, aspect, (px, py)) in zip(axes, views):
        ax.imshow(image[sl], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        rgba = heat(cam[sl])
        rgba[..., 3] = 0.6 * cam[sl]  # weak responses stay see-through
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        ax.plot([px], [py], "w+", markersize=10)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    return save_png(fig, path, dpi=80)


def _jobs(paths: Sequence[PathLike], classifier: bool, center_mm: Optional[Sequence[float]],
          roi_masks: Optional[Sequence[PathLike]]) -> List[Job]:
    """One job per scan, with its ROI for a classification task (as ``med3d predict`` reads them)."""
    from .inference.inputs import collect_inputs, roi_jobs

    if not classifier and (center_mm is not None or roi_masks):
        raise Med3DError("--center / --roi-mask: this task segments the whole scan; ROIs are for classification "
                         "tasks")
    if classifier:
        return roi_jobs(paths, center_mm, roi_masks)
    return [(case, files, None, None) for case, files in collect_inputs(paths)]


def _explain_case(predictor: Predictor, job: Job, out: Path, task: str, class_index: Optional[int], method: str,
                  layer: str, max_voxels: Optional[int], overwrite: bool,
                  series: Optional[str] = None) -> ExplainResult:
    from .data.classification import ClassCase, roi_center_mm
    from .data.image import read_channels, write_image

    case, files, mask, center = job
    cam_path, png_path = out / f"{case}_cam.nii.gz", out / f"{case}_cam.png"
    for path in (cam_path, png_path):
        if path.exists() and not overwrite:  # before the work rather than when writing
            raise Med3DError(f"{path}: already exists; pass --overwrite to replace it")
    image = read_channels(files, series=series)
    if center is None and mask is not None:
        center = roi_center_mm(ClassCase(case, list(files), None, mask=mask), image)
    x, to_scan_grid = _network_input(predictor, image, task, str(files[0]), center)
    _check_size(x, str(files[0]), max_voxels)
    cam, chosen, score = explain_tensor(predictor.model, x, task, class_index, method, layer)
    full = _unit(to_scan_grid(cam[0, 0].float().cpu().numpy()))
    peak = tuple(int(i) for i in np.unravel_index(int(full.argmax()), full.shape))
    write_image(cam_path, full, image.geometry, overwrite=overwrite)
    plan = predictor.meta["plans"][task]
    name = (plan.get("classes") or plan.get("labels") or {}).get(str(chosen), "")
    png = save_cam_png(image.array[0], full, peak, image.geometry.spacing_zyx, png_path,
                       title=f"{case}: {task} class {chosen}{f' ({name})' if name else ''}, {method} at {layer}",
                       direction=image.geometry.direction)
    return ExplainResult(case, task, chosen, score, peak, cam_path, png)  # type: ignore[arg-type]


def explain(checkpoint: PathLike, images: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
            task: Optional[str] = None, class_index: Optional[int] = None, method: str = "gradcam",
            layer: str = "layer4", center_mm: Optional[Sequence[float]] = None,
            roi_masks: Optional[Sequence[PathLike]] = None, device: Optional[str] = None,
            max_voxels: Optional[int] = DEFAULT_MAX_VOXELS, overwrite: bool = True,
            series: Optional[str] = None) -> List[ExplainResult]:
    """Write a class-activation map per scan: ``<case>_cam.nii.gz`` on the scan's grid and ``<case>_cam.png``.

    Args:
        checkpoint: a med3d checkpoint with preprocessing plans (from pretrain / finetune).
        images: image files, DICOM series folders, image folders or dataset folders (as for predict).
        out_dir: where the maps go.
        task: the head to explain (None: the checkpoint's only task).
        class_index: the class (None: the predicted class, or for segmentation the foreground class with
            the largest mean logit over the volume).
        method: ``gradcam`` or ``gradcam++``.
        layer: the encoder stage: ``stem``, ``layer1`` .. ``layer4`` (deeper: coarser, more class-specific).
        center_mm: classification: the ROI centre of the one scan, world (x, y, z) mm, LPS (as for predict).
        roi_masks: classification: a mask per scan whose centroid is the ROI centre. A classification
            dataset given as the only input brings each case's own ROI.
        device: ``cpu`` or ``cuda``; None picks CUDA when available.
        max_voxels: refuse scans whose network input has more voxels (None: no limit).
        overwrite: replace existing outputs.
        series: the SeriesInstanceUID to read from DICOM folders that hold several (as ``--series`` of
            predict; a folder holding several is refused without it).

    Returns:
        One result per scan, in input order.

    Raises:
        Med3DError: missing or plan-less checkpoint (or an ONNX export), unknown task, method or layer, class index out of
            range, ROI options for a segmentation task or not one per scan, no scans found, an unreadable
            scan (a DICOM folder of several series without ``series``, or without that series) or one that
            does not fit the task (the first one stops the run; maps already written
            stay), a volume over ``max_voxels``, or an existing output without ``overwrite``.
    """
    from .inference.classify import is_classifier

    _cam_class(method), _target_layer(layer)  # refuse bad options before any work
    if max_voxels is not None:
        V.at_least(1)(max_voxels, "--max-voxels")
    if center_mm is not None:
        V.each(V.in_range, 3)(center_mm, "--center")
    if str(checkpoint).lower().endswith(".onnx"):  # before anything is read
        raise Med3DError(f"{checkpoint}: an ONNX export; explain reads the network's layers and gradients, "
                         "which only the PyTorch checkpoint it was exported from has: explain with that instead")
    predictor = Predictor.from_checkpoint(checkpoint, device)
    task = predictor.task(task)
    plan = predictor.meta["plans"][task]
    n_in = len(plan["channels"]) if plan.get("channels") is not None else len(plan["channel_names"])
    _check_class(class_index, _num_classes(predictor.model, task, n_in))
    paths = [images] if isinstance(images, (str, Path)) else list(images)
    jobs = _jobs(paths, is_classifier(predictor, task), center_mm, roi_masks)
    if not jobs:
        raise Med3DError("no input scans found in " + ", ".join(str(p) for p in paths))
    return [_explain_case(predictor, job, Path(out_dir), task, class_index, method, layer, max_voxels, overwrite,
                          series) for job in jobs]
