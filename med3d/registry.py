"""Name -> builder tables; each registration also declares the builder's keyword arguments.

A builder's signature is its declaration: ``Registry.params`` reads every keyword argument
with its type hint and default, so the config schema (``med3d.config``), export metadata and
loaders derive from the builder alone. A new encoder or head is one module plus one
``register`` call; no list elsewhere needs editing.
"""
from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from .errors import Med3DError

F = TypeVar("F", bound=Callable)
REQUIRED = inspect.Parameter.empty  # the default of an argument the builder requires
Upgrade = Callable[[Dict[str, Any]], Dict[str, Any]]


@dataclass(frozen=True)
class Param:
    """One keyword argument a builder declares: its name, config-ready type and default (or ``REQUIRED``)."""

    name: str
    type: Any
    default: Any


@dataclass(frozen=True)
class Entry:
    """A registered builder with the arguments fixed by its registration and those it declares."""

    name: str
    builder: Callable
    fixed: Dict[str, Any] = field(default_factory=dict)
    params: Dict[str, Param] = field(default_factory=dict)
    upgrade: Optional[Upgrade] = None


def config_type(tp: Any) -> Any:
    """A type hint as the config schema can check it: abstract sequences become ``List``.

    Args:
        tp: a resolved type hint (``Sequence[int]``, ``Union[int, Sequence[int]]``, ``Literal[...]``, ...).

    Returns:
        The same hint with ``Sequence[X]`` / ``Tuple[X, ...]`` replaced by ``List[X]`` at any depth.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return Union[tuple(config_type(a) for a in args)]  # type: ignore[return-value]
    if origin in (collections.abc.Sequence, list, tuple) and args:
        return List[config_type(args[0])]  # type: ignore[misc]
    return tp


def declared_params(fn: Callable, skip: Iterable[str] = ()) -> Dict[str, Param]:
    """The keyword arguments ``fn`` (a function or class) declares, from its signature and type hints.

    Args:
        fn: the builder; a class is read through its ``__init__``.
        skip: arguments supplied by the caller rather than by a config (``self``, ``feature_info``, fixed ones).

    Returns:
        name -> Param, in signature order.

    Raises:
        TypeError: an argument has no type hint (every declared argument must say its type).
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    hints = typing.get_type_hints(target)
    out: Dict[str, Param] = {}
    for p in inspect.signature(target).parameters.values():
        if p.name in ("self", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name not in hints:
            raise TypeError(f"{fn.__qualname__}: argument '{p.name}' needs a type hint to be declared")
        out[p.name] = Param(p.name, config_type(hints[p.name]), p.default)
    return out


def resolved_args(fn: Callable, values: Mapping[str, Any], skip: Iterable[str] = ()) -> Dict[str, Any]:
    """The values of ``fn``'s declared arguments taken from ``values`` (e.g. ``locals()`` after normalising).

    Tuples become lists so that the result is plain YAML / JSON data.

    Args:
        fn: the builder whose arguments to pick.
        values: a mapping that holds every declared argument.
        skip: arguments to leave out.

    Returns:
        name -> value, in signature order.
    """
    return {n: list(values[n]) if isinstance(values[n], tuple) else values[n] for n in declared_params(fn, skip)}


def unknown_arg(entry: Entry, keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """The first of ``keys`` that ``entry`` does not declare, with a did-you-mean or the list of what it takes.

    Args:
        entry: the registered builder.
        keys: argument names to check.

    Returns:
        (key, hint) or None when every key is declared.
    """
    names = list(entry.params)
    for key in keys:
        if key not in entry.params:
            close = difflib.get_close_matches(str(key), names, n=1)
            return key, f"did you mean '{close[0]}'?" if close else f"it takes: {', '.join(names) or 'nothing'}"
    return None


class Registry:
    """A table of named builders of one kind (encoders, heads, ...), each with its declared arguments.

    Args:
        kind: what the builders make, for messages ("encoder", "head").
        key: the config key that names the entry (``arch`` for encoders, ``type`` for heads).
        context: leading builder arguments the framework supplies (a head's ``feature_info``), not configs.
    """

    def __init__(self, kind: str, key: str = "name", context: Sequence[str] = ()) -> None:
        self.kind, self.key, self.context = kind, key, tuple(context)
        self._table: Dict[str, Entry] = {}

    def register(self, name: str, upgrade: Optional[Upgrade] = None, **fixed: Any) -> Callable[[F], F]:
        """Decorator that records ``fn`` under ``name``; ``fixed`` arguments are bound at every build.

        Args:
            name: the registry name (a config's ``arch`` / ``type`` value).
            upgrade: maps argument dicts of older med3d versions to the current names (old checkpoints).
            **fixed: arguments this name fixes, e.g. ``depth=50`` for ``resnet50``.

        Returns:
            The decorator; it returns ``fn`` unchanged.

        Raises:
            Med3DError: ``name`` is registered already.
        """

        def deco(fn: F) -> F:
            if name in self._table:
                raise Med3DError(f"{self.kind} '{name}' registered twice; give the new one another name")
            params = declared_params(fn, (*self.context, *fixed))
            self._table[name] = Entry(name, fn, dict(fixed), params, upgrade)
            return fn

        return deco

    def entry(self, name: str) -> Entry:
        """The registration of ``name``; a one-line error listing the choices otherwise."""
        if name not in self._table:
            raise Med3DError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._table[name]

    def get(self, name: str) -> Callable:
        """The builder for ``name`` with its fixed arguments bound."""
        e = self.entry(name)
        return functools.partial(e.builder, **e.fixed) if e.fixed else e.builder

    def params(self, name: str) -> Dict[str, Param]:
        """The keyword arguments ``name``'s builder declares (the config keys besides ``key``)."""
        return dict(self.entry(name).params)

    def upgrade(self, name: str, args: Mapping[str, Any]) -> Dict[str, Any]:
        """``args`` with names of older med3d versions mapped to the current ones (unchanged if none)."""
        e = self.entry(name)
        return e.upgrade(dict(args)) if e.upgrade else dict(args)

    def build(self, name: str, *context: Any, where: Optional[str] = None, **kwargs: Any) -> Any:
        """Build ``name`` from keyword arguments, rejecting any it does not declare.

        Args:
            name: the registry name.
            *context: the framework-supplied leading arguments (see ``context``).
            where: prefix of error messages, e.g. ``model.heads.liver``; default: the kind and name.
            **kwargs: declared arguments; old names are upgraded first.

        Returns:
            What the builder returns; given a ``config`` attribute (the name and every declared
            argument, defaults filled in) unless it sets one itself, so exports can rebuild it.

        Raises:
            Med3DError: ``name`` is unknown or an argument is not declared.
        """
        kwargs = self.upgrade(name, kwargs)
        entry = self.entry(name)
        bad = unknown_arg(entry, kwargs)
        if bad:
            key, hint = bad
            head = f"{where}.{key}: a {name} {self.kind} takes no '{key}'" if where else \
                f"{self.kind} '{name}' takes no argument '{key}'"
            raise Med3DError(f"{head}; {hint}")
        obj = self.get(name)(*context, **kwargs)
        if not hasattr(obj, "config"):
            defaults = {p.name: p.default for p in entry.params.values() if p.default is not REQUIRED}
            obj.config = {self.key: name, **resolved_args(entry.builder, {**defaults, **kwargs},
                                                          (*self.context, *entry.fixed))}
        return obj

    def names(self) -> List[str]:
        """Registered names, in registration order."""
        return list(self._table)


ENCODERS = Registry("encoder", key="arch")
HEADS = Registry("head", key="type", context=("feature_info",))
