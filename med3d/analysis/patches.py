"""The patches two encoders are compared on: seeded crops of a prepared cache or of scans read from disk.

A prepared cache (a folder with ``plan.json``, from ``med3d prepare``) is used as it is: its arrays are
already cropped, normalised and resampled by the dataset's plan. Scans (a dataset folder, an image folder,
image files) are prepared by a checkpoint's plan for that dataset when one of the two checkpoints has it,
otherwise cropped to their non-zero region and z-scored per channel at their own spacing. Patch ``i`` comes
from case ``i mod k`` of a seeded shuffle, at a seeded random position, so a rerun draws the same patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import Med3DError
from ..choices import ANALYSIS_PATCH as DEFAULT_PATCH, ANALYSIS_PATCHES as DEFAULT_PATCHES

PathLike = Union[str, Path]


@dataclass
class PatchSet:
    """Patches ``(N, C, Z, Y, X)`` (float32) and a line saying where they came from."""

    patches: torch.Tensor
    source: str


def _check_request(n: int, patch: Sequence[int]) -> Tuple[int, int, int]:
    if n < 1:
        raise Med3DError(f"--patches {n}: give at least 1 patch")
    if len(patch) != 3 or min(patch) < 1:
        raise Med3DError(f"--patch {list(patch)}: give three positive sizes (z, y, x)")
    return tuple(int(p) for p in patch)  # type: ignore[return-value]


def _cut(volume: np.ndarray, patch: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """One patch at a uniformly random position (zero-padded where the volume is smaller), as training cuts one."""
    from ..data.sampler import crop_patch

    no_label = np.zeros((1, *volume.shape[1:]), np.int8)  # crop_patch cuts a label too; there is none here
    return crop_patch(volume, no_label, None, patch, rng)[0]


def _draw(volumes: Sequence[Any], n: int, patch: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
    """``n`` patches, patch ``i`` from volume ``i mod k`` (``volumes`` yields k arrays, read one at a time).

    Each volume gives all its patches before the next is read, so only one is in memory at a time.
    """
    k = len(volumes)
    out: List[Optional[np.ndarray]] = [None] * n
    for j, volume in enumerate(volumes):
        for i in range(j, n, k):
            out[i] = _cut(volume, patch, rng)
    return torch.from_numpy(np.stack(out))  # type: ignore[arg-type]


class _Lazy:
    """A sequence whose items are made when read (scans read and prepared one at a time)."""

    def __init__(self, n: int, make: Any) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(i)


def _from_cache(folder: Path, n: int, patch: Sequence[int], seed: int) -> PatchSet:
    from ..data.cache import load_cache

    plan, cases = load_cache(folder)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cases))[:n]
    volumes = [np.load(cases[i].data, mmap_mode="r") for i in order]  # memory-mapped: only the patches are read
    return PatchSet(_draw(volumes, n, patch, rng), f"prepared cache {folder} (dataset {plan.get('dataset')}, "
                    f"{len(volumes)} of {len(cases)} cases, normalised by its plan)")


def _scans(source: Path) -> Tuple[Optional[str], List[Tuple[str, List[Path]]]]:
    """The dataset's name (None for plain images) and its cases as ``(case_id, files)``."""
    from ..inference.inputs import collect_inputs

    if source.is_dir() and (source / "dataset.json").is_file():
        from ..data.datalist import read_dataset

        info = read_dataset(source)
        return info.name, [(c.case_id, list(c.images)) for c in info.cases + info.test_cases]
    return None, collect_inputs([source])


def choose_plan(plans: Sequence[Mapping[str, Any]], dataset: Optional[str], channels: int) -> Optional[Dict[str, Any]]:
    """The segmentation plan to prepare scans with: the one for ``dataset``; for plain images the one that fits.

    Args:
        plans: the plans of the checkpoints, in order of preference.
        dataset: the dataset's name (None for plain images).
        channels: the scans' channel count; a plan for another count is passed over.

    Returns:
        A copy of the plan, or None (scans are then z-scored at their own spacing): no plan names the
        dataset, or plain images fit the plans of several datasets.
    """
    usable = [dict(p) for p in plans if p.get("kind") != "classification" and p.get("target_spacing")
              and len(p.get("channel_names") or []) == channels and p.get("normalization")]
    if dataset is not None:  # a plan made for another dataset could normalise this one wrongly (CT windows)
        return next((p for p in usable if p.get("dataset") == dataset), None)
    return usable[0] if len({str(p.get("dataset")) for p in usable}) == 1 else None


def _prepared(image: Any, plan: Optional[Dict[str, Any]]) -> np.ndarray:
    """``image`` (a ``med3d.data.image.Image``) cropped, normalised and resampled as ``plan`` says."""
    from ..data.preprocess import preprocess

    if plan is None:  # the plan every scan fits: its own spacing, z-score inside the non-zero region
        plan = {"crop_nonzero": True, "target_spacing": list(image.geometry.spacing_zyx),
                "normalization": [{"scheme": "zscore"}] * image.channels}
    data = preprocess(image, None, plan)[0]
    if plan.get("channels") is not None:  # the channels the task's network reads
        data = data[plan["channels"]]
    return np.ascontiguousarray(data, dtype=np.float32)


def _from_scans(source: Path, n: int, patch: Sequence[int], seed: int,
                plans: Sequence[Mapping[str, Any]]) -> PatchSet:
    from ..data.image import read_channels

    dataset, cases = _scans(source)
    if not cases:
        raise Med3DError(f"--data {source}: no scans found; give a prepared cache, a dataset folder "
                         "(dataset.json), an image folder or an image file")
    rng = np.random.default_rng(seed)
    files = [cases[i][1] for i in rng.permutation(len(cases))[:n]]
    first = read_channels(files[0])
    plan = choose_plan(plans, dataset, first.channels)

    def volume(j: int) -> np.ndarray:
        image = first if j == 0 else read_channels(files[j])
        if image.channels != first.channels:
            raise Med3DError(f"{files[j][0]}: {image.channels} channel(s) but {files[0][0]} has {first.channels}; "
                             "give scans of one kind")
        return _prepared(image, plan)

    volumes = _Lazy(len(files), volume)
    how = f"the checkpoint's plan for {plan.get('dataset')}" if plan else "z-score per scan at its own spacing"
    return PatchSet(_draw(volumes, n, patch, rng), f"{source} ({len(volumes)} of {len(cases)} scans, {how})")


def draw_patches(source: PathLike, n: int = DEFAULT_PATCHES, patch: Sequence[int] = DEFAULT_PATCH, seed: int = 0,
                 plans: Sequence[Mapping[str, Any]] = ()) -> PatchSet:
    """Seeded patches from a prepared cache or from scans.

    Args:
        source: a prepared dataset's cache folder (``plan.json`` inside), a dataset folder (``dataset.json``),
            an image folder, or an image file / DICOM series folder.
        n: how many patches.
        patch: patch size (z, y, x) in voxels.
        seed: the same seed draws the same cases and positions.
        plans: preprocessing plans to prepare scans with (see ``choose_plan``); unused for a cache.

    Returns:
        The patches and a description of where they came from.

    Raises:
        Med3DError: the source is missing or holds no scans, a scan is unreadable, or bad sizes.
    """
    patch = _check_request(n, patch)
    path = Path(source)
    if not path.exists():
        raise Med3DError(f"--data {path}: not found; give a prepared cache, a dataset folder, an image folder "
                         "or an image file")
    if path.is_dir() and (path / "plan.json").is_file():
        return _from_cache(path, n, patch, seed)
    prepared = sorted(p.parent for p in path.glob("*/plan.json")) if path.is_dir() else []
    if prepared:  # the cache root, one folder per dataset
        raise Med3DError(f"--data {path}: a cache of {len(prepared)} prepared dataset(s); give one of them, "
                         f"e.g. {prepared[0]}")
    return _from_scans(path, n, patch, seed, plans)
