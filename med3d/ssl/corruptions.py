"""Models Genesis corruptions of a patch, which a ``restore`` head learns to undo.

Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021) pretrains a 3D encoder by restoring patches
damaged in four ways, each a property of anatomy the encoder must learn to know:

- a non-linear intensity transform: a random monotone Bezier curve (endpoints (0, 0) and (1, 1),
  two random control points) remaps intensities, sometimes inverted (appearance);
- local voxel shuffling: voxels are permuted inside many small blocks (texture and boundaries);
- in-painting: a few inner boxes are replaced by noise (context inside);
- out-painting: everything except one central-ish box is replaced by noise (context around).

Every function takes a ``(C, Z, Y, X)`` array and a numpy ``Generator`` and returns a new array of
the same shape and dtype (the input is never written to). Intensities are mapped in each channel's
own ``[min, max]`` range, so the corruptions fit any normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

Box = Tuple[slice, slice, slice]


@dataclass(frozen=True)
class CorruptionRates:
    """The probability of each corruption per patch (Models Genesis' defaults).

    Args:
        nonlinear: apply a random Bezier intensity curve.
        shuffle: shuffle voxels inside small blocks.
        shuffle_blocks: how many blocks are shuffled per patch.
        paint: in- or out-paint the patch.
        inpaint_share: of the painted patches, the share in-painted (the rest are out-painted).
    """

    nonlinear: float = 0.9
    shuffle: float = 0.5
    shuffle_blocks: int = 200
    paint: float = 0.9
    inpaint_share: float = 0.2


ALWAYS = CorruptionRates(nonlinear=1.0, shuffle=1.0, paint=1.0)  # validation: every patch damaged


# ---------------------------------------------------------------- non-linear intensity transform

def bezier_curve(rng: np.random.Generator, points: int = 1000) -> Tuple[np.ndarray, np.ndarray]:
    """A random monotone increasing map of [0, 1] onto [0, 1], as sampled points ``(xs, ys)``.

    A cubic Bezier curve from (0, 0) to (1, 1) with two control points drawn in the unit square. Each
    coordinate is then a Bernstein polynomial with coefficients 0, p, q, 1 (0 <= p, q <= 1), whose
    derivative never goes below zero, so the curve is the graph of an increasing map; sorting the
    samples only keeps float rounding from breaking that for ``np.interp``.

    Args:
        rng: the random source.
        points: samples along the curve.

    Returns:
        Increasing ``xs`` and ``ys``, both from 0 to 1.
    """
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0.0, 1.0, points)[:, None]
    curve = 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3  # P0 = (0, 0) adds nothing
    return np.sort(curve[:, 0]), np.sort(curve[:, 1])


def nonlinear_intensity(x: np.ndarray, rng: np.random.Generator, invert: float = 0.5) -> np.ndarray:
    """Remap each channel's intensities through a random Bezier curve within its own range.

    Args:
        x: the patch ``(C, Z, Y, X)``.
        rng: the random source.
        invert: probability that the curve runs downwards (bright becomes dark).

    Returns:
        A new array: a monotone function of ``x`` per channel, inside each channel's ``[min, max]``.
    """
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        lo, hi = float(x[c].min()), float(x[c].max())
        if hi <= lo:  # a constant channel has no range to remap
            out[c] = x[c]
            continue
        xs, ys = bezier_curve(rng)
        if rng.random() < invert:
            ys = ys[::-1]
        mapped = np.interp((x[c] - lo) / (hi - lo), xs, ys)
        out[c] = np.clip(lo + mapped * (hi - lo), lo, hi)  # float rounding must not leave the range
    return out


# ---------------------------------------------------------------- local voxel shuffling

def random_boxes(shape: Sequence[int], count: int, low: Sequence[int], high: Sequence[int],
                 rng: np.random.Generator) -> List[Box]:
    """``count`` boxes inside ``shape`` with sides drawn in ``[low, high]`` per axis (clipped to the shape)."""
    boxes = []
    for _ in range(count):
        box = []
        for n, lo, hi in zip(shape, low, high):
            side = int(rng.integers(min(lo, n), min(hi, n) + 1))
            start = int(rng.integers(0, n - side + 1))
            box.append(slice(start, start + side))
        boxes.append(tuple(box))
    return boxes  # type: ignore[return-value]


def shuffle_boxes(x: np.ndarray, boxes: Sequence[Box], rng: np.random.Generator) -> np.ndarray:
    """Permute the voxels inside each box (all channels of a voxel move together); the rest is unchanged."""
    out = x.copy()
    for box in boxes:
        block = out[(slice(None), *box)]
        flat = block.reshape(block.shape[0], -1)
        out[(slice(None), *box)] = flat[:, rng.permutation(flat.shape[1])].reshape(block.shape)
    return out


def local_shuffle(x: np.ndarray, rng: np.random.Generator, blocks: int = 200) -> np.ndarray:
    """Shuffle voxels inside ``blocks`` small blocks, each side up to a tenth of the patch (at least 2 voxels)."""
    shape = x.shape[1:]
    high = [max(2, s // 10) for s in shape]
    return shuffle_boxes(x, random_boxes(shape, blocks, [1] * 3, high, rng), rng)


# ---------------------------------------------------------------- in- and out-painting

def fill_boxes(x: np.ndarray, boxes: Sequence[Box], rng: np.random.Generator, inside: bool = True) -> np.ndarray:
    """Replace the voxels inside the boxes (or, ``inside=False``, outside all of them) by uniform noise.

    The noise of each channel is drawn in that channel's ``[min, max]``, so it looks like tissue
    intensities rather than out-of-range values the network could spot at once.
    """
    mask = np.zeros(x.shape[1:], dtype=bool)
    for box in boxes:
        mask[box] = True
    if not inside:
        mask = ~mask
    out = x.copy()
    for c in range(x.shape[0]):
        lo, hi = float(x[c].min()), float(x[c].max())
        out[c][mask] = rng.uniform(lo, hi, int(mask.sum())).astype(x.dtype)
    return out


def inner_cutout(x: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """In-painting: 1 to ``max_boxes`` boxes, each side a sixth to a third of the patch, become noise."""
    shape = x.shape[1:]
    count = int(rng.integers(1, max_boxes + 1))
    boxes = random_boxes(shape, count, [max(1, s // 6) for s in shape], [max(1, s // 3) for s in shape], rng)
    return fill_boxes(x, boxes, rng, inside=True)


def outer_cutout(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out-painting: everything outside one box (each side 3/7 to 4/7 of the patch) becomes noise."""
    shape = x.shape[1:]
    box = random_boxes(shape, 1, [max(1, 3 * s // 7) for s in shape], [max(1, 4 * s // 7) for s in shape], rng)
    return fill_boxes(x, box, rng, inside=False)


# ---------------------------------------------------------------- all together

def corrupt(x: np.ndarray, rng: np.random.Generator, rates: CorruptionRates = CorruptionRates()) -> np.ndarray:
    """A Models Genesis corruption of ``x``: shuffling, then the intensity curve, then in- or out-painting,
    each with its probability in ``rates``.

    Args:
        x: the patch ``(C, Z, Y, X)`` (not changed).
        rng: the random source.
        rates: the probabilities.

    Returns:
        The corrupted copy, same shape and dtype.
    """
    out = x.copy()
    if rng.random() < rates.shuffle:
        out = local_shuffle(out, rng, rates.shuffle_blocks)
    if rng.random() < rates.nonlinear:
        out = nonlinear_intensity(out, rng)
    if rng.random() < rates.paint:
        out = inner_cutout(out, rng) if rng.random() < rates.inpaint_share else outer_cutout(out, rng)
    return out
