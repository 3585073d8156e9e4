"""Encoders, heads and the multi-task model (importing this registers them)."""
from .heads import ClassificationHead, Med3DHead, UNetDecoder  # noqa: F401
from .multitask import MultiTaskModel, build_head, build_heads  # noqa: F401
from .resnet3d import FeatureInfo, ResNet3D  # noqa: F401
