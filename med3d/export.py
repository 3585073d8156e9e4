"""Export encoder weights (safetensors with metadata, pt, MedicalNet, MONAI) and whole models (ONNX, TorchScript).

A safetensors export states its input contract in its metadata: the encoder's arguments,
input channel names, spacing (always ``spacing_zyx``: z, y, x in mm), normalisation and datasets,
per task under ``tasks`` when exported from a training checkpoint whose plans hold them, and a
model card (``med3d.model_card``).

An ONNX export goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``) with spatial sizes
declared as multiples of the head's size divisibility, and carries in its ``metadata_props`` the
plan ``med3d predict model.onnx`` needs (see ``onnx_metadata``). TorchScript is the legacy
tracer's format, kept while it still works.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from . import __version__
from .errors import Med3DError
from .atomic import atomic_path
from .choices import ENCODER_FORMATS, FORMATS, MODEL_FORMATS  # noqa: F401
from .models.multitask import MultiTaskModel
from .models.resnet3d import ResNet3D
from .transfer.formats import upgrade_metadata


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


def export_metadata(enc: ResNet3D, sd: Dict[str, torch.Tensor], meta: Optional[Mapping[str, Any]],
                    licence: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """String metadata stored in a med3d safetensors export (values JSON-encoded).

    Args:
        enc: the exported encoder (its ``config`` is recorded).
        sd: the exported tensors (hashed).
        meta: see ``input_contract``.
        licence, metrics: for the model card (``med3d.model_card.model_card``).

    Returns:
        key -> string, as safetensors stores it.
    """
    contract = input_contract(meta or {}, enc.in_channels)
    fields = {"format": "med3d", "med3d_version": __version__, "encoder": enc.config, **contract,
              "model_card": _card(contract, meta or {}, licence, metrics), "sha256": tensors_sha256(sd)}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


def _card(contract: Mapping[str, Any], meta: Mapping[str, Any], licence: Optional[str],
          metrics: Optional[Mapping[str, Any]], task: Optional[str] = None) -> Dict[str, Any]:
    """A new model card, or the source export's own when re-exporting adds nothing to it."""
    from .model_card import model_card

    old = meta.get("model_card")
    if isinstance(old, str):
        old = json.loads(old)
    if isinstance(old, dict) and not meta.get("plans") and licence is None and not metrics:
        return old
    return model_card(contract, meta, licence, metrics, task)


_OWN_KEYS = ("format", "med3d_version", "encoder", "sha256", "model_card")  # written by export_metadata itself


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
                   overwrite: bool = False, licence: Optional[str] = None,
                   metrics: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the encoder's weights in ``fmt`` (safetensors, pt, medicalnet, monai), atomically.

    Args:
        model: an encoder or a ``MultiTaskModel`` (its encoder is written).
        fmt: one of ``ENCODER_FORMATS``.
        out: the file to write.
        meta: the source's metadata (see ``input_contract``).
        overwrite: replace an existing ``out``.
        licence, metrics: for the model card of a safetensors export (the other formats hold no metadata).

    Returns:
        ``out``.

    Raises:
        Med3DError: the encoder does not fit the format, or ``out`` exists.
    """
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

            save_file(sd, str(tmp), metadata=export_metadata(enc, sd, meta, licence, metrics))
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
    channels = _input_channels(wrapped)
    return [torch.randn(1, channels, *input_size), torch.randn(1, channels, *(s + 1 for s in input_size))]


def _input_channels(wrapped: _TaskModel) -> int:
    """The channels the exported task's input takes: its adapter's, else the encoder's."""
    model, task = wrapped.model, wrapped.task
    return model.adapters[task].in_channels if task in model.adapters else model.encoder.in_channels


# ONNX metadata_props stored as plain text; every other value is JSON.
ONNX_TEXT_KEYS = ("format", "med3d_version", "task", "kind", "input", "output")
SIZE_CHECK = "_must_be_a_multiple_of_"  # in the names of the size check's nodes: ``depth_must_be_a_multiple_of_8``
AXIS_NAMES = ("depth", "height", "width")  # the spatial axes (z, y, x) in the graph's dimension and check names


def onnx_trace_size(input_size: Sequence[int], divisibility: Sequence[int]) -> List[int]:
    """The example size ``torch.export`` traces at: ``input_size`` rounded up to the divisibility, 2 blocks at least.

    One block per axis would let ``torch.export`` specialise that axis to a constant (it treats
    sizes 0 and 1 of a symbol as special), so the smallest example is two blocks.
    """
    return [max(2 * d, -(-s // d) * d) for s, d in zip(input_size, divisibility)]


def onnx_metadata(meta: Mapping[str, Any], task: str, in_channels: int, divisibility: Sequence[int],
                  licence: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX export: the plan ``med3d predict`` needs, readable keys, the model card.

    ``plan`` is the task's full preprocessing plan from the training checkpoint (what the
    ``Predictor`` runs); the other keys restate it for readers without med3d: channels in input
    order, target spacing (z, y, x mm), crop, normalisation, class names, the sliding window and
    its default overlap, and the sizes the graph accepts (multiples of ``size_divisibility``).

    Args:
        meta: the checkpoint's metadata (``plans``, ``patch_size``, ``job``).
        task: the exported head.
        in_channels: the graph input's channels.
        divisibility: the head's size divisibility (z, y, x).
        licence, metrics: for the model card.

    Returns:
        key -> string (JSON-encoded values), as ONNX stores them.
    """
    from .inference.predictor import DEFAULT_PATCH

    plan = (meta.get("plans") or {}).get(task)
    contract = input_contract({k: v for k, v in meta.items() if k != "model_card"}, in_channels)
    fields: Dict[str, Any] = {
        "format": "med3d-onnx", "med3d_version": __version__, "task": task,
        "input": "image (N, C, Z, Y, X) float32, the scan after the plan's preprocessing",
        "output": "logits (N, K, Z, Y, X); softmax over axis 1 gives class probabilities",
        "in_channels": in_channels, "size_divisibility_zyx": list(divisibility),
        "window_zyx": list(meta.get("patch_size") or DEFAULT_PATCH), "overlap": 0.5,
    }
    if plan is not None:  # a checkpoint without plans (built by hand) exports a bare network
        task_contract = _task_contract(plan, in_channels)  # the channels the task feeds, and their normalisation
        fields.update({
            "plan": plan, "kind": plan.get("kind", "segmentation"),
            "input_channels": task_contract["channel_names"], "spacing_zyx": task_contract["spacing_zyx"],
            "crop_nonzero": plan.get("crop_nonzero"), "normalisation": task_contract["normalisation"],
            "class_names": plan.get("labels") or plan.get("classes")})
        if plan.get("kind") == "classification":
            fields["output"] = "logits (N, K) of the classes; softmax over axis 1 gives class probabilities"
    fields["model_card"] = _card(contract, meta, licence, metrics, task)
    return {k: v if k in ONNX_TEXT_KEYS else json.dumps(v) for k, v in fields.items()}


def export_onnx(model: nn.Module, out: str | Path, input_size: Sequence[int], task: Optional[str] = None,
                overwrite: bool = False, check: bool = True, meta: Optional[Mapping[str, Any]] = None,
                licence: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None) -> float:
    """ONNX export through ``torch.export`` with dynamic batch and spatial sizes, checked with onnxruntime.

    The spatial axes are declared as ``divisibility * k`` (``torch.export.Dim``), so the graph holds
    no branch on the input's shape: it takes any multiple of the head's size divisibility. Other
    sizes are for the caller to pad (``med3d.inference.onnx_runtime.OnnxNetwork`` does, as the
    PyTorch model does internally). The plan travels in ``metadata_props`` (``onnx_metadata``).

    Args:
        model: a ``MultiTaskModel`` with a head for ``task``.
        out: the .onnx file (written atomically, weights inside the one file).
        input_size: (D, H, W) of the example input; rounded up to ``onnx_trace_size``.
        task: the head to export; may be omitted when the model has one.
        overwrite: replace an existing ``out``.
        check: compare onnxruntime with PyTorch at the traced size and one block larger per axis.
        meta: the checkpoint's metadata (its plan for ``task`` goes into the file).
        licence, metrics: for the model card.

    Returns:
        Max |onnxruntime - PyTorch| over the checked inputs (NaN without ``check``).

    Raises:
        Med3DError: no such head, onnxscript / onnxruntime missing, export failed, or outputs differ
            (nothing is written).
    """
    wrapped = _task_model(model, task, "onnx")
    div = wrapped.model.task_divisibility(wrapped.task)
    channels = _input_channels(wrapped)
    size = onnx_trace_size(input_size, div)
    # Batch 2 in the example keeps torch.export from specialising the batch axis to 1.
    xs = [torch.randn(2, channels, *size), torch.randn(1, channels, *(s + d for s, d in zip(size, div)))]
    proto = _onnx_program(wrapped, xs[0], div)
    _add_size_check(proto, div)
    entries = onnx_metadata(meta or {}, wrapped.task, channels, div, licence, metrics)
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    import onnx

    with atomic_path(out, overwrite=overwrite) as tmp:
        onnx.save_model(proto, str(tmp))
        diff = _check_onnx(wrapped, tmp, xs) if check else float("nan")
    return diff


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's progress lines (graph optimiser, absent torchvision ops) out of med3d's output."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch's own export code
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _onnx_program(wrapped: _TaskModel, example: torch.Tensor, div: Sequence[int]) -> Any:
    """The ONNX ModelProto of ``wrapped`` from ``torch.onnx.export(dynamo=True)``, spatial axes multiples of ``div``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's ONNX builder)
    except ImportError as err:
        raise Med3DError(f"onnx export needs onnx and onnxscript ({err.name} is missing): pip install 'med3d[onnx]'")
    Dim = torch.export.Dim
    dims: Dict[int, Any] = {0: Dim("batch", min=1)}
    for axis, name, d in zip((2, 3, 4), AXIS_NAMES, div):
        dims[axis] = d * Dim(f"{name}_blocks", min=1) if d > 1 else Dim(name, min=1)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(wrapped, (example,), None, input_names=["image"], output_names=["logits"],
                                        dynamic_shapes={"x": dims}, dynamo=True, opset_version=18, verbose=False)
    except Exception as err:  # torch.export names what it could not capture; one line of it is enough here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Med3DError(f"onnx export: torch.export could not capture the model ({first}); not written")
    finally:
        wrapped.eval()  # exporting may switch the module's mode; keep inference behaviour
    return program.model_proto


def _add_size_check(proto: Any, div: Sequence[int]) -> None:
    """Make the graph refuse spatial sizes that are not multiples of ``div``, naming the divisibility.

    The graph's arithmetic assumes multiples (that is how its sizes were declared); fed another
    size it would run and return wrong logits. Per axis, a vector of that axis's length reshaped to
    ``(-1, d)`` fails for non-multiples, and onnxruntime's error names the node:
    ``depth_must_be_a_multiple_of_8``. Its zero sum is added to the logits so no optimiser drops it.
    """
    from onnx import TensorProto, helper

    graph = proto.graph
    out = graph.output[0].name
    for node in graph.node:  # the logits now come from the guard's Add
        node.output[:] = [f"{out}_unchecked" if o == out else o for o in node.output]
    nodes, sums = [], []
    for axis, name, d in zip((2, 3, 4), AXIS_NAMES, div):
        if d == 1:
            continue
        check = f"{name}{SIZE_CHECK}{d}"
        graph.initializer.append(helper.make_tensor(f"{check}_shape", TensorProto.INT64, [2], [-1, d]))
        nodes += [helper.make_node("Shape", ["image"], [f"{check}_len"], start=axis, end=axis + 1),
                  helper.make_node("ConstantOfShape", [f"{check}_len"], [f"{check}_zeros"]),
                  helper.make_node("Reshape", [f"{check}_zeros", f"{check}_shape"], [f"{check}_blocks"], name=check),
                  helper.make_node("ReduceSum", [f"{check}_blocks"], [f"{check}_sum"], keepdims=0)]
        sums.append(f"{check}_sum")
    if not sums:
        for node in graph.node:
            node.output[:] = [out if o == f"{out}_unchecked" else o for o in node.output]
        return
    guard = sums[0]
    for i, other in enumerate(sums[1:]):
        nodes.append(helper.make_node("Add", [guard, other], [f"size_check_{i}"]))
        guard = f"size_check_{i}"
    nodes.append(helper.make_node("Add", [f"{out}_unchecked", guard], [out], name="size_check"))
    graph.node.extend(nodes)


def remove_size_check(proto: Any) -> Optional[List[int]]:
    """Undo ``_add_size_check`` on a loaded ONNX model, for runners that pad every input to the divisibility.

    ``med3d predict`` pads before each call, so the check can never fire there; and onnxruntime's
    OpenVINO provider runs its shape operations apart from the network, which splits the graph in
    pieces and keeps OpenVINO from compiling it for a fixed input shape.

    Args:
        proto: an ``onnx.ModelProto`` written by ``export_onnx`` (changed in place).

    Returns:
        The divisibility (z, y, x) the check enforced, read from its node names (1 for an axis it
        left free), for comparison with the metadata; None where the model has no check.
    """
    graph = proto.graph
    if not graph.output:
        return None
    out = graph.output[0].name
    div = [1, 1, 1]
    drop = []
    for i, node in enumerate(graph.node):
        if node.name == "size_check" or any(SIZE_CHECK in o or o.startswith("size_check_") for o in node.output):
            drop.append(i)
        if node.op_type == "Reshape" and SIZE_CHECK in node.name:  # ``width_must_be_a_multiple_of_8``
            name, d = node.name.split(SIZE_CHECK)
            div[AXIS_NAMES.index(name)] = int(d)
    if not drop:
        return None
    for i in reversed(drop):
        del graph.node[i]
    stale = ("size_check", f"{out}_unchecked")  # the check's constants, and shapes inferred for its tensors
    for field in (graph.initializer, graph.value_info):
        for i in reversed([i for i, t in enumerate(field) if SIZE_CHECK in t.name or t.name.startswith(stale)]):
            del field[i]
    for node in graph.node:
        node.output[:] = [out if o == f"{out}_unchecked" else o for o in node.output]
    return div


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
    """Legacy: TorchScript (traced) export of the model for one task, checked at a second, odd input size.

    TorchScript is in maintenance in PyTorch; ONNX (``export_onnx``) is the supported deployment format.

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
    with torch.no_grad(), warnings.catch_warnings():
        # Shape-derived Python values (window factors, odd-size alignment) become constants of the trace; the
        # check at a second, odd size below is what tells whether the trace generalises, not these warnings.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, xs[0])
        got, ref = traced(xs[1]), wrapped(xs[1])
    if got.shape != ref.shape or float((got - ref).abs().max()) > 1e-3:
        raise Med3DError(f"torchscript export: the traced model differs from PyTorch at input {list(xs[1].shape[2:])}; "
                         "not written")
    buffer = io.BytesIO()  # torch's C++ writer aborts the interpreter on a full disk; Python's write raises
    torch.jit.save(traced, buffer)
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(out)
