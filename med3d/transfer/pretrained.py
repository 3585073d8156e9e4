"""timm-style default configs of the known public weight files listed in ``weights/index.yaml``.

Each entry says which registered encoder a file fits (its arguments), where its first conv and
its source-task head sit, how inputs must be prepared (channels, normalisation, spacing) and its
checksum where recorded. ``med3d weights list / verify`` read these; loaders can build the right
encoder with ``encoder_args``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import Med3DError
from ..registry import ENCODERS

# entry keys that are not encoder arguments
_CFG_KEYS = ("file", "arch", "dims", "first_conv", "classifier", "container", "key_prefix", "input", "sha256",
             "sha256_prefix")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PretrainedCfg:
    """One known weight file: the encoder it fits and its input contract (see weights/index.yaml's header)."""

    file: str
    family: str
    arch: str
    encoder: Dict[str, Any]  # create_encoder(arch, **encoder)
    dims: int = 3
    first_conv: str = "conv1.weight"
    classifier: Tuple[str, ...] = ()
    container: Optional[str] = None
    key_prefix: str = ""
    input: Dict[str, Any] = field(default_factory=dict)  # channels, normalisation, spacing_zyx
    sha256: Optional[str] = None
    sha256_prefix: Optional[str] = None

    def describe(self) -> str:
        """One line for ``med3d weights list``."""
        enc = ", ".join(f"{k} {v}" for k, v in self.encoder.items())
        return (f"{self.file:<26} {self.arch:<10} {enc}; {self.dims}D; "
                f"sha256 {self.sha256 or 'not recorded'}")


def pretrained_cfgs(index: Mapping[str, Any], where: str = "weights/index.yaml") -> List[PretrainedCfg]:
    """The default configs of every entry of a parsed index (``yaml.safe_load`` of weights/index.yaml).

    Args:
        index: family -> {published, entries: [...]}.
        where: the index's name for errors.

    Returns:
        One config per entry, in file order.

    Raises:
        Med3DError: an entry names an unknown encoder, an argument that encoder does not declare,
            or a malformed sha256 (one line naming the file and key).
    """
    out = []
    for family, spec in index.items():
        for entry in spec.get("entries") or []:
            out.append(_cfg(family, dict(entry), where))
    return out


def _cfg(family: str, entry: Dict[str, Any], where: str) -> PretrainedCfg:
    name = entry.get("file", "?")
    if "arch" not in entry or entry["arch"] not in ENCODERS.names():
        raise Med3DError(f"{where}: {family} entry {name}: arch {entry.get('arch')!r} is not a registered encoder; "
                         f"choose one of {', '.join(ENCODERS.names())}")
    params = ENCODERS.params(entry["arch"])
    unknown = [k for k in entry if k not in _CFG_KEYS and k not in params]
    if unknown:
        raise Med3DError(f"{where}: {family} entry {name}: key '{unknown[0]}' is neither an argument of "
                         f"{entry['arch']} nor a default-config key ({', '.join(_CFG_KEYS)})")
    for key in ("sha256",):
        if entry.get(key) is not None and not _SHA256.match(str(entry[key])):
            raise Med3DError(f"{where}: {family} entry {name}: {key} must be 64 lowercase hex digits or null")
    return PretrainedCfg(
        file=name, family=family, arch=entry["arch"], encoder={k: v for k, v in entry.items() if k in params},
        dims=int(entry.get("dims", 3)), first_conv=entry.get("first_conv", "conv1.weight"),
        classifier=tuple(entry.get("classifier") or ()), container=entry.get("container"),
        key_prefix=entry.get("key_prefix") or "", input=dict(entry.get("input") or {}),
        sha256=entry.get("sha256"), sha256_prefix=entry.get("sha256_prefix"))


def find_pretrained_cfg(cfgs: List[PretrainedCfg], name: str, sha256: Optional[str] = None) -> Optional[PretrainedCfg]:
    """The entry whose recorded sha256 is ``sha256``, else the one whose file name is ``name``; None if neither."""
    by_hash = [c for c in cfgs if sha256 and c.sha256 == sha256]
    by_name = [c for c in cfgs if c.file == name]
    return (by_hash or by_name or [None])[0]


def structure_mismatch(info: Mapping[str, Any], cfg: PretrainedCfg) -> Optional[str]:
    """Why a file's structure contradicts its default config, or None when it fits.

    Args:
        info: ``describe_state_dict`` of the file's tensors (after ``key_prefix`` stripping).
        cfg: the file's entry.

    Returns:
        A phrase naming the first differing property (arch, dims, shortcut, input channels, conv), or None.
    """
    want = {"arch": cfg.arch, "dims": cfg.dims, "shortcut": cfg.encoder.get("shortcut"),
            "in_channels": cfg.encoder.get("in_channels")}
    if cfg.dims == 3:  # a 2D file's conv is chosen at inflation
        want["conv"] = cfg.encoder.get("conv")
    for key, value in want.items():
        if value is not None and info.get(key) != value:
            return f"{key} is {info.get(key)} where the index lists {cfg.file} with {key} {value}"
    return None


def encoder_args(cfg: PretrainedCfg) -> Dict[str, Any]:
    """Keyword arguments for ``med3d.create_encoder`` that build the encoder ``cfg``'s file fits (with ``arch``)."""
    return {"arch": cfg.arch, **cfg.encoder}
