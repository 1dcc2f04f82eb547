"""Pictures: colour maps, heat-map overlays, labelled grids and curve plots.

One colour language everywhere (report, saved PNGs, :meth:`Explanation.overlay`): a signed map
is drawn on :data:`SIGNED_CMAP`, red for evidence for the explained class, blue against, near
white at zero; an unsigned map on :data:`UNSIGNED_CMAP`, the red half of the same map, so it
reads like the positive half of a signed one (``cam`` and ``gradcam`` look alike). Superpixel
pictures use the same red and blue.

Figures are drawn with matplotlib's object API (:class:`~matplotlib.figure.Figure` on an Agg
canvas), never through ``pyplot``: importing or using this module leaves the process's
matplotlib backend (a notebook's, say) as it was.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from PIL import Image, ImageDraw, ImageFont

from convlens.checks import RequestError

__all__ = [
    "NEGATIVE",
    "POSITIVE",
    "SIGNED_CMAP",
    "UNSIGNED_CMAP",
    "VIEWS",
    "colorize",
    "colour_bar_css",
    "colour_bar_html",
    "confusion_plot",
    "curve_plot",
    "figure_image",
    "grid",
    "html_figure",
    "map_range",
    "new_figure",
    "normalize",
    "overlay",
    "png_bytes",
    "raw_picture",
    "superpixel_picture",
    "view_map",
]

View = Literal["signed", "abs", "smooth"]
VIEWS: tuple[str, ...] = ("signed", "abs", "smooth")

# ColorBrewer's red-blue map (Brewer 2003), reversed so that red is positive; its centre is a
# near-white grey and its lightness falls evenly towards both ends.
SIGNED_CMAP: str = "RdBu_r"
# The upper half of SIGNED_CMAP as a sequential map of its own: unsigned value u is drawn in
# the colour a signed map has at +u.
UNSIGNED_CMAP: str = "convlens_reds"
if UNSIGNED_CMAP not in colormaps:
    colormaps.register(
        ListedColormap(colormaps[SIGNED_CMAP](np.linspace(0.5, 1.0, 256)), name=UNSIGNED_CMAP)
    )


def _rgb(cmap: str, value: float) -> tuple[int, int, int]:
    r, g, b, _ = colormaps[cmap](value)
    return round(r * 255), round(g * 255), round(b * 255)


# Outline colours of superpixel pictures: the signed map's red and blue at 80 % strength.
POSITIVE = _rgb(SIGNED_CMAP, 0.9)
NEGATIVE = _rgb(SIGNED_CMAP, 0.1)


def _display_scale(heat: np.ndarray, percentile: float) -> tuple[np.ndarray, float, float, bool]:
    """The map moved to its display origin, the origin, the clipping scale, and signedness."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    if not heat.size:
        return heat, 0.0, 0.0, False
    signed = bool(heat.min() < 0 < heat.max()) and abs(heat.min()) > 1e-3 * abs(heat.max())
    origin = 0.0
    if not signed:
        origin = float(heat.min() if heat.max() > 0 else heat.max())
        heat = heat - origin
    scale = float(np.percentile(np.abs(heat), percentile))
    if scale <= 0:
        scale = float(np.abs(heat).max())
    return heat, origin, scale, signed


def normalize(heat: np.ndarray, percentile: float = 99.5) -> tuple[np.ndarray, bool]:
    """Scale a heat map for display: to [-1, 1] around zero when it has signed values, else to
    [0, 1] from its minimum up.

    The top ``100 - percentile`` percent are clipped, as Smilkov et al. (2017) do for gradient
    maps whose range a few pixels would otherwise swallow. An unsigned map starts at its
    minimum, as the CAM and RISE papers draw them: RISE's map is the mean score of the masks
    that keep a pixel, all of it well above zero, and scaled from zero it would be one colour.
    """
    moved, _, scale, signed = _display_scale(heat, percentile)
    if scale <= 0:
        return np.zeros_like(moved), signed
    scaled = moved / scale
    return (np.clip(scaled, -1, 1) if signed else np.clip(np.abs(scaled), 0, 1)), signed


def map_range(heat: np.ndarray, percentile: float = 99.5) -> tuple[float, float, bool]:
    """The map values the left and right ends of the colour bar stand for, and whether the map
    is drawn as signed.

    Signed: ``(-s, s)`` with ``s`` the clipping scale of :func:`normalize`. Unsigned: from the
    map's minimum (left, neutral) to ``minimum + s`` (right, red); a map that is all zero or
    below runs from its maximum down, so the right end is then the lower value. Values beyond
    an end are drawn in that end's colour.
    """
    _, origin, scale, signed = _display_scale(heat, percentile)
    if signed:
        return -scale, scale, True
    step = scale if np.size(heat) and np.max(heat) > 0 else -scale
    return origin, origin + step, False


def colour_bar_css(signed: bool, stops: int = 17) -> str:
    """The colour map as drawn, for a CSS colour bar: ``linear-gradient(to right, ...)`` from
    the left end (blue, or neutral for unsigned maps) to the right end (red)."""
    cmap = SIGNED_CMAP if signed else UNSIGNED_CMAP
    parts = []
    for k in range(max(stops, 2)):
        position = k / (max(stops, 2) - 1)
        r, g, b = _rgb(cmap, position)
        parts.append(f"rgb({r}, {g}, {b}) {100 * position:g}%")
    return f"linear-gradient(to right, {', '.join(parts)})"


def colorize(heat: np.ndarray, cmap: str | None = None) -> np.ndarray:
    """A heat map (H, W) as RGB uint8 (H, W, 3): :data:`SIGNED_CMAP` centred at zero for signed
    maps, :data:`UNSIGNED_CMAP` for unsigned ones."""
    scaled, signed = normalize(heat)
    name = cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP)
    values = (scaled + 1) / 2 if signed else scaled
    rgba = colormaps[name](values)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def view_map(heat: np.ndarray, view: View = "signed") -> np.ndarray:
    """The map a view draws: ``"signed"`` the map itself, ``"abs"`` its magnitude (drawn on the
    sequential map), ``"smooth"`` a Gaussian blur with sigma = image side / 50, which turns
    pixel-level speckle (integrated gradients, DeepLIFT, input x gradient) into regions, as
    SmoothGrad (Smilkov et al. 2017) does by averaging over noise; its sign is kept."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    if view == "signed":
        return heat
    if view == "abs":
        return np.abs(heat)
    if view == "smooth":
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(heat, sigma=max(heat.shape[-2:], default=0) / 50, mode="nearest")
    raise RequestError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}")


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    alpha: float = 0.8,
    cmap: str | None = None,
    view: View = "signed",
) -> Image.Image:
    """Lay a coloured heat map over an RGB picture (H, W, 3) uint8 of the same size.

    The photo shows through as grey light and shade multiplied into the colours, with
    ``1 - alpha`` of the plain grey photo added. The colour is a continuous function of the
    map's value, so zero is drawn as the neutral colour of the colour bar: a map crossing zero
    leaves no dark outline where it does (blending a colour in with a weight that vanishes at
    zero, over a dimmed photo, draws one).
    """
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] != np.shape(heat):
        raise RequestError(f"heat map {np.shape(heat)} and image {image.shape[:2]} differ in size")
    colors = colorize(view_map(heat, view), cmap).astype(np.float64)
    rgb = image[..., :3].astype(np.float64) if image.ndim == 3 else image[..., None] * 1.0
    grey = (rgb @ np.array([0.299, 0.587, 0.114]) if rgb.shape[-1] == 3 else rgb[..., 0]) / 255
    shade = (0.4 + 0.6 * grey)[..., None]  # the photo's light and shade, never black
    blended = alpha * colors * shade + (1 - alpha) * 255 * grey[..., None]
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def raw_picture(attribution: np.ndarray | torch.Tensor, percentile: float = 99.5) -> Image.Image:
    """A (3, H, W) input attribution as an RGB picture, as the gradient-family papers show
    theirs: Zeiler & Fergus (2014, Fig. 2, deconvnet projections to pixel space), Springenberg
    et al. (2015, guided backpropagation) and the signed gradient pictures after Simonyan et al.
    (2014), whose saliency map itself is the channel maximum of |g|.

    Normalisation chosen: one scale ``s`` for all channels and pixels, ``0.5 + 0.5 * a / s`` in
    every channel, so zero is mid grey, a magnitude of ``s`` reaches 0 or 1, and the channels
    keep their relative sizes (the hue tells the colour channel). ``s`` is the ``percentile`` of
    |a| (99.5, clipping above it, as :func:`normalize` does for heat maps, after Smilkov et al.
    2017); ``percentile=100`` divides by max |a| and clips nothing. With the plain maximum, a
    handful of pixels set the scale and the rest of a gradient picture is flat grey.
    """
    values = np.nan_to_num(np.asarray(attribution, dtype=np.float64))
    if values.ndim != 3 or values.shape[0] != 3:
        raise RequestError(f"a raw picture needs a (3, H, W) attribution, not {values.shape}")
    magnitude = np.abs(values)
    scale = float(np.percentile(magnitude, percentile)) if values.size else 0.0
    if scale <= 0:
        scale = float(magnitude.max(initial=0.0))
    scaled = np.clip(0.5 + 0.5 * values / scale, 0, 1) if scale > 0 else np.full_like(values, 0.5)
    return Image.fromarray((scaled.transpose(1, 2, 0) * 255).round().astype(np.uint8))


def png_bytes(picture: Image.Image) -> bytes:
    """A PIL picture encoded as PNG (for notebooks' ``_repr_png_``)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def colour_bar_html(heat: np.ndarray, width: int = 224, label: str | None = None) -> str:
    """A small HTML colour bar for ``heat``: the gradient of :func:`colour_bar_css` and what its
    ends stand for (:func:`map_range`); ``label`` is the explained class (plain text)."""
    low, high, signed = map_range(heat)
    about = f" {label}" if label else " the class"
    if signed:
        left, right = f"{low:.3g} against{about}", f"{high:+.3g} for{about}"
    else:
        left, right = f"{low:.3g} (map minimum)", f"{high:.3g} (high)"
    bar = f'<div style="width:{int(width)}px;height:8px;background:{colour_bar_css(signed)}"></div>'
    ends = (
        f'<div style="width:{int(width)}px;display:flex;justify-content:space-between;'
        f'font-size:10px"><span>{html.escape(left)}</span><span>{html.escape(right)}</span></div>'
    )
    return bar + ends


def html_figure(pictures: Sequence[Image.Image], caption: str = "", legend: str = "") -> str:
    """An HTML ``<figure>`` with ``pictures`` inlined as PNG, the (escaped) plain-text
    ``caption`` and ``legend``, HTML made here (e.g. :func:`colour_bar_html`), under them."""
    images = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(png_bytes(p)).decode()}" '
        f'width="{p.width}" height="{p.height}" style="margin-right:4px">'
        for p in pictures
    )
    text = (
        f'<figcaption style="font-size:12px">{html.escape(caption)}</figcaption>' if caption else ""
    )
    width = max(sum(p.width + 4 for p in pictures), 240)  # captions wrap at the pictures
    return f'<figure style="margin:4px;max-width:{width}px">{images}{legend}{text}</figure>'


def superpixel_picture(
    image: np.ndarray,
    segments: np.ndarray | torch.Tensor,
    positive: Sequence[int],
    negative: Sequence[int] = (),
    dim: float = 0.3,
) -> Image.Image:
    """The picture with only the chosen superpixels shown, as in Ribeiro et al. (2016), Fig. 4,
    in the colours of the heat maps.

    ``positive`` superpixels (evidence for the class) keep their pixels and get a red outline
    (:data:`POSITIVE`); ``negative`` ones (evidence against) a blue tint and outline
    (:data:`NEGATIVE`); the rest is dimmed to ``dim`` of its brightness. ``segments`` is the
    (H, W) superpixel label map.
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
