"""Reading weight files safely and recognising where they come from.

Only ``torch.load(weights_only=True)`` and safetensors are used: a file can hold tensors and
plain containers, never code.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..errors import Med3DError
from .untrusted import Limits, check_loaded, scan_weights_file

StateDict = Dict[str, torch.Tensor]
SOURCES = ("med3d", "medicalnet", "monai", "torchvision", "plain")


@dataclass
class Weights:
    """Tensors read from a file, the metadata that came with them and the detected source."""

    state_dict: StateDict
    source: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    config: Optional[Dict[str, Any]] = None  # resolved med3d config, for med3d training checkpoints


_SAFE_MODULES = ("torch", "collections", "_codecs", "numpy")


def torch_load_bounded(path: Path) -> Any:
    """``torch.load(weights_only=True)`` after a bounded scan of the file (``untrusted.scan_weights_file``).

    Args:
        path: a ``.pt`` / ``.pth`` file (zip or legacy pickle).

    Returns:
        What the file holds: tensors in plain containers.

    Raises:
        Med3DError: the file passes a size or opcode limit, would import something other than
            tensors and plain containers, or is no readable checkpoint.
    """
    limits = Limits.from_env()
    scan = scan_weights_file(path, limits)  # before torch sees it: a crafted pickle can run for minutes
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols; our message says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage bytes make the unpickler fail in many ways
        unsafe = [g for g in scan.globals if not g.startswith(_SAFE_MODULES)]
        if unsafe:
            # weights_only allows tensors and plain containers only; anything else could run code.
            raise Med3DError(f"{path}: refused: loading it would import {', '.join(sorted(set(unsafe))[:3])}, "
                             "which can execute code; only tensors are loaded (re-save as a plain state dict "
                             "or safetensors)")
        detail = "not a pickle or zip archive" if not scan.is_pickle else \
            (str(err).strip().splitlines() or [type(err).__name__])[-1][:100]
        raise Med3DError(f"{path}: not a readable PyTorch checkpoint ({detail}); "
                         "expected a .pth/.pt state dict or a .safetensors file")
    check_loaded(obj, path, limits)
    return obj


def _safetensors_load(path: Path) -> Tuple[StateDict, Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as err:  # safetensors raises its own error types
        raise Med3DError(f"{path}: not a readable safetensors file ({str(err)[:120]})")


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _unwrap(obj: Any, path: Path) -> Tuple[StateDict, Optional[Dict[str, Any]], Dict[str, Any]]:
    """Find the state dict inside common checkpoint wrappers."""
    config, meta = None, {}
    if isinstance(obj, dict) and obj.get("format") == "med3d-checkpoint":
        config, meta = obj.get("config"), dict(obj.get("meta") or {})
        obj = obj["model"]
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Med3DError(f"{path}: holds no state dict of tensors; expected weights saved with "
                         "torch.save(model.state_dict()) or a MedicalNet / med3d checkpoint")
    return dict(obj), config, meta


def detect_source(sd: StateDict, wrapped_medicalnet: bool = False) -> str:
    """Guess where a state dict comes from (keys are inspected after ``module.`` stripping by the caller)."""
    conv1 = sd.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4:
        return "torchvision"
    if wrapped_medicalnet or any(k.startswith("conv_seg.") for k in sd):
        return "medicalnet"
    if any(k.startswith("fc.") for k in sd):
        return "monai"
    return "plain"


def strip_prefix(sd: StateDict, prefix: str = "module.") -> StateDict:
    """Remove a DataParallel-style prefix from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def read_weights(path: str | Path, source: str = "auto") -> Weights:
    """Read a weight file (.pth/.pt via weights_only, or .safetensors) and tell its source."""
    path = Path(path)
    if source not in ("auto",) + SOURCES:
        raise Med3DError(f"unknown weights source '{source}'; choose auto or one of {', '.join(SOURCES)}")
    if not path.is_file():
        raise Med3DError(f"{path}: weights file not found")
    if _is_safetensors(path):
        sd, meta = _safetensors_load(path)
        metadata = decode_metadata(meta, path)
        detected = "med3d" if metadata.get("format") == "med3d" else detect_source(sd)
        return Weights(sd, detected if source == "auto" else source, metadata)
    obj = torch_load_bounded(path)
    wrapped = isinstance(obj, dict) and "state_dict" in obj
    sd, config, meta = _unwrap(obj, path)
    had_module = any(k.startswith("module.") for k in sd)
    sd = strip_prefix(sd)
    if config is not None:
        detected = "med3d"
    else:
        detected = detect_source(sd, wrapped_medicalnet=wrapped or had_module)
    return Weights(sd, detected if source == "auto" else source, meta, config)


def upgrade_metadata(metadata: Mapping[str, Any]) -> Dict[str, Any]:
    """med3d export metadata written by older versions, in today's names.

    A bare ``spacing`` becomes ``spacing_zyx`` (med3d has always kept spacings as z, y, x; the key
    now says so), and the encoder's ``kernel: 3x3x3 | 1x3x3`` becomes ``conv: 3d | slicewise``.

    Args:
        metadata: decoded metadata of a med3d export.

    Returns:
        An upgraded copy (unchanged when already current).
    """
    out = dict(metadata)
    if "spacing" in out:
        legacy = out.pop("spacing")
        out.setdefault("spacing_zyx", legacy)
    enc = out.get("encoder")
    if isinstance(enc, dict):
        from ..models.resnet3d import upgrade_args

        out["encoder"] = upgrade_args(enc)
    return out


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


MAX_METADATA_DEPTH = 32  # med3d writes two levels (encoder arguments, lists of names)
MAX_METADATA_CHARS = 1 << 20  # per value; a model card is a few kilobytes


def _depth(value: Any) -> int:
    """How deeply ``value``'s lists and mappings nest (iterative: a crafted value may nest thousands deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_METADATA_DEPTH:
                break
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_med3d_metadata(metadata: Dict[str, Any], path: Path) -> None:
    """The keys of a med3d export that med3d itself acts on must have the types it writes."""
    enc = metadata.get("encoder")
    if enc is not None:
        if not isinstance(enc, dict):
            raise Med3DError(f"{path}: metadata 'encoder' must be a mapping of encoder arguments, got "
                             f"{type(enc).__name__}; re-export the weights")
        from ..config import from_dict

        try:  # the config schema checks the arch and each argument's type and range
            from_dict({"model": {"encoder": upgrade_metadata({"encoder": enc})["encoder"]}})
        except (Med3DError, TypeError) as err:
            raise Med3DError(f"{path}: metadata 'encoder' is not a valid encoder ({str(err)[:160]}); "
                             "re-export the weights")
    spacing = metadata.get("spacing_zyx", metadata.get("spacing"))
    if spacing is not None:
        from ..values import spacing as check_spacing

        check_spacing(spacing, f"{path}: metadata 'spacing_zyx'")
    if "sha256" in metadata and not isinstance(metadata["sha256"], str):  # compared with the tensors' digest
        raise Med3DError(f"{path}: metadata 'sha256' must be text, got {type(metadata['sha256']).__name__}")


def decode_metadata(meta: Mapping[str, str], path: Path) -> Dict[str, Any]:
    """A safetensors file's ``__metadata__`` strings as values (JSON where they are), checked.

    Args:
        meta: the header's metadata (string to string, as safetensors guarantees).
        path: the file, for messages.

    Returns:
        The decoded metadata; a med3d export's is checked and upgraded to today's names.

    Raises:
        Med3DError: a value is longer than ``MAX_METADATA_CHARS`` or nests deeper than
            ``MAX_METADATA_DEPTH``, or a med3d export's ``encoder``, ``spacing_zyx`` or ``sha256`` has
            the wrong type or range (naming the key).
    """
    out: Dict[str, Any] = {}
    for key, text in meta.items():
        if len(text) > MAX_METADATA_CHARS:
            raise Med3DError(f"{path}: metadata '{key[:60]}' holds {len(text):,} characters, over the "
                             f"{MAX_METADATA_CHARS:,} med3d accepts; re-export the weights")
        try:
            value = _maybe_json(text)
        except RecursionError:  # json's decoder recurses once per level
            value = None
        if (value is None and text.strip() != "null") or _depth(value) > MAX_METADATA_DEPTH:
            raise Med3DError(f"{path}: metadata '{key[:60]}' nests more than {MAX_METADATA_DEPTH} levels deep; "
                             "re-export the weights")
        out[key] = value
    if out.get("format") == "med3d":
        _check_med3d_metadata(out, path)
        out = upgrade_metadata(out)
    return out


def describe_state_dict(sd: StateDict) -> Dict[str, Any]:
    """What ResNet a state dict holds: arch, dims, shortcut, conv (3D: ``3d`` | ``slicewise``), input channels.

    Best effort, from key names and shapes only.
    """
    sd = {k: v for k, v in sd.items() if not k.startswith(("conv_seg.", "fc.", "heads.", "encoder."))} or \
        strip_prefix({k: v for k, v in sd.items() if k.startswith("encoder.")}, "encoder.")
    conv1 = sd.get("conv1.weight")
    if conv1 is None:
        return {"arch": "unknown (no conv1.weight)"}
    blocks = []
    for layer in range(1, 5):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{layer}.")}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = "layer1.0.conv3.weight" in sd
    from ..models.resnet3d import DEPTHS

    depth = next((d for d, (b, n, _) in DEPTHS.items() if n == blocks and (b == "bottleneck") == bottleneck), None)
    key3 = "layer1.0.conv2.weight" if bottleneck else "layer1.0.conv1.weight"
    w3 = sd.get(key3)
    info = {
        "arch": f"resnet{depth}" if depth else f"unknown ResNet (blocks per stage {blocks})",
        "dims": conv1.ndim - 2,
        "in_channels": int(conv1.shape[1]),
        "shortcut": "B" if any(".downsample.0." in k for k in sd) else "A",
        "stem_kernel": list(conv1.shape[2:]),
        "width": int(conv1.shape[0]),
    }
    if w3 is not None and w3.ndim == 5:
        info["conv"] = "slicewise" if w3.shape[2] == 1 else "3d"
    return info


def summarize(info: Dict[str, Any]) -> str:
    """One phrase for messages: 'a 3D resnet18 (shortcut A, 1 input channel)'."""
    if "dims" not in info:
        return info["arch"]
    return (f"a {info['dims']}D {info['arch']} (shortcut {info['shortcut']}, {info['in_channels']} input "
            f"channel{'s' if info['in_channels'] != 1 else ''}, width {info['width']})")
