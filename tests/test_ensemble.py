"""Ensembles in med3d predict: averaged softmax before the argmax, the members recorded, one plan only."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from med3d.checkpoint import load_checkpoint, save_checkpoint
from med3d.config import from_dict
from med3d.data.image import read_channels, read_image
from med3d.engine.trainer import train
from med3d.errors import Med3DError
from med3d.inference import Predictor
from med3d.inference.ensemble import Ensemble, check_same_plan

SPLEEN = "Task09_SpleenDemo"


@pytest.fixture(scope="module")
def two_ckpts(demo_root, tmp_path_factory, cfg_dict):
    """Checkpoints after iteration 1 and 2 of one tiny run: two different models on one plan."""
    tmp = tmp_path_factory.mktemp("ens")
    cfg = cfg_dict(demo_root, tmp, tasks=(SPLEEN,), train={"iterations": 2, "checkpoint_every": 1, "keep_last": 2},
                   validation={"every": 0, "hd95": False, "max_cases": 1})
    cfg["data"]["datasets"][SPLEEN]["spacing"] = [5.0, 3.0, 3.0]  # a coarse grid keeps whole-scan passes quick
    cfg["data"]["patch_size"] = [24, 48, 48]
    train(from_dict(cfg), "finetune", progress=False, tensorboard=False)
    folder = tmp / "run" / "checkpoints"
    return folder / "iter_000001.pt", folder / "iter_000002.pt"


def _scan(demo_root: Path) -> Path:
    return sorted((demo_root / SPLEEN / "imagesTs").iterdir())[0]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "med3d.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_an_ensemble_of_two_identical_checkpoints_equals_one(two_ckpts, demo_root, tmp_path):
    ckpt, scan = two_ckpts[1], _scan(demo_root)
    one = _cli("predict", str(ckpt), str(scan), "--out", str(tmp_path / "one"), "--probabilities", "--quiet")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli("predict", str(ckpt), str(scan), "--ensemble", str(ckpt), "--out", str(tmp_path / "two"),
               "--probabilities", "--quiet")
    assert two.returncode == 0, two.stderr[-2000:]
    for name in (scan.name, scan.name.replace(".nii.gz", "_probs.nii.gz")):
        a, b = read_image(tmp_path / "one" / name).array, read_image(tmp_path / "two" / name).array
        assert np.array_equal(a, b), name
    record = json.loads((tmp_path / "two" / "ensemble.json").read_text())
    assert [m["checkpoint"] for m in record["members"]] == [str(ckpt.resolve())] * 2 and record["task"] == SPLEEN
    assert not (tmp_path / "one" / "ensemble.json").exists()


@pytest.mark.slow
def test_an_ensemble_averages_the_members_probabilities(two_ckpts, demo_root):
    image = read_channels([_scan(demo_root)])
    singles = [Predictor.from_checkpoint(c, "cpu")(image, probabilities=True) for c in two_ckpts]
    assert not np.allclose(singles[0].probabilities, singles[1].probabilities, atol=1e-3)  # really two models
    both = Ensemble.from_checkpoints(two_ckpts, "cpu")(image, probabilities=True)
    mean = (singles[0].probabilities + singles[1].probabilities) / 2
    assert np.allclose(both.probabilities, mean, atol=1e-4)
    assert np.array_equal(both.labels, np.argmax(both.probabilities, 0))


@pytest.mark.slow
def test_checkpoints_with_another_plan_are_refused_in_one_line(two_ckpts, demo_root, tmp_path):
    a = Predictor.from_checkpoint(two_ckpts[0], "cpu")
    other = copy.deepcopy(a.meta)
    other["plans"][SPLEEN]["target_spacing"] = [1.0, 1.0, 1.0]
    with pytest.raises(Med3DError, match="target_spacing"):
        check_same_plan(a, Predictor(a.model, other, a.device), "a.pt", "b.pt")
    model, cfg, meta = load_checkpoint(two_ckpts[0])
    meta = copy.deepcopy(meta)
    meta["plans"][SPLEEN]["plan_hash"] = "another"
    changed = save_checkpoint(tmp_path / "other.pt", model, cfg, meta)
    r = _cli("predict", str(two_ckpts[0]), str(_scan(demo_root)), "--ensemble", str(changed),
             "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"med3d predict: error: {changed}: task {SPLEEN}'s plan")
