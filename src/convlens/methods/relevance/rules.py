"""LRP rules as objects: one class per rule, all sharing one proportional-share helper.

A rule says how a layer hands the relevance R at its output to its input x: in proportion to
contributions x_i w'_ij, R_i = x_i sum_j w'_ij R_j / z'_j with z'_j = sum_i x_i w'_ij (+ b'_j),
where each rule chooses its w' and b' (Montavon et al. 2019, "Layer-Wise Relevance Propagation:
An Overview", LNCS 11700). Every rule is written as :func:`share` over a few "parts" (inputs
with their weights) so that a rule costs one forward of the layer's map and one transpose,
however many parts it has. A new rule is one subclass of :class:`Rule` with a ``name``, its
parameters as fields, :meth:`Rule.of` (how LRP's parameters set it) and :meth:`Rule.apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from convlens.checks import RequestError

from .maps import LinearMap, stabilise

__all__ = [
    "RULES",
    "AlphaBeta",
    "Epsilon",
    "Excitation",
    "Flat",
    "Gamma",
    "Rule",
    "Settings",
    "ZBox",
    "ZPlus",
    "share",
]


def share(
    layer: LinearMap,
    parts: list[Tensor],
    weights: list[Tensor | None],
    relevance: Tensor,
    stabilised: Callable[[Tensor], Tensor],
    bias: Tensor | None = None,
) -> Tensor:
    """sum_k x_k * W_k^T (R / stabilised(sum_k W_k x_k + b)): relevance in proportion to the
    contributions of the parts x_k through the weights W_k (``weights`` may be longer than
    ``parts``). Where the map allows, the parts are stacked along the channels (and the
    weights along their inputs): one product forward and one back, however many parts."""
    weights = weights[: len(parts)]
    if len(parts) > 1 and layer.channel_dim is not None:
        stacked = torch.cat(parts, layer.channel_dim)
        stacked_weight = torch.cat(weights, 1)  # type: ignore[arg-type]
        r = share(layer, [stacked], [stacked_weight], relevance, stabilised, bias)
        chunks = r.chunk(len(parts), layer.channel_dim)
        total = chunks[0] + chunks[1]
        for chunk in chunks[2:]:
            total = total.add_(chunk)
        return total
    z = layer.forward(parts[0], weights[0], bias)
    for part, w in zip(parts[1:], weights[1:], strict=True):
        z = z.add_(layer.forward(part, w))
    denominator = stabilised(z)
    reusable = denominator.shape == relevance.shape and denominator.dtype == relevance.dtype
    if reusable and not (denominator.requires_grad or relevance.requires_grad):
        signal = torch.div(relevance, denominator, out=denominator)  # a buffer of this call's
    else:
        signal = relevance / denominator
    total = layer.weigh(signal, parts[0], weights[0])
    for part, w in zip(parts[1:], weights[1:], strict=True):
        total = total.addcmul_(part, layer.transpose(signal, part, w))
    return total


@dataclass(frozen=True)
class Settings:
    """LRP's parameters, from which a composite makes its rules (:meth:`Rule.of`).

    ``epsilon`` is the epsilon rule's own parameter; every other rule, pooling and sums are
    stabilised by ``stabilizer`` (1e-6), as in zennit, where a composite's ``epsilon`` reaches
    only its Epsilon rule."""

    epsilon: float = 1e-6
    stabilizer: float = 1e-6
    gamma: float = 0.25
    bias: bool = False
    low: Any = None
    high: Any = None


@dataclass(frozen=True, eq=False)
class Rule(ABC):
    """One LRP rule. ``epsilon`` is the stabiliser of its denominators (the rule's own
    parameter for :class:`Epsilon`)."""

    name: ClassVar[str] = ""
    epsilon: float = 1e-6

    @classmethod
    @abstractmethod
    def of(cls, settings: Settings) -> Rule:
        """The rule as LRP's parameters set it."""

    def __call__(
        self,
        layer: LinearMap,
        x: Tensor,
        relevance: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Input relevance of one layer (``layer`` computes its map): ``relevance`` (at its
        output) redistributed by the rule. ``weight`` and ``bias`` are the layer's effective
        parameters (its own, or with a following BatchNorm merged in); None for average pooling
        and an unmerged BatchNorm, which run as they are under the epsilon rule."""
        if weight is None:
            return Epsilon.redistribute(layer, x, relevance, None, bias, self.epsilon)
        return self.apply(layer, x, relevance, weight, bias)

    @abstractmethod
    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """The rule on a layer with parameters."""

    def describe(self) -> str:
        """The rule as recorded in ``Explanation.resolved["rules"]``."""
        return self.name

    def stabilised(self, z: Tensor) -> Tensor:
        return stabilise(z, self.epsilon)


@dataclass(frozen=True, eq=False)
class Epsilon(Rule):
    """LRP-epsilon (Bach et al. 2015): z' = W x + b, stabilised by epsilon * sign(z)."""

    name: ClassVar[str] = "epsilon"

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.epsilon)

    @staticmethod
    def redistribute(
        layer: LinearMap,
        x: Tensor,
        relevance: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        epsilon: float,
    ) -> Tensor:
        return share(layer, [x], [weight], relevance, lambda z: stabilise(z, epsilon), bias)

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        return self.redistribute(layer, x, relevance, weight, bias, self.epsilon)


def _signed(layer: LinearMap, x: Tensor) -> bool:
    """Whether the input takes negative values: not where it is known or found to be
    non-negative (after a rectifier), where the terms of negative inputs vanish."""
    return not (layer.non_negative or bool(x.amin() >= 0))


def _signed_parts(layer: LinearMap, x: Tensor) -> list[Tensor]:
    """[x+, x-], or [x] where the input is non-negative (:func:`_signed`)."""
    return [x.clamp(min=0), x.clamp(max=0)] if _signed(layer, x) else [x]


def _by_sign(t: Tensor, dim: int) -> Tensor:
    """torch.cat([t+, t-], dim) (in ``t``'s memory layout, as torch.cat makes it), each half
    written once by its clamp (where autograd need not record it)."""
    if t.requires_grad and torch.is_grad_enabled():
        return torch.cat([t.clamp(min=0), t.clamp(max=0)], dim)
    shape = list(t.shape)
    shape[dim] *= 2
    last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if last and not t.is_contiguous() else torch.contiguous_format
    both = torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=layout)
    positive, negative = both.chunk(2, dim)
    torch.clamp(t, min=0, out=positive)
    torch.clamp(t, max=0, out=negative)
    return both


def _part(bias: Tensor | None, wanted: bool, **clamp: float) -> Tensor | None:
    return bias.clamp(**clamp) if wanted and bias is not None else None


@dataclass(frozen=True, eq=False)
class ZPlus(Rule):
    """LRP-z+ (Montavon et al. 2017, deep Taylor decomposition): relevance in proportion to
    the positive contributions, w+ on positive inputs with w- on negative ones (alpha-beta
    with alpha = 1, beta = 0). ``bias=False``: the contributions only, as Montavon et al.
    2017 define z+; ``bias=True``: the positive part of the bias joins the denominator, as in
    zennit's ``ZPlus`` (its parameter modifier clamps the bias like the weight). The sum is
    non-negative, so the stabiliser is a plain +epsilon."""

    name: ClassVar[str] = "zplus"
    bias: bool = False

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.stabilizer, bias=settings.bias)

    def describe(self) -> str:
        return "zplus" + ("_bias" if self.bias else "")

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        b, eps = _part(bias, self.bias, min=0), self.epsilon
        signed = _signed(layer, x)
        if signed and layer.channel_dim is not None:  # share's stacking, each half written once
            dim = layer.channel_dim
            parts, weights = [_by_sign(x, dim)], [_by_sign(weight, 1)]
            stacked = share(layer, parts, weights, relevance, lambda z: z.add_(eps), b)
            return torch.add(*stacked.chunk(2, dim))
        positive = weight.clamp(min=0)
        parts = [x.clamp(min=0), x.clamp(max=0)] if signed else [x]
        weights = [positive, weight.clamp(max=0)] if signed else [positive]
        return share(layer, parts, weights, relevance, lambda z: z.add_(eps), b)


def _no_excitation_passes_nothing(z: Tensor) -> Tensor:
    """sum_k a_k w+_k as it is (no stabiliser: the shares are exact probabilities), with inf
    where it is 0: a unit without excitatory input passes nothing on (Z_i is undefined)."""
    return z.masked_fill_(z == 0, float("inf"))


@dataclass(frozen=True, eq=False)
class Excitation(Rule):
    """Excitation backprop's probabilistic winner-take-all (Zhang et al. 2016, "Top-down Neural
    Attention by Excitation Backprop", ECCV, Sec. 3.2, Eq. 1-3): P(a_j) = sum_i P(a_j|a_i) P(a_i)
    with P(a_j|a_i) = a_j w+_ji / sum_k a_k w+_ki: z+ without bias on non-negative inputs, and
    without stabiliser (a unit whose excitatory inputs all vanish passes nothing on).
    ``dual`` negates the weights: the dual output unit of contrastive MWP (Sec. 3.3). A layer
    whose input takes negative values is refused (its shares are no probabilities); ``layer``
    names it in the refusal."""

    name: ClassVar[str] = "excitation"
    dual: bool = False
    layer: str = ""

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.stabilizer)

    def describe(self) -> str:
        return "excitation" + ("_dual" if self.dual else "")

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        if not layer.non_negative and bool(x.amin() < 0):
            raise RequestError(
                "excitation backprop needs non-negative activations (a rectifier's outputs) "
                f"into every layer it passes (Zhang et al. 2016); layer {self.layer!r} reads "
                "negative values: read the map at a layer above it (layer=...), or use 'lrp'"
            )
        positive = (weight.neg() if self.dual else weight).clamp(min=0)
        return share(layer, [x], [positive], relevance, _no_excitation_passes_nothing)


@dataclass(frozen=True, eq=False)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015): alpha times the share of the positive contributions
    (w+ on positive inputs, w- on negative ones) minus beta times that of the negative ones
    (w- on positive inputs, w+ on negative ones). ``bias=True`` adds the positive part of the
    bias to the positive denominator and its negative part to the negative one, as zennit's
    ``AlphaBeta`` does; ``bias=False`` leaves biases out. Each sum has one sign, so the
    stabiliser is a plain +-epsilon."""

    name: ClassVar[str] = "alpha_beta"
    alpha: float = 2.0
    beta: float = 1.0
    bias: bool = False

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.stabilizer, alpha=2.0, beta=1.0, bias=settings.bias)

    def describe(self) -> str:
        return f"alpha{self.alpha:g}_beta{self.beta:g}" + ("_bias" if self.bias else "")

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        parts = _signed_parts(layer, x)
        positive, negative = weight.clamp(min=0), weight.clamp(max=0)
        eps = self.epsilon
        b = _part(bias, self.bias, min=0)
        r = share(layer, parts, [positive, negative], relevance, lambda z: z.add_(eps), b)
        b = _part(bias, self.bias, max=0)
        other = share(layer, parts, [negative, positive], relevance, lambda z: z.sub_(eps), b)
        return r.mul_(self.alpha).sub_(other, alpha=self.beta)


@dataclass(frozen=True, eq=False)
class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019), sign-aware as zennit's generalised Gamma (Andeol et
    al. 2021): a unit with z >= 0 favours positive contributions (w + gamma w+ on positive
    inputs, w + gamma w- on negative ones, b + gamma b+), a unit with z < 0 the negative ones
    (mirrored). Then |z'| >= |z|: the rule never divides by a vanishing z', also in networks
    whose activations take both signs (EfficientNet's linear bottlenecks). The bias always
    takes part, as in zennit."""

    name: ClassVar[str] = "gamma"
    gamma: float = 0.25

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.stabilizer, gamma=settings.gamma)

    def describe(self) -> str:
        return f"gamma{self.gamma:g}"

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        g = self.gamma
        positive, negative = weight.clamp(min=0), weight.clamp(max=0)
        upward = layer.forward(x, weight, bias) >= 0
        parts = [x.clamp(min=0), x.clamp(max=0)]
        total = torch.zeros_like(x)
        for mask, favoured, other, b in (
            (upward, positive, negative, None if bias is None else bias + g * bias.clamp(min=0)),
            (~upward, negative, positive, None if bias is None else bias + g * bias.clamp(max=0)),
        ):
            weights = [weight + g * favoured, weight + g * other]
            selected = relevance.where(mask, 0.0)
            total += share(layer, parts, weights, selected, self.stabilised, b)
        return total


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by ``low`` and ``high`` (numbers, per
    channel or tensors): contributions x w - l w+ - h w-, written as three parts, the bounds
    with negated weights. The bias takes no part (in zennit's ZBox it cancels)."""

    name: ClassVar[str] = "zbox"
    low: Any = None
    high: Any = None

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.stabilizer, low=settings.low, high=settings.high)

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        low = layer.over_inputs(lambda shape: _bound(self.low, shape, x), x)
        high = layer.over_inputs(lambda shape: _bound(self.high, shape, x), x)
        weights = [weight, weight.clamp(min=0).neg_(), weight.clamp(max=0).neg_()]
        return share(layer, [x, low, high], weights, relevance, self.stabilised)


@dataclass(frozen=True, eq=False)
class Flat(Rule):
    """LRP-flat (Lapuschkin et al. 2019): every connection 1, every input 1, no bias."""

    name: ClassVar[str] = "flat"

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.stabilizer)

    def apply(
        self, layer: LinearMap, x: Tensor, relevance: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        ones = layer.over_inputs(lambda shape: x.new_ones(shape), x)
        return share(layer, [ones], [torch.ones_like(weight)], relevance, self.stabilised)


def _bound(value: Any, shape: torch.Size, like: Tensor) -> Tensor:
    """A z^B bound (a number, per channel or a tensor) over ``shape``, in ``like``'s layout."""
    if value is None:
        raise RequestError("the zbox rule needs low and high bounds")
    bound = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if bound.dim() == 1 and len(shape) == 4:
        bound = bound.view(1, -1, 1, 1)
    last = len(shape) == 4 and like.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if last else torch.contiguous_format
    return bound.expand(shape).contiguous(memory_format=layout)


RULES: Mapping[str, type[Rule]] = {
    cls.name: cls for cls in (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox, Flat)
}
