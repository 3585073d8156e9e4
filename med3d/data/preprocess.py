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

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image
from .plan import ANISOTROPY_RATIO, crop, nonzero_bbox, z_slabs


# Voxels per slab when statistics or index lookups walk a volume: bounds the temporaries to a few MB.
SLAB_VOXELS = 1 << 22
# Voxels per slab of the fine grid when an anisotropic case is normalised and resampled slab by slab:
# its float32 planes (4 MB) stay small enough that the allocator's retained blocks do not matter.
PIECE_VOXELS = 1 << 20


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """``(Z, Y, X)`` mask of voxels non-zero in any channel of ``(C, Z, Y, X)``, one channel at a time."""
    mask = data[0] != 0
    for ch in range(1, data.shape[0]):
        mask |= data[ch] != 0
    return mask


def _zscore_stats(x: np.ndarray, mask_of: Callable[[slice], np.ndarray]) -> Tuple[float, float]:
    """Mean and standard deviation of the float32 values of ``x`` inside its mask (all of ``x`` when the mask
    is empty), in float64 slabs.

    Two passes over z-slabs instead of ``x[mask].std()``, which would hold the selected values and
    their deviations (two more volume-sized arrays) at once; ``mask_of(s)`` gives z-slab ``s``'s mask,
    so no volume-sized mask is needed either. The slabs are fixed by ``SLAB_VOXELS`` and the plane
    size alone, so the sums (and the normalised values) do not depend on how the caller holds ``x``.
    """
    step = max(1, SLAB_VOXELS // max(1, x[0].size))
    slabs = [slice(z, z + step) for z in range(0, x.shape[0], step)]
    n = sum(int(np.count_nonzero(mask_of(s))) for s in slabs)
    if n == 0:
        n, mask_of = x.size, lambda s: np.ones(x[s].shape, bool)

    def values(s: slice) -> np.ndarray:
        return np.asarray(x[s], dtype=np.float32)[mask_of(s)]

    mean = sum(float(values(s).sum(dtype=np.float64)) for s in slabs) / n
    var = sum(float(np.square(values(s) - mean, dtype=np.float64).sum()) for s in slabs) / n
    return mean, float(np.sqrt(var))


def channel_stats(x: np.ndarray, entry: Dict[str, Any], mask_of: Callable[[slice], np.ndarray]
                  ) -> Optional[Tuple[float, float]]:
    """What normalising one channel needs beyond its plan entry: the case's own mean and std for ``zscore``.

    Args:
        x: the ``(Z, Y, X)`` channel as read (any numeric dtype).
        entry: its ``plan["normalization"]`` entry.
        mask_of: the non-zero mask of a z-slab of ``x`` (see ``nonzero_mask``).

    Returns:
        ``(mean, std)`` for ``zscore``, None for the other schemes.
    """
    return _zscore_stats(x, mask_of) if entry["scheme"] == "zscore" else None


def normalize_piece(x: np.ndarray, entry: Dict[str, Any], stats: Optional[Tuple[float, float]],
                    mask: Optional[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Any part of a channel normalised by its plan entry, in place on ``out`` (float32, ``x``'s shape; may be ``x``).

    Each voxel's value depends on that voxel and the channel's ``stats`` alone, so a channel
    normalised piece by piece equals the channel normalised whole, bit for bit.

    Args:
        x: the values as read (any numeric dtype).
        entry: the channel's ``plan["normalization"]`` entry (scheme ``ct``, ``zscore`` or ``none``).
        stats: ``channel_stats`` of the whole channel.
        mask: the case's non-zero mask over the same voxels (``zscore``: the background stays exactly 0).
        out: where to write.

    Returns:
        ``out``.
    """
    if entry["scheme"] == "ct":
        lo, hi = entry["clip"]
        np.clip(x, lo, hi, out=out, casting="unsafe")  # clips and casts to float32 in one pass
        out -= entry["mean"]
        out /= entry["std"]
        return out
    if out is not x:
        out[...] = x
    if entry["scheme"] == "zscore":
        mean, std = stats  # type: ignore[misc]
        out -= np.float32(mean)
        out /= max(std, 1e-8)
        np.copyto(out, 0.0, where=~mask)  # type: ignore[operator]
    return out


def normalize_channel(x: np.ndarray, entry: Dict[str, Any], nonzero: Optional[np.ndarray],
                      out: Optional[np.ndarray] = None) -> np.ndarray:
    """One ``(Z, Y, X)`` channel normalised by its plan entry, into ``out`` (a new float32 array when None).

    Every step runs in place on the output, so the channel costs one float32 copy and no temporaries.

    Args:
        x: the channel as read (any numeric dtype).
        entry: its ``plan["normalization"]`` entry (scheme ``ct``, ``zscore`` or ``none``).
        nonzero: the case's non-zero mask (``zscore``; None: the channel's own non-zero voxels).
        out: where to write (float32, ``x``'s shape).

    Returns:
        ``out``.
    """
    out = np.empty(x.shape, np.float32) if out is None else out
    mask_of = (lambda s: nonzero[s]) if nonzero is not None else \
        (lambda s: np.asarray(x[s], dtype=np.float32) != 0)  # type: ignore[index]
    stats = channel_stats(x, entry, mask_of)
    for s in z_slabs(x.shape):
        normalize_piece(x[s], entry, stats, mask_of(s) if stats else None, out[s])
    return out


def normalize(data: np.ndarray, plan: Dict[str, Any]) -> np.ndarray:
    """Normalise each channel of ``(C, Z, Y, X)`` by its scheme (a new float32 array)."""
    out = np.empty(data.shape, dtype=np.float32)
    for ch, entry in enumerate(plan["normalization"]):
        stats = channel_stats(data[ch], entry, lambda s: nonzero_mask(data[:, s]))
        for s in z_slabs(data.shape[1:]):
            normalize_piece(data[ch, s], entry, stats, nonzero_mask(data[:, s]) if stats else None, out[ch, s])
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


def _slab_plan(in_shape: Sequence[int], shape: Sequence[int], axis: int, voxels: int
               ) -> Iterator[Tuple[np.ndarray, Tuple[slice, ...]]]:
    """Slabs along the coarse ``axis`` of an anisotropic resampling: the source planes each one picks
    (nearest along ``axis``) and where its output goes. A slab holds at most ``voxels`` voxels on
    either grid (one plane at least), so the fine grid's planes are never gathered all at once."""
    idx = nearest_index(int(in_shape[axis]), int(shape[axis]))
    plane = max(int(np.prod(in_shape)) // int(in_shape[axis]), int(np.prod(shape)) // int(shape[axis]))
    step = max(1, int(voxels) // max(1, plane))
    for o in range(0, int(shape[axis]), step):
        where = [slice(None)] * 3
        where[axis] = slice(o, o + len(idx[o:o + step]))
        yield idx[o:o + step], tuple(where)


def _in_plane(planes: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """Float32 ``planes`` (picked along ``axis``) resampled trilinearly to ``shape`` in the other two axes.

    Along ``axis`` the size is kept, so the trilinear weights there are exactly 1 and 0: the same
    values as the whole volume interpolated at once.
    """
    size = list(int(v) for v in shape)
    size[axis] = planes.shape[axis]
    if tuple(size) == tuple(planes.shape):
        return planes
    t = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(size), mode="trilinear", align_corners=False)[0, 0].numpy()


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
    for idx, where in _slab_plan(x.shape, shape, axis, SLAB_VOXELS):
        yield where, _in_plane(np.take(x, idx, axis=axis), shape, axis)


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

    One channel at a time, and within a channel one slab at a time where the values allow it:
    an anisotropic case is normalised and resampled slab by slab along its coarse axis (only the
    planes the nearest lookup picks are read), a case kept on its grid is normalised slab by slab
    into the output; an isotropic resampling needs the whole normalised channel (one float32 copy
    of the cropped channel) for the trilinear pass. Beside the input, the peak is the output plus
    that copy at most; no volume-sized mask is built.
    """
    box = nonzero_bbox(image.array) if plan.get("crop_nonzero", True) else [(0, s) for s in image.array.shape[1:]]
    cropped = crop(image.array, box)
    spacing = image.geometry.spacing_zyx
    target = plan["target_spacing"]
    shape = new_shape(cropped.shape[1:], spacing, target)
    data = None
    for ch, entry in enumerate(plan["normalization"]):
        values = _preprocess_channel(cropped, ch, entry, shape, spacing, target)
        if data is None and cropped.shape[0] == 1:
            data = values[None]  # one channel: its array is the output, no copy
            continue
        data = np.empty((cropped.shape[0], *shape), np.float32) if data is None else data
        data[ch] = values
        del values
    seg = None
    if label is not None:
        seg = resample(crop(label, box), shape, spacing, target, is_label=True)
    props = {"geometry": _geometry_dict(image), "crop_box": box, "cropped_shape": list(cropped.shape[1:]),
             "spacing_zyx": list(spacing), "resampled_shape": list(shape)}
    return data, seg, props  # type: ignore[return-value]


def _preprocess_channel(cropped: np.ndarray, ch: int, entry: Dict[str, Any], shape: Sequence[int],
                        spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Channel ``ch`` of the cropped ``(C, Z, Y, X)`` case normalised and resampled to ``shape`` (float32)."""
    x = cropped[ch]
    stats = channel_stats(x, entry, lambda s: nonzero_mask(cropped[:, s]))
    shape = [int(v) for v in shape]
    axis = _separate_axis(spacing, target)
    if list(x.shape) == shape or axis is None:
        out = np.empty(x.shape, np.float32)
        for s in z_slabs(x.shape):
            normalize_piece(x[s], entry, stats, nonzero_mask(cropped[:, s]) if stats else None, out[s])
        return out if list(x.shape) == shape else resample_channel(out, shape, spacing, target)
    out = np.empty(shape, np.float32)
    for idx, where in _slab_plan(x.shape, shape, axis, PIECE_VOXELS):
        planes = np.take(x, idx, axis=axis)  # a copy of just the picked planes, normalised in place if float32
        mask = nonzero_mask(np.take(cropped, idx, axis=1 + axis)) if stats else None
        piece = normalize_piece(planes, entry, stats, mask,
                                planes if planes.dtype == np.float32 else np.empty(planes.shape, np.float32))
        del planes, mask
        out[where] = _in_plane(piece, shape, axis)
    return out


def _geometry_dict(image: Image) -> Dict[str, Any]:
    g = image.geometry
    return {"shape": list(g.shape), "spacing": list(g.spacing), "origin": list(g.origin),
            "direction": list(g.direction)}
