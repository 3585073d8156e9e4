"""Export encoder weights (safetensors with metadata, pt, MedicalNet, MONAI) and whole models (ONNX, TorchScript).

A safetensors export states its input contract in its metadata: the encoder's arguments,
input channel names, spacing (always ``spacing_zyx``: z, y, x in mm), normalisation and datasets,
per task under ``tasks`` when exported from a training checkpoint whose plans hold them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from . import __version__
from .errors import Med3DError
from .atomic import atomic_path
from .models.multitask import MultiTaskModel
from .models.resnet3d import ResNet3D
from .transfer.formats import upgrade_metadata

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


def export_metadata(enc: ResNet3D, sd: Dict[str, torch.Tensor], meta: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    """String metadata stored in a med3d safetensors export (values JSON-encoded).

    Args:
        enc: the exported encoder (its ``config`` is recorded).
        sd: the exported tensors (hashed).
        meta: see ``input_contract``.

    Returns:
        key -> string, as safetensors stores it.
    """
    fields = {"format": "med3d", "med3d_version": __version__, "encoder": enc.config,
              **input_contract(meta or {}, enc.in_channels), "sha256": tensors_sha256(sd)}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


_OWN_KEYS = ("format", "med3d_version", "encoder", "sha256")  # written by export_metadata itself


def input_contract(meta: Mapping[str, Any], in_channels: int) -> Dict[str, Any]:
    """The input contract an export states: channel names, spacing (z, y, x), normalisation, datasets, tasks.

    Args:
        meta: a training checkpoint's metadata (``plans`` per task, ``patch_size``, ``job``), an export's
            metadata (re-exported as it is; a legacy bare ``spacing`` becomes ``spacing_zyx``), or keys
            given by hand (``input_channels``, ``spacing_zyx``, ``normalisation``, ``datasets``).
        in_channels: the encoder's input channels (named channel0.. when nothing names them).

    Returns:
        The contract; other keys of ``meta`` are kept as they are.
    """
    meta = upgrade_metadata(meta)
    plans = meta.pop("plans", None)
    if plans:
        rest = {k: v for k, v in meta.items() if k not in ("tasks", "patch_size", "in_channels")}
        meta = {**_from_plans(plans, in_channels), "patch_size_zyx": meta.get("patch_size"), **rest}
    out: Dict[str, Any] = {"input_channels": [f"channel{i}" for i in range(in_channels)], "spacing_zyx": None,
                           "normalisation": None, "datasets": []}
    out.update({k: v for k, v in meta.items() if k not in _OWN_KEYS})
    if isinstance(out["datasets"], str):  # "a,b,c", as older callers passed it
        out["datasets"] = [d.strip() for d in out["datasets"].split(",") if d.strip()]
    return out


def _from_plans(plans: Mapping[str, Mapping[str, Any]], in_channels: int) -> Dict[str, Any]:
    """Contract keys from a checkpoint's per-task plans; a top-level value only where all tasks agree."""
    tasks = {task: _task_contract(plan, in_channels) for task, plan in plans.items()}

    def common(key: str) -> Any:
        values = [t[key] for t in tasks.values()]
        return values[0] if all(v == values[0] for v in values) else None

    names = common("channel_names")
    return {"input_channels": names if names and len(names) == in_channels else
            [f"channel{i}" for i in range(in_channels)],
            "spacing_zyx": common("spacing_zyx"), "normalisation": common("normalisation"),
            "datasets": [t["dataset"] for t in tasks.values()], "tasks": tasks}


def _task_contract(plan: Mapping[str, Any], in_channels: int) -> Dict[str, Any]:
    """One task's plan as an export states it: only the channels the task feeds (``plan["channels"]``)."""
    names: List[str] = list(plan.get("channel_names") or [])
    norm: List[Any] = list(plan.get("normalization") or [])
    chosen = plan.get("channels")
    if chosen is not None:
        chosen = [chosen] if isinstance(chosen, int) else list(chosen)
        names = [names[i] for i in chosen if i < len(names)]
        norm = [norm[i] for i in chosen if i < len(norm)]
    spacing = plan.get("target_spacing")  # the planner's order is (z, y, x)
    return {"dataset": plan.get("dataset"), "spacing_zyx": list(spacing) if spacing is not None else None,
            "normalisation": norm or None, "channel_names": names, "labels": plan.get("labels"),
            # a task with another channel count reaches the encoder through a 1x1x1 adapter (not exported here)
            "input_adapter": bool(names) and len(names) != in_channels}


def export_encoder(model: nn.Module, fmt: str, out: str | Path, meta: Optional[Dict[str, Any]] = None,
                   overwrite: bool = False) -> Path:
    """Write the encoder's weights in ``fmt`` (safetensors, pt, medicalnet, monai), atomically."""
    enc = _encoder(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    if fmt == "medicalnet":
        _require(enc, fmt, layout="dilated", conv="3d", stem_kernel=[7, 7, 7], stem_stride=[2, 2, 2],
                 widths=[64, 128, 256, 512], downsample_bias=False)
        payload: Any = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}  # DataParallel layout
    elif fmt == "monai":
        _require(enc, fmt, layout="strided", conv="3d", stem_stride=[2, 2, 2], widths=[64, 128, 256, 512])
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


def _inputs(wrapped: _TaskModel, input_size: Sequence[int]) -> List[torch.Tensor]:
    """Random inputs to trace and check with: ``input_size``, and one size up per axis.

    The second size is not a multiple of any stride > 1, so a check there catches an export that
    only works at the traced size (the padding to the head's divisibility must follow the input).
    """
    model, task = wrapped.model, wrapped.task
    channels = model.adapters[task].in_channels if task in model.adapters else model.encoder.in_channels
    return [torch.randn(1, channels, *input_size), torch.randn(1, channels, *(s + 1 for s in input_size))]


def export_onnx(model: nn.Module, out: str | Path, input_size: Sequence[int], task: Optional[str] = None,
                overwrite: bool = False, check: bool = True) -> float:
    """ONNX export with dynamic batch and spatial axes, checked with onnxruntime at two sizes.

    Any spatial size works: the model pads to its head's size divisibility and crops back inside
    the graph (``MultiTaskModel.forward``).

    Args:
        model: a ``MultiTaskModel`` with a head for ``task``.
        out: the .onnx file (written atomically).
        input_size: (D, H, W) of the example input.
        task: the head to export; may be omitted when the model has one.
        overwrite: replace an existing ``out``.
        check: compare onnxruntime with PyTorch before keeping the file.

    Returns:
        Max |onnxruntime - PyTorch| over the checked inputs (NaN without ``check``).

    Raises:
        Med3DError: no such head, onnxruntime missing, or outputs differ (nothing is written).
    """
    wrapped = _task_model(model, task, "onnx")
    xs = _inputs(wrapped, input_size)
    dyn = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    with atomic_path(out, overwrite=overwrite) as tmp:
        torch.onnx.export(wrapped, (xs[0],), str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": dyn, "logits": dyn}, opset_version=17, dynamo=False)
        wrapped.eval()  # the exporter restores the module's mode recursively; keep inference behaviour
        diff = _check_onnx(wrapped, tmp, xs) if check else float("nan")
    return diff


def _check_onnx(wrapped: nn.Module, path: Path, xs: Sequence[torch.Tensor]) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise Med3DError("onnx export check needs onnxruntime: pip install 'med3d[onnx]'")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for x in xs:
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = wrapped(x).numpy()
        if got.shape != ref.shape:
            raise Med3DError(f"onnx export: output shape {list(got.shape)} at input {list(x.shape[2:])} differs "
                             f"from PyTorch's {list(ref.shape)}; not written")
        diff = max(diff, float(abs(got - ref).max()))
    if diff > 1e-3:
        raise Med3DError(f"onnx export: onnxruntime output differs from PyTorch by {diff:.2e}; not written")
    return diff


def export_torchscript(model: nn.Module, out: str | Path, input_size: Sequence[int], task: Optional[str] = None,
                       overwrite: bool = False) -> Path:
    """TorchScript (traced) export of the model for one task, checked at a second, odd input size.

    Args:
        model: a ``MultiTaskModel`` with a head for ``task``.
        out: the file to write (atomically).
        input_size: (D, H, W) of the example input.
        task: the head to export; may be omitted when the model has one.
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        Med3DError: no such head, or the traced model disagrees with PyTorch at the second size.
    """
    wrapped = _task_model(model, task, "torchscript")
    xs = _inputs(wrapped, input_size)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, xs[0])
        got, ref = traced(xs[1]), wrapped(xs[1])
    if got.shape != ref.shape or float((got - ref).abs().max()) > 1e-3:
        raise Med3DError(f"torchscript export: the traced model differs from PyTorch at input {list(xs[1].shape[2:])}; "
                         "not written")
    with atomic_path(out, overwrite=overwrite) as tmp:
        traced.save(str(tmp))
    return Path(out)
