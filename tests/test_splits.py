"""Cross-validation splits (grouped, stratified, stable, user files) and honest validation (named cases,
split.json, no run without validation unless asked)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from med3d.config import from_dict
from med3d.data.splits import make_folds, read_groups, read_splits
from med3d.engine.trainer import preflight, train
from med3d.errors import Med3DError

SPLEEN = ("Task09_SpleenDemo",)


def _ids(n):
    return [f"case_{i:03d}" for i in range(n)]


def test_no_patient_is_on_both_sides_of_any_fold():
    rng = np.random.default_rng(3)
    ids = _ids(60)
    groups = {c: f"p{rng.integers(0, 17)}" for c in ids[:50]}  # 17 patients with 1..n scans, 10 scans without
    folds = make_folds(ids, 5, seed=0, groups=groups)
    for fold in folds:
        train_patients = {groups[c] for c in fold["train"] if c in groups}
        assert not train_patients & {groups[c] for c in fold["val"] if c in groups}
        assert set(fold["train"]) | set(fold["val"]) == set(ids) and not set(fold["train"]) & set(fold["val"])
    assert sorted(c for f in folds for c in f["val"]) == sorted(ids)  # each case validated exactly once


def test_folds_are_stable_for_a_seed_and_ignore_input_order():
    ids = _ids(23)
    a = make_folds(ids, 4, seed=7)
    assert a == make_folds(list(reversed(ids)), 4, seed=7)
    assert a != make_folds(ids, 4, seed=8)
    assert sorted(len(f["val"]) for f in a) == [5, 6, 6, 6]


def test_folds_stratify_classes():
    ids = _ids(40)
    labels = {c: (0 if i < 30 else 1 if i < 37 else 2) for i, c in enumerate(ids)}  # 30 / 7 / 3
    folds = make_folds(ids, 3, seed=1, labels=labels)
    for cls, total in Counter(labels.values()).items():
        per_fold = [sum(labels[c] == cls for c in f["val"]) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (cls, per_fold)


def test_grouped_folds_still_spread_a_rare_class_evenly():
    # Patients of two cases each; two patients hold 2 positives each, five hold 1: 9 positives in 50 cases.
    ids = _ids(50)
    positive = {1, 2, 3, 4, 17, 35, 40, 43, 45}
    labels = {c: int(i in positive) for i, c in enumerate(ids)}
    groups = {c: f"p{i // 2}" for i, c in enumerate(ids)}
    for seed in range(6):
        per_fold = [sum(labels[c] for c in f["val"]) for f in make_folds(ids, 5, seed, groups, labels)]
        assert max(per_fold) - min(per_fold) <= 1, (seed, per_fold)


def test_too_many_folds_for_the_patients_is_refused():
    with pytest.raises(Med3DError, match="data.folds 4.*3 here"):
        make_folds(_ids(6), 4, seed=0, groups={c: f"p{i % 3}" for i, c in enumerate(_ids(6))})


def test_groups_are_read_from_dataset_json_nnunet_entries_and_csv(tmp_path):
    msd = tmp_path / "msd"
    msd.mkdir()
    (msd / "dataset.json").write_text(json.dumps({
        "training": [{"image": "./imagesTr/a_1.nii.gz", "label": "x", "patient": "P1"},
                     {"image": ["./imagesTr/b.nii.gz"], "class": 0, "group": 7},
                     {"image": "./imagesTr/c.nii.gz", "label": "y"}],
        "groups": {"d": "P9"}}))
    assert read_groups(msd) == {"a_1": "P1", "b": "7", "d": "P9"}
    nnunet = tmp_path / "nn" / "dataset.json"
    nnunet.parent.mkdir()
    nnunet.write_text(json.dumps({"dataset": {"x_01": {"images": [], "label": "l", "patient": "A"}}}))
    assert read_groups(nnunet) == {"x_01": "A"}
    nnunet.write_text(json.dumps({"dataset": ["not", "a", "mapping"], "training": ["./imagesTr/x.nii.gz"]}))
    assert read_groups(nnunet) == {}  # another tool's 'dataset' key: no groups, no traceback
    table = tmp_path / "t.csv"
    table.write_text("image,class,Patient\nscans/u.nii.gz,0,P2\nscans/v.nrrd;scans/v2.nrrd,1,P2\n")
    assert read_groups(table) == {"u": "P2", "v": "P2"}


def test_a_user_splits_file_is_read_and_checked(tmp_path):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]))
    assert read_splits(path, ["a", "b", "c"])[1] == {"train": ["c"], "val": ["a", "b"]}
    with pytest.raises(Med3DError, match="fold 0 val names case 'c'"):
        read_splits(path, ["a", "b"])
    path.write_text(json.dumps([{"train": ["a"], "val": ["a"]}]))
    with pytest.raises(Med3DError, match="'a' in both"):
        read_splits(path, ["a"])
    path.write_text(json.dumps({"train": []}))
    with pytest.raises(Med3DError, match="JSON list"):
        read_splits(path, ["a"])


@pytest.mark.parametrize("data, message", [
    ({"folds": 3}, "data.fold is not"),
    ({"folds": 3, "fold": 0, "val_cases": ["x"]}, "keep one"),
    ({"folds": 1, "fold": 0}, "at least 2"),
    ({"folds": 3, "fold": 3}, "numbered 0..2"),
    ({"fold": 5}, "numbered 0..4"),  # data.folds unset: nnU-Net's 5
    ({"val_fraction": 0.0}, "no validation case"),
])
def test_split_keys_that_do_not_fit_fail_at_preflight(demo_root, tmp_path, cfg_dict, data, message):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN, data=data))
    with pytest.raises(Med3DError, match=message):
        preflight(cfg, "finetune")


def test_cross_validation_of_several_datasets_is_refused(demo_root, tmp_path, cfg_dict):
    with pytest.raises(Med3DError, match="split one dataset"):
        preflight(from_dict(cfg_dict(demo_root, tmp_path, data={"folds": 2, "fold": 0})), "pretrain")


# ---------------------------------------------------------------- through training

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "med3d.cli", *args], capture_output=True, text=True)


def _tiny(cfg_dict, demo_root, tmp, **sections):
    """One spleen task, 1 iteration, one validated case: just enough to see which cases each side got."""
    data = cfg_dict(demo_root, tmp, tasks=SPLEEN, train={"iterations": 1, "checkpoint_every": 1},
                    validation={"every": 0, "hd95": False, "max_cases": 1})
    for section, values in sections.items():
        data[section].update(values)
    return data


@pytest.mark.slow
def test_fold_trains_on_exactly_that_folds_cases(demo_root, tmp_path, cfg_dict):
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(_tiny(cfg_dict, demo_root, tmp_path, data={"folds": 3})))
    r = _cli("finetune", str(path), "--fold", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run" / "fold_1"
    folds = json.loads((run / "splits_final.json").read_text())
    split = json.loads((run / "split.json").read_text())[SPLEEN[0]]
    assert sorted(split["train"]) == folds[1]["train"] and sorted(split["val"]) == folds[1]["val"]
    assert "iteration 1: validation score" in r.stdout + r.stderr  # validation reaches the terminal
    assert (tmp_path / "run" / "fold_summary.md").is_file() and (tmp_path / "run" / "fold_summary.csv").is_file()


@pytest.mark.slow
def test_a_user_splits_file_and_named_validation_cases_are_honoured(demo_root, tmp_path, cfg_dict):
    ids = ["spleendemo_000", "spleendemo_001", "spleendemo_002"]
    user = tmp_path / "mine.json"
    user.write_text(json.dumps([{"train": ids[:2], "val": ids[2:]}, {"train": [ids[2]], "val": [ids[0]]}]))
    train(from_dict(_tiny(cfg_dict, demo_root, tmp_path, data={"splits_file": str(user), "fold": 1})),
          "finetune", progress=False, tensorboard=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())[SPLEEN[0]]
    assert (split["train"], split["val"]) == ([ids[2]], [ids[0]])  # spleendemo_001 in neither: left out
    shutil.rmtree(tmp_path / "run")
    train(from_dict(_tiny(cfg_dict, demo_root, tmp_path, data={"val_cases": [ids[1]]})),
          "finetune", progress=False, tensorboard=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())[SPLEEN[0]]
    assert split["val"] == [ids[1]] and sorted(split["train"]) == [ids[0], ids[2]]


@pytest.mark.slow
def test_no_validation_fails_before_training_unless_allowed(demo_root, tmp_path, cfg_dict):
    ids = ["spleendemo_000", "spleendemo_001", "spleendemo_002"]
    empty = tmp_path / "empty_val.json"
    empty.write_text(json.dumps([{"train": ids, "val": []}]))  # known only once the dataset is read
    with pytest.raises(Med3DError, match="task Task09_SpleenDemo has no validation case"):
        train(from_dict(_tiny(cfg_dict, demo_root, tmp_path, data={"splits_file": str(empty), "fold": 0})),
              "finetune", progress=False, tensorboard=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step
    cfg = _tiny(cfg_dict, demo_root, tmp_path, data={"val_cases": []})
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _cli("finetune", str(path), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("med3d finetune: error: data.val_cases is empty")
    cfg["validation"]["allow_none"] = True
    path.write_text(yaml.safe_dump(cfg))
    r = _cli("finetune", str(path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("no validation") == 2 and "nan" not in out  # said at the start and at the end
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_classification_folds_keep_patients_together_and_its_ensemble_averages(tmp_path):
    from med3d.data.demo import write_nodule_demo
    from med3d.data.image import read_channels
    from med3d.inference import Predictor
    from med3d.inference.classify import classify
    from med3d.inference.ensemble import Ensemble

    root = write_nodule_demo(tmp_path / "nod", n_train=12, n_test=1, seed=0)
    meta = json.loads((root / "dataset.json").read_text())
    for i, entry in enumerate(meta["training"]):
        entry["patient"] = f"P{i // 2}"  # two scans per patient
    (root / "dataset.json").write_text(json.dumps(meta))
    task = root.name
    cfg = {"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                     "heads": {task: {"type": "classification", "num_classes": 2}}},
           "data": {"datasets": {task: {"path": str(root), "spacing": [3.0, 3.0, 3.0]}}, "folds": 3, "fold": 2,
                    "cache_dir": str(tmp_path / "cache"), "patch_size": [16, 16, 16], "workers": 0},
           "run": {"out_dir": str(tmp_path / "run")}, "train": {"iterations": 1, "batch_size": 2},
           "validation": {"hd95": False}}
    train(from_dict(cfg), "finetune", progress=False, tensorboard=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())[task]
    patient = {Path(e["image"]).name.split(".")[0]: e["patient"] for e in meta["training"]}
    label = {Path(e["image"]).name.split(".")[0]: e["class"] for e in meta["training"]}
    assert len(split["val"]) == 4 and not {patient[c] for c in split["train"]} & {patient[c] for c in split["val"]}
    assert "stratified by class, grouped by the 6 declared patients" in split["how"]
    assert abs(sum(label[c] for c in split["val"]) - sum(label.values()) / 3) <= 1  # classes spread over folds

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    scan = read_channels([root / meta["test"][0]["image"] if isinstance(meta["test"][0], dict)
                          else root / meta["test"][0]])
    one = classify(Predictor.from_checkpoint(ckpt, "cpu"), scan, task)
    two = Ensemble.from_checkpoints([ckpt, ckpt], "cpu").classify(scan, task)
    assert np.allclose(one.probabilities, two.probabilities, atol=1e-6) and one.predicted == two.predicted


def test_fold_summary_tabulates_every_finished_fold(tmp_path):
    from med3d.study.crossval import parse_folds, write_fold_summary

    for fold, dice in ((0, 0.6), (1, 0.8), (10, 0.7)):
        run = tmp_path / f"fold_{fold}"
        run.mkdir()
        final = {"score": dice, "mean_dice": dice, "tasks": {"t": {"dice": {"spleen": dice}, "score": dice}}}
        (run / "summary.json").write_text(json.dumps({"final": final, "best": {"metric": dice, "iteration": 4},
                                                      "iterations": 4, "seconds": 1.0, "history": []}))
        (run / "split.json").write_text(json.dumps({"t": {"train": ["a", "b"], "val": ["c"]}}))
    (tmp_path / "fold_2").mkdir()  # started, not finished: left out
    rows = write_fold_summary(tmp_path)
    assert [r["fold"] for r in rows] == ["0", "1", "10"] and rows[0]["n_train"] == 2
    text = (tmp_path / "fold_summary.md").read_text()
    assert "| final | 0.700 | 0.100 | 0.600 | 0.800 |" in text and "| dice_spleen | 0.700 |" in text
    assert (tmp_path / "fold_summary.csv").read_text().splitlines()[0].startswith("fold,n_train,n_val,final,best")
    assert parse_folds("all", 3) == [0, 1, 2] and parse_folds("2,0", 3) == [2, 0]
    with pytest.raises(Med3DError, match="numbered 0..2"):
        parse_folds("3", 3)


def test_a_training_size_above_the_training_set_says_so(caplog):
    from dataclasses import replace
    from types import SimpleNamespace

    from med3d.engine.task_data import choose_split

    cfg = from_dict({})
    cfg = replace(cfg, data=replace(cfg.data, train_cases=10, val_fraction=0.2))
    cases = [SimpleNamespace(case_id=f"c{i}") for i in range(5)]
    with caplog.at_level("WARNING", logger="med3d.train"):
        train, val, _, _ = choose_split(cases, cfg, "spleen", classify=False)
    assert (len(train), len(val)) == (4, 1)
    assert "data.train_cases 10 is more than its 4 training cases" in caplog.text


def test_fold_summary_leaves_out_a_fold_trained_under_another_config(tmp_path, caplog):
    from dataclasses import replace

    from med3d.config import save_resolved
    from med3d.study.crossval import fold_config, write_fold_summary

    cfg = from_dict({"data": {"folds": 2}, "run": {"out_dir": str(tmp_path)}})
    for fold, lr in ((0, cfg.train.lr), (1, 0.5)):
        run = fold_config(replace(cfg, train=replace(cfg.train, lr=lr)), fold, tmp_path)
        save_resolved(run, run.run.out_dir)
        (Path(run.run.out_dir) / "summary.json").write_text(json.dumps(
            {"final": {"score": 0.5, "tasks": {}}, "best": {}, "iterations": 4, "history": []}))
    with caplog.at_level("WARNING", logger="med3d.study"):
        rows = write_fold_summary(tmp_path, cfg)
    assert [r["fold"] for r in rows] == ["0"] and "train.lr: 0.5 -> 0.01" in caplog.text
    assert len(write_fold_summary(tmp_path)) == 2  # without a config to compare with, every fold counts
