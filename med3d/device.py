"""The compute device a command runs on, checked where the user names it; PyTorch's CPU threads for a block."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .errors import Med3DError


def resolve_device(device: Optional[str]) -> torch.device:
    """``--device`` (cpu, cuda or cuda:N) as a torch device; CUDA only where this machine has it.

    Args:
        device: the user's value; None picks CUDA when available, else the CPU.

    Returns:
        The device.

    Raises:
        Med3DError: an unknown device, or CUDA (or a GPU index) this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise Med3DError(f"--device {device}: unknown; use cpu or cuda")
    cuda_ok = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not cuda_ok):
        raise Med3DError(f"--device {device}: not available here; use cpu" + (" or cuda" if torch.cuda.is_available()
                                                                               else ""))
    return dev


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op CPU threads set to ``n`` for the block, then given back as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
