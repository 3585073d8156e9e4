"""Dataset readers: the Decathlon (MSD) and nnU-Net v2 raw layouts, turned into one datalist.

Both layouts become a ``DatasetInfo``: channel names, integer labels, and cases that each
list their image file(s) (one multi-channel file, or one file per channel) and label file.
Every path stays inside the dataset root: an entry pointing elsewhere (by ``..``, an absolute
path, or a folder that is a symbolic link leading out of the root), or at a missing file, is
recorded as a problem for ``check-data`` and its case left out. A symbolic link that is the entry's
own file (or DICOM folder) is followed: ``med3d new-dataset`` links the user's files that way
rather than copy them. Case ids become output file names (cache, predictions), so one that is not
a plain file name (``..``, a separator, NUL, an absolute path) is refused when the dataset is read.

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
from ..paths import safe_name
from .image import Image, list_images, read_image, strip_suffix
from .labelmap import LabelMapSpec, apply_table, resolve_label_map

PathLike = Union[str, Path]
NO_TRAINING_CASES = "no training cases found"  # a problem for training, not for predicting the test cases


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


def _inside(root: Path, rel: Any, where: str, problems: List[str]) -> Optional[Path]:
    """Resolve ``rel`` against ``root``; record a problem and return None if it escapes or is missing."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        problems.append(f"{root / 'dataset.json'}: {where} is {rel!r}, not a relative file path; give the path "
                        "of a file inside the dataset folder")
        return None
    path = Path(os.path.normpath(root.absolute() / rel))
    # The folders on the way are resolved (a linked folder must not lead out of the root); the entry's own
    # file may be a link, which is how new-dataset refers to the user's scans without copying them.
    real_root = Path(os.path.realpath(root))
    if not path.is_relative_to(Path(os.path.normpath(root.absolute()))) or \
            not Path(os.path.realpath(path.parent)).is_relative_to(real_root):
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
    if not isinstance(raw, dict) or not raw:
        raise Med3DError(f"{path}: 'labels' must map label values to names (Decathlon) or names to values "
                         f"(nnU-Net), found {type(raw).__name__}")
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


def _by_index(mapping: Any, path: Union[Path, str] = "dataset.json", key: str = "modality") -> List[str]:
    """Values of a ``{"0": ..., "1": ...}`` mapping in index order (channel names)."""
    if not isinstance(mapping, dict) or not mapping:
        raise Med3DError(f"{path}: '{key}' must map channel numbers to names, e.g. {{\"0\": \"CT\"}}")
    bad = [k for k in mapping if not str(k).isdigit()]
    if bad:
        raise Med3DError(f"{path}: '{key}' key {bad[0]!r} is not a channel number; number the channels "
                         "\"0\", \"1\", ...")
    if sorted(int(k) for k in mapping) != list(range(len(mapping))):
        raise Med3DError(f"{path}: '{key}' numbers the channels {sorted(int(k) for k in mapping)}; number them "
                         "0..N-1 without gaps")
    return [str(mapping[k]) for k in sorted(mapping, key=int)]


def _case_id(name: str, path: Path, where: str) -> str:
    """A case id that can become an output file name, or one line naming where it came from."""
    return safe_name(name, f"{path}: {where}")


def _list(meta: Dict[str, Any], key: str, path: Path) -> List[Any]:
    value = meta.get(key, [])
    if not isinstance(value, list):
        raise Med3DError(f"{path}: '{key}' must be a list of entries, found {type(value).__name__}")
    return value


def _read_msd(root: Path, meta: Dict[str, Any]) -> DatasetInfo:
    path = root / "dataset.json"
    _require_keys(meta, ("modality", "labels", "training"), path, "Decathlon")
    channels = _by_index(meta["modality"], path, "modality")
    problems: List[str] = []
    cases = []
    for i, entry in enumerate(_list(meta, "training", path)):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(f"{path}: training[{i}] needs 'image' and 'label'")
            continue
        image = _inside(root, entry["image"], f"training[{i}].image", problems)
        label = _inside(root, entry["label"], f"training[{i}].label", problems)
        if image and label:
            cases.append(Case(_case_id(strip_suffix(image), path, f"training[{i}].image"), [image], label))
    tests = []
    for i, rel in enumerate(_list(meta, "test", path)):
        rel = rel.get("image") if isinstance(rel, dict) else rel
        image = _inside(root, rel, f"test[{i}]", problems)
        if image:
            tests.append(Case(_case_id(strip_suffix(image), path, f"test[{i}]"), [image]))
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
        safe_name(cid, f"{images_dir}: file name {files[min(files)].name!r}")
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
    channels = _by_index(meta["channel_names"], path, "channel_names")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not re.fullmatch(r"(\.[A-Za-z0-9]+)+", ending):
        raise Med3DError(f"{path}: 'file_ending' is {ending!r}; give the image files' suffix, e.g. \".nii.gz\"")
    problems: List[str] = []
    if "dataset" in meta:  # explicit file lists (nnU-Net's dataset.json 'dataset' key)
        if not isinstance(meta["dataset"], dict):
            raise Med3DError(f"{path}: 'dataset' must map case ids to their files, found "
                             f"{type(meta['dataset']).__name__}")
        cases = []
        for cid, entry in sorted(meta["dataset"].items()):
            _case_id(cid, path, "dataset key")
            if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or "label" not in entry:
                problems.append(f"{path}: dataset.{cid} needs 'images' (a list of files) and 'label'")
                continue
            imgs = [_inside(root, rel, f"dataset.{cid}.images", problems) for rel in entry["images"]]
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
        info.problems.append(f"{root}: {NO_TRAINING_CASES}")
    return info


def cases_from_folder(folder: PathLike) -> List[Case]:
    """Unlabelled cases from a plain folder of images (one file or DICOM folder per case).

    Args:
        folder: the folder.

    Returns:
        One case per image file or DICOM folder, named after it.

    Raises:
        Med3DError: a name that cannot be an output file name (see ``med3d.paths.safe_name``).
    """
    return [Case(safe_name(strip_suffix(p), str(p)), [p]) for p in list_images(folder)]
