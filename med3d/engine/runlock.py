"""One training per run folder, and a run folder's old run never mixed into a new one.

``RunLock`` marks a run folder as in use: ``RUN/run.lock`` names the owner (pid, host, start time)
and the owner holds an exclusive ``flock`` on it while it trains. The kernel drops that lock when
the process ends however it ends, so a lock file left by a killed run is recognised as stale
(the file is there, nobody holds it) and taken over with a warning; a live owner's is refused
with its pid. ``claim_run_folder`` adds the rule for what is already in the folder: a new run
does not start over an old one unless it resumes it or was told to replace it.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..atomic import pid_alive, remove_stale_temps
from ..errors import Med3DError

log = logging.getLogger("med3d.train")

LOCK_NAME = "run.lock"
# What a training run writes into run.out_dir: --overwrite removes these, and nothing else of the folder.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "plans.json", "split.json", "splits_final.json",
             "curves.png", "load_report.txt", "checkpoints", "tensorboard")
_TRASH = ".overwritten-"  # the old run's files on their way out (a kill mid-delete leaves only this)


def _owner() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _describe(owner: Dict[str, Any]) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _read_owner(fd: int) -> Dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    with contextlib.suppress(ValueError):
        data = json.loads(raw.decode("utf-8", "replace"))
        if isinstance(data, dict):
            return data
    return {}


class RunLock:
    """The exclusive right to train into one run folder (a context manager; also ``acquire``/``release``).

    Args:
        folder: the run folder (``run.out_dir``); created if missing.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock, taking over a stale one with a warning.

        Returns:
            This lock.

        Raises:
            Med3DError: another process holds it (its pid and host are named), or the folder is not writable.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Med3DError(f"run.out_dir {self.folder}: cannot be created ({err.strerror})") from err
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise Med3DError(f"{self.path}: cannot be opened ({err.strerror}); is run.out_dir writable?") from err
            try:
                if self._lock_live_name(fd):
                    self.fd = fd
                else:
                    os.close(fd)
            except BaseException:
                os.close(fd)
                raise
        try:
            self._take_over(_read_owner(self.fd))
        except OSError as err:  # a full disk, a file system without locks: say so, and hold nothing
            self.release()
            raise Med3DError(f"{self.path}: the run lock cannot be written ({err.strerror})") from err
        return self

    def _lock_live_name(self, fd: int) -> bool:
        """Lock ``fd``; False when the holder before us unlinked its name meanwhile (then lock the new file)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            raise Med3DError(f"run.out_dir {self.folder}: another training is writing into it ({_describe(owner)}; "
                             f"lock {self.path}); wait for it to finish, or set run.out_dir to another folder")
        except OSError as err:
            raise Med3DError(f"{self.path}: cannot be locked ({err.strerror}); use a run.out_dir on a local "
                             "file system") from err
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _take_over(self, previous: Dict[str, Any]) -> None:
        if previous:
            here = previous.get("host") == socket.gethostname()
            gone = here and not pid_alive(int(previous.get("pid", -1)) if str(previous.get("pid")).isdigit() else -1)
            log.warning("warning: %s: taking over a stale lock of a run that ended without releasing it (%s%s)",
                        self.path, _describe(previous), ", no longer running" if gone else "")
        data = json.dumps(_owner()).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held, so no one locks a dead name)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_files(folder: str | os.PathLike) -> List[str]:
    """The files of an earlier run in ``folder`` (config, metrics, summary, checkpoints), by name.

    Args:
        folder: a run folder.

    Returns:
        The names found, e.g. ``["checkpoints/last.pt", "metrics.jsonl"]``; empty for a new or empty folder.
    """
    folder = Path(folder)
    found = [name for name in ("config.yaml", "metrics.jsonl", "summary.json") if (folder / name).is_file()]
    ckpts = sorted(p.name for p in (folder / "checkpoints").glob("*.pt"))
    if ckpts:
        found.insert(0, "checkpoints/" + ("last.pt" if "last.pt" in ckpts else ckpts[-1]))
    return found


def clear_run(folder: Path) -> None:
    """Remove the previous run's files from ``folder`` (only the names in ``RUN_FILES``).

    Each is first renamed into one hidden folder, so that after the first rename no old
    ``metrics.jsonl`` is left for the new run to append to; a kill while deleting leaves only
    that folder, which the next start removes.
    """
    trash = folder / f"{_TRASH}{os.getpid()}"
    trash.mkdir(exist_ok=True)
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(folder: Path) -> None:
    """Temporary files and half-deleted old runs that killed processes left in the run folder."""
    for trash in folder.glob(f"{_TRASH}*"):
        pid = trash.name[len(_TRASH):]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(trash, ignore_errors=True)
    removed = remove_stale_temps(folder) + remove_stale_temps(folder / "checkpoints")
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", len(removed), folder)


def _inputs_inside(folder: Path, inputs: Sequence[str | os.PathLike]) -> Optional[str]:
    """The first of ``inputs`` that ``clear_run`` would delete (through links too), or None."""
    doomed = [(folder / name).resolve() for name in RUN_FILES]
    for given in inputs:
        real = Path(given).resolve()
        if any(real == d or real.is_relative_to(d) for d in doomed):
            return str(given)
    return None


def claim_run_folder(folder: str | os.PathLike, resume: bool, overwrite: bool,
                     inputs: Sequence[str | os.PathLike] = ()) -> RunLock:
    """Lock ``folder`` for a training and make sure it starts clean (rank 0 calls this before writing anything).

    Args:
        folder: ``run.out_dir``.
        resume: the training continues the run in ``folder`` (its files stay and are appended to).
        overwrite: replace a run already in ``folder`` (its files are removed first).
        inputs: files and folders the training reads (``finetune.weights``, datasets, the cache): an
            ``overwrite`` that would delete one of them is refused.

    Returns:
        The held lock; release it when the training ends, also on error.

    Raises:
        Med3DError: another training holds the folder, or it holds an earlier run and neither ``resume``
            nor ``overwrite`` was given.
    """
    folder = Path(folder)
    lock = RunLock(folder).acquire()
    try:
        _remove_leftovers(folder)
        found = run_files(folder)
        if found and not resume:
            if not overwrite:
                raise Med3DError(f"run.out_dir {folder}: already holds a run ({', '.join(found)}); pass --resume to "
                                 "continue it, --overwrite to replace it, or set run.out_dir to a new folder")
            used = _inputs_inside(folder, inputs)
            if used:
                raise Med3DError(f"--overwrite: {used} is part of the run in {folder} that it would remove, and this "
                                 "training reads it; copy it elsewhere first, or train into another run.out_dir")
            log.warning("warning: --overwrite: removing the earlier run in %s (%s)", folder, ", ".join(found))
            clear_run(folder)
    except BaseException:
        lock.release()
        raise
    return lock
