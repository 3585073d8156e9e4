"""PNG previews: axial, coronal and sagittal slices through a structure's centre with label overlays."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .plotting import pyplot, save_png


def lps_view(arrays: Sequence[Optional[np.ndarray]], direction: Sequence[float], spacing_zyx: Sequence[float],
             point: Optional[Sequence[int]] = None) -> Tuple[List[Optional[np.ndarray]], List[float], Optional[List[int]]]:
    """Arrays ``(Z, Y, X)`` turned (transposes and flips, no resampling) so their axes run S, P and L.

    Stored voxel order varies between files (a NIfTI from a RAS-oriented tool runs x to the
    patient's right); turned this way every preview shows the axial view with anterior at the top
    and the patient's right on the left (the radiological convention), and coronal and sagittal views
    with superior at the top. Each voxel axis goes to the world axis its direction is closest to; an
    oblique grid whose axes do not map one to one is left as stored.

    Args:
        arrays: volumes on one grid (None entries stay None).
        direction: the grid's 3x3 direction, row-major, columns the voxel axes x, y, z (LPS).
        spacing_zyx: its voxel size.
        point: a ``(z, y, x)`` voxel to carry along (e.g. the peak the slices go through).

    Returns:
        The turned arrays (views), their spacing ``(z, y, x)`` and the point in the turned grid.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    world = np.abs(d).argmax(0)  # the world axis (0 L, 1 P, 2 S) each voxel axis x, y, z runs closest to
    if sorted(world.tolist()) != [0, 1, 2]:
        return list(arrays), list(spacing_zyx), None if point is None else list(point)
    # Array axis a holds voxel axis 2 - a; output axis k must run along world axis 2 - k.
    source = [2 - int(np.flatnonzero(world == 2 - k)[0]) for k in range(3)]
    flip = [bool(d[2 - k, 2 - source[k]] < 0) for k in range(3)]

    def turn(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if a is None:
            return None
        a = np.transpose(a, source)
        return a[tuple(slice(None, None, -1) if f else slice(None) for f in flip)]

    turned = [turn(a) for a in arrays]
    spacing = [float(spacing_zyx[a]) for a in source]
    if point is not None:
        shape = turned[0].shape if turned and turned[0] is not None else None
        point = [shape[k] - 1 - int(point[a]) if flip[k] else int(point[a]) for k, a in enumerate(source)]
    return turned, spacing, point


def centre(labels: np.ndarray) -> Sequence[int]:
    """Centre of the labelled voxels (of the volume when nothing is labelled), as (z, y, x) indices."""
    idx = np.argwhere(labels > 0)
    if idx.size == 0:
        return [s // 2 for s in labels.shape]
    return [int(v) for v in np.round(idx.mean(0))]


def save_preview(image: np.ndarray, pred: np.ndarray, path: Path, spacing_zyx: Sequence[float],
                 ref: Optional[np.ndarray] = None, title: str = "",
                 direction: Optional[Sequence[float]] = None) -> Optional[Path]:
    """Write the three orthogonal slices of ``image`` with ``pred`` filled and ``ref`` outlined (None without matplotlib).

    ``direction`` (the grid's, see ``lps_view``) shows every scan in the same orientation, whatever its
    stored voxel order; None shows the arrays as stored.
    """
    plt = pyplot()
    if plt is None:
        return None
    if direction is not None:
        (image, pred, ref), spacing_zyx, _ = lps_view([image, pred, ref], direction, spacing_zyx)

    z, y, x = centre(pred if (pred > 0).any() else (ref if ref is not None else pred))
    sz, sy, sx = spacing_zyx
    lo, hi = np.percentile(image, [1, 99])
    views = [("axial", np.s_[z, :, :], sy / sx), ("coronal", np.s_[::-1, y, :], sz / sx),
             ("sagittal", np.s_[::-1, :, x], sz / sy)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    cmap = plt.get_cmap("tab10")
    for ax, (name, sl, aspect) in zip(axes, views):
        ax.imshow(image[sl], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        p = pred[sl]
        overlay = np.zeros((*p.shape, 4))
        for c in np.unique(p[p > 0]):
            overlay[p == c] = (*cmap(int(c) % 10)[:3], 0.45)
        ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        if ref is not None and (ref[sl] > 0).any():
            ax.contour(ref[sl] > 0, levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title + ("  (fill: prediction, yellow: reference)" if ref is not None else ""))
    return save_png(fig, path, dpi=80)
