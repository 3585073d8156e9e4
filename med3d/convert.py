"""Whole-file conversions behind ``med3d export`` and ``med3d inflate``.

``model_from_file`` rebuilds a model (or an encoder) from any weights file med3d reads;
``inflate_file`` turns a 2D ImageNet ResNet file into a 3D encoder export. Both go through
``load_pretrained``, which logs its load report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .api import create_encoder
from .checkpoint import model_from_weights
from .errors import Med3DError
from .export import export_encoder
from .transfer.formats import Weights, read_weights
from .transfer.inflate import inflate_state_dict
from .transfer.load import load_pretrained

PathLike = Union[str, Path]


def model_from_file(path: PathLike, arch: Optional[str] = None, in_channels: int = 1, layout: str = "dilated",
                    conv: str = "3d", shortcut: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a weights file holds, and the metadata worth carrying into an export.

    A med3d checkpoint rebuilds its whole model; a med3d export rebuilds its encoder from its
    metadata; other encoder weights need ``arch`` (and the other encoder arguments when they
    differ from the defaults).

    Args:
        path: a med3d checkpoint or any weights file ``read_weights`` takes.
        arch, in_channels, layout, conv, shortcut: the encoder for plain weights.

    Returns:
        (model, metadata) with the file's weights loaded.

    Raises:
        Med3DError: the file is unreadable, plain weights come without ``arch``, or the weights
            do not fit the encoder.
    """
    weights = read_weights(path)
    if weights.config is not None:
        model, _, meta = model_from_weights(weights, path)
        return model, meta
    if weights.source == "med3d" and isinstance(weights.metadata.get("encoder"), dict):
        enc_cfg = dict(weights.metadata["encoder"])
        enc = create_encoder(enc_cfg.pop("arch"), **enc_cfg)
    elif arch:
        enc = create_encoder(arch, in_channels=in_channels, layout=layout, conv=conv, shortcut=shortcut)
    else:
        raise Med3DError(f"{path}: plain {weights.source} weights carry no architecture; "
                         "give --arch (and --layout/--conv/--shortcut if not the defaults)")
    load_pretrained(enc, weights)
    return enc, {k: v for k, v in weights.metadata.items() if k not in ("format", "sha256", "encoder")}


def inflate_file(src: PathLike, arch: str, out: PathLike, mode: str = "1x3x3", layout: str = "strided",
                 in_channels: Optional[int] = None, overwrite: bool = False) -> Path:
    """Inflate a 2D ResNet state dict (torchvision names) to a 3D encoder and export it as safetensors.

    Args:
        src: the 2D weights (.pth / .safetensors).
        arch: the encoder the weights are for, e.g. ``resnet34``.
        out: the .safetensors file to write (atomically).
        mode: ``1x3x3`` (slice-wise), ``i3d`` or ``center`` (see ``inflate_kernel``).
        layout: the encoder layout; ``strided`` keeps the 2D network's strides.
        in_channels: adapt the first conv to this many channels (default: the file's).
        overwrite: replace an existing ``out``.

    Returns:
        The written file.

    Raises:
        Med3DError: ``src`` is no 2D ResNet, does not fit ``arch``, or ``out`` exists.
    """
    weights = read_weights(src)
    conv1 = _stem_kernel_2d(weights, src)
    enc = create_encoder(arch, in_channels=conv1.shape[1] if in_channels is None else in_channels,
                         layout=layout, conv="slicewise" if mode == "1x3x3" else "3d", shortcut="B")
    load_pretrained(enc, Weights(inflate_state_dict(weights.state_dict, mode), "plain"))
    meta = {"inflated_from": Path(src).name, "inflation": mode,
            "normalisation": "ImageNet RGB mean/std (torchvision)"}
    return export_encoder(enc, "safetensors", out, meta=meta, overwrite=overwrite)


def _stem_kernel_2d(weights: Weights, src: PathLike) -> torch.Tensor:
    """The 2D file's ``conv1.weight``; a one-line error when the file is no 2D ResNet."""
    conv1 = weights.state_dict.get("conv1.weight")
    if weights.source == "torchvision" and conv1 is not None:
        return conv1
    if any(t.ndim == 4 for t in weights.state_dict.values()):
        # 2D kernels but no 2D stem: another naming scheme, or a partial state dict
        found = "no conv1.weight" if conv1 is None else f"conv1.weight of shape {list(conv1.shape)}"
        raise Med3DError(f"{src}: holds 2D kernels but {found}; inflate takes a 2D ResNet state dict "
                         "in torchvision naming (conv1.weight, layer1.0.conv1.weight, ...)")
    raise Med3DError(f"{src}: holds {weights.source} 3D weights, not a 2D ResNet; nothing to inflate")
