"""Classification datasets: one class per case, with an optional region of interest (ROI).

Three layouts become one ``ClassDataset``:

* a Decathlon-style folder whose ``dataset.json`` gives every training entry a ``"class"`` (and
  optionally a ``"center"`` in world mm and a ``"mask"``), with a ``"classes"`` name table and an
  optional top-level ``"crop_mm"``;
* a CSV file ``image,class[,center_x,center_y,center_z][,mask]``, paths relative to the CSV;
* a MedMNIST 3D ``.npz`` (``train/val/test_images`` and ``_labels``), held in memory.

A case's ROI is its ``center_mm`` or, failing that, the centroid of its mask; ``roi_crop`` cuts a
box of ``crop_mm`` around it on the image's own grid, so world coordinates survive the crop.
Entries that cannot be used are left out and recorded in ``problems`` (as for segmentation
datasets); ``check_classification_dataset`` adds the per-case checks.
"""
from __future__ import annotations

import csv
import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import Med3DError
from ..paths import safe_name
from .datalist import _by_index, _inside, _read_json
from .image import Geometry, Image, _geometry_from_ras, is_nifti, read_channels, read_image, strip_suffix

PathLike = Union[str, Path]
Center = Tuple[float, float, float]

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
CENTER_COLUMNS = ("center_x", "center_y", "center_z")
CSV_HEADER = "image,class[,center_x,center_y,center_z][,mask]"
MEDMNIST_SPLITS = ("train", "val", "test")
# Label names of the MedMNIST v2/v3 3D datasets (medmnist.INFO[flag]["label"]), keyed by file-name flag.
MEDMNIST_CLASSES: Dict[str, List[str]] = {
    "organmnist3d": ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart",
                     "lung-right", "lung-left", "spleen", "pancreas"],
    "nodulemnist3d": ["benign", "malignant"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "fracturemnist3d": ["buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory synapse", "excitatory synapse"],
}


@dataclass
class ClassCase:
    case_id: str
    images: List[Path]  # one multi-channel file or one file per channel; [] for array-backed data
    label: Optional[int]  # class id; None where unknown (test cases)
    center_mm: Optional[Center] = None  # ROI centre, world (x, y, z) mm, ITK LPS convention
    mask: Optional[Path] = None  # ROI mask file: its non-zero voxels are the region
    array: Optional[np.ndarray] = None  # (C, Z, Y, X) float32 voxels for array-backed data (MedMNIST)


@dataclass
class ClassDataset:
    name: str
    root: Path  # the dataset folder, or the CSV/.npz file's folder
    layout: str  # "msd" | "csv" | "medmnist"
    channel_names: List[str]
    classes: Dict[int, str]  # class id -> name, ids 0..K-1
    crop_mm: Optional[List[float]]  # ROI crop size (z, y, x) in mm; None: the whole image
    cases: List[ClassCase]
    val_cases: List[ClassCase] = field(default_factory=list)  # a fixed validation split (MedMNIST val)
    test_cases: List[ClassCase] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # entries left out, one line each

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)


# ---------------------------------------------------------------- shared parsing helpers


def _numbered(labels: Sequence[Optional[int]]) -> Dict[int, str]:
    """Classes ``"0".."K-1"`` with K one past the largest class id seen."""
    ids = [v for v in labels if v is not None and v >= 0]
    return {i: str(i) for i in range(max(ids) + 1)} if ids else {}


def _declared_classes(raw: Any, path: Path) -> Optional[Dict[int, str]]:
    """The ``"classes"`` table: ``{"0": "benign", ...}``, ``{"benign": 0, ...}`` or a list of names."""
    if raw is None:
        return None
    if isinstance(raw, list):
        raw = {str(i): name for i, name in enumerate(raw)}
    if not isinstance(raw, dict) or not raw:
        raise Med3DError(f"{path}: 'classes' must map class ids to names, e.g. "
                         '{"0": "benign", "1": "malignant"}')
    try:
        classes = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        try:  # name -> id, as nnU-Net writes its labels
            classes = {int(v): str(k) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise Med3DError(f"{path}: 'classes' must map integer class ids to names; found {raw!r}")
    if sorted(classes) != list(range(len(classes))):
        raise Med3DError(f"{path}: 'classes' ids must be 0..{len(classes) - 1}, found {sorted(classes)}; "
                         "number the classes from 0 without gaps")
    return dict(sorted(classes.items()))


def _class_id(value: Any, names: Optional[Dict[int, str]]) -> int:
    """A class id from an int, an int-like string or a declared class name; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        by_name = {v: k for k, v in (names or {}).items()}
        return by_name[text] if text in by_name else int(text)
    raise ValueError(value)


def _center(raw: Any) -> Optional[Center]:
    """``[x, y, z]`` (three finite numbers) as a tuple; None for None; ValueError otherwise."""
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or len(raw) != 3 or any(isinstance(v, bool) for v in raw):
        raise ValueError(raw)
    out = tuple(float(v) for v in raw)
    if not np.isfinite(out).all():
        raise ValueError(raw)
    return out  # type: ignore[return-value]


def _crop_mm(raw: Any, path: Path) -> Optional[List[float]]:
    """``crop_mm`` as three positive sizes (z, y, x); one number means a cube."""
    if raw is None:
        return None
    values = [raw] * 3 if isinstance(raw, (int, float)) and not isinstance(raw, bool) else raw
    try:
        out = [float(v) for v in values]
        ok = len(out) == 3 and all(np.isfinite(v) and v > 0 for v in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise Med3DError(f"{path}: 'crop_mm' must be [z, y, x] in mm (three positive numbers), got {raw!r}")
    return out


# ---------------------------------------------------------------- Decathlon-style dataset.json


def _msd_entry(root: Path, entry: Any, where: str, names: Optional[Dict[int, str]], labelled: bool,
               problems: List[str]) -> Optional[ClassCase]:
    """One dataset.json entry as a case; None (with a problem recorded) if it cannot be used."""
    path = root / "dataset.json"
    entry = {"image": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict) or "image" not in entry or (labelled and "class" not in entry):
        needs = "'image' and 'class'" if labelled else "'image'"
        problems.append(f"{path}: {where} needs {needs}; entry left out")
        return None
    rels = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    if not rels or not all(isinstance(r, str) for r in rels):
        problems.append(f"{path}: {where}.image must be a path or a list of paths (one per channel)")
        return None
    images = [_inside(root, rel, f"{where}.image", problems) for rel in rels]
    label = center = mask = None
    ok = all(images)
    if "class" in entry:
        try:
            label = _class_id(entry["class"], names)
        except (ValueError, KeyError):
            problems.append(f"{path}: {where}.class {entry['class']!r} is not a class id or declared class name")
            ok = False
    try:
        center = _center(entry.get("center"))
    except (TypeError, ValueError):
        problems.append(f"{path}: {where}.center {entry.get('center')!r} must be [x, y, z] in world mm (LPS)")
        ok = False
    if entry.get("mask") is not None:
        mask = _inside(root, str(entry["mask"]), f"{where}.mask", problems)
        ok = ok and mask is not None
    if not ok:
        return None
    # The id names outputs (predictions.csv rows, explain's maps, the class cache's files): a plain name only.
    case_id = safe_name(strip_suffix(images[0]), f"{path}: {where}.image")  # type: ignore[arg-type]
    return ClassCase(case_id, images, label, center, mask)  # type: ignore[arg-type]


def _msd_list(root: Path, meta: Dict[str, Any], key: str, names: Optional[Dict[int, str]], labelled: bool,
              problems: List[str]) -> List[ClassCase]:
    entries = meta.get(key, [])
    if not isinstance(entries, list):
        raise Med3DError(f"{root / 'dataset.json'}: '{key}' must be a list of entries")
    cases = [_msd_entry(root, e, f"{key}[{i}]", names, labelled, problems) for i, e in enumerate(entries)]
    return [c for c in cases if c is not None]


def _read_msd(root: Path) -> ClassDataset:
    path = root / "dataset.json"
    meta = _read_json(path)
    training = meta.get("training")
    if not isinstance(training, list):
        raise Med3DError(f"{path}: key 'training' must be a list of {{\"image\": ..., \"class\": ...}} entries")
    if not any(isinstance(e, dict) and "class" in e for e in training):
        raise Med3DError(f"{path}: no 'training' entry carries a 'class'; give each entry a class id "
                         "(a segmentation dataset lists 'label' files instead)")
    modality = meta.get("modality")
    try:
        channels = _by_index(modality)  # type: ignore[arg-type]
    except (AttributeError, TypeError, ValueError):
        channels = []
    if not channels:
        raise Med3DError(f"{path}: key 'modality' must map channel indices to names, e.g. {{\"0\": \"CT\"}}")
    names = _declared_classes(meta.get("classes"), path)
    problems: List[str] = []
    cases = _msd_list(root, meta, "training", names, True, problems)
    val = _msd_list(root, meta, "validation", names, True, problems)
    tests = _msd_list(root, meta, "test", names, False, problems)
    classes = names if names is not None else _numbered([c.label for c in cases + val])
    return ClassDataset(root.name, root, "msd", channels, classes, _crop_mm(meta.get("crop_mm"), path),
                        cases, val, tests, problems)


# ---------------------------------------------------------------- CSV


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of a classification CSV, keys lower-cased; the header is checked."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise Med3DError(f"{path}: cannot be read as CSV ({err}); save it as UTF-8 CSV with header {CSV_HEADER}")
    for key in ("image", "class"):
        if key not in header:
            raise Med3DError(f"{path}: missing column '{key}' (header is {','.join(header) or 'empty'}); "
                             f"the CSV needs the header {CSV_HEADER}")
    present = [c for c in CENTER_COLUMNS if c in header]
    if present and len(present) != 3:
        raise Med3DError(f"{path}: has column '{present[0]}' but not all of {', '.join(CENTER_COLUMNS)}; "
                         "give the ROI centre as three columns or none")
    return [r for r in rows if any(r.values())]


def _csv_names(rows: List[Dict[str, str]]) -> Optional[Dict[int, str]]:
    """Class names when the class column holds names (none of them an integer): sorted, numbered from 0."""
    values = {r["class"] for r in rows if r["class"]}
    if not values or any(_is_int(v) for v in values):
        return None
    return dict(enumerate(sorted(values)))


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _csv_path(root: Path, cell: str) -> Path:
    path = Path(cell)
    return path if path.is_absolute() else root / path


def _csv_case(path: Path, line: int, row: Dict[str, str], names: Optional[Dict[int, str]],
              problems: List[str]) -> Optional[ClassCase]:
    """One CSV row as a case; None (with a problem recorded) if it cannot be used."""
    where = f"{path} line {line}"
    if not row["image"]:
        problems.append(f"{where}: empty 'image' cell; row left out")
        return None
    images = [_csv_path(path.parent, p.strip()) for p in row["image"].split(";")]  # ';' separates channels
    missing = [p for p in images if not p.exists()]
    if missing:
        problems.append(f"{missing[0]}: file not found (named by {where})")
        return None
    label = None
    if row["class"]:
        try:
            label = _class_id(row["class"], names)
        except (ValueError, KeyError):
            problems.append(f"{where}: class {row['class']!r} is not an integer class id; row left out")
            return None
    center = None
    cells = [row.get(c, "") for c in CENTER_COLUMNS]
    if any(cells):
        try:
            center = _center([float(c) for c in cells])
        except ValueError:
            problems.append(f"{where}: centre {cells} must be three numbers (world mm, LPS); row left out")
            return None
    mask = _csv_path(path.parent, row["mask"]) if row.get("mask") else None
    if mask is not None and not mask.exists():
        problems.append(f"{mask}: file not found (named by {where})")
        return None
    # The id names outputs (predictions.csv rows, explain's maps, the class cache's files): a plain name only.
    return ClassCase(safe_name(strip_suffix(images[0]), f"{where}: image"), images, label, center, mask)


def _read_csv(path: Path) -> ClassDataset:
    rows = _csv_rows(path)
    names = _csv_names(rows)
    problems: List[str] = []
    found = [_csv_case(path, i + 2, row, names, problems) for i, row in enumerate(rows)]
    cases = [c for c in found if c is not None and c.label is not None]
    tests = [c for c in found if c is not None and c.label is None]  # an empty class cell: unlabelled
    classes = names if names is not None else _numbered([c.label for c in cases])
    if not cases and not problems:
        problems.append(f"{path}: no row with a class; list training cases as rows {CSV_HEADER}")
    return ClassDataset(path.stem, path.parent, "csv", ["image"], classes, None, cases, [], tests, problems)


# ---------------------------------------------------------------- MedMNIST .npz


def _medmnist_images(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """``(N, D, H, W)`` uint8 (or float in [0, 1]) -> ``(N, 1, D, H, W)`` float32 in [0, 1]."""
    if arr.ndim != 4:
        raise Med3DError(f"{path}: '{key}' has shape {arr.shape}; a MedMNIST 3D file holds (N, D, H, W) volumes")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
        out /= 255.0  # in place: one float32 copy of the split, which the cases then view
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32, copy=False)
    else:
        raise Med3DError(f"{path}: '{key}' has dtype {arr.dtype}; expected uint8 voxels (MedMNIST) or floats")
    return out[:, None]


def _medmnist_labels(arr: np.ndarray, path: Path, key: str, n: int) -> np.ndarray:
    """``(N, 1)`` or ``(N,)`` integer labels -> ``(N,)`` int64."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or len(arr) != n:
        raise Med3DError(f"{path}: '{key}' has shape {arr.shape}; expected ({n}, 1) class ids "
                         "(multi-label MedMNIST files are not supported)")
    if not np.issubdtype(arr.dtype, np.integer) and not (
            np.issubdtype(arr.dtype, np.floating) and np.array_equal(arr, np.round(arr))):
        raise Med3DError(f"{path}: '{key}' holds non-integer values ({arr.dtype}); expected class ids")
    if n and arr.min() < 0:
        raise Med3DError(f"{path}: '{key}' holds negative class ids; expected ids 0..K-1")
    return arr.astype(np.int64)


def _medmnist_splits(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{split: (images (N, 1, D, H, W), labels (N,))}`` for the splits present in the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            for key in ("train_images", "train_labels"):
                if key not in keys:
                    raise Med3DError(f"{path}: missing key '{key}' (keys: {', '.join(sorted(keys)) or 'none'}); "
                                     "a MedMNIST 3D .npz holds {train,val,test}_images and _labels")
            out = {}
            for split in MEDMNIST_SPLITS:
                ik, lk = f"{split}_images", f"{split}_labels"
                if (ik in keys) != (lk in keys):
                    raise Med3DError(f"{path}: has '{ik if ik in keys else lk}' but not "
                                     f"'{lk if ik in keys else ik}'; each split needs images and labels")
                if ik in keys:
                    images = _medmnist_images(npz[ik], path, ik)
                    out[split] = (images, _medmnist_labels(npz[lk], path, lk, len(images)))
            return out
    except Med3DError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise Med3DError(f"{path}: cannot be read as .npz ({reason}); re-download the MedMNIST file")


def medmnist_class_names(path: PathLike) -> Optional[List[str]]:
    """MedMNIST's label names for a file named after its dataset (``nodulemnist3d_64.npz``), else None."""
    stem = Path(path).name.lower()
    for flag, names in MEDMNIST_CLASSES.items():
        if flag in stem:
            return names
    return None


def _read_medmnist(path: Path) -> ClassDataset:
    splits = _medmnist_splits(path)
    found: Dict[str, List[ClassCase]] = {}
    for split, (images, labels) in splits.items():
        found[split] = [ClassCase(f"{split}_{i:05d}", [], int(labels[i]), array=images[i]) for i in range(len(labels))]
    every = [int(v) for _, labels in splits.values() for v in labels]
    k = max(every) + 1 if every else 0
    known = medmnist_class_names(path)
    # The file names its dataset: MedMNIST's class table is authoritative unless the labels exceed it.
    classes = dict(enumerate(known)) if known and k <= len(known) else {i: str(i) for i in range(k)}
    problems = [] if found.get("train") else [f"{path}: 'train_images' holds no cases"]
    return ClassDataset(path.stem, path.parent, "medmnist", ["image"], classes, None, found.get("train", []),
                        found.get("val", []), found.get("test", []), problems)


# ---------------------------------------------------------------- public readers


def is_classification_dataset(path: PathLike) -> bool:
    """Whether ``path`` is read by ``read_classification_dataset`` rather than as a segmentation dataset.

    Args:
        path: a dataset folder (or its dataset.json), a CSV file or a ``.npz`` file.

    Returns:
        True for a dataset.json whose training entries carry ``"class"``, and for any existing ``.csv``
        or ``.npz`` file (the reader then names what is wrong with it); False otherwise.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".npz"):
        return True
    meta_path = path / "dataset.json" if path.is_dir() else path
    if meta_path.name != "dataset.json" or not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    training = meta.get("training") if isinstance(meta, dict) else None
    return isinstance(training, list) and any(isinstance(e, dict) and "class" in e for e in training)


def read_classification_dataset(path: PathLike) -> ClassDataset:
    """Read a classification dataset: a Decathlon-style folder, a CSV file or a MedMNIST ``.npz``.

    Args:
        path: the dataset folder (or its dataset.json), the CSV file or the ``.npz`` file.

    Returns:
        The dataset; entries that cannot be used are left out and listed in ``problems``.

    Raises:
        Med3DError: the path does not exist, or the file's structure is wrong (no ``"class"`` anywhere,
            malformed JSON/CSV header, missing ``.npz`` keys); one line naming the file and key.
    """
    path = Path(path)
    if not path.exists():
        raise Med3DError(f"{path}: not found; give a dataset folder with dataset.json, a CSV file or a .npz file")
    if path.is_file() and path.name == "dataset.json":
        path = path.parent
    if path.is_dir():
        return _read_msd(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".npz":
        return _read_medmnist(path)
    raise Med3DError(f"{path}: not a classification dataset; give a folder with dataset.json, a .csv or a .npz")


# ---------------------------------------------------------------- images and regions of interest


def _array_geometry(shape: Sequence[int]) -> Geometry:
    """Identity geometry with 1 mm voxels for an array ``(Z, Y, X)`` that has none of its own."""
    return Geometry(shape=tuple(int(s) for s in shape), spacing=(1.0, 1.0, 1.0),  # type: ignore[arg-type]
                    origin=(0.0, 0.0, 0.0), direction=IDENTITY)


def load_case_image(case: ClassCase) -> Image:
    """The case's voxels as an ``Image`` (float32; array-backed cases on an identity grid, 1 mm voxels).

    Args:
        case: a case from ``read_classification_dataset``.

    Returns:
        ``Image`` with array ``(C, Z, Y, X)``.

    Raises:
        Med3DError: an image file cannot be read, the channel files disagree, or the case has no voxels.
    """
    if case.array is not None:
        array = np.asarray(case.array, dtype=np.float32)
        if array.ndim != 4:
            raise Med3DError(f"case {case.case_id}: array of shape {array.shape}; expected (C, Z, Y, X)")
        return Image(array, _array_geometry(array.shape[1:]))
    if not case.images:
        raise Med3DError(f"case {case.case_id}: no image file and no array")
    return read_channels(case.images, dtype=np.float32)


def world_to_index(geometry: Geometry, point_mm: Sequence[float]) -> np.ndarray:
    """Continuous voxel index ``(z, y, x)`` of a world point ``(x, y, z)`` mm (LPS).

    Args:
        geometry: the voxel grid.
        point_mm: the world point, x, y, z order.

    Returns:
        float64 array ``(z, y, x)``; voxel centres sit at integers.
    """
    xyz = np.linalg.solve(geometry.affine_lps(), np.array([*point_mm, 1.0], dtype=np.float64))[:3]
    return xyz[::-1].copy()


def index_to_world(geometry: Geometry, index_zyx: Sequence[float]) -> Center:
    """World point ``(x, y, z)`` mm (LPS) of a voxel index ``(z, y, x)`` (continuous allowed)."""
    world = geometry.affine_lps() @ np.array([*reversed(list(index_zyx)), 1.0], dtype=np.float64)
    return tuple(float(v) for v in world[:3])  # type: ignore[return-value]


def roi_center_mm(case: ClassCase, image: Image) -> Optional[Center]:
    """The case's ROI centre in world mm: ``center_mm``, else its mask's centroid, else None.

    Args:
        case: the case.
        image: the case's image (``load_case_image``); the mask must lie on its grid.

    Returns:
        ``(x, y, z)`` mm (LPS), or None when the case has neither centre nor mask, or an empty mask.

    Raises:
        Med3DError: the mask cannot be read or lies on a different grid than the image.
    """
    if case.center_mm is not None:
        return tuple(float(v) for v in case.center_mm)  # type: ignore[return-value]
    if case.mask is None:
        return None
    mask = read_image(case.mask)
    diff = image.geometry.matches(mask.geometry)
    if diff:
        raise Med3DError(f"{case.mask}: grid differs from the case's image ({diff}); resample the mask onto it")
    voxels = np.nonzero(mask.array[0])
    if not len(voxels[0]):
        return None
    return index_to_world(mask.geometry, [float(v.mean()) for v in voxels])


def crop_voxels(geometry: Geometry, crop_mm: Sequence[float]) -> Tuple[int, int, int]:
    """Voxels per axis ``(z, y, x)`` of a box ``crop_mm`` (z, y, x) on ``geometry``'s grid (at least 1)."""
    if len(crop_mm) != 3 or any(not v > 0 for v in crop_mm):
        raise Med3DError(f"crop_mm {list(crop_mm)} must be three positive sizes (z, y, x) in mm")
    return tuple(max(1, int(round(mm / sp))) for mm, sp in zip(crop_mm, geometry.spacing_zyx))  # type: ignore


def roi_crop(image: Image, center_mm: Sequence[float], crop_mm: Sequence[float],
             pad_value: Optional[float] = None) -> Image:
    """The box of ``crop_mm`` centred at ``center_mm``, cut on the image's own grid (no resampling).

    The box's middle voxel (index ``n // 2`` per axis) is the voxel nearest the centre. Where the
    box leaves the image it is padded.

    Args:
        image: the image.
        center_mm: box centre, world ``(x, y, z)`` mm (LPS).
        crop_mm: box size ``(z, y, x)`` mm; rounded to whole voxels.
        pad_value: value outside the image; None: each channel's minimum (air in CT, 0 in most MR).

    Returns:
        ``Image`` of the box whose geometry has the box's origin, so world positions are preserved.

    Raises:
        Med3DError: ``crop_mm`` is not three positive sizes.
    """
    geo = image.geometry
    size = np.array(crop_voxels(geo, crop_mm))
    center = world_to_index(geo, center_mm)
    start = np.floor(center - size // 2 + 0.5).astype(np.int64)  # voxel nearest the centre lands at size // 2
    shape = np.array(image.array.shape[1:])
    lo, hi = np.clip(start, 0, shape), np.clip(start + size, 0, shape)
    inside = bool(np.all(lo == start) and np.all(hi == start + size))
    out = np.empty((image.channels, *size), dtype=image.array.dtype)
    if not inside:
        pads = (np.full(image.channels, pad_value) if pad_value is not None
                else image.array.reshape(image.channels, -1).min(axis=1))
        out[...] = np.asarray(pads, dtype=out.dtype)[:, None, None, None]
    if np.all(hi > lo):
        src = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
        dst = (slice(None), *(slice(a - s, b - s) for a, b, s in zip(lo, hi, start)))
        out[dst] = image.array[src]
    origin = index_to_world(geo, start.tolist())
    return Image(out, Geometry(shape=tuple(int(s) for s in size), spacing=geo.spacing,  # type: ignore[arg-type]
                               origin=origin, direction=geo.direction))


# ---------------------------------------------------------------- check-data


def read_header(path: PathLike) -> Tuple[Geometry, int]:
    """Grid and channel count of an image file from its header (DICOM folders are read whole).

    Args:
        path: an image file or DICOM series folder.

    Returns:
        ``(geometry, channels)``.

    Raises:
        Med3DError: missing, unreadable, or not 3D.
    """
    path = Path(path)
    if not path.exists():
        raise Med3DError(f"{path}: file not found; check the path (and the entry naming it)")
    if path.is_dir():
        image = read_image(path)
        return image.geometry, image.channels
    try:
        if is_nifti(path):
            return _nifti_header(path)
        return _sitk_header(path)
    except Med3DError:
        raise
    except Exception as err:  # nibabel/SimpleITK raise many types for damaged headers
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise Med3DError(f"{path}: cannot be read ({reason}); the file is damaged, re-export it")


def _nifti_header(path: Path) -> Tuple[Geometry, int]:
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise Med3DError(f"{path}: image of shape {shape}; med3d needs 3D volumes")
    channels = shape[3] if len(shape) == 4 else (shape[4] if len(shape) == 5 else 1)
    return _geometry_from_ras(img.affine, shape[:3]), int(channels)


def _sitk_header(path: Path) -> Tuple[Geometry, int]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise Med3DError(f"{path}: a {reader.GetDimension()}D image; med3d needs 3D volumes")
    geo = Geometry(shape=tuple(int(s) for s in reversed(reader.GetSize())),  # type: ignore[arg-type]
                   spacing=tuple(reader.GetSpacing()), origin=tuple(reader.GetOrigin()),  # type: ignore[arg-type]
                   direction=tuple(reader.GetDirection()))
    return geo, int(reader.GetNumberOfComponents())


def _case_where(ds: ClassDataset, case: ClassCase) -> str:
    return str(case.images[0]) if case.images else f"{ds.root / ds.name} case {case.case_id}"


def _case_grid(ds: ClassDataset, case: ClassCase, where: str) -> Tuple[Optional[Geometry], List[str]]:
    """The case's grid and errors about its voxels (header only for files)."""
    if case.array is not None:
        arr = case.array
        if arr.ndim != 4 or arr.shape[0] != ds.num_channels:
            return None, [f"error: {where}: array of shape {arr.shape}; expected ({ds.num_channels}, Z, Y, X)"]
        bad = [] if np.isfinite(arr).all() else [f"error: {where}: NaN or infinite voxels"]
        return _array_geometry(arr.shape[1:]), bad
    if not case.images:
        return None, [f"error: {where}: no image file and no array"]
    try:
        headers = [read_header(p) for p in case.images]
    except Med3DError as err:
        return None, [f"error: {err}"]
    out = []
    channels = sum(n for _, n in headers)
    if channels != ds.num_channels:
        out.append(f"error: {where}: {channels} channel(s), the dataset declares {ds.num_channels}")
    for path, (geo, _) in zip(case.images[1:], headers[1:]):
        diff = headers[0][0].matches(geo)
        if diff:
            out.append(f"error: {path}: channel grid differs from {where} ({diff}); resample onto one grid")
    return headers[0][0], out


def _check_roi(ds: ClassDataset, case: ClassCase, geo: Geometry, where: str) -> List[str]:
    out = []
    if case.center_mm is not None:
        idx = world_to_index(geo, case.center_mm)
        if np.any(idx < -0.5) or np.any(idx > np.array(geo.shape) - 0.5):
            xyz = ", ".join(f"{v:.1f}" for v in case.center_mm)
            out.append(f"error: {where}: ROI centre ({xyz}) mm lies outside the image (voxel z, y, x "
                       f"{tuple(round(float(v), 1) for v in idx)} of {geo.shape}); give (x, y, z) in LPS world mm "
                       "(negate x and y of RAS coordinates)")
    if case.mask is not None:
        out += _check_mask(case.mask, geo)
    if case.center_mm is None and case.mask is None and ds.crop_mm is not None:
        out.append(f"warning: {where}: no ROI ('center' or 'mask') although crop_mm is set; the whole image is used")
    return out


def _check_mask(path: Path, geo: Geometry) -> List[str]:
    if not path.exists():
        return [f"error: {path}: ROI mask not found"]
    try:
        mask = read_image(path)
    except Med3DError as err:
        return [f"error: {err}"]
    diff = geo.matches(mask.geometry)
    if diff:
        return [f"error: {path}: mask grid differs from its image ({diff}); resample the mask onto the image grid"]
    if mask.channels != 1 or not np.any(mask.array):
        return [f"error: {path}: ROI mask is empty or has {mask.channels} channels; it needs one channel with "
                "non-zero voxels on the region"]
    return []


def _check_label(ds: ClassDataset, case: ClassCase, labelled: bool, where: str) -> List[str]:
    label = case.label
    if label is None:
        return [f"error: {where}: no class"] if labelled else []
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        return [f"error: {where}: class {label!r} is not an integer class id"]
    if int(label) not in ds.classes:
        return [f"error: {where}: class {label} is not declared (classes 0..{ds.num_classes - 1}: "
                f"{', '.join(ds.classes.values())}); fix the entry or the class table"]
    return []


def _check_structure(ds: ClassDataset) -> List[str]:
    out = []
    if sorted(ds.classes) != list(range(len(ds.classes))):
        out.append(f"error: {ds.root}: class ids {sorted(ds.classes)} must be 0..K-1")
    if len(ds.classes) < 2:
        out.append(f"warning: {ds.root}: {len(ds.classes)} class(es); classification needs at least two")
    if ds.crop_mm is not None and (len(ds.crop_mm) != 3 or any(not v > 0 for v in ds.crop_mm)):
        out.append(f"error: {ds.root}: crop_mm {ds.crop_mm} must be three positive sizes (z, y, x) in mm")
    counts = Counter(c.label for c in ds.cases)
    for cid, name in ds.classes.items():
        if not counts.get(cid):
            out.append(f"warning: {ds.root}: class {cid} ({name}) has no training case; the model never sees it")
    seen: Dict[str, str] = {}
    for split, cases in (("training", ds.cases), ("validation", ds.val_cases), ("test", ds.test_cases)):
        for case in cases:
            if case.case_id in seen:
                out.append(f"error: {_case_where(ds, case)}: case id '{case.case_id}' appears twice "
                           f"({seen[case.case_id]} and {split}); give the files distinct names")
            seen.setdefault(case.case_id, split)
    return out


def check_classification_dataset(ds: ClassDataset) -> List[str]:
    """Every problem of a classification dataset, one line each, prefixed ``error:`` or ``warning:``.

    Reads image headers (not voxels) and the ROI masks. Errors: entries the reader left out, class ids
    that are not declared, ROI centres outside their image, masks missing, empty or on another grid,
    wrong channel counts, duplicate case ids. Warnings: a class without training cases, fewer than two
    classes, a case without ROI when ``crop_mm`` is set.

    Args:
        ds: the dataset (``read_classification_dataset``).

    Returns:
        The problem lines; empty when the dataset is clean.
    """
    out = [f"error: {p}" for p in ds.problems] + _check_structure(ds)
    for labelled, cases in ((True, ds.cases), (True, ds.val_cases), (False, ds.test_cases)):
        for case in cases:
            where = _case_where(ds, case)
            out += _check_label(ds, case, labelled, where)
            geo, found = _case_grid(ds, case, where)
            out += found
            if geo is not None:
                out += _check_roi(ds, case, geo, where)
    return out


def require_valid_classification(ds: ClassDataset) -> None:
    """Raise with every error line when ``check_classification_dataset`` finds errors (warnings pass).

    Args:
        ds: the dataset.

    Raises:
        Med3DError: the dataset has errors (the first 20 listed).
    """
    errors = [line[len("error: "):] for line in check_classification_dataset(ds) if line.startswith("error: ")]
    if errors:
        lines = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise Med3DError(f"dataset {ds.root}: fails check-data with {len(errors)} error(s):\n  {lines}{more}")
