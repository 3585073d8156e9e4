"""Data side: readers, check-data, plans, the prepared cache, patch sampling and multi-task mixing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from med3d.cli import main
from med3d.data.cache import cache_folder, load_cache, prepare_dataset
from med3d.data.check import check_dataset
from med3d.data.datalist import read_dataset
from med3d.data.image import read_channels, read_image, write_image
from med3d.data.plan import find_descriptor, load_descriptor
from med3d.data.sampler import MixSchedule, PatchBatches, StepSampler, TaskData, make_loader
from med3d.errors import Med3DError


def _affine(spacing=(1.5, 1.5, 3.0), origin=(10.0, -20.0, 5.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def make_msd(root: Path, n: int = 3, shape=(20, 22, 12), seed: int = 0) -> Path:
    """A small Decathlon-layout dataset: one MR channel, labels 0/1."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        img = rng.normal(100, 20, shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        lab[6:12, 7:13, 3:8] = 1
        nib.save(nib.Nifti1Image(img, _affine()), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, _affine()), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    meta = {"name": "Gen", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ"},
            "numTraining": n, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def msd_to_nnunet(src: Path, dst: Path) -> Path:
    """Rewrite a Decathlon dataset in nnU-Net v2 raw layout (one file per channel, _0000 suffixes)."""
    info = read_dataset(src)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for case in info.cases:
        img = nib.load(case.images[0])
        data = np.asarray(img.dataobj)
        chans = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
        for c, arr in enumerate(chans):
            nib.save(nib.Nifti1Image(arr, img.affine), dst / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz")
        shutil.copy(case.label, dst / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {"channel_names": {str(i): n for i, n in enumerate(info.channel_names)},
            "labels": {name: value for value, name in info.labels.items()},
            "numTraining": len(info.cases), "file_ending": ".nii.gz"}
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


# ---------------------------------------------------------------- readers

def test_nrrd_reader_agrees_with_simpleitk(real_data):
    path = real_data / "radiomics" / "brain1_image.nrrd"
    ours = read_image(path)
    ref = sitk.ReadImage(str(path))
    assert np.array_equal(ours.array[0], sitk.GetArrayFromImage(ref))
    assert np.allclose(ours.geometry.spacing, ref.GetSpacing())
    assert np.allclose(ours.geometry.origin, ref.GetOrigin())
    assert np.allclose(ours.geometry.direction, ref.GetDirection())


@pytest.mark.parametrize("name", ["totalseg_ct/ct.nii.gz", "itk_t1/t1.nii.gz"])
def test_nifti_reader_agrees_with_nibabel_and_simpleitk(real_data, name):
    path = real_data / name
    ours = read_image(path)
    img = nib.load(path)
    assert np.array_equal(ours.array[0], np.transpose(np.asarray(img.dataobj), (2, 1, 0)))
    assert np.allclose(ours.geometry.affine_ras(), img.affine, atol=1e-4)
    ref = sitk.ReadImage(str(path))
    assert np.allclose(ours.geometry.origin, ref.GetOrigin(), atol=1e-4)
    assert np.allclose(ours.geometry.direction, ref.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_then_read_keeps_array_and_geometry(real_data, tmp_path, suffix):
    src = read_image(real_data / "radiomics" / "lung1_image.nrrd")
    out = write_image(tmp_path / f"x{suffix}", src.array, src.geometry)
    back = read_image(out)
    assert np.array_equal(back.array, src.array)
    assert back.geometry.matches(src.geometry, atol_mm=1e-3) == ""


def test_dicom_series_folder_is_read(tmp_path):
    arr = (np.arange(4 * 6 * 5).reshape(4, 6, 5) * 10).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr.shape[0]):
        sl = img[:, :, z]
        sl.SetMetaData("0020|0032", f"0\\0\\{z * 2.5}")  # image position patient
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0020|000e", "1.2.3.4")  # one series
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0028|0030", "0.8\\0.8")
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)
    ours = read_image(folder)
    assert ours.array.shape == (1, 4, 6, 5)
    assert np.array_equal(ours.array[0], arr)
    assert np.allclose(ours.geometry.spacing[2], 2.5, atol=1e-3)


def test_msd_and_nnunet_layouts_give_the_same_cases(demo_root, tmp_path):
    msd = read_dataset(demo_root / "Task01_BrainTumourDemo")
    nnu = read_dataset(msd_to_nnunet(demo_root / "Task01_BrainTumourDemo", tmp_path / "Dataset001_BrainTumourDemo"))
    assert (msd.layout, nnu.layout) == ("msd", "nnunet")
    assert [c.case_id for c in msd.cases] == [c.case_id for c in nnu.cases]
    assert msd.channel_names == nnu.channel_names and len(msd.channel_names) == 4
    assert msd.labels == nnu.labels
    a, b = read_channels(msd.cases[0].images), read_channels(nnu.cases[0].images)
    assert a.array.shape[0] == 4 and np.array_equal(a.array, b.array)
    assert a.geometry.matches(b.geometry) == ""


def test_a_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(path))
    with pytest.raises(Med3DError, match="2D image"):
        read_image(path)


# ---------------------------------------------------------------- check-data

def _corrupt(root: Path) -> dict:
    """Break one case each way; returns problem keyword -> file that must be named."""
    meta = json.loads((root / "dataset.json").read_text())
    img, lab = root / "imagesTr", root / "labelsTr"
    raw = (img / "case_000.nii.gz").read_bytes()
    (img / "case_000.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip
    aff = _affine()
    nib.save(nib.Nifti1Image(np.zeros((20, 22, 11), np.uint8), aff), lab / "case_001.nii.gz")  # shape
    nib.save(nib.Nifti1Image(np.zeros((20, 22, 12), np.uint8), _affine(origin=(14.0, -20, 5))),
             lab / "case_002.nii.gz")  # affine
    bad = np.zeros((20, 22, 12), np.uint8)
    bad[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(bad, aff), lab / "case_003.nii.gz")  # undeclared label
    nan = np.ones((20, 22, 12), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), img / "case_004.nii.gz")  # NaN
    (lab / "case_005.nii.gz").unlink()  # missing file
    meta["training"][6]["image"] = "../../outside.nii.gz"  # escapes the root
    (root / "dataset.json").write_text(json.dumps(meta))
    return {"truncated": img / "case_000.nii.gz", "shape": lab / "case_001.nii.gz",
            "origin": lab / "case_002.nii.gz", "[5]": lab / "case_003.nii.gz", "NaN": img / "case_004.nii.gz",
            "not found": lab / "case_005.nii.gz", "outside the dataset root": root / "dataset.json"}


def test_check_data_names_every_corruption(tmp_path, capsys):
    root = make_msd(tmp_path / "Task99_Gen", n=8)
    expected = _corrupt(root)
    assert main(["check-data", str(root), "--workers", "1", "--quiet"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    for keyword, path in expected.items():
        hits = [line for line in lines if keyword in line and (str(path) in line or str(path.resolve()) in line)]
        assert hits, f"no error line with '{keyword}' naming {path}:\n{out}"
    assert "1 case(s)" not in out and "7 error(s)" in out  # case_007 is clean
    assert "Traceback" not in out


def test_clean_dataset_passes_check(tmp_path, capsys):
    root = make_msd(tmp_path / "Task98_Gen", n=2)
    assert main(["check-data", str(root), "--quiet"]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def test_prepare_refuses_a_dataset_that_fails_check(tmp_path):
    root = make_msd(tmp_path / "Task97_Gen", n=3)
    nib.save(nib.Nifti1Image(np.full((20, 22, 12), 3, np.uint8), _affine()), root / "labelsTr" / "case_001.nii.gz")
    with pytest.raises(Med3DError, match=r"(?s)fails check-data.*case_001"):
        prepare_dataset(root, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "Task97_Gen" / "cases").exists()


# ---------------------------------------------------------------- plans and descriptors

def test_plan_follows_the_field_defaults(demo_root, tmp_path):
    ct = prepare_dataset(demo_root / "Task09_SpleenDemo", tmp_path, progress=False).plan
    mr = prepare_dataset(demo_root / "Task05_ProstateDemo", tmp_path, progress=False).plan
    assert [n["scheme"] for n in ct["normalization"]] == ["ct"]
    lo, hi = ct["normalization"][0]["clip"]
    fp = ct["fingerprint"]["intensity"][0]
    assert lo == pytest.approx(fp["p00_5"]) and hi == pytest.approx(fp["p99_5"]) and -200 < lo < hi < 400
    assert [n["scheme"] for n in mr["normalization"]] == ["zscore", "zscore"]
    # Prostate demo is 1.25 x 1.25 x 3.6 mm: median spacing, axis order (z, y, x).
    assert mr["target_spacing"] == pytest.approx([3.6, 1.25, 1.25], rel=1e-5)
    saved = json.loads((cache_folder(tmp_path, demo_root / "Task05_ProstateDemo") / "plan.json").read_text())
    assert saved["fingerprint"]["labels"]["PZ"]["cases_with"] == 3


def test_ten_msd_descriptors_ship_and_are_found():
    names = ["Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
             "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon"]
    for name in names:
        path = find_descriptor(name)
        assert path is not None, name
        desc = load_descriptor(path)
        assert desc["labels"]["0"] == "background" and desc["modality"]
    assert find_descriptor("Dataset009_Spleen") == find_descriptor("Task09_Spleen")
    assert load_descriptor(find_descriptor("Task05_Prostate"))["modality"] == {"0": "T2", "1": "ADC"}


def test_descriptor_overrides_spacing_and_bad_keys_are_named(demo_root, tmp_path):
    desc = tmp_path / "d.yaml"
    desc.write_text("key: SpleenDemo\ntarget_spacing: [5.0, 2.0, 2.0]\n")
    plan = prepare_dataset(demo_root / "Task09_SpleenDemo", tmp_path / "c", descriptor=desc, progress=False).plan
    assert plan["target_spacing"] == [5.0, 2.0, 2.0]
    desc.write_text("key: SpleenDemo\ntarget_spacng: [5.0, 2.0, 2.0]\n")
    with pytest.raises(Med3DError, match="target_spacng"):
        prepare_dataset(demo_root / "Task09_SpleenDemo", tmp_path / "c", descriptor=desc, progress=False)


# ---------------------------------------------------------------- prepare: resumable, idempotent

def _stamps(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "cases").iterdir()}


def test_prepare_is_idempotent_resumable_and_invalidates_per_dataset(demo_root, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_dataset(demo_root / "Task09_SpleenDemo", cache, progress=False)
    other = prepare_dataset(demo_root / "Task03_LiverDemo", cache, progress=False)
    assert (first.done, first.skipped) == (3, 0)
    folder = first.folder
    before = _stamps(folder)
    again = prepare_dataset(demo_root / "Task09_SpleenDemo", cache, progress=False)
    assert (again.done, again.skipped) == (0, 3) and _stamps(folder) == before

    # A run killed mid-case: arrays written, the completing .json not, plus a stray temp file.
    victim = sorted((folder / "cases").glob("*.json"))[0]
    victim.unlink()
    (folder / "cases" / ".half.tmp.npy").write_bytes(b"\x93NUMPY")
    plan, cases = load_cache(folder)
    assert len(cases) == 2  # the unfinished case is never taken for complete
    resumed = prepare_dataset(demo_root / "Task09_SpleenDemo", cache, progress=False)
    assert (resumed.done, resumed.skipped) == (1, 2)
    data = np.load(folder / "cases" / f"{victim.stem}_data.npy")
    assert data.dtype == np.float32 and data.ndim == 4

    # A changed plan redoes this dataset only.
    liver_before = _stamps(other.folder)
    changed = prepare_dataset(demo_root / "Task09_SpleenDemo", cache, spacing=[4.0, 2.0, 2.0], progress=False)
    assert (changed.done, changed.skipped) == (3, 0)
    assert _stamps(other.folder) == liver_before
    assert len(load_cache(folder)[1]) == 3


def test_cached_case_keeps_geometry_for_the_way_back(demo_root, tmp_path):
    r = prepare_dataset(demo_root / "Task05_ProstateDemo", tmp_path, progress=False)
    _, cases = load_cache(r.folder)
    props = cases[0].props
    info = read_dataset(demo_root / "Task05_ProstateDemo")
    src = read_image(info.cases[0].images[0])
    assert props["geometry"]["shape"] == list(src.geometry.shape)
    assert np.allclose(props["geometry"]["origin"], src.geometry.origin)
    seg = np.load(cases[0].seg)
    assert seg.dtype == np.int8 and set(np.unique(seg)) <= {0, 1, 2}


def test_real_nrrd_dataset_in_nnunet_layout_checks_and_prepares(real_data, tmp_path):
    root = tmp_path / "Dataset500_Radiomics"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    values = set()
    for name in ("brain1", "brain2"):
        shutil.copy(real_data / "radiomics" / f"{name}_image.nrrd", root / "imagesTr" / f"{name}_0000.nrrd")
        shutil.copy(real_data / "radiomics" / f"{name}_label.nrrd", root / "labelsTr" / f"{name}.nrrd")
        values |= set(np.unique(read_image(root / "labelsTr" / f"{name}.nrrd").array).tolist())
    labels = {"background": 0, **{f"l{v}": int(v) for v in sorted(values) if v}}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": labels,
                                                   "numTraining": 2, "file_ending": ".nrrd"}))
    info = read_dataset(root)
    assert [p for p in check_dataset(info) if p.severity == "error"] == []
    r = prepare_dataset(root, tmp_path / "cache", progress=False)
    assert r.done == 2 and r.plan["normalization"][0]["scheme"] == "zscore"
    _, cases = load_cache(r.folder)
    data = np.load(cases[0].data)
    assert np.isfinite(data).all() and abs(float(data[data != 0].mean())) < 0.5


# ---------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def tiny_fg_cache(tmp_path_factory):
    """One case of 64^3 voxels with a 3^3 foreground cube: random patches almost never hit it."""
    root = tmp_path_factory.mktemp("fg") / "Task90_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    img = rng.normal(10, 1, (64, 64, 64)).astype(np.float32)
    lab = np.zeros((64, 64, 64), np.uint8)
    lab[40:43, 10:13, 50:53] = 1
    nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / "a.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "dot"},
                                                   "training": [{"image": "imagesTr/a.nii.gz",
                                                                 "label": "labelsTr/a.nii.gz"}]}))
    r = prepare_dataset(root, root.parent / "cache", progress=False)
    return load_cache(r.folder)


@pytest.mark.parametrize("share", [0.0, 0.33, 0.7])
def test_foreground_share_matches_config(tiny_fg_cache, share):
    plan, cases = tiny_fg_cache
    task = TaskData("t", cases, plan)
    ds = PatchBatches([task], MixSchedule(["t"], [1]), (16, 16, 16), 4, share, None, seed=1)
    hits = [bool((b["label"] > 0).flatten(1).any(1)[i]) for b in (ds[(s, 0)] for s in range(150)) for i in range(4)]
    assert abs(np.mean(hits) - share) < 0.06


def test_patch_is_padded_where_the_volume_is_smaller(tiny_fg_cache):
    plan, cases = tiny_fg_cache
    ds = PatchBatches([TaskData("t", cases, plan)], MixSchedule(["t"], [1]), (80, 20, 20), 2, 1.0, None)
    b = ds[(0, 0)]
    assert b["image"].shape == (2, 1, 80, 20, 20)
    empty_slices = (b["image"] == 0).flatten(3).all(3).sum(2)  # per sample: z-slices that are padding
    assert (empty_slices == 16).all()
    assert (b["label"] > 0).any()


def _demo_tasks(demo_root, tmp_path, names=("Task03_LiverDemo", "Task05_ProstateDemo")):
    tasks = []
    for name in names:
        r = prepare_dataset(demo_root / name, tmp_path, progress=False)
        plan, cases = load_cache(r.folder)
        tasks.append(TaskData(name, cases, plan, [0]))
    return tasks


def test_same_seed_same_batches_with_augmentation_and_workers(demo_root, tmp_path):
    from med3d.config import AugmentConfig

    tasks = _demo_tasks(demo_root, tmp_path)
    aug = AugmentConfig(flip=0.5, rot90=0.5, affine=0.5, elastic=0.3, gamma=0.5, noise=0.5, blur=0.5)

    def batches(seed, workers):
        ds = PatchBatches(tasks, MixSchedule([t.name for t in tasks], [3, 3]), (16, 32, 32), 2, 0.33, aug, seed)
        return [b for b in make_loader(ds, 0, 4, workers=workers, persistent_workers=False)]

    a, b, c = batches(3, 0), batches(3, 2), batches(4, 0)
    for x, y in zip(a, b):
        assert x["task"] == y["task"]
        assert torch.equal(x["label"], y["label"])
        # Elastic deformation smooths its field with a thread-count-dependent summation order (1e-5 level).
        assert torch.allclose(x["image"], y["image"], atol=1e-4)
    assert not all(torch.equal(x["image"], z["image"]) for x, z in zip(a, c))
    assert [x["task"] for x in a] == ["Task03_LiverDemo", "Task05_ProstateDemo"] * 2  # round-robin
    assert a[0]["image"].shape == (2, 1, 16, 32, 32)


def test_mixing_policies():
    names, sizes = ["a", "b"], [90, 10]
    prop = MixSchedule(names, sizes, "proportional")
    temp = MixSchedule(names, sizes, "temperature", temperature=2.0)
    assert prop.probs == pytest.approx([0.9, 0.1])
    assert temp.probs == pytest.approx([0.75, 0.25])  # sqrt(90) : sqrt(10)
    picks = [prop.task_index(s) for s in range(2000)]
    assert abs(np.mean(picks) - 0.1) < 0.03
    with pytest.raises(Med3DError, match="mixing"):
        MixSchedule(names, sizes, "random")


def test_ranks_see_different_samples():
    r0 = list(StepSampler(0, 3, rank=0, world=2, accumulate=2))
    r1 = list(StepSampler(0, 3, rank=1, world=2, accumulate=2))
    assert not set(r0) & set(r1)
    assert {s for s, _ in r0} == {s for s, _ in r1} == {0, 1, 2}  # same steps: same task on every rank
    assert list(StepSampler(2, 3, 0, 1, 1)) == [(2, 0)]  # resuming at step 2 starts there
