"""``med3d new-config``: a commented fine-tuning config for a dataset, from the dataset's plan.

The spacing and the patch size come from the plan (``med3d.data.plan``): the patch is the median
case after resampling, capped at ``MAX_PATCH`` voxels per axis and ``PATCH_BUDGET`` voxels in all,
and cut to a multiple of what the encoder's stages need. With ``--weights`` the encoder (depth,
shortcut, convolution, layout) is read from the file, so the weights load as they are.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .atomic import write_text_atomic
from .errors import Med3DError

PathLike = Union[str, Path]
MAX_PATCH = 160  # voxels per axis
PATCH_BUDGET = 128 * 128 * 96  # voxels per patch: a batch of 2 fits a 16 GB GPU with a ResNet-18 + med3d head
DEFAULT_ARCH = "resnet18"


def _plan(dataset: PathLike) -> Tuple[Any, Dict[str, Any]]:
    """The dataset and the plan ``prepare`` would make for it (fingerprints every case)."""
    from .data.datalist import read_dataset
    from .data.plan import case_fingerprint, dataset_fingerprint, find_descriptor, load_descriptor, make_plan

    info = read_dataset(dataset)
    if not info.cases:
        raise Med3DError(f"{dataset}: no readable training case ({'; '.join(info.problems[:1])}); run "
                         "'med3d check-data' on it")
    fp = dataset_fingerprint(info, [case_fingerprint(c) for c in info.cases])
    desc = find_descriptor(info.name)
    return info, make_plan(info, fp, load_descriptor(desc) if desc else None)


def weights_encoder(path: PathLike) -> Tuple[Dict[str, Any], str]:
    """The encoder arguments a weight file needs, and a phrase saying what the file holds.

    Args:
        path: any file ``load_pretrained`` reads.

    Returns:
        ``({"arch": ..., "shortcut": ..., "conv": ..., "layout": ...}, description)``.

    Raises:
        Med3DError: the file is unreadable or holds no ResNet.
    """
    from .transfer.formats import describe_state_dict, read_weights, summarize
    from .transfer.load import file_layout

    weights = read_weights(path)
    meta_enc = weights.metadata.get("encoder") if isinstance(weights.metadata.get("encoder"), dict) else None
    if meta_enc is None and weights.config:
        meta_enc = (weights.config.get("model") or {}).get("encoder")
    if meta_enc:  # a med3d export or checkpoint says exactly how its encoder was built
        keep = ("arch", "layout", "conv", "shortcut", "stem_kernel", "stem_stride", "downsample_bias", "widths")
        return {k: meta_enc[k] for k in keep if k in meta_enc}, f"a med3d {meta_enc.get('arch')} ({weights.source})"
    info = describe_state_dict(weights.state_dict)
    if not str(info.get("arch", "")).startswith("resnet") or info.get("dims") != 3 and weights.source != "torchvision":
        raise Med3DError(f"{path}: holds {summarize(info)}, not a 3D ResNet encoder med3d can fine-tune")
    enc: Dict[str, Any] = {"arch": info["arch"], "shortcut": info["shortcut"],
                           "conv": info.get("conv", "3d" if weights.source != "torchvision" else "slicewise")}
    if file_layout(weights):
        enc["layout"] = file_layout(weights)
    if info["width"] != 64:
        enc["widths"] = [info["width"] * m for m in (1, 2, 4, 8)]
    return enc, f"{summarize(info)} ({weights.source} checkpoint)"


def patch_size(median_shape: Sequence[int], divisor: Sequence[int], max_axis: int = MAX_PATCH,
               budget: int = PATCH_BUDGET) -> List[int]:
    """A patch (z, y, x) from the plan's median resampled shape.

    Args:
        median_shape: the median case's shape on the plan's grid.
        divisor: per axis, what the encoder's stages need the size to be a multiple of.
        max_axis: largest size along any axis.
        budget: largest number of voxels.

    Returns:
        Sizes that are multiples of ``divisor``, at least one multiple each.
    """
    size = [min(int(s), max_axis) for s in median_shape]
    while math.prod(size) > budget:  # shrink the largest axis first (nnU-Net does the same)
        axis = max(range(3), key=lambda a: size[a] / divisor[a])
        size[axis] = max(divisor[axis], size[axis] - divisor[axis])
    return [max(d, (s // d) * d) for s, d in zip(size, divisor)]


def _rel(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, as YAML. A link named by the user stays a link (only its parent
    folders are resolved), so re-pointing it later re-points the config too."""
    path = Path(os.path.abspath(path))
    path = path.parent.resolve() / path.name
    try:
        return _flow(os.path.relpath(path, folder.resolve()))
    except ValueError:  # another drive (Windows)
        return _flow(str(path))


def _flow(value: Any) -> str:
    """One value in YAML flow style (``[1, 2]``, ``resnet18``, ``true``)."""
    return yaml.safe_dump([value], default_flow_style=True).strip()[1:-1]


def _has_key(section: Any, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(section)}


def _model_lines(info: Any, plan: Dict[str, Any], enc: Dict[str, Any], about: str, head: str) -> List[str]:
    """The ``model`` section: the encoder (fitted to the weights) and one head for the task."""
    labels = ", ".join(plan["labels"][k] for k in sorted(plan["labels"], key=int))
    return [
        "model:",
        "  encoder:",
        f"    # {about}",
        *[f"    {k}: {_flow(v)}" for k, v in enc.items()],
        f"    in_channels: {info.num_channels}  # the dataset's channels: {', '.join(info.channel_names)}",
        "  heads:",
        f"    # {head}: " + ("a light head on the encoder's last features (Med3D's)" if head == "med3d" else
                           "a U-Net decoder over the encoder's stages (best on the strided layout)"),
        f"    {_flow(info.name)}: {{type: {head}, num_classes: {len(plan['labels'])}}}  # {labels}",
    ]


def _data_lines(info: Any, plan: Dict[str, Any], dataset: Path, folder: Path, divisor: List[int]) -> List[str]:
    """The ``data`` section: the dataset (relative to the config's folder), the plan's spacing and a patch."""
    patch = patch_size(plan["median_shape_resampled"], divisor)
    lines = [
        "data:",
        "  datasets:",
        f"    {_flow(info.name)}:",
        f"      path: {_rel(dataset, folder)}",
        f"      spacing: {[round(s, 4) for s in plan['target_spacing']]}  # (z, y, x) mm; the plan's: median of "
        f"{len(info.cases)} case(s)",
    ]
    if any(e["scheme"] == "ct" for e in plan["normalization"]):
        lines.append("      # A fixed HU window instead of percentiles of the training scans (steadier with few "
                     "scans); abdomen:")
        lines.append("      # ct_window: [-160, 240]")
    return lines + [
        "  cache_dir: cache",
        f"  patch_size: {patch}  # (z, y, x): the median case {plan['median_shape_resampled']} on the plan grid, "
        f"capped, multiple of {divisor}",
        "  workers: 2",
    ]


def _training_lines(info: Any, weights: Optional[PathLike], folder: Path) -> List[str]:
    """The ``validation``, ``finetune``, ``run`` and ``train`` sections."""
    from .config import ValidationConfig

    if len(info.cases) < 2 and _has_key(ValidationConfig, "allow_none"):
        lines = ["validation:", "  allow_none: true  # one labelled case: nothing is left to validate on"]
    else:
        lines = ["validation:", "  every: 250"]
    lines += ["finetune:"]
    if weights is not None:
        lines += [f"  weights: {_rel(Path(weights), folder)}", "  init: full",
                  "  head_lr_mult: 10.0  # the new head learns faster than the pretrained encoder"]
    else:
        lines += ["  weights: null  # a pretrained encoder (e.g. from `med3d weights`) usually helps"]
    return lines + ["run:", f"  out_dir: {_flow(f'runs/{info.name}')}", "train:", "  iterations: 2000",
                    "  batch_size: 2", "  lr: 0.01", "  checkpoint_every: 500", ""]


def new_config(dataset: PathLike, out: PathLike, weights: Optional[PathLike] = None, head: str = "med3d",
               overwrite: bool = False) -> Tuple[Path, List[str]]:
    """Write a commented fine-tuning config for ``dataset``.

    Args:
        dataset: a dataset folder (Decathlon or nnU-Net v2; e.g. from ``med3d new-dataset``).
        out: the YAML file to write; data and weight paths in it are relative to its folder.
        weights: a pretrained encoder to start from (None: train from scratch).
        head: ``med3d`` (light head on stride-8 features) or ``unet`` (decoder with skips).
        overwrite: replace an existing file.

    Returns:
        The written path and the plan's warnings.

    Raises:
        Med3DError: the file exists, the dataset or weights are unusable, or ``head`` is unknown.
    """
    from .api import create_encoder

    out = Path(out)
    if head not in ("med3d", "unet"):
        raise Med3DError(f"--head {head}: choose med3d or unet")
    if out.exists() and not overwrite:
        raise Med3DError(f"{out}: already exists; pass --overwrite to replace it")
    info, plan = _plan(dataset)
    if weights is not None:
        enc, about = weights_encoder(weights)
    else:
        enc, about = {"arch": DEFAULT_ARCH}, "no weights: trained from scratch"
    enc.setdefault("layout", "strided" if head == "unet" else "dilated")
    divisor = list(create_encoder(**{**enc, "in_channels": info.num_channels}).size_divisibility)
    folder = out.resolve().parent
    lines = [
        f"# Fine-tuning config for {info.name}, written by `med3d new-config`.",
        "# Data and weight paths are relative to this file; cache_dir and out_dir to the folder you run med3d in.",
        "# Every key with its type, default and meaning: `med3d config --schema`; this file resolved:",
        f"# `med3d config {out}`. Prepare the data with `med3d prepare --config {out}`.",
        *_model_lines(info, plan, enc, about, head),
        *_data_lines(info, plan, Path(dataset), folder, divisor),
        *_training_lines(info, weights, folder),
    ]
    write_text_atomic(out, "\n".join(lines))
    return out, list(plan.get("warnings", []))
