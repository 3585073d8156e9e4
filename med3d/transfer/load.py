"""``load_pretrained``: foreign or own weights into an encoder or a multi-task model, with a full report."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import Med3DError
from ..models.heads import Med3DHead
from ..models.multitask import MultiTaskModel
from ..models.resnet3d import ResNet3D
from .channels import ChannelSpec, adapt_input_conv, map_input_channels
from .formats import StateDict, Weights, describe_state_dict, read_weights, summarize
from .inflate import inflate_state_dict

log = logging.getLogger("med3d.transfer")


@dataclass
class LoadReport:
    """What a weight load did: every key is accounted for."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # model keys the file did not provide
    unexpected: List[str] = field(default_factory=list)  # file keys the model has no place for
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    new_heads: List[str] = field(default_factory=list)  # heads left at their fresh initialisation
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from a {self.source} checkpoint; "
                 f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                 f"shape-mismatched {len(self.mismatched)}"]
        if self.new_heads:
            lines.append(f"  new heads (freshly initialised): {', '.join(self.new_heads)}")
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"  {name}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        for key, src, dst in self.mismatched[:8]:
            lines.append(f"  shape mismatch {key}: file {list(src)} vs model {list(dst)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _parts(module: nn.Module) -> Tuple[ResNet3D, str]:
    if isinstance(module, MultiTaskModel):
        return module.encoder, "encoder."
    if isinstance(module, ResNet3D):
        return module, ""
    raise Med3DError(f"load_pretrained needs a ResNet3D or MultiTaskModel, got {type(module).__name__}")


def _seg_task(module: nn.Module, task: Optional[str]) -> Optional[str]:
    """The head that MedicalNet's ``conv_seg`` weights go to: the named one, or the only Med3D head."""
    if not isinstance(module, MultiTaskModel):
        return None
    if task is not None:
        module._check_task(task)
        return task
    seg = [t for t, h in module.heads.items() if isinstance(h, Med3DHead)]
    return seg[0] if len(seg) == 1 else None


def _target_key(key: str, prefix: str, seg_task: Optional[str]) -> Optional[str]:
    if key.startswith(("encoder.", "heads.")):  # a med3d multi-task checkpoint
        if prefix:
            return key
        return key[len("encoder."):] if key.startswith("encoder.") else None
    if key.startswith("conv_seg."):
        return f"heads.{seg_task}.{key}" if seg_task else None
    if key.startswith("fc."):
        return None  # a classifier of the source task
    return prefix + key


def _prepare(weights: Weights, encoder: ResNet3D, report: LoadReport) -> StateDict:
    sd = weights.state_dict
    if weights.source == "torchvision":
        mode = "1x3x3" if encoder.conv == "slicewise" else "i3d"
        depth = encoder.layer1[0].conv2.weight.shape[2] if hasattr(encoder.layer1[0], "conv3") \
            else encoder.layer1[0].conv1.weight.shape[2]
        sd = inflate_state_dict(sd, mode, depth=depth, stem_depth=encoder.conv1.weight.shape[2])
        report.notes.append(f"2D weights inflated to 3D on the fly ({mode})")
    return sd


# Formats that do not record their layout use one: MedicalNet trains dilated, MONAI and torchvision strided.
_SOURCE_LAYOUT = {"medicalnet": "dilated", "monai": "strided", "torchvision": "strided"}
_LAYOUT_WORDS = {"dilated": "output stride 8, layer3/4 dilated 2/4", "strided": "output stride 32, no dilation"}


def file_layout(weights: Weights) -> Optional[str]:
    """The layout (``dilated`` | ``strided``) the file's encoder was trained in, when the file or its format says.

    Args:
        weights: weights as read.

    Returns:
        The layout, or None when nothing tells (a plain state dict).
    """
    enc = weights.metadata.get("encoder") if isinstance(weights.metadata.get("encoder"), dict) else None
    if enc is None and weights.config:
        enc = (weights.config.get("model") or {}).get("encoder")
    if isinstance(enc, dict) and enc.get("layout"):
        return str(enc["layout"])
    return _SOURCE_LAYOUT.get(weights.source)


def _layout_note(weights: Weights, encoder: ResNet3D, report: LoadReport) -> None:
    """Say so when the file's encoder ran in the other layout: the tensors fit, the receptive field does not."""
    src, dst = file_layout(weights), encoder.config.get("layout")
    if src and dst and src != dst:
        report.notes.append(f"layout: the weights were trained in the {src} layout ({_LAYOUT_WORDS.get(src, src)}) "
                            f"and load into a {dst} encoder ({_LAYOUT_WORDS.get(dst, dst)}): the same tensors with a "
                            "different receptive field, so layer3/4 see other context than in training; fine-tune "
                            f"rather than expect the source's features (or set model.encoder.layout: {src})")


def _first_conv(weight: torch.Tensor, in_channels: int, channel_map: Optional[Sequence[ChannelSpec]],
                report: LoadReport) -> torch.Tensor:
    if channel_map is not None:
        if len(channel_map) != in_channels:
            raise Med3DError(f"finetune.channel_map has {len(channel_map)} entries but the model takes "
                             f"{in_channels} input channels; give one entry per model channel")
        report.notes.append(f"conv1 input channels mapped from the file's {weight.shape[1]}: {list(channel_map)}")
        return map_input_channels(weight, channel_map)
    if weight.shape[1] != in_channels:
        report.notes.append(f"conv1 adapted from {weight.shape[1]} to {in_channels} input channels")
        return adapt_input_conv(weight, in_channels)
    return weight


def load_pretrained(module: nn.Module, path: Union[str, Path, Weights], source: str = "auto",
                    task: Optional[str] = None, strict: bool = True,
                    channel_map: Optional[Sequence[ChannelSpec]] = None) -> LoadReport:
    """Load weights from ``path`` into a ``ResNet3D`` or ``MultiTaskModel`` and report every key.

    Reads med3d exports and checkpoints, MedicalNet checkpoints (``state_dict`` with ``module.``
    keys, with or without ``conv_seg``), MONAI ResNet state dicts, torchvision 2D ResNets
    (inflated on the fly: ``1x3x3`` for a slice-wise encoder, ``i3d`` otherwise) and plain state
    dicts. The first conv's input channels follow ``channel_map`` when it is given (one entry per
    model input channel: a source channel index, "mean" or "zero"); otherwise a different channel
    count is adapted by ``adapt_input_conv``. With ``strict`` (default) any missing or mismatched
    encoder tensor aborts the load with one line comparing the file's architecture to the model's,
    and nothing is loaded; heads the file lacks are reported as new.

    Args:
        module: the model to load into.
        path: a weight file, or weights already read.
        source: the file's format, or "auto" to recognise it.
        task: the task whose head takes MedicalNet's ``conv_seg``.
        strict: refuse a load that leaves encoder tensors missing or mismatched.
        channel_map: how the file's input channels become the model's.

    Returns:
        The load report (loaded, missing, unexpected and mismatched keys, notes).

    Raises:
        Med3DError: the file is unreadable or holds a different architecture, or ``channel_map``
            names a channel the file lacks.
    """
    encoder, prefix = _parts(module)
    weights = path if isinstance(path, Weights) else read_weights(path, source)
    where = "weights" if isinstance(path, Weights) else str(path)
    report = LoadReport(source=weights.source)
    sd = _prepare(weights, encoder, report)
    seg_task = _seg_task(module, task)
    target = module.state_dict()
    new: StateDict = {}
    for key, value in sd.items():
        dst = _target_key(key, prefix, seg_task)
        if dst is None or dst not in target:
            report.unexpected.append(key)
            continue
        want = target[dst].shape
        if dst == prefix + "conv1.weight" and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            value = _first_conv(value, want[1], channel_map, report)
        if value.shape != want:
            report.mismatched.append((key, tuple(value.shape), tuple(want)))
            continue
        new[dst] = value
        report.loaded.append(dst)
    report.unexpected += [k for k in weights.state_dict if k not in sd]  # dropped by inflation (the classifier)
    report.missing = [k for k in target if k not in new]
    if any(k.startswith("conv_seg.") for k in sd) and not seg_task:
        report.notes.append("conv_seg (MedicalNet's head) not loaded: name the task whose head should take it")
    if any(k.startswith("fc.") for k in weights.state_dict):
        report.notes.append("the source classifier (fc) was dropped")
    _layout_note(weights, encoder, report)
    if isinstance(module, MultiTaskModel):
        report.new_heads = [t for t in module.tasks if not any(k.startswith(f"heads.{t}.") for k in new)]

    # An encoder tensor missing or mismatched means a different architecture: refuse as a whole.
    enc_missing = [k for k in report.missing if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    enc_bad = [k for k, _, _ in report.mismatched if not k.startswith(("conv_seg.", "heads."))]
    if not new or (strict and (enc_missing or enc_bad)):
        have = summarize(describe_state_dict(sd))
        want = summarize(describe_state_dict(encoder.state_dict()))
        first = (enc_bad or enc_missing or list(sd))[0]
        raise Med3DError(f"{where}: holds {have} ({weights.source} checkpoint) but the model's encoder is {want}; "
                         f"{len(enc_missing)} encoder tensors missing, {len(enc_bad)} shape-mismatched "
                         f"(first: {first}); nothing was loaded")
    module.load_state_dict({**target, **new})
    log.info(str(report))
    return report
