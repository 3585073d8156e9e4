"""Option values and defaults that the command line shows in its help and checks as choices, without torch.

``med3d --help``, ``med3d --version`` and argument errors answer from these without loading PyTorch
(about 2 s of a 2.5 s start); the modules that act on the options import them from here.
"""
from __future__ import annotations

import typing
from typing import Literal, Tuple

# Encoder options (models.resnet3d). Argument types double as the config schema (med3d.registry reads
# them), so the choices are Literals.
Layout = Literal["dilated", "strided"]
Conv = Literal["3d", "slicewise"]
LAYOUTS: Tuple[str, ...] = typing.get_args(Layout)
CONVS: Tuple[str, ...] = typing.get_args(Conv)

# med3d export --format (export).
ENCODER_FORMATS = ("safetensors", "pt", "medicalnet", "monai")
MODEL_FORMATS = ("onnx", "torchscript")
FORMATS = ENCODER_FORMATS + MODEL_FORMATS

# med3d inflate --mode (transfer.inflate): 2D -> 3D kernel inflation.
INFLATE_MODES = ("1x3x3", "i3d", "center")

# med3d explain (explain).
EXPLAIN_METHODS = ("gradcam", "gradcam++")
EXPLAIN_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")
# Network-input voxels above which a scan is refused unless asked for. Measured peak memory on CPU
# per million voxels: about 0.75 GB for ResNet-50 with the med3d head, 1.4 GB for ResNet-18 with a U-Net
# head (full-resolution decoder), so this default needs some 6-11 GB.
EXPLAIN_MAX_VOXELS = 200 ** 3

# med3d analyze (analysis.patches, analysis.compare).
ANALYSIS_PATCH = (32, 64, 64)
ANALYSIS_PATCHES = 16
ANALYSIS_MAX_EXAMPLES = 8192
