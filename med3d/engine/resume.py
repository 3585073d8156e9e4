"""Which config a resumed run continues under.

A resumed run keeps the model, data and optimiser settings it started with: anything else would
silently change what the checkpoint's weights and optimizer state mean. Keys that only extend
the run or change how it is watched and fed may differ, and take the new value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

from ..config import Config, from_dict, to_dict
from ..errors import Med3DError

# May differ on --resume: the length of the run (the lr schedule stretches to the new end), logging,
# validation and checkpoint intervals, and settings that change speed but not the numbers trained on.
EXTENDABLE = ("train.iterations", "train.log_every", "train.checkpoint_every", "train.keep_last",
              "validation.every", "validation.sw_batch_size", "validation.hd95", "train.threads",
              "data.workers", "data.pin_memory", "data.persistent_workers", "data.cache_dir", "data.check")
# Filled in by the engine from the data, not chosen by the user.
DERIVED = ("model.adapters",)

RESUME_RULE = ("--resume continues under the checkpoint's config; these keys may be changed (by the config file "
               f"or --set): {', '.join(EXTENDABLE)}. Any other difference is refused: start a new run in another "
               "run.out_dir to change the model, data or optimiser.")


def _leaves(data: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, data


def _set(data: Dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def resume_config(saved: Dict[str, Any], requested: Config, where: Path) -> Config:
    """The config to continue a run under: the checkpoint's, with the allowed changes of ``requested``.

    Args:
        saved: the resolved config stored in the checkpoint.
        requested: the config the user gave now (file and ``--set`` overrides).
        where: the checkpoint, named in errors.

    Returns:
        The checkpoint's config with every key in ``EXTENDABLE`` taken from ``requested``.

    Raises:
        Med3DError: ``requested`` differs from the checkpoint in any other key (the first is named).
    """
    merged = to_dict(from_dict(saved))  # a checkpoint of an older med3d: its config in today's schema
    old = dict(_leaves(merged))
    new = dict(_leaves(to_dict(requested)))
    for key in sorted(set(old) | set(new)):
        if key.startswith(DERIVED) or old.get(key) == new.get(key):
            continue
        if key not in EXTENDABLE:
            raise Med3DError(f"--resume: config key '{key}' is {new.get(key)!r} now but {old.get(key)!r} in {where}; "
                             "a resumed run keeps its model, data and optimiser settings (changeable: "
                             f"{', '.join(EXTENDABLE)}); start a new run in another run.out_dir instead")
        _set(merged, key, new[key])
    return from_dict(merged)
