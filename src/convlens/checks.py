"""Small helpers every layer uses: the errors that mean "bad request" and argument checks.

A :class:`RequestError` is what convlens raises when what it was asked cannot be done as asked:
an unknown method, a parameter out of range, a layer that does not exist. It is a ``ValueError``
(and the ``TypeError`` / ``IndexError`` variants are those too), so code catching the builtin
exceptions keeps working; the command line prints it as one line with exit status 2, and shows
every other exception (a bug, in convlens or in the model) with its traceback.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "RequestError",
    "RequestIndexError",
    "RequestTypeError",
    "distinct",
    "finite",
    "first_line",
    "pair",
    "positive_int",
    "positive_number",
]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what one-line
    reports (skipped images, refused methods, the command line) show."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


def distinct(names: list[Any], what: str) -> None:
    """Refuse, naming it, a name that ``what`` (say ``"labels labels.txt"``) holds twice."""
    seen: set[Any] = set()
    for name in names:
        if name in seen:
            raise RequestError(f"{what} names {name!r} more than once")
        seen.add(name)


class RequestError(ValueError):
    """A request convlens cannot carry out as asked; the message names the problem."""


class RequestTypeError(RequestError, TypeError):
    """A request with an argument of the wrong kind."""


class RequestIndexError(RequestError, IndexError):
    """A request for an item (input, channel) that does not exist."""


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer of at least ``minimum``; a clear error naming it otherwise."""
    if hasattr(value, "__index__") and not isinstance(value, bool):
        value = int(value.__index__())  # NumPy and torch integers
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise RequestError(f"{name} must be {need}, not {value!r}")
    return value


def finite(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number; a clear error naming it otherwise."""
    if isinstance(value, bool):
        raise RequestTypeError(f"{name} must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestTypeError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, not {value!r}")
    return number


def positive_number(name: str, value: Any, zero: bool = False) -> float:
    """``value`` as a float if it is a finite number above 0 (or 0 too, with ``zero=True``); a
    one-line error naming it otherwise (text such as ``"0.1"`` is not a number here)."""
    if isinstance(value, (str, bytes)):
        raise RequestTypeError(f"{name} must be a number, not {value!r}")
    number = finite(name, value)
    if number < 0 or (number == 0 and not zero):
        need = "a non-negative number" if zero else "a positive number"
        raise RequestError(f"{name} must be {need}, not {value!r}")
    return number


def pair(value: Any) -> tuple[int, int]:
    """A convolution or pooling argument (stride, padding, ...) as a pair: ``2`` -> ``(2, 2)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
