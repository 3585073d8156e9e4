"""A study's plots: validation score against iterations per initialisation, final score against size.

matplotlib is an optional extra: without it the functions return None and the report says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..plotting import pyplot, save_png
from .grid import Study, size_label


def _mean_curve(runs: List[Dict[str, Any]]):
    """Mean score per iteration over the replicates (iterations every replicate validated at)."""
    common = sorted(set.intersection(*[{c["iteration"] for c in r["curve"]} for r in runs]))
    values = [[next(c["score"] for c in r["curve"] if c["iteration"] == it) for r in runs] for it in common]
    return common, [float(np.nanmean(v)) for v in values]


def plot_curves(study: Study, rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """One panel per training-set size: mean validation score vs iteration, one line per initialisation.

    Returns:
        ``path``, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    sizes = [size_label(s) for s in study.sizes]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for init in study.inits:
            runs = [r for r in rows if r["init"] == init and r["train_cases"] == size and r["curve"]]
            if runs:
                its, mean = _mean_curve(runs)
                ax.plot(its, mean, "o-", ms=3, label=init)
        ax.set(title=f"training cases: {size}", xlabel="iteration", ylabel="validation score")
        ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_sizes(study: Study, cells: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Final score vs training cases per initialisation, with the 95% interval as a band.

    Returns:
        ``path``, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for init in study.inits:
        own = sorted((c for c in cells if c["init"] == init), key=lambda c: c["n_train"])
        if not own:
            continue
        x = [c["n_train"] for c in own]
        line = ax.plot(x, [c["final_mean"] for c in own], "o-", label=init)[0]
        lo, hi = np.array([c["ci_low"] for c in own]), np.array([c["ci_high"] for c in own])
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="training cases", ylabel="final validation score", title="final score vs training-set size")
    ax.legend(fontsize=8)
    return save_png(fig, path)
