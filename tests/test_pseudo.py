"""Teacher-student learning: pseudo-labels with confidence in the scans' own geometry, a student trained
on them with low-confidence voxels left out of the loss, and noisy-student rounds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from badinput import refused
from med3d.cli import main
from med3d.data.pseudo import IGNORE, thresholded
from med3d.errors import Med3DError
from med3d.inference.pseudo import averaged_probabilities
from med3d.inference.restore import restore_labels_and_confidence, restore_probabilities
from med3d.tasks.segmentation import SegLoss

SHAPE = (24, 32, 32)  # (z, y, x)
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])  # x, y 1 mm, z 1.5 mm


def _ball(rng: np.random.Generator):
    """A noisy bright ball on a darker background (MR-like intensities) and its label map, (z, y, x)."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    c = rng.uniform(0.35, 0.65, 3) * np.array(SHAPE)
    r = rng.uniform(5, 8)
    label = (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r * r).astype(np.uint8)
    image = (100 + 20 * rng.standard_normal(SHAPE) + 200 * label).astype(np.float32)
    return image, label


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), AFFINE), path)


def ball_dataset(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A Decathlon-layout dataset of balls: ``n_train`` labelled cases, ``n_test`` test scans."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_train + n_test):
        image, label = _ball(rng)
        if i < n_train:
            _save(image, root / "imagesTr" / f"ball_{i:03d}.nii.gz")
            _save(label, root / "labelsTr" / f"ball_{i:03d}.nii.gz")
            training.append({"image": f"./imagesTr/ball_{i:03d}.nii.gz", "label": f"./labelsTr/ball_{i:03d}.nii.gz"})
        else:
            _save(image, root / "imagesTs" / f"ball_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Ball", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "ball"},
        "numTraining": n_train, "training": training,
        "test": [f"./imagesTs/ball_{i:03d}.nii.gz" for i in range(n_train, n_train + n_test)]}))
    return root


def ball_config(root: Path, tmp: Path, iterations: int, **data) -> dict:
    return {"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                      "heads": {"Ball": {"type": "med3d", "num_classes": 2}}},
            "data": {"datasets": {"Ball": {"path": str(root)}}, "cache_dir": str(tmp / "cache"),
                     "patch_size": [16, 32, 32], "workers": 0, "val_fraction": 0.0, **data},
            "run": {"out_dir": str(tmp / "run"), "seed": 0},
            "train": {"iterations": iterations, "batch_size": 2, "checkpoint_every": iterations,
                      "log_every": iterations, "lr": 0.02, "optimizer": "adamw"},
            "validation": {"every": 0, "hd95": False, "allow_none": True}}


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A model trained (40 iterations) on one labelled ball, with two unlabelled test scans beside it."""
    tmp = tmp_path_factory.mktemp("teacher")
    root = ball_dataset(tmp / "Task01_Ball", n_train=1, n_test=2)
    assert main(["finetune", str(_write(ball_config(root, tmp, 40), tmp / "t.yaml")), "--quiet"]) == 0
    return {"root": root, "tmp": tmp, "checkpoint": tmp / "run" / "checkpoints" / "last.pt"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# ---------------------------------------------------------------- pseudo-labels

@pytest.mark.slow
def test_pseudo_labels_of_a_model_reproduce_the_case_it_was_trained_on(teacher, tmp_path):
    out = tmp_path / "pl"
    assert main(["pseudo-label", str(teacher["checkpoint"]), str(teacher["root"] / "imagesTr"), "--out", str(out),
                 "--quiet"]) == 0
    source = nib.load(teacher["root"] / "imagesTr" / "ball_000.nii.gz")
    label_img, conf_img = nib.load(out / "ball_000.nii.gz"), nib.load(out / "ball_000_confidence.nii.gz")
    for img in (label_img, conf_img):  # the scan's own grid
        assert img.shape == source.shape and np.allclose(img.affine, source.affine)
    labels = np.asarray(label_img.dataobj)
    reference = np.asarray(nib.load(teacher["root"] / "labelsTr" / "ball_000.nii.gz").dataobj)
    # Stated bound: 40 iterations on this one case reach a Dice of about 0.8 on it; a model that had not
    # learnt the ball (or labels placed on another grid) scores near 0.
    assert _dice(labels > 0, reference > 0) > 0.7
    confidence = np.asarray(conf_img.dataobj)
    assert confidence.dtype == np.float32 and 0.5 - 1e-6 <= confidence.min() and confidence.max() <= 1.0
    # The ball's inside is confident, its boundary less so (two classes: confidence is at least 0.5).
    assert confidence[reference > 0].mean() > confidence[np.abs(np.gradient(reference.astype(float))[0]) > 0].mean()
    record = json.loads((out / "pseudo_labels.json").read_text())
    case = record["cases"][0]
    assert case["case_id"] == "ball_000" and Path(case["images"][0]).is_absolute()
    assert case["mean_confidence"] == pytest.approx(float(confidence.mean()), abs=1e-5)
    assert record["teacher"]["labels"] == {"0": "background", "1": "ball"}
    assert record["teacher"]["confidence"] == "max_probability"


def test_confidence_is_the_probability_of_the_restored_label():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 7, 9, 11)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    props = {"geometry": {"shape": [15, 20, 12]}, "crop_box": [(1, 14), (2, 19), (0, 10)],
             "cropped_shape": [13, 17, 10], "spacing_zyx": [5.0, 0.7, 0.7]}
    plan = {"target_spacing": [5.0, 1.1, 1.1]}
    labels, confidence = restore_labels_and_confidence(probs, props, plan)
    full = restore_probabilities(probs, props, plan)
    np.testing.assert_array_equal(labels, full.argmax(0))
    np.testing.assert_array_equal(confidence, full.max(0))  # outside the crop: background, certain
    assert confidence[0].min() == 1.0 and confidence[1:14, 2:19, :10].max() < 1.0


class _Sided(torch.nn.Module):
    """Logits that favour class 1 on the low-x half: a mirrored copy along x disagrees there."""

    def forward(self, x, task):
        ramp = torch.linspace(1.0, -1.0, x.shape[-1]).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([-ramp, ramp], 1) * 4


class _Flat(torch.nn.Module):
    def forward(self, x, task):
        return torch.stack([x[:, 0] * 0, x[:, 0] * 0 + 1], 1)


def test_mirror_agreement_is_the_share_of_mirrored_copies_that_agree():
    x = torch.zeros(1, 1, 8, 8, 8)
    _, agreement = averaged_probabilities(_Flat(), x, "t", [8, 8, 8], 0.0, 1, None, mirror=True)
    assert agreement.shape == (8, 8, 8) and np.all(agreement == 1.0)  # every copy says class 1
    probs, agreement = averaged_probabilities(_Sided(), x, "t", [8, 8, 8], 0.0, 1, None, mirror=True)
    # Half the 8 copies are flipped along x, so at every voxel 4 of 8 say class 1 and 4 say class 0.
    assert np.allclose(agreement, 0.5) and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    assert averaged_probabilities(_Sided(), x, "t", [8, 8, 8], 0.0, 1, None, mirror=False)[1] is None


# ---------------------------------------------------------------- the loss and the threshold

@pytest.mark.parametrize("kind", ["dice_ce", "focal", "dice_focal"])
def test_voxels_below_the_confidence_threshold_do_not_change_the_loss(kind):
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 1, 6, 8, 8, generator=g) > 0.6).long()
    confidence = torch.rand(2, 1, 6, 8, 8, generator=g)
    seg = thresholded(target.clone().numpy().astype(np.int16), confidence.numpy(), 0.7)
    assert np.array_equal(seg == IGNORE, confidence.numpy() < 0.7)
    assert np.array_equal(seg[seg != IGNORE], target.numpy()[seg != IGNORE])
    seg = torch.from_numpy(seg).long()
    loss = SegLoss(kind, ignore_label=IGNORE)
    logits = torch.randn(2, 2, 6, 8, 8, generator=g)
    base = loss(logits, seg)
    low = (seg == IGNORE).expand_as(logits)
    noisy = torch.where(low, torch.randn(logits.shape, generator=g) * 10, logits)
    assert torch.equal(loss(noisy, seg), base)  # anything at the ignored voxels: the same loss
    kept = torch.where(~low, torch.randn(logits.shape, generator=g) * 10, logits)
    assert not torch.isclose(loss(kept, seg), base)  # the confident voxels do count


# ---------------------------------------------------------------- the student

@pytest.mark.slow
def test_a_student_trains_on_pseudo_labels_with_low_confidence_voxels_ignored(teacher, tmp_path):
    from med3d.config import from_dict
    from med3d.data.sampler import MixSchedule, PatchBatches
    from med3d.engine.distributed import DistInfo
    from med3d.engine.task_data import pseudo_name, setup_data

    pl = tmp_path / "pl"
    assert main(["pseudo-label", str(teacher["checkpoint"]), str(teacher["root"] / "imagesTs"), "--out", str(pl),
                 "--quiet"]) == 0
    cfg = ball_config(teacher["root"], tmp_path, 2)
    cfg["data"]["datasets"]["Ball"]["pseudo"] = {"path": str(pl), "threshold": 0.9, "loss_weight": 0.5}
    setup = setup_data(from_dict(cfg), DistInfo(), progress=False)
    labelled, pseudo = setup.tasks
    assert pseudo.name == pseudo_name("Ball") and pseudo.trains == "Ball" and pseudo.ignore_label == IGNORE
    assert pseudo.loss_weight == 0.5 and pseudo.augment.noise > from_dict(cfg).data.augment.noise  # the student's
    assert sorted(c.case_id for c in pseudo.cases) == ["ball_001", "ball_002"]
    assert pseudo.plan["target_spacing"] == labelled.plan["target_spacing"]  # the labelled task's plan
    # The cache holds IGNORE exactly where the confidence, taken to the plan grid, is under 0.9.
    case = pseudo.cases[0]
    seg = np.load(case.seg)[0]
    conf = np.asarray(nib.load(pl / f"{case.case_id}_confidence.nii.gz").dataobj).transpose(2, 1, 0)
    labels = np.asarray(nib.load(pl / f"{case.case_id}.nii.gz").dataobj).transpose(2, 1, 0)
    assert seg.shape == conf.shape  # this plan keeps the grid (1.5 mm z, 1 mm in-plane): compare voxel by voxel
    assert np.array_equal(seg == IGNORE, conf < 0.9)
    assert np.array_equal(seg[seg != IGNORE], labels[seg != IGNORE])
    assert (seg == IGNORE).any() and (seg != IGNORE).any()
    # Its batches train the Ball head, with the ignored label in them.
    batches = PatchBatches(setup.tasks, MixSchedule(["Ball", pseudo.name], [1, 2]), [16, 32, 32], 2, 0.33)
    batch = batches[(1, 0)]
    assert batch["task"] == pseudo.name and batch["head"] == "Ball"
    noise = [t for t in batches.own_augment[pseudo.name].transforms if type(t).__name__ == "RandGaussianNoised"]
    assert noise and noise[0].prob == 0.5  # the student's stronger augmentation, not data.augment's 0.1
    assert json.loads((case.seg.parent.parent / "plan.json").read_text())["pseudo"]["threshold"] == 0.9
    # And the run trains both, the student's loss ignoring IGNORE.
    assert main(["finetune", str(_write(cfg, tmp_path / "s.yaml")), "--quiet"]) == 0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split[pseudo.name]["train"] == ["ball_001", "ball_002"]


def fake_pseudo_labels(pl: Path, image: Path, case_id: str) -> Path:
    """A pseudo-label folder as ``med3d pseudo-label`` writes it, for one scan: all background, confident."""
    pl.mkdir(exist_ok=True)
    (pl / "pseudo_labels.json").write_text(json.dumps({
        "format": "med3d-pseudo-labels", "version": 1,
        "teacher": {"labels": {"0": "background", "1": "ball"}, "stamp": [1, 1], "checkpoint": "x"},
        "cases": [{"case_id": case_id, "images": [str(image)], "series": None, "label": f"{case_id}.nii.gz",
                   "confidence": f"{case_id}_confidence.nii.gz"}]}))
    _save(np.zeros(SHAPE, np.uint8), pl / f"{case_id}.nii.gz")
    _save(np.ones(SHAPE, np.float32), pl / f"{case_id}_confidence.nii.gz")
    return pl


def test_torchrun_ranks_need_the_pseudo_labels_prepared_first(tmp_path):
    from med3d.config import from_dict
    from med3d.engine.distributed import DistInfo
    from med3d.engine.task_data import setup_data

    root = ball_dataset(tmp_path / "Task01_Ball", n_train=2, n_test=1)
    pl = fake_pseudo_labels(tmp_path / "pl", root / "imagesTs" / "ball_002.nii.gz", "ball_002")
    cfg = ball_config(root, tmp_path, 1)
    cfg["data"]["datasets"]["Ball"]["pseudo"] = {"path": str(pl)}
    path = _write(cfg, tmp_path / "c.yaml")
    assert main(["prepare", str(root), "--cache", str(tmp_path / "cache"), "--quiet"]) == 0  # labelled only
    rank = DistInfo(rank=1, world=2)
    with pytest.raises(Med3DError, match=r"pseudo\.path: the pseudo-labelled scans .* not prepared .*med3d prepare"):
        setup_data(from_dict(cfg), rank, progress=False)
    assert main(["prepare", "--config", str(path), "--quiet"]) == 0  # the labelled cases and the pseudo-labelled
    assert [t.name for t in setup_data(from_dict(cfg), rank, progress=False).tasks] == ["Ball", "Ball:pseudo"]


def test_pseudo_labels_of_validation_scans_are_refused(tmp_path, capsys):
    root = ball_dataset(tmp_path / "Task01_Ball", n_train=3, n_test=0)
    pl = fake_pseudo_labels(tmp_path / "pl", root / "imagesTr" / "ball_000.nii.gz", "ball_000")
    cfg = ball_config(root, tmp_path, 1, val_cases=["ball_000"])
    cfg["validation"]["allow_none"] = False
    cfg["data"]["datasets"]["Ball"]["pseudo"] = {"path": str(pl)}
    refused(["finetune", str(_write(cfg, tmp_path / "c.yaml"))], capsys,
            names=r"pseudo\.path: pseudo-labelled scan ball_000 is a validation case of task Ball")


@pytest.mark.corpus
@pytest.mark.parametrize("case", ["no_manifest", "other_labels", "self_supervised_task", "threshold",
                                  "confidence_grid", "teacher_saw_validation"])
def test_bad_pseudo_entries_are_refused_with_one_line(case, tmp_path, capsys):
    root = ball_dataset(tmp_path / "Task01_Ball", n_train=2, n_test=1)
    pl = tmp_path / "pl"
    pl.mkdir()
    cfg = ball_config(root, tmp_path, 1)
    entry = {"path": str(pl)}
    names = {"no_manifest": r"pseudo\.path: .*pl has no pseudo_labels\.json",
             "other_labels": r"pseudo\.path: the pseudo-labels in .* have labels .*liver",
             "self_supervised_task": r"data\.datasets\.Ball\.pseudo: pseudo-labels train a segmentation head",
             "threshold": r"pseudo\.threshold': must be in \[0, 1\]",
             "confidence_grid": r"a_confidence\.nii\.gz: grid \(24, 32, 16\) differs from its scan's \(24, 32, 32\)",
             "teacher_saw_validation": r"the teacher of .*pl trained on ball_00\d, a validation case of task Ball"}[case]
    if case in ("other_labels", "confidence_grid", "teacher_saw_validation"):
        _save(np.zeros(SHAPE, np.uint8), pl / "a.nii.gz")
        conf = np.ones(SHAPE if case != "confidence_grid" else (SHAPE[0], SHAPE[1], 16), np.float32)
        _save(conf, pl / "a_confidence.nii.gz")
        teacher = {"labels": {"0": "background", "1": "liver" if case == "other_labels" else "ball"}}
        if case == "teacher_saw_validation":  # a teacher from a run that trained on both labelled cases
            teacher.update(dataset=str(root), train_cases=["ball_000", "ball_001"])
        (pl / "pseudo_labels.json").write_text(json.dumps({
            "format": "med3d-pseudo-labels", "teacher": teacher,
            "cases": [{"case_id": "a", "images": [str(root / "imagesTs" / "ball_002.nii.gz")],
                       "label": "a.nii.gz", "confidence": "a_confidence.nii.gz"}]}))
        cfg["data"]["val_fraction"] = 0.5
    if case == "self_supervised_task":
        cfg["model"]["heads"]["Ball"] = {"type": "restore", "num_classes": 1}
    if case == "threshold":
        entry["threshold"] = 1.5
    cfg["data"]["datasets"]["Ball"]["pseudo"] = entry
    refused(["finetune", str(_write(cfg, tmp_path / "c.yaml"))], capsys, names=names, inputs=[root])


@pytest.mark.corpus
def test_pseudo_label_refuses_an_output_inside_its_inputs_before_any_work(tmp_path, capsys):
    root = ball_dataset(tmp_path / "Task01_Ball", n_train=1, n_test=1)
    refused(["pseudo-label", str(tmp_path / "no.pt"), str(root / "imagesTs"), "--out", str(root / "imagesTs" / "pl")],
            capsys, names=r"--out", inputs=[root])


@pytest.mark.slow
def test_pseudo_label_keeps_earlier_outputs_without_overwrite(teacher, tmp_path, capsys):
    out = tmp_path / "pl"
    args = ["pseudo-label", str(teacher["checkpoint"]), str(teacher["root"] / "imagesTs"), "--out", str(out),
            "--quiet", "--mirror"]
    assert main(args) == 0
    record = json.loads((out / "pseudo_labels.json").read_text())
    assert record["teacher"]["confidence"] == "max_probability_x_mirror_agreement"
    refused(args, capsys, names=r"already exists; pass --overwrite", inputs=[out])


# ---------------------------------------------------------------- noisy-student rounds

@pytest.mark.slow
def test_teacher_student_rounds_train_label_and_resume(tmp_path, capsys):
    root = ball_dataset(tmp_path / "Task01_Ball", n_train=3, n_test=2)
    (tmp_path / "scans").symlink_to(root / "imagesTs")  # through a link: resuming must still recognise them
    cfg = ball_config(root, tmp_path, 2, val_fraction=0.34)
    cfg["validation"]["allow_none"] = False
    cfg["teacher_student"] = {"unlabelled": str(tmp_path / "scans"), "rounds": 1, "threshold": 0.6}
    path = _write(cfg, tmp_path / "ts.yaml")
    assert main(["teacher-student", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    rows = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and rows[0]["pseudo_cases"] == 0 and rows[1]["pseudo_cases"] == 2
    teacher = json.loads((run / "pseudo_1" / "pseudo_labels.json").read_text())["teacher"]
    assert teacher["checkpoint"] == str((run / "round_0" / "checkpoints" / "best.pt").resolve())
    student = yaml.safe_load((run / "round_1" / "config.yaml").read_text())
    assert student["data"]["datasets"]["Ball"]["pseudo"]["path"] == str(run / "pseudo_1")
    assert yaml.safe_load((run / "round_0" / "config.yaml").read_text())["data"]["datasets"]["Ball"].get("pseudo") \
        is None  # the teacher: labelled cases only
    assert "| 1 | student of round 0 | 2 |" in (run / "rounds.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")}
    capsys.readouterr()
    assert main(["teacher-student", str(path), "--quiet"]) == 0  # again: everything reused, nothing trained
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")} == stamps
    best = run / "round_0" / "checkpoints" / "best.pt"  # a new teacher: round 1's student trained on stale labels
    os.utime(best, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10 ** 9))
    refused(["teacher-student", str(path), "--quiet"], capsys,
            names=r"round 1: .*round_1 trained on pseudo-labels of an earlier teacher")


@pytest.mark.corpus
@pytest.mark.parametrize("section, names", [
    (None, r"needs a 'teacher_student:' section"),
    ({"unlabelled": "x", "rounds": 0}, r"teacher_student\.rounds' must be a whole number"),
    ({"unlabelled": "x", "rounds": 1, "treshold": 0.5}, r"unknown key 'teacher_student\.treshold'"),
    ({"unlabelled": "x", "threshold": 2.0}, r"teacher_student: config key 'data\.datasets\.Ball\.pseudo\.threshold'"),
])
def test_bad_teacher_student_sections_are_refused(section, names, tmp_path, capsys):
    cfg = ball_config(tmp_path / "data", tmp_path, 1)
    if section is not None:
        cfg["teacher_student"] = section
    refused(["teacher-student", str(_write(cfg, tmp_path / "ts.yaml"))], capsys, names=names)


def test_loss_weight_and_student_augmentation_defaults():
    from med3d.config import AugmentConfig, PseudoConfig

    base = AugmentConfig()
    strong = PseudoConfig("x").student_augment(base)
    assert strong.noise > base.noise and strong.affine > base.affine and strong.flip == base.flip
    # What the labelled run turns off stays off; what it sets stronger stays as strong.
    custom = PseudoConfig("x").student_augment(AugmentConfig(affine=0.0, noise=0.9, rotate_deg=45.0, flip=0.0))
    assert custom.affine == 0.0 and custom.rotate_deg == 45.0 and custom.noise == 0.9 and custom.flip == 0.0
    assert custom.blur == 0.3 and custom.gamma == 0.5
    own = AugmentConfig(noise=0.0)
    assert PseudoConfig("x", augment=own).student_augment(base) is own
    with pytest.raises(Med3DError):
        from med3d.config import from_dict

        from_dict({"data": {"datasets": {"A": {"path": "x", "pseudo": {"path": "p", "loss_weight": -1}}}}})


@pytest.mark.slow
def test_a_round_whose_scans_failed_is_made_again_not_reused(tmp_path, capsys):
    root = ball_dataset(tmp_path / "Task01_Ball", n_train=3, n_test=1)
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "good.nii.gz").write_bytes((root / "imagesTs" / "ball_003.nii.gz").read_bytes())
    (scans / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    cfg = ball_config(root, tmp_path, 2, val_fraction=0.34)
    cfg["validation"]["allow_none"] = False
    cfg["teacher_student"] = {"unlabelled": str(scans), "rounds": 1}
    path = _write(cfg, tmp_path / "ts.yaml")
    for _ in range(2):  # the second time the incomplete set is not taken as done
        refused(["teacher-student", str(path), "--quiet"], capsys,
                names=r"round 1: 1 unlabelled scan\(s\) could not be pseudo-labelled; first: broken")
    assert json.loads((tmp_path / "run" / "pseudo_1" / "pseudo_labels.json").read_text())["failed"]


def test_cached_pseudo_labels_follow_the_scan_through_crop_and_anisotropic_resampling(tmp_path):
    """The confidence is cropped and resampled exactly as the image: on a scan with a zero border and 5 mm
    slices resampled to 3 mm, whose intensity is the confidence itself, IGNORE falls where the cached image
    is under the threshold's intensity."""
    from med3d.data.cache import prepare_dataset
    from med3d.data.pseudo import pseudo_cache, read_pseudo_set

    rng = np.random.default_rng(0)
    shape = (12, 40, 36)  # (z, y, x), 5 mm slices of 0.7 mm pixels
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    conf = np.zeros(shape, np.float32)
    conf[2:10, 5:35, 4:30] = np.where(rng.random((8, 30, 26)) < 0.5, 0.6, 1.0)  # zero border: cropped away
    labels = (conf == 1.0).astype(np.uint8)
    root = tmp_path / "Task02_Slab"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        nib.save(nib.Nifti1Image((conf * 100).transpose(2, 1, 0), affine), root / "imagesTr" / f"s_{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), affine), root / "labelsTr" / f"s_{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Slab", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "ball"}, "numTraining": 2,
        "training": [{"image": f"./imagesTr/s_{i}.nii.gz", "label": f"./labelsTr/s_{i}.nii.gz"} for i in range(2)]}))
    done = prepare_dataset(root, tmp_path / "cache", progress=False, spacing=[3.0, 0.7, 0.7], check=False)
    pl = tmp_path / "pl"
    pl.mkdir()
    nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), affine), pl / "s_0.nii.gz")
    nib.save(nib.Nifti1Image(conf.transpose(2, 1, 0), affine), pl / "s_0_confidence.nii.gz")
    (pl / "pseudo_labels.json").write_text(json.dumps({
        "format": "med3d-pseudo-labels", "teacher": {"labels": {"0": "background", "1": "ball"}},
        "cases": [{"case_id": "s_0", "images": [str(root / "imagesTr" / "s_0.nii.gz")], "label": "s_0.nii.gz",
                   "confidence": "s_0_confidence.nii.gz"}]}))
    plan = json.loads((done.folder / "plan.json").read_text())
    folder = pseudo_cache(read_pseudo_set(str(pl), "pl"), plan, 0.8, str(tmp_path / "cache"), 0, False, "pl")
    seg = np.load(folder / "cases" / "s_0_seg.npy")[0]
    image = np.load(done.folder / "cases" / "s_0_data.npy")[0]  # the same scan, z-scored: monotone in conf
    assert seg.shape == image.shape and seg.shape[0] == 13  # cropped to 8 slices of 5 mm, resampled to 3 mm
    cut = (0.8 * 100 - float(conf[conf > 0].mean() * 100)) / float((conf[conf > 0] * 100).std())
    assert np.mean((seg == IGNORE) != (image < cut)) < 1e-3
    assert (seg == IGNORE).any() and set(np.unique(seg)) <= {IGNORE, 0, 1}


@pytest.mark.slow
def test_a_resumed_student_refuses_pseudo_labels_written_again(tmp_path, capsys):
    root = ball_dataset(tmp_path / "Task01_Ball", n_train=2, n_test=1)
    pl = fake_pseudo_labels(tmp_path / "pl", root / "imagesTs" / "ball_002.nii.gz", "ball_002")
    cfg = ball_config(root, tmp_path, 2)
    cfg["train"]["checkpoint_every"] = 1
    cfg["data"]["datasets"]["Ball"]["pseudo"] = {"path": str(pl)}
    path = _write(cfg, tmp_path / "s.yaml")
    assert main(["finetune", str(path), "--quiet", "--set", "train.iterations=1"]) == 0
    conf = pl / "ball_002_confidence.nii.gz"  # written again (another teacher, say): other data for the student
    _save(np.full(SHAPE, 0.5, np.float32), conf)
    os.utime(conf, ns=(conf.stat().st_atime_ns, conf.stat().st_mtime_ns + 10 ** 9))
    refused(["finetune", str(path), "--resume", "--quiet"], capsys,
            names=r"task Ball:pseudo: the pseudo-labels changed since the checkpoint was written")
