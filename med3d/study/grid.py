"""A study file: a fine-tuning config plus a ``study:`` section naming the grid to run.

```yaml
_base_: finetune.yaml          # any fine-tuning config (its keys apply to every run)
study:
  inits:                       # name -> config keys that make this initialisation
    scratch: {finetune.init: scratch}
    pretrained: {finetune.init: full}
    mean_var: {finetune.init: mean_var}
    first_2: {finetune.init: first_k, finetune.first_k: 2}
    inflated_2d: {finetune.weights: weights/resnet18_inflated.safetensors, finetune.init: full}
  train_cases: [2, 4, 1.0]     # training-set sizes: counts or fractions of the fold's training cases
  folds: 3                     # k-fold cross-validation: each cell trains every fold ...
  seeds: null                  # ... or, instead, these seeds on the val_fraction hold-out
  reference: scratch           # the initialisation gains are measured against
  levels: [0.5, 0.7]           # report the first iteration reaching these validation scores
  bootstrap: 2000              # resamples for the paired bootstrap interval of the gains
```

Every run shares the base config's budget (``train.iterations``, batch, schedule); only the keys an
initialisation names, ``data.train_cases`` and the fold (or seed) differ.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..config import Config, _shipped, from_dict, load_runner_file, resolve_input_paths
from ..errors import Med3DError

Size = Union[int, float]
KEYS = ("inits", "train_cases", "folds", "seeds", "reference", "levels", "bootstrap")


@dataclass
class Study:
    """The grid: initialisations x training-set sizes x folds (or seeds), over one base config."""

    base: Dict[str, Any]  # the resolved config mapping every run starts from
    inits: Dict[str, Dict[str, Any]]
    sizes: List[Optional[Size]]
    folds: Optional[int] = None
    seeds: Optional[List[int]] = None
    reference: Optional[str] = None
    levels: List[float] = field(default_factory=list)
    bootstrap: int = 2000
    folder: Path = Path(".")  # where the initialisations' relative weight paths start (as in any config file)

    @property
    def out_dir(self) -> Path:
        return Path(self.base["run"]["out_dir"])

    @property
    def repeats(self) -> List[str]:
        """``fold_0``, ... or ``seed_0``, ...: the paired replicates of every cell."""
        if self.folds:
            return [f"fold_{f}" for f in range(self.folds)]
        return [f"seed_{s}" for s in self.seeds or [self.base["run"]["seed"]]]


@dataclass
class Run:
    """One cell and replicate of the grid."""

    init: str
    size: Optional[Size]
    repeat: str
    cfg: Config

    @property
    def folder(self) -> Path:
        return Path(self.cfg.run.out_dir)


def size_label(size: Optional[Size]) -> str:
    """``n4`` for 4 cases, ``f0.5`` for half of them, ``all`` for no limit."""
    if size is None:
        return "all"
    return f"n{size}" if isinstance(size, int) else f"f{size:g}"


def _set(data: Dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.setdefault(part, {}), dict):
            raise Med3DError(f"'{dotted}': '{part}' is not a config section")
        node = node[part]
    node[last] = copy.deepcopy(value)


def _leaves(data: Dict[str, Any], prefix: str = ""):
    """``(dotted key, value)`` for every non-mapping value of a nested mapping."""
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted)
        else:
            yield dotted, value


def _study_section(raw: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(raw, dict):
        raise Med3DError(f"{path}: a study file needs a 'study:' section (inits, train_cases, folds or seeds)")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise Med3DError(f"{path}: unknown key 'study.{unknown[0]}'; valid keys: {', '.join(KEYS)}")
    inits = raw.get("inits")
    if not isinstance(inits, dict) or not inits or not all(isinstance(v, dict) for v in inits.values()):
        raise Med3DError(f"{path}: 'study.inits' must map initialisation names to config keys, e.g. "
                         "{scratch: {finetune.init: scratch}, pretrained: {finetune.init: full}}")
    bad = [str(name) for name in inits if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name))]
    if bad:  # each name becomes a folder under run.out_dir: no separators, no '..', nothing hidden
        raise Med3DError(f"{path}: 'study.inits' name {bad[0]!r} is not a plain folder name; use letters, digits, "
                         "'_', '-' and '.' (not first)")
    sizes = raw.get("train_cases", [None])
    sizes = sizes if isinstance(sizes, list) else [sizes]
    if not sizes or any(s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0)
                        for s in sizes):
        raise Med3DError(f"{path}: 'study.train_cases' must list positive counts (4) or fractions (0.5)")
    if len({size_label(s) for s in sizes}) < len(sizes):
        raise Med3DError(f"{path}: 'study.train_cases' lists a size twice ({sizes}); each size is one cell")
    bootstrap = raw.get("bootstrap", 2000)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise Med3DError(f"{path}: 'study.bootstrap' must be a whole number of resamples, e.g. 2000")
    if raw.get("folds") is not None and raw.get("seeds") is not None:
        raise Med3DError(f"{path}: give 'study.folds' or 'study.seeds', not both")
    return raw


def load_study(path: Union[str, Path], overrides: Sequence[str] = ()) -> Study:
    """Read a study file and check every run's config before any training.

    Args:
        path: the study YAML (a fine-tuning config with a ``study:`` section; ``_base_`` allowed).
        overrides: ``--set key=value`` for the base config or the ``study`` section.

    Returns:
        The study.

    Raises:
        Med3DError: a bad key or value, named in one line.
    """
    path, base, raw = load_runner_file(path, overrides, "study")
    raw = _study_section(raw, path)
    from_dict(base)  # the base alone must be a valid config
    folds, seeds = raw.get("folds"), raw.get("seeds")
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise Med3DError(f"{path}: 'study.folds' must be a whole number of folds, at least 2")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds)):
        raise Med3DError(f"{path}: 'study.seeds' must list whole numbers")
    reference = raw.get("reference", "scratch" if "scratch" in raw["inits"] else None)
    if reference is not None and reference not in raw["inits"]:
        raise Med3DError(f"{path}: 'study.reference' {reference} is not one of study.inits "
                         f"({', '.join(raw['inits'])})")
    levels = raw.get("levels", [])
    if not isinstance(levels, list) or not all(isinstance(v, (int, float)) for v in levels):
        raise Med3DError(f"{path}: 'study.levels' must list validation scores, e.g. [0.5, 0.7]")
    sizes = raw.get("train_cases", [None])
    folder = Path.cwd() if _shipped(path.resolve()) else path.resolve().parent
    study = Study(base, raw["inits"], sizes if isinstance(sizes, list) else [sizes], folds, seeds, reference,
                  [float(v) for v in levels], raw.get("bootstrap", 2000), folder)
    grid(study)  # every run's config is checked now, not half-way through the study
    return study


def grid(study: Study) -> List[Run]:
    """Every run of the study, by size, then replicate, then initialisation (so pairs finish together).

    Raises:
        Med3DError: an initialisation's keys make an invalid config.
    """
    runs = []
    for size in study.sizes:
        for repeat in study.repeats:
            for init, keys in study.inits.items():
                data = copy.deepcopy(study.base)
                try:
                    own: Dict[str, Any] = {}
                    for key, value in keys.items():
                        _set(own, str(key), value)
                    for key, value in _leaves(resolve_input_paths(own, study.folder)):
                        _set(data, key, value)
                except Med3DError as err:
                    raise Med3DError(f"study.inits.{init}: {err}")
                _set(data, "data.train_cases", size)
                kind, number = repeat.split("_")
                if kind == "fold":
                    _set(data, "data.folds", study.folds)
                    _set(data, "data.fold", int(number))
                else:
                    _set(data, "run.seed", int(number))
                _set(data, "run.out_dir", str(study.out_dir / init / size_label(size) / repeat))
                try:
                    cfg = from_dict(data)
                except Med3DError as err:
                    raise Med3DError(f"study.inits.{init}: {err}")
                runs.append(Run(init, size, repeat, cfg))
    return runs
