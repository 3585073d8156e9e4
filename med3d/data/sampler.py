"""Patches from the cache, multi-task batches, and the DataLoader that feeds training.

Sampling is *stateless*: micro-batch ``(step, slot)`` is drawn from
``numpy.random.default_rng([seed, step, slot])``, and the task of ``step`` from
``[seed, step]``. So the same seed gives the same batches whatever the number of workers,
DDP ranks take different slots of the same step (all train the same head, as Med3D does),
and resuming at step ``k`` only needs ``k``: no sampler state can drift.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import Med3DError
from .cache import CachedCase
from .class_cache import network_input

MIXING = ("round_robin", "proportional", "temperature")


# ---------------------------------------------------------------- single patches

class CaseReader:
    """Memory-maps cached arrays (opened once per process), so a patch never decodes a whole volume."""

    def __init__(self) -> None:
        self._open: Dict[str, Any] = {}

    def get(self, case: CachedCase) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
        key = str(case.data)
        if key not in self._open:
            data = np.load(case.data, mmap_mode="r")
            seg = np.load(case.seg, mmap_mode="r")
            with np.load(case.locs) as z:
                locs = {k: z[k] for k in z.files}
            self._open[key] = (data, seg, locs)
        return self._open[key]

    def region(self, case: Any) -> np.ndarray:
        """A classification case's stored region, memory-mapped."""
        key = str(case.data)
        if key not in self._open:
            self._open[key] = np.load(case.data, mmap_mode="r")
        return self._open[key]


def crop_patch(data: np.ndarray, seg: np.ndarray, center: Optional[Sequence[int]], patch: Sequence[int],
               rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Cut ``patch`` around ``center`` (or anywhere, for None); zero-pad where the volume is smaller."""
    shape = data.shape[1:]
    starts, pads = [], []
    for axis, (n, p) in enumerate(zip(shape, patch)):
        if n >= p:
            if center is None:
                lo = int(rng.integers(0, n - p + 1))
            else:
                lo = int(np.clip(center[axis] - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1)), 0, n - p))
            starts.append((lo, lo + p))
            pads.append((0, 0))
        else:
            before = int(rng.integers(0, p - n + 1))
            starts.append((0, n))
            pads.append((before, p - n - before))
    region = (slice(None),) + tuple(slice(a, b) for a, b in starts)
    img = np.array(data[region], dtype=np.float32)  # a copy: the memmap is read-only
    lab = np.array(seg[region], dtype=np.int64)
    if any(a or b for a, b in pads):
        img = np.pad(img, [(0, 0), *pads])
        lab = np.pad(lab, [(0, 0), *pads])
    return img, lab


def pick_center(locs: Dict[str, np.ndarray], rng: np.random.Generator) -> Optional[np.ndarray]:
    """A foreground voxel: first a class uniformly among those present (rare classes get their share)."""
    classes = [k for k, v in locs.items() if len(v)]
    if not classes:
        return None
    pts = locs[classes[int(rng.integers(len(classes)))]]
    return pts[int(rng.integers(len(pts)))]


# ---------------------------------------------------------------- augmentation

def build_augment(aug: Any, spatial_dims: int = 3):
    """MONAI dictionary transforms for keys ``image``/``label`` from an ``AugmentConfig`` (None: no augmentation)."""
    from monai import transforms as T

    keys = ["image", "label"]
    ts: List[Any] = []
    if aug is None:
        return None
    if aug.affine > 0:
        rot = float(np.deg2rad(aug.rotate_deg))
        ts.append(T.RandAffined(keys, prob=aug.affine, rotate_range=(rot, rot, rot),
                                scale_range=(aug.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"))
    if aug.elastic > 0:
        ts.append(T.Rand3DElasticd(keys, prob=aug.elastic, sigma_range=(5, 8), magnitude_range=(50, 150),
                                   mode=("bilinear", "nearest"), padding_mode="zeros"))
    if aug.rot90 > 0:
        ts.append(T.RandRotate90d(keys, prob=aug.rot90, max_k=3, spatial_axes=(1, 2)))
    if aug.flip > 0:
        ts.extend(T.RandFlipd(keys, prob=aug.flip, spatial_axis=a) for a in range(spatial_dims))
    if aug.intensity_scale > 0:
        ts.append(T.RandScaleIntensityd("image", factors=0.25, prob=aug.intensity_scale))
    if aug.intensity_shift > 0:
        ts.append(T.RandShiftIntensityd("image", offsets=0.1, prob=aug.intensity_shift))
    if aug.gamma > 0:
        ts.append(T.RandAdjustContrastd("image", prob=aug.gamma, gamma=(0.7, 1.5)))
    if aug.noise > 0:
        ts.append(T.RandGaussianNoised("image", prob=aug.noise, std=0.1))
    if aug.blur > 0:
        ts.append(T.RandGaussianSmoothd("image", prob=aug.blur, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                        sigma_z=(0.5, 1.0)))
    return T.Compose(ts) if ts else None


# ---------------------------------------------------------------- tasks and mixing

@dataclass
class TaskData:
    name: str
    cases: List[Any]  # CachedCase (segmentation) or ClassCached (classification)
    plan: Dict[str, Any]
    channels: Optional[List[int]] = None  # None: all channels
    loss_weight: float = 1.0
    kind: str = "segmentation"  # or "classification", or a self-supervised kind ("restore", "contrastive")
    class_balance: bool = True  # classification: each class drawn equally often
    corruption: Any = None  # restore: its ``CorruptionRates`` (None: Models Genesis' defaults)
    head: Optional[str] = None  # the head it trains (None: the one named ``name``); pseudo-labels train another's
    augment: Any = None  # its own ``AugmentConfig`` (None: the run's ``data.augment``)
    ignore_label: Optional[int] = None  # pseudo-labels: the label of voxels left out of the loss

    @property
    def trains(self) -> str:
        """The head this task's batches train."""
        return self.head or self.name


class MixSchedule:
    """Which task trains at each step: round-robin, proportional to size, or size ** (1/T)."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int], mode: str = "round_robin",
                 temperature: float = 2.0, seed: int = 0) -> None:
        if mode not in MIXING:
            raise Med3DError(f"data.mixing '{mode}' unknown; choose from {', '.join(MIXING)}")
        self.names, self.mode, self.seed = list(names), mode, seed
        sizes_arr = np.asarray(sizes, dtype=float)
        power = 1.0 if mode == "proportional" else 1.0 / max(temperature, 1e-6)
        p = sizes_arr ** power
        self.probs = p / p.sum()

    def task_index(self, step: int) -> int:
        if self.mode == "round_robin":
            return step % len(self.names)
        return int(np.random.default_rng([self.seed, step, 7]).choice(len(self.names), p=self.probs))


class PatchBatches(Dataset):
    """Map-style dataset whose items are whole micro-batches, keyed by ``(step, slot)``."""

    def __init__(self, tasks: Sequence[TaskData], schedule: MixSchedule, patch_size: Sequence[int],
                 micro_batch: int, foreground_share: float, augment: Any = None, seed: int = 0) -> None:
        self.tasks, self.schedule = list(tasks), schedule
        self.patch_size, self.micro_batch = tuple(int(p) for p in patch_size), int(micro_batch)
        self.foreground_share, self.seed = float(foreground_share), int(seed)
        self.augment = build_augment(augment)
        # Tasks with augmentation of their own (pseudo-labelled scans: the student's stronger noise).
        self.own_augment = {t.name: build_augment(t.augment) for t in self.tasks if t.augment is not None}
        self.reader = CaseReader()
        # Classification: each task's cases by class, in class order (class-balanced draws pick a pool).
        self.class_pools = {t.name: [[c for c in t.cases if c.label == label]
                                     for label in sorted({c.label for c in t.cases})]
                            for t in self.tasks if t.kind == "classification"}
        self.views = None  # contrastive tasks' view augmentations, made on first use

    def ssl_item(self, task: TaskData, rng: np.random.Generator) -> Dict[str, Any]:
        """A self-supervised micro-batch (``med3d.ssl.views.ssl_batch``): inputs, and the targets to restore
        or the scan index of each contrastive view."""
        from ..ssl.corruptions import CorruptionRates
        from ..ssl.views import ssl_batch, view_transform  # imported here: ssl.views itself uses crop_patch

        if task.kind == "contrastive" and self.views is None:
            self.views = view_transform(self.patch_size)
        return ssl_batch(task.kind, task.cases, lambda c: self.reader.get(c)[0], self.patch_size,
                         self.micro_batch, rng, task.corruption or CorruptionRates(), self.views,
                         self.augment, task.channels)

    def __len__(self) -> int:  # items are generated on demand; the sampler decides how many
        return 2 ** 62

    def sample(self, task: TaskData, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, bool]:
        if task.kind == "classification":
            return self.sample_region(task, rng)
        case = task.cases[int(rng.integers(len(task.cases)))]
        data, seg, locs = self.reader.get(case)
        forced = bool(rng.random() < self.foreground_share)
        center = pick_center(locs, rng) if forced else None
        img, lab = crop_patch(data, seg, center, self.patch_size, rng)
        if task.channels is not None:
            img = img[task.channels]
        return img, lab, forced

    def sample_region(self, task: TaskData, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, bool]:
        """A classification case's region, cut to the patch with a small random shift; its class as ``(1,)``."""
        if task.class_balance:
            pools = self.class_pools[task.name]
            pool = pools[int(rng.integers(len(pools)))]
        else:
            pool = task.cases
        case = pool[int(rng.integers(len(pool)))]
        data = self.reader.region(case)
        shift = [int(rng.integers(-(p // 8), p // 8 + 1)) for p in self.patch_size]
        img = network_input(data, task.plan, self.patch_size, shift)
        if task.channels is not None:
            img = img[task.channels]
        return img, np.array([case.label], dtype=np.int64), False

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        step, slot = key
        task = self.tasks[self.schedule.task_index(step)]
        rng = np.random.default_rng([self.seed, step, slot])
        if task.kind in ("restore", "contrastive"):
            batch = self.ssl_item(task, rng)
            return {**batch, "task": task.name, "head": task.trains, "step": step, "slot": slot,
                    "forced_fg": torch.zeros(len(batch["image"]), dtype=torch.bool)}
        augment = self.own_augment.get(task.name, self.augment)
        images, labels, forced = [], [], []
        for _ in range(self.micro_batch):
            img, lab, f = self.sample(task, rng)
            if augment is not None:
                augment.set_random_state(seed=int(rng.integers(2 ** 31)))
                voxelwise = lab.ndim == img.ndim  # a label map moves with the image; a class does not
                seg = lab if voxelwise else np.zeros((1, *img.shape[1:]), np.int64)
                out = augment({"image": torch.from_numpy(img), "label": torch.from_numpy(seg)})
                img, lab = out["image"], (out["label"] if voxelwise else lab)
            images.append(torch.as_tensor(img, dtype=torch.float32))
            labels.append(torch.as_tensor(lab).round().long())
            forced.append(f)
        return {"image": torch.stack(images).as_subclass(torch.Tensor),
                "label": torch.stack(labels).as_subclass(torch.Tensor), "task": task.name, "head": task.trains,
                "step": step, "slot": slot, "forced_fg": torch.tensor(forced)}


class StepSampler(Sampler):
    """Keys ``(step, slot)`` for this rank: slots ``rank*accum .. rank*accum+accum-1`` of every step."""

    def __init__(self, start: int, stop: int, rank: int = 0, world: int = 1, accumulate: int = 1) -> None:
        self.start, self.stop, self.rank, self.world, self.accumulate = start, stop, rank, world, accumulate

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for step in range(self.start, self.stop):
            for a in range(self.accumulate):
                yield step, self.rank * self.accumulate + a

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulate


def seed_worker(worker_id: int, base_seed: int = 0) -> None:
    """Per-worker seeds for any library randomness outside the keyed sampling."""
    seed = (base_seed * 1000 + worker_id) % 2 ** 31
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def make_loader(dataset: PatchBatches, start: int, stop: int, rank: int = 0, world: int = 1,
                accumulate: int = 1, workers: int = 0, pin_memory: bool = False,
                persistent_workers: bool = True) -> DataLoader:
    """DataLoader over micro-batches ``start..stop`` for this rank (worker processes, pinning, seeding)."""
    from functools import partial

    kwargs: Dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=4,
                      worker_init_fn=partial(seed_worker, base_seed=dataset.seed * 100 + rank))
    return DataLoader(dataset, batch_size=None, sampler=StepSampler(start, stop, rank, world, accumulate),
                      num_workers=workers, pin_memory=pin_memory, **kwargs)
