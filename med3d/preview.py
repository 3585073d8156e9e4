"""PNG previews: axial, coronal and sagittal slices through a structure's centre with label overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .plotting import pyplot, save_png


def centre(labels: np.ndarray) -> Sequence[int]:
    """Centre of the labelled voxels (of the volume when nothing is labelled), as (z, y, x) indices."""
    idx = np.argwhere(labels > 0)
    if idx.size == 0:
        return [s // 2 for s in labels.shape]
    return [int(v) for v in np.round(idx.mean(0))]


def save_preview(image: np.ndarray, pred: np.ndarray, path: Path, spacing_zyx: Sequence[float],
                 ref: Optional[np.ndarray] = None, title: str = "") -> Optional[Path]:
    """Write the three orthogonal slices of ``image`` with ``pred`` filled and ``ref`` outlined (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None

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
