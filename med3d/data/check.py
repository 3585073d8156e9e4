"""``check-data``: validate every case of a dataset before any training touches it.

Each problem is one line naming the file and what is wrong. Errors (unreadable or truncated
files, mismatched grids, undeclared labels, non-finite intensities, wrong channel counts,
complex-valued, all-zero or constant images) stop training; warnings (implausible spacing) are
printed but do not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from ..errors import Med3DError
from ..workers import map_cases
from .datalist import Case, DatasetInfo
from .image import read_channels, read_image
from .plan import label_numbering_problem, z_slabs

# Plausible voxel sizes in mm; outside this range the header is most likely wrong (units in m or um).
SPACING_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


def check_case(case: Case, num_channels: int, labels: Sequence[int]) -> List[Problem]:
    """All problems of one case (reads its files completely)."""
    out: List[Problem] = []
    try:
        image = read_channels(case.images, dtype=None)
    except Med3DError as err:
        return [Problem("error", str(err))]
    first = case.images[0]
    if image.channels != num_channels:
        out.append(Problem("error", f"{first}: {image.channels} channel(s), dataset.json declares {num_channels}"))
    content = _content_problems(first, image.array, labelled=case.label is not None)
    if any(p.severity == "error" for p in content):
        return out + content
    out += content
    bad = _non_finite(image.array)
    if bad:
        out.append(Problem("error", f"{first}: {bad} voxel(s) are NaN or infinite; repair or drop the case"))
    geometry = image.geometry
    del image, content  # the label is read next: one volume at a time
    spacing = geometry.spacing
    if min(spacing) <= 0 or not np.isfinite(spacing).all():
        out.append(Problem("error", f"{first}: invalid spacing {spacing}"))
    elif min(spacing) < SPACING_RANGE[0] or max(spacing) > SPACING_RANGE[1]:
        out.append(Problem("warning", f"{first}: spacing {tuple(round(s, 4) for s in spacing)} mm is outside "
                                      f"{SPACING_RANGE[0]}-{SPACING_RANGE[1]} mm; check the header's units"))
    if case.label is None:
        return out
    try:
        label = read_image(case.label, dtype=None)  # as stored: the mapping is checked below
    except Med3DError as err:
        return out + [Problem("error", str(err))]
    if label.channels != 1:
        out.append(Problem("error", f"{case.label}: a label map must have one channel, found {label.channels}"))
        return out
    diff = geometry.matches(label.geometry)
    if diff:
        out.append(Problem("error", f"{case.label}: grid differs from image {first} ({diff}); resample the label "
                                    "onto the image grid"))
    arr = label.array[0]
    if np.issubdtype(arr.dtype, np.floating) and not _whole_numbers(arr):
        out.append(Problem("error", f"{case.label}: label values are not integers"))
        return out
    values = _unique(arr).astype(np.int64)
    if case.label_map is not None:
        return out + _mapped_absent(case, set(values.tolist()))
    extra = sorted(set(values.tolist()) - set(labels))
    if extra:
        out.append(Problem("error", f"{case.label}: label value(s) {extra} not declared in dataset.json "
                                    f"(declared {sorted(labels)})"))
    return out


def _content_problems(path: Path, array: np.ndarray, labelled: bool) -> List[Problem]:
    """Images that hold no usable intensities.

    Complex voxels (MR k-space or phase data) are an error: training casts to float32, which keeps the
    real part and silently drops the imaginary one, and whether magnitude, phase or real part was meant is
    the user's decision. An all-zero or constant channel of a labelled (training) case is an error: it
    carries no image, so the network would be taught to predict the case's label from a blank (and the
    non-zero crop and normalisation have nothing to work on); it is almost always a failed conversion.
    In an unlabelled (test) case it is a warning: nothing is trained on it, and a prediction on it is
    merely empty.
    """
    if np.iscomplexobj(array):
        return [Problem("error", f"{path}: complex-valued voxels ({array.dtype}); med3d trains on real intensities: "
                                 "save the magnitude (or the part you mean) as a real-valued image")]
    out = []
    for c, channel in enumerate(array):
        if not channel.size or _non_finite(channel[None]):
            continue  # the NaN check below names it
        lo, hi = channel.min(), channel.max()
        if lo == hi:
            what = "all zero" if lo == 0 else f"constant ({lo.item()!r} everywhere)"
            where = f" channel {c}" if len(array) > 1 else ""
            out.append(Problem("error" if labelled else "warning",
                               f"{path}:{where} {what}, no image data; re-export the scan or drop the case"))
    return out


def _non_finite(array: np.ndarray) -> int:
    """How many voxels of a ``(C, Z, Y, X)`` array are NaN or infinite (integers never are), slab by slab."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return sum(int(np.count_nonzero(~np.isfinite(ch[s]))) for ch in array for s in z_slabs(ch.shape))


def _whole_numbers(array: np.ndarray) -> bool:
    """Whether every value of a float ``(Z, Y, X)`` array is finite and integral, slab by slab."""
    for s in z_slabs(array.shape):
        slab = array[s]
        if not np.isfinite(slab).all() or not np.array_equal(slab, np.round(slab)):
            return False
    return True


def _unique(array: np.ndarray) -> np.ndarray:
    """``np.unique`` of a ``(Z, Y, X)`` array, slab by slab (``np.unique`` sorts a copy of all of it)."""
    return np.unique(np.concatenate([np.unique(array[s]) for s in z_slabs(array.shape)]))


def _mapped_absent(case: Case, present: set) -> List[Problem]:
    """With a label mapping every unmapped value is background by design; a mapped structure with none
    of its values in the file is worth a warning (a wrong value in the mapping shows up this way)."""
    by_target: dict = {}
    for src, dst in (case.label_map or {}).items():
        by_target.setdefault(dst, []).append(src)
    out = []
    for dst, srcs in sorted(by_target.items()):
        if not present & set(srcs):
            out.append(Problem("warning", f"{case.label}: label {dst} is mapped from value(s) {sorted(srcs)}, "
                                          f"none of which occurs in this file (values present: "
                                          f"{sorted(present)[:12]}{' ...' if len(present) > 12 else ''})"))
    return out


def _label_gaps(info: DatasetInfo) -> List[Problem]:
    """Training labels must be 0..N: the network has one output per class, and a value past N fails the loss."""
    problem = label_numbering_problem(info)
    return [Problem("error", problem)] if problem else []


def _check_one(args) -> List[Problem]:
    return check_case(*args)


def check_dataset(info: DatasetInfo, workers: int = 0, progress: bool = False) -> List[Problem]:
    """Problems of the whole dataset: reading ``dataset.json`` entries, then every case."""
    problems = [Problem("error", msg) for msg in info.problems] + _label_gaps(info)
    jobs = [(case, info.num_channels, list(info.labels)) for case in info.cases]
    jobs += [(case, info.num_channels, list(info.labels)) for case in info.test_cases]
    results = map_cases(_check_one, jobs, workers, f"check {info.name}", progress)
    for found in results:
        problems.extend(found)
    return problems


def require_valid(info: DatasetInfo, workers: int = 0) -> None:
    """Raise with every error line when the dataset fails ``check_dataset`` (training calls this)."""
    errors = [p for p in check_dataset(info, workers) if p.severity == "error"]
    if errors:  # one line, as every refusal is; check-data lists them all
        more = f" (and {len(errors) - 1} more: run 'med3d check-data {info.root}')" if len(errors) > 1 else ""
        raise Med3DError(f"dataset {info.root} fails check-data with {len(errors)} error(s): {errors[0].message}{more}")
