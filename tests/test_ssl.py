"""Self-supervised learning from unlabelled scans: Models Genesis corruptions, the contrastive loss,
unlabelled datasets through check / plan / cache, and encoders exported from self-supervised runs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from med3d.config import from_dict
from med3d.data.image import Geometry, write_image
from med3d.errors import Med3DError
from med3d.ssl.corruptions import (ALWAYS, CorruptionRates, corrupt, fill_boxes, inner_cutout, local_shuffle,
                                   nonlinear_intensity, outer_cutout, shuffle_boxes)
from med3d.tasks.contrastive import NTXentLoss


def _volume(seed: int = 0, shape=(2, 12, 16, 20)) -> np.ndarray:
    """A smooth, varied float32 volume (C, Z, Y, X) with distinct values."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[1:]], indexing="ij")
    base = np.sin(3 * z) + np.cos(2 * y) * x
    return np.stack([base * (c + 1) + 0.01 * rng.standard_normal(base.shape) for c in range(shape[0])]
                    ).astype(np.float32)


# ---------------------------------------------------------------- corruptions

@pytest.mark.parametrize("invert", [0.0, 1.0])
def test_bezier_transform_is_a_monotone_map_inside_each_channels_range(invert):
    x = _volume()
    for seed in range(5):
        y = nonlinear_intensity(x, np.random.default_rng(seed), invert=invert)
        assert y.shape == x.shape and y.dtype == x.dtype
        for c in range(x.shape[0]):
            order = np.argsort(x[c].ravel(), kind="stable")
            steps = np.diff(y[c].ravel()[order].astype(np.float64))
            assert (steps >= -1e-5).all() if invert == 0.0 else (steps <= 1e-5).all()  # a function of x, monotone
            assert y[c].min() >= x[c].min() - 1e-6 and y[c].max() <= x[c].max() + 1e-6
            assert np.abs(y[c] - x[c]).max() > 1e-3 * np.ptp(x[c])  # it did change the intensities
            ends = y[c].ravel()[order[[0, -1]]]  # the range maps onto itself: min and max to the ends
            assert np.allclose(ends, [x[c].min(), x[c].max()][:: 1 if invert == 0.0 else -1], atol=1e-4)
            assert len(np.unique(y[c])) > 0.9 * x[c].size  # one-to-one, not a few clipped levels
    assert np.array_equal(nonlinear_intensity(np.ones((1, 4, 4, 4), np.float32), np.random.default_rng(0)),
                          np.ones((1, 4, 4, 4), np.float32))  # a constant channel has no range to remap


def test_local_shuffle_permutes_voxels_only_within_each_block():
    x = _volume()
    boxes = [(slice(0, 3), slice(0, 4), slice(0, 2)), (slice(5, 8), slice(6, 8), slice(10, 14))]
    y = shuffle_boxes(x, boxes, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    inside = np.zeros(x.shape[1:], bool)
    for box in boxes:
        inside[box] = True
        a, b = x[(slice(None), *box)].reshape(2, -1), y[(slice(None), *box)].reshape(2, -1)
        # the same voxels (both channels together), in another order
        assert sorted(map(tuple, a.T)) == sorted(map(tuple, b.T)) and not np.array_equal(a, b)
    assert np.array_equal(x[:, ~inside], y[:, ~inside])  # nothing outside the blocks moved

    z = local_shuffle(x, np.random.default_rng(1), blocks=50)
    assert z.shape == x.shape and z.dtype == x.dtype and not np.array_equal(z, x)
    assert sorted(map(tuple, x.reshape(2, -1).T)) == sorted(map(tuple, z.reshape(2, -1).T))
    moved = np.argwhere((z != x).any(0))
    assert (moved.max(0) - moved.min(0)).max() > 0 and (np.abs(z - x).max() > 0)


def test_cutouts_fill_exactly_the_stated_region_with_noise_in_range():
    x = _volume()
    box = (slice(2, 6), slice(3, 9), slice(4, 12))
    mask = np.zeros(x.shape[1:], bool)
    mask[box] = True
    for inside, region in ((True, mask), (False, ~mask)):
        y = fill_boxes(x, [box], np.random.default_rng(0), inside=inside)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert np.array_equal(y[:, ~region], x[:, ~region])  # the rest is untouched
        assert (y[:, region] != x[:, region]).mean() > 0.99  # the region is replaced
        for c in range(2):
            assert x[c].min() <= y[c][region].min() and y[c][region].max() <= x[c].max()

    shape = np.array(x.shape[1:])
    for seed in range(4):
        out = outer_cutout(x, np.random.default_rng(seed))  # out-painting keeps one box of 3/7..4/7 per side
        kept = (out == x).all(0)
        idx = np.argwhere(kept)
        sides = idx.max(0) - idx.min(0) + 1
        assert kept.sum() == np.prod(sides)  # what is kept is one box
        assert ((sides >= 3 * shape // 7) & (sides <= 4 * shape // 7)).all()
        inner = inner_cutout(x, np.random.default_rng(seed))  # in-painting: up to 5 boxes of 1/6..1/3 per side
        changed = (inner != x).any(0)
        assert 0 < changed.sum() <= 5 * np.prod(shape // 3) and inner.dtype == x.dtype


def test_corrupt_leaves_its_input_alone_and_keeps_shape_and_dtype():
    x = _volume()
    before = x.copy()
    y = corrupt(x, np.random.default_rng(0), ALWAYS)
    assert np.array_equal(x, before) and y.shape == x.shape and y.dtype == x.dtype and not np.array_equal(x, y)
    none = CorruptionRates(nonlinear=0.0, shuffle=0.0, paint=0.0)
    assert np.array_equal(corrupt(x, np.random.default_rng(0), none), x)
    assert np.array_equal(corrupt(x, np.random.default_rng(3)), corrupt(x, np.random.default_rng(3)))  # seeded


# ---------------------------------------------------------------- contrastive loss

def test_ntxent_is_at_its_minimum_for_identical_views_and_higher_for_shuffled_ones():
    loss, t, n = NTXentLoss(temperature=0.5), 0.5, 4
    z = torch.eye(8)[:n]  # four scans, mutually orthogonal embeddings
    scans = torch.arange(n).repeat(2)
    same = loss(torch.cat([z, z]), scans)
    # each anchor: its twin at cosine 1, the six other views at 0
    assert same.item() == pytest.approx(-math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2)), rel=1e-4)
    shuffled = loss(torch.cat([z, z[torch.tensor([1, 2, 3, 0])]]), scans)
    assert shuffled > same + 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # moving the second views away from their twins only raises it
        moved = z + 0.3 * torch.randn(z.shape, generator=g)
        assert loss(torch.cat([z, moved]), scans) > same
    assert loss(torch.randn(2, 8), torch.tensor([0, 1])).item() == 0.0  # no pair in the batch: nothing to learn


# ---------------------------------------------------------------- heads

@pytest.mark.parametrize("layout", ["dilated", "strided"])
def test_self_supervised_heads_give_a_reconstruction_and_a_projection(layout):
    from med3d.api import create_model

    cfg = from_dict({"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64], "layout": layout,
                                           "in_channels": 2},
                               "heads": {"r": {"type": "restore", "num_classes": 2, "channels": 16},
                                         "c": {"type": "contrastive", "num_classes": 24, "hidden": 32}}}})
    model = create_model(cfg).eval()
    x = torch.randn(1, 2, 8, 32, 32)
    assert model(x, "r").shape == x.shape
    assert model(torch.cat([x, x]), "c").shape == (2, 24)


# ---------------------------------------------------------------- unlabelled data

def _write(path: Path, seed: int, shape=(10, 12, 14), spacing=(1.0, 1.0, 2.0)) -> Path:
    arr = (np.random.default_rng(seed).random(shape) * 100 + 50).astype(np.float32)
    write_image(path, arr, Geometry(shape, spacing, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))
    return path


def _dicom_series(folder: Path, seed: int, shape=(10, 12, 14)) -> Path:
    """One DICOM file per slice (2 mm apart), as a scanner export holds a series."""
    import SimpleITK as sitk

    folder.mkdir()
    arr = (np.random.default_rng(seed).random(shape) * 100 + 50).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(shape[0]):
        sl = img[:, :, z]
        for tag, value in (("0020|0032", f"0\\0\\{z * 2.0}"), ("0020|0013", str(z)), ("0020|000e", "1.2.3.4"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "1\\1")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)
    return folder


def _entry(path, **kw):
    from med3d.config import DatasetEntry

    return DatasetEntry(path=str(path), **kw)


def test_a_folder_of_nifti_nrrd_and_mha_images_is_checked_planned_and_cached(tmp_path):
    from med3d.data.cache import load_cache
    from med3d.data.unlabelled import prepare_unlabelled, read_unlabelled

    folder = tmp_path / "scans"
    folder.mkdir()
    _write(folder / "a.nii.gz", 0)
    _write(folder / "b.nrrd", 1, spacing=(1.0, 1.0, 3.0))
    _write(folder / "c.mha", 2, spacing=(1.0, 1.0, 2.0))
    _dicom_series(folder / "d", 3)
    assert [c.case_id for c in read_unlabelled(folder).cases] == ["a", "b", "c", "d"]
    cache = prepare_unlabelled(_entry(folder), tmp_path / "cache", progress=False)
    plan, cases = load_cache(cache)
    assert [c.case_id for c in cases] == ["a", "b", "c", "d"] and cases[3].props["shape"] == [10, 12, 14]
    assert plan["target_spacing"] == [2.0, 1.0, 1.0]  # the median spacing (z, y, x), as for labelled data
    assert plan["normalization"] == [{"scheme": "zscore"}] and plan["labels"] == {"0": "background"}
    data, seg = np.load(cases[0].data), np.load(cases[0].seg)
    assert data.shape[1:] == seg.shape[1:] and not seg.any()  # no label: an empty map beside the image
    assert abs(float(data.mean())) < 1e-3 and abs(float(data.std()) - 1) < 1e-3  # z-scored per case (MR's scheme)
    assert cases[1].props["shape"][0] == 15  # 10 slices of 3 mm resampled to 2 mm
    assert prepare_unlabelled(_entry(folder), tmp_path / "cache", progress=False) == cache  # a no-op now

    with pytest.raises(Med3DError, match=r"data.datasets.u: .* unlabelled CT.*ct_window"):
        prepare_unlabelled(_entry(folder, modality=["CT"]), tmp_path / "cache2", progress=False,
                           where="data.datasets.u")
    ct = prepare_unlabelled(_entry(folder, modality=["CT"], ct_window=[0.0, 200.0]), tmp_path / "cache2",
                            progress=False)
    assert load_cache(ct)[0]["normalization"][0]["window"] == [0.0, 200.0]


def test_a_datasets_own_images_become_unlabelled_without_clashing_with_its_labelled_cache(demo_root, tmp_path):
    from med3d.data.unlabelled import read_unlabelled, unlabelled_folder
    from med3d.data.cache import cache_folder

    root = demo_root / "Task09_SpleenDemo"
    counts = {k: len(read_unlabelled(root, k).cases) for k in ("training", "test", "all")}
    assert counts == {"training": 3, "test": 1, "all": 4}
    assert all(c.label is None for c in read_unlabelled(root).cases)
    assert len({cache_folder("c", root), unlabelled_folder("c", root, "test"), unlabelled_folder("c", root)}) == 3
    with pytest.raises(Med3DError, match="modality is for plain folders"):
        read_unlabelled(root, modality=["CT"])


def test_unlabelled_keys_and_heads_are_checked_before_any_work(demo_root, tmp_path, cfg_dict):
    from med3d.engine.task_data import check_tasks, setup_data
    from med3d.engine.distributed import DistInfo

    d = cfg_dict(demo_root, tmp_path, tasks=("Task05_ProstateDemo",))
    d["data"]["datasets"]["Task05_ProstateDemo"]["images"] = "test"
    with pytest.raises(Med3DError, match="data.datasets.Task05_ProstateDemo.images: only self-supervised tasks"):
        check_tasks(from_dict(d))
    d = cfg_dict(demo_root, tmp_path, tasks=())
    d["model"]["heads"] = {"r": {"type": "restore", "num_classes": 2}}
    d["data"]["datasets"] = {"r": {"path": str(demo_root / "Task05_ProstateDemo"), "images": "test", "channel": 0}}
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(Med3DError, match="model.heads.r.num_classes is 2 but a restore head reconstructs the 1"):
        setup_data(from_dict(d), info, progress=False)
    d["data"]["restore"] = {"paint": 1.5}
    with pytest.raises(Med3DError, match=r"'data.restore.paint': must be in \[0, 1\]"):
        from_dict(d)
    d["data"]["restore"] = {}
    d["data"]["datasets"]["r"]["path"] = str(demo_root / "Task05_ProstateDemo" / "dataset.json")
    with pytest.raises(Med3DError, match="data.datasets.r.path: .* is not a folder of images"):
        check_tasks(from_dict(d))


def test_self_supervised_batches_pair_inputs_with_their_targets(tmp_path, cfg_dict):
    from med3d.data.sampler import MixSchedule, PatchBatches
    from med3d.engine.distributed import DistInfo
    from med3d.engine.task_data import setup_data
    from med3d.ssl.views import two_views, view_transform

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(4):
        _write(folder / f"s{i}.nii.gz", i)
    d = cfg_dict(tmp_path, tmp_path, tasks=())
    d["model"]["heads"] = {"r": {"type": "restore", "num_classes": 1}, "c": {"type": "contrastive", "num_classes": 16}}
    d["data"]["datasets"] = {"r": {"path": str(folder)}, "c": {"path": str(folder)}}
    d["data"]["val_fraction"] = 0.0
    d["validation"] = {"allow_none": True, "hd95": False}
    cfg = from_dict(d)
    setup = setup_data(cfg, DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu")), progress=False)
    assert [t.kind for t in setup.tasks] == ["restore", "contrastive"] and len(setup.tasks[0].cases) == 4
    d["train"]["batch_size"] = 1  # one scan per micro-batch: nothing to contrast it with
    with pytest.raises(Med3DError, match="task c: a contrastive task compares the scans of a micro-batch"):
        setup_data(from_dict(d), DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu")), progress=False)
    batches = PatchBatches(setup.tasks, MixSchedule(["r", "c"], [4, 4]), [8, 16, 16], 3, 0.33, None, seed=0)
    r, c = batches[(0, 0)], batches[(1, 0)]
    assert r["task"] == "r" and r["image"].shape == r["label"].shape == (3, 1, 8, 16, 16)
    assert r["label"].dtype == torch.float32 and not torch.equal(r["image"], r["label"])
    assert c["task"] == "c" and c["image"].shape == (6, 1, 8, 16, 16) and c["label"].tolist() == [0, 1, 2, 0, 1, 2]
    assert not torch.equal(c["image"][0], c["image"][3])  # two different views of one scan
    assert torch.equal(batches[(1, 0)]["image"], c["image"])  # keyed: the same key gives the same batch
    flat = np.ones((1, 20, 20, 20), np.float32)  # identical crops: any difference is the augmentations'
    first, second = two_views(flat, [8, 16, 16], np.random.default_rng(0), view_transform([8, 16, 16]))
    assert first.shape == second.shape == (1, 8, 16, 16) and not np.allclose(first, second)


# ---------------------------------------------------------------- training and export

@pytest.mark.slow
def test_the_reconstruction_loss_falls_on_a_tiny_run():
    from med3d.api import create_model
    from med3d.tasks.restore import RestoreLoss

    torch.manual_seed(0)
    model = create_model(from_dict({"model": {"encoder": {"arch": "resnet10", "widths": [4, 8, 16, 32]},
                                              "heads": {"r": {"type": "restore", "num_classes": 1,
                                                              "channels": 8}}}}))
    scan = _volume(0, (1, 24, 24, 24))
    loss_fn, opt = RestoreLoss(), torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(seed: int):
        rng = np.random.default_rng(seed)
        crops = [scan[:, a:a + 16, b:b + 16, c:c + 16] for a, b, c in rng.integers(0, 9, (2, 3))]
        return (torch.from_numpy(np.stack([corrupt(p, rng) for p in crops])), torch.from_numpy(np.stack(crops)))

    held_x, held_y = batch(999)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = float(loss_fn(model(held_x, "r"), held_y))
        model.train()
        return value

    before = held_loss()
    for step in range(20):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x, "r"), y).backward()
        opt.step()
    assert held_loss() < 0.8 * before


@pytest.mark.slow
def test_an_encoder_exported_from_a_mixed_self_supervised_run_loads_like_any_other(demo_root, tmp_path, cfg_dict):
    from med3d.api import create_model
    from med3d.checkpoint import load_checkpoint
    from med3d.engine.trainer import train
    from med3d.export import export_encoder
    from med3d.transfer.load import load_pretrained

    d = cfg_dict(demo_root, tmp_path, tasks=("Task05_ProstateDemo",), train={"iterations": 3, "checkpoint_every": 3})
    d["model"]["heads"]["restore"] = {"type": "restore", "num_classes": 1, "channels": 16}
    d["model"]["heads"]["views"] = {"type": "contrastive", "num_classes": 16, "hidden": 32}
    spleen = demo_root / "Task09_SpleenDemo"
    d["data"]["datasets"]["restore"] = {"path": str(spleen), "ct_window": [-160, 240], "loss_weight": 0.5}
    d["data"]["datasets"]["views"] = {"path": str(spleen), "images": "training", "ct_window": [-160, 240]}
    d["data"]["patch_size"] = [16, 32, 32]
    summary = train(from_dict(d), "pretrain", progress=False, tensorboard=False)
    assert {"restore", "views", "Task05_ProstateDemo"} <= set(summary["final"]["tasks"])
    assert np.isfinite(summary["final"]["tasks"]["restore"]["restoration"])

    model, _, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert any(k.startswith("heads.restore.") for k in model.state_dict())  # the run trained the light heads
    out = export_encoder(model, "safetensors", tmp_path / "enc.safetensors", meta=meta)
    from safetensors.torch import load_file

    keys = set(load_file(str(out)))
    assert keys == set(model.encoder.state_dict()) and not any("heads" in k for k in keys)
    target = create_model(from_dict({"model": {"encoder": {"arch": "resnet10", "widths": [8, 16, 32, 64]},
                                               "heads": {"spleen": {"type": "med3d", "num_classes": 2}}}}))
    report = load_pretrained(target, out)
    assert report.unexpected == [] and report.mismatched == [] and report.new_heads == ["spleen"]
    assert all(k.startswith("heads.spleen.") for k in report.missing)
    assert len(report.loaded) == len(keys) and "unexpected 0" in str(report)
    assert torch.equal(target.encoder.conv1.weight, model.encoder.conv1.weight)

    from med3d.inference.predictor import Predictor
    predictor = Predictor.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "cpu")
    assert predictor.task("Task05_ProstateDemo") == "Task05_ProstateDemo"
    with pytest.raises(Med3DError, match=r"task restore: a self-supervised 'restore' head.*Task05_ProstateDemo"):
        predictor.task("restore")  # such a head predicts no labels: named, not run


def test_prepare_with_a_config_caches_unlabelled_tasks_where_the_ranks_look(tmp_path):
    import yaml

    from med3d.cli import main
    from med3d.data.unlabelled import check_unlabelled

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        _write(folder / f"s{i}.mha", i)
    cfg = {"model": {"heads": {"r": {"type": "restore", "num_classes": 1}}},
           "data": {"datasets": {"r": {"path": str(folder)}}, "cache_dir": str(tmp_path / "cache")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(Med3DError, match="run .med3d prepare --config CONFIG."):
        check_unlabelled(_entry(folder), tmp_path / "cache")
    assert main(["prepare", "--config", str(tmp_path / "c.yaml"), "--quiet", "--workers", "0"]) == 0
    assert check_unlabelled(_entry(folder), tmp_path / "cache").name.endswith("-unlabelled-all")


@pytest.mark.slow
def test_real_unlabelled_ct_scans_are_planned_cached_and_corrupted(real_data, tmp_path):
    from med3d.data.cache import load_cache
    from med3d.data.sampler import MixSchedule, PatchBatches, TaskData
    from med3d.data.unlabelled import prepare_unlabelled

    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "abdomen.nii.gz").symlink_to(real_data / "totalseg_ct" / "ct.nii.gz")  # 3 mm, HU int32
    (folder / "lung.nrrd").symlink_to(real_data / "radiomics" / "lung1_image.nrrd")  # 0.57 x 0.57 x 5 mm
    cache = prepare_unlabelled(_entry(folder, modality=["CT"], ct_window=[-1000.0, 400.0]), tmp_path / "cache",
                               progress=False)
    plan, cases = load_cache(cache)
    assert [c.case_id for c in cases] == ["abdomen", "lung"]
    assert plan["target_spacing"] == pytest.approx([4.0, 1.785, 1.785], abs=1e-3)  # the median of 3 and 5 / 0.57 mm
    data = np.load(cases[0].data)
    assert -1.0 <= data.min() and data.max() <= 1.0 and (data > -0.9).mean() > 0.2  # windowed: body and air
    task = TaskData("r", cases, plan, kind="restore", corruption=ALWAYS)
    batch = PatchBatches([task], MixSchedule(["r"], [2]), [16, 32, 32], 2, 0.0, None, seed=0)[(0, 0)]
    assert batch["image"].shape == batch["label"].shape == (2, 1, 16, 32, 32)
    assert batch["label"].abs().max() <= 1.0 and (batch["image"] != batch["label"]).float().mean() > 0.3
