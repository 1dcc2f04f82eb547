"""Evaluate methods on your own images, with or without ground-truth boxes.

Per method, over the images: the pointing game (Zhang et al. 2016), the energy in the boxes
(Wang et al. 2020), the IoU of the map's box with the ground truth and the hit rate at IoU >= 0.5
(Zhou et al. 2016; Selvaraju et al. 2017, each method at its paper's threshold), the ILSVRC top-1
and top-5 localisation error (Zhou et al. 2016), deletion and insertion AUC (Petsiuk et al.
2018) and seconds per image. Without boxes only the curves and the time are reported.

Which map meets which boxes. When every box is labelled with one of the model's labels, the
pointing game, the energy and the box IoU follow Zhang et al. 2016's protocol: for each class
of the image (the labels of its boxes left after the crop), the map of that class is scored
against that class's boxes, and the scores are averaged over (image, class) pairs: a map of
"dog" on the "cat" box is no hit, and a misclassified image is scored on its true class's map.
Otherwise (boxes without labels, or labels that are not the model's) the scoring is
class-agnostic: the predicted class's map against all of the image's boxes, one score per
image. ``evaluation.json`` (``boxes.protocol``: ``per_class`` or ``class_agnostic``),
``evaluation.md`` and ``index.html`` say which was used. Each class is explained once per image
and method: the maps of the image's classes serve the box scores and the top-5 localisation
error alike. The curves and the seconds are those of the predicted class's map.

Boxes are read by ``convlens.boxes.read_boxes`` and mapped through the model's preprocessing;
boxes cropped away are listed, and the box scores are averaged over the images with boxes left.
The request is checked before any forward pass (:func:`check_evaluation`), including the
picture sizes a COCO or VOC file states. The output folder (``evaluation.json``,
``evaluation.md``, ``index.html`` and the pictures) is written as one unit, as the report of
``convlens explain`` is: into a fresh folder beside ``out``, moved over ``out`` at the end.
"""

from __future__ import annotations

import difflib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from convlens.boxes import Box, check_image_sizes, image_size, map_boxes, match_images
from convlens.checks import RequestError, first_line, positive_int
from convlens.explanation import jsonable
from convlens.files import make_staging_folder, printable, replace_folder, save_picture
from convlens.images import ImageError
from convlens.model import Model
from convlens.report.evaluation_page import (
    CLASS_AGNOSTIC,
    CURVE_COLUMNS,
    PER_CLASS,
    draw_boxes,
    evaluation_markdown,
    write_pages,
)
from convlens.report.run import TOP, check_methods, check_report_folder, file_stem

__all__ = [
    "EvaluationPlan",
    "check_evaluation",
    "check_evaluation_folder",
    "draw_boxes",
    "evaluate_images",
    "evaluation_markdown",
]


@dataclass(frozen=True)
class EvaluationPlan:
    """What :func:`check_evaluation` found: per source its boxes (``None`` without), the
    images without boxes and why, the box file's images that match no source, whether the
    box labels are model labels (then the boxes are scored per class and the localisation
    error is computed) and why not."""

    boxes: list[list[Box] | None]
    without_boxes: list[dict[str, str]]
    unused: list[str]
    labelled: bool
    reason: str | None

    @property
    def protocol(self) -> str:
        """``per_class`` (Zhang et al. 2016) when the box labels are model labels, else
        ``class_agnostic`` (the predicted class's map against all of the boxes)."""
        return PER_CLASS if self.labelled else CLASS_AGNOSTIC


def check_evaluation(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    boxes: Mapping[str, Sequence[Box]] | None = None,
    batch_size: int | None = None,
    curve_steps: int = 20,
) -> EvaluationPlan:
    """Refuse, before any forward pass, a request that cannot be done: no images, an image
    file given twice, unknown methods or parameters (``report.run.check_methods``), a model
    without preprocessing, images that match several box-file entries, a picture whose size
    is not the one the box file states (``BoxFile.sizes``). Images without boxes are not
    refused: they are listed (their curves are still computed). Box labels that are not model
    labels, or missing labels, make the scoring class-agnostic and the localisation error
    absent, with the reason (naming the labels)."""
    if isinstance(sources, (str, Path)) or not sources:
        raise RequestError("no images given")
    _check_once(sources)
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
    check_image_sizes(boxes, sources, keys)
    labels = [box.label for given in per_source if given for box in given]
    reason = _label_problem(model, labels)
    return EvaluationPlan(per_source, without, unused, reason is None, reason)


def _check_once(sources: Sequence[tuple[str, Any]]) -> None:
    """Refuse an image file given twice (the same resolved path): it would count twice."""
    seen: dict[Path, str] = {}
    for name, source in sources:
        if not isinstance(source, (str, os.PathLike)):
            continue  # a picture in memory: nothing to compare
        try:
            path = Path(source).resolve()
        except (OSError, RuntimeError):  # a symbolic link loop
            path = Path(source).absolute()
        if path in seen:
            also = f" (also as {printable(seen[path])})" if seen[path] != str(name) else ""
            raise RequestError(
                f"image {printable(name)} is given twice{also}; give each image once, or it "
                "counts twice in the averages"
            )
        seen[path] = str(name)


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
    input width as in ``metrics.benchmark``. With box labels that are model labels, the box
    scores are per class (the map of each of the image's classes against that class's boxes,
    Zhang et al. 2016) and the top-5 localisation error is computed from the same maps;
    otherwise the predicted class's map is scored against all of the boxes (the module's
    notes). An image that cannot be read is logged and listed under ``skipped``; a
    method refusing an image (a ``RequestError``) is recorded under ``refused`` and the rest go
    on. One progress bar covers the run.
    """
    params = params or {}
    plan = check_evaluation(model, sources, methods, params, boxes, batch_size, curve_steps)
    folder = check_evaluation_folder(out)
    if boxes is not None and plan.reason is not None:
        log(
            "convlens: boxes scored class-agnostic (the predicted class's map against all of "
            f"them), no localisation error: {printable(plan.reason)}"
        )
    staging = make_staging_folder(folder)
    total = len(sources) * (len(methods) + 1)
    bar = tqdm(total=total, desc="evaluate", unit="step", disable=progress is False, delay=1.0)
    try:
        document = _run(model, sources, methods, staging, plan, boxes is not None, params,
                        batch_size, seed, curve_steps, log, bar)  # fmt: skip
        write_pages(staging, document)
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
                record = _record(e)
                shown, own_box = e, None
                if truth is not None:
                    job = _Maps(model, x, e, batch_size, seed, own)
                    scored, shown, own_box = _score_boxes(
                        job, truth, owners, ranked, plan.labelled, tolerance
                    )
                    record |= scored
            except RequestError as error:  # the method refuses this image: the others go on
                reason = first_line(error)
                log(f"convlens: {method} refused {printable(name)}: {printable(reason)}")
                entry["methods"][method] = {"refused": reason}
                refused.append({"image": str(name), "method": method, "reason": reason})
                bar.update(1)
                continue
            record["file"] = f"{stem}_{method}.png"
            save_picture(draw_boxes(shown.overlay(0), truth, own_box), out / record["file"])
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
    return {
        "model": model.name,
        "input_size": [height, width],
        "crop": float(model.crop),
        "methods": list(methods),
        "params": {m: jsonable(dict(params.get(m, {}))) for m in methods},
        "seed": seed,
        "curve_steps": curve_steps,
        "boxes": _boxes_record(model, plan, images, skipped, dropped_all, tolerance)
        if with_boxes
        else None,
        "summary": _summary(images, methods, with_boxes, plan.labelled),
        "images": images,
        "skipped": skipped,
        "refused": refused,
        "seconds": time.perf_counter() - started,
    }


def _boxes_record(
    model: Model,
    plan: EvaluationPlan,
    images: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    dropped: list[dict[str, Any]],
    tolerance: float,
) -> dict[str, Any]:
    """``evaluation.json``'s ``boxes``: the counts over the images read (``boxes`` given,
    ``boxes_left`` after the crop, ``images_with_boxes``: those with boxes left, which the box
    scores are averaged over), the scoring ``protocol`` and the localisation error's state."""
    unread = {item["image"] for item in skipped}
    return {
        "protocol": plan.protocol,
        "images_with_boxes": sum(bool(image["boxes"]) for image in images),
        "boxes": sum(len(image["boxes"]) + len(image["dropped"]) for image in images),
        "boxes_left": sum(len(image["boxes"]) for image in images),
        "images_all_cropped": [  # every box of these images was cropped away or outside
            image["image"] for image in images if image["dropped"] and not image["boxes"]
        ],
        "without_boxes": [item for item in plan.without_boxes if item["image"] not in unread],
        "unused": len(plan.unused),  # images of the box file not among those given
        "dropped": dropped,
        "pointing_tolerance": tolerance,
        "localization_error": {
            "computed": plan.labelled,
            "reason": plan.reason,
            "k": min(TOP, len(model.labels)) if plan.labelled and model.labels else None,
        },
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


def _record(e: Any) -> dict[str, Any]:
    """A map's record: the class it explains, its time."""
    summary = e.summary()
    return {
        "target": summary["targets"][0],
        "label": summary["labels"][0] if summary["labels"] else None,
        "seconds": float(e.seconds),
        "forwards": int(e.forwards),
    }


@dataclass
class _Maps:
    """The maps of one image by one method, by class: the predicted class's first; any other
    is explained on first use and kept, so that no class is explained twice."""

    model: Model
    x: torch.Tensor
    predicted: Any
    batch_size: int | None
    seed: int
    own: Mapping[str, Any]

    def __post_init__(self) -> None:
        self.maps: dict[Any, Any] = {self.predicted.targets[0]: self.predicted}

    def __call__(self, c: int) -> Any:
        from convlens.api import explain

        if c not in self.maps:
            self.maps[c] = explain(
                self.model, self.x, method=self.predicted.method, target=c,
                batch_size=self.batch_size, seed=self.seed, progress=False, **self.own,
            )  # fmt: skip
        return self.maps[c]


def _score_boxes(
    maps: _Maps,
    truth: torch.Tensor,
    owners: list[int] | None,
    ranked: list[int],
    labelled: bool,
    tolerance: float,
) -> tuple[dict[str, Any], Any, list[float]]:
    """One method's box scores on one image, the explanation its picture shows and that map's
    own box. ``scores`` holds one entry per class of the image, its map against its boxes
    (Zhang et al. 2016), when the labels are model labels (then the top-1 and top-5
    localisation error too, from the same maps); otherwise one entry, the predicted class's map
    against all of the boxes (``class`` None)."""
    from convlens.metrics.localization import paper_threshold

    e = maps.predicted
    record: dict[str, Any] = {"threshold": paper_threshold(e.method)}
    if not labelled or owners is None:
        record["scores"] = [_box_scores(e, truth, tolerance, None, None)]
        return record, e, record["scores"][0]["map_box"]
    classes = list(dict.fromkeys(owners))  # the image's classes, by their first box
    mine = torch.tensor(owners)
    record["scores"] = [
        _box_scores(maps(c), truth[mine == c], tolerance, c, maps.model.label(c)) for c in classes
    ]
    record |= _localised(maps, ranked, truth, owners)
    # the picture shows the predicted class's map if it is one of the image's, else the first
    shown = e.targets[0] if e.targets[0] in classes else classes[0]
    record["shown"] = {"class": int(shown), "label": maps.model.label(int(shown))}
    return record, maps(shown), record["scores"][classes.index(shown)]["map_box"]


def _box_scores(
    e: Any, truth: torch.Tensor, tolerance: float, c: int | None, label: str | None
) -> dict[str, Any]:
    """One map against boxes: the pointing game (Zhang et al. 2016), the energy in the boxes
    (Wang et al. 2020), the IoU of the map's box and whether it reaches 0.5 (Zhou et al.
    2016)."""
    from convlens.metrics import energy_pointing_game, localization, pointing_game

    found = localization(e, [truth])
    return {
        "class": c,
        "label": label,
        "pointing": bool(pointing_game(e, [truth], tolerance)[0]),
        "energy": float(energy_pointing_game(e, [truth])[0]),
        "iou": float(found.iou[0]),
        "hit": bool(found.hit[0]),
        "map_box": [float(v) for v in found.boxes[0].tolist()],
    }


def _localised(
    maps: _Maps, ranked: list[int], truth: torch.Tensor, owners: list[int]
) -> dict[str, Any]:
    """Whether the top-1 and top-5 predictions localise the object (Zhou et al. 2016): the
    maps of the image's own classes among the 5 most probable are read (the others are wrong
    whatever their map)."""
    from convlens.metrics.localization import localization_error, paper_threshold

    heat = [maps(c).heatmap()[0] if c in owners else None for c in ranked]
    threshold = paper_threshold(maps.predicted.method)
    error = localization_error([heat], [ranked], [truth], [owners], threshold)
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
    """One row per method, means over the images it explained. Box scores: over the scores
    of the images with boxes left (``images_with_boxes``), one per (image, class) pair when
    scored per class (``scored`` counts them); localisation error: 1 - the share localised."""
    rows = []
    for method in methods:
        done = [
            image["methods"][method]
            for image in images
            if "refused" not in image["methods"].get(method, {"refused": ""})
        ]
        row: dict[str, Any] = {"method": method, "images": len(done)}
        if with_boxes:
            boxed = [r for r in done if "scores" in r]
            scores = [s for r in boxed for s in r["scores"]]
            located = [r for r in boxed if "top1_correct" in r]
            top1, top5 = (
                _mean([r["top1_correct"] for r in located]),
                _mean([r["top5_correct"] for r in located]),
            )
            row |= {
                "images_with_boxes": len(boxed),
                "scored": len(scores),
                "pointing": _mean([s["pointing"] for s in scores]),
                "energy": _mean([s["energy"] for s in scores]),
                "iou": _mean([s["iou"] for s in scores]),
                "hit_rate": _mean([s["hit"] for s in scores]),
                "threshold": boxed[0]["threshold"] if boxed else None,
                "top1_error": None if not labelled or top1 is None else 1.0 - top1,
                "top5_error": None if not labelled or top5 is None else 1.0 - top5,
            }
        row |= {key: _mean([r[key] for r in done if key in r]) for key in CURVE_COLUMNS}
        rows.append(row)
    return rows
