"""Where names from data become paths, and where outputs may go.

Two guarantees, checked before any work:

* A name read from data (a case id, a name derived from an image file or DICOM folder, a task
  name) becomes one plain file name: ``safe_name`` refuses ``..``, ``.``, absolute paths, path
  separators, NUL and other control characters, so an output built as ``out / f"{name}.nii.gz"``
  stays inside ``out``.
* An output never destroys an input: ``check_output_dir`` refuses an output folder that is an
  existing file, cannot be written, or is (or lies inside) a folder given as input;
  ``check_targets`` refuses output files that would be input files, and ``check_output_file``
  an output file that is the input itself (both through symbolic links too, with or without
  ``--overwrite``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .errors import Med3DError

PathLike = Union[str, Path]


def safe_name(name: str, where: str) -> str:
    """Return ``name`` when it can be used as one file name inside an output folder.

    Args:
        name: the name as read from data.
        where: how the error names its origin (e.g. ``"dataset.json: dataset key"``).

    Returns:
        ``name`` unchanged.

    Raises:
        Med3DError: empty, ``.`` or ``..``, absolute, holds a path separator, NUL or a control character.
    """
    bad = None
    if not isinstance(name, str) or not name.strip():
        bad = "is empty"
    elif name in (".", ".."):
        bad = "is a relative folder reference"
    elif "\x00" in name:
        bad = "holds a NUL character"
    elif name.startswith("/"):
        bad = "is an absolute path"
    elif "/" in name or "\\" in name:  # a backslash is a separator where the outputs may be copied (Windows)
        bad = "holds a path separator"
    if bad is None and any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "holds a control character"
    if bad:
        raise Med3DError(f"{printable(where)}: case name {name!r} {bad}; names become output file names, so use "
                         "plain names (letters, digits, '_', '-', '.')")
    return name


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``), so a message naming a file stays one line."""
    return "".join(repr(c)[1:-1] if ord(c) < 32 or ord(c) == 127 else c for c in str(text))


def _real(path: PathLike) -> Path:
    """The absolute path with every symbolic link resolved (the path need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _writable_ancestor(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` (itself included) when it is a folder we may write in."""
    p = path
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return None
    readonly = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    return None if readonly or not os.access(p, os.W_OK | os.X_OK) else p


def check_output_dir(out: PathLike, inputs: Sequence[PathLike], flag: str = "--out",
                     allow_inside: Iterable[PathLike] = ()) -> Path:
    """Refuse an output folder that could destroy the inputs or cannot be written, before any work.

    Args:
        out: the output folder (need not exist).
        inputs: the files and folders given as input (missing ones are ignored).
        flag: how the error names the option.
        allow_inside: input folders ``out`` may be (or lie in) by design (``evaluate``'s PRED), even when
            they lie inside another input folder.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        Med3DError: ``out`` is an existing file, lies in no writable folder, or is (or lies inside) an input
            folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Med3DError(f"{flag} {out}: is an existing file; {flag} names a folder")
    real = _real(out)
    if _writable_ancestor(real) is None:
        raise Med3DError(f"{flag} {out}: cannot be written (no write permission, read-only, or a file in the "
                         f"path); choose a folder you can write to")
    if any(_inside(real, _real(a)) for a in allow_inside if Path(a).is_dir()):
        return out  # where the outputs belong by design, even when that folder sits inside another input
    for given in inputs:
        if not Path(given).exists():
            continue
        src = _real(given)
        if src.is_dir() and _inside(real, src):
            raise Med3DError(f"{flag} {out}: is {'the' if real == src else 'inside the'} input folder {given}; "
                             "write the outputs to a folder outside the inputs")
    return out


def check_output_file(out: PathLike, inputs: Sequence[PathLike], flag: str = "--out") -> Path:
    """Refuse an output file that is one of the inputs (also through a link), a folder, or not writable.

    Args:
        out: the file to write.
        inputs: the files the command reads (a checkpoint, weights).
        flag: how the error names the option.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        Med3DError: ``out`` is an input (``--overwrite`` does not change this), an existing folder, or lies
            in no writable folder.
    """
    out = Path(out)
    real = _real(out)
    for given in inputs:
        if Path(given).exists() and _real(given) == real:
            raise Med3DError(f"{flag} {out}: is the input {given} itself; write the output to another file "
                             "(--overwrite never replaces an input)")
    if out.is_dir():
        raise Med3DError(f"{flag} {out}: is an existing folder; {flag} names the file to write")
    if _writable_ancestor(real.parent) is None:
        raise Med3DError(f"{flag} {out}: cannot be written (no write permission, read-only, or a file in the "
                         "path); choose a file in a folder you can write to")
    return out


def check_targets(targets: Iterable[PathLike], inputs: Iterable[PathLike], flag: str = "--out") -> None:
    """Refuse output files that are input files (compared with symbolic links resolved).

    Args:
        targets: the files the command will write.
        inputs: the files it reads (folders: every file inside counts).
        flag: how the error names the option.

    Raises:
        Med3DError: a target is an input file; ``--overwrite`` does not change this.
    """
    sources = set()
    for given in inputs:
        src = _real(given)
        if src.is_dir():
            sources.update(_real(p) for p in src.rglob("*") if p.is_file())
        elif src.exists():
            sources.add(src)
    for target in targets:
        if _real(target) in sources:
            raise Med3DError(f"{flag}: output {target} would replace the input {_real(target)}; outputs never "
                             "overwrite inputs, write them to another folder")
