"""The small public entry points: build encoders and models by name or from a config."""
from __future__ import annotations

from typing import Any, List, Mapping, Union

from .config import Config, from_dict, to_dict
from .models import MultiTaskModel, ResNet3D, build_heads  # registers encoders and heads
from .registry import ENCODERS


def list_encoders() -> List[str]:
    """Names accepted by ``create_encoder``."""
    return ENCODERS.names()


def create_encoder(arch: str, in_channels: int = 1, layout: str = "dilated", kernel: str = "3x3x3",
                   **kw: Any) -> ResNet3D:
    """Build an encoder by name, e.g. ``create_encoder("resnet50", in_channels=4, layout="strided")``."""
    return ENCODERS.get(arch)(in_channels=in_channels, layout=layout, kernel=kernel, **kw)


def create_model(cfg: Union[Config, Mapping[str, Any]]) -> MultiTaskModel:
    """Build the multi-task model from a ``Config`` (or a mapping with a ``model`` section)."""
    if not isinstance(cfg, Config):
        cfg = from_dict(dict(cfg))
    model_cfg = to_dict(cfg)["model"]
    enc = dict(model_cfg["encoder"])
    encoder = create_encoder(enc.pop("arch"), **enc)
    return MultiTaskModel(encoder, build_heads(encoder, model_cfg["heads"]), model_cfg.get("adapters"))
