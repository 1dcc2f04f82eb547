"""Perturbation methods: the model as a black box, evaluated on many perturbed copies.

Every evaluation runs through the shared engine (``Engine.scores``): perturbed inputs are made
chunk by chunk, ``batch_size`` is the only knob, forwards are counted and results do not
depend on the batch size. :class:`PerturbationMethod` holds the common first step, the scores
of the clean inputs (which also resolve ``Predicted()`` targets).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from convlens.baselines import make_baseline
from convlens.methods.base import Method
from convlens.registry import register
from convlens.targets import Target, probability_scores, resolve_targets, score_rows

__all__ = ["RISE", "Occlusion", "PerturbationMethod", "rise_masks", "window_starts"]


class PerturbationMethod(Method):
    """A method that scores perturbed copies of each input through the engine."""

    batch_size = 32
    reduction = "sum"

    def score(self, targets: Target | list[Target], output: Tensor, unit: Any) -> Tensor:
        """One number per row: the target's raw score (logit) unless a method says otherwise."""
        return score_rows(targets, output, unit)

    def clean_scores(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        """Scores of the unperturbed inputs, and the targets resolved on them."""
        resolved: list[Target] = []

        def score(output: Tensor) -> Tensor:
            chunk = resolve_targets(targets[len(resolved) : len(resolved) + len(output)], output)
            resolved.extend(chunk)
            return self.score(chunk, output, unit)

        with self.capturing(targets) as unit:
            scores = self.engine.scores(
                len(x), lambda start, stop: x[start:stop], score, self.model.module
            )
        return scores, resolved


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start of each window along one side: ceil((size - window) / stride) + 1 positions, the
    last one clipped at the border, so that every pixel is covered (as captum's Occlusion)."""
    count = math.ceil((size - window) / stride) + 1
    return [k * stride for k in range(count)]


@register("occlusion", "perturbation")
class Occlusion(PerturbationMethod):
    """Occlusion: the drop of the target score when a square patch is replaced by a baseline.

    Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
    arXiv:1311.2901. A ``window`` x ``window`` patch slides with ``stride`` over the model input;
    each pixel's value is the drop f(x) - f(x_occluded), averaged over the windows covering it.
    The score is the target's logit, as captum's ``Occlusion``.
    """

    description = "score drop when a sliding patch is occluded (Zeiler & Fergus 2014)"
    defaults: ClassVar[dict[str, Any]] = {"window": 32, "stride": 16, "baseline": "zero"}

    def explain(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        window, stride = self.params["window"], self.params["stride"]
        height, width = x.shape[-2:]
        for name, value in (("window", window), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if window > min(height, width):
            raise ValueError(f"window {window} is larger than the input ({height}x{width})")
        baseline = make_baseline(self.params["baseline"], x)
        rows, cols = window_starts(height, window, stride), window_starts(width, window, stride)
        positions = [(top, left) for top in rows for left in cols]
        with self.engine.task(len(x) * len(positions)):
            clean, targets = self.clean_scores(x, targets)
            maps = []
            for i, target in enumerate(targets):

                def occluded(start: int, stop: int, i: int = i) -> Tensor:
                    batch = x[i : i + 1].repeat(stop - start, 1, 1, 1)
                    for row, (top, left) in enumerate(positions[start:stop]):
                        patch = (slice(None), slice(top, top + window), slice(left, left + window))
                        batch[(row, *patch)] = baseline[(i, *patch)]
                    return batch

                with self.capturing([target]) as unit:
                    scores = self.engine.scores(
                        len(positions),
                        occluded,
                        lambda out, target=target, unit=unit: self.score(target, out, unit),
                        self.model.module,
                    )
                drops = (clean[i] - scores).view(1, 1, len(rows), len(cols))
                maps.append(self._spread(drops, window, stride, (height, width)))
        return torch.cat(maps), targets

    @staticmethod
    def _spread(grid: Tensor, window: int, stride: int, size: tuple[int, int]) -> Tensor:
        """Each window's value spread over its pixels, averaged where windows overlap."""
        kernel = torch.ones(1, 1, window, window, dtype=grid.dtype, device=grid.device)
        total = F.conv_transpose2d(grid, kernel, stride=stride)[..., : size[0], : size[1]]
        count = F.conv_transpose2d(torch.ones_like(grid), kernel, stride=stride)
        count = count[..., : size[0], : size[1]]
        return total / count.clamp(min=1)


def rise_masks(
    generator: torch.Generator, n: int, grid: int, p: float, size: tuple[int, int]
) -> Tensor:
    """``n`` RISE masks (n, 1, H, W): a ``grid`` x ``grid`` binary grid kept with probability
    ``p``, bilinearly upsampled to (grid + 1) cells and cropped at a random shift.

    Each mask draws its grid, then its vertical and horizontal shift, from ``generator`` in that
    order, one mask after another, so the masks do not depend on how they are chunked.
    """
    height, width = size
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    grids, shifts = [], []
    for _ in range(n):
        grids.append((torch.rand(grid, grid, generator=generator) < p).float())
        dy = int(torch.randint(0, cell_h, (1,), generator=generator))
        dx = int(torch.randint(0, cell_w, (1,), generator=generator))
        shifts.append((dy, dx))
    big = F.interpolate(
        torch.stack(grids)[:, None],
        size=((grid + 1) * cell_h, (grid + 1) * cell_w),
        mode="bilinear",
        align_corners=False,
    )
    return torch.stack(
        [big[k, :, dy : dy + height, dx : dx + width] for k, (dy, dx) in enumerate(shifts)]
    )


@register("rise", "perturbation")
class RISE(PerturbationMethod):
    """RISE: the average of random smooth masks, weighted by the score each one keeps.

    Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
    Models", arXiv:1806.07421. S = 1 / (N p) Σ_i f(x ⊙ M_i) M_i with f the class probability
    (raw values for inner-unit targets), masks from :func:`rise_masks`. In a normalised model's
    input space, x ⊙ M fades hidden regions to the dataset's mean colour. Masks are made chunk
    by chunk and folded into the sum, never all held in memory.
    """

    description = "randomized input sampling with smooth masks (Petsiuk et al. 2018)"
    random = True
    defaults: ClassVar[dict[str, Any]] = {"n_masks": 4000, "grid": 7, "p": 0.5}

    def score(self, targets: Target | list[Target], output: Tensor, unit: Any) -> Tensor:
        return probability_scores(targets, output, unit)

    def explain(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        n_masks, grid, p = self.params["n_masks"], self.params["grid"], self.params["p"]
        if not isinstance(n_masks, int) or n_masks < 1:
            raise ValueError(f"n_masks must be a positive integer, not {n_masks!r}")
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive integer, not {grid!r}")
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], not {p}")
        size = (x.shape[-2], x.shape[-1])
        generator = self.generator()
        maps = []
        with self.engine.task(len(x) * n_masks):
            _, targets = self.clean_scores(x, targets)
            for i, target in enumerate(targets):
                total = torch.zeros(size, device=x.device)
                current: dict[str, Tensor] = {}

                def masked(start: int, stop: int, i: int = i, current=current) -> Tensor:
                    masks = rise_masks(generator, stop - start, grid, p, size).to(x.device)
                    current["masks"] = masks
                    return x[i : i + 1] * masks

                def fold(
                    start: int, stop: int, scores: Tensor, total: Tensor = total, current=current
                ) -> None:
                    total.add_(torch.einsum("n,nhw->hw", scores, current["masks"][:, 0]))

                with self.capturing([target]) as unit:
                    self.engine.scores(
                        n_masks,
                        masked,
                        lambda out, target=target, unit=unit: self.score(target, out, unit),
                        self.model.module,
                        on_chunk=fold,
                    )
                maps.append((total / (n_masks * p))[None, None])
        return torch.cat(maps), targets
