"""Relevance methods: LRP with composites of rules, DeepLIFT / DeepSHAP and GradientSHAP.

* :mod:`.rules`: the LRP rules as objects (:class:`Epsilon`, :class:`ZPlus`,
  :class:`AlphaBeta`, :class:`Gamma`, :class:`ZBox`, :class:`Flat`), sharing one
  proportional-share helper; a new rule is one subclass of :class:`Rule`.
* :mod:`.composites`: which rule for which layer, named as zennit's composites.
* :mod:`.maps` and :mod:`.propagation`: a layer's map and its transpose, the function mode
  that gives each layer call its rule, and the :class:`Ledger` of absorbed relevance.
* :mod:`.lrp`: the ``lrp`` method; :mod:`.deeplift`: ``deeplift`` and ``gradient_shap``;
  :mod:`.excitation`: ``excitation_backprop`` (MWP and c-MWP, on :class:`.rules.Excitation`).
"""

from .lrp import LRP  # registered first: the family's order in convlens.list_methods()

# isort: split
from .composites import COMPOSITES, DEFAULT_COMPOSITE, Chooser, Composite, composite
from .deeplift import DeepLift, GradientShap, deeplift_context, shap_draws
from .excitation import ExcitationBackprop
from .maps import LinearMap
from .propagation import Ledger, lrp_context
from .rules import RULES, AlphaBeta, Epsilon, Flat, Gamma, Rule, Settings, ZBox, ZPlus

__all__ = [
    "COMPOSITES",
    "DEFAULT_COMPOSITE",
    "LRP",
    "RULES",
    "AlphaBeta",
    "Chooser",
    "Composite",
    "DeepLift",
    "Epsilon",
    "ExcitationBackprop",
    "Flat",
    "Gamma",
    "GradientShap",
    "Ledger",
    "LinearMap",
    "Rule",
    "Settings",
    "ZBox",
    "ZPlus",
    "composite",
    "deeplift_context",
    "lrp_context",
    "shap_draws",
]
