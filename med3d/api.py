"""The small public entry points: build encoders and models by name or from a config, check patch sizes."""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence, Union

import torch
import torch.nn as nn

from .config import Config, from_dict, to_dict
from .errors import Med3DError
from .models import MultiTaskModel, ResNet3D, build_heads  # registers encoders and heads
from .models.resnet3d import Triple
from .registry import ENCODERS


def list_encoders() -> List[str]:
    """Names accepted by ``create_encoder``."""
    return ENCODERS.names()


def create_encoder(arch: str, **kwargs: Any) -> ResNet3D:
    """Build a registered encoder by name, e.g. ``create_encoder("resnet50", in_channels=4, layout="strided")``.

    Args:
        arch: a name from ``list_encoders()``.
        **kwargs: the encoder's declared arguments (``med3d.registry.ENCODERS.params(arch)``); names of
            older med3d versions are mapped (``kernel="1x3x3"`` -> ``conv="slicewise"``).

    Returns:
        The encoder, randomly initialised.

    Raises:
        Med3DError: unknown ``arch`` or an argument it does not declare (with a did-you-mean).
    """
    return ENCODERS.build(arch, **kwargs)


def encoder_from_config(config: Mapping[str, Any]) -> ResNet3D:
    """Rebuild an encoder from its config: ``enc.config``, an export's ``encoder`` metadata or ``model.encoder``.

    Args:
        config: ``arch`` plus the encoder's arguments (old names are mapped).

    Returns:
        The encoder, randomly initialised.

    Raises:
        Med3DError: ``arch`` is missing or unknown, or an argument is not declared.
    """
    args = dict(config)
    if "arch" not in args:
        raise Med3DError(f"encoder config {sorted(args)} has no 'arch'; add the encoder's name, e.g. arch: resnet18")
    return create_encoder(args.pop("arch"), **args)


def create_model(cfg: Union[Config, Mapping[str, Any]]) -> MultiTaskModel:
    """Build the multi-task model from a ``Config`` (or a mapping with a ``model`` section).

    Raises:
        Med3DError: the config does not validate (one line naming the key).
    """
    if not isinstance(cfg, Config):
        cfg = from_dict(dict(cfg))
    model_cfg = to_dict(cfg)["model"]
    encoder = encoder_from_config(model_cfg["encoder"])
    return MultiTaskModel(encoder, build_heads(encoder, model_cfg["heads"]), model_cfg.get("adapters"))


ModelOrConfig = Union[nn.Module, Config, Mapping[str, Any]]


def size_divisibility(model_or_cfg: ModelOrConfig) -> Triple:
    """Per axis (z, y, x): what input sizes must be multiples of for the model's heads to line up.

    Args:
        model_or_cfg: a ``MultiTaskModel``, an encoder, or a config (built on the meta device:
            no weights are allocated).

    Returns:
        The divisibility per axis.

    Raises:
        Med3DError: the config does not validate.
    """
    if isinstance(model_or_cfg, nn.Module):
        return tuple(model_or_cfg.size_divisibility)  # type: ignore[arg-type, return-value]
    with torch.device("meta"):  # the structure is all we need; no memory, no init time
        return create_model(model_or_cfg).size_divisibility


def check_patch_size(model_or_cfg: ModelOrConfig, patch_size: Sequence[int]) -> None:
    """Refuse a training patch size the model's heads cannot align with (for the trainer's preflight).

    Args:
        model_or_cfg: see ``size_divisibility``.
        patch_size: ``data.patch_size`` (z, y, x) in voxels.

    Raises:
        Med3DError: one line naming ``data.patch_size``, the divisibility per axis and the nearest valid sizes.
    """
    if len(patch_size) != 3:
        raise Med3DError(f"data.patch_size must be 3 sizes (z, y, x), got {list(patch_size)}")
    div = size_divisibility(model_or_cfg)
    if all(s % d == 0 for s, d in zip(patch_size, div)):
        return
    below = [max(d, s // d * d) for s, d in zip(patch_size, div)]
    above = [-(-s // d) * d for s, d in zip(patch_size, div)]
    nearest = [lo if s - lo <= hi - s else hi for s, lo, hi in zip(patch_size, below, above)]
    raise Med3DError(f"data.patch_size {list(patch_size)} does not fit the model: each axis (z, y, x) must be a "
                     f"multiple of {list(div)} (the encoder's strides its heads align with); nearest valid "
                     f"{nearest} (down {below}, up {above})")
