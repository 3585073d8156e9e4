"""One training run as an experiment sees it: started, resumed or skipped, and its result as one row.

A run is finished when its ``summary.json`` (written last, atomically, by the trainer) reports the
configured number of iterations, and is reused only if its ``config.yaml`` matches the config asked
for now (else a one-line error, never a stale result); an unfinished run with ``checkpoints/last.pt``
continues from it exactly (``engine.resume``); any other run starts afresh.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..config import Config, from_dict, to_dict
from ..engine.resume import DERIVED, EXTENDABLE, _leaves
from ..errors import Med3DError

NAN = float("nan")
# Keys that change how fast or how verbosely a run trains, or where its folder is, not what it computes:
# a finished run under other values of these is still the same run. (The length and validation keys do
# change the result.)
SAME_RUN = ("run.out_dir", *(k for k in EXTENDABLE if k not in ("train.iterations", "validation.every",
                                                                "validation.hd95")))


def changed_key(cfg: Config, run_dir: Path) -> Optional[str]:
    """The first config key whose value differs between ``cfg`` and the run folder's ``config.yaml``.

    Args:
        cfg: the config the run would have now.
        run_dir: a run folder (its ``config.yaml`` is the resolved config it trained under).

    Returns:
        ``"key: old -> new"`` for the first key that changes the result, or None (same, or no ``config.yaml``).
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        old = dict(_leaves(to_dict(from_dict(yaml.safe_load(path.read_text())))))
    except (yaml.YAMLError, Med3DError, TypeError, AttributeError) as err:
        return f"{path} ({err})"
    new = dict(_leaves(to_dict(cfg)))
    for key in sorted(set(old) | set(new)):
        if not key.startswith(DERIVED + SAME_RUN) and old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def refuse_stale(cfg: Config, run_dir: Path) -> None:
    """Refuse to reuse a finished run whose config differs from the one asked for now.

    Raises:
        Med3DError: naming the run folder and the first key that differs.
    """
    changed = changed_key(cfg, run_dir)
    if changed:
        raise Med3DError(f"{run_dir} finished under another config ({changed}); its result would be stale: "
                         "delete that folder to train it again, or set run.out_dir to a new folder")


def finished_summary(cfg: Config) -> Optional[Dict[str, Any]]:
    """The run's ``summary.json`` when it finished all ``train.iterations``, else None.

    Raises:
        Med3DError: the run finished under a config that differs from ``cfg`` (``refuse_stale``).
    """
    path = Path(cfg.run.out_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("iterations") != cfg.train.iterations:
        return None
    refuse_stale(cfg, path.parent)
    return summary


def run_once(cfg: Config, job: str = "finetune", progress: bool = True, tensorboard: bool = False) -> Dict[str, Any]:
    """Train ``cfg`` unless it already finished; continue it from ``last.pt`` when it was interrupted.

    Args:
        cfg: the run's resolved config (its ``run.out_dir`` is the run's folder).
        job: ``finetune`` or ``pretrain``.
        progress: show progress bars.
        tensorboard: also write TensorBoard events.

    Returns:
        The run's summary, with ``skipped`` (it had finished before) and ``wall_s`` (seconds spent
        training in this call, or as recorded before).

    Raises:
        Med3DError: bad config or data (from the trainer).
    """
    from ..engine.trainer import train

    done = finished_summary(cfg)
    if done is not None:
        return {**done, "skipped": True}
    last = Path(cfg.run.out_dir) / "checkpoints" / "last.pt"
    start = time.perf_counter()
    # No checkpoint: the run starts afresh, over whatever an attempt killed before its first checkpoint left.
    summary = train(cfg, job, resume=str(last) if last.is_file() else None, progress=progress,
                    tensorboard=tensorboard, overwrite=not last.is_file())
    return {**summary, "skipped": False, "wall_s": time.perf_counter() - start}


def iterations_to_reach(history: List[Dict[str, Any]], level: float) -> Optional[int]:
    """The first validated iteration whose score reaches ``level`` (None if none did)."""
    for row in history:
        if row["score"] is not None and math.isfinite(row["score"]) and row["score"] >= level - 1e-9:
            return int(row["iteration"])
    return None


def full_history(summary: Dict[str, Any], run_dir: Path) -> List[Dict[str, Any]]:
    """The run's validation scores by iteration, including those from before a resume.

    A resumed run's ``summary.json`` holds only the validations after it resumed; the earlier ones are
    in its ``metrics.jsonl`` (appended to by every session of the run).

    Args:
        summary: the run's summary.
        run_dir: the run folder.

    Returns:
        ``[{"iteration", "score"}, ...]`` sorted by iteration.
    """
    points = {int(h["iteration"]): h["score"] for h in summary.get("history") or []}
    start = summary.get("resumed_from")
    metrics = run_dir / "metrics.jsonl"
    if start and metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short when the run was killed
                continue
            if record.get("kind") == "val" and record.get("iteration", start + 1) <= start:
                points.setdefault(int(record["iteration"]), record.get("score"))
    return [{"iteration": it, "score": points[it]} for it in sorted(points)]


def result_row(summary: Dict[str, Any], run_dir: Path, levels: List[float] = ()) -> Dict[str, Any]:
    """A finished run as one flat row: sizes, final and best score, per-class metrics, iterations to levels.

    Args:
        summary: the run's summary (``summary.json``).
        run_dir: the run folder (its ``split.json`` gives the case counts).
        levels: scores whose first iteration to report (``iters_to_<level>``).

    Returns:
        The row; missing values are NaN.
    """
    split_path = run_dir / "split.json"
    split = json.loads(split_path.read_text()) if split_path.is_file() else {}
    final = summary.get("final") or {"tasks": {}, "score": NAN}
    best = summary.get("best") or {}
    labelled = [s for s in split.values() if not s.get("pseudo")]  # pseudo-labelled scans are counted apart
    row: Dict[str, Any] = {
        "n_train": sum(len(s["train"]) for s in labelled) if split else NAN,
        "n_val": sum(len(s["val"]) for s in labelled) if split else NAN,
        "final": final["score"], "best": best.get("metric") if best.get("metric") is not None else NAN,
        "best_iteration": best.get("iteration"), "iterations": summary.get("iterations"),
        "wall_s": summary.get("wall_s", summary.get("seconds", NAN)),
    }
    pseudo = [s for s in split.values() if s.get("pseudo")]
    if pseudo:
        row["n_pseudo"] = sum(len(s["train"]) for s in pseudo)
    for entry in final["tasks"].values():
        for name, value in (entry.get("dice") or {}).items():
            row[f"dice_{name}"] = value
        for key in ("auc", "balanced_accuracy", "accuracy"):
            if key in entry:
                row[key] = entry[key]
    history = full_history(summary, run_dir)
    for level in levels:
        row[f"iters_to_{level:g}"] = iterations_to_reach(history, level)
    return row
