"""DDP plumbing for runs launched by ``torchrun`` (env:// rendezvous); a plain run is world size 1.

Every collective here works on tensors on the rank's own device: NCCL refuses CPU tensors, so
a CPU tensor would only fail on the GPU path that CPU tests never walk.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

from ..errors import Med3DError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800  # a collective waiting longer than this means a rank died or hangs


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # in a process group: DDP wrapping and collectives, even with one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group torchrun set up (nccl on GPU, gloo on CPU); nothing to do without torchrun.

    A torchrun job with a single process joins a group too, so one GPU runs the real DDP wrapping
    and NCCL collectives (``tools/gpu_check.sh`` relies on it); SyncBN is converted but, with one
    rank, synchronises nothing.

    Args:
        timeout_s: how long a collective may wait for the other ranks before the job fails.

    Returns:
        Rank, world size, local rank and the device this rank computes on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, device, distributed=launched)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (on NCCL, on this rank's GPU)."""
    if info.distributed:
        dist.barrier(device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def mean_across(info: DistInfo, value: float) -> float:
    """Average a scalar over ranks; every rank gets the result."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def gather_objects(info: DistInfo, obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order, on every rank (pickled through tensors on this rank's device)."""
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main_decides(info: DistInfo, action: Callable[[], T]) -> Optional[T]:
    """Run ``action`` on rank 0 only; when it refuses, every rank raises the same one-line error.

    For what must happen once per job (the run folder's lock, clearing an old run): rank 0 acts, and
    the others learn its outcome instead of waiting for it in a later collective until the timeout.

    Args:
        info: this process's place in the job.
        action: what rank 0 does.

    Returns:
        ``action``'s result on rank 0, None on the other ranks.

    Raises:
        Med3DError: ``action`` raised it on rank 0 (on every rank, with rank 0's message).
    """
    result, failure = None, None
    if info.is_main:
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised as it was
            failure = err
    refusal = gather_objects(info, None if failure is None else str(failure))[0]
    if failure is not None:
        raise failure
    if refusal is not None:
        raise Med3DError(refusal)
    return result


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
