"""Applying a plan to one case: crop, normalise, resample (``inference.restore`` goes the way back).

Resampling runs through ``torch.nn.functional.interpolate``: trilinear for intensities and
probabilities, nearest for label maps. When a case is strongly anisotropic the coarse axis is
resampled separately with nearest interpolation (nnU-Net's rule), so thick slices are not
smeared into each other.

Memory is bounded by design: channels are normalised in place on one float32 output and resampled
one at a time, label maps are resampled by index lookup in their own dtype, and statistics and
lookups walk the volume in slabs (``SLAB_VOXELS``), so no step holds several float32 copies of a
volume at once (BENCHMARKS.md, "Memory").
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image
from .plan import ANISOTROPY_RATIO, crop, nonzero_bbox


# Voxels per slab when statistics or index lookups walk a volume: bounds the temporaries to a few MB.
SLAB_VOXELS = 1 << 22


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """``(Z, Y, X)`` mask of voxels non-zero in any channel of ``(C, Z, Y, X)``, one channel at a time."""
    mask = data[0] != 0
    for ch in range(1, data.shape[0]):
        mask |= data[ch] != 0
    return mask


def _masked_mean_std(x: np.ndarray, mask: np.ndarray) -> Tuple[float, float]:
    """Mean and standard deviation of ``x[mask]`` (all of ``x`` when the mask is empty), in float64 slabs.

    Two passes over z-slabs instead of ``x[mask].std()``, which would hold the selected values and
    their deviations (two more volume-sized arrays) at once.
    """
    if not mask.any():
        mask = np.ones_like(mask)
    step = max(1, SLAB_VOXELS // max(1, x[0].size))
    slabs = [slice(z, z + step) for z in range(0, x.shape[0], step)]
    n = int(np.count_nonzero(mask))
    mean = sum(float(x[s][mask[s]].sum(dtype=np.float64)) for s in slabs) / n
    var = sum(float(np.square(x[s][mask[s]] - mean, dtype=np.float64).sum()) for s in slabs) / n
    return mean, float(np.sqrt(var))


def normalize_channel(x: np.ndarray, entry: Dict[str, Any], nonzero: Optional[np.ndarray],
                      out: Optional[np.ndarray] = None) -> np.ndarray:
    """One ``(Z, Y, X)`` channel normalised by its plan entry, into ``out`` (a new float32 array when None).

    Every step runs in place on the output, so the channel costs one float32 copy and no temporaries.

    Args:
        x: the channel as read (any numeric dtype).
        entry: its ``plan["normalization"]`` entry (scheme ``ct``, ``zscore`` or ``none``).
        nonzero: the case's non-zero mask (``zscore`` needs it; see ``nonzero_mask``).
        out: where to write (float32, ``x``'s shape).

    Returns:
        ``out``.
    """
    out = np.empty(x.shape, np.float32) if out is None else out
    if entry["scheme"] == "ct":
        lo, hi = entry["clip"]
        np.clip(x, lo, hi, out=out, casting="unsafe")  # clips and casts to float32 in one pass
        out -= entry["mean"]
        out /= entry["std"]
        return out
    out[...] = x
    if entry["scheme"] == "zscore":
        # Per case inside the non-zero region; background stays exactly 0.
        mask = nonzero if nonzero is not None else out != 0
        mean, std = _masked_mean_std(out, mask)
        out -= np.float32(mean)
        out /= max(std, 1e-8)
        np.copyto(out, 0.0, where=~mask)
    return out


def normalize(data: np.ndarray, plan: Dict[str, Any]) -> np.ndarray:
    """Normalise each channel of ``(C, Z, Y, X)`` by its scheme (a new float32 array)."""
    needs_mask = any(e["scheme"] == "zscore" for e in plan["normalization"])
    nonzero = nonzero_mask(data) if needs_mask else None
    out = np.empty(data.shape, dtype=np.float32)
    for ch, entry in enumerate(plan["normalization"]):
        normalize_channel(data[ch], entry, nonzero, out[ch])
    return out


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> List[int]:
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def _separate_axis(spacing: Sequence[float], target: Sequence[float]) -> Optional[int]:
    for sp in (spacing, target):
        if max(sp) / min(sp) > ANISOTROPY_RATIO:
            return int(np.argmax(sp))
    return None


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` samples under ``nearest-exact`` resampling of ``n_in`` samples.

    Taken from ``torch.nn.functional.interpolate`` itself (on the indices 0..n_in-1), so a lookup
    with it picks exactly the voxels ``interpolate(mode="nearest-exact")`` picks.
    """
    idx = torch.arange(n_in, dtype=torch.float32)[None, None]  # float32: the scale PyTorch computes for float32 volumes
    return F.interpolate(idx, size=n_out, mode="nearest-exact")[0, 0].numpy().astype(np.intp)


def resample_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(C, Z, Y, X)`` resampled to ``shape`` by nearest neighbour, in its own dtype (one output array).

    The per-axis index lookup gives what ``interpolate(mode="nearest-exact")`` gives, without a
    float copy of the volume (label maps stay int8/int16) and without any one-hot expansion.
    """
    iz, iy, ix = (nearest_index(n, m) for n, m in zip(array.shape[1:], shape))
    out = np.empty((array.shape[0], *shape), array.dtype)
    step = max(1, SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))
    for ch in range(array.shape[0]):
        for z in range(0, len(iz), step):
            out[ch, z:z + step] = array[ch][np.ix_(iz[z:z + step], iy, ix)]
    return out


def resample_channel(x: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                     target: Sequence[float]) -> np.ndarray:
    """One float32 ``(Z, Y, X)`` channel resampled to ``shape``: trilinear, or in-plane trilinear and nearest
    along the coarse axis of an anisotropic case (nnU-Net's rule). Returns ``x`` itself when the shape fits."""
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape) == shape:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    axis = _separate_axis(spacing, target)
    if axis is None:
        return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    mid = list(shape)
    mid[axis] = x.shape[axis]
    t = F.interpolate(t, size=tuple(mid), mode="trilinear", align_corners=False)[0, 0].numpy() \
        if tuple(mid) != tuple(x.shape) else x
    if mid[axis] == shape[axis]:
        return t
    # Nearest along the coarse axis is a lookup of whole planes: no second interpolation pass.
    return np.take(t, nearest_index(x.shape[axis], shape[axis]), axis=axis)


def resample_pieces(x: np.ndarray, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
                    ) -> Iterator[Tuple[Tuple[slice, ...], np.ndarray]]:
    """``resample_channel(x, ...)`` in pieces: ``(where in the output, values)``, each computed on its own.

    An anisotropic case comes in slabs along its coarse axis (nearest along it, in-plane trilinear
    on just the planes a slab picks), with the same values as the whole; any other case comes whole.
    A caller that consumes one slab at a time then holds one slab, not one volume.
    """
    shape = tuple(int(s) for s in shape)
    axis = _separate_axis(spacing, target)
    if axis is None or tuple(x.shape) == shape:
        yield (slice(None),) * 3, resample_channel(x, shape, spacing, target)
        return
    idx = nearest_index(x.shape[axis], shape[axis])
    plane = int(np.prod(shape)) // shape[axis]
    step = max(1, SLAB_VOXELS // max(1, plane))
    for o in range(0, shape[axis], step):
        picked = np.take(x, idx[o:o + step], axis=axis)
        size = list(shape)
        size[axis] = picked.shape[axis]
        t = torch.from_numpy(np.ascontiguousarray(picked, dtype=np.float32))[None, None]
        out = F.interpolate(t, size=tuple(size), mode="trilinear", align_corners=False)[0, 0].numpy() \
            if tuple(size) != picked.shape else picked
        where = [slice(None)] * 3
        where[axis] = slice(o, o + picked.shape[axis])
        yield tuple(where), out


def resample(array: np.ndarray, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float],
             is_label: bool) -> np.ndarray:
    """Resample ``(C, Z, Y, X)`` to ``shape``; labels by nearest neighbour (their dtype kept), anything else
    trilinear (float32), one channel at a time."""
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[1:]) == shape:
        return array
    if is_label:
        return resample_nearest(array, shape)
    out = np.empty((array.shape[0], *shape), np.float32)
    for ch in range(array.shape[0]):
        out[ch] = resample_channel(array[ch], shape, spacing, target)
    return out


def preprocess(image: Image, label: Optional[np.ndarray], plan: Dict[str, Any]
               ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, Any]]:
    """Crop, normalise and resample one case. Returns data, label and what is needed to go back.

    One channel at a time: each is normalised into one float32 array, resampled, and dropped, so
    beside the input the peak is the output plus about two copies of one channel.
    """
    box = nonzero_bbox(image.array) if plan.get("crop_nonzero", True) else [(0, s) for s in image.array.shape[1:]]
    cropped = crop(image.array, box)
    spacing = image.geometry.spacing_zyx
    target = plan["target_spacing"]
    shape = new_shape(cropped.shape[1:], spacing, target)
    entries = plan["normalization"]
    nonzero = nonzero_mask(cropped) if any(e["scheme"] == "zscore" for e in entries) else None
    data = np.empty((cropped.shape[0], *shape), np.float32)
    for ch, entry in enumerate(entries):
        if list(cropped.shape[1:]) == shape:
            normalize_channel(cropped[ch], entry, nonzero, data[ch])
        else:
            data[ch] = resample_channel(normalize_channel(cropped[ch], entry, nonzero), shape, spacing, target)
    del nonzero
    seg = None
    if label is not None:
        seg = resample(crop(label, box), shape, spacing, target, is_label=True)
    props = {"geometry": _geometry_dict(image), "crop_box": box, "cropped_shape": list(cropped.shape[1:]),
             "spacing_zyx": list(spacing), "resampled_shape": list(shape)}
    return data, seg, props


def _geometry_dict(image: Image) -> Dict[str, Any]:
    g = image.geometry
    return {"shape": list(g.shape), "spacing": list(g.spacing), "origin": list(g.origin),
            "direction": list(g.direction)}
