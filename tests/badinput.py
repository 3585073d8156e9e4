"""The bad-input corpus's one check (a support module: test modules never import each other).

Every corpus case runs a ``med3d`` command in this process on a generated bad input and requires
what the CLI promises for bad input: a non-zero exit, exactly one line on stderr in the CLI's form
naming what is wrong, no traceback, the inputs byte-identical afterwards, and nothing written
outside the folders the command may write to.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import pytest

from med3d.cli import main


def tree_digest(roots: Iterable[Path]) -> dict:
    """``{path: sha256}`` of every file under ``roots`` (symlinks by their target's name, not followed)."""
    out = {}
    for root in map(Path, roots):
        paths = [root] if root.is_file() or root.is_symlink() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "link:" + str(p.readlink())
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _new_files(before: set, root: Path) -> List[str]:
    return sorted(str(p) for p in root.rglob("*") if str(p) not in before and not p.is_dir())


def refused(argv: Sequence[str], capsys: pytest.CaptureFixture, *, names: str, inputs: Iterable[Path] = (),
            watch: Optional[Path] = None, allowed: Iterable[Path] = ()) -> str:
    """Run ``med3d argv`` and check that it refuses in one line.

    Args:
        argv: the arguments after ``med3d``.
        capsys: pytest's capture fixture.
        names: a regular expression the error line must match (the file, key or value it names).
        inputs: files or folders that must be byte-identical afterwards.
        watch: a folder in which no new file may appear, except under ``allowed``.
        allowed: folders under ``watch`` the command may write to.

    Returns:
        The error line.
    """
    argv = [str(a) for a in argv]
    before_inputs = tree_digest(inputs)
    before = {str(p) for p in watch.rglob("*")} if watch else set()
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own exits
        status = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status not in (0, None), f"med3d {' '.join(argv)} exited 0; stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in lines if re.match(r"^med3d( [\w-]+)?: error: ", line)]
    assert len(errors) == 1, f"expected one error line, got:\n{err}"
    assert re.search(names, errors[0]), f"{errors[0]!r} does not name {names!r}"
    assert tree_digest(inputs) == before_inputs, "an input changed"
    if watch:
        allowed = [str(Path(a)) for a in allowed]
        stray = [p for p in _new_files(before, watch) if not any(p.startswith(a + "/") for a in allowed)]
        assert not stray, f"written outside the allowed folders: {stray}"
    return errors[0]


def checked(root: Path, capsys: pytest.CaptureFixture, names: str) -> str:
    """Run ``med3d check-data ROOT``, which lists every problem on stdout, and check one of them.

    Args:
        root: the dataset folder.
        capsys: pytest's capture fixture.
        names: a regular expression one ``error:`` line must match.

    Returns:
        That line, after checking exit status 1, no traceback and ``root`` byte-identical.
    """
    before = tree_digest([root])
    capsys.readouterr()
    status = main(["check-data", str(root), "--workers", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in out + err, out + err
    hits = [line for line in out.splitlines() if line.startswith("error: ") and re.search(names, line)]
    assert hits, f"no error line matching {names!r}:\n{out}"
    assert tree_digest([root]) == before, "check-data changed the dataset"
    return hits[0]
