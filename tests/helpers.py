"""Reference code shared by test modules (a support module: test modules never import each other)."""
import torch
from monai.networks import nets


def monai_stage_features(net, x: torch.Tensor):
    """Stem and layer1..layer4 outputs of a MONAI ResNet (2D or 3D), the reference for med3d's encoder."""
    y = net.act(net.bn1(net.conv1(x)))
    feats = [y]
    y = net.maxpool(y)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        y = layer(y)
        feats.append(y)
    return feats


def randomize_bn(module, seed=0):
    """Non-trivial BN statistics and affine weights, so that comparisons exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def monai_2d(depth_blocks, block="basic", seed=0):
    """A MONAI 2D ResNet (torchvision's keys) whose BN statistics are estimated on data, as a trained
    network's are, so activations stay near unit scale like ImageNet weights' do."""
    torch.manual_seed(seed)
    net = nets.ResNet(block=block, layers=depth_blocks, block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                      n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                      bias_downsample=False, num_classes=10)
    randomize_bn(net)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 64, 64))
    return net.eval()
