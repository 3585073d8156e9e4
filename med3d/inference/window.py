"""Whole-volume network passes: Gaussian-blended sliding windows, mirroring TTA, and mode-safe evaluation.

Both ``med3d predict`` and training's validation call these, so a validation score is what
prediction would give on the same preprocessed volume.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import Med3DError

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


@torch.no_grad()  # never part of training: no graph over a whole volume's windows
def sliding_window(model: nn.Module, image: torch.Tensor, task: str, patch: Sequence[int], overlap: float,
                   sw_batch_size: int, amp_dtype: Optional[torch.dtype] = None, normalise: bool = True) -> torch.Tensor:
    """Float32 logits for a whole ``(1, C, Z, Y, X)`` volume, windows blended with Gaussian weights.

    The windows, their Gaussian weights and the zero padding of a volume smaller than a window are
    MONAI's (``dense_patch_slices``, ``compute_importance_map``), so the result is what
    ``monai.inferers.sliding_window_inference(..., mode="gaussian")`` returns. The stitching is
    leaner: one fused multiply-add per window, and with ``normalise=False`` no weight sum and no
    division, for callers that only take the argmax. On a GPU without room for the blended volume
    (``room_for_blend``, or out of memory on the way) the volume is blended again by MONAI's
    adaptive inferer, which stitches slabs on the GPU and keeps the result in host memory.

    Args:
        model: a multi-task model called as ``model(x, task)``.
        image: the preprocessed volume, already on the model's device.
        task: which head to run.
        patch: window size (z, y, x) in voxels, the training patch size.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        amp_dtype: autocast dtype (bf16/fp16) or None for float32.
        normalise: divide by the summed weights (the blended logits). Without it every voxel's scores
            are its blended logits times one positive number, the same for all classes: the same argmax.

    Returns:
        Logits ``(1, K, Z, Y, X)`` in float32 on ``image``'s device (on the CPU after a fallback).

    Raises:
        Med3DError: not one volume, an overlap outside [0, 1) or fewer than one window per pass.
    """
    _check_window_args(image, overlap, sw_batch_size)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x, task).float()

    try:
        return _blend(run, image, patch, overlap, sw_batch_size, normalise)
    except _NoRoom:
        pass
    except torch.OutOfMemoryError:
        if not image.is_cuda:
            raise
        # Blended again below, out of this block: its traceback holds the GPU buffers.
    if image.is_cuda:
        torch.cuda.empty_cache()
    from monai.inferers import SlidingWindowInfererAdapt

    host = SlidingWindowInfererAdapt(roi_size=tuple(patch), sw_batch_size=sw_batch_size, overlap=overlap,
                                     mode="gaussian", cpu_thresh=0)  # 0: stitch on the host from the start
    return host(image, run)


class _NoRoom(Exception):
    """The blended volume would not fit on the GPU beside the network."""


def _check_window_args(image: torch.Tensor, overlap: float, sw_batch_size: int) -> None:
    if image.ndim != 5 or image.shape[0] != 1:
        raise Med3DError(f"sliding window: one volume (1, C, Z, Y, X) at a time, got shape {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise Med3DError(f"sliding window: overlap {overlap} is outside [0, 1)")
    if sw_batch_size < 1:
        raise Med3DError(f"sliding window: sw_batch_size {sw_batch_size}; at least 1 window per pass")


def _blend(run: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, patch: Sequence[int], overlap: float,
           sw_batch_size: int, normalise: bool) -> torch.Tensor:
    """``sliding_window``'s blend on ``image``'s device (raises ``_NoRoom`` on a GPU without room for it)."""
    from monai.data.utils import compute_importance_map, dense_patch_slices

    size = image.shape[2:]
    x, pad = _pad_to_window(image, patch)
    padded = x.shape[2:]
    step = [p if p == s else max(1, int(p * (1 - overlap))) for p, s in zip(patch, padded)]
    windows = dense_patch_slices(padded, patch, step)
    weight = compute_importance_map(tuple(patch), mode="gaussian", device=x.device)[None]
    out = None
    for first in range(0, len(windows), sw_batch_size):
        batch = [(slice(None), *w) for w in windows[first:first + sw_batch_size]]
        logits = run(torch.cat([x[(slice(None), *w)] for w in batch]))
        if out is None:  # the class count is known from the first batch
            if not room_for_blend(x.device, logits.shape[1] + int(normalise), padded):
                raise _NoRoom()
            out = torch.zeros((logits.shape[1], *padded), device=x.device)
        for where, scores in zip(batch, logits):
            out[where].addcmul_(scores, weight)
        del logits, scores
    if normalise:
        out /= _weight_sum(windows, weight, padded)
    if x is image:
        return out[None]
    region = tuple(slice(lo, lo + n) for lo, n in zip(pad, size))
    return out[(slice(None), *region)].clone()[None]  # a copy: the padded buffer is freed


def _pad_to_window(image: torch.Tensor, patch: Sequence[int]) -> Tuple[torch.Tensor, List[int]]:
    """``image`` zero-padded to at least one window per axis, split evenly as MONAI does; and the padding before."""
    before, spec = [], []
    for n, p in zip(image.shape[2:], patch):
        extra = max(0, p - n)
        before.append(extra // 2)
        spec = [extra // 2, extra - extra // 2] + spec  # F.pad lists the last axis first
    return (torch.nn.functional.pad(image, spec) if any(spec) else image), before


def _weight_sum(windows: List[Tuple[slice, ...]], weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """How much Gaussian weight each voxel received over all windows (one channel)."""
    total = torch.zeros((1, *size), device=weight.device)
    for w in windows:
        total[(slice(None), *w)] += weight
    return total


def room_for_blend(device: torch.device, channels: int, size: Sequence[int], share: float = 0.5) -> bool:
    """Whether ``channels`` float32 volumes of ``size`` fit in ``share`` of ``device``'s available memory.

    Always on a CPU. On a GPU, available is what the driver reports free plus what PyTorch's
    allocator holds unused (freed by training steps or earlier passes, reusable here); the other
    part is left to the network's activations.
    """
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return 4 * channels * int(torch.Size(size).numel()) <= share * (free + cached)


def add_pass(total: Optional[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """``total + p`` in place for averaging passes; on the host once one pass had to be blended there."""
    if total is None:
        return p
    if total.device != p.device:
        total, p = total.cpu(), p.cpu()
    return total.add_(p)


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
    total = None
    for axes in axes_sets:
        x = torch.flip(image, axes) if axes else image
        p = softmax_(sliding_window(model, x, task, patch, overlap, sw_batch_size, amp_dtype))
        del x
        p = torch.flip(p, axes) if axes else p
        total = add_pass(total, p)
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
