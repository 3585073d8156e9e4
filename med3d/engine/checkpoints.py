"""Training checkpoints: everything needed to continue a run exactly.

A training checkpoint is a med3d checkpoint (model + resolved config + meta, readable by
``load_pretrained`` and ``med3d export``) with a ``train_state`` entry: optimizer, scheduler,
grad scaler, iteration, every RNG state and the sampler position. Files are written
atomically, so a killed run leaves the previous ``last.pt`` intact.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from ..checkpoint import save_checkpoint
from ..config import Config
from ..errors import Med3DError
from ..models.multitask import MultiTaskModel
from ..transfer.formats import torch_load_bounded

log = logging.getLogger("med3d.train")


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states as plain data (numpy's array becomes a list: weights_only-safe)."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng(state["cuda"])


def _set_cuda_rng(saved: List[torch.Tensor]) -> None:
    """Restore each GPU's generator that both the checkpoint and this machine have.

    A run resumed on a machine with a different GPU count is not bit-exact anyway; it goes on
    with a warning rather than failing on the extra or missing devices.
    """
    have = torch.cuda.device_count()
    for i, s in enumerate(saved[:have]):
        torch.cuda.set_rng_state(s, i)
    if len(saved) != have:
        log.warning("checkpoint saved %d GPU generator state(s), this machine has %d GPU(s): "
                    "the resumed run is not bit-exact", len(saved), have)


def save_training(path: Path, model: MultiTaskModel, cfg: Config, meta: Dict[str, Any], iteration: int,
                  optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                  best: Dict[str, Any]) -> Path:
    """Write a resumable checkpoint atomically; returns its path.

    Args:
        path: the file to write.
        model: the multi-task model (not a DDP wrapper).
        cfg: the resolved config the run uses.
        meta: the input contract (tasks, plans, patch size, channels).
        iteration: optimizer steps done.
        optimizer, scheduler, scaler: their states are stored.
        best: the best validation score so far and its iteration.

    Returns:
        ``path``.
    """
    train_state = {"iteration": iteration, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                   "sampler": {"next_step": iteration, "seed": cfg.run.seed}, "best": best}
    return save_checkpoint(path, model, cfg, meta, extra={"train_state": train_state})


def load_training(path: Path) -> Dict[str, Any]:
    """The raw checkpoint (weights_only), checked to be a resumable med3d training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise Med3DError(f"{path}: checkpoint to resume from not found")
    obj = torch_load_bounded(path)
    if not isinstance(obj, dict) or obj.get("format") != "med3d-checkpoint" or "train_state" not in obj:
        raise Med3DError(f"{path}: not a med3d training checkpoint (no train_state); it cannot be resumed. "
                         "Start a new run with finetune.weights pointing at it instead")
    return obj


def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest ``iter_*.pt`` files."""
    files: List[Path] = sorted(folder.glob("iter_*.pt"))
    for old in files[:-keep] if keep > 0 else files:
        old.unlink(missing_ok=True)


def publish_last(saved: Path, folder: Path) -> Path:
    """Make ``folder/last.pt`` name the complete file ``saved`` (a hard link renamed into place, atomic)."""
    tmp = folder / ".last.pt.tmp"
    tmp.unlink(missing_ok=True)
    os.link(saved, tmp)
    os.replace(tmp, folder / "last.pt")
    return folder / "last.pt"
