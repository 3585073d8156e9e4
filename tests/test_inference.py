"""Inference building blocks: mirroring TTA, mode-safe evaluation, labels restored without full probabilities."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from med3d.inference import evaluating, restore_labels, restore_probabilities, sliding_window, softmax_tta


class Lopsided(nn.Module):
    """A tiny network that is not symmetric under any flip (so mirroring changes its output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-1], device=x.device)
        return self.bn(self.conv(x)) + ramp


@pytest.fixture
def volume() -> torch.Tensor:
    return torch.randn(1, 1, 20, 24, 28, generator=torch.Generator().manual_seed(1))


def test_mirroring_averages_the_eight_flips(volume):
    model = Lopsided().eval()
    got = softmax_tta(model, volume, "t", (16, 16, 16), 0.5, 2, mirror=True)
    manual = []
    for r in range(4):
        for axes in itertools.combinations((2, 3, 4), r):
            x = torch.flip(volume, axes) if axes else volume
            p = torch.softmax(sliding_window(model, x, "t", (16, 16, 16), 0.5, 2), 1)
            manual.append(torch.flip(p, axes) if axes else p)
    assert len(manual) == 8
    torch.testing.assert_close(got, torch.stack(manual).mean(0), atol=1e-6, rtol=1e-5)
    plain = softmax_tta(model, volume, "t", (16, 16, 16), 0.5, 2, mirror=False)
    assert float((plain - got).abs().max()) > 1e-3


def test_evaluating_restores_every_modules_own_mode():
    model = Lopsided().train()
    model.bn.eval()  # a frozen stage
    with evaluating(model):
        assert not model.training and not model.conv.training
    assert model.training and model.conv.training and not model.bn.training


def test_labels_without_full_probabilities_match_their_argmax():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 10, 12, 14)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    props = {"crop_box": [(2, 18), (1, 23), (3, 30)], "cropped_shape": [16, 22, 27], "spacing_zyx": [2.0, 1.1, 1.0],
             "geometry": {"shape": [20, 25, 33]}}
    plan = {"target_spacing": [3.2, 2.0, 1.9]}
    labels = restore_labels(probs, props, plan)
    full = restore_probabilities(probs, props, plan)
    assert labels.shape == (20, 25, 33) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, full.argmax(0))
    assert labels[:2].max() == 0 and labels[2:18, 1:23, 3:30].max() > 0


@pytest.mark.parametrize("shape", [(20, 24, 28), (7, 9, 33), (16, 16, 16), (40, 17, 16)])
@pytest.mark.parametrize("overlap,batch", [(0.5, 2), (0.25, 3), (0.0, 1), (0.7, 2)])
def test_sliding_window_gives_monais_gaussian_blend(shape, overlap, batch):
    # Sizes below a window (padded), not multiples of the step, and one exactly a window.
    from monai.inferers import sliding_window_inference

    model = Lopsided().eval()
    volume = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        theirs = sliding_window_inference(volume, (16, 16, 16), batch, lambda t: model(t, "t"), overlap=overlap,
                                          mode="gaussian")
        ours = sliding_window(model, volume, "t", (16, 16, 16), overlap, batch)
        unnormalised = sliding_window(model, volume, "t", (16, 16, 16), overlap, batch, normalise=False)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    assert torch.equal(unnormalised.argmax(1), theirs.argmax(1))
    if overlap > 0:  # overlapping windows sum more than one weight somewhere: the division matters
        assert float((unnormalised - ours).abs().max()) > 1e-2


def test_room_for_the_blend_counts_the_allocators_unused_cache(monkeypatch):
    from med3d.inference.window import room_for_blend

    gib = 1 << 30
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    assert room_for_blend(gpu, 3, (128, 256, 256))  # 0.1 GiB
    assert room_for_blend(gpu, 8, (400, 512, 512))  # 3.1 GiB of 4 free + 28 cached
    assert not room_for_blend(gpu, 118, (400, 512, 512))  # 46 GiB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)
    assert not room_for_blend(gpu, 8, (400, 512, 512))  # 3.1 GiB of 4 free, half of it kept for the network
    assert room_for_blend(torch.device("cpu"), 118, (400, 512, 512))


def test_a_blend_without_room_is_stitched_by_monais_adaptive_inferer(monkeypatch, volume):
    from med3d.inference import window

    model = Lopsided().eval()
    with torch.inference_mode():
        lean = sliding_window(model, volume, "t", (16, 16, 16), 0.5, 2)
        monkeypatch.setattr(window, "room_for_blend", lambda *a, **k: False)
        fallback = sliding_window(model, volume, "t", (16, 16, 16), 0.5, 2, normalise=False)
    torch.testing.assert_close(fallback, lean, atol=2e-6, rtol=1e-5)  # normalised: MONAI's result


@pytest.mark.parametrize("shape,overlap,batch,message", [
    ((2, 1, 20, 20, 20), 0.5, 2, "one volume"), ((1, 1, 20, 20, 20), -0.5, 2, "overlap -0.5"),
    ((1, 1, 20, 20, 20), 1.0, 2, "overlap 1.0"), ((1, 1, 20, 20, 20), 0.5, 0, "sw_batch_size 0")])
def test_sliding_window_refuses_what_it_cannot_blend(shape, overlap, batch, message):
    from med3d.errors import Med3DError

    with pytest.raises(Med3DError, match=message):
        sliding_window(Lopsided().eval(), torch.zeros(shape), "t", (16, 16, 16), overlap, batch)
