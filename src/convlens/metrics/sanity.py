"""Sanity checks for saliency maps: Adebayo et al. 2018, "Sanity Checks for Saliency Maps"
(NeurIPS), cascading model parameter randomisation.

The layers are re-initialised one after another from the output down, on a copy of the model;
after each step the map is computed again and compared with the original one by Spearman rank
correlation and SSIM. A map that stays the same while the network is destroyed does not explain
the network (an edge detector passes every image through unchanged); a faithful method's
correlation falls towards zero.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from convlens import viz
from convlens.api import explain
from convlens.engine import session
from convlens.explanation import Explanation
from convlens.hooks import call_order
from convlens.metrics.common import heatmaps
from convlens.model import Model, as_model
from convlens.registry import get_method
from convlens.targets import Class, TargetSpec, check_target_spec

__all__ = ["Sanity", "randomisable_layers", "sanity"]

MapFunction = Callable[[Model, Tensor], Explanation | Tensor]


@dataclass(frozen=True)
class Sanity:
    """Result of the cascading randomisation.

    Attributes:
        method: the method's name (or the function's).
        layers: names of the layers randomised, in order (from the output down).
        spearman: (L, B) rank correlation of each image's map with the original after each step.
        ssim: (L, B) structural similarity of the maps scaled to [0, 1].
        maps: (L + 1, B, H, W) the original maps, then one per step.
        model_independent: (B,) maps still correlated (>= ``threshold``) with the original once
            every layer is random: they do not depend on the model.
        threshold: the rank correlation above which a map counts as model-independent.
    """

    method: str
    layers: list[str]
    spearman: Tensor
    ssim: Tensor
    maps: Tensor
    model_independent: Tensor
    threshold: float

    def plot(self) -> Image.Image:
        """Mean Spearman and SSIM after each randomisation step, as a picture."""
        steps = np.arange(len(self.layers) + 1)
        ones = torch.ones(1)
        series = {
            "Spearman (mean)": torch.cat([ones, self.spearman.mean(dim=1)]),
            "SSIM (mean)": torch.cat([ones, self.ssim.mean(dim=1)]),
        }
        title = f"{self.method}: cascading randomisation"
        return viz.curve_plot(steps, series, "layers randomised, from the output", "", title)

    def _repr_png_(self) -> bytes:
        """Jupyter: :meth:`plot` as PNG."""
        return viz.png_bytes(self.plot())

    def _repr_html_(self) -> str:
        """Jupyter: :meth:`plot`, with how many maps are model-independent as its caption."""
        flagged, total = int(self.model_independent.sum()), len(self.model_independent)
        caption = (
            f"{self.method}: {flagged} of {total} maps still correlated with the original "
            f"(Spearman >= {self.threshold:g}) once all {len(self.layers)} layers are random"
        )
        return viz.html_figure([self.plot()], caption)

    def grid(self, i: int = 0, columns: int = 6) -> Image.Image:
        """Image ``i``'s map before and after each step, side by side."""
        pictures = [Image.fromarray(viz.colorize(m.numpy())) for m in self.maps[:, i]]
        titles = ["original", *self.layers]
        return viz.grid(pictures, [t[-30:] for t in titles], columns=columns)


def randomisable_layers(model: Model | nn.Module, x: Tensor) -> list[str]:
    """Names of the modules that own parameters, in the order a forward pass of ``x`` reaches
    them (each once)."""
    wrapped = as_model(model)
    names = {module: name for name, module in wrapped.module.named_modules()}
    owners = [m for m in wrapped.module.modules() if any(True for _ in m.parameters(False))]
    with session(wrapped, x[:1], progress=False) as engine:
        order = call_order(lambda: engine.forward(x[:1]), owners)
    return [names[m] for m in order]


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Fresh parameters for one module: its own ``reset_parameters`` where it has one (the
    initialisation it was built with), else normal values with each tensor's own scale."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            return
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.normal_(0.0, float(p.std()) if p.numel() > 1 else 0.02)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant map has no ranks: correlation 0
        value = spearmanr(a.ravel(), b.ravel()).statistic
    return 0.0 if not np.isfinite(value) else float(value)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    def scaled(m: np.ndarray) -> np.ndarray:
        span = m.max() - m.min()
        return (m - m.min()) / span if span > 0 else np.zeros_like(m)

    side = min(a.shape)
    window = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(scaled(a), scaled(b), data_range=1.0, win_size=window))


def sanity(
    model: Model | nn.Module,
    x: Any,
    method: str | MapFunction = "gradcam",
    target: TargetSpec = None,
    layers: Sequence[str] | None = None,
    absolute: bool = True,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int | None = None,
    **params: Any,
) -> Sanity:
    """Cascading randomisation (Adebayo et al. 2018) of ``model``'s layers for one method.

    Args:
        method: a registered method name, or a function ``(model, x) -> map`` (to check any map).
        target: as in ``explain``; the classes stay those of the trained model throughout,
            but for a method that explains the prediction only (``prediction_only``, e.g.
            Contrast-CAM), whose maps are then of each randomised model's own prediction.
        layers: names to randomise, in order; default every module owning parameters, from the
            last one a forward pass reaches to the first.
        absolute: compare absolute values of the maps, as in the paper's main figures.
        threshold: rank correlation above which a fully randomised map counts as
            model-independent.
        seed: seeds the re-initialisation and the method.
        **params: the method's parameters.

    The model itself is not touched: the randomisation happens on a copy.
    """
    wrapped = as_model(model)
    inputs = wrapped.inputs(x)
    targets = check_target_spec(target, len(inputs), wrapped.labels)
    with session(wrapped, inputs, batch_size, progress=False) as engine:
        _, targets = engine.clean(inputs, targets)
    fixed = [t.index if isinstance(t, Class) else t for t in targets]
    if isinstance(method, str) and get_method(method).prediction_only:
        fixed = None  # its question is about the prediction: each model's own
    params = {
        k: wrapped.layer_name(v) if isinstance(v, nn.Module) else v for k, v in params.items()
    }

    def map_of(current: Model) -> Tensor:
        if callable(method):
            result = method(current, inputs)
        else:
            result = explain(
                current, inputs, method, target=fixed, batch_size=batch_size, seed=seed,
                progress=False, **params,
            )  # fmt: skip
        heat = heatmaps(result)
        return heat.abs() if absolute else heat

    randomised = copy.copy(wrapped)  # same preprocessing and labels, its own module
    randomised.__dict__.pop("_module_names", None)
    randomised.module = copy.deepcopy(wrapped.module)
    if wrapped.cam_layer is not None and not isinstance(wrapped.cam_layer, str):
        randomised.cam_layer = wrapped.layer_name(wrapped.cam_layer)
    if layers is None:
        layers = list(reversed(randomisable_layers(randomised, inputs)))
    for name in layers:
        randomised.layer(name)  # unknown names fail here, with the valid ones listed
    maps = [map_of(wrapped)]
    for step, name in enumerate(layers):
        _reinitialise(randomised.layer(name), seed * 100003 + step)
        maps.append(map_of(randomised))
    stack = torch.stack(maps)
    original = stack[0].numpy()
    spearman = torch.tensor(
        [
            [_spearman(o, m) for o, m in zip(original, later.numpy(), strict=True)]
            for later in stack[1:]
        ]
    ).reshape(len(layers), len(inputs))
    ssim = torch.tensor(
        [[_ssim(o, m) for o, m in zip(original, later.numpy(), strict=True)] for later in stack[1:]]
    ).reshape(len(layers), len(inputs))
    final = spearman[-1] if len(layers) else torch.ones(len(inputs))
    name = method if isinstance(method, str) else getattr(method, "__name__", "map")
    return Sanity(name, list(layers), spearman, ssim, stack, final >= threshold, threshold)
