"""The record every feature visualisation returns, and the layer plumbing they share."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError
from convlens.engine import session
from convlens.files import save_picture
from convlens.hooks import capture
from convlens.model import Model, as_model

__all__ = ["Features", "gray_tiles", "layer_outputs", "resolve_layer"]


@dataclass(frozen=True)
class Features:
    """What a ``cl.features`` function found.

    Attributes:
        name: the function (``"filters"``, ``"class_model"``, ...).
        data: the tensors (see each function); ``data["image"]`` for the synthesised images
            ``class_model`` and ``deep_dream``, (1, 3, H, W) in the model's input space.
        image: a picture for people.
        info: JSON-friendly facts (layer, shapes, scores, ...).
    """

    name: str
    data: dict[str, Any]
    image: Image.Image
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        save_picture(self.image, path)

    def _repr_png_(self) -> bytes:
        """Jupyter: :attr:`image` as PNG."""
        return viz.png_bytes(self.image)

    def _repr_html_(self) -> str:
        """Jupyter: :attr:`image` with the function's name and layer as its caption."""
        layer = self.info.get("layer")
        caption = f"{self.name}, layer {layer}" if layer else self.name
        return viz.html_figure([self.image], caption)


def resolve_layer(
    model: Model, layer: str | nn.Module | None, x: Tensor | None = None, default: str = "map"
) -> str:
    """A layer name: the given one (checked); else the model's CAM layer, or the last spatial
    feature map its classifier reads, at the outermost module returning it (as the CAM family
    chooses, from a probe of ``x``; ``default="map"``), or its first Conv2d
    (``default="first"``)."""
    if layer is not None:
        module = model.layer(layer)
        return layer if isinstance(layer, str) else model.layer_name(module)
    if default == "first":
        convs = [n for n, m in model.module.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise RequestError("the model has no nn.Conv2d layer; give layer=...")
        return convs[0]
    if isinstance(model.cam_layer, str):
        return model.cam_layer
    if x is None:
        raise RequestError("give layer=...: without inputs the feature map cannot be found")
    with session(model, x[:1], progress=False) as engine:
        found = engine.feature_map()
    if found is None:
        raise RequestError("no layer of the model outputs a spatial feature map; give layer=...")
    return model.layer_name(found)


def layer_outputs(
    model: Model | nn.Module,
    x: Tensor,
    layer: str,
    batch_size: int | None = None,
    inputs: bool = False,
    progress: bool | None = None,
    select: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The output (or input) of ``layer`` for every image of ``x``, in batches, no gradients.

    ``select``, if given, reduces each chunk's tensor before it is kept (so that a whole
    collection's feature maps need not sit in memory)."""
    wrapped = as_model(model)
    module = wrapped.layer(layer)
    chunks = []
    with (
        session(wrapped, x, batch_size, 16, progress, f"layer {layer}") as engine,
        engine.task(len(x)),
        capture({0: module}, inputs=inputs) as seen,
    ):
        for start, stop in engine.chunks(len(x)):
            engine.forward(x[start:stop])
            out = seen[0].detach()
            chunks.append((select(out) if select else out).float().cpu())
    return torch.cat(chunks)


def gray_tiles(
    maps: Tensor, columns: int, cell: int, titles: list[str] | None = None
) -> Image.Image:
    """(N, h, w) maps as a grid of grayscale tiles, each scaled to its own range."""
    from convlens import viz

    tiles = []
    for m in maps:
        m = m.float()
        span = (m.max() - m.min()).clamp(min=1e-12)
        gray = ((m - m.min()) / span * 255).round().byte().numpy()
        tiles.append(
            Image.fromarray(np.asarray(gray)).convert("RGB").resize((cell, cell), Image.NEAREST)
        )
    return viz.grid(tiles, titles, columns=columns, cell=cell, padding=2)
