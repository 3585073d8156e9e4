"""Export encoder weights (safetensors with metadata, pt, MedicalNet, MONAI) and whole models (ONNX, TorchScript)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from . import __version__
from .errors import Med3DError
from .io import atomic_path
from .models.multitask import MultiTaskModel
from .models.resnet3d import ResNet3D

ENCODER_FORMATS = ("safetensors", "pt", "medicalnet", "monai")
MODEL_FORMATS = ("onnx", "torchscript")
FORMATS = ENCODER_FORMATS + MODEL_FORMATS


def tensors_sha256(sd: Dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, in key order: identifies the weights, not the file."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # flattened: 0-d BN counters too
    return h.hexdigest()


def _encoder(model: nn.Module) -> ResNet3D:
    return model.encoder if isinstance(model, MultiTaskModel) else model  # type: ignore[return-value]


def _require(enc: ResNet3D, fmt: str, **want: Any) -> None:
    for key, value in want.items():
        if enc.config[key] != value:
            raise Med3DError(f"--format {fmt}: needs an encoder with {key}={value}, this one has "
                             f"{key}={enc.config[key]}; that library could not rebuild it")


def export_metadata(enc: ResNet3D, sd: Dict[str, torch.Tensor], meta: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """String metadata stored in a med3d safetensors export."""
    meta = dict(meta or {})
    fields = {
        "format": "med3d", "med3d_version": __version__, "encoder": enc.config,
        "input_channels": meta.pop("input_channels", [f"channel{i}" for i in range(enc.in_channels)]),
        "spacing": meta.pop("spacing", None), "normalisation": meta.pop("normalisation", None),
        "datasets": meta.pop("datasets", []), "sha256": tensors_sha256(sd), **meta,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


def export_encoder(model: nn.Module, fmt: str, out: str | Path, meta: Optional[Dict[str, Any]] = None,
                   overwrite: bool = False) -> Path:
    """Write the encoder's weights in ``fmt`` (safetensors, pt, medicalnet, monai), atomically."""
    enc = _encoder(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    if fmt == "medicalnet":
        _require(enc, fmt, layout="dilated", kernel="3x3x3", stem_kernel=[7, 7, 7], stem_stride=[2, 2, 2],
                 widths=[64, 128, 256, 512], downsample_bias=False)
        payload: Any = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}  # DataParallel layout
    elif fmt == "monai":
        _require(enc, fmt, layout="strided", kernel="3x3x3", stem_stride=[2, 2, 2], widths=[64, 128, 256, 512])
        payload = sd
    elif fmt in ("pt", "safetensors"):
        payload = sd
    else:
        raise Med3DError(f"--format {fmt}: not an encoder format; choose one of {', '.join(FORMATS)}")
    with atomic_path(out, overwrite=overwrite) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata=export_metadata(enc, sd, meta))
        else:
            torch.save(payload, tmp)
    return Path(out)


class _TaskModel(nn.Module):
    """The multi-task model fixed to one task, as traced exporters need a single-input forward."""

    def __init__(self, model: MultiTaskModel, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task)


def _task_model(model: nn.Module, task: Optional[str], fmt: str) -> _TaskModel:
    if not isinstance(model, MultiTaskModel) or not model.tasks:
        raise Med3DError(f"--format {fmt}: exports a whole model with a head; give a med3d checkpoint with a head")
    if task is None:
        if len(model.tasks) != 1:
            raise Med3DError(f"--format {fmt}: the model has heads {', '.join(model.tasks)}; choose one with --task")
        task = model.tasks[0]
    model._check_task(task)
    return _TaskModel(model, task).eval()


def export_onnx(model: nn.Module, out: str | Path, input_size: Sequence[int], task: Optional[str] = None,
                overwrite: bool = False, check: bool = True) -> float:
    """ONNX export with dynamic batch and spatial axes; returns max |onnxruntime - PyTorch| on a random input."""
    wrapped = _task_model(model, task, "onnx")
    x = torch.randn(1, wrapped.model.encoder.in_channels, *input_size)
    dyn = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    with atomic_path(out, overwrite=overwrite) as tmp:
        torch.onnx.export(wrapped, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dyn, "logits": dyn}, opset_version=17, dynamo=False)
        wrapped.eval()  # the exporter restores the module's mode recursively; keep inference behaviour
        diff = _check_onnx(wrapped, tmp, x) if check else float("nan")
    return diff


def _check_onnx(wrapped: nn.Module, path: Path, x: torch.Tensor) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise Med3DError("onnx export check needs onnxruntime: pip install 'med3d[onnx]'")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = wrapped(x).numpy()
    diff = float(abs(got - ref).max())
    if diff > 1e-3:
        raise Med3DError(f"onnx export: onnxruntime output differs from PyTorch by {diff:.2e}; not written")
    return diff


def export_torchscript(model: nn.Module, out: str | Path, input_size: Sequence[int], task: Optional[str] = None,
                       overwrite: bool = False) -> Path:
    """TorchScript (traced) export of the model for one task."""
    wrapped = _task_model(model, task, "torchscript")
    x = torch.randn(1, wrapped.model.encoder.in_channels, *input_size)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, x)
    with atomic_path(out, overwrite=overwrite) as tmp:
        traced.save(str(tmp))
    return Path(out)
