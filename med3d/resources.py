"""Files that ship with med3d: configs, dataset descriptors and the weights index.

The top-level ``configs/``, ``datasets/`` and ``weights/`` folders of the repository are the
source of truth. A wheel carries copies of them in ``med3d/_resources`` (``setup.py`` puts
them there at build time); a source or editable checkout has no such copy and reads the
top-level folders directly.
"""
from __future__ import annotations

from importlib import resources as _importlib_resources
from pathlib import Path
from typing import Union

from .errors import Med3DError

PACKAGED = "_resources"  # folder inside the med3d package of a built wheel


def resource_root() -> Path:
    """The folder that holds ``configs/``, ``datasets/`` and ``weights/`` for this install.

    Returns:
        ``med3d/_resources`` in an installed wheel, otherwise the repository root (a source or
        editable checkout). The folder is not checked; ``resource_path`` does that.
    """
    packaged = _importlib_resources.files("med3d") / PACKAGED
    # Only a package on the file system gives a Path; resources are read as files, with
    # _base_ paths relative to them, so an install inside a zip archive is not supported.
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent


def resource_path(name: Union[str, Path]) -> Path:
    """A shipped file or folder, e.g. ``resource_path("configs/demo/pretrain.yaml")``.

    Args:
        name: path relative to the resource root, starting with ``configs``, ``datasets`` or
            ``weights``.

    Returns:
        The existing path.

    Raises:
        Med3DError: the resource is missing from this install.
    """
    path = resource_root() / name
    if not path.exists():
        raise Med3DError(f"{Path(name).as_posix()}: not found among med3d's shipped files (looked in "
                         f"{path.parent}); reinstall med3d, e.g. pip install --force-reinstall med3d")
    return path


def resource_dir(name: str) -> Path:
    """A shipped folder, e.g. ``resource_dir("datasets")``.

    Args:
        name: folder relative to the resource root.

    Returns:
        The existing folder.

    Raises:
        Med3DError: the folder is missing from this install, or is a file.
    """
    path = resource_path(name)
    if not path.is_dir():
        raise Med3DError(f"{name}: expected a folder among med3d's shipped files, found a file at {path}; "
                         "reinstall med3d")
    return path


def config_path(path: Union[str, Path]) -> Path:
    """A config file as given, or the shipped config of that name when the given path does not exist.

    Lets a wheel user run ``med3d config configs/demo/pretrain.yaml`` from any folder.
    ``configs/demo/pretrain.yaml`` and ``demo/pretrain.yaml`` both name the shipped file.

    Args:
        path: a config file path as the user wrote it.

    Returns:
        ``path`` itself when it exists, is absolute, or names no shipped config (the config
        loader then reports it missing); otherwise the shipped config.
    """
    given = Path(path)
    if given.exists() or given.is_absolute() or not given.parts:
        return given
    parts = given.parts[1:] if given.parts[0] == "configs" else given.parts
    if not parts or ".." in parts:
        return given
    shipped = resource_root() / "configs" / Path(*parts)
    return shipped if shipped.is_file() else given
