"""Input-channel adaptation of a first conv kernel (O, I, ...): pure tensor functions."""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ..errors import Med3DError

ChannelSpec = Union[int, str]  # a source channel index, "mean" or "zero"


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-conv kernel to ``in_channels`` inputs.

    I -> 1: sum over the input channels, so a grey image gives the response that the same
    grey image replicated into every channel gave. I -> N: channels repeated cyclically and
    scaled by I/N, which keeps that response exactly when N is a multiple of I.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight.clone()
    if in_channels < 1:
        raise Med3DError(f"in_channels must be at least 1, got {in_channels}")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // src)
    return weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels] * (src / in_channels)


def map_input_channels(weight: torch.Tensor, mapping: Sequence[ChannelSpec]) -> torch.Tensor:
    """New first-conv kernel whose channel i is ``mapping[i]``: a source index, "mean" or "zero".

    Selecting or reordering is a list of indices: BraTS FLAIR, T1, T1gd, T2 fed to an RGB
    network's R, G, B kernels with T2 as their mean is ``[0, 1, 2, "mean"]``.
    """
    cols = []
    for i, spec in enumerate(mapping):
        if spec == "mean":
            cols.append(weight.mean(dim=1))
        elif spec == "zero":
            cols.append(torch.zeros_like(weight[:, 0]))
        elif isinstance(spec, int) and not isinstance(spec, bool) and 0 <= spec < weight.shape[1]:
            cols.append(weight[:, spec])
        else:
            raise Med3DError(f"channel mapping entry {i} is {spec!r}; use a source channel index "
                             f"0..{weight.shape[1] - 1}, 'mean' or 'zero'")
    return torch.stack(cols, dim=1)
