"""Evaluate methods on your own images, with or without ground-truth boxes.

Per method, over the images: the pointing game (Zhang et al. 2016), the energy in the boxes
(Wang et al. 2020), the IoU of the map's box with the ground truth and the hit rate at IoU >= 0.5
(Zhou et al. 2016; Selvaraju et al. 2017, each method at its paper's threshold), the ILSVRC top-1
and top-5 localisation error (Zhou et al. 2016), deletion and insertion AUC (Petsiuk et al.
2018) and seconds per image. Without boxes only the curves and the time are reported.

The maps explain the predicted class. Boxes are read by ``convlens.boxes.read_boxes`` and mapped
through the model's preprocessing; boxes cropped away are listed. The request is checked before
any forward pass (:func:`check_evaluation`). The output folder (``evaluation.json``,
``evaluation.md``, ``index.html`` and the pictures) is written as one unit, as the report of
``convlens explain`` is: into a fresh folder beside ``out``, moved over ``out`` at the end.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from convlens.boxes import Box, image_size, map_boxes, match_images
from convlens.checks import RequestError, positive_int
from convlens.explanation import jsonable
from convlens.files import (
    make_staging_folder,
    printable,
    replace_folder,
    save_picture,
    write_atomic,
)
from convlens.images import ImageError
from convlens.model import Model
from convlens.report.page import environment, number
from convlens.report.run import check_methods, check_report_folder, file_stem, first_line

__all__ = [
    "EvaluationPlan",
    "check_evaluation",
    "check_evaluation_folder",
    "draw_boxes",
    "evaluate_images",
    "evaluation_markdown",
]

TOP = 5
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


@dataclass(frozen=True)
class EvaluationPlan:
    """What :func:`check_evaluation` found: per source its boxes (``None`` without), the
    images without boxes and why, the box file's images that match no source, whether the
    localisation error can be computed (box labels are model labels) and why not."""

    boxes: list[list[Box] | None]
    without_boxes: list[dict[str, str]]
    unused: list[str]
    labelled: bool
    reason: str | None


def check_evaluation(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    boxes: Mapping[str, Sequence[Box]] | None = None,
    batch_size: int | None = None,
    curve_steps: int = 20,
) -> EvaluationPlan:
    """Refuse, before any forward pass, a request that cannot be done: no images, unknown
    methods or parameters (``report.run.check_methods``), a model without preprocessing,
    images that match several box-file entries. Images without boxes are not refused: they
    are listed (their curves are still computed). Box labels that are not model labels, or
    missing labels, make the localisation error absent, with the reason (naming the labels)."""
    if isinstance(sources, (str, Path)) or not sources:
        raise RequestError("no images given")
    check_methods(model, methods, params)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    positive_int("curve_steps", curve_steps, minimum=2)
    if model.input_size is None:
        raise RequestError("evaluating images needs a model with its preprocessing (cl.wrap)")
    if boxes is None:
        return EvaluationPlan([None] * len(sources), [], [], False, "no boxes were given")
    per_source: list[list[Box] | None] = []
    without: list[dict[str, str]] = []
    used: set[str] = set()
    keys = match_images(boxes, [str(name) for name, _ in sources])
    for (name, _), key in zip(sources, keys, strict=True):
        if key is None or not boxes[key]:
            why = "not in the box file" if key is None else "no boxes in the box file"
            without.append({"image": str(name), "reason": why})
            per_source.append(None)
        else:
            per_source.append(list(boxes[key]))
        if key is not None:
            used.add(key)
    unused = [key for key in boxes if key not in used]
    labels = [box.label for given in per_source if given for box in given]
    reason = _label_problem(model, labels)
    return EvaluationPlan(per_source, without, unused, reason is None, reason)


def _label_problem(model: Model, labels: list[str | None]) -> str | None:
    """Why the box labels cannot be matched to the model's classes, or ``None`` if they can."""
    if not labels:
        return "no image has boxes"
    if any(label is None for label in labels):
        return "some boxes have no label (a CSV label column, COCO categories, VOC <name>)"
    if model.labels is None:
        return "the model has no class names to match the box labels with"
    unknown = list(dict.fromkeys(label for label in labels if label not in model.labels))
    if not unknown:
        return None
    named = []
    for label in unknown[:5]:
        close = difflib.get_close_matches(str(label), model.labels, n=2, cutoff=0.6)
        named.append(repr(label) + (f" (close: {', '.join(map(repr, close))})" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    return f"box labels that are not labels of the model: {', '.join(named)}{more}"


EVALUATION_FILES = ("evaluation.json",)


def check_evaluation_folder(out: str | Path) -> Path:
    """The folder an evaluation may be written to, resolved: absent, empty or an earlier
    evaluation (``evaluation.json``, no sub-folders), which the new one replaces as a whole
    (:func:`convlens.report.run.check_report_folder`)."""
    return check_report_folder(out, EVALUATION_FILES, "evaluation")


def evaluate_images(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    out: str | Path,
    boxes: Mapping[str, Sequence[Box]] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    curve_steps: int = 20,
    progress: bool | None = None,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Score ``methods`` on ``sources`` (``(name, path or image)`` pairs) against ``boxes``
    (``convlens.boxes.read_boxes``; ``None``: curves and time only) and write ``out``
    (``evaluation.json``, ``evaluation.md``, ``index.html``, pictures); returns the document.

    The pointing game's tolerance is 15 pixels at 224 (Zhang et al. 2016), scaled to the
    input width as in ``metrics.benchmark``. The top-5 localisation error needs the maps of
    the image's classes among the 5 most probable; they are computed only when the box labels
    are model labels. An image that cannot be read is logged and listed under ``skipped``; a
    method refusing an image (a ``RequestError``) is recorded under ``refused`` and the rest go
    on. One progress bar covers the run.
    """
    params = params or {}
    plan = check_evaluation(model, sources, methods, params, boxes, batch_size, curve_steps)
    folder = check_evaluation_folder(out)
    if boxes is not None and plan.reason is not None:
        log(f"convlens: no localisation error: {printable(plan.reason)}")
    staging = make_staging_folder(folder)
    total = len(sources) * (len(methods) + 1)
    bar = tqdm(total=total, desc="evaluate", unit="step", disable=progress is False, delay=1.0)
    try:
        document = _run(model, sources, methods, staging, plan, boxes is not None, params,
                        batch_size, seed, curve_steps, log, bar)  # fmt: skip
        _write(staging, document)
        replace_folder(staging, folder)
    except BaseException:  # the previous evaluation stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return document


def _run(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    out: Path,
    plan: EvaluationPlan,
    with_boxes: bool,
    params: dict[str, dict[str, Any]],
    batch_size: int | None,
    seed: int,
    curve_steps: int,
    log: Callable[[str], None],
    bar: Any,
) -> dict[str, Any]:
    from convlens.api import explain
    from convlens.metrics import deletion, insertion

    started = time.perf_counter()
    height, width = model.input_size  # type: ignore[misc]
    tolerance = 15 * width / 224
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    refused: list[dict[str, str]] = []
    dropped_all: list[dict[str, Any]] = []
    for index, (name, source) in enumerate(sources):
        try:
            x = model.inputs(source)
            original = image_size(source)
        except (ImageError, OSError, RequestError) as error:
            reason = first_line(error)
            log(f"convlens: skipping {printable(name)}: {printable(reason)}")
            skipped.append({"image": str(name), "reason": reason})
            bar.update(len(methods) + 1)
            continue
        stem = file_stem(index, str(name))
        missing = [w for w in plan.without_boxes if w["image"] == str(name)]
        if with_boxes and missing:
            log(f"convlens: no boxes for {printable(name)}: {missing[0]['reason']}")
        entry, truth, owners = _image_entry(model, x, name, original, plan.boxes[index], batch_size)
        for item in entry["dropped"]:
            log(f"convlens: {printable(name)}: box {item['box']} {item['reason']}")
            dropped_all.append({"image": str(name), **item})
        picture = Image.fromarray(model.to_display(x)[0])
        entry["input"] = f"{stem}.png"
        save_picture(draw_boxes(picture, truth), out / entry["input"])
        ranked = [p["class"] for p in entry["top5"]]
        heatmaps, explained, done = [], [], []
        for method in methods:
            bar.set_postfix_str(printable(f"{stem}: {method}"))
            own = params.get(method, {})
            try:
                e = explain(model, x, method=method, batch_size=batch_size, seed=seed,
                            progress=False, **own)  # fmt: skip
                record = _scores(e, truth, tolerance)
                if truth is not None and plan.labelled:
                    record |= _localised(model, e, x, ranked, truth, owners, batch_size, seed, own)
            except RequestError as error:  # the method refuses this image: the others go on
                reason = first_line(error)
                log(f"convlens: {method} refused {printable(name)}: {printable(reason)}")
                entry["methods"][method] = {"refused": reason}
                refused.append({"image": str(name), "method": method, "reason": reason})
                bar.update(1)
                continue
            record["file"] = f"{stem}_{method}.png"
            shown = draw_boxes(e.overlay(0), truth, record.get("map_box"))
            save_picture(shown, out / record["file"])
            entry["methods"][method] = record
            heatmaps.append(e.heatmap()[0])
            explained.append(e.targets[0])
            done.append(method)
            bar.update(1)
        bar.set_postfix_str(printable(f"{stem}: deletion/insertion"))
        if done:
            batch = x.expand(len(done), *x.shape[1:])
            common = {"steps": curve_steps, "batch_size": batch_size, "progress": False}
            maps = torch.stack(heatmaps)
            removed = deletion(model, batch, maps, target=explained, **common)
            added = insertion(model, batch, maps, target=explained, **common)
            for i, method in enumerate(done):
                entry["methods"][method]["deletion"] = float(removed.auc[i])
                entry["methods"][method]["insertion"] = float(added.auc[i])
        bar.update(1)
        images.append(entry)
    unread = {item["image"] for item in skipped}
    given = [len(image["boxes"]) + len(image["dropped"]) for image in images]
    return {
        "model": model.name,
        "input_size": [height, width],
        "crop": float(model.crop),
        "methods": list(methods),
        "params": {m: jsonable(dict(params.get(m, {}))) for m in methods},
        "seed": seed,
        "curve_steps": curve_steps,
        "boxes": None
        if not with_boxes
        else {
            "images_with_boxes": sum(n > 0 for n in given),
            "boxes": sum(given),
            "without_boxes": [  # of the images read
                item for item in plan.without_boxes if item["image"] not in unread
            ],
            "unused": len(plan.unused),  # images of the box file not among those given
            "dropped": dropped_all,
            "pointing_tolerance": tolerance,
            "localization_error": {
                "computed": plan.labelled,
                "reason": plan.reason,
                "k": min(TOP, len(model.labels)) if plan.labelled and model.labels else None,
            },
        },
        "summary": _summary(images, methods, with_boxes, plan.labelled),
        "images": images,
        "skipped": skipped,
        "refused": refused,
        "seconds": time.perf_counter() - started,
    }


def _image_entry(
    model: Model,
    x: torch.Tensor,
    name: str,
    original: tuple[int, int],
    given: list[Box] | None,
    batch_size: int | None,
) -> tuple[dict[str, Any], torch.Tensor | None, list[int] | None]:
    """The image's record (prediction, boxes in input pixels, dropped boxes), its boxes
    (None without) and their classes (None when the labels are not model labels)."""
    probabilities = model.predict(x, batch_size)[0]
    top = probabilities.topk(min(TOP, len(probabilities)))
    entry: dict[str, Any] = {
        "image": str(name),
        "size": list(original),
        "top5": [
            {"class": int(c), "label": model.label(int(c)), "probability": float(p)}
            for p, c in zip(top.values, top.indices, strict=True)
        ],
        "boxes": [],
        "dropped": [],
        "methods": {},
    }
    entry |= {k: entry["top5"][0][k] for k in ("class", "label", "probability")}
    if given is None:
        return entry, None, None
    mapped, dropped = map_boxes(model, given, original)
    gone = {d.index for d in dropped}
    kept = [box for i, box in enumerate(given) if i not in gone]
    entry["boxes"] = [
        {"box": [float(v) for v in row], "label": box.label}
        for row, box in zip(mapped.tolist(), kept, strict=True)
    ]
    entry["dropped"] = [
        {"box": list(d.box.xyxy), "label": d.box.label, "reason": d.reason} for d in dropped
    ]
    if not kept:
        return entry, None, None
    labels = model.labels or []
    owners = [labels.index(b.label) if b.label in labels else -1 for b in kept]
    return entry, mapped, owners


def _scores(e: Any, truth: torch.Tensor | None, tolerance: float) -> dict[str, Any]:
    """The map's record: target, time, and with boxes its box scores."""
    from convlens.metrics import energy_pointing_game, localization, pointing_game

    summary = e.summary()
    record: dict[str, Any] = {
        "target": summary["targets"][0],
        "label": summary["labels"][0] if summary["labels"] else None,
        "seconds": float(e.seconds),
        "forwards": int(e.forwards),
    }
    if truth is None:
        return record
    found = localization(e, [truth])
    return record | {
        "pointing": bool(pointing_game(e, [truth], tolerance)[0]),
        "energy": float(energy_pointing_game(e, [truth])[0]),
        "iou": float(found.iou[0]),
        "hit": bool(found.hit[0]),
        "map_box": [float(v) for v in found.boxes[0].tolist()],
        "threshold": float(found.threshold),
    }


def _localised(
    model: Model,
    e: Any,
    x: torch.Tensor,
    ranked: list[int],
    truth: torch.Tensor,
    owners: list[int],
    batch_size: int | None,
    seed: int,
    own: Mapping[str, Any],
) -> dict[str, Any]:
    """Whether the top-1 and top-5 predictions localise the object (Zhou et al. 2016): the
    maps of the image's own classes among the 5 most probable are computed (the others are
    wrong whatever their map)."""
    from convlens.api import explain
    from convlens.metrics.localization import localization_error, paper_threshold

    maps: list[torch.Tensor | None] = []
    for c in ranked:
        if c not in owners:
            maps.append(None)
        elif c == e.targets[0]:
            maps.append(e.heatmap()[0])
        else:
            other = explain(model, x, method=e.method, target=c, batch_size=batch_size,
                            seed=seed, progress=False, **own)  # fmt: skip
            maps.append(other.heatmap()[0])
    error = localization_error([maps], [ranked], [truth], [owners], paper_threshold(e.method))
    return {
        "top1_correct": bool(error.correct[0, 0]),
        "top5_correct": bool(error.correct[0, : error.k].any()),
        "class_iou": [float(v) for v in error.iou[0].tolist()],
    }


def _mean(values: list[Any]) -> float | None:
    return sum(float(v) for v in values) / len(values) if values else None


def _summary(
    images: list[dict[str, Any]], methods: Sequence[str], with_boxes: bool, labelled: bool
) -> list[dict[str, Any]]:
    """One row per method, means over the images it explained (box scores: over the images
    with boxes; localisation error: 1 - the share localised)."""
    rows = []
    for method in methods:
        done = [
            image["methods"][method]
            for image in images
            if "refused" not in image["methods"].get(method, {"refused": ""})
        ]
        row: dict[str, Any] = {"method": method, "images": len(done)}
        if with_boxes:
            boxed = [r for r in done if "pointing" in r]
            located = [r for r in boxed if "top1_correct" in r]
            top1, top5 = (
                _mean([r["top1_correct"] for r in located]),
                _mean([r["top5_correct"] for r in located]),
            )
            row |= {
                "images_with_boxes": len(boxed),
                "pointing": _mean([r["pointing"] for r in boxed]),
                "energy": _mean([r["energy"] for r in boxed]),
                "iou": _mean([r["iou"] for r in boxed]),
                "hit_rate": _mean([r["hit"] for r in boxed]),
                "threshold": boxed[0]["threshold"] if boxed else None,
                "top1_error": None if not labelled or top1 is None else 1.0 - top1,
                "top5_error": None if not labelled or top5 is None else 1.0 - top5,
            }
        row |= {key: _mean([r[key] for r in done if key in r]) for key in CURVE_COLUMNS}
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown_text(text: Any) -> str:
    """User text (file names, labels) safe inside a Markdown table cell: one line, no pipes,
    no HTML."""
    text = printable(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("[", "\\[").replace("]", "\\]")


def evaluation_markdown(document: dict[str, Any]) -> str:
    """``evaluation.md``: a header (model, images, boxes) and one table row per method."""
    boxes = document["boxes"]
    lines = [
        "# convlens evaluation",
        "",
        f"Model **{_markdown_text(document['model'])}** (input "
        f"{document['input_size'][0]}x{document['input_size'][1]}, crop {document['crop']:g}), "
        f"{len(document['images'])} image(s)"
        + (f", {len(document['skipped'])} skipped" if document["skipped"] else "")
        + f", maps of the predicted class; curves with {document['curve_steps']} steps.",
        "",
    ]
    if boxes is None:
        lines.append("Boxes: none given, so only the deletion and insertion curves are scored.")
        columns = CURVE_COLUMNS
    else:
        dropped = f", {len(boxes['dropped'])} cropped away or outside" if boxes["dropped"] else ""
        unused = boxes["unused"]
        lines.append(
            f"Boxes: {boxes['boxes']} on {boxes['images_with_boxes']} image(s){dropped}; "
            f"{len(boxes['without_boxes'])} image(s) without boxes"
            + (f", {unused} image(s) of the box file not given" if unused else "")
            + f"; pointing-game tolerance {boxes['pointing_tolerance']:.1f} px."
        )
        located = boxes["localization_error"]
        if located["computed"]:
            lines.append(
                f"Localisation error over the {located['k']} most probable classes "
                "(Zhou et al. 2016; IoU ≥ 0.5)."
            )
        else:
            lines.append(f"No localisation error: {_markdown_text(located['reason'])}.")
        columns = {**BOX_COLUMNS, **CURVE_COLUMNS}
    heading = {"method": "method", "images": "images", **columns}
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


def _write(out: Path, document: dict[str, Any]) -> None:
    """``evaluation.json``, ``evaluation.md`` and ``index.html``, each atomically."""
    write_atomic(out / "evaluation.json", json.dumps(document, indent=2).encode())
    write_atomic(out / "evaluation.md", evaluation_markdown(document).encode())
    template = environment().get_template("evaluation.html")
    columns = CURVE_COLUMNS if document["boxes"] is None else {**BOX_COLUMNS, **CURVE_COLUMNS}
    page = template.render(doc=document, num=number, columns=columns)
    write_atomic(out / "index.html", page.encode())
