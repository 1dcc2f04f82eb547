"""The work behind a report: explain every image with every method, score each map's
faithfulness (deletion and insertion, Petsiuk et al. 2018), optionally add indirect
explanations of the predicted classes, and write the pictures. Returns the JSON document that
``report.page`` turns into ``index.html``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from convlens.checks import RequestError
from convlens.files import save_picture
from convlens.images import ImageError
from convlens.model import Model

__all__ = ["explain_images", "ranking"]

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
        entries = [image["methods"][name] for image in images if name in image["methods"]]
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


def explain_images(
    model: Model,
    sources: Sequence[tuple[str, Any]],
    methods: Sequence[str],
    out: Path,
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
    """Explain ``sources`` (``(name, path or image)`` pairs) with ``methods`` into ``out``.

    An image that cannot be read is reported through ``log``, listed under ``skipped`` and
    left out; the others go on. One progress bar covers the whole run.
    """
    out.mkdir(parents=True, exist_ok=True)
    # per image: the methods, the deletion/insertion curves, at most one features step
    total = len(sources) * (len(methods) + 1 + int(features))
    bar = tqdm(total=total, desc="report", unit="step", disable=progress is False, delay=1.0)
    try:
        return _run(model, sources, methods, out, params or {}, target, batch_size, seed,
                    curve_steps, features, feature_steps, log, bar)  # fmt: skip
    finally:
        bar.close()


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
    started = time.perf_counter()
    for index, (name, source) in enumerate(sources):
        try:
            x = model.inputs(source)
        except (ImageError, OSError, RequestError) as error:  # the image, not a bug: skip it
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log(f"convlens: skipping {name}: {reason}")
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
        heatmaps, explained = [], []
        for method in methods:
            bar.set_postfix_str(f"{stem}: {method}")
            e = explain(
                model, x, method=method, target=target, batch_size=batch_size, seed=seed,
                progress=False, **params.get(method, {}),
            )  # fmt: skip
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
            if "superpixels" in e.extras or "anchor" in e.extras:
                record["superpixels"] = f"{stem}_{method}_superpixels.png"
                save_picture(e.superpixels(), out / record["superpixels"])
            entry["methods"][method] = record
            heatmaps.append(e.heatmap()[0])
            explained.append(e.targets[0])
            bar.update(1)
        bar.set_postfix_str(f"{stem}: deletion/insertion")
        batch = x.expand(len(methods), *x.shape[1:])
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
        for i, method in enumerate(methods):
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

    layer = features.common.resolve_layer(model, None)
    entries = []
    classes = list(dict.fromkeys(image["class"] for image in images))
    for c in classes:
        bar.set_postfix_str(f"features of {model.label(c)}")
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
