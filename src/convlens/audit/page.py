"""``DIR/index.html``: the page of an audit, one self-contained file (inline CSS, pictures as
PNG data URIs, no script or font from the network), rendered by the report's Jinja2 environment
(autoescaping on: image names, labels and errors are always escaped) from the audit's
``results.parquet``, ``audit.json`` and, after SpRAy, ``strategies.json``; written atomically.

It shows (1) the accuracy, overall and per class, and the confusion matrix; (2) per explained
class the mean map of the SpRAy method (the one ``strategies.json`` names, else the audit's
first method) and, where the rows carry a ``cluster`` column, each SpRAy cluster (Lapuschkin et
al. 2019): its size, its mean map, where its evidence concentrates, and the images nearest its
mean; (3) the methods ranked by faithfulness (insertion AUC - deletion AUC, Petsiuk et al.
2018) with bootstrap 95 % intervals over every image, by the report's ranking
(:func:`convlens.report.ranking.ranking`); (4) worst cases: the misclassified images most
confidently wrong, and the rows with the lowest insertion AUC; (5) the error rows.

The results are read column by column and the maps in batches (never all rows' maps at once):
mean maps are averaged from the stored ``map_size`` x ``map_size`` maps (each scaled to largest
magnitude 1, so every image weighs the same), and only a capped number of images is read from
disk and drawn as thumbnails.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from convlens import viz
from convlens.audit.strategies import MIN_MAPS, decode_map
from convlens.checks import RequestError, first_line
from convlens.files import printable, write_atomic
from convlens.images import load_image
from convlens.model import Model
from convlens.report.page import SPREAD_BOX, environment, spread_scale, spread_x
from convlens.report.ranking import NOTE, ranking

__all__ = ["build", "render", "write_page"]

THUMBNAIL = 96  # side of a thumbnail, in pixels
EXAMPLES = 4  # at most this many example images per cluster
MAX_THUMBNAILS = 160  # and at most this many example thumbnails on the page
WORST = 8  # misclassified images and lowest-insertion rows shown
ERRORS = 10  # error rows shown
MAX_MATRIX = 30  # a confusion matrix of more classes is shown as its largest confusions
MAX_CLASSES = 50  # classes with a strategies section (the most frequent predictions)
BATCH = 2048  # rows of maps decoded at a time
WINDOW = 4  # the evidence window is 1/WINDOW of the map's side (1/16 of its area)
# a map "concentrates" in its window when more than this share of its evidence lies there (and
# at least 4 times the window's share of the area)
CONCENTRATED = 0.5
PLACES = (("top", "middle", "bottom"), ("left", "centre", "right"))


def write_page(out: str | os.PathLike, model: Model | None = None) -> Path:
    """Write ``out/index.html`` for the audit in ``out`` (again, after a resumed run or SpRAy);
    returns its path. With ``model`` the thumbnails are the model's inputs (its resize and
    crop), which the maps cover exactly; without, a centre square of each file."""
    out = Path(out)
    return write_atomic(out / "index.html", render(build(out, model)).encode())


def render(document: dict[str, Any]) -> str:
    """The page for a document made by :func:`build`."""
    return _environment().get_template("audit.html").render(doc=document, spread_box=SPREAD_BOX)


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The report's environment (autoescaping and all), loading this package's templates."""
    import jinja2

    return environment().overlay(loader=jinja2.PackageLoader("convlens.audit", "templates"))


def build(out: str | os.PathLike, model: Model | None = None) -> dict[str, Any]:
    """The numbers and pictures of the page (plain values: the template adds the markup)."""
    import pyarrow.parquet as pq

    out = Path(out)
    path = out / "results.parquet"
    if not path.is_file():
        raise RequestError(f"{printable(out)} holds no results.parquet: run the audit first")
    record = _json(out / "audit.json")
    summary = _json(out / "strategies.json")
    source = pq.ParquetFile(path)
    names = source.schema_arrow.names
    rows = _columns(source.read(columns=[n for n in names if n != "map"]))
    count = len(rows["method"])
    methods = list(record.get("methods") or dict.fromkeys(rows["method"].tolist()))
    chosen = summary.get("method") if "cluster" in names else None
    spray_method = chosen if chosen in methods else (methods[0] if methods else None)
    if "cluster" not in rows:
        rows["cluster"] = np.full(count, -1)
    first = rows["method"] == (methods[0] if methods else None)
    usable = (rows["method"] == spray_method) & _present(rows["error"], False) & rows["has_map"]
    worst_wrong = _misclassified(rows, usable)
    worst_insertion = _lowest_insertion(rows)
    groups = _Groups(rows, usable)
    for start, maps in _maps(source, rows):
        groups.add(start, maps)
    groups.finish()
    wanted = set(worst_wrong) | set(worst_insertion)
    kept: dict[int, np.ndarray] = {}
    for start, maps in _maps(source, rows):
        groups.nearest(start, maps)
        for i in wanted.intersection(range(start, start + len(maps))):
            kept[i] = maps[i - start]
    thumbnails = _Thumbnails(model)
    faithful = _ranking(rows, methods, groups.flat)
    scale = spread_scale(faithful)
    for row in faithful:
        row.pop("per_image")
        row["x"] = {"mean": spread_x(row["faithfulness"], scale)}
        if row["interval"]:
            row["x"].update(low=spread_x(row["interval"][0], scale))
            row["x"]["high"] = spread_x(row["interval"][1], scale)
    classes = groups.document(rows, thumbnails, summary)
    return {
        "model": record.get("model", "?"),
        "data": record.get("data") or f"a list of {record.get('images', '?')} image files",
        "images": int(first.sum()),
        "rows": count,
        "methods": methods,
        "seconds": float(np.nansum(rows["seconds"])),
        "steps": record.get("steps"),
        "spray": spray_method,
        "clustered": "cluster" in names,
        "min_maps": MIN_MAPS,
        "accuracy": _accuracy(rows, first),
        "confusion": _confusion(rows, first),
        "classes": classes,
        "hidden_classes": groups.hidden,
        "ranking": faithful,
        "ranking_note": NOTE,
        "misclassified": [_case(rows, i, kept.get(i), thumbnails) for i in worst_wrong],
        "lowest_insertion": [_case(rows, i, kept.get(i), thumbnails) for i in worst_insertion],
        "errors": _errors(rows),
    }


# -- reading ----------------------------------------------------------------------------------
def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _columns(table: Any) -> dict[str, np.ndarray]:
    """Every column as a numpy array: numbers as float (NaN for null), strings and booleans as
    objects (``None`` for null); ``has_map`` says which rows hold a map."""
    import pyarrow as pa

    columns: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            columns[name] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        else:
            columns[name] = np.array(column.to_pylist(), dtype=object)
    columns["has_map"] = np.isfinite(columns["map_scale"]) & np.isfinite(columns["map_size"])
    return columns


def _present(values: np.ndarray, present: bool = True) -> np.ndarray:
    """Which entries of an object column are (``present``) or are not null."""
    found = np.array([v is not None for v in values], dtype=bool)
    return found if present else ~found


def _maps(source: Any, rows: dict[str, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (n, s, s) float32 maps scaled to largest magnitude 1) in batches; a row
    without a map, or with a map of another size, reads as NaN."""
    side = int(np.nanmax(rows["map_size"])) if rows["has_map"].any() else 1
    start = 0
    for batch in source.iter_batches(batch_size=BATCH, columns=["map"]):
        values = batch.column(0).to_pylist()
        maps = np.full((len(values), side, side), np.nan, dtype=np.float32)
        for k, data in enumerate(values):
            if data is not None and len(data) == 2 * side * side:
                maps[k] = decode_map({"map": data, "map_size": side, "map_scale": 1.0})
        yield start, maps
        start += len(values)


# -- accuracy ---------------------------------------------------------------------------------
def _accuracy(rows: dict[str, np.ndarray], first: np.ndarray) -> dict[str, Any]:
    """Over the images whose true label is known and that were predicted (one row each)."""
    known = first & _present(rows["correct"])
    labels = rows["label"][known]
    right = rows["correct"][known].astype(bool)
    classes = [
        {"label": label, "n": int(n), "correct": int(right[labels == label].sum())}
        for label, n in zip(*np.unique(labels.astype(str), return_counts=True), strict=True)
    ]
    for entry in classes:
        entry["accuracy"] = entry["correct"] / entry["n"]
    return {
        "n": int(known.sum()),
        "correct": int(right.sum()),
        "overall": float(right.mean()) if len(right) else None,
        "classes": classes,
    }


def _confusion(rows: dict[str, np.ndarray], first: np.ndarray) -> dict[str, Any]:
    """True label (rows) x predicted label (columns) counts, classes in the model's order
    (labels never predicted after, alphabetically); each cell coloured by its share of the
    row. More than :data:`MAX_MATRIX` classes: the largest confusions instead."""
    known = first & _present(rows["label"]) & _present(rows["predicted_label"])
    truth = rows["label"][known].astype(str)
    guess = rows["predicted_label"][known].astype(str)
    order = {}
    for index, name in zip(rows["predicted"][known], guess, strict=True):
        order.setdefault(name, index)
    names = sorted(set(truth) | set(guess), key=lambda n: (n not in order, order.get(n, 0), n))
    if not names:
        return {"labels": [], "cells": [], "top": [], "classes": 0}
    pairs, counts = np.unique(np.stack([truth, guess]), axis=1, return_counts=True)
    found = {(t, p): int(c) for (t, p), c in zip(pairs.T.tolist(), counts, strict=True)}
    if len(names) > MAX_MATRIX:
        largest = sorted(((c, t, p) for (t, p), c in found.items() if t != p), reverse=True)
        top = [{"true": t, "predicted": p, "count": c} for c, t, p in largest[:20]]
        return {"labels": [], "cells": [], "top": top, "classes": len(names)}
    cells = []
    for t in names:
        total = sum(found.get((t, p), 0) for p in names)
        line = []
        for p in names:
            n = found.get((t, p), 0)
            share = n / total if total else 0.0
            r, g, b, _ = colormaps[viz.UNSIGNED_CMAP](share)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
            colour = f"rgb({round(r * 255)}, {round(g * 255)}, {round(b * 255)})"
            line.append({"true": t, "predicted": p, "count": n, "background": colour,
                         "ink": "#fff" if dark else "#1d2430", "share": share})  # fmt: skip
        cells.append(line)
    return {"labels": names, "cells": cells, "top": [], "classes": len(names)}


# -- strategies -------------------------------------------------------------------------------
def evidence_window(heat: np.ndarray, window: int = WINDOW) -> dict[str, Any]:
    """Where a mean map's positive evidence concentrates: the square of side 1/``window`` of
    the map holding the largest share of the positive values (the evidence for the class), that
    share, the square as fractions of the image ``(x0, y0, x1, y1)``, its place in words, its
    share of the area, and whether the evidence ``concentrated`` there (a share above
    :data:`CONCENTRATED` and at least four times the area's)."""
    positive = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64)), 0.0, None)
    h, w = positive.shape
    side_y, side_x = max(1, round(h / window)), max(1, round(w / window))
    total = float(positive.sum())
    if total <= 0:
        return {"share": 0.0, "box": [0.0] * 4, "where": "", "area": 0.0, "concentrated": False}
    sums = np.pad(positive, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    inside = (
        sums[side_y:, side_x:]
        - sums[:-side_y, side_x:]
        - sums[side_y:, :-side_x]
        + sums[:-side_y, :-side_x]
    )
    y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
    row = PLACES[0][min(2, int(3 * (y + side_y / 2) / h))]
    column = PLACES[1][min(2, int(3 * (x + side_x / 2) / w))]
    where = "centre" if row == "middle" and column == "centre" else f"{row} {column}"
    where = where.replace("middle ", "").replace(" centre", "")
    share, area = float(inside[y, x]) / total, side_x * side_y / (h * w)
    return {
        "share": share,
        "box": [x / w, y / h, (x + side_x) / w, (y + side_y) / h],
        "where": where,
        "area": area,
        "concentrated": share > CONCENTRATED and share >= 4 * area,
    }


class _Groups:
    """The sums of the SpRAy method's maps per explained class and per cluster (first pass)
    and the members nearest each cluster's mean (second pass)."""

    def __init__(self, rows: dict[str, np.ndarray], usable: np.ndarray) -> None:
        self.usable = usable
        self.target = np.nan_to_num(rows["target"], nan=-1).astype(np.int64)
        self.cluster = np.nan_to_num(rows["cluster"], nan=-1).astype(np.int64)
        self.sums: dict[tuple[int, int], np.ndarray] = {}
        self.counts: dict[tuple[int, int], int] = {}
        self.flat = np.zeros(len(usable), dtype=bool)  # constant maps: their pixels have no order
        self.near: dict[tuple[int, int], list[tuple[float, int, np.ndarray]]] = {}
        self.hidden = 0  # classes left off the page (beyond MAX_CLASSES)

    def _keys(self, i: int) -> list[tuple[int, int]]:
        keys = [(int(self.target[i]), -2)]  # -2: the whole class
        if self.cluster[i] >= 0:
            keys.append((int(self.target[i]), int(self.cluster[i])))
        return keys

    def add(self, start: int, maps: np.ndarray) -> None:
        finite = np.isfinite(maps).all(axis=(1, 2))
        spread = np.where(finite, np.ptp(np.nan_to_num(maps), axis=(1, 2)), 0.0)
        self.flat[start : start + len(maps)] = finite & (spread == 0)
        for k in np.flatnonzero(self.usable[start : start + len(maps)] & finite):
            for key in self._keys(start + int(k)):
                if key not in self.sums:
                    self.sums[key] = np.zeros(maps.shape[1:], dtype=np.float64)
                    self.counts[key] = 0
                self.sums[key] += maps[k]
                self.counts[key] += 1

    def finish(self) -> None:
        self.means = {key: total / self.counts[key] for key, total in self.sums.items()}
        clusters = sum(1 for _, c in self.counts if c >= 0)
        self.examples = max(1, min(EXAMPLES, MAX_THUMBNAILS // max(1, clusters)))

    def nearest(self, start: int, maps: np.ndarray) -> None:
        """Keep, per cluster, the members whose maps lie nearest the cluster's mean."""
        span = slice(start, start + len(maps))
        for k in np.flatnonzero(self.usable[span] & (self.cluster[span] >= 0)):
            i = start + int(k)
            key = (int(self.target[i]), int(self.cluster[i]))
            if key not in self.means or not np.isfinite(maps[k]).all():
                continue
            distance = float(np.square(maps[k] - self.means[key]).sum())
            heap = self.near.setdefault(key, [])
            item = (-distance, -i, maps[k])
            if len(heap) < self.examples:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)

    def document(
        self, rows: dict[str, np.ndarray], thumbnails: _Thumbnails, summary: dict[str, Any]
    ) -> list[dict[str, Any]]:
        classes = sorted({t for t, c in self.counts if c == -2}, key=lambda t: -self.counts[t, -2])
        eigen = {entry["class"]: entry for entry in summary.get("classes", [])}
        shown = []
        for target in sorted(classes[:MAX_CLASSES]):
            members = self.usable & (self.target == target)
            label = rows["target_label"][np.flatnonzero(members)[0]]
            entry = {
                "target": target,
                "label": label if label is not None else f"class {target}",
                "maps": self.counts[target, -2],
                "mean": _mean_picture(self.means[target, -2], label),
                "evidence": evidence_window(self.means[target, -2]),
                "energy": _mean(rows["energy"][members]),
                "n_clusters": eigen.get(target, {}).get("n_clusters"),
                "clusters": [],
            }
            for cluster in sorted(c for t, c in self.counts if t == target and c >= 0):
                key = (target, cluster)
                inside = members & (self.cluster == cluster)
                near = sorted(self.near.get(key, []), reverse=True)
                entry["clusters"].append(
                    {
                        "cluster": cluster,
                        "size": self.counts[key],
                        "mean": _mean_picture(self.means[key], label),
                        "grid": " ".join(f"{v:.3g}" for v in self.means[key].ravel()),
                        "side": self.means[key].shape[0],
                        "evidence": evidence_window(self.means[key]),
                        "energy": _mean(rows["energy"][inside]),
                        "examples": [_case(rows, -i, m, thumbnails) for _, i, m in near],
                    }
                )
            shown.append(entry)
        self.hidden = len(classes) - len(shown)
        return shown


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


# -- pictures ---------------------------------------------------------------------------------
def _uri(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(viz.png_bytes(picture)).decode()


def _upsized(heat: np.ndarray) -> np.ndarray:
    picture = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F")
    return np.asarray(picture.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR))


def _mean_picture(heat: np.ndarray, label: Any) -> dict[str, Any]:
    """A mean map drawn in the report's colours, with its colour bar."""
    low, high, signed = viz.map_range(heat)
    about = label if label is not None else "the class"
    colours = viz.colorize(_upsized(heat))
    return {
        "uri": _uri(Image.fromarray(colours)),
        "bar": viz.colour_bar_css(signed),
        "low": f"{low:+.2g}" if signed else f"{low:.2g}",
        "high": f"{high:+.2g}" if signed else f"{high:.2g}",
        "meaning": f"red: for {about}, blue: against" if signed else f"red: evidence for {about}",
    }


class _Thumbnails:
    """Images read from their paths and shrunk to :data:`THUMBNAIL` pixels (the model's input
    picture with a model; a centre square without)."""

    def __init__(self, model: Model | None) -> None:
        self.model = model

    def picture(self, path: str) -> np.ndarray:
        if self.model is not None and self.model.input_size is not None:
            shown = Image.fromarray(self.model.to_display(self.model.preprocess(path))[0])
        else:
            shown = load_image(path, size=(THUMBNAIL, THUMBNAIL))
            side = min(shown.size)
            left, top = (shown.width - side) // 2, (shown.height - side) // 2
            shown = shown.crop((left, top, left + side, top + side))
        small = shown.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR)
        return np.asarray(small.convert("RGB"))

    def overlay(self, path: str, heat: np.ndarray | None) -> tuple[str | None, str | None]:
        """The image with ``heat`` over it as a data URI (the map alone when the image
        cannot be read, and why)."""
        big = None if heat is None else _upsized(heat)
        try:
            image = self.picture(path)
        except Exception as error:
            why = f"image not read: {first_line(error)}"
            return (None if big is None else _uri(Image.fromarray(viz.colorize(big)))), why
        if big is None:
            return _uri(Image.fromarray(image)), None
        return _uri(viz.overlay(image, big)), None


def _case(
    rows: dict[str, np.ndarray], i: int, scaled: np.ndarray | None, thumbnails: _Thumbnails
) -> dict[str, Any]:
    """One row as an example: its thumbnail with its map, and its numbers."""
    heat = None
    if scaled is not None and np.isfinite(scaled).all():
        heat = scaled * float(rows["map_scale"][i])
    uri, why = thumbnails.overlay(str(rows["path"][i]), heat)
    number = {k: float(rows[k][i]) for k in ("probability", "deletion_auc", "insertion_auc")}
    return {
        "image": rows["image"][i],
        "method": rows["method"][i],
        "label": rows["label"][i],
        "predicted": rows["predicted_label"][i],
        "target": rows["target_label"][i],
        "correct": rows["correct"][i],
        **{k: (v if np.isfinite(v) else None) for k, v in number.items()},
        "uri": uri,
        "note": why,
    }


# -- ranking, worst cases and errors ---------------------------------------------------------
def _ranking(
    rows: dict[str, np.ndarray], methods: list[str], flat: np.ndarray
) -> list[dict[str, Any]]:
    """The report's ranking over every image: a row without AUC (an error, ``steps=0``) is
    left out, a constant map is counted as ``constant``."""
    scored = np.flatnonzero(np.isfinite(rows["deletion_auc"]) & np.isfinite(rows["insertion_auc"]))
    columns = zip(
        rows["index"][scored].tolist(),
        rows["image"][scored].tolist(),
        rows["method"][scored].tolist(),
        rows["deletion_auc"][scored].tolist(),
        rows["insertion_auc"][scored].tolist(),
        np.nan_to_num(rows["seconds"][scored]).tolist(),
        np.nan_to_num(rows["forwards"][scored]).tolist(),
        flat[scored].tolist(),
        strict=True,
    )
    images: dict[Any, dict[str, Any]] = {}
    for index, image, method, gone, added, seconds, forwards, constant in columns:
        entry = images.setdefault(index, {"image": image, "methods": {}})
        entry["methods"][method] = {
            "deletion": gone,
            "insertion": added,
            "seconds": seconds,
            "forwards": forwards,
            "constant": constant,
        }
    return ranking(list(images.values()), methods)


def _misclassified(rows: dict[str, np.ndarray], usable: np.ndarray) -> list[int]:
    """The wrong predictions made with the highest probability (rows of the SpRAy method)."""
    wrong = np.flatnonzero(usable & np.array([c is False for c in rows["correct"]], dtype=bool))
    return wrong[np.argsort(-rows["probability"][wrong], kind="stable")][:WORST].tolist()


def _lowest_insertion(rows: dict[str, np.ndarray]) -> list[int]:
    scored = np.flatnonzero(np.isfinite(rows["insertion_auc"]))
    return scored[np.argsort(rows["insertion_auc"][scored], kind="stable")][:WORST].tolist()


def _errors(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    failed = np.flatnonzero(_present(rows["error"]))
    methods, counts = np.unique(rows["method"][failed].astype(str), return_counts=True)
    return {
        "count": len(failed),
        "by_method": dict(zip(methods.tolist(), counts.tolist(), strict=True)),
        "first": [
            {"image": rows["image"][i], "method": rows["method"][i], "error": rows["error"][i]}
            for i in failed[:ERRORS]
        ],
    }
