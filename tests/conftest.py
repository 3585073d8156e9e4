"""Shared fixtures: the real samples in ../shared (skipped with a reason where absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"

# One thread per pytest-xdist worker: `-n 2` on 2 cores with 2 threads each oversubscribes the cores,
# and OpenMP's waiting threads then burn ~40% more CPU for the same tests. A plain run keeps 2.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """An in-process run with ``train.threads`` sets torch's threads for the whole process: put them back."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def real_data() -> Path:
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real samples not found at {SHARED_REAL} (the shared/ folder sits beside the repo in CI)")
    return SHARED_REAL


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Demo data with 3 training and 1 test case per task, written once per test session."""
    from med3d.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root, seed=0, n_train=3, n_test=1, show_progress=False)
    return root


NUM_CLASSES = {"Task01_BrainTumourDemo": 4, "Task03_LiverDemo": 3, "Task05_ProstateDemo": 3, "Task09_SpleenDemo": 2}


def _cfg_dict(demo_root: Path, tmp: Path, tasks=("Task03_LiverDemo", "Task05_ProstateDemo"), **sections) -> dict:
    """A tiny training config over demo tasks (ResNet-10 at 1/8 width, 16x32x32 patches, 4 iterations)."""
    data = {
        "model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                  "heads": {t: {"type": "med3d", "num_classes": NUM_CLASSES[t]} for t in tasks}},
        "data": {"datasets": {t: {"path": str(demo_root / t)} for t in tasks}, "cache_dir": str(tmp / "cache"),
                 "patch_size": [16, 32, 32], "workers": 0, "val_fraction": 0.34},
        "run": {"out_dir": str(tmp / "run"), "seed": 0},
        "train": {"iterations": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "lr": 0.01},
        "validation": {"every": 0, "hd95": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


@pytest.fixture(scope="session")
def cfg_dict():
    """``cfg_dict(demo_root, tmp, tasks=..., section={...})``: a tiny training config as a mapping."""
    return _cfg_dict


@pytest.fixture(scope="session")
def bn_randomizer():
    """``bn_randomizer(module, seed=0)``: non-trivial BN statistics and affine weights, so comparisons exercise them."""
    from helpers import randomize_bn

    return randomize_bn
