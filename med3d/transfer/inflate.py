"""2D -> 3D inflation of ResNet state dicts (torchvision / MONAI 2D keys)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import Med3DError
from ..choices import INFLATE_MODES as MODES


def inflate_kernel(weight: torch.Tensor, mode: str, depth: Optional[int] = None,
                   name: str = "weight") -> torch.Tensor:
    """Inflate one conv kernel (O, I, kh, kw) to (O, I, kd, kh, kw).

    ``1x3x3``: kd = 1, the 2D kernel unchanged (a slice-wise network).
    ``i3d``: the kernel repeated kd times and divided by kd, so a volume of identical slices
    gives the 2D response (Carreira & Zisserman's I3D bootstrapping).
    ``center``: the 2D kernel in the centre slice, zeros elsewhere (same property, no mixing across slices).
    ``depth`` defaults to the in-plane size (3x3 -> 3x3x3, 7x7 -> 7x7x7); 1x1 kernels stay 1x1x1.
    ``name`` (the state-dict key) names the tensor in errors.

    Raises:
        Med3DError: ``weight`` is not 4D, or ``mode`` is unknown.
    """
    if weight.ndim != 4:
        raise Med3DError(f"{name}: expected a 2D conv kernel (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if mode not in MODES:
        raise Med3DError(f"unknown inflation mode '{mode}'; choose one of {', '.join(MODES)}")
    kd = 1 if mode == "1x3x3" or weight.shape[-1] == 1 else (depth or weight.shape[-1])
    if kd == 1:
        return weight.unsqueeze(2).clone()
    if mode == "i3d":
        return weight.unsqueeze(2).repeat(1, 1, kd, 1, 1) / kd
    out = weight.new_zeros((*weight.shape[:2], kd, *weight.shape[2:]))
    out[:, :, kd // 2] = weight
    return out


def inflate_state_dict(sd2d: Dict[str, torch.Tensor], mode: str = "1x3x3",
                       depth: Optional[int] = None, stem_depth: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Inflate a 2D ResNet state dict to the 3D encoder's names and shapes.

    Conv kernels are inflated (``stem_depth`` for conv1, ``depth`` for the rest; both default to
    the in-plane size); BatchNorm and downsample weights carry over; the classifier ``fc`` is dropped.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd2d.items():
        if key.startswith("fc."):
            continue
        if value.ndim == 4:
            value = inflate_kernel(value, mode, stem_depth if key == "conv1.weight" else depth, name=key)
        out[key] = value.clone()
    return out
