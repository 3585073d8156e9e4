"""Classification as a task kind: the nodule demo trained, validated and predicted; losses; the
class-balanced sampler; kind/dataset mismatches; mixing with segmentation; fine-tuning."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from med3d.checkpoint import load_checkpoint
from med3d.config import from_dict
from med3d.data.class_cache import ClassCached
from med3d.data.demo import write_nodule_demo
from med3d.data.sampler import MixSchedule, PatchBatches, TaskData
from med3d.engine.trainer import train
from med3d.errors import Med3DError
from med3d.tasks.classification import ClsLoss, image_metrics

NODULE = "Task90_NoduleDemo"
HELD_OUT_AUC = 0.95  # the 40-iteration shape run below reaches 1.0 on its 8 held-out cases (2-core CPU)


@pytest.fixture(scope="module")
def nodules(tmp_path_factory) -> Path:
    return write_nodule_demo(tmp_path_factory.mktemp("nod"), n_train=24, n_test=2, seed=0)


def _cls_cfg(root: Path, tmp: Path, **sections) -> dict:
    """ResNet-10 at 1/8 width on the nodule regions at 3 mm (16^3 voxels), 80 AdamW steps."""
    data = {
        "model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                  "heads": {NODULE: {"type": "classification", "num_classes": 2}}},
        "data": {"datasets": {NODULE: {"path": str(root), "spacing": [3.0, 3.0, 3.0]}},
                 "cache_dir": str(tmp / "cache"), "patch_size": [16, 16, 16], "workers": 0, "val_fraction": 0.34},
        "run": {"out_dir": str(tmp / "run"), "seed": 0},
        "train": {"iterations": 80, "batch_size": 4, "checkpoint_every": 80, "log_every": 20, "lr": 0.003,
                  "optimizer": "adamw", "threads": 2},
        "validation": {"every": 40, "hd95": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


@pytest.fixture(scope="module")
def trained(nodules, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clsrun")
    summary = train(from_dict(_cls_cfg(nodules, tmp)), "pretrain", progress=False, tensorboard=False)
    return tmp, summary


def write_shape_task(root: Path, n: int = 24, seed: int = 0) -> Path:
    """A classification dataset whose class is a lesion's shape at equal brightness: a solid ball (0) or a
    hollow shell (1) at a random place in noise, with ROI centres in world mm (LPS) on an anisotropic, flipped grid."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    grid = np.meshgrid(*[np.arange(k) for k in (40, 40, 24)], indexing="ij")
    entries = []
    for i in range(n):
        vol = rng.normal(0, 0.3, (40, 40, 24)).astype(np.float32)
        c = np.array([rng.integers(12, 28), rng.integers(12, 28), rng.integers(8, 16)])
        r2 = sum(((g - ci) * s) ** 2 for g, ci, s in zip(grid, c, (1.5, 1.5, 2.0)))
        vol[(r2 < 36) & ((r2 > 12) if i % 2 else True)] += 2.0
        nib.save(nib.Nifti1Image(vol, affine), root / "imagesTr" / f"case{i:03d}.nii.gz")
        ras = affine @ np.array([*c, 1.0])
        entries.append({"image": f"./imagesTr/case{i:03d}.nii.gz", "class": i % 2,
                        "center": [float(-ras[0]), float(-ras[1]), float(ras[2])]})
    (root / "dataset.json").write_text(json.dumps({"name": "Shapes", "modality": {"0": "MR"}, "crop_mm": [24, 30, 30],
                                                   "classes": {"0": "solid", "1": "hollow"}, "training": entries}))
    return root


@pytest.mark.slow
def test_a_shape_classifier_reaches_the_stated_auc_on_held_out_cases(tmp_path):
    root = write_shape_task(tmp_path / "Shapes")
    data = _cls_cfg(root, tmp_path, train={"iterations": 40, "checkpoint_every": 40},
                    validation={"every": 20, "hd95": False})
    data["model"]["heads"] = {"Shapes": {"type": "classification", "num_classes": 2}}
    data["data"]["datasets"] = {"Shapes": {"path": str(root), "spacing": [1.5, 1.5, 1.5]}}
    summary = train(from_dict(data), "pretrain", progress=False, tensorboard=False)
    entry = summary["final"]["tasks"]["Shapes"]
    assert entry["cases"] == 8  # a third of each class held out (stratified)
    assert entry["auc"] >= HELD_OUT_AUC, entry
    assert summary["best"]["metric"] == pytest.approx(max(h["score"] for h in summary["history"]))
    assert set(entry["sensitivity"]) == {"solid", "hollow"}


NODULE_DEMO_AUC = 0.85  # measured with configs/demo/classify.yaml from scratch: 1.0, 0.90, 1.0 for seeds 0, 1, 2


@pytest.mark.slow
def test_the_nodule_demo_classifier_reaches_the_stated_auc_on_held_out_cases(tmp_path):
    """The demo's own task and recipe (16 training cases, 160 iterations): benign and malignant lesions differ in
    margin, not size, so the network must learn shape; 24 cases are held out, stratified."""
    from med3d.config import load_config
    from med3d.resources import resource_path

    root = write_nodule_demo(tmp_path, n_train=48, n_test=0, seed=0)
    cfg = load_config(resource_path("configs/demo/classify.yaml"),
                      [f"data.datasets.{NODULE}.path={root}", f"data.cache_dir={tmp_path / 'cache'}",
                       f"run.out_dir={tmp_path / 'run'}", "finetune.init=scratch", "finetune.weights=null",
                       "data.workers=0", "train.threads=2"])
    summary = train(cfg, "finetune", progress=False, tensorboard=False)
    entry = summary["final"]["tasks"][NODULE]
    assert entry["cases"] == 24
    assert entry["auc"] >= NODULE_DEMO_AUC, entry


@pytest.mark.slow
def test_predict_writes_the_probabilities_validation_saw_and_evaluate_reads_them(trained, nodules):
    tmp, summary = trained
    ckpt = tmp / "run" / "checkpoints" / "last.pt"
    out = tmp / "pred"
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "predict", str(ckpt), str(nodules), "--out", str(out),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["case"]: row for row in csv.DictReader((out / "predictions.csv").open())}
    assert len(rows) == 26  # 24 training cases and the 2 test cases (centres, no class)
    for row in rows.values():
        assert sum(float(row[f"prob_{c}"]) for c in range(2)) == pytest.approx(1.0, abs=1e-5)

    # The same case through validation's path (cached region, network input) gives the same numbers.
    from med3d.data.class_cache import load_class_cache, network_input
    from med3d.data.cache import cache_folder

    model, cfg, meta = load_checkpoint(ckpt)
    model.eval()
    plan, cases = load_class_cache(cache_folder(tmp / "cache", nodules), ["nodule_000"])
    x = torch.from_numpy(network_input(np.load(cases[0].data), plan, [16, 16, 16]))[None]
    with torch.no_grad():
        want = torch.softmax(model(x, NODULE), 1)[0].numpy()
    got = np.array([float(rows["nodule_000"][f"prob_{c}"]) for c in range(2)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    import med3d  # the Python API returns the same probabilities

    entry = json.loads((nodules / "dataset.json").read_text())["training"][0]
    res = med3d.predict(ckpt, nodules / entry["image"], center_mm=entry["center"])
    assert res.case_id == "nodule_000" and res.predicted == int(rows["nodule_000"]["predicted"])
    np.testing.assert_allclose(res.probabilities, want, atol=1e-5)

    r = subprocess.run([sys.executable, "-m", "med3d.cli", "evaluate", str(out / "predictions.csv"),
                        str(nodules / "dataset.json"), "--out", str(tmp / "eval"), "--bootstrap", "200"],
                       capture_output=True, text=True)
    assert "AUC" in r.stdout and (tmp / "eval" / "classification_metrics.json").is_file(), r.stderr[-2000:]


def test_cross_entropy_label_smoothing_class_weights_and_focal():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    target = torch.tensor([[0], [1], [1]])
    assert float(ClsLoss("ce")(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target[:, 0])))
    smooth = float(ClsLoss("ce", label_smoothing=0.2)(logits, target))
    logp = F.log_softmax(logits, 1)
    by_hand = -(0.9 * logp.gather(1, target) + 0.1 * logp.gather(1, 1 - target)).mean()
    assert smooth == pytest.approx(float(by_hand), rel=1e-5)
    weighted = float(ClsLoss("ce", class_weights=[1.0, 3.0])(logits, target))
    nll = -logp.gather(1, target)[:, 0]
    assert weighted == pytest.approx(float((nll * torch.tensor([1.0, 3.0, 3.0])).sum() / 7.0), rel=1e-5)
    focal = float(ClsLoss("focal")(logits, target))
    pt = logp.gather(1, target).exp()[:, 0]
    # (1 - p_t)^2 * CE of the true class; MONAI averages over cases and classes (3 x 2 terms)
    assert focal == pytest.approx(float((-(1 - pt) ** 2 * pt.log()).sum() / 6), rel=1e-5)


def test_validation_entry_by_hand():
    y = [0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8], [0.7, 0.3]])
    m = image_metrics(y, probs, ["benign", "malignant"])
    # positives 0.65, 0.8, 0.3 against negatives 0.1, 0.6: 5 of 6 pairs ordered right
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["sensitivity"] == pytest.approx({"benign": 0.5, "malignant": 2 / 3})
    assert m["specificity"] == pytest.approx({"benign": 2 / 3, "malignant": 0.5})
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert np.isnan(image_metrics([1, 1], probs[:2], ["benign", "malignant"])["auc"])  # one class: undefined


def _region_cases(tmp: Path, labels) -> list:
    cases = []
    for i, label in enumerate(labels):
        path = tmp / f"c{i}.npy"
        np.save(path, np.full((1, 8, 8, 8), float(label), np.float32))
        cases.append(ClassCached(f"c{i}", path, label, {}))
    return cases


@pytest.mark.parametrize("balance, expected", [(True, 0.5), (False, 0.1)])
def test_sampler_balances_classes_when_asked(tmp_path, balance, expected):
    cases = _region_cases(tmp_path, [0] * 9 + [1])
    plan = {"normalization": [{"scheme": "none"}]}
    task = TaskData("t", cases, plan, kind="classification", class_balance=balance)
    ds = PatchBatches([task], MixSchedule(["t"], [10]), (8, 8, 8), 4, 0.0, None, seed=0)
    labels = torch.cat([ds[(step, 0)]["label"][:, 0] for step in range(200)])
    assert float(labels.float().mean()) == pytest.approx(expected, abs=0.05)
    batch = ds[(0, 0)]
    assert batch["image"].shape == (4, 1, 8, 8, 8) and batch["label"].shape == (4, 1)


@pytest.mark.slow
def test_a_head_of_the_wrong_kind_for_its_dataset_is_named_before_any_work(nodules, demo_root, tmp_path, cfg_dict):
    data = _cls_cfg(nodules, tmp_path)
    data["model"]["heads"][NODULE] = {"type": "med3d", "num_classes": 2}
    with pytest.raises(Med3DError, match=f"task {NODULE}: .* is a classification dataset but its head is 'med3d'"):
        train(from_dict(data), "pretrain", progress=False)
    seg = cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",))
    seg["model"]["heads"]["Task09_SpleenDemo"]["type"] = "classification"
    with pytest.raises(Med3DError, match="task Task09_SpleenDemo: a 'classification' head needs a classification"):
        train(from_dict(seg), "pretrain", progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_class_count_mismatch_is_named(nodules, tmp_path):
    data = _cls_cfg(nodules, tmp_path)
    data["model"]["heads"][NODULE]["num_classes"] = 3
    with pytest.raises(Med3DError, match=f"model.heads.{NODULE}.num_classes is 3 but dataset .* declares 2 classes"):
        train(from_dict(data), "pretrain", progress=False)


@pytest.mark.slow
def test_segmentation_and_classification_pretrain_together_then_finetune_frozen(nodules, demo_root, tmp_path,
                                                                               cfg_dict):
    both = _cls_cfg(nodules, tmp_path, train={"iterations": 4, "checkpoint_every": 4, "batch_size": 2},
                    validation={"every": 0, "hd95": False})
    seg = cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",))
    both["model"]["heads"].update(seg["model"]["heads"])
    both["data"]["datasets"].update(seg["data"]["datasets"])
    summary = train(from_dict(both), "pretrain", progress=False, tensorboard=False)
    assert set(summary["final"]["tasks"]) == {NODULE, "Task09_SpleenDemo"}
    assert "dice" in summary["final"]["tasks"]["Task09_SpleenDemo"] and "auc" in summary["final"]["tasks"][NODULE]

    start = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")[0].encoder.state_dict()
    ft = _cls_cfg(nodules, tmp_path / "ft", train={"iterations": 4, "checkpoint_every": 4, "batch_size": 2},
                  finetune={"weights": str(tmp_path / "run" / "checkpoints" / "last.pt"),
                            "freeze": ["stem", "layer1"], "head_lr_mult": 10.0},
                  validation={"every": 2, "hd95": False})
    train(from_dict(ft), "finetune", progress=False, tensorboard=False)
    after = load_checkpoint(tmp_path / "ft" / "run" / "checkpoints" / "last.pt")[0].encoder.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.bn1.running_var"):
        assert torch.equal(after[key], start[key]), key  # frozen across a validation
    assert not torch.equal(after["layer4.0.conv1.weight"], start["layer4.0.conv1.weight"])


@pytest.mark.slow
def test_predict_and_evaluate_a_real_lung_ct_with_its_tumour_mask_as_the_roi(trained, real_data, tmp_path):
    run, _ = trained
    scan = real_data / "radiomics" / "lung1_image.nrrd"
    mask = real_data / "radiomics" / "lung1_label.nrrd"
    out = tmp_path / "pred"
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "predict", str(run / "run" / "checkpoints" / "last.pt"),
                        str(scan), "--roi-mask", str(mask), "--out", str(out), "--quiet"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(csv.DictReader((out / "predictions.csv").open()))
    assert row["case"] == "lung1_image" and row["predicted"] in ("0", "1")

    # The centre used is the mask's centroid in world mm: the same prediction with --center.
    from med3d.data.classification import ClassCase, roi_center_mm
    from med3d.data.image import read_image

    center = roi_center_mm(ClassCase("lung1_image", [scan], None, mask=mask), read_image(scan))
    r2 = subprocess.run([sys.executable, "-m", "med3d.cli", "predict", str(run / "run" / "checkpoints" / "last.pt"),
                         str(scan), "--center", *map(str, center), "--out", str(tmp_path / "pred2"), "--quiet"],
                        capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert next(csv.DictReader((tmp_path / "pred2" / "predictions.csv").open()))["prob_1"] == row["prob_1"]

    ref = tmp_path / "reference.csv"
    ref.write_text(f"image,class\n{scan},1\n")
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "evaluate", str(out / "predictions.csv"), str(ref),
                        "--out", str(tmp_path / "eval"), "--bootstrap", "0"], capture_output=True, text=True)
    assert (tmp_path / "eval" / "classification_metrics.json").is_file(), r.stdout + r.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "classification_metrics.json").read_text())
    assert metrics["cases"] == 1 and metrics["confusion_matrix"][1][int(row["predicted"])] == 1

    # Explain the same prediction: the heat map lies on the scan's own grid, around the tumour.
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "explain", str(run / "run" / "checkpoints" / "last.pt"),
                        str(scan), "--roi-mask", str(mask), "--layer", "layer2", "--out", str(tmp_path / "cam")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import SimpleITK as sitk

    cam, ct = sitk.ReadImage(str(tmp_path / "cam" / "lung1_image_cam.nii.gz")), sitk.ReadImage(str(scan))
    assert cam.GetSize() == ct.GetSize()
    np.testing.assert_allclose(cam.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(cam.GetSpacing(), ct.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(cam.GetDirection(), ct.GetDirection(), atol=1e-5)
    heat = sitk.GetArrayFromImage(cam)
    assert heat.max() == pytest.approx(1.0) and (tmp_path / "cam" / "lung1_image_cam.png").is_file()
    peak = np.array(np.unravel_index(heat.argmax(), heat.shape)) * np.asarray(ct.GetSpacing())[::-1]
    centre = np.asarray(ct.TransformPhysicalPointToContinuousIndex(center))[::-1] * np.asarray(ct.GetSpacing())[::-1]
    # Inside the 48 mm region the network saw, up to half its 3 mm voxel and one scan voxel of interpolation.
    assert np.abs(peak - centre).max() <= 24.0 + 1.5 + max(ct.GetSpacing())


def test_a_medmnist_npz_trains_with_its_own_validation_split(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        images = rng.integers(0, 40, (n, 28, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 2)[:, None]
        images[labels[:, 0] == 1, 10:18, 10:18, 10:18] = 255  # class 1: a bright cube
        return images, labels

    arrays = {}
    for name, n in (("train", 12), ("val", 6), ("test", 4)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    npz = tmp_path / "nodulemnist3d.npz"
    np.savez(npz, **arrays)
    data = _cls_cfg(npz, tmp_path, train={"iterations": 4, "checkpoint_every": 4, "batch_size": 2})
    data["data"]["datasets"] = {"nodules": {"path": str(npz)}}
    data["data"]["patch_size"] = [32, 32, 32]
    data["model"]["heads"] = {"nodules": {"type": "classification", "num_classes": 2}}
    summary = train(from_dict(data), "pretrain", progress=False, tensorboard=False)
    entry = summary["final"]["tasks"]["nodules"]
    assert entry["cases"] == 6 and set(entry["sensitivity"]) == {"benign", "malignant"}


def test_the_network_input_grid_lies_on_the_roi_in_world_space():
    from med3d.data.class_cache import image_region, patch_start
    from med3d.data.image import Geometry, Image, shifted_grid
    from med3d.inference.restore import resample_onto

    geo = Geometry((40, 50, 60), (0.8, 0.9, 2.5), (10.0, -20.0, 5.0), (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    plan = {"crop_mm": [30, 30, 30], "target_spacing": [1.5, 1.5, 1.5], "plan_hash": "x"}
    idx = np.array([17, 23, 31])  # z, y, x of the ROI centre in the scan
    center = np.asarray(geo.origin) + np.diag([-1.0, 1.0, 1.0]) @ (idx[::-1] * np.asarray(geo.spacing))
    region, props, grid = image_region(Image(np.zeros((1, 40, 50, 60), np.float32), geo), center, plan)
    assert region.shape == (1, 20, 20, 20) and props["center_mm"] == pytest.approx(list(center))
    patch = [16, 16, 16]
    net = shifted_grid(grid, patch, patch_start(region.shape[1:], patch), (1, 1, 1))
    mid = np.asarray(net.origin) + np.diag([-1.0, 1.0, 1.0]) @ (np.full(3, 7.5) * np.asarray(net.spacing))
    assert np.abs(mid - center).max() <= 1.5  # within one voxel of the 1.5 mm grid
    spot = np.zeros(patch, np.float32)
    spot[7:9, 7:9, 7:9] = 1.0  # the input's four central voxels, put back on the scan's grid
    back = resample_onto(spot, net, geo)
    peak = np.array(np.unravel_index(back.argmax(), back.shape))
    assert np.abs(peak - idx).max() <= 1


def test_prepare_cuts_a_case_again_when_its_roi_changes_and_ranks_check_the_plan(tmp_path):
    from med3d.data.class_cache import load_class_cache, prepare_classification
    from med3d.data.classification import read_classification_dataset
    from med3d.engine.task_data import ensure_prepared

    root = write_shape_task(tmp_path / "Shapes", n=4)
    folder = prepare_classification(read_classification_dataset(root), root, tmp_path / "cache")
    first = np.load(folder / "cases" / "case000.npy")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["center"] = [c + 6.0 for c in meta["training"][0]["center"]]  # a corrected centre
    (root / "dataset.json").write_text(json.dumps(meta))
    prepare_classification(read_classification_dataset(root), root, tmp_path / "cache")
    _, cases = load_class_cache(folder, ["case000"])
    assert cases[0].props["center_mm"] == pytest.approx(meta["training"][0]["center"])
    assert not np.array_equal(np.load(folder / "cases" / "case000.npy"), first)

    data = _cls_cfg(root, tmp_path)  # DDP ranks: the cache must hold this config's plan
    data["model"]["heads"] = {"Shapes": {"type": "classification", "num_classes": 2}}
    data["data"]["datasets"] = {"Shapes": {"path": str(root), "crop_mm": [40, 40, 40]}}
    with pytest.raises(Med3DError, match="is not prepared in .* under this config's plan"):
        ensure_prepared(from_dict(data), prepare=False)
    data["data"]["datasets"]["Shapes"] = {"path": str(root)}
    assert ensure_prepared(from_dict(data), prepare=False)["Shapes"] == folder


@pytest.mark.slow
def test_a_killed_classification_run_resumes_to_the_uninterrupted_weights(nodules, tmp_path):
    """SIGKILL mid-run, then --resume: the class-balanced sampler, the jitter and augmentation streams and the
    optimizer continue where they stopped, so the final weights equal an uninterrupted run's bit for bit."""
    import yaml
    from helpers import kill_after_checkpoint

    from med3d.engine.checkpoints import load_training

    base = _cls_cfg(nodules, tmp_path, train={"iterations": 14, "batch_size": 4, "checkpoint_every": 1,
                                              "log_every": 5, "lr": 0.003, "optimizer": "adamw", "threads": 2},
                    validation={"every": 7, "hd95": False})
    base["data"].update(class_balance=True, augment={"affine": 0.5, "noise": 0.5})
    train(from_dict({**base, "run": {"out_dir": str(tmp_path / "full"), "seed": 0}}), "finetune", progress=False,
          tensorboard=False)
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**base, "run": {"out_dir": str(tmp_path / "b"), "seed": 0}}))
    ckpts = tmp_path / "b" / "checkpoints"
    kill_after_checkpoint(["med3d.cli", "finetune", str(cfg), "--quiet"], ckpts, 3)
    stopped = load_training(ckpts / "last.pt")["train_state"]["iteration"]
    assert 2 <= stopped < 14, "the run was not interrupted mid-way"  # last.pt follows iter_N.pt
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "finetune", str(cfg), "--quiet", "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ckpts / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
