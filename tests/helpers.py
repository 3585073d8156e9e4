"""Reference code shared by tests."""
import torch


def monai_stage_features(net, x: torch.Tensor):
    """Stem and layer1..layer4 outputs of a MONAI ResNet (2D or 3D), the reference for med3d's encoder."""
    y = net.act(net.bn1(net.conv1(x)))
    feats = [y]
    y = net.maxpool(y)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        y = layer(y)
        feats.append(y)
    return feats
