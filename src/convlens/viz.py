"""Pictures: colour maps, heat-map overlays, labelled grids and curve plots.

Figures are drawn with matplotlib's object API (:class:`~matplotlib.figure.Figure` on an Agg
canvas), never through ``pyplot``: importing or using this module leaves the process's
matplotlib backend (a notebook's, say) as it was.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from convlens.checks import RequestError

__all__ = [
    "colorize",
    "confusion_plot",
    "curve_plot",
    "figure_image",
    "grid",
    "new_figure",
    "normalize",
    "overlay",
    "superpixel_picture",
]


def normalize(heat: np.ndarray, percentile: float = 99.5) -> tuple[np.ndarray, bool]:
    """Scale a heat map for display: to [-1, 1] around zero when it has signed values, else to
    [0, 1] from its minimum up.

    The top ``100 - percentile`` percent are clipped, as Smilkov et al. (2017) do for gradient
    maps whose range a few pixels would otherwise swallow. An unsigned map starts at its
    minimum, as the CAM and RISE papers draw them: RISE's map is the mean score of the masks
    that keep a pixel, all of it well above zero, and scaled from zero it would be one colour.
    """
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    signed = bool(heat.min() < 0 < heat.max()) and abs(heat.min()) > 1e-3 * abs(heat.max())
    if not signed and heat.size:
        heat = heat - heat.min() if heat.max() > 0 else heat - heat.max()
    scale = np.percentile(np.abs(heat), percentile) if heat.size else 0.0
    if scale <= 0:
        scale = np.abs(heat).max()
    if scale <= 0:
        return np.zeros_like(heat), signed
    scaled = heat / scale
    return (np.clip(scaled, -1, 1) if signed else np.clip(np.abs(scaled), 0, 1)), signed


def colorize(heat: np.ndarray, cmap: str | None = None) -> np.ndarray:
    """A heat map (H, W) as RGB uint8 (H, W, 3); diverging colours for signed maps."""
    scaled, signed = normalize(heat)
    name = cmap or ("bwr" if signed else "jet")
    values = (scaled + 1) / 2 if signed else scaled
    rgba = colormaps[name](values)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.8, cmap: str | None = None
) -> Image.Image:
    """Blend a coloured heat map over an RGB picture (H, W, 3) uint8 of the same size."""
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] != np.shape(heat):
        raise RequestError(f"heat map {np.shape(heat)} and image {image.shape[:2]} differ in size")
    scaled, _ = normalize(heat)
    colors = colorize(heat, cmap).astype(np.float64)
    # Zero evidence leaves the photo as it is (dimmed a little); strong evidence is drawn
    # nearly opaque, so sparse pixel-level maps stay readable.
    weight = alpha * np.sqrt(np.abs(scaled))[..., None]
    blended = 0.75 * image.astype(np.float64) * (1 - weight) + colors * weight
    return Image.fromarray(blended.round().astype(np.uint8))


POSITIVE = (0, 200, 0)
NEGATIVE = (220, 0, 0)


def superpixel_picture(
    image: np.ndarray,
    segments: np.ndarray | torch.Tensor,
    positive: Sequence[int],
    negative: Sequence[int] = (),
    dim: float = 0.3,
) -> Image.Image:
    """The picture with only the chosen superpixels shown, as in Ribeiro et al. (2016), Fig. 4.

    ``positive`` superpixels (evidence for the class) keep their pixels and get a green
    outline; ``negative`` ones (evidence against) a red tint and outline; the rest is dimmed to
    ``dim`` of its brightness. ``segments`` is the (H, W) superpixel label map.
    """
    from skimage.segmentation import find_boundaries

    image = np.asarray(image, dtype=np.float64)
    labels = np.asarray(segments)
    if image.shape[:2] != labels.shape:
        raise RequestError(f"segments {labels.shape} and image {image.shape[:2]} differ in size")
    out = image * dim
    for chosen, color, tint in ((positive, POSITIVE, 0.0), (negative, NEGATIVE, 0.35)):
        region = np.isin(labels, list(chosen))
        if not region.any():
            continue
        out[region] = (1 - tint) * image[region] + tint * np.array(color)
        # 0 is the background for find_boundaries; the frame outlines regions at the border
        padded = np.pad(np.where(region, labels + 1, 0), 1)
        edge = find_boundaries(padded, mode="inner")[1:-1, 1:-1] & region
        out[edge] = color
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def grid(
    images: Sequence[Image.Image],
    titles: Sequence[str] | None = None,
    columns: int = 4,
    cell: int = 224,
    padding: int = 4,
) -> Image.Image:
    """Lay out pictures in a grid with a title line above each."""
    if not images:
        raise RequestError("no images to lay out")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    title_height = 14 if titles else 0
    width = columns * (cell + padding) + padding
    height = rows * (cell + title_height + padding) + padding
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for k, picture in enumerate(images):
        row, col = divmod(k, columns)
        x = padding + col * (cell + padding)
        y = padding + row * (cell + title_height + padding)
        if titles:
            draw.text((x, y), str(titles[k])[: cell // 6], fill="black", font=font)
        thumb = picture.convert("RGB").copy()
        thumb.thumbnail((cell, cell))
        sheet.paste(thumb, (x, y + title_height))
    return sheet


def new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure with one axes on its own Agg canvas, without ``pyplot``: nothing
    global (backend, current figure) is touched, and the figure is freed with its last
    reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def figure_image(figure: Any) -> Image.Image:
    """A matplotlib figure (from :func:`new_figure`) as a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def curve_plot(
    x: Sequence[float] | torch.Tensor | np.ndarray,
    series: dict[str, Sequence[float] | torch.Tensor | np.ndarray],
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Image.Image:
    """Line plot of named series over ``x``, as a PIL image."""
    figure, axes = new_figure((4.5, 3.2))
    for name, values in series.items():
        axes.plot(np.asarray(x, dtype=float), np.asarray(values, dtype=float), label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    if 1 < len(series) <= 10:
        axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure_image(figure)


def confusion_plot(
    matrix: torch.Tensor | np.ndarray, classes: Sequence[str], title: str = ""
) -> Image.Image:
    """A confusion matrix (rows: true class, columns: predicted) with counts in the cells and
    each class's accuracy (recall) beside its name, as a PIL image."""
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(1)
    accuracy = np.divide(np.diag(counts), totals, out=np.zeros(len(counts)), where=totals > 0)
    side = 1.6 + 0.55 * len(classes)
    figure, axes = new_figure((side + 1.6, side))
    axes.imshow(counts / np.maximum(totals[:, None], 1), cmap="Blues", vmin=0, vmax=1)
    for (row, col), value in np.ndenumerate(counts):
        shade = "white" if value > 0.6 * max(totals[row], 1) else "black"
        axes.text(col, row, str(value), ha="center", va="center", color=shade, fontsize=9)
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, [str(c) for c in classes], rotation=45, ha="right", fontsize=8)
    rows = [f"{c} ({a:.0%}, n={n})" for c, a, n in zip(classes, accuracy, totals, strict=True)]
    axes.set_yticks(ticks, rows, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true class (accuracy)")
    axes.set_title(title, fontsize=10)
    return figure_image(figure)
