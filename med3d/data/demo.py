"""Synthetic demo datasets in the Medical Segmentation Decathlon layout.

Four small tasks shaped like real MSD tasks (a 4-channel MR brain tumour with three nested
labels, a CT liver with lesions in Hounsfield units, a 2-channel MR prostate, a CT spleen),
with anisotropic spacings, varied sizes and proper affines. The two CT tasks share one
abdomen model (the spleen task sees an unlabelled liver and the liver task an unlabelled
spleen), so an encoder pretrained on the others has something real to transfer.
Everything is drawn from ``numpy.random.default_rng([seed, task, case])``: same seed, same files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..atomic import write_atomic, write_json_atomic

Arr = np.ndarray


@dataclass(frozen=True)
class DemoTask:
    folder: str
    name: str
    modality: Dict[str, str]
    labels: Dict[str, str]
    generate: Callable[[np.random.Generator], Tuple[Arr, Arr, Arr]]  # -> image (X,Y,Z[,C]), label, affine
    description: str


# ---------------------------------------------------------------- geometry helpers

def _grid(shape: Sequence[int], spacing: Sequence[float]) -> Arr:
    """Physical coordinates (mm) of every voxel, centred on the volume: array (3, X, Y, Z)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def _noise(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> Arr:
    """Smooth random field with unit standard deviation (texture, deformations, bias fields)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _rotation(rng: np.random.Generator, max_deg: float) -> Arr:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return (rx @ ry @ rz).astype(np.float32)


def _blob(xyz: Arr, center: Sequence[float], radii: Sequence[float], rng: np.random.Generator,
          wobble: Arr, amount: float = 0.15, max_deg: float = 20.0) -> Arr:
    """Level function of a rotated, irregular ellipsoid: < 1 inside."""
    d = xyz - np.asarray(center, np.float32)[:, None, None, None]
    d = np.tensordot(_rotation(rng, max_deg), d, axes=1)
    r = np.sqrt(sum((d[i] / radii[i]) ** 2 for i in range(3)))
    return r + amount * wobble


def _affine(spacing: Sequence[float], shape: Sequence[int], flip_xy: bool, rng: np.random.Generator) -> Arr:
    """Voxel-to-world (RAS) affine. CT-like tasks store x and y flipped, as MSD's CT volumes do."""
    aff = np.diag([*spacing, 1.0]).astype(np.float64)
    if flip_xy:
        aff[0, 0], aff[1, 1] = -spacing[0], -spacing[1]
    aff[:3, 3] = -aff[:3, :3] @ (np.asarray(shape) / 2) + rng.uniform(-20, 20, 3)
    return aff


def _shape(rng: np.random.Generator, xy: Tuple[int, int], z: Tuple[int, int]) -> Tuple[int, int, int]:
    n = int(rng.integers(*xy))
    return n, n + int(rng.integers(-4, 5)), int(rng.integers(*z))


# ---------------------------------------------------------------- tasks

def brain_tumour(rng: np.random.Generator) -> Tuple[Arr, Arr, Arr]:
    """4-channel MR (FLAIR, T1w, T1gd, T2w); labels 1 edema, 2 non-enhancing tumour, 3 enhancing tumour."""
    spacing = (2.0, 2.0, 2.0)
    shape = _shape(rng, (52, 62), (40, 48))
    xyz = _grid(shape, spacing)
    fov = np.asarray(shape) * spacing
    head = _blob(xyz, (0, 0, 0), fov * [0.42, 0.45, 0.42], rng, _noise(shape, rng, 8), 0.03, 5) < 1
    brain = _blob(xyz, (0, 0, 0), fov * [0.36, 0.39, 0.36], rng, _noise(shape, rng, 8), 0.03, 5) < 1
    white = brain & (_noise(shape, rng, 2.5) > 0.3)
    c = rng.uniform(-0.15, 0.15, 3) * fov
    size = rng.uniform(13, 19)
    edema = _blob(xyz, c, size * rng.uniform(1.0, 1.5, 3), rng, _noise(shape, rng, 3), 0.25) < 1
    tumour = _blob(xyz, c, size * rng.uniform(0.7, 0.9, 3), rng, _noise(shape, rng, 3), 0.1) < 1
    core = _blob(xyz, c, size * rng.uniform(0.45, 0.6, 3), rng, _noise(shape, rng, 3), 0.1) < 1
    edema, tumour, core = edema & brain, tumour & brain, core & brain
    label = np.zeros(shape, np.uint8)
    label[edema] = 1
    label[tumour] = 3  # enhancing rim
    label[core & tumour] = 2  # necrotic / non-enhancing core inside the rim
    # tissue intensity per channel: skull, grey, white, edema, core, enhancing
    table = np.array([[0.3, 0.55, 0.45, 1.0, 0.7, 0.85],   # FLAIR: edema bright
                      [0.9, 0.5, 0.7, 0.4, 0.3, 0.5],      # T1w
                      [0.9, 0.5, 0.7, 0.45, 0.3, 1.2],     # T1gd: enhancing rim bright
                      [0.4, 0.6, 0.45, 0.9, 1.1, 0.7]])    # T2w
    tissue = np.zeros(shape, np.int64)
    tissue[head & ~brain] = 1
    tissue[brain] = 2
    tissue[white] = 3
    tissue[label == 1], tissue[label == 2], tissue[label == 3] = 4, 5, 6
    image = np.zeros((*shape, 4), np.float32)
    for ch in range(4):
        lut = np.concatenate([[0.0], table[ch]])
        bias = 1 + 0.1 * _noise(shape, rng, 12)
        vol = lut[tissue] * bias * (1 + 0.08 * _noise(shape, rng, 1.0)) + 0.03 * rng.standard_normal(shape)
        image[..., ch] = np.where(head, vol, 0) * rng.uniform(300, 900)
    return image.astype(np.float32), label, _affine(spacing, shape, False, rng)


def _abdomen(rng: np.random.Generator, spacing: Sequence[float], shape: Sequence[int]) -> Tuple[Arr, Dict[str, Arr]]:
    """CT abdomen in Hounsfield units with masks of liver, lesions and spleen."""
    xyz = _grid(shape, spacing)
    fov = np.asarray(shape) * spacing
    x, y, z = xyz
    body = ((x / (fov[0] * 0.46)) ** 2 + (y / (fov[1] * 0.36)) ** 2 + 0.1 * _noise(shape, rng, 6)) < 1
    fat = body & (((x / (fov[0] * 0.42)) ** 2 + (y / (fov[1] * 0.32)) ** 2) > 1)
    spine = ((x / 12) ** 2 + ((y + fov[1] * 0.22) / 12) ** 2) < 1
    liver_c = (fov[0] * rng.uniform(-0.22, -0.14), fov[1] * rng.uniform(-0.05, 0.08), rng.uniform(-8, 8))
    liver = _blob(xyz, liver_c, fov * [0.2, 0.22, 0.45] * rng.uniform(0.85, 1.1, 3), rng,
                  _noise(shape, rng, 4), 0.12) < 1
    spleen_c = (fov[0] * rng.uniform(0.2, 0.26), fov[1] * rng.uniform(-0.15, -0.05), rng.uniform(-10, 10))
    spleen = _blob(xyz, spleen_c, fov * [0.07, 0.11, 0.25] * rng.uniform(0.8, 1.2, 3), rng,
                   _noise(shape, rng, 4), 0.12, 30) < 1
    lesions = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        lc = np.asarray(liver_c) + rng.uniform(-0.5, 0.5, 3) * fov * [0.2, 0.22, 0.3]
        lesions |= _blob(xyz, lc, rng.uniform(5, 12, 3), rng, _noise(shape, rng, 2), 0.2) < 1
    lesions &= liver
    bowel = body & ~fat & (_noise(shape, rng, 3) > 1.2)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0  # muscle / soft tissue
    hu[fat] = -100.0
    hu[bowel] = rng.uniform(-300, 0)
    hu[spine] = 450.0
    hu[spleen] = rng.uniform(100, 120)  # portal-venous phase enhancement
    hu[liver] = rng.uniform(95, 110)
    hu[lesions] = rng.uniform(30, 50)
    hu += 12 * _noise(shape, rng, 1.0) * body + 8 * rng.standard_normal(shape).astype(np.float32)
    return hu, {"liver": liver, "lesion": lesions, "spleen": spleen}


def liver(rng: np.random.Generator) -> Tuple[Arr, Arr, Arr]:
    """1-channel CT; labels 1 liver, 2 cancer."""
    spacing = (rng.uniform(1.4, 1.8),) * 2 + (rng.choice([2.5, 3.0, 5.0]),)
    shape = _shape(rng, (64, 76), (28, 40))
    hu, masks = _abdomen(rng, spacing, shape)
    label = masks["liver"].astype(np.uint8)
    label[masks["lesion"]] = 2
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label, _affine(spacing, shape, True, rng)


def spleen(rng: np.random.Generator) -> Tuple[Arr, Arr, Arr]:
    """1-channel CT; label 1 spleen."""
    spacing = (rng.uniform(1.4, 1.8),) * 2 + (rng.choice([3.0, 5.0]),)
    shape = _shape(rng, (64, 76), (26, 36))
    hu, masks = _abdomen(rng, spacing, shape)
    return (np.clip(np.round(hu), -1024, 3071).astype(np.int16), masks["spleen"].astype(np.uint8),
            _affine(spacing, shape, True, rng))


def prostate(rng: np.random.Generator) -> Tuple[Arr, Arr, Arr]:
    """2-channel MR (T2, ADC); labels 1 peripheral zone, 2 transition zone."""
    spacing = (1.25, 1.25, 3.6)
    shape = _shape(rng, (56, 68), (18, 24))
    xyz = _grid(shape, spacing)
    fov = np.asarray(shape) * spacing
    x, y, z = xyz
    pelvis = ((x / (fov[0] * 0.47)) ** 2 + (y / (fov[1] * 0.4)) ** 2 + 0.1 * _noise(shape, rng, 6)) < 1
    c = np.array([rng.uniform(-6, 6), rng.uniform(-8, 2), rng.uniform(-6, 6)])
    gland = _blob(xyz, c, rng.uniform(15, 22, 3) * [1.2, 0.9, 1.0], rng, _noise(shape, rng, 3), 0.08) < 1
    tz = _blob(xyz, c + [0, 4, 0], rng.uniform(8, 13, 3) * [1.2, 0.9, 1.0], rng, _noise(shape, rng, 3), 0.15) < 1
    bladder = _blob(xyz, c + [0, 18, 22], [22, 18, 16], rng, _noise(shape, rng, 5), 0.1) < 1
    label = np.zeros(shape, np.uint8)
    label[gland & ~tz] = 1
    label[gland & tz] = 2
    t2 = np.where(pelvis, 0.45, 0.0) + 0.5 * (label == 1) + 0.15 * (label == 2) + 0.9 * (bladder & ~gland)
    t2 = t2 * (1 + 0.15 * _noise(shape, rng, 1.0) * (label == 2))  # heterogeneous TZ
    adc = np.where(pelvis, 0.9, 0.0) + 0.7 * (label == 1) + 0.2 * (label == 2) + 1.8 * (bladder & ~gland)
    bias = 1 + 0.1 * _noise(shape, rng, 10)
    image = np.stack([t2 * bias * rng.uniform(400, 800), adc * 1000.0], axis=-1)
    image += 15 * rng.standard_normal(image.shape)
    return np.clip(image, 0, None).astype(np.float32), label, _affine(spacing, shape, False, rng)


TASKS: List[DemoTask] = [
    DemoTask("Task01_BrainTumourDemo", "BrainTumourDemo",
             {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
             {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
             brain_tumour, "synthetic multi-modal MR brain tumour"),
    DemoTask("Task03_LiverDemo", "LiverDemo", {"0": "CT"},
             {"0": "background", "1": "liver", "2": "cancer"}, liver, "synthetic CT liver and lesions"),
    DemoTask("Task05_ProstateDemo", "ProstateDemo", {"0": "T2", "1": "ADC"},
             {"0": "background", "1": "PZ", "2": "TZ"}, prostate, "synthetic bi-parametric MR prostate zones"),
    DemoTask("Task09_SpleenDemo", "SpleenDemo", {"0": "CT"},
             {"0": "background", "1": "spleen"}, spleen, "synthetic CT spleen"),
]
TASK_NAMES = [t.folder for t in TASKS]


def _save_nifti(path: Path, array: Arr, affine: Arr) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    write_atomic(path, lambda tmp: nib.save(img, tmp))


def write_task(task: DemoTask, root: Path, seed: int, n_train: int, n_test: int, task_index: int,
               progress: Optional[Callable[[], None]] = None) -> Path:
    """Write one demo task in MSD layout under ``root/task.folder``; the dataset.json is written last."""
    out = root / task.folder
    training, test = [], []
    for i in range(n_train + n_test):
        rng = np.random.default_rng([seed, task_index, i])
        image, label, affine = task.generate(rng)
        case = f"{task.name.lower()}_{i:03d}.nii.gz"
        if i < n_train:
            _save_nifti(out / "imagesTr" / case, image, affine)
            _save_nifti(out / "labelsTr" / case, label, affine)
            training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
        else:
            _save_nifti(out / "imagesTs" / case, image, affine)
            test.append(f"./imagesTs/{case}")
        if progress:
            progress()
    meta = {
        "name": task.name, "description": task.description, "reference": "med3d demo generator",
        "licence": "CC-BY-SA 4.0", "release": "1.0", "tensorImageSize": "4D" if len(task.modality) > 1 else "3D",
        "modality": task.modality, "labels": task.labels, "numTraining": n_train, "numTest": n_test,
        "training": training, "test": test,
    }
    write_json_atomic(out / "dataset.json", meta)
    return out


def write_demo_data(root: str | Path, seed: int = 0, n_train: int = 10, n_test: int = 2,
                    tasks: Optional[Sequence[str]] = None, show_progress: bool = True) -> List[Path]:
    """Write the demo tasks (all, or those named in ``tasks``) under ``root``; returns their folders."""
    from tqdm import tqdm

    chosen = [(i, t) for i, t in enumerate(TASKS) if tasks is None or t.folder in tasks]
    bar = tqdm(total=len(chosen) * (n_train + n_test), desc="demo data", unit="case", disable=not show_progress)
    paths = [write_task(t, Path(root), seed, n_train, n_test, i, bar.update) for i, t in chosen]
    bar.close()
    return paths


def is_complete(folder: Path) -> bool:
    """True when a demo task folder has its dataset.json (written last) and every file it lists."""
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    files = [c[k] for c in meta["training"] for k in ("image", "label")] + list(meta["test"])
    return all((folder / f).is_file() for f in files)
