"""Every GPU path of the engine, run once on one GPU in a few minutes; prints one table.

Checks: training in float32, bf16 and fp16 (compute dtype asserted), channels_last_3d and
torch.compile; a one-process torchrun job over NCCL, which walks DDP wrapping (gradient
all-reduce), SyncBatchNorm conversion (with one rank it synchronises nothing) and every collective
the engine uses (all_reduce, all_gather_object, barrier) with real NCCL, so a CPU tensor in a
collective fails here; the sliding window's host-memory fallbacks against its GPU blend; and
``med3d bench train`` / ``infer`` on CUDA.
Run through ``tools/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Tuple

import torch
import yaml

Row = Tuple[str, str, float, str]


def tiny_config(root: Path, out: Path, **train) -> dict:
    """A 6-iteration spleen run on generated data, validated at 3 and 6."""
    return {
        "model": {"encoder": {"arch": "resnet10", "widths": [16, 32, 64, 128]},
                  "heads": {"Task09_SpleenDemo": {"type": "med3d", "num_classes": 2}}},
        "data": {"datasets": {"Task09_SpleenDemo": {"path": str(root / "Task09_SpleenDemo")}},
                 "cache_dir": str(root / "cache"), "patch_size": [32, 64, 64], "workers": 2, "val_fraction": 0.34},
        "run": {"out_dir": str(out), "seed": 0},
        "train": {"iterations": 6, "batch_size": 2, "checkpoint_every": 6, "log_every": 1, "lr": 0.002,
                  "optimizer": "adamw", **train},
        "validation": {"every": 3, "hd95": False},
    }


def train_variant(root: Path, name: str, **train) -> str:
    from med3d.config import from_dict
    from med3d.engine.trainer import Trainer

    trainer = Trainer(from_dict(tiny_config(root, root / name, **train)), "pretrain", progress=False)
    seen: List[torch.dtype] = []
    trainer.setup()
    trainer.model.encoder.layer2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for step in trainer.steps():
        trainer.after_step(trainer.train_step(step))
    summary = trainer.end()
    trainer.close()
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.get("amp", "none"), torch.float32)
    if seen[0] != want:
        raise RuntimeError(f"computed in {seen[0]}, expected {want}")
    return f"dtype {seen[0]}, final Dice {summary['final']['mean_dice']:.3f}, {summary['samples_per_s']:.1f} samples/s"


def torchrun_job(root: Path) -> str:
    cfg = root / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(root, root / "ddp", sync_bn=True, amp="bf16")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "med3d.cli", "pretrain", str(cfg), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1])
    return "DDP + SyncBN + NCCL reductions: " + r.stdout.strip().splitlines()[0]


def collectives() -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           "--collectives-only"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1])
    return r.stdout.strip().splitlines()[-1]


def run_collectives() -> None:
    """Inside torchrun: every collective of med3d.engine.distributed on an NCCL group."""
    from med3d.engine.distributed import barrier, cleanup, gather_objects, init_distributed, mean_across

    info = init_distributed()
    backend = torch.distributed.get_backend()
    value = mean_across(info, 2.5)
    gathered = gather_objects(info, {"rank": info.rank})
    barrier(info)
    cleanup(info)
    print(f"{backend}: mean_across {value}, gather_objects {gathered}, barrier ok")


def bench(what: str) -> str:
    from med3d import bench as b

    if what == "train":
        rows = b.train_bench(iterations=10, device="cuda")
        return f"bf16/fp32 {rows[1]['it_per_s'] / rows[0]['it_per_s']:.2f}x ({rows[0]['it_per_s']:.1f} it/s fp32)"
    times = b.infer_bench(device="cuda")
    return (f"med3d/monai {times['med3d'] / times['monai']:.2f} ({times['med3d']:.2f} s/case), beside the network "
            f"{times['med3d_beside'] / times['monai_beside']:.2f}")


def host_stitching() -> str:
    """The sliding window's fallbacks against its GPU blend: no room for the blend, and out of memory in the loop."""
    from med3d.inference import window

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1).cuda().eval()
    x = torch.randn(1, 1, 40, 70, 90, device="cuda")
    calls = []

    def once_out_of_memory(t, task):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return conv(t)

    on_gpu = window.sliding_window(lambda t, task: conv(t), x, "t", (32, 64, 64), 0.5, 2)
    after_oom = window.sliding_window(once_out_of_memory, x, "t", (32, 64, 64), 0.5, 2)
    keep = window.room_for_blend
    window.room_for_blend = lambda *args, **kw: False
    try:
        no_room = window.sliding_window(lambda t, task: conv(t), x, "t", (32, 64, 64), 0.5, 2)
    finally:
        window.room_for_blend = keep
    diffs = [float((on_gpu.cpu() - other.cpu()).abs().max()) for other in (after_oom, no_room)]
    devices = [t.device.type for t in (on_gpu, after_oom, no_room)]
    if devices != ["cuda", "cpu", "cpu"] or max(diffs) > 1e-5:
        raise AssertionError(f"devices {devices}, max diffs {diffs}")
    return f"max |host - GPU| {max(diffs):.1e} (no room, out of memory)"


def timed(name: str, fn: Callable[[], str]) -> Row:
    t0 = time.perf_counter()
    try:
        detail = fn()
        return name, "ok", time.perf_counter() - t0, detail
    except Exception as err:  # noqa: BLE001 - a check that fails is a row, not the end of the table
        traceback.print_exc()
        return name, "FAILED", time.perf_counter() - t0, f"{type(err).__name__}: {str(err)[:160]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collectives-only", action="store_true", help=argparse.SUPPRESS)
    if parser.parse_args().collectives_only:
        run_collectives()
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run this on a machine with a GPU", file=sys.stderr)
        return 2
    from med3d.data.demo import write_demo_data

    root = Path(tempfile.mkdtemp(prefix="med3d-gpu-"))
    write_demo_data(root, seed=0, n_train=3, n_test=0, tasks=["Task09_SpleenDemo"], show_progress=False)
    rows = [
        timed("train fp32", lambda: train_variant(root, "fp32")),
        timed("train bf16", lambda: train_variant(root, "bf16", amp="bf16")),
        timed("train fp16 (GradScaler)", lambda: train_variant(root, "fp16", amp="fp16")),
        timed("train channels_last_3d", lambda: train_variant(root, "cl", channels_last=True, amp="bf16")),
        timed("train torch.compile", lambda: train_variant(root, "compile", compile=True, amp="bf16")),
        timed("NCCL collectives", collectives),
        timed("torchrun DDP + SyncBN", lambda: torchrun_job(root)),
        timed("bench train --device cuda", lambda: bench("train")),
        timed("sliding window, host blend", host_stitching),
        timed("bench infer --device cuda", lambda: bench("infer")),
    ]
    print(f"\nmed3d GPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"| {'check':<26} | {'result':<6} | {'s':>6} | detail |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|--------|")
    for name, result, seconds, detail in rows:
        print(f"| {name:<26} | {result:<6} | {seconds:>6.1f} | {detail} |")
    return 1 if any(r[1] != "ok" for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    sys.exit(main())
