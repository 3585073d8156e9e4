"""Run logging on rank 0: a JSONL metrics file, TensorBoard events, and PNG curves at the end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..atomic import write_text_atomic
from ..errors import Med3DError
from ..plotting import pyplot, save_png


class RunLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is a core dependency; tolerate a slimmed install
                self.tb = None

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk mid-run: one line naming the file, like every other write
            raise Med3DError(f"{self.path}: cannot append the run's metrics ({err.strerror}); free some space "
                             "and continue the run with --resume") from err
        if self.tb is not None:
            step = record.get("iteration", 0)
            for key, value in _flatten(record).items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _records(text: str) -> List[Dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill mid-write: it was never a record
            continue
    return out


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a line cut short by a killed run is skipped)."""
    if not path.is_file():
        return []
    return [r for r in _records(path.read_text()) if isinstance(r, dict)]


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records up to iteration ``step`` of a run about to resume from ``step`` (rewritten atomically).

    A run killed after its last checkpoint logged iterations that the resumed run repeats; without
    this they would be in the file twice, and a line cut short by the kill would run into the next.

    Args:
        path: the run's ``metrics.jsonl`` (absent: nothing to do).
        step: the iteration the run resumes from.
    """
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("iteration", 0)) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(metrics_path: Path, out_png: Path) -> Optional[Path]:
    """Loss and validation-Dice curves as a PNG (None when matplotlib, an optional extra, is missing)."""
    plt = pyplot()
    if plt is None:
        return None

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot([r["iteration"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="iteration")
    if val:
        axes[1].plot([r["iteration"] for r in val], [r["score"] for r in val], "o-")
    axes[1].set(title="validation score (mean over tasks)", xlabel="iteration", ylim=(0, 1))
    return save_png(fig, out_png)
