"""Perturbation methods: the model as a black box, evaluated on many perturbed copies.

Every evaluation runs through the shared engine (``Engine.scores``): perturbed inputs are made
chunk by chunk, ``batch_size`` is the only knob, forwards are counted and results do not
depend on the batch size. :class:`PerturbationMethod` holds the common first step, the scores
of the clean inputs (which also resolve ``Predicted()`` targets).
"""

from __future__ import annotations

import math
import numbers
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from convlens.baselines import check_baseline, make_baseline
from convlens.checks import RequestError, finite, positive_int
from convlens.engine import Sampler, Scored
from convlens.incremental import plan_for
from convlens.methods.base import Method, Result
from convlens.registry import register
from convlens.targets import Class, Contrast, Target, probability_scores, score_rows, scorer

__all__ = [
    "LIME",
    "RISE",
    "KernelSHAP",
    "Occlusion",
    "PerturbationMethod",
    "SurrogateMethod",
    "check_superpixels",
    "prepare_superpixels",
    "rise_masks",
    "segment",
    "superpixel_fill",
    "superpixels",
    "weighted_ridge",
    "window_starts",
]


class PerturbationMethod(Method):
    """A method that scores perturbed copies of each input through the engine's perturbation
    loop (``Engine.stream``); ``score`` is how a perturbed output is scored."""

    batch_size = 16
    reduction = "sum"

    def score(self, targets: Target | list[Target], output: Tensor, unit: Any) -> Tensor:
        """One number per row: the target's raw score (logit) unless a method says otherwise."""
        return score_rows(targets, output, unit)


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
    each pixel's value is the drop s(x) - s(x_occluded), averaged over the windows covering it.
    ``score="probability"`` (the default) takes s as the target's class probability, as the
    paper measures it (its Fig. 7 maps the probability of the correct class against the
    position of the grey square); ``score="logit"`` takes the logit, as captum's
    ``Occlusion``. Under ``"probability"`` a contrast target scores p_p - p_q, and channel and
    neuron targets, which have no class probability, keep their raw activation (the scoring
    RISE, LIME and Score-CAM share, ``targets.probability_scores``); ``resolved["score"]``
    says which was used.

    The occluded copies are scored incrementally where the model allows it
    (:mod:`convlens.incremental`, Nakandala et al. 2019): the same numbers, with each position
    recomputing only what its patch reaches in the convolutional part; ``resolved
    ["incremental"]`` says how far that went, or why plain occlusion ran.

    ``approximate=tau`` (in (0, 1]; default None: exact) opts into Krypton's approximate mode,
    projective-field thresholding (Nakandala, Kumar & Papakonstantinou 2019, "Incremental and
    Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD): at each
    localised layer the recomputed region's side is capped at ceil(tau x the map's side) and
    a patch's effect beyond it is dropped. The map is then an approximation of occlusion's: a
    smaller tau recomputes less (faster) and drops more of each patch's far-reaching effect (a
    larger error); tau = 1 is exact.
    ``resolved["incremental"]["approximate"]`` records tau; where incremental occlusion cannot
    run, plain (exact) occlusion runs and the record says so.
    """

    description = "score drop when a sliding patch is occluded (Zeiler & Fergus 2014)"
    passes: ClassVar[str] = "1 + one per window place: ((side - window) // stride + 1) ** 2 (170)"
    defaults: ClassVar[dict[str, Any]] = {
        "window": 32,
        "stride": 16,
        "baseline": "zero",
        "score": "probability",
        "approximate": None,
    }
    _incremental: ClassVar[bool] = True  # False: every occluded copy through the full model

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        positive_int("window", params["window"])
        positive_int("stride", params["stride"])
        check_baseline(params["baseline"])
        scorer(params["score"])
        tau = params["approximate"]
        number = isinstance(tau, numbers.Real) and not isinstance(tau, bool)
        if tau is not None and not (number and 0 < tau <= 1):
            raise RequestError(f"approximate={tau!r} must be a number in (0, 1] (None: exact)")

    def score(self, targets: Target | list[Target], output: Tensor, unit: Any) -> Tensor:
        return scorer(self.params["score"])(targets, output, unit)

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        window, stride = int(self.params["window"]), int(self.params["stride"])
        height, width = x.shape[-2:]
        if window > min(height, width):
            raise RequestError(f"window {window} is larger than the input ({height}x{width})")
        baseline = make_baseline(self.params["baseline"], x)
        rows, cols = window_starts(height, window, stride), window_starts(width, window, stride)
        positions = [(top, left) for top in rows for left in cols]
        tau = self.params["approximate"]
        plan = "switched off"
        if self._incremental:
            plan = plan_for(self.engine, targets, x.shape[1:], positions, window,
                            1.0 if tau is None else float(tau))  # fmt: skip
        with self.engine.task(len(x) * (1 + len(positions))):
            if isinstance(plan, str):
                clean, targets = self.engine.clean(x, targets, self.score)
                occluded = [
                    s.scores
                    for s in self.engine.perturb(
                        targets,
                        lambda i, _: _Windows(x[i], baseline[i], positions, window),
                        self.score,
                    )
                ]
                record: Any = f"plain ({plan})"
                if tau is not None:
                    record += f"; exact, not approximate={tau}"
            else:
                clean, targets, occluded = plan.scores(x, baseline, targets, self.score)
                record = plan.record if tau is None else {**plan.record, "approximate": tau}
        maps = [
            self._spread((clean[i] - s).view(1, 1, len(rows), len(cols)), window, stride,
                         (height, width))
            for i, s in enumerate(occluded)
        ]  # fmt: skip
        resolved = {"score": self._score_used(targets), "incremental": record}
        return Result(torch.cat(maps), targets, resolved=resolved)

    def _score_used(self, targets: list[Target]) -> str:
        """The score taken: the requested one, or the raw value where a target has no class
        probability."""
        if self.params["score"] == "logit":
            return "logit"
        raw = sorted({type(t).__name__ for t in targets if not isinstance(t, (Class, Contrast))})
        return f"probability (raw values for {', '.join(raw)} targets)" if raw else "probability"

    @staticmethod
    def _spread(grid: Tensor, window: int, stride: int, size: tuple[int, int]) -> Tensor:
        """Each window's value spread over its pixels, averaged where windows overlap."""
        kernel = torch.ones(1, 1, window, window, dtype=grid.dtype, device=grid.device)
        total = F.conv_transpose2d(grid, kernel, stride=stride)[..., : size[0], : size[1]]
        count = F.conv_transpose2d(torch.ones_like(grid), kernel, stride=stride)
        count = count[..., : size[0], : size[1]]
        return total / count.clamp(min=1)


class _Windows(Scored):
    """Occlusion for one input (C, H, W): one copy per window position, the window showing the
    baseline."""

    def __init__(
        self, x: Tensor, baseline: Tensor, positions: list[tuple[int, int]], window: int
    ) -> None:
        self.x, self.baseline, self.positions, self.window = x, baseline, positions, window
        self.n = len(positions)

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        batch = self.x.repeat(stop - start, 1, 1, 1)
        for row, (top, left) in enumerate(self.positions[start:stop]):
            patch = (slice(None), slice(top, top + self.window), slice(left, left + self.window))
            batch[(row, *patch)] = self.baseline[patch]
        return batch, None


def rise_masks(
    generator: torch.Generator, n: int, grid: int, p: float, size: tuple[int, int]
) -> Tensor:
    """``n`` RISE masks (n, 1, H, W): a ``grid`` x ``grid`` binary grid kept with probability
    ``p``, bilinearly upsampled to (grid + 1) cells and cropped at a random shift.

    Each mask uses ``grid² + 2`` uniform numbers from ``generator`` (its cells, then its
    vertical and horizontal shift), mask after mask, so the masks do not depend on how they
    are chunked.
    """
    height, width = size
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    draws = torch.rand(n, grid * grid + 2, generator=generator)
    cells = (draws[:, : grid * grid] < p).float().view(n, 1, grid, grid)
    dy = (draws[:, -2] * cell_h).long().clamp(max=cell_h - 1)
    dx = (draws[:, -1] * cell_w).long().clamp(max=cell_w - 1)
    big = F.interpolate(
        cells, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear", align_corners=False
    )
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (n, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (n, 1, W)
    return big[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


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
    passes: ClassVar[str] = "1 + n_masks (4001)"
    random = True
    defaults: ClassVar[dict[str, Any]] = {"n_masks": 4000, "grid": 7, "p": 0.5}

    def score(self, targets: Target | list[Target], output: Tensor, unit: Any) -> Tensor:
        return probability_scores(targets, output, unit)

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        positive_int("n_masks", params["n_masks"])
        positive_int("grid", params["grid"])
        if not 0 < finite("p", params["p"]) <= 1:
            raise RequestError(f"p must be in (0, 1], not {params['p']}")

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        n_masks, grid, p = int(self.params["n_masks"]), int(self.params["grid"]), self.params["p"]
        generator = self.generator()
        with self.engine.task(len(x) * (1 + n_masks)):
            _, targets = self.engine.clean(x, targets, self.score)
            samplers = self.engine.perturb(
                targets, lambda i, _: _RiseMasks(x[i : i + 1], n_masks, grid, p, generator),
                self.score,
            )  # fmt: skip
        maps = [s.total / (n_masks * p) for s in samplers]
        return Result(torch.cat(maps), targets)


class _RiseMasks(Sampler):
    """RISE for one input: masked copies made chunk by chunk, scores folded into
    S = Σ_i f(x ⊙ M_i) M_i."""

    def __init__(self, x: Tensor, n: int, grid: int, p: float, generator: torch.Generator):
        self.x, self.n, self.grid, self.p, self.generator = x, n, grid, p, generator
        self.total = torch.zeros(1, 1, *x.shape[-2:], device=x.device)

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        size = (self.x.shape[-2], self.x.shape[-1])
        masks = rise_masks(self.generator, stop - start, self.grid, self.p, size).to(self.x)
        return self.x * masks, masks

    def fold(self, start: int, stop: int, scores: Tensor, made: Any) -> None:
        self.total[0, 0] += torch.einsum("n,nhw->hw", scores.to(made), made[:, 0])


SEGMENTATIONS = ("slic", "quickshift", "felzenszwalb")


def superpixels(picture: np.ndarray, segmentation: Any, n_segments: int) -> Tensor:
    """Superpixel labels (H, W), numbered 0..M-1, of an RGB picture (H, W, 3) uint8: see
    :func:`segment`."""
    return segment(picture, segmentation, n_segments)[0]


def segment(
    picture: np.ndarray, segmentation: Any, n_segments: int
) -> tuple[Tensor, dict[str, Any]]:
    """Superpixel labels (H, W), numbered 0..M-1, and how they were made.

    ``segmentation`` is ``"slic"``, ``"quickshift"`` or ``"felzenszwalb"`` (scikit-image, with
    LIME's settings for quickshift), or an integer label map of shape (H, W). SLIC starts with
    LIME's compactness 10; where that collapses (noise or small images can give a single
    superpixel), it is retried with compactness 100, which weighs position over colour, and
    where that still gives fewer than half of ``n_segments``, a regular grid of about
    ``n_segments`` cells is used. The record says which, with what and how many.
    """
    from skimage import segmentation as skseg

    height, width = picture.shape[:2]
    info: dict[str, Any] = {"method": segmentation if isinstance(segmentation, str) else "given"}
    if isinstance(segmentation, str):
        if segmentation == "slic":
            for compactness in (10, 100):
                labels = skseg.slic(
                    picture, n_segments=n_segments, compactness=compactness, start_label=0
                )
                info["compactness"] = compactness
                if len(np.unique(labels)) >= n_segments / 2:
                    break
            else:
                labels, info = _grid(height, width, n_segments), {"method": "grid"}
        elif segmentation == "quickshift":
            labels = skseg.quickshift(picture, kernel_size=4, max_dist=200, ratio=0.2)
        elif segmentation == "felzenszwalb":
            labels = skseg.felzenszwalb(picture, scale=100, sigma=0.5, min_size=50)
        else:
            raise RequestError(
                f"unknown segmentation {segmentation!r}; expected slic, quickshift, "
                "felzenszwalb or an integer label map (H, W)"
            )
        labels = torch.as_tensor(np.asarray(labels))
    else:
        labels = torch.as_tensor(np.asarray(segmentation))
        if labels.shape != (height, width) or labels.is_floating_point():
            raise RequestError(
                f"a segmentation map must be integers of shape {(height, width)}, not "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
    labels = torch.unique(labels.long(), return_inverse=True)[1]
    info["count"] = int(labels.max()) + 1
    return labels, info


def _grid(height: int, width: int, n: int) -> np.ndarray:
    """A regular grid of about ``n`` cells (rows x columns in the picture's proportions)."""
    rows = max(1, min(height, round((n * height / width) ** 0.5)))
    cols = max(1, min(width, round(n / rows)))
    row = np.arange(height)[:, None] * rows // height
    col = np.arange(width)[None, :] * cols // width
    return row * cols + col


def check_superpixels(params: Mapping[str, Any]) -> None:
    """Refuse, by name, a bad ``segmentation``, ``n_segments`` or superpixel ``baseline``."""
    positive_int("n_segments", params["n_segments"])
    segmentation = params["segmentation"]
    if isinstance(segmentation, str) and segmentation not in SEGMENTATIONS:
        raise RequestError(
            f"unknown segmentation {segmentation!r}; expected {', '.join(SEGMENTATIONS)} or an "
            "integer label map (H, W)"
        )
    check_baseline(params["baseline"], extra=("superpixel",))


def superpixel_fill(x: Tensor, onehot: Tensor, baseline: Any) -> Tensor:
    """What hidden superpixels of ``x`` (C, H, W) show: each its own mean colour
    (``"superpixel"``), or a baseline (``"zero"``, ``"mean"``, ``"blur"``, a tensor)."""
    if isinstance(baseline, str) and baseline == "superpixel":
        flat = onehot.flatten(1)  # (m, HW)
        means = (flat @ x.flatten(1).T) / flat.sum(dim=1, keepdim=True)  # (m, C)
        return (means.T @ flat).view_as(x)
    return make_baseline(baseline, x[None])[0]


def prepare_superpixels(
    picture: np.ndarray, x: Tensor, params: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """For one input: its superpixel labels (H, W), their one-hot masks (m, H, W), what
    hidden superpixels show (C, H, W), and how the superpixels were made (:func:`segment`),
    from ``segmentation``, ``n_segments`` and ``baseline``."""
    segments, info = segment(picture, params["segmentation"], params["n_segments"])
    segments = segments.to(x.device)
    onehot = F.one_hot(segments, int(segments.max()) + 1).permute(2, 0, 1).to(x.dtype)
    return segments, onehot, superpixel_fill(x, onehot, params["baseline"]), info


class SurrogateMethod(PerturbationMethod):
    """LIME and KernelSHAP: superpixels switched on and off, and a linear model of the scores.

    They share the segmentation, the filling of hidden superpixels, the streamed masks and the
    engine; they differ in how coalitions are sampled and how the linear model is fitted.
    """

    random = True
    defaults: ClassVar[dict[str, Any]] = {
        "segmentation": "slic",
        "n_segments": 50,
        "n_samples": 1000,
        "baseline": "superpixel",
        "score": "probability",
    }
    extras: ClassVar[dict[str, str]] = {
        "superpixels": "per input: the superpixel weights, segments (H, W), samples (n, m), the "
        "top 5 positive and negative superpixels, the segmentation used (method, settings, "
        "count) and the fit (LIME: intercept and weighted R²; KernelSHAP: base value and "
        "prediction)",
    }

    @abstractmethod
    def sample(self, generator: torch.Generator, n: int, m: int) -> Tensor:
        """Binary coalitions (n, m): which of the m superpixels each sample keeps."""

    @abstractmethod
    def fit(self, samples: Tensor, scores: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Per-superpixel weights (m,) and the fit's statistics."""

    def score(self, targets: Target | list[Target], output: Tensor, unit: Any) -> Tensor:
        return scorer(self.params["score"])(targets, output, unit)

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        positive_int("n_samples", params["n_samples"], minimum=3)
        check_superpixels(params)
        scorer(params["score"])

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        n_samples = int(self.params["n_samples"])
        pictures = self.model.to_display(x)
        generator = self.generator()
        with self.engine.task(len(x) * (1 + n_samples)):
            _, targets = self.engine.clean(x, targets, self.score)

            def coalitions(i: int, _: Target) -> _Coalitions:
                segments, onehot, fill, info = prepare_superpixels(pictures[i], x[i], self.params)
                samples = self.sample(generator, n_samples, len(onehot)).to(x.device)
                return _Coalitions(x[i], segments, samples, fill, info)

            fitted = self.engine.perturb(targets, coalitions, self.score)
        maps, per_input = [], []
        for s in fitted:
            weights, stats = self.fit(s.samples.to(s.scores.dtype), s.scores)
            maps.append(weights[s.segments][None, None])
            order = torch.argsort(weights, descending=True).tolist()
            per_input.append(
                {
                    "weights": weights.tolist(),
                    "segments": s.segments.cpu(),
                    "samples": s.samples.cpu(),
                    "top_positive": [j for j in order if weights[j] > 0][:5],
                    "top_negative": [j for j in reversed(order) if weights[j] < 0][:5],
                    "segmentation": s.info,
                    **stats,
                }
            )
        return Result(torch.cat(maps), targets, extras={"superpixels": per_input})


class _Coalitions(Scored):
    """LIME's and KernelSHAP's samples for one input (C, H, W): the superpixels each sample
    keeps show the image, the others ``fill``."""

    def __init__(
        self, x: Tensor, segments: Tensor, samples: Tensor, fill: Tensor, info: dict[str, Any]
    ) -> None:
        self.x, self.segments, self.samples, self.fill = x, segments, samples, fill
        self.n, self.info = len(samples), info

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        keep = self.samples[start:stop][:, self.segments].to(self.x.dtype)  # (k, H, W)
        return self.fill + keep[:, None] * (self.x - self.fill), None


def weighted_ridge(
    features: Tensor, targets: Tensor, weights: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients, intercept and weighted R² of ridge regression with an unpenalised
    intercept (the same estimator as scikit-learn's ``Ridge(alpha).fit(X, y, sample_weight)``)."""
    features, targets, weights = features.double(), targets.double(), weights.double()
    total = weights.sum()
    mean_x = (weights[:, None] * features).sum(0) / total
    mean_y = (weights * targets).sum() / total
    xc, yc = features - mean_x, targets - mean_y
    gram = xc.T @ (weights[:, None] * xc) + alpha * torch.eye(
        features.shape[1], dtype=xc.dtype, device=xc.device
    )
    coefficients = torch.linalg.lstsq(gram, xc.T @ (weights * yc)).solution
    intercept = mean_y - mean_x @ coefficients
    residual = targets - features @ coefficients - intercept
    r2 = 1 - (weights * residual**2).sum() / (weights * yc**2).sum().clamp(min=1e-300)
    return coefficients, intercept, r2


@register("lime", "perturbation")
class LIME(SurrogateMethod):
    """LIME: a weighted ridge regression of the scores on which superpixels are visible.

    Ribeiro, Singh & Guestrin 2016, "Why Should I Trust You?: Explaining the Predictions of Any
    Classifier", arXiv:1602.04938, with the choices of the authors' ``lime_image``: the first
    sample keeps every superpixel, the others keep each with probability 1/2; hidden
    superpixels show their mean colour; sample weight sqrt(exp(-d² / width²)) with d the cosine
    distance to the all-visible sample and width ``kernel_width``; ridge ``alpha`` with an
    intercept; the target's probability as the response. ``extras["superpixels"]`` keeps the
    weights, the surrogate's weighted R², and the top positive and negative superpixels.
    """

    description = "local linear surrogate on superpixels (Ribeiro et al. 2016)"
    passes: ClassVar[str] = "1 + n_samples (1001)"
    defaults: ClassVar[dict[str, Any]] = {
        **SurrogateMethod.defaults,
        "kernel_width": 0.25,
        "alpha": 1.0,
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        super().check(params)
        if finite("kernel_width", params["kernel_width"]) <= 0:
            raise RequestError(f"kernel_width must be positive, not {params['kernel_width']!r}")
        if finite("alpha", params["alpha"]) < 0:
            raise RequestError(f"alpha must be non-negative, not {params['alpha']!r}")

    def sample(self, generator: torch.Generator, n: int, m: int) -> Tensor:
        samples = torch.rand(n, m, generator=generator) < 0.5
        samples[0] = True
        return samples

    def fit(self, samples: Tensor, scores: Tensor) -> tuple[Tensor, dict[str, float]]:
        visible = samples.sum(dim=1)
        cosine = visible.sqrt() / samples.shape[1] ** 0.5  # cos(z, 1) for binary z
        distance = 1 - cosine
        kernel = torch.sqrt(torch.exp(-(distance**2) / self.params["kernel_width"] ** 2))
        coefficients, intercept, r2 = weighted_ridge(samples, scores, kernel, self.params["alpha"])
        return coefficients.to(scores.dtype), {"intercept": float(intercept), "r2": float(r2)}


@register("kernel_shap", "perturbation")
class KernelSHAP(SurrogateMethod):
    """KernelSHAP: Shapley values of the superpixels from a kernel-weighted linear regression.

    Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions",
    arXiv:1705.07874. Coalition sizes s are drawn with probability ∝ (M - 1) / (s (M - s)) and
    the coalition uniformly among those of that size, which makes the Shapley kernel's weights
    uniform; the all-visible and all-hidden samples come first. The regression is solved under
    the efficiency constraint Σ φ = f(x) - f(∅) with φ_0 = f(∅) (one variable eliminated).
    The response is the target's logit by default.
    """

    description = "Shapley values of superpixels via the Shapley kernel (Lundberg & Lee 2017)"
    passes: ClassVar[str] = "1 + n_samples (1001)"
    defaults: ClassVar[dict[str, Any]] = {**SurrogateMethod.defaults, "score": "logit"}

    def sample(self, generator: torch.Generator, n: int, m: int) -> Tensor:
        if m < 2:
            raise RequestError("kernel_shap needs at least 2 superpixels")
        sizes = torch.arange(1, m, dtype=torch.float64)
        probability = (m - 1) / (sizes * (m - sizes))
        drawn = torch.multinomial(probability, n - 2, replacement=True, generator=generator) + 1
        # a uniform subset of each drawn size: the superpixels of the `size` smallest keys
        ranks = torch.rand(n - 2, m, generator=generator).argsort(dim=1).argsort(dim=1)
        samples = torch.zeros(n, m, dtype=torch.bool)
        samples[0] = True
        samples[2:] = ranks < drawn[:, None]
        return samples

    def fit(self, samples: Tensor, scores: Tensor) -> tuple[Tensor, dict[str, float]]:
        full, empty = scores[0].double(), scores[1].double()
        z, y = samples[2:].double(), scores[2:].double() - empty
        total = full - empty
        # φ_M = total - Σ_{j<M} φ_j:  y - z_M total = Σ_{j<M} (z_j - z_M) φ_j
        design = z[:, :-1] - z[:, -1:]
        response = y - z[:, -1] * total
        head = torch.linalg.lstsq(design, response[:, None]).solution[:, 0]
        phi = torch.cat([head, (total - head.sum())[None]])
        return phi.to(scores.dtype), {"base_value": float(empty), "prediction": float(full)}
