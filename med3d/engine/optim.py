"""Optimizer, learning-rate schedule and stage freezing.

Parameter groups: the encoder at ``lr * encoder_lr_mult``, heads and input adapters (the new
layers when fine-tuning) at ``lr * head_lr_mult``. The schedule is a ``LambdaLR`` factor, so
its state is one integer and resumes exactly.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.nn as nn

from ..config import Config
from ..errors import Med3DError
from ..models.multitask import MultiTaskModel

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def param_groups(model: MultiTaskModel, cfg: Config) -> List[dict]:
    lr, ft = cfg.train.lr, cfg.finetune
    enc = [p for p in model.encoder.parameters()]
    new = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    return [{"params": enc, "lr": lr * ft.encoder_lr_mult, "name": "encoder"},
            {"params": new, "lr": lr * ft.head_lr_mult, "name": "heads"}]


def build_optimizer(model: MultiTaskModel, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, cfg)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then poly 0.9 / cosine / constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "poly":
        return (1 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.iterations, t.schedule, t.warmup_iterations))


def check_stages(names: Iterable[str]) -> None:
    """Raise naming the first entry of ``finetune.freeze`` that is not an encoder stage."""
    for name in names:
        if name not in STAGES:
            raise Med3DError(f"finetune.freeze: unknown stage '{name}'; choose from {', '.join(STAGES)}")


def stage_modules(model: MultiTaskModel, names: Iterable[str]) -> List[nn.Module]:
    names = list(names)
    check_stages(names)
    enc = model.encoder
    out: List[nn.Module] = []
    for name in names:
        out += [enc.conv1, enc.bn1] if name == "stem" else [getattr(enc, name)]
    return out


def set_frozen(model: MultiTaskModel, names: Iterable[str], frozen: bool) -> None:
    """Freeze (or release) encoder stages: no gradients, and BatchNorm keeps its pretrained statistics.

    Frozen stages are put in eval mode, released ones in training mode; the trainer calls this
    again after every ``model.train()``.
    """
    for module in stage_modules(model, names):
        for p in module.parameters():
            p.requires_grad_(not frozen)
        module.train(not frozen)
