"""Run a study grid in this process, one run after another, resumable at any point.

Each finished run leaves ``result.json`` (its row of ``runs.csv`` and its validation curve) in its
folder; a later invocation skips it, unless the study now gives that run another config (then it
stops, naming the key that changed, rather than report a stale result). A run interrupted half-way
continues from its ``checkpoints/last.pt`` (exact resume), and one never started starts. The report
is rewritten from all finished runs at the end.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

from ..atomic import write_json_atomic
from .grid import Run, Study, grid, size_label
from .report import write_report
from .runs import full_history, iterations_to_reach, refuse_stale, result_row, run_once


def _train(run: Run, study: Study, progress: bool) -> Dict[str, Any]:
    summary = run_once(run.cfg, "finetune", progress)
    row = {"init": run.init, "train_cases": size_label(run.size), "repeat": run.repeat,
           **result_row(summary, run.folder, study.levels),
           "curve": full_history(summary, run.folder)}
    write_json_atomic(run.folder / "result.json", row)  # written last: the run's "finished" marker
    return row


def _finished(run: Run, study: Study) -> Dict[str, Any]:
    """A finished run's row, its ``iters_to_<level>`` recomputed for the study's levels now.

    Raises:
        Med3DError: the run finished under another config than the study gives it now.
    """
    refuse_stale(run.cfg, run.folder)
    row = json.loads((run.folder / "result.json").read_text())
    row = {k: v for k, v in row.items() if not k.startswith("iters_to_")}  # levels may have changed since
    row.update({f"iters_to_{level:g}": iterations_to_reach(row["curve"], level) for level in study.levels})
    return {**row, "skipped": True}


def run_study(study: Study, progress: bool = True) -> List[Dict[str, Any]]:
    """Train every run not finished yet, then write ``runs.csv``, ``summary.md`` and the plots.

    Args:
        study: the grid (``load_study``).
        progress: show progress bars.

    Returns:
        One row per run, with ``skipped`` telling which had finished before this call.

    Raises:
        Med3DError: bad config or data in a run (the runs finished so far stay finished).
    """
    runs = grid(study)
    rows: List[Dict[str, Any]] = []
    try:
        for i, run in enumerate(runs, 1):
            if (run.folder / "result.json").is_file():
                rows.append(_finished(run, study))
                continue
            print(f"[{i}/{len(runs)}] {run.init}, {size_label(run.size)} training cases, {run.repeat}: {run.folder}")
            rows.append({**_train(run, study, progress), "skipped": False})
    finally:  # a failed or interrupted run still leaves the report of those finished before it
        if rows:
            write_report(study, rows)
    return rows
