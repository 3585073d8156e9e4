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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stacks(stderr: str) -> str:
    """A rank's stderr without faulthandler's list of loaded extension modules, which would hide the stacks."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("Extension modules:"))


def launch_ranks(argv, world: int, timeout: float = 240.0):
    """Run ``python -m <argv>`` as ``world`` ranks joined the way torchrun joins them (env://).

    The ranks are started directly rather than through torchrun's agent: the agent's rendezvous
    looks up the host's fully qualified name, which can stall where name lookups have no server.
    Everything is pinned to the loopback (MASTER_ADDR, GLOO_SOCKET_IFNAME). On a hang every rank
    gets SIGABRT, so Python's faulthandler prints where each one waits.

    Returns:
        (return codes, stdout, stderr) of the ranks in rank order.

    Raises:
        AssertionError: the ranks did not all finish within ``timeout`` s (with their stacks).
    """
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(world)]
    procs = [subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", *argv], stdin=subprocess.DEVNULL,
                              stdout=out, stderr=err, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r, (out, err) in enumerate(logs)]
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
        p.send_signal(signal.SIGABRT)
    for p in procs:
        p.wait()
    texts = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
    assert not hung, "ranks hung; their stacks:\n" + "\n".join(f"--- rank {r}\n{_stacks(e)[-6000:]}"
                                                               for r, (_, e) in enumerate(texts))
    return [p.returncode for p in procs], [t[0] for t in texts], [t[1] for t in texts]


def kill_after_checkpoint(argv, checkpoints, iteration: int, timeout: float = 120.0) -> None:
    """Run ``python -m <argv>`` and SIGKILL it once ``checkpoints`` holds ``iter_N.pt`` with N >= ``iteration``.

    The kill lands wherever the run is by then (often mid-step or mid-save), as a crash or a scheduler would.
    """
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not any(int(p.stem[5:]) >= iteration for p in Path(checkpoints).glob("iter_*.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
