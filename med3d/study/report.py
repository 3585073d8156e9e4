"""A study's report: ``runs.csv`` (every run), ``summary.md`` (per cell, gains, speed-ups) and PNG plots.

Per cell (initialisation x training-set size): the mean final score with a 95% t interval over the
replicates. Gains over the reference initialisation are paired by replicate (same fold or seed, same
size) with a percentile bootstrap interval. The convergence speed-up of an initialisation is the
reference's iterations to reach its own final score divided by this initialisation's iterations to
reach that same score (per replicate; "not reached" when it never does).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..atomic import write_text_atomic
from .grid import Study, size_label
from .plots import plot_curves, plot_sizes
from .runs import iterations_to_reach
from .stats import mean_interval, paired_bootstrap
from .tables import markdown, write_csv

Cell = Tuple[str, str]  # (init, size label)


def _by_cell(rows: List[Dict[str, Any]]) -> Dict[Cell, Dict[str, Dict[str, Any]]]:
    cells: Dict[Cell, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["init"], r["train_cases"]), {})[r["repeat"]] = r
    return cells


def cell_table(study: Study, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per cell: runs, mean training cases, final score mean and 95% interval, best, levels."""
    out = []
    cells = _by_cell(rows)
    for size in map(size_label, study.sizes):
        for init in study.inits:
            reps = list(cells.get((init, size), {}).values())
            if not reps:
                continue
            mean, (lo, hi) = mean_interval([r["final"] for r in reps])
            row = {"init": init, "train_cases": size, "runs": len(reps),
                   "n_train": float(np.nanmean([r["n_train"] for r in reps])),
                   "final_mean": mean, "ci_low": lo, "ci_high": hi,
                   "best_mean": mean_interval([r["best"] for r in reps])[0]}
            for level in study.levels:
                reached = [r.get(f"iters_to_{level:g}") for r in reps]
                hit = [v for v in reached if v is not None]
                row[f"iters_to_{level:g}"] = f"{np.mean(hit):.0f} ({len(hit)}/{len(reps)})" if hit else "not reached"
            out.append(row)
    return out


def speedup(ref: Dict[str, Any], other: Dict[str, Any]) -> Optional[float]:
    """The reference's iterations to its final score over ``other``'s to the same score (None: never reached)."""
    target = ref["final"]
    if target is None or not math.isfinite(target):
        return None
    mine, theirs = iterations_to_reach(ref["curve"], target), iterations_to_reach(other["curve"], target)
    return mine / theirs if mine and theirs else None


def gain_table(study: Study, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per size and non-reference initialisation: paired gain, its bootstrap interval and the speed-up."""
    if study.reference is None:
        return []
    cells, out = _by_cell(rows), []
    for size in map(size_label, study.sizes):
        ref = cells.get((study.reference, size), {})
        for init in study.inits:
            other = cells.get((init, size), {})
            pairs = [(ref[k], other[k]) for k in other if k in ref]
            if init == study.reference or not pairs:
                continue
            # A replicate with no score on either side (e.g. AUC undefined in a fold) pairs with nothing.
            diffs = [d for d in (o["final"] - r["final"] for r, o in pairs) if math.isfinite(d)]
            lo, hi = paired_bootstrap(diffs, study.bootstrap, seed=0)
            ups = [speedup(r, o) for r, o in pairs]
            got = [u for u in ups if u is not None]
            out.append({"init": init, "train_cases": size, "pairs": len(diffs),
                        "gain": float(np.mean(diffs)) if diffs else math.nan, "boot_low": lo, "boot_high": hi,
                        "speedup": f"{np.mean(got):.2f}x ({len(got)}/{len(pairs)} reached)" if got
                        else "not reached"})
    return out


def write_report(study: Study, rows: List[Dict[str, Any]]) -> None:
    """``runs.csv``, ``summary.md``, ``curves.png`` and ``final_vs_size.png`` in the study folder."""
    out = study.out_dir
    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k not in ("curve", "skipped")} for r in rows]
    write_csv(out / "runs.csv", flat, first=("init", "train_cases", "repeat"))
    cells, gains = cell_table(study, rows), gain_table(study, rows)
    cell_cols = ["init", "train_cases", "runs", "n_train", "final_mean", "ci_low", "ci_high", "best_mean"]
    cell_cols += [f"iters_to_{v:g}" for v in study.levels]
    text = [f"# Study in {out}", "",
            f"{len(rows)} run(s): {len(study.inits)} initialisation(s) x {len(study.sizes)} training-set size(s) x "
            f"{len(study.repeats)} replicate(s) ({', '.join(study.repeats)}); same budget for every run.", "",
            "## Final validation score per cell (mean, 95% t interval over replicates)", "",
            markdown(cells, cell_cols), ""]
    if gains:
        text += [f"## Gain over {study.reference} (paired by replicate; {study.bootstrap}-resample bootstrap "
                 "95% interval) and convergence speed-up", "",
                 f"Speed-up: {study.reference}'s iterations to reach its final score divided by this "
                 "initialisation's iterations to reach the same score.", "",
                 markdown(gains, ["init", "train_cases", "pairs", "gain", "boot_low", "boot_high", "speedup"]), ""]
    plots = [plot_curves(study, rows, out / "curves.png"), plot_sizes(study, cells, out / "final_vs_size.png")]
    text += ["## Plots", ""]
    if all(p is None for p in plots):
        text.append("(no plots: matplotlib, an optional extra, is not installed)")
    text += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    write_text_atomic(out / "summary.md", "\n".join(text) + "\n")

