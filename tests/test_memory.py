"""Memory bounded by design: prepare, predict and evaluate under a hard address-space limit (issues #14, #15).

One child process (``memory_child.py``) runs each job with ``RLIMIT_AS`` set to its current size
plus a budget, so a regression fails the job instead of the machine. Each budget sits between
what the job needs now and what the whole-volume code needed (measured with the same child,
2026-11-22: prepare 40 MB vs 140 MB, predict 30 vs 250, evaluate 40 vs 600; with the slab-wise
reading, checking and anisotropic resampling of issue #15's second pass: prepare_aniso 16 MB
vs 48, check 16 vs 48, the isotropic prepare 40 vs 60; predict 31-50 under the fixed mmap threshold).
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
    # The same with 5 mm slices (as the lung CT), 48x384x384 (28 MB per float32 copy): normalised and
    # resampled slab by slab, so beside the input only the 7 MB output is volume-sized (the whole-channel
    # code held a normalised copy, its resampled copy and the output: 41-48 MB).
    "prepare_aniso": ([[48, 384, 384]], 28),
    # check-data on an int16 NRRD CT + label of that size (14 MB each): read without a copy of ITK's
    # buffer, one volume at a time, label values collected by slab (before: two copies per read and
    # np.unique's sorted copy, 41-48 MB).
    "check": ([[48, 384, 384], None], 22),
    # 16 classes, plan grid 4x coarser than the scan: labels restored one class at a time.
    "predict": ([[128, 128, 128], 16], 100),
    # 8 classes: boolean masks per class, not a float one-hot of every class.
    "evaluate": ([[128, 256, 256], 8], 150),
}


@pytest.fixture(scope="module")
def limited_runs(tmp_path_factory):
    spec = {name: {"args": list(args), "budget_mb": budget} for name, (args, budget) in JOBS.items()}
    spec["check"]["args"][1] = str(tmp_path_factory.mktemp("check"))  # where the job writes its NRRD files
    # One allocator arena and one thread: the address space then grows with what the jobs allocate. A fixed
    # mmap threshold maps every block over 1 MiB on its own and unmaps it when freed: otherwise glibc
    # raises the threshold after the first large free and serves later volumes from heap it kept, which
    # RLIMIT_AS no longer sees.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
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


# ------------------------------------------------------------------ slab-wise passes give the whole-volume values

def test_fingerprint_passes_by_slab_equal_the_whole_volume_expressions(monkeypatch):
    from med3d.data import plan

    monkeypatch.setattr(plan, "PASS_VOXELS", 40)  # many slabs on a small volume
    monkeypatch.setattr(plan, "DRIFT_SAMPLE", 97)
    rng = np.random.default_rng(3)
    for trial in range(6):
        shape = tuple(int(v) for v in rng.integers(4, 14, 3))
        image = np.where(rng.random((2, *shape)) < 0.3, rng.normal(0, 100, (2, *shape)), 0).astype(np.float32)
        image[:, :1] = 0  # an empty border, so the box is smaller than the volume
        mask = np.any(image != 0, axis=0)
        ref_box = [(int(np.flatnonzero(mask.any(axis=o))[0]), int(np.flatnonzero(mask.any(axis=o))[-1]) + 1)
                   for o in ((1, 2), (0, 2), (0, 1))]
        box = plan.nonzero_bbox(image)
        assert box == ref_box
        data = plan.crop(image, box)
        flat = data[1].reshape(-1)
        sample = flat[:: max(1, flat.size // plan.DRIFT_SAMPLE)].astype(np.float64)
        assert plan.intensity_percentiles(image)[1] == {f"p{q:02d}": float(v) for q, v in
                                                       zip(plan.DRIFT_PERCENTILES, np.percentile(sample, (1, 50, 99)))}
        seg = rng.integers(0, 4 if trial % 2 else 1, shape).astype(np.int16)  # trial 0: no foreground at all
        fg = np.flatnonzero(seg > 0)
        want = np.random.default_rng(trial).choice(fg, min(25, fg.size), replace=False) if fg.size else fg
        got = plan._foreground_sample(seg, np.random.default_rng(trial), 25)
        assert np.array_equal(np.ravel_multi_index(got, shape), want)
        values, counts = np.unique(seg, return_counts=True)
        assert plan._value_counts(seg) == dict(zip(values.tolist(), counts.tolist()))


@pytest.mark.parametrize("spacing, target", [((5.0, 0.7, 0.7), (5.0, 1.1, 1.3)),  # coarse z, kept
                                             ((5.0, 0.7, 0.7), (3.0, 1.1, 0.9)),  # coarse z, resampled
                                             ((0.8, 0.8, 4.0), (1.0, 1.0, 4.0))])  # coarse x
def test_slabwise_preprocess_equals_the_whole_channel_bit_for_bit(monkeypatch, spacing, target):
    from med3d.data import plan as plan_mod
    from med3d.data import preprocess as pre
    from med3d.data.image import Geometry, Image

    monkeypatch.setattr(pre, "PIECE_VOXELS", 150)  # many slabs on a small volume
    monkeypatch.setattr(pre, "SLAB_VOXELS", 300)
    monkeypatch.setattr(plan_mod, "PASS_VOXELS", 200)
    rng = np.random.default_rng(4)
    raw = rng.normal(100, 60, (2, 11, 17, 13)).astype(np.int16)
    raw[:, :, :2] = 0
    raw[0, 4:6] = 0  # voxels zero in one channel only
    raw[1, 7] = 0  # (either one)
    entries = [{"scheme": "ct", "clip": [-10.0, 150.0], "mean": 40.0, "std": 30.0}, {"scheme": "zscore"}]
    plan = {"normalization": entries, "target_spacing": list(target)}
    image = Image(raw, Geometry(raw.shape[1:], tuple(reversed(spacing)), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    data, _, props = pre.preprocess(image, None, plan)
    cropped = plan_mod.crop(raw, props["crop_box"])
    nonzero = np.any(cropped != 0, axis=0)
    for ch, entry in enumerate(entries):
        whole = pre.resample_channel(pre.normalize_channel(cropped[ch], entry, nonzero), props["resampled_shape"],
                                     spacing, target)
        assert data[ch].tobytes() == whole.tobytes()
