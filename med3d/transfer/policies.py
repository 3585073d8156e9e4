"""Fine-tuning init policies as pure functions on encoder state dicts.

``init_state_dict(policy, pretrained)`` returns the entries to load into a freshly built
(randomly initialised) encoder; what it leaves out stays random.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import Med3DError

StateDict = Dict[str, torch.Tensor]
POLICIES = ("full", "first_k", "mean_var", "scratch")


def first_k_stages(sd: StateDict, k: int) -> StateDict:
    """Stem (conv1, bn1) and layer1..layerk only (Transfusion: feature reuse lives in the lowest layers)."""
    if not 0 <= k <= 4:
        raise Med3DError(f"first_k: k must be between 0 and 4, got {k}")
    keep = ("conv1.", "bn1.") + tuple(f"layer{i}." for i in range(1, k + 1))
    return {key: v for key, v in sd.items() if key.startswith(keep)}


def mean_var(sd: StateDict, generator: Optional[torch.Generator] = None) -> StateDict:
    """Mean-Var init (Raghu et al. 2019): each weight tensor redrawn i.i.d. from N(mean, std) of the pretrained one.

    Keeps every layer's scale and forgets its features. Applies to conv / linear / BN affine
    weights and biases; BN running statistics describe the old features, so they are reset
    (mean 0, variance 1) and the batch counter zeroed.
    """
    out: StateDict = {}
    for key, v in sd.items():
        if key.endswith("running_mean"):
            out[key] = torch.zeros_like(v)
        elif key.endswith("running_var"):
            out[key] = torch.ones_like(v)
        elif key.endswith("num_batches_tracked") or not v.is_floating_point():
            out[key] = torch.zeros_like(v)
        else:
            std = v.float().std() if v.numel() > 1 else torch.tensor(0.0)
            noise = torch.randn(v.shape, generator=generator, dtype=torch.float32)
            out[key] = (v.float().mean() + std * noise).to(v.dtype)
    return out


def init_state_dict(policy: str, pretrained: StateDict, k: int = 2,
                    generator: Optional[torch.Generator] = None) -> StateDict:
    """Entries to load for ``policy``: full, first_k (stem + k stages), mean_var, or scratch (nothing)."""
    if policy == "full":
        return dict(pretrained)
    if policy == "first_k":
        return first_k_stages(pretrained, k)
    if policy == "mean_var":
        return mean_var(pretrained, generator)
    if policy == "scratch":
        return {}
    raise Med3DError(f"unknown init policy '{policy}'; choose one of {', '.join(POLICIES)}")
