"""Run prepare's preprocessing, predict and evaluate on generated volumes under a hard address-space limit.

A support script for ``test_memory.py`` (run as ``python memory_child.py``; prints one JSON line).
Each job gets ``RLIMIT_AS`` = the process's current virtual size + the job's budget, set after a
warm-up pass on a tiny volume (so thread pools, allocator arenas and lazy imports already exist
and the budget is what the job itself allocates). A probe allocation of 1.5x the budget checks
that the limit bites. Budgets sit between what the per-class / per-channel code needs and what
whole-volume float copies would need (tools/peak_rss.py and BENCHMARKS.md give the figures).
"""
from __future__ import annotations

import json
import resource
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

MB = 1 << 20


def vm(key: str) -> int:
    """A ``/proc/self/status`` size in bytes (VmSize, VmPeak, VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def limited(budget_mb: float, job) -> dict:
    """Run ``job()`` with the address space capped at the current size + ``budget_mb``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + int(budget_mb * MB), hard))
    out = {"budget_mb": budget_mb}
    try:
        try:
            probe = np.ones(int(1.5 * budget_mb * MB), np.uint8)
            out["probe_refused"] = False
            del probe
        except MemoryError:
            out["probe_refused"] = True
        try:
            job()
            out["ok"] = True
        except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as RuntimeError
            out["ok"] = False
            out["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        except Exception:
            out["ok"] = False
            out["error"] = traceback.format_exc()[-800:]
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return out


def geometry(shape, spacing):
    from med3d.data.image import Geometry

    return Geometry(tuple(shape), tuple(reversed(spacing)), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


CT_PLAN = {"channel_names": ["CT"], "channels": None, "crop_nonzero": True,
           "normalization": [{"scheme": "ct", "clip": [-1000.0, 400.0], "mean": -300.0, "std": 400.0}]}


def prepare_job(shape):
    """``preprocess`` (prepare's per-case work) of a float32 CT and its label to a 2x coarser grid."""
    from med3d.bench_memory import chest_ct
    from med3d.data.image import Image
    from med3d.data.preprocess import preprocess

    ct, lab = chest_ct(shape)
    image = Image(ct.astype(np.float32)[None], geometry(shape, (1.0, 1.0, 1.0)))
    label = lab.astype(np.int16)[None]
    del ct, lab
    plan = dict(CT_PLAN, target_spacing=[2.0, 2.0, 2.0])
    preprocess(Image(image.array[:, :8, :8, :8].copy(), geometry((8, 8, 8), (1.0, 1.0, 1.0))),
               label[:, :8, :8, :8].copy(), plan)  # warm-up
    return lambda: preprocess(image, label, plan)


def prepare_aniso_job(shape):
    """``preprocess`` of a float32 CT with thick slices (5 x 0.7 x 0.7 mm) to 5 x 1.4 x 1.4 mm, as the lung CT:
    normalised and resampled slab by slab along z, so beside the input only the output is volume-sized."""
    from med3d.bench_memory import chest_ct
    from med3d.data.image import Image
    from med3d.data.preprocess import preprocess

    spacing = (5.0, 0.7, 0.7)
    ct, lab = chest_ct(shape)
    image = Image(ct.astype(np.float32)[None], geometry(shape, spacing))
    label = lab.astype(np.int16)[None]
    del ct, lab
    plan = dict(CT_PLAN, target_spacing=[5.0, 1.4, 1.4])
    preprocess(Image(image.array[:, :4, :16, :16].copy(), geometry((4, 16, 16), spacing)),
               label[:, :4, :16, :16].copy(), plan)  # warm-up
    return lambda: preprocess(image, label, plan)


def check_job(shape, folder):
    """``check_case`` (check-data, the first pass of prepare) of an int16 NRRD CT and its label: each read
    in the stored dtype without a copy of ITK's buffer, the image dropped before the label is read, and
    the label's values collected slab by slab."""
    import SimpleITK as sitk

    from med3d.bench_memory import chest_ct
    from med3d.data.check import check_case
    from med3d.data.datalist import Case

    def case(name, ct, lab):
        paths = [Path(folder) / f"{name}_{kind}.nrrd" for kind in ("image", "label")]
        for path, arr in zip(paths, (ct, lab.astype(np.int16))):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.7, 0.7, 5.0))
            sitk.WriteImage(img, str(path), useCompression=True)
        return Case(name, [paths[0]], paths[1])

    ct, lab = chest_ct(shape)
    big = case("big", ct, lab)
    small = case("small", ct[:4, ::24, ::24], lab[:4, ::24, ::24])  # a coarse copy of the same body
    del ct, lab
    _no_problems(check_case(small, 1, [0, 1]))  # warm-up (imports SimpleITK, starts ITK's threads)
    return lambda: _no_problems(check_case(big, 1, [0, 1]))


def _no_problems(problems) -> None:
    if problems:
        raise AssertionError(f"check_case found problems: {problems}")


def predict_job(shape, num_classes):
    """``Predictor`` on a fine CT with a plan 4x coarser, a ``num_classes`` head (labels only)."""
    from med3d.api import create_model
    from med3d.config import from_dict
    from med3d.data.image import Image
    from med3d.inference import Predictor

    from med3d.bench_memory import chest_ct

    cfg = from_dict({"model": {"encoder": {"arch": "resnet10", "widths": [4, 8, 8, 8]},
                               "heads": {"seg": {"type": "med3d", "num_classes": num_classes}}}})
    torch.manual_seed(0)
    plan = dict(CT_PLAN, target_spacing=[2.0, 2.0, 2.0],
                labels={str(k): f"c{k}" for k in range(num_classes)})
    predictor = Predictor(create_model(cfg).eval(), {"plans": {"seg": plan}, "patch_size": [16, 16, 16]},
                          torch.device("cpu"))
    image = Image(chest_ct(shape)[0].astype(np.float32)[None], geometry(shape, (0.5, 0.5, 0.5)))
    predictor(Image(image.array[:, :16, :16, :16].copy(), geometry((16, 16, 16), (0.5, 0.5, 0.5))))  # warm-up
    return lambda: predictor(image, sw_batch_size=4)


def evaluate_job(shape, num_classes):
    """``pair_metrics`` (evaluate's per-case work) of two ``num_classes`` label maps, with distances."""
    from med3d.evaluate import pair_metrics

    rng = np.random.default_rng(0)
    ref = np.zeros(shape, np.uint8)
    for k in range(1, num_classes):  # small boxes: MONAI's distance maps cover a class's box only
        z, y, x = (int(rng.integers(0, s - 8)) for s in shape)
        ref[z:z + 8, y:y + 8, x:x + 8] = k
    pred = np.roll(ref, 1, axis=2)
    pair_metrics(ref[:8, :8, :8], ref[:8, :8, :8], (1, 1, 1), [1])  # warm-up
    return lambda: pair_metrics(pred, ref, (1.0, 1.0, 1.0), list(range(1, num_classes)))


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    out = {}
    for name, args in spec.items():
        job = {"prepare": prepare_job, "prepare_aniso": prepare_aniso_job, "check": check_job, "predict": predict_job,
               "evaluate": evaluate_job}[name](*args["args"])
        budgets = args["budget_mb"] if isinstance(args["budget_mb"], list) else [args["budget_mb"]]
        runs = [limited(b, job) for b in budgets]  # a list: the smallest budget that passes, for tuning
        out[name] = runs[0] if len(runs) == 1 else [(r["budget_mb"], r["ok"]) for r in runs]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
