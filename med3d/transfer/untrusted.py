"""Bounds on what an untrusted weight file can make the loader do, checked before ``torch.load`` runs.

``torch.load(weights_only=True)`` never runs code from a file, but it does run whatever the file's
pickle asks of it: a few kilobytes of deflated opcodes can expand to hundreds of megabytes that
keep its pure-Python unpickler busy for minutes, and a tensor storage declared in the pickle is
allocated before its bytes are read. So the archive's directory and the pickle's opcodes are read
first (``pickletools.genops`` decodes without executing anything) under limits on opcodes, pickle
size and declared tensor bytes, and what torch returns is walked under a limit on its plain values.
A file past one is refused in one line, within seconds, naming the limit and how to raise it.
"""
from __future__ import annotations

import io
import os
import pickletools
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import Med3DError

# Environment variables that raise a limit for a file you trust (each holds a whole number).
OPS_ENV = "MED3D_MAX_PICKLE_OPS"
PICKLE_ENV = "MED3D_MAX_PICKLE_BYTES"
WEIGHTS_ENV = "MED3D_MAX_WEIGHTS_BYTES"
NODES_ENV = "MED3D_MAX_CHECKPOINT_NODES"

# A ResNet-200 state dict with its optimizer state pickles to ~64k opcodes in ~0.2 MB, and its
# config and metadata to a few thousand containers: the defaults leave an order of magnitude.
DEFAULT_OPS = 1_000_000
DEFAULT_PICKLE_BYTES = 64 << 20
DEFAULT_NODES = 200_000

# torch.save names each storage by its type; the pickle gives its length in elements of that type.
_ELEMENT_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                  "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                  "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16}
_LEGACY_PICKLES = 5  # torch's legacy format: magic, protocol, sys_info, the object, the storage keys
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load itself tests to choose the zip reader


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: a fixed 16 GiB
        return 16 << 30


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Med3DError(f"environment variable {name}={raw!r}: expected a whole number")
    if value <= 0:
        raise Med3DError(f"environment variable {name}={raw!r}: must be positive")
    return value


@dataclass(frozen=True)
class Limits:
    """How far a weight file may go before it is refused."""

    ops: int = DEFAULT_OPS  # pickle opcodes, over every pickle the file holds
    pickle_bytes: int = DEFAULT_PICKLE_BYTES  # one pickle's size (uncompressed)
    weights_bytes: int = field(default_factory=_physical_memory)  # all tensor data, declared or in the zip
    nodes: int = DEFAULT_NODES  # containers and values outside the tensors (config, metadata)

    @classmethod
    def from_env(cls) -> "Limits":
        """The defaults, each raised or lowered by its environment variable."""
        return cls(_env_int(OPS_ENV, DEFAULT_OPS), _env_int(PICKLE_ENV, DEFAULT_PICKLE_BYTES),
                   _env_int(WEIGHTS_ENV, _physical_memory()), _env_int(NODES_ENV, DEFAULT_NODES))


@dataclass
class PickleScan:
    """What the opcodes of a weight file's pickle(s) declare, read without unpickling."""

    is_pickle: bool = True
    globals: List[str] = field(default_factory=list)  # "module.name" of every GLOBAL
    storage_bytes: int = 0  # tensor storage the pickle asks torch to allocate


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


_PUSH, _MARK, _PUT, _GET, _GLOBAL, _PERSID, _POP_MARK, _NOTHING = range(8)


def _kind(op: pickletools.OpcodeInfo) -> int:
    """What ``_Tracker`` does for an opcode (decided once per opcode, not per occurrence)."""
    by_name = {"MARK": _MARK, "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _PUT, "GET": _GET,
               "BINGET": _GET, "LONG_BINGET": _GET, "GLOBAL": _GLOBAL, "STACK_GLOBAL": _GLOBAL,
               "BINPERSID": _PERSID}
    if op.name in by_name:
        return by_name[op.name]
    if pickletools.markobject in op.stack_before:
        return _POP_MARK
    return _PUSH if op.stack_after else _NOTHING


_KINDS = {op.code: _kind(op) for op in pickletools.opcodes}


class _Tracker:
    """Follows just enough of the pickle's stack to read each storage's declaration.

    torch writes a storage as ``MARK 'storage' GLOBAL<type> key location numel ... TUPLE BINPERSID``;
    the memo is followed because a crafted file can fetch the number from it.
    """

    def __init__(self, where: Path, limits: Limits, ops: int = 0):
        self.where, self.limits = where, limits
        self.frames: List[List[Any]] = [[]]
        self.memo: Dict[Any, Any] = {}
        self.top: Any = None
        self.storages: Dict[Tuple[str, ...], int] = {}
        self.globals: List[str] = []
        self.ops = ops  # opcodes of earlier pickles of the same file count against the limit too

    def absorb(self, other: "_Tracker") -> None:
        """Take over what a completed walk found (its opcodes, globals and storages)."""
        self.ops = other.ops
        self.globals += other.globals
        self.storages.update(other.storages)

    def _push(self, value: Any) -> None:
        self.frames[-1].append(value)
        self.top = value

    def feed(self, op: pickletools.OpcodeInfo, arg: Any) -> None:
        self.ops += 1
        if self.ops > self.limits.ops:
            raise Med3DError(f"{self.where}: refused: its pickle runs past {self.limits.ops:,} opcodes (a state dict "
                             f"needs far fewer; a crafted file can stall the loader for minutes); if you trust the "
                             f"file, raise the limit with {OPS_ENV}")
        kind = _KINDS[op.code]
        if kind == _PUSH:  # most opcodes: inlined, this loop runs up to the opcode limit
            self.top = arg if isinstance(arg, (int, str, bytes)) and not isinstance(arg, bool) else None
            self.frames[-1].append(self.top)
        elif kind == _MARK:
            self.frames.append([])
        elif kind == _PUT:
            self.memo[len(self.memo) if arg is None else arg] = self.top
        elif kind == _GET:
            self._push(self.memo.get(arg))
        elif kind == _GLOBAL:
            strings = [v for v in self.frames[-1][-2:] if isinstance(v, str)]
            target = str(arg) if op.name == "GLOBAL" else " ".join(strings)
            self.globals.append(target.replace(" ", "."))
            self._push(("global", target))
        elif kind == _PERSID:
            if isinstance(self.top, tuple) and self.top[:1] == ("tuple",):
                self._storage(self.top[1])
            self._push(None)
        elif kind == _POP_MARK:
            items = self.frames.pop() if len(self.frames) > 1 else []
            self._push(("tuple", items) if op.name == "TUPLE" else None)

    def _storage(self, pid: List[Any]) -> None:
        kind = next((v[1].split(" ")[-1] for v in pid if isinstance(v, tuple) and v[:1] == ("global",)), "")
        numel = max((v for v in pid if isinstance(v, int) and not isinstance(v, bool)), default=0)
        key = tuple(v for v in pid if isinstance(v, str))
        nbytes = numel * _ELEMENT_BYTES.get(kind, 1)
        self.storages[key] = max(self.storages.get(key, 0), nbytes)
        total = sum(self.storages.values())
        if total > self.limits.weights_bytes:
            raise Med3DError(f"{self.where}: refused: its pickle declares {_gib(total)} of tensor storage, over the "
                             f"limit of {_gib(self.limits.weights_bytes)}; if you trust the file, raise the limit "
                             f"with {WEIGHTS_ENV} (bytes)")


_FIRST_READ = 4 << 20  # a state dict's pickle fits; a bomb meets the opcode limit inside it


class _CutShort(Exception):
    """The pickle went on past the bytes read so far."""


def _walk(data: bytes, whole: bool, tracker: _Tracker, count: int) -> bool:
    """Walk up to ``count`` consecutive pickles at the start of ``data``; False when the first is no pickle."""
    stream = io.BytesIO(data)  # genops runs 3x faster on bytes in memory than on a file object
    for i in range(count):
        try:
            for op, arg, _ in pickletools.genops(stream):
                tracker.feed(op, arg)
        except Med3DError:
            raise
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: torch stops at the same byte
            if not whole and stream.tell() >= len(data):
                raise _CutShort
            return i > 0
    return True


def _scan_pickles(read: Callable[[int], bytes], tracker: _Tracker, count: int, what: str) -> bool:
    """Walk the pickles at the start of a stream, reading more of it only while they go on.

    Args:
        read: the stream's first ``n`` bytes (fewer when it is shorter).
        tracker: what follows the opcodes; it holds what the pickles declare afterwards.
        count: consecutive pickles to walk (torch's legacy format has five).
        what: the pickle's name for the size-limit message.

    Returns:
        False when the stream holds no pickle at all.

    Raises:
        Med3DError: a limit is passed (opcodes, declared storage, or the pickle size).
    """
    size = min(_FIRST_READ, tracker.limits.pickle_bytes)
    while True:
        data = read(size)
        attempt = _Tracker(tracker.where, tracker.limits, tracker.ops)
        try:
            is_pickle = _walk(data, len(data) < size, attempt, count)
        except _CutShort:
            if size >= tracker.limits.pickle_bytes:
                raise Med3DError(_too_large(tracker.where, what, f"more than {_gib(size)}", tracker.limits))
            size = min(size * 4, tracker.limits.pickle_bytes)
            continue
        tracker.absorb(attempt)
        return is_pickle


def _too_large(path: Path, what: str, size: str, limits: Limits) -> str:
    return (f"{path}: refused: its pickle {what} declares {size} uncompressed, over the limit of "
            f"{_gib(limits.pickle_bytes)} (a state dict's pickle is kilobytes); if you trust the file, raise the "
            f"limit with {PICKLE_ENV}")


def _scan_zip(path: Path, limits: Limits, tracker: _Tracker) -> int:
    """Check a torch zip archive's directory and scan its pickles; returns the bytes of its tensor records."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):  # zipfile and torch's reader may pick different copies
                raise Med3DError(f"{path}: refused: the archive holds two entries of one name; re-save the weights")
            total = sum(i.file_size for i in infos)
            if total > limits.weights_bytes:
                raise Med3DError(f"{path}: refused: the archive declares {_gib(total)} uncompressed, over the limit "
                                 f"of {_gib(limits.weights_bytes)}; if you trust the file, raise the limit with "
                                 f"{WEIGHTS_ENV} (bytes)")
            for info in infos:
                if not info.filename.endswith(".pkl"):
                    continue
                if info.file_size > limits.pickle_bytes:
                    raise Med3DError(_too_large(path, info.filename, _gib(info.file_size), limits))
                def read(n: int, info: zipfile.ZipInfo = info) -> bytes:
                    with zf.open(info) as fh:  # never more than the declared size
                        return fh.read(n)

                _scan_pickles(read, tracker, 1, info.filename)
            return sum(i.file_size for i in infos if "/data/" in f"/{i.filename}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, RuntimeError,
            zlib.error) as err:  # damaged or encrypted entries, bad deflate streams
        raise Med3DError(f"{path}: not a readable PyTorch checkpoint (a damaged zip archive: {err}); "
                         "expected a .pth/.pt state dict or a .safetensors file")


def scan_weights_file(path: Path, limits: Optional[Limits] = None) -> PickleScan:
    """Check a ``torch.save`` file (zip or legacy) against ``limits`` without unpickling anything.

    Args:
        path: the file.
        limits: the limits; None reads them from the environment (``Limits.from_env``).

    Returns:
        The globals the pickle names and the storage it declares.

    Raises:
        Med3DError: one line naming the file and the limit it passes: too many opcodes, a pickle or
            archive too large once uncompressed, more declared tensor storage than the limit or than
            the file holds, or an archive with duplicate entries.
    """
    limits = limits or Limits.from_env()
    tracker = _Tracker(path, limits)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == _ZIP_MAGIC:
        room = _scan_zip(path, limits, tracker)
        is_pickle = True
    else:
        room = path.stat().st_size  # a legacy file holds its storages' bytes after its pickles

        def read(n: int) -> bytes:
            with open(path, "rb") as fh:
                return fh.read(n)

        is_pickle = _scan_pickles(read, tracker, _LEGACY_PICKLES, "(legacy format)")
    declared = sum(tracker.storages.values())
    if declared > room:
        raise Med3DError(f"{path}: refused: its pickle declares {_gib(declared)} of tensor storage but the file holds "
                         f"only {_gib(room)} of tensor data; the file is damaged or crafted")
    return PickleScan(is_pickle, tracker.globals, declared)


def check_loaded(obj: Any, where: Path, limits: Optional[Limits] = None) -> None:
    """Refuse a loaded checkpoint whose plain data is huge or nested without end, or whose tensors overrun.

    The walk counts every visit (shared or cyclic containers built through the pickle's memo count
    each time), so it stops at the limit however large the structure would be when traversed.

    Args:
        obj: what ``torch.load`` returned.
        where: the file, for messages.
        limits: the limits; None reads them from the environment.

    Raises:
        Med3DError: more than ``limits.nodes`` values outside the tensors, or a tensor claiming more
            elements than its storage holds (a zero-stride view that would expand on first use).
    """
    limits = limits or Limits.from_env()
    stack, seen = [obj], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limits.nodes:
            raise Med3DError(f"{where}: refused: its data outside the tensors exceeds {limits.nodes:,} values "
                             f"(nested, shared or cyclic containers); if you trust the file, raise the limit with "
                             f"{NODES_ENV}")
        if isinstance(item, torch.Tensor):
            _check_tensor(item, where)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


def _check_tensor(t: torch.Tensor, where: Path) -> None:
    if t.layout != torch.strided or t.numel() == 0:
        return
    held = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    if t.numel() > held:
        raise Med3DError(f"{where}: refused: a tensor of shape {list(t.shape)} claims {t.numel():,} elements over a "
                         f"storage of {held:,} (a crafted view that expands when used); re-save the weights")
