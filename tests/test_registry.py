"""A newly registered encoder or head is usable from YAML: one module + one registration, nothing else edited."""
from typing import List, Literal, Sequence

import pytest
import torch
import torch.nn as nn
import yaml

import med3d
from med3d import Med3DError
from med3d import config as config_module
from med3d.config import load_config, to_dict
from med3d.models.resnet3d import FeatureInfo, size_divisibility
from med3d.registry import ENCODERS, HEADS


class ToyEncoder(nn.Module):
    """Two strided convs; declares its arguments by its signature only."""

    def __init__(self, in_channels: int = 1, width: int = 4, norm: Literal["batch", "none"] = "batch",
                 strides: Sequence[int] = (2, 2)) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stages = nn.ModuleList()
        self.feature_info: List[FeatureInfo] = []
        total, cin = 1, in_channels
        for i, s in enumerate(strides):
            self.stages.append(nn.Conv3d(cin, width, 3, stride=s, padding=1))
            total, cin = total * s, width
            self.feature_info.append(FeatureInfo(f"stage{i}", width, (total, total, total)))

    @property
    def size_divisibility(self):
        return size_divisibility(self.feature_info)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ToyHead(nn.Module):
    def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, hidden: int = 3,
                 act: Literal["relu", "gelu"] = "relu") -> None:
        super().__init__()
        self.size_divisibility = (1, 1, 1)
        self.net = nn.Sequential(nn.Linear(feature_info[-1].channels, hidden),
                                 nn.ReLU() if act == "relu" else nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, features, out_size):
        return self.net(features[-1].mean(dim=(2, 3, 4)))


@pytest.fixture
def toy_components():
    ENCODERS.register("toy3d")(ToyEncoder)
    HEADS.register("toyhead")(ToyHead)
    yield
    # unregister, and forget the schemas made for them, so other tests see the shipped registry
    ENCODERS._table.pop("toy3d")
    HEADS._table.pop("toyhead")
    for key in [k for k in config_module._VARIANTS if k[1] in ("toy3d", "toyhead")]:
        config_module._VARIANTS.pop(key)


def test_new_encoder_and_head_work_from_yaml(tmp_path, toy_components):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"model": {"encoder": {"arch": "toy3d", "width": 6, "strides": [2, 4]},
                                              "heads": {"grade": {"type": "toyhead", "num_classes": 3, "hidden": 5},
                                                        "seg": {"type": "med3d"}}}}))
    cfg = load_config(path)
    resolved = to_dict(cfg)["model"]
    assert resolved["encoder"] == {"arch": "toy3d", "in_channels": 1, "width": 6, "norm": "batch", "strides": [2, 4]}
    assert resolved["heads"]["grade"] == {"type": "toyhead", "num_classes": 3, "hidden": 5, "act": "relu"}
    model = med3d.create_model(cfg)
    assert model.encoder.config == resolved["encoder"]  # what an export records, from the declaration
    assert model.size_divisibility == (8, 8, 8)
    assert model(torch.randn(2, 1, 16, 16, 16), task="grade").shape == (2, 3)
    assert model(torch.randn(1, 1, 13, 16, 19), task="seg").shape == (1, 2, 13, 16, 19)


@pytest.mark.parametrize("override,message", [
    ("model.encoder.norm=group", "config key 'model.encoder.norm': expected 'batch' | 'none', got str 'group'"),
    ("model.encoder.widht=3", "unknown config key 'model.encoder.widht'; did you mean 'width'?"),
    ("model.encoder.layout=strided", "unknown config key 'model.encoder.layout': a toy3d encoder does not take it "
                                     r"\(only resnet10, .* encoders do\); "
                                     "it takes: arch, in_channels, width, norm, strides"),
    ("model.heads.t.hiden=4", "unknown config key 'model.heads.t.hiden'; did you mean 'hidden'?"),
    ("model.heads.t.act=tanh", "config key 'model.heads.t.act': expected 'relu' | 'gelu', got str 'tanh'"),
    ("model.heads.t.channels=4", "unknown config key 'model.heads.t.channels': a toyhead head does not take it"),
])
def test_new_component_keys_are_checked_against_its_builder(toy_components, override, message):
    with pytest.raises(Med3DError, match=message):
        load_config(None, ["model.encoder.arch=toy3d", "model.heads.t.type=toyhead", override])


def test_required_builder_argument_is_named(toy_components):
    class NeedsK(ToyHead):
        def __init__(self, feature_info: Sequence[FeatureInfo], num_classes: int, k: int) -> None:
            super().__init__(feature_info, num_classes)

    HEADS.register("needs_k")(NeedsK)
    try:
        with pytest.raises(Med3DError, match="config key 'model.heads.t.k' is required by a needs_k head; set it"):
            load_config(None, ["model.heads.t.type=needs_k"])
        assert load_config(None, ["model.heads.t.type=needs_k", "model.heads.t.k=2"]).model.heads["t"].k == 2
    finally:
        HEADS._table.pop("needs_k")
        config_module._VARIANTS.pop(("HeadConfig", "needs_k"), None)


def test_a_builder_argument_without_type_hint_is_refused():
    class Untyped(nn.Module):
        def __init__(self, feature_info, num_classes: int, size=3) -> None:
            super().__init__()

    with pytest.raises(TypeError, match="argument 'size' needs a type hint"):
        HEADS.register("untyped")(Untyped)
    assert "untyped" not in HEADS.names()
