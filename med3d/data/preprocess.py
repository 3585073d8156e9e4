"""Applying a plan to one case: crop, normalise, resample (``inference.restore`` goes the way back).

Resampling runs through ``torch.nn.functional.interpolate``: trilinear for intensities and
probabilities, nearest for label maps. When a case is strongly anisotropic the coarse axis is
resampled separately with nearest interpolation (nnU-Net's rule), so thick slices are not
smeared into each other.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image
from .plan import ANISOTROPY_RATIO, crop, nonzero_bbox


def normalize(data: np.ndarray, plan: Dict[str, Any]) -> np.ndarray:
    """Normalise each channel by its scheme (float32 out)."""
    out = np.empty(data.shape, dtype=np.float32)
    nonzero = np.any(data != 0, axis=0)
    for ch, entry in enumerate(plan["normalization"]):
        x = data[ch].astype(np.float32)
        if entry["scheme"] == "ct":
            lo, hi = entry["clip"]
            out[ch] = (np.clip(x, lo, hi) - entry["mean"]) / entry["std"]
        elif entry["scheme"] == "zscore":
            # Per case inside the non-zero region; background stays exactly 0.
            vals = x[nonzero] if nonzero.any() else x.reshape(-1)
            out[ch] = np.where(nonzero, (x - vals.mean()) / max(float(vals.std()), 1e-8), 0.0)
        else:
            out[ch] = x
    return out


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> List[int]:
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def _separate_axis(spacing: Sequence[float], target: Sequence[float]) -> Optional[int]:
    for sp in (spacing, target):
        if max(sp) / min(sp) > ANISOTROPY_RATIO:
            return int(np.argmax(sp))
    return None


def resample(array: np.ndarray, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float],
             is_label: bool) -> np.ndarray:
    """Resample ``(C, Z, Y, X)`` to ``shape``; labels by nearest neighbour, anything else trilinear."""
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[1:]) == shape:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array))[None]
    if is_label:
        out = F.interpolate(t.float(), size=shape, mode="nearest-exact")
        return out[0].numpy().astype(array.dtype)
    t = t.float()
    axis = _separate_axis(spacing, target)
    if axis is not None:
        # In-plane first (trilinear with the coarse axis unchanged), then nearest along the coarse axis.
        mid = list(shape)
        mid[axis] = array.shape[1 + axis]
        t = F.interpolate(t, size=tuple(mid), mode="trilinear", align_corners=False)
        t = F.interpolate(t, size=shape, mode="nearest-exact")
    else:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return t[0].numpy()


def preprocess(image: Image, label: Optional[np.ndarray], plan: Dict[str, Any]
               ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, Any]]:
    """Crop, normalise and resample one case. Returns data, label and what is needed to go back."""
    box = nonzero_bbox(image.array) if plan.get("crop_nonzero", True) else [(0, s) for s in image.array.shape[1:]]
    data = normalize(crop(image.array, box), plan)
    spacing = image.geometry.spacing_zyx
    target = plan["target_spacing"]
    shape = new_shape(data.shape[1:], spacing, target)
    data = resample(data, shape, spacing, target, is_label=False)
    seg = None
    if label is not None:
        seg = resample(crop(label, box), shape, spacing, target, is_label=True)
    props = {"geometry": _geometry_dict(image), "crop_box": box, "cropped_shape": list(crop(image.array, box).shape[1:]),
             "spacing_zyx": list(spacing), "resampled_shape": list(shape)}
    return data.astype(np.float32, copy=False), seg, props


def _geometry_dict(image: Image) -> Dict[str, Any]:
    g = image.geometry
    return {"shape": list(g.shape), "spacing": list(g.spacing), "origin": list(g.origin),
            "direction": list(g.direction)}
