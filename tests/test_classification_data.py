"""Classification data: the three readers, lesion-centred crops, check-data and the nodule demo."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from med3d.data.classification import (ClassCase, check_classification_dataset, is_classification_dataset,
                                       load_case_image, read_classification_dataset, roi_center_mm, roi_crop,
                                       world_to_index)
from med3d.data.demo import NODULE_DEMO, write_nodule_demo
from med3d.data.image import Geometry, Image, read_image, write_image
from med3d.errors import Med3DError

# x flipped, anisotropic voxels and an origin far from 0: a swapped axis or a dropped origin shows.
GEO = Geometry(shape=(12, 20, 24), spacing=(0.8, 1.1, 2.5), origin=(-100.5, 40.25, 12.0),
               direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _world(geo: Geometry, zyx) -> tuple:
    """World (x, y, z) of voxel index (z, y, x), computed independently of the module under test."""
    d = np.asarray(geo.direction).reshape(3, 3)
    return tuple(np.asarray(geo.origin) + d @ (np.asarray(zyx[::-1], float) * geo.spacing))


def _image(value: float = 0.0, blob_zyx=None) -> np.ndarray:
    arr = np.full(GEO.shape, value, np.float32)
    if blob_zyx is not None:
        arr[tuple(blob_zyx)] = 1000.0
    return arr


def _msd(root: Path, n: int = 4, **extra) -> Path:
    """A small classification dataset.json: n cases (classes alternating), centres on a bright voxel."""
    training = []
    for i in range(n):
        blob = (3 + i, 5 + 2 * i, 7 + 3 * i)
        write_image(root / "imagesTr" / f"c{i}.nii.gz", _image(-50.0, blob), GEO)
        mask = np.zeros(GEO.shape, np.uint8)
        mask[tuple(blob)] = 1
        write_image(root / "masksTr" / f"c{i}.nii.gz", mask, GEO)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "class": i % 2,
                         "center": list(_world(GEO, blob)), "mask": f"./masksTr/c{i}.nii.gz"})
    meta = {"modality": {"0": "CT"}, "classes": {"0": "benign", "1": "malignant"}, "crop_mm": [10, 8, 6],
            "training": training, **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


# ---------------------------------------------------------------- readers


def test_msd_reader(tmp_path):
    root = _msd(tmp_path / "Task91_X")
    write_image(root / "imagesTs" / "t0.nii.gz", _image(), GEO)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] += [{"image": "./imagesTr/gone.nii.gz", "class": 0},          # missing file
                         {"image": "../outside.nii.gz", "class": 1},               # escapes the root
                         {"image": "./imagesTr/c0.nii.gz", "class": "malignant"},  # class by name
                         {"image": "./imagesTr/c1.nii.gz", "class": [1]},          # not a class id
                         {"image": "./imagesTr/c2.nii.gz"}]                        # no class
    meta["validation"] = [{"image": "./imagesTr/c3.nii.gz", "class": 1}]
    meta["test"] = ["./imagesTs/t0.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "outside.nii.gz").write_bytes(b"x")

    assert is_classification_dataset(root) and is_classification_dataset(root / "dataset.json")
    ds = read_classification_dataset(root)
    assert (ds.name, ds.layout, ds.channel_names, ds.crop_mm) == ("Task91_X", "msd", ["CT"], [10.0, 8.0, 6.0])
    assert ds.classes == {0: "benign", 1: "malignant"} and ds.num_classes == 2
    assert [c.case_id for c in ds.cases] == ["c0", "c1", "c2", "c3", "c0"]
    assert [c.label for c in ds.cases] == [0, 1, 0, 1, 1]
    first = ds.cases[0]
    assert first.images == [(root / "imagesTr" / "c0.nii.gz").resolve()]
    assert first.mask == (root / "masksTr" / "c0.nii.gz").resolve()
    np.testing.assert_allclose(first.center_mm, _world(GEO, (3, 5, 7)))
    assert [(c.case_id, c.label) for c in ds.val_cases] == [("c3", 1)]
    assert [(c.case_id, c.label) for c in ds.test_cases] == [("t0", None)]
    assert len(ds.problems) == 4
    assert any("gone.nii.gz: file not found" in p for p in ds.problems)
    assert any("training[5].image '../outside.nii.gz' points outside" in p for p in ds.problems)
    assert any("training[7].class [1]" in p for p in ds.problems)
    assert any("training[8] needs 'image' and 'class'" in p for p in ds.problems)


def test_segmentation_dataset_is_not_classification(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "x"},
         "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    assert not is_classification_dataset(tmp_path)
    assert not is_classification_dataset(tmp_path / "nothing.csv")


def test_csv_reader(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / "img" / f"{name}.nii.gz", _image(), GEO)
    write_image(tmp_path / "m" / "a.nii.gz", np.ones(GEO.shape, np.uint8), GEO)
    csv = tmp_path / "nodules.csv"
    csv.write_text("Image,Class,center_x,center_y,center_z,mask\n"
                   "img/a.nii.gz,2,-101.3,45.75,19.5,m/a.nii.gz\n"
                   f"{tmp_path / 'img' / 'b.nii.gz'},0,,,,\n"   # absolute path, no ROI
                   "img/c.nii.gz,,,,,\n"                         # no class: a test case
                   "img/d.nii.gz,1,1.0,,3.0,\n"                  # half a centre
                   "img/missing.nii.gz,1,,,,\n")
    assert is_classification_dataset(csv)
    ds = read_classification_dataset(csv)
    assert (ds.name, ds.root, ds.layout, ds.channel_names, ds.crop_mm) == ("nodules", tmp_path, "csv", ["image"], None)
    assert ds.classes == {0: "0", 1: "1", 2: "2"}
    assert [(c.case_id, c.label) for c in ds.cases] == [("a", 2), ("b", 0)]
    assert ds.cases[0].center_mm == (-101.3, 45.75, 19.5) and ds.cases[0].mask == tmp_path / "m" / "a.nii.gz"
    assert ds.cases[1].center_mm is None and ds.cases[1].mask is None
    assert [(c.case_id, c.label) for c in ds.test_cases] == [("c", None)]
    assert len(ds.problems) == 2
    assert any("line 5: centre" in p for p in ds.problems)
    assert any("missing.nii.gz: file not found (named by" in p and "line 6" in p for p in ds.problems)


def test_csv_class_names(tmp_path):
    write_image(tmp_path / "a.nii.gz", _image(), GEO)
    csv = tmp_path / "named.csv"
    csv.write_text("image,class\na.nii.gz,malignant\na.nii.gz,benign\n")
    ds = read_classification_dataset(csv)
    assert ds.classes == {0: "benign", 1: "malignant"}
    assert [c.label for c in ds.cases] == [1, 0]


def _medmnist(path: Path, size: int = 28, n=(6, 2, 3), classes: int = 2, seed: int = 0) -> Path:
    """A file in MedMNIST's real layout: uint8 (N, D, H, W) volumes and uint8 (N, 1) labels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_reader(tmp_path):
    path = _medmnist(tmp_path / "nodulemnist3d.npz")
    assert is_classification_dataset(path)
    ds = read_classification_dataset(path)
    assert (ds.name, ds.root, ds.layout, ds.crop_mm) == ("nodulemnist3d", tmp_path, "medmnist", None)
    assert ds.classes == {0: "benign", 1: "malignant"}
    assert (len(ds.cases), len(ds.val_cases), len(ds.test_cases)) == (6, 2, 3)
    assert [c.case_id for c in ds.cases[:2]] == ["train_00000", "train_00001"]
    assert ds.val_cases[1].case_id == "val_00001" and ds.test_cases[2].label == 0
    case = ds.cases[3]
    assert case.label == 1 and case.images == [] and case.array.dtype == np.float32
    assert case.array.shape == (1, 28, 28, 28) and 0 <= case.array.min() and case.array.max() <= 1
    with np.load(path) as raw:
        np.testing.assert_allclose(case.array[0] * 255, raw["train_images"][3], atol=1e-3)
    image = load_case_image(case)
    assert image.geometry.spacing == (1.0, 1.0, 1.0) and image.geometry.origin == (0.0, 0.0, 0.0)
    assert image.geometry.shape == (28, 28, 28)
    assert check_classification_dataset(ds) == []


@pytest.mark.parametrize("name, size, classes, expected", [
    ("organmnist3d_64.npz", 64, 11, ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left",
                                     "bladder", "heart", "lung-right", "lung-left", "spleen", "pancreas"]),
    ("FractureMNIST3D.npz", 28, 3, ["buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"]),
    ("adrenalmnist3d.npz", 28, 2, ["normal", "hyperplasia"]),
    ("my_volumes.npz", 28, 3, ["0", "1", "2"]),
])
def test_medmnist_class_names(tmp_path, name, size, classes, expected):
    n = (classes, 0, 0) if size == 64 else (classes, 1, 1)
    ds = read_classification_dataset(_medmnist(tmp_path / name, size, n, classes))
    assert list(ds.classes.values()) == expected and list(ds.classes) == list(range(len(expected)))
    assert ds.cases[0].array.shape == (1, size, size, size)


# ---------------------------------------------------------------- regions of interest


def test_crop_lands_on_the_lesion():
    blob = (4, 13, 6)
    image = Image(_image(0.0, blob)[None], GEO)
    center = _world(GEO, blob)
    crop = roi_crop(image, center, (12.5, 8.8, 8.0))  # 5 x 8 x 10 voxels
    assert crop.array.shape == (1, 5, 8, 10)
    mid = tuple(n // 2 for n in crop.array.shape[1:])
    assert crop.array[(0, *mid)] == 1000.0 and (crop.array == 1000.0).sum() == 1
    # The crop keeps world positions: its middle voxel sits at the centre, its voxels on the source grid.
    np.testing.assert_allclose(_world(crop.geometry, mid), center, atol=1e-6)
    assert crop.geometry.spacing == GEO.spacing and crop.geometry.direction == GEO.direction
    start = np.array(blob) - mid
    np.testing.assert_allclose(crop.geometry.origin, _world(GEO, start), atol=1e-6)
    # An off-grid centre picks the nearest voxel.
    near = roi_crop(image, np.add(center, (0.3, -0.4, -1.0)), (12.5, 8.8, 8.0))
    assert near.array[(0, *mid)] == 1000.0


def test_crop_leaving_the_image_is_padded():
    arr = np.random.default_rng(0).uniform(-900, 400, GEO.shape).astype(np.float32)
    image = Image(arr[None], GEO)
    crop = roi_crop(image, _world(GEO, (0, 0, 0)), (10.0, 4.4, 4.0))  # 4 x 4 x 5 around the first voxel
    assert crop.array.shape == (1, 4, 4, 5)
    inside = crop.array[0, 2:, 2:, 2:]
    np.testing.assert_array_equal(inside, arr[:2, :2, :3])
    outside = np.ones((4, 4, 5), bool)
    outside[2:, 2:, 2:] = False
    assert (crop.array[0][outside] == arr.min()).all()
    zero = roi_crop(image, _world(GEO, (0, 0, 0)), (10.0, 4.4, 4.0), pad_value=0.0)
    assert (zero.array[0][outside] == 0).all()
    far = roi_crop(image, (1e4, 1e4, 1e4), (10.0, 4.4, 4.0))  # wholly outside: all padding
    assert (far.array == arr.min()).all()


def test_roi_center_from_mask(tmp_path):
    mask = np.zeros(GEO.shape, np.uint8)
    mask[2:5, 10:12, 6] = 1  # centroid at voxel (3, 10.5, 6)
    write_image(tmp_path / "m.nii.gz", mask, GEO)
    image = Image(_image()[None], GEO)
    case = ClassCase("a", [], 0, mask=tmp_path / "m.nii.gz")
    np.testing.assert_allclose(roi_center_mm(case, image), _world(GEO, (3, 10.5, 6)), atol=1e-4)
    assert roi_center_mm(ClassCase("a", [], 0, center_mm=(1.0, 2.0, 3.0)), image) == (1.0, 2.0, 3.0)
    assert roi_center_mm(ClassCase("a", [], 0), image) is None
    write_image(tmp_path / "empty.nii.gz", np.zeros(GEO.shape, np.uint8), GEO)
    assert roi_center_mm(ClassCase("a", [], 0, mask=tmp_path / "empty.nii.gz"), image) is None


# ---------------------------------------------------------------- check-data and malformed inputs


def test_check_finds_problems(tmp_path):
    root = _msd(tmp_path / "Task92_Y", n=4)
    assert check_classification_dataset(read_classification_dataset(root)) == []
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["class"] = 5                                   # not declared
    meta["training"][1]["center"] = meta["training"][1]["center"][::-1]  # x and z swapped: outside
    meta["training"][2]["mask"] = "./masksTr/none.nii.gz"             # missing mask
    meta["training"][3]["mask"] = "./masksTr/empty.nii.gz"            # no region
    (root / "dataset.json").write_text(json.dumps(meta))
    write_image(root / "masksTr" / "empty.nii.gz", np.zeros(GEO.shape, np.uint8), GEO)
    lines = check_classification_dataset(read_classification_dataset(root))
    errors = [line for line in lines if line.startswith("error: ")]
    assert any("c0.nii.gz: class 5 is not declared" in line for line in errors), lines
    assert any("c1.nii.gz: ROI centre" in line and "outside the image" in line for line in errors), lines
    assert any("none.nii.gz: file not found" in line for line in errors), lines
    assert any("empty.nii.gz: ROI mask is empty" in line for line in errors), lines
    assert len(errors) == 4 and all("\n" not in line for line in lines)


def test_check_warns_about_classes_without_cases(tmp_path):
    root = _msd(tmp_path / "Task93_Z", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["classes"] = {"0": "a", "1": "b", "2": "c"}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert check_classification_dataset(read_classification_dataset(root)) == [
        f"warning: {root}: class 2 (c) has no training case; the model never sees it"]


def test_check_mask_on_another_grid(tmp_path):
    root = _msd(tmp_path / "Task94_W", n=2)
    other = Geometry(GEO.shape, GEO.spacing, (0.0, 0.0, 0.0), GEO.direction)
    write_image(root / "masksTr" / "c1.nii.gz", np.ones(GEO.shape, np.uint8), other)
    lines = check_classification_dataset(read_classification_dataset(root))
    assert len(lines) == 1 and "c1.nii.gz: mask grid differs from its image (origin" in lines[0]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, parts", [
    (lambda d: _write(d / "dataset.json", json.dumps({"modality": {"0": "CT"}, "training": [{"image": "a"}]})).parent,
     ["dataset.json", "'class'"]),
    (lambda d: _write(d / "dataset.json", '{"training": [').parent, ["dataset.json", "not valid JSON"]),
    (lambda d: _write(d / "dataset.json", json.dumps({"modality": {"0": "CT"}, "crop_mm": [1, -2],
                                                      "training": [{"image": "a", "class": 0}]})).parent,
     ["dataset.json", "'crop_mm'"]),
    (lambda d: _write(d / "dataset.json", json.dumps({"modality": {"0": "CT"}, "classes": {"0": "a", "2": "b"},
                                                      "training": [{"image": "a", "class": 0}]})).parent,
     ["dataset.json", "'classes'", "0..1"]),
    (lambda d: _write(d / "dataset.json", json.dumps({"training": [{"image": "a", "class": 0}]})).parent,
     ["dataset.json", "'modality'"]),
    (lambda d: _write(d / "x.csv", "path,label\na.nii.gz,1\n"), ["x.csv", "missing column 'image'"]),
    (lambda d: _write(d / "x.csv", "image,class,center_x\na.nii.gz,1,3\n"), ["x.csv", "center_x"]),
    (lambda d: _write(d / "x.csv", ""), ["x.csv", "missing column 'image'"]),
    (lambda d: _write(d / "x.npz", "not a zip"), ["x.npz", "cannot be read"]),
    (lambda d: _npz(d / "x.npz", train_images=np.zeros((2, 4, 4, 4), np.uint8)), ["x.npz", "'train_labels'"]),
    (lambda d: _npz(d / "x.npz", train_images=np.zeros((2, 4, 4, 4), np.uint8),
                    train_labels=np.zeros((2, 3), np.uint8)), ["x.npz", "'train_labels'", "(2, 3)"]),
    (lambda d: _npz(d / "x.npz", train_images=np.zeros((2, 4, 4), np.uint8),
                    train_labels=np.zeros((2, 1), np.uint8)), ["x.npz", "'train_images'", "(N, D, H, W)"]),
    (lambda d: _npz(d / "x.npz", train_images=np.zeros((2, 4, 4, 4), np.uint8), train_labels=np.zeros((2, 1)),
                    val_images=np.zeros((1, 4, 4, 4), np.uint8)), ["x.npz", "'val_labels'"]),
    (lambda d: d / "absent", ["absent", "not found"]),
])
def test_malformed_inputs_raise_one_line(tmp_path, make, parts):
    with pytest.raises(Med3DError) as err:
        read_classification_dataset(make(tmp_path))
    _one_line(err, *parts)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------- nodule demo


def test_nodule_demo(tmp_path):
    folder = write_nodule_demo(tmp_path, n_train=8, n_test=2, seed=1)
    assert folder == tmp_path / NODULE_DEMO and is_classification_dataset(folder)
    ds = read_classification_dataset(folder)
    assert ds.classes == {0: "benign", 1: "malignant"} and ds.crop_mm == [36.0, 36.0, 36.0]
    assert ds.channel_names == ["CT"] and len(ds.test_cases) == 2 and ds.test_cases[0].center_mm is not None
    assert Counter(c.label for c in ds.cases) == {0: 4, 1: 4}
    assert check_classification_dataset(ds) == []
    volume, roughness = {0: [], 1: []}, {0: [], 1: []}
    for case in ds.cases:
        image = load_case_image(case)
        mask = read_image(case.mask).array[0] > 0
        z, y, x = np.round(world_to_index(image.geometry, case.center_mm)).astype(int)
        assert mask[z, y, x] and image.array[0, z, y, x] > -300  # the centre is on the lesion
        assert np.median(image.array[0][ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(
            mask, iterations=2)]) < -500  # in aerated lung
        crop = roi_crop(image, case.center_mm, ds.crop_mm)
        assert crop.array.shape == (1, 24, 24, 24) and crop.array[0, 12, 12, 12] > -300
        # The region lies inside the lung: no chest wall or mediastinum in it to learn instead of the lesion.
        assert np.mean(crop.array[0] > -300) < 0.15
        surface = mask & ~ndimage.binary_erosion(mask)
        volume[case.label].append(mask.sum())
        roughness[case.label].append(surface.sum() / mask.sum() ** (2 / 3))
    # The class is in the margin, not the size: similar volumes, rougher surfaces for class 1.
    assert 0.6 < np.median(volume[1]) / np.median(volume[0]) < 1.6
    assert min(roughness[1]) > max(roughness[0])
    again = write_nodule_demo(tmp_path / "again", n_train=8, n_test=2, seed=1)
    assert (again / "dataset.json").read_text() == (folder / "dataset.json").read_text()
