"""Bad-input corpus, class 3 (runs are not clobbered) and class 9 (interrupted jobs leave nothing behind).

A training into a folder that holds a run is refused unless it resumes or overwrites it; two
trainings cannot share a folder (``run.lock`` names the owner, a stale one is taken over); an
overwritten run's metrics never mix with the new run's. Temporary files of killed writers are
removed by the next write into their folder; outputs follow the umask; a full disk is one line.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from badinput import refused
from med3d.atomic import atomic_path, remove_stale_temps, write_json_atomic
from med3d.engine.distributed import DistInfo, main_decides
from med3d.engine.logger import read_metrics, trim_metrics
from med3d.engine.runlock import LOCK_NAME, RunLock, claim_run_folder
from med3d.errors import Med3DError

SHAPE = (12, 14, 10)


def make_dataset(root: Path, n: int = 2) -> Path:
    """A tiny Decathlon dataset (one MR channel, labels 0/1)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        lab = np.zeros(SHAPE, np.uint8)
        lab[3:9, 3:9, 2:7] = 1
        nib.save(nib.Nifti1Image(rng.normal(100, 20, SHAPE).astype(np.float32), np.diag([2.0, 2, 3, 1])),
                 root / "imagesTr" / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2, 3, 1])), root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Gen", "modality": {"0": "MRI"}, "training": training,
                                                   "labels": {"0": "background", "1": "organ"}}))
    return root


def config(tmp: Path, out: Path, iterations: int = 1, dataset: Path | None = None) -> Path:
    """A pretrain config of a few iterations on a tiny dataset into ``out``."""
    cfg = {"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                     "heads": {"gen": {"type": "med3d", "num_classes": 2}}},
           "data": {"datasets": {"gen": {"path": str(dataset or tmp / "ds")}}, "cache_dir": str(tmp / "cache"),
                    "patch_size": [16, 16, 16], "workers": 0, "val_fraction": 0.0},
           "run": {"out_dir": str(out)},
           "train": {"iterations": iterations, "batch_size": 2, "log_every": 1, "checkpoint_every": 1},
           "validation": {"every": 0, "allow_none": True}}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds")


def old_run(folder: Path, *names: str) -> Path:
    """A run folder holding the named files of an earlier run."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text('{"kind": "train", "iteration": 1, "loss": 9.0}\n')
    return folder


# ---------------------------------------------------------------- class 3: refusals (no training needed)

@pytest.mark.corpus
@pytest.mark.parametrize("job,files", [
    ("pretrain", ["metrics.jsonl"]),
    ("finetune", ["checkpoints/last.pt", "config.yaml"]),
    ("pretrain", ["checkpoints/iter_000002.pt"]),
    ("finetune", ["summary.json"]),
], ids=["metrics", "last-and-config", "iter-only", "summary"])
def test_training_into_a_folder_holding_a_run_is_refused(tmp_path, capsys, ds, job, files):
    run = old_run(tmp_path / "run", *files)
    refused([job, config(tmp_path, run), "--quiet"], capsys,
            names=rf"run\.out_dir {run}: already holds a run \(.*{files[0]}.*--resume.*--overwrite",
            inputs=[run, ds], watch=tmp_path)
    assert not (run / LOCK_NAME).exists()


@pytest.mark.corpus
def test_overwrite_that_would_delete_the_weights_it_finetunes_from_is_refused(tmp_path, capsys, ds):
    run = old_run(tmp_path / "run", "metrics.jsonl", "checkpoints/last.pt")
    cfg = config(tmp_path, run)
    data = yaml.safe_load(cfg.read_text())
    data["finetune"] = {"weights": str(run / "checkpoints" / "last.pt")}
    cfg.write_text(yaml.safe_dump(data))
    refused(["finetune", cfg, "--quiet", "--overwrite"], capsys,
            names=rf"--overwrite: {run / 'checkpoints' / 'last.pt'} is part of the run .* reads it",
            inputs=[run, ds], watch=tmp_path)


@pytest.mark.corpus
def test_resume_and_overwrite_together_are_refused(tmp_path, capsys, ds):
    run = old_run(tmp_path / "run", "metrics.jsonl")
    refused(["pretrain", config(tmp_path, run), "--resume", "--overwrite"], capsys,
            names=r"--resume .* --overwrite .*give one", inputs=[run], watch=tmp_path)


@pytest.mark.corpus
def test_a_second_training_while_the_first_holds_the_folder_is_refused(tmp_path, capsys, ds):
    run = tmp_path / "run"
    with RunLock(run):  # the first training, as far as the folder can tell
        refused(["pretrain", config(tmp_path, run), "--quiet", "--overwrite"], capsys,
                names=rf"another training is writing into it \(pid {os.getpid()} on {socket.gethostname()}",
                inputs=[run], watch=tmp_path)
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()  # the holder's file untouched
    assert not (run / LOCK_NAME).exists()


@pytest.mark.corpus
def test_folds_into_folders_holding_runs_are_refused(tmp_path, capsys):
    run = tmp_path / "cv"
    old_run(run / "fold_0", "metrics.jsonl")
    make_dataset(tmp_path / "ds", n=4)
    refused(["pretrain", config(tmp_path, run), "--quiet", "--fold", "0"], capsys,
            names=rf"run\.out_dir {run / 'fold_0'}: already holds a run", inputs=[run / "fold_0"], watch=tmp_path)


@pytest.mark.corpus
def test_run_out_dir_that_is_a_file_is_refused(tmp_path, capsys, ds):
    run = tmp_path / "run"
    run.write_text("not a folder")
    refused(["pretrain", config(tmp_path, run), "--quiet"], capsys, names=rf"run\.out_dir {run}: cannot be created",
            inputs=[run], watch=tmp_path)


@pytest.mark.corpus
def test_the_lock_is_released_when_training_fails_after_taking_it(tmp_path, capsys):
    """The dataset is missing: found after the lock was taken, and the lock goes with the error."""
    run = tmp_path / "run"
    refused(["pretrain", config(tmp_path, run), "--quiet"], capsys, names=r"ds", watch=tmp_path,
            allowed=[tmp_path / "cache"])
    assert not (run / LOCK_NAME).exists()


# ---------------------------------------------------------------- class 3: the lock itself

def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="med3d.train"):
        lock = claim_run_folder(run, resume=False, overwrite=False)
    try:
        assert "stale lock" in caplog.text and f"pid {dead}" in caplog.text and "no longer running" in caplog.text
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_training_start_removes_what_killed_writers_left_in_the_run(tmp_path):
    """A checkpoint save killed mid-write, and an --overwrite killed mid-delete: gone when the run resumes."""
    run = old_run(tmp_path / "run", "metrics.jsonl", "checkpoints/last.pt")
    dead = _dead_pid()
    half = run / "checkpoints" / f".iter_000004.{dead}-k3y_9a.tmp.pt"
    half.write_bytes(b"half a checkpoint")
    live = run / "checkpoints" / f".iter_000004.{os.getpid()}-k3y_9b.tmp.pt"  # a live writer's: kept
    live.write_bytes(b"being written")
    (run / f".overwritten-{dead}" / "checkpoints").mkdir(parents=True)
    lock = claim_run_folder(run, resume=True, overwrite=False)
    lock.release()
    assert not half.exists() and live.exists() and not (run / f".overwritten-{dead}").exists()
    assert (run / "checkpoints" / "last.pt").exists() and (run / "metrics.jsonl").exists()  # the run itself stays


def test_only_rank_0_takes_the_lock():
    calls = []
    assert main_decides(DistInfo(rank=1, world=1), lambda: calls.append(1)) is None and calls == []
    assert main_decides(DistInfo(rank=0), lambda: calls.append(0) or "held") == "held" and calls == [0]
    with pytest.raises(Med3DError, match="busy"):
        main_decides(DistInfo(rank=0), lambda: (_ for _ in ()).throw(Med3DError("busy")))


def test_resumed_metrics_keep_only_what_precedes_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "iteration": i, "loss": 1.0 / i} for i in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')  # killed mid-line at 6
    trim_metrics(path, 3)
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2, 3] and path.read_text().endswith("}\n")


def test_metrics_that_cannot_be_appended_are_one_error_naming_the_file(tmp_path):
    from med3d.engine.logger import RunLogger

    (tmp_path / "metrics.jsonl").mkdir()  # any OSError of the append (ENOSPC on a full disk) takes this path
    with pytest.raises(Med3DError, match=r"metrics\.jsonl: cannot append the run's metrics .*--resume"):
        RunLogger(tmp_path, tensorboard=False).log({"kind": "train", "iteration": 1})


# ---------------------------------------------------------------- class 3: real trainings (a few steps)

@pytest.mark.slow
def test_overwrite_replaces_the_old_run_and_metrics_never_mix(tmp_path, capsys, caplog):
    from med3d.cli import main

    make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    cfg = config(tmp_path, run)
    assert main(["pretrain", str(cfg), "--quiet"]) == 0
    first = read_metrics(run / "metrics.jsonl")
    (run / "checkpoints" / f".iter_000009.{_dead_pid()}-abc123.tmp.pt").write_bytes(b"half a checkpoint")
    (run / "notes.txt").write_text("the user's own file")
    # A stale lock of a killed training is there too: taken over, with a warning.
    (run / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", str(cfg), "--quiet", "--overwrite"]) == 0
    assert "stale lock" in caplog.text and "removing the earlier run" in caplog.text
    second = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in second if r["kind"] == "train"] == [1]  # the new run's only
    assert len(first) == len(second)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001.pt", "last.pt"]
    assert (run / "notes.txt").read_text() == "the user's own file"  # not a run file: kept
    assert not (run / LOCK_NAME).exists() and not list(run.glob(".overwritten-*"))
    capsys.readouterr()
    # and the folder is refused again without a flag
    assert main(["pretrain", str(cfg), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------- class 9: temporary files, umask, full disk

def test_a_killed_writers_temp_file_is_removed_by_the_next_write_there(tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    pid = os.fork()
    if pid == 0:  # a writer killed mid-write: no finally runs, as under SIGKILL
        with atomic_path(out / "model.ts") as tmp:
            tmp.write_bytes(b"partial")
            os._exit(9)
    os.waitpid(pid, 0)
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".model.{pid}-"), left
    live = out / f".other.{os.getpid()}-xyz.tmp.pt"  # a live writer's file is never touched
    live.write_bytes(b"being written")
    import med3d.atomic as atomic

    atomic._swept.discard(str(out.resolve()))  # a later process: this one has not swept that folder yet
    write_json_atomic(out / "model.json", {"ok": True})
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.json", live.name])
    assert remove_stale_temps(out) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {})
        with atomic_path(tmp_path / "w.pt") as tmp:
            torch.save({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "w.pt").stat().st_mode) == mode


def _checkpoint(tmp_path: Path) -> Path:
    from med3d.api import create_model
    from med3d.checkpoint import save_checkpoint
    from med3d.config import load_config

    cfg = load_config(None, ["model.encoder.arch=resnet10", "model.encoder.widths=[8, 16, 32, 64]",
                             "model.heads.gen.num_classes=2"])
    return save_checkpoint(tmp_path / "in" / "model.pt", create_model(cfg), cfg, meta={})


@pytest.mark.corpus
@pytest.mark.parametrize("fmt,fails", [("pt", "torch"), ("safetensors", "os")], ids=["pt", "safetensors"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, fmt, fails):
    ckpt = _checkpoint(tmp_path)
    if fails == "torch":  # what torch's zip writer raises when a write comes up short
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        monkeypatch.setattr(torch, "save", full)
    else:
        import safetensors.torch

        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out" / f"enc.{fmt}"
    refused(["export", ckpt, "--format", fmt, "--out", out], capsys,
            names=rf"{out}: not written, the disk is full \(.* MiB free", inputs=[ckpt], watch=tmp_path)


@pytest.mark.slow  # tracing and checking the traced model: a few seconds on a CPU
@pytest.mark.corpus
def test_torchscript_export_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """torch.jit.save on a full disk aborts the interpreter from C++; the export writes through Python instead."""
    ckpt = _checkpoint(tmp_path)
    real = Path.write_bytes

    def full(self, data):
        if ".tmp" in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "out" / "m.ts"
    refused(["export", ckpt, "--format", "torchscript", "--out", out, "--input-size", "16", "16", "16"], capsys,
            names=rf"{out}: not written, the disk is full", inputs=[ckpt], watch=tmp_path)


@pytest.mark.corpus
def test_a_file_system_without_locks_or_space_is_one_line_and_holds_nothing(tmp_path, monkeypatch):
    import fcntl

    from med3d.engine import runlock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with pytest.raises(Med3DError, match=r"run\.lock: cannot be locked \(No locks available\)"):
            runlock.RunLock(tmp_path / "run").acquire()

    def full(self, previous):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlock.RunLock, "_take_over", full)
    with pytest.raises(Med3DError, match=r"run\.lock: the run lock cannot be written \(No space left"):
        runlock.RunLock(tmp_path / "run").acquire()
    monkeypatch.undo()
    runlock.RunLock(tmp_path / "run").acquire().release()  # nothing was left held: the folder can be locked again
