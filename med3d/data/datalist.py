"""Dataset readers: the Decathlon (MSD) and nnU-Net v2 raw layouts, turned into one datalist.

Both layouts become a ``DatasetInfo``: channel names, integer labels, and cases that each
list their image file(s) (one multi-channel file, or one file per channel) and label file.
Every path stays inside the dataset root: an entry pointing elsewhere, or at a missing file,
is recorded as a problem for ``check-data`` and its case left out. A symbolic link placed inside
the root is followed (``med3d new-dataset`` links the user's files that way rather than copy them).

A ``label_map`` (in dataset.json, med3d's own key, or in the config) keeps some structures of the
label files and makes the rest background; each case carries its value table, applied on reading.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import Med3DError
from .image import Image, list_images, read_image, strip_suffix
from .labelmap import LabelMapSpec, apply_table, resolve_label_map

PathLike = Union[str, Path]


@dataclass
class Case:
    case_id: str
    images: List[Path]  # one multi-channel file, or one file per channel
    label: Optional[Path] = None
    label_map: Optional[Dict[int, int]] = None  # label file value -> training value (others: 0); None: as stored

    def read_label(self, dtype: Any = None) -> Image:
        """The case's label map with its value table applied (the file is not changed).

        Args:
            dtype: array dtype to read as (None: as stored).

        Returns:
            The label image.

        Raises:
            Med3DError: no label file, or it cannot be read.
        """
        if self.label is None:
            raise Med3DError(f"case {self.case_id}: has no label file")
        image = read_image(self.label, dtype=dtype)
        return Image(apply_table(image.array, self.label_map), image.geometry)


@dataclass
class DatasetInfo:
    name: str
    root: Path
    layout: str  # "msd" | "nnunet"
    channel_names: List[str]
    labels: Dict[int, str]
    cases: List[Case]
    test_cases: List[Case] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # entries left out, one line each
    label_map: Optional[Dict[int, int]] = None  # the value table every case's label is read through

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1


def _inside(root: Path, rel: str, where: str, problems: List[str]) -> Optional[Path]:
    """Resolve ``rel`` against ``root``; record a problem and return None if it escapes or is missing."""
    # Lexically, not through symlinks: a link placed inside the root is the user's choice.
    path = Path(os.path.normpath(root.absolute() / rel))
    if not path.is_relative_to(Path(os.path.normpath(root.absolute()))):
        problems.append(f"{root / 'dataset.json'}: {where} '{rel}' points outside the dataset root; "
                        "keep every file inside the dataset folder")
        return None
    if not path.exists():
        problems.append(f"{path}: file not found (named by {where} in dataset.json)")
        return None
    return path


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise Med3DError(f"{path}: not found; a dataset folder needs a dataset.json (Decathlon or nnU-Net v2)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Med3DError(f"{path}: not valid JSON ({err}); fix the file")
    if not isinstance(data, dict):
        raise Med3DError(f"{path}: expected a JSON object at the top level")
    return data


def _int_labels(raw: Dict[str, Any], path: Path, name_to_value: bool) -> Dict[int, str]:
    labels: Dict[int, str] = {}
    for key, value in raw.items():
        number, name = (value, key) if name_to_value else (key, value)
        if isinstance(number, list):
            raise Med3DError(f"{path}: label '{name}' is region-based ({number}); med3d trains integer label "
                             "maps, list each label with one value")
        try:
            labels[int(number)] = str(name)
        except (TypeError, ValueError):
            raise Med3DError(f"{path}: label entry {key!r}: {value!r} is not an integer label")
    if 0 not in labels:
        raise Med3DError(f"{path}: labels must include background 0")
    return dict(sorted(labels.items()))


def _require_keys(meta: Dict[str, Any], keys: Sequence[str], path: Path, layout: str) -> None:
    for key in keys:
        if key not in meta:
            raise Med3DError(f"{path}: missing key '{key}' for the {layout} layout")


def _by_index(mapping: Dict[str, Any]) -> List[str]:
    """Values of a ``{"0": ..., "1": ...}`` mapping in index order (channel names)."""
    return [str(mapping[k]) for k in sorted(mapping, key=int)]


def _read_msd(root: Path, meta: Dict[str, Any]) -> DatasetInfo:
    path = root / "dataset.json"
    _require_keys(meta, ("modality", "labels", "training"), path, "Decathlon")
    channels = _by_index(meta["modality"])
    problems: List[str] = []
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(f"{path}: training[{i}] needs 'image' and 'label'")
            continue
        image = _inside(root, entry["image"], f"training[{i}].image", problems)
        label = _inside(root, entry["label"], f"training[{i}].label", problems)
        if image and label:
            cases.append(Case(strip_suffix(image), [image], label))
    tests = []
    for i, rel in enumerate(meta.get("test", [])):
        rel = rel["image"] if isinstance(rel, dict) else rel
        image = _inside(root, rel, f"test[{i}]", problems)
        if image:
            tests.append(Case(strip_suffix(image), [image]))
    return DatasetInfo(str(meta.get("name") or root.name), root, "msd", channels,
                       _int_labels(meta["labels"], path, name_to_value=False), cases, tests, problems)


def _nnunet_cases(root: Path, folder: str, ending: str, n_ch: int, labels: bool,
                  problems: List[str]) -> List[Case]:
    images_dir = root / folder
    if not images_dir.is_dir():
        return []
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    by_case: Dict[str, Dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        m = pattern.match(p.name)
        if m:
            by_case.setdefault(m.group(1), {})[int(m.group(2))] = p
    cases = []
    for cid, files in sorted(by_case.items()):
        missing = [c for c in range(n_ch) if c not in files]
        if missing:
            problems.append(f"{images_dir / f'{cid}_{missing[0]:04d}{ending}'}: channel file missing for case "
                            f"{cid} ({n_ch} channels declared)")
            continue
        label = None
        if labels:
            label = root / "labelsTr" / f"{cid}{ending}"
            if not label.exists():
                problems.append(f"{label}: label file missing for case {cid}")
                continue
        cases.append(Case(cid, [files[c] for c in range(n_ch)], label))
    return cases


def _read_nnunet(root: Path, meta: Dict[str, Any]) -> DatasetInfo:
    path = root / "dataset.json"
    _require_keys(meta, ("channel_names", "labels", "file_ending"), path, "nnU-Net v2")
    channels = _by_index(meta["channel_names"])
    ending = str(meta["file_ending"])
    problems: List[str] = []
    if "dataset" in meta:  # explicit file lists (nnU-Net's dataset.json 'dataset' key)
        cases = []
        for cid, entry in sorted(meta["dataset"].items()):
            imgs = [_inside(root, rel, f"dataset.{cid}.images", problems) for rel in entry.get("images", [])]
            label = _inside(root, entry["label"], f"dataset.{cid}.label", problems)
            if label and imgs and all(imgs):
                cases.append(Case(cid, imgs, label))  # type: ignore[arg-type]
    else:
        cases = _nnunet_cases(root, "imagesTr", ending, len(channels), True, problems)
    tests = _nnunet_cases(root, "imagesTs", ending, len(channels), False, problems)
    n = meta.get("numTraining")
    if isinstance(n, int) and n != len(cases) and not problems:
        problems.append(f"{path}: numTraining is {n} but {len(cases)} training cases were found")
    return DatasetInfo(root.name, root, "nnunet", channels, _int_labels(meta["labels"], path, name_to_value=True),
                       cases, tests, problems)


def apply_label_map(info: DatasetInfo, spec: LabelMapSpec, where: str) -> DatasetInfo:
    """Train ``info`` on the structures ``spec`` names (name -> value(s) in its label files), the rest background.

    Args:
        info: the dataset as read.
        spec: the mapping, in the order the training labels are numbered.
        where: how errors name the mapping.

    Returns:
        ``info`` with its labels replaced and every case reading its label through the value table.

    Raises:
        Med3DError: the mapping is malformed.
    """
    info.labels, table = resolve_label_map(spec, where)
    info.label_map = table
    for case in info.cases:
        case.label_map = table
    return info


def read_dataset(root: PathLike, label_map: Optional[LabelMapSpec] = None) -> DatasetInfo:
    """Read a dataset folder in Decathlon or nnU-Net v2 raw layout (told apart by dataset.json's keys).

    Args:
        root: the dataset folder.
        label_map: structures to train on (name -> label file value(s)); None: dataset.json's own
            ``label_map`` when it has one, else the labels as declared.

    Returns:
        The dataset.

    Raises:
        Med3DError: no readable dataset.json, or a malformed label mapping.
    """
    root = Path(root)
    if not root.is_dir():
        raise Med3DError(f"{root}: dataset folder not found")
    meta = _read_json(root / "dataset.json")
    if "channel_names" in meta:
        info = _read_nnunet(root, meta)
    elif "modality" in meta or "training" in meta:
        info = _read_msd(root, meta)
    else:
        raise Med3DError(f"{root / 'dataset.json'}: neither Decathlon ('modality', 'training') nor nnU-Net v2 "
                         "('channel_names', 'file_ending') keys found")
    info.name = root.name  # folder names (Task09_Spleen, Dataset009_Spleen) are what configs refer to
    if label_map is not None:
        apply_label_map(info, label_map, f"label_map for {root}")
    elif meta.get("label_map") is not None:
        if not isinstance(meta["label_map"], dict):
            raise Med3DError(f"{root / 'dataset.json'}: 'label_map' must map names to label values")
        apply_label_map(info, meta["label_map"], f"{root / 'dataset.json'}: label_map")
    if not info.cases and not info.problems:
        info.problems.append(f"{root}: no training cases found")
    return info


def cases_from_folder(folder: PathLike) -> List[Case]:
    """Unlabelled cases from a plain folder of images (one file or DICOM folder per case)."""
    return [Case(strip_suffix(p), [p]) for p in list_images(folder)]
