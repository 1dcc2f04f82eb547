"""Excitation backprop: marginal winning probabilities (MWP) and contrastive MWP (c-MWP).

Zhang, Lin, Brandt, Shen & Sclaroff 2016, "Top-down Neural Attention by Excitation Backprop"
(ECCV, arXiv:1608.00507; IJCV 2018 with Bargal). A probabilistic winner-take-all passes a
top-down signal from the output down the network (Sec. 3.2): the marginal winning probability
of a neuron is P(a_j) = sum_i P(a_j|a_i) P(a_i) (Eq. 1), where a parent i chooses among its
children j in proportion to their excitatory input, P(a_j|a_i) = Z_i a_j w_ji for w_ji >= 0 and
0 otherwise, Z_i = 1 / sum_{k: w_ki >= 0} a_k w_ki (Eq. 2-3): the LRP z+ rule without bias on
non-negative activations (:class:`.rules.Excitation`). The signal starts as a one-hot prior on
the target's unit, so the MWP of every layer is a probability distribution: non-negative,
summing to 1.

Contrastive MWP (Sec. 3.3): the target unit o has a dual unit o-bar whose weights are o's
negated; the MWP of o-bar is subtracted from that of o at the layer where the map is read
(the two share everything below the classifier, and the propagation is linear in the signal,
so this equals the authors' subtraction at the classifier's input followed by one backward
pass), and the map keeps the positive part.

The rule machinery is the relevance family's (:mod:`.propagation`): biases are ignored,
rectifiers and elementwise activations pass the signal on, average pooling and means share it
in proportion to their inputs (z+ with positive weights), max pooling gives it all to the
winner (its gradient), and a BatchNorm after a convolution is folded into it (the authors fold
negative BatchNorm scales into the convolution in the same way). A residual sum splits the
signal in proportion to its terms, as in the authors' implementation; where a term is negative
(a ResNet block's sum before its rectifier) the split leaves the probabilities' simplex, and a
BatchNorm that follows no convolution runs under the family's epsilon rule, which does not
conserve the signal: the method warns wherever the MWP at the layer is off a distribution by
more than 0.1%. The input layer is never reached: the map is read at a layer's output, and the
image's values (of both signs) are no activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from convlens.checks import RequestError, RequestTypeError
from convlens.methods.base import Result
from convlens.methods.cam import CAMMethod
from convlens.registry import register
from convlens.targets import Class, Contrast, Predicted, Target

from .maps import LINEAR, per_row
from .propagation import Ledger, lrp_context
from .rules import Excitation, Settings

__all__ = ["ExcitationBackprop"]

_STABILIZER = Settings().stabilizer  # the family's, for pooling and sums (1e-6)


def _warn_unless_distribution(mass: Tensor, negative: Tensor, layer: str, which: str) -> None:
    """The MWP at a layer sums to 1 and is non-negative wherever every operation on the way
    has a winner-take-all rule; where it misses by more than 0.1% (signal absorbed by units
    whose excitatory inputs all vanish, split by a sum whose terms take both signs, or scaled
    by a BatchNorm that follows no convolution), say so."""
    bad = ((mass - 1).abs() > 1e-3) | (negative > 1e-3)
    if bool(bad.any()):
        i = int(bad.double().argmax())
        warnings.warn(
            f"excitation_backprop: the {which} winning probabilities at layer {layer!r} are no "
            f"distribution for input {i} (they sum to {mass[i]:.4g}, {negative[i]:.4g} of it "
            "negative): signal was lost where a unit's excitatory inputs all vanish, split by "
            "a sum of terms of both signs, or scaled by a BatchNorm that follows no convolution",
            RuntimeWarning,
            stacklevel=4,
        )


@register("excitation_backprop", "relevance")
class ExcitationBackprop(CAMMethod):
    """Excitation backprop (Zhang et al. 2016): the marginal winning probability of each unit
    of ``layer`` for the target, summed over channels and upsampled to the input (bilinear, as
    the CAMs); ``contrastive=True`` gives c-MWP, max(MWP(o) - MWP(o-bar), 0) with o-bar the
    target's dual unit (the classifier's weights of the target negated, in the last convolution
    or dense layer the forward calls).

    ``layer`` (default: the CAM layer, the last spatial feature map the classifier reads,
    where the signal only passes the classifier head and so every architecture is served).
    The paper reads maps at an intermediate layer of stride 16 (GoogLeNet pool3/3x3_s2,
    ResNet-50 res4a in the authors' demos): pass such a layer for finer maps. Every layer the
    signal passes must read non-negative activations (after a rectifier); one that does not
    (a linear bottleneck, a transformer) is refused by name. Targets: a class (the prior is
    one-hot on it), or with ``contrastive=False`` an inner ``Channel`` (uniform over its
    positions) or ``Neuron``; a ``Contrast`` target is refused (its signal is no
    distribution: use ``contrastive=True``).
    """

    description = "excitation backprop, marginal winning probabilities; c-MWP (Zhang et al. 2016)"
    passes: ClassVar[str] = "1 forward and backward pass (2 with contrastive=True)"
    defaults: ClassVar[dict[str, Any]] = {"layer": None, "contrastive": False}
    extras: ClassVar[dict[str, str]] = {
        "mass": "per input: the sum of the target's winning probabilities at the layer, 1 "
        "where no signal is lost on the way (it is a distribution)",
        "dual_mass": "per input, with contrastive=True: the same for the dual unit",
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        super().check(params)
        if not isinstance(params["contrastive"], bool):
            raise RequestTypeError(
                f"contrastive must be True or False, not {params['contrastive']!r}"
            )

    @classmethod
    def check_targets(cls, targets: Sequence[Target]) -> None:
        if any(isinstance(t, Contrast) for t in targets):
            raise RequestError(
                "excitation_backprop starts from a probability distribution over output units "
                "(Zhang et al. 2016), which a Contrast target is not; use contrastive=True "
                "(c-MWP) or explain one class"
            )

    def _classifier(self) -> nn.Module:
        """The layer whose weights the dual unit negates: the last convolution or dense layer
        the forward calls (from the engine's probe)."""
        found = [c.module for c in self.engine.calls if isinstance(c.module, LINEAR)]
        if not found:
            raise RequestError(
                "contrastive excitation backprop negates the classifier's weights, but the "
                "model calls no nn.Linear or nn.Conv2d; use contrastive=False"
            )
        return found[-1]

    def _mwp(
        self, x: Tensor, targets: list[Target], layers: dict[int, nn.Module], dual: Any
    ) -> tuple[Tensor, list[Target], str]:
        """The winning probabilities (B, C, h, w) of the layer's units, the resolved targets
        and the layer's name; ``dual`` (a layer or None) propagates with its weights negated."""
        names = {m: name for name, m in self.model.module.named_modules()}

        def rule(layer: nn.Module) -> Excitation:
            name = names.get(layer) or type(layer).__name__
            return Excitation(_STABILIZER, dual=layer is dual, layer=name)

        with lrp_context(self.model.module, rule, Ledger(), _STABILIZER):
            step = self.engine.evaluate(x, targets, layers=layers, grad=True)
            (key,), (name,) = self._chosen(step.captured, layers)
            activation = step.captured[key]
            prior = torch.ones_like(step.scores)  # one-hot on each target's unit
            (mwp,) = torch.autograd.grad(step.scores, activation, prior, allow_unused=True)
        if mwp is None:
            raise RequestError(
                f"the target does not depend on layer {name!r}: read the map at a layer "
                "between the input and the target"
            )
        return self.grid(mwp.detach()).double(), step.targets, name

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        contrastive = self.params["contrastive"]
        if contrastive and not all(isinstance(t, (Class, Predicted)) for t in targets):
            raise RequestError(
                "contrastive=True explains classes: the dual unit negates the classifier's "
                "weights of the target class (Zhang et al. 2016); use contrastive=False for "
                "Channel and Neuron targets"
            )
        layers = self._layers()
        dual = self._classifier() if contrastive else None
        maps, resolved, masses, dual_masses = [], [], [], []
        name = ""
        with self.engine.task(len(x) * (2 if contrastive else 1)):
            for start, stop in self.engine.chunks(len(x)):
                mwp, chunk_targets, name = self._mwp(
                    x[start:stop], targets[start:stop], layers, None
                )
                masses.append(self._mass(mwp, name, "target's"))
                signal = mwp.sum(1)
                if contrastive:  # the same classes, Predicted() resolved by the first pass
                    other, _, _ = self._mwp(x[start:stop], chunk_targets, layers, dual)
                    dual_masses.append(self._mass(other, name, "dual unit's"))
                    signal = (signal - other.sum(1)).clamp(min=0)
                maps.append(self.finish([signal.float()], x.shape[-2:]))
                resolved += chunk_targets
        decided: dict[str, Any] = {"layer": name}
        extras: dict[str, Any] = {"mass": torch.cat(masses).tolist()}
        if contrastive:
            decided["dual"] = self.model.layer_name(dual)
            extras["dual_mass"] = torch.cat(dual_masses).tolist()
        return Result(torch.cat(maps), resolved, resolved=decided, extras=extras)

    @staticmethod
    def _mass(mwp: Tensor, layer: str, which: str) -> Tensor:
        """Each input's total winning probability, checked to be a distribution."""
        mass = per_row(mwp).cpu()
        _warn_unless_distribution(mass, per_row(mwp.clamp(max=0)).neg().cpu(), layer, which)
        return mass
