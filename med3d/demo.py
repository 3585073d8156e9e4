"""``med3d demo``: the built-in walk-through on generated demo data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from .api import create_model
from .config import CONFIG_DIR, load_config, save_resolved
from .data.demo import TASK_NAMES, TASKS, is_complete, write_demo_data


def _first_case(folder: Path) -> np.ndarray:
    """First training image of a demo task as (C, D, H, W), first modality only, z-scored."""
    meta = json.loads((folder / "dataset.json").read_text())
    arr = np.asarray(nib.load(folder / meta["training"][0]["image"]).dataobj, dtype=np.float32)
    arr = arr[..., 0] if arr.ndim == 4 else arr
    arr = np.transpose(arr, (2, 1, 0))  # (X, Y, Z) -> (D, H, W)
    return ((arr - arr.mean()) / (arr.std() + 1e-6))[None]


def run_demo(overrides: Sequence[str] = (), quick: bool = False) -> int:
    """Generate the demo data, build the multi-task model from configs/demo/demo.yaml and run every head."""
    cfg = load_config(CONFIG_DIR / "demo" / "demo.yaml", overrides)
    out = Path(cfg.run.out_dir)
    data = out / "data"
    missing = [t for t in TASK_NAMES if not is_complete(data / t)]
    if missing:
        n_train, n_test = (3, 1) if quick else (10, 2)
        write_demo_data(data, seed=cfg.run.seed, n_train=n_train, n_test=n_test, tasks=missing)
    save_resolved(cfg, out)
    torch.manual_seed(cfg.run.seed)
    model = create_model(cfg).eval()
    n_enc = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    print(f"\nencoder {cfg.model.encoder.arch} ({cfg.model.encoder.layout}, widths {cfg.model.encoder.widths}): "
          f"{n_enc:.2f}M parameters; heads: {', '.join(model.tasks)}")
    print(f"{'task':<24} {'modalities':<22} {'labels':<42} {'input':<18} {'logits'}")
    with torch.no_grad():
        for task in TASKS:
            x = torch.from_numpy(_first_case(data / task.folder))[None]
            y = model(x, task.folder) if task.folder in model.heads else None
            labels = ", ".join(v for k, v in task.labels.items() if k != "0")
            shape = "-" if y is None else str(tuple(y.shape[1:]))
            print(f"{task.folder:<24} {', '.join(task.modality.values()):<22} {labels:<42} "
                  f"{str(tuple(x.shape[2:])):<18} {shape}")
    print(f"\ndata in {data}, resolved config in {out / 'config.yaml'}")
    print("pretraining and fine-tuning join this demo with the training engine.")
    return 0
