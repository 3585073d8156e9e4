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
    entries = [*meta["training"], *meta.get("test", [])]
    files = [e[k] if isinstance(e, dict) else e for e in entries for k in ("image", "label", "mask")
             if not isinstance(e, dict) or k in e]
    return all((folder / f).is_file() for f in dict.fromkeys(files))


# ---------------------------------------------------------------- classification demo: lung nodules

NODULE_DEMO = "Task90_NoduleDemo"
NODULE_CLASSES = {"0": "benign", "1": "malignant"}
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS: dataset.json centres are ITK world coordinates


def _chest(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]) -> Arr:
    """CT chest slab in HU: soft-tissue body, two aerated lungs with sparse vessels, array (X, Y, Z)."""
    x, y, z = _grid(shape, spacing)
    fov = np.asarray(shape) * spacing
    body = ((x / (fov[0] * 0.48)) ** 2 + (y / (fov[1] * 0.42)) ** 2) < 1
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):  # plain ellipsoids: the lesion, not the lungs, is what the task is about
        r = fov * [0.2, 0.34, 0.7] * rng.uniform(0.95, 1.05, 3)
        lungs |= ((x - side * fov[0] * 0.23) / r[0]) ** 2 + ((y - rng.uniform(-3, 3)) / r[1]) ** 2 + (z / r[2]) ** 2 < 1
    lungs &= body
    texture = _noise(shape, rng, 1.2)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[lungs] = -850.0 + 25 * texture[lungs]  # parenchyma
    hu[lungs & (texture > 2.6)] = -80.0  # vessels: small bright spots, distractors the size of spicules
    return hu


def _unit_vectors(rng: np.random.Generator, n: int) -> Arr:
    v = rng.standard_normal((n, 3))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _nodule(d: Arr, voxel_mm3: float, radius: float, spiculated: bool, rng: np.random.Generator) -> Arr:
    """Lesion mask from offsets ``d`` (3, ...) mm to its centre: a smooth ellipsoid (class 0) or a lobulated,
    spiculated lesion (class 1) of the same volume, so that the class shows in the margin, not the size."""
    target = 4 / 3 * np.pi * radius ** 3 / voxel_mm3  # voxels of a sphere of ``radius``
    if not spiculated:
        axes = rng.uniform(0.8, 1.2, 3)
        axes *= radius / np.prod(axes) ** (1 / 3)  # the sphere's volume
        e = np.tensordot(_rotation(rng, 90), d, axes=1)
        return sum((e[i] / axes[i]) ** 2 for i in range(3)) < 1
    dist = np.sqrt((d ** 2).sum(0)) + 1e-6
    u = d / dist
    lobes = sum(w * np.clip(np.tensordot(v, u, axes=1), 0, None) ** 4
                for v, w in zip(_unit_vectors(rng, 5), rng.uniform(0.3, 0.6, 5)))
    shape_r = 0.75 + lobes  # star-shaped core: relative radius per direction
    spicules = np.zeros(dist.shape, bool)
    for s, length in zip(_unit_vectors(rng, int(rng.integers(6, 11))), rng.uniform(1.5, 2.2, 10)):
        a = np.tensordot(s, d, axes=1)  # distance along the spicule
        reach = length * radius
        width = 2.2 * (1 - a / reach) + 0.9  # mm, tapering towards its tip; two voxels or more at 1.5 mm
        spicules |= (a > 0) & (a < reach) & (dist ** 2 - a ** 2 < width ** 2)
    # Scale the core so that core + spicules has the sphere's volume (a star shape scales as r^3).
    extra = np.count_nonzero(spicules & (dist > radius * shape_r))
    core_voxels = max(np.count_nonzero(dist < radius * shape_r), 1)
    scale = np.clip(max(target - extra, 0.5 * target) / core_voxels, 0.3, 1.5) ** (1 / 3)
    return (dist < radius * scale * shape_r) | spicules


def nodule_case(rng: np.random.Generator, label: int, shape_zyx: Sequence[int] = (48, 96, 96),
                spacing: float = 1.5) -> Tuple[Arr, Arr, Arr, List[float]]:
    """One chest CT with one lung lesion of class ``label`` (0 smooth, 1 spiculated).

    Args:
        rng: the case's random generator.
        label: the class.
        shape_zyx: volume size (z, y, x).
        spacing: isotropic voxel size in mm.

    Returns:
        (image int16 HU (X, Y, Z), lesion mask uint8 (X, Y, Z), RAS affine, lesion centre [x, y, z] LPS mm).
    """
    shape = tuple(reversed(shape_zyx))
    sp = np.array((spacing,) * 3)
    hu = _chest(rng, shape, sp)
    fov = np.asarray(shape) * sp
    side = rng.choice([-1, 1])
    centre = np.array([side * fov[0] * 0.23 + rng.uniform(-3, 3), rng.uniform(-0.12, 0.12) * fov[1],
                       rng.uniform(-0.15, 0.15) * fov[2]], np.float32)
    radius = rng.uniform(4.0, 6.5)
    index = centre / sp + (np.asarray(shape) - 1) / 2  # _grid is centred on the volume
    # Only a box around the lesion is computed: spicules reach at most 2.2 radii.
    half = np.ceil(2.3 * radius / sp).astype(int) + 2
    lo = np.maximum(np.round(index).astype(int) - half, 0)
    hi = np.minimum(np.round(index).astype(int) + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    d = np.stack(np.meshgrid(*[(np.arange(a, b) - i) * s for a, b, i, s in zip(lo, hi, index, sp)],
                             indexing="ij")).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[box] = _nodule(d, float(np.prod(sp)), radius, bool(label), rng)
    soft = ndimage.gaussian_filter(mask[box].astype(np.float32), 0.7)  # partial volume at the margin
    hu[box] = hu[box] * (1 - soft) + rng.uniform(10, 50) * soft
    hu += 15 * rng.standard_normal(shape).astype(np.float32)
    affine = _affine(sp, shape, True, rng)
    world = _LPS @ (affine[:3, :3] @ index + affine[:3, 3])
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return image, mask.astype(np.uint8), affine, [round(float(v), 3) for v in world]


def write_nodule_demo(root: str | Path, n_train: int = 20, n_test: int = 4, seed: int = 0,
                      shape_zyx: Sequence[int] = (48, 96, 96), spacing: float = 1.5,
                      crop_mm: Sequence[float] = (36.0, 36.0, 36.0)) -> Path:
    """Write ``Task90_NoduleDemo``: a Decathlon-style lung-nodule classification dataset.

    Each CT holds one lesion; class 0 (benign) is a smooth ellipsoid, class 1 (malignant) a lobulated,
    spiculated lesion of the same volume. Classes alternate, so they are balanced. Training entries carry
    ``class``, ``center`` (world x, y, z mm, LPS) and ``mask``; test entries ``image`` and ``center``.

    Args:
        root: folder to write the task folder into.
        n_train: training cases.
        n_test: test cases (their classes are not written).
        seed: random seed; the same seed writes the same files.
        shape_zyx: volume size (z, y, x).
        spacing: isotropic voxel size in mm.
        crop_mm: the ROI box (z, y, x) mm written as the dataset's ``crop_mm``.

    Returns:
        The task folder (its dataset.json is written last).
    """
    out = Path(root) / NODULE_DEMO
    training, test = [], []
    for i in range(n_train + n_test):
        rng = np.random.default_rng([seed, 90, i])
        image, mask, affine, centre = nodule_case(rng, i % 2, shape_zyx, spacing)
        case = f"nodule_{i:03d}.nii.gz"
        if i < n_train:
            _save_nifti(out / "imagesTr" / case, image, affine)
            _save_nifti(out / "masksTr" / case, mask, affine)
            training.append({"image": f"./imagesTr/{case}", "class": i % 2, "center": centre,
                             "mask": f"./masksTr/{case}"})
        else:
            _save_nifti(out / "imagesTs" / case, image, affine)
            test.append({"image": f"./imagesTs/{case}", "center": centre})
    meta = {
        "name": "NoduleDemo", "description": "synthetic CT lung nodules: smooth (benign) vs spiculated (malignant)",
        "reference": "med3d demo generator", "licence": "CC-BY-SA 4.0", "release": "1.0", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "classes": NODULE_CLASSES, "crop_mm": [float(v) for v in crop_mm],
        "numTraining": n_train, "numTest": n_test, "training": training, "test": test,
    }
    write_json_atomic(out / "dataset.json", meta)
    return out
