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
from med3d.export import export_encoder, export_onnx, export_torchscript, tensors_sha256
from med3d.transfer import load_pretrained

from test_transfer import randomize_bn


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
    meta = {"input_channels": ["T2", "ADC"], "spacing": [0.6, 0.6, 3.6], "normalisation": "zscore-nonzero",
            "datasets": ["Task05_Prostate"]}
    path = export_encoder(enc, "safetensors", tmp_path / "enc.safetensors", meta=meta)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md["format"] == "med3d" and md["med3d_version"] == med3d.__version__
    assert json.loads(md["encoder"])["arch"] == "resnet10" and json.loads(md["encoder"])["in_channels"] == 2
    assert json.loads(md["input_channels"]) == ["T2", "ADC"] and json.loads(md["spacing"]) == [0.6, 0.6, 3.6]
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


def test_onnx_matches_pytorch_with_dynamic_axes(tmp_path):
    import onnxruntime as ort

    path, model = small_checkpoint(tmp_path)
    diff = export_onnx(model, tmp_path / "m.onnx", [24, 40, 40])
    assert diff < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 20, 48, 36)  # another batch and spatial size than traced
    with torch.no_grad():
        ref = model(x, "spleen").numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4


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


def test_cli_inflate_and_verify(tmp_path):
    from test_transfer import monai_2d

    net2d = monai_2d([3, 4, 6, 3])
    src = tmp_path / "resnet34-2d.pth"
    torch.save(net2d.state_dict(), src)
    out = tmp_path / "r34.safetensors"
    r = run_cli("inflate", src, "--arch", "resnet34", "--mode", "1x3x3", "--out", out)
    assert r.returncode == 0, r.stderr
    enc = med3d.create_encoder("resnet34", in_channels=3, layout="strided", kernel="1x3x3", shortcut="B")
    assert load_pretrained(enc, out).source == "med3d"
    torch.testing.assert_close(enc.conv1.weight[:, :, 0], net2d.conv1.weight)
    r = run_cli("weights", "verify", out)
    assert r.returncode == 0 and "tensor hash in metadata: matches" in r.stdout
    r = run_cli("inflate", out, "--arch", "resnet34", "--out", tmp_path / "again.safetensors")
    assert r.returncode == 2 and "not a 2D ResNet" in r.stderr


def test_weights_verify_checks_index_structure(tmp_path):
    r = run_cli("weights", "list")
    assert r.returncode == 0 and "resnet_50.pth" in r.stdout
    wrong = tmp_path / "resnet_50.pth"  # named like MedicalNet's ResNet-50 but holding a ResNet-18
    export_encoder(encoder(18), "medicalnet", wrong)
    r = run_cli("weights", "verify", wrong)
    assert r.returncode == 2 and "index lists resnet_50.pth as resnet50" in r.stderr
    right = tmp_path / "resnet_18.pth"
    export_encoder(encoder(18), "medicalnet", right)
    r = run_cli("weights", "verify", right)
    assert r.returncode == 0 and "structure verified" in r.stdout
    fake_tv = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, fake_tv)
    r = run_cli("weights", "verify", fake_tv)
    assert r.returncode == 2 and "does not start with f37072fd" in r.stderr
