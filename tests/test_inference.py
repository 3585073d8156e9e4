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
