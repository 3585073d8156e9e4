"""med3d's own checkpoint: weights plus the resolved config that rebuilds the model (never unpickled objects)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import __version__
from .api import create_model
from .config import Config, from_dict, to_dict
from .errors import Med3DError
from .atomic import write_atomic
from .models.multitask import MultiTaskModel
from .transfer.formats import Weights, read_weights


def save_checkpoint(path: Union[str, Path], model: MultiTaskModel, cfg: Config,
                    meta: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` and its config atomically; ``meta`` holds the input contract (channels, spacing, ...)."""
    payload = {"format": "med3d-checkpoint", "med3d_version": __version__, "config": to_dict(cfg),
               "model": model.state_dict(), "meta": dict(meta or {}), **(extra or {})}
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Union[str, Path]) -> Tuple[MultiTaskModel, Config, Dict[str, Any]]:
    """Rebuild the model from a med3d checkpoint's config and load its weights strictly."""
    return model_from_weights(read_weights(path), path)


def model_from_weights(weights: Weights, path: Union[str, Path]) -> Tuple[MultiTaskModel, Config, Dict[str, Any]]:
    """``load_checkpoint`` for weights already read from ``path`` (named in errors)."""
    if weights.config is None:
        raise Med3DError(f"{path}: not a med3d checkpoint (no config inside); it holds plain "
                         f"{weights.source} weights: give --arch to build an encoder for them")
    cfg = from_dict(weights.config)
    model = create_model(cfg)
    result = model.load_state_dict(weights.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise Med3DError(f"{path}: weights do not fit the model its own config describes "
                         f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model, cfg, weights.metadata
