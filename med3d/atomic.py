"""Atomic file writing: outputs appear whole or not at all.

A write goes to a temporary file beside its target, named ``.<stem>.<pid>-<random>.tmp<suffixes>``,
and is renamed onto the target only when complete. A process killed mid-write (SIGKILL, power
loss) cannot clean up after itself, so the first atomic write into a folder by a later process
removes the temporary files there whose writing process is gone (``remove_stale_temps``): the
pid in the name says whose a temporary file is, and one of a live writer is never touched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Set

import yaml

from .errors import Med3DError

# ".<stem>.<pid>-<mkstemp's random part>.tmp<suffixes>": what atomic_path names its temporary files.
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[A-Za-z0-9_]+\.tmp(\.[^/]*)?$")
_FULL = (errno.ENOSPC, errno.EDQUOT)
_swept: Set[str] = set()  # folders this process has cleaned of dead writers' temporary files


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` alone must set it).

    Returns:
        The umask bits, e.g. ``0o022``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere set-and-restore; another thread creating a file in between would get mode 0666.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine (one we may not signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> List[Path]:
    """Delete the temporary files an atomic write left in ``folder`` when its process was killed.

    Only names of ``atomic_path``'s form whose writing pid no longer runs are removed: a live
    writer's temporary file (another process writing into the same folder) is kept.

    Args:
        folder: the folder to clean (not recursive).

    Returns:
        The files removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet: nothing left behind
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: never fail the write for it
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    key = str(folder.resolve())
    if key not in _swept:
        _swept.add(key)
        remove_stale_temps(folder)


def _write_error(path: Path, err: BaseException) -> Med3DError | None:
    """A one-line error for a write that failed because the disk (or quota) is full; None for other failures."""
    full = isinstance(err, OSError) and err.errno in _FULL
    # torch's zip writer reports a short write as a RuntimeError, not as the OSError underneath it.
    full = full or (isinstance(err, RuntimeError) and ("file write failed" in str(err) or "unexpected pos" in str(err)))
    if not full:
        return None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        return Med3DError(f"{path}: not written, the disk is full ({free / 2**20:.1f} MiB free on its file system); "
                          "free some space or write elsewhere")
    return Med3DError(f"{path}: not written, the disk is full; free some space or write elsewhere")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception leaves any previous file untouched and no partial file behind; the
    file gets the mode a plain ``open()`` would give it (0666 less the umask).

    Args:
        path: the file to write.
        overwrite: replace an existing ``path``; False refuses it.

    Yields:
        The temporary path to write to (it keeps ``path``'s suffixes, for writers that dispatch on them).

    Raises:
        Med3DError: ``path`` exists and ``overwrite`` is False, or the disk is full (the file is named).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise Med3DError(f"{path}: already exists; pass --overwrite to replace it")
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}-", suffix=".tmp" + "".join(path.suffixes),
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        mapped = _write_error(path, err)
        if mapped is None:
            raise
        raise mapped from err
    finally:
        if tmp_path is not None and tmp_path.exists():
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
