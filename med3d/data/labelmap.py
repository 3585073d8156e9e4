"""Label mappings: train on some structures of a label map without rewriting the label files.

A mapping names the structures to keep and the value(s) each has in the label files, e.g.
``{"liver": 5, "spleen": 1}`` (or ``--labels liver=5 spleen=1`` on the command line). The kept
structures are numbered 1, 2, ... in the order given; every other value becomes background 0.
The mapping is applied whenever a label file is read for training or evaluation (check-data,
fingerprint, prepare, evaluate against a dataset folder); the files themselves are never changed.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import Med3DError

_LUT_LIMIT = 1 << 16  # label values below this are mapped through a lookup table
LabelMapSpec = Mapping[str, Union[int, Sequence[int]]]  # name -> source value(s), in training order


def parse_label_args(items: Sequence[str]) -> Dict[str, List[int]]:
    """``["liver=5", "kidney=2,3"]`` -> ``{"liver": [5], "kidney": [2, 3]}``.

    Args:
        items: ``NAME=VALUE[,VALUE...]`` strings, in the order the labels should be numbered.

    Returns:
        The mapping, name -> source values.

    Raises:
        Med3DError: an item is not ``NAME=VALUE`` with integer values, or a name comes twice.
    """
    out: Dict[str, List[int]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        try:
            values = [int(v) for v in raw.split(",")] if sep and name else None
        except ValueError:
            values = None
        if not values:
            raise Med3DError(f"--labels {item}: write each label as NAME=VALUE (e.g. liver=5, or kidney=2,3 for "
                             "several values in the label files)")
        if name.strip() in out:  # a dict would silently keep the last one
            raise Med3DError(f"--labels {item}: '{name.strip()}' is named twice; name each structure once "
                             "(kidney=2,3 joins several values)")
        out[name.strip()] = values
    return out


def resolve_label_map(spec: LabelMapSpec, where: str) -> Tuple[Dict[int, str], Dict[int, int]]:
    """The training labels and the source-to-training value table of a mapping.

    Args:
        spec: name -> source value or values, in the order the labels are numbered (1, 2, ...).
        where: how errors name the mapping (a file or config key).

    Returns:
        ``({0: "background", 1: name, ...}, {source value: training value})``.

    Raises:
        Med3DError: an empty mapping, an entry written value: name, a name called background, a
            negative value or one claimed by two names.
    """
    if not spec:
        raise Med3DError(f"{where}: the label mapping is empty; name at least one structure (e.g. liver: 5)")
    labels: Dict[int, str] = {0: "background"}
    table: Dict[int, int] = {}
    for target, (name, raw) in enumerate(spec.items(), start=1):
        if str(name).lower() == "background":
            raise Med3DError(f"{where}: 'background' is what every unmapped value becomes; map only the "
                             "structures to keep")
        if isinstance(raw, str) or isinstance(raw, Mapping):  # Decathlon's order, value: name, written by habit
            raise Med3DError(f"{where}: entry {name!r}: {raw!r} is not NAME: VALUE; write the structure's name "
                             "first and its value(s) in the label files second (e.g. liver: 5)")
        values = [raw] if isinstance(raw, (int, np.integer)) else list(raw)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise Med3DError(f"{where}: label '{name}' maps value {v!r}; values must be non-negative integers")
            if int(v) in table:
                raise Med3DError(f"{where}: value {v} is mapped to both '{labels[table[int(v)]]}' and '{name}'")
            table[int(v)] = target
        labels[target] = str(name)
    return labels, table


def apply_table(array: np.ndarray, table: Optional[Mapping[int, int]]) -> np.ndarray:
    """A label array with ``table`` applied (source value -> training value, anything else 0).

    Args:
        array: integer label values, any shape.
        table: the mapping's value table; None returns ``array`` unchanged.

    Returns:
        A new array of the same shape and dtype (or ``array`` itself without a table).
    """
    if table is None:
        return array
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() < _LUT_LIMIT:
        # One lookup instead of a pass per mapped value (a map of every TotalSegmentator id has 117).
        lut = np.zeros(max(int(array.max()), *table) + 1, dtype=array.dtype)
        lut[list(table)] = list(table.values())
        return lut[array]
    out = np.zeros_like(array)
    for src, dst in table.items():
        out[array == src] = dst
    return out

