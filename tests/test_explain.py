"""med3d explain: Grad-CAM that points at the evidence (and not once the weights are random), maps on the
input's own grid, the segmentation score, the model left as it was, bad input, the CLI and a real CT."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from med3d.api import create_model
from med3d.checkpoint import save_checkpoint
from med3d.config import from_dict
from med3d.data.image import read_image
from med3d.errors import Med3DError
from med3d.explain import aligned_upsampler, class_activation_map, explain, explain_tensor

S, R = 32, 3  # blob volumes: S^3 voxels of noise, one Gaussian blob of radius ~R (sigma R / 1.5)
NOISE, AMPLITUDE = 0.3, 3.0  # weak noise: low-level features stay quiet away from the blob
# ResNet-10 at 1/8 width (conftest's tiny config); stem stride 1 and a 3^3 stem kernel give a 32^3 volume
# 8^3 feature maps (4 voxels a cell) where the default stem would leave 4^3, at a quarter of its cost.
BLOB_ENCODER = {"arch": "resnet10", "widths": [8, 16, 32, 64], "stem_stride": 1, "stem_kernel": 3}
# A classification plan as training writes it (med3d.data.class_cache): the region of crop_mm around the ROI
# centre at the target spacing, not normalised ("none": the blob volumes are fed as they are), cut to the patch.
CLS_PLAN = {"kind": "classification", "channel_names": ["MR"], "classes": {"0": "no blob", "1": "blob"},
            "target_spacing": [1.0, 1.0, 1.0], "crop_mm": [24.0, 24.0, 24.0], "schemes": ["none"],
            "normalization": [{"scheme": "none"}], "channels": None, "plan_hash": "test"}
SEG_PLAN = {"target_spacing": [2.0, 1.0, 1.0], "crop_nonzero": True, "channel_names": ["MR"],
            "normalization": [{"scheme": "zscore"}], "channels": None, "labels": {"0": "background", "1": "organ"}}
_GRID = [torch.arange(S)] * 3


def _config(encoder: dict, heads: dict):
    return from_dict({"model": {"encoder": encoder, "heads": heads}})


def _blobs(n: int, gen: torch.Generator):
    """``n`` noise volumes (1, S, S, S); class 1 has a bright blob at a random centre (returned per volume)."""
    x = NOISE * torch.randn(n, 1, S, S, S, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    centres = torch.randint(R + 1, S - R - 1, (n, 3), generator=gen)
    zz, yy, xx = torch.meshgrid(*_GRID, indexing="ij")
    for i in torch.nonzero(y)[:, 0]:
        c = centres[i]
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        x[i, 0] += AMPLITUDE * torch.exp(-d2 / (2 * (R / 1.5) ** 2))
    return x, y, centres


def _train_blob_classifier(seed: int = 0):
    """A tiny classifier trained until it tells blob from no blob on held-out volumes (about 5-15 s on 2 cores).

    The head is antisymmetric (class 0's weights are minus class 1's) without a bias: a bias would let the
    network score background as it likes, here background must count against class 1, as it does in a
    well-posed detection task, so that class 1's evidence is the blob itself.
    """
    torch.manual_seed(seed)
    model = create_model(_config(BLOB_ENCODER, {"cls": {"type": "classification", "num_classes": 2}}))
    fc = model.heads["cls"].fc
    with torch.no_grad():
        fc.weight[0] = -fc.weight[1]
        fc.bias.zero_()
    fc.bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen, (x_val, y_val, _) = torch.Generator().manual_seed(seed + 1), _blobs(48, torch.Generator().manual_seed(2))
    acc = 0.0
    for step in range(1, 151):
        model.train()
        x, y, _ = _blobs(8, gen)
        loss = torch.nn.functional.cross_entropy(model(x, "cls"), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 and step >= 40:
            with torch.no_grad():
                acc = float((model.eval()(x_val, "cls").argmax(1) == y_val).float().mean())
            if acc >= 0.95:
                break
    assert acc >= 0.95, f"the blob classifier did not learn (held-out accuracy {acc:.2f})"
    return model.eval()


@pytest.fixture(scope="module")
def blob_classifier():
    return _train_blob_classifier()


def _randomised(model):
    """The same network with every layer re-initialised (the end point of Adebayo et al.'s cascading randomisation)."""
    torch.manual_seed(123)
    out = copy.deepcopy(model)
    for m in out.modules():
        if hasattr(m, "reset_parameters") and m is not out:
            m.reset_parameters()
    return out.eval()


def _box(centre, pad: int):
    return tuple(slice(max(0, int(c) - R - pad), int(c) + R + pad + 1) for c in centre)


def _blob_shares(model, layer: str, pad: int = 5):
    """Share of class 1's CAM mass inside a box of +-(R + pad) voxels around the blob, per blob volume."""
    x, y, centres = _blobs(24, torch.Generator().manual_seed(7))
    shares = []
    for i in torch.nonzero(y)[:8, 0]:
        cam = class_activation_map(model, x[i:i + 1], "cls", class_index=1, layer=layer)[0, 0]
        shares.append(float(cam[_box(centres[i], pad)].sum() / cam.sum().clamp(min=1e-12)))
    return np.array(shares)


@pytest.mark.slow
def test_cam_mass_lies_on_the_blob_and_not_once_the_weights_are_random(blob_classifier):
    box_fraction = (2 * (R + 5) + 1) ** 3 / S ** 3  # 15% of the volume
    trained = _blob_shares(blob_classifier, "layer2")
    randomised = _blob_shares(_randomised(blob_classifier), "layer2")
    assert trained.mean() > 0.5, (trained, box_fraction)
    assert randomised.mean() < trained.mean() - 0.25, (randomised, trained)
    # At layer4 the tiny volume is inside every cell's receptive field, so the map spreads; it still
    # prefers the blob over the random network's map.
    assert _blob_shares(blob_classifier, "layer4").mean() > _blob_shares(_randomised(blob_classifier), "layer4").mean()


def _write_nifti(path: Path, data_zyx: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(data_zyx, (2, 1, 0))), affine), str(path))
    return path


# Anisotropic voxels (1.5 x 0.8 x 2.5 mm), the x axis flipped and an origin away from 0.
AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 0.8, 0, -25.0], [0, 0, 2.5, 110.0], [0, 0, 0, 1]])


def _save_cls_checkpoint(path: Path, model=None, patch=(24, 24, 24)) -> Path:
    cfg = _config(BLOB_ENCODER, {"cls": {"type": "classification", "num_classes": 2}})
    return save_checkpoint(path, model if model is not None else create_model(cfg), cfg,
                           meta={"plans": {"cls": CLS_PLAN}, "patch_size": list(patch)})


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05  # not blank


def _world(src: Path, index_zyx):
    from med3d.data.classification import index_to_world

    return index_to_world(read_image(src).geometry, index_zyx)


def test_segmentation_map_has_the_inputs_shape_and_affine_and_is_zero_outside_the_crop(tmp_path):
    data = np.random.default_rng(0).normal(size=(12, 30, 20)).astype(np.float32)
    data[:, :5] = 0  # cropped away by the plan (crop_nonzero): the map must be placed back after the crop
    src = _write_nifti(tmp_path / "case.nii.gz", data, AFFINE)
    cfg = _config({"arch": "resnet10", "widths": [8, 16, 32, 64]}, {"seg": {"type": "med3d", "num_classes": 2}})
    torch.manual_seed(0)  # an untrained network; some draws have no positive evidence anywhere (an all-zero map)
    ckpt = save_checkpoint(tmp_path / "seg.pt", create_model(cfg), cfg, meta={"plans": {"seg": SEG_PLAN}})
    [res] = explain(ckpt, [src], tmp_path / "out")
    cam = nib.load(str(res.cam_path))
    assert res.cam_path.name == "case_cam.nii.gz" and res.case == "case"
    assert cam.shape == nib.load(str(src)).shape == (20, 30, 12)
    np.testing.assert_allclose(cam.affine, AFFINE, atol=1e-5)
    values = np.asarray(cam.dataobj)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() == pytest.approx(1.0)
    assert values[:, :5].max() == 0 and values[:, 5:].max() == pytest.approx(1.0)
    assert values[res.peak_zyx[::-1]] == values.max()  # the file is in (x, y, z) order
    assert res.png_path == tmp_path / "out" / "case_cam.png"
    _check_png(res.png_path)


def test_classification_map_has_the_inputs_shape_and_affine_and_covers_only_the_roi(tmp_path):
    src = _write_nifti(tmp_path / "case.nii.gz", np.random.default_rng(0).normal(size=(16, 60, 40)), AFFINE)
    ckpt = _save_cls_checkpoint(tmp_path / "cls.pt")
    centre = (8, 30, 20)  # z, y, x voxel; the 24 mm ROI spans about 10 slices, 30 rows and 16 columns
    [res] = explain(ckpt, [src], tmp_path / "out", center_mm=_world(src, centre))
    cam = nib.load(str(res.cam_path))
    assert cam.shape == nib.load(str(src)).shape == (40, 60, 16)
    np.testing.assert_allclose(cam.affine, AFFINE, atol=1e-5)
    values = np.transpose(np.asarray(cam.dataobj), (2, 1, 0))  # (z, y, x)
    assert values.dtype == np.float32 and values.max() == pytest.approx(1.0)
    inside = np.nonzero(values)
    for axis, (c, half_mm, spacing) in enumerate(zip(centre, (12, 12, 12), (2.5, 0.8, 1.5))):
        assert abs(inside[axis].min() - c) * spacing <= half_mm + spacing  # nothing beyond the ROI
        assert abs(inside[axis].max() - c) * spacing <= half_mm + spacing
    assert values[:, :10].max() == 0 and values[:, 50:].max() == 0
    _check_png(res.png_path)


@pytest.mark.slow
def test_the_peak_on_the_input_grid_is_the_blob(blob_classifier, tmp_path):
    x, y, centres = _blobs(8, torch.Generator().manual_seed(11))
    i = int(torch.nonzero(y)[0, 0])
    # The scan has 2 mm slices (every other slice of the 1 mm training grid) and 10 empty rows in front;
    # the ROI centre is 3 mm off the blob, so the region cut, its resampling and the way back all count.
    scan = np.zeros((S // 2, S + 10, S), np.float32)
    scan[:, 10:] = x[i, 0].numpy()[::2]
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-12.0, 30.0, -50.0)
    src = _write_nifti(tmp_path / "blob.nii.gz", scan, affine)
    blob = np.array([centres[i][0] / 2, centres[i][1] + 10, centres[i][2]], float)  # z, y, x on the scan
    ckpt = _save_cls_checkpoint(tmp_path / "cls.pt", model=blob_classifier)
    [res] = explain(ckpt, src, tmp_path / "out", layer="layer2", center_mm=_world(src, blob + [0, 3, 0]))
    assert res.class_index == 1  # the predicted class
    error_mm = np.abs(np.array(res.peak_zyx) - blob) * [2.0, 1.0, 1.0]
    assert error_mm.max() <= 4.0, (res.peak_zyx, blob)


def _background_dominates(model, task: str):
    """Make the background logit the largest everywhere, as in a scan that is mostly background."""
    last = model.heads[task].conv_seg[-1]  # 1x1x1 conv after a ReLU: its inputs are >= 0
    with torch.no_grad():
        last.weight[0] = last.weight[1:].abs().sum(0) + 0.1
    return model


def test_segmentation_scores_a_class_by_its_mean_logit_and_defaults_to_the_largest_foreground():
    torch.manual_seed(0)
    model = create_model(_config({"arch": "resnet10", "widths": [8, 16, 32, 64]},
                                 {"seg": {"type": "med3d", "num_classes": 3},
                                  "cls": {"type": "classification", "num_classes": 4}})).eval()
    _background_dominates(model, "seg")
    x = torch.randn(1, 1, 16, 24, 20)
    with torch.no_grad():
        seg = model(x, "seg").flatten(2).mean(2)[0]
        cls = model(x, "cls")[0]
    assert seg[0] > seg[1:].max()
    cam, k, score = explain_tensor(model, x, "seg")
    assert k == 1 + int(seg[1:].argmax()) and score == pytest.approx(float(seg[k]), rel=1e-4)
    assert cam.shape == (1, 1, 16, 24, 20) and cam.min() >= 0 and cam.max() > 0
    _, k0, score0 = explain_tensor(model, x, "seg", class_index=0)  # background can be asked for
    assert k0 == 0 and score0 == pytest.approx(float(seg[0]), rel=1e-4)
    _, kc, _ = explain_tensor(model, x, "cls", method="gradcam++")
    assert kc == int(cls.argmax())
    other = (k % 2) + 1  # the foreground class the default did not pick
    other_cam, _, other_score = explain_tensor(model, x, "seg", class_index=other)
    assert other_score == pytest.approx(float(seg[other]), rel=1e-4) and not torch.allclose(other_cam, cam)


def test_the_model_is_left_as_it_was():
    model = create_model(_config({"arch": "resnet10", "widths": [8, 16, 32, 64]},
                                 {"seg": {"type": "med3d", "num_classes": 2}}))
    model.train()
    model.encoder.layer1.eval()  # a frozen stage keeps its own mode
    for layer in ("stem", "layer3"):
        class_activation_map(model, torch.randn(1, 1, 16, 16, 16), "seg", layer=layer)
    assert model.training and not model.encoder.layer1.training
    assert model.encoder.relu.inplace  # MONAI turns it off to hook the stem
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_feature_i_of_a_stage_is_placed_on_input_voxel_stride_times_i(monkeypatch):
    import med3d.explain as explain_module

    torch.manual_seed(0)
    model = create_model(_config({"arch": "resnet10", "widths": [8, 16, 32, 64]},
                                 {"seg": {"type": "med3d", "num_classes": 2}})).eval()
    # The encoder centres feature i on input voxel stride * i (odd kernels padded by half): the input voxels a
    # feature is sensitive to centre nearer there than on stride * i + (stride - 1) / 2 ...
    x = torch.randn(1, 1, 64, 64, 64, requires_grad=True)
    feats = model.encoder(x)
    grid = torch.meshgrid(*[torch.arange(64.0)] * 3, indexing="ij")
    for stage in (0, 2, 4):
        stride, i = np.array(model.encoder.feature_info[stage].stride), [n // 2 for n in feats[stage].shape[2:]]
        grad, = torch.autograd.grad(feats[stage][0, :, i[0], i[1], i[2]].abs().sum(), x, retain_graph=True)
        w = grad[0, 0].abs()
        centre = np.array([float((g * w).sum() / w.sum()) for g in grid])
        ours, monais = np.abs(centre - stride * i), np.abs(centre - (stride * i + (stride - 1) / 2))
        assert (ours < monais).all(), (stage, centre)
    # ... the upsampler puts it there (MONAI's default would put it at stride * i + (stride - 1) / 2) ...
    feat = torch.zeros(1, 1, 4, 5, 3)
    feat[0, 0, 1, 4, 2] = 1.0
    up = aligned_upsampler((8, 4, 2))((32, 20, 6))(feat)
    assert up.shape == (1, 1, 32, 20, 6)
    assert tuple(int(i) for i in np.unravel_index(int(up.argmax()), up.shape[2:])) == (8, 16, 4)
    # ... and maps are upsampled with the explained stage's stride.
    strides = []
    monkeypatch.setattr(explain_module, "aligned_upsampler",
                        lambda stride: strides.append(tuple(stride)) or aligned_upsampler(stride))
    for layer in ("layer4", "stem"):
        class_activation_map(model, torch.randn(1, 1, 16, 16, 16), "seg", layer=layer)
    assert strides == [(8, 8, 8), (2, 2, 2)]


@pytest.fixture
def cls_case(tmp_path):
    src = _write_nifti(tmp_path / "case.nii.gz", np.random.default_rng(0).normal(size=(10, 16, 16)), AFFINE)
    return _save_cls_checkpoint(tmp_path / "cls.pt", patch=(16, 16, 16)), src


@pytest.mark.parametrize("change, named", [
    ({"task": "liver"}, "--task liver"),
    ({"class_index": 2}, "--class 2"),
    ({"class_index": -1}, "--class -1"),
    ({"layer": "layer5"}, "--layer layer5"),
    ({"method": "cam"}, "--method cam"),
    ({"images": "damaged"}, "damaged.nii.gz"),
    ({"checkpoint": "missing"}, "missing.pt"),
    ({"images": "twice", "center_mm": (0.0, 0.0, 0.0)}, "--center"),
    ({"roi_masks": ["a.nii.gz", "b.nii.gz"]}, "--roi-mask"),
])
def test_bad_input_is_one_line_naming_it(cls_case, tmp_path, change, named):
    ckpt, src = cls_case
    args = {"checkpoint": ckpt, "images": [src], "out_dir": tmp_path / "out"}
    if change.get("images") == "damaged":
        (tmp_path / "damaged.nii.gz").write_bytes(src.read_bytes()[:200])
        change = {"images": [tmp_path / "damaged.nii.gz"]}
    if change.get("checkpoint") == "missing":
        change = {"checkpoint": tmp_path / "missing.pt"}
    if change.get("images") == "twice":
        change = {**change, "images": [src, src]}
    with pytest.raises(Med3DError) as err:
        explain(**{**args, **change})
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "case_cam.nii.gz").exists()


def test_existing_maps_are_kept_unless_overwrite(cls_case, tmp_path):
    ckpt, src = cls_case
    [first] = explain(ckpt, [src], tmp_path / "out", overwrite=False)
    before = first.cam_path.stat().st_mtime_ns
    with pytest.raises(Med3DError, match="case_cam.nii.gz: already exists; pass --overwrite"):
        explain(ckpt, [src], tmp_path / "out", overwrite=False)
    assert first.cam_path.stat().st_mtime_ns == before
    explain(ckpt, [src], tmp_path / "out", overwrite=True)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "med3d.cli", "explain", *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.slow
def test_cli_writes_both_files_and_exits_2_on_bad_input(cls_case, tmp_path):
    ckpt, src = cls_case
    out = tmp_path / "cli"
    r = _cli(ckpt, src, "--out", out, "--class", 1, "--method", "gradcam++", "--layer", "layer3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "case: cls class 1" in r.stdout
    assert (out / "case_cam.nii.gz").is_file() and (out / "case_cam.png").is_file()
    bad = _cli(ckpt, src, "--out", out, "--class", 7, "--overwrite")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--class 7" in bad.stderr
    assert bad.stderr.startswith("med3d explain: error: ")
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_segmentation_class_on_a_real_lung_ct_is_on_the_scans_grid(real_data, tmp_path):
    scan = real_data / "radiomics" / "lung1_image.nrrd"  # 512 x 512 x 48 at 0.57 x 0.57 x 5 mm
    plan = {"target_spacing": [5.0, 3.0, 3.0], "crop_nonzero": True, "channel_names": ["CT"], "channels": None,
            "normalization": [{"scheme": "ct", "clip": [-1000.0, 400.0], "mean": -300.0, "std": 400.0}],
            "labels": {"0": "background", "1": "tumour"}}
    cfg = _config({"arch": "resnet10", "widths": [8, 16, 32, 64]}, {"lung": {"type": "med3d", "num_classes": 2}})
    torch.manual_seed(0)
    model = _background_dominates(create_model(cfg), "lung")
    ckpt = save_checkpoint(tmp_path / "seg.pt", model, cfg, meta={"plans": {"lung": plan}})
    [res] = explain(ckpt, [scan], tmp_path / "out")
    assert res.case == "lung1_image" and res.class_index == 1  # the foreground class, though background scores more
    cam, ref = read_image(res.cam_path), read_image(scan)
    assert cam.array.shape == ref.array.shape == (1, 48, 512, 512)
    np.testing.assert_allclose(cam.geometry.spacing, ref.geometry.spacing, atol=1e-5)
    np.testing.assert_allclose(cam.geometry.origin, ref.geometry.origin, atol=1e-3)
    np.testing.assert_allclose(cam.geometry.direction, ref.geometry.direction, atol=1e-6)
    assert cam.array.min() >= 0 and cam.array.max() == pytest.approx(1.0)
    assert (tmp_path / "out" / "lung1_image_cam.png").stat().st_size > 1000
