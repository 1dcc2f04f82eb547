"""Meaningful perturbation: an optimised smooth mask that deletes (or preserves) the evidence.

Fong & Vedaldi 2017, "Interpretable Explanations of Black Boxes by Meaningful Perturbation",
arXiv:1704.03296, and as the ``area`` option the extremal perturbations of Fong, Patrick &
Vedaldi 2019, "Understanding Deep Networks via Extremal Perturbations and Smooth Masks",
arXiv:1910.08485.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from convlens.baselines import check_baseline, gaussian_blur, make_baseline
from convlens.checks import RequestError, finite, positive_int
from convlens.methods.base import Result
from convlens.methods.perturbation import PerturbationMethod
from convlens.registry import register
from convlens.targets import Target, probability_scores

__all__ = ["MeaningfulPerturbation", "total_variation"]


def total_variation(mask: Tensor, beta: float) -> Tensor:
    """Mean of |∇m|^beta over a (B, 1, h, w) mask, per image (B,)."""
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).abs().pow(beta).flatten(1).mean(1)
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return dy + dx


@register("meaningful_perturbation", "perturbation")
class MeaningfulPerturbation(PerturbationMethod):
    """The smallest smooth region whose perturbation destroys (or alone keeps) the score.

    A mask m in [0, 1] at ``mask_size`` x ``mask_size`` is upsampled to the input; the
    perturbed input is m x + (1 - m) p, with p the image blurred (sigma ``blur_sigma``), a
    constant baseline, or the image plus Gaussian noise (``perturbation``). Adam optimises,
    for the ``deletion`` game, l1 ||1 - m||_1 + tv TV_beta(m) + f(x_m), and for the
    ``preservation`` game, l1 ||m||_1 + tv TV_beta(m) - f(x_m), with f the class probability.
    With ``area`` (a fraction), the L1 term is replaced by the extremal-perturbation constraint
    ||sort(m) - r_area||² (Fong et al. 2019) and the game is preservation. The map is the
    evidence: 1 - m for deletion, m for preservation. Each step is one forward and backward.
    """

    description = "optimised deletion/preservation mask (Fong & Vedaldi 2017; extremal 2019)"
    passes: ClassVar[str] = "1 + steps forward and backward passes (301)"
    random = False  # only the noise perturbation draws (it then records its seed)
    batch_size = 8
    defaults: ClassVar[dict[str, Any]] = {
        "game": "deletion",
        "perturbation": "blur",
        "steps": 300,
        "lr": 0.1,
        "mask_size": 28,
        "l1": 0.05,
        "tv": 0.2,
        "tv_beta": 3.0,
        "blur_sigma": 10.0,
        "baseline": "zero",
        "area": None,
    }
    extras: ClassVar[dict[str, str]] = {
        "saturated": "per input: True where the map is uniform (all evidence or none): no mask "
        "moved the class probability, as for a prediction saturated at 0 or 1; the map is then "
        "no explanation",
    }

    def _reference(self, x: Tensor, generator: torch.Generator) -> Tensor:
        kind = self.params["perturbation"]
        if kind == "blur":
            return gaussian_blur(x, self.params["blur_sigma"])
        if kind == "constant":
            return make_baseline(self.params["baseline"], x)
        spread = x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return x + 0.2 * spread * noise

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        positive_int("steps", params["steps"])
        positive_int("mask_size", params["mask_size"])
        if params["game"] not in ("deletion", "preservation"):
            raise RequestError(f"game must be deletion or preservation, not {params['game']!r}")
        area = params["area"]
        if area is not None and not 0 < finite("area", area) < 1:
            raise RequestError(f"area must be a fraction in (0, 1), not {area}")
        if params["perturbation"] not in ("blur", "constant", "noise"):
            raise RequestError(
                f"perturbation must be blur, constant or noise, not {params['perturbation']!r}"
            )
        for name in ("lr", "tv_beta"):
            if finite(name, params[name]) <= 0:
                raise RequestError(f"{name} must be positive, not {params[name]!r}")
        for name in ("l1", "tv", "blur_sigma"):
            if finite(name, params[name]) < 0:
                raise RequestError(f"{name} must be non-negative, not {params[name]!r}")
        check_baseline(params["baseline"])

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        params = self.params
        steps, size, area = int(params["steps"]), int(params["mask_size"]), params["area"]
        game = "preservation" if area is not None else params["game"]
        generator = self.generator()
        maps = []
        with self.engine.task(len(x) * (1 + steps)):
            _, targets = self.engine.clean(x, targets)
            for start, stop in self.engine.chunks(len(x)):
                batch, chunk_targets = x[start:stop], targets[start:stop]
                reference = self._reference(batch, generator)
                start_value = 1.0 if game == "deletion" else 0.5  # deletion starts from the image
                mask = torch.full((len(batch), 1, size, size), start_value, device=x.device)
                mask.requires_grad_(True)
                optimizer = torch.optim.Adam([mask], lr=params["lr"])
                n_cells = size * size
                if area is not None:
                    ramp = torch.zeros(n_cells, device=x.device)
                    ramp[n_cells - round(area * n_cells) :] = 1
                for _ in range(steps):
                    upsampled = F.interpolate(
                        mask, size=x.shape[-2:], mode="bilinear", align_corners=False
                    )
                    perturbed = upsampled * batch + (1 - upsampled) * reference
                    score = self.engine.evaluate(
                        perturbed, chunk_targets, grad=True, score=probability_scores
                    ).scores
                    flat = mask.flatten(1)
                    smooth = params["tv"] * total_variation(mask, params["tv_beta"])
                    if area is not None:
                        sparsity = (flat.sort(dim=1).values - ramp).pow(2).mean(1)
                    elif game == "deletion":
                        sparsity = params["l1"] * (1 - flat).abs().mean(1)
                    else:
                        sparsity = params["l1"] * flat.abs().mean(1)
                    fit = score if game == "deletion" else -score
                    loss = (sparsity + smooth + fit).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        mask.clamp_(0, 1)
                evidence = mask.detach() if game == "preservation" else 1 - mask.detach()
                maps.append(
                    F.interpolate(evidence, size=x.shape[-2:], mode="bilinear", align_corners=False)
                )
        resolved: dict[str, Any] = {"game": game}
        if params["perturbation"] == "noise":
            resolved["seed"] = self.seed  # only the noise perturbation draws
        attribution = torch.cat(maps)
        # a uniform map is no explanation: the score did not move under any mask (a saturated
        # prediction), so say so instead of showing a blank map as the evidence
        span = attribution.amax(dim=(1, 2, 3)) - attribution.amin(dim=(1, 2, 3))
        extras = {"saturated": (span < 1e-3).tolist()}
        return Result(attribution, targets, resolved, extras)
