"""What ``med3d predict`` was given, as ``(case_id, files)``: files, DICOM series, image or dataset folders."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

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


# case id, image files, ROI mask, ROI centre (world x, y, z mm, LPS)
RoiJob = Tuple[str, List[Path], Optional[Path], Optional[List[float]]]


def roi_jobs(inputs: Sequence[PathLike], center_mm: Optional[Sequence[float]] = None,
             roi_masks: Optional[Sequence[PathLike]] = None) -> List[RoiJob]:
    """The scans a classification task is applied to, each with its region of interest.

    A single classification dataset (dataset.json with classes, CSV, MedMNIST .npz) gives its
    cases with their own ROIs; otherwise the scans of ``collect_inputs``, with one mask each or
    one centre for a single scan.

    Args:
        inputs: paths as the user gave them.
        center_mm: the ROI centre of the one scan.
        roi_masks: a mask per scan, in the same order (its centroid is the centre).

    Returns:
        One job per scan.

    Raises:
        Med3DError: masks that do not pair with the scans, or a centre for several scans.
    """
    from ..data.classification import is_classification_dataset, read_classification_dataset
    from ..errors import Med3DError

    if len(inputs) == 1 and is_classification_dataset(inputs[0]):
        ds = read_classification_dataset(inputs[0])
        return [(c.case_id, list(c.images), c.mask, list(c.center_mm) if c.center_mm else None)
                for c in ds.cases + ds.val_cases + ds.test_cases if c.images]
    cases = collect_inputs(inputs)
    masks = [Path(m) for m in roi_masks or []]
    if masks and len(masks) != len(cases):
        raise Med3DError(f"--roi-mask: {len(masks)} mask(s) for {len(cases)} scan(s); give one mask per scan, "
                         "in the same order")
    if center_mm is not None and len(cases) != 1:
        raise Med3DError(f"--center: names one ROI centre but {len(cases)} scans were given; give them one at a "
                         "time or give --roi-mask per scan")
    centre = [float(v) for v in center_mm] if center_mm is not None else None
    return [(case, files, masks[i] if masks else None, centre) for i, (case, files) in enumerate(cases)]
