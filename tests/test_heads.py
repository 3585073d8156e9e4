import pytest
import torch

import med3d
from med3d import Med3DError
from med3d.api import check_patch_size, size_divisibility
from med3d.config import from_dict, to_dict
from med3d.models import MultiTaskModel, build_head, build_heads


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
    with pytest.raises(Med3DError, match=r"^unknown config key 'model.heads.x.channels': a classification head "
                                         r"does not take it \(only med3d, unet, restore heads do\); "
                                         r"it takes: type, num_classes, dropout$"):
        med3d.create_model({"model": {"encoder": {"arch": "resnet10"},
                                      "heads": {"x": {"type": "classification", "channels": 8}}}})
    with pytest.raises(Med3DError, match="unknown config key 'model.heads.x.dropuot'; valid keys here: type, "
                                         "num_classes, channels"):
        med3d.create_model({"model": {"heads": {"x": {"type": "med3d", "dropuot": 0.1}}}})
    enc = med3d.create_encoder("resnet10", widths=[8, 16, 32, 64])
    with pytest.raises(Med3DError, match="model.heads.x.channels: a classification head takes no 'channels'"):
        build_heads(enc, {"x": {"type": "classification", "num_classes": 2, "channels": 8}})


def test_old_checkpoint_head_configs_with_nulls_still_load():
    # configs before 0.2 wrote every head option, null where unused
    cfg = from_dict({"model": {"heads": {"a": {"type": "med3d", "num_classes": 2, "channels": None, "dropout": None},
                                         "b": {"type": "classification", "num_classes": 3, "channels": None,
                                               "dropout": None}}}})
    assert to_dict(cfg)["model"]["heads"] == {"a": {"type": "med3d", "num_classes": 2, "channels": 32},
                                              "b": {"type": "classification", "num_classes": 3, "dropout": 0.0}}


@pytest.mark.parametrize("layout,heads,div", [
    ("dilated", ["med3d"], (8, 8, 8)),
    ("strided", ["unet"], (32, 32, 32)),
    ("strided", ["classification"], (1, 1, 1)),  # global pooling takes any size
    ("strided", ["classification", "med3d"], (32, 32, 32)),
])
def test_model_size_divisibility_combines_heads(layout, heads, div):
    model = med3d.create_model({"model": {"encoder": {"arch": "resnet10", "layout": layout, "widths": [8, 16, 32, 64]},
                                          "heads": {f"t{i}": {"type": h} for i, h in enumerate(heads)}}})
    assert model.size_divisibility == div
    assert size_divisibility(to_dict(from_dict({"model": {"encoder": dict(model.encoder.config),
                                                          "heads": {f"t{i}": {"type": h}
                                                                    for i, h in enumerate(heads)}}}))) == div


def test_check_patch_size_names_the_key_and_nearest_sizes():
    cfg = from_dict({"model": {"encoder": {"arch": "resnet50", "layout": "strided", "conv": "slicewise"},
                               "heads": {"t": {"type": "unet"}}}})
    check_patch_size(cfg, [7, 160, 128])  # slice-wise: any depth
    with pytest.raises(Med3DError, match=r"^data.patch_size \[37, 45, 51\] does not fit the model: each axis "
                                         r"\(z, y, x\) must be a multiple of \[1, 32, 32\] .*nearest valid "
                                         r"\[37, 32, 64\] \(down \[37, 32, 32\], up \[37, 64, 64\]\)$"):
        check_patch_size(cfg, [37, 45, 51])
    model = small_model()
    check_patch_size(model, [16, 32, 40])
    with pytest.raises(Med3DError, match=r"multiple of \[8, 8, 8\]"):
        check_patch_size(model, [16, 32, 36])


@pytest.mark.parametrize("layout,kind", [("strided", "unet"), ("dilated", "med3d"), ("dilated", "unet")])
def test_odd_sizes_are_padded_to_the_divisibility_and_cropped(layout, kind):
    torch.manual_seed(0)
    model = med3d.create_model({"model": {"encoder": {"arch": "resnet10", "layout": layout, "widths": [8, 16, 32, 64]},
                                          "heads": {"t": {"type": kind}}}}).eval()
    x = torch.randn(1, 1, 19, 27, 35)  # no axis a multiple of 8: every axis is padded
    div = model.size_divisibility
    padded = torch.nn.functional.pad(x, [p for s, d in zip(reversed(x.shape[2:]), reversed(div))
                                         for p in (0, -s % d)])
    assert all(s % d == 0 for s, d in zip(padded.shape[2:], div))
    with torch.no_grad():
        out = model(x)
        ref = model.heads["t"](model.encoder(padded), padded.shape[2:])[:, :, :19, :27, :35]
    assert out.shape == (1, 2, 19, 27, 35)
    torch.testing.assert_close(out, ref)


def test_multitask_model_without_heads_is_allowed():
    model = MultiTaskModel(med3d.create_encoder("resnet10"))
    assert model.tasks == []


@pytest.mark.parametrize("shape, size", [((2, 3, 4, 5, 6), (8, 20, 24)),  # factors 2, 4, 4
                                         ((1, 2, 3, 7, 1), (3, 14, 4)),  # 1, 2 and 4 (an axis of one voxel)
                                         ((1, 1, 2, 3, 4), (16, 24, 32))])  # 8 per axis
def test_axis_by_axis_upsampling_equals_trilinear_interpolate(shape, size):
    """Whole factors per axis give F.interpolate's trilinear values, and its gradient, to float rounding."""
    import torch.nn.functional as F

    from med3d.models.upsample import upsample_trilinear

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    got = upsample_trilinear(x, size)
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    (ref_grad,), (got_grad,) = torch.autograd.grad(ref, x, g), torch.autograd.grad(got, x, g)
    assert torch.allclose(got_grad, ref_grad, rtol=0, atol=1e-12)


def test_upsampling_by_other_ratios_and_low_precision_is_interpolate():
    """Fractions and shrinking go to F.interpolate; the dtype is kept (bf16 under autocast stays bf16)."""
    import torch.nn.functional as F

    from med3d.models.upsample import upsample_trilinear

    x = torch.randn(1, 2, 4, 6, 8)
    for size in ((6, 9, 12), (2, 3, 4), (8, 12, 12)):  # 1.5x; a half; 2, 2 and 1.5
        assert torch.equal(upsample_trilinear(x, size), F.interpolate(x, size=size, mode="trilinear"))
    for half in (torch.bfloat16, torch.float16):  # interpolated in float32 and rounded once, as ATen does
        low = upsample_trilinear(x.to(half), (8, 12, 16))
        aten = F.interpolate(x.to(half), size=(8, 12, 16), mode="trilinear")
        assert low.dtype == half and torch.equal(low, aten)
