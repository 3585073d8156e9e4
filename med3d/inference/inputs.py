"""What ``med3d predict`` was given, as ``(case_id, files)``: files, DICOM series, image or dataset folders.

A classification dataset (dataset.json with classes, a CSV) given to a segmentation model stands for its
scans: every case's image files, as ``roi_jobs`` gives them to a classification model.

Case ids become output file names (``OUT/<case>.nii.gz``), so each must be a plain file name
(``med3d.paths.safe_name``) and no two inputs may share one: the second output would replace the first.
"""
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

    Raises:
        Med3DError: a case id that is not a plain file name, two inputs with the same case id, a dataset
            folder with entries ``check-data`` reports (outside the root, missing), or a MedMNIST ``.npz``
            (arrays without scan files).
    """
    from ..data.classification import is_classification_dataset
    from ..data.datalist import NO_TRAINING_CASES, cases_from_folder, read_dataset
    from ..data.image import strip_suffix
    from ..errors import Med3DError
    from ..paths import safe_name

    out: List[Tuple[str, List[Path]]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            out.append((path.name, [path]))
        elif is_classification_dataset(path):
            out += _classification_scans(path)
        elif path.is_dir() and (path / "dataset.json").is_file():
            info = read_dataset(path)
            problems = [p for p in info.problems if not p.endswith(NO_TRAINING_CASES)]
            if problems:  # an entry outside the root or missing: refused, not silently left out
                raise Med3DError(f"{problems[0]} (run med3d check-data {path} for every problem)")
            out += [(c.case_id, list(c.images)) for c in info.test_cases or info.cases]
        elif path.is_dir() and _is_dicom_series(path):
            out.append((path.resolve().name, [path]))  # resolved: '.' or '..' name the folder they stand for
        elif path.is_dir():
            out += [(c.case_id, list(c.images)) for c in cases_from_folder(path)]
        else:
            out.append((strip_suffix(path), [path]))
    seen: dict = {}
    for case, files in out:
        safe_name(case, str(files[0]))
        if case in seen and seen[case].resolve() != files[0].resolve():  # the same scan twice is no clash
            raise Med3DError(f"{files[0]}: same case name {case!r} as {seen[case]}; their outputs would replace "
                             "each other, rename one or predict them into separate folders")
        seen[case] = files[0]
    return out


def _classification_scans(path: Path) -> List[Tuple[str, List[Path]]]:
    """The scans of a classification dataset, every split, for a model that segments them."""
    from ..data.classification import CSV_HEADER, read_classification_dataset
    from ..errors import Med3DError

    ds = read_classification_dataset(path)
    if ds.layout == "medmnist":
        raise Med3DError(f"{path}: a MedMNIST classification dataset holds arrays, not scans with a geometry; a "
                         "segmentation checkpoint needs image files, DICOM folders or a dataset folder")
    problems = [p for p in ds.problems if not p.endswith(CSV_HEADER)]  # a CSV of unlabelled rows is fine here
    if problems:  # an entry outside the root or missing: refused, not silently left out
        raise Med3DError(f"{problems[0]} (run med3d check-data {path} for every problem)")
    return [(c.case_id, list(c.images)) for c in ds.cases + ds.val_cases + ds.test_cases]


def _is_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    from ..data.dicom import holds_dicom

    return holds_dicom(folder) and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


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
