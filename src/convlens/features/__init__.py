"""Indirect explanations: what the network has learned (``cl.features``).

Each function returns a :class:`Features` record with ``data`` (tensors) and ``image`` (a
picture): :func:`filters`, :func:`activations`, :func:`top_patches` (with
:func:`receptive_field`), :func:`class_model`, :func:`deep_dream`, :func:`embed`,
:func:`neighbours`, :func:`tsne` and :func:`dissect`.
"""

from convlens.features.common import Features
from convlens.features.dissect import dissect
from convlens.features.embedding import embed, neighbours, tsne
from convlens.features.invert import invert
from convlens.features.maps import activations, channel_contributions, filters
from convlens.features.patches import ReceptiveField, receptive_field, top_patches
from convlens.features.synthesis import class_model, deep_dream
from convlens.features.tcav import tcav

__all__ = [
    "Features",
    "ReceptiveField",
    "activations",
    "channel_contributions",
    "class_model",
    "deep_dream",
    "dissect",
    "embed",
    "filters",
    "invert",
    "neighbours",
    "receptive_field",
    "tcav",
    "top_patches",
    "tsne",
]
