"""Relevance propagation: layer-wise relevance propagation (LRP).

Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
Relevance Propagation" (PLoS ONE); Montavon et al. 2017, "Explaining nonlinear classification
decisions with deep Taylor decomposition" (Pattern Recognition); Montavon et al. 2019,
"Layer-Wise Relevance Propagation: An Overview" (LNCS 11700), whose rules and composites these
are.

The relevance of the target logit flows back layer by layer. A TorchFunctionMode sees every
call the model's forward makes: each F.conv2d / F.linear with a layer's weight, F.batch_norm
and average pooling is computed by an autograd function whose backward redistributes
relevance by the layer's rule, R_i = x_i sum_j w'_ij R_j / z'_j. The rule runs the very call
the layer made (its strides, groups, dilation; its padding, inside F.conv2d or as a separate
F.pad that autograd then undoes), as one convolution forward and one transposed convolution in
the tensors' own memory layout. Rectifiers pass relevance through unchanged, max pooling
routes it to the winner, and residual additions written as ``a + b`` inside ``forward`` split
it in proportion to the two terms (so do ``mean`` reductions). A BatchNorm that reads a
convolution's output is folded into that convolution's parameters for its rule (the modules
themselves are never changed). What biases and stabilisers absorb is counted, layer by layer,
so that input relevance + absorbed = the target logit.

Everything happens inside a context manager; no module is swapped and no hook is left.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from convlens.checks import RequestError, pair
from convlens.engine import model_layout
from convlens.hooks import override_rectifiers, replace_rectifiers
from convlens.methods.base import Method
from convlens.registry import register
from convlens.targets import Predicted, Target, resolve_targets, score_rows

__all__ = [
    "COMPOSITES",
    "LRP",
    "DeepLift",
    "GradientShap",
    "Rule",
    "deeplift_context",
    "lrp_context",
    "shap_draws",
]

LINEAR = (nn.Conv2d, nn.Linear)


def _stabilise(z: Tensor, epsilon: float) -> Tensor:
    """z + epsilon * sign(z), the sign of a zero taken from its sign bit: never divides by zero
    (two passes over z, where sign() would need a third for its zeros)."""
    return z + torch.copysign(z.new_tensor(epsilon), z)


@dataclass(frozen=True)
class Rule:
    """One LRP rule: ``name`` is epsilon, gamma, zplus, alpha_beta, zbox or flat."""

    name: str
    epsilon: float = 1e-6
    gamma: float = 0.25
    alpha: float = 2.0
    beta: float = 1.0
    low: Any = None  # zbox bounds (per channel or a tensor)
    high: Any = None


class Ledger:
    """Relevance absorbed (per input) by biases and stabilisers, and a re-entrance flag.

    Each layer reports what it received and what it passed on; ``absorbed`` is the sum of the
    differences. Relevance passed on is usually received by the next layer unchanged (the very
    tensor): such a pair cancels and is never summed. Only what is received from elsewhere (an
    accumulation of branches, the target's score) and what is passed on but never received
    as it is (into such accumulations, or the input relevance) is summed, in double precision.
    """

    KEPT = 8  # tensors passed on and awaited; older ones are summed and let go

    def __init__(self) -> None:
        self.inside = False
        self._sums: list[Tensor] = []  # per-input sums: + received, - passed on
        self._pending: dict[int, Tensor] = {}

    def add(self, before: Tensor, *after: Tensor) -> None:
        """A layer received ``before`` and passed on ``after``."""
        if self._pending.get(id(before)) is before:
            del self._pending[id(before)]
        else:
            self._sums.append(_per_row(before).double())
        for t in after:
            self._pending[id(t)] = t
        while len(self._pending) > self.KEPT:
            self._settle(next(iter(self._pending)))

    def _settle(self, key: int) -> None:
        self._sums.append(-_per_row(self._pending.pop(key)).double())

    @property
    def absorbed(self) -> Tensor | None:
        for key in list(self._pending):
            self._settle(key)
        return torch.stack(self._sums).detach().sum(0) if self._sums else None


def _per_row(t: Tensor) -> Tensor:
    """The sum of each row of a batch, in any memory layout (flatten would copy channels-last)."""
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t


def _bind(names: str, defaults: tuple, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a functional call by name."""
    call = dict(zip(names.split(), defaults, strict=True))
    call.update(zip(names.split(), args, strict=False))
    call.update(kwargs)
    return call


class LinearMap:
    """A layer's map as the forward called it: ``forward(x, weight, bias)`` is that call with
    the given parameters (W x + b; the call as it was where ``weight`` is None: pooling, a
    BatchNorm on its own) and ``transpose(signal, x, weight)`` is W^T signal, shaped like x.
    That is all an LRP rule needs of a layer. This base class transposes with autograd.

    ``padding`` maps a tensor over the layer's own inputs (shape ``inputs``) to the call's
    input, as the layer padded it before F.conv2d (EfficientNet's static padding, padding
    modes): z^B bounds and flat's connections belong to the inputs, never to the padding.
    """

    def __init__(self, call: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]) -> None:
        self.call = call
        self.padding: Callable[[Tensor], Tensor] | None = None
        self.inputs: torch.Size | None = None
        # the input's channel dimension where the map may run on inputs stacked along it (with
        # its weights stacked along dimension 1); None where groups forbid it
        self.channel_dim: int | None = None
        self.non_negative = False  # the input is known to be >= 0 (a rectifier's output)

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None = None) -> Tensor:
        return self.call(x, weight, bias)

    def transpose(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (result,) = torch.autograd.grad(self.forward(leaf, weight), leaf, signal)
        return result

    def over_inputs(self, make: Callable[[torch.Size], Tensor], x: Tensor) -> Tensor:
        """``make(shape)`` over the layer's own inputs, padded as the call's input ``x``."""
        if self.padding is None or self.inputs is None:
            return make(x.shape)
        return self.padding(make(self.inputs))


class _Conv2dMap(LinearMap):
    """F.conv2d with numeric padding: the transpose is one transposed convolution, in the
    layout of the input (``F.grad.conv2d_input`` would turn channels-last into a copy)."""

    def __init__(self, stride: Any, padding: Any, dilation: Any, groups: int) -> None:
        super().__init__(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups))
        self.args = (stride, padding, dilation, groups)
        self.channel_dim = 1 if groups == 1 else None

    def transpose(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        stride, padding, dilation, groups = self.args
        return torch.ops.aten.convolution_backward(
            signal,
            x,
            weight,
            None,
            pair(stride),
            pair(padding),
            pair(dilation),
            False,
            [0, 0],
            groups,
            [True, False, False],
        )[0]


class _DenseMap(LinearMap):
    """F.linear: the transpose is one matrix product."""

    def __init__(self) -> None:
        super().__init__(F.linear)
        self.channel_dim = -1

    def transpose(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        return signal @ weight


def _affine_map(func: Callable, call: dict[str, Any]) -> LinearMap:
    """The map of a call to F.linear or F.conv2d (bound by :func:`_bind`)."""
    if func is F.linear:
        return _DenseMap()
    padding = call["padding"]
    stride, dilation, groups = call["stride"], call["dilation"], call["groups"]
    if padding == "valid":
        padding = 0
    if isinstance(padding, str):  # "same": autograd transposes whatever F.conv2d pads
        return LinearMap(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups))
    return _Conv2dMap(stride, padding, dilation, groups)


def _non_negative(x: Tensor) -> bool:
    return bool(x.amin() >= 0)


def redistribute(
    layer: LinearMap,
    rule: Rule,
    x: Tensor,
    relevance: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Input relevance of one layer (``layer`` computes its map): ``relevance`` (at its output)
    redistributed by ``rule``. ``weight`` and ``bias`` are the layer's effective parameters
    (its own, or with a following BatchNorm merged in); None for average pooling and unmerged
    BatchNorm, which run as they are under the epsilon rule.
    """
    eps = rule.epsilon

    def stabilised(z: Tensor) -> Tensor:
        return _stabilise(z, eps)

    if weight is None or rule.name == "epsilon":
        return _share(layer, [x], [weight], relevance, stabilised, bias)
    if rule.name == "gamma":
        return _gamma(layer, rule, x, relevance, weight, bias)
    positive = weight.clamp(min=0)
    if rule.name in ("zplus", "alpha_beta"):
        # contributions x w of one sign: w+ on positive inputs with w- on negative ones
        # (positive), w- on positive inputs with w+ on negative ones (negative); inputs that
        # are all non-negative (after a rectifier) need only the first term. Both sums have
        # one sign, so the stabiliser is a plain +-epsilon.
        signed = not (layer.non_negative or _non_negative(x))
        parts = [x.clamp(min=0), x.clamp(max=0)] if signed else [x]
        negative = weight.clamp(max=0) if signed or rule.name == "alpha_beta" else positive
        r = _share(layer, parts, [positive, negative], relevance, lambda z: z.add_(eps))
        if rule.name == "zplus":
            return r
        other = _share(layer, parts, [negative, positive], relevance, lambda z: z.sub_(eps))
        return r.mul_(rule.alpha).sub_(other, alpha=rule.beta)
    if rule.name == "zbox":  # x w - l w+ - h w-: the bounds as parts with negated weights
        low = layer.over_inputs(lambda shape: _bound(rule.low, shape, x), x)
        high = layer.over_inputs(lambda shape: _bound(rule.high, shape, x), x)
        weights = [weight, positive.neg_(), weight.clamp(max=0).neg_()]
        return _share(layer, [x, low, high], weights, relevance, stabilised)
    if rule.name == "flat":  # every connection 1, every input 1
        ones = layer.over_inputs(lambda shape: x.new_ones(shape), x)
        return _share(layer, [ones], [torch.ones_like(weight)], relevance, stabilised)
    raise RequestError(f"unknown LRP rule {rule.name!r}")


def _share(
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
        r = _share(layer, [stacked], [stacked_weight], relevance, stabilised, bias)
        chunks = r.chunk(len(parts), layer.channel_dim)
        total = chunks[0] + chunks[1]
        for chunk in chunks[2:]:
            total = total.add_(chunk)
        return total
    z = layer.forward(parts[0], weights[0], bias)
    for part, w in zip(parts[1:], weights[1:], strict=True):
        z = z.add_(layer.forward(part, w))
    signal = relevance / stabilised(z)
    total = parts[0] * layer.transpose(signal, parts[0], weights[0])
    for part, w in zip(parts[1:], weights[1:], strict=True):
        total = total.addcmul_(part, layer.transpose(signal, part, w))
    return total


def _gamma(
    layer: LinearMap,
    rule: Rule,
    x: Tensor,
    relevance: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """LRP-gamma, sign-aware: a unit with z >= 0 favours positive contributions (w + gamma w+
    on positive inputs, w + gamma w- on negative ones, b + gamma b+), a unit with z < 0 the
    negative ones (mirrored). Then |z'| >= |z|: the rule never divides by a vanishing z', also
    in networks whose activations take both signs (EfficientNet's linear bottlenecks)."""
    g = rule.gamma
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
        total += _share(layer, parts, weights, selected, lambda z: _stabilise(z, rule.epsilon), b)
    return total


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


class _Layer(torch.autograd.Function):
    """Computes a layer's output (``compute(x)``, without recording it); its backward
    redistributes relevance to the input (``step(x, relevance)``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        compute: Callable[[Tensor], Tensor],
        step: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        ctx.save_for_backward(x)
        ctx.step = step
        return compute(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.step(x, relevance), None, None


class _Through(torch.autograd.Function):
    """Computes a merged BatchNorm's output; relevance passes to its input unchanged (the
    convolution before it redistributes it with the BatchNorm folded into its parameters)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        return compute(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        return relevance, None


class _Proportional(torch.autograd.Function):
    """A bias-free linear operation (a sum of two terms, a mean): each input receives relevance
    in proportion to its contribution, x * dz/dx * R / z."""

    @staticmethod
    def forward(
        ctx: Any, op: Callable[..., Tensor], epsilon: float, ledger: Ledger, *inputs: Tensor
    ) -> Tensor:
        ctx.op, ctx.epsilon, ctx.ledger = op, epsilon, ledger
        ctx.save_for_backward(*inputs)
        return op(*inputs)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Any, ...]:
        inputs = ctx.saved_tensors
        if ctx.op is torch.add:  # dz/dx = 1: no autograd needed
            signal = relevance / _stabilise(torch.add(*inputs), ctx.epsilon)
            shares = [t * signal for t in inputs]
        else:
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            with torch.enable_grad():
                z = ctx.op(*leaves)
                grads = torch.autograd.grad(z, leaves, relevance / _stabilise(z, ctx.epsilon))
            shares = [t.detach() * g for t, g in zip(leaves, grads, strict=True)]
        ctx.ledger.add(relevance, *shares)
        return (None, None, None, *shares)


class _Merge:
    """One convolution call's parameters and the eval-mode batch norm merged into it (its
    F.batch_norm call's arguments), folded once needed."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.bn: dict[str, Any] | None = None
        self.folded: tuple[Tensor, Tensor] | None = None


def _fold(merges: list[_Merge]) -> None:
    """Fold each batch norm into its convolution: w * s and b * s + beta - mean * s with
    s = gamma / sqrt(var + eps). The per-channel arithmetic of all of them runs at once, on
    their concatenated statistics (a few operations per backward pass, not a few per layer)."""
    bns: list[dict[str, Any]] = [m.bn for m in merges if m.bn is not None]
    sizes = [len(bn["running_var"]) for bn in bns]
    like = bns[0]["running_var"]

    def joined(values: list[Tensor | None], default: float) -> Tensor | None:
        if all(v is None for v in values):
            return None
        pairs = zip(values, sizes, strict=True)
        return torch.cat([like.new_full((n,), default) if v is None else v for v, n in pairs])

    repeats = torch.tensor(sizes, device=like.device)
    eps = like.new_tensor([bn["eps"] for bn in bns]).repeat_interleave(repeats)
    scale = joined([bn["running_var"] for bn in bns], 1.0).add_(eps).rsqrt_()  # type: ignore[union-attr]
    gamma, beta = joined([bn["weight"] for bn in bns], 1.0), joined([bn["bias"] for bn in bns], 0.0)
    if gamma is not None:
        scale = scale.mul_(gamma)
    shift = joined([bn["running_mean"] for bn in bns], 0.0).mul_(scale).neg_()  # type: ignore[union-attr]
    if beta is not None:
        shift = shift.add_(beta)
    bias = joined([m.bias for m in merges], 0.0)
    if bias is not None:
        shift = shift.addcmul_(bias, scale)
    for m, s, b in zip(merges, scale.split(sizes), shift.split(sizes), strict=True):
        m.folded = m.weight * s.view(-1, *([1] * (m.weight.dim() - 1))), b


_ADDS = {Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add}
_ADDS_IN_PLACE = {Tensor.__iadd__, Tensor.add_}  # ResNet's ``out += identity``
_MEANS = {Tensor.mean, torch.mean}
_CONV = "input weight bias stride padding dilation groups", (None, None, None, 1, 0, 1, 1)
_LINEAR = "input weight bias", (None, None, None)
_BATCH_NORM = (
    "input running_mean running_var weight bias training momentum eps",
    (None, None, None, None, None, False, 0.1, 1e-5),
)


class _LRPMode(TorchFunctionMode):
    """Replaces, while the forward runs, each operation by one whose backward propagates
    relevance: F.conv2d / F.linear with a layer's weight (its rule), F.batch_norm (merged into
    the convolution it follows, or epsilon), average pooling (epsilon), additions of two
    same-shape tensors and means (proportional). F.pad is recorded, so that a convolution
    knows the padding its layer applied."""

    def __init__(
        self,
        layers: dict[int, nn.Module],
        rules: Callable[[nn.Module, bool], Rule],
        ledger: Ledger,
        epsilon: float,
    ) -> None:
        super().__init__()
        self.layers, self.rules, self.ledger, self.epsilon = layers, rules, ledger, epsilon
        self.first: nn.Module | None = None
        self.handled: dict[nn.Module, int] = {}  # calls each layer made through its rule
        self.produced: dict[int, tuple[Tensor, _Merge]] = {}
        self.merges: list[_Merge] = []  # with a batch norm, not yet folded
        self.pads: dict[int, tuple[Tensor, torch.Size, Callable[[Tensor], Tensor]]] = {}
        self.non_negative: dict[int, Tensor] = {}  # rectifiers' outputs (and their paddings)
        self.handlers: dict[Any, Callable[..., Tensor | None]] = {
            F.conv2d: self._affine,
            F.linear: self._affine,
            F.batch_norm: self._batch_norm,
            F.avg_pool2d: self._pool,
            F.adaptive_avg_pool2d: self._pool,
            F.pad: self._pad,
            **dict.fromkeys(_ADDS | _ADDS_IN_PLACE, self._add),
            **dict.fromkeys(_MEANS, self._mean),
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None and not self.ledger.inside and torch.is_grad_enabled():
            result = handler(func, args, kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)

    def clear(self) -> None:
        self.produced.clear()
        self.merges.clear()
        self.pads.clear()
        self.non_negative.clear()

    def rectified(self, out: Tensor) -> None:
        """Note a rectifier's output: the layers that read it skip the sign test."""
        self.non_negative[id(out)] = out

    def _known_non_negative(self, x: Tensor) -> bool:
        known = self.non_negative.pop(id(x), None)
        return known is x

    def _layer(
        self,
        x: Tensor,
        compute: Callable[[Tensor], Tensor],
        rule: Rule,
        linear_map: LinearMap,
        effective: Callable[[], tuple[Tensor | None, Tensor | None]],
    ) -> Tensor:
        """The layer's output ``compute(x)`` as a _Layer whose backward applies ``rule`` through
        ``linear_map`` with the ``effective`` parameters (a BatchNorm folded in)."""
        ledger = self.ledger

        def step(x: Tensor, relevance: Tensor) -> Tensor:
            ledger.inside = True
            try:
                r = redistribute(linear_map, rule, x, relevance, *effective())
            finally:
                ledger.inside = False
            ledger.add(relevance, r)
            return r

        return _Layer.apply(x, compute, step)

    def _affine(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        call = _bind(*(_LINEAR if func is F.linear else _CONV), args, kwargs)
        layer = self.layers.get(id(call["weight"]))
        if layer is None:
            return None
        self.handled[layer] = self.handled.get(layer, 0) + 1
        is_input = self.first is None  # the model's first layer call (z^B, flat)
        self.first = self.first or layer
        linear_map = _affine_map(func, call)
        padded = self.pads.pop(id(call["input"]), None)
        if padded is not None and padded[0] is call["input"]:
            linear_map.inputs, linear_map.padding = padded[1], padded[2]
        linear_map.non_negative = self._known_non_negative(call["input"])
        merge = _Merge(call["weight"], call["bias"])

        def effective() -> tuple[Tensor | None, Tensor | None]:
            if merge.bn is None:
                return merge.weight, merge.bias
            if merge.folded is None:  # the first folded layer of the backward folds them all
                _fold(self.merges)
                self.merges.clear()
            return merge.folded  # type: ignore[return-value]

        rest = {k: v for k, v in call.items() if k != "input"}
        rule = self.rules(layer, is_input)
        out = self._layer(call["input"], lambda t: func(t, **rest), rule, linear_map, effective)
        if func is F.conv2d:
            self.produced[id(out)] = (out, merge)
        return out

    def _batch_norm(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        call = _bind(*_BATCH_NORM, args, kwargs)
        source = self.produced.pop(id(call["input"]), None)
        if (
            source is not None
            and source[0] is call["input"]
            and not call["training"]
            and call["running_var"] is not None
        ):
            source[1].bn = call
            self.merges.append(source[1])
            rest = {k: v for k, v in call.items() if k != "input"}
            return _Through.apply(call["input"], lambda x: func(x, **rest))
        return self._pool(func, args, kwargs)

    def _pool(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        """Epsilon on an operation without parameters of its own to fold or clamp."""
        x, *rest = args
        linear_map = LinearMap(lambda t, w, b: func(t, *rest, **kwargs))
        return self._layer(
            x,
            lambda t: func(t, *rest, **kwargs),
            Rule("epsilon", epsilon=self.epsilon),
            linear_map,
            lambda: (None, None),
        )

    def _pad(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, *rest = args
        out = func(*args, **kwargs)
        self.pads[id(out)] = (out, x.shape, lambda t: func(t, *rest, **kwargs))
        call = _bind("input pad mode value", (None, None, "constant", None), args, kwargs)
        if self._known_non_negative(x) and (
            call["mode"] != "constant" or (call["value"] or 0) >= 0
        ):
            self.rectified(out)  # zeros (or copies of its values) around a rectifier's output
        return out

    def _add(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        if len(args) != 2 or kwargs:
            return None
        a, b = args
        if not (
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dim() > 1
        ):
            return None
        if func in _ADDS_IN_PLACE:  # the sum is written into a; the split keeps a's old values
            return a.copy_(_Proportional.apply(torch.add, self.epsilon, self.ledger, a.clone(), b))
        return _Proportional.apply(torch.add, self.epsilon, self.ledger, a, b)

    def _mean(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        if not (isinstance(args[0], Tensor) and args[0].dim() > 1):
            return None
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = kwargs.get("keepdim", False)

        def mean(t: Tensor) -> Tensor:
            return t.mean(dim=dims, keepdim=keep) if dims is not None else t.mean()

        return _Proportional.apply(mean, self.epsilon, self.ledger, args[0])


def _pass_through(grad: Tensor, through: Callable[[Tensor], Tensor]) -> Tensor:
    return grad


COMPOSITES: dict[str, dict[str, Rule]] = {
    # (Montavon et al. 2019, section 10.3; the preset names of zennit)
    "epsilon_plus": {"input": Rule("zbox"), "conv": Rule("zplus"), "dense": Rule("epsilon")},
    "epsilon_plus_flat": {"input": Rule("flat"), "conv": Rule("zplus"), "dense": Rule("epsilon")},
    "epsilon_gamma_box": {"input": Rule("zbox"), "conv": Rule("gamma"), "dense": Rule("epsilon")},
    "epsilon_alpha2_beta1": {
        "input": Rule("alpha_beta"),
        "conv": Rule("alpha_beta"),
        "dense": Rule("epsilon"),
    },
    "epsilon": {"input": Rule("epsilon"), "conv": Rule("epsilon"), "dense": Rule("epsilon")},
}


@contextmanager
def lrp_context(
    module: nn.Module,
    x: Tensor,
    rules: Callable[[nn.Module, bool], Rule],
    ledger: Ledger,
    epsilon: float = 1e-6,
) -> Iterator[None]:
    """Within the block, the backward pass of ``module`` propagates relevance.

    ``rules(layer, is_input_layer)`` gives the rule of each convolution and linear layer;
    average pooling and a BatchNorm that does not follow a convolution use epsilon. A
    BatchNorm that reads a convolution's output directly is merged into that convolution's
    rule (its parameters are folded in for the backward pass; the module is not touched).
    A function mode sees the calls, recognising each layer by its weight tensor; a weight
    computed at each call (a parametrization such as weight_norm) is recognised by a forward
    pre-hook, with parametrizations cached for the block. No module is swapped and no hook is
    left behind.
    """
    names = {m: name for name, m in module.named_modules() if isinstance(m, LINEAR)}
    layers = {id(m.weight): m for m in names}
    mode = _LRPMode(layers, rules, ledger, epsilon)
    ran: dict[nn.Module, int] = {}

    def computed_weight(layer: nn.Module, args: Any) -> None:
        layers[id(layer.weight)] = layer

    def check(layer: nn.Module, args: Any, out: Any) -> None:
        """Each call of a layer must have gone through its rule: a layer whose forward does
        not call F.conv2d / F.linear with its weight would pass a plain gradient, silently."""
        if not torch.is_grad_enabled() or ledger.inside:
            return
        if layer in computed:
            layers.pop(id(layer.weight), None)
        ran[layer] = ran.get(layer, 0) + 1
        if mode.handled.get(layer, 0) < ran[layer]:
            raise RuntimeError(
                f"LRP cannot apply its rule to layer {names[layer]!r} "
                f"({type(layer).__name__}): its forward did not call F.conv2d / F.linear with "
                "the layer's weight"
            )

    computed = {
        m
        for m in names
        if parametrize.is_parametrized(m, "weight") or not isinstance(m.weight, nn.Parameter)
    }
    handles = [m.register_forward_pre_hook(computed_weight) for m in computed]
    handles += [m.register_forward_hook(check) for m in names]
    try:
        with parametrize.cached(), override_rectifiers(_pass_through, mode.rectified), mode:
            yield
    finally:
        for handle in handles:
            handle.remove()
        mode.clear()


def _warn_unless_conserved(logit: Tensor, inputs: Tensor, absorbed: Tensor) -> None:
    """Input relevance + absorbed = logit holds wherever every operation has a rule; where it
    fails by more than 1%, relevance went through an operation that has none (a gating
    multiplication, SiLU, ...) as a plain gradient: the map may be wrong, say so."""
    scale = torch.stack([logit.abs(), inputs.abs(), absorbed.abs()]).amax(0)
    off = (inputs + absorbed - logit).abs() > 0.01 * scale + 1e-6
    if bool(off.any()):
        worst = int(((inputs + absorbed - logit).abs() / scale.clamp(min=1e-12)).argmax())
        warnings.warn(
            f"LRP: relevance is not conserved (input {inputs[worst]:.4g} + absorbed "
            f"{absorbed[worst]:.4g} vs logit {logit[worst]:.4g} for input {worst}): the model "
            "has operations without an LRP rule (e.g. gating multiplications, SiLU), through "
            "which relevance passed as a plain gradient",
            RuntimeWarning,
            stacklevel=3,
        )


@register("lrp", "relevance")
class LRP(Method):
    """Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) with a
    composite of rules: z^B (or flat) at the input layer, z+ / gamma / alpha-beta in the
    convolutions, epsilon in the dense layers.

    ``extras``: ``absorbed`` (per input: relevance taken by biases and stabilisers),
    ``logit`` (the target's score) and ``input_relevance`` (the attribution's sum); input
    relevance + absorbed = logit. ``low``/``high`` bound the input for z^B (default: the
    model's pixel range, 0 and 1 normalised).
    """

    description = "layer-wise relevance propagation with rule composites (Bach et al. 2015)"
    reduction = "sum"
    defaults: ClassVar[dict[str, Any]] = {
        "composite": "epsilon_plus",
        "epsilon": 1e-6,
        "gamma": 0.25,
        "low": None,
        "high": None,
    }

    def explain(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        name = self.params["composite"]
        if name not in COMPOSITES:
            raise RequestError(f"unknown composite {name!r}; known: {', '.join(COMPOSITES)}")
        composite = COMPOSITES[name]
        low, high = self._bounds(x)
        epsilon, gamma = self.params["epsilon"], self.params["gamma"]

        def rules(layer: nn.Module, is_input: bool) -> Rule:
            base = composite[
                "input" if is_input else "conv" if isinstance(layer, nn.Conv2d) else "dense"
            ]
            return Rule(base.name, epsilon=epsilon, gamma=gamma, low=low, high=high)

        ledger = Ledger()
        inputs = model_layout(x.detach().clone()).requires_grad_(True)
        with lrp_context(self.model.module, x, rules, ledger, epsilon):
            output = self.model.module(inputs)
            targets = resolve_targets(targets, output)
            scores = score_rows(targets, output)
            (relevance,) = torch.autograd.grad(scores, inputs, scores.detach())
        self.engine.count(len(x))
        absorbed = ledger.absorbed
        if absorbed is None:
            absorbed = torch.zeros(len(x), dtype=torch.float64)
        logit = scores.detach().double().cpu()
        inputs_sum = _per_row(relevance.detach()).double().cpu()
        absorbed = absorbed.cpu()
        self.extras.update(
            absorbed=absorbed.tolist(),
            logit=logit.tolist(),
            input_relevance=inputs_sum.tolist(),
        )
        _warn_unless_conserved(logit, inputs_sum, absorbed)
        return relevance.detach(), targets

    def _bounds(self, x: Tensor) -> tuple[Any, Any]:
        low, high = self.params["low"], self.params["high"]
        mean, std = self.model.mean, self.model.std
        if low is None:
            low = [(0 - m) / s for m, s in zip(mean, std, strict=True)] if mean else float(x.min())
        if high is None:
            high = [(1 - m) / s for m, s in zip(mean, std, strict=True)] if mean else float(x.max())
        return low, high


# -- DeepLIFT and SHAP ---------------------------------------------------------------------------

DELTA_EPS = 1e-10  # |x - x0| below which a multiplier falls back to the derivative


class _Rescale(torch.autograd.Function):
    """A rectifier on a batch [inputs; references] whose backward uses DeepLIFT's rescale
    multiplier (f(x) - f(x0)) / (x - x0) for both halves (the derivative where x = x0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None) -> Tensor:
        out = torch.relu(x) if upper is None else torch.clamp(x, 0.0, upper)
        ctx.x, ctx.out, ctx.upper = x.detach().clone(), out.detach(), upper
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, out, upper = ctx.x, ctx.out, ctx.upper
        derivative = (x > 0) if upper is None else (x > 0) & (x < upper)
        xi, xr = x.chunk(2)
        yi, yr = out.chunk(2)
        dx, dy = xi - xr, yi - yr
        fallback = derivative.chunk(2)[0].to(grad.dtype)
        multiplier = torch.where(dx.abs() < DELTA_EPS, fallback, dy / torch.where(dx == 0, 1, dx))
        return grad * torch.cat([multiplier, multiplier]), None


class _MaxPoolDelta(torch.autograd.Function):
    """Max pooling on [inputs; references] whose backward satisfies summation-to-delta: in each
    window, the output change y - y0 goes to the inputs' maximum (its part above the
    reference's maximum, max(y, y0) - y0) and to the reference's maximum (the rest,
    y - max(y, y0)), then is divided by each position's x - x0 (the gradient where x = x0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, pool: nn.MaxPool2d) -> Tensor:
        ctx.save_for_backward(x)
        ctx.pool, ctx.out = pool, out.detach()
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        pool = ctx.pool
        args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        _, indices = F.max_pool2d(x, *args, return_indices=True)
        y, y0 = ctx.out.chunk(2)
        top = torch.max(y, y0)
        delta = torch.cat([top - y0, y - top])
        # the score reads the inputs' half only: its signal serves both argmax positions
        grad = torch.cat([grad.chunk(2)[0]] * 2)
        # scatter-add, not max_unpool: with overlapping windows one position can win several
        spread = torch.zeros_like(x).flatten(2)
        spread.scatter_add_(2, indices.flatten(2), (grad * delta).flatten(2))
        spread = spread.view_as(x)
        inputs_part, references_part = spread.chunk(2)
        share = inputs_part + references_part
        xi, xr = x.chunk(2)
        dx = xi - xr
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(F.max_pool2d(leaf, *args), leaf, grad)
        multiplier = torch.where(
            dx.abs() < DELTA_EPS, gradient.chunk(2)[0], share / torch.where(dx == 0, 1, dx)
        )
        return torch.cat([multiplier, multiplier]), None, None


@contextmanager
def deeplift_context(module: nn.Module) -> Iterator[None]:
    """Rescale multipliers on every rectifier and max pooling of ``module`` while the block
    runs it on a batch [inputs; references]."""

    def hook(pool: nn.Module, args: Any, out: Tensor) -> Tensor:
        return _MaxPoolDelta.apply(args[0], out, pool)

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.MaxPool2d)
    ]
    try:
        with replace_rectifiers(lambda x, upper: _Rescale.apply(x, upper)):
            yield
    finally:
        for handle in handles:
            handle.remove()


@register("deeplift", "relevance")
class DeepLift(Method):
    """DeepLIFT with the rescale rule (Shrikumar, Greenside & Kundaje 2017, "Learning
    Important Features Through Propagating Activation Differences", ICML).

    Attributions (x - x0) * m sum to f(x) - f(x0) ("summation-to-delta"). ``baseline``: zero,
    mean, blur, a number or a tensor. With ``shap=True``, ``baseline`` is a set of K references
    (K, C, H, W) and the attributions are averaged over them: DeepSHAP (Lundberg & Lee 2017,
    "A Unified Approach to Interpreting Model Predictions", NeurIPS, section 4.2).
    ``extras["delta"]``: per input, f(x) - f(x0) (averaged over the references).
    """

    description = "DeepLIFT rescale rule, or DeepSHAP over a baseline set (Shrikumar et al. 2017)"
    reduction = "sum"
    defaults: ClassVar[dict[str, Any]] = {"baseline": "zero", "shap": False}

    def explain(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        from convlens.baselines import make_baseline

        if self.params["shap"]:
            references = torch.as_tensor(self.params["baseline"]).to(x)
            if references.dim() != 4 or references.shape[1:] != x.shape[1:]:
                shape = ", ".join(map(str, x.shape[1:]))
                raise RequestError(
                    f"shap=True needs a baseline set of shape (K, {shape}), not "
                    f"{tuple(references.shape)}"
                )
            sets = [references[k : k + 1].expand_as(x) for k in range(len(references))]
        else:
            sets = [make_baseline(self.params["baseline"], x)]
        total, deltas = torch.zeros_like(x), torch.zeros(len(x), dtype=torch.float64)
        for reference in sets:
            both = torch.cat([x, reference]).detach().requires_grad_(True)
            with deeplift_context(self.model.module):
                output = self.model.module(both)
                targets = resolve_targets(targets, output[: len(x)])
                scores = score_rows(targets, output[: len(x)])
                reference_scores = score_rows(targets, output[len(x) :])
            (grad,) = torch.autograd.grad(scores.sum(), both)
            self.engine.count(2 * len(x))
            total += (x - reference) * grad[: len(x)]
            deltas += (scores - reference_scores).detach().double().cpu()
        self.extras["delta"] = (deltas / len(sets)).tolist()
        return total / len(sets), targets


def shap_draws(
    generator: torch.Generator,
    n: int,
    batch: int,
    references: int,
    shape: tuple[int, ...],
    stdev: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """GradientSHAP's random draws, for rows ordered input by input (n rows each): the reference
    index of each row, its point on the path (uniform in [0, 1]) and its input noise."""
    index = torch.randint(0, references, (batch * n,), generator=generator)
    alpha = torch.rand(batch * n, generator=generator, dtype=torch.float64)
    noise = torch.randn((batch * n, *shape), generator=generator) * stdev
    return index, alpha, noise


@register("gradient_shap", "relevance")
class GradientShap(Method):
    """GradientSHAP / expected gradients (Lundberg & Lee 2017; Erion et al. 2021, "Improving
    performance of deep learning models with axiomatic attribution priors and expected
    gradients", Nature Machine Intelligence).

    For each of ``n_samples`` rows per input: a reference drawn from ``baseline`` (a set
    (K, C, H, W): any 4-D tensor is taken as a set; or zero/mean/blur/a number, one reference
    per input), a point x0 + alpha (x' - x0) with alpha ~ U(0, 1) and
    x' = x plus Gaussian noise of std ``stdev``; the attribution is the mean of
    (x' - x0) * gradient at the point. Rows run through the engine in batches.
    """

    description = "expected gradients over a baseline distribution (Lundberg & Lee 2017)"
    reduction = "sum"
    random = True
    defaults: ClassVar[dict[str, Any]] = {"baseline": "zero", "n_samples": 20, "stdev": 0.0}

    def explain(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        from convlens.baselines import make_baseline
        from convlens.checks import positive_int

        n = positive_int("n_samples", self.params["n_samples"])
        baseline = self.params["baseline"]
        rows = torch.arange(len(x)).repeat_interleave(n)
        shared = isinstance(baseline, Tensor) and baseline.dim() == 4
        if shared:  # a distribution of references: each row draws one
            if baseline.shape[1:] != x.shape[1:]:
                raise RequestError(
                    f"baseline set of shape {tuple(baseline.shape)} does not match inputs "
                    f"{tuple(x.shape)}"
                )
            references = baseline.detach().to(x)
        else:  # one reference per input
            references = make_baseline(baseline, x)
        index, alpha, noise = shap_draws(
            self.generator(),
            n,
            len(x),
            len(references) if shared else 1,
            tuple(x.shape[1:]),
            float(self.params["stdev"]),
        )
        if not shared:
            index = rows
        total = torch.zeros_like(x)
        with self.engine.task(len(x) * n):
            _, targets = self._resolve(x, targets)
            for start, stop in self.engine.chunks(len(x) * n):
                inputs = x[rows[start:stop]] + noise[start:stop].to(x)
                reference = references[index[start:stop]]
                a = alpha[start:stop].to(x.dtype).view(-1, 1, 1, 1)
                point = model_layout(
                    (reference + a * (inputs - reference)).detach()
                ).requires_grad_(True)
                with self.capturing(targets) as unit:
                    output = self.model.module(point)
                    scores = score_rows([targets[int(r)] for r in rows[start:stop]], output, unit)
                (grad,) = torch.autograd.grad(scores.sum(), point)
                self.engine.count(stop - start)
                total.index_add_(0, rows[start:stop].to(x.device), (inputs - reference) * grad)
        return total / n, targets

    def _resolve(self, x: Tensor, targets: list[Target]) -> tuple[None, list[Target]]:
        if any(isinstance(t, Predicted) for t in targets):
            with torch.no_grad():
                targets = resolve_targets(targets, self.model.module(x))
            self.engine.count(len(x))
        return None, targets
