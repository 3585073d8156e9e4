"""What ``med3d predict`` was given, as ``(case_id, files)``: files, DICOM series, image or dataset folders."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple, Union

PathLike = Union[str, Path]


def collect_inputs(inputs: Sequence[PathLike]) -> List[Tuple[str, List[Path]]]:
    """``(case_id, files)`` for files, DICOM series folders, plain image folders and dataset folders.

    Args:
        inputs: paths as the user gave them; a missing path is kept so that reading it reports it.

    Returns:
        One entry per case, in the order given.
    """
    from ..data.datalist import cases_from_folder, read_dataset
    from ..data.image import strip_suffix

    out: List[Tuple[str, List[Path]]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            out.append((path.name, [path]))
        elif path.is_dir() and (path / "dataset.json").is_file():
            info = read_dataset(path)
            out += [(c.case_id, list(c.images)) for c in info.test_cases or info.cases]
        elif path.is_dir() and _is_dicom_series(path):
            out.append((path.name, [path]))
        elif path.is_dir():
            out += [(c.case_id, list(c.images)) for c in cases_from_folder(path)]
        else:
            out.append((strip_suffix(path), [path]))
    return out


def _is_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
