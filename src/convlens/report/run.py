"""The work behind a report: explain every image with every method, score each map's
faithfulness (deletion and insertion, Petsiuk et al. 2018), optionally add indirect
explanations of the predicted classes, and write the pictures, ``results.json`` and
``index.html``.

The request is checked as a whole before any work (:func:`check_request`). The report is one
unit: it is written into a fresh folder beside ``out`` and moved to ``out`` in one step at the
end, replacing the previous report as a whole; an interrupted or failed run removes its folder
and leaves the previous report as it was.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from convlens.checks import RequestError, positive_int
from convlens.files import (
    check_output,
    make_staging_folder,
    printable,
    replace_folder,
    save_picture,
)
from convlens.images import ImageError
from convlens.model import Model

__all__ = ["check_methods", "check_report_folder", "check_request", "explain_images", "ranking"]

# the files that make a folder a convlens report, which a new report may replace
REPORT_FILES = ("index.html", "results.json")

TOP = 5


def _stem(index: int, name: str) -> str:
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40]
    return f"{index:02d}_{base or 'image'}"


def ranking(images: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method, averaged over the images: deletion AUC (lower is better), insertion
    AUC (higher is better), their difference (the ranking key, higher is better), seconds and
    forward passes. Rows are in rank order."""
    from convlens.registry import get_method

    rows = []
    for name in methods:
        entries = [
            image["methods"][name]
            for image in images
            if name in image["methods"] and "refused" not in image["methods"][name]
        ]
        if not entries:
            continue

        def mean(key: str, entries: list[dict[str, Any]] = entries) -> float:
            return sum(float(e[key]) for e in entries) / len(entries)

        rows.append(
            {
                "method": name,
                "family": get_method(name).family,
                "deletion": mean("deletion"),
                "insertion": mean("insertion"),
                "faithfulness": mean("insertion") - mean("deletion"),
                "seconds": mean("seconds"),
                "forwards": mean("forwards"),
            }
        )
    rows.sort(key=lambda row: -row["faithfulness"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def check_methods(
    model: Model, methods: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Refuse, before any work, unknown methods, parameters meant for a method that is not
    selected, and each method's unknown or bad parameters (``resolve_params`` and ``check``)
    and layers the model does not have."""
    from convlens.registry import get_method

    if isinstance(methods, str) or not methods:
        raise RequestError("give at least one method, as a list of names")
    params = params or {}
    for name in params:
        if name not in methods:
            raise RequestError(f"parameters are given for {name!r}, which is not selected")
    for name in methods:
        cls = get_method(name)
        resolved = cls.resolve_params(dict(params.get(name, {})))
        cls.check(resolved)
        layer = resolved.get("layer")
        for spec in layer if isinstance(layer, (list, tuple)) else [layer]:
            if isinstance(spec, str):
                model.layer(spec)


def check_target(model: Model, target: Any) -> None:
    """Refuse, before any work, a target the model cannot have: an unknown label name, a class
    index out of range (the model's labels tell how many classes it has), an unknown layer."""
    from convlens.targets import Class, Contrast, check_class, check_target_spec, layer_of

    for item in check_target_spec(target, 1, model.labels):
        indices = [item.index] if isinstance(item, Class) else []
        indices += [item.p, item.q] if isinstance(item, Contrast) else []
        for index in indices:
            if isinstance(index, int) and model.labels is not None:
                check_class(index, len(model.labels))
        layer = layer_of(item)
        if layer is not None:
            model.layer(layer)


def check_request(
    model: Model,
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    target: Any = None,
    batch_size: int | None = None,
    curve_steps: int = 20,
    feature_steps: int = 256,
) -> None:
    """Refuse a report request that cannot be carried out, before its first forward pass:
    methods and their parameters (:func:`check_methods`), the target (:func:`check_target`)
    and the numbers."""
    check_methods(model, methods, params)
    check_target(model, target)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    positive_int("curve_steps", curve_steps, minimum=2)
    positive_int("feature_steps", feature_steps)


def check_report_folder(out: str | Path) -> Path:
    """The folder a report may be written to, resolved: absent, empty or an earlier report
    (``index.html`` and ``results.json``, no sub-folders), which the new report replaces as a
    whole. Refuses a file, any other folder (its files would be lost), the current folder or
    one holding it, and a place that cannot be written."""
    out = Path(out)
    check_output(out, "folder")
    target = out.resolve()
    shown = printable(out)
    if target == Path(target.anchor):
        raise RequestError(f"--out {shown} is the root folder; give a folder for the report")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise RequestError(
            f"--out {shown} holds the current folder, which the report would replace; "
            "give another folder"
        )
    if target.is_dir():
        entries = list(target.iterdir())
        if entries and not (
            all((target / name).is_file() for name in REPORT_FILES)
            and not any(entry.is_dir() for entry in entries)
        ):
            raise RequestError(
                f"--out {shown} is a folder that is not a convlens report; the report replaces "
                "its folder as a whole, so give a new or empty folder"
            )
    return target


def explain_images(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    out: str | Path,
    params: dict[str, dict[str, Any]] | None = None,
    target: Any = None,
    batch_size: int | None = None,
    seed: int = 0,
    curve_steps: int = 20,
    features: bool = False,
    feature_steps: int = 256,
    progress: bool | None = None,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Explain ``sources`` (``(name, path or image)`` pairs) with ``methods`` into the report
    folder ``out`` (pictures, ``results.json`` and ``index.html``); returns the document.

    The whole request is checked first (:func:`check_request`, :func:`check_report_folder`).
    An image that cannot be read is reported through ``log``, listed under ``skipped`` and
    left out; a method that refuses one image (a ``RequestError``, such as too few superpixels)
    is recorded on that image's card and under ``refused``, and the others go on. The report is
    written into a fresh folder beside ``out`` and replaces ``out`` as a whole at the end; if
    the run fails or is interrupted, that folder is removed and ``out`` stays as it was. One
    progress bar covers the whole run.
    """
    from convlens.report.page import write

    params = params or {}
    check_request(model, methods, params, target, batch_size, curve_steps, feature_steps)
    folder = check_report_folder(out)
    # per image: the methods, the deletion/insertion curves, at most one features step
    total = len(sources) * (len(methods) + 1 + int(features))
    staging = make_staging_folder(folder)
    bar = tqdm(total=total, desc="report", unit="step", disable=progress is False, delay=1.0)
    try:
        document = _run(model, sources, methods, staging, params, target, batch_size, seed,
                        curve_steps, features, feature_steps, log, bar)  # fmt: skip
        write(staging, document)
        replace_folder(staging, folder)
    except BaseException:  # an error, Ctrl-C, SIGTERM made an exception: the old report stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return document


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _run(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    out: Path,
    params: dict[str, dict[str, Any]],
    target: Any,
    batch_size: int | None,
    seed: int,
    curve_steps: int,
    features: bool,
    feature_steps: int,
    log: Callable[[str], None],
    bar: Any,
) -> dict[str, Any]:
    from convlens.api import explain
    from convlens.metrics import deletion, insertion

    per_image = len(methods) + 1
    images: list[dict[str, Any]] = []
    inputs: list[torch.Tensor] = []
    skipped: list[dict[str, str]] = []
    refused: list[dict[str, str]] = []
    started = time.perf_counter()
    for index, (name, source) in enumerate(sources):
        try:
            x = model.inputs(source)
        except (ImageError, OSError, RequestError) as error:  # the image, not a bug: skip it
            reason = _first_line(error)
            log(f"convlens: skipping {printable(name)}: {printable(reason)}")
            skipped.append({"image": str(name), "reason": reason})
            bar.update(per_image)
            continue
        stem = _stem(index, str(name))
        save_picture(_display(model, x), out / f"{stem}.png")
        probabilities = model.predict(x)[0]
        top = probabilities.topk(min(TOP, len(probabilities)))
        entry: dict[str, Any] = {
            "image": str(name),
            "input": f"{stem}.png",
            "top5": [
                {"class": int(c), "label": model.label(int(c)), "probability": float(p)}
                for p, c in zip(top.values, top.indices, strict=True)
            ],
            "methods": {},
        }
        entry |= {k: entry["top5"][0][k] for k in ("class", "label", "probability")}
        heatmaps, explained, done = [], [], []
        for method in methods:
            bar.set_postfix_str(f"{stem}: {method}")
            try:
                e = explain(
                    model, x, method=method, target=target, batch_size=batch_size, seed=seed,
                    progress=False, **params.get(method, {}),
                )  # fmt: skip
            except RequestError as error:  # the method refuses this image: the others go on
                reason = _first_line(error)
                log(f"convlens: {method} refused {printable(name)}: {printable(reason)}")
                entry["methods"][method] = {"refused": reason}
                refused.append({"image": str(name), "method": method, "reason": reason})
                bar.update(1)
                continue
            file = f"{stem}_{method}.png"
            e.save(out / file)
            summary = e.summary()
            record: dict[str, Any] = {
                "file": file,
                "target": summary["targets"][0],
                "label": summary["labels"][0],
                "seconds": summary["seconds"],
                "forwards": summary["forwards"],
                "params": summary["params"],
                "extras": summary["extras"],
            }
            if any(e.extras.get("saturated", [])):
                record["note"] = (
                    "no explanation: the prediction did not move under any mask (saturated)"
                )
            if "superpixels" in e.extras or "anchor" in e.extras:
                record["superpixels"] = f"{stem}_{method}_superpixels.png"
                save_picture(e.superpixels(), out / record["superpixels"])
            entry["methods"][method] = record
            heatmaps.append(e.heatmap()[0])
            explained.append(e.targets[0])
            done.append(method)
            bar.update(1)
        bar.set_postfix_str(f"{stem}: deletion/insertion")
        if done:
            batch = x.expand(len(done), *x.shape[1:])
            maps = torch.stack(heatmaps)
            classes = explained if all(isinstance(t, int) for t in explained) else None
            common = {
                "steps": curve_steps,
                "batch_size": batch_size,
                "target": classes,
                "progress": False,
            }
            removed = deletion(model, batch, maps, **common)
            added = insertion(model, batch, maps, **common)
            for i, method in enumerate(done):
                entry["methods"][method]["deletion"] = float(removed.auc[i])
                entry["methods"][method]["insertion"] = float(added.auc[i])
        bar.update(1)
        images.append(entry)
        inputs.append(x)
    document: dict[str, Any] = {
        "model": model.name,
        "methods": list(methods),
        "curve_steps": curve_steps,
        "images": images,
        "skipped": skipped,
        "refused": refused,
        "ranking": ranking(images, methods),
        "features": [],
    }
    if features and images:
        document["features"] = _features(
            model, images, torch.cat(inputs), out, feature_steps, seed, bar
        )
    bar.update(bar.total - bar.n)
    document["seconds"] = time.perf_counter() - started
    return document


def _display(model: Model, x: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(model.to_display(x)[0])


def _features(
    model: Model,
    images: list[dict[str, Any]],
    x: torch.Tensor,
    out: Path,
    steps: int,
    seed: int,
    bar: Any,
) -> list[dict[str, Any]]:
    """For each predicted class: its class model image, and the top patches (over the report's
    images) of the channel of the CAM layer that contributes most to it on its first image."""
    from convlens import features

    layer = features.common.resolve_layer(model, None, x[:1])
    entries = []
    classes = list(dict.fromkeys(image["class"] for image in images))
    for c in classes:
        bar.set_postfix_str(printable(f"features of {model.label(c)}"))
        first = next(i for i, image in enumerate(images) if image["class"] == c)
        contributions = features.channel_contributions(model, x[first : first + 1], c, layer)[0]
        channel = int(contributions.argmax())
        synthesis = features.class_model(model, c, steps=steps, seed=seed, progress=False)
        patches = features.top_patches(model, x, layer, channel=channel, k=len(x), progress=False)
        stem = f"class_{c}"
        synthesis.save(out / f"{stem}_model.png")
        patches.save(out / f"{stem}_patches.png")
        entries.append(
            {
                "class": c,
                "label": model.label(c),
                "class_model": f"{stem}_model.png",
                "layer": layer,
                "channel": channel,
                "contribution": float(contributions[channel]),
                "share": float(
                    contributions[channel] / contributions.clamp(min=0).sum().clamp(min=1e-12)
                ),
                "patches": f"{stem}_patches.png",
                "steps": steps,
            }
        )
        bar.update(1)
    return entries
