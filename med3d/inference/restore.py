"""From the plan grid back to the scan's own grid: the inverse of ``data.preprocess`` for predictions.

Probabilities on the resampled, cropped grid are resampled (trilinear) to the cropped region of
the original grid and placed back; outside the crop is background. Both run one class at a time:
the label map keeps a running maximum (one float32 copy of the cropped region, whatever the number
of classes), and full-size ``K``-channel probabilities are built only when asked for.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..data.image import Geometry
from ..data.preprocess import resample_pieces


def _crop_region(props: Dict[str, Any]) -> tuple:
    return tuple(slice(lo, hi) for lo, hi in props["crop_box"])


def _class_pieces(probs: np.ndarray, k: int, props: Dict[str, Any], plan: Dict[str, Any]):
    """Class ``k``'s probabilities on the cropped region of the original grid, as ``(where, values)`` pieces
    (slabs for an anisotropic case; values may be views of ``probs``)."""
    return resample_pieces(np.asarray(probs[k], dtype=np.float32), props["cropped_shape"], plan["target_spacing"],
                           props["spacing_zyx"])


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds every class index."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16)


def restore_labels(probs: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any]) -> np.ndarray:
    """Label map ``(Z, Y, X)`` on the original grid from probabilities ``(K, z, y, x)`` on the plan grid.

    The argmax over the resampled probabilities, computed one class at a time: a class takes a voxel
    where it beats the best so far strictly, so ties go to the lower class as with ``argmax``.

    Args:
        probs: class probabilities on the preprocessed (cropped, resampled) grid; where that grid is the
            cropped region itself (nothing to resample), logits give the same labels.
        props: what ``preprocess`` recorded (crop box, cropped shape, original geometry and spacing).
        plan: the plan the case was preprocessed with (its ``target_spacing``).

    Returns:
        The argmax label map with the original shape; voxels outside the crop are 0.
    """
    return _restore(probs, props, plan, None)


def restore_labels_and_confidence(probs: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any]
                                  ) -> Tuple[np.ndarray, np.ndarray]:
    """``restore_labels`` and, beside it, the probability of each voxel's label (its maximum probability).

    Args:
        probs: class probabilities on the plan grid (not logits: the maximum is the confidence).
        props, plan: as for ``restore_labels``.

    Returns:
        The label map and a float32 confidence map, both with the original shape; outside the crop the
        label is background with confidence 1, as ``restore_probabilities`` has it.
    """
    confidence = np.ones(props["geometry"]["shape"], dtype=np.float32)
    return _restore(probs, props, plan, confidence), confidence


def _restore(probs: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any],
             confidence: Optional[np.ndarray]) -> np.ndarray:
    """The class-by-class argmax of ``restore_labels``; writes the running maximum into ``confidence``."""
    labels = np.zeros(props["geometry"]["shape"], dtype=label_dtype(probs.shape[0]))
    region = labels[_crop_region(props)]
    kept = confidence[_crop_region(props)] if confidence is not None else None
    # Slab by slab (anisotropic cases), class by class: the running maximum holds one slab or one volume.
    pieces = [_class_pieces(probs, k, props, plan) for k in range(probs.shape[0])]
    for first in pieces[0]:
        where, best = first
        best = np.array(best, dtype=np.float32, copy=True) if np.shares_memory(best, probs) else best
        for k in range(1, len(pieces)):
            _, p = next(pieces[k])
            better = p > best
            region[where][better] = k
            if k + 1 < len(pieces) or kept is not None:  # the last class's maximum matters only as confidence
                np.maximum(best, p, out=best)
            del better, p
        if kept is not None:
            kept[where] = best
        del best
    return labels


def restore_probabilities(probs: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any]) -> np.ndarray:
    """Probabilities ``(K, Z, Y, X)`` on the original grid (outside the crop: background with probability 1).

    Args:
        probs, props, plan: as for ``restore_labels``.

    Returns:
        Float32 probabilities with the original shape.
    """
    full = np.zeros((probs.shape[0], *props["geometry"]["shape"]), dtype=np.float32)
    full[0] = 1.0
    region = _crop_region(props)
    for k in range(probs.shape[0]):
        for where, values in _class_pieces(probs, k, props, plan):
            full[k][region][where] = values
    return full


def resample_onto(volume: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """A ``(Z, Y, X)`` volume on grid ``src`` resampled onto grid ``dst`` through world space.

    Trilinear; 0 where ``dst`` lies outside ``src``. Used where the network saw a region cut from
    the scan (classification), whose grid is not a crop of the scan's own.

    Args:
        volume: the values on ``src`` (shape ``src.shape``).
        src: its grid (spacing, origin, direction in x, y, z order, LPS).
        dst: the target grid.

    Returns:
        float32 ``dst.shape``.
    """
    import SimpleITK as sitk

    def grid(geom: Geometry, array: np.ndarray) -> "sitk.Image":
        img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        img.SetSpacing([float(v) for v in geom.spacing])
        img.SetOrigin([float(v) for v in geom.origin])
        img.SetDirection([float(v) for v in geom.direction])
        return img

    out = sitk.Resample(grid(src, volume), grid(dst, np.zeros(dst.shape, np.float32)), sitk.Transform(),
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)



def restore_volume(values: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any], outside: float) -> np.ndarray:
    """One float volume ``(z, y, x)`` on the plan grid back on the original grid (trilinear), ``outside`` beyond
    the crop; for per-voxel scores such as the mirror agreement of pseudo-labels.

    Args:
        values: the volume on the preprocessed grid.
        props, plan: as for ``restore_labels``.
        outside: the value of voxels outside the crop.

    Returns:
        Float32 with the original shape.
    """
    full = np.full(props["geometry"]["shape"], outside, dtype=np.float32)
    region = full[_crop_region(props)]
    for where, piece in resample_pieces(np.asarray(values, dtype=np.float32), props["cropped_shape"],
                                        plan["target_spacing"], props["spacing_zyx"]):
        region[where] = piece
    return full
