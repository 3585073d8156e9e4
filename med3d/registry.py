"""Name -> builder tables, so configs and the CLI refer to parts by name."""
from __future__ import annotations

from typing import Callable, Dict, List, TypeVar

from .errors import Med3DError

F = TypeVar("F", bound=Callable)


class Registry:
    """A table of named builders of one kind (encoders, heads, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that records ``fn`` under ``name``."""

        def deco(fn: F) -> F:
            if name in self._table:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._table[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        """The builder for ``name``; a one-line error listing the choices otherwise."""
        if name not in self._table:
            raise Med3DError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._table[name]

    def names(self) -> List[str]:
        return list(self._table)


ENCODERS = Registry("encoder")
HEADS = Registry("head")
