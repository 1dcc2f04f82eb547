"""Gradient methods: saliency, input x gradient, deconvnet, guided backprop, SmoothGrad, IG.

All share one routine, :meth:`GradientMethod.gradients`: a forward pass with the parameters
frozen, the target scores, and ``torch.autograd.grad`` with respect to the input only (the
user's ``.grad`` fields are never written). Deconvnet and guided backprop differ from saliency
only in the backward rule they install on every rectifier (:mod:`convlens.hooks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from convlens.baselines import check_baseline, make_baseline
from convlens.checks import RequestError, RequestTypeError, finite, positive_int
from convlens.hooks import BackwardRule, override_rectifiers, rules
from convlens.methods.base import Method, Result
from convlens.registry import get_method, register
from convlens.targets import Target

__all__ = [
    "Deconvnet",
    "GradientMethod",
    "GuidedBackprop",
    "InputXGradient",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "integration_points",
]


class GradientMethod(Method):
    """A method computed from gradients of the target score with respect to the input."""

    rule: ClassVar[BackwardRule | None] = None  # rectifier backward rule, None: true gradient

    def gradients(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        """d score_i / d x_i for every row ``i`` in one forward and backward pass.

        ``Predicted()`` targets are resolved from this very forward pass.
        """
        rule = type(self).rule
        with override_rectifiers(rule, refuse=self.name) if rule is not None else nullcontext():
            step = self.engine.evaluate(x, targets, grad=True)
        (grad,) = torch.autograd.grad(step.scores.sum(), step.inputs)
        return grad, step.targets

    def attribute(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        """Attributions for the rows of ``x`` (at most a batch; the gradient by default)."""
        return self.gradients(x, targets)

    def cost(self) -> int:
        """Images through the model per row of :meth:`attribute`."""
        return 1

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        parts, resolved = [], []
        with self.engine.task(len(x) * self.cost()):
            for start, stop in self.engine.chunks(len(x)):
                attribution, chunk_targets = self.attribute(x[start:stop], targets[start:stop])
                parts.append(attribution)
                resolved.extend(chunk_targets)
        return Result(torch.cat(parts), resolved)


@register("saliency", "gradient")
class Saliency(GradientMethod):
    """Vanilla gradient saliency: |d score / d x|.

    Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps", arXiv:1312.6034. The heat map is the maximum of
    the absolute gradient over colour channels, as in the paper.
    """

    description = "|gradient| of the class score (Simonyan et al. 2014)"
    defaults: ClassVar[dict[str, Any]] = {"absolute": True}

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        if not isinstance(params["absolute"], bool):
            raise RequestTypeError(f"absolute must be True or False, not {params['absolute']!r}")

    def attribute(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        grad, targets = self.gradients(x, targets)
        return (grad.abs() if self.params["absolute"] else grad), targets


@register("input_x_gradient", "gradient")
class InputXGradient(GradientMethod):
    """Input times gradient, x * d score / d x.

    Shrikumar, Greenside, Shcherbina & Kundaje 2016, "Not Just a Black Box: Learning Important
    Features Through Propagating Activation Differences", arXiv:1605.01713. The heat map sums
    the signed contributions over channels.
    """

    description = "input times gradient (Shrikumar et al. 2016)"
    reduction = "sum"

    def attribute(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        grad, targets = self.gradients(x, targets)
        return x * grad, targets


@register("deconvnet", "gradient")
class Deconvnet(GradientMethod):
    """Deconvnet: backpropagation that rectifies the signal at every ReLU / ReLU6.

    Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
    arXiv:1311.2901. Each rectifier passes max(0, signal) backwards whatever its forward input.
    """

    description = "deconvnet projection to pixels (Zeiler & Fergus 2014)"
    reads_inside = True
    rule = staticmethod(rules.deconvnet)


@register("guided_backprop", "gradient")
class GuidedBackprop(GradientMethod):
    """Guided backpropagation: positive gradients through active rectifiers only.

    Springenberg, Dosovitskiy, Brox & Riedmiller 2015, "Striving for Simplicity: The All
    Convolutional Net", arXiv:1412.6806. For ReLU6 a unit is active where 0 < x < 6.
    """

    description = "guided backpropagation (Springenberg et al. 2015)"
    reads_inside = True
    rule = staticmethod(rules.guided)


def integration_points(steps: int, integration: str) -> tuple[Tensor, Tensor]:
    """Points ``alpha`` in [0, 1] and weights of a quadrature rule for the IG path integral.

    ``riemann_left``/``right``/``middle``/``trapezoid``, or ``gausslegendre`` (Gauss-Legendre
    nodes on [0, 1]), the same rules and definitions as captum's ``IntegratedGradients``.
    """
    positive_int("steps", steps)
    if integration == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = 0.5 * (nodes + 1), 0.5 * weights
    elif integration == "riemann_trapezoid":
        if steps < 2:
            raise RequestError("the trapezoid rule needs at least 2 steps")
        alphas = np.linspace(0, 1, steps)
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
    elif integration in ("riemann_left", "riemann_right", "riemann_middle"):
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[integration]
        alphas = (np.arange(steps) + offset) / steps
        weights = np.full(steps, 1 / steps)
    else:
        raise RequestError(
            f"unknown integration rule {integration!r}; expected gausslegendre, riemann_left, "
            "riemann_right, riemann_middle or riemann_trapezoid"
        )
    return torch.tensor(alphas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float32)


@register("integrated_gradients", "gradient")
class IntegratedGradients(GradientMethod):
    """Integrated gradients: (x - x') * integral of grad F(x' + a (x - x')) da over [0, 1].

    Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks", arXiv:1703.01365.
    Completeness says the attributions sum to F(x) - F(x'); the remaining gap of the quadrature
    is reported in ``extras["completeness_gap"]`` (per input).
    """

    description = "integrated gradients along a path from a baseline (Sundararajan et al. 2017)"
    passes: ClassVar[str] = "steps + 2 forward and backward passes (52)"
    reduction = "sum"
    defaults: ClassVar[dict[str, Any]] = {
        "baseline": "zero",
        "steps": 50,
        "integration": "gausslegendre",
    }
    extras: ClassVar[dict[str, str]] = {
        "completeness_gap": "per input: sum of the attribution - (F(x) - F(baseline))",
        "score_difference": "per input: F(x) - F(baseline), the target's score difference",
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        integration_points(params["steps"], params["integration"])
        check_baseline(params["baseline"])

    def cost(self) -> int:
        return int(self.params["steps"])

    def attribute(
        self, x: Tensor, targets: list[Target], baseline: Tensor | None = None
    ) -> tuple[Tensor, list[Target]]:
        if baseline is None:
            baseline = make_baseline(self.params["baseline"], x)
        alphas, weights = integration_points(self.params["steps"], self.params["integration"])
        alphas, weights = alphas.to(x.device), weights.to(x.device)
        attributions = torch.empty_like(x)
        for i in range(len(x)):
            difference = x[i] - baseline[i]
            total = torch.zeros_like(x[i])
            for start, stop in self.engine.chunks(len(alphas)):
                a = alphas[start:stop].view(-1, 1, 1, 1)
                grad, _ = self.gradients(baseline[i] + a * difference, [targets[i]] * len(a))
                total += (weights[start:stop].view(-1, 1, 1, 1) * grad).sum(dim=0)
            attributions[i] = total * difference
        return attributions, targets

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        baseline = make_baseline(self.params["baseline"], x)
        with self.engine.task(len(x) * (2 + self.cost())):
            end, targets = self.engine.clean(x, targets)
            start, _ = self.engine.clean(baseline, targets)
            attributions, _ = self.attribute(x, targets, baseline)
        difference = end - start
        gap = attributions.sum(dim=(1, 2, 3)) - difference
        extras = {"completeness_gap": gap.tolist(), "score_difference": difference.tolist()}
        return Result(attributions, targets, extras=extras)


@register("smoothgrad", "gradient")
class SmoothGrad(GradientMethod):
    """SmoothGrad: the average of a gradient method over noisy copies of the input.

    Smilkov, Thorat, Kim, Viegas & Wattenberg 2017, "SmoothGrad: removing noise by adding
    noise", arXiv:1706.03825. Noise has standard deviation ``noise * (max(x) - min(x))`` per
    image. For reproducibility the noise is drawn from ``torch.Generator().manual_seed(seed)``
    as ``torch.randn(C, H, W)`` once per sample, input by input, sample by sample.
    """

    description = "SmoothGrad: average of a gradient method over noisy inputs (Smilkov 2017)"
    passes: ClassVar[str] = "1 + n_samples forward and backward passes (51), with the base method"
    random = True
    defaults: ClassVar[dict[str, Any]] = {
        "base": "saliency",
        "n_samples": 50,
        "noise": 0.15,
        "base_params": None,
    }

    @staticmethod
    def base_method(params: Mapping[str, Any]) -> tuple[type[GradientMethod], dict[str, Any]]:
        """The wrapped gradient method's class and its parameters (checked)."""
        base_cls = get_method(params["base"])
        if not issubclass(base_cls, GradientMethod) or issubclass(base_cls, SmoothGrad):
            raise RequestError(
                f"smoothgrad wraps a gradient method (saliency, input_x_gradient, deconvnet, "
                f"guided_backprop, integrated_gradients), not {params['base']!r}"
            )
        base_params = params["base_params"] or {}
        if not isinstance(base_params, Mapping):
            raise RequestTypeError(f"base_params must be a dict, not {base_params!r}")
        resolved = base_cls.resolve_params(dict(base_params))
        base_cls.check(resolved)
        return base_cls, resolved

    @classmethod
    def needs_python(cls, params: Mapping[str, Any]) -> bool:
        base_cls, base_params = cls.base_method(params)
        return base_cls.needs_python(base_params)

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        cls.base_method(params)
        positive_int("n_samples", params["n_samples"])
        if finite("noise", params["noise"]) < 0:
            raise RequestError(f"noise must be non-negative, not {params['noise']}")

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        base_cls, base_params = self.base_method(self.params)
        base = base_cls(self.engine, base_params, self.seed)
        n_samples, noise = int(self.params["n_samples"]), float(self.params["noise"])
        generator = self.generator()
        attributions = torch.empty_like(x)
        with self.engine.task(len(x) * (1 + n_samples * base.cost())):
            _, targets = self.engine.clean(x, targets)
            for i in range(len(x)):
                sigma = noise * (x[i].max() - x[i].min())
                total = torch.zeros_like(x[i])
                for start, stop in self.engine.chunks(n_samples):
                    draws = [
                        torch.randn(x.shape[1:], generator=generator) for _ in range(start, stop)
                    ]
                    noisy = x[i] + sigma * torch.stack(draws).to(x.device)
                    attribution, _ = base.attribute(noisy, [targets[i]] * (stop - start))
                    total += attribution.sum(dim=0)
                attributions[i] = total / n_samples
        resolved = {"base_params": dict(base.params)}
        return Result(attributions, targets, resolved=resolved, reduction=base.reduction)
