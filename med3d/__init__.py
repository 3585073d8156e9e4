"""med3d: Med3D-style 3D-ResNet pretraining across datasets and transfer to new organ tasks."""
from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

from .errors import Med3DError  # noqa: E402

# Public names and the modules that define them, imported on first use: the command line starts
# (``med3d --help``, argument errors) without loading PyTorch, which takes about 2 s.
_PUBLIC = {"create_encoder": "api", "create_model": "api", "list_encoders": "api", "predict": "inference",
           "load_pretrained": "transfer", "inflate_state_dict": "transfer"}

__all__ = ["__version__", "create_encoder", "create_model", "list_encoders", "load_pretrained",
           "inflate_state_dict", "Med3DError", "predict"]


def __getattr__(name: str) -> Any:
    """A public name or a submodule (``med3d.api``), imported when first asked for."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":  # a dependency of that submodule is missing: say so
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_PUBLIC))
