"""Patches for the self-supervised kinds: restoration pairs and contrastive views of one scan.

A ``contrastive`` task sees two views of one scan: two crops around the same point (each shifted
by up to a quarter patch, so they overlap but differ), each through its own draw of MONAI
augmentations (flips, quarter turns, a small affine, intensity scale / shift / gamma, noise, blur). Held-out
scans get the same from a generator seeded by the case, so validation is repeatable.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.sampler import crop_patch
from .corruptions import CorruptionRates, corrupt


def view_transform(patch: Sequence[int]) -> Any:
    """The MONAI augmentations each contrastive view of a ``patch``-sized crop is drawn through.

    Args:
        patch: the crop size (z, y, x); quarter turns are in the (y, x) plane, and only when it is square.

    Returns:
        A MONAI ``Compose`` of array transforms on ``(C, Z, Y, X)`` tensors.
    """
    from monai import transforms as T

    rot = float(np.deg2rad(15))
    turns = [T.RandRotate90(prob=0.5, max_k=3, spatial_axes=(1, 2))] if patch[1] == patch[2] else []
    return T.Compose([
        *(T.RandFlip(prob=0.5, spatial_axis=a) for a in range(3)),
        *turns,
        # Affine resampling and blurring cost the most on CPU: drawn less often than the rest.
        T.RandAffine(prob=0.2, rotate_range=(rot, rot, rot), scale_range=(0.15,) * 3, padding_mode="zeros"),
        T.RandScaleIntensity(factors=0.25, prob=0.8),
        T.RandShiftIntensity(offsets=0.25, prob=0.8),
        T.RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
        T.RandGaussianNoise(prob=0.3, std=0.1),
        T.RandGaussianSmooth(prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
    ])


def center_crop(data: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The central ``size`` voxels of ``data`` ``(C, Z, Y, X)``, zero-padded where the volume is smaller."""
    region, pads = [slice(None)], [(0, 0)]
    for n, p in zip(data.shape[1:], size):
        lo = max(0, (n - p) // 2)
        region.append(slice(lo, lo + min(n, p)))
        before = max(0, (p - n) // 2)
        pads.append((before, max(0, p - n - before)))
    out = np.array(data[tuple(region)], dtype=np.float32)
    return np.pad(out, pads) if any(a or b for a, b in pads) else out


def random_patch(data: np.ndarray, patch: Sequence[int], rng: np.random.Generator,
                 channels: Optional[Sequence[int]] = None) -> np.ndarray:
    """A patch anywhere in the volume (zero-padded where the volume is smaller), channels selected."""
    seg = np.zeros((1, *data.shape[1:]), dtype=np.int8)  # crop_patch cuts a label too; none here
    img, _ = crop_patch(data, seg, None, patch, rng)
    return img[list(channels)] if channels is not None else img


def restore_pair(original: np.ndarray, rng: np.random.Generator,
                 rates: CorruptionRates) -> Tuple[np.ndarray, np.ndarray]:
    """``(corrupted input, original target)`` of one patch."""
    return corrupt(original, rng, rates), original


def two_views(data: np.ndarray, patch: Sequence[int], rng: np.random.Generator, transform: Any,
              channels: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Two augmented crops of one scan around a common random point.

    Args:
        data: the cached volume ``(C, Z, Y, X)`` (may be memory-mapped).
        patch: the crop size.
        rng: the random source (crop positions and the augmentations' seeds).
        transform: ``view_transform(patch)``.
        channels: the task's channel selection, or None.

    Returns:
        Both views as float32 arrays of shape ``(C, *patch)``.
    """
    seg = np.zeros((1, *data.shape[1:]), dtype=np.int8)
    center = [int(rng.integers(0, n)) for n in data.shape[1:]]
    views = []
    for _ in range(2):
        img, _ = crop_patch(data, seg, center, patch, rng)  # shifted by up to a quarter patch per axis
        if channels is not None:
            img = img[list(channels)]
        transform.set_random_state(seed=int(rng.integers(2 ** 31)))
        out = transform(torch.from_numpy(img))
        views.append(np.asarray(torch.as_tensor(out).as_subclass(torch.Tensor), dtype=np.float32))
    return views[0], views[1]


def ssl_batch(kind: str, cases: Sequence[Any], load: Any, patch: Sequence[int], micro: int,
              rng: np.random.Generator, rates: CorruptionRates, transform: Any, augment: Any = None,
              channels: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """One micro-batch of a self-supervised task.

    ``restore``: ``image`` is ``micro`` corrupted patches and ``label`` their originals (float).
    ``contrastive``: ``image`` is the first views of ``micro`` scans followed by their second views
    (``2 * micro`` samples) and ``label`` the scan index of each (0..micro-1, twice), which tells
    the loss which samples are pairs.

    Args:
        kind: ``restore`` or ``contrastive``.
        cases: the task's training cases.
        load: ``case -> cached volume`` (memory-mapped).
        patch, micro: patch size and scans per micro-batch.
        rng: the micro-batch's generator.
        rates: restore's corruption probabilities.
        transform: contrastive's view augmentations.
        augment: restore: the run's MONAI dictionary augmentation of the original patch, or None.
        channels: the task's channel selection, or None.

    Returns:
        ``{"image": ..., "label": ...}``.
    """
    images, labels = [], []
    for _ in range(micro):
        data = load(cases[int(rng.integers(len(cases)))])
        if kind == "contrastive":
            images.append(two_views(data, patch, rng, transform, channels))
            continue
        original = random_patch(data, patch, rng, channels)
        if augment is not None:
            augment.set_random_state(seed=int(rng.integers(2 ** 31)))
            seg = torch.zeros((1, *original.shape[1:]), dtype=torch.int64)
            out = augment({"image": torch.from_numpy(original), "label": seg})["image"]
            original = np.asarray(torch.as_tensor(out).as_subclass(torch.Tensor), dtype=np.float32)
        corrupted, target = restore_pair(original, rng, rates)
        images.append(corrupted)
        labels.append(target)
    if kind == "contrastive":
        first, second = zip(*images)
        return {"image": torch.from_numpy(np.stack([*first, *second])),
                "label": torch.arange(micro).repeat(2)}
    return {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(np.stack(labels))}
