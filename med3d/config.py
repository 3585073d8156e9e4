"""Configuration: YAML files with ``_base_`` inheritance, dotted overrides and a typed schema.

The schema is the dataclasses below; every key is checked against it, so a typo or a wrong
type fails at once with one line naming the key. ``to_dict`` gives the resolved config that
is saved beside each run's outputs.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from . import values as V
from .errors import Med3DError
from .atomic import write_yaml_atomic
from .registry import ENCODERS, HEADS, REQUIRED, Registry
from .resources import config_path, resource_root

# The shipped configs (a wheel's packaged copy, or configs/ in a checkout); code that loads one
# uses med3d.resources.resource_path, which says so when the install lacks it.
CONFIG_DIR = resource_root() / "configs"


# ---------------------------------------------------------------- model: derived from the registered builders
# model.encoder and model.heads.<task> hold a registered component's name (``arch`` / ``type``) and its
# builder's declared arguments (med3d.registry reads them from the signature), so a newly registered
# encoder or head is usable from YAML without editing this file.


@dataclass
class EncoderConfig:
    """``model.encoder``: ``arch`` names a registered encoder; the other keys are its builder's arguments."""

    arch: str = "resnet18"
    in_channels: int = 1  # every encoder declares it; the data checks read it

    @classmethod
    def _schema_variant(cls, data: Dict[str, Any], prefix: str) -> Tuple[type, Dict[str, Any]]:
        return _component_variant(cls, data, prefix)


@dataclass
class HeadConfig:
    """``model.heads.<task>``: ``type`` names a registered head; the other keys are its builder's arguments."""

    type: str = "med3d"
    num_classes: int = 2

    @classmethod
    def _schema_variant(cls, data: Dict[str, Any], prefix: str) -> Tuple[type, Dict[str, Any]]:
        return _component_variant(cls, data, prefix)


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=lambda: component_config(EncoderConfig, EncoderConfig.arch)())
    heads: Dict[str, HeadConfig] = field(default_factory=dict)
    # Per-task 1x1x1 input adapters (task -> its channel count), for data.input_policy 'adapter'.
    adapters: Dict[str, int] = field(default_factory=dict)


_VARIANTS: Dict[Tuple[str, str], type] = {}


def _registry(base: type) -> Registry:
    from . import models  # noqa: F401  (importing it registers the encoders and heads)

    return ENCODERS if issubclass(base, EncoderConfig) else HEADS


def _field(default: Any) -> Any:
    if default is REQUIRED:  # checked by _component_variant, which names the key
        return field(default=None)
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: copy.deepcopy(list(default) if isinstance(default, tuple) else default))
    return field(default=default)


def component_config(base: type, name: str) -> type:
    """The schema of one registered component: ``base``'s keys, then its builder's declared arguments.

    Args:
        base: ``EncoderConfig`` or ``HeadConfig``.
        name: the registered encoder arch or head type.

    Returns:
        A dataclass subclassing ``base`` (made once per name, importable from this module for pickling).

    Raises:
        Med3DError: ``name`` is not registered.
    """
    key = (base.__name__, name)
    if key not in _VARIANTS:
        reg = _registry(base)
        own = {f.name for f in dataclasses.fields(base)}
        fields: List[Any] = [(reg.key, Literal[name], field(default=name))]
        fields += [(p.name, p.type, _field(p.default)) for p in reg.params(name).values() if p.name not in own]
        cls = dataclasses.make_dataclass(f"{base.__name__}_{name}", fields, bases=(base,))
        cls.__module__ = __name__
        _VARIANTS[key] = cls
    return _VARIANTS[key]


def __getattr__(attr: str) -> Any:
    """Variant schemas by class name (``EncoderConfig_resnet50``), so pickled configs load in a new process."""
    base, _, name = attr.partition("_")
    if name and base in ("EncoderConfig", "HeadConfig"):
        return component_config(globals()[base], name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _component_variant(base: type, data: Dict[str, Any], prefix: str) -> Tuple[type, Dict[str, Any]]:
    """Pick the schema for a section by its ``arch`` / ``type`` key and check its keys against that builder.

    Returns:
        (schema class, the data with old argument names mapped).

    Raises:
        Med3DError: unknown component, a key only other components take, or a required key missing.
    """
    reg = _registry(base)
    name = _checked(data.get(reg.key, getattr(base, reg.key)), Literal[tuple(reg.names())], f"{prefix}.{reg.key}")
    data = reg.upgrade(name, data)
    cls = component_config(base, name)
    hints = typing.get_type_hints(cls)
    data = {k: v for k, v in data.items() if not _default_null(reg, hints, k, v)}
    _check_component_keys(reg, name, list(hints), data, prefix)
    base_keys = {f.name for f in dataclasses.fields(base)}
    for p in reg.params(name).values():
        if p.default is REQUIRED and p.name not in data and p.name not in base_keys:
            raise Med3DError(f"config key '{prefix}.{p.name}' is required by a {name} {reg.kind}; set it")
    return cls, data


def _check_component_keys(reg: Registry, name: str, keys: List[str], data: Dict[str, Any], prefix: str) -> None:
    """A key that only other components of this kind take gets a line saying so (typos: _build's did-you-mean)."""
    for key in data:
        others = [n for n in reg.names() if n != name and key in reg.params(n)]
        if key not in keys and others:
            raise Med3DError(f"unknown config key '{prefix}.{key}': a {name} {reg.kind} does not take it (only "
                             f"{', '.join(others)} {reg.kind}s do); it takes: {', '.join(keys)}")


def _default_null(reg: Registry, hints: Dict[str, Any], key: str, value: Any) -> bool:
    """Whether ``key: null`` stands for "the builder's default" and is best dropped.

    Configs before 0.2 listed every head's options with null where unused (old checkpoints hold
    them), so a null for an argument that is no Optional, or that only other components take, is dropped.
    """
    if value is not None:
        return False
    if key in hints:
        tp = hints[key]
        return not (tp is type(None) or (typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)))
    return any(key in reg.params(n) for n in reg.names())


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0


@dataclass
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 2  # global batch per optimizer step (split over DDP ranks and accumulation)
    accumulate: int = 1  # micro-batches per step on each rank
    lr: float = 0.01
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.99
    weight_decay: float = 3e-5
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_iterations: int = 0
    amp: Literal["none", "bf16", "fp16"] = "none"
    clip_grad: Optional[float] = 12.0  # max gradient norm; null: no clipping
    loss: Literal["dice_ce", "focal", "dice_focal"] = "dice_ce"  # segmentation tasks
    ignore_label: Optional[int] = None  # voxels with this label count in no loss
    cls_loss: Literal["ce", "focal"] = "ce"  # classification tasks
    label_smoothing: float = 0.0  # classification cross-entropy
    class_weights: Optional[List[float]] = None  # classification: one loss weight per class
    channels_last: bool = False  # channels_last_3d memory format
    compile: bool = False  # torch.compile the model
    sync_bn: bool = False  # SyncBatchNorm under DDP (GPU only)
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    threads: Optional[int] = None  # torch CPU threads; null: torch's default
    contrastive_temperature: float = 0.1  # contrastive tasks: NT-Xent temperature (lower: sharper)


@dataclass
class DatasetEntry:
    path: str  # raw dataset folder, Decathlon or nnU-Net v2 layout
    descriptor: Optional[str] = None  # descriptor YAML; null: the one shipped in datasets/ for this name
    spacing: Optional[List[float]] = None  # target spacing (z, y, x) mm; null: the plan's
    normalization: Optional[List[str]] = None  # per channel: ct | zscore | none
    # Which channel(s) to feed (e.g. [0, 2, 3] for three of BraTS' four); null: all when the encoder takes
    # that many, else data.input_policy decides.
    channel: Optional[Union[int, List[int]]] = None
    loss_weight: float = 1.0
    # Classification: the region cut around each case's ROI centre (z, y, x) mm; null: the dataset's.
    crop_mm: Optional[List[float]] = None
    # Structures to train on, name -> value(s) in the label files (numbered 1, 2, ... in this order; every
    # other value is background); the files are not changed. null: dataset.json's label_map, else its labels.
    label_map: Optional[Dict[str, Union[int, List[int]]]] = None
    # Fixed HU window [low, high] for CT channels instead of the training scans' percentiles.
    ct_window: Optional[List[float]] = None
    # Self-supervised (restore, contrastive) tasks: which images of a dataset folder they learn from, labels
    # withheld: its training images, its test images (imagesTs / 'test'), or all. null: all.
    images: Optional[Literal["training", "test", "all"]] = None
    # Self-supervised tasks on a plain folder of images: one name per channel (CT, T2, ...), which chooses
    # the normalisation as for labelled data of that modality; null: one channel named 'image' (z-scored).
    modality: Optional[List[str]] = None
    # Segmentation tasks: pseudo-labelled scans (a `med3d pseudo-label` folder) trained beside the labelled
    # cases by the same head (teacher-student); null: none.
    pseudo: Optional[PseudoConfig] = None


@dataclass
class RestoreConfig:
    """Models Genesis corruptions of a restore task's patches: the probability of each per patch."""

    nonlinear: float = 0.9  # remap intensities through a random monotone Bezier curve
    shuffle: float = 0.5  # shuffle voxels inside small blocks
    shuffle_blocks: int = 200  # blocks shuffled per patch (each side up to a tenth of the patch)
    paint: float = 0.9  # fill inner boxes (in-painting) or all but one box (out-painting) with noise
    inpaint_share: float = 0.2  # of the painted patches, the share in-painted (the rest out-painted)


@dataclass
class AugmentConfig:
    """Probability of each augmentation per patch (0 turns it off)."""

    flip: float = 0.5  # per axis
    rot90: float = 0.0  # in-plane quarter turns
    affine: float = 0.2
    rotate_deg: float = 15.0
    scale: float = 0.15
    elastic: float = 0.0
    intensity_scale: float = 0.15
    intensity_shift: float = 0.15
    gamma: float = 0.3
    noise: float = 0.1
    blur: float = 0.1


# A student learns more from pseudo-labels under stronger noise than its teacher saw (Xie et al.'s noisy
# student): at least these probabilities and ranges (larger rotations and zooms, and intensity changes,
# noise and blur in most patches) for the augmentations data.augment turns on.
STUDENT_AUGMENT = dict(affine=0.5, rotate_deg=30.0, scale=0.25, intensity_scale=0.5, intensity_shift=0.5,
                       gamma=0.5, noise=0.5, blur=0.3)
# The range keys of STUDENT_AUGMENT and the probability that switches each on.
_RANGE_OF = {"rotate_deg": "affine", "scale": "affine"}


@dataclass
class PseudoConfig:
    """Pseudo-labelled scans trained beside a segmentation task's labelled cases."""

    path: str  # folder written by `med3d pseudo-label` (its pseudo_labels.json lists the scans)
    threshold: float = 0.9  # voxels whose confidence is below this count in no loss term
    loss_weight: float = 1.0  # weight of the pseudo-labelled batches' loss (times the task's loss_weight)
    # Augmentation of the pseudo-labelled patches, a whole section like data.augment (keys left out take their
    # defaults); null: data.augment made stronger (STUDENT_AUGMENT), what it turns off staying off.
    augment: Optional[AugmentConfig] = None

    def student_augment(self, base: AugmentConfig) -> AugmentConfig:
        """The augmentation of pseudo-labelled patches: ``augment``, else ``base`` raised to STUDENT_AUGMENT.

        Each probability and range becomes the larger of ``base``'s and STUDENT_AUGMENT's, except where
        ``base`` switches an augmentation off (probability 0): a flip or noise left out on purpose (left and
        right anatomy, a clean modality) stays out for the student too.
        """
        if self.augment is not None:
            return self.augment
        raised = {}
        for key, value in STUDENT_AUGMENT.items():
            switch = getattr(base, _RANGE_OF.get(key, key))
            raised[key] = getattr(base, key) if switch == 0 else max(getattr(base, key), value)
        return replace(base, **raised)


@dataclass
class DataConfig:
    datasets: Dict[str, DatasetEntry] = field(default_factory=dict)  # task name (= head name) -> dataset
    cache_dir: str = "cache"
    patch_size: List[int] = field(default_factory=lambda: [64, 64, 64])  # (z, y, x) voxels
    foreground_share: float = 0.33  # patches centred on a labelled voxel (nnU-Net forces a third)
    mixing: Literal["round_robin", "proportional", "temperature"] = "round_robin"
    temperature: float = 2.0
    input_policy: Literal["select", "adapter"] = "select"
    select_channel: int = 0
    val_fraction: float = 0.2  # held-out share of each dataset's training cases
    train_cases: Optional[Union[int, float]] = None  # small-data studies: a count, or a fraction
    # Cross-validation (one dataset): k folds, grouped by patient and stratified by class, or the folds of
    # an nnU-Net style splits_final.json; data.fold picks the fold to train. null: the val_fraction hold-out.
    folds: Optional[int] = None
    fold: Optional[int] = None
    splits_file: Optional[str] = None
    val_cases: Optional[List[str]] = None  # named validation cases (case ids); the rest train
    workers: int = 2
    pin_memory: bool = True  # used on GPU only
    persistent_workers: bool = True
    check: bool = True  # run check-data before training
    class_balance: bool = True  # classification: draw each class equally often (else as they come)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)  # restore tasks: corruption probabilities


@dataclass
class ValidationConfig:
    every: int = 0  # iterations between validations; 0: only at the end
    overlap: float = 0.5
    sw_batch_size: int = 2
    hd95: bool = True
    max_cases: Optional[int] = None  # per task
    # Classification tasks' score, which picks the best checkpoint with the other tasks' scores.
    class_metric: Literal["auc", "balanced_accuracy", "accuracy"] = "auc"
    allow_none: bool = False  # train with no validation case at all (refused otherwise)


@dataclass
class FinetuneConfig:
    weights: Optional[str] = None  # any file load_pretrained reads; null: train from scratch
    source: str = "auto"
    init: Literal["full", "first_k", "mean_var", "scratch"] = "full"
    first_k: int = 2
    # The file's input channels, one entry per model channel: a source index, "mean" or "zero"
    # (BraTS' four MR sequences on an RGB network: [0, 1, 2, mean]); null: adapt by channel count.
    channel_map: Optional[List[Union[int, Literal["mean", "zero"]]]] = None
    freeze: List[str] = field(default_factory=list)  # encoder stages: stem, layer1..layer4
    unfreeze_at: Optional[int] = None  # iteration at which frozen stages start training
    encoder_lr_mult: float = 1.0
    head_lr_mult: float = 1.0  # MedicalNet trains new layers at 100x the pretrained ones


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# ---------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return "mapping" if dataclasses.is_dataclass(tp) else getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against type ``tp``; raise Med3DError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise _Mismatch
        return value
    if origin is Union:
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, List):
        if not isinstance(value, list):
            raise _Mismatch
        return [_checked(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise _Mismatch
        return {str(k): _checked(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise _Mismatch
    if not isinstance(value, tp):
        raise _Mismatch
    return value


def _checked(value: Any, tp: Any, key: str) -> Any:
    try:
        return _convert(value, tp, key)
    except _Mismatch:
        raise Med3DError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


# Top-level sections that the experiment runners read (and remove) before the rest is a training config.
_RUNNER_SECTIONS = {"study": "study", "teacher_student": "teacher-student"}


def _build(cls: Any, data: Dict[str, Any], prefix: str) -> Any:
    if hasattr(cls, "_schema_variant"):  # keys that depend on one of them: model.encoder (arch), heads (type)
        cls, data = cls._schema_variant(data, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if not prefix and key in _RUNNER_SECTIONS:  # a study or teacher-student file given to another command
            raise Med3DError(f"config key '{key}': this file describes several runs; run it with "
                             f"'med3d {_RUNNER_SECTIONS[key]} FILE'")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(names)}"
            raise Med3DError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _checked(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------- loading

# A config is a few hundred values in a few kilobytes; these bounds stop a hostile or mistaken file
# (a YAML alias bomb, a huge or binary file named as _base_, an endless _base_ chain) in one line.
MAX_CONFIG_BYTES = 4 << 20
MAX_YAML_VALUES = 100_000  # after expanding aliases and merge keys
MAX_YAML_DEPTH = 64  # nested mappings and lists
MAX_BASE_DEPTH = 16  # _base_ files inheriting from _base_ files
MAX_BASE_FILES = 256  # files read for one config, over every branch


def _expanded_size(node: yaml.Node, limit: int, memo: Dict[int, int]) -> int:
    """Values ``node`` stands for once every alias is expanded, counted up to ``limit``.

    PyYAML builds an aliased node once and shares it, so loading is cheap but anything that walks
    the result (merging, validation, a dump of the resolved config) sees every copy; merge keys
    (``<<``) are even copied while loading. Sizes are memoised per node, so this costs one pass.
    """
    key = id(node)
    if key not in memo:
        children: List[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += _expanded_size(child, limit, memo)
            if total > limit:
                break
        memo[key] = total
    return memo[key]


def _flow_depth(text: str) -> int:
    """The deepest nesting of flow brackets (``[`` ``{``) in ``text``, quotes ignored (an upper bound)."""
    depth = deepest = 0
    for ch in re.sub(r"[^\[\]{}]+", "", text):
        depth = depth + 1 if ch in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of ``text``, refused when its aliases expand past ``MAX_YAML_VALUES`` values.

    Errors give the line only, never the text there: a file named as ``_base_`` may be anything.

    Args:
        text: the YAML.
        where: the file (or override) for messages.

    Returns:
        The loaded data.

    Raises:
        Med3DError: invalid YAML (with its line), nesting too deep, or an alias bomb.
    """
    if _flow_depth(text) > MAX_YAML_DEPTH:  # PyYAML's scanner slows quadratically with [ { nesting
        raise Med3DError(f"{where}: refused: its YAML nests more than {MAX_YAML_DEPTH} levels deep; a config "
                         "needs a few")
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_VALUES, {}) > MAX_YAML_VALUES:
            raise Med3DError(f"{where}: refused: its aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML "
                             "alias bomb?); a config needs a few hundred, so write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise Med3DError(f"{where}: not valid YAML{line}; fix the syntax")
    except RecursionError:
        raise Med3DError(f"{where}: refused: its YAML nests too deeply to be a config")
    finally:
        if loader is not None:
            loader.dispose()


def _read_yaml(path: Path, via: str = "") -> Dict[str, Any]:
    """One config file as a mapping; ``via`` says which file names it as ``_base_`` (for messages)."""
    where = f"{path}{via}"
    if not path.is_file():
        raise Med3DError(f"{where}: config file not found")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise Med3DError(f"{where}: {path.stat().st_size:,} bytes, too large for a config "
                             f"(limit {MAX_CONFIG_BYTES:,}); is it the right file?")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise Med3DError(f"{where}: not a text file (not UTF-8); a config is YAML text")
    except OSError as err:
        raise Med3DError(f"{where}: cannot be read ({err.strerror or type(err).__name__})")
    data = safe_yaml(text, where) or {}
    if not isinstance(data, dict):
        raise Med3DError(f"{where}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Input paths a config names (data and weights): relative to the file that names them, like _base_.
# Outputs (data.cache_dir, run.out_dir) stay relative to the folder med3d runs in.
INPUT_PATH_KEYS = ("data.datasets.*.path", "data.datasets.*.descriptor", "data.datasets.*.pseudo.path",
                   "data.splits_file", "finetune.weights")


def _absolute(value: Any, folder: Path) -> Any:
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (folder / p).resolve())


def resolve_input_paths(data: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """``data`` (one config file's mapping) with its ``INPUT_PATH_KEYS`` made absolute against ``folder``.

    Args:
        data: the mapping read from one YAML file (before merging with its bases).
        folder: the folder of that file.

    Returns:
        A copy with the input paths absolute; anything else unchanged.
    """
    data = copy.deepcopy(data)
    for key in INPUT_PATH_KEYS:
        head, _, leaf = key.rpartition(".")
        nodes = [data]
        for part in head.split("."):
            step = []
            for node in nodes:
                child = node.get(part) if isinstance(node, dict) else None
                if part == "*" and isinstance(node, dict):
                    step += [v for v in node.values() if isinstance(v, dict)]
                elif isinstance(child, dict):
                    step.append(child)
            nodes = step
        for node in nodes:
            if leaf in node:
                node[leaf] = _absolute(node[leaf], folder)
    return data


def _shipped(path: Path) -> bool:
    """The configs shipped with med3d are templates run from a project folder: their paths stay as written."""
    try:
        return path.is_relative_to(CONFIG_DIR.resolve())
    except OSError:
        return False


def load_yaml_tree(path: Union[str, Path], _seen: Sequence[Path] = (), _read: Optional[List[Path]] = None
                   ) -> Dict[str, Any]:
    """Read a YAML config and merge in its ``_base_`` file(s) (paths relative to it; later wins).

    Data and weight paths (``INPUT_PATH_KEYS``) are taken relative to the file that names them, except
    in the configs shipped with med3d (templates whose paths name the folder you run from).

    Raises:
        Med3DError: a file is unreadable or no mapping, ``_base_`` loops, nests deeper than
            ``MAX_BASE_DEPTH`` or reads more than ``MAX_BASE_FILES`` files, or is not a path.
    """
    path = Path(path).resolve()
    read = [] if _read is None else _read
    via = f" (the _base_ of {_seen[-1]})" if _seen else ""
    if path in _seen:
        raise Med3DError(f"{path}: _base_ inheritance loops back to this file")
    if len(_seen) >= MAX_BASE_DEPTH:
        raise Med3DError(f"{path}{via}: _base_ files nest more than {MAX_BASE_DEPTH} deep (from {_seen[0]}); "
                         "flatten the chain")
    read.append(path)
    if len(read) > MAX_BASE_FILES:
        raise Med3DError(f"{_seen[0] if _seen else path}: its _base_ files make more than {MAX_BASE_FILES} reads; "
                         "name each base once")
    data = _read_yaml(path, via)
    if not _shipped(path):
        data = resolve_input_paths(data, path.parent)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b and "\0" not in b for b in bases):
        raise Med3DError(f"{path}{via}: _base_ must be a file path or a list of them")
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, load_yaml_tree(path.parent / base, (*_seen, path), read))
    return _merge(merged, data)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (``0.01``, ``[1,2]``, ``null``)."""
    data = _merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise Med3DError(f"override '{item}': write it as section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise Med3DError(f"override '{item}': '{part}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = safe_yaml(raw, f"override '{item}'")  # its messages name the override
    return data


def _train_cases(value: Any, name: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return V.at_least(1)(value, name)
    return V.in_range(value, name + " (a share of the cases)", 0, 1, low_open=True)


def _channel(value: Any, name: str) -> Any:
    return V.each(V.at_least(0))(value, name) if isinstance(value, list) else V.at_least(0)(value, name)


def _window(value: Any, name: str) -> Any:
    low, high = V.each(V.in_range, 2)(value, name)
    if low >= high:
        raise Med3DError(f"{name}: the low end must be below the high end, got {value}")
    return value


def _seed(value: Any, name: str) -> Any:
    return V.in_range(V.at_least(0)(value, name), name, 0, 2 ** 32 - 1)  # numpy's seed range


def _degrees(value: Any, name: str) -> Any:
    return V.in_range(value, name, 0, 180)


# What each of these accepts, for ``med3d config --schema`` (V's checks say it themselves).
_train_cases.range = "a count >= 1, or a share in (0, 1]"  # type: ignore[attr-defined]
_channel.range = "channel index >= 0, or a list of them"  # type: ignore[attr-defined]
_window.range = "[low, high] with low < high"  # type: ignore[attr-defined]
_seed.range = "whole number in [0, 2^32 - 1]"  # type: ignore[attr-defined]
_degrees.range = "in [0, 180]"  # type: ignore[attr-defined]


# Numeric keys and the values that make sense (``*``: any task). A value outside is refused when the
# config is loaded, naming the key, instead of failing deep inside MONAI or torch, possibly hours into
# a run (validation.overlap 1.0 used to crash at the final validation and lose the final checkpoint).
_PROBABILITIES = ("flip", "rot90", "affine", "elastic", "intensity_scale", "intensity_shift", "gamma", "noise", "blur")
RANGES: Tuple[Tuple[str, V.Check], ...] = (
    ("run.seed", _seed),
    ("train.iterations", V.at_least(1)), ("train.batch_size", V.at_least(1)), ("train.accumulate", V.at_least(1)),
    ("train.lr", V.positive), ("train.momentum", V.fraction), ("train.weight_decay", V.non_negative),
    ("train.warmup_iterations", V.at_least(0)), ("train.clip_grad", V.positive),
    ("train.label_smoothing", V.fraction), ("train.class_weights", V.each(V.non_negative)),
    ("train.checkpoint_every", V.at_least(1)), ("train.keep_last", V.at_least(0)), ("train.log_every", V.at_least(1)),
    ("train.threads", V.at_least(1)),
    ("data.patch_size", V.each(V.at_least(1), 3)), ("data.foreground_share", V.probability),
    ("data.temperature", V.positive), ("data.select_channel", V.at_least(0)), ("data.val_fraction", V.fraction),
    ("data.train_cases", _train_cases),  # data.folds and data.fold: checked against the split at preflight
    ("data.workers", V.at_least(0)),
    *((f"data.augment.{k}", V.probability) for k in _PROBABILITIES),
    ("data.augment.rotate_deg", _degrees), ("data.augment.scale", V.fraction),
    ("data.datasets.*.spacing", V.spacing), ("data.datasets.*.channel", _channel),
    ("data.datasets.*.loss_weight", V.non_negative), ("data.datasets.*.crop_mm", V.each(V.positive, 3)),
    ("data.datasets.*.ct_window", _window),
    ("data.datasets.*.pseudo.threshold", V.probability), ("data.datasets.*.pseudo.loss_weight", V.non_negative),
    *((f"data.datasets.*.pseudo.augment.{k}", V.probability) for k in _PROBABILITIES),
    ("data.datasets.*.pseudo.augment.rotate_deg", _degrees), ("data.datasets.*.pseudo.augment.scale", V.fraction),
    ("validation.every", V.at_least(0)), ("validation.overlap", V.fraction),
    ("validation.sw_batch_size", V.at_least(1)), ("validation.max_cases", V.at_least(1)),
    ("finetune.first_k", V.at_least(0)), ("finetune.unfreeze_at", V.at_least(0)),
    ("finetune.encoder_lr_mult", V.non_negative), ("finetune.head_lr_mult", V.non_negative),
    ("model.adapters.*", V.at_least(1)), ("model.encoder.in_channels", V.at_least(1)),
    ("model.heads.*.num_classes", V.at_least(1)),
    ("train.contrastive_temperature", V.positive), ("data.restore.shuffle_blocks", V.at_least(0)),
    *((f"data.restore.{k}", V.probability) for k in ("nonlinear", "shuffle", "paint", "inpaint_share")),
)


def _values_at(node: Any, parts: Sequence[str], key: str) -> List[Tuple[str, Any]]:
    """``(dotted key, value)`` of every value at ``parts`` below ``node`` (``*``: each entry of a mapping)."""
    if not parts:
        return [(key, node)] if node is not None else []
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = list(node.items()) if isinstance(node, dict) else []
    else:
        items = [(head, node.get(head) if isinstance(node, dict) else getattr(node, head, None))]
    out: List[Tuple[str, Any]] = []
    for name, child in items:
        out += _values_at(child, rest, f"{key}.{name}" if key else str(name))
    return out


def check_ranges(cfg: Config) -> Config:
    """Refuse a numeric key outside its range (``RANGES``), naming the key and the range.

    Args:
        cfg: a config that passed the type checks.

    Returns:
        ``cfg``.

    Raises:
        Med3DError: the first key out of range.
    """
    for pattern, check in RANGES:
        for key, value in _values_at(cfg, pattern.split("."), ""):
            try:
                check(value, key)
            except Med3DError as err:  # "key[i]: must be ..." -> "config key 'key[i]': must be ..."
                name, _, problem = str(err).partition(": ")
                raise Med3DError(f"config key '{name}': {problem}")
    return cfg


def from_dict(data: Dict[str, Any]) -> Config:
    """Validate a plain mapping against the schema: every key's type, then every numeric key's range.

    Raises:
        Med3DError: one line naming the first key that is unknown, of the wrong type or out of range.
    """
    return check_ranges(_build(Config, data, ""))


def load_runner_file(path: Union[str, Path], overrides: Sequence[str], section: str
                     ) -> Tuple[Path, Dict[str, Any], Any]:
    """A study or teacher-student file: a training config plus a top-level ``section`` that its runner reads.

    Paths resolve as ``load_config`` resolves them (in the files against the files, ``--set`` values
    against the working folder); a shipped file is found by its name from any folder.

    Args:
        path: the YAML file.
        overrides: ``--set key=value`` for the config or the section.
        section: the runner's key (``study``, ``teacher_student``).

    Returns:
        The file's path, the config mapping without the section (not yet validated), and the section
        as written (None when absent).

    Raises:
        Med3DError: the file cannot be read or merged.
    """
    path = config_path(path)
    base = resolve_input_paths(apply_overrides(load_yaml_tree(path), overrides), Path.cwd())
    return path, base, base.pop(section, None)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Load, merge, override and validate a config (``path=None``: the schema defaults).

    Input paths come out absolute: those in a file against the file's folder (``load_yaml_tree``), the
    rest (shipped templates, ``--set`` values) against the working folder, so a saved resolved config
    means the same wherever it is read again.
    """
    data = load_yaml_tree(config_path(path)) if path is not None else {}
    return from_dict(resolve_input_paths(apply_overrides(data, overrides), Path.cwd()))


def to_dict(cfg: Config) -> Dict[str, Any]:
    """The resolved config as plain data."""
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, out_dir: Union[str, Path]) -> Path:
    """Write the resolved config as ``config.yaml`` in ``out_dir`` (atomically)."""
    return write_yaml_atomic(Path(out_dir) / "config.yaml", to_dict(cfg))
