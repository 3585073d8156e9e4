"""med3d analyze: linear CKA and SVCCA pinned against their textbook formulas and invariances, the per-stage
weight change, encoder comparison (identical vs random weights), patch drawing, and the CLI end to end."""
from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from med3d.analysis import compare, draw_patches, linear_cka, random_like, svcca, weight_change
from med3d.analysis.patches import choose_plan
from med3d.api import create_encoder, create_model
from med3d.checkpoint import save_checkpoint
from med3d.config import from_dict
from med3d.errors import Med3DError

TINY = {"arch": "resnet10", "widths": [8, 16, 32, 64]}  # ResNet-10 at 1/8 width, as conftest's tiny config
STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _correlated(n=600, p=12, q=9, seed=0):
    """Two feature matrices sharing a 4-dimensional signal (so their CKA is neither 0 nor 1)."""
    g = _rng(seed)
    z = g.normal(size=(n, 4))
    x = z @ g.normal(size=(4, p)) + 0.7 * g.normal(size=(n, p))
    y = np.tanh(z @ g.normal(size=(4, q))) + 0.7 * g.normal(size=(n, q))
    return x, y


def _cka_by_definition(x, y):
    """HSIC with linear kernels and the centring matrix H, normalised (Kornblith et al., eq. 3)."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_))


def _orthogonal(p, seed=1):
    return np.linalg.qr(_rng(seed).normal(size=(p, p)))[0]


# ---------------------------------------------------------------- linear CKA

def test_cka_of_a_feature_matrix_with_itself_is_1():
    x, _ = _correlated()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n", [600, 8])  # more examples than features (feature space), fewer (Gram matrices)
def test_cka_matches_the_hsic_definition_in_both_formulations(n):
    x, y = _correlated(n=n)
    want = _cka_by_definition(x, y)
    assert 0.05 < want < 0.95
    assert linear_cka(x, y) == pytest.approx(want, rel=1e-9)


def test_cka_is_invariant_to_an_orthogonal_transform_and_isotropic_scaling_but_not_to_anisotropic_scaling():
    x, y = _correlated()
    base = linear_cka(x, y)
    assert 0.2 < base < 0.9
    assert linear_cka(x @ _orthogonal(x.shape[1]), y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x, -3.0 * y @ _orthogonal(y.shape[1], seed=2)) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x, x @ _orthogonal(x.shape[1]) * 4.0) == pytest.approx(1.0, abs=1e-12)
    # CKA is not invariant to any linear map: stretching one axis changes it (so the tests above can fail)
    stretch = np.ones(x.shape[1])
    stretch[0] = 20.0
    assert abs(linear_cka(x * stretch, y) - base) > 0.05


def test_cka_of_independent_features_is_near_0_and_of_a_constant_layer_is_nan():
    g = _rng(3)
    assert linear_cka(g.normal(size=(4000, 8)), g.normal(size=(4000, 8))) < 0.01
    assert np.isnan(linear_cka(np.ones((50, 4)), g.normal(size=(50, 4))))
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(np.zeros((5, 2)), np.zeros((6, 2)))


# ---------------------------------------------------------------- SVCCA

def _cca_by_covariances(x, y):
    """Canonical correlations as the square roots of the eigenvalues of Sxx^-1 Sxy Syy^-1 Syx."""
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    return np.sqrt(np.clip(np.sort(np.linalg.eigvals(m).real)[::-1][: min(x.shape[1], y.shape[1])], 0, 1))


def test_svcca_of_identical_or_rotated_features_is_1():
    x, _ = _correlated()
    value, kx, ky = svcca(x, x)
    assert value == pytest.approx(1.0, abs=1e-9) and kx == ky
    assert svcca(x, 5.0 * x @ _orthogonal(x.shape[1]))[0] == pytest.approx(1.0, abs=1e-9)


def test_svcca_without_reduction_is_the_mean_canonical_correlation():
    x, y = _correlated(n=800)
    value, kx, ky = svcca(x, y, keep=1.0)
    assert (kx, ky) == (12, 9)
    want = _cca_by_covariances(x, y).mean()
    assert 0.2 < want < 0.8
    assert value == pytest.approx(want, rel=1e-7)


def test_svcca_keeps_the_directions_holding_99_percent_of_the_variance():
    g = _rng(4)
    signal = g.normal(size=(1000, 3)) @ np.diag([10.0, 6.0, 3.0]) @ g.normal(size=(3, 20))
    x = signal + 0.01 * g.normal(size=(1000, 20))  # 3 strong directions, 17 of noise far below 1% of the variance
    assert svcca(x, x)[1:] == (3, 3)
    assert svcca(x, x, keep=1.0)[1:] == (20, 20)
    # The reduced subspaces are what is compared: the signal with fresh noise still scores ~1, while the
    # unreduced noise directions are independent and pull the mean far down.
    y = signal + 0.01 * g.normal(size=(1000, 20))
    assert svcca(x, y)[0] > 0.999
    assert svcca(x, y, keep=1.0)[0] < 0.5
    independent = svcca(g.normal(size=(4000, 10)), g.normal(size=(4000, 10)))[0]
    assert independent < 0.05


# ---------------------------------------------------------------- weight change

def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return create_encoder(TINY["arch"], widths=TINY["widths"])


def test_weight_change_is_0_for_identical_weights_and_measures_a_change_in_its_own_stage_only():
    a = _tiny_encoder()
    assert weight_change(a, copy.deepcopy(a)) == {s: 0.0 for s in STAGES}
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.layer2[0].conv1.weight.mul_(1.5)  # +50% of one of layer2's tensors
        b.bn1.running_mean.add_(3.0)  # running statistics are not weights
    change = weight_change(a, b)
    params = dict(a.named_parameters())
    norm2 = sum(float(p.detach().double().pow(2).sum()) for k, p in params.items() if k.startswith("layer2."))
    want = 0.5 * float(a.layer2[0].conv1.weight.detach().double().norm()) / np.sqrt(norm2)
    assert change["layer2"] == pytest.approx(want, rel=1e-9) and change["layer2"] > 0.1
    assert all(change[s] == 0.0 for s in STAGES if s != "layer2")
    with torch.no_grad():
        b.bn1.weight.add_(1.0)  # a BN scale is a weight: the stem changes
    assert weight_change(a, b)["stem"] > 0.1


def test_encoders_of_different_architectures_are_refused_in_one_line():
    a = _tiny_encoder()
    for other in (create_encoder("resnet18", widths=TINY["widths"]), create_encoder("resnet10", widths=[8, 16, 32, 32]),
                  create_encoder("resnet10", widths=TINY["widths"], layout="strided")):
        with pytest.raises(Med3DError) as err:
            weight_change(a, other)
        assert "different encoder architectures" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- encoders compared on patches

def _smooth_volumes(n, size=(16, 32, 32), seed=0):
    """Noise smoothed by a box filter: structure at several scales, as scans have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *size, generator=g)
    return torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2) * 3.0 + 0.3 * torch.randn(n, 1, *size, generator=g)


def test_an_encoder_matches_itself_and_a_random_one_clearly_less():
    a = _tiny_encoder(0)
    patches = _smooth_volumes(4)
    same = compare(a, copy.deepcopy(a), patches, max_examples=2000)
    assert [r.stage for r in same] == STAGES
    for r in same:
        assert r.cka == pytest.approx(1.0, abs=1e-6) and r.svcca == pytest.approx(1.0, abs=1e-6)
        assert r.weight_change == 0.0
    # stem: 8x16x16 positions per patch, 500 kept of each; layer1 (after the max-pool): all 4x8x8; the dilated
    # stages: all 2x4x4
    assert [r.examples for r in same] == [4 * 500, 4 * 256, 4 * 32, 4 * 32, 4 * 32]
    # Against other random initialisations (seeds 1, 2, 3 vs 0) we measured CKA 0.06 at the stem and 0.15-0.48
    # at layer1..4, SVCCA 0.17-0.55, weight change 0.63 (stem) and 1.06-1.16 (two independent Kaiming draws).
    other_init = _tiny_encoder(1)
    other = compare(a, other_init, patches, max_examples=2000)
    for r in other:
        assert r.cka < 0.6 and r.svcca < 0.7 and r.weight_change > 0.5, r
    assert np.mean([r.cka for r in other]) < 0.4
    # Neither the batch size nor the model's own mode changes the numbers (float32 convolutions: to 1e-6), and
    # the mode is put back; with fewer examples kept than positions, the positions kept do not depend on the batch.
    a.train()
    few = [[r.cka for r in compare(a, other_init, patches[:3], max_examples=48, batch_size=bs)] for bs in (1, 2)]
    assert a.training and few[0] == pytest.approx(few[1], abs=1e-6)


def test_the_random_baseline_is_a_fresh_draw_of_the_same_architecture_and_never_the_encoder_itself():
    a = _tiny_encoder(0)  # itself an untrained draw with seed 0
    state = torch.random.get_rng_state()
    fresh = random_like(a, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert fresh.config == a.config
    assert min(weight_change(a, fresh).values()) > 0.5
    assert all(torch.equal(x, y) for x, y in zip(random_like(a, 5).parameters(), random_like(a, 5).parameters()))


def test_compare_takes_multitask_models_and_refuses_patches_of_other_channels():
    cfg = from_dict({"model": {"encoder": TINY, "heads": {"seg": {"type": "med3d", "num_classes": 2}}}})
    model = create_model(cfg)
    rows = compare(model, model.encoder, _smooth_volumes(2), max_examples=200)
    assert all(r.cka == pytest.approx(1.0, abs=1e-6) for r in rows)
    with pytest.raises(Med3DError, match="patches have 2 channel"):
        compare(model, model, torch.zeros(1, 2, 16, 16, 16))


# ---------------------------------------------------------------- patches and the CLI

AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def _write_scan(path: Path, seed: int, shape_xyz=(40, 36, 20)) -> Path:
    """A NIfTI "MR" scan: smooth anatomy-like intensities inside a box, zero around it."""
    g = np.random.default_rng(seed)
    data = np.zeros(shape_xyz, np.float32)
    inner = g.normal(size=(30, 28, 14)).astype(np.float32)
    inner = np.cumsum(np.cumsum(inner, 0), 1) * 5 + 300  # low-frequency structure, positive
    data[5:35, 4:32, 3:17] = inner
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def _dataset(root: Path, n=3) -> Path:
    """A Decathlon-layout dataset named Tiny with ``n`` training cases (labels all background)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        _write_scan(root / "imagesTr" / f"case{i}.nii.gz", i)
        nib.save(nib.Nifti1Image(np.zeros((40, 36, 20), np.uint8), AFFINE), str(root / "labelsTr" / f"case{i}.nii.gz"))
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Tiny", "modality": {"0": "MR"},
                                                   "labels": {"0": "background", "1": "organ"},
                                                   "training": training, "test": []}))
    return root


PLAN = {"dataset": "Tiny", "target_spacing": [2.0, 1.0, 1.0], "crop_nonzero": True, "channel_names": ["MR"],
        "normalization": [{"scheme": "zscore"}], "channels": None, "labels": {"0": "background", "1": "organ"}}


def test_patches_are_seeded_and_prepared_by_the_checkpoints_plan_for_the_dataset(tmp_path):
    root = _dataset(tmp_path / "Tiny")
    first = draw_patches(root, 5, (8, 16, 16), seed=3, plans=[PLAN])
    assert first.patches.shape == (5, 1, 8, 16, 16) and first.patches.dtype == torch.float32
    assert "plan for Tiny" in first.source and "3 of 3 scans" in first.source
    assert torch.equal(first.patches, draw_patches(root, 5, (8, 16, 16), seed=3, plans=[PLAN]).patches)
    assert not torch.equal(first.patches, draw_patches(root, 5, (8, 16, 16), seed=4, plans=[PLAN]).patches)
    inside = first.patches[first.patches != 0]
    assert abs(float(inside.mean())) < 1.0 and 0.3 < float(inside.std()) < 2.0  # z-scored, not raw (~300)
    # No plan for this dataset: each scan is z-scored at its own spacing.
    assert "z-score" in draw_patches(root, 2, (8, 16, 16), plans=[{**PLAN, "dataset": "Other"}]).source
    with pytest.raises(Med3DError, match="not found"):
        draw_patches(tmp_path / "nowhere", 2, (8, 8, 8))
    with pytest.raises(Med3DError, match="--patch"):
        draw_patches(root, 2, (8, 8))


def test_the_plan_is_the_one_for_the_dataset_or_for_plain_images_the_one_that_fits():
    other = {**PLAN, "dataset": "Other"}
    assert choose_plan([other, PLAN], "Tiny", 1)["dataset"] == "Tiny"
    assert choose_plan([other], "Tiny", 1) is None  # another dataset's normalisation is not borrowed
    assert choose_plan([other], None, 1)["dataset"] == "Other"
    assert choose_plan([other, PLAN], None, 1) is None  # ambiguous
    assert choose_plan([PLAN], None, 2) is None  # other channels
    assert choose_plan([{**PLAN, "kind": "classification"}], None, 1) is None


def test_patches_from_a_prepared_cache(tmp_path):
    from med3d.data.cache import prepare_dataset

    root = _dataset(tmp_path / "Tiny", n=2)
    folder = prepare_dataset(root, tmp_path / "cache", progress=False).folder
    drawn = draw_patches(folder, 3, (8, 16, 16), seed=0)
    assert drawn.patches.shape == (3, 1, 8, 16, 16) and "prepared cache" in drawn.source
    assert torch.equal(drawn.patches, draw_patches(folder, 3, (8, 16, 16), seed=0).patches)
    inside = drawn.patches[drawn.patches != 0]
    assert abs(float(inside.mean())) < 1.0  # the cached arrays are normalised already (raw scans are ~300)
    with pytest.raises(Med3DError, match=f"give one of them, e.g. {folder}"):  # the cache root, not a dataset
        draw_patches(folder.parent, 3, (8, 16, 16))


def _checkpoints(tmp_path: Path):
    """Three tiny checkpoints: A, B = A with layer3 changed, R = another random initialisation; and E, another arch."""
    cfg = from_dict({"model": {"encoder": TINY, "heads": {"seg": {"type": "med3d", "num_classes": 2}}}})
    torch.manual_seed(0)
    model = create_model(cfg)
    a = save_checkpoint(tmp_path / "a.pt", model, cfg, meta={"plans": {"seg": PLAN}})
    with torch.no_grad():
        for p in model.encoder.layer3.parameters():
            p.mul_(1.2)
    b = save_checkpoint(tmp_path / "b.pt", model, cfg)
    torch.manual_seed(1)
    r = save_checkpoint(tmp_path / "r.pt", create_model(cfg), cfg)
    cfg18 = from_dict({"model": {"encoder": {**TINY, "arch": "resnet18"},
                                 "heads": {"seg": {"type": "med3d", "num_classes": 2}}}})
    e = save_checkpoint(tmp_path / "e.pt", create_model(cfg18), cfg18)
    return a, b, r, e


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "med3d.cli", "analyze", *map(str, args)], capture_output=True,
                          text=True)


def _main(capsys, *args):
    """``med3d analyze ARGS`` in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from med3d.cli import main

    rc = main(["analyze", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _rows(path: Path):
    with open(path) as fh:
        return {r["stage"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_cli_end_to_end_writes_the_table_and_plot_and_reruns_agree(tmp_path, capsys):
    a, b, r, e = _checkpoints(tmp_path)
    root = _dataset(tmp_path / "Tiny")
    small = ["--data", root, "--patches", 4, "--patch", 8, 32, 32, "--examples", 2000]
    run = _cli(a, b, *small, "--out", tmp_path / "ab")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| layer3 |" in run.stdout and "plan for Tiny" in run.stdout
    rows = _rows(tmp_path / "ab" / "analysis.csv")
    assert list(rows) == STAGES
    for stage in ("stem", "layer1", "layer2"):  # before the change: identical
        assert float(rows[stage]["cka"]) == pytest.approx(1.0, abs=1e-5)
        assert float(rows[stage]["weight_change"]) == 0.0
    assert float(rows["layer3"]["weight_change"]) == pytest.approx(0.2, abs=1e-5)  # every weight x1.2
    assert (tmp_path / "ab" / "analysis.png").stat().st_size > 5000
    first = (tmp_path / "ab" / "analysis.csv").read_text()
    for seed, same in ((0, True), (1, False)):  # a rerun draws the same patches and positions; another seed not
        rc = _main(capsys, a, b, *small, "--out", tmp_path / "ab", "--overwrite", "--seed", seed)[0]
        assert rc == 0 and ((tmp_path / "ab" / "analysis.csv").read_text() == first) is same
    rc, out, _ = _main(capsys, a, r, *small, "--out", tmp_path / "ar", "--baseline")
    assert rc == 0 and "CKA A vs random" in out
    rows = _rows(tmp_path / "ar" / "analysis.csv")
    assert max(float(v["cka"]) for v in rows.values()) < 0.9
    assert max(float(v["cka_vs_random"]) for v in rows.values()) < 0.9
    bad = _cli(a, e, *small, "--out", tmp_path / "ae")  # the entry point: one line on stderr, exit 2
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "different encoder architectures" in bad.stderr


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    a, _, _, e = _checkpoints(tmp_path)
    scan = _write_scan(tmp_path / "scan.nii.gz", 0)
    cases = [((tmp_path / "missing.pt", a, "--data", scan), "missing.pt: weights file not found"),
             ((a, e, "--data", scan), "different encoder architectures"),
             ((a, a, "--data", tmp_path / "nodata"), "nodata: not found"),
             ((a, a, "--data", scan, "--patches", 0), "--patches 0"),
             ((a, a, "--data", scan, "--examples", 0), "--examples 0"),
             ((a, a, "--data", scan, "--device", "tpu"), "--device tpu")]
    for args, message in cases:
        rc, _, err = _main(capsys, *args, "--out", tmp_path / "out")
        assert rc == 2, (args, err)
        assert err.startswith("med3d analyze: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "analysis.csv").write_text("keep")
    rc, _, err = _main(capsys, a, a, "--data", scan, "--out", tmp_path / "out")
    assert rc == 2 and "pass --overwrite" in err
    assert (tmp_path / "out" / "analysis.csv").read_text() == "keep"


def test_encoder_files_of_any_format_med3d_reads_are_compared(tmp_path):
    from med3d.analysis import load_encoder
    from med3d.export import export_encoder

    a, b, _, _ = _checkpoints(tmp_path)
    enc_a, meta = load_encoder(a)
    assert meta["plans"]["seg"]["dataset"] == "Tiny"
    exported = export_encoder(load_encoder(b)[0], "safetensors", tmp_path / "b.safetensors")
    enc_b, _ = load_encoder(exported)
    change = weight_change(enc_a, enc_b)
    assert change["layer2"] == 0.0 and change["layer3"] == pytest.approx(0.2, abs=1e-6)


@pytest.mark.slow  # a full-width ResNet-10 (14 M parameters) written and read
def test_plain_encoder_weights_need_arch(tmp_path):
    from med3d.analysis import load_encoder
    from med3d.analysis.compare import check_same_architecture

    enc_a = load_encoder(_checkpoints(tmp_path)[0])[0]
    plain = tmp_path / "plain.pth"
    torch.save(create_encoder("resnet10").state_dict(), plain)
    with pytest.raises(Med3DError, match="give --arch"):
        load_encoder(plain)
    enc_p, _ = load_encoder(plain, arch="resnet10")
    with pytest.raises(Med3DError, match="different encoder architectures"):
        check_same_architecture(enc_a, enc_p)


@pytest.mark.slow
def test_on_a_real_ct_fine_tuning_one_stage_shows_in_that_stage_only(real_data, tmp_path):
    from med3d.analysis import analyze

    scan = real_data / "totalseg_ct" / "ct.nii.gz"
    a, b, r, _ = _checkpoints(tmp_path)  # B: layer3 scaled by 1.2
    res = analyze(a, b, scan, tmp_path / "ab", patches=8, patch=(16, 32, 32), max_examples=4000)
    assert "plan for Tiny" in res.data  # a plain image: the checkpoint's one single-channel plan prepares it
    by = {s.stage: s for s in res.stages}
    assert all(by[s].cka == pytest.approx(1.0, abs=1e-5) for s in ("stem", "layer1", "layer2"))
    assert by["layer3"].weight_change == pytest.approx(0.2, abs=1e-5)
    rnd = analyze(a, r, scan, tmp_path / "ar", patches=8, patch=(16, 32, 32), max_examples=4000)
    assert max(s.cka for s in rnd.stages) < 0.9 and min(s.weight_change for s in rnd.stages) > 0.5
    assert res.png_path is not None and res.png_path.stat().st_size > 5000


def test_the_plot_is_optional_and_the_csv_has_one_row_per_stage(tmp_path, monkeypatch):
    from med3d.analysis.report import _csv_text, save_plot

    rows = compare(_tiny_encoder(0), _tiny_encoder(0), _smooth_volumes(1), max_examples=100)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert save_plot(rows, tmp_path / "without.png") is None and not (tmp_path / "without.png").exists()
    table = list(csv.DictReader(_csv_text(rows, rows).splitlines()))
    assert [r["stage"] for r in table] == STAGES and float(table[0]["cka_vs_random"]) == pytest.approx(1.0)
