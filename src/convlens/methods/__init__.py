"""Explanation methods, one module per family; importing this package registers them all."""

from convlens.methods import anchors, cam, gradient, meaningful, perturbation  # noqa: F401
from convlens.methods.base import Method

__all__ = ["Method"]
