"""The method registry: ``@register(name, family)``, :func:`list_methods`, :func:`get_method`.

Like timm's model registry, this one table drives :func:`convlens.explain`, the command line's
``--methods`` choices and the generic test suite that runs over every registered method.

The registry only reads its table: the built-in methods register themselves when
``convlens.methods`` is imported, which ``import convlens`` (and so the import of any
``convlens.*`` module) does. It never imports the methods itself, so imports flow one way.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from convlens.checks import RequestError

if TYPE_CHECKING:
    from convlens.methods.base import Method

FAMILIES = ("gradient", "cam", "perturbation", "relevance")

_METHODS: dict[str, type[Method]] = {}

M = TypeVar("M", bound="type[Method]")


def register(name: str, family: str) -> Callable[[M], M]:
    """Class decorator that registers an explanation method under ``name``."""
    if family not in FAMILIES:
        raise RequestError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")

    def decorate(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise RequestError(f"method {name!r} is already registered by {_METHODS[name]}")
        cls.name = name
        cls.family = family
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods(family: str | None = None) -> list[str]:
    """Names of the registered methods, in registration order, optionally of one family."""
    if family is not None and family not in FAMILIES:
        raise RequestError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return [name for name, cls in _METHODS.items() if family is None or cls.family == family]


def get_method(name: str) -> type[Method]:
    """The class registered under ``name``; a clear error lists the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _METHODS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RequestError(
            f"unknown method {name!r}.{hint} Known methods: {', '.join(_METHODS)}"
        ) from None
