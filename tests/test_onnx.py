"""ONNX deployment: the export carries the plan, ``predict model.onnx`` reproduces the checkpoint, bad files are one line.

Tolerance stated here and in the README: on a real CT the ONNX path's labels agree with the
checkpoint's on at least 99.99 % of voxels and its probabilities differ by at most 1e-4.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from med3d.cli import main
from med3d.config import from_dict
from med3d.data.image import read_image

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'med3d[onnx]'")
onnx = pytest.importorskip("onnx", reason="onnx not installed: pip install 'med3d[onnx]'")

LABEL_AGREEMENT = 0.9999  # share of voxels with the same label
PROB_TOLERANCE = 1e-4  # max |p_onnx - p_torch| on the input grid


def _needs_exporter() -> None:
    pytest.importorskip("onnxscript", reason="onnxscript (the dynamo ONNX exporter's builder) not installed: "
                                             "pip install 'med3d[onnx]'")


@pytest.fixture(scope="module")
def liver(demo_root, tmp_path_factory, cfg_dict):
    """A barely trained CT checkpoint (with validation, so its card has metrics) and its ONNX export."""
    from med3d.engine.trainer import train

    _needs_exporter()
    tmp = tmp_path_factory.mktemp("onnx_liver")
    cfg = cfg_dict(demo_root, tmp, tasks=("Task03_LiverDemo",), train={"iterations": 2, "checkpoint_every": 2},
                   validation={"every": 2, "hd95": False})
    cfg["data"]["datasets"]["Task03_LiverDemo"]["spacing"] = [5.0, 3.0, 3.0]  # coarse grid: quick whole scans
    cfg["data"]["patch_size"] = [24, 48, 48]
    train(from_dict(cfg), "pretrain", progress=False, tensorboard=False)
    ckpt = tmp / "run" / "checkpoints" / "last.pt"
    onnx_path = tmp / "liver.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(onnx_path), "--input-size", "24", "48", "48",
                 "--licence", "CC-BY-4.0"]) == 0
    return ckpt, onnx_path


def _props(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.slow
def test_onnx_export_carries_the_plan_card_and_dynamic_sizes(liver):
    from med3d.checkpoint import load_checkpoint

    ckpt, path = liver
    model, _, meta = load_checkpoint(ckpt)
    plan = meta["plans"]["Task03_LiverDemo"]
    onnx.checker.check_model(str(path))
    md = _props(path)
    assert md["format"] == "med3d-onnx" and md["task"] == "Task03_LiverDemo"
    assert json.loads(md["plan"]) == json.loads(json.dumps(plan))
    assert json.loads(md["input_channels"]) == plan["channel_names"]
    assert json.loads(md["spacing_zyx"]) == [5.0, 3.0, 3.0] and json.loads(md["window_zyx"]) == [24, 48, 48]
    assert json.loads(md["class_names"]) == plan["labels"] and json.loads(md["overlap"]) == 0.5
    div = list(model.task_divisibility("Task03_LiverDemo"))
    assert json.loads(md["size_divisibility_zyx"]) == div
    card = json.loads(md["model_card"])
    assert card["licence"] == "CC-BY-4.0" and card["training"]["datasets"] == ["Task03_LiverDemo"]
    assert "score" in card["metrics"]["final"] and card["input_contract"]["spacing_zyx"] == [5.0, 3.0, 3.0]
    # Spatial axes are symbols "d*name_blocks": multiples of the divisibility, not the traced size.
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [dims[i].dim_param for i in (2, 3, 4)] == [f"{d}*{n}_blocks" for d, n in zip(div, ("depth", "height", "width"))]


@pytest.mark.slow
def test_onnx_predict_reproduces_the_checkpoint_on_a_real_ct(liver, real_data, tmp_path):
    ckpt, path = liver
    ct = real_data / "totalseg_ct" / "ct.nii.gz"
    for name, model in (("torch", ckpt), ("onnx", path)):
        assert main(["predict", str(model), str(ct), "--out", str(tmp_path / name), "--probabilities", "--quiet",
                     "--device", "cpu"]) == 0, name
    ref, got = read_image(tmp_path / "torch" / "ct.nii.gz"), read_image(tmp_path / "onnx" / "ct.nii.gz")
    assert got.geometry == ref.geometry and got.array.shape == ref.array.shape
    assert len(np.unique(ref.array)) > 1  # a constant map would agree trivially
    agreement = (got.array == ref.array).mean()
    p_ref = read_image(tmp_path / "torch" / "ct_probs.nii.gz").array
    p_got = read_image(tmp_path / "onnx" / "ct_probs.nii.gz").array
    print(f"labels agree on {agreement:.6%} of voxels, max |p_onnx - p_torch| {np.abs(p_got - p_ref).max():.2e}")
    assert agreement >= LABEL_AGREEMENT
    assert np.abs(p_got - p_ref).max() <= PROB_TOLERANCE
    drift = json.loads((tmp_path / "onnx" / "ct_drift.json").read_text())
    assert drift["scan"] == str(ct)  # the same post-processing ran: the drift check read the plan


@pytest.mark.slow
def test_onnx_runs_at_other_sizes_than_exported(liver):
    from med3d.checkpoint import load_checkpoint
    from med3d.inference.onnx_runtime import onnx_predictor

    ckpt, path = liver
    model, _, _ = load_checkpoint(ckpt)
    model.eval()
    task = "Task03_LiverDemo"
    div = model.task_divisibility(task)
    net = onnx_predictor(path, "cpu").model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    multiple = torch.randn(2, 1, *(3 * d for d in div))  # not the export size (24, 48, 48)
    odd = torch.randn(1, 1, *(2 * d + 3 for d in div))
    with torch.no_grad():
        for x in (multiple, odd):
            torch.testing.assert_close(net(x, task), model(x, task), atol=1e-4, rtol=1e-4)
        # The bare graph takes any multiple of the divisibility; other sizes are the caller's to pad, as
        # OnnxNetwork does above (and as the PyTorch model does inside).
        raw = session.run(None, {"image": multiple.numpy()})[0]
        assert np.abs(raw - model(multiple, task).numpy()).max() < 1e-4
    with pytest.raises(Exception, match=f"_must_be_a_multiple_of_{div[0]}"):  # refused, the divisibility named
        session.run(None, {"image": odd.numpy()})


@pytest.mark.slow
def test_encoder_export_carries_a_model_card(liver, tmp_path):
    from safetensors import safe_open

    ckpt, _ = liver
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        card = json.loads(f.metadata()["model_card"])
    assert card["licence"].startswith("unspecified") and card["training"]["job"] == "pretrain"
    assert card["training"]["plans"]["Task03_LiverDemo"]["target_spacing"] == [5.0, 3.0, 3.0]
    assert card["input_contract"]["input_channels"] and "best" in card["metrics"]


@pytest.mark.slow
def test_onnx_bench_runs_tiny():
    from med3d.bench import onnx_bench

    _needs_exporter()
    times = onnx_bench(shape_zyx=(20, 40, 40), patch=(16, 32, 32), repeats=1)
    assert times["torch"] > 0 and times["onnxruntime"] > 0 and times["ratio"] > 0


def test_providers_put_the_fastest_first(monkeypatch):
    from med3d.errors import Med3DError
    from med3d.inference.onnx_runtime import OPENVINO, providers

    def names(chosen):
        return [p[0] if isinstance(p, tuple) else p for p in chosen]

    monkeypatch.setattr(ort, "get_available_providers", lambda: [OPENVINO, "CPUExecutionProvider"])
    assert names(providers("cpu")) == names(providers(None)) == [OPENVINO, "CPUExecutionProvider"]
    assert dict([providers("cpu")[0]])[OPENVINO]["device_type"] == "CPU"
    assert providers("cpu", "CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert names(providers("cpu", OPENVINO)) == [OPENVINO]
    with pytest.raises(Med3DError, match="no CUDA provider"):
        providers("cuda")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", OPENVINO, "CPUExecutionProvider"])
    assert providers(None) == providers("cuda:0") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert names(providers("cpu")) == [OPENVINO, "CPUExecutionProvider"]
    assert dict([providers("cuda", OPENVINO)[0]])[OPENVINO]["device_type"] == "CPU"
    with pytest.raises(Med3DError, match="with --device cpu"):
        providers("cpu", "CUDAExecutionProvider")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers(None) == ["CPUExecutionProvider"]
    with pytest.raises(Med3DError, match=f"provider {OPENVINO}: not in this onnxruntime"):
        providers("cpu", OPENVINO)


def test_onnx_predictor_leaves_the_cores_to_onnxruntime():
    from med3d.data.image import Geometry, Image
    from med3d.inference.onnx_runtime import OnnxPredictor

    seen = []

    def network(x, task):  # stands in for an onnxruntime session
        seen.append(torch.get_num_threads())
        return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    plan = {"channel_names": ["CT"], "labels": {"0": "background", "1": "organ"}, "channels": None,
            "target_spacing": [1.0, 1.0, 1.0], "crop_nonzero": False,
            "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0}]}
    predictor = OnnxPredictor(network, {"plans": {"t": plan}, "patch_size": [8, 8, 8]}, torch.device("cpu"))
    image = Image(np.ones((1, 10, 12, 9), np.float32), Geometry((10, 12, 9), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                                 (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert predictor(image).labels.shape == (10, 12, 9)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()  # with the CUDA provider the windows' blending stays on PyTorch's threads
        predictor.meta["onnx_providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        predictor(image)
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ bad files (no exporter needed)

def _fake_export(path: Path, **props) -> Path:
    """An identity graph image -> logits with the given metadata_props: enough to exercise loading."""
    from onnx import TensorProto, helper

    tensor = [None, None, None, None, None]
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, tensor)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, tensor)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save_model(model, str(path))
    return path


def _med3d_props(plan: dict, in_channels: int = 1) -> dict:
    return {"format": "med3d-onnx", "task": "t", "plan": plan, "in_channels": in_channels,
            "size_divisibility_zyx": [1, 1, 1], "window_zyx": [16, 16, 16]}


PLAN = {"channel_names": ["CT"], "labels": {"0": "background", "1": "organ"}, "channels": None,
        "target_spacing": [5.0, 5.0, 5.0], "crop_nonzero": False,
        "normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 40.0, "std": 30.0}]}


def _predict(capsys, model: Path, scan: Path, out: Path):
    code = main(["predict", str(model), str(scan), "--out", str(out), "--quiet", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_onnx_without_med3d_metadata_is_one_line(tmp_path, capsys, real_data):
    code, text = _predict(capsys, _fake_export(tmp_path / "plain.onnx"), real_data / "totalseg_ct" / "ct.nii.gz",
                          tmp_path / "out")
    assert code == 2 and "without med3d metadata" in text and "plain.onnx" in text and text.count("\n") == 1


def test_onnx_not_an_onnx_file_is_one_line(tmp_path, capsys, real_data):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf")
    code, text = _predict(capsys, bad, real_data / "totalseg_ct" / "ct.nii.gz", tmp_path / "out")
    assert code == 2 and "cannot be read as an ONNX model" in text and text.count("\n") == 1


def test_onnx_metadata_missing_a_key_is_one_line(tmp_path, capsys, real_data):
    props = _med3d_props(PLAN)
    del props["window_zyx"]
    code, text = _predict(capsys, _fake_export(tmp_path / "nowin.onnx", **props), real_data / "totalseg_ct" / "ct.nii.gz",
                          tmp_path / "out")
    assert code == 2 and "'window_zyx'" in text and text.count("\n") == 1


def test_onnx_classification_is_refused_in_one_line(tmp_path, capsys, real_data):
    path = _fake_export(tmp_path / "cls.onnx", **_med3d_props({**PLAN, "kind": "classification"}))
    code, text = _predict(capsys, path, real_data / "totalseg_ct" / "ct.nii.gz", tmp_path / "out")
    assert code == 2 and "classifies" in text and text.count("\n") == 1


def test_onnx_plan_that_does_not_fit_the_network_is_one_line(tmp_path, capsys, real_data):
    path = _fake_export(tmp_path / "mismatch.onnx", **_med3d_props(PLAN, in_channels=2))
    code, text = _predict(capsys, path, real_data / "totalseg_ct" / "ct.nii.gz", tmp_path / "out")
    assert code == 2 and "feeds 1 channel(s)" in text and "takes 2" in text and text.count("\n") == 1


def test_onnx_scan_with_other_channels_than_the_plan_fails_that_case(tmp_path, capsys, real_data):
    two = {**PLAN, "channel_names": ["T2", "ADC"], "normalization": [{"scheme": "zscore"}] * 2}
    path = _fake_export(tmp_path / "two.onnx", **_med3d_props(two, in_channels=2))
    code, text = _predict(capsys, path, real_data / "totalseg_ct" / "ct.nii.gz", tmp_path / "out")
    assert code == 1 and "1 channel(s), but task t was trained on 2" in text


def test_onnx_metadata_states_only_the_channels_the_task_feeds():
    """A plan over two channels of which the task takes the second: names and normalisation agree on that one."""
    from med3d.export import onnx_metadata

    plan = {"dataset": "T", "channel_names": ["T1", "FLAIR"], "channels": [1], "target_spacing": [1.0, 1.0, 1.0],
            "normalization": [{"scheme": "zscore", "ch": 0}, {"scheme": "zscore", "ch": 1}], "labels": {"0": "bg"}}
    fields = onnx_metadata({"plans": {"T": plan}}, "T", 1, (8, 8, 8))
    assert json.loads(fields["input_channels"]) == ["FLAIR"]
    assert json.loads(fields["normalisation"]) == [{"scheme": "zscore", "ch": 1}]
    assert json.loads(fields["spacing_zyx"]) == [1.0, 1.0, 1.0]


@pytest.mark.corpus
def test_explain_refuses_an_onnx_export_in_one_line(tmp_path, capsys, real_data):
    from badinput import refused

    path = _fake_export(tmp_path / "seg.onnx", **_med3d_props(PLAN))
    refused(["explain", path, real_data / "totalseg_ct" / "ct.nii.gz", "--out", tmp_path / "out"], capsys,
            names=r"seg\.onnx: an ONNX export; explain reads the network's layers", inputs=[path], watch=tmp_path)


def test_a_very_large_overlap_is_announced(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = _fake_export(tmp_path / "seg.onnx", **_med3d_props(PLAN))
    assert main(["predict", str(path), str(empty), "--out", str(tmp_path / "out"), "--overlap", "0.95"]) == 2
    assert "note: --overlap 0.95 runs about 8000x as many windows" in capsys.readouterr().out


def test_export_knows_a_classification_export(tmp_path):
    from med3d.cli.transfer import _exported_kind

    # export.onnx_metadata writes the head's kind beside the plan
    cls = _fake_export(tmp_path / "c.onnx", **_med3d_props({**PLAN, "kind": "classification"}), kind="classification")
    seg = _fake_export(tmp_path / "s.onnx", **_med3d_props(PLAN), kind="segmentation")
    assert _exported_kind(str(cls)) == "classification" and _exported_kind(str(seg)) == "segmentation"


# ------------------------------------------------------------------ the size check, and sessions per input shape

def _checked_identity(tmp_path: Path) -> tuple:
    """The identity export with the size check ``export_onnx`` adds (divisibility 4, 1, 2), and a copy without."""
    from med3d.export import _add_size_check

    plain = onnx.load(str(_fake_export(tmp_path / "plain.onnx", **_med3d_props(PLAN))))
    checked = onnx.ModelProto()
    checked.CopyFrom(plain)
    _add_size_check(checked, (4, 1, 2))
    return plain, checked


def test_predict_runs_the_graph_without_its_size_check(tmp_path):
    """remove_size_check gives back the graph as exported; the check itself refuses sizes, naming the divisibility."""
    from med3d.export import remove_size_check

    plain, checked = _checked_identity(tmp_path)
    session = ort.InferenceSession(checked.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 3, 6)).astype(np.float32)
    assert np.array_equal(session.run(None, {"image": x})[0], x)
    with pytest.raises(Exception, match="width_must_be_a_multiple_of_2"):
        session.run(None, {"image": x[..., :5]})
    assert remove_size_check(checked) == [4, 1, 2] and checked == plain
    assert remove_size_check(checked) is None  # nothing left to remove


def test_fixed_shape_sessions_build_one_session_per_input_shape(tmp_path):
    """One session per shape (the window loop's full and last batches), at most ``keep``, the oldest dropped."""
    from med3d.inference.onnx_runtime import FixedShapeSessions

    graph = _checked_identity(tmp_path)[0].SerializeToString()
    runner = FixedShapeSessions(graph, ["CPUExecutionProvider"], threads=1, where="m.onnx", keep=2)
    rng = np.random.default_rng(0)
    full, last = (rng.normal(size=(n, 1, 4, 6, 6)).astype(np.float32) for n in (3, 2))
    for x in (full, last, full):
        assert np.array_equal(runner.run(["logits"], {"image": x})[0], x)
    assert list(runner.sessions) == [(3, 1, 4, 6, 6), (2, 1, 4, 6, 6)]
    runner.run(["logits"], {"image": full[..., :4]})  # a third shape: the first session is dropped
    assert list(runner.sessions) == [(2, 1, 4, 6, 6), (3, 1, 4, 6, 4)]
    assert runner.get_providers() == ["CPUExecutionProvider"]


def test_openvino_sessions_are_built_for_the_input_shape_with_the_threads_of_the_load(tmp_path, monkeypatch):
    """Sessions are built inside the window loop, where PyTorch runs on one thread: they keep the load's count."""
    from med3d.device import torch_threads
    from med3d.inference.onnx_runtime import OPENVINO, FixedShapeSessions

    built, real = [], ort.InferenceSession

    def session(graph, options, providers):
        built.append((options.intra_op_num_threads, providers))
        return real(graph, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    graph = _checked_identity(tmp_path)[0].SerializeToString()
    chosen = [(OPENVINO, {"device_type": "CPU", "num_of_threads": "2"}), "CPUExecutionProvider"]
    runner = FixedShapeSessions(graph, chosen, threads=2, where="m.onnx")
    with torch_threads(1):
        runner.run(["logits"], {"image": np.zeros((2, 1, 4, 6, 6), np.float32)})
    threads, providers = built[0]
    assert threads == 2 and providers[1] == "CPUExecutionProvider"
    assert providers[0] == (OPENVINO, {"device_type": "CPU", "num_of_threads": "2",
                                       "reshape_input": "image[2,1,4,6,6]"})
    assert chosen[0][1] == {"device_type": "CPU", "num_of_threads": "2"}  # the load's options are not changed


def test_onnx_predictor_builds_openvino_sessions_per_shape(tmp_path, monkeypatch):
    from med3d.inference.onnx_runtime import OPENVINO, FixedShapeSessions, onnx_predictor

    real = ort.InferenceSession

    class OpenVinoLike:  # a CPU session that reports OpenVINO first, as onnxruntime-openvino's does
        def __init__(self, graph, options, providers):
            self.session = real(graph, options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return [OPENVINO, "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self.session, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [OPENVINO, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", OpenVinoLike)
    path = _fake_export(tmp_path / "seg.onnx", **_med3d_props(PLAN))
    predictor = onnx_predictor(path, "cpu")
    assert isinstance(predictor.model.session, FixedShapeSessions)
    assert list(predictor.model.session.sessions) == [(2, 1, 16, 16, 16)]  # predict's usual window batch, built at load
    assert predictor.meta["onnx_providers"][0] == OPENVINO
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", real)
    assert not isinstance(onnx_predictor(path, "cpu").model.session, FixedShapeSessions)


@pytest.mark.parametrize("refusal", ["raises", "drops OpenVINO"])
def test_openvino_without_reshape_input_builds_the_session_with_symbolic_sizes(tmp_path, monkeypatch, refusal):
    """A fixed shape refused (an error), or onnxruntime-openvino before 1.23 falling back to the CPU provider."""
    from med3d.inference.onnx_runtime import OPENVINO, FixedShapeSessions

    real, tried = ort.InferenceSession, []

    class Session:
        def __init__(self, graph, options, providers):
            tried.append(providers[0])
            fixed = "reshape_input" in providers[0][1]
            if fixed and refusal == "raises":
                raise RuntimeError("Unknown provider option reshape_input")
            self.session = real(graph, providers=["CPUExecutionProvider"])
            self.providers = (["CPUExecutionProvider"] if fixed else [OPENVINO, "CPUExecutionProvider"])

        def get_providers(self):
            return self.providers

        def run(self, *args):
            return self.session.run(*args)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    graph = _checked_identity(tmp_path)[0].SerializeToString()
    runner = FixedShapeSessions(graph, [(OPENVINO, {"device_type": "CPU"}), "CPUExecutionProvider"], 1, "m.onnx")
    x = np.ones((1, 1, 4, 6, 6), np.float32)
    assert np.array_equal(runner.run(["logits"], {"image": x})[0], x)
    fixed = {"device_type": "CPU", "reshape_input": "image[1,1,4,6,6]"}
    assert [p[1] for p in tried] == [fixed, {"device_type": "CPU"}]
    assert runner.get_providers()[0] == OPENVINO


def test_onnx_predict_without_the_onnx_package_runs_the_file_as_it_is(tmp_path, monkeypatch):
    import sys

    from med3d.inference.onnx_runtime import FixedShapeSessions, onnx_predictor

    path = _fake_export(tmp_path / "seg.onnx", **_med3d_props(PLAN))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    predictor = onnx_predictor(path, "cpu")
    assert not isinstance(predictor.model.session, FixedShapeSessions)
    assert predictor.meta["plans"]["t"]["channel_names"] == ["CT"]


@pytest.mark.corpus
@pytest.mark.parametrize("case", ["empty", "external data missing", "divisibility not the graph's"])
def test_onnx_files_that_cannot_be_used_are_one_line(tmp_path, capsys, real_data, case):
    from onnx import numpy_helper

    from badinput import refused
    from med3d.export import _add_size_check

    path = tmp_path / "m.onnx"
    if case == "empty":
        path.write_bytes(b"")
        names = r"m\.onnx: an ONNX model without med3d metadata"
    elif case == "external data missing":
        model = onnx.load(str(_fake_export(path, **_med3d_props(PLAN))))
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(4096, np.float32), "unused"))
        onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
        (tmp_path / "m.data").unlink()
        names = r"m\.onnx: cannot be read as an ONNX model \(.*\); export it again"
    else:
        model = onnx.load(str(_fake_export(path, **_med3d_props(PLAN))))  # the metadata says divisibility 1
        _add_size_check(model, (8, 8, 8))
        onnx.save_model(model, str(path))
        names = (r"m\.onnx: metadata_props size_divisibility_zyx is \[1, 1, 1\] but the graph takes multiples "
                 r"of \[8, 8, 8\]")
    refused(["predict", path, real_data / "totalseg_ct" / "ct.nii.gz", "--out", tmp_path / "out"], capsys,
            names=names, inputs=[path], watch=tmp_path)
