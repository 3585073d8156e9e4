"""The Med3D / MedicalNet 3D-ResNet encoder family.

Parameter names and shapes follow MedicalNet (conv1, bn1, layerN.M.convK / bnK,
layerN.0.downsample.0/1), which MONAI's ``resnetN`` also uses, so either project's
checkpoints load without renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..choices import CONVS, LAYOUTS, Conv, Layout  # noqa: F401  (Layout, Conv: the config schema's types)
from ..errors import Med3DError
from ..registry import ENCODERS, resolved_args

Triple = Tuple[int, int, int]
IntOr3 = Union[int, Sequence[int]]
# Argument types double as the config schema (med3d.registry reads them), so choices are Literals.
Shortcut = Literal["A", "B"]

# depth -> (block, blocks per stage, MedicalNet's shortcut type for its released weights)
DEPTHS: Dict[int, Tuple[str, List[int], str]] = {
    10: ("basic", [1, 1, 1, 1], "B"),
    18: ("basic", [2, 2, 2, 2], "A"),
    34: ("basic", [3, 4, 6, 3], "A"),
    50: ("bottleneck", [3, 4, 6, 3], "B"),
    101: ("bottleneck", [3, 4, 23, 3], "B"),
    152: ("bottleneck", [3, 8, 36, 3], "B"),
    200: ("bottleneck", [3, 24, 36, 3], "B"),
}
# Before 0.2 the ``conv`` option was called ``kernel`` with these values; old checkpoints, exports and
# configs still use them (``upgrade_args`` maps them), as does the CLI's ``--kernel`` flag.
KERNEL_TO_CONV = {"3x3x3": "3d", "1x3x3": "slicewise"}
KERNELS = tuple(KERNEL_TO_CONV)
# (stride, dilation) of layer1..layer4 per layout
_STAGE_PLAN = {
    "dilated": [(1, 1), (2, 1), (1, 2), (1, 4)],
    "strided": [(1, 1), (2, 1), (2, 1), (2, 1)],
}


@dataclass(frozen=True)
class FeatureInfo:
    """What one encoder stage outputs: its name, channel count and stride per axis (D, H, W)."""

    name: str
    channels: int
    stride: Triple


def size_divisibility(feature_info: Iterable[FeatureInfo]) -> Triple:
    """Per axis (D, H, W), the least common multiple of the stages' strides.

    Input sizes that are multiples of it give every listed stage an exact grid (size / stride),
    so upsampled features line up with the skips and the input voxels.

    Args:
        feature_info: the stages to align (an encoder's ``feature_info`` or part of it).

    Returns:
        The divisibility per axis; (1, 1, 1) for no stages.
    """
    out = (1, 1, 1)
    for info in feature_info:
        out = tuple(math.lcm(a, b) for a, b in zip(out, info.stride))  # type: ignore[assignment]
    return out


def upgrade_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """Encoder arguments written by med3d before 0.2: ``kernel: 3x3x3 | 1x3x3`` is now ``conv: 3d | slicewise``.

    Args:
        args: encoder arguments from a config, checkpoint or export's metadata.

    Returns:
        A copy with ``kernel`` replaced by ``conv`` (an unknown old value is kept for validation to name).
    """
    if "kernel" not in args:
        return dict(args)
    out = {k: v for k, v in args.items() if k != "kernel"}
    out.setdefault("conv", KERNEL_TO_CONV.get(args["kernel"], args["kernel"]))
    return out


class MaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` that, without gradients on a CPU, takes the 3-wide maxima one axis at a time.

    The maximum over a 3x3x3 window is the maximum over z of maxima over y of maxima over x, so
    the result is the same to the bit. ATen's CPU kernel also records the argmax indices a backward
    pass would need: on a window batch of the demo network it took 4.2 ms against 0.4 ms this way,
    a fifth of the whole forward pass. Training, GPUs and graph capture (tracing, torch.compile,
    torch.export) keep the standard kernel. Only stride-2, padding-1 axes of width 3 are taken
    apart; width-1 axes (the slice-wise stem) are left as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = self._separable_axes()
        if (axes is None or x.is_cuda or torch.is_grad_enabled() or torch.jit.is_tracing()
                or torch.jit.is_scripting() or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)
        for axis in axes:
            x = _max3_stride2(x, axis)
        return x

    def _separable_axes(self) -> Optional[List[int]]:
        """The axes (2-4) pooled 3 wide with stride 2 and padding 1, if the others are untouched; else None."""
        k, s, p, d = (_as_triple(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        if self.ceil_mode or self.return_indices or d != (1, 1, 1):
            return None
        axes = [2 + i for i in range(3) if (k[i], s[i], p[i]) == (3, 2, 1)]
        others = all((k[i], s[i], p[i]) == (1, 1, 0) for i in range(3) if 2 + i not in axes)
        return axes if others else None


def _as_triple(v: Any) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _max3_stride2(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Max-pool along one axis: width 3, stride 2, padding 1 (padded with -inf, as ``nn.MaxPool3d`` pads)."""
    out = (x.shape[axis] - 1) // 2 + 1
    pad = [0] * 6
    pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = 1  # F.pad lists the last axis first
    padded = F.pad(x, pad, value=float("-inf"))

    def taps(start: int) -> torch.Tensor:
        return padded[(slice(None),) * axis + (slice(start, start + 2 * out - 1, 2),)]

    return torch.maximum(torch.maximum(taps(0), taps(1)), taps(2))


def _spatial(value: int, conv: str) -> Triple:
    """Expand a per-axis value; the slice-wise variant keeps the depth axis at 1."""
    return (1, value, value) if conv == "slicewise" else (value, value, value)


def _triple(value: IntOr3, conv: str, key: str) -> Triple:
    if isinstance(value, int):
        return _spatial(value, conv)
    t = tuple(int(v) for v in value)
    if len(t) != 3:
        raise Med3DError(f"{key}: expected an int or 3 values (D, H, W), got {list(value)}")
    return t  # type: ignore[return-value]


def _conv3(cin: int, cout: int, conv: str, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    k = _spatial(3, conv)
    d = _spatial(dilation, conv)
    pad = tuple((ki // 2) * di for ki, di in zip(k, d))
    return nn.Conv3d(cin, cout, k, stride=_spatial(stride, conv), padding=pad, dilation=d, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut type A: strided identity, extra channels zero-filled; no parameters.

    Unlike MedicalNet's version this does not detach the shortcut, so gradients flow
    through it; forward values are identical.
    """

    def __init__(self, out_channels: int, stride: Triple) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = x[:, :, :: s[0], :: s[1], :: s[2]]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, conv: str, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3(cin, planes, conv, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, conv, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, conv: str, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, conv, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet3D(nn.Module):
    """3D ResNet encoder returning the features of the stem and of layer1..layer4.

    The signature is the encoder's declaration: the registry reads these arguments, types and
    defaults, and the config schema (``model.encoder``) and export metadata follow from them.

    Args:
        depth: 10, 18, 34 (basic blocks) or 50, 101, 152, 200 (bottlenecks); fixed by the registered name.
        in_channels: number of input channels (modalities).
        layout: ``dilated`` (Med3D: output stride 8, layer3/4 dilated 2/4) or
            ``strided`` (output stride 32, for U-Net skips; MONAI's layout).
        conv: ``3d`` (3x3x3 convolutions) or ``slicewise`` (every kernel, stride and pool is 1 along
            depth: 1x3x3 convs, 1x7x7 stem, so a 2D ImageNet ResNet's kernels fit unchanged and the
            network computes the 2D network on every slice). Called ``kernel: 3x3x3 | 1x3x3`` before 0.2.
        shortcut: ``A`` (parameter-free) or ``B`` (1x1x1 conv + BN); None picks MedicalNet's per depth.
        stem_kernel, stem_stride: first conv kernel and stride (int or 3 values, D, H, W).
        downsample_bias: bias on the type-B shortcut conv (MONAI's ``bias_downsample``).
        widths: channels of the four stages before the bottleneck expansion.

    Raises:
        Med3DError: an argument is out of range, naming it.
    """

    def __init__(self, depth: int = 18, in_channels: int = 1, layout: Layout = "dilated", conv: Conv = "3d",
                 shortcut: Optional[Shortcut] = None, stem_kernel: IntOr3 = 7, stem_stride: IntOr3 = 2,
                 downsample_bias: bool = False, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        _check_args(depth, in_channels, layout, conv, shortcut, widths)
        block_name, blocks, default_shortcut = DEPTHS[depth]
        shortcut = shortcut or default_shortcut
        stem_kernel = _triple(stem_kernel, conv, "stem_kernel")
        stem_stride = _triple(stem_stride, conv, "stem_stride")
        # The resolved init arguments, so a checkpoint or export rebuilds the encoder rather than unpickling it.
        self.config: Dict[str, Any] = {"arch": f"resnet{depth}",
                                       **resolved_args(ResNet3D, locals(), skip=("depth",))}
        self.depth, self.in_channels, self.conv = depth, in_channels, conv

        sk = stem_kernel
        self.conv1 = nn.Conv3d(in_channels, widths[0], sk, stride=stem_stride, padding=tuple(k // 2 for k in sk),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        pool_k = _spatial(3, conv)
        self.maxpool = MaxPool3d(pool_k, stride=_spatial(2, conv), padding=tuple(k // 2 for k in pool_k))
        self.feature_info: List[FeatureInfo] = [FeatureInfo("stem", widths[0], stem_stride)]
        self._add_stages(BasicBlock if block_name == "basic" else Bottleneck, blocks, layout, conv, shortcut,
                         downsample_bias, widths)
        self.out_channels = self.feature_info[-1].channels
        self._init_weights()

    def _add_stages(self, block: type, blocks: List[int], layout: str, conv: str, shortcut: str,
                    downsample_bias: bool, widths: Sequence[int]) -> None:
        """layer1..layer4 with the layout's strides and dilations, each recorded in ``feature_info``."""
        stride = tuple(a * b for a, b in zip(self.feature_info[0].stride, _spatial(2, conv)))  # max-pool
        cin = widths[0]
        for i, ((s, d), planes) in enumerate(zip(_STAGE_PLAN[layout], widths)):
            cout = planes * block.expansion
            down: Optional[nn.Module] = None
            if s != 1 or cin != cout:
                if shortcut == "A":
                    down = ZeroPadShortcut(cout, _spatial(s, conv))
                else:
                    down = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=_spatial(s, conv), bias=downsample_bias),
                                         nn.BatchNorm3d(cout))
            layers = [block(cin, planes, conv, s, d, down)]
            layers += [block(cout, planes, conv, 1, d) for _ in range(1, blocks[i])]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            stride = tuple(a * b for a, b in zip(stride, _spatial(s, conv)))
            self.feature_info.append(FeatureInfo(f"layer{i + 1}", cout, stride))  # type: ignore[arg-type]
            cin = cout

    @property
    def size_divisibility(self) -> Triple:
        """Per axis (D, H, W): input sizes that are multiples of this give every stage an exact grid.

        The encoder itself runs at any size; heads that join or upsample stages ask for this
        (see ``MultiTaskModel.size_divisibility``).
        """
        return size_divisibility(self.feature_info)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line error if ``x`` is not a (N, C, D, H, W) batch with this encoder's channel count."""
        if x.ndim != 5:
            raise Med3DError(f"input has shape {tuple(x.shape)}; {self.config['arch']} expects (N, C, D, H, W)")
        if x.shape[1] != self.in_channels:
            raise Med3DError(f"input has {x.shape[1]} channel(s) but the encoder {self.config['arch']} expects "
                             f"{self.in_channels} (model.encoder.in_channels)")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Features of stem, layer1, layer2, layer3, layer4 (see ``feature_info``)."""
        self.check_input(x)
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def _check_args(depth: int, in_channels: int, layout: str, conv: str, shortcut: Optional[str],
                widths: Sequence[int]) -> None:
    """One-line errors for arguments out of range (a config has checked the types already)."""
    if depth not in DEPTHS:
        raise Med3DError(f"unknown ResNet depth {depth}; choose one of {sorted(DEPTHS)}")
    if layout not in LAYOUTS:
        raise Med3DError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if conv not in CONVS:
        raise Med3DError(f"unknown conv '{conv}'; choose one of {', '.join(CONVS)}")
    if shortcut not in (None, "A", "B"):
        raise Med3DError(f"unknown shortcut type '{shortcut}'; choose A or B")
    if in_channels < 1:
        raise Med3DError(f"in_channels must be at least 1, got {in_channels}")
    if len(widths) != 4 or min(widths) < 1:
        raise Med3DError(f"widths must be 4 positive channel counts (one per stage), got {list(widths)}")


for _d in DEPTHS:
    ENCODERS.register(f"resnet{_d}", upgrade=upgrade_args, depth=_d)(ResNet3D)
