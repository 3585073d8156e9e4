"""``med3d new-dataset``: a Decathlon dataset folder made from a folder of scans and one of label maps.

Scans and label maps are paired by name (``liver_007.nii.gz`` with ``liver_007.nii.gz`` or
``liver_007.nrrd``; an nnU-Net channel suffix ``_0000`` on the scan is ignored). The new folder
holds ``dataset.json`` and symbolic links ``imagesTr/<case>`` and ``labelsTr/<case>`` to the
user's files: nothing is copied or rewritten. Scans without a label map become test cases.
A label mapping (``liver=5 spleen=1``) is stored in dataset.json as ``label_map`` and applied
whenever the labels are read; without one, the values found in the label files are declared (through
a ``label_map`` numbering them 1..N when they have gaps: training needs consecutive labels).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import write_json_atomic
from ..errors import Med3DError
from ..paths import safe_name
from .image import image_suffix, list_images, read_image, strip_suffix
from .labelmap import resolve_label_map

PathLike = Union[str, Path]
_CHANNEL_SUFFIX = re.compile(r"_0000$")  # nnU-Net's first-channel suffix on image names
_OTHER_CHANNEL = re.compile(r"_(\d{4})$")  # what is left of a name after the first channel's suffix went
_SHOWN = 12  # labels named in the summary line


def _stem(path: Path) -> str:
    """The case name of a file (suffix dropped) or of a DICOM series folder (its whole name: dots in
    folder names such as ``1.2.840.113`` are not a suffix)."""
    return path.name if path.is_dir() else strip_suffix(path)


def _link_name(case: str, path: Path) -> str:
    return case if path.is_dir() else f"{case}{image_suffix(path)}"


def _by_case(folder: Path, what: str, skip: Sequence[Path] = ()) -> Dict[str, Path]:
    """The files (or DICOM series folders) of ``folder`` by case name, leaving out the folders in ``skip``."""
    if not folder.is_dir():
        raise Med3DError(f"{folder}: {what} folder not found")
    out: Dict[str, Path] = {}
    for path in list_images(folder):
        if path.is_dir() and (path.resolve() in skip or (path / "dataset.json").is_file()):
            continue  # the labels or dataset folder kept among the scans is no DICOM series
        case = safe_name(_CHANNEL_SUFFIX.sub("", _stem(path)), str(path))  # becomes the link's file name
        if case in out:
            raise Med3DError(f"{path}: a second {what} file for case {case} (also {out[case].name}); keep one "
                             "file per case")
        out[case] = path
    if not out:
        raise Med3DError(f"{folder}: no {what} files (NIfTI, NRRD, MHA or DICOM series folders) found")
    return out


def pair_files(images: PathLike, labels: PathLike,
               skip: Sequence[PathLike] = ()) -> Tuple[List[Tuple[str, Path, Path]], List[Tuple[str, Path]]]:
    """Scans paired with label maps by case name.

    Args:
        images: folder of scans (files or DICOM series folders).
        labels: folder of label maps.
        skip: folders that are no scans even when inside ``images`` (the dataset being written);
            the labels folder and any dataset folder (holding a dataset.json) are skipped anyway.

    Returns:
        ``[(case, image, label), ...]`` and the unlabelled scans ``[(case, image), ...]``, sorted.

    Raises:
        Med3DError: a folder is missing or empty, a label map has no scan, a scan is a second channel
            (``case_0001`` beside ``case_0000``), or nothing pairs.
    """
    skipped = [Path(p).resolve() for p in (*skip, labels)]
    imgs, labs = _by_case(Path(images), "image", skipped), _by_case(Path(labels), "label", skipped)
    orphans = sorted(set(labs) - set(imgs))
    if orphans:
        raise Med3DError(f"{labs[orphans[0]]}: no scan named {orphans[0]} in {images} ({len(orphans)} label map(s) "
                         f"without a scan; scans are named e.g. {next(iter(imgs))}); name scan and label alike")
    for case in sorted(set(imgs) - set(labs)):
        m = _OTHER_CHANNEL.search(case)
        if m and case[:m.start()] in imgs:
            raise Med3DError(f"{imgs[case]}: looks like channel {int(m.group(1))} of case {case[:m.start()]} "
                             "(nnU-Net naming); new-dataset makes one-channel datasets: keep one channel's files, "
                             "or write dataset.json by hand for several")
    pairs = [(c, imgs[c], labs[c]) for c in sorted(labs)]
    return pairs, [(c, imgs[c]) for c in sorted(set(imgs) - set(labs))]


def _link(target: Path, link: Path) -> str:
    """A symbolic link ``link`` -> ``target`` (absolute); returns its path relative to the dataset root.

    A link already there (an earlier run, perhaps before the user's files moved) is re-pointed, through a
    temporary link renamed over it; anything else there is refused.
    """
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return f"{link.parent.name}/{link.name}"
    if link.exists() and not link.is_symlink():
        raise Med3DError(f"{link}: already exists and is not a link; choose an empty --out folder")
    tmp = link.with_name(f".{link.name}.tmp")
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(target, target_is_directory=target.is_dir())
        os.replace(tmp, link)
    except OSError as err:
        raise Med3DError(f"{link}: cannot create a link to {target} ({err.strerror}); the file system must "
                         "support symbolic links")
    return f"{link.parent.name}/{link.name}"


def _found_values(pairs: Sequence[Tuple[str, Path, Path]]) -> List[int]:
    """The non-zero values present in the label maps (each read once), sorted."""
    values: set = set()
    for _, _, label in pairs:
        arr = read_image(label).array
        if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
            raise Med3DError(f"{label}: label values are not integers; is this a scan in the labels folder?")
        values |= set(np.unique(arr).astype(np.int64).tolist())
    return sorted(v for v in values if v != 0)


def _found_labels(pairs: Sequence[Tuple[str, Path, Path]]) -> Tuple[Dict[int, str], Optional[Dict[str, int]]]:
    """Labels declaring every value found, ``label<value>``, and the mapping needed when they have gaps.

    Training needs labels 0..N (a network has one output per class); values such as TotalSegmentator's
    ids (1..117 with gaps) are numbered 1..N through a label map named after the file values.
    """
    values = _found_values(pairs)
    if values == list(range(1, len(values) + 1)):
        return {0: "background", **{v: f"label{v}" for v in values}}, None
    mapping = {f"label{v}": v for v in values}
    return resolve_label_map(mapping, "label values")[0], mapping


def new_dataset(images: PathLike, labels: PathLike, out: PathLike, label_map: Optional[Mapping] = None,
                modality: str = "CT", name: Optional[str] = None) -> Path:
    """Write a Decathlon dataset folder over the user's scans and label maps (linked, not copied).

    Args:
        images: folder of scans.
        labels: folder of label maps, named like the scans.
        out: the dataset folder to create (absent or empty).
        label_map: structures to train on, name -> value(s) in the label files; None: every value found
            (numbered 1..N through a ``label_map`` when the values have gaps).
        modality: the channel's name (``CT`` selects CT normalisation).
        name: dataset name in dataset.json (default: the folder's name).

    Returns:
        The path of the written ``dataset.json``.

    Raises:
        Med3DError: nothing pairs, ``out`` is a file or holds other files, or the mapping is malformed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Med3DError(f"{out}: exists and is not a folder; --out names the dataset folder to create")
    if out.exists() and any(p.name != "dataset.json" and p.name not in ("imagesTr", "labelsTr", "imagesTs")
                            for p in out.iterdir()):
        raise Med3DError(f"{out}: exists and holds other files; choose a new folder for the dataset")
    pairs, unlabelled = pair_files(images, labels, skip=[out])
    meta: Dict[str, object] = {"name": name or out.name, "description": f"scans from {Path(images).resolve()}, "
                               f"labels from {Path(labels).resolve()} (linked, not copied)",
                               "modality": {"0": modality}}
    if label_map:
        names, _ = resolve_label_map(label_map, "--labels")
    else:
        names, label_map = _found_labels(pairs)
    meta["labels"] = {str(k): v for k, v in names.items()}
    if label_map:
        meta["label_map"] = {k: (v if isinstance(v, int) else (list(v) if len(v) > 1 else int(v[0])))
                             for k, v in label_map.items()}
    training = []
    for case, image, label in pairs:
        training.append({"image": _link(image.resolve(), out / "imagesTr" / _link_name(case, image)),
                         "label": _link(label.resolve(), out / "labelsTr" / _link_name(case, label))})
    meta["training"] = training
    meta["numTraining"] = len(training)
    meta["test"] = [_link(image.resolve(), out / "imagesTs" / _link_name(case, image))
                    for case, image in unlabelled]
    meta["numTest"] = len(unlabelled)
    return write_json_atomic(out / "dataset.json", meta)


def describe(path: Path) -> str:
    """One line about a written dataset.json: cases, labels, mapping."""
    meta = json.loads(Path(path).read_text())
    labels = ", ".join(f"{k} {v}" for k, v in list(meta["labels"].items())[:_SHOWN])
    if len(meta["labels"]) > _SHOWN:
        labels += f", ... ({len(meta['labels'])} in all)"
    mapped = meta.get("label_map")
    how = (" from label file values " + ", ".join(f"{k}={v}" for k, v in list(mapped.items())[:_SHOWN]) +
           (", ..." if len(mapped) > _SHOWN else "") + " (every other value: background)") if mapped else ""
    return (f"{path}: {meta['numTraining']} labelled case(s), {meta['numTest']} unlabelled; labels {labels}{how}")
