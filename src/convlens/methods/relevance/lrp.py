"""Layer-wise relevance propagation (LRP) with composites of rules.

Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
Relevance Propagation" (PLoS ONE); Montavon et al. 2017, "Explaining nonlinear classification
decisions with deep Taylor decomposition" (Pattern Recognition); Montavon et al. 2019,
"Layer-Wise Relevance Propagation: An Overview" (LNCS 11700), whose rules and composites these
are. The rules are in :mod:`.rules`, the composites in :mod:`.composites` and the backward pass
that applies them in :mod:`.propagation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from convlens.checks import RequestError, RequestTypeError, finite
from convlens.methods.base import Method, Result
from convlens.registry import register
from convlens.targets import Target

from .composites import DEFAULT_COMPOSITE, Composite, composite
from .maps import per_row
from .propagation import Ledger, lrp_context
from .rules import Settings, ZBox

__all__ = ["LRP"]


def _warn_unless_conserved(logit: Tensor, inputs: Tensor, absorbed: Tensor) -> None:
    """Input relevance + absorbed = logit holds wherever every operation has a rule; where it
    fails by more than 1% of the logit, relevance went through an operation that has none (a
    gating multiplication, SiLU, ...) as a plain gradient: the map may be wrong, say so. (Not
    1% of the largest term: relevance that explodes to 1e17 and cancels must be caught.)"""
    scale = logit.abs() + 1e-6 * (1 + logit.abs().max())
    miss = (inputs + absorbed - logit).abs()
    if bool((miss > 0.01 * scale).any()):
        worst = int((miss / scale).argmax())
        warnings.warn(
            f"LRP: relevance is not conserved (input {inputs[worst]:.4g} + absorbed "
            f"{absorbed[worst]:.4g} vs logit {logit[worst]:.4g} for input {worst}): the model "
            "has operations without an LRP rule (e.g. gating multiplications, SiLU), through "
            "which relevance passed as a plain gradient",
            RuntimeWarning,
            stacklevel=4,
        )


def _bound(name: str, value: Any) -> Any:
    """A z^B bound as given (None, a number, per-channel numbers or a tensor), checked."""
    if value is None:
        return None
    try:
        bound = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise RequestTypeError(
            f"{name} must be a number, one number per channel or a tensor, not {value!r}"
        ) from None
    if not bool(torch.isfinite(bound).all()):
        raise RequestError(f"{name} must be finite, not {value!r}")
    return value


@register("lrp", "relevance")
class LRP(Method):
    """Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) with a
    composite of rules, named as zennit's composites and meaning the same:

    * ``epsilon_plus_box`` (default): z^B in the first convolution, z+ in the others, epsilon
      in dense layers (zennit has no composite of this name: its ``EpsilonGammaBox`` with z+
      for gamma);
    * ``epsilon_plus`` = zennit ``EpsilonPlus``: z+ in every convolution, the first included,
      epsilon in dense layers;
    * ``epsilon_plus_flat`` = ``EpsilonPlusFlat``: flat in the first linear layer, then as
      ``epsilon_plus``;
    * ``epsilon_gamma_box`` = ``EpsilonGammaBox``: z^B in the first convolution, gamma in the
      others, epsilon in dense layers;
    * ``epsilon_alpha2_beta1`` = ``EpsilonAlpha2Beta1``: alpha2-beta1 in every convolution,
      epsilon in dense layers; ``epsilon_alpha2_beta1_flat`` = ``EpsilonAlpha2Beta1Flat``:
      the same with flat in the first linear layer;
    * ``epsilon``: epsilon everywhere.

    Parameters: ``epsilon`` (> 0) is the epsilon rule's, in dense layers (zennit's default
    1e-6); every other rule, pooling and sums are stabilised by a fixed 1e-6, as in zennit.
    ``gamma`` (>= 0; zennit's default 0.25). ``bias``: whether z+ and alpha-beta count biases.
    ``bias=False`` (default): z+ shares only the positive contributions w+ x (Montavon et al.
    2017's z+ rule), alpha-beta only the contributions; ``bias=True``: the positive part of the
    bias joins the positive denominator and the negative part the negative one, as zennit's
    rules do (their parameter modifiers clamp the bias with the weight), so that the
    composites equal zennit's. Epsilon and gamma always count the bias, z^B and flat never
    (as in zennit). ``low``/``high`` bound the input for z^B (default: the model's pixel
    range, 0 and 1 normalised; for a model without normalisation, the smallest and largest
    value of the whole batch).

    Each chunk of at most ``batch_size`` images is one forward and one backward pass; the
    bounds are computed once for the whole batch, so results do not depend on ``batch_size``.
    ``resolved["rules"]`` records the rule each layer got, ``resolved["bounds"]`` the z^B
    bounds used.
    """

    description = "layer-wise relevance propagation with rule composites (Bach et al. 2015)"
    reads_inside = True
    reduction = "sum"
    defaults: ClassVar[dict[str, Any]] = {
        "composite": DEFAULT_COMPOSITE,
        "epsilon": 1e-6,
        "gamma": 0.25,
        "bias": False,
        "low": None,
        "high": None,
    }
    extras: ClassVar[dict[str, str]] = {
        "absorbed": "per input: relevance taken by biases and stabilisers, layer by layer",
        "logit": "per input: the target's score (the logit of a class target), the relevance "
        "that starts the backward pass",
        "input_relevance": "per input: the sum of the attribution; input_relevance + absorbed "
        "= logit wherever every operation has a rule (LRP warns where it misses by over 1%)",
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        composite(params["composite"])
        if finite("epsilon", params["epsilon"]) <= 0:
            raise RequestError(
                f"epsilon must be positive (it stabilises every division), not "
                f"{params['epsilon']!r}"
            )
        if finite("gamma", params["gamma"]) < 0:
            raise RequestError(f"gamma must be non-negative, not {params['gamma']!r}")
        if not isinstance(params["bias"], bool):
            raise RequestTypeError(f"bias must be True or False, not {params['bias']!r}")
        _bound("low", params["low"])
        _bound("high", params["high"])

    def settings(self, x: Tensor) -> tuple[Composite, Settings]:
        """The composite and the rules' parameters (checked by :meth:`check`)."""
        params = self.params
        chosen = composite(params["composite"])
        low, high = params["low"], params["high"]
        if chosen.uses(ZBox):
            low, high = self._bounds(x, low, high)
        settings = Settings(
            epsilon=float(params["epsilon"]),
            gamma=float(params["gamma"]),
            bias=params["bias"],
            low=low,
            high=high,
        )
        return chosen, settings

    def _bounds(self, x: Tensor, low: Any, high: Any) -> tuple[Any, Any]:
        mean, std = self.model.mean, self.model.std
        if low is None:
            low = [(0 - m) / s for m, s in zip(mean, std, strict=True)] if mean else float(x.min())
        if high is None:
            high = [(1 - m) / s for m, s in zip(mean, std, strict=True)] if mean else float(x.max())
        return low, high

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        chosen, settings = self.settings(x)
        parts, resolved, logits, absorbed = [], [], [], []
        rules: dict[Any, list[str]] = {}
        with self.engine.task(len(x)):
            for start, stop in self.engine.chunks(len(x)):
                ledger, chooser = Ledger(), chosen.chooser(settings)
                with lrp_context(self.model.module, chooser, ledger, settings.stabilizer):
                    step = self.engine.evaluate(x[start:stop], targets[start:stop], grad=True)
                scores = step.scores  # the backward, after the block: without its modes' calls
                (relevance,) = torch.autograd.grad(scores, step.inputs, scores.detach())
                parts.append(relevance.detach())
                resolved += step.targets
                logits.append(scores.detach().double().cpu())
                taken = ledger.absorbed
                absorbed.append(
                    torch.zeros(stop - start, dtype=torch.float64) if taken is None else taken.cpu()
                )
                for layer, described in chooser.chosen.items():
                    rules[layer] = list(dict.fromkeys(rules.get(layer, []) + described))
        attribution = torch.cat(parts)
        logit = torch.cat(logits)
        inputs = per_row(attribution).double().cpu()
        taken = torch.cat(absorbed).double()
        _warn_unless_conserved(logit, inputs, taken)
        names = {m: name for name, m in self.model.module.named_modules()}
        decided: dict[str, Any] = {
            "composite": chosen.name,
            "rules": {
                names.get(layer) or type(layer).__name__: ", ".join(described)
                for layer, described in rules.items()
            },
        }
        if any(ZBox.name in described for described in rules.values()):
            decided["bounds"] = {"low": _data(settings.low), "high": _data(settings.high)}
        return Result(
            attribution,
            resolved,
            resolved=decided,
            extras={
                "absorbed": taken.tolist(),
                "logit": logit.tolist(),
                "input_relevance": inputs.tolist(),
            },
        )


def _data(value: Any) -> Any:
    """A bound as plain data (a tensor or an array becomes a nested list)."""
    return value.tolist() if hasattr(value, "tolist") else value
