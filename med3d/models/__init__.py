"""Encoders, heads and the multi-task model (importing this registers them).

Adding a component is one module plus one registration (``ENCODERS.register("name")`` /
``HEADS.register("name")`` from ``med3d.registry``); its typed keyword arguments become its
config keys. An encoder takes ``in_channels``, sets ``in_channels`` and ``feature_info`` (a list
of ``FeatureInfo``: name, channels, stride per axis), has ``size_divisibility`` and returns the
list of stage features. A head takes ``feature_info`` and ``num_classes`` first, sets
``size_divisibility`` (the input multiples it needs per axis) and is called as ``head(features, out_size)``.
"""
from .heads import ClassificationHead, Med3DHead, UNetDecoder  # noqa: F401
from .multitask import MultiTaskModel, build_head, build_heads  # noqa: F401
from .resnet3d import FeatureInfo, ResNet3D  # noqa: F401
