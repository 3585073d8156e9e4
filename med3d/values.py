"""Checks of the numbers a user gives (CLI flags, API arguments, config keys), at the boundary.

A value outside its range is refused in one line naming where it came from (``--overlap``,
``validation.overlap``, ...), before any work, instead of failing deep inside MONAI or torch,
possibly hours later. Each check returns the value (as the type it checks) so it can be used
inline, and ``cli_type`` turns one into an argparse ``type=`` for a flag.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, List, Optional, Sequence

from .errors import Med3DError

Check = Callable[[Any, str], Any]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise Med3DError(f"{name}: expected a number, got {str(value)[:40]!r}")
    if not math.isfinite(value):
        raise Med3DError(f"{name}: must be a finite number, got {value}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Med3DError(f"{name}: expected a whole number, got {str(value)[:40]!r}")
    return value


def in_range(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None,
             low_open: bool = False, high_open: bool = False) -> float:
    """A finite number within ``[low, high]`` (either end open or absent).

    Args:
        value: the user's value.
        name: the flag or key, for the message.
        low, high: the bounds (None: unbounded on that side).
        low_open, high_open: exclude that bound itself.

    Returns:
        The value as a float.

    Raises:
        Med3DError: not a number, NaN or infinite, or outside the range (the range is in the message).
    """
    x = _number(value, name)
    below = low is not None and (x <= low if low_open else x < low)
    above = high is not None and (x >= high if high_open else x > high)
    if below or above:
        if high is None:
            want = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            want = f"{'<' if high_open else '<='} {high:g}"
        else:
            want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise Med3DError(f"{name}: must be {want}, got {value}")
    return x


def positive(value: Any, name: str) -> float:
    """A finite number > 0 (a learning rate, a spacing, a temperature)."""
    return in_range(value, name, 0, None, low_open=True)


def non_negative(value: Any, name: str) -> float:
    """A finite number >= 0 (a weight decay, a multiplier)."""
    return in_range(value, name, 0, None)


def probability(value: Any, name: str) -> float:
    """A finite number in [0, 1]."""
    return in_range(value, name, 0, 1)


def fraction(value: Any, name: str) -> float:
    """A finite number in [0, 1): a share that cannot be all (an overlap, a held-out share, momentum)."""
    return in_range(value, name, 0, 1, high_open=True)


def at_least(low: int) -> Check:
    """A check for whole numbers >= ``low`` (``at_least(1)``: a count of iterations, a batch size)."""
    def check(value: Any, name: str) -> int:
        n = _integer(value, name)
        if n < low:
            raise Med3DError(f"{name}: must be a whole number >= {low}, got {n}")
        return n
    check.range = f"whole number >= {low}"  # type: ignore[attr-defined]
    return check


def each(check: Check, length: Optional[int] = None) -> Check:
    """A check for a list whose items all pass ``check`` (and that has ``length`` items, when given)."""
    def check_all(values: Any, name: str) -> List[Any]:
        if not isinstance(values, (list, tuple)):
            raise Med3DError(f"{name}: expected a list, got {str(values)[:40]!r}")
        if length is not None and len(values) != length:
            raise Med3DError(f"{name}: expected {length} values, got {len(values)}")
        return [check(v, f"{name}[{i}]") for i, v in enumerate(values)]
    inner = describe(check)
    count = f"{length} values" if length else "values"
    check_all.range = count + (f", each {inner}" if inner else "")  # type: ignore[attr-defined]
    return check_all


def describe(check: Check) -> str:
    """The values a check accepts, in words (for ``med3d config --schema``); empty when it does not say."""
    return getattr(check, "range", "")


positive.range = "> 0"  # type: ignore[attr-defined]
non_negative.range = ">= 0"  # type: ignore[attr-defined]
probability.range = "in [0, 1]"  # type: ignore[attr-defined]
fraction.range = "in [0, 1)"  # type: ignore[attr-defined]


def spacing(values: Sequence[Any], name: str) -> List[float]:
    """Three voxel sizes (z, y, x) in mm, each finite and > 0."""
    return each(positive, 3)(values, name)


spacing.range = "3 values, each > 0"  # type: ignore[attr-defined]


def check_window(overlap: Any, sw_batch_size: Any) -> None:
    """Sliding-window settings of a prediction: overlap in [0, 1), at least one window per batch.

    Args:
        overlap: share of each window shared with its neighbour.
        sw_batch_size: windows per forward pass.

    Raises:
        Med3DError: naming ``overlap`` or ``sw_batch_size`` and its valid range.
    """
    fraction(overlap, "overlap (--overlap)")
    at_least(1)(sw_batch_size, "sw_batch_size (--sw-batch)")


def cli_type(check: Check, flag: str, convert: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts a flag's text with ``convert`` and applies ``check``.

    Args:
        check: one of this module's checks.
        flag: the flag, e.g. ``--overlap``.
        convert: text to value (float or int).

    Returns:
        The type function; argparse prints its refusal as the CLI's one error line.
    """
    def parse(text: str) -> Any:
        try:
            return check(convert(text), flag)
        except Med3DError as err:  # argparse prefixes "argument FLAG: " itself
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{flag}: "))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    parse.__name__ = convert.__name__  # argparse names the type in its own messages
    return parse


def check_scan(image: Any, where: str = "image") -> None:
    """A scan as ``Predictor`` takes it: a med3d ``Image`` whose array is (C, Z, Y, X) real numbers.

    Args:
        image: what the caller passed.
        where: how the message names it.

    Raises:
        Med3DError: not an ``Image``, or its array has the wrong rank, an empty axis or a non-real dtype.
    """
    array = getattr(image, "array", None)
    if array is None or not hasattr(image, "geometry") or not hasattr(array, "ndim"):
        raise Med3DError(f"{where}: expected a med3d Image (an array (C, Z, Y, X) with its Geometry) or a scan's "
                         f"path, got {type(image).__name__}; an array alone has no spacing or orientation")
    if array.ndim != 4 or 0 in array.shape:
        raise Med3DError(f"{where}: the image array has shape {list(array.shape)}; expected (C, Z, Y, X) with every "
                         "axis non-empty (add a channel axis with array[None] for one channel)")
    kind = getattr(getattr(array, "dtype", None), "kind", "")
    if kind not in "iuf" or not kind:
        raise Med3DError(f"{where}: the image array has dtype {array.dtype}; expected integers or floats")


def check_prediction(image: Any, overlap: Any, sw_batch_size: Any, where: str = "image") -> None:
    """Everything a caller gives ``Predictor.__call__``, checked before any work (``check_scan``, ``check_window``)."""
    check_scan(image, where)
    check_window(overlap, sw_batch_size)
