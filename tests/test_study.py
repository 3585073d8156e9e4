"""med3d study: a grid of fine-tuning runs, its report, and resuming it (finished runs skipped)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from med3d.api import create_model
from med3d.config import from_dict
from med3d.errors import Med3DError
from med3d.export import export_encoder
from med3d.study.grid import grid, load_study
from med3d.study.report import speedup
from med3d.study.runner import run_study
from med3d.study.stats import mean_interval, paired_bootstrap

SPLEEN = "Task09_SpleenDemo"


def _study_file(demo_root: Path, tmp: Path, cfg_dict) -> Path:
    base = cfg_dict(demo_root, tmp, tasks=(SPLEEN,), train={"iterations": 2, "checkpoint_every": 2},
                    validation={"every": 0, "hd95": False, "max_cases": 1})
    base["data"]["datasets"][SPLEEN]["spacing"] = [5.0, 3.0, 3.0]  # coarse grid: quick whole-scan validation
    base["data"].update(patch_size=[16, 16, 16], check=False)  # the demo data is known to be sound
    encoder = export_encoder(create_model(from_dict(base)), "safetensors", tmp / "encoder.safetensors")
    base["finetune"] = {"weights": str(encoder)}
    base["run"]["out_dir"] = str(tmp / "study")
    base["study"] = {"inits": {"scratch": {"finetune.init": "scratch"}, "mean_var": {"finetune.init": "mean_var"}},
                     "train_cases": [1, 2], "folds": 2, "levels": [0.01], "bootstrap": 200}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.slow
def test_a_tiny_study_writes_its_report_and_a_second_call_skips_finished_runs(demo_root, tmp_path, cfg_dict):
    path = _study_file(demo_root, tmp_path, cfg_dict)
    rows = run_study(load_study(path), progress=False)
    out = tmp_path / "study"
    assert len(rows) == 8 and not any(r["skipped"] for r in rows)
    with open(out / "runs.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {(r["init"], r["train_cases"], r["repeat"]) for r in table} == \
        {(i, s, f) for i in ("scratch", "mean_var") for s in ("n1", "n2") for f in ("fold_0", "fold_1")}
    assert {"final", "best", "dice_spleen", "iters_to_0.01", "wall_s", "n_train"} <= set(table[0])
    fold0 = json.loads((out / "scratch" / "n1" / "fold_0" / "splits_final.json").read_text())
    assert json.loads((out / "mean_var" / "n1" / "fold_0" / "splits_final.json").read_text()) == fold0  # paired
    summary = (out / "summary.md").read_text()
    assert "Gain over scratch" in summary and "| mean_var | n2 | 2 |" in summary
    for png in ("curves.png", "final_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An interrupted run: it got as far as its checkpoint, not to its summary and result.
    broken = out / "mean_var" / "n2" / "fold_1"
    (broken / "result.json").unlink()
    (broken / "summary.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/*/metrics.jsonl")}
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "study", str(path), "--quiet"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 run(s), 7 already finished before" in r.stdout
    assert json.loads((broken / "summary.json").read_text())["resumed_from"] == 2  # continued, not restarted
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/*/metrics.jsonl") if p.parent != broken} == \
        {p: t for p, t in stamps.items() if p.parent != broken}


def test_study_file_errors_name_the_key(demo_root, tmp_path, cfg_dict):
    path = tmp_path / "s.yaml"
    base = cfg_dict(demo_root, tmp_path, tasks=(SPLEEN,))
    for study, message in (({"inits": {"a": {"finetune.init": "bogus"}}}, "study.inits.a: config key 'finetune.init'"),
                           ({"inits": {"a": {}}, "train_cases": [0]}, "study.train_cases"),
                           ({"inits": {"a": {}}, "colds": 2}, "unknown key 'study.colds'"),
                           ({"inits": {"a": {}}, "reference": "b"}, "study.reference"),
                           ({"inits": {"a": {}}, "bootstrap": "many"}, "study.bootstrap"),
                           ({"inits": {"a": {}}, "train_cases": [4, 2, 4]}, "lists a size twice"),
                           ({"inits": {"../../elsewhere": {}}}, "not a plain folder name")):
        path.write_text(yaml.safe_dump({**base, "study": study}))
        with pytest.raises(Med3DError, match=message):
            load_study(path)


def test_intervals_and_speedup():
    mean, (lo, hi) = mean_interval([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and lo == pytest.approx(0.6 - 4.302653 * 0.1 / 3 ** 0.5, abs=1e-5)
    assert hi == pytest.approx(2 * 0.6 - lo)
    low, high = paired_bootstrap([0.1, 0.2, 0.3, 0.2], n=2000, seed=0)
    assert 0.1 <= low < 0.2 < high <= 0.3
    scratch = {"final": 0.6, "curve": [{"iteration": 10, "score": 0.3}, {"iteration": 40, "score": 0.6}]}
    fast = {"final": 0.8, "curve": [{"iteration": 10, "score": 0.65}, {"iteration": 40, "score": 0.8}]}
    assert speedup(scratch, fast) == 4.0 and speedup(fast, scratch) is None


def test_an_initialisations_weights_path_is_relative_to_the_study_file(demo_root, tmp_path, cfg_dict):
    folder = tmp_path / "studies"
    folder.mkdir()
    base = cfg_dict(demo_root, tmp_path, tasks=(SPLEEN,))
    base["study"] = {"inits": {"scratch": {"finetune.init": "scratch"},
                               "file": {"finetune.weights": "enc/x.safetensors", "finetune.init": "full"}},
                     "folds": 2, "train_cases": [1, 0.5]}
    (folder / "s.yaml").write_text(yaml.safe_dump(base))
    study = load_study(folder / "s.yaml")
    runs = {(r.init, r.repeat, r.size): r.cfg for r in grid(study)}
    assert len(runs) == 8 and study.reference == "scratch"
    cfg = runs[("file", "fold_1", 0.5)]
    assert cfg.finetune.weights == str(folder / "enc" / "x.safetensors")
    assert (cfg.data.folds, cfg.data.fold, cfg.data.train_cases) == (2, 1, 0.5)
    assert cfg.run.out_dir == str(tmp_path / "run" / "file" / "f0.5" / "fold_1")


def _finish_on_paper(study) -> None:
    """Every run of ``study`` as finished: its resolved config and a result with a validation curve."""
    from med3d.atomic import write_json_atomic
    from med3d.config import save_resolved
    from med3d.study.grid import size_label

    for run in grid(study):
        save_resolved(run.cfg, run.folder)
        write_json_atomic(run.folder / "result.json", {
            "init": run.init, "train_cases": size_label(run.size), "repeat": run.repeat, "final": 0.6,
            "best": 0.6, "n_train": 2, "curve": [{"iteration": 10, "score": 0.3}, {"iteration": 20, "score": 0.6}]})


def test_finished_runs_are_reused_only_under_the_same_config(demo_root, tmp_path, cfg_dict):
    base = cfg_dict(demo_root, tmp_path, tasks=(SPLEEN,))
    base["study"] = {"inits": {"scratch": {"finetune.init": "scratch"}}, "folds": 2, "train_cases": [1],
                     "levels": [0.5]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base))
    _finish_on_paper(load_study(path))
    rows = run_study(load_study(path, ["data.workers=3"]), progress=False)  # a speed-only key: still the same runs
    assert len(rows) == 2 and all(r["skipped"] for r in rows)
    assert rows[0]["iters_to_0.5"] == 20
    # A level added since the runs finished is measured on their stored curves, not reported as "not reached".
    rows = run_study(load_study(path, ["study.levels=[0.25]"]), progress=False)
    assert [r["iters_to_0.25"] for r in rows] == [10, 10] and "iters_to_0.5" not in rows[0]
    with pytest.raises(Med3DError, match=r"finished under another config \(train.lr: 0.01 -> 0.5\)"):
        run_study(load_study(path, ["train.lr=0.5"]), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)  # a study folder moved elsewhere is still the same study
    assert all(r["skipped"] for r in run_study(load_study(path, [f"run.out_dir={moved}"]), progress=False))


def test_a_resumed_runs_curve_keeps_the_validations_before_the_resume(tmp_path):
    from med3d.study.runs import full_history, result_row

    records = [{"kind": "train", "iteration": 10, "loss": 1.0}, {"kind": "val", "iteration": 10, "score": 0.3},
               {"kind": "val", "iteration": 20, "score": 0.5}, {"kind": "val", "iteration": 30, "score": 0.4}]
    # Checkpoint at 20, validated at 30, killed mid-line; resumed from 20 and validated at 30 again.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "va')
    summary = {"resumed_from": 20, "iterations": 30, "final": {"score": 0.7, "tasks": {}},
               "history": [{"iteration": 30, "score": 0.7}]}
    assert [(h["iteration"], h["score"]) for h in full_history(summary, tmp_path)] == [(10, 0.3), (20, 0.5), (30, 0.7)]
    assert result_row(summary, tmp_path, [0.5])["iters_to_0.5"] == 20


def test_gains_pair_replicates_by_fold_and_skip_a_fold_without_a_score():
    from med3d.study.grid import Study
    from med3d.study.report import gain_table

    study = Study({"run": {"out_dir": "x", "seed": 0}}, {"scratch": {}, "b": {}}, [None], folds=3,
                  reference="scratch", bootstrap=200)
    curve = [{"iteration": 10, "score": 0.5}]
    finals = {"scratch": (0.5, 0.7, float("nan")), "b": (0.6, 0.9, 0.8)}
    rows = [{"init": i, "train_cases": "all", "repeat": f"fold_{f}", "final": v, "curve": curve}
            for i, values in finals.items() for f, v in reversed(list(enumerate(values)))]  # order must not matter
    (gain,) = gain_table(study, rows)
    assert gain["pairs"] == 2 and gain["gain"] == pytest.approx(0.15)
    assert 0.1 - 1e-9 <= gain["boot_low"] <= gain["boot_high"] <= 0.2 + 1e-9
