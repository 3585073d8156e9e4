"""Unlabelled datasets: images without label maps, for the self-supervised task kinds.

An unlabelled dataset is either a plain folder of images (NIfTI, NRRD, MHA/MHD, or one DICOM
series per sub-folder), or a labelled dataset folder whose training images (labels withheld),
test images (``imagesTs`` / ``test``) or both are taken. It goes through the same pipeline as
labelled data: ``check-data``'s checks, a fingerprint and plan (median spacing; CT clipped and
z-scored, other modalities z-scored per case, or the dataset's shipped descriptor), and the
preprocessed cache, with an empty label map beside each case. CT statistics come from labelled
foreground, which an unlabelled dataset lacks: its CT channels need a fixed HU window
(``ct_window``) or another normalisation.

Its cache folder is the dataset's own with ``-unlabelled-<images>`` appended, so a dataset used
both labelled (segmentation) and unlabelled (self-supervised) keeps two caches that never clash.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from ..errors import Med3DError
from .cache import cache_cases, cache_folder, plan_dataset, require_prepared
from .check import require_valid
from .datalist import Case, DatasetInfo, cases_from_folder, read_dataset
from .image import read_image
from .plan import default_scheme, find_descriptor, load_descriptor

PathLike = Union[str, Path]
IMAGES = ("training", "test", "all")


def _from_dataset(root: Path, images: str) -> DatasetInfo:
    info = read_dataset(root)
    chosen = []
    if images in ("training", "all"):
        chosen += [Case(c.case_id, c.images) for c in info.cases]  # the label is withheld
    if images in ("test", "all"):
        chosen += [Case(c.case_id, c.images) for c in info.test_cases]
    info.cases, info.test_cases, info.label_map = chosen, [], None
    # Test images alone need no training case.
    info.problems = [p for p in info.problems if "no training cases" not in p]
    return info


def _from_folder(root: Path, modality: Optional[Sequence[str]]) -> DatasetInfo:
    cases = cases_from_folder(root)
    if modality:
        names = [str(m) for m in modality]
    elif cases:
        names = ["image"] * read_image(cases[0].images[0]).channels  # a 4D NIfTI holds several channels
    else:
        names = ["image"]
    return DatasetInfo(root.name, root, "folder", names, {}, cases)


def read_unlabelled(path: PathLike, images: Optional[str] = None,
                    modality: Optional[Sequence[str]] = None) -> DatasetInfo:
    """An unlabelled dataset as a ``DatasetInfo`` whose cases carry no label.

    Args:
        path: a dataset folder (with ``dataset.json``) or a plain folder of images.
        images: for a dataset folder, ``training``, ``test`` or ``all`` (None: all).
        modality: for a plain folder, one name per channel (None: channels named ``image``).

    Returns:
        The dataset (labels: background only).

    Raises:
        Med3DError: the folder is missing or holds no image, a case id repeats, or a key does not apply.
    """
    root = Path(path)
    if not root.is_dir():
        raise Med3DError(f"{root}: unlabelled dataset folder not found; give a folder of images or a dataset folder")
    if images is not None and images not in IMAGES:
        raise Med3DError(f"images '{images}' unknown; choose from {', '.join(IMAGES)}")
    if (root / "dataset.json").is_file():
        if modality is not None:
            raise Med3DError(f"{root}: modality is for plain folders of images; this dataset's dataset.json names "
                             "its channels, so drop the modality key")
        info = _from_dataset(root, images or "all")
    else:
        if images not in (None, "all"):
            raise Med3DError(f"{root}: images '{images}' needs a dataset folder with dataset.json; a plain folder "
                             "of images is used whole, so drop the images key")
        info = _from_folder(root, modality)
    info.labels = {0: "background"}
    if not info.cases:
        raise Med3DError(f"{root}: no image found for an unlabelled dataset (NIfTI, NRRD, MHA/MHD files or DICOM "
                         "series folders)")
    seen: dict = {}
    for case in info.cases:
        if case.case_id in seen:
            raise Med3DError(f"{case.images[0]}: case id '{case.case_id}' repeats {seen[case.case_id]}; give each "
                             "image its own name")
        seen[case.case_id] = case.images[0]
    return info


def unlabelled_folder(cache_dir: PathLike, root: PathLike, images: Optional[str] = None) -> Path:
    """The cache folder of ``root`` read as unlabelled (``images``: which of its images)."""
    base = cache_folder(cache_dir, root)
    return base.with_name(f"{base.name}-unlabelled-{images or 'all'}")


def _check_ct(info: DatasetInfo, entry: Any, where: str) -> None:
    """CT statistics come from labelled foreground: without labels a CT channel needs a window (or a scheme)."""
    if entry.ct_window is not None or entry.normalization is not None:
        return
    path = Path(entry.descriptor) if entry.descriptor else find_descriptor(info.name)
    desc = load_descriptor(path) if path else {}
    if desc.get("ct_window") is not None:
        return
    schemes = desc.get("normalization") or [default_scheme(n) for n in info.channel_names]
    if "ct" in schemes:
        raise Med3DError(f"{where}: {info.root} is unlabelled CT, whose intensity statistics would need labelled "
                         "foreground; set a fixed HU window (ct_window: [-160, 240] for the abdomen) or "
                         "normalization: [zscore]")


def prepare_unlabelled(entry: Any, cache_dir: PathLike, workers: int = 0, progress: bool = True,
                       check: bool = True, where: str = "data.datasets") -> Path:
    """Check, plan and preprocess an unlabelled dataset into its cache folder (resumable, idempotent).

    Args:
        entry: the task's ``data.datasets`` entry (path, images, modality, descriptor, spacing,
            normalization, ct_window).
        cache_dir: the cache root.
        workers: processes for checking and preprocessing.
        progress: show progress bars.
        check: run the dataset checks first.
        where: the config key to name in errors.

    Returns:
        The cache folder.

    Raises:
        Med3DError: the dataset fails its checks, cannot be planned, or a case fails to prepare.
    """
    info = read_unlabelled(entry.path, entry.images, entry.modality)
    if check:
        require_valid(info, workers)
    _check_ct(info, entry, where)
    folder = unlabelled_folder(cache_dir, entry.path, entry.images)
    plan = plan_dataset(info, folder, workers, progress, entry.descriptor, entry.spacing, entry.normalization,
                        ct_window=entry.ct_window)
    _, failed = cache_cases(info, folder, plan, entry.path, workers, progress, f"prepare {info.name} (unlabelled)",
                            kind="unlabelled", images=entry.images or "all")
    if failed:
        raise Med3DError(f"dataset {entry.path}: {len(failed)} unlabelled case(s) failed to prepare; first: "
                         f"{failed[0]}")
    return folder


def check_unlabelled(entry: Any, cache_dir: PathLike) -> Path:
    """The cache folder of an unlabelled dataset fully prepared under its current plan; writes nothing.

    Raises:
        Med3DError: missing, stale or incomplete; the message says what to run.
    """
    info = read_unlabelled(entry.path, entry.images, entry.modality)
    return require_prepared(info, unlabelled_folder(cache_dir, entry.path, entry.images),
                            f"unlabelled dataset {entry.path}", descriptor=entry.descriptor, spacing=entry.spacing,
                            normalization=entry.normalization, ct_window=entry.ct_window)


def case_ids(entry: Any) -> List[str]:
    """The case ids of an unlabelled dataset entry, as its cache names them."""
    return [c.case_id for c in read_unlabelled(entry.path, entry.images, entry.modality).cases]
