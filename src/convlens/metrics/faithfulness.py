"""Faithfulness: does removing what the map points at change the prediction?

- :func:`deletion` and :func:`insertion`: Petsiuk, Das & Saenko 2018, "RISE: Randomized Input
  Sampling for Explanation of Black-box Models" (BMVC), section 4.1. Pixels are removed from the
  image (or added to a blurred canvas) in order of attribution; the area under the curve of the
  class probability is low for a good map under deletion and high under insertion.
- :func:`region_perturbation`: Samek et al. 2017, "Evaluating the visualization of what a deep
  neural network has learned" (IEEE TNNLS). Patches are replaced by noise, most relevant first
  (MoRF) or least relevant first (LeRF); AOPC and the area between the two curves.

Every perturbed image goes through the engine in batches of ``batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from convlens import viz
from convlens.baselines import make_baseline
from convlens.checks import RequestError, positive_int
from convlens.engine import Scored, session
from convlens.explanation import Explanation
from convlens.metrics.common import heatmaps
from convlens.model import Model, as_model
from convlens.targets import (
    Predicted,
    Target,
    TargetSpec,
    check_target_spec,
    scorer,
)

__all__ = ["Curve", "RegionPerturbation", "deletion", "insertion", "region_perturbation"]


@dataclass(frozen=True)
class Curve:
    """Scores of the target as the input is perturbed step by step.

    Attributes:
        name: ``"deletion"``, ``"insertion"``, ``"morf"`` or ``"lerf"``.
        fractions: (K,) share of pixels (or patches) perturbed at each step, 0 to 1.
        scores: (B, K) the target's score at each step.
        auc: (B,) area under the curve (trapezoid rule over ``fractions``).
        targets: the class of each input the scores are of.
        forwards: images passed through the model.
    """

    name: str
    fractions: Tensor
    scores: Tensor
    auc: Tensor
    targets: list[Any]
    forwards: int

    def plot(self, i: int | None = None) -> Image.Image:
        """The curves (all inputs, or input ``i``) as a picture."""
        rows = range(len(self.scores)) if i is None else [i]
        series = {f"input {r} (AUC {self.auc[r]:.3f})": self.scores[r] for r in rows}
        return viz.curve_plot(self.fractions, series, "fraction perturbed", "score", self.name)

    def _repr_png_(self) -> bytes:
        """Jupyter: :meth:`plot` of all inputs as PNG."""
        return viz.png_bytes(self.plot())

    def _repr_html_(self) -> str:
        """Jupyter: :meth:`plot`, with each input's class and AUC as the caption."""
        aucs = ", ".join(
            f"input {i} (class {t}): {float(a):.3f}"
            for i, (t, a) in enumerate(zip(self.targets, self.auc, strict=False))
        )
        return viz.html_figure([self.plot()], f"{self.name} AUC, {aucs}")


@dataclass(frozen=True)
class RegionPerturbation:
    """MoRF and LeRF curves (Samek et al. 2017) and their summaries, each (B,).

    ``aopc_morf`` = mean over steps k = 0..L of f(x) - f(x_k), most relevant patches first
    (higher is better); ``aopc_lerf`` the same, least relevant first (lower is better);
    ``abpc`` = mean of LeRF minus MoRF scores, the area between the curves (higher is better).
    """

    morf: Curve
    lerf: Curve
    aopc_morf: Tensor
    aopc_lerf: Tensor
    abpc: Tensor
    patch: int

    def plot(self, i: int = 0) -> Image.Image:
        series = {"MoRF": self.morf.scores[i], "LeRF": self.lerf.scores[i]}
        title = f"region perturbation, ABPC {self.abpc[i]:.3f}"
        return viz.curve_plot(self.morf.fractions, series, "fraction of patches", "score", title)

    def _repr_png_(self) -> bytes:
        """Jupyter: :meth:`plot` of the first input as PNG."""
        return viz.png_bytes(self.plot())


def _prepare(
    model: Model | nn.Module, x: Any, attribution: Explanation | Tensor, target: TargetSpec
) -> tuple[Model, Tensor, Tensor, list[Target]]:
    wrapped = as_model(model)
    inputs = wrapped.inputs(x)
    heat = heatmaps(attribution)
    if heat.shape[0] != len(inputs) or heat.shape[-2:] != inputs.shape[-2:]:
        raise RequestError(
            f"maps of shape {tuple(heat.shape)} do not match inputs of shape {tuple(inputs.shape)}"
        )
    explained = isinstance(attribution, Explanation) and all(
        isinstance(t, int) for t in attribution.targets
    )
    if target is None and explained:
        target = list(attribution.targets)  # the classes the maps explain
    return wrapped, inputs, heat, check_target_spec(target, len(inputs), wrapped.labels)


def _curves(
    model: Model,
    inputs: Tensor,
    targets: list[Target],
    ranks: Tensor,
    counts: Tensor,
    source: Tensor,
    destination: Tensor,
    score: str,
    batch_size: int | None,
    progress: bool | None,
    name: str,
) -> tuple[Tensor, list[Target], int]:
    """Scores (B, K): at step k, pixels of rank < ``counts[k]`` show ``destination``, the rest
    ``source``. Ranks (B, H, W) order the pixels; all images are built chunk by chunk."""
    score_of = scorer(score)
    with session(model, inputs, batch_size, 16, progress, name) as engine:
        k = len(counts)
        predicted = any(isinstance(t, Predicted) for t in targets)
        with engine.task(len(inputs) * (k + int(predicted))):
            if predicted:
                _, targets = engine.clean(inputs, targets, score_of)
            steps = engine.perturb(
                targets, lambda i, _: _Steps(ranks[i], counts, source[i], destination[i]), score_of
            )
    return torch.stack([s.scores for s in steps]).float().cpu(), targets, engine.forwards


class _Steps(Scored):
    """One input's curve: at step k the pixels ranked below ``counts[k]`` show ``destination``,
    the others ``source``."""

    def __init__(self, ranks: Tensor, counts: Tensor, source: Tensor, destination: Tensor):
        self.ranks, self.counts, self.source, self.destination = ranks, counts, source, destination
        self.n = len(counts)

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        shown = self.ranks[None] < self.counts[start:stop, None, None]
        return torch.where(shown[:, None], self.destination, self.source), None


def _pixel_ranks(heat: Tensor) -> Tensor:
    """Rank of each pixel, 0 for the largest value (ties in raster order)."""
    flat = heat.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return ranks.view_as(heat)


def _pixel_curve(
    name: str,
    model: Model | nn.Module,
    x: Any,
    attribution: Explanation | Tensor,
    target: TargetSpec,
    steps: int,
    baseline: Any,
    score: str,
    batch_size: int | None,
    progress: bool | None,
) -> Curve:
    wrapped, inputs, heat, targets = _prepare(model, x, attribution, target)
    pixels = heat.shape[-1] * heat.shape[-2]
    positive_int("steps", steps)
    if steps > pixels:
        raise RequestError(f"steps ({steps}) cannot exceed the number of pixels ({pixels})")
    counts = (torch.arange(steps + 1) * pixels + steps // 2) // steps
    base = make_baseline(baseline, inputs)
    ranks = _pixel_ranks(heat).to(inputs.device)
    source, destination = (inputs, base) if name == "deletion" else (base, inputs)
    scores, targets, forwards = _curves(
        wrapped, inputs, targets, ranks, counts.to(inputs.device), source, destination,
        score, batch_size, progress, name,
    )  # fmt: skip
    fractions = counts.double() / pixels
    auc = torch.trapezoid(scores.double(), fractions, dim=-1)
    return Curve(name, fractions, scores, auc, [t.describe() for t in targets], forwards)


def deletion(
    model: Model | nn.Module,
    x: Any,
    attribution: Explanation | Tensor,
    target: TargetSpec = None,
    steps: int = 100,
    baseline: Any = "zero",
    score: str = "probability",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Curve:
    """Deletion curve (Petsiuk et al. 2018): the target's probability as the most attributed
    pixels are replaced by ``baseline``, in ``steps`` equal steps from none to all.

    Lower AUC is better. ``target`` defaults to the classes the explanation explains, else the
    prediction. Step k replaces the round(k * HW / steps) highest-ranked pixels (all channels).
    """
    return _pixel_curve(
        "deletion", model, x, attribution, target, steps, baseline, score, batch_size, progress
    )


def insertion(
    model: Model | nn.Module,
    x: Any,
    attribution: Explanation | Tensor,
    target: TargetSpec = None,
    steps: int = 100,
    baseline: Any = "blur",
    score: str = "probability",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Curve:
    """Insertion curve (Petsiuk et al. 2018): starting from ``baseline`` (a blurred copy, as in
    the paper), the most attributed pixels of the image are put back first. Higher AUC is
    better."""
    return _pixel_curve(
        "insertion", model, x, attribution, target, steps, baseline, score, batch_size, progress
    )


def region_perturbation(
    model: Model | nn.Module,
    x: Any,
    attribution: Explanation | Tensor,
    target: TargetSpec = None,
    patch: int = 9,
    steps: int | None = None,
    baseline: Any = "uniform",
    score: str = "probability",
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> RegionPerturbation:
    """Region perturbation (Samek et al. 2017) over non-overlapping ``patch`` x ``patch``
    regions ranked by their summed attribution.

    Step k replaces the first k regions (MoRF: most relevant first; LeRF: least relevant first)
    by ``baseline``: ``"uniform"`` noise over the input's value range (as in the paper, drawn
    once per input from ``seed``, the same for both orders), or any baseline of
    ``make_baseline``. ``steps`` defaults to min(100, number of regions), the paper's L = 100.
    """
    wrapped, inputs, heat, targets = _prepare(model, x, attribution, target)
    positive_int("patch", patch)
    height, width = heat.shape[-2:]
    across = -(-width // patch)
    rows = torch.arange(height)[:, None] // patch
    cols = torch.arange(width)[None, :] // patch
    region = (rows * across + cols).flatten()  # (HW,) region of each pixel
    n_regions = int(region.max()) + 1
    steps = min(100, n_regions) if steps is None else positive_int("steps", steps)
    if steps > n_regions:
        raise RequestError(f"steps ({steps}) cannot exceed the number of regions ({n_regions})")
    relevance = torch.zeros(len(heat), n_regions, dtype=torch.float64)
    relevance.index_add_(1, region, heat.flatten(1).double())
    if isinstance(baseline, str) and baseline == "uniform":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(inputs.shape, generator=generator, dtype=inputs.dtype)
        low = inputs.amin(dim=(1, 2, 3), keepdim=True)
        high = inputs.amax(dim=(1, 2, 3), keepdim=True)
        replacement = low + noise.to(inputs.device) * (high - low)
    else:
        replacement = make_baseline(baseline, inputs)
    counts = torch.arange(steps + 1, device=inputs.device)
    fractions = torch.arange(steps + 1, dtype=torch.float64) / n_regions
    curves = {}
    for name, descending in (("morf", True), ("lerf", False)):
        order = torch.argsort(relevance, dim=1, descending=descending, stable=True)
        region_rank = torch.empty_like(order)
        region_rank.scatter_(1, order, torch.arange(n_regions).expand_as(order).contiguous())
        ranks = region_rank[:, region].view_as(heat).to(inputs.device)
        scores, resolved, forwards = _curves(
            wrapped, inputs, targets, ranks, counts, inputs, replacement,
            score, batch_size, progress, name,
        )  # fmt: skip
        targets = resolved
        auc = torch.trapezoid(scores.double(), fractions, dim=-1)
        curves[name] = Curve(
            name, fractions, scores, auc, [t.describe() for t in resolved], forwards
        )
    morf, lerf = curves["morf"].scores.double(), curves["lerf"].scores.double()
    return RegionPerturbation(
        morf=curves["morf"],
        lerf=curves["lerf"],
        aopc_morf=(morf[:, :1] - morf).mean(dim=1),
        aopc_lerf=(lerf[:, :1] - lerf).mean(dim=1),
        abpc=(lerf - morf).mean(dim=1),
        patch=patch,
    )
