"""The index of known public encoders (``weights/index.yaml``): read it, list it, verify a file against it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import Med3DError
from .export import tensors_sha256
from .resources import resource_path
from .transfer.formats import describe_state_dict, read_weights, summarize
from .transfer.pretrained import PretrainedCfg, find_pretrained_cfg, pretrained_cfgs, structure_mismatch

INDEX = "weights/index.yaml"
ENTRY_KEYS = ("file", "arch", "shortcut", "layout", "in_channels", "sha256")

Index = Dict[str, Dict[str, Any]]


def read_index(path: Optional[Union[str, Path]] = None) -> Index:
    """Read and check the weights index.

    Args:
        path: an index file; default: the one shipped with med3d.

    Returns:
        family name -> {``published``, ``entries``: [{file, arch, shortcut, layout, in_channels, sha256, ...}]}.

    Raises:
        Med3DError: the file is missing, not YAML, an entry lacks a key, or an entry does not fit a
            registered encoder.
    """
    path = Path(path) if path is not None else resource_path(INDEX)
    if not path.is_file():
        raise Med3DError(f"{path}: weights index not found")
    try:
        index = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise Med3DError(f"{path}: weights index is not valid YAML; fix it or reinstall med3d") from None
    if not isinstance(index, dict):
        raise Med3DError(f"{path}: weights index must map family names to their entries")
    for family, spec in index.items():
        _check_family(path, family, spec)
    pretrained_cfgs(index, str(path))  # every entry fits a registered encoder
    return index


def _check_family(path: Path, family: str, spec: Any) -> None:
    if not isinstance(spec, dict) or "published" not in spec or not isinstance(spec.get("entries"), list):
        raise Med3DError(f"{path}: family '{family}' needs 'published' and a list of 'entries'")
    for i, entry in enumerate(spec["entries"]):
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise Med3DError(f"{path}: {family} entry {i + 1} lacks '{missing[0]}'")


def index_lines(index: Index) -> List[str]:
    """The index as ``med3d weights list`` prints it: one line per family, one per file.

    Args:
        index: as returned by ``read_index``.

    Returns:
        The lines, without newlines.
    """
    lines = []
    for family, spec in index.items():
        lines.append(f"{family}: {spec['published']}")
        for e in spec["entries"]:
            lines.append(f"  {e['file']:<26} {e['arch']:<10} shortcut {e['shortcut']}  {e['layout']:<8} "
                         f"{e['in_channels']} ch  sha256 {e['sha256'] or 'not recorded'}")
    return lines


@dataclass
class Verification:
    """What ``verify_weights`` found: report lines in order, and why the file fails (None: it passes)."""

    lines: List[str] = field(default_factory=list)
    error: Optional[str] = None


def verify_weights(path: Union[str, Path], index: Optional[Index] = None) -> Verification:
    """Check a weights file: its tensor hash (med3d exports) and its index entry (sha256, architecture).

    The entry is found by the file's sha256, else by its name.

    Args:
        path: the weights file.
        index: as returned by ``read_index``; default: the shipped index.

    Returns:
        The findings; ``error`` is set when the file is altered or contradicts its index entry.

    Raises:
        Med3DError: the file is missing or not readable weights.
    """
    path = Path(path)
    if not path.is_file():
        raise Med3DError(f"{path}: weights file not found")
    index = read_index() if index is None else index
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = read_weights(path)
    info = describe_state_dict(weights.state_dict)
    out = Verification([f"{path}: {weights.source} weights, {summarize(info)}; file sha256 {digest}"])
    if weights.metadata.get("sha256"):
        ok = tensors_sha256(weights.state_dict) == weights.metadata["sha256"]
        out.lines.append(f"tensor hash in metadata: {'matches' if ok else 'DOES NOT MATCH'}")
        if not ok:
            out.error = f"{path}: tensors differ from the hash recorded at export; the file is altered"
            return out
    cfg = find_pretrained_cfg(pretrained_cfgs(index), path.name, digest)
    if cfg is None:
        out.lines.append("not in weights/index.yaml")
        return out
    out.error = _entry_mismatch(path, digest, info, cfg)
    if out.error is None:
        checked = "sha256 verified" if cfg.sha256 or cfg.sha256_prefix else "structure verified; sha256 not recorded"
        out.lines.append(f"matches index entry {cfg.file} ({cfg.arch}, shortcut {cfg.encoder.get('shortcut')}, "
                         f"{checked})")
    return out


def _entry_mismatch(path: Path, digest: str, info: Dict[str, Any], cfg: PretrainedCfg) -> Optional[str]:
    """Why the file contradicts its index entry (checksum, then structure), or None."""
    if cfg.sha256 and cfg.sha256 != digest:
        return f"{path}: sha256 {digest} differs from the index's {cfg.sha256} for {cfg.file}"
    if cfg.sha256_prefix and not digest.startswith(cfg.sha256_prefix):
        return f"{path}: sha256 {digest[:8]}... does not start with {cfg.sha256_prefix} as {cfg.file} must"
    why = structure_mismatch(info, cfg)
    return None if why is None else f"{path}: holds {summarize(info)}; {why}"
