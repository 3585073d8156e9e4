"""Bring your own scans: new-dataset, label maps, new-config, config paths and schema, CT window, drift
check, evaluation on the physical grid, layout notes in the load report, and the README walkthrough."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from med3d.cli import main
from med3d.config import load_config
from med3d.data.datalist import read_dataset
from med3d.data.image import Geometry, Image, read_image, write_image
from med3d.data.labelmap import apply_table, parse_label_args, resolve_label_map
from med3d.data.plan import make_plan
from med3d.data.preprocess import normalize
from med3d.errors import Med3DError
from med3d.evaluate import evaluate_images

GRID = Geometry((20, 24, 28), (1.5, 1.5, 2.0), (10.0, -5.0, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tiny_case(folder: Path, labels: Path, name: str, seed: int, label_suffix: str = ".nii.gz") -> None:
    """A small CT-like scan (HU) and a label map with values 0, 3 (a box) and 7 (another box)."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-800, 50, GRID.shape).astype(np.int16)
    seg = np.zeros(GRID.shape, np.uint8)
    ct[4:12, 5:15, 6:18] = 60 + rng.normal(0, 10, (8, 10, 12))
    seg[4:12, 5:15, 6:18] = 3
    seg[14:18, 4:8, 20:25] = 7
    write_image(folder / f"{name}.nii.gz", ct, GRID)
    write_image(labels / f"{name}{label_suffix}", seg, GRID)


@pytest.fixture
def tiny_files(tmp_path) -> Path:
    """scans/ and labels/ with two pairs (one label as NRRD) and one unlabelled scan."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "labels").mkdir()
    _tiny_case(tmp_path / "scans", tmp_path / "labels", "a01", 0)
    _tiny_case(tmp_path / "scans", tmp_path / "labels", "a02", 1, label_suffix=".nrrd")
    write_image(tmp_path / "scans" / "a03.nii.gz", np.zeros(GRID.shape, np.int16), GRID)
    return tmp_path


# ---------------------------------------------------------------- label maps and new-dataset

def test_label_arguments_parse_and_bad_ones_are_named():
    assert parse_label_args(["liver=5", "kidney=2,3"]) == {"liver": [5], "kidney": [2, 3]}
    labels, table = resolve_label_map({"liver": 5, "kidney": [2, 3]}, "x")
    assert labels == {0: "background", 1: "liver", 2: "kidney"} and table == {5: 1, 2: 2, 3: 2}
    arr = np.array([0, 1, 2, 3, 5, 9])
    assert apply_table(arr, table).tolist() == [0, 0, 2, 2, 1, 0]
    # The lookup table (non-negative integers) and the per-value pass (others) agree.
    assert apply_table(np.array([0, 2, 5, 9], np.uint8), table).tolist() == [0, 2, 1, 0]
    assert apply_table(np.array([-1.0, 3.0, 5.0]), table).tolist() == [0.0, 2.0, 1.0]
    for bad in (["liver"], ["liver=x"], ["=5"]):
        with pytest.raises(Med3DError, match="NAME=VALUE"):
            parse_label_args(bad)
    with pytest.raises(Med3DError, match="mapped to both 'liver' and 'spleen'"):
        resolve_label_map({"liver": 5, "spleen": 5}, "x")
    with pytest.raises(Med3DError, match="background"):
        resolve_label_map({"background": 0}, "x")


def test_new_dataset_links_pairs_and_applies_the_label_map(tiny_files, capsys):
    labels_before = {p.name: _sha(p) for p in (tiny_files / "labels").iterdir()}
    out = tiny_files / "ds"
    assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out", str(out),
                 "--labels", "tumour=3", "other=7"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "tumour", "2": "other"}
    assert meta["label_map"] == {"tumour": 3, "other": 7}
    assert meta["numTraining"] == 2 and meta["test"] == ["imagesTs/a03.nii.gz"]
    assert (out / "labelsTr" / "a02.nrrd").is_symlink()  # linked, not copied
    info = read_dataset(out)
    assert [c.case_id for c in info.cases] == ["a01", "a02"]
    seg = info.cases[1].read_label().array[0]
    assert set(np.unique(seg).tolist()) == {0, 1, 2} and (seg == 1).sum() == 8 * 10 * 12
    assert main(["check-data", str(out), "--quiet"]) == 0
    assert {p.name: _sha(p) for p in (tiny_files / "labels").iterdir()} == labels_before


def test_new_dataset_without_labels_declares_the_values_found(tiny_files):
    # The files hold 0, 3 and 7: training needs 0..N, so the values are numbered through a label map.
    out = tiny_files / "ds"
    assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out", str(out)]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "label3", "2": "label7"}
    assert meta["label_map"] == {"label3": 3, "label7": 7}
    assert set(np.unique(read_dataset(out).cases[0].read_label().array).tolist()) == {0, 1, 2}
    # Values already 1..N stay as they are, without a map.
    for path in (tiny_files / "labels").iterdir():
        image = read_image(path)
        write_image(path, apply_table(image.array[0], {3: 1, 7: 2}), image.geometry, overwrite=True)
    assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out",
                 str(tiny_files / "ds2")]) == 0
    meta = json.loads((tiny_files / "ds2" / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "label1", "2": "label2"} and "label_map" not in meta


def test_check_data_refuses_labels_with_gaps(tiny_files, capsys):
    out = _new_ds(tiny_files)
    meta = json.loads((out / "dataset.json").read_text())
    del meta["label_map"]
    meta["labels"] = {"0": "background", "3": "tumour", "7": "other"}
    (out / "dataset.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["check-data", str(out), "--quiet"]) == 1
    assert "labels [0, 3, 7] are not numbered 0..N without gaps" in capsys.readouterr().out


def test_new_dataset_refuses_a_repeated_name_and_a_file_as_out(tiny_files, capsys):
    with pytest.raises(Med3DError, match="'liver' is named twice"):
        parse_label_args(["liver=5", "liver=6"])
    (tiny_files / "afile").write_text("x")
    assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out",
                 str(tiny_files / "afile")]) == 2
    err = capsys.readouterr().err
    assert "afile: exists and is not a folder" in err and "Traceback" not in err


def test_new_dataset_runs_twice_into_the_same_folder(tiny_files):
    out = _new_ds(tiny_files)
    first = (out / "dataset.json").read_text()
    assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out", str(out),
                 "--labels", "tumour=3", "other=7"]) == 0
    assert (out / "dataset.json").read_text() == first
    # The dataset (and the labels) kept inside the scans folder: neither becomes a "scan" on the next run.
    shutil.move(str(tiny_files / "labels"), str(tiny_files / "scans" / "labels"))
    inner = tiny_files / "scans" / "ds"
    for _ in range(2):
        assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "scans" / "labels"), "--out",
                     str(inner), "--labels", "tumour=3"]) == 0
    assert json.loads((inner / "dataset.json").read_text())["test"] == ["imagesTs/a03.nii.gz"]


def test_new_dataset_again_after_the_files_moved_repoints_the_links(tiny_files):
    out = _new_ds(tiny_files)
    shutil.move(str(tiny_files / "scans"), str(tiny_files / "moved"))
    assert main(["new-dataset", str(tiny_files / "moved"), str(tiny_files / "labels"), "--out", str(out),
                 "--labels", "tumour=3", "other=7"]) == 0
    assert (out / "imagesTr" / "a01.nii.gz").resolve() == (tiny_files / "moved" / "a01.nii.gz").resolve()
    assert len(read_dataset(out).cases) == 2 and not list((out / "imagesTr").glob(".*"))


def test_a_label_map_written_value_first_is_named():
    with pytest.raises(Med3DError, match="entry 5: 'liver' is not NAME: VALUE"):
        resolve_label_map({5: "liver"}, "data.datasets.t.label_map")  # Decathlon's labels order, by habit


def test_a_second_channel_is_not_taken_for_an_unlabelled_scan(tiny_files, capsys):
    scans = tiny_files / "scans"
    shutil.copy(scans / "a01.nii.gz", scans / "a01_0001.nii.gz")  # nnU-Net's second channel of a01
    (scans / "a01.nii.gz").rename(scans / "a01_0000.nii.gz")
    assert main(["new-dataset", str(scans), str(tiny_files / "labels"), "--out", str(tiny_files / "ds")]) == 2
    assert "a01_0001.nii.gz: looks like channel 1 of case a01" in capsys.readouterr().err


def test_dicom_folder_names_with_dots_pair_whole(tmp_path):
    from med3d.data.new_dataset import pair_files

    (tmp_path / "scans" / "1.2.840.7").mkdir(parents=True)  # a DICOM series folder named by its UID
    (tmp_path / "scans" / "1.2.840.7" / "000.dcm").write_bytes(b"")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "1.2.840.7.nrrd").write_bytes(b"")
    pairs, _ = pair_files(tmp_path / "scans", tmp_path / "labels")
    assert [c for c, _, _ in pairs] == ["1.2.840.7"]


def test_new_dataset_bad_input_is_one_line(tiny_files, capsys):
    (tiny_files / "labels" / "zz9.nii.gz").write_bytes((tiny_files / "labels" / "a01.nii.gz").read_bytes())
    assert main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out",
                 str(tiny_files / "ds")]) == 2
    err = capsys.readouterr().err
    assert "zz9.nii.gz: no scan named zz9" in err and "Traceback" not in err


def test_new_dataset_pairs_a_dicom_series_folder(tmp_path, capsys):
    import SimpleITK as sitk

    arr = (np.arange(4 * 6 * 5).reshape(4, 6, 5) * 10 - 500).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    series = tmp_path / "scans" / "d01"
    series.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr.shape[0]):
        sl = img[:, :, z]
        for tag, value in (("0020|0032", f"0\\0\\{z * 2.5}"), ("0020|0013", str(z)), ("0020|000e", "1.2.3.4"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.8\\0.8")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(sl)
    (tmp_path / "labels").mkdir()
    seg = np.zeros(arr.shape, np.uint8)
    seg[1:3, 2:4, 1:4] = 4
    write_image(tmp_path / "labels" / "d01.nrrd", seg, read_image(series).geometry)
    out = tmp_path / "ds"
    assert main(["new-dataset", str(tmp_path / "scans"), str(tmp_path / "labels"), "--out", str(out),
                 "--labels", "lesion=4"]) == 0
    assert (out / "imagesTr" / "d01").is_symlink() and (out / "imagesTr" / "d01").is_dir()
    info = read_dataset(out)
    assert info.cases[0].case_id == "d01" and (info.cases[0].read_label().array == 1).sum() == 2 * 2 * 3
    capsys.readouterr()
    assert main(["check-data", str(out), "--quiet"]) == 0, capsys.readouterr().out


def test_check_data_warns_when_a_mapped_value_is_absent(tiny_files, capsys):
    out = tiny_files / "ds"
    main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out", str(out),
          "--labels", "tumour=3", "liver=250"])
    capsys.readouterr()
    assert main(["check-data", str(out), "--quiet"]) == 0  # a warning, not an error
    assert "label 2 is mapped from value(s) [250], none of which occurs" in capsys.readouterr().out


def test_prepare_applies_the_label_map_and_leaves_the_label_files_alone(tiny_files, tmp_path):
    ds = _new_ds(tiny_files)  # dataset.json maps tumour=3, other=7
    before = {p.name: _sha(p) for p in (tiny_files / "labels").iterdir()}
    raw = read_image(tiny_files / "labels" / "a01.nii.gz").array[0]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  datasets:\n    t: {{path: {ds.name}}}\n  cache_dir: {tmp_path / 'cache'}\n"
                   "model:\n  heads:\n    t: {type: med3d, num_classes: 3}\n")
    assert main(["prepare", "--config", str(cfg), "--quiet", "--workers", "0", "--set", "data.datasets.t.spacing=[2.0,1.5,1.5]"]) == 0
    folder = next((tmp_path / "cache").glob("ds-*"))
    seg = np.load(folder / "cases" / "a01_seg.npy")[0]  # native spacing, nothing to crop: voxel for voxel
    assert np.array_equal(seg, apply_table(raw, {3: 1, 7: 2}))
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["labels"] == {"0": "background", "1": "tumour", "2": "other"} and plan["label_map"] == {"3": 1, "7": 2}
    # The config's label_map replaces dataset.json's: only 7 is kept now, and the cache is redone.
    assert main(["prepare", "--config", str(cfg), "--quiet", "--workers", "0", "--set", "data.datasets.t.spacing=[2.0,1.5,1.5]",
                 "--set", "data.datasets.t.label_map={other: 7}"]) == 0
    seg = np.load(folder / "cases" / "a01_seg.npy")[0]
    assert np.array_equal(seg, (raw == 7).astype(seg.dtype))
    again = json.loads((folder / "plan.json").read_text())
    assert again["plan_hash"] != plan["plan_hash"]
    assert list(again["fingerprint"]["labels"]) == ["other"]  # fingerprinted again under the new map
    assert {p.name: _sha(p) for p in (tiny_files / "labels").iterdir()} == before


# ---------------------------------------------------------------- config: new-config, paths, schema

def test_new_config_loads_through_med3d_config_with_absolute_paths(tiny_files, capsys, monkeypatch):
    ds = tiny_files / "ds"
    main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out", str(ds),
          "--labels", "tumour=3"])
    cfg_path = tiny_files / "configs" / "ft.yaml"
    cfg_path.parent.mkdir()
    assert main(["new-config", str(ds), "--out", str(cfg_path), "--head", "unet"]) == 0
    text = cfg_path.read_text()
    assert "path: ../ds" in text and "# " in text  # relative to the config file, and commented
    monkeypatch.chdir(tiny_files / "scans")  # anywhere else: paths follow the file, not the working folder
    capsys.readouterr()
    assert main(["config", str(cfg_path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    entry = resolved["data"]["datasets"]["ds"]
    assert entry["path"] == str(ds.resolve())
    assert resolved["model"]["heads"]["ds"] == {"type": "unet", "num_classes": 2, "channels": 32}
    assert resolved["model"]["encoder"]["layout"] == "strided"  # the unet head's layout
    assert all(p % 32 == 0 for p in resolved["data"]["patch_size"][1:])  # strided: stride 32 in-plane
    assert entry["spacing"] == [2.0, 1.5, 1.5]
    assert main(["new-config", str(ds), "--out", str(cfg_path)]) == 2  # no silent overwrite


def test_new_config_keeps_a_linked_dataset_and_quotes_its_name(tiny_files, monkeypatch):
    ds = _new_ds(tiny_files)
    (tiny_files / "on").symlink_to(ds, target_is_directory=True)  # a name YAML would read as true
    (tiny_files / "configs").mkdir()
    monkeypatch.chdir(tiny_files)
    assert main(["new-config", "on", "--out", "configs/ft.yaml"]) == 0
    text = Path("configs/ft.yaml").read_text()
    assert "path: ../on" in text  # the user's link, not the folder it points to today
    assert "`med3d config configs/ft.yaml`" in text  # a command that runs from where new-config ran
    cfg = load_config("configs/ft.yaml")
    assert list(cfg.data.datasets) == ["on"] and cfg.model.heads["on"].num_classes == 3
    assert cfg.run.out_dir == "runs/on"
    assert main(["new-config", "on"]) == 0 and Path("on_finetune.yaml").is_file()  # named after the link


def test_new_config_fits_the_encoder_to_the_weights(tiny_files, capsys):
    import torch

    from med3d.api import create_encoder
    from med3d.export import export_encoder

    ds = _new_ds(tiny_files)
    enc = create_encoder("resnet10", layout="dilated", widths=[8, 16, 32, 64], shortcut="B")
    export_encoder(enc, "safetensors", tiny_files / "w" / "enc.safetensors")
    cfg_path = tiny_files / "ft.yaml"
    assert main(["new-config", str(ds), "--weights", str(tiny_files / "w" / "enc.safetensors"),
                 "--out", str(cfg_path)]) == 0
    assert "weights: w/enc.safetensors" in cfg_path.read_text()
    cfg = load_config(cfg_path)
    assert cfg.finetune.weights == str(tiny_files / "w" / "enc.safetensors")
    e = cfg.model.encoder
    assert (e.arch, e.layout, e.shortcut, e.widths) == ("resnet10", "dilated", "B", [8, 16, 32, 64])
    assert cfg.model.heads["ds"].num_classes == 3
    # A MedicalNet file records no layout: its format means dilated, even with --head unet.
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, tiny_files / "w" / "mn.pth")
    assert main(["new-config", str(ds), "--weights", str(tiny_files / "w" / "mn.pth"), "--head", "unet",
                 "--out", str(cfg_path), "--overwrite"]) == 0
    assert load_config(cfg_path).model.encoder.layout == "dilated"


def test_training_prepares_with_the_config_label_map_and_window(tiny_files, tmp_path):
    from med3d.engine.task_data import ensure_prepared

    ds = _new_ds(tiny_files)
    cfg = load_config(None, [f"data.datasets.t.path={ds}", f"data.cache_dir={tmp_path / 'c'}", "data.workers=0",
                             "data.datasets.t.label_map={other: 7}", "data.datasets.t.ct_window=[-160,240]",
                             "model.heads.t.num_classes=2"])
    folder = ensure_prepared(cfg, prepare=True, progress=False)["t"]
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["label_map"] == {"7": 1} and plan["normalization"][0]["window"] == [-160.0, 240.0]


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text("finetune: {weights: ../weights/enc.safetensors}\n")
    (tmp_path / "a" / "b" / "cfg.yaml").write_text(
        "_base_: ../../base/common.yaml\n"
        "data:\n  datasets:\n    t: {path: ../../data/t, descriptor: desc.yaml}\n    u: {path: /abs/u}\n"
        "  cache_dir: cache\n")
    monkeypatch.chdir(tmp_path / "a")
    cfg = load_config(tmp_path / "a" / "b" / "cfg.yaml", ["data.datasets.v.path=rel/v"])
    assert cfg.data.datasets["t"].path == str(tmp_path / "data" / "t")
    assert cfg.data.datasets["t"].descriptor == str(tmp_path / "a" / "b" / "desc.yaml")
    assert cfg.finetune.weights == str(tmp_path / "weights" / "enc.safetensors")  # relative to the base file
    assert cfg.data.datasets["u"].path == "/abs/u"
    assert cfg.data.datasets["v"].path == str(tmp_path / "a" / "rel" / "v")  # --set values: the working folder's
    assert cfg.data.cache_dir == "cache"  # outputs stay relative to where med3d runs


def test_config_schema_lists_every_key_with_a_meaning(capsys):
    from med3d.config_schema import schema_rows

    rows = schema_rows()
    keys = [r[0] for r in rows]
    for key in ("train.lr", "data.datasets.<task>.label_map", "data.datasets.<task>.ct_window",
                "model.encoder.layout", "model.heads.<task>.type", "finetune.weights"):
        assert key in keys
    assert [r[0] for r in rows if not r[3]] == []  # a new key needs its comment in config.py
    meaning = {r[0]: r[3] for r in rows}
    for key in ("data.datasets.<task>.path", "data.datasets.<task>.descriptor", "finetune.weights", "data.splits_file"):
        assert "relative to the config file" in meaning[key], key  # where a relative path leads
    assert main(["config", "--schema"]) == 0
    assert "data.datasets.<task>.ct_window" in capsys.readouterr().out


# ---------------------------------------------------------------- intensities: CT window, few-scan warning

def _fp(n_cases: int) -> dict:
    return {"num_cases": n_cases, "spacing": {"median": [2.0, 1.5, 1.5], "p10": [2.0, 1.5, 1.5]},
            "cropped_shape": {"median": [20, 24, 28]},
            "intensity": [{"mean": 50.0, "std": 20.0, "p00_5": 0.0, "p99_5": 100.0}]}


def test_fixed_hu_window_normalises_exactly_as_documented(tiny_files, caplog):
    info = read_dataset(_new_ds(tiny_files))
    plan = make_plan(info, _fp(2), ct_window=[-160, 240])
    assert plan["normalization"][0]["window"] == [-160.0, 240.0] and not plan["warnings"]
    hu = np.array([-1000, -160, 0, 40, 240, 3000], np.float32).reshape(1, 1, 1, 6)
    # (clip(x, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2): the window spans [-1, 1]
    expected = (np.clip(hu, -160, 240) - 40.0) / 200.0
    assert np.array_equal(normalize(hu, plan), expected)
    assert normalize(hu, plan).ravel().tolist() == pytest.approx([-1.0, -1.0, -0.2, 0.0, 1.0, 1.0])
    with pytest.raises(Med3DError, match="ct_window must be"):
        make_plan(info, _fp(2), ct_window=[240, -160])
    few = make_plan(info, _fp(2))  # percentiles from two scans: warned
    assert "come from 2 scan(s) only" in few["warnings"][0]
    assert not make_plan(info, _fp(8))["warnings"]


def test_the_few_scans_warning_is_said_where_the_plan_is_made_not_by_every_rank_that_checks_it(tiny_files, caplog):
    from med3d.data.cache import plan_dataset

    info = read_dataset(_new_ds(tiny_files))
    folder = tiny_files / "cache" / "ds"
    folder.mkdir(parents=True)
    with caplog.at_level("WARNING"):
        plan_dataset(info, folder)
    assert sum("scan(s) only" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = plan_dataset(info, folder, read_only=True)  # what a DDP rank does at start
    assert "scan(s) only" in again["warnings"][0] and not any("scan(s) only" in r.getMessage() for r in caplog.records)


def _new_ds(tiny_files: Path) -> Path:
    out = tiny_files / "ds"
    if not out.exists():
        main(["new-dataset", str(tiny_files / "scans"), str(tiny_files / "labels"), "--out", str(out),
              "--labels", "tumour=3", "other=7"])
    return out


def test_drift_report_flags_a_shift_and_passes_the_training_scans():
    from med3d.data.plan import intensity_percentiles
    from med3d.inference.drift import drift_report, drift_warning

    rng = np.random.default_rng(0)
    scans = [rng.normal(-500 + 30 * i, 100, (1, 16, 16, 16)).astype(np.float32) for i in range(3)]
    per_case = [intensity_percentiles(s)[0] for s in scans]
    ranges = [{k: [min(p[k] for p in per_case), max(p[k] for p in per_case)] for k in per_case[0]}]
    plan = {"channel_names": ["CT"], "fingerprint": {"scan_percentiles": ranges, "num_cases": 3}}
    for s in scans:
        assert not drift_report(Image(s, GRID), plan)["outside"]
    report = drift_report(Image(scans[0] + 200, GRID), plan)
    assert report["outside"] and "median" in drift_warning(report, "x.nii.gz")
    assert not drift_report(Image(scans[0], GRID), {"channel_names": ["CT"]})["checked"]  # old plans: no check


# ---------------------------------------------------------------- evaluate on the physical grid

def _flip_store(image: Image, path: Path, axes_perm=(0, 1, 2), flip_axes=()) -> Path:
    """Write ``image`` with its voxel axes permuted / flipped and the affine changed to match (same physics)."""
    aff = image.geometry.affine_ras()
    data = np.transpose(image.array[0], (2, 1, 0))  # (X, Y, Z)
    for ax in flip_axes:
        data = np.flip(data, ax)
        flip = np.eye(4)
        flip[ax, ax], flip[ax, 3] = -1, data.shape[ax] - 1
        aff = aff @ flip
    data = np.transpose(data, axes_perm)
    perm = np.eye(4)[:, list(axes_perm) + [3]]
    aff = aff @ perm
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), aff), str(path))
    return path


@pytest.mark.slow
def test_evaluate_accepts_a_reference_stored_flipped_or_permuted(real_data, tmp_path):
    seg = read_image(real_data / "totalseg_ct" / "seg.nii.gz")
    box = seg.array[:, 70:112, 20:70, 10:70].copy()  # spleen and part of the liver; smaller: quicker distances
    crop = Image(box, Geometry(box.shape[1:], seg.geometry.spacing,
                               tuple(seg.geometry.affine_lps()[:3] @ [10, 20, 70, 1]), seg.geometry.direction))
    pred = Image(np.roll(crop.array, 2, axis=3), crop.geometry)  # a prediction 2 voxels off
    classes = [1, 5]
    same = evaluate_images(pred, crop, classes)
    assert all(0 < r["dice"] < 1 and np.isfinite(r["hd95_mm"]) for r in same)
    for perm, flips in (((0, 1, 2), (0,)), ((2, 0, 1), ()), ((1, 0, 2), (1, 2))):
        stored = read_image(_flip_store(crop, tmp_path / f"ref{perm}{flips}.nii.gz", perm, flips))
        assert stored.geometry.matches(crop.geometry)  # stored differently...
        rows = evaluate_images(pred, stored, classes)  # ...and scored the same
        for a, b in zip(rows, same):
            for key in ("dice", "hd95_mm", "nsd", "volume_ref_ml"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), (perm, flips, key)
    moved = Geometry(crop.geometry.shape, crop.geometry.spacing,
                     tuple(np.add(crop.geometry.origin, (0, 0, 5.0))), crop.geometry.direction)
    with pytest.raises(Med3DError, match=r"origin differs by 5 mm \(reference minus prediction \(0, 0, 5\) mm"):
        evaluate_images(pred, Image(crop.array, moved), classes)
    coarse = Geometry(crop.geometry.shape, (3.0, 3.0, 3.5), crop.geometry.origin, crop.geometry.direction)
    with pytest.raises(Med3DError, match=r"spacing \(3, 3, 3\) vs \(3, 3, 3.5\) mm \(up to 0.5 mm\)"):
        evaluate_images(pred, Image(crop.array, coarse), classes)


# ---------------------------------------------------------------- load report: layouts

def test_load_report_says_when_the_layout_differs(tmp_path):
    import torch

    from med3d.api import create_encoder
    from med3d.export import export_encoder
    from med3d.transfer.load import load_pretrained

    enc = create_encoder("resnet10", layout="dilated", widths=[8, 16, 32, 64])
    path = export_encoder(enc, "safetensors", tmp_path / "enc.safetensors")
    strided = load_pretrained(create_encoder("resnet10", layout="strided", widths=[8, 16, 32, 64]), path)
    assert any("trained in the dilated layout" in n and "different receptive field" in n for n in strided.notes)
    assert "different receptive field" in str(strided)
    same = load_pretrained(create_encoder("resnet10", layout="dilated", widths=[8, 16, 32, 64]), path)
    assert not any("layout" in n for n in same.notes)
    # MedicalNet files carry no metadata: their format says dilated.
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, tmp_path / "mn.pth")
    mn = load_pretrained(create_encoder("resnet10", layout="strided", widths=[8, 16, 32, 64]), tmp_path / "mn.pth")
    assert any("trained in the dilated layout" in n for n in mn.notes)


# ---------------------------------------------------------------- the README walkthrough on the real CT

@pytest.mark.slow
def test_walkthrough_from_files_to_evaluated_predictions(real_data, tmp_path, monkeypatch, capsys):
    """The README's walkthrough, command by command, on the TotalSegmentator example CT (liver 5, spleen 1)."""
    ct, seg = real_data / "totalseg_ct" / "ct.nii.gz", real_data / "totalseg_ct" / "seg.nii.gz"
    (tmp_path / "scans").mkdir()
    (tmp_path / "labels").mkdir()
    shutil.copy(ct, tmp_path / "scans" / "s0011.nii.gz")
    shutil.copy(seg, tmp_path / "labels" / "s0011.nii.gz")
    label_sha = _sha(tmp_path / "labels" / "s0011.nii.gz")
    monkeypatch.chdir(tmp_path)

    assert main(["new-dataset", "scans", "labels", "--out", "data/organs", "--labels", "liver=5", "spleen=1"]) == 0
    Path("configs").mkdir()
    assert main(["new-config", "data/organs", "--out", "configs/organs.yaml"]) == 0
    assert main(["check-data", "data/organs", "--quiet"]) == 0
    # A small run: 6 mm voxels, a narrow encoder, a few iterations (the README's commands use the config as written).
    small = ["--set", "data.datasets.organs.spacing=[6.0,6.0,6.0]", "--set", "data.patch_size=[32,48,48]",
             "--set", "model.encoder.arch=resnet10", "--set", "model.encoder.widths=[8,16,32,64]",
             "--set", "train.iterations=3", "--set", "train.checkpoint_every=3", "--set", "data.workers=0",
             "--set", "train.batch_size=1"]
    assert main(["prepare", "--config", "configs/organs.yaml", *small, "--quiet", "--workers", "0"]) == 0
    cache = next(Path("cache").glob("organs-*"))
    cached = np.load(cache / "cases" / "s0011_seg.npy")
    assert set(np.unique(cached).tolist()) <= {0, 1, 2} and (cached == 1).sum() > (cached == 2).sum() > 0
    assert main(["finetune", "configs/organs.yaml", *small, "--quiet"]) == 0
    ckpt = Path("runs/organs/checkpoints/last.pt")
    assert ckpt.is_file() and Path("runs/organs/config.yaml").is_file()
    # TODO(val_cases): one labelled case leaves none to validate on; new-config writes validation.allow_none.

    shifted = tmp_path / "shifted.nii.gz"
    img = nib.load(str(ct))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int32) + 200, img.affine), str(shifted))
    capsys.readouterr()
    assert main(["predict", str(ckpt), "scans/s0011.nii.gz", str(shifted), "--out", "preds", "--quiet",
                 "--overlap", "0"]) == 0
    out = capsys.readouterr()
    warned = [line for line in (out.out + out.err).splitlines() if "intensities unlike" in line]
    assert len(warned) == 1 and "shifted.nii.gz" in warned[0] and "median 99 vs training -101" in warned[0]
    assert not json.loads(Path("preds/s0011_drift.json").read_text())["outside"]
    assert json.loads(Path("preds/shifted_drift.json").read_text())["outside"]
    pred = read_image("preds/s0011.nii.gz")
    assert pred.geometry == read_image(ct).geometry and set(np.unique(pred.array).tolist()) <= {0, 1, 2}

    Path("preds/shifted.nii.gz").unlink()
    assert main(["evaluate", "preds", "data/organs", "--quiet", "--no-plot"]) == 0
    summary = list(__import__("csv").DictReader(open("preds/summary.csv")))
    assert [r["label"] for r in summary] == ["liver", "spleen"]  # the mapping applied to the reference
    expected = sorted(["dataset.json"])
    assert sorted(p.name for p in Path("data/organs").iterdir() if p.is_file()) == expected
    assert {p.name for p in Path("preds").iterdir()} >= {"s0011.nii.gz", "s0011_drift.json", "metrics.csv",
                                                         "summary.csv"}
    assert _sha(tmp_path / "labels" / "s0011.nii.gz") == label_sha  # the user's labels untouched
