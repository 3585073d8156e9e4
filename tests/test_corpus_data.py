"""Bad-input corpus, class 4 (data is what it says it is) and class 9's worker processes.

Label values that do not fit the cache's type or the declared labels, labels not numbered 0..K-1,
cases removed from dataset.json, and images with no usable intensities: each is named with its
file and value by ``check-data``, and ``prepare`` and training cannot get past it (also with
``data.check: false``), or it is remapped through a declared label map and trained on correctly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from badinput import checked, refused
from med3d.cli import main
from med3d.data.cache import cache_folder, check_prepared, load_cache, plan_dataset, prepare_dataset
from med3d.data.datalist import read_dataset
from med3d.errors import Med3DError

SHAPE = (12, 14, 10)  # x, y, z on disk
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def make_dataset(root: Path, n: int = 2, labels=None, label_values=(0, 1), label_dtype=np.uint8,
                 image=None) -> Path:
    """A tiny Decathlon dataset: one MR channel; case 0's label holds ``label_values``, the others 0/1."""
    labels = labels or {"0": "background", "1": "organ"}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        img = rng.normal(100, 20, SHAPE).astype(np.float32) if image is None or i else image
        lab = np.zeros(SHAPE, label_dtype)
        values = label_values if i == 0 else (0, 1)
        for k, v in enumerate(v for v in values if v != 0):
            lab[2 + 3 * k:4 + 3 * k, 3:9, 2:7] = v
        nib.save(nib.Nifti1Image(img, AFFINE), root / "imagesTr" / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, AFFINE), root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"name": "Gen", "modality": {"0": "MRI"}, "labels": labels, "numTraining": n, "training": training,
            "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def train_config(tmp: Path, root: Path, num_classes: int = 2, **data) -> Path:
    """A pretrain config over ``root`` (the refusals below come before any step)."""
    cfg = {"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                     "heads": {"gen": {"type": "med3d", "num_classes": num_classes}}},
           "data": {"datasets": {"gen": {"path": str(root), **data.pop("entry", {})}}, "cache_dir": str(tmp / "cache"),
                    "patch_size": [8, 8, 8], "workers": 0, "val_fraction": 0.0, **data},
           "run": {"out_dir": str(tmp / "run")},
           "train": {"iterations": 1, "batch_size": 1},
           "validation": {"every": 0, "allow_none": True}}
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path



# ---------------------------------------------------------------- label values and numbering

@pytest.mark.corpus
def test_check_data_names_a_label_value_too_wide_for_int16(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", label_values=(0, 1, 40000), label_dtype=np.uint16)
    checked(root, capsys, r"labelsTr/case_0\.nii\.gz.*40000")


@pytest.mark.corpus
def test_prepare_refuses_a_label_value_too_wide_for_int16(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", label_values=(0, 1, 40000), label_dtype=np.uint16)
    refused(["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"], capsys,
            names=r"case_0\.nii\.gz.*40000", inputs=[root], watch=tmp_path, allowed=[tmp_path / "cache"])


@pytest.mark.corpus
def test_training_with_check_off_cannot_reach_step_1_with_40000(tmp_path, capsys):
    """int16 would wrap 40000 to -25536: the case is refused by prepare itself, naming file and value."""
    root = make_dataset(tmp_path / "ds", label_values=(0, 1, 40000), label_dtype=np.uint16)
    refused(["pretrain", train_config(tmp_path, root, check=False), "--quiet"], capsys,
            names=r"case_0\.nii\.gz: label value\(s\) \[40000\] outside the declared labels 0\.\.1",
            inputs=[root], watch=tmp_path, allowed=[tmp_path / "cache", tmp_path / "run"])
    assert not list((tmp_path / "run").glob("checkpoints/*.pt")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_label_map_of_40000_is_stored_as_that_label(tmp_path):
    """Read as stored, then mapped: 40000 -> 1 survives (an int16 read first would have lost it)."""
    root = make_dataset(tmp_path / "ds", labels={"0": "background", "40000": "tumour"},
                        label_values=(0, 40000), label_dtype=np.uint16)
    res = prepare_dataset(root, tmp_path / "cache", workers=0, progress=False, label_map={"tumour": 40000})
    assert not res.failed
    _, cases = load_cache(res.folder)
    seg = np.load(next(c for c in cases if c.case_id == "case_0").seg)
    assert set(np.unique(seg)) == {0, 1} and (seg == 1).sum() > 0


@pytest.mark.corpus
@pytest.mark.parametrize("declared", [[0, 1, 5], [0, 200], [-1, 0, 1]], ids=["0-1-5", "0-200", "minus1-0-1"])
def test_check_data_names_labels_not_numbered_0_to_k(tmp_path, capsys, declared):
    labels = {str(v): f"s{i}" for i, v in enumerate(declared)}
    root = make_dataset(tmp_path / "ds", labels=labels, label_values=tuple(declared), label_dtype=np.int16)
    checked(root, capsys, r"dataset\.json: labels \[" + ", ".join(map(str, sorted(declared))) + r"\] are not numbered")


@pytest.mark.corpus
@pytest.mark.parametrize("declared", [[0, 1, 5], [0, 200], [-1, 0, 1]], ids=["0-1-5", "0-200", "minus1-0-1"])
def test_training_with_check_off_refuses_labels_not_numbered_0_to_k(tmp_path, capsys, declared):
    """With data.check off, prepare still refuses before reading a case (never a crash in the loss at step 1)."""
    labels = {str(v): f"s{i}" for i, v in enumerate(declared)}
    root = make_dataset(tmp_path / "ds", labels=labels, label_values=tuple(declared), label_dtype=np.int16)
    refused(["pretrain", train_config(tmp_path, root, num_classes=len(declared), check=False), "--quiet"], capsys,
            names=r"dataset\.json: labels .* not numbered 0\.\.N.*label_map", inputs=[root], watch=tmp_path,
            allowed=[tmp_path / "run"])
    assert not (tmp_path / "cache").exists()


@pytest.mark.corpus
def test_check_data_names_an_undeclared_negative_label_value(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", label_values=(0, 1, -1), label_dtype=np.int16)
    checked(root, capsys, r"labelsTr/case_0\.nii\.gz: label value\(s\) \[-1\] not declared")


@pytest.mark.corpus
def test_training_with_check_off_refuses_an_undeclared_negative_label(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", label_values=(0, 1, -1), label_dtype=np.int16)
    refused(["pretrain", train_config(tmp_path, root, check=False), "--quiet"], capsys,
            names=r"case_0\.nii\.gz: label value\(s\) \[-1\] outside", inputs=[root], watch=tmp_path,
            allowed=[tmp_path / "cache", tmp_path / "run"])


def test_labels_0_200_are_trained_on_through_a_label_map(tmp_path):
    """The remedy the refusals name: a label map renumbers {0, 200} to {0, 1}."""
    root = make_dataset(tmp_path / "ds", labels={"0": "background", "200": "organ"}, label_values=(0, 200))
    res = prepare_dataset(root, tmp_path / "cache", workers=0, progress=False, label_map={"organ": 200})
    assert not res.failed and res.plan["labels"] == {"0": "background", "1": "organ"}
    _, cases = load_cache(res.folder)
    assert {int(v) for c in cases for v in np.unique(np.load(c.seg))} == {0, 1}


# ---------------------------------------------------------------- declared cases only

def test_cases_removed_from_dataset_json_are_not_trained_on(tmp_path):
    root = make_dataset(tmp_path / "ds", n=3)
    prepare_dataset(root, tmp_path / "cache", workers=0, progress=False)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]  # case_2 removed from the dataset; its cache files stay
    (root / "dataset.json").write_text(json.dumps(meta))
    folder = cache_folder(tmp_path / "cache", root)
    with pytest.raises(Med3DError, match="changed since"):  # training ranks are told to prepare again
        check_prepared(root, tmp_path / "cache")
    res = prepare_dataset(root, tmp_path / "cache", workers=0, progress=False)
    plan, _ = load_cache(folder, ["case_0"])
    left = json.loads((folder / "cases" / "case_2.json").read_text())
    assert left["plan_hash"] == plan["plan_hash"], "the removed case still looks current: the case this test is about"
    declared = ["case_0", "case_1"]
    assert check_prepared(root, tmp_path / "cache") == folder and res.done + res.skipped == 2
    assert sorted(c.case_id for c in load_cache(folder, declared)[1]) == declared  # what training asks for
    assert sorted(c.case_id for c in load_cache(folder)[1]) == declared  # no ids: the last prepare's manifest


# ---------------------------------------------------------------- images without usable intensities

def _image_case(tmp_path: Path, array: np.ndarray) -> Path:
    return make_dataset(tmp_path / "ds", image=array)


@pytest.mark.corpus
@pytest.mark.parametrize("kind,pattern", [
    ("complex", r"imagesTr/case_0\.nii\.gz: complex-valued voxels \(complex64\)"),
    ("zeros", r"imagesTr/case_0\.nii\.gz: all zero, no image data"),
    ("constant", r"imagesTr/case_0\.nii\.gz: constant \(7\.0 everywhere\)"),
], ids=["complex", "zeros", "constant"])
def test_check_data_names_images_without_usable_intensities(tmp_path, capsys, kind, pattern):
    array = {"complex": (np.ones(SHAPE) + 1j * np.ones(SHAPE)).astype(np.complex64),
             "zeros": np.zeros(SHAPE, np.float32), "constant": np.full(SHAPE, 7.0, np.float32)}[kind]
    checked(_image_case(tmp_path, array), capsys, pattern)


def test_a_blank_unlabelled_test_image_is_a_warning(tmp_path, capsys):
    """Nothing trains on a test case: a blank one is named, but does not stop training."""
    root = make_dataset(tmp_path / "ds")
    (root / "imagesTs").mkdir()
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), root / "imagesTs" / "t0.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "test": ["./imagesTs/t0.nii.gz"]}))
    assert main(["check-data", str(root), "--workers", "0", "--quiet"]) == 0
    assert "warning: " + str(root / "imagesTs" / "t0.nii.gz") + ": all zero" in capsys.readouterr().out


@pytest.mark.corpus
def test_prepare_refuses_a_complex_image(tmp_path, capsys):
    root = _image_case(tmp_path, (np.ones(SHAPE) * (1 + 2j)).astype(np.complex64))
    refused(["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"], capsys,
            names=r"fails check-data with 1 error\(s\): .*case_0\.nii\.gz: complex-valued", inputs=[root],
            watch=tmp_path, allowed=[tmp_path / "cache"])


def test_prepare_with_check_off_names_the_file_and_value_per_case(tmp_path):
    root = make_dataset(tmp_path / "ds", n=2, label_values=(0, 3))
    res = prepare_dataset(root, tmp_path / "cache", workers=0, progress=False, check=False)
    assert len(res.failed) == 1
    assert "case_0.nii.gz: label value(s) [3] outside the declared labels 0..1" in res.failed[0]
    with pytest.raises(Med3DError, match=r"1 case\(s\) not prepared"):
        check_prepared(root, tmp_path / "cache")


# ---------------------------------------------------------------- class 9: prepare's workers die with it

def _in_session(sid: int) -> set:
    """The live processes of session ``sid`` (the killed prepare's workers and helpers, re-parented or not)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_prepare_leaves_no_worker_running(tmp_path):
    """A real ``med3d prepare --workers 2`` killed with SIGKILL mid-run: its workers stop within seconds."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    shape, training = (96, 96, 64), []
    for i in range(12):
        lab = np.zeros(shape, np.uint8)
        lab[30:60, 30:60, 20:40] = 1
        nib.save(nib.Nifti1Image(rng.normal(0, 1, shape).astype(np.float32), np.diag([0.7, 0.7, 1.3, 1])),
                 root / "imagesTr" / f"c{i}.nii")
        nib.save(nib.Nifti1Image(lab, np.diag([0.7, 0.7, 1.3, 1])), root / "labelsTr" / f"c{i}.nii")
        training.append({"image": f"./imagesTr/c{i}.nii", "label": f"./labelsTr/c{i}.nii"})
    (root / "dataset.json").write_text(json.dumps({"name": "Big", "modality": {"0": "MRI"}, "training": training,
                                                   "labels": {"0": "background", "1": "organ"}}))
    # The fingerprint first, here: the command below then starts one pool only (each start imports torch twice).
    plan_dataset(read_dataset(root), cache_folder(tmp_path / "c", root))
    proc = subprocess.Popen([sys.executable, "-m", "med3d.cli", "prepare", str(root), "--cache", str(tmp_path / "c"),
                             "--workers", "2", "--quiet", "--spacing", "0.5", "0.5", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        busy = set()
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:  # until the preparing pool's workers are busy
            busy = _in_session(proc.pid) - {proc.pid}
            if len(busy) >= 3 and any(_reading(w, root) for w in busy):
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(busy) >= 3, "prepare finished before its workers could be seen"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)  # the kernel kills the running workers at once (PR_SET_PDEATHSIG)
        assert not busy & _in_session(proc.pid) - _helpers(proc.pid), "a busy worker outlived the killed prepare"
        deadline = time.time() + 15  # one still starting up exits when its start-up finds the parent gone
        while _in_session(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _in_session(proc.pid), f"process(es) {_cmdlines(_in_session(proc.pid))} outlived the prepare"
    finally:
        for pid in _in_session(proc.pid):  # only this test's own session
            os.kill(pid, signal.SIGKILL)


def _reading(pid: int, root: Path) -> bool:
    """Whether process ``pid`` has a file of ``root`` open or mapped (a worker busy with a case)."""
    try:
        return str(root) in Path(f"/proc/{pid}/maps").read_text() or any(
            str(root) in os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _helpers(sid: int) -> set:
    """multiprocessing's resource tracker, which exits once every worker holding its pipe has."""
    return {p for p, cmd in _cmdlines(_in_session(sid)).items() if "resource_tracker" in cmd}


def _cmdlines(pids) -> dict:
    out = {}
    for p in pids:
        try:
            out[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
        except OSError:
            pass
    return out
