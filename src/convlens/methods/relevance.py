"""Relevance propagation: layer-wise relevance propagation (LRP).

Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
Relevance Propagation" (PLoS ONE); Montavon et al. 2017, "Explaining nonlinear classification
decisions with deep Taylor decomposition" (Pattern Recognition); Montavon et al. 2019,
"Layer-Wise Relevance Propagation: An Overview" (LNCS 11700), whose rules and composites these
are.

The relevance of the target logit flows back layer by layer. Each convolution, linear layer and
average pooling redistributes it to its inputs by its rule, R_i = x_i sum_j w'_ij R_j / z'_j,
computed with autograd on the layer's own forward (so padding, strides, groups and depthwise
convolutions come for free). Rectifiers pass relevance through unchanged, max pooling routes it
to the winner, and residual additions written as ``a + b`` inside ``forward`` split it in
proportion to the two terms (a TorchFunctionMode sees them; so do ``mean`` reductions).
A BatchNorm that follows a convolution is folded into that convolution's parameters for its
rule (the modules themselves are never changed). What biases and stabilisers absorb is
counted, so that input relevance + absorbed = the target logit.

Everything is hooks and a function mode inside a context manager; nothing is swapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

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
POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _stabilise(z: Tensor, epsilon: float) -> Tensor:
    """z + epsilon * sign(z), with sign(0) = 1: never divides by zero."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


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
    """Relevance absorbed (per input) by biases and stabilisers, and a re-entrance flag."""

    def __init__(self) -> None:
        self.absorbed: Tensor | None = None
        self.inside = False

    def add(self, before: Tensor, after: Tensor) -> None:
        lost = (before.flatten(1).sum(1) - after.flatten(1).sum(1)).detach().double()
        self.absorbed = lost if self.absorbed is None else self.absorbed + lost


def _affine(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own forward with the given parameters (bias None: none). Through the layer's
    forward, padding modes, strides, groups and static padding (EfficientNet) are its own."""
    return functional_call(module, {"weight": weight, "bias": bias}, (x,))


def _non_negative(x: Tensor) -> bool:
    return bool(x.amin() >= 0)


def redistribute(
    module: nn.Module,
    rule: Rule,
    x: Tensor,
    relevance: Tensor,
    ledger: Ledger,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Input relevance of one layer: ``relevance`` (at its output) redistributed by ``rule``.

    ``weight`` and ``bias`` are the layer's effective parameters (its own, or with a following
    BatchNorm merged in); None for average pooling and unmerged BatchNorm, which run as they
    are under the epsilon rule.
    """

    def leaf(t: Tensor) -> Tensor:
        return t.detach().requires_grad_(True)

    def share(z: Tensor, leaves: list[Tensor], signal: Tensor) -> Tensor:
        grads = torch.autograd.grad(z, leaves, signal)
        total = leaves[0].detach() * grads[0]
        for t, g in zip(leaves[1:], grads[1:], strict=True):
            total = total.addcmul_(t.detach(), g)
        return total

    ledger.inside = True
    try:
        with torch.enable_grad():
            if weight is None or rule.name == "epsilon":
                xs = leaf(x)
                z = module(xs) if weight is None else _affine(module, xs, weight, bias)
                return share(z, [xs], relevance / _stabilise(z, rule.epsilon))
            if rule.name == "gamma":
                return _gamma(module, rule, x, relevance, leaf, weight, bias)
            positive, negative = weight.clamp(min=0), weight.clamp(max=0)
            if rule.name in ("zplus", "alpha_beta"):
                # contributions x w of one sign: w+ on positive inputs with w- on negative ones
                # (positive), w- on positive inputs with w+ on negative ones (negative); inputs
                # that are all non-negative (after a rectifier) need only the first term. Both
                # sums have one sign, so the stabiliser is a plain +-epsilon.
                parts = (
                    [leaf(x)] if _non_negative(x) else [leaf(x.clamp(min=0)), leaf(x.clamp(max=0))]
                )

                def one_sign(first: Tensor, second: Tensor) -> Tensor:
                    z = _affine(module, parts[0], first, None)
                    return z + _affine(module, parts[1], second, None) if len(parts) > 1 else z

                z = one_sign(positive, negative)
                r = share(z, parts, relevance / (z + rule.epsilon))
                if rule.name == "zplus":
                    return r
                z = one_sign(negative, positive)
                return rule.alpha * r - rule.beta * share(z, parts, relevance / (z - rule.epsilon))
            if rule.name == "zbox":
                xs, low, high = leaf(x), leaf(_bound(rule.low, x)), leaf(_bound(rule.high, x))
                z = (
                    _affine(module, xs, weight, None)
                    - _affine(module, low, positive, None)
                    - _affine(module, high, negative, None)
                )
                return share(z, [xs, low, high], relevance / _stabilise(z, rule.epsilon))
            if rule.name == "flat":
                ones = leaf(torch.ones_like(x))
                z = _affine(module, ones, torch.ones_like(weight), None)
                (c,) = torch.autograd.grad(z, ones, relevance / _stabilise(z, rule.epsilon))
                return c
            raise ValueError(f"unknown LRP rule {rule.name!r}")
    finally:
        ledger.inside = False


def _gamma(
    module: nn.Module,
    rule: Rule,
    x: Tensor,
    relevance: Tensor,
    leaf: Callable,
    weight: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """LRP-gamma, sign-aware: a unit with z >= 0 favours positive contributions (w + gamma w+
    on positive inputs, w + gamma w- on negative ones, b + gamma b+), a unit with z < 0 the
    negative ones (mirrored). Then |z'| >= |z|: the rule never divides by a vanishing z', also
    in networks whose activations take both signs (EfficientNet's linear bottlenecks)."""
    g = rule.gamma
    positive, negative = weight.clamp(min=0), weight.clamp(max=0)
    with torch.no_grad():
        upward = _affine(module, x, weight, bias) >= 0
    xp, xn = leaf(x.clamp(min=0)), leaf(x.clamp(max=0))
    total = [torch.zeros_like(x), torch.zeros_like(x)]
    for mask, favoured, other, b in (
        (upward, positive, negative, None if bias is None else bias + g * bias.clamp(min=0)),
        (~upward, negative, positive, None if bias is None else bias + g * bias.clamp(max=0)),
    ):
        z = _affine(module, xp, weight + g * favoured, b) + _affine(
            module, xn, weight + g * other, None
        )
        signal = torch.where(mask, relevance / _stabilise(z, rule.epsilon), 0.0)
        cp, cn = torch.autograd.grad(z, (xp, xn), signal)
        total[0] += cp
        total[1] += cn
    return xp.detach() * total[0] + xn.detach() * total[1]


def _bound(value: Any, x: Tensor) -> Tensor:
    if value is None:
        raise ValueError("the zbox rule needs low and high bounds")
    bound = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if bound.dim() == 1 and x.dim() == 4:
        bound = bound.view(1, -1, 1, 1)
    return bound.expand_as(x)


class _Layer(torch.autograd.Function):
    """Identity on the layer's output; its backward redistributes relevance to the input."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, out: Tensor, step: Callable[[Tensor, Tensor], Tensor]
    ) -> Tensor:
        ctx.save_for_backward(x)
        ctx.step = step
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.step(x, relevance), None, None


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
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            z = ctx.op(*leaves)
            grads = torch.autograd.grad(z, leaves, relevance / _stabilise(z, ctx.epsilon))
        shares = [t.detach() * g for t, g in zip(leaves, grads, strict=True)]
        ctx.ledger.add(relevance, sum(s.flatten(1).sum(1, keepdim=True) for s in shares))
        return (None, None, None, *shares)


_ADDS = {Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add}
_MEANS = {Tensor.mean, torch.mean}


class _ResidualMode(TorchFunctionMode):
    """Additions of two same-shape tensors and spatial means, as proportional operations."""

    def __init__(self, ledger: Ledger, epsilon: float) -> None:
        super().__init__()
        self.ledger, self.epsilon = ledger, epsilon

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if not self.ledger.inside:
            if func in _ADDS and len(args) == 2 and not kwargs:
                a, b = args
                if (
                    isinstance(a, Tensor)
                    and isinstance(b, Tensor)
                    and a.shape == b.shape
                    and a.dim() > 1
                ):
                    return _Proportional.apply(torch.add, self.epsilon, self.ledger, a, b)
            if func in _MEANS and isinstance(args[0], Tensor) and args[0].dim() > 1:
                dims = args[1] if len(args) > 1 else kwargs.get("dim")
                keep = kwargs.get("keepdim", False)

                def mean(t: Tensor, dims: Any = dims, keep: bool = keep) -> Tensor:
                    return t.mean(dim=dims, keepdim=keep) if dims is not None else t.mean()

                return _Proportional.apply(mean, self.epsilon, self.ledger, args[0])
        return func(*args, **kwargs)


def _pass_through(grad: Tensor, through: Callable[[Tensor], Tensor]) -> Tensor:
    return grad


class _Through(torch.autograd.Function):
    """Identity on a merged BatchNorm's output: relevance passes to its input unchanged (the
    convolution before it redistributes it with the BatchNorm folded into its parameters)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        return relevance, None


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The convolution's weight and bias with the BatchNorm (eval mode) folded in."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias


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
    """
    produced: dict[int, tuple[Tensor, nn.Module]] = {}
    merged: dict[nn.Module, nn.Module] = {}
    first: list[nn.Module] = []

    def layer_hook(layer: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if ledger.inside or not torch.is_grad_enabled():
            return None
        if not first and isinstance(layer, LINEAR):
            first.append(layer)
        if isinstance(layer, LINEAR):
            rule = rules(layer, first[0] is layer)
        else:
            rule = Rule("epsilon", epsilon=epsilon)

        def step(inputs: Tensor, relevance: Tensor) -> Tensor:
            weight = bias = None
            if isinstance(layer, LINEAR):
                weight, bias = layer.weight, layer.bias
                if layer in merged:
                    weight, bias = _folded(layer, merged[layer])
            r = redistribute(layer, rule, inputs, relevance, ledger, weight, bias)
            ledger.add(relevance, r)
            return r

        result = _Layer.apply(args[0], out, step)
        if isinstance(layer, nn.Conv2d):
            produced[id(result)] = (result, layer)
        return result

    def batchnorm_hook(bn: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if ledger.inside or not torch.is_grad_enabled():
            return None
        source = produced.get(id(args[0]))
        if source is not None and source[0] is args[0] and bn.running_var is not None:
            merged[source[1]] = bn
            return _Through.apply(args[0], out)
        return layer_hook(bn, args, out)

    handles = []
    for m in module.modules():
        if isinstance(m, (*LINEAR, *POOLS)):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(batchnorm_hook))
    try:
        with override_rectifiers(_pass_through), _ResidualMode(ledger, epsilon):
            yield
    finally:
        for handle in handles:
            handle.remove()
        produced.clear()


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
            raise ValueError(f"unknown composite {name!r}; known: {', '.join(COMPOSITES)}")
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
        absorbed = ledger.absorbed if ledger.absorbed is not None else torch.zeros(len(x))
        self.extras.update(
            absorbed=absorbed.tolist(),
            logit=scores.detach().double().tolist(),
            input_relevance=relevance.detach().flatten(1).sum(1).double().tolist(),
        )
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
                raise ValueError(
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
        from convlens.methods.base import positive_int

        n = positive_int("n_samples", self.params["n_samples"])
        baseline = self.params["baseline"]
        rows = torch.arange(len(x)).repeat_interleave(n)
        shared = isinstance(baseline, Tensor) and baseline.dim() == 4
        if shared:  # a distribution of references: each row draws one
            if baseline.shape[1:] != x.shape[1:]:
                raise ValueError(
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
