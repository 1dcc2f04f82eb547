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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from convlens.checks import RequestError, positive_int
from convlens.explanation import Explanation
from convlens.files import (
    check_output,
    make_staging_folder,
    printable,
    replace_folder,
    save_picture,
)
from convlens.images import ImageError
from convlens.model import Model
from convlens.report.inputs import (
    Background,
    Top,
    describe_target,
    targets_by_image,
    with_background,
)

__all__ = ["check_methods", "check_report_folder", "check_request", "explain_images", "ranking"]

# the files that make a folder a convlens report, which a new report may replace
REPORT_FILES = ("index.html", "results.json")

TOP = 5


def file_stem(index: int, name: str) -> str:
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40]
    return f"{index:02d}_{base or 'image'}"


def ranking(images: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method, averaged over the images: deletion AUC (lower is better), insertion
    AUC (higher is better), their difference (the ranking key, higher is better), seconds and
    forward passes. Rows are in rank order. With a ``Top(k)`` target only the rank-1 maps (the
    most probable class, each image's ``methods[name]`` record) count, so that methods are
    compared on the same target as without it; a method refused on an image leaves it out."""
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
    index out of range (the model's labels tell how many classes it has), an unknown layer,
    ``Top(k)`` with more classes than the model has."""
    from convlens.targets import Class, Contrast, check_class, check_target_spec, layer_of

    if isinstance(target, Top):
        if model.labels is not None and target.k > len(model.labels):
            raise RequestError(
                f"top:{target.k} asks for more classes than the model has ({len(model.labels)})"
            )
        return
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
    *,
    targets: Mapping[str, Any] | None = None,
    background: Background | torch.Tensor | None = None,
) -> None:
    """Refuse a report request that cannot be carried out, before its first forward pass:
    methods and their parameters with the reference set put in (:func:`check_methods`,
    :func:`~convlens.report.with_background`), the target and each image's own ``targets``
    (:func:`check_target`) and the numbers."""
    check_methods(model, methods, with_background(methods, params, background)[0])
    check_target(model, target)
    for item in (targets or {}).values():
        check_target(model, item)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    positive_int("curve_steps", curve_steps, minimum=2)
    positive_int("feature_steps", feature_steps)


def check_report_folder(
    out: str | Path, files: Sequence[str] = REPORT_FILES, what: str = "report"
) -> Path:
    """The folder a report may be written to, resolved: absent, empty or an earlier report
    (``files``, by default ``index.html`` and ``results.json``, and no sub-folders), which the
    new report replaces as a whole. Refuses a file, any other folder (its files would be lost),
    the current folder or one holding it, and a place that cannot be written."""
    out = Path(out)
    check_output(out, "folder")
    target = out.resolve()
    shown = printable(out)
    if target == Path(target.anchor):
        raise RequestError(f"--out {shown} is the root folder; give a folder for the {what}")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise RequestError(
            f"--out {shown} holds the current folder, which the {what} would replace; "
            "give another folder"
        )
    if target.is_dir():
        entries = list(target.iterdir())
        if entries and not (
            all((target / name).is_file() for name in files)
            and not any(entry.is_dir() for entry in entries)
        ):
            raise RequestError(
                f"--out {shown} is a folder that is not a convlens {what}; the {what} replaces "
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
    *,
    targets: Mapping[str, Any] | None = None,
    background: Background | torch.Tensor | None = None,
    save_attributions: bool = False,
) -> dict[str, Any]:
    """Explain ``sources`` (``(name, path or image)`` pairs) with ``methods`` into the report
    folder ``out`` (pictures, ``results.json`` and ``index.html``); returns the document.

    ``target`` is what every image is explained for: ``None`` (the predicted class), a class
    index or label name, a ``convlens.targets`` object, or :class:`~convlens.report.Top`
    ``(k)``: one map per each of the k most probable classes (rank 1 to k), each computed as
    ``cl.explain`` computes it for that class index alone (k explanations per method and
    image), with deletion/insertion curves for that class. ``targets`` (``{name: target}``)
    gives some images their own target; the others keep ``target``. ``background`` (a
    :class:`~convlens.report.Background` or a (K, C, H, W) tensor) is the reference set of
    DeepSHAP, GradientSHAP and ``baseline="mean"`` (:func:`~convlens.report.with_background`).
    ``save_attributions`` writes per image ``<stem>_attributions.npz``: each method's
    attribution (C, H, W) or (1, H, W) as float32, keyed by the method's name (with ``Top``:
    ``method@rank``, rank 1 to k).

    The whole request is checked first (:func:`check_request`, :func:`check_report_folder`).
    An image that cannot be read is reported through ``log``, listed under ``skipped`` and
    left out; a method that refuses one image (a ``RequestError``, such as too few superpixels)
    is recorded on that image's card and under ``refused``, and the others go on. The report is
    written into a fresh folder beside ``out`` and replaces ``out`` as a whole at the end; if
    the run fails or is interrupted, that folder is removed and ``out`` stays as it was. One
    progress bar covers the whole run.
    """
    from convlens.report.page import write

    if isinstance(background, torch.Tensor):
        background = Background(background)
    specs = targets_by_image([str(name) for name, _ in sources], target, targets)
    check_request(model, methods, params, target, batch_size, curve_steps, feature_steps,
                  targets=targets, background=background)  # fmt: skip
    params, notes = with_background(methods, params, background)
    folder = check_report_folder(out)
    # per image: each method once per map, the curves, at most one features step
    total = sum(len(methods) * _maps(spec) + 1 + int(features) for spec in specs)
    staging = make_staging_folder(folder)
    bar = tqdm(total=total, desc="report", unit="step", disable=progress is False, delay=1.0)
    job = _Job(model, list(methods), staging, params, notes, batch_size, seed, curve_steps,
               save_attributions, log, bar)  # fmt: skip
    try:
        document = _run(job, sources, specs, features, feature_steps)
        document["target"] = describe_target(model, target)
        document["background"] = background.record() if background is not None else None
        write(staging, document)
        replace_folder(staging, folder)
    except BaseException:  # an error, Ctrl-C, SIGTERM made an exception: the old report stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return document


def _maps(spec: Any) -> int:
    return spec.k if isinstance(spec, Top) else 1


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@dataclass
class _Job:
    """What every image of one report is explained with, and where it goes."""

    model: Model
    methods: list[str]
    out: Path
    params: dict[str, dict[str, Any]]
    notes: dict[str, str]  # method -> how its baseline from the background is recorded
    batch_size: int | None
    seed: int
    curve_steps: int
    save_attributions: bool
    log: Callable[[str], None]
    bar: Any
    refused: list[dict[str, Any]] = field(default_factory=list)


def _run(
    job: _Job,
    sources: Sequence[tuple[str, Any]],
    specs: list[Any],
    features: bool,
    feature_steps: int,
) -> dict[str, Any]:
    model = job.model
    images: list[dict[str, Any]] = []
    inputs: list[torch.Tensor] = []
    skipped: list[dict[str, str]] = []
    started = time.perf_counter()
    for index, ((name, source), spec) in enumerate(zip(sources, specs, strict=True)):
        try:
            x = model.inputs(source)
        except (ImageError, OSError, RequestError) as error:  # the image, not a bug: skip it
            reason = first_line(error)
            job.log(f"convlens: skipping {printable(name)}: {printable(reason)}")
            skipped.append({"image": str(name), "reason": reason})
            job.bar.update(len(job.methods) * _maps(spec) + 1)
            continue
        stem = file_stem(index, str(name))
        save_picture(_display(model, x), job.out / f"{stem}.png")
        images.append(_explain_image(job, x, str(name), stem, spec))
        job.bar.update(1)
        inputs.append(x)
    document: dict[str, Any] = {
        "model": model.name,
        "methods": list(job.methods),
        "curve_steps": job.curve_steps,
        "images": images,
        "skipped": skipped,
        "refused": job.refused,
        "ranking": ranking(images, job.methods),
        "features": [],
    }
    if features and images:
        document["features"] = _features(
            model, images, torch.cat(inputs), job.out, feature_steps, job.seed, job.bar
        )
    job.bar.update(job.bar.total - job.bar.n)
    document["seconds"] = time.perf_counter() - started
    return document


def _explain_image(job: _Job, x: torch.Tensor, name: str, stem: str, spec: Any) -> dict[str, Any]:
    """One image's card: its prediction, every method's map(s) with their deletion and
    insertion AUCs, and (when asked) its attributions file."""
    from convlens.metrics import deletion, insertion

    model = job.model
    probabilities = model.predict(x)[0]

    def classes(k: int) -> list[dict[str, Any]]:
        best = probabilities.topk(min(k, len(probabilities)))
        return [
            {"class": int(c), "label": model.label(int(c)), "probability": float(p)}
            for p, c in zip(best.values, best.indices, strict=True)
        ]

    entry: dict[str, Any] = {
        "image": name,
        "input": f"{stem}.png",
        "target": describe_target(model, spec),
        "top5": classes(TOP),
        "methods": {},
    }
    entry |= {k: entry["top5"][0][k] for k in ("class", "label", "probability")}
    ranks: list[dict[str, Any] | None] = [None]
    if isinstance(spec, Top):
        entry["top"] = [{"rank": r, **c} for r, c in enumerate(classes(spec.k), 1)]
        ranks = list(entry["top"])
    per_method: dict[str, list[dict[str, Any]]] = {}
    done: list[tuple[dict[str, Any], torch.Tensor, Any]] = []  # record, heat map, target
    arrays: dict[str, Any] = {}
    for method in job.methods:
        per_method[method] = []
        for rank in ranks:
            at = stem if rank is None else f"{stem}_top{rank['rank']}"
            record, e = _one_map(job, x, name, method, spec if rank is None else rank, at)
            per_method[method].append(record)
            if e is not None:
                done.append((record, e.heatmap()[0], e.targets[0]))
                if job.save_attributions:
                    key = method if rank is None else f"{method}@{rank['rank']}"
                    arrays[key] = e.attribution[0].detach().float().cpu().numpy()
                    record["array"] = key
            job.bar.update(1)
    job.bar.set_postfix_str(f"{stem}: deletion/insertion")
    if done:
        batch = x.expand(len(done), *x.shape[1:])
        maps = torch.stack([heat for _, heat, _ in done])
        explained = [t for _, _, t in done]
        common = {
            "steps": job.curve_steps,
            "batch_size": job.batch_size,
            "target": explained if all(isinstance(t, int) for t in explained) else None,
            "progress": False,
        }
        removed = deletion(model, batch, maps, **common)
        added = insertion(model, batch, maps, **common)
        for i, (record, _, _) in enumerate(done):
            record["deletion"] = float(removed.auc[i])
            record["insertion"] = float(added.auc[i])
    for method, records in per_method.items():  # with Top: rank 1 first, every map under top
        entry["methods"][method] = records[0] if ranks == [None] else {**records[0], "top": records}
    if arrays:
        entry["attributions"] = f"{stem}_attributions.npz"
        with open(job.out / entry["attributions"], "wb") as file:
            np.savez(file, **arrays)
    return entry


def _one_map(
    job: _Job, x: torch.Tensor, name: str, method: str, target: Any, stem: str
) -> tuple[dict[str, Any], Explanation | None]:
    """One method's map of one image for ``target`` (a rank of ``Top``: a dict with its
    ``rank`` and ``class``): its record (pictures saved), and the explanation unless the
    method refused the image."""
    from convlens.api import explain

    head = dict(target) if isinstance(target, dict) else {}
    job.bar.set_postfix_str(f"{stem}: {method}")
    try:
        e = explain(
            job.model, x, method=method, target=head.get("class", target),
            batch_size=job.batch_size, seed=job.seed, progress=False, **job.params.get(method, {}),
        )  # fmt: skip
    except RequestError as error:  # the method refuses this image: the others go on
        reason = first_line(error)
        where = f" (rank {head['rank']})" if head else ""
        job.log(f"convlens: {method} refused {printable(name)}{where}: {printable(reason)}")
        rank = {"rank": head["rank"]} if head else {}
        job.refused.append({"image": name, "method": method, "reason": reason, **rank})
        return {**head, "refused": reason}, None
    file = f"{stem}_{method}.png"
    e.save(job.out / file)
    summary = e.summary()
    record: dict[str, Any] = {
        **head,
        "file": file,
        "target": summary["targets"][0],
        "label": summary["labels"][0],
        "seconds": summary["seconds"],
        "forwards": summary["forwards"],
        "params": summary["params"],
        "extras": summary["extras"],
    }
    if method in job.notes:  # the reference set, recorded by where it came from, not as numbers
        record["params"]["baseline"] = job.notes[method]
    if any(e.extras.get("saturated", [])):
        record["note"] = "no explanation: the prediction did not move under any mask (saturated)"
    if "superpixels" in e.extras or "anchor" in e.extras:
        record["superpixels"] = f"{stem}_{method}_superpixels.png"
        save_picture(e.superpixels(), job.out / record["superpixels"])
    return record, e


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
