"""The Trainer's phases and the bugs just beyond the old tests: frozen stages across validation,
collectives on the rank's device, resume with overrides, cache naming and determinism, compute
dtype under autocast, the adapter input policy, task kinds."""
from __future__ import annotations

import datetime
import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from med3d.config import from_dict
from med3d.data import cache as cache_module
from med3d.data.cache import cache_folder, check_prepared, load_cache, prepare_dataset
from med3d.engine import distributed
from med3d.engine.checkpoints import load_training
from med3d.engine.distributed import DistInfo, mean_across
from med3d.engine.task_data import setup_data
from med3d.engine.trainer import Trainer, train
from med3d.errors import Med3DError

SPLEEN = ("Task09_SpleenDemo",)
FROZEN_KEYS = ("conv1.weight", "bn1.running_mean", "bn1.running_var", "layer1.0.bn1.running_mean",
               "layer1.0.conv2.weight")


def _encoder_state(trainer: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.encoder.state_dict().items()}


class Recorder(Trainer):
    """A trainer variant that snapshots the encoder after every step (one overridden phase)."""

    def after_step(self, loss: float) -> None:
        super().after_step(loss)
        self.snapshots.append((self.state.step, _encoder_state(self)))


@pytest.mark.slow
def test_frozen_stages_stay_frozen_across_validation_until_released(demo_root, tmp_path, cfg_dict):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={"iterations": 6, "checkpoint_every": 6},
                             validation={"every": 1, "hd95": False},
                             finetune={"freeze": ["stem", "layer1"], "unfreeze_at": 4}))
    trainer = Recorder(cfg, "finetune", progress=False, tensorboard=False)
    trainer.snapshots = []
    trainer.setup()
    start = _encoder_state(trainer)
    for step in trainer.steps():
        trainer.release_frozen(step)
        trainer.after_step(trainer.train_step(step))
        if step < 4:  # validated after every step; frozen BatchNorm must still be in eval mode
            assert not trainer.model.encoder.bn1.training and not trainer.model.encoder.layer1.training
            assert trainer.model.encoder.layer2.training
    trainer.end()
    trainer.close()
    for step, state in trainer.snapshots:
        for key in FROZEN_KEYS:
            same = torch.equal(state[key], start[key])
            assert same == (step <= 4), (step, key)  # released at step 4: step 5 onwards moves
        assert not torch.equal(state["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_training_step_computes_in_the_autocast_dtype(demo_root, tmp_path, cfg_dict, amp, dtype):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={"amp": amp, "iterations": 1}))
    trainer = Trainer(cfg, "pretrain", progress=False, tensorboard=False)
    trainer.setup()
    seen = []
    trainer.model.encoder.layer2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.model.heads["Task09_SpleenDemo"].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.steps()
    trainer.train_step(0)
    trainer.close()
    assert seen == [dtype, dtype]


@pytest.mark.slow
def test_train_threads_apply_to_the_run_and_are_given_back(demo_root, tmp_path, cfg_dict):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={"iterations": 1, "threads": 2}))
        trainer = Trainer(cfg, "pretrain", progress=False, tensorboard=False)
        trainer.setup()
        assert torch.get_num_threads() == 2
        trainer.close()
        assert torch.get_num_threads() == 1  # an in-process caller (the API, a notebook) keeps its own setting
    finally:
        torch.set_num_threads(before)


class _Stop(Exception):
    pass


def test_collectives_use_tensors_on_the_ranks_device(monkeypatch):
    devices = []

    def fake_all_reduce(t, *a, **k):  # NCCL refuses CPU tensors; record where the tensor lives
        devices.append(t.device)
        raise _Stop

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    with pytest.raises(_Stop):
        mean_across(DistInfo(rank=0, world=2, local_rank=0, device=torch.device("meta"), distributed=True), 1.0)
    assert devices == [torch.device("meta")]


def test_process_group_gets_a_timeout(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(k))
    info = distributed.init_distributed(timeout_s=77)
    assert info.rank == 1 and info.world == 2 and info.distributed
    assert calls[0]["timeout"] == datetime.timedelta(seconds=77)


@pytest.mark.slow
def test_resume_takes_extendable_overrides_and_refuses_the_rest(demo_root, tmp_path, cfg_dict):
    base = cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={"iterations": 4, "checkpoint_every": 2})
    train(from_dict(base), "pretrain", progress=False, tensorboard=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    longer = {**base, "train": {**base["train"], "iterations": 6}, "validation": {"every": 3, "hd95": False}}
    summary = train(from_dict(longer), "pretrain", resume=str(last), progress=False, tensorboard=False)
    assert summary["iterations"] == 6 and summary["resumed_from"] == 4
    assert load_training(last)["train_state"]["iteration"] == 6
    assert load_training(last)["config"]["train"]["iterations"] == 6
    other_lr = {**longer, "train": {**longer["train"], "lr": 0.5, "iterations": 8}}
    with pytest.raises(Med3DError, match=r"'train.lr' is 0.5 now but 0.01"):
        train(from_dict(other_lr), "pretrain", resume=str(last), progress=False, tensorboard=False)
    assert load_training(last)["train_state"]["iteration"] == 6  # nothing ran


def test_resume_reads_a_checkpoint_config_written_by_an_older_med3d(cfg_dict, demo_root, tmp_path):
    from med3d.config import to_dict
    from med3d.engine.resume import resume_config

    now = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN))
    old = to_dict(now)
    encoder = old["model"]["encoder"]
    encoder["kernel"] = {"3d": "3x3x3", "slicewise": "1x3x3"}[encoder.pop("conv")]  # the key's former name
    old["model"]["heads"]["Task09_SpleenDemo"].update(channels=None, dropout=None)  # nulls once written for defaults
    old["train"]["iterations"] = 2
    assert resume_config(old, now, Path("old.pt")).train.iterations == 4


@pytest.mark.slow
def test_resume_cannot_shorten_a_run(demo_root, tmp_path, cfg_dict):
    base = cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={"iterations": 4, "checkpoint_every": 4})
    train(from_dict(base), "pretrain", progress=False, tensorboard=False)
    shorter = {**base, "train": {**base["train"], "iterations": 2}}
    with pytest.raises(Med3DError, match="already at iteration 4"):
        train(from_dict(shorter), "pretrain", resume=str(tmp_path / "run" / "checkpoints" / "last.pt"),
              progress=False, tensorboard=False)


def test_symlinked_and_same_named_datasets_get_their_own_cache(demo_root, tmp_path):
    link = tmp_path / "links" / "Spleen"
    link.parent.mkdir()
    link.symlink_to(demo_root / "Task09_SpleenDemo", target_is_directory=True)
    r = prepare_dataset(link, tmp_path / "cache", progress=False)
    assert r.folder == cache_folder(tmp_path / "cache", demo_root / "Task09_SpleenDemo")
    assert check_prepared(demo_root / "Task09_SpleenDemo", tmp_path / "cache") == r.folder

    twin = tmp_path / "elsewhere" / "Task09_SpleenDemo"  # same folder name, other data
    shutil.copytree(demo_root / "Task09_SpleenDemo", twin)
    meta = json.loads((twin / "dataset.json").read_text())
    meta["training"] = meta["training"][:1]
    (twin / "dataset.json").write_text(json.dumps(meta))
    r2 = prepare_dataset(twin, tmp_path / "cache", progress=False)
    assert r2.folder != r.folder and r2.done == 1
    assert len(load_cache(r.folder)[1]) == 3 and len(load_cache(r2.folder)[1]) == 1


def test_resumed_prepare_writes_the_same_bytes_as_a_fresh_one(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "MAX_LOCS_PER_CLASS", 50)  # demo organs are small: make sampling happen
    fresh = prepare_dataset(demo_root / "Task03_LiverDemo", tmp_path / "a", progress=False).folder
    again = prepare_dataset(demo_root / "Task03_LiverDemo", tmp_path / "b", progress=False).folder
    # A kill before a case's .json (written last) leaves that case to redo: it is then first in the to-do list.
    victim = sorted((again / "cases").glob("*.json"))[-1]
    victim.unlink()
    (again / "cases" / f"{victim.stem}_locs.npz").unlink()
    redo = prepare_dataset(demo_root / "Task03_LiverDemo", tmp_path / "b", progress=False)
    assert redo.done == 1
    names = sorted(p.name for p in (fresh / "cases").iterdir())
    assert names == sorted(p.name for p in (again / "cases").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(fresh / "cases", again / "cases", names, shallow=False)
    assert not mismatch and not errors


def test_ranks_refuse_an_unprepared_cache_in_one_line(demo_root, tmp_path, cfg_dict):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN))
    with pytest.raises(Med3DError, match="med3d prepare .* before starting the ranks"):
        setup_data(cfg, DistInfo(rank=1, world=2))
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_cases_removed_from_the_dataset_leave_the_training_set(demo_root, tmp_path, cfg_dict):
    data = tmp_path / "Task09_SpleenDemo"
    shutil.copytree(demo_root / "Task09_SpleenDemo", data)
    cfg = from_dict({**cfg_dict(demo_root, tmp_path, tasks=SPLEEN),
                     "data": {**cfg_dict(demo_root, tmp_path, tasks=SPLEEN)["data"],
                              "datasets": {"Task09_SpleenDemo": {"path": str(data)}}}})
    setup = setup_data(cfg, DistInfo())
    assert sum(len(t.cases) for t in setup.tasks) + sum(len(v) for v in setup.val.values()) == 3
    meta = json.loads((data / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    (data / "dataset.json").write_text(json.dumps(meta))
    setup = setup_data(cfg, DistInfo())
    assert sum(len(t.cases) for t in setup.tasks) + sum(len(v) for v in setup.val.values()) == 2


@pytest.mark.slow
def test_adapter_input_policy_trains_a_per_task_input_conv(demo_root, tmp_path, cfg_dict):
    cfg = from_dict(cfg_dict(demo_root, tmp_path, tasks=("Task05_ProstateDemo",), train={"iterations": 2},
                             data={"input_policy": "adapter"}))
    trainer = Trainer(cfg, "pretrain", progress=False, tensorboard=False)
    trainer.setup()
    adapter = trainer.model.adapters["Task05_ProstateDemo"]
    assert tuple(adapter.weight.shape) == (1, 2, 1, 1, 1)  # both prostate channels into the 1-channel encoder
    before = adapter.weight.detach().clone()
    trainer.steps()
    trainer.train_step(0)
    trainer.close()
    assert not torch.equal(before, adapter.weight)  # it is trained with the rest
    assert trainer.data.plans["Task05_ProstateDemo"]["channels"] is None


def test_a_head_no_task_kind_trains_is_refused_in_one_line():
    from med3d.tasks import kind_for_head

    assert kind_for_head("classification", "k").name == "classification"
    assert kind_for_head("unet", "k").name == "segmentation"
    with pytest.raises(Med3DError, match="model.heads.x.type: 'detector' heads cannot be trained by med3d yet; "
                                         "trainable head types: classification, contrastive, med3d, restore, unet"):
        kind_for_head("detector", "model.heads.x.type")


def test_channel_map_from_the_config_shapes_the_first_conv(demo_root, tmp_path, cfg_dict):
    from med3d.api import create_model
    from med3d.engine.trainer import init_from_weights, preflight
    from med3d.export import export_encoder

    src = from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN))
    src.model.encoder.in_channels = 3
    donor = create_model(src)
    weights = export_encoder(donor, "safetensors", tmp_path / "rgb.safetensors")
    data = cfg_dict(demo_root, tmp_path, tasks=SPLEEN, finetune={"weights": str(weights), "channel_map": [2, "mean"]})
    data["model"]["encoder"]["in_channels"] = 2
    cfg = from_dict(data)
    preflight(cfg, "finetune")
    model = create_model(cfg)
    assert "mapped from the file's 3: [2, 'mean']" in init_from_weights(model, cfg)
    w = donor.encoder.conv1.weight
    torch.testing.assert_close(model.encoder.conv1.weight, torch.stack([w[:, 2], w.mean(1)], dim=1))

    cfg.finetune.channel_map = [0, 1, 2]
    with pytest.raises(Med3DError, match="channel_map has 3 entries but model.encoder.in_channels is 2"):
        preflight(cfg, "finetune")
    with pytest.raises(Med3DError, match=r"config key 'finetune.channel_map\[1\]'"):
        from_dict({**data, "finetune": {"weights": str(weights), "channel_map": [0, "max"]}})


def test_resume_on_fewer_gpus_restores_the_generators_it_can(monkeypatch, caplog):
    from med3d.engine import checkpoints
    state = {**checkpoints.rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 2}  # saved on two GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    checkpoints.set_rng_state(state)
    assert restored == [0] and "saved 2 GPU generator state(s), this machine has 1" in caplog.text


@pytest.mark.parametrize("key", ["log_every", "checkpoint_every"])
def test_zero_intervals_are_refused_before_any_work(demo_root, tmp_path, cfg_dict, key):
    # Refused when the config is validated (its ranges), so before train() could start anything.
    with pytest.raises(Med3DError, match=rf"config key 'train.{key}': must be a whole number >= 1, got 0"):
        from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={key: 0}))
    assert not (tmp_path / "cache").exists()


def test_a_non_finite_loss_on_any_rank_stops_every_rank(demo_root, tmp_path, cfg_dict, monkeypatch):
    trainer = Trainer(from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN)), "pretrain", progress=False,
                      tensorboard=False)
    trainer.setup()
    trainer.steps()
    # This rank's loss is finite; the other rank of a two-rank group reports a non-finite one.
    trainer.info = DistInfo(rank=0, world=2, local_rank=0, device=torch.device("cpu"), distributed=True)
    trainer.net = trainer.model  # no DDP wrapper without a process group
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.add_(1.0))
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    with pytest.raises(Med3DError, match="loss became non-finite at iteration 0"):
        trainer.train_step(0)
    trainer.close()


def test_bf16_steps_on_cpu_avoid_onednns_wrong_weight_gradient(demo_root, tmp_path, cfg_dict):
    # oneDNN's bf16 conv3d weight gradient is wrong for inputs two voxels deep with >= 16 channels
    # (a 16-slice patch at stride 8); the trainer's kernel choice must give the right one.
    trainer = Trainer(from_dict(cfg_dict(demo_root, tmp_path, tasks=SPLEEN, train={"amp": "bf16"})), "pretrain",
                      progress=False, tensorboard=False)
    trainer.setup()
    torch.manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 16, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(2, 16, 2, 4, 4, dtype=torch.bfloat16)
    with trainer.kernels():
        got, = torch.autograd.grad(torch.nn.functional.conv3d(x, w, padding=1), w, gy)
    want = torch.nn.grad.conv3d_weight(x.detach().float(), w.shape, gy.float(), padding=1)
    assert float((got.float() - want).abs().max() / want.abs().max()) < 0.02
    trainer.close()
