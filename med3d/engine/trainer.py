"""The training loop shared by ``med3d pretrain`` and ``med3d finetune``, as a ``Trainer`` object.

``Trainer.run`` reads top to bottom: set up, then per step release frozen stages when their time
comes, train one step, and log / validate / checkpoint at their intervals; then end. Each phase
is a method, so a variant overrides one of them (as nnU-Net's trainer variants do). The state
that changes while training lives in ``TrainState``; the rest is fixed at set-up. Only rank 0
writes files.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..api import check_patch_size, create_model
from ..config import Config, save_resolved
from ..data.sampler import MixSchedule, PatchBatches, make_loader
from ..data.splits import write_splits
from ..errors import Med3DError
from ..atomic import write_json_atomic, write_text_atomic
from ..models.multitask import MultiTaskModel
from ..tasks import kind_for_head, self_supervised_line
from ..tasks.segmentation import SegLoss
from ..transfer.policies import init_state_dict
from ..transfer.load import load_pretrained
from .checkpoints import load_training, prune, publish_last, save_training, set_rng_state
from .distributed import barrier, cleanup, init_distributed, main_decides, mean_across
from .logger import RunLogger, plot_curves, trim_metrics
from .optim import build_optimizer, build_scheduler, check_stages, set_frozen
from .resume import resume_config
from .runlock import claim_run_folder
from .task_data import DataSetup, check_split_keys, check_tasks, setup_data
from .validation import run_validation

log = logging.getLogger("med3d.train")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_kernels(amp: Optional[torch.dtype], device: torch.device) -> contextlib.AbstractContextManager:
    """The kernels a training step runs under.

    oneDNN's bf16 conv3d weight gradient on CPU (torch 2.13, oneDNN 3.12) returns garbage or NaN
    for inputs two voxels deep with 16 or more channels, which a 16-slice patch reaches at stride
    8; bf16 training on CPU therefore uses ATen's own kernels. Elsewhere nothing changes.
    """
    if amp == torch.bfloat16 and device.type == "cpu":
        return torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None)
    return contextlib.nullcontext()


def preflight(cfg: Config, job: str) -> None:
    """Config checks that need no data: fail before any preparation or training starts.

    Raises:
        Med3DError: naming the first key at fault.
    """
    check_tasks(cfg)
    check_split_keys(cfg)
    for task, head in cfg.model.heads.items():
        kind_for_head(head.type, f"model.heads.{task}.type")
    t = cfg.train
    if t.batch_size < 1 or t.accumulate < 1 or t.iterations < 1:
        raise Med3DError("train.batch_size, train.accumulate and train.iterations must be at least 1")
    if t.log_every < 1 or t.checkpoint_every < 1:
        raise Med3DError(f"train.log_every and train.checkpoint_every must be at least 1, got {t.log_every} "
                         f"and {t.checkpoint_every}")
    if len(cfg.data.patch_size) != 3 or min(cfg.data.patch_size) < 8:
        raise Med3DError(f"data.patch_size must be three sizes of at least 8 voxels, got {cfg.data.patch_size}")
    if not 0.0 <= cfg.data.foreground_share <= 1.0:
        raise Med3DError(f"data.foreground_share must be between 0 and 1, got {cfg.data.foreground_share}")
    if not 0.0 <= cfg.validation.overlap < 1.0:
        raise Med3DError(f"validation.overlap must be in [0, 1), got {cfg.validation.overlap}")
    if job == "finetune" and cfg.finetune.weights and not Path(cfg.finetune.weights).is_file():
        raise Med3DError(f"finetune.weights: {cfg.finetune.weights} not found; point it at an encoder export, "
                         "a med3d checkpoint or MedicalNet/MONAI/torchvision weights")
    check_stages(cfg.finetune.freeze)
    check_channel_map(cfg)
    check_class_loss(cfg)
    check_patch_size(cfg, cfg.data.patch_size)


def check_class_loss(cfg: Config) -> None:
    """``train.label_smoothing`` in [0, 1) (cross-entropy only) and one ``train.class_weights`` entry per class.

    Raises:
        Med3DError: naming the key.
    """
    t = cfg.train
    if not 0.0 <= t.label_smoothing < 1.0:
        raise Med3DError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if t.label_smoothing and t.cls_loss == "focal":
        raise Med3DError("train.label_smoothing applies to cls_loss 'ce' only; set it to 0 for focal loss")
    if t.class_weights is None:
        return
    if any(w < 0 for w in t.class_weights):
        raise Med3DError(f"train.class_weights must not be negative, got {t.class_weights}")
    for task, head in cfg.model.heads.items():
        if head.type == "classification" and len(t.class_weights) != head.num_classes:
            raise Med3DError(f"train.class_weights has {len(t.class_weights)} entries but model.heads.{task} has "
                             f"{head.num_classes} classes; give one weight per class")


def check_channel_map(cfg: Config) -> None:
    """``finetune.channel_map`` needs weights to map and one entry per model input channel.

    Raises:
        Med3DError: either is not so.
    """
    cmap, want = cfg.finetune.channel_map, cfg.model.encoder.in_channels
    if cmap is None:
        return
    if not cfg.finetune.weights:
        raise Med3DError("finetune.channel_map is set but finetune.weights is not; remove it or name the weights")
    if len(cmap) != want:
        raise Med3DError(f"finetune.channel_map has {len(cmap)} entries but model.encoder.in_channels is {want}; "
                         "give one entry per model input channel")


def init_from_weights(model: MultiTaskModel, cfg: Config) -> str:
    """Initialise the encoder from ``finetune.weights`` under ``finetune.init``; returns the load report."""
    ft = cfg.finetune
    if ft.init == "full":
        return str(load_pretrained(model, ft.weights, ft.source, channel_map=ft.channel_map))
    donor = copy.deepcopy(model.encoder)
    report = load_pretrained(donor, ft.weights, ft.source, channel_map=ft.channel_map)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    chosen = init_state_dict(ft.init, donor.state_dict(), ft.first_k, gen)
    model.encoder.load_state_dict(chosen, strict=False)
    return f"{report}\n  init '{ft.init}': {len(chosen)} of {len(donor.state_dict())} encoder tensors taken from the file"


def micro_batch(cfg: Config, world: int) -> int:
    """Samples per forward pass on one rank: the global batch over ranks and accumulation steps."""
    micro = cfg.train.batch_size / (world * cfg.train.accumulate)
    if micro != int(micro):
        raise Med3DError(f"train.batch_size {cfg.train.batch_size} does not split into {world} rank(s) x "
                         f"{cfg.train.accumulate} accumulation step(s)")
    return int(micro)


@dataclass
class TrainState:
    """What changes while training (the rest of the trainer is fixed at set-up)."""

    step: int = 0  # optimizer steps done; the sampler's next step
    best: Dict[str, Any] = field(default_factory=lambda: {"metric": None, "iteration": None})
    frozen: List[str] = field(default_factory=list)  # encoder stages frozen now
    start: int = 0  # the step this process started (or resumed) at
    seen: int = 0  # samples trained on by this process
    losses: List[float] = field(default_factory=list)  # step losses since the last log line
    task: str = ""  # the task of the last step
    history: List[Dict[str, Any]] = field(default_factory=list)  # validation scores so far


class Trainer:
    """One training job (``pretrain`` or ``finetune``).

    Args:
        cfg: the resolved config.
        job: ``pretrain`` or ``finetune`` (fine-tuning reads ``finetune.*``: weights, init, freezing).
        resume: a training checkpoint to continue from, or None.
        progress: show progress bars.
        tensorboard: also write TensorBoard events.
        overwrite: replace a run already in ``run.out_dir`` (without it, or ``resume``, such a folder is refused).
    """

    def __init__(self, cfg: Config, job: str = "pretrain", resume: Optional[str] = None, progress: bool = True,
                 tensorboard: bool = True, overwrite: bool = False) -> None:
        self.cfg, self.job, self.resume_from, self.overwrite = cfg, job, resume, overwrite
        self.lock = None
        self.progress, self.tensorboard = progress, tensorboard
        self.state = TrainState()

    # ------------------------------------------------------------ the loop

    def run(self) -> Dict[str, Any]:
        """Train to ``train.iterations``; returns the summary (also written to ``summary.json``)."""
        try:
            self.setup()
            for step in self.steps():
                self.release_frozen(step)
                loss = self.train_step(step)
                self.after_step(loss)
            return self.end()
        finally:
            self.close()

    def steps(self):
        """The remaining steps, with a progress bar on rank 0."""
        from tqdm import tqdm

        self.bar = tqdm(range(self.state.step, self.cfg.train.iterations), initial=self.state.step,
                        total=self.cfg.train.iterations, desc=self.job, unit="it", dynamic_ncols=True,
                        disable=not (self.progress and self.info.is_main))
        self.clock = time.perf_counter()
        return self.bar

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Distributed group, config (resumed or new), data, model, optimizer, logger and the batch stream."""
        saved = load_training(Path(self.resume_from)) if self.resume_from else None
        if saved is not None:
            self.cfg = resume_config(saved["config"], self.cfg, Path(self.resume_from))
        cfg = self.cfg
        preflight(cfg, self.job)
        self.info = info = init_distributed()
        # Before anything is written (the cache, the run files): one training per folder, never over an old run.
        reads = [cfg.data.cache_dir, *(e.path for e in cfg.data.datasets.values()),
                 *(e.pseudo.path for e in cfg.data.datasets.values() if e.pseudo is not None),
                 *([cfg.finetune.weights] if self.job == "finetune" and cfg.finetune.weights else []),
                 *([cfg.data.splits_file] if cfg.data.splits_file else [])]
        self.lock = main_decides(info, lambda: claim_run_folder(cfg.run.out_dir, resume=saved is not None,
                                                                overwrite=self.overwrite, inputs=reads))
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        if cfg.train.threads:
            self.threads_before = torch.get_num_threads()  # given back in close(): a caller's process keeps its own
            torch.set_num_threads(cfg.train.threads)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.micro = micro_batch(cfg, info.world)
        self.data: DataSetup = setup_data(cfg, info, progress=self.progress and info.is_main)
        self.cfg = cfg = replace(cfg, model=replace(cfg.model, adapters=self.data.adapters))
        self.kinds = {t: kind_for_head(h.type, f"model.heads.{t}.type") for t, h in cfg.model.heads.items()}
        self.losses = {t: kind.loss(cfg.train).to(info.device) for t, kind in self.kinds.items()}
        for t in self.data.tasks:  # pseudo-labelled batches: their head's loss, low-confidence voxels left out
            if t.ignore_label is not None:
                self.losses[t.name] = SegLoss(cfg.train.loss, t.ignore_label).to(info.device)
        self.model, report = self.build_model(fresh=saved is None)
        self.opt = build_optimizer(self.model, cfg)
        self.sched = build_scheduler(self.opt, cfg)
        self.amp = AMP_DTYPES[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp == "fp16")
        if saved is not None:
            self.restore(saved)
        self.state.start = self.state.step
        self.meta = {"job": self.job, "tasks": list(cfg.data.datasets), "plans": self.data.plans,
                     "pseudo_plans": self.pseudo_plans(),
                     "patch_size": cfg.data.patch_size, "in_channels": cfg.model.encoder.in_channels}
        self.out = Path(cfg.run.out_dir)
        if saved is not None and info.is_main:  # what was logged after the checkpoint is logged again from here
            trim_metrics(self.out / "metrics.jsonl", self.state.step)
        self.logger = RunLogger(self.out, enabled=info.is_main, tensorboard=self.tensorboard)
        self.write_run_files(report)
        self.freeze_until_release()
        self.batches = iter(self.make_loader())
        self.train_mode()

    def build_model(self, fresh: bool):
        """The model on the run's device, initialised from ``finetune.weights`` for a new fine-tuning run."""
        cfg, info = self.cfg, self.info
        model = create_model(cfg)
        report = None
        if fresh and self.job == "finetune" and cfg.finetune.weights and cfg.finetune.init != "scratch":
            report = init_from_weights(model, cfg)
        if cfg.train.sync_bn and info.distributed and info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(info.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last_3d)
        return model, report

    def restore(self, saved: Dict[str, Any]) -> None:
        """Weights, optimizer, schedule, scaler, RNG, step and best score from a training checkpoint."""
        self.model.load_state_dict(saved["model"])
        ts = saved["train_state"]
        self.opt.load_state_dict(ts["optimizer"])
        self.sched.load_state_dict(ts["scheduler"])
        if ts["scaler"]:
            self.scaler.load_state_dict(ts["scaler"])
        set_rng_state(ts["rng"])
        self.check_plans(saved.get("meta", {}).get("plans", {}), saved.get("meta", {}).get("pseudo_plans", {}))
        self.state.step, self.state.best = int(ts["sampler"]["next_step"]), ts["best"]
        if self.state.step > self.cfg.train.iterations:
            raise Med3DError(f"train.iterations {self.cfg.train.iterations}: the checkpoint is already at iteration "
                             f"{self.state.step}; a resumed run can only be extended")

    def check_plans(self, saved: Dict[str, Any], pseudo: Dict[str, str]) -> None:
        """A resumed run trains on what the checkpoint trained on: the same plan for every task, and the same
        pseudo-labels (teacher and threshold) for a student.

        Raises:
            Med3DError: a dataset's plan changed since (its dataset.json, crop size, spacing, ...), or the
                pseudo-labels were written again by another teacher.
        """
        for name, phash in self.pseudo_plans().items():
            if pseudo.get(name, phash) != phash:
                raise Med3DError(f"task {name}: the pseudo-labels changed since the checkpoint was written (another "
                                 "teacher or threshold); a resumed run must train on the same data, so start a new "
                                 "run instead")
        for task, plan in self.data.plans.items():
            old = saved.get(task, {}).get("plan_hash")
            if old is not None and old != plan.get("plan_hash"):
                raise Med3DError(f"task {task}: its dataset's plan changed since the checkpoint was written "
                                 f"(plan {old} -> {plan.get('plan_hash')}); a resumed run must train on the same "
                                 "data, so start a new run instead")

    def pseudo_plans(self) -> Dict[str, str]:
        """The cache hash (plan, threshold, teacher) of each pseudo-labelled task."""
        return {t.name: t.plan["plan_hash"] for t in self.data.tasks if t.ignore_label is not None}

    def write_run_files(self, report: Optional[str]) -> None:
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_resolved(self.cfg, self.out)
        write_json_atomic(self.out / "plans.json", self.data.plans)
        write_json_atomic(self.out / "split.json", self.data.splits)  # the case ids each side really got
        if self.data.folds is not None:
            write_splits(self.out / "splits_final.json", self.data.folds)
        if not self.validating:
            self.say("no validation: no held-out case (validation.allow_none), so no score and no best.pt")
        if report:
            write_text_atomic(self.out / "load_report.txt", report + "\n")  # load_pretrained has logged it

    def make_loader(self):
        cfg, info = self.cfg, self.info
        tasks = self.data.tasks
        schedule = MixSchedule([t.name for t in tasks], [len(t.cases) for t in tasks], cfg.data.mixing,
                               cfg.data.temperature, cfg.run.seed)
        dataset = PatchBatches(tasks, schedule, cfg.data.patch_size, self.micro, cfg.data.foreground_share,
                               cfg.data.augment, cfg.run.seed)
        self.loss_weights = {t.name: t.loss_weight for t in tasks}
        return make_loader(dataset, self.state.step, cfg.train.iterations, info.rank, info.world,
                           cfg.train.accumulate, cfg.data.workers,
                           pin_memory=cfg.data.pin_memory and info.device.type == "cuda",
                           persistent_workers=cfg.data.persistent_workers)

    # ------------------------------------------------------------ freezing and modes

    def freeze_until_release(self) -> None:
        """Freeze ``finetune.freeze`` unless the run is already past ``unfreeze_at``."""
        ft = self.cfg.finetune
        if self.job == "finetune" and ft.freeze and (ft.unfreeze_at is None or self.state.step < ft.unfreeze_at):
            self.state.frozen = list(ft.freeze)
            set_frozen(self.model, self.state.frozen, True)
        self.wrap()

    def release_frozen(self, step: int) -> None:
        """At ``finetune.unfreeze_at``, let the frozen stages train (weights and BN statistics)."""
        at = self.cfg.finetune.unfreeze_at
        if self.state.frozen and at is not None and step >= at:
            set_frozen(self.model, self.state.frozen, False)
            self.state.frozen = []
            self.wrap()  # DDP must see the released parameters
            self.train_mode()

    def train_mode(self) -> None:
        """Training mode everywhere except frozen stages, whose BatchNorm keeps its statistics."""
        self.model.train()
        set_frozen(self.model, self.state.frozen, True)

    def wrap(self) -> None:
        """``self.forward``: the model under DDP (several ranks) and ``torch.compile`` when configured."""
        net: nn.Module = self.model
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Each step trains one task's head, so the other heads get no gradient: find_unused_parameters.
            net = DDP(self.model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
                      find_unused_parameters=True)
        self.net = net
        self.forward = torch.compile(net) if self.cfg.train.compile else net

    # ------------------------------------------------------------ one step

    def train_step(self, step: int) -> float:
        """``train.accumulate`` micro-batches of one task, then one optimizer step; returns the step's loss."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        with self.kernels():
            total, task = self.micro_batches()
        # Every rank takes the same decision: one rank stopping alone would leave the others waiting
        # in their next gradient all-reduce until the process group times out.
        if mean_across(self.info, float(not np.isfinite(total))) > 0:
            raise Med3DError(f"loss became non-finite at iteration {step} (task {task}; this rank's loss {total}); "
                             "lower train.lr or use amp bf16 instead of fp16")
        self.optimizer_step()
        self.state.step, self.state.task = step + 1, task
        self.state.seen += cfg.train.batch_size
        return total

    def kernels(self) -> contextlib.AbstractContextManager:
        """The kernel choice for a training step (``training_kernels``)."""
        return training_kernels(self.amp, self.info.device)

    def micro_batches(self) -> Tuple[float, str]:
        """Forward and backward ``train.accumulate`` micro-batches; returns their summed loss and the task."""
        cfg, info = self.cfg, self.info
        total = 0.0
        for a in range(cfg.train.accumulate):
            batch = next(self.batches)
            task, head = batch["task"], batch.get("head", batch["task"])
            x = batch["image"].to(info.device, non_blocking=True)
            y = batch["label"].to(info.device, non_blocking=True)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            last = a == cfg.train.accumulate - 1
            sync = self.net.no_sync() if info.distributed and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(info.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.forward(x, head)
                loss = self.losses[task](logits, y) * self.loss_weights[task] / cfg.train.accumulate
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        return total, task

    def optimizer_step(self) -> None:
        if self.cfg.train.clip_grad:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.cfg.train.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    def after_step(self, loss: float) -> None:
        """Log, validate and checkpoint when their intervals come round (the last step is left to ``end``)."""
        t, done = self.cfg.train, self.state.step
        self.state.losses.append(loss)
        final = done == t.iterations
        if done % t.log_every == 0 or final:
            self.log_train()
        if not final and self.validating and self.cfg.validation.every and done % self.cfg.validation.every == 0:
            self.validate()
        if not final and done % t.checkpoint_every == 0:
            self.save()

    # ------------------------------------------------------------ log, validate, save

    def log_train(self) -> None:
        loss = mean_across(self.info, float(np.mean(self.state.losses)))
        rate = self.state.seen / max(time.perf_counter() - self.clock, 1e-9)
        lr = self.opt.param_groups[0]["lr"]
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        self.logger.log({"kind": "train", "iteration": self.state.step, "loss": loss, "lr": lr,
                         "samples_per_s": rate, "task": self.state.task})
        self.state.losses = []

    @property
    def validating(self) -> bool:
        """Whether any task has held-out cases to score."""
        return any(self.data.val.values())

    def say(self, line: str) -> None:
        """One line on the terminal (rank 0), above the progress bar when there is one."""
        if not self.info.is_main:
            return
        bar = getattr(self, "bar", None)
        if bar is not None and not bar.disable:
            bar.write(line)
        else:
            log.info(line)

    def validate(self) -> Dict[str, Any]:
        """Score the held-out cases; the best score so far also saves ``best.pt``."""
        step = self.state.step
        res = run_validation(self.model, self.data.val, self.data.plans, self.kinds, self.cfg.data.patch_size,
                             self.cfg.validation, self.info, self.amp)
        self.logger.log({"kind": "val", "iteration": step, **res})
        self.say(f"iteration {step}: validation " + validation_line(res))
        self.state.history.append({"iteration": step, "score": res["score"], "mean_dice": res["mean_dice"],
                                   **{t: e["score"] for t, e in res["tasks"].items()}})
        best = self.state.best
        if np.isfinite(res["score"]) and (best["metric"] is None or res["score"] > best["metric"]):
            best.update(metric=res["score"], iteration=step)
            if self.info.is_main:
                self.save_as(self.out / "checkpoints" / "best.pt")
        return res

    def save_as(self, path: Path) -> Path:
        return save_training(path, self.model, self.cfg, self.meta, self.state.step, self.opt, self.sched,
                             self.scaler, self.state.best)

    def save(self) -> None:
        """``iter_N.pt``, ``last.pt`` naming it, and pruning to ``train.keep_last`` (rank 0)."""
        if not self.info.is_main:
            return
        folder = self.out / "checkpoints"
        publish_last(self.save_as(folder / f"iter_{self.state.step:06d}.pt"), folder)
        prune(folder, self.cfg.train.keep_last)

    # ------------------------------------------------------------ end

    def end(self) -> Dict[str, Any]:
        """Final validation and checkpoint, ``summary.json`` and ``curves.png``; returns the summary."""
        self.bar.close()
        elapsed = time.perf_counter() - self.clock
        final = self.validate() if self.validating else None
        self.save()
        summary = {"job": self.job, "iterations": self.cfg.train.iterations, "validated": final is not None,
                   "resumed_from": self.state.start or None, "seconds": elapsed,
                   "samples_per_s": self.state.seen / max(elapsed, 1e-9), "best": self.state.best, "final": final,
                   "history": self.state.history, "device": str(self.info.device), "world_size": self.info.world}
        if self.info.is_main:
            write_json_atomic(self.out / "summary.json", summary)
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        barrier(self.info)  # the ranks leave the process group together, not one while the other still writes
        return summary

    def close(self) -> None:
        """Release the logger, the process group, the run lock and the thread count, also after an error."""
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if getattr(self, "info", None) is not None:
            cleanup(self.info)
        if getattr(self, "lock", None) is not None:
            self.lock.release()
        if getattr(self, "threads_before", None):
            torch.set_num_threads(self.threads_before)


def train(cfg: Config, job: str = "pretrain", resume: Optional[str] = None, progress: bool = True,
          tensorboard: bool = True, overwrite: bool = False) -> Dict[str, Any]:
    """Run a training job (see ``Trainer``); returns the summary.

    Args:
        cfg: the resolved config (file and overrides); on resume, see ``engine.resume``.
        job: ``pretrain`` or ``finetune``.
        resume: a training checkpoint to continue from.
        progress: show progress bars.
        tensorboard: also write TensorBoard events.
        overwrite: replace a run already in ``run.out_dir`` (else such a folder is refused unless resuming).

    Returns:
        Best and final validation, timing, throughput and the validation history.

    Raises:
        Med3DError: bad config or data, named in one line.
    """
    return Trainer(cfg, job, resume, progress, tensorboard, overwrite).run()


def validation_line(res: Dict[str, Any]) -> str:
    """One validation result in a line: the score, then each task's Dice or AUC."""
    parts = []
    for task, entry in res["tasks"].items():
        metric = (f"Dice {entry['mean_dice']:.3f}" if "mean_dice" in entry
                  else f"AUC {entry['auc']:.3f}, balanced accuracy {entry['balanced_accuracy']:.3f}" if "auc" in entry
                  else self_supervised_line(entry))
        parts.append(f"{task} {metric}")
    return f"score {res['score']:.3f} (" + "; ".join(parts) + ")"


def describe(summary: Dict[str, Any]) -> str:
    """The end-of-run lines printed by the CLI."""
    best = summary["best"]
    final = summary["final"]
    head = (f"{summary['job']}: {summary['iterations']} iterations in {summary['seconds']:.1f} s "
            f"({summary['samples_per_s']:.1f} samples/s on {summary['device']} x{summary['world_size']})")
    if final is None:
        return head + "\nno validation: the run had no held-out case (validation.allow_none), so no score"
    lines = [head,
             f"final score {final['score']:.3f}" + (f", mean Dice {final['mean_dice']:.3f}"
                                                    if np.isfinite(final["mean_dice"]) else "")
             + (f"; best {best['metric']:.3f} at iteration {best['iteration']}" if best["metric"] is not None else "")]
    for task, entry in final["tasks"].items():
        if "dice" in entry:
            lines.append(f"  {task}: Dice " + ", ".join(f"{k} {v:.3f}" for k, v in entry["dice"].items()))
        elif "auc" not in entry:
            lines.append(f"  {task}: {self_supervised_line(entry)}")
        else:
            lines.append(f"  {task}: AUC {entry['auc']:.3f}, balanced accuracy {entry['balanced_accuracy']:.3f}, "
                         f"accuracy {entry['accuracy']:.3f} ({entry['cases']} held-out cases)")
    return "\n".join(lines)
