"""Trilinear upsampling of logits by whole factors, one axis at a time.

``F.interpolate(mode="trilinear", align_corners=False)`` mixes eight neighbours per output voxel
in one pass; on a CPU it was a fifth of a segmentation network's forward pass here, and
OpenVINO's kernel for it a third. Trilinear weights are products of one weight per axis, so the
same interpolation is three linear ones in turn. With a whole factor ``s`` along an axis, output
``s * i + r`` always sits at the same fraction between two neighbouring inputs, so each axis is
``s`` blends of the input with its shifted self, interleaved: no index gathers, in PyTorch or in
an exported graph. The values equal ``F.interpolate``'s to float rounding (a few 1e-7 on logits
of order 1), since the products are summed in another order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def upsample_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` ``(N, C, Z, Y, X)`` resized to ``size`` as ``F.interpolate(mode="trilinear", align_corners=False)``.

    Axes whose output size is a whole multiple of the input's are interpolated one at a time
    (``upsample_axis``); any other ratio (shrinking, or a fraction) goes to ``F.interpolate``.
    Half-precision inputs are interpolated in float32 and rounded once at the end, as ATen's
    kernel does: three passes each rounding to bf16 were twice as far from the exact values.

    Args:
        x: a 5D tensor, any float dtype (kept).
        size: output (Z, Y, X).

    Returns:
        The resized tensor, ``(N, C, *size)``.
    """
    factors = [m // n if n > 0 and m >= n and m % n == 0 else 0 for n, m in zip(x.shape[2:], size)]
    if not all(factors):
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
    if x.dtype in (torch.float16, torch.bfloat16):
        return upsample_trilinear(x.float(), size).to(x.dtype)
    for axis in (4, 3, 2):  # X first: the two later passes then stride over fewer, longer rows (fastest here)
        if factors[axis - 2] > 1:
            x = upsample_axis(x, axis, factors[axis - 2])
    return x


def upsample_axis(x: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` to ``factor`` times its length, half-pixel centres.

    Output ``factor * i + r`` samples the input at ``i + (r + 0.5) / factor - 0.5``: between inputs
    ``i - 1`` and ``i`` for the first half of the ``r``, ``i`` and ``i + 1`` for the second. The
    input is edge-padded by one so that the samples before the first and after the last input take
    the edge value, as ``F.interpolate`` clamps them.

    Args:
        x: the tensor.
        axis: the axis to stretch.
        factor: a whole factor, at least 1.

    Returns:
        ``x`` with ``axis`` ``factor`` times as long.
    """
    n = x.shape[axis]
    padded = torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, n - 1, 1)], axis)
    phases = []
    for r in range(factor):
        at = (r + 0.5) / factor - 0.5  # offset from input i, in (-0.5, 0.5)
        low = 0 if at < 0 else 1  # index in ``padded`` of input i - 1 (at < 0) or i, for i = 0
        phases.append(torch.lerp(padded.narrow(axis, low, n), padded.narrow(axis, low + 1, n), at + 1 - low))
    return torch.stack(phases, axis + 1).flatten(axis, axis + 1)
