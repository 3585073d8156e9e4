"""med3d: Med3D-style 3D-ResNet pretraining across datasets and transfer to new organ tasks."""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

from .errors import Med3DError  # noqa: E402

if _typing.TYPE_CHECKING:  # the names as type checkers and editors see them; at run time see __getattr__
    from .api import create_encoder, create_model, list_encoders  # noqa: F401
    from .inference import predict  # noqa: F401
    from .transfer import inflate_state_dict, load_pretrained  # noqa: F401

# Public names and the modules that define them, imported on first use: the command line starts
# (``med3d --help``, argument errors) without loading PyTorch, which takes about 2 s.
_PUBLIC = {"create_encoder": "api", "create_model": "api", "list_encoders": "api", "predict": "inference",
           "load_pretrained": "transfer", "inflate_state_dict": "transfer"}

__all__ = ["__version__", "create_encoder", "create_model", "list_encoders", "load_pretrained",
           "inflate_state_dict", "Med3DError", "predict"]


def __getattr__(name: str) -> _typing.Any:
    """A public name or a submodule (``med3d.api``), imported when first asked for."""
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return _importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":  # a dependency of that submodule is missing: say so
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> _typing.List[str]:
    return sorted(n for n in set(globals()) | set(_PUBLIC) if not n.startswith("_") or n == "__version__")
