"""Stage by stage, how far two weights of one encoder architecture differ: in what they compute and in the weights.

For each encoder stage (stem, layer1..layer4) both encoders see the same patches. A stage's features
``(N, C, Z, Y, X)`` become examples x channels with one example per spatial position of every patch; at
most ``max_examples`` positions are kept per stage, spread evenly over the patches and chosen by a seeded
generator, the same positions for both encoders. On those, linear CKA and SVCCA compare the activations;
the relative weight change ``||w_B - w_A|| / ||w_A||`` is taken over the stage's learnable parameters
(convolution kernels, batch-norm scales and shifts; running statistics are not weights).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import Med3DError
from ..choices import ANALYSIS_MAX_EXAMPLES as DEFAULT_MAX_EXAMPLES
from ..models.multitask import MultiTaskModel
from ..models.resnet3d import ResNet3D
from .similarity import linear_cka, svcca

log = logging.getLogger(__name__)


@dataclass
class StageComparison:
    """One encoder stage compared."""

    stage: str
    channels: int
    examples: int  # spatial positions compared (over all patches)
    cka: float
    svcca: float
    svcca_dims_a: int  # directions the SVD step kept, per encoder
    svcca_dims_b: int
    weight_change: float  # ||w_B - w_A|| / ||w_A|| over the stage's parameters

    def row(self) -> Dict[str, Union[str, int, float]]:
        return asdict(self)


def encoder_of(module: nn.Module) -> ResNet3D:
    """The encoder of a multi-task model, or the encoder itself.

    Raises:
        Med3DError: ``module`` is neither.
    """
    if isinstance(module, MultiTaskModel):
        return module.encoder
    if isinstance(module, ResNet3D):
        return module
    raise Med3DError(f"expected a med3d encoder or multi-task model, got {type(module).__name__}")


def check_same_architecture(a: ResNet3D, b: ResNet3D, names: Tuple[str, str] = ("A", "B")) -> None:
    """Refuse two encoders whose stages do not correspond one to one.

    Args:
        a, b: the encoders.
        names: how messages call them (file names, in the CLI).

    Raises:
        Med3DError: one line naming the first settings that differ.
    """
    if a.config == b.config:
        return
    diff = [k for k in sorted(set(a.config) | set(b.config)) if a.config.get(k) != b.config.get(k)]
    shown = ", ".join(f"{k} {a.config.get(k)} vs {b.config.get(k)}" for k in diff[:3])
    raise Med3DError(f"{names[0]} and {names[1]}: different encoder architectures ({shown}); analyze compares "
                     "two weights of one architecture, stage by stage")


def _stage_prefixes(stage: str) -> Tuple[str, ...]:
    return ("conv1.", "bn1.") if stage == "stem" else (f"{stage}.",)


def weight_change(a: ResNet3D, b: ResNet3D) -> Dict[str, float]:
    """Relative change ``||w_B - w_A|| / ||w_A||`` per stage, over its parameters (not BN running statistics).

    Args:
        a: the reference weights (before).
        b: the same architecture's other weights (after).

    Returns:
        stage name -> relative change (0 for identical weights).

    Raises:
        Med3DError: different architectures.
    """
    check_same_architecture(a, b)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    out = {}
    for info in a.feature_info:
        keys = [k for k in pa if k.startswith(_stage_prefixes(info.name))]
        diff = sum(float((pb[k].detach().double().cpu() - pa[k].detach().double().cpu()).pow(2).sum()) for k in keys)
        ref = sum(float(pa[k].detach().double().cpu().pow(2).sum()) for k in keys)
        out[info.name] = float(np.sqrt(diff / ref)) if ref > 0 else float("nan")
    return out


def _positions(total: int, budget: int, seed: int, stage: int, patch: int) -> torch.Tensor:
    """Which of a patch's ``total`` positions to keep: all, or ``budget`` of them without repeats.

    Keyed by (seed, stage, patch) rather than drawn from one running stream, so the choice does not depend
    on the batch size or on the order the stages are visited in.
    """
    if total <= budget:
        return torch.arange(total)
    rng = np.random.default_rng([seed, stage, patch])
    return torch.from_numpy(np.sort(rng.choice(total, budget, replace=False)))


@torch.no_grad()
def _stage_examples(a: ResNet3D, b: ResNet3D, patches: torch.Tensor, max_examples: int, seed: int,
                    batch_size: int, device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per stage, ``(examples, channels)`` float64 activations of ``a`` and of ``b`` at the same positions."""
    n = patches.shape[0]
    budget = max(1, max_examples // n)  # per patch, so every patch counts
    kept: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in a.feature_info]
    for start in range(0, n, batch_size):
        x = patches[start:start + batch_size].to(device)
        for s, (fa, fb) in enumerate(zip(a(x), b(x))):
            for i, (fa_i, fb_i) in enumerate(zip(fa, fb)):  # one patch: (C, Z, Y, X) -> (positions, C)
                ea, eb = fa_i.flatten(1).T, fb_i.flatten(1).T
                idx = _positions(ea.shape[0], budget, seed, s, start + i).to(device)
                kept[s].append((ea[idx].double().cpu(), eb[idx].double().cpu()))
    return [(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])) for parts in kept]


def _check_patches(enc: ResNet3D, patches: torch.Tensor) -> None:
    if patches.ndim != 5 or patches.shape[0] < 1:
        raise Med3DError(f"patches of shape {tuple(patches.shape)}: expected (N, C, Z, Y, X) with N >= 1")
    if patches.shape[1] != enc.in_channels:
        raise Med3DError(f"the patches have {patches.shape[1]} channel(s) but the encoders take {enc.in_channels}; "
                         "give data with the channels the encoders were trained on")


def compare(a: nn.Module, b: nn.Module, patches: torch.Tensor, max_examples: int = DEFAULT_MAX_EXAMPLES,
            seed: int = 0, batch_size: int = 4, device: Optional[Union[str, torch.device]] = None
            ) -> List[StageComparison]:
    """Compare two encoders of one architecture stage by stage on ``patches``.

    Both run in eval mode (batch-norm running statistics, as at inference) on ``device``; their modes are put
    back after, and they stay on ``device``.

    Args:
        a: the reference encoder or multi-task model (e.g. before fine-tuning).
        b: the other one (e.g. after fine-tuning).
        patches: ``(N, C, Z, Y, X)`` inputs, prepared as the encoders expect.
        max_examples: at most this many spatial positions per stage (memory and SVD time grow with it).
        seed: chooses the positions kept (keyed per stage and patch: the batch size does not change them).
        batch_size: patches per forward pass.
        device: where the encoders run (None: where ``a``'s weights are).

    Returns:
        One comparison per stage, in ``feature_info`` order.

    Raises:
        Med3DError: different architectures, or patches that do not fit the encoders.
    """
    ea, eb = encoder_of(a), encoder_of(b)
    check_same_architecture(ea, eb)
    _check_patches(ea, patches)
    dev = torch.device(device) if device is not None else next(ea.parameters()).device
    modes = (ea.training, eb.training)
    ea.to(dev).eval(), eb.to(dev).eval()
    try:
        stages = _stage_examples(ea, eb, patches.float(), max_examples, seed, batch_size, dev)
    finally:
        ea.train(modes[0]), eb.train(modes[1])
    change = weight_change(ea, eb)
    out = []
    for info, (xa, xb) in zip(ea.feature_info, stages):
        corr, ka, kb = svcca(xa, xb)
        if max(ka, kb) * 5 > xa.shape[0]:
            log.warning(f"{info.name}: {xa.shape[0]} examples for {max(ka, kb)} kept SVCCA directions; canonical "
                        "correlations drift towards 1 with few examples per direction (more or larger patches help)")
        out.append(StageComparison(info.name, info.channels, xa.shape[0], linear_cka(xa, xb), corr, ka, kb,
                                   change[info.name]))
    return out


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(a.parameters(), b.parameters()))


def random_like(enc: ResNet3D, seed: int = 0) -> ResNet3D:
    """A freshly initialised encoder of ``enc``'s architecture (the global RNG is left as it was).

    Args:
        enc: the architecture to copy (its ``config``).
        seed: seeds the initialisation; when that draw reproduces ``enc`` exactly (``enc`` is itself an
            untrained draw with this seed) the next seed is taken, so the baseline is never ``enc``.

    Returns:
        The new encoder on ``enc``'s device.
    """
    from ..api import encoder_from_config

    for attempt in range(seed, seed + 3):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(attempt)
            fresh = encoder_from_config(enc.config)
        if not _same_weights(fresh, enc):
            break
    return fresh.to(next(enc.parameters()).device)


def markdown_table(rows: Sequence[StageComparison], baseline: Optional[Sequence[StageComparison]] = None) -> str:
    """The comparison as a Markdown table (one line per stage).

    Args:
        rows: A vs B per stage.
        baseline: A vs a random initialisation per stage, shown in two more columns when given.

    Returns:
        The table.
    """
    extra = " CKA A vs random | SVCCA A vs random |" if baseline else ""
    lines = ["| stage | channels | examples | linear CKA | SVCCA | SVCCA dims (A, B) | weight change |" + extra,
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if baseline else "")]
    for i, r in enumerate(rows):
        more = f" {baseline[i].cka:.4f} | {baseline[i].svcca:.4f} |" if baseline else ""
        lines.append(f"| {r.stage} | {r.channels} | {r.examples} | {r.cka:.4f} | {r.svcca:.4f} | "
                     f"{r.svcca_dims_a}, {r.svcca_dims_b} | {r.weight_change:.4f} |" + more)
    return "\n".join(lines)
