"""Whole-volume network passes: Gaussian-blended sliding windows, mirroring TTA, and mode-safe evaluation.

Both ``med3d predict`` and training's validation call these, so a validation score is what
prediction would give on the same preprocessed volume.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# Spatial axes of a (N, C, Z, Y, X) tensor; every non-empty subset is one mirrored copy.
_SPATIAL = (2, 3, 4)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then give each back exactly the mode it had.

    ``model.train()`` afterwards would switch frozen stages' BatchNorm back to training mode and
    let their running statistics drift; restoring per module keeps them as the trainer set them.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def mirror_axes(mirror: bool) -> List[Tuple[int, ...]]:
    """The flips averaged by test-time augmentation: none, or every subset of the three spatial axes."""
    if not mirror:
        return [()]
    return [()] + [c for r in (1, 2, 3) for c in itertools.combinations(_SPATIAL, r)]


def sliding_window(model: nn.Module, image: torch.Tensor, task: str, patch: Sequence[int], overlap: float,
                   sw_batch_size: int, amp_dtype: Optional[torch.dtype] = None, inferer: Any = None) -> torch.Tensor:
    """Float32 logits for a whole ``(1, C, Z, Y, X)`` volume, windows blended with Gaussian weights.

    Uses MONAI's ``SlidingWindowInfererAdapt``: on a GPU the blended output falls back to CPU
    stitching when the volume's output would not fit in GPU memory; on a CPU it is the plain inferer.

    Args:
        model: a multi-task model called as ``model(x, task)``.
        image: the preprocessed volume, already on the model's device.
        task: which head to run.
        patch: window size (z, y, x) in voxels, the training patch size.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        amp_dtype: autocast dtype (bf16/fp16) or None for float32.
        inferer: a ``make_inferer`` result to reuse (None: a new one).

    Returns:
        Logits ``(1, K, Z, Y, X)`` in float32 on ``image``'s device (or the CPU after a fallback).
    """
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x, task).float()

    return (inferer or make_inferer(patch, overlap, sw_batch_size))(image, run)


def make_inferer(patch: Sequence[int], overlap: float, sw_batch_size: int) -> Any:
    """MONAI's adaptive sliding-window inferer; reuse one per volume, as it remembers a CPU-stitching fallback."""
    from monai.inferers import SlidingWindowInfererAdapt

    return SlidingWindowInfererAdapt(roi_size=tuple(patch), sw_batch_size=sw_batch_size, overlap=overlap,
                                     mode="gaussian", padding_mode="constant")


def softmax_tta(model: nn.Module, image: torch.Tensor, task: str, patch: Sequence[int], overlap: float,
                sw_batch_size: int, amp_dtype: Optional[torch.dtype] = None, mirror: bool = False) -> torch.Tensor:
    """Class probabilities ``(1, K, Z, Y, X)``, averaged over mirrored copies when ``mirror`` (8 passes).

    Args:
        model, image, task, patch, overlap, sw_batch_size, amp_dtype: as for ``sliding_window``.
        mirror: average the softmax of the volume flipped along every subset of the spatial axes.

    Returns:
        The averaged softmax, float32.
    """
    axes_sets = mirror_axes(mirror)
    inferer = make_inferer(patch, overlap, sw_batch_size)
    total = None
    for axes in axes_sets:
        x = torch.flip(image, axes) if axes else image
        p = softmax_(sliding_window(model, x, task, patch, overlap, sw_batch_size, amp_dtype, inferer))
        del x
        p = torch.flip(p, axes) if axes else p
        total = p if total is None else total.add_(p.to(total.device))  # a pass may have fallen back to the CPU
        del p
    return total.div_(len(axes_sets)) if len(axes_sets) > 1 else total


# Voxels (times classes) per slab of the in-place softmax: its temporaries stay a few MB.
_SOFTMAX_SLAB = 1 << 22


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis of ``(N, K, Z, Y, X)`` logits, written over them slab by slab along z.

    ``torch.softmax`` would allocate a second ``K``-channel volume; each voxel's softmax depends
    on that voxel alone, so slabs give the same values (up to one float32 ulp, from the vectorised
    exp's tail handling) with temporaries of one slab.

    Returns:
        ``logits``, now holding probabilities.
    """
    step = max(1, _SOFTMAX_SLAB // max(1, logits[0, :, 0].numel()))
    for z in range(0, logits.shape[2], step):
        slab = logits[:, :, z:z + step]
        slab.copy_(torch.softmax(slab, 1))
    return logits
