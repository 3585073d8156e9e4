import json

import nibabel as nib
import numpy as np

from med3d.data.demo import TASK_NAMES, is_complete, write_demo_data


def load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_msd_layout(demo_root):
    for task in TASK_NAMES:
        folder = demo_root / task
        meta = json.loads((folder / "dataset.json").read_text())
        assert {"name", "modality", "labels", "numTraining", "numTest", "training", "test",
                "tensorImageSize"} <= set(meta)
        assert meta["numTraining"] == len(meta["training"]) == 3 and meta["numTest"] == len(meta["test"]) == 1
        assert is_complete(folder)
        n_mod = len(meta["modality"])
        for case in meta["training"]:
            image, a_img = load(folder / case["image"])
            label, a_lab = load(folder / case["label"])
            assert image.ndim == (4 if n_mod > 1 else 3)
            if n_mod > 1:
                assert image.shape[3] == n_mod
            assert image.shape[:3] == label.shape
            np.testing.assert_allclose(a_img, a_lab)
            assert label.dtype == np.uint8
            assert set(np.unique(label)) <= {int(k) for k in meta["labels"]}
            assert len(np.unique(label)) == len(meta["labels"])  # every structure present
            assert np.isfinite(image).all()


def test_spacings_anisotropic_and_ct_in_hu(demo_root):
    meta = json.loads((demo_root / "Task03_LiverDemo" / "dataset.json").read_text())
    img = nib.load(demo_root / "Task03_LiverDemo" / meta["training"][0]["image"])
    zooms = img.header.get_zooms()
    assert zooms[2] > 1.3 * zooms[0]
    hu = np.asarray(img.dataobj)
    label = np.asarray(nib.load(demo_root / "Task03_LiverDemo" / meta["training"][0]["label"]).dataobj)
    assert hu.min() <= -1000 and 60 < np.median(hu[label == 1]) < 140
    assert np.median(hu[label == 2]) < np.median(hu[label == 1]) - 30  # hypodense lesions


def test_brain_labels_nested(demo_root):
    meta = json.loads((demo_root / "Task01_BrainTumourDemo" / "dataset.json").read_text())
    label, _ = load(demo_root / "Task01_BrainTumourDemo" / meta["training"][0]["label"])
    from scipy import ndimage

    core = label == 2
    tumour = ndimage.binary_dilation(core) & (label > 0)
    assert (label[tumour & ~core] != 0).all()  # the core never touches background directly


def test_same_seed_same_files(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=3, n_train=1, n_test=0, tasks=["Task09_SpleenDemo"],
                        show_progress=False)[0]
    b = write_demo_data(tmp_path / "b", seed=3, n_train=1, n_test=0, tasks=["Task09_SpleenDemo"],
                        show_progress=False)[0]
    c = write_demo_data(tmp_path / "c", seed=4, n_train=1, n_test=0, tasks=["Task09_SpleenDemo"],
                        show_progress=False)[0]
    f = "imagesTr/spleendemo_000.nii.gz"
    np.testing.assert_array_equal(load(a / f)[0], load(b / f)[0])
    np.testing.assert_array_equal(load(a / f)[1], load(b / f)[1])
    assert load(a / f)[0].shape != load(c / f)[0].shape or not np.array_equal(load(a / f)[0], load(c / f)[0])
