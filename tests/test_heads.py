import pytest
import torch

import med3d
from med3d import Med3DError
from med3d.models import MultiTaskModel, build_head


def small_model(layout="dilated"):
    return med3d.create_model({"model": {
        "encoder": {"arch": "resnet10", "layout": layout, "widths": [8, 16, 32, 64]},
        "heads": {"liver": {"type": "med3d", "num_classes": 3}, "tumour": {"type": "classification",
                                                                             "num_classes": 2}}}})


def test_med3d_head_has_medicalnet_names():
    enc = med3d.create_encoder("resnet50")
    head = build_head("med3d", enc, num_classes=2)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes["conv_seg.0.weight"] == (2048, 32, 2, 2, 2)  # ConvTranspose3d(C -> 32)
    assert shapes["conv_seg.0.bias"] == (32,)
    assert shapes["conv_seg.3.weight"] == (32, 32, 3, 3, 3)
    assert shapes["conv_seg.6.weight"] == (2, 32, 1, 1, 1)
    assert "conv_seg.3.bias" not in shapes and "conv_seg.6.bias" not in shapes
    assert {"conv_seg.1.running_var", "conv_seg.4.weight"} <= set(shapes)


@pytest.mark.parametrize("layout", ["dilated", "strided"])
def test_segmentation_heads_return_input_size(layout):
    enc = med3d.create_encoder("resnet10", layout=layout, widths=[8, 16, 32, 64])
    x = torch.randn(2, 1, 35, 40, 47)  # odd sizes on purpose
    feats = enc(x)
    for kind in ("med3d", "unet"):
        y = build_head(kind, enc, num_classes=4)(feats, x.shape[2:])
        assert y.shape == (2, 4, 35, 40, 47)
    assert build_head("classification", enc, num_classes=5)(feats, x.shape[2:]).shape == (2, 5)


def test_unet_uses_transposed_convs_over_skips():
    enc = med3d.create_encoder("resnet18", layout="strided", widths=[8, 16, 32, 64])
    head = build_head("unet", enc, num_classes=2)
    ups = [type(m).__name__ for m in head.ups]
    assert ups == ["ConvTranspose3d"] * 4
    assert isinstance(head.final_up, torch.nn.ConvTranspose3d)


def test_multitask_runs_encoder_once_and_the_named_head():
    model = small_model().eval()
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 1, 32, 32, 32)
    assert model(x, task="liver").shape == (1, 3, 32, 32, 32)
    assert model(x, task="tumour").shape == (1, 2)
    assert len(calls) == 2


def test_heads_added_and_removed():
    model = small_model()
    model.add_head("spleen", build_head("med3d", model.encoder, num_classes=2))
    assert model.tasks == ["liver", "tumour", "spleen"]
    model.remove_head("liver")
    assert model.tasks == ["tumour", "spleen"]
    with pytest.raises(Med3DError, match="no head for task 'liver'"):
        model(torch.randn(1, 1, 16, 16, 16), task="liver")
    with pytest.raises(Med3DError, match="already has a head"):
        model.add_head("spleen", build_head("med3d", model.encoder, num_classes=2))


def test_head_option_mismatch_is_one_line():
    with pytest.raises(Med3DError, match="model.heads.x: classification head does not accept"):
        med3d.create_model({"model": {"encoder": {"arch": "resnet10"},
                                      "heads": {"x": {"type": "classification", "channels": 8}}}})


def test_multitask_model_without_heads_is_allowed():
    model = MultiTaskModel(med3d.create_encoder("resnet10"))
    assert model.tasks == []
