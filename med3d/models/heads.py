"""Task heads, each built from the encoder's ``feature_info`` so any head fits any encoder: segmentation,
classification, and the self-supervised ``restore`` decoder and ``contrastive`` projection.

Every head is called as ``head(features, out_size)``: the list of stage features and the
spatial size of the network input (segmentation heads return logits at that size). A head's
``__init__`` signature after ``feature_info`` is its declaration (the config keys under
``model.heads.<task>``), and its ``size_divisibility`` says which input sizes (per axis) give it
features aligned with the input; ``MultiTaskModel`` pads other sizes up to it.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from ..registry import HEADS
from .resnet3d import FeatureInfo, Triple, size_divisibility
from .upsample import upsample_trilinear


def _resize(logits: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[2:]) == tuple(out_size):
        return logits
    return upsample_trilinear(logits, out_size)


@HEADS.register("med3d")
class Med3DHead(nn.Module):
    """MedicalNet's segmentation head ``conv_seg``: one 2x transposed conv and two convs on the last stage.

    Parameter names (conv_seg.0/1/3/4/6) match MedicalNet's, so its ``conv_seg`` weights load.

    Args:
        feature_info: the encoder's stages.
        num_classes: output channels (classes with background).
        channels: hidden width.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        # Logits come from the last stage; at multiples of its stride they land on the input grid exactly.
        self.size_divisibility: Triple = size_divisibility(feature_info[-1:])
        cin = feature_info[-1].channels
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(cin, channels, 2, stride=2),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, num_classes, 1, bias=False),
        )

    def forward(self, features: List[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return _resize(self.conv_seg(features[-1]), out_size)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


def _upsample(cin: int, cout: int, ratio: Tuple[int, ...]) -> nn.Module:
    """Transposed conv by ``ratio`` per axis; a 1x1x1 conv where the stride does not change (dilated stages)."""
    if all(r == 1 for r in ratio):
        return nn.Conv3d(cin, cout, 1)
    return nn.ConvTranspose3d(cin, cout, ratio, stride=ratio)


@HEADS.register("unet")
class UNetDecoder(nn.Module):
    """U-Net style decoder: transposed-conv upsampling from the deepest stage, concatenating each skip.

    Meant for the ``strided`` layout; on the ``dilated`` one the stages of equal stride are joined by 1x1x1 convs.

    Args:
        feature_info: the encoder's stages.
        num_classes: output channels (classes with background).
        channels: width of the last, full-resolution block.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        # Each upsampled stage is concatenated with the skip below it: their grids must match exactly.
        self.size_divisibility: Triple = size_divisibility(feature_info)
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        cin = feature_info[-1].channels
        for deep, skip in zip(reversed(feature_info[1:]), reversed(feature_info[:-1])):
            ratio = tuple(a // b for a, b in zip(deep.stride, skip.stride))
            self.ups.append(_upsample(cin, skip.channels, ratio))
            self.blocks.append(_conv_block(2 * skip.channels, skip.channels))
            cin = skip.channels
        self.final_up = _upsample(cin, channels, feature_info[0].stride)
        self.final_block = _conv_block(channels, channels)
        self.classifier = nn.Conv3d(channels, num_classes, 1)

    def forward(self, features: List[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        x = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(features[:-1])):
            x = up(x)
            if x.shape[2:] != skip.shape[2:]:  # odd input sizes: align to the skip before joining
                x = _resize(x, skip.shape[2:])
            x = block(torch.cat([x, skip], dim=1))
        x = self.final_block(self.final_up(x))
        return _resize(self.classifier(x), out_size)


@HEADS.register("classification")
class ClassificationHead(nn.Module):
    """Global average pooling of the last stage and a linear layer (named ``fc`` as in MedicalNet/MONAI).

    Args:
        feature_info: the encoder's stages.
        num_classes: number of classes.
        dropout: dropout probability before ``fc``.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Pooling takes any grid; padding would only average zeros in.
        self.size_divisibility: Triple = (1, 1, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_info[-1].channels, num_classes)

    def forward(self, features: List[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(features[-1]), 1)))


# ---------------------------------------------------------------- self-supervised heads (dropped at export)

def _halving_steps(stride: Sequence[int]) -> List[Tuple[int, ...]]:
    """Per-axis upsampling factors (2 where the stride is still above 1) that bring ``stride`` down to 1."""
    steps, left = [], list(stride)
    while any(s > 1 for s in left):
        factor = tuple(2 if s > 1 else 1 for s in left)
        steps.append(factor)
        left = [max(1, s // f) for s, f in zip(left, factor)]
    return steps


@HEADS.register("restore")
class RestoreHead(nn.Module):
    """A light decoder for Models Genesis restoration: the last stage upsampled 2x at a time to the input grid
    (trilinear, then conv + BN + ReLU, but for the last step), and a 1x1x1 conv to the reconstructed channels.

    Only the deepest features feed it (no skips), so what the corrupted patch lost has to be restored
    from what the encoder learned; it is a training aid that ``med3d export`` leaves out.

    Args:
        feature_info: the encoder's stages.
        num_classes: channels reconstructed: the task's input channels (1 for a one-channel encoder).
        channels: width of the first upsampling block, halved at each 2x step (at least 8).
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int = 1, channels: int = 64) -> None:
        super().__init__()
        self.size_divisibility: Triple = size_divisibility(feature_info[-1:])
        cin, blocks = feature_info[-1].channels, []
        steps = _halving_steps(feature_info[-1].stride)
        # Trilinear upsampling and one conv per step (transposed 3D convs are several times slower on CPU);
        # the last step goes straight to the 1x1x1 output conv, as a 3x3x3 conv at full resolution costs most.
        for i, factor in enumerate(steps[:-1]):
            cout = max(8, channels // 2 ** i)
            blocks.append(nn.Sequential(nn.Upsample(scale_factor=factor, mode="trilinear", align_corners=False),
                                        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
                                        nn.ReLU(inplace=True)))
            cin = cout
        if steps:
            blocks.append(nn.Upsample(scale_factor=steps[-1], mode="trilinear", align_corners=False))
        self.up = nn.Sequential(*blocks)
        self.out = nn.Conv3d(cin, num_classes, 1)

    def forward(self, features: List[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return _resize(self.out(self.up(features[-1])), out_size)


@HEADS.register("contrastive")
class ProjectionHead(nn.Module):
    """SimCLR's projection head: global average pooling of the last stage, then a two-layer MLP.

    The contrastive loss acts on its output, so the encoder's pooled features keep what the
    augmentations do not change; it is a training aid that ``med3d export`` leaves out.

    Args:
        feature_info: the encoder's stages.
        num_classes: size of the projection the loss compares (e.g. 128).
        hidden: width of the MLP's hidden layer.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.size_divisibility: Triple = (1, 1, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.mlp = nn.Sequential(nn.Linear(feature_info[-1].channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_classes))

    def forward(self, features: List[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return self.mlp(torch.flatten(self.pool(features[-1]), 1))
