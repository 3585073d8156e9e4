"""Atomic file writing: outputs appear whole or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .errors import Med3DError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception leaves any previous file untouched and no partial file behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise Med3DError(f"{path}: already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix so writers that dispatch on it (nibabel) still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any], overwrite: bool = True) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write text to ``path`` atomically."""
    return write_atomic(path, lambda p: p.write_text(text), overwrite=overwrite)


def write_json_atomic(path: str | os.PathLike, data: Any, overwrite: bool = True) -> Path:
    """Write JSON (indented, readable) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def write_yaml_atomic(path: str | os.PathLike, data: Any, overwrite: bool = True) -> Path:
    """Write YAML to ``path`` atomically."""
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False), overwrite=overwrite)
