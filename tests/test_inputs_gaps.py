"""What predict, explain and the Python API take as input: a classification dataset given to a segmentation
model (its scans are segmented), classification case ids that cannot be output names, and ``--series`` /
``series=`` choosing one series of a DICOM folder that holds several.

Checkpoints are untrained tiny networks with hand-written plans: what is checked is which scans are read
and where the outputs go, not the labels.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import med3d
from badinput import refused
from med3d.api import create_model
from med3d.checkpoint import save_checkpoint
from med3d.cli import main
from med3d.config import from_dict
from med3d.data.image import Image, read_image
from med3d.errors import Med3DError

UID = "1.2.826.0.1.3680043.2.1125.9"
TINY = {"arch": "resnet10", "widths": [8, 16, 32, 64]}
SEG_PLAN = {"channel_names": ["CT"], "labels": {"0": "background", "1": "organ"}, "channels": None,
            "target_spacing": [2.0, 1.0, 1.0], "crop_nonzero": False,
            "normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 40.0, "std": 30.0}]}
CLS_PLAN = {"kind": "classification", "channel_names": ["CT"], "classes": {"0": "a", "1": "b"},
            "target_spacing": [1.0, 1.0, 1.0], "crop_mm": None, "schemes": ["none"],
            "normalization": [{"scheme": "none"}], "channels": None, "plan_hash": "test"}


def _checkpoint(path: Path, head: dict, plan: dict) -> Path:
    cfg = from_dict({"model": {"encoder": TINY, "heads": {"T": head}}})
    return save_checkpoint(path, create_model(cfg), cfg, meta={"plans": {"T": plan}, "patch_size": [8, 8, 8]})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (_checkpoint(root / "seg.pt", {"type": "med3d", "num_classes": 2}, SEG_PLAN),
            _checkpoint(root / "cls.pt", {"type": "classification", "num_classes": 2}, CLS_PLAN))


def _nifti(path: Path, shape=(8, 8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).normal(40, 30, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def _msd(root: Path, names=("a", "b")) -> Path:
    """A classification dataset folder: dataset.json with classes, one NIfTI per entry."""
    for n in names:
        _nifti(root / "imagesTr" / f"{n}.nii.gz")
    entries = [{"image": f"imagesTr/{n}.nii.gz", "class": i % 2} for i, n in enumerate(names)]
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "classes": {"0": "a", "1": "b"},
                                                   "training": entries}))
    return root


def _csv(root: Path, names=("a", "b")) -> Path:
    """A classification CSV (image,class) beside its images; the last row unlabelled (a test case)."""
    rows = [f"{_nifti(root / f'{n}.nii.gz').name},{i % 2 if i < len(names) - 1 else ''}" for i, n in enumerate(names)]
    path = root / "cases.csv"
    path.write_text("image,class\n" + "\n".join(rows) + "\n")
    return path


# ---------------------------------------------------------------- a classification dataset, segmented


@pytest.mark.parametrize("layout", [_msd, _csv])
def test_a_segmentation_model_segments_a_classification_datasets_scans(models, tmp_path, layout):
    dataset = layout(tmp_path / "ds")
    out = tmp_path / "out"
    assert main(["predict", str(models[0]), str(dataset), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    for case in ("a", "b"):
        pred = read_image(out / f"{case}.nii.gz")
        assert pred.array.shape == (1, 6, 8, 8)
        assert pred.geometry.matches(read_image(tmp_path / "ds" / ("imagesTr" if layout is _msd else "")
                                                / f"{case}.nii.gz").geometry) == ""
    assert not (out / "predictions.csv").exists()


@pytest.mark.corpus
def test_a_medmnist_file_given_to_a_segmentation_model_is_refused_in_one_line(models, tmp_path, capsys):
    npz = tmp_path / "nodulemnist3d.npz"
    np.savez(npz, train_images=np.zeros((2, 8, 8, 8), np.uint8), train_labels=np.array([[0], [1]]))
    refused(["predict", models[0], npz, "--out", tmp_path / "out", "--device", "cpu"], capsys,
            names=r"nodulemnist3d\.npz: a MedMNIST classification dataset holds arrays.*image files",
            inputs=[npz], watch=tmp_path)


# ---------------------------------------------------------------- classification case ids


def _csv_named(root: Path, file_name: str) -> Path:
    _nifti(root / file_name)
    _nifti(root / "ok.nii.gz")
    path = root / "cases.csv"
    path.write_text(f"image,class\nok.nii.gz,0\n\"{file_name}\",1\n")
    return path


def _msd_named(root: Path, file_name: str) -> Path:
    _msd(root, names=("ok",))
    _nifti(root / "imagesTr" / file_name)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": f"imagesTr/{file_name}", "class": 1})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# (command, checkpoint 0 seg / 1 cls, dataset writer, image file name, what the line must name)
BAD_IDS = {
    "predict-csv-dotdot": ("predict", 1, _csv_named, "...nii.gz", r"cases\.csv line 3: image: case name '\.\.' is"),
    "predict-csv-backslash": ("predict", 1, _csv_named, "a\\b.nii.gz",
                              r"cases\.csv line 3: image: case name 'a\\\\b' holds a path separator"),
    "predict-csv-control": ("predict", 1, _csv_named, "a\x01b.nii.gz", r"cases\.csv line 3: .* control character"),
    "predict-msd-dotdot": ("predict", 1, _msd_named, "...nii.gz", r"dataset\.json: training\[1\]\.image: case name "
                           r"'\.\.'"),
    "explain-csv-dotdot": ("explain", 1, _csv_named, "...nii.gz", r"cases\.csv line 3: image: case name '\.\.'"),
    "predict-seg-csv-dotdot": ("predict", 0, _csv_named, "...nii.gz", r"cases\.csv line 3: image: case name '\.\.'"),
}


@pytest.mark.corpus
@pytest.mark.parametrize("case", list(BAD_IDS))
def test_a_classification_case_id_that_is_no_plain_name_is_refused(models, tmp_path, capsys, case):
    command, model, write, file_name, names = BAD_IDS[case]
    dataset = write(tmp_path / "ds", file_name)
    refused([command, models[model], dataset, "--out", tmp_path / "out", "--device", "cpu"], capsys, names=names,
            inputs=[tmp_path / "ds"], watch=tmp_path)


# ---------------------------------------------------------------- --series / series=


def _series(folder: Path, z, uid: str, prefix: str) -> Path:
    """One 8x8 DICOM slice per position (mm along z) of series ``uid``."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the series UID set below rather than a new one per file
    for i, zi in enumerate(z):
        pixels = sitk.GetImageFromArray((np.arange(64).reshape(8, 8) + 10 * i).astype(np.int16))
        tags = {"0008|0060": "CT", "0020|000d": UID + ".1", "0020|000e": uid, "0020|0013": str(i + 1),
                "0020|0032": f"0\\0\\{zi}", "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"{uid}.{100 + i}",
                "0028|0030": "1\\1"}
        for key, value in tags.items():
            pixels.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
        writer.Execute(pixels)
    return folder


@pytest.fixture
def two_series(tmp_path) -> Path:
    """A DICOM folder holding two series: 4 slices 3 mm apart (UID) and 6 slices 2 mm apart (UID.2)."""
    folder = _series(tmp_path / "exam", (0, 3, 6, 9), UID, "s")
    return _series(folder, (0, 2, 4, 6, 8, 10), UID + ".2", "t")


def test_explain_series_maps_the_chosen_series(models, two_series, tmp_path):
    out = tmp_path / "out"
    assert main(["explain", str(models[0]), str(two_series), "--series", UID + ".2", "--out", str(out),
                 "--device", "cpu"]) == 0
    cam = read_image(out / "exam_cam.nii.gz")
    assert cam.array.shape == (1, 6, 8, 8) and np.isclose(cam.geometry.spacing[2], 2.0)


@pytest.mark.corpus
@pytest.mark.parametrize("series, names", [
    (None, r"exam: holds 2 DICOM series .*choose one with --series UID"),
    ("9.9.9", r"exam: no DICOM series 9\.9\.9 here \(found"),
])
def test_explain_refuses_an_ambiguous_or_unknown_series(models, two_series, tmp_path, capsys, series, names):
    extra = ["--series", series] if series else []
    refused(["explain", models[0], two_series, "--out", tmp_path / "out", "--device", "cpu", *extra], capsys,
            names=names, inputs=[two_series], watch=tmp_path)


def test_the_python_api_reads_the_chosen_series(models, two_series):
    pred = med3d.predict(models[0], two_series, series=UID + ".2")
    assert pred.labels.shape == (6, 8, 8) and np.isclose(pred.geometry.spacing[2], 2.0)
    with pytest.raises(Med3DError, match=r"exam: holds 2 DICOM series .*--series UID"):
        med3d.predict(models[0], two_series)
    with pytest.raises(Med3DError, match=r"exam: no DICOM series 9\.9\.9 here"):
        med3d.predict(models[0], two_series, series="9.9.9")
    with pytest.raises(Med3DError, match="series: chooses a series in a DICOM folder"):
        med3d.predict(models[0], Image(np.zeros((1, 6, 8, 8), np.float32), pred.geometry), series=UID)
