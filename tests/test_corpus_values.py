"""Bad-input corpus, class 8: every user-reachable bad value is a one-line error at the boundary.

Flags (``--spacing``, ``--device``, ``--max-voxels``), config keys (every numeric key has a range,
checked when the config is loaded, so ``validation.overlap: 1.0`` no longer crashes after training),
dataset.json's modality keys, a safetensors file's metadata, and what ``med3d.predict`` is given: each
refused before any work, naming the flag, key or argument.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import med3d
from badinput import refused
from med3d.api import create_model
from med3d.config import RANGES, from_dict, load_config
from med3d.data.image import Geometry, Image
from med3d.errors import Med3DError
from med3d.inference.ensemble import Ensemble
from med3d.inference.predictor import Predictor


MODEL = {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
         "heads": {"t": {"type": "med3d", "num_classes": 2}}}


def _write_config(tmp_path: Path, **sections) -> Path:
    data = {"model": MODEL, "run": {"out_dir": str(tmp_path / "run")}, "data": {"cache_dir": str(tmp_path / "cache")}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- config keys, through the training CLI

@pytest.mark.corpus
@pytest.mark.parametrize("section, values, key, message", [
    ("validation", {"overlap": 1.0}, "validation.overlap", r"must be in \[0, 1\), got 1\.0"),
    ("train", {"lr": -0.01}, "train.lr", r"must be > 0, got -0\.01"),
    ("train", {"lr": float("nan")}, "train.lr", r"must be a finite number, got nan"),
    ("train", {"lr": 0}, "train.lr", r"must be > 0, got 0"),
    ("train", {"batch_size": 0}, "train.batch_size", r"must be a whole number >= 1, got 0"),
    ("train", {"iterations": -5}, "train.iterations", r"must be a whole number >= 1, got -5"),
    ("data", {"patch_size": [0, 32, 32]}, r"data.patch_size\[0\]", r"must be a whole number >= 1, got 0"),
    ("data", {"augment": {"flip": 1.5}}, "data.augment.flip", r"must be in \[0, 1\], got 1\.5"),
    ("data", {"datasets": {"t": {"path": "x", "spacing": [1.0, 0.0, 1.0]}}}, r"data.datasets.t.spacing\[1\]",
     r"must be > 0"),
    ("run", {"seed": -1}, "run.seed", r"must be a whole number >= 0, got -1"),
    ("data", {"val_fraction": 1.0}, "data.val_fraction", r"must be in \[0, 1\), got 1\.0"),
])
def test_a_config_value_out_of_range_is_refused_before_training(tmp_path, capsys, section, values, key, message):
    # validation.overlap 1.0 used to pass, train for hours and crash in the final validation.
    config = _write_config(tmp_path, **{section: values})
    refused(["finetune", config], capsys, names=rf"config key '{key}': {message}", inputs=[config], watch=tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.corpus
def test_an_override_out_of_range_is_refused_like_the_file(tmp_path, capsys):
    config = _write_config(tmp_path)
    refused(["finetune", config, "--set", "train.lr=-1"], capsys, names=r"config key 'train\.lr': must be > 0",
            inputs=[config], watch=tmp_path)


@pytest.mark.slow  # ~1.5 s: builds every encoder's and head's schema
def test_every_range_names_a_key_of_the_schema():
    # A renamed key would leave its range checking nothing: each pattern must reach a default value.
    from med3d.config_schema import schema_rows

    rows = {row[0].replace("<task>", "*"): row[3] for row in schema_rows()}
    for pattern, _ in RANGES:
        if pattern.endswith(".*"):  # the entries of a mapping (model.adapters.<task>)
            assert pattern[:-2] in rows, pattern
        else:  # and `med3d config --schema` shows the range beside the key's meaning
            assert "(valid: " in rows[pattern], pattern


def test_the_shipped_configs_pass_the_ranges():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "teacher_student" in data:
            from med3d.study.teacher_student import load_rounds

            load_rounds(path)  # each round's config, the pseudo-label keys included
        elif isinstance(data, dict) and "study" not in data:
            load_config(path)


# ---------------------------------------------------------------- flags

@pytest.mark.corpus
@pytest.mark.parametrize("spacing", [["nan", "1", "1"], ["1", "0", "1"], ["1", "-2", "1"]])
def test_prepare_refuses_a_spacing_that_is_not_a_positive_number(tmp_path, capsys, spacing):
    refused(["prepare", tmp_path / "ds", "--cache", tmp_path / "cache", "--spacing", *spacing], capsys,
            names=r"argument --spacing: must be (a finite number|> 0)", watch=tmp_path)


@pytest.mark.corpus
@pytest.mark.parametrize("device", ["tpu", "cuda:99", "cpu:x"])
def test_predict_refuses_an_unknown_or_absent_device_before_reading_anything(tmp_path, capsys, device):
    ckpt, scan = tmp_path / "model.pt", tmp_path / "scan.nii.gz"
    ckpt.write_bytes(b"not read")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan)
    refused(["predict", ckpt, scan, "--out", tmp_path / "out", "--device", device], capsys,
            names=rf"--device {device}: (unknown|not available here)", inputs=[ckpt, scan], watch=tmp_path)


@pytest.mark.corpus
@pytest.mark.parametrize("flag, value, message", [
    ("--overlap", "1.0", r"overlap \(--overlap\): must be in \[0, 1\), got 1\.0"),
    ("--overlap", "nan", r"overlap \(--overlap\): must be a finite number"),
    ("--sw-batch", "0", r"sw_batch_size \(--sw-batch\): must be a whole number >= 1, got 0"),
])
def test_predict_refuses_window_flags_out_of_range_before_reading_anything(tmp_path, capsys, flag, value, message):
    ckpt, scan = tmp_path / "model.pt", tmp_path / "scan.nii.gz"
    ckpt.write_bytes(b"not read")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan)
    refused(["predict", ckpt, scan, "--out", tmp_path / "out", flag, value], capsys, names=message,
            inputs=[ckpt, scan], watch=tmp_path)


@pytest.mark.corpus
@pytest.mark.slow  # ~3 s: the first import of the CAM machinery
def test_explain_refuses_a_negative_voxel_budget(tmp_path, capsys):
    ckpt, scan = tmp_path / "model.pt", tmp_path / "scan.nii.gz"
    ckpt.write_bytes(b"not read")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scan)
    refused(["explain", ckpt, scan, "--out", tmp_path / "out", "--max-voxels", "-5"], capsys,
            names=r"--max-voxels: must be a whole number >= 1, got -5", inputs=[ckpt, scan], watch=tmp_path,
            allowed=[tmp_path / "out"])


# ---------------------------------------------------------------- dataset.json

@pytest.mark.corpus
def test_check_data_refuses_modality_keys_that_are_not_channel_numbers(tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.float32), np.eye(4)), root / "imagesTr" / "c0.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.uint8), np.eye(4)), root / "labelsTr" / "c0.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "x", "modality": {"T1": "MRI"}, "labels": {"0": "background", "1": "organ"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}], "test": []}))
    refused(["check-data", root], capsys, names=r"dataset\.json: 'modality' key 'T1' is not a channel number",
            inputs=[root], watch=tmp_path)


# ---------------------------------------------------------------- safetensors metadata

def _med3d_export(path: Path, **metadata) -> Path:
    meta = {"format": "med3d", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    header = json.dumps({"__metadata__": meta, "conv1.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    return path


@pytest.mark.corpus
@pytest.mark.parametrize("name, metadata, message", [
    ("encoder_text", {"encoder": "resnet18"}, r"metadata 'encoder' must be a mapping of encoder arguments, got str"),
    ("encoder_arch", {"encoder": {"arch": "resnet9000"}}, r"metadata 'encoder' is not a valid encoder .*arch"),
    ("encoder_kernel", {"encoder": {"arch": "resnet10", "kernel": [1, 3]}}, r"metadata 'encoder' is not a valid"),
    ("encoder_width", {"encoder": {"arch": "resnet10", "in_channels": -3}},
     r"metadata 'encoder' is not a valid encoder \(config key 'model\.encoder\.in_channels': must be a whole number"),
    ("spacing_nan", {"spacing_zyx": "[NaN, 1, 1]"}, r"metadata 'spacing_zyx'\[0\]: must be a finite number"),
    ("spacing_text", {"spacing_zyx": "thin"}, r"metadata 'spacing_zyx': expected a list"),
    ("sha_number", {"sha256": 12}, r"metadata 'sha256' must be text, got int"),
])
def test_crafted_metadata_of_a_med3d_export_is_refused_in_one_line(tmp_path, capsys, name, metadata, message):
    path = _med3d_export(tmp_path / f"{name}.safetensors", **metadata)
    refused(["export", path, "--out", tmp_path / "out.safetensors"], capsys,
            names=rf"{name}\.safetensors: {message}", inputs=[path], watch=tmp_path)


# ---------------------------------------------------------------- med3d.predict and the predictor

@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """A predictor whose model is real; the checks come before its plan is read."""
    model = create_model(from_dict({"model": MODEL}))
    return Predictor(model.eval(), {"plans": {"t": {}}}, torch.device("cpu"))


def _image(array: np.ndarray) -> Image:
    return Image(array, Geometry(shape=array.shape[-3:], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                                 direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)))


@pytest.mark.corpus
@pytest.mark.parametrize("array, message", [
    (np.zeros((8, 8, 8), np.float32), r"shape \[8, 8, 8\]; expected \(C, Z, Y, X\)"),
    (np.zeros((1, 1, 8, 8, 8), np.float32), r"shape \[1, 1, 8, 8, 8\]"),
    (np.zeros((1, 0, 8, 8), np.float32), r"every axis non-empty"),
    (np.zeros((1, 8, 8, 8), np.complex64), r"dtype complex64; expected integers or floats"),
    (np.full((1, 8, 8, 8), "a"), r"dtype <U1"),
])
def test_predict_refuses_an_image_array_of_the_wrong_rank_or_dtype(predictor, array, message):
    with pytest.raises(Med3DError, match=message):
        med3d.predict(predictor, _image(array))


@pytest.mark.corpus
@pytest.mark.parametrize("options, message", [
    ({"overlap": 1.0}, r"overlap \(--overlap\): must be in \[0, 1\), got 1\.0"),
    ({"overlap": -0.1}, r"overlap \(--overlap\): must be in \[0, 1\)"),
    ({"overlap": float("nan")}, r"overlap \(--overlap\): must be a finite number"),
    ({"sw_batch_size": 0}, r"sw_batch_size \(--sw-batch\): must be a whole number >= 1, got 0"),
    ({"sw_batch_size": 2.5}, r"sw_batch_size \(--sw-batch\): expected a whole number"),
])
def test_predict_refuses_window_settings_out_of_range(predictor, options, message):
    image = _image(np.zeros((1, 8, 8, 8), np.float32))
    with pytest.raises(Med3DError, match=message):
        med3d.predict(predictor, image, **options)
    with pytest.raises(Med3DError, match=message):  # an ensemble checks the same values
        Ensemble([predictor, predictor], ["a.pt", "b.pt"])(image, **options)


@pytest.mark.corpus
def test_predict_refuses_a_bare_numpy_array(predictor):
    with pytest.raises(Med3DError, match=r"expected a med3d Image"):
        med3d.predict(predictor, np.zeros((1, 8, 8, 8), np.float32))
