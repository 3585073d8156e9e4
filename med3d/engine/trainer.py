"""The training loop shared by ``med3d pretrain`` and ``med3d finetune``.

Read top to bottom: set up (distributed, data, model, weights, optimizer), optionally resume,
then for each step draw ``accumulate`` micro-batches of one task, run them under autocast,
step the optimizer, and every so often log, validate and checkpoint. Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from ..api import create_model
from ..config import Config, from_dict, save_resolved
from ..data.sampler import MixSchedule, PatchBatches, make_loader
from ..errors import Med3DError
from ..io import write_json_atomic
from ..models.multitask import MultiTaskModel
from ..transfer.init import init_state_dict
from ..transfer.load import load_pretrained
from .data import check_tasks, setup_data
from .distributed import DistInfo, cleanup, init_distributed, mean_across
from .logger import RunLogger, plot_curves
from .losses import SegLoss
from .optim import build_optimizer, build_scheduler, check_stages, keep_frozen_bn_eval, set_frozen
from .state import load_training, prune, save_training, set_rng_state
from .validate import validate

log = logging.getLogger("med3d.train")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def preflight(cfg: Config, job: str) -> None:
    """Config checks that need no data: fail before any preparation or training starts."""
    check_tasks(cfg)
    t = cfg.train
    if t.batch_size < 1 or t.accumulate < 1 or t.iterations < 1:
        raise Med3DError("train.batch_size, train.accumulate and train.iterations must be at least 1")
    if len(cfg.data.patch_size) != 3 or min(cfg.data.patch_size) < 8:
        raise Med3DError(f"data.patch_size must be three sizes of at least 8 voxels, got {cfg.data.patch_size}")
    if not 0.0 <= cfg.data.foreground_share <= 1.0:
        raise Med3DError(f"data.foreground_share must be between 0 and 1, got {cfg.data.foreground_share}")
    if job == "finetune" and cfg.finetune.weights and not Path(cfg.finetune.weights).is_file():
        raise Med3DError(f"finetune.weights: {cfg.finetune.weights} not found; point it at an encoder export, "
                         "a med3d checkpoint or MedicalNet/MONAI/torchvision weights")
    check_stages(cfg.finetune.freeze)


def init_from_weights(model: MultiTaskModel, cfg: Config) -> str:
    """Initialise the encoder from ``finetune.weights`` under ``finetune.init``; returns the load report."""
    ft = cfg.finetune
    if ft.init == "full":
        return str(load_pretrained(model, ft.weights, ft.source))
    donor = copy.deepcopy(model.encoder)
    report = load_pretrained(donor, ft.weights, ft.source)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    chosen = init_state_dict(ft.init, donor.state_dict(), ft.first_k, gen)
    model.encoder.load_state_dict(chosen, strict=False)
    kept = len(chosen)
    return f"{report}\n  init '{ft.init}': {kept} of {len(donor.state_dict())} encoder tensors taken from the file"


def _split_batch(cfg: Config, info: DistInfo) -> int:
    micro = cfg.train.batch_size / (info.world * cfg.train.accumulate)
    if micro != int(micro):
        raise Med3DError(f"train.batch_size {cfg.train.batch_size} does not split into {info.world} rank(s) x "
                         f"{cfg.train.accumulate} accumulation step(s)")
    return int(micro)


def _wrap(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Each step trains one task's head, so the other heads get no gradient: find_unused_parameters.
    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
               find_unused_parameters=True)


def train(cfg: Config, job: str = "pretrain", resume: Optional[str] = None, progress: bool = True,
          tensorboard: bool = True) -> Dict[str, Any]:
    """Run a training job; returns the summary (best metric, time, throughput, validation history)."""
    info = init_distributed()
    try:
        return _train(cfg, job, resume, progress, tensorboard, info)
    finally:
        cleanup(info)


def _train(cfg: Config, job: str, resume: Optional[str], progress: bool, tensorboard: bool,
           info: DistInfo) -> Dict[str, Any]:
    state = None
    if resume:
        state = load_training(Path(resume))
        cfg = from_dict(state["config"])  # the run continues under the config it started with
    preflight(cfg, job)
    out = Path(cfg.run.out_dir)
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    micro = _split_batch(cfg, info)

    setup = setup_data(cfg, info, progress=progress and info.is_main)
    cfg = replace(cfg, model=replace(cfg.model, adapters=setup.adapters))
    model = create_model(cfg)
    report = None
    if state is None and job == "finetune" and cfg.finetune.weights and cfg.finetune.init != "scratch":
        report = init_from_weights(model, cfg)
    if cfg.train.sync_bn and info.world > 1 and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    amp = AMP_DTYPES[cfg.train.amp]
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp == "fp16")
    start, best = 0, {"metric": None, "iteration": None}
    if state is not None:
        model.load_state_dict(state["model"])
        ts = state["train_state"]
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        if ts["scaler"]:
            scaler.load_state_dict(ts["scaler"])
        set_rng_state(ts["rng"])
        start, best = int(ts["sampler"]["next_step"]), ts["best"]

    meta = {"job": job, "tasks": list(cfg.data.datasets), "plans": setup.plans, "patch_size": cfg.data.patch_size,
            "in_channels": cfg.model.encoder.in_channels}
    logger = RunLogger(out, enabled=info.is_main, tensorboard=tensorboard)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
        write_json_atomic(out / "plans.json", setup.plans)
        if report:
            (out / "load_report.txt").write_text(report + "\n")  # load_pretrained has logged it

    freeze = list(cfg.finetune.freeze) if job == "finetune" else []
    unfreeze_at = cfg.finetune.unfreeze_at
    frozen = bool(freeze) and (unfreeze_at is None or start < unfreeze_at)
    if frozen:
        set_frozen(model, freeze, True)
    net = _wrap(model, cfg, info)
    forward = torch.compile(net) if cfg.train.compile else net

    tasks = [t.name for t in setup.tasks]
    schedule = MixSchedule(tasks, [len(t.cases) for t in setup.tasks], cfg.data.mixing, cfg.data.temperature,
                           cfg.run.seed)
    dataset = PatchBatches(setup.tasks, schedule, cfg.data.patch_size, micro, cfg.data.foreground_share,
                           cfg.data.augment, cfg.run.seed)
    weights = {t.name: t.loss_weight for t in setup.tasks}
    cuda = info.device.type == "cuda"
    loader = make_loader(dataset, start, cfg.train.iterations, info.rank, info.world, cfg.train.accumulate,
                         cfg.data.workers, pin_memory=cfg.data.pin_memory and cuda,
                         persistent_workers=cfg.data.persistent_workers)
    loss_fn = SegLoss(cfg.train.loss, cfg.train.ignore_label)
    history: List[Dict[str, Any]] = []

    def run_validation(step: int) -> Dict[str, Any]:
        res = validate(model, setup.val, setup.plans, setup.channels, cfg.data.patch_size, cfg.validation, info, amp)
        rec = {"kind": "val", "iteration": step, **res}
        history.append({"iteration": step, "mean_dice": res["mean_dice"],
                        **{t: e["mean_dice"] for t, e in res["tasks"].items()}})
        logger.log(rec)
        metric = res["mean_dice"]
        if info.is_main and np.isfinite(metric) and (best["metric"] is None or metric > best["metric"]):
            best.update(metric=metric, iteration=step)
            save_training(ckpt_dir / "best.pt", model, cfg, meta, step, opt, sched, scaler, best)
        return res

    def checkpoint(step: int) -> None:
        if not info.is_main:
            return
        path = save_training(ckpt_dir / f"iter_{step:06d}.pt", model, cfg, meta, step, opt, sched, scaler, best)
        tmp = ckpt_dir / ".last.pt.tmp"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)  # a second name for the same complete file, moved into place atomically
        os.replace(tmp, ckpt_dir / "last.pt")
        prune(ckpt_dir, cfg.train.keep_last)

    from tqdm import tqdm

    bar = tqdm(range(start, cfg.train.iterations), initial=start, total=cfg.train.iterations, desc=job,
               disable=not (progress and info.is_main), unit="it", dynamic_ncols=True)
    batches = iter(loader)
    model.train()
    if frozen:
        keep_frozen_bn_eval(model, freeze)
    t0, window, seen, last_val = time.perf_counter(), [], 0, None
    for step in bar:
        if frozen and unfreeze_at is not None and step >= unfreeze_at:
            set_frozen(model, freeze, False)
            frozen = False
            net = _wrap(model, cfg, info)  # DDP must see the released parameters
            forward = torch.compile(net) if cfg.train.compile else net
        opt.zero_grad(set_to_none=True)
        step_loss, task = 0.0, ""
        for a in range(cfg.train.accumulate):
            batch = next(batches)
            task = batch["task"]
            x = batch["image"].to(info.device, non_blocking=True)
            y = batch["label"].to(info.device, non_blocking=True)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            sync = contextlib.nullcontext()
            if info.world > 1 and a < cfg.train.accumulate - 1:
                sync = net.no_sync()
            with sync:
                with torch.autocast(info.device.type, dtype=amp, enabled=amp is not None):
                    logits = forward(x, task)
                loss = loss_fn(logits, y) * weights[task] / cfg.train.accumulate
                scaler.scale(loss).backward()
            step_loss += float(loss.detach())
        if not np.isfinite(step_loss):
            raise Med3DError(f"loss became {step_loss} at iteration {step} (task {task}); lower train.lr or use "
                             "amp bf16 instead of fp16")
        if cfg.train.clip_grad:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                           cfg.train.clip_grad)
        scaler.step(opt)
        scaler.update()
        sched.step()
        seen += cfg.train.batch_size
        window.append(step_loss)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.iterations:
            loss_mean = mean_across(info, float(np.mean(window)))
            rate = seen / (time.perf_counter() - t0)
            lr = opt.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            logger.log({"kind": "train", "iteration": done, "loss": loss_mean, "lr": lr, "samples_per_s": rate,
                        "task": task})
            window = []
        if cfg.validation.every and done % cfg.validation.every == 0 and done < cfg.train.iterations:
            last_val = run_validation(done)
        if done % cfg.train.checkpoint_every == 0 and done < cfg.train.iterations:
            checkpoint(done)
    bar.close()
    elapsed = time.perf_counter() - t0
    final = run_validation(cfg.train.iterations) if start < cfg.train.iterations or last_val is None else last_val
    checkpoint(cfg.train.iterations)
    summary = {"job": job, "iterations": cfg.train.iterations, "resumed_from": start or None,
               "seconds": elapsed, "samples_per_s": seen / max(elapsed, 1e-9), "best": best,
               "final": final, "history": history, "device": str(info.device), "world_size": info.world}
    if info.is_main:
        write_json_atomic(out / "summary.json", summary)
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    logger.close()
    return summary


def describe(summary: Dict[str, Any]) -> str:
    """The end-of-run lines printed by the CLI."""
    best = summary["best"]
    lines = [f"{summary['job']}: {summary['iterations']} iterations in {summary['seconds']:.1f} s "
             f"({summary['samples_per_s']:.1f} samples/s on {summary['device']} x{summary['world_size']})",
             f"final mean Dice {summary['final']['mean_dice']:.3f}"
             + (f"; best {best['metric']:.3f} at iteration {best['iteration']}" if best["metric"] is not None else "")]
    for task, entry in summary["final"]["tasks"].items():
        per = ", ".join(f"{k} {v:.3f}" for k, v in entry["dice"].items())
        lines.append(f"  {task}: Dice {per}")
    return "\n".join(lines)
