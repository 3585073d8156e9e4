"""Bad-input corpus: geometry (class 5), declared size before allocation (class 6), damaged files.

DICOM series are written slice by slice with SimpleITK (8x8 pixels, a few slices), then broken:
a slice removed, moved, truncated or copied, or a second series added. Every one must be refused
in one line naming the folder (or the file), where the reader alone would return a shorter or
distorted volume with exit status 0. NIfTI and MHA headers are broken by hand (NaN, singular or
zero-spacing affines; a declared size far over the memory limit). ``predict`` must refuse all
of this before the model is loaded, which the missing checkpoint proves: it is never opened.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from badinput import checked, refused
from med3d.cli import main
from med3d.data.image import MAX_IMAGE_GB_ENV, read_image
from med3d.errors import Med3DError

UID = "1.2.826.0.1.3680043.2.1125.7"
SHAPE = (10, 12, 8)  # x, y, z on disk


def write_series(folder: Path, z=(0, 2, 4, 6, 8, 10), uid: str = UID, prefix: str = "s") -> Path:
    """One DICOM file per slice at the given positions (mm along z), as a scanner export holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i, zi in enumerate(z):
        pixels = sitk.GetImageFromArray((np.arange(64).reshape(8, 8) * 10 + i).astype(np.int16))
        pixels.SetSpacing((1.0, 1.0))
        tags = {"0008|0060": "CT", "0020|000d": uid + ".1", "0020|000e": uid, "0020|0013": str(i + 1),
                "0020|0032": f"0\\0\\{zi}", "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"{uid}.{100 + i}",
                "0018|0050": "2.0", "0028|0030": "1\\1"}
        for key, value in tags.items():
            pixels.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
        writer.Execute(pixels)
    return folder


def write_nifti(path: Path, data=None, srow=None) -> Path:
    """A small NIfTI; ``srow`` replaces rows of the sform (the affine readers use) after nibabel built it."""
    data = np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32) if data is None else data
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    if srow:
        img.set_qform(None, code=0)
        for key, row in srow.items():
            img.header[key] = row
        img = nib.Nifti1Image(data, None, img.header)  # no affine: the edited header is written as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def write_dataset(root: Path, n: int = 2) -> Path:
    """A tiny Decathlon dataset (one MR channel, labels 0/1)."""
    training = []
    for i in range(n):
        write_nifti(root / "imagesTr" / f"case_{i}.nii.gz")
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:6, 3:9, 2:6] = 1
        write_nifti(root / "labelsTr" / f"case_{i}.nii.gz", lab)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Gen", "modality": {"0": "MRI"},
                                                   "labels": {"0": "background", "1": "organ"},
                                                   "numTraining": n, "training": training, "test": []}))
    return root


def predict_refused(tmp_path: Path, capsys, inputs, names: str, *extra) -> str:
    """``predict`` with a checkpoint that does not exist: the refusal must come before it is opened."""
    out = tmp_path / "out"
    return refused(["predict", tmp_path / "never_opened.pt", *inputs, "--out", out, "--quiet", *extra], capsys,
                   names=names, inputs=inputs, watch=tmp_path)



# ---------------------------------------------------------------- DICOM series (class 5)

def _drop(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _truncate(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(path.read_bytes()[:-40])  # header intact, pixel data short: GDCM silently skips it
    return folder


def _copy_slice(folder: Path, name: str) -> Path:
    shutil.copy(folder / name, folder / "copy.dcm")
    return folder


def _second_series(folder: Path, _: str) -> Path:
    write_series(folder, uid=UID + ".2", prefix="t")
    return folder


DICOM_CASES = {
    "missing-slice": (lambda f: _drop(write_series(f), "s003.dcm"), r"series_dir: 1 slice\(s\) missing between "
                      r"positions 4 and 8 mm"),
    "irregular-spacing": (lambda f: write_series(f, z=(0, 2, 4, 5, 7, 9)), r"series_dir: irregular slice spacing"),
    "truncated-middle-slice": (lambda f: _truncate(write_series(f), "s002.dcm"), r"s002\.dcm: .*cannot be read"),
    "truncated-last-slice": (lambda f: _truncate(write_series(f), "s005.dcm"), r"s005\.dcm: .*cannot be read"),
    "duplicate-slice": (lambda f: _copy_slice(write_series(f), "s002.dcm"), r"series_dir: two slices at position"),
    "two-series": (lambda f: _second_series(write_series(f), ""), r"series_dir: holds 2 DICOM series.*--series UID"),
}


@pytest.mark.corpus
@pytest.mark.parametrize("case", list(DICOM_CASES))
def test_predict_refuses_a_broken_dicom_series_before_loading_the_model(tmp_path, capsys, case):
    make, names = DICOM_CASES[case]
    folder = make(tmp_path / "series_dir")
    predict_refused(tmp_path, capsys, [folder], names)


@pytest.mark.corpus
def test_predict_refuses_an_unknown_series_uid(tmp_path, capsys):
    folder = _second_series(write_series(tmp_path / "series_dir"), "")
    predict_refused(tmp_path, capsys, [folder], r"series_dir: no DICOM series 9\.9\.9 here \(found", "--series",
                    "9.9.9")


@pytest.mark.corpus
def test_check_data_names_a_dicom_case_with_a_missing_slice(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds", n=1)
    _drop(write_series(root / "imagesTs" / "scan_7"), "s001.dcm")
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["imagesTs/scan_7"]
    (root / "dataset.json").write_text(json.dumps(meta))
    checked(root, capsys, r"imagesTs/scan_7: 1 slice\(s\) missing")


def test_a_whole_series_is_read_and_series_chooses_one_of_several(tmp_path):
    folder = write_series(tmp_path / "a", z=(0, 2.5, 5, 7.5))
    image = read_image(folder)
    assert image.array.shape == (1, 4, 8, 8) and np.isclose(image.geometry.spacing[2], 2.5)
    _second_series(folder, "")
    with pytest.raises(Med3DError, match="holds 2 DICOM series"):
        read_image(folder)
    first, second = read_image(folder, series=UID), read_image(folder, series=UID + ".2")
    assert first.array.shape == (1, 4, 8, 8) and second.array.shape == (1, 6, 8, 8)


# ---------------------------------------------------------------- header geometry (class 5)

GEOMETRY_CASES = {
    "nan-affine": ({"srow_x": [np.nan, 0, 0, 0]}, r"bad\.nii\.gz: .*NaN or infinite"),
    "singular-affine": ({"srow_x": [1, 1, 0, 0], "srow_y": [0, 0, 0, 0]}, r"bad\.nii\.gz: .*singular affine"),
    "zero-spacing": ({"srow_z": [0, 0, 0, 0]}, r"bad\.nii\.gz: .*spacing \(2, 2, 0\) mm is not positive"),
}


@pytest.mark.corpus
@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
def test_predict_refuses_an_invalid_affine_before_loading_the_model(tmp_path, capsys, case):
    srow, names = GEOMETRY_CASES[case]
    predict_refused(tmp_path, capsys, [write_nifti(tmp_path / "bad.nii.gz", srow=srow)], names)


@pytest.mark.corpus
@pytest.mark.parametrize("spacing", ["1 -1 1", "1 0 1"], ids=["negative", "zero"])
def test_predict_refuses_non_positive_mha_spacing(tmp_path, capsys, spacing):
    path = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8, 8), np.int16)), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}".encode()))
    predict_refused(tmp_path, capsys, [path], r"scan\.mha: .*spacing .* is not positive")


@pytest.mark.corpus
def test_check_data_names_a_label_with_a_singular_affine(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    lab = np.zeros(SHAPE, np.uint8)
    write_nifti(root / "labelsTr" / "case_1.nii.gz", lab, srow={"srow_y": [2, 0, 0, 0]})
    checked(root, capsys, r"labelsTr/case_1\.nii\.gz: .*geometry is invalid")


@pytest.mark.corpus
def test_prepare_refuses_an_image_with_a_nan_affine(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    write_nifti(root / "imagesTr" / "case_0.nii.gz", srow={"srow_z": [0, 0, np.inf, 0]})
    refused(["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"], capsys,
            names=r"imagesTr/case_0\.nii\.gz: .*NaN or infinite", inputs=[root], watch=tmp_path,
            allowed=[tmp_path / "cache"])


# ---------------------------------------------------------------- declared size before allocation (class 6)

@pytest.mark.corpus
def test_predict_refuses_a_scan_over_the_memory_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_GB_ENV, "1e-6")  # about 1 kB: the 10x12x8 float32 scan declares 3.8 kB
    path = write_nifti(tmp_path / "big.nii.gz")
    line = predict_refused(tmp_path, capsys, [path], r"big\.nii\.gz: header declares 10x12x8 voxels of float32 .*"
                           r"over the limit of .*MED3D_MAX_IMAGE_GB")
    assert "GB" in line


@pytest.mark.corpus
def test_predict_refuses_a_dicom_series_over_the_memory_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_GB_ENV, "1e-7")
    folder = write_series(tmp_path / "series_dir")
    predict_refused(tmp_path, capsys, [folder], r"series_dir: header declares 6x8x8 voxels .*MED3D_MAX_IMAGE_GB")


@pytest.mark.corpus
def test_check_data_names_a_case_over_the_memory_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_GB_ENV, "1e-6")
    checked(write_dataset(tmp_path / "ds", n=1), capsys, r"case_0\.nii\.gz: header declares .*MED3D_MAX_IMAGE_GB")


@pytest.mark.corpus
def test_a_limit_that_is_not_a_number_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_GB_ENV, "lots")
    predict_refused(tmp_path, capsys, [write_nifti(tmp_path / "scan.nii.gz")], r"MED3D_MAX_IMAGE_GB='lots'")


@pytest.mark.corpus
def test_a_header_declaring_terabytes_is_refused_without_allocating(tmp_path, capsys, monkeypatch):
    """The default limit (half the memory): a 1 kB file declaring 30000^3 int16 voxels (100 TB as float32)."""
    monkeypatch.delenv(MAX_IMAGE_GB_ENV, raising=False)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.eye(4), code=1)
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024)
    predict_refused(tmp_path, capsys, [path], r"huge\.nii\.gz: header declares 30000x30000x30000 voxels of int16, "
                    r"read as float32 \(1\.01e\+05 GB\), over the limit")


# ---------------------------------------------------------------- damaged files and mismatches (already handled)

def _png_as_nifti(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(200))
    return path


@pytest.mark.corpus
@pytest.mark.parametrize("kind", ["empty", "png-renamed"])
def test_predict_refuses_a_file_that_is_no_nifti(tmp_path, capsys, kind):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"") if kind == "empty" else _png_as_nifti(path)
    predict_refused(tmp_path, capsys, [path], r"scan\.nii\.gz: cannot be read")


@pytest.mark.corpus
def test_check_data_names_a_truncated_image(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    path = root / "imagesTr" / "case_1.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    checked(root, capsys, r"imagesTr/case_1\.nii\.gz: cannot be read .*truncated")


@pytest.mark.corpus
def test_prepare_refuses_a_png_renamed_to_nifti(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    _png_as_nifti(root / "labelsTr" / "case_0.nii.gz")
    refused(["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"], capsys,
            names=r"labelsTr/case_0\.nii\.gz: cannot be read", inputs=[root], watch=tmp_path,
            allowed=[tmp_path / "cache"])


@pytest.mark.corpus
def test_check_data_names_an_image_label_shape_mismatch(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    write_nifti(root / "labelsTr" / "case_0.nii.gz", np.zeros((10, 12, 7), np.uint8))
    checked(root, capsys, r"labelsTr/case_0\.nii\.gz: grid differs .*shape")


@pytest.mark.corpus
def test_prepare_refuses_an_image_label_affine_mismatch(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[:3, 3] = (14.0, -20.0, 5.0)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), shifted), root / "labelsTr" / "case_1.nii.gz")
    refused(["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"], capsys,
            names=r"labelsTr/case_1\.nii\.gz: grid differs .*origin", inputs=[root], watch=tmp_path,
            allowed=[tmp_path / "cache"])


@pytest.mark.corpus
def test_check_data_names_nan_voxels(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds")
    data = np.random.default_rng(1).normal(100, 20, SHAPE).astype(np.float32)
    data[3, 3, 3] = np.nan
    write_nifti(root / "imagesTr" / "case_1.nii.gz", data)
    checked(root, capsys, r"imagesTr/case_1\.nii\.gz: 1 voxel\(s\) are NaN")


@pytest.mark.slow
def test_predict_series_predicts_the_chosen_series_on_its_own_grid(tmp_path):
    """An untrained network with a hand-written plan: what is checked is which slices are read, not labels."""
    from med3d.api import create_model
    from med3d.checkpoint import save_checkpoint
    from med3d.config import from_dict

    plan = {"channel_names": ["CT"], "labels": {"0": "background", "1": "organ"}, "channels": None,
            "target_spacing": [2.0, 1.0, 1.0], "crop_nonzero": False,
            "normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 40.0, "std": 30.0}]}
    cfg = from_dict({"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                               "heads": {"T": {"type": "med3d", "num_classes": 2}}}, "data": {"patch_size": [8, 8, 8]}})
    ckpt = save_checkpoint(tmp_path / "m.pt", create_model(cfg), cfg, meta={"plans": {"T": plan},
                                                                          "patch_size": [8, 8, 8]})
    folder = write_series(tmp_path / "exam", z=(0, 3, 6, 9))
    write_series(folder, uid=UID + ".2", prefix="t")  # 6 slices, 2 mm apart
    assert main(["predict", str(ckpt), str(folder), "--series", UID + ".2", "--out", str(tmp_path / "out"),
                 "--quiet", "--device", "cpu"]) == 0
    pred = read_image(tmp_path / "out" / "exam.nii.gz")
    assert pred.array.shape == (1, 6, 8, 8) and np.isclose(pred.geometry.spacing[2], 2.0)
