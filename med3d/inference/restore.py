"""From the plan grid back to the scan's own grid: the inverse of ``data.preprocess`` for predictions.

Probabilities on the resampled, cropped grid are resampled (trilinear) to the cropped region of
the original grid and placed back; outside the crop is background. Labels need only the cropped
region, so the full-size ``K``-channel array is built only when probabilities are asked for.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..data.image import Geometry
from ..data.preprocess import resample


def _crop_region(props: Dict[str, Any]) -> tuple:
    return tuple(slice(lo, hi) for lo, hi in props["crop_box"])


def _to_cropped_grid(probs: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any]) -> np.ndarray:
    return resample(probs.astype(np.float32, copy=False), props["cropped_shape"], plan["target_spacing"],
                    props["spacing_zyx"], is_label=False)


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds every class index."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16)


def restore_labels(probs: np.ndarray, props: Dict[str, Any], plan: Dict[str, Any]) -> np.ndarray:
    """Label map ``(Z, Y, X)`` on the original grid from probabilities ``(K, z, y, x)`` on the plan grid.

    Args:
        probs: class probabilities on the preprocessed (cropped, resampled) grid.
        props: what ``preprocess`` recorded (crop box, cropped shape, original geometry and spacing).
        plan: the plan the case was preprocessed with (its ``target_spacing``).

    Returns:
        The argmax label map with the original shape; voxels outside the crop are 0.
    """
    labels = np.zeros(props["geometry"]["shape"], dtype=label_dtype(probs.shape[0]))
    labels[_crop_region(props)] = _to_cropped_grid(probs, props, plan).argmax(0)
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
    full[(slice(None),) + _crop_region(props)] = _to_cropped_grid(probs, props, plan)
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

