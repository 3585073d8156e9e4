"""The Med3D / MedicalNet 3D-ResNet encoder family.

Parameter names and shapes follow MedicalNet (conv1, bn1, layerN.M.convK / bnK,
layerN.0.downsample.0/1), which MONAI's ``resnetN`` also uses, so either project's
checkpoints load without renaming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import Med3DError
from ..registry import ENCODERS

Triple = Tuple[int, int, int]
IntOr3 = Union[int, Sequence[int]]

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
LAYOUTS = ("dilated", "strided")
KERNELS = ("3x3x3", "1x3x3")
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


def _spatial(value: int, kernel: str) -> Triple:
    """Expand a per-axis value; the ``1x3x3`` variant keeps the depth axis at 1 (slice-wise network)."""
    return (1, value, value) if kernel == "1x3x3" else (value, value, value)


def _triple(value: IntOr3, kernel: str) -> Triple:
    if isinstance(value, int):
        return _spatial(value, kernel)
    t = tuple(int(v) for v in value)
    if len(t) != 3:
        raise Med3DError(f"expected an int or 3 values, got {list(value)}")
    return t  # type: ignore[return-value]


def _conv3(cin: int, cout: int, kernel: str, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    k = _spatial(3, kernel)
    d = _spatial(dilation, kernel)
    pad = tuple((ki // 2) * di for ki, di in zip(k, d))
    return nn.Conv3d(cin, cout, k, stride=_spatial(stride, kernel), padding=pad, dilation=d, bias=False)


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

    def __init__(self, cin: int, planes: int, kernel: str, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3(cin, planes, kernel, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, kernel, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, kernel: str, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, kernel, stride, dilation)
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

    Args:
        depth: 10, 18, 34 (basic blocks) or 50, 101, 152, 200 (bottlenecks).
        in_channels: number of input channels (modalities).
        layout: ``dilated`` (Med3D: output stride 8, layer3/4 dilated 2/4) or
            ``strided`` (output stride 32, for U-Net skips; MONAI's layout).
        kernel: ``3x3x3`` or ``1x3x3`` (slice-wise: every kernel, stride and pool is 1 along depth,
            so 2D ImageNet kernels fit unchanged).
        shortcut: ``A`` (parameter-free) or ``B`` (1x1x1 conv + BN); None picks MedicalNet's per depth.
        stem_kernel, stem_stride: first conv kernel and stride (int or 3 values).
        downsample_bias: bias on the type-B shortcut conv (MONAI's ``bias_downsample``).
        widths: channels of the four stages before the bottleneck expansion.
    """

    def __init__(self, depth: int = 18, in_channels: int = 1, layout: str = "dilated", kernel: str = "3x3x3",
                 shortcut: Optional[str] = None, stem_kernel: IntOr3 = 7, stem_stride: IntOr3 = 2,
                 downsample_bias: bool = False, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise Med3DError(f"unknown ResNet depth {depth}; choose one of {sorted(DEPTHS)}")
        if layout not in LAYOUTS:
            raise Med3DError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
        if kernel not in KERNELS:
            raise Med3DError(f"unknown kernel '{kernel}'; choose one of {', '.join(KERNELS)}")
        block_name, blocks, default_shortcut = DEPTHS[depth]
        shortcut = shortcut or default_shortcut
        if shortcut not in ("A", "B"):
            raise Med3DError(f"unknown shortcut type '{shortcut}'; choose A or B")
        if in_channels < 1:
            raise Med3DError(f"in_channels must be at least 1, got {in_channels}")
        block = BasicBlock if block_name == "basic" else Bottleneck
        sk, ss = _triple(stem_kernel, kernel), _triple(stem_stride, kernel)
        # Init arguments, kept so a checkpoint or export can rebuild the encoder rather than unpickle it.
        self.config = dict(arch=f"resnet{depth}", in_channels=in_channels, layout=layout, kernel=kernel,
                           shortcut=shortcut, stem_kernel=list(sk), stem_stride=list(ss),
                           downsample_bias=downsample_bias, widths=list(widths))
        self.depth, self.in_channels, self.kernel = depth, in_channels, kernel

        self.conv1 = nn.Conv3d(in_channels, widths[0], sk, stride=ss, padding=tuple(k // 2 for k in sk), bias=False)
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        pool_k = _spatial(3, kernel)
        self.maxpool = nn.MaxPool3d(pool_k, stride=_spatial(2, kernel), padding=tuple(k // 2 for k in pool_k))

        stride: Triple = ss
        self.feature_info: List[FeatureInfo] = [FeatureInfo("stem", widths[0], stride)]
        stride = tuple(a * b for a, b in zip(stride, _spatial(2, kernel)))  # max-pool
        cin = widths[0]
        for i, ((s, d), planes) in enumerate(zip(_STAGE_PLAN[layout], widths)):
            cout = planes * block.expansion
            down: Optional[nn.Module] = None
            if s != 1 or cin != cout:
                if shortcut == "A":
                    down = ZeroPadShortcut(cout, _spatial(s, kernel))
                else:
                    down = nn.Sequential(
                        nn.Conv3d(cin, cout, 1, stride=_spatial(s, kernel), bias=downsample_bias),
                        nn.BatchNorm3d(cout))
            layers = [block(cin, planes, kernel, s, d, down)]
            layers += [block(cout, planes, kernel, 1, d) for _ in range(1, blocks[i])]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            stride = tuple(a * b for a, b in zip(stride, _spatial(s, kernel)))
            self.feature_info.append(FeatureInfo(f"layer{i + 1}", cout, stride))  # type: ignore[arg-type]
            cin = cout
        self.out_channels = cin
        self._init_weights()

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


def _register(depth: int) -> None:
    def build(**kw) -> ResNet3D:
        return ResNet3D(depth=depth, **kw)

    build.__doc__ = f"3D ResNet-{depth} encoder (see ResNet3D for arguments)."
    ENCODERS.register(f"resnet{depth}")(build)


for _d in DEPTHS:
    _register(_d)
