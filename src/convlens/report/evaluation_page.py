"""The pages of an evaluation of your own images (``report.evaluation``): ``evaluation.md``,
``index.html`` and the pictures with the ground-truth boxes drawn on the maps.

They say which protocol scored the boxes: per class (Zhang et al. 2016, "Top-down Neural
Attention by Excitation Backprop", ECCV: each labelled class's map against that class's boxes,
averaged over (image, class) pairs) or class-agnostic (the predicted class's map against all
of the image's boxes, one score per image), and over how many images and pairs each box score
is averaged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from convlens.files import printable, write_atomic
from convlens.report.page import environment, number

__all__ = [
    "BOX_COLUMNS",
    "CLASS_AGNOSTIC",
    "CURVE_COLUMNS",
    "PER_CLASS",
    "draw_boxes",
    "evaluation_markdown",
    "summary_columns",
    "write_pages",
]

PER_CLASS = "per_class"  # Zhang et al. 2016: each labelled class's map against its own boxes
CLASS_AGNOSTIC = "class_agnostic"  # the predicted class's map against all of the boxes

TRUTH_COLOR = (255, 255, 255)  # ground-truth boxes: white on a black edge
MAP_COLOR = (255, 0, 255)  # the map's own box: magenta
DISPLAY = 224  # pictures are enlarged (nearest neighbour) to at least this side

# summary columns: key -> heading (None values show as "n/a")
BOX_COLUMNS = {
    "pointing": "pointing game",
    "energy": "energy in boxes",
    "iou": "box IoU",
    "hit_rate": "hit rate (IoU ≥ 0.5)",
    "top1_error": "top-1 loc. error",
    "top5_error": "top-5 loc. error",
}
CURVE_COLUMNS = {
    "deletion": "deletion AUC (lower better)",
    "insertion": "insertion AUC (higher better)",
    "seconds": "seconds per image",
}

PROTOCOL_TEXT = {
    PER_CLASS: (
        "Box scores per class, as Zhang et al. 2016: the map of each labelled class of an image "
        "is scored against that class's boxes (a map of another class's object is no hit; a "
        "misclassified image is scored on its true class's map), averaged over (image, class) "
        "pairs."
    ),
    CLASS_AGNOSTIC: (
        "Box scores are class-agnostic: the predicted class's map is scored against all of the "
        "image's boxes, whatever their labels, one score per image (Zhang et al. 2016's "
        "per-class protocol needs every box labelled with one of the model's labels)."
    ),
}


def summary_columns(document: dict[str, Any]) -> dict[str, str]:
    """The summary table's columns after ``method``, key -> heading: the image counts (with
    boxes: the images with boxes left after the crop, which the box scores are averaged over,
    and per class the (image, class) pairs), the box scores, the curves."""
    boxes = document["boxes"]
    if boxes is None:
        return {"images": "images", **CURVE_COLUMNS}
    counts = {"images": "images", "images_with_boxes": "images with boxes"}
    if boxes["protocol"] == PER_CLASS:
        counts["scored"] = "(image, class) pairs"
    return {**counts, **BOX_COLUMNS, **CURVE_COLUMNS}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown_text(text: Any) -> str:
    """User text (file names, labels) safe inside a Markdown table cell: one line, no pipes,
    no HTML."""
    text = printable(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("[", "\\[").replace("]", "\\]")


def boxes_line(boxes: dict[str, Any]) -> str:
    """The header's line on the boxes: how many are left after the crop, on how many images
    (those the box scores are averaged over), what was dropped or missing."""
    dropped = len(boxes["dropped"])
    cut = len(boxes["images_all_cropped"])
    unused = boxes["unused"]
    lost = ""
    if dropped:
        lost = f" ({dropped} cropped away or outside" + (
            f"; every box of {cut} image(s)" if cut else ""
        ) + ")"  # fmt: skip
    return (
        f"{boxes['boxes_left']} box(es) on {boxes['images_with_boxes']} image(s) after the "
        f"crop{lost}; {len(boxes['without_boxes'])} image(s) without boxes"
        + (f", {unused} image(s) of the box file not given" if unused else "")
    )


def evaluation_markdown(document: dict[str, Any]) -> str:
    """``evaluation.md``: a header (model, images, boxes, protocol) and one table row per
    method."""
    boxes = document["boxes"]
    lines = [
        "# convlens evaluation",
        "",
        f"Model **{_markdown_text(document['model'])}** (input "
        f"{document['input_size'][0]}x{document['input_size'][1]}, crop {document['crop']:g}), "
        f"{len(document['images'])} image(s)"
        + (f", {len(document['skipped'])} skipped" if document["skipped"] else "")
        + f"; deletion and insertion curves ({document['curve_steps']} steps) and seconds on the "
        "maps of the predicted class.",
        "",
    ]
    if boxes is None:
        lines.append("Boxes: none given, so only the deletion and insertion curves are scored.")
    else:
        lines.append(
            f"Boxes: {boxes_line(boxes)}; pointing-game tolerance "
            f"{boxes['pointing_tolerance']:.1f} px."
        )
        lines.append(PROTOCOL_TEXT[boxes["protocol"]])
        located = boxes["localization_error"]
        if located["computed"]:
            lines.append(
                f"Localisation error over the {located['k']} most probable classes "
                "(Zhou et al. 2016; IoU ≥ 0.5)."
            )
        else:
            lines.append(f"No localisation error: {_markdown_text(located['reason'])}.")
    heading = {"method": "method", **summary_columns(document)}
    lines += ["", "| " + " | ".join(heading.values()) + " |", "|" + "---|" * len(heading)]
    for row in document["summary"]:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in heading) + " |")
    notes = [f"- skipped {_markdown_text(s['image'])}: {_markdown_text(s['reason'])}"
             for s in document["skipped"]]  # fmt: skip
    notes += [
        f"- {_markdown_text(r['method'])} refused {_markdown_text(r['image'])}: "
        f"{_markdown_text(r['reason'])}"
        for r in document["refused"]
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def draw_boxes(
    picture: Image.Image, truth: torch.Tensor | None, own: Sequence[float] | None = None
) -> Image.Image:
    """``picture`` enlarged (nearest neighbour, to at least 224 pixels a side) with the
    ground-truth boxes ``truth`` (N, 4) in white on a black edge and the map's own box ``own``
    in magenta; boxes in the picture's pixels, right and bottom exclusive."""
    factor = max(1, math.ceil(DISPLAY / min(picture.size)))
    shown = picture.convert("RGB").resize(
        (picture.width * factor, picture.height * factor), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(shown)

    def rectangle(box: Sequence[float], color: tuple[int, int, int], width: int, grow: int) -> None:
        x0, y0, x1, y1 = (float(v) * factor for v in box)
        corners = [x0 - grow, y0 - grow, max(x0, x1 - 1) + grow, max(y0, y1 - 1) + grow]
        draw.rectangle(corners, outline=color, width=width)

    for box in [] if truth is None else truth.tolist():
        rectangle(box, (0, 0, 0), 4, 1)  # a black edge around the white line
        rectangle(box, TRUTH_COLOR, 2, 0)
    if own is not None:
        rectangle(own, MAP_COLOR, 2, 0)
    return shown


def write_pages(out: Path, document: dict[str, Any]) -> None:
    """``evaluation.json``, ``evaluation.md`` and ``index.html``, each atomically."""
    write_atomic(out / "evaluation.json", json.dumps(document, indent=2).encode())
    write_atomic(out / "evaluation.md", evaluation_markdown(document).encode())
    template = environment().get_template("evaluation.html")
    page = template.render(
        doc=document,
        num=number,
        columns=summary_columns(document),
        boxes_line=boxes_line,
        protocol=PROTOCOL_TEXT,
        per_class=PER_CLASS,
    )
    write_atomic(out / "index.html", page.encode())
