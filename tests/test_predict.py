"""Predict (original geometry back), evaluate (known values), previews, and bad input."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import med3d
from med3d.checkpoint import save_checkpoint
from med3d.config import from_dict
from med3d.data.image import Geometry, Image, read_image, write_image
from med3d.data.preprocess import preprocess, resample
from med3d.inference import restore_probabilities
from med3d.engine.trainer import train
from med3d.evaluate import pair_metrics


@pytest.fixture(scope="module")
def liver_ckpt(demo_root, tmp_path_factory, cfg_dict) -> Path:
    """A (barely) trained CT model with its plan: what predict needs, not what a user would ship."""
    tmp = tmp_path_factory.mktemp("liver")
    cfg = cfg_dict(demo_root, tmp, tasks=("Task03_LiverDemo",), train={"iterations": 2, "checkpoint_every": 2})
    # A coarse grid and larger windows keep whole-scan prediction quick; both real scans still get resampled
    # (the CT's 3 mm slices to 5 mm, the NRRD's 0.57 mm pixels to 3 mm).
    cfg["data"]["datasets"]["Task03_LiverDemo"]["spacing"] = [5.0, 3.0, 3.0]
    cfg["data"]["patch_size"] = [24, 48, 48]
    train(from_dict(cfg), "pretrain", progress=False, tensorboard=False)
    return tmp / "run" / "checkpoints" / "last.pt"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "med3d.cli", *args], capture_output=True, text=True)


def _same_grid(a: Image, b: Image) -> None:
    assert a.array.shape[1:] == b.array.shape[1:]
    assert np.allclose(a.geometry.spacing, b.geometry.spacing, atol=1e-5)
    assert np.allclose(a.geometry.origin, b.geometry.origin, atol=1e-4)
    assert np.allclose(a.geometry.direction, b.geometry.direction, atol=1e-6)


@pytest.mark.slow
def test_predict_real_ct_and_anisotropic_nrrd_keep_the_input_geometry(liver_ckpt, real_data, tmp_path):
    ct = real_data / "totalseg_ct" / "ct.nii.gz"
    nrrd = real_data / "radiomics" / "lung1_image.nrrd"
    r = _cli("predict", str(liver_ckpt), str(ct), str(nrrd), "--out", str(tmp_path), "--preview", "--probabilities",
             "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    for src, out in ((ct, tmp_path / "ct.nii.gz"), (nrrd, tmp_path / "lung1_image.nrrd")):
        pred, ref = read_image(out), read_image(src)
        _same_grid(pred, ref)
        assert pred.array.dtype == np.uint8 and set(np.unique(pred.array)) <= {0, 1, 2}
    # Slicer/ITK-SNAP read the NIfTI sform: same affine as the input's.
    assert np.allclose(nib.load(tmp_path / "ct.nii.gz").affine, nib.load(ct).affine, atol=1e-4)
    probs = read_image(tmp_path / "ct_probs.nii.gz")
    assert probs.array.shape[0] == 3 and np.allclose(probs.array.sum(0), 1, atol=1e-4)
    png = tmp_path / "ct_preview.png"
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05  # not blank


@pytest.mark.slow
def test_python_api_returns_arrays_with_geometry(liver_ckpt, real_data):
    pred = med3d.predict(liver_ckpt, real_data / "totalseg_ct" / "ct.nii.gz", probabilities=True)
    src = read_image(real_data / "totalseg_ct" / "ct.nii.gz")
    assert pred.labels.shape == src.array.shape[1:] and pred.geometry == src.geometry
    assert pred.task == "Task03_LiverDemo" and pred.probabilities.shape[0] == 3


@pytest.mark.parametrize("target", [[5.0, 1.75, 1.75], [1.5, 1.5, 1.5]])
def test_label_map_to_training_grid_and_back_keeps_organs(real_data, target):
    ct = read_image(real_data / "totalseg_ct" / "ct.nii.gz")
    seg = read_image(real_data / "totalseg_ct" / "seg.nii.gz").array[0]
    plan = {"target_spacing": target, "crop_nonzero": True, "channel_names": ["CT"],
            "normalization": [{"scheme": "none"}]}
    _, _, props = preprocess(ct, None, plan)
    organs = {"spleen": 1, "right kidney": 2, "left kidney": 3, "liver": 5}
    classes = [0, *organs.values()]
    onehot = np.stack([(seg == c) for c in classes]).astype(np.float32)
    box = props["crop_box"]
    cropped = onehot[(slice(None),) + tuple(slice(a, b) for a, b in box)]
    on_plan = resample(cropped, props["resampled_shape"], props["spacing_zyx"], target, is_label=False)
    back = restore_probabilities(on_plan, props, plan).argmax(0)
    for name, value in organs.items():
        i = classes.index(value)
        a, b = back == i, seg == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.95, (name, dice)


def test_evaluate_known_values_on_simple_shapes():
    spacing = (2.0, 1.0, 0.5)  # (z, y, x) mm
    ref = np.zeros((30, 30, 30), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.zeros_like(ref)
    pred[5:15, 5:15, 7:17] = 1  # shifted 2 voxels (1 mm) along x: overlap 10 x 10 x 8
    pred[20, 20, 5] = 2  # one voxel of class 2 ...
    ref[20, 20, 15] = 2  # ... whose reference voxel is 10 voxels (5 mm) away along x
    rows = {r["class"]: r for r in pair_metrics(pred, ref, spacing, [1, 2], tolerance_mm=2.0)}
    assert rows[1]["dice"] == pytest.approx(2 * 800 / 2000)
    assert 0 < rows[1]["hd95_mm"] <= 1.0 + 1e-6  # no surface point is more than the 1 mm shift away
    assert rows[1]["nsd"] == pytest.approx(1.0)  # every surface point within the 2 mm tolerance
    assert rows[1]["volume_ref_ml"] == pytest.approx(1000 * 2.0 * 1.0 * 0.5 / 1000)
    assert rows[2]["dice"] == 0.0 and rows[2]["hd95_mm"] == pytest.approx(5.0) and rows[2]["nsd"] == 0.0
    same = pair_metrics(ref, ref, spacing, [1])[0]
    assert same["dice"] == 1.0 and same["hd95_mm"] == 0.0 and same["nsd"] == 1.0


@pytest.mark.slow
def test_evaluate_cli_writes_csv_summary_and_boxplot(tmp_path):
    g = Geometry((20, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for i, shift in enumerate((0, 2)):
        ref = np.zeros((20, 20, 20), np.uint8)
        ref[4:14, 4:14, 4:14] = 1
        pred = np.zeros_like(ref)
        pred[4:14, 4:14, 4 + shift:14 + shift] = 1
        write_image(tmp_path / "ref" / f"c{i}.nii.gz", ref, g)
        write_image(tmp_path / "pred" / f"c{i}.nii.gz", pred, g)
    r = _cli("evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "pred" / "metrics.csv")))
    assert [float(x["dice"]) for x in rows] == pytest.approx([1.0, 0.8])
    summary = list(csv.DictReader(open(tmp_path / "pred" / "summary.csv")))
    assert float(summary[0]["dice_mean"]) == pytest.approx(0.9) and float(summary[0]["dice_median"]) == pytest.approx(0.9)
    assert (tmp_path / "pred" / "dice_boxplot.png").stat().st_size > 1000
    assert "0.900" in r.stdout


@pytest.mark.slow
def test_bad_inputs_are_named_and_the_rest_still_done(liver_ckpt, real_data, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    raw = (real_data / "itk_t1" / "t1.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(raw[: len(raw) // 3])
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.float32)), str(bad / "flat.nrrd"))
    two = np.zeros((20, 20, 20, 2), np.float32)
    nib.save(nib.Nifti1Image(two, np.eye(4)), bad / "twochan.nii.gz")
    good = real_data / "itk_t1" / "t1.nii.gz"
    r = _cli("predict", str(liver_ckpt), str(bad / "truncated.nii.gz"), str(bad / "flat.nrrd"),
             str(bad / "twochan.nii.gz"), str(good), "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "truncated.nii.gz" in errors[0] and "truncated" in errors[0]
    assert "flat.nrrd" in errors[1] and "2D" in errors[1]
    assert "twochan.nii.gz" in errors[2] and "2 channel(s)" in errors[2]
    _same_grid(read_image(tmp_path / "out" / "t1.nii.gz"), read_image(good))
    # nothing half-written (the drift check's JSON comes with the one finished case)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t1.nii.gz", "t1_drift.json"]
    again = _cli("predict", str(liver_ckpt), str(good), "--out", str(tmp_path / "out"), "--quiet")
    assert again.returncode == 1 and "--overwrite" in again.stdout


@pytest.mark.slow
def test_checkpoint_without_a_plan_is_refused(tmp_path, demo_root, cfg_dict):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",)))
    from med3d.api import create_model

    path = save_checkpoint(tmp_path / "noplan.pt", create_model(cfg), cfg)
    scans = demo_root / "Task09_SpleenDemo" / "imagesTs"  # not tmp_path: --out may not lie in an input folder
    r = _cli("predict", str(path), str(scans), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no preprocessing plan" in r.stderr and r.stderr.count("\n") == 1


def test_big_endian_label_maps_score_like_native_ones():
    """nibabel hands big-endian NIfTI labels over as big-endian arrays, which torch refuses to wrap."""
    ref = np.zeros((6, 7, 8), np.int16)
    ref[1:4, 2:5, 3:6] = 1
    pred = np.roll(ref, 1, axis=0)
    native = pair_metrics(pred, ref, (1.0, 1.0, 1.0), [1])
    swapped = pair_metrics(pred.astype(">i2"), ref.astype(">i2"), (1.0, 1.0, 1.0), [1])
    assert swapped == native and 0 < native[0]["dice"] < 1


@pytest.mark.parametrize("name", ["lps", "ras", "permuted", "oblique"])
def test_previews_turn_every_stored_order_to_one_orientation(name):
    from med3d.preview import lps_view

    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # axes run S, P, L
    spacing, point = (3.0, 2.0, 1.0), (1, 2, 3)
    stored = {  # (array, direction row-major with columns the voxel axes x, y, z, spacing (z, y, x), point)
        "lps": (a, (1, 0, 0, 0, 1, 0, 0, 0, 1), spacing, point),
        "ras": (a[:, ::-1, ::-1], (-1, 0, 0, 0, -1, 0, 0, 0, 1), spacing, (1, 5 - 1 - 2, 6 - 1 - 3)),
        "permuted": (a.transpose(2, 1, 0), (0, 0, 1, 0, 1, 0, 1, 0, 0), spacing[::-1], point[::-1]),
        "oblique": (a, (0.9, 0.1, 0, -0.1, 0.9, 0, 0, 0, 1), spacing, point),  # nearest axes: as stored
    }
    array, direction, spacing_zyx, p = stored[name]
    (turned, none), got_spacing, got_point = lps_view([array, None], direction, spacing_zyx, p)
    assert none is None and np.array_equal(turned, a)
    assert got_spacing == list(spacing) and got_point == list(point)
