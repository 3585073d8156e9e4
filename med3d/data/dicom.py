"""Choosing and checking the slices of a DICOM series folder before it is read as a volume.

GDCM (through SimpleITK) sorts a folder's slices by position, but leaves out a slice it cannot
parse and stacks unevenly spaced slices as if they were even, with only a warning on stderr: a
truncated file or a missing slice gives a shorter or distorted volume and exit status 0. Here
the folder must hold one series (or the one named by its SeriesInstanceUID), every DICOM file in
it must be readable, and its slices must be evenly spaced along their normal, each at its own
position. Anything else is refused in one line naming the folder (or the file) and what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..errors import Med3DError

# Slice gaps may differ from the series' typical gap by this fraction (scanners round positions).
SPACING_RTOL = 0.01
_POSITION, _ORIENTATION = "0020|0032", "0020|0037"


def series_files(folder: Path, series: Optional[str] = None) -> List[str]:
    """The slice files of the folder's one series (or of ``series``), in position order, after checking them.

    Args:
        folder: a folder of DICOM files.
        series: the SeriesInstanceUID to read when the folder holds several (None: the folder must hold one).

    Returns:
        The files, sorted along the slice normal.

    Raises:
        Med3DError: no series, several without a choice, an unknown choice, an unreadable DICOM file,
            or slices that are missing, duplicated, unevenly spaced or differently oriented.
    """
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) if holds_dicom(folder) else []
    if not ids:
        raise Med3DError(f"{folder}: folder holds no DICOM series; give an image file or a DICOM series folder")
    by_id = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}
    if series is None and len(ids) > 1:
        listing = ", ".join(f"{uid} ({len(files)} slices)" for uid, files in by_id.items())
        raise Med3DError(f"{folder}: holds {len(ids)} DICOM series ({listing}); choose one with --series UID, or "
                         "move each series into its own folder")
    if series is not None and series not in by_id:
        raise Med3DError(f"{folder}: no DICOM series {series} here (found {', '.join(ids)}); give one of those "
                         "to --series")
    _unreadable(folder, {f for files in by_id.values() for f in files})
    return _check_slices(folder, by_id[series or ids[0]])


def _looks_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then 'DICM'."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` holds a DICOM file (asked before GDCM, which warns on stderr about folders without)."""
    return any(p.is_file() and (p.suffix.lower() == ".dcm" or _looks_dicom(p))
               for p in Path(folder).iterdir() if not p.name.startswith("."))


def _unreadable(folder: Path, in_series: set) -> None:
    """Refuse a DICOM file of the folder that GDCM left out of every series (damaged or truncated)."""
    import SimpleITK as sitk

    seen = {str(Path(f).resolve()) for f in in_series}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
            continue
        if str(path.resolve()) in seen or not _looks_dicom(path):
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            continue  # readable, just not an image slice of a series (a report, a presentation state)
        except RuntimeError:
            pass
        raise Med3DError(f"{path}: a DICOM file of series folder {folder} that cannot be read (damaged or "
                         "truncated); the series would be read without it: copy the file again or remove it")


def _tags(path: str) -> Optional[tuple]:
    """(position, orientation) of a slice, or None when it has no position (not a tomographic slice)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        pos = [float(v) for v in reader.GetMetaData(_POSITION).split("\\")]
        ori = [float(v) for v in reader.GetMetaData(_ORIENTATION).split("\\")]
    except (RuntimeError, ValueError):
        return None
    if len(pos) != 3 or len(ori) != 6:
        return None
    return np.asarray(pos), np.asarray(ori)


def _check_slices(folder: Path, files: Sequence[str]) -> List[str]:
    """Refuse slices that are not one evenly spaced stack: a gap, a duplicate, uneven spacing, a turned slice.

    Returns:
        The files sorted along the slice normal (GDCM's own order is not reliable once two share a position).
    """
    tags = [_tags(f) for f in files]
    if len(files) < 2 or any(t is None for t in tags):
        return list(files)  # nothing to compare (a single slice is refused as 2D when read)
    orientations = np.stack([t[1] for t in tags])  # type: ignore[index]
    turned = np.abs(orientations - orientations[0]).max(axis=1) > 1e-3
    if turned.any():
        bad = files[int(np.argmax(turned))]
        raise Med3DError(f"{folder}: slice {Path(bad).name} is oriented differently from {Path(files[0]).name}; "
                         "the folder mixes acquisitions, keep one series per folder")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    pos = np.array([float(t[0] @ normal) for t in tags])  # type: ignore[index]
    order = np.argsort(pos, kind="stable")
    files, pos = [files[i] for i in order], pos[order]
    gaps = np.diff(pos)
    typical = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        names = f"{Path(files[i]).name} and {Path(files[i + 1]).name}"
        if gap < 1e-3 * max(typical, 1.0):
            raise Med3DError(f"{folder}: two slices at position {pos[i]:.4g} mm ({names}); the folder mixes "
                             "acquisitions or holds a copy, keep one series per folder")
        if abs(gap - typical) <= max(SPACING_RTOL * typical, 1e-4):
            continue
        ratio = gap / typical
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            raise Med3DError(f"{folder}: {round(ratio) - 1} slice(s) missing between positions {pos[i]:.4g} and "
                             f"{pos[i + 1]:.4g} mm ({names}; {typical:.4g} mm apart elsewhere); the series is "
                             "incomplete, copy or export it again")
        raise Med3DError(f"{folder}: irregular slice spacing, {gap:.4g} mm between {names} against {typical:.4g} "
                         "mm elsewhere; med3d reads evenly spaced series only, resample the series first")
    return files
