"""``index.html`` and ``results.json`` from a report document.

The page is one self-contained file (inline CSS, SVG and script, no fonts or scripts from the
network) rendered by a Jinja2 template with autoescaping on, so file names and labels are
always escaped; the helpers here hand the template numbers and plain text, never markup. Both
files are written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from convlens import viz
from convlens.files import write_atomic

__all__ = ["render", "write"]

# the deletion/insertion plot of a card, in SVG user units (Petsiuk et al. 2018, Fig. 3)
CURVE_BOX = {"width": 200, "height": 84, "left": 22, "right": 6, "top": 6, "bottom": 20}
# the spread plot of a ranking row: per-image values, the mean and its interval
SPREAD_BOX = {"width": 120, "height": 18, "pad": 5}


@lru_cache(maxsize=1)
def environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("convlens.report", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def plural(count: float, word: str, many: str | None = None) -> str:
    """``1 pass``, ``2 passes``, ``0 images``: the count (rounded) and the word it takes."""
    n = round(count)
    return f"{n} {word if n == 1 else (many or word + 's')}"


def passes(count: float) -> str:
    return plural(count, "pass", "passes")


def _target(value: Any) -> str:
    """A recorded target as the command line writes it: ``predicted``, ``285``, ``top:3``,
    ``contrast:285,281``, ``channel:LAYER:C``, ``neuron:LAYER:C:Y:X``."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, parts),) = value.items()
        joined = ",".join if kind == "contrast" else ":".join
        return f"{kind}:{joined(str(part) for part in parts)}"
    return str(value)


def explained(record: dict[str, Any]) -> str:
    """What a map explains, in words: the class label (or index), or the target it was given
    (a contrast, a channel, a neuron)."""
    target = record.get("target")
    if isinstance(target, int):
        label = record.get("label")
        return str(label) if label is not None else f"class {target}"
    return _target(target)


def legend(view: dict[str, Any], record: dict[str, Any]) -> dict[str, str]:
    """A view's colour bar: its CSS gradient (:func:`convlens.viz.colour_bar_css`), the values
    its ends stand for (:func:`convlens.viz.map_range`) and what red and blue mean."""
    about = explained(record)
    if view["view"] == "abs":
        meaning = f"red: larger |map|, evidence for or against {about}"
    elif view["signed"]:
        meaning = f"red: for {about}, blue: against"
    else:
        meaning = f"red: more evidence for {about}"
    if view["view"] == "smooth":
        meaning += " (smoothed)"
    low, high = float(view["low"]), float(view["high"])
    return {
        "css": viz.colour_bar_css(bool(view["signed"])),
        "low": f"{low:+.3g}" if view["signed"] else f"{low:.3g}",
        "high": f"{high:+.3g}" if view["signed"] else f"{high:.3g}",
        "meaning": meaning,
        "name": {"signed": "map", "abs": "|map|", "smooth": "smoothed"}[view["view"]],
    }


def curve_points(fractions: Sequence[float], values: Sequence[float]) -> str:
    """SVG polyline points of one curve (x: fraction of pixels, y: probability 0 to 1) in
    :data:`CURVE_BOX`."""
    box = CURVE_BOX
    width = box["width"] - box["left"] - box["right"]
    height = box["height"] - box["top"] - box["bottom"]
    points = []
    for f, v in zip(fractions, values, strict=True):
        y = min(max(float(v), 0.0), 1.0) if math.isfinite(float(v)) else 0.0
        points.append(f"{box['left'] + width * float(f):.1f},{box['top'] + height * (1 - y):.1f}")
    return " ".join(points)


def spread_scale(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """The common faithfulness range of the ranking's spread plots: every per-image value and
    interval end, widened a little (and to a width of at least 0.1)."""
    values = [p["faithfulness"] for row in rows for p in row.get("per_image", [])]
    values += [v for row in rows for v in (row.get("interval") or [])]
    if not values:
        return -1.0, 1.0
    low, high = min(values), max(values)
    middle, half = (low + high) / 2, max((high - low) / 2 * 1.08, 0.05)
    return middle - half, middle + half


def spread_x(value: float, scale: tuple[float, float]) -> float:
    """Where ``value`` lies in a spread plot of :data:`SPREAD_BOX`."""
    box, (low, high) = SPREAD_BOX, scale
    return round(box["pad"] + (box["width"] - 2 * box["pad"]) * (value - low) / (high - low), 1)


def render(document: dict[str, Any]) -> str:
    """The report page for ``document`` (as built by ``report.explain_images``)."""
    template = environment().get_template("report.html")
    return template.render(
        doc=document,
        num=number,
        target=_target,
        passes=passes,
        plural=plural,
        explained=explained,
        legend=legend,
        curve_points=curve_points,
        curve_box=CURVE_BOX,
        spread_box=SPREAD_BOX,
        spread_scale=spread_scale(document.get("ranking", [])),
        spread_x=spread_x,
    )


def write(out: str | Path, document: dict[str, Any]) -> Path:
    """Write ``out/results.json`` and ``out/index.html``; returns the page's path."""
    out = Path(out)
    write_atomic(out / "results.json", json.dumps(document, indent=2).encode())
    return write_atomic(out / "index.html", render(document).encode())
