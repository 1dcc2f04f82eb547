"""Composites: which LRP rule for the input layer, the convolutions and the dense layers.

The names are zennit's (``zennit.composites``, chr5tphr/zennit) and mean what zennit's
composites of that name mean:

* ``epsilon_plus`` (zennit ``EpsilonPlus``): z+ in every convolution, the first included;
  epsilon in dense layers.
* ``epsilon_plus_flat`` (``EpsilonPlusFlat``): flat in the first linear layer (convolution or
  dense), then z+ in convolutions and epsilon in dense layers.
* ``epsilon_gamma_box`` (``EpsilonGammaBox``): z^B in the first convolution, gamma in the
  other convolutions, epsilon in dense layers.
* ``epsilon_alpha2_beta1`` (``EpsilonAlpha2Beta1``): alpha2-beta1 in every convolution,
  epsilon in dense layers.
* ``epsilon_alpha2_beta1_flat`` (``EpsilonAlpha2Beta1Flat``): flat in the first linear layer,
  then alpha2-beta1 in convolutions and epsilon in dense layers.
* ``epsilon_plus_box`` (convlens's default; no zennit composite of this name, it is
  ``EpsilonGammaBox`` with z+ for gamma, Montavon et al. 2019, section 10.3): z^B in the first
  convolution, z+ in the other convolutions, epsilon in dense layers.
* ``epsilon``: epsilon everywhere (LRP-epsilon, Bach et al. 2015).

As in zennit, "first" means the first layer of the kinds the composite names for it (zennit's
``first_map``: ``Convolution`` for z^B, any ``Linear`` for flat); zennit takes it in module
registration order, convlens in the order the forward calls the layers, which is the same for
models written in order. Average pooling and sums use epsilon as a stabiliser only (zennit's
``Norm``) and rectifiers pass relevance on (``Pass``); a BatchNorm after a convolution is merged
into it (what zennit's ``SequentialMergeBatchNorm`` canonizer does).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from convlens.checks import RequestError

from .maps import LINEAR
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, Settings, ZBox, ZPlus

__all__ = ["COMPOSITES", "DEFAULT_COMPOSITE", "Chooser", "Composite", "composite"]


@dataclass(frozen=True)
class Composite:
    """Rules by kind of layer: ``conv`` for convolutions, ``dense`` for dense layers, and
    ``first`` (if any) for the first layer the forward calls that is one of ``first_of``.
    ``zennit`` names the zennit composite it equals ("" where zennit has none)."""

    name: str
    conv: type[Rule]
    dense: type[Rule]
    first: type[Rule] | None = None
    first_of: tuple[type[nn.Module], ...] = (nn.Conv2d,)
    zennit: str = ""

    def chooser(self, settings: Settings) -> Chooser:
        """The rule of each layer call for one forward pass, with LRP's parameters."""
        return Chooser(self, settings)

    def uses(self, rule: type[Rule]) -> bool:
        return rule in (self.conv, self.dense, self.first)


class Chooser:
    """A composite's choice of rule for each call of a convolution or dense layer in one
    forward pass (asked in call order, so the first eligible call is the first layer), and
    a record of the choices (``chosen``: layer -> rule descriptions)."""

    def __init__(self, composite: Composite, settings: Settings) -> None:
        self.composite = composite
        self.conv, self.dense = composite.conv.of(settings), composite.dense.of(settings)
        self.first = composite.first.of(settings) if composite.first is not None else None
        self.chosen: dict[nn.Module, list[str]] = {}

    def __call__(self, layer: nn.Module) -> Rule:
        if self.first is not None and isinstance(layer, self.composite.first_of):
            rule, self.first = self.first, None
        else:
            rule = self.conv if isinstance(layer, nn.Conv2d) else self.dense
        described = self.chosen.setdefault(layer, [])
        if rule.describe() not in described:
            described.append(rule.describe())
        return rule


COMPOSITES: dict[str, Composite] = {
    c.name: c
    for c in (
        Composite("epsilon_plus_box", ZPlus, Epsilon, first=ZBox),
        Composite("epsilon_plus", ZPlus, Epsilon, zennit="EpsilonPlus"),
        Composite(
            "epsilon_plus_flat", ZPlus, Epsilon, Flat, first_of=LINEAR, zennit="EpsilonPlusFlat"
        ),
        Composite("epsilon_gamma_box", Gamma, Epsilon, first=ZBox, zennit="EpsilonGammaBox"),
        Composite("epsilon_alpha2_beta1", AlphaBeta, Epsilon, zennit="EpsilonAlpha2Beta1"),
        Composite(
            "epsilon_alpha2_beta1_flat",
            AlphaBeta,
            Epsilon,
            Flat,
            first_of=LINEAR,
            zennit="EpsilonAlpha2Beta1Flat",
        ),
        Composite("epsilon", Epsilon, Epsilon),
    )
}
DEFAULT_COMPOSITE = "epsilon_plus_box"


def composite(name: str) -> Composite:
    """The composite called ``name``; a clear error lists the known ones otherwise."""
    if not isinstance(name, str) or name not in COMPOSITES:
        raise RequestError(f"unknown composite {name!r}; known: {', '.join(COMPOSITES)}")
    return COMPOSITES[name]
