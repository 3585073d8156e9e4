"""Shared fixtures: the real samples in ../shared (skipped with a reason where absent)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"

torch.set_num_threads(2)


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
