"""Anchors: a set of superpixels that, kept as they are, fixes the prediction with high precision.

Ribeiro, Singh & Guestrin 2018, "Anchors: High-Precision Model-Agnostic Explanations", AAAI.
The arm selection is KL-LUCB (Kaufmann & Kalyanakrishnan 2013, "Information Complexity in
Bandit Subset Selection", COLT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from convlens.checks import RequestError, finite, positive_int
from convlens.methods.base import Result
from convlens.methods.perturbation import (
    PerturbationMethod,
    check_superpixels,
    prepare_superpixels,
)
from convlens.registry import register
from convlens.targets import Class, Predicted, Target

__all__ = ["Anchors", "kl_bounds"]


def _kl(p: Tensor, q: Tensor) -> Tensor:
    p, q = p.clamp(1e-12, 1 - 1e-12), q.clamp(1e-12, 1 - 1e-12)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def kl_bounds(mean: Tensor, count: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """Lower and upper confidence bounds q with count * KL(mean, q) <= level (bisection)."""
    low, high = torch.zeros_like(mean), torch.ones_like(mean)
    upper_lo, upper_hi = mean.clone(), high.clone()
    lower_lo, lower_hi = low.clone(), mean.clone()
    for _ in range(30):
        middle = (upper_lo + upper_hi) / 2
        inside = count * _kl(mean, middle) <= level
        upper_lo, upper_hi = (
            torch.where(inside, middle, upper_lo),
            torch.where(inside, upper_hi, middle),
        )
        middle = (lower_lo + lower_hi) / 2
        inside = count * _kl(mean, middle) <= level
        lower_hi, lower_lo = (
            torch.where(inside, middle, lower_hi),
            torch.where(inside, lower_lo, middle),
        )
    return lower_hi, upper_lo


@register("anchors", "perturbation")
class Anchors(PerturbationMethod):
    """Anchors for images: superpixels that keep the predicted class when the rest changes.

    Ribeiro, Singh & Guestrin 2018, "Anchors: High-Precision Model-Agnostic Explanations". A
    predicate says "superpixel j shows as in the image"; outside the anchor each superpixel is
    kept with probability 1/2 and otherwise filled with its mean colour (``baseline``) or, when
    ``other_images`` (N, C, H, W) are given, with the same pixels of a random one of them.
    Precision = P(prediction = class | anchor), coverage = 2^-|anchor|. Beam search of width
    ``beam`` adds one predicate per round; KL-LUCB (tolerance ``epsilon``, confidence ``delta``)
    picks the best candidates, and the search stops at the candidate of highest coverage whose
    precision's lower bound reaches ``threshold`` (the empty anchor is tried first: the
    prediction may hold whatever is hidden). The map shows the anchor's superpixels (1);
    ``extras["anchor"]`` gives them with precision, coverage and ``found`` (whether the
    threshold was reached within ``n_samples``; if not, the most precise candidate is shown).
    """

    description = "high-precision superpixel rule keeping the prediction (Ribeiro et al. 2018)"
    passes: ClassVar[str] = "adaptive (KL-LUCB sampling), at most 1 + n_samples (20001)"
    random = True
    defaults: ClassVar[dict[str, Any]] = {
        "segmentation": "slic",
        "n_segments": 50,
        "baseline": "superpixel",
        "other_images": None,
        "threshold": 0.95,
        "beam": 2,
        "epsilon": 0.1,
        "delta": 0.05,
        "batch": 64,
        "max_size": 10,
        "n_samples": 20000,
    }
    extras: ClassVar[dict[str, str]] = {
        "anchor": "per input: the anchor's superpixels, its precision and coverage, found "
        "(whether the threshold was reached), the samples used, the segments (H, W) and the "
        "segmentation used (method, settings, count)",
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        check_superpixels(params)
        for name in ("beam", "batch", "max_size", "n_samples"):
            positive_int(name, params[name])
        if not 0 < finite("threshold", params["threshold"]) <= 1:
            raise RequestError(f"threshold must be in (0, 1], not {params['threshold']!r}")
        for name in ("epsilon", "delta"):
            if not 0 < finite(name, params[name]) < 1:
                raise RequestError(f"{name} must be in (0, 1), not {params[name]!r}")
        others = params["other_images"]
        if others is not None:
            others = torch.as_tensor(others)
            if others.dim() != 4 or not bool(torch.isfinite(others).all()):
                raise RequestError(
                    "other_images must be finite images of shape (N, C, H, W), not "
                    f"{others.dtype} {tuple(others.shape)}"
                )

    @classmethod
    def check_targets(cls, targets: Sequence[Target]) -> None:
        for target in targets:
            if not isinstance(target, (Class, Predicted)):
                raise RequestError(
                    f"anchors explains a class (the prediction kept), not {type(target).__name__}"
                )

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        params = self.params
        batch, budget = int(params["batch"]), int(params["n_samples"])
        pictures = self.model.to_display(x)
        generator = self.generator()
        maps, found = [], []
        with self.engine.task(len(x) * (1 + budget)):  # the search may stop before its budget
            _, targets = self.engine.clean(x, targets)
            for i, target in enumerate(targets):
                assert isinstance(target, Class), "check_targets lets only classes through"
                segments, onehot, fill, info = prepare_superpixels(pictures[i], x[i], params)
                m = len(onehot)
                search = _Search(self, x[i], fill, onehot, target, generator, batch, budget)
                anchor, precision, reached = search.run(m)
                mask = (
                    onehot[anchor].sum(0) if anchor else torch.zeros_like(segments, dtype=x.dtype)
                )
                maps.append(mask[None, None])
                found.append(
                    {
                        "anchor": anchor,
                        "precision": precision,
                        "found": reached,
                        "coverage": 0.5 ** len(anchor),
                        "samples": search.used,
                        "segments": segments.cpu(),
                        "segmentation": info,
                    }
                )
        return Result(torch.cat(maps), targets, extras={"anchor": found})


def _kept(target: Target, output: Tensor, unit: Any) -> Tensor:
    """1 where the prediction is the anchored class, else 0."""
    assert isinstance(target, Class)
    return (output.argmax(-1) == target.index).float()


class _Search:
    """Beam search with KL-LUCB over anchors for one input (Ribeiro et al. 2018, Alg. 2)."""

    def __init__(
        self,
        method: Anchors,
        x: Tensor,
        fill: Tensor,
        onehot: Tensor,
        target: Class,
        generator: torch.Generator,
        batch: int,
        budget: int,
    ) -> None:
        self.method, self.x, self.fill, self.onehot = method, x, fill, onehot
        self.target, self.generator, self.batch, self.budget = target, generator, batch, budget
        self.used = 0
        self.stats: dict[tuple[int, ...], list[float]] = {}  # anchor -> [hits, count]
        others = method.params["other_images"]
        self.others = None if others is None else torch.as_tensor(others).to(x)

    def pull(self, anchor: tuple[int, ...]) -> bool:
        """Draw ``batch`` samples satisfying ``anchor`` (fewer where the budget ends) and count
        those predicted as the class; False, drawing none, once the budget is spent."""
        n = min(self.batch, self.budget - self.used)
        if n <= 0:
            return False
        m = self.onehot.shape[0]
        keep = torch.rand(n, m, generator=self.generator) < 0.5
        keep[:, list(anchor)] = True
        keep = keep.to(self.x.device, self.x.dtype)
        if self.others is not None:
            pick = torch.randint(len(self.others), (n,), generator=self.generator)
            fills = self.others[pick.to(self.others.device)]
        else:
            fills = self.fill.expand(n, -1, -1, -1)

        def perturbed(start: int, stop: int) -> Tensor:
            shown = (keep[start:stop] @ self.onehot.flatten(1)).view(
                stop - start, 1, *self.x.shape[-2:]
            )
            return fills[start:stop] + shown * (self.x - fills[start:stop])

        hits = self.method.engine.scores(n, perturbed, self.target, _kept)
        record = self.stats.setdefault(anchor, [0.0, 0.0])
        record[0] += float(hits.sum())
        record[1] += n
        self.used += n
        return True

    def bounds(self, anchors: list[tuple[int, ...]], level: float) -> tuple[Tensor, Tensor, Tensor]:
        hits = torch.tensor([self.stats[a][0] for a in anchors], dtype=torch.float64)
        count = torch.tensor([self.stats[a][1] for a in anchors], dtype=torch.float64)
        mean = hits / count
        low, high = kl_bounds(mean, count, level)
        return mean, low, high

    def best(self, candidates: list[tuple[int, ...]], keep: int) -> list[tuple[int, ...]]:
        """KL-LUCB: the ``keep`` candidates of highest precision, to tolerance epsilon."""
        epsilon, delta = self.method.params["epsilon"], self.method.params["delta"]
        for anchor in candidates:
            if anchor not in self.stats and not self.pull(anchor):
                break
        candidates = [a for a in candidates if a in self.stats]  # the budget may end first
        keep = min(keep, len(candidates))
        if keep == len(candidates):
            return candidates
        for t in range(1, 10_000):
            level = math.log(405.5 * len(candidates) * t**1.1 / delta)
            mean, low, high = self.bounds(candidates, level)
            order = torch.argsort(mean, descending=True).tolist()
            top, rest = order[:keep], order[keep:]
            weakest = min(top, key=lambda j: low[j])
            strongest = max(rest, key=lambda j: high[j])
            # Anchors of one size share their coverage, so a leader whose lower bound reaches the
            # threshold ends the round: ranking the ties behind it would only cost samples. An
            # undecided leader is sampled too, so that this can happen.
            threshold, lead = self.method.params["threshold"], order[0]
            decided = low[lead] >= threshold
            if decided or high[strongest] - low[weakest] <= epsilon or self.used >= self.budget:
                return [candidates[j] for j in top]
            if high[lead] >= threshold and lead != weakest:
                self.pull(candidates[lead])
            self.pull(candidates[weakest])
            self.pull(candidates[strongest])
        return [candidates[j] for j in top]

    def run(self, m: int) -> tuple[list[int], float, bool]:
        params = self.method.params
        threshold, delta = params["threshold"], params["delta"]
        beam: list[tuple[int, ...]] = [()]
        best: tuple[tuple[int, ...], float] | None = None
        if self.confirm((), 1, threshold, delta):  # the prediction may hold without any anchor
            return [], float(self.bounds([()], 1.0)[0][0]), True
        for _ in range(min(params["max_size"], m)):
            candidates = sorted(
                {tuple(sorted({*a, j})) for a in beam for j in range(m) if j not in a}
            )
            if not candidates:
                break
            ranked = self.best(candidates, params["beam"])
            if not ranked:  # the budget ended before any candidate was sampled
                break
            beam = ranked
            for anchor in beam:
                if self.confirm(anchor, len(candidates), threshold, delta) and best is None:
                    best = (anchor, float(self.bounds([anchor], 1.0)[0][0]))
            if best is not None or self.used >= self.budget:
                break
        if best is None:  # no anchor reached the threshold: report the most precise one
            mean, _, _ = self.bounds(beam, 1.0)
            j = int(torch.argmax(mean))
            return list(beam[j]), float(mean[j]), False
        return list(best[0]), best[1], True

    def confirm(self, anchor: tuple[int, ...], arms: int, threshold: float, delta: float) -> bool:
        """Sample ``anchor`` until its precision bounds decide the threshold (or budget ends)."""
        if anchor not in self.stats and not self.pull(anchor):
            return False
        level = math.log(405.5 * arms / delta)
        while True:
            _, low, high = self.bounds([anchor], level)
            if low[0] >= threshold:
                return True
            if high[0] < threshold or self.used >= self.budget:
                return False
            self.pull(anchor)
