"""Explanation methods, one module per family; importing this package registers them all."""

from convlens.methods import (  # noqa: F401
    anchors,
    cam,
    contrastive,
    gradient,
    meaningful,
    perturbation,
    relevance,
)
from convlens.methods.base import Method

__all__ = ["Method"]
