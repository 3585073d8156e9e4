"""Reading weight files safely and recognising where they come from.

Only ``torch.load(weights_only=True)`` and safetensors are used: a file can hold tensors and
plain containers, never code.
"""
from __future__ import annotations

import json
import pickletools
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import Med3DError

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


def _pickle_imports(path: Path) -> Optional[List[str]]:
    """Modules.names a pickle (plain, or torch.save's zip) would import; None if it is no pickle at all."""
    raw = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            raw = zf.read(names[0]) if names else b""
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(raw):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle stream
        return None
    return found


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols; our message says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage bytes make the unpickler fail in many ways
        imports = _pickle_imports(path)
        unsafe = [g for g in imports or [] if not g.startswith(_SAFE_MODULES)]
        if unsafe:
            # weights_only allows tensors and plain containers only; anything else could run code.
            raise Med3DError(f"{path}: refused: loading it would import {', '.join(sorted(set(unsafe))[:3])}, "
                             "which can execute code; only tensors are loaded (re-save as a plain state dict "
                             "or safetensors)")
        detail = "not a pickle or zip archive" if imports is None else \
            (str(err).strip().splitlines() or [type(err).__name__])[-1][:100]
        raise Med3DError(f"{path}: not a readable PyTorch checkpoint ({detail}); "
                         "expected a .pth/.pt state dict or a .safetensors file")


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
        metadata: Dict[str, Any] = {k: _maybe_json(v) for k, v in meta.items()}
        if metadata.get("format") == "med3d":
            metadata = upgrade_metadata(metadata)
        detected = "med3d" if metadata.get("format") == "med3d" else detect_source(sd)
        return Weights(sd, detected if source == "auto" else source, metadata)
    obj = _torch_load(path)
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
