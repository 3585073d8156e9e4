"""weights/index.yaml as timm-style default configs (med3d.transfer.pretrained)."""
import copy

import pytest
import torch
import yaml

import med3d
from med3d import Med3DError
from med3d.resources import resource_path
from med3d.transfer.formats import describe_state_dict
from med3d.transfer.inflate import inflate_state_dict
from med3d.transfer.pretrained import encoder_args, find_pretrained_cfg, pretrained_cfgs, structure_mismatch

INDEX = resource_path("weights/index.yaml")


@pytest.fixture(scope="module")
def index():
    return yaml.safe_load(INDEX.read_text())


def test_every_entry_is_a_complete_default_config(index):
    cfgs = pretrained_cfgs(index)
    assert len(cfgs) == sum(len(f["entries"]) for f in index.values())
    for cfg in cfgs:
        with torch.device("meta"):  # structure only
            enc = med3d.create_encoder(**encoder_args(cfg))
        assert cfg.first_conv in enc.state_dict(), cfg.file
        assert cfg.classifier and cfg.dims in (2, 3)
        assert len(cfg.input["channels"]) == enc.in_channels and cfg.input["normalisation"], cfg.file
        assert "spacing_zyx" in cfg.input and "spacing" not in cfg.input
        assert cfg.sha256 is None or len(cfg.sha256) == 64  # recorded, or null: never guessed
    mn = find_pretrained_cfg(cfgs, "resnet_18.pth")
    assert encoder_args(mn) == {"arch": "resnet18", "layout": "dilated", "conv": "3d", "in_channels": 1,
                                "shortcut": "A"}
    assert mn.key_prefix == "module." and mn.container == "state_dict" and mn.classifier == ("conv_seg",)
    tv = find_pretrained_cfg(cfgs, "resnet34-b627a593.pth")
    assert tv.dims == 2 and tv.sha256_prefix == "b627a593" and tv.encoder["conv"] == "slicewise"
    assert find_pretrained_cfg(cfgs, "mine.pth") is None


def test_structure_is_checked_against_the_entry(index):
    cfgs = pretrained_cfgs(index)
    r18 = describe_state_dict(med3d.create_encoder("resnet18").state_dict())
    assert structure_mismatch(r18, find_pretrained_cfg(cfgs, "resnet_18.pth")) is None
    assert "arch is resnet18 where the index lists resnet_50.pth with arch resnet50" in \
        structure_mismatch(r18, find_pretrained_cfg(cfgs, "resnet_50.pth"))
    two = describe_state_dict(med3d.create_encoder("resnet18", in_channels=2).state_dict())
    assert "in_channels is 2" in structure_mismatch(two, find_pretrained_cfg(cfgs, "resnet_18.pth"))
    sw = describe_state_dict(med3d.create_encoder("resnet18", conv="slicewise").state_dict())
    assert "conv is slicewise" in structure_mismatch(sw, find_pretrained_cfg(cfgs, "resnet_18.pth"))
    # a 2D torchvision-named file fits its entry whatever it will be inflated to
    enc2d = {k: v[:, :, 0] if v.ndim == 5 else v for k, v in
             med3d.create_encoder("resnet18", in_channels=3, conv="slicewise", shortcut="B").state_dict().items()}
    assert inflate_state_dict(enc2d, "1x3x3").keys() == enc2d.keys()
    assert structure_mismatch(describe_state_dict(enc2d), find_pretrained_cfg(cfgs, "resnet18-f37072fd.pth")) is None


@pytest.mark.parametrize("change,message", [
    (lambda e: e.update(arch="resnet19"), "medicalnet entry resnet_10.pth: arch 'resnet19' is not a registered"),
    (lambda e: e.update(kernal="3x3x3"), "medicalnet entry resnet_10.pth: key 'kernal' is neither an argument"),
    (lambda e: e.update(sha256="abc"), "medicalnet entry resnet_10.pth: sha256 must be 64 lowercase hex digits"),
])
def test_bad_entries_are_named(index, change, message):
    bad = copy.deepcopy(index)
    change(bad["medicalnet"]["entries"][0])
    with pytest.raises(Med3DError, match=f"^weights/index.yaml: {message}"):
        pretrained_cfgs(bad)
