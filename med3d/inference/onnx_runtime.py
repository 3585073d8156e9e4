"""``med3d predict model.onnx``: onnxruntime runs the network, everything else is the checkpoint's path.

An ONNX export written by ``med3d export --format onnx`` carries its task's plan in
``metadata_props``. ``onnx_predictor`` turns it into an ordinary ``Predictor`` whose ``model`` is an
``OnnxNetwork``: preprocessing, the Gaussian sliding window, mirroring and the restore to the input
grid are the same code as for a checkpoint; only the network call changes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..device import torch_threads
from ..errors import Med3DError
from ..export import ONNX_TEXT_KEYS
from ..models.multitask import crop_to, pad_to_multiple
from .predictor import Predictor

PathLike = Union[str, Path]
FORMAT = "med3d-onnx"
# Keys predict reads besides the plan (``export.onnx_metadata`` writes them all).
REQUIRED_KEYS = ("task", "in_channels", "size_divisibility_zyx", "window_zyx")


OPENVINO = "OpenVINOExecutionProvider"


def providers(device: Optional[str], only: Optional[str] = None) -> List[Any]:
    """onnxruntime execution providers for ``device``, fastest first, the plain CPU provider last.

    CUDA first where onnxruntime has it, unless ``device`` is ``cpu``; otherwise OpenVINO where
    onnxruntime was built with it (the ``onnxruntime-openvino`` package): on a CPU it runs 3D
    convolutions through oneDNN, as PyTorch does, where the plain CPU provider lowers them to
    im2col and GEMM at about half the speed.

    Args:
        device: ``cpu``, ``cuda[:N]`` or None (CUDA when onnxruntime has it).
        only: one provider's name (e.g. ``CPUExecutionProvider``) to use it alone.

    Raises:
        Med3DError: CUDA asked for but absent, ``only`` not one of this onnxruntime's providers, or
            ``only`` the CUDA provider with ``device`` ``cpu``.
    """
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device is not None and device.startswith("cuda") and "CUDAExecutionProvider" not in have:
        raise Med3DError(f"--device {device}: this onnxruntime has no CUDA provider (it has {', '.join(have)}); "
                         "install onnxruntime-gpu or use --device cpu")
    if only is not None:
        if only not in have:
            raise Med3DError(f"onnxruntime provider {only}: not in this onnxruntime (it has {', '.join(have)})")
        if device == "cpu" and only == "CUDAExecutionProvider":
            raise Med3DError("onnxruntime provider CUDAExecutionProvider with --device cpu: choose one")
        return [_with_options(only)]
    wanted: List[Any] = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in have:
        wanted.insert(0, "CUDAExecutionProvider")
    elif OPENVINO in have:
        wanted.insert(0, _with_options(OPENVINO))
    return wanted


def _with_options(name: str) -> Any:
    """A provider as onnxruntime takes it: OpenVINO on the CPU with as many threads as PyTorch's, others by name.

    OpenVINO keeps its own thread pool, sized here as the CPU provider's is (``_session_options``).
    """
    if name == OPENVINO:
        return (OPENVINO, {"device_type": "CPU", "num_of_threads": str(torch.get_num_threads())})
    return name


def _session_options(ort: Any, threads: int) -> Any:
    """``threads`` CPU threads (PyTorch's at load: ``torch.set_num_threads`` governs both), no spinning, errors only.

    The window loop alternates the session with PyTorch's blending and softmax; spinning ORT
    threads would hold the cores those steps need. Errors only: onnxruntime warns for every
    OpenVINO session that some nodes run on the CPU provider (its shape operations, by design);
    predict prints the session's providers instead.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OnnxPredictor(Predictor):
    """A ``Predictor`` over an ``OnnxNetwork``: on a CPU provider, the network's runtime gets the cores.

    The PyTorch steps between network calls (blending, softmax) run on one thread while a CPU
    provider holds its own pool: PyTorch's idle OpenMP threads keep spinning after each step and
    slowed the next network call by a quarter here (``med3d bench onnx``). Pre- and post-processing
    keep PyTorch's threads, and so does the whole window loop with the CUDA provider.
    """

    def window_threads(self) -> ContextManager[None]:
        if "CUDAExecutionProvider" in self.meta.get("onnx_providers", []):
            return contextlib.nullcontext()
        return torch_threads(1)


class FixedShapeSessions:
    """onnxruntime sessions over one graph, each built for one input shape, run as one session is.

    OpenVINO compiles a graph whose sizes are fixed (its ``reshape_input`` option) into faster code
    than one with symbolic sizes: 1.3x per window batch here (BENCHMARKS, ONNX Runtime). A window
    loop feeds one shape, and one more where its last batch holds fewer windows; each gets its
    session on first use (0.1 s for the demo model here). At most ``keep`` sessions are held (each
    holds the weights), the oldest dropped first. Where OpenVINO refuses the fixed shape, or
    onnxruntime drops OpenVINO over it (before 1.23, which lacks ``reshape_input``), the session is
    built with symbolic sizes instead.

    Args:
        graph: the serialised ONNX model (without the export's size check, which would split it).
        chosen: providers as ``providers()`` returns them; OpenVINO's options get the shape.
        threads: CPU threads of each session (sessions are built inside the window loop, where
            PyTorch itself runs on one thread).
        where: the file, for messages.
        keep: sessions held at most.
    """

    def __init__(self, graph: bytes, chosen: Sequence[Any], threads: int, where: str, keep: int = 4) -> None:
        self.graph, self.chosen, self.threads, self.where, self.keep = graph, list(chosen), threads, where, keep
        self.sessions: Dict[Tuple[int, ...], Any] = {}

    def run(self, names: Optional[List[str]], feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """``session.run`` on the session built for ``feed["image"]``'s shape."""
        return self.session(tuple(feed["image"].shape)).run(names, feed)

    def session(self, shape: Tuple[int, ...]) -> Any:
        """The session for inputs of ``shape``, built now if there is none yet.

        Raises:
            Med3DError: onnxruntime cannot build a session over the graph.
        """
        if shape not in self.sessions:
            while len(self.sessions) >= self.keep:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[shape] = self._build(shape)
        return self.sessions[shape]

    def get_providers(self) -> List[str]:
        """The providers of the sessions, as ``InferenceSession.get_providers`` gives them."""
        if self.sessions:
            return next(iter(self.sessions.values())).get_providers()
        return [_name(p) for p in self.chosen]

    def _build(self, shape: Tuple[int, ...]) -> Any:
        import onnxruntime as ort

        fixed = f"image[{','.join(map(str, shape))}]"
        chosen = [(p[0], {**p[1], "reshape_input": fixed}) if isinstance(p, tuple) and p[0] == OPENVINO else p
                  for p in self.chosen]
        try:
            session = ort.InferenceSession(self.graph, _session_options(ort, self.threads), providers=chosen)
            # onnxruntime-openvino before 1.23 does not know reshape_input: it drops OpenVINO for the CPU
            # provider instead of failing; symbolic sizes keep OpenVINO there.
            if session.get_providers()[0] == _name(self.chosen[0]):
                return session
        except Exception:  # a shape OpenVINO refuses to fix: symbolic sizes still run
            pass
        return _session(ort, self.graph, self.chosen, self.threads, self.where)


class OnnxNetwork:
    """The network of an ONNX export, called like ``MultiTaskModel``: ``net(x, task)`` -> logits (torch).

    Sizes that are not multiples of the graph's size divisibility are zero-padded at the far ends
    and the logits cropped back, exactly as ``MultiTaskModel.forward`` does inside PyTorch.
    ``session`` is an onnxruntime session, or anything with its ``run`` (``FixedShapeSessions``).
    """

    def __init__(self, session: Any, task: str, divisibility: Sequence[int], in_channels: int, where: str) -> None:
        self.session, self.task, self.where = session, task, where
        self.divisibility, self.in_channels = tuple(divisibility), in_channels

    def __call__(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        """Logits ``(N, K, Z, Y, X)`` for the batch ``x`` ``(N, C, Z, Y, X)``, on ``x``'s device.

        Raises:
            Med3DError: another task, or a channel count the graph does not take.
        """
        if task is not None and task != self.task:
            raise Med3DError(f"{self.where}: the ONNX export holds task {self.task}, not {task}")
        if x.shape[1] != self.in_channels:
            raise Med3DError(f"{self.where}: the network takes {self.in_channels} channel(s), got {x.shape[1]}")
        size = x.shape[2:]
        padded = pad_to_multiple(x.detach().float(), self.divisibility).cpu().contiguous()
        logits = self.session.run(["logits"], {"image": padded.numpy()})[0]
        return crop_to(torch.from_numpy(logits), size).to(x.device)

    def eval(self) -> "OnnxNetwork":
        return self  # always in inference mode; here so code that calls model.eval() keeps working


def read_metadata(raw: Dict[str, str], where: str) -> Dict[str, Any]:
    """The med3d keys of an ONNX export's ``metadata_props`` (``raw``, as stored), JSON-decoded.

    Raises:
        Med3DError: the file has no med3d metadata, or a value is not JSON.
    """
    if raw.get("format") != FORMAT:
        raise Med3DError(f"{where}: an ONNX model without med3d metadata (metadata_props format is "
                         f"{raw.get('format')!r}, not {FORMAT!r}); export it with `med3d export CHECKPOINT "
                         "--format onnx`, which stores the plan predict needs")
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = value if key in ONNX_TEXT_KEYS else json.loads(value)
        except json.JSONDecodeError:
            raise Med3DError(f"{where}: metadata_props {key!r} is not valid JSON; re-export the model")
    for key in REQUIRED_KEYS:
        if key not in out:
            raise Med3DError(f"{where}: metadata_props lacks {key!r}; re-export the model with `med3d export "
                             "CHECKPOINT --format onnx`")
    return out


def _check_plan(md: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The export's plan, refused where predict cannot use it (none, classification, channels that do not fit)."""
    if "plan" not in md:
        raise Med3DError(f"{where}: the ONNX export carries no preprocessing plan (its checkpoint had none); "
                         "export from a checkpoint written by med3d pretrain / finetune")
    plan, task = md["plan"], md["task"]
    if plan.get("kind") == "classification":
        raise Med3DError(f"{where}: task {task} classifies whole scans; ONNX predict runs segmentation only, "
                         "predict with the checkpoint instead")
    chosen = plan.get("channels")
    n = (1 if isinstance(chosen, int) else len(chosen)) if chosen is not None else len(plan["channel_names"])
    if n != md["in_channels"]:
        raise Med3DError(f"{where}: the plan feeds {n} channel(s) ({', '.join(plan['channel_names'])}) but the "
                         f"network takes {md['in_channels']}; the metadata does not belong to this network")
    return plan


def onnx_predictor(path: PathLike, device: Optional[str] = None, provider: Optional[str] = None) -> Predictor:
    """A ``Predictor`` whose network call is an onnxruntime session over an ONNX export.

    The graph runs without the export's size check (``OnnxNetwork`` pads every input to the
    divisibility). With OpenVINO as the first provider, the network runs through
    ``FixedShapeSessions``; its session for batches of 2 windows (predict's default) is built here.

    Args:
        path: an .onnx file written by ``med3d export --format onnx``.
        device: ``cpu``, or ``cuda`` / None for the CUDA provider where onnxruntime has it.
        provider: one onnxruntime provider to use alone (None: ``providers`` picks).

    Returns:
        The predictor (its tensors stay on the CPU; a CUDA provider copies windows itself).

    Raises:
        Med3DError: onnxruntime missing, the file unreadable, without med3d metadata or plan, a
            classification task, a plan that does not fit the network, or metadata whose size
            divisibility is not the one the graph checks.
    """
    where = str(path)
    if not Path(path).is_file():
        raise Med3DError(f"{where}: no such file")
    try:
        import onnxruntime as ort
    except ImportError:
        raise Med3DError("predicting with an ONNX model needs onnxruntime: pip install 'med3d[onnx]'")
    chosen, threads = providers(device, provider), torch.get_num_threads()
    graph, props, checked = _network_graph(path)
    if graph is None:  # without the onnx package: the file as it is, size check included
        session = _session(ort, where, chosen, threads, where)
        props = dict(session.get_modelmeta().custom_metadata_map)
    md = read_metadata(props, where)
    plan = _check_plan(md, where)
    task, div, channels = md["task"], md["size_divisibility_zyx"], md["in_channels"]
    if checked is not None and list(checked) != list(div):
        raise Med3DError(f"{where}: metadata_props size_divisibility_zyx is {div} but the graph takes multiples of "
                         f"{checked}; the metadata does not belong to this network, re-export it")
    if graph is not None and _name(chosen[0]) == OPENVINO:
        session = FixedShapeSessions(graph, chosen, threads, where)
        window = [-(-w // d) * d for w, d in zip(md["window_zyx"], div)]
        session.session((2, channels, *window))  # loads the file now, and compiles predict's usual shape
    elif graph is not None:
        session = _session(ort, graph, chosen, threads, where)
    net = OnnxNetwork(session, task, div, channels, where)
    meta = {"plans": {task: plan}, "patch_size": md["window_zyx"], "in_channels": channels,
            "job": (md.get("model_card") or {}).get("training", {}).get("job"), "onnx": where,
            "onnx_providers": session.get_providers()}
    return OnnxPredictor(net, meta, torch.device("cpu"))  # type: ignore[arg-type]


def _name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def _first_line(err: BaseException) -> str:
    """An exception's first line (onnxruntime's and onnx's messages run on), or its type where it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _session(ort: Any, model: Union[str, bytes], chosen: List[Any], threads: int, where: str) -> Any:
    """An onnxruntime session over ``model`` (a path or serialised bytes), its failure one line naming the file."""
    try:
        return ort.InferenceSession(model, _session_options(ort, threads), providers=chosen)
    except Exception as err:
        raise Med3DError(f"{where}: onnxruntime cannot load it ({_first_line(err)})")


def _network_graph(path: PathLike) -> Tuple[Optional[bytes], Dict[str, str], Optional[List[int]]]:
    """The ONNX file's model without the export's size check, serialised; its metadata_props; the divisibility checked.

    Returns:
        ``(None, {}, None)`` without the onnx package (onnxruntime then reads the file as it is).

    Raises:
        Med3DError: the file is not an ONNX model onnx can read (with its external data).
    """
    try:
        import onnx
    except ImportError:
        return None, {}, None
    from ..export import remove_size_check

    try:
        proto = onnx.load(str(path))
        checked = remove_size_check(proto)
        return proto.SerializeToString(), {p.key: p.value for p in proto.metadata_props}, checked
    except Exception as err:  # protobuf, onnx's checker (missing external data), OS errors: one line each
        raise Med3DError(f"{path}: cannot be read as an ONNX model ({_first_line(err)}); export it again with "
                         "`med3d export CHECKPOINT --format onnx`")
