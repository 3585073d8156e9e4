"""Peak resident memory of ``prepare``, ``predict`` and ``evaluate``, each run as the CLI in a fresh process.

Each command runs as ``python -m med3d.cli ...`` under a small wrapper process that reads its
child's peak resident set (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) once the child has exited,
so one figure is one command and nothing else. The baseline is a process that imports what
those commands import (torch, MONAI, med3d) and does nothing: the fixed cost to subtract.
Figures are also given as multiples of one float32 copy of the input volume, the unit the
design bound (``PEAK_BOUND_COPIES``) is stated in.

Synthetic CT cases (``write_ct_dataset``) let the bench, the memory tests and
``tools/peak_rss.py`` run the same commands on a volume of any size.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Peak RSS of prepare and predict, above the import baseline, in float32 copies of the largest
# input volume (issue #15's goal).
PEAK_BOUND_COPIES = 4.0
# What the commands import (image readers and metrics included): the fixed cost under every figure.
IMPORTS = ("import torch, monai.inferers, monai.metrics, nibabel, SimpleITK, med3d.cli, med3d.inference, "
           "med3d.data.cache, med3d.evaluate")
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
    "sys.stderr.write(r.stderr[-3000:])\n"
)


def peak_rss_mb(argv: Sequence[str], cwd: Optional[Path] = None) -> Tuple[float, int, str]:
    """Peak resident memory of ``python ARGV`` run alone in a fresh process.

    Args:
        argv: the arguments after ``python`` (e.g. ``["-m", "med3d.cli", "prepare", ...]``).
        cwd: working folder (None: this one).

    Returns:
        Peak RSS in MiB, the command's exit status, and the tail of its stderr.
    """
    r = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, *argv], capture_output=True, text=True,
                       cwd=cwd)
    kib, rc = r.stdout.split()
    return int(kib) / 1024.0, int(rc), r.stderr


def baseline_mb() -> float:
    """Peak RSS (MiB) of a process that only imports torch, MONAI and the med3d commands."""
    return peak_rss_mb(["-c", IMPORTS])[0]


_STAGES = (
    "import json, sys\n"
    + IMPORTS + "\n"
    "from med3d.cli import main\n"
    "def hwm():\n"
    "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
    "out = {'baseline': hwm()}\n"
    "for name, argv in json.loads(sys.argv[1]):\n"
    "    open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to the current RSS\n"
    "    rc = main(argv)\n"
    "    out[name] = hwm()\n"
    "    out[name + '_rc'] = rc\n"
    "print(json.dumps(out))\n"
)


def stage_peaks(commands: Sequence[Tuple[str, Sequence[str]]]) -> Dict[str, Any]:
    """Peak RSS (MiB) of ``med3d`` commands run one after another in one fresh process.

    Cheaper than ``peak_rss_mb`` per command (torch is imported once): the peak is reset
    (``/proc/self/clear_refs``) before each command, so each figure is that command's high-water
    mark. Memory an earlier command freed but the allocator kept counts towards the later ones,
    so these figures are at least the fresh-process ones.

    Args:
        commands: ``(name, argv after "med3d")`` pairs.

    Returns:
        ``baseline`` (after the imports), and per name its peak and ``<name>_rc``.

    Raises:
        RuntimeError: the process failed (its stderr tail in the message).
    """
    r = subprocess.run([sys.executable, "-c", _STAGES, json.dumps([[n, list(a)] for n, a in commands])],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"memory bench process failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def chest_ct(shape_zyx: Sequence[int], z0: int = 0, z1: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Slices ``z0:z1`` of a synthetic chest CT (int16 HU) and its lung labels (uint8, 1 = lung).

    Air outside an elliptic body (-1000 HU), soft tissue with a faint integer texture, two
    elliptic lungs (-850 HU) that narrow towards both ends of the z axis. Built slice-range by
    slice-range so a large volume never needs float64 temporaries of its full size.
    """
    nz, ny, nx = (int(s) for s in shape_zyx)
    z1 = nz if z1 is None else z1
    z = (np.arange(z0, z1, dtype=np.float32)[:, None, None] + 0.5) / nz * 2 - 1
    y = (np.arange(ny, dtype=np.float32)[None, :, None] + 0.5) / ny * 2 - 1
    x = (np.arange(nx, dtype=np.float32)[None, None, :] + 0.5) / nx * 2 - 1
    body = np.broadcast_to((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1.0, (z1 - z0, ny, nx))
    taper = np.clip(1.0 - z ** 2, 0.05, 1.0)
    lung = ((np.abs(x) - 0.4) / (0.28 * taper)) ** 2 + (y / (0.45 * taper)) ** 2 < 1.0
    ct = np.where(body, np.int16(40), np.int16(-1000)).astype(np.int16)
    iz = np.arange(z0, z1, dtype=np.int32)[:, None, None]
    texture = ((iz * 3 + np.arange(ny, dtype=np.int32)[None, :, None] * 13
                + np.arange(nx, dtype=np.int32)[None, None, :] * 7) % 17).astype(np.int16)
    ct += np.where(body, texture, np.int16(0)).astype(np.int16)
    ct[lung & body] = -850
    return ct, (lung & body).astype(np.uint8)


def write_ct_dataset(root: Path, shape_zyx: Sequence[int], spacing_zyx: Sequence[float] = (1.0, 0.7, 0.7),
                     case_id: str = "chest") -> Tuple[Path, Path]:
    """A one-case Decathlon CT dataset (image, lung label, dataset.json) at ``root``.

    Args:
        root: the dataset folder to create.
        shape_zyx: volume size (z, y, x).
        spacing_zyx: voxel size in mm.
        case_id: the file names' stem.

    Returns:
        The image and label paths (NIfTI, int16 and uint8).
    """
    import nibabel as nib

    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ct = np.empty(tuple(reversed([int(s) for s in shape_zyx])), np.int16)  # NIfTI order (x, y, z)
    lab = np.empty(ct.shape, np.uint8)
    step = 32
    for z0 in range(0, int(shape_zyx[0]), step):
        c, m = chest_ct(shape_zyx, z0, min(int(shape_zyx[0]), z0 + step))
        ct[:, :, z0:z0 + c.shape[0]] = c.transpose(2, 1, 0)
        lab[:, :, z0:z0 + c.shape[0]] = m.transpose(2, 1, 0)
    affine = np.diag([-spacing_zyx[2], -spacing_zyx[1], spacing_zyx[0], 1.0])  # LPS-aligned, as scanners write
    image, label = root / "imagesTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), str(image))
    nib.save(nib.Nifti1Image(lab, affine), str(label))
    meta = {"name": root.name, "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lung"},
            "training": [{"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{label.name}"}], "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return image, label


def write_checkpoint(path: Path, plan: Dict[str, Any], num_classes: int, patch: Sequence[int],
                     widths: Sequence[int] = (16, 32, 64, 128), spacing: Optional[Sequence[float]] = None) -> Path:
    """An untrained ResNet-10 + Med3D head checkpoint carrying ``plan`` (target spacing replaced by ``spacing``).

    The weights are random (seed 0): memory and time do not depend on what a network has learnt.
    """
    import torch

    from .api import create_model
    from .checkpoint import save_checkpoint
    from .config import from_dict

    cfg = from_dict({"model": {"encoder": {"arch": "resnet10", "widths": list(widths)},
                               "heads": {"seg": {"type": "med3d", "num_classes": int(num_classes)}}}})
    torch.manual_seed(0)
    plan = dict(plan, target_spacing=list(spacing)) if spacing is not None else plan
    return save_checkpoint(path, create_model(cfg), cfg, meta={"plans": {"seg": plan}, "patch_size": list(patch)})


def volume_mb(path: Path) -> float:
    """MiB of one float32 copy of the image at ``path`` (from its header)."""
    import SimpleITK as sitk  # reads the header only

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return float(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * 4 / 2 ** 20


def measure_case(work: Path, root: Path, image: Path, ref_dir: Path, num_classes: int, patch: Sequence[int],
                 spacing: Optional[Sequence[float]] = None, evaluate: bool = True) -> List[Dict[str, Any]]:
    """Peak RSS of prepare, predict and evaluate on one dataset case, each run as the CLI in a fresh process.

    Args:
        work: a scratch folder (cache, checkpoint and predictions go there).
        root: the dataset folder (``prepare`` input; its plan goes into the checkpoint).
        image: the scan ``predict`` segments.
        ref_dir: folder holding the reference label map under the scan's name (``evaluate``).
        num_classes: classes of the checkpoint's head.
        patch: sliding-window size.
        spacing: target spacing of the plan (``prepare --spacing``; the checkpoint carries the prepared
            plan), None: the dataset's own.
        evaluate: also measure ``evaluate`` (its surface distances over a large structure take long).

    Returns:
        One row per command: ``command``, ``peak_mb``, ``rc``, ``stderr`` (tail, on failure).
    """
    import shutil

    cache, out = work / "cache", work / "pred"
    shutil.rmtree(cache, ignore_errors=True)
    cli = ["-m", "med3d.cli"]
    rows = []
    argv = [*cli, "prepare", str(root), "--cache", str(cache), "--workers", "0", "--quiet"]
    if spacing:
        argv += ["--spacing", *[str(s) for s in spacing]]
    rows.append(("prepare", *peak_rss_mb(argv)))
    plans = sorted(cache.glob("*/plan.json"))
    if rows[-1][2] != 0 or not plans:
        return [_row(*r) for r in rows]
    plan = json.loads(plans[0].read_text())
    ckpt = write_checkpoint(work / "model.pt", plan, num_classes, patch)
    rows.append(("predict", *peak_rss_mb([*cli, "predict", str(ckpt), str(image), "--out", str(out), "--quiet",
                                          "--overwrite"])))
    if evaluate:
        rows.append(("evaluate", *peak_rss_mb([*cli, "evaluate", str(out), str(ref_dir), "--no-plot", "--quiet"])))
    return [_row(*r) for r in rows]


def _row(command: str, peak: float, rc: int, err: str) -> Dict[str, Any]:
    return {"command": command, "peak_mb": peak, "rc": rc, "stderr": err if rc else ""}
