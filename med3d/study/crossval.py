"""Cross-validation from the command line: each fold trained into ``RUN/fold_N``, then a fold summary.

``med3d finetune CONFIG --folds all`` trains every fold of ``data.folds`` (default 5) or of
``data.splits_file`` one after another; ``--fold N`` trains one (folds trained separately, even on
different machines, add up: the summary covers every finished ``fold_*`` folder). With ``--resume``,
finished folds are skipped and an interrupted one continues from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..atomic import write_text_atomic
from ..config import Config
from ..data.splits import DEFAULT_FOLDS, load_split_list
from ..errors import Med3DError
from .runs import changed_key, result_row, run_once
from .tables import fmt, markdown, write_csv

log = logging.getLogger("med3d.study")


def fold_count(cfg: Config) -> int:
    """How many folds the config defines: the splits file's, or ``data.folds`` (default 5).

    Raises:
        Med3DError: the splits file cannot be read as a list.
    """
    if cfg.data.splits_file:
        return len(load_split_list(cfg.data.splits_file))
    return cfg.data.folds or DEFAULT_FOLDS


def fold_config(cfg: Config, fold: int, out_dir: Path) -> Config:
    """``cfg`` for one fold, trained into ``out_dir/fold_N``."""
    k = None if cfg.data.splits_file else fold_count(cfg)
    return replace(cfg, data=replace(cfg.data, folds=k, fold=fold),
                   run=replace(cfg.run, out_dir=str(out_dir / f"fold_{fold}")))


def parse_folds(text: str, k: int) -> List[int]:
    """``all`` or a comma list (``0,2``) as fold numbers.

    Raises:
        Med3DError: a number is not a fold.
    """
    if text == "all":
        return list(range(k))
    try:
        folds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise Med3DError(f"--folds {text}: give 'all' or fold numbers such as 0,2")
    bad = [f for f in folds if not 0 <= f < k]
    if bad or not folds:
        raise Med3DError(f"--folds {text}: folds are numbered 0..{k - 1}")
    return folds


def run_folds(cfg: Config, job: str, folds: List[int], progress: bool = True,
              resume: bool = False, overwrite: bool = False) -> List[Dict[str, Any]]:
    """Train the given folds of ``cfg`` one after another, then write the fold summary.

    Args:
        cfg: the config; its ``run.out_dir`` receives ``fold_N/`` folders and the summary.
        job: ``finetune`` or ``pretrain``.
        folds: the fold numbers to train.
        progress: show progress bars.
        resume: skip finished folds and continue an interrupted one; without it every fold trains afresh.
        overwrite: replace the runs already in the ``fold_N`` folders (without it or ``resume`` they are refused).

    Returns:
        The summary's rows (every finished fold under ``run.out_dir``).

    Raises:
        Med3DError: bad config or data.
    """
    from ..engine.trainer import describe, train

    out = Path(cfg.run.out_dir)
    for fold in folds:
        fcfg = fold_config(cfg, fold, out)
        print(f"\nfold {fold}: training into {fcfg.run.out_dir}")
        summary = (run_once(fcfg, job, progress, tensorboard=True) if resume
                   else train(fcfg, job, progress=progress, overwrite=overwrite))
        print("already finished; skipped" if summary.get("skipped") else describe(summary))
        drawn = Path(fcfg.run.out_dir) / "splits_final.json"
        if drawn.is_file():  # every fold's run writes the same folds; keep one beside the summary
            write_text_atomic(out / "splits_final.json", drawn.read_text())
    return write_fold_summary(out, cfg)


def write_fold_summary(out: Path, cfg: Optional[Config] = None) -> List[Dict[str, Any]]:
    """``fold_summary.csv`` and ``fold_summary.md`` over every finished ``out/fold_*``; prints the table.

    Args:
        out: the cross-validation folder.
        cfg: the config the folds are trained under now; a finished fold trained under another config
            (another learning rate, number of folds, ...) is left out with a warning. None: every fold counts.

    Returns:
        One row per fold.
    """
    rows = []
    for folder in sorted(out.glob("fold_*"), key=lambda p: (len(p.name), p.name)):
        path, fold = folder / "summary.json", folder.name[len("fold_"):]
        if not path.is_file():
            continue
        changed = changed_key(fold_config(cfg, int(fold), out), folder) if cfg and fold.isdigit() else None
        if changed:
            log.warning("%s left out of the fold summary: trained under another config (%s)", folder, changed)
            continue
        rows.append({"fold": fold, **result_row(json.loads(path.read_text()), folder)})
    if not rows:
        return rows
    write_csv(out / "fold_summary.csv", rows, first=("fold",))
    cols = [c for c in ("fold", "n_train", "n_val", "final", "best", "best_iteration") if c in rows[0]]
    cols += [c for c in rows[0] if c.startswith("dice_") or c in ("auc", "balanced_accuracy")]
    spread = [_spread(rows, c) for c in cols[3:]]
    text = (f"# Cross-validation: {len(rows)} fold(s) in {out}\n\n{markdown(rows, cols)}\n\n"
            "| metric | mean | std | min | max |\n|---|---|---|---|---|\n"
            + "\n".join(f"| {c} | {fmt(m)} | {fmt(s)} | {fmt(lo)} | {fmt(hi)} |" for c, (m, s, lo, hi)
                        in zip(cols[3:], spread)) + "\n")
    write_text_atomic(out / "fold_summary.md", text)
    print(text)
    return rows


def _spread(rows: List[Dict[str, Any]], col: str):
    """Mean, sample standard deviation, min and max of a column over the folds (NaN where undefined)."""
    values = np.array([r.get(col) for r in rows if isinstance(r.get(col), (int, float))], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan,) * 4
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), std, float(values.min()), float(values.max())
