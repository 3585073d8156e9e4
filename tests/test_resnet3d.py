from typing import List

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets

import med3d
from med3d import Med3DError
from med3d.models.resnet3d import DEPTHS
from med3d.registry import ENCODERS

from helpers import monai_stage_features

# MedicalNet's published encoder sizes (millions of parameters)
MEDICALNET_PARAMS = {10: 14.36, 18: 32.99, 34: 63.30, 50: 46.16, 101: 85.20, 152: 117.36, 200: 126.56}


def n_params(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_parameter_counts_match_medicalnet(depth):
    assert abs(n_params(med3d.create_encoder(f"resnet{depth}")) - MEDICALNET_PARAMS[depth]) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_strided_encoder_equals_monai_resnet(depth):
    torch.manual_seed(depth)
    ours = med3d.create_encoder(f"resnet{depth}", layout="strided").eval()
    shortcut = ours.config["shortcut"]
    ref = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False, conv1_t_stride=2,
                                          shortcut_type=shortcut, bias_downsample=False).eval()
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in sd_ours.items()} == {k: v.shape for k, v in sd_ref.items()}
    ours.load_state_dict(sd_ref, strict=True)  # MONAI -> med3d
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours(x), monai_stage_features(ref, x)):
            torch.testing.assert_close(a, b)
    ref2 = getattr(nets, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False, conv1_t_stride=2,
                                           shortcut_type=shortcut, bias_downsample=False).eval()
    ref2.load_state_dict(ours.state_dict(), strict=True)  # med3d -> MONAI
    with torch.no_grad():
        torch.testing.assert_close(ref2(x), ref(x))


def test_medicalnet_names():
    keys = set(med3d.create_encoder("resnet50").state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.weight", "layer4.2.bn3.bias"]:
        assert k in keys
    assert not any("downsample" in k for k in med3d.create_encoder("resnet18").state_dict())


def test_shortcut_a_adds_no_parameters():
    # at 1/8 width: which parameters a shortcut adds does not depend on the width, the build time does
    a = med3d.create_encoder("resnet34", shortcut="A", widths=[8, 16, 32, 64])
    b = med3d.create_encoder("resnet34", shortcut="B", widths=[8, 16, 32, 64])
    assert not any("downsample" in k for k in a.state_dict())
    extra = sum(p.numel() for k, p in b.named_parameters() if "downsample" in k)
    assert extra > 0 and abs(n_params(b) - n_params(a) - extra / 1e6) < 1e-9


@pytest.mark.parametrize("layout,strides", [
    ("dilated", [2, 4, 8, 8, 8]),
    ("strided", [2, 4, 8, 16, 32]),
])
def test_feature_shapes_and_strides(layout, strides):
    enc = med3d.create_encoder("resnet50", in_channels=3, layout=layout)
    assert [f.stride for f in enc.feature_info] == [(s, s, s) for s in strides]
    assert [f.channels for f in enc.feature_info] == [64, 256, 512, 1024, 2048]
    x = torch.randn(1, 3, 32, 32, 32)  # the smallest size every stride divides
    with torch.no_grad():
        feats = enc.eval()(x)
    for f, info in zip(feats, enc.feature_info):
        assert f.shape[1] == info.channels
        assert tuple(f.shape[2:]) == tuple(32 // s for s in info.stride)


def test_1x3x3_identical_slices_give_identical_feature_slices():
    torch.manual_seed(0)
    enc = med3d.create_encoder("resnet18", conv="slicewise", layout="strided").eval()
    assert enc.conv1.weight.shape[2:] == (1, 7, 7)
    assert all(f.stride[0] == 1 for f in enc.feature_info)
    x = torch.randn(1, 1, 1, 48, 48).repeat(1, 1, 6, 1, 1)
    with torch.no_grad():
        for f in enc(x):
            assert f.shape[2] == 6
            torch.testing.assert_close(f, f[:, :, :1].expand_as(f))


def test_any_number_of_channels_and_stem_options():
    enc = med3d.create_encoder("resnet10", in_channels=5, stem_kernel=[3, 7, 7], stem_stride=[1, 2, 2])
    assert enc.conv1.weight.shape == (64, 5, 3, 7, 7)
    assert enc.feature_info[0].stride == (1, 2, 2)
    out = enc(torch.randn(1, 5, 8, 32, 32))
    assert out[-1].shape[2:] == (2, 4, 4)


def test_bad_arch_and_channels():
    with pytest.raises(Med3DError, match="unknown encoder 'resnet19'"):
        med3d.create_encoder("resnet19")
    enc = med3d.create_encoder("resnet10", in_channels=2)
    with pytest.raises(Med3DError, match="1 channel.*expects 2"):
        enc(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(Med3DError, match=r"expects \(N, C, D, H, W\)"):
        enc(torch.randn(2, 16, 16, 16))


# ------------------------------------------------------------------ dilated layout against an independent reference
# Med3D's dilated layout written out from MedicalNet's description, not from med3d's code:
# (stride, dilation) of layer1..layer4; the stem is a 7x7x7 conv with stride 2 and a 3x3x3 max-pool with stride 2.
MEDICALNET_DILATED = [(1, 1), (2, 1), (1, 2), (1, 4)]


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=1e-5)


def _conv(x, w, stride=1, dilation=1):
    # padding (k // 2) * dilation keeps the size at stride 1 for odd kernels
    return F.conv3d(x, w, stride=stride, padding=tuple(k // 2 * dilation for k in w.shape[2:]), dilation=dilation)


def _reference_block(x, sd, p, stride, dilation):
    if f"{p}.conv3.weight" in sd:  # bottleneck: 1x1x1, 3x3x3 (strided, dilated), 1x1x1
        y = F.relu(_bn(_conv(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
        y = F.relu(_bn(_conv(y, sd[f"{p}.conv2.weight"], stride, dilation), sd, f"{p}.bn2"))
        y = _bn(_conv(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
    else:  # basic: two 3x3x3, the first strided, both dilated
        y = F.relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], stride, dilation), sd, f"{p}.bn1"))
        y = _bn(_conv(y, sd[f"{p}.conv2.weight"], 1, dilation), sd, f"{p}.bn2")
    if f"{p}.downsample.0.weight" in sd:  # shortcut B: strided 1x1x1 conv + BN
        identity = _bn(F.conv3d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
    else:  # shortcut A: strided identity, missing channels zero
        identity = x[:, :, ::stride, ::stride, ::stride]
        identity = F.pad(identity, (0, 0, 0, 0, 0, 0, 0, y.shape[1] - identity.shape[1]))
    return F.relu(y + identity)


def reference_dilated_features(sd, blocks, x):
    y = F.relu(_bn(F.conv3d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    feats = [y]
    y = F.max_pool3d(y, 3, stride=2, padding=1)
    for i, ((stride, dilation), n) in enumerate(zip(MEDICALNET_DILATED, blocks)):
        for j in range(n):
            y = _reference_block(y, sd, f"layer{i + 1}.{j}", stride if j == 0 else 1, dilation)
        feats.append(y)
    return feats


@pytest.mark.parametrize("arch,widths", [("resnet18", [16, 32, 64, 128]), ("resnet50", [8, 16, 32, 64])])
def test_dilated_layout_equals_layerwise_reference(arch, widths, bn_randomizer):
    torch.manual_seed(0)
    enc = bn_randomizer(med3d.create_encoder(arch, layout="dilated", widths=widths)).double().eval()
    sd = enc.state_dict()
    x = torch.randn(1, 1, 21, 27, 30, dtype=torch.float64)  # no axis a multiple of 8
    with torch.no_grad():
        ours, ref = enc(x), reference_dilated_features(sd, DEPTHS[enc.depth][1], x)
    for a, b, info in zip(ours, ref, enc.feature_info):
        assert a.shape == b.shape, info.name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=info.name)


# ------------------------------------------------------------------ declared arguments, conv option, divisibility

def test_encoder_arguments_are_declared_by_the_builder():
    params = ENCODERS.params("resnet50")
    assert list(params) == ["in_channels", "layout", "conv", "shortcut", "stem_kernel", "stem_stride",
                            "downsample_bias", "widths"]
    assert params["layout"].default == "dilated" and params["widths"].type == List[int]
    enc = med3d.create_encoder("resnet50", widths=[8, 16, 32, 64])
    assert list(enc.config) == ["arch", *params]  # export metadata lists exactly the declared arguments
    assert med3d.api.encoder_from_config(enc.config).config == enc.config
    with pytest.raises(Med3DError, match="encoder 'resnet18' takes no argument 'layuot'; did you mean 'layout'"):
        med3d.create_encoder("resnet18", layuot="strided")


def test_old_kernel_argument_maps_to_conv():
    assert med3d.create_encoder("resnet18", kernel="1x3x3").config["conv"] == "slicewise"
    assert med3d.create_encoder("resnet18", kernel="3x3x3").config["conv"] == "3d"
    with pytest.raises(Med3DError, match="unknown conv '2d'"):
        med3d.create_encoder("resnet18", conv="2d")


@pytest.mark.parametrize("layout,conv,div", [
    ("dilated", "3d", (8, 8, 8)), ("strided", "3d", (32, 32, 32)), ("strided", "slicewise", (1, 32, 32)),
])
def test_encoder_size_divisibility(layout, conv, div):
    enc = med3d.create_encoder("resnet10", layout=layout, conv=conv, widths=[8, 16, 32, 64])
    assert enc.size_divisibility == div
    with torch.no_grad():  # at multiples of it every stage's grid is exactly size / stride
        feats = enc.eval()(torch.randn(1, 1, *(2 * d for d in div)))
    for f, info in zip(feats, enc.feature_info):
        assert tuple(f.shape[2:]) == tuple(2 * d // s for d, s in zip(div, info.stride))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))])
@pytest.mark.parametrize("shape", [(2, 4, 16, 32, 32), (1, 3, 7, 9, 11), (1, 1, 1, 1, 1), (1, 2, 2, 3, 5)])
def test_inference_max_pool_is_atens_to_the_bit(kernel, stride, padding, shape):
    from med3d.models.resnet3d import MaxPool3d

    ours, theirs = MaxPool3d(kernel, stride, padding), torch.nn.MaxPool3d(kernel, stride, padding)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[:: 5] = float("-inf")
    x.view(-1)[-1] = float("nan")  # propagated alike
    with torch.inference_mode():
        got, want = ours(x), theirs(x)
    assert got.shape == want.shape
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and torch.equal(got.isnan(), want.isnan())


def test_max_pool_keeps_atens_kernel_where_gradients_flow(monkeypatch):
    from med3d.models import resnet3d

    def refuse(*args):
        raise AssertionError("the axis-by-axis maximum ran with gradients enabled")

    pool = resnet3d.MaxPool3d(3, 2, 1)
    x = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    monkeypatch.setattr(resnet3d, "_max3_stride2", refuse)
    pool(x).sum().backward()  # training: ATen's kernel, with the indices backward needs
    assert x.grad is not None and float(x.grad.sum()) > 0
    with torch.no_grad(), pytest.raises(AssertionError, match="axis-by-axis"):
        pool(x)  # and without gradients, the axis-by-axis path (the helper above)
