"""Memory bounded by design: prepare, predict and evaluate under a hard address-space limit (issues #14, #15).

One child process (``memory_child.py``) runs each job with ``RLIMIT_AS`` set to its current size
plus a budget, so a regression fails the job instead of the machine. Each budget sits between
what the job needs now and what the whole-volume code needed (measured with the same child,
2026-11-22: prepare 40 MB vs 140 MB, predict 30 vs 250, evaluate 40 vs 600).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CHILD = Path(__file__).with_name("memory_child.py")

# job: (arguments, budget in MB above the warmed-up process). One float32 copy of the prepare and
# evaluate volumes (128x256x256) is 32 MB, of the predict volume (128^3) 8 MB.
JOBS = {
    # float32 CT + int16 label to a 2x coarser grid: one normalised float32 channel, no temporaries.
    "prepare": ([[128, 256, 256]], 80),
    # 16 classes, plan grid 4x coarser than the scan: labels restored one class at a time.
    "predict": ([[128, 128, 128], 16], 100),
    # 8 classes: boolean masks per class, not a float one-hot of every class.
    "evaluate": ([[128, 256, 256], 8], 150),
}


@pytest.fixture(scope="module")
def limited_runs():
    spec = {name: {"args": args, "budget_mb": budget} for name, (args, budget) in JOBS.items()}
    # One allocator arena and one thread: the address space then grows with what the jobs allocate.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_job_fits_under_an_address_space_limit(limited_runs, job):
    run = limited_runs[job]
    assert run["probe_refused"], f"{job}: a 1.5x-budget allocation went through; the limit is not in force"
    assert run["ok"], f"{job} exceeded {run['budget_mb']} MB above its start: {run.get('error')}"


# ------------------------------------------------------------------ same results as the whole-volume code

def _whole_volume_resample(x: np.ndarray, shape, spacing, target) -> np.ndarray:
    """The reference: all channels in one float tensor, as the code before the per-channel rewrite did."""
    from med3d.data.preprocess import _separate_axis

    t = torch.from_numpy(x.astype(np.float32))[None]
    axis = _separate_axis(spacing, target)
    if axis is not None:
        mid = list(shape)
        mid[axis] = x.shape[1 + axis]
        t = F.interpolate(t, size=tuple(mid), mode="trilinear", align_corners=False)
        return F.interpolate(t, size=tuple(shape), mode="nearest-exact")[0].numpy()
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("spacing, target", [((1.0, 1.0, 1.0), (1.3, 0.8, 1.1)),  # trilinear, whole
                                             ((5.0, 0.7, 0.7), (5.0, 1.1, 1.1)),  # coarse z: slabs along z
                                             ((0.8, 0.8, 4.0), (1.0, 1.0, 4.0))])  # coarse x: slabs along x
def test_streamed_restore_gives_the_whole_volume_argmax_and_probabilities(monkeypatch, spacing, target):
    from med3d.data import preprocess
    from med3d.inference import restore_labels, restore_probabilities

    monkeypatch.setattr(preprocess, "SLAB_VOXELS", 100)  # many slabs on a small volume
    rng = np.random.default_rng(0)
    probs = rng.random((4, 7, 9, 11)).astype(np.float32)
    probs[:, :2] = 0.25  # exact ties: the lower class wins, as with argmax
    cropped = [13, 17, 10]
    props = {"geometry": {"shape": [15, 20, 12]}, "crop_box": [(1, 14), (2, 19), (0, 10)],
             "cropped_shape": cropped, "spacing_zyx": list(spacing)}
    plan = {"target_spacing": list(target)}
    ref = _whole_volume_resample(probs, cropped, target, spacing)
    labels = restore_labels(probs, props, plan)
    assert np.array_equal(labels[1:14, 2:19, :10], ref.argmax(0)) and not labels[0].any()
    full = restore_probabilities(probs, props, plan)
    assert np.array_equal(full[:, 1:14, 2:19, :10], ref) and full[0, 0].min() == 1.0


def test_labels_resample_by_lookup_as_interpolate_nearest_and_keep_their_dtype():
    from med3d.data.preprocess import resample

    rng = np.random.default_rng(1)
    for _ in range(20):
        src = tuple(int(v) for v in rng.integers(3, 40, 3))
        dst = tuple(int(v) for v in rng.integers(2, 60, 3))
        label = rng.integers(-1, 300, (1, *src)).astype(np.int16)
        ref = F.interpolate(torch.from_numpy(label).float()[None], size=dst, mode="nearest-exact")[0].numpy()
        out = resample(label, dst, (1, 1, 1), (1, 1, 1), is_label=True)
        assert out.dtype == np.int16 and np.array_equal(out, ref.astype(np.int16))


def test_normalisation_in_place_matches_the_expression():
    from med3d.data.preprocess import normalize

    rng = np.random.default_rng(2)
    x = rng.normal(100, 50, (2, 12, 14, 16)).astype(np.float32)
    x[:, :3] = 0
    plan = {"normalization": [{"scheme": "zscore"}, {"scheme": "ct", "clip": [-10.0, 150.0], "mean": 40.0,
                                                      "std": 30.0}]}
    out = normalize(x, plan)
    assert np.array_equal(out[1], (np.clip(x[1], -10.0, 150.0) - 40.0) / 30.0)  # bit for bit
    inside = np.any(x != 0, axis=0)
    vals = x[0][inside]
    assert np.allclose(out[0], np.where(inside, (x[0] - vals.mean()) / vals.std(), 0), atol=1e-5)
    assert (out[0][~inside] == 0).all()
