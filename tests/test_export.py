"""Export formats and the export / inflate / weights commands."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.networks import nets
from safetensors import safe_open

import med3d
from med3d import Med3DError
from med3d.checkpoint import load_checkpoint, save_checkpoint
from med3d.cli import main
from med3d.config import load_config
from med3d.api import encoder_from_config
from med3d.export import export_encoder, export_onnx, export_torchscript, tensors_sha256
from med3d.transfer import load_pretrained, read_weights

from helpers import randomize_bn


def encoder(depth=18, layout="dilated", **kw):
    torch.manual_seed(depth)
    return randomize_bn(med3d.create_encoder(f"resnet{depth}", layout=layout, **kw))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_medicalnet_round_trip_is_exact(tmp_path):
    enc = encoder(18)
    path = export_encoder(enc, "medicalnet", tmp_path / "resnet_18.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict"} and all(k.startswith("module.") for k in raw["state_dict"])
    back = med3d.create_encoder("resnet18")
    report = load_pretrained(back, path)
    assert report.source == "medicalnet" and not report.unexpected and not report.mismatched
    same_weights(enc, back)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [10, 18, 50])
def test_monai_round_trip_is_exact_and_monai_loads_it(tmp_path, depth):
    enc = encoder(depth, layout="strided")
    path = export_encoder(enc, "monai", tmp_path / "monai.pth")
    ref = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False, conv1_t_stride=2,
                                          shortcut_type=enc.config["shortcut"], bias_downsample=False)
    ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
    back = med3d.create_encoder(f"resnet{depth}", layout="strided")
    load_pretrained(back, path)
    same_weights(enc, back)


def test_format_layout_requirements():
    with pytest.raises(Med3DError, match="layout=strided"):
        export_encoder(encoder(10, layout="dilated"), "monai", "unused.pth")
    with pytest.raises(Med3DError, match="layout=dilated"):
        export_encoder(encoder(10, layout="strided"), "medicalnet", "unused.pth")


def test_safetensors_export_has_metadata_and_loads_back(tmp_path):
    enc = encoder(10, in_channels=2)
    meta = {"input_channels": ["T2", "ADC"], "spacing_zyx": [3.6, 0.62, 0.62], "normalisation": "zscore-nonzero",
            "datasets": ["Task05_Prostate"]}
    path = export_encoder(enc, "safetensors", tmp_path / "enc.safetensors", meta=meta)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md["format"] == "med3d" and md["med3d_version"] == med3d.__version__
    assert json.loads(md["encoder"])["arch"] == "resnet10" and json.loads(md["encoder"])["in_channels"] == 2
    assert json.loads(md["input_channels"]) == ["T2", "ADC"] and json.loads(md["spacing_zyx"]) == [3.6, 0.62, 0.62]
    assert "spacing" not in md
    assert md["sha256"] == tensors_sha256(enc.state_dict())
    back = med3d.create_encoder("resnet10", in_channels=2)
    assert load_pretrained(back, path).source == "med3d"
    same_weights(enc, back)


def test_export_refuses_overwrite_and_leaves_no_temp(tmp_path):
    enc = encoder(10)
    out = tmp_path / "enc.pt"
    export_encoder(enc, "pt", out)
    before = out.read_bytes()
    with pytest.raises(Med3DError, match="already exists"):
        export_encoder(encoder(10, in_channels=3), "pt", out)
    assert out.read_bytes() == before
    export_encoder(enc, "pt", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.pt"]


def small_checkpoint(tmp_path, layout="dilated"):
    cfg = load_config(None, ["model.encoder.arch=resnet18", f"model.encoder.layout={layout}",
                             "model.encoder.widths=[8, 16, 32, 64]", "model.heads.spleen.num_classes=2"])
    torch.manual_seed(0)
    model = med3d.create_model(cfg)
    randomize_bn(model)
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, meta={"datasets": ["Task09_Spleen"]})
    return path, model.eval()


@pytest.mark.slow  # the dynamo ONNX export takes ~15 s on a CPU
def test_onnx_matches_pytorch_with_dynamic_axes(tmp_path):
    import onnxruntime as ort

    path, model = small_checkpoint(tmp_path)
    diff = export_onnx(model, tmp_path / "m.onnx", [24, 40, 40])
    assert diff < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    div = model.task_divisibility("spleen")
    x = torch.randn(2, 1, *(k * d for k, d in zip((3, 5, 4), div)))  # another batch and spatial size than traced
    with torch.no_grad():
        ref = model(x, "spleen").numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    # The head's upsampling is exported one axis at a time (models.upsample), not as a 3D Resize: a third of
    # OpenVINO's time on the 3D one (BENCHMARKS, ONNX Runtime).
    import onnx

    assert "Resize" not in {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    # The graph takes multiples of the divisibility; another size is refused, naming it (not silently wrong).
    with pytest.raises(Exception, match=f"depth_must_be_a_multiple_of_{div[0]}"):
        sess.run(None, {"image": torch.randn(1, 1, 3 * div[0] + 1, *x.shape[3:]).numpy()})


def test_torchscript_export_runs_without_med3d_code(tmp_path):
    path, model = small_checkpoint(tmp_path)
    out = export_torchscript(model, tmp_path / "m.ts", [24, 40, 40])
    loaded = torch.jit.load(str(out))
    x = torch.randn(1, 1, 16, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x, "spleen"), atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    path, model = small_checkpoint(tmp_path)
    again, cfg, meta = load_checkpoint(path)
    same_weights(model, again)
    assert meta == {"datasets": ["Task09_Spleen"]} and cfg.model.heads["spleen"].num_classes == 2


# ------------------------------------------------------------------ CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "med3d.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow  # the dynamo ONNX export takes ~15 s on a CPU
def test_cli_export_every_format(tmp_path, capsys):
    ckpt, model = small_checkpoint(tmp_path, layout="strided")
    for fmt, name in [("safetensors", "e.safetensors"), ("pt", "e.pt"), ("onnx", "m.onnx"),
                      ("torchscript", "m.ts")]:
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / name),
                     "--input-size", "16", "32", "32"]) == 0, fmt
        assert (tmp_path / name).stat().st_size > 0
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "pt", "--out", str(tmp_path / "e.pt")]) == 2
    assert "already exists" in capsys.readouterr().err
    # MONAI's resnetN has the standard widths only: a narrow encoder is refused, not written half-right
    assert main(["export", str(ckpt), "--format", "monai", "--out", str(tmp_path / "m.pth")]) == 2
    assert "widths=[64, 128, 256, 512]" in capsys.readouterr().err and not (tmp_path / "m.pth").exists()
    # an export converts on: med3d safetensors -> medicalnet -> monai, architecture from metadata / --arch
    wide = tmp_path / "wide.safetensors"
    export_encoder(encoder(10, layout="strided"), "safetensors", wide)
    assert main(["export", str(wide), "--format", "monai", "--out", str(tmp_path / "again.pth")]) == 0
    assert main(["export", str(tmp_path / "again.pth"), "--format", "pt", "--out", str(tmp_path / "p.pt"),
                 "--arch", "resnet10", "--layout", "strided"]) == 0


@pytest.mark.slow
def test_cli_bad_inputs_are_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    r = run_cli("export", junk, "--out", tmp_path / "x.safetensors", "--arch", "resnet18")
    assert r.returncode == 2 and "not a readable PyTorch checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    mn = tmp_path / "resnet_18.pth"
    export_encoder(encoder(18), "medicalnet", mn)
    r = run_cli("export", mn, "--out", tmp_path / "y.safetensors", "--arch", "resnet50")
    assert r.returncode == 2 and "resnet18" in r.stderr and "resnet50" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "y.safetensors").exists()
    r = run_cli("export", mn, "--out", tmp_path / "z.onnx", "--format", "onnx", "--arch", "resnet18")
    assert r.returncode == 2 and "needs" not in r.stdout and "head" in r.stderr


@pytest.mark.slow
def test_cli_inflate_and_verify(tmp_path):
    from helpers import monai_2d

    net2d = monai_2d([3, 4, 6, 3])
    src = tmp_path / "resnet34-2d.pth"
    torch.save(net2d.state_dict(), src)
    out = tmp_path / "r34.safetensors"
    r = run_cli("inflate", src, "--arch", "resnet34", "--mode", "1x3x3", "--out", out)
    assert r.returncode == 0, r.stderr
    enc = med3d.create_encoder("resnet34", in_channels=3, layout="strided", conv="slicewise", shortcut="B")
    assert load_pretrained(enc, out).source == "med3d"
    torch.testing.assert_close(enc.conv1.weight[:, :, 0], net2d.conv1.weight)
    r = run_cli("weights", "verify", out)
    assert r.returncode == 0 and "tensor hash in metadata: matches" in r.stdout
    r = run_cli("inflate", out, "--arch", "resnet34", "--out", tmp_path / "again.safetensors")
    assert r.returncode == 2 and "not a 2D ResNet" in r.stderr


@pytest.mark.slow
def test_weights_verify_checks_index_structure(tmp_path):
    r = run_cli("weights", "list")
    assert r.returncode == 0 and "resnet_50.pth" in r.stdout
    wrong = tmp_path / "resnet_50.pth"  # named like MedicalNet's ResNet-50 but holding a ResNet-18
    export_encoder(encoder(18), "medicalnet", wrong)
    r = run_cli("weights", "verify", wrong)
    assert r.returncode == 2 and "arch is resnet18 where the index lists resnet_50.pth with arch resnet50" in r.stderr
    two = tmp_path / "two" / "resnet_18.pth"  # the right depth, but a 2-channel first conv
    two.parent.mkdir()
    export_encoder(encoder(18, shortcut="A", in_channels=2), "medicalnet", two)
    r = run_cli("weights", "verify", two)
    assert r.returncode == 2 and "in_channels is 2 where the index lists resnet_18.pth" in r.stderr
    right = tmp_path / "resnet_18.pth"
    export_encoder(encoder(18), "medicalnet", right)
    r = run_cli("weights", "verify", right)
    assert r.returncode == 0 and "structure verified" in r.stdout
    fake_tv = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, fake_tv)
    r = run_cli("weights", "verify", fake_tv)
    assert r.returncode == 2 and "does not start with f37072fd" in r.stderr


# ------------------------------------------------------------------ input contract from a training checkpoint

def plan(dataset, channel_names, spacing_zyx, schemes, labels, channels=None):
    """A plan shaped like med3d.data.plan.make_plan's, as the trainer stores it per task (with ``channels``)."""
    norm = [{"scheme": "ct", "clip": [-100.0, 240.0], "mean": 99.4, "std": 39.4} if s == "ct" else {"scheme": s}
            for s in schemes]
    return {"dataset": dataset, "layout": "msd", "channel_names": channel_names,
            "labels": {str(i): name for i, name in enumerate(labels)}, "target_spacing": spacing_zyx,
            "anisotropic_axis": None, "crop_nonzero": True, "normalization": norm,
            "median_shape_resampled": [96, 160, 160], "preprocess_version": 1, "channels": channels}


def training_checkpoint(tmp_path, plans, adapters=None):
    overrides = ["model.encoder.arch=resnet10", "model.encoder.widths=[8, 16, 32, 64]"]
    overrides += [f"model.heads.{t}.num_classes={len(p['labels'])}" for t, p in plans.items()]
    cfg = load_config(None, overrides)
    model = med3d.create_model(cfg)
    meta = {"job": "pretrain", "tasks": list(plans), "plans": plans, "patch_size": [32, 64, 64], "in_channels": 1}
    return save_checkpoint(tmp_path / "last.pt", model, cfg, meta=meta)


def exported_metadata(tmp_path, ckpt):
    model, _, meta = load_checkpoint(ckpt)
    path = export_encoder(model, "safetensors", tmp_path / "enc.safetensors", meta=meta)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert not [k for k in raw if k == "spacing" or k.startswith("spacing_") and k != "spacing_zyx"]
    return {k: json.loads(v) if k not in ("format", "med3d_version", "sha256", "job") else v for k, v in raw.items()}


def test_export_from_training_checkpoint_states_the_plans(tmp_path):
    plans = {
        "liver": plan("Task03_Liver", ["CT"], [2.5, 0.8, 0.8], ["ct"], ["background", "liver", "tumour"]),
        # two MR channels, the encoder fed the second (ADC) only
        "prostate": plan("Task05_Prostate", ["T2", "ADC"], [3.6, 0.62, 0.62], ["zscore", "zscore"],
                         ["background", "PZ", "TZ"], channels=[1]),
    }
    md = exported_metadata(tmp_path, training_checkpoint(tmp_path, plans))
    assert md["datasets"] == ["Task03_Liver", "Task05_Prostate"] and md["job"] == "pretrain"
    assert md["spacing_zyx"] is None and md["normalisation"] is None  # tasks differ: see md["tasks"]
    assert md["input_channels"] == ["channel0"] and md["patch_size_zyx"] == [32, 64, 64]
    liver, prostate = md["tasks"]["liver"], md["tasks"]["prostate"]
    assert liver["spacing_zyx"] == [2.5, 0.8, 0.8] and prostate["spacing_zyx"] == [3.6, 0.62, 0.62]
    assert liver["normalisation"][0]["scheme"] == "ct" and liver["normalisation"][0]["clip"] == [-100.0, 240.0]
    assert prostate["channel_names"] == ["ADC"] and prostate["normalisation"] == [{"scheme": "zscore"}]
    assert liver["labels"] == {"0": "background", "1": "liver", "2": "tumour"} and liver["dataset"] == "Task03_Liver"
    assert not liver["input_adapter"] and not prostate["input_adapter"]
    assert md["encoder"]["arch"] == "resnet10" and md["encoder"]["conv"] == "3d"


def test_export_from_single_task_checkpoint_has_top_level_contract(tmp_path):
    plans = {"spleen": plan("Task09_Spleen", ["CT"], [1.6, 0.79, 0.79], ["ct"], ["background", "spleen"])}
    md = exported_metadata(tmp_path, training_checkpoint(tmp_path, plans))
    assert md["spacing_zyx"] == [1.6, 0.79, 0.79] and md["input_channels"] == ["CT"]
    assert md["normalisation"] == md["tasks"]["spleen"]["normalisation"] and md["datasets"] == ["Task09_Spleen"]
    # re-exporting an export keeps its contract (nothing is derived twice or lost)
    enc = med3d.create_encoder("resnet10", widths=[8, 16, 32, 64])
    weights = read_weights(tmp_path / "enc.safetensors")
    load_pretrained(enc, weights)
    again = export_encoder(enc, "safetensors", tmp_path / "again.safetensors",
                           meta={k: v for k, v in weights.metadata.items() if k not in ("format", "sha256")})
    assert read_weights(again).metadata["tasks"] == weights.metadata["tasks"]


def test_old_export_with_bare_spacing_and_kernel_still_loads(tmp_path):
    from safetensors.torch import save_file

    enc = encoder(18, layout="strided", conv="slicewise")
    sd = {k: v.contiguous() for k, v in enc.state_dict().items()}
    old_encoder = {k: v for k, v in enc.config.items() if k != "conv"}
    old_encoder["kernel"] = "1x3x3"  # how med3d < 0.2 wrote it
    md = {"format": "med3d", "med3d_version": "0.1.0", "encoder": json.dumps(old_encoder),
          "input_channels": json.dumps(["T1"]), "spacing": json.dumps([3.0, 1.0, 1.0]), "normalisation": "null",
          "datasets": "[]", "sha256": tensors_sha256(sd)}
    path = tmp_path / "old.safetensors"
    save_file(sd, str(path), metadata=md)
    weights = read_weights(path)
    assert weights.metadata["spacing_zyx"] == [3.0, 1.0, 1.0] and "spacing" not in weights.metadata
    assert weights.metadata["encoder"]["conv"] == "slicewise" and "kernel" not in weights.metadata["encoder"]
    back = encoder_from_config(weights.metadata["encoder"])
    assert back.config == enc.config
    load_pretrained(back, path)
    same_weights(enc, back)


def test_old_checkpoint_config_with_kernel_and_null_head_options_loads(tmp_path):
    path, model = small_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    enc_cfg = payload["config"]["model"]["encoder"]
    enc_cfg["kernel"] = {"3d": "3x3x3", "slicewise": "1x3x3"}[enc_cfg.pop("conv")]
    payload["config"]["model"]["heads"]["spleen"] = {"type": "med3d", "num_classes": 2, "channels": None,
                                                      "dropout": None}
    torch.save(payload, path)
    again, cfg, _ = load_checkpoint(path)
    same_weights(model, again)
    assert cfg.model.encoder.conv == "3d" and cfg.model.heads["spleen"].channels == 32


# ------------------------------------------------------------------ sizes that are no multiple of the output stride

def model_with_head(layout, kind, bn_randomizer):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.encoder.arch=resnet10", f"model.encoder.layout={layout}",
                             "model.encoder.widths=[8, 16, 32, 64]", f"model.heads.t.type={kind}"])
    return bn_randomizer(med3d.create_model(cfg)).eval()


ODD = (37, 45, 51)  # no axis a multiple of 8 or 32


@pytest.mark.slow
@pytest.mark.parametrize("layout,kind", [("dilated", "med3d"), ("strided", "unet")])
def test_onnx_runs_at_sizes_off_the_stride(tmp_path, layout, kind, bn_randomizer):
    import onnxruntime as ort

    model = model_with_head(layout, kind, bn_randomizer)
    assert model.size_divisibility == ((8,) * 3 if layout == "dilated" else (32,) * 3)
    from med3d.inference.onnx_runtime import OnnxNetwork

    export_onnx(model, tmp_path / "m.onnx", [32, 32, 32])  # traced at a multiple of the stride
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, *ODD)
    with torch.no_grad():
        ref = model(x, "t").numpy()
    # The graph itself takes multiples of the divisibility and refuses other sizes, naming it ...
    with pytest.raises(Exception, match=f"(depth|height|width)_must_be_a_multiple_of_{model.size_divisibility[0]}"):
        sess.run(None, {"image": x.numpy()})
    # ... and med3d's runner pads to them and crops back, as the PyTorch model does.
    got = OnnxNetwork(sess, "t", model.size_divisibility, 1, "m.onnx")(x, "t").numpy()
    assert got.shape == ref.shape == (1, 2, *ODD)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("layout,kind", [("dilated", "med3d"), ("strided", "unet")])
def test_torchscript_runs_at_sizes_off_the_stride(tmp_path, layout, kind, bn_randomizer):
    model = model_with_head(layout, kind, bn_randomizer)
    loaded = torch.jit.load(str(export_torchscript(model, tmp_path / "m.ts", [32, 32, 32])))
    x = torch.randn(1, 1, *ODD)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x, "t"), atol=1e-5, rtol=1e-5)
