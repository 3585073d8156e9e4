"""``med3d config --schema``: every config key with its type, default and one-line meaning.

The keys, types and defaults come from the schema dataclasses in ``med3d.config`` (and, for
``model.encoder`` and ``model.heads.<task>``, from the registered builders' signatures). The
meaning is the comment written beside or above the field in ``config.py`` (or the builder's
docstring), so documenting a key where it is declared is all a new key needs.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Dict, List, Tuple

from . import config as C
from .values import describe

# Keys whose meaning the field's name and section say, without a comment in config.py.
_PLAIN = {
    "run.out_dir": "folder for checkpoints, logs and the resolved config (relative to the working folder)",
    "run.seed": "seed of initialisation, sampling and the validation split",
    "train.iterations": "optimizer steps to train",
    "train.lr": "base learning rate",
    "train.optimizer": "optimizer",
    "train.momentum": "SGD momentum (AdamW: beta1)",
    "train.weight_decay": "weight decay",
    "train.schedule": "learning-rate schedule over the iterations",
    "train.warmup_iterations": "iterations of linear learning-rate warm-up",
    "train.amp": "mixed precision (bf16 on recent GPUs and CPUs)",
    "train.checkpoint_every": "iterations between checkpoints",
    "train.keep_last": "periodic checkpoints kept besides last.pt and best.pt",
    "train.log_every": "iterations between log lines",
    "data.datasets": "task name (= head name) -> its dataset entry",
    "data.cache_dir": "where prepare writes the preprocessed cases (relative to the working folder)",
    "data.mixing": "how batches are drawn across tasks",
    "data.temperature": "mixing 'temperature': exponent that flattens dataset-size proportions",
    "data.input_policy": "datasets whose channel count differs from the encoder's: select channels or add an adapter",
    "data.select_channel": "input_policy select: the channel fed to a one-channel encoder",
    "data.workers": "data-loading processes",
    "data.persistent_workers": "keep loader processes alive between epochs",
    "data.augment": "augmentation probabilities and ranges",
    "data.datasets.<task>.loss_weight": "weight of this task's loss in the sum over tasks",
    "validation.overlap": "sliding-window overlap during validation",
    "validation.sw_batch_size": "windows per forward pass during validation",
    "validation.hd95": "also compute the 95th-percentile Hausdorff distance (slower)",
    "finetune.source": "weights file format: auto, med3d, medicalnet, monai, torchvision or plain",
    "finetune.init": "what to transfer: all, the first k stages, only BN statistics, or nothing",
    "finetune.first_k": "init first_k: how many stages (stem counts as one) to transfer",
    "finetune.encoder_lr_mult": "learning-rate multiplier of the pretrained encoder",
    "model.encoder": "the shared encoder: arch and its builder's arguments",
    "model.heads": "task name -> its head: type and the builder's arguments",
    "model.heads.<task>.type": "registered head: med3d (light, dilated features), unet (skips, strided layout), "
                               "classification, restore and contrastive (self-supervised, dropped at export)",
    "model.heads.<task>.num_classes": "output classes, background included (restore: the channels it reconstructs; "
                                      "contrastive: the projection size)",
    "model.heads.<task>.channels": "channels of the head's convolutions",
    "model.heads.<task>.dropout": "dropout before the classifier",
    "model.encoder.arch": "registered encoder",
    "model": "the network: one encoder shared by every task, one head per task",
    "run": "where outputs go and the seed",
    "train": "optimisation",
    "data": "datasets, cache, patches, sampling and augmentation",
    "validation": "held-out scoring during training",
    "finetune": "pretrained weights and how they are transferred",
    "data.fold": "folds: the fold to train (0-based)",
    "data.splits_file": "an nnU-Net style splits_final.json whose folds to use (relative to the config file)",
    "data.augment.affine": "probability of a random rotation and scaling",
    "data.augment.rotate_deg": "affine: largest rotation in degrees",
    "data.augment.scale": "affine: largest relative zoom",
    "data.augment.elastic": "probability of an elastic deformation",
    "data.augment.intensity_scale": "probability of multiplying intensities by a random factor",
    "data.augment.intensity_shift": "probability of adding a random offset to intensities",
    "data.augment.gamma": "probability of a random gamma curve",
    "data.augment.noise": "probability of Gaussian noise",
    "data.augment.blur": "probability of Gaussian blur",
}


def _field_comments(cls: type) -> Dict[str, str]:
    """Field name -> the comment beside it, or the comment lines right above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: Dict[str, str] = {}
    above: List[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("def ", "class ", "@", '"""')):
            meaning = m.group(2) or " ".join(above)
            if meaning:
                out[m.group(1)] = meaning
        above = []
    return out


def _arg_docs(fn: Any) -> Dict[str, str]:
    """Argument name -> the first sentence of its ``Args:`` entry in ``fn``'s docstring."""
    doc = inspect.getdoc(fn) or ""
    if "Args:" not in doc:
        return {}
    section = re.split(r"^\S", doc.split("Args:", 1)[1], flags=re.M)[0]  # up to Returns: / Raises:
    out: Dict[str, str] = {}
    for m in re.finditer(r"^ {4}(\w[\w, ]*):\s*(.+?)(?=^ {4}\w[\w, ]*:|\Z)", section, re.M | re.S):
        text = " ".join(m.group(2).split())
        for name in m.group(1).split(","):
            out[name.strip()] = text
    return out


def _builder_docs(fn: Any) -> Dict[str, str]:
    """Argument meanings of a builder: its own docstring, else that of the class it returns."""
    fn = getattr(fn, "func", fn)  # a functools.partial of a class (the encoders)
    docs = _arg_docs(fn)
    try:
        ret = typing.get_type_hints(fn).get("return") if not inspect.isclass(fn) else None
    except Exception:  # noqa: BLE001 - a hint that does not resolve just gives no meanings
        ret = None
    return {**_arg_docs(ret), **docs} if inspect.isclass(ret) else docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "-" if dataclasses.is_dataclass(value) else value
    return "(required)"


def _valid(key: str) -> str:
    """The values the loader accepts for a numeric key (``config.RANGES``), as a note for its meaning."""
    want = key.replace("<task>", "*")
    text = next((describe(check) for pattern, check in C.RANGES if pattern == want), "")
    return f" (valid: {text})" if text else ""


def _rows(cls: type, prefix: str) -> List[Tuple[str, str, Any, str]]:
    comments = _field_comments(cls)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            comments = {**_field_comments(base), **comments}
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        meaning = comments.get(f.name) or _PLAIN.get(key, "")
        if key.replace("<task>", "*") in C.INPUT_PATH_KEYS and "relative to" not in meaning:
            meaning += " (relative to the config file naming it)"  # the rule the loader applies
        rows.append((key, C._type_name(tp), _default(f), meaning + _valid(key)))
        optional = typing.get_origin(tp) is typing.Union  # Optional[Section]: its keys too
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if optional else []
        if (dataclasses.is_dataclass(tp) or inner) and f.name not in ("encoder",):
            rows += _rows(tp if dataclasses.is_dataclass(tp) else inner[0], key + ".")
        if f.name == "datasets":
            rows += _rows(C.DatasetEntry, key + ".<task>.")
    return rows


def _component_rows(base: type, prefix: str) -> List[Tuple[str, str, Any, str]]:
    """Keys of every registered encoder / head, once per key; a key only some take names them."""
    reg = C._registry(base)
    rows: Dict[str, Tuple[str, str, Any, str]] = {}
    takers: Dict[str, List[str]] = {}
    for name in reg.names():
        docs = _builder_docs(reg.get(name))
        for key, tp, default, meaning in _rows(C.component_config(base, name), prefix):
            leaf = key.rsplit(".", 1)[-1]
            takers.setdefault(key, []).append(name)
            if leaf == reg.key:
                tp = " | ".join(repr(n) for n in reg.names())
            rows.setdefault(key, (key, tp, default, meaning or docs.get(leaf, "")))
    return [(k, tp, d, m + (f" (only {', '.join(takers[k])})" if len(takers[k]) < len(reg.names()) else ""))
            for k, tp, d, m in rows.values()]


def schema_rows() -> List[Tuple[str, str, Any, str]]:
    """Every config key as ``(key, type, default, meaning)``, in the order ``med3d config`` prints them.

    Returns:
        The rows; ``model.heads.<task>`` and ``data.datasets.<task>`` stand for any task name.
    """
    rows = [r for r in _rows(C.Config, "") if not r[0].startswith("model.")]
    model = [r for r in _rows(C.ModelConfig, "model.") if r[0] in ("model.encoder", "model.heads", "model.adapters")]
    enc = _component_rows(C.EncoderConfig, "model.encoder.")
    heads = _component_rows(C.HeadConfig, "model.heads.<task>.")
    return model + enc + heads + rows


def format_schema() -> str:
    """The schema as text, one key per line: ``key  type  default  meaning``."""
    rows = schema_rows()
    width = max(len(r[0]) for r in rows)
    lines = []
    for key, tp, default, meaning in rows:
        shown = default if default == "-" else repr(default)
        lines.append(f"{key:<{width}}  {tp}  [default: {shown}]  {meaning}".rstrip())
    return "\n".join(lines)
