"""Bad-input corpus: names from data confined to their folder (class 1), outputs never destroying
inputs (class 2), and malformed dataset.json files.

A case id, a file or folder name, becomes an output file name (the cache, ``predict``'s label
maps): one holding ``..``, a separator, NUL or an absolute path is refused when the dataset is
read, so no command writes it. Decathlon entries may not leave the dataset root, also not through
a linked folder. ``predict``, ``evaluate``, ``explain``, ``export`` and ``inflate`` refuse an output
that is, or lies in, their input before any work: their checkpoints here do not exist or are not
checkpoints at all, so a refusal that came after loading one would name the checkpoint instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from badinput import checked, refused
from med3d.cli import main

SHAPE = (10, 12, 8)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def scan(path: Path, label: bool = False) -> Path:
    """A tiny NIfTI scan (or a 0/1 label map)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if label:
        data = np.zeros(SHAPE, np.uint8)
        data[2:6, 3:9, 2:6] = 1
    else:
        data = np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def msd(root: Path, n: int = 2, **meta) -> Path:
    """A tiny Decathlon dataset; ``meta`` replaces dataset.json keys."""
    training = []
    for i in range(n):
        scan(root / "imagesTr" / f"case_{i}.nii.gz")
        scan(root / "labelsTr" / f"case_{i}.nii.gz", label=True)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    data = {"name": "Gen", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ"},
            "numTraining": n, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps({**data, **meta}))
    return root


def nnunet(root: Path, case_ids) -> Path:
    """A tiny nnU-Net v2 dataset listing its cases in the ``dataset`` mapping under the given ids."""
    dataset = {}
    for i, cid in enumerate(case_ids):
        scan(root / "imagesTr" / f"c{i}_0000.nii.gz")
        scan(root / "labelsTr" / f"c{i}.nii.gz", label=True)
        dataset[cid] = {"images": [f"imagesTr/c{i}_0000.nii.gz"], "label": f"labelsTr/c{i}.nii.gz"}
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
            "numTraining": len(dataset), "dataset": dataset}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root



def cli_refuses(tmp_path: Path, capsys, argv, names: str, inputs) -> str:
    """``refused`` with the whole test folder watched: nothing may be written anywhere."""
    return refused(argv, capsys, names=names, inputs=inputs, watch=tmp_path)


# ---------------------------------------------------------------- case ids that would leave the output folder

BAD_IDS = {"dotdot": "../../escaped", "absolute": "/tmp/escaped", "separator": "sub/escaped",
           "nul": "case\x00x", "parent": "..", "backslash": "..\\escaped"}


@pytest.mark.corpus
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "separator", "nul", "parent"])
def test_check_data_refuses_an_nnunet_case_id_that_is_a_path(tmp_path, capsys, kind):
    root = nnunet(tmp_path / "ds", ["fine", BAD_IDS[kind]])
    cli_refuses(tmp_path, capsys, ["check-data", root, "--quiet"], r"dataset\.json: dataset key: case name .*"
                r"(separator|absolute|NUL|relative folder)", [root])


@pytest.mark.corpus
def test_prepare_never_writes_a_case_id_that_leaves_the_cache(tmp_path, capsys):
    root = nnunet(tmp_path / "ds", ["fine", "../../escaped"])
    cli_refuses(tmp_path, capsys, ["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"],
                r"dataset key: case name '\.\./\.\./escaped' holds a path separator", [root])


@pytest.mark.corpus
def test_predict_never_writes_a_case_id_that_leaves_out(tmp_path, capsys):
    root = nnunet(tmp_path / "ds", [BAD_IDS["backslash"]])
    cli_refuses(tmp_path, capsys, ["predict", tmp_path / "never_opened.pt", root, "--out", tmp_path / "out"],
                r"dataset key: case name .* holds a path separator", [root])


@pytest.mark.corpus
def test_evaluate_refuses_a_reference_dataset_with_a_case_id_that_is_a_path(tmp_path, capsys):
    ref = nnunet(tmp_path / "ref", ["/tmp/escaped"])
    pred = tmp_path / "pred"
    scan(pred / "c0.nii.gz", label=True)
    cli_refuses(tmp_path, capsys, ["evaluate", pred, ref, "--out", tmp_path / "metrics", "--no-plot", "--quiet"],
                r"dataset key: case name '/tmp/escaped' is an absolute path", [ref, pred])


@pytest.mark.corpus
def test_check_data_refuses_a_decathlon_file_whose_name_is_a_folder_reference(tmp_path, capsys):
    root = msd(tmp_path / "ds")
    scan(root / "imagesTr" / "..nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "imagesTr/..nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    cli_refuses(tmp_path, capsys, ["check-data", root, "--quiet"], r"training\[0\]\.image: case name '\.' is a "
                r"relative folder reference", [root])


@pytest.mark.corpus
def test_predict_refuses_an_input_file_name_with_a_control_character(tmp_path, capsys):
    path = scan(tmp_path / "scan\n1.nii.gz")
    cli_refuses(tmp_path, capsys, ["predict", tmp_path / "never_opened.pt", path, "--out", tmp_path / "out"],
                r"case name 'scan\\n1' holds a control character", [path])


@pytest.mark.corpus
def test_new_dataset_refuses_a_scan_folder_name_with_a_control_character(tmp_path, capsys):
    images, labels = tmp_path / "scans", tmp_path / "labels"
    scan(images / "a01.nii.gz")
    scan(labels / "a01.nii.gz", label=True)
    (images / "series\x1b1").mkdir()  # a DICOM-derived folder name with an escape character
    cli_refuses(tmp_path, capsys, ["new-dataset", images, labels, "--out", tmp_path / "ds"],
                r"series\\x1b1' holds a control character", [images, labels])


# ---------------------------------------------------------------- Decathlon paths that leave the root

@pytest.mark.corpus
@pytest.mark.parametrize("rel", ["../outside.nii.gz", "ABSOLUTE"], ids=["dotdot", "absolute"])
def test_check_data_names_a_decathlon_path_outside_the_root(tmp_path, capsys, rel):
    outside = scan(tmp_path / "outside.nii.gz")
    root = msd(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = str(outside) if rel == "ABSOLUTE" else rel
    (root / "dataset.json").write_text(json.dumps(meta))
    checked(root, capsys, r"training\[1\]\.image .* points outside the dataset root")


def _linked_folder(tmp_path: Path) -> Path:
    """A dataset whose labelsTr is a link to a folder outside it."""
    root = msd(tmp_path / "ds")
    elsewhere = tmp_path / "elsewhere"
    (root / "labelsTr").rename(elsewhere)
    (root / "labelsTr").symlink_to(elsewhere, target_is_directory=True)
    return root


@pytest.mark.corpus
def test_check_data_names_a_linked_folder_leading_out_of_the_root(tmp_path, capsys):
    checked(_linked_folder(tmp_path), capsys, r"training\[0\]\.label '\./labelsTr/case_0\.nii\.gz' points outside")


@pytest.mark.corpus
def test_prepare_refuses_a_linked_folder_leading_out_of_the_root(tmp_path, capsys):
    root = _linked_folder(tmp_path)
    refused(["prepare", root, "--cache", tmp_path / "cache", "--workers", "0", "--quiet"], capsys,
            names=r"labelsTr/case_0\.nii\.gz' points outside the dataset root", inputs=[root, tmp_path / "elsewhere"],
            watch=tmp_path, allowed=[tmp_path / "cache"])


@pytest.mark.corpus
def test_predict_refuses_a_test_entry_through_a_linked_folder(tmp_path, capsys):
    root = msd(tmp_path / "ds")
    scan(tmp_path / "elsewhere" / "t0.nii.gz")
    (root / "imagesTs").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["imagesTs/t0.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    cli_refuses(tmp_path, capsys, ["predict", tmp_path / "never_opened.pt", root, "--out", tmp_path / "out"],
                r"test\[0\] 'imagesTs/t0\.nii\.gz' points outside the dataset root", [root])


def test_a_linked_file_inside_the_root_is_still_read(tmp_path):
    """new-dataset links each scan file: the entry's own file may lead out of the root."""
    from med3d.data.datalist import read_dataset

    root = msd(tmp_path / "ds")
    target = scan(tmp_path / "user" / "mine.nii.gz")
    (root / "imagesTr" / "case_0.nii.gz").unlink()
    (root / "imagesTr" / "case_0.nii.gz").symlink_to(target)
    info = read_dataset(root)
    assert not info.problems and [c.case_id for c in info.cases] == ["case_0", "case_1"]


# ---------------------------------------------------------------- malformed dataset.json (already handled, and types)

BAD_JSON = {
    "not-json": ("{'modality': ", r"dataset\.json: not valid JSON"),
    "missing-labels": ({"modality": {"0": "CT"}, "training": []}, r"dataset\.json: missing key 'labels'"),
    "training-not-list": ({"training": {"image": "x"}}, r"dataset\.json: 'training' must be a list"),
    "modality-not-numbered": ({"modality": {"CT": "0"}}, r"dataset\.json: 'modality' key 'CT' is not a channel number"),
    "labels-a-list": ({"labels": ["background", "organ"]}, r"dataset\.json: 'labels' must map label values"),
    "nnunet-dataset-a-list": ({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".nii.gz",
                               "dataset": ["a"]}, r"dataset\.json: 'dataset' must map case ids"),
    "nnunet-file-ending-a-path": ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                   "file_ending": "/../../x.nii.gz"}, r"'file_ending' is '/\.\./\.\./x\.nii\.gz'"),
}


def _bad_json(root: Path, kind: str) -> Path:
    content = BAD_JSON[kind][0]
    if isinstance(content, str):
        msd(root)
        (root / "dataset.json").write_text(content)
    elif kind == "missing-labels" or kind.startswith("nnunet"):
        msd(root)
        (root / "dataset.json").write_text(json.dumps(content))
    else:
        msd(root, **content)
    return root


@pytest.mark.corpus
@pytest.mark.parametrize("kind", list(BAD_JSON))
def test_check_data_refuses_a_malformed_dataset_json(tmp_path, capsys, kind):
    root = _bad_json(tmp_path / "ds", kind)
    cli_refuses(tmp_path, capsys, ["check-data", root, "--quiet"], BAD_JSON[kind][1], [root])


@pytest.mark.corpus
def test_prepare_refuses_a_dataset_json_that_is_not_json(tmp_path, capsys):
    root = _bad_json(tmp_path / "ds", "not-json")
    cli_refuses(tmp_path, capsys, ["prepare", root, "--cache", tmp_path / "cache", "--quiet"], r"not valid JSON",
                [root])


@pytest.mark.corpus
def test_check_data_names_an_entry_path_of_the_wrong_type(tmp_path, capsys):
    root = msd(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = 7
    (root / "dataset.json").write_text(json.dumps(meta))
    checked(root, capsys, r"training\[0\]\.image is 7, not a relative file path")


# ---------------------------------------------------------------- outputs never destroy inputs (class 2)

def _scans(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    scan(folder / "a.nii.gz")
    scan(folder / "b.nii.gz")
    return folder


def _predict(tmp_path: Path, inputs, out, *extra):
    return ["predict", tmp_path / "never_opened.pt", *inputs, "--out", out, "--quiet", *extra]


@pytest.mark.corpus
def test_predict_refuses_out_equal_to_the_input_folder(tmp_path, capsys):
    scans = _scans(tmp_path)
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [scans], scans, "--overwrite"),
                r"--out .*scans: is the input folder", [scans])


@pytest.mark.corpus
def test_predict_refuses_out_inside_the_input_folder(tmp_path, capsys):
    scans = _scans(tmp_path)
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [scans], scans / "seg"),
                r"--out .*scans/seg: is inside the input folder", [scans])


@pytest.mark.corpus
def test_predict_overwrite_never_replaces_an_input_file(tmp_path, capsys):
    scans = _scans(tmp_path)
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [scans / "a.nii.gz"], scans, "--overwrite"),
                r"--out: output .*scans/a\.nii\.gz would replace the input", [scans])


@pytest.mark.corpus
def test_predict_never_replaces_a_scan_a_dataset_links_to(tmp_path, capsys):
    """new-dataset links the user's scans: predicting its test cases into the scans' folder would replace them."""
    scans = _scans(tmp_path)
    root = msd(tmp_path / "ds")
    (root / "imagesTs").mkdir()
    (root / "imagesTs" / "a.nii.gz").symlink_to(scans / "a.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["imagesTs/a.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [root], scans, "--overwrite"),
                r"output .*scans/a\.nii\.gz would replace the input", [scans, root])


@pytest.mark.corpus
def test_predict_refuses_out_inside_the_dataset_folder(tmp_path, capsys):
    root = msd(tmp_path / "ds")
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [root], root / "predictions"), r"inside the input folder",
                [root])


@pytest.mark.corpus
def test_predict_refuses_out_that_is_a_file(tmp_path, capsys):
    scans = _scans(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [scans], target), r"--out .*notes\.txt: is an existing file",
                [scans, target])


@pytest.mark.corpus
def test_predict_refuses_out_that_cannot_be_created(tmp_path, capsys):
    scans = _scans(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would have to be")
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [scans], blocker / "seg"), r"--out .*: cannot be written",
                [scans, blocker])


@pytest.mark.corpus
@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_predict_refuses_out_in_a_folder_without_write_permission(tmp_path, capsys):
    scans = _scans(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        cli_refuses(tmp_path, capsys, _predict(tmp_path, [scans], locked / "seg"), r"cannot be written", [scans])
    finally:
        locked.chmod(0o755)


@pytest.mark.corpus
def test_predict_refuses_two_inputs_with_the_same_case_name(tmp_path, capsys):
    a, b = scan(tmp_path / "site1" / "x.nii.gz"), scan(tmp_path / "site2" / "x.nii.gz")
    cli_refuses(tmp_path, capsys, _predict(tmp_path, [a, b], tmp_path / "out", "--overwrite"),
                r"site2/x\.nii\.gz: same case name 'x'", [a, b])


@pytest.mark.corpus
def test_evaluate_refuses_out_equal_to_the_references(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    scan(pred / "a.nii.gz", label=True)
    scan(ref / "a.nii.gz", label=True)
    cli_refuses(tmp_path, capsys, ["evaluate", pred, ref, "--out", ref, "--no-plot", "--quiet"],
                r"--out .*ref: is the input folder", [pred, ref])


@pytest.mark.corpus
def test_evaluate_refuses_out_inside_the_reference_dataset(tmp_path, capsys):
    pred, ref = tmp_path / "pred", msd(tmp_path / "ref")
    scan(pred / "case_0.nii.gz", label=True)
    cli_refuses(tmp_path, capsys, ["evaluate", pred, ref, "--out", ref / "labelsTr", "--no-plot", "--quiet"],
                r"--out .*ref/labelsTr: is inside the input folder", [pred, ref])


@pytest.mark.corpus
def test_evaluate_refuses_out_that_is_a_file(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    scan(pred / "a.nii.gz", label=True)
    scan(ref / "a.nii.gz", label=True)
    (tmp_path / "report").write_text("keep me")
    cli_refuses(tmp_path, capsys, ["evaluate", pred, ref, "--out", tmp_path / "report", "--no-plot", "--quiet"],
                r"--out .*report: is an existing file", [pred, ref, tmp_path / "report"])


@pytest.mark.corpus
def test_explain_refuses_out_inside_the_input_folder(tmp_path, capsys):
    scans = _scans(tmp_path)
    cli_refuses(tmp_path, capsys, ["explain", tmp_path / "never_opened.pt", scans, "--out", scans / "cams"],
                r"--out .*scans/cams: is inside the input folder", [scans])


def _weights(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint: a refusal after loading would name it as unreadable")
    return path


@pytest.mark.corpus
def test_export_overwrite_never_replaces_its_own_checkpoint(tmp_path, capsys):
    ckpt = _weights(tmp_path)
    cli_refuses(tmp_path, capsys, ["export", ckpt, "--format", "pt", "--out", ckpt, "--overwrite"],
                r"--out .*model\.pt: is the input .*model\.pt itself", [ckpt])


@pytest.mark.corpus
def test_export_refuses_out_linked_to_its_own_checkpoint(tmp_path, capsys):
    ckpt = _weights(tmp_path)
    link = tmp_path / "exports" / "encoder.pt"
    link.parent.mkdir()
    link.symlink_to(ckpt)
    cli_refuses(tmp_path, capsys, ["export", ckpt, "--format", "pt", "--out", link, "--overwrite"],
                r"--out .*encoder\.pt: is the input", [ckpt, link])


@pytest.mark.corpus
def test_export_refuses_out_that_is_a_folder(tmp_path, capsys):
    ckpt = _weights(tmp_path)
    (tmp_path / "exports").mkdir()
    cli_refuses(tmp_path, capsys, ["export", ckpt, "--out", tmp_path / "exports"],
                r"--out .*exports: is an existing folder", [ckpt])


@pytest.mark.corpus
def test_inflate_overwrite_never_replaces_its_source(tmp_path, capsys):
    src = _weights(tmp_path)
    cli_refuses(tmp_path, capsys, ["inflate", src, "--arch", "resnet18", "--out", src, "--overwrite"],
                r"--out .*model\.pt: is the input", [src])


@pytest.mark.slow  # the first in-process evaluate imports the metrics (about 3 s)
def test_evaluate_writes_into_pred_by_default_even_inside_the_reference_dataset(tmp_path, capsys):
    ref = msd(tmp_path / "ref")
    pred = ref / "predictions"
    scan(pred / "case_0.nii.gz", label=True)
    assert main(["evaluate", str(pred), str(ref), "--no-plot", "--quiet"]) == 0, capsys.readouterr().err
    assert (pred / "metrics.csv").is_file() and (pred / "summary.csv").is_file()
