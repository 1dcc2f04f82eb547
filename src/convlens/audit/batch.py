"""One function explains a chunk of images for an audit, :func:`explain_batch`: both engines
(local and Ray) call it, so the rows do not depend on where they were computed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from convlens.api import explain
from convlens.audit.data import Item, image_seed
from convlens.audit.store import RESULT_COLUMNS
from convlens.boxes import Box, image_size, map_boxes
from convlens.checks import first_line
from convlens.explanation import Explanation
from convlens.metrics import deletion, energy_pointing_game, insertion, pointing_game
from convlens.model import Model
from convlens.registry import get_method

__all__ = ["explain_batch"]


def _reduced(heat: Tensor, size: int) -> tuple[bytes, float]:
    """A map at ``size`` x ``size`` (area average) as float16 bytes scaled to max |value| 1."""
    small = F.adaptive_avg_pool2d(heat[None, None].double(), size)[0, 0]
    scale = float(small.abs().max())
    values = (small / scale if scale > 0 else small).float().numpy().astype("<f2")
    return values.tobytes(), scale


def _base_row(item: Item) -> dict[str, Any]:
    return {"index": item.index, "image": item.image, "path": item.path, "label": item.label}


def _load(model: Model, item: Item) -> tuple[Tensor, Tensor | None]:
    """The image's input (1, C, H, W) and its boxes in input pixels (None without boxes)."""
    x = model.inputs(item.path)
    if not item.boxes:
        return x, None
    boxes = [Box(*b) for b in item.boxes]
    mapped, _ = map_boxes(model, boxes, image_size(item.path))
    return x, mapped


def _explain_rows(
    model: Model,
    x: Tensor,
    method: str,
    targets: list[int],
    seed: int,
    params: Mapping[str, Any],
) -> Explanation:
    return explain(model, x, method, target=targets, seed=seed, progress=False, **params)


def _scores(
    model: Model,
    x: Tensor,
    e: Explanation,
    boxes: list[Tensor | None],
    steps: int,
) -> list[dict[str, Any]]:
    """Deletion and insertion AUC, pointing game and energy of each image of ``e``."""
    heat = e.heatmap()
    out: list[dict[str, Any]] = [{} for _ in range(len(x))]
    if steps > 0:
        gone = deletion(model, x, e, steps=steps, progress=False).auc
        added = insertion(model, x, e, steps=steps, progress=False).auc
        for i, row in enumerate(out):
            row["deletion_auc"], row["insertion_auc"] = float(gone[i]), float(added[i])
    for i, box in enumerate(boxes):
        if box is not None and len(box):
            out[i]["pointing_game"] = bool(pointing_game(heat[i : i + 1], [box])[0])
            out[i]["energy"] = float(energy_pointing_game(heat[i : i + 1], [box])[0])
    return out


def _method_rows(
    model: Model,
    x: Tensor,
    bases: list[dict[str, Any]],
    boxes: list[Tensor | None],
    method: str,
    params: Mapping[str, Any],
    seed: int,
    steps: int,
    map_size: int,
    full_maps: bool,
    groups: list[list[int]],
) -> list[dict[str, Any]]:
    """Rows of one method for the images of ``x``, explained in ``groups`` of positions (one
    group per image for random methods, so each gets its own seed). A group that fails is
    explained image by image, so that one image's failure is recorded on its row alone."""
    rows: list[dict[str, Any]] = [{} for _ in bases]
    random = get_method(method).random
    pending = list(groups)
    while pending:
        group = pending.pop(0)
        targets = [int(bases[i]["predicted"]) for i in group]
        used = image_seed(seed, bases[group[0]]["image"]) if random else seed
        try:
            e = _explain_rows(model, x[group], method, targets, used, params)
            scores = _scores(model, x[group], e, [boxes[i] for i in group], steps)
        except Exception as error:
            if len(group) > 1:
                pending = [[i] for i in group] + pending
                continue
            rows[group[0]] = {"seed": used, "error": first_line(error)}
            continue
        heat = e.heatmap()
        for k, i in enumerate(group):
            data, scale = _reduced(heat[k], map_size)
            rows[i] = {
                "target": int(e.targets[k]) if isinstance(e.targets[k], int) else None,
                "target_label": e.labels[k],
                "seconds": e.seconds / len(group),
                "forwards": round(e.forwards / len(group)),
                "seed": used,
                "map": data,
                "map_scale": scale,
                "map_size": map_size,
                **scores[k],
            }
            if full_maps:
                rows[i]["full_map"] = heat[k].numpy()
    return [{**base, "method": method, **row} for base, row in zip(bases, rows, strict=True)]


def explain_batch(
    model: Model,
    items: Sequence[Item],
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    steps: int = 100,
    map_size: int = 32,
    full_maps: bool = False,
) -> list[dict[str, Any]]:
    """Rows (image x method, in that order) for a chunk of images: each image is read and
    predicted; each method explains the predicted classes in one call (random methods one
    image at a time, with the image's seed ``image_seed(seed, item.image)``), then deletion and
    insertion AUC (``steps`` steps; 0 leaves them out) and, for images with boxes, the pointing
    game and its energy. An image that cannot be read, or a method that fails on it, gives rows
    with ``error`` set; the others go on. Each row has every column of
    :data:`~convlens.audit.store.RESULT_COLUMNS` (``None`` where it does not apply); with
    ``full_maps`` rows also carry ``full_map`` (H, W)."""
    params = params or {}
    bases: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    inputs: list[Tensor] = []
    boxes: list[Tensor | None] = []
    for item in items:
        try:
            x, box = _load(model, item)
        except Exception as error:
            failed.append({**_base_row(item), "error": first_line(error)})
            continue
        inputs.append(x)
        boxes.append(box)
        bases.append(_base_row(item))
    by_image: dict[int, list[dict[str, Any]]] = {}
    if inputs:
        x = torch.cat(inputs)
        probabilities = model.predict(x)
        best = probabilities.argmax(dim=1)
        for i, base in enumerate(bases):
            predicted = int(best[i])
            base["predicted"] = predicted
            base["predicted_label"] = model.label(predicted)
            base["probability"] = float(probabilities[i, predicted])
            known = base["label"] is not None
            base["correct"] = base["label"] == model.label(predicted) if known else None
        for method in methods:
            random = get_method(method).random
            groups = [[i] for i in range(len(bases))] if random else [list(range(len(bases)))]
            rows = _method_rows(
                model, x, bases, boxes, method, params.get(method, {}), seed, steps, map_size,
                full_maps, groups,
            )  # fmt: skip
            for row in rows:
                by_image.setdefault(row["index"], []).append(row)
    for base in failed:
        by_image[base["index"]] = [{**base, "method": m} for m in methods]
    empty = dict.fromkeys(RESULT_COLUMNS)
    return [{**empty, **row} for item in items for row in by_image[item.index]]
