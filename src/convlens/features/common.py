"""The record every feature visualisation returns, and the machinery they share: layer plumbing,
the parametrised images that optimisations move (class models, inversions) and their progress
bar."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from convlens import viz
from convlens.checks import RequestError
from convlens.engine import session
from convlens.files import save_picture
from convlens.hooks import capture
from convlens.model import Model, as_model

__all__ = [
    "Features",
    "gray_tiles",
    "layer_outputs",
    "make_image",
    "normaliser",
    "progress_bar",
    "resolve_layer",
]


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
    read: tuple[int, Callable[[int, int], Tensor]] | None = None,
) -> Tensor:
    """The output (or input) of ``layer`` for every image of ``x``, in batches, no gradients.

    ``select``, if given, reduces each chunk's tensor before it is kept (so that a whole
    collection's feature maps need not sit in memory). ``read=(n, reader)``: the images are
    not in memory but ``reader(start, stop)`` gives images ``start:stop`` of ``n``, one batch
    at a time (``x`` is then one of them, to probe the model with)."""
    wrapped = as_model(model)
    module = wrapped.layer(layer)
    n, reader = read if read is not None else (len(x), lambda start, stop: x[start:stop])
    kept: Tensor | None = None
    with (
        session(wrapped, x, batch_size, 16, progress, f"layer {layer}") as engine,
        engine.task(n),
        capture({0: module}, inputs=inputs) as seen,
    ):
        for start, stop in engine.chunks(n):
            engine.forward(reader(start, stop))
            out = seen[0].detach()
            out = (select(out) if select else out).float().cpu()
            if kept is None:  # filled in place: no second copy of all the outputs
                kept = torch.empty(n, *out.shape[1:], dtype=torch.float32)
            kept[start:stop] = out
    assert kept is not None
    return kept


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


# Square root of the colour correlation of natural images (Olah et al. 2017), rows R, G, B.
COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION = COLOR_CORRELATION / COLOR_CORRELATION.norm(dim=0).max()


def normaliser(model: Model) -> tuple[Tensor, Tensor]:
    """The model's input ``mean`` and ``std`` as (1, C, 1, 1) tensors (0 and 1 if unknown): to
    map model inputs back to RGB and bound them (the forward way is :meth:`Model.normalise`)."""
    mean = torch.tensor(model.mean or (0.0,) * model.channels).view(1, -1, 1, 1)
    std = torch.tensor(model.std or (1.0,) * model.channels).view(1, -1, 1, 1)
    return mean, std


class FourierImage(nn.Module):
    """An RGB image in [0, 1] from a spectrum scaled by 1/frequency and decorrelated colours
    (Olah et al. 2017, "Feature Visualization", section "Preconditioning and parametrisation")."""

    def __init__(self, height: int, width: int, generator: torch.Generator, std: float = 0.01):
        super().__init__()
        fy = torch.fft.fftfreq(height)[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        frequency = torch.sqrt(fx**2 + fy**2)
        self.register_buffer("scale", 1.0 / frequency.clamp(min=1.0 / max(height, width)))
        shape = (1, 3, height, width // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.randn(shape, generator=generator) * std)
        self.size = (height, width)

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        linear = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        colours = torch.einsum("ij,bjhw->bihw", COLOR_CORRELATION, linear)
        return torch.sigmoid(colours / 4)  # the /4 of Olah et al.'s reference code


class PixelImage(nn.Module):
    """An RGB image in [0, 1] as a sigmoid of free pixels (blank: 0.5 grey; or noise)."""

    def __init__(self, height: int, width: int, generator: torch.Generator, std: float = 0.0):
        super().__init__()
        self.pixels = nn.Parameter(torch.randn(1, 3, height, width, generator=generator) * std)

    def forward(self) -> Tensor:
        return torch.sigmoid(self.pixels)


class InputImage(nn.Module):
    """Free pixels of the model's input (normalised) space, unbounded, as Simonyan et al. 2014
    optimise them: zero (the mean image) or noise at the start; returned as RGB (x * std + mean)
    so that every parametrisation feeds the same loop."""

    def __init__(
        self, height: int, width: int, model: Model, generator: torch.Generator, std: float = 0.0
    ):
        super().__init__()
        self.mean, self.std = normaliser(model)
        self.pixels = nn.Parameter(torch.randn(1, 3, height, width, generator=generator) * std)

    def forward(self) -> Tensor:
        return self.pixels * self.std + self.mean


PARAMETRIZATIONS = ("fourier", "pixel", "input")


def make_image(
    parametrization: str,
    size: tuple[int, int],
    model: Model,
    generator: torch.Generator,
    init: str = "noise",
) -> nn.Module:
    """The image being optimised, as a module returning RGB (1, 3, H, W): ``"fourier"``
    (decorrelated spectrum, Olah et al. 2017), ``"pixel"`` (sigmoid of free pixels, in [0, 1])
    or ``"input"`` (free pixels of the normalised input). ``init``: ``"noise"`` or ``"blank"``
    (grey for ``"pixel"``, the mean image for ``"input"``); the spectrum always starts as
    faint noise."""
    height, width = size
    if parametrization not in PARAMETRIZATIONS:
        raise RequestError(
            f"parametrization must be one of {', '.join(map(repr, PARAMETRIZATIONS))}, "
            f"not {parametrization!r}"
        )
    if init not in ("noise", "blank"):
        raise RequestError(f"init must be 'noise' or 'blank', not {init!r}")
    if parametrization == "fourier":
        return FourierImage(height, width, generator)
    noise = 0.5 if init == "noise" else 0.0
    if parametrization == "pixel":
        return PixelImage(height, width, generator, std=noise)
    return InputImage(height, width, model, generator, std=noise)


def progress_bar(total: int, description: str, progress: bool | None) -> tqdm:
    """A task's progress bar (an optimisation's steps, TCAV's CAVs): always with
    ``progress=True``, never with ``False``, after a second otherwise."""
    return tqdm(
        total=total,
        desc=description,
        delay=0 if progress else 1.0,
        disable=progress is False,
        leave=False,
    )
