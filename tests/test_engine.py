"""Training engine: multi-task pretraining, fine-tuning, AMP, DDP through torchrun, exact resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from med3d.api import create_model
from med3d.checkpoint import load_checkpoint
from med3d.config import from_dict, to_dict
from med3d.data.cache import load_cache, prepare_dataset
from med3d.data.sampler import MixSchedule, PatchBatches, TaskData
from med3d.tasks.segmentation import SegLoss
from med3d.engine.optim import lr_factor
from med3d.engine.checkpoints import load_training
from med3d.engine.trainer import train
from med3d.export import export_encoder
from helpers import kill_after_checkpoint, launch_ranks

def write_cfg(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def params(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def pretrained(demo_root, tmp_path_factory, cfg_dict):
    """A short two-task pretraining run, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("pre")
    summary = train(from_dict(cfg_dict(demo_root, tmp, validation={"every": 2, "hd95": True})), "pretrain",
                    progress=False, tensorboard=True)
    return tmp / "run", summary


@pytest.mark.slow
def test_pretraining_writes_everything_a_user_looks_for(pretrained):
    run, summary = pretrained
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plans.json", "checkpoints/last.pt",
                 "checkpoints/best.pt", "curves.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert sorted(summary["final"]["tasks"]) == ["Task03_LiverDemo", "Task05_ProstateDemo"]
    liver = summary["final"]["tasks"]["Task03_LiverDemo"]
    assert set(liver["dice"]) == {"liver", "cancer"} and set(liver["hd95"]) == {"liver", "cancer"}
    assert [h["iteration"] for h in summary["history"]] == [2, 4]
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*.pt")) == ["iter_000002.pt", "iter_000004.pt"]
    model, cfg, meta = load_checkpoint(run / "checkpoints" / "last.pt")
    assert model.tasks == ["Task03_LiverDemo", "Task05_ProstateDemo"]
    assert meta["plans"]["Task03_LiverDemo"]["normalization"][0]["scheme"] == "ct"
    assert load_training(run / "checkpoints" / "last.pt")["train_state"]["iteration"] == 4


@pytest.mark.slow
def test_loss_decreases_on_a_fixed_batch(demo_root, tmp_path, cfg_dict):
    r = prepare_dataset(demo_root / "Task09_SpleenDemo", tmp_path, progress=False)
    plan, cases = load_cache(r.folder)
    ds = PatchBatches([TaskData("s", cases, plan)], MixSchedule(["s"], [3]), (16, 32, 32), 2, 1.0, None)
    batch = ds[(0, 0)]
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",)))
    torch.manual_seed(0)
    model = create_model(cfg)
    model.heads["s"] = model.heads.pop("Task09_SpleenDemo")
    loss_fn = SegLoss("dice_ce")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(model(batch["image"], "s"), batch["label"])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.4 * losses[0]


@pytest.mark.slow
def test_finetune_from_an_export_with_frozen_stages_and_lr_multipliers(pretrained, demo_root, tmp_path, cfg_dict):
    run, _ = pretrained
    model, _, _ = load_checkpoint(run / "checkpoints" / "last.pt")
    enc = export_encoder(model, "safetensors", tmp_path / "enc.safetensors")
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",),
                             finetune={"weights": str(enc), "freeze": ["stem", "layer1"], "encoder_lr_mult": 0.1,
                                       "head_lr_mult": 10.0},
                             data={"train_cases": 1}))
    train(cfg, "finetune", progress=False)
    tuned, tcfg, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    after = tuned.encoder.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.running_var"):
        assert torch.equal(after[key], before[key]), key  # frozen: weights and BN statistics kept
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    report = (tmp_path / "run" / "load_report.txt").read_text()
    assert "loaded" in report and "Task09_SpleenDemo" in report
    state = load_training(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"]
    lrs = [g["initial_lr"] for g in state["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([0.001, 0.1])


@pytest.mark.slow
def test_unfreeze_at_releases_the_stages(pretrained, demo_root, tmp_path, cfg_dict):
    run, _ = pretrained
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",),
                             finetune={"weights": str(run / "checkpoints" / "last.pt"), "freeze": ["stem"],
                                       "unfreeze_at": 2}))
    start = load_checkpoint(run / "checkpoints" / "last.pt")[0].encoder.conv1.weight.detach().clone()
    train(cfg, "finetune", progress=False)
    end = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")[0].encoder.conv1.weight
    assert not torch.equal(start, end)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(demo_root, tmp_path, amp, cfg_dict):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",), train={"amp": amp, "iterations": 2}))
    summary = train(cfg, "pretrain", progress=False, tensorboard=False)
    assert np.isfinite(summary["final"]["mean_dice"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert losses and all(np.isfinite(losses))


def test_ignore_label_takes_those_voxels_out_of_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, 6)
    target = torch.randint(0, 3, (2, 1, 4, 6, 6))
    target[:, :, :2] = 255
    other = logits.clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 6, 6) * 10  # only ignored voxels change
    for kind in ("dice_ce", "focal", "dice_focal"):
        loss = SegLoss(kind, ignore_label=255)
        assert float(loss(logits, target)) == pytest.approx(float(loss(other, target)), rel=1e-5), kind


def test_learning_rate_schedules():
    assert lr_factor(0, 100, "poly", 0) == 1.0
    assert lr_factor(50, 100, "poly", 0) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(50, 100, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(4, 100, "poly", 10) == pytest.approx(0.5)  # warm-up: (4 + 1) / 10
    assert lr_factor(99, 100, "constant", 0) == 1.0


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "med3d.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(demo_root, tmp_path, cfg_dict):
    base = cfg_dict(demo_root, tmp_path, train={"iterations": 3, "batch_size": 4, "checkpoint_every": 3})
    one = write_cfg(tmp_path / "one.yaml", {**base, "run": {"out_dir": str(tmp_path / "one"), "seed": 0},
                                            "train": {**base["train"], "accumulate": 2}})
    two = write_cfg(tmp_path / "two.yaml", {**base, "run": {"out_dir": str(tmp_path / "two"), "seed": 0}})
    # The ranks only check the cache: it is prepared before they start, from the config's own datasets.
    prep = _cli("prepare", "--config", str(two), "--quiet")
    assert prep.returncode == 0 and "3 case(s) prepared" in prep.stdout, prep.stderr[-2000:]
    r1 = _cli("pretrain", str(one), "--quiet")
    assert r1.returncode == 0, r1.stderr[-2000:]
    # Two ranks joined as torchrun joins them (env://), pinned to the loopback; a hang fails with their stacks.
    codes, outs, errs = launch_ranks(["med3d.cli", "pretrain", str(two), "--quiet"], world=2)
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    assert "x2)" in outs[0]  # the summary says two processes took part
    a = params(load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")[0])
    b = params(load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")[0])
    start = params(create_model(from_dict(base)))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4 < moved


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(demo_root, tmp_path, cfg_dict):
    base = cfg_dict(demo_root, tmp_path, train={"iterations": 20, "checkpoint_every": 1, "threads": 2},
                    data={"augment": {"affine": 0.5, "noise": 0.5}})
    full = from_dict({**base, "run": {"out_dir": str(tmp_path / "full"), "seed": 0}})
    train(full, "pretrain", progress=False, tensorboard=False)

    cfg = write_cfg(tmp_path / "b.yaml", {**base, "run": {"out_dir": str(tmp_path / "b"), "seed": 0}})
    ckpts = tmp_path / "b" / "checkpoints"
    kill_after_checkpoint(["med3d.cli", "pretrain", str(cfg), "--quiet"], ckpts, 3)
    state = load_training(ckpts / "last.pt")  # the latest checkpoint is whole, whatever the kill hit
    stopped = state["train_state"]["iteration"]
    assert 2 <= stopped < 20, "the run was not interrupted mid-way"  # last.pt follows iter_N.pt
    assert _cli("pretrain", str(cfg), "--quiet", "--resume").returncode == 0

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ckpts / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("change, message", [
    ({"data": {"datasets": {"Task03_LiverDemo": {"path": "/nonexistent/Task03"}}}},
     "data.datasets.Task03_LiverDemo.path: dataset /nonexistent/Task03 not found"),
    ({"model": {"heads": {"Task03_LiverDemo": {"type": "med3d", "num_classes": 3}}}},
     "data.datasets.Task05_ProstateDemo: no head for this task"),
    ({"finetune": {"weights": "/nonexistent/enc.safetensors"}}, "finetune.weights: /nonexistent/enc.safetensors"),
    ({"train": {"learning_rate": 0.1}}, "unknown config key 'train.learning_rate'"),
])
@pytest.mark.slow
def test_bad_config_fails_before_training_with_one_line(demo_root, tmp_path, change, message, cfg_dict):
    data = cfg_dict(demo_root, tmp_path)
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    cfg = write_cfg(tmp_path / "bad.yaml", data)
    r = _cli("finetune", str(cfg), "--quiet")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_head_with_the_wrong_class_count_is_named(demo_root, tmp_path, cfg_dict):
    data = cfg_dict(demo_root, tmp_path, tasks=("Task09_SpleenDemo",))
    data["model"]["heads"]["Task09_SpleenDemo"]["num_classes"] = 5
    r = _cli("pretrain", str(write_cfg(tmp_path / "c.yaml", data)), "--quiet")
    assert r.returncode == 2 and "model.heads.Task09_SpleenDemo.num_classes is 5" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_round_trip_keeps_new_sections(demo_root, tmp_path, cfg_dict):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, finetune={"freeze": ["stem"]}))
    assert from_dict(to_dict(cfg)) == cfg
