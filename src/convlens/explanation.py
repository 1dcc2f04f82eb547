"""``Explanation``: the immutable record every method returns."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from convlens import viz
from convlens.checks import RequestError, RequestIndexError
from convlens.files import save_picture, save_torch
from convlens.images import to_pictures

__all__ = ["REDUCTIONS", "SPECKLE", "Explanation", "sign_changes"]

# How a (B, C, H, W) attribution becomes a (B, H, W) heat map.
REDUCTIONS = {
    "max_abs": lambda a: a.abs().amax(dim=1),  # Simonyan et al. 2014: max |g| over channels
    "sum": lambda a: a.sum(dim=1),  # signed evidence per pixel (additive methods)
}


@dataclass(frozen=True)
class Explanation:
    """What a method found, with everything needed to reproduce and show it.

    Attributes:
        attribution: float32 CPU tensor at input resolution: (B, 1, H, W) for maps, (B, C, H, W)
            for pixel-wise gradient methods.
        method: registry name of the method.
        targets: resolved target per input (class index, or a description for other targets).
        layer: name of the layer explained, or ``None``.
        params: the parameters the caller asked for, defaults included (``batch_size``, and
            ``seed`` for random methods, too).
        seconds: wall-clock time of the method.
        forwards: images passed through the model (a gradient counts as one forward).
        inputs: the (preprocessed) input batch, float32 on the CPU.
        reduction: how :meth:`heatmap` reduces channels (see ``REDUCTIONS``).
        extras: method-specific results (e.g. integrated gradients' completeness gap); the
            keys of each method are listed in its class's ``extras``.
        labels: the class name of each target, where the model has labels.
        display: the inputs as RGB pictures (B, H, W, 3) uint8, for overlays.
        resolved: what convlens decided on the caller's behalf: the memory ``layout`` the
            model ran in, where the logits were found in its ``output``, and what the method
            chose (the ``layer``, a base method's parameters, ...).
    """

    attribution: Tensor
    method: str
    targets: list[Any]
    layer: str | None
    params: Mapping[str, Any]
    seconds: float
    forwards: int
    inputs: Tensor
    reduction: str = "max_abs"
    extras: Mapping[str, Any] = field(default_factory=dict)
    labels: list[str | None] = field(default_factory=list)
    display: np.ndarray | None = field(default=None, repr=False)
    resolved: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Explanation(method={self.method!r}, attribution={tuple(self.attribution.shape)}, "
            f"targets={self.targets}, seconds={self.seconds:.3f}, forwards={self.forwards})"
        )

    def heatmap(self) -> Tensor:
        """(B, H, W) map: the method's channel reduction of :attr:`attribution`."""
        if self.attribution.shape[1] == 1:
            return self.attribution[:, 0]
        return REDUCTIONS[self.reduction](self.attribution)

    def _picture(self, i: int) -> np.ndarray:
        if self.display is not None:
            return self.display[i]
        return to_pictures(self.inputs[i : i + 1])[0]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.attribution.shape[0]:
            raise RequestIndexError(
                f"input {i} is out of range for {self.attribution.shape[0]} inputs"
            )

    def overlay(self, i: int = 0, alpha: float = 0.8, view: viz.View = "signed") -> Image.Image:
        """PIL image of input ``i`` with its heat map laid over it (colours: :mod:`convlens.viz`).

        ``view``: ``"signed"`` the map, ``"abs"`` its magnitude, ``"smooth"`` a Gaussian blur of
        it (sigma = image side / 50), the views worth having where :meth:`speckled` is true.
        """
        self._check_index(i)
        return viz.overlay(self._picture(i), self.heatmap()[i].numpy(), alpha=alpha, view=view)

    def raw_picture(self, i: int = 0) -> Image.Image:
        """Input ``i``'s (3, H, W) attribution as an RGB picture, mid grey at zero, as the
        gradient, deconvnet and guided-backprop papers show it (:func:`convlens.viz.raw_picture`).
        """
        self._check_index(i)
        if self.attribution.shape[1] != 3:
            raise RequestError(
                f"{self.method!r} gives a {self.attribution.shape[1]}-channel map; a raw picture "
                "needs an input-channel attribution (3 channels: saliency, deconvnet, "
                "guided_backprop, input_x_gradient, ...)"
            )
        return viz.raw_picture(self.attribution[i].numpy())

    def speckled(self, i: int = 0) -> bool:
        """Whether input ``i``'s map is pixel-level signed speckle, for which the ``"abs"`` and
        ``"smooth"`` views of :meth:`overlay` say more than the signed map.

        The statistic: among horizontally and vertically neighbouring pixels that both carry
        evidence (|value| above 5 % of the display scale), the fraction of opposite sign. It is
        0 for unsigned maps and a few percent for signed region maps (occlusion, CAM family:
        the sign changes only along region borders), and 10-50 % for integrated gradients,
        input x gradient and DeepLIFT, whose neighbouring pixels often disagree. Speckled: at
        least :data:`SPECKLE` (0.1).
        """
        self._check_index(i)
        return sign_changes(self.heatmap()[i].numpy()) >= SPECKLE

    def superpixels(self, i: int = 0, k: int = 5) -> Image.Image:
        """Input ``i`` showing only its top-``k`` superpixels (Ribeiro et al. 2016, Fig. 4), in
        the heat maps' colours: for ``lime`` and ``kernel_shap`` the ``k`` with the largest
        positive weights (outlined red: for the class) and the ``k`` most negative (tinted and
        outlined blue: against); for ``anchors`` the anchor's superpixels (red)."""
        self._check_index(i)
        if "superpixels" in self.extras:
            info = self.extras["superpixels"][i]
            weights = torch.tensor(info["weights"])
            order = torch.argsort(weights, descending=True).tolist()
            positive = [j for j in order if weights[j] > 0][:k]
            negative = [j for j in reversed(order) if weights[j] < 0][:k]
        elif "anchor" in self.extras:
            info = self.extras["anchor"][i]
            positive, negative = list(info["anchor"]), []
        else:
            raise RequestError(
                f"{self.method!r} has no superpixels to show; lime, kernel_shap and anchors do"
            )
        return viz.superpixel_picture(self._picture(i), info["segments"], positive, negative)

    def _sheet(self, limit: int | None = None) -> Image.Image:
        """The overlays of the first ``limit`` inputs (all: ``None``) side by side."""
        pictures = [self.overlay(i) for i in range(self.attribution.shape[0])[:limit]]
        return pictures[0] if len(pictures) == 1 else viz.grid(pictures, columns=4)

    def explained(self, i: int = 0) -> str:
        """What input ``i``'s map explains, in words: the class label and its index (or the
        target's description)."""
        label = self.labels[i] if i < len(self.labels) else None
        target = self.targets[i] if i < len(self.targets) else None
        return f"{label} ({target})" if label is not None else str(target)

    def _repr_png_(self) -> bytes:
        """Jupyter: the overlays (first 16 inputs) as PNG."""
        return viz.png_bytes(self._sheet(NOTEBOOK_INPUTS))

    def _repr_html_(self) -> str:
        """Jupyter: each input's overlay (and smoothed view where :meth:`speckled`), each with
        its colour bar, and a caption: method, explained class, seconds."""
        count, heat = self.attribution.shape[0], self.heatmap().numpy()
        figures = []
        for i in range(min(count, NOTEBOOK_INPUTS)):
            label = self.labels[i] if i < len(self.labels) else None
            views = ["signed", "smooth"] if self.speckled(i) else ["signed"]
            for view in views:
                picture = self.overlay(i, view=view)
                legend = viz.colour_bar_html(viz.view_map(heat[i], view), picture.width, label)
                caption = f"{self.method}: {self.explained(i)}, {self.seconds:.2f} s"
                if view != "signed":
                    caption = f"the same, smoothed (e.overlay({i}, view={view!r}))"
                figures.append(viz.html_figure([picture], caption, legend))
        more = f"<p>first {NOTEBOOK_INPUTS} of {count} inputs</p>"
        shown = f'<div style="display:flex;flex-wrap:wrap">{"".join(figures)}</div>'
        return shown + (more if count > NOTEBOOK_INPUTS else "")

    def summary(self) -> dict[str, Any]:
        """JSON-friendly metadata (no tensors)."""
        return {
            "method": self.method,
            "targets": self.targets,
            "labels": self.labels,
            "layer": self.layer,
            "params": jsonable(dict(self.params)),
            "resolved": jsonable(dict(self.resolved)),
            "seconds": self.seconds,
            "forwards": self.forwards,
            "extras": jsonable(dict(self.extras)),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save as a picture (``.png``/``.jpg``: overlays side by side) or a ``.pt`` record."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pt":
            save_torch(
                {
                    "attribution": self.attribution,
                    "inputs": self.inputs,
                    "summary": json.dumps(self.summary()),
                },
                path,
            )
        elif path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            save_picture(self._sheet(), path)
        else:
            raise RequestError(f"cannot save to {path.name}: use .png, .jpg or .pt")
        return path


SPECKLE = 0.1
NOTEBOOK_INPUTS = 16  # inputs a notebook shows of an Explanation


def sign_changes(heat: np.ndarray) -> float:
    """The fraction of neighbouring pixel pairs (4-neighbourhood) that both carry evidence
    (|value| > 5 % of :func:`convlens.viz.normalize`'s scale) and differ in sign; 0 for
    unsigned maps. The statistic behind :meth:`Explanation.speckled`."""
    scaled, signed = viz.normalize(heat)
    if not signed or scaled.ndim != 2:
        return 0.0
    strong = np.where(np.abs(scaled) > 0.05, np.sign(scaled), 0.0)
    changed = pairs = 0
    for a, b in ((strong[1:], strong[:-1]), (strong[:, 1:], strong[:, :-1])):
        both = (a != 0) & (b != 0)
        pairs += int(both.sum())
        changed += int((both & (a != b)).sum())
    return changed / pairs if pairs else 0.0


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return jsonable(torch.from_numpy(value))
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
