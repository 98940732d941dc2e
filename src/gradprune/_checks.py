"""Small validation helpers shared by every layer.

Every public entry point validates its input *before* doing any work, and every error names the
field and the value it received, e.g. ``TypeError: n_batches must be int, got str`` or
``ValueError: scope must be one of global, local; got 'globl'``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = [
    "check_int",
    "check_float",
    "check_choice",
    "check_str_list",
    "check_topk",
    "check_bool",
    "check_optional_bool",
    "check_threshold",
    "check_names",
    "round_half_up",
    "COUNT_ROUNDINGS",
    "count_of",
]


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(name: str, value: Any, *, min_value: int | None = None, allow_none: bool = False):
    """Return ``value`` if it is an int (never a bool) not below ``min_value``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be int, got {_type_name(value)}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
):
    """Return ``float(value)`` for an int or float (never a bool) in the given interval."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                hint = (f" (write {value!r} as the number {float(value)!r}: YAML 1.1, as in "
                        "yaml.safe_load, reads 5e-1 without a dot as a string)")
            except ValueError:
                pass
        raise TypeError(f"{name} must be float{hint}, got {_type_name(value)}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]):
    """Return ``value`` if it is one of ``choices`` (strings)."""
    choices = list(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {_type_name(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_str_list(name: str, value: Any, *, allow_none: bool = False):
    """Return a tuple of strings from a string or a list/tuple of strings."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {_type_name(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{name} must be a list of str, got an item of type {_type_name(item)}")
    return tuple(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``0``/``1`` are rejected: they are ints)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be bool, got {_type_name(value)}")
    return value


def check_optional_bool(name: str, value: Any):
    """``None`` or a bool (``"yes"`` and ``1`` are rejected)."""
    return None if value is None else check_bool(name, value)


def check_threshold(name: str, value: Any):
    """``None`` or a float score threshold; ``+inf`` (it would prune every unit) is refused, as
    ``sparsity=1.0`` is."""
    value = check_float(name, value, allow_none=True)
    if value == math.inf:
        raise ValueError(f"{name}=inf would prune every weight (refused, as sparsity=1.0 is); "
                         f"pass a finite threshold, got {value!r}")
    return value


def check_names(name: str, value: Any):
    """A list of names: a plain string (which would be iterated letter by letter) is refused."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of str, got str {value!r}; write [{value!r}]")
    try:
        out = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of str, got {_type_name(value)}") from None
    for item in out:
        if not isinstance(item, str):
            raise TypeError(f"{name} must be a list of str, got an item of type {_type_name(item)}")
    return out


def check_topk(name: str, value: Any):
    """``None``, an int >= 1 (a count) or a float in (0, 1] (a fraction); never a bool."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be int or float, got {_type_name(value)}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 when an int, got {value!r}")
    elif not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] when a float, got {value!r}")
    return value


def round_half_up(x: float) -> int:
    """The one rounding rule for counts: nearest integer, halves up (``2.5 -> 3``).

    ``x`` is first rounded to 9 decimals so that float noise (``0.9 * 10 = 9.000000000000002``)
    never moves a count.
    """
    return int(math.floor(round(x, 9) + 0.5))


COUNT_ROUNDINGS = ("half_up", "floor")


def count_of(x: float, rounding: str = "half_up") -> int:
    """A count from a real number of units, by one of :data:`COUNT_ROUNDINGS`: ``"half_up"``
    (:func:`round_half_up`, gradprune's default) or ``"floor"`` (Neural Compressor's
    ``int(units * sparsity)``). Both first round ``x`` to 9 decimals, so float noise never moves a
    count (``0.29 * 100 = 28.999999999999996`` floors to 29).

        >>> count_of(2.5), count_of(2.5, "floor"), count_of(2.999, "floor")
        (3, 2, 2)
    """
    if rounding == "half_up":
        return round_half_up(x)
    if rounding == "floor":
        return int(math.floor(round(x, 9)))
    raise ValueError(f"count_rounding must be one of {', '.join(COUNT_ROUNDINGS)}; got {rounding!r}")
