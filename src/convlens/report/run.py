"""The work behind a report: explain every image with every method, score each map's
faithfulness (deletion and insertion curves, Petsiuk et al. 2018), check each map against the
map of another class and, when asked, against randomised models (:mod:`convlens.report.checks`,
Adebayo et al. 2018), rank the methods with bootstrap intervals (:mod:`convlens.report.ranking`),
optionally add indirect explanations of the predicted classes (:mod:`convlens.report.indirect`),
and write the pictures, ``results.json`` and ``index.html``.

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

from convlens import viz
from convlens.checks import RequestError, first_line
from convlens.explanation import Explanation
from convlens.files import (
    make_staging_folder,
    printable,
    replace_folder,
    save_picture,
)
from convlens.images import ImageError
from convlens.model import Model
from convlens.registry import get_method
from convlens.report.checks import (
    CLASS_THRESHOLD,
    MODEL_THRESHOLD,
    NO_CLASS_CHECK,
    class_sensitivity,
    not_applicable,
    other_class,
    plain,
    sanity_flags,
)
from convlens.report.indirect import features_section
from convlens.report.inputs import (
    Background,
    Top,
    describe_target,
    targets_by_image,
    with_background,
)
from convlens.report.ranking import NOTE, ranking
from convlens.report.request import (
    REPORT_FILES,
    check_methods,
    check_report_folder,
    check_request,
    check_target,
)

__all__ = [
    "REPORT_FILES",
    "check_methods",
    "check_report_folder",
    "check_request",
    "check_target",
    "explain_images",
    "ranking",
]

TOP = 5


def file_stem(index: int, name: str) -> str:
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40]
    return f"{index:02d}_{base or 'image'}"


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
    sanity: bool = False,
    class_check: bool = True,
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

    Each method's map of a class target (rank 1 with ``Top``) is checked against its map of a
    class from the middle of the model's ranking
    (:func:`~convlens.report.checks.class_sensitivity`): one more explanation per method and
    image, about as long as the maps themselves (``class_check=False`` leaves it out; it does
    not apply to anchors, whose map of a class the model does not predict means nothing).
    ``sanity`` adds the cascading model randomisation of Adebayo et al. 2018 per method on the
    images (:func:`~convlens.report.checks.sanity_flags`: one map per layer owning parameters,
    so it costs as many explanations per method as the model has such layers, batched over
    the images). Each map's deletion and insertion curves (Petsiuk et al. 2018) are kept as
    numbers, and the ranking has each method's bootstrap interval
    (:mod:`convlens.report.ranking`). Arrays too large for ``results.json`` (LIME's segments
    and samples, say) go to each image's ``<stem>_extras.npz``, referenced by file and key.

    The whole request is checked first (:func:`check_request`, :func:`check_report_folder`).
    An image that cannot be read is reported through ``log``, listed under ``skipped`` and
    left out; a method that refuses one image (a ``RequestError``, such as too few superpixels)
    is recorded on that image's card and under ``refused``, and the others go on. The report is
    written into a fresh folder beside ``out`` and replaces ``out`` as a whole at the end; if
    the run fails or is interrupted, that folder is removed and ``out`` stays as it was. One
    progress bar covers the whole run, one step per map (``progress=False``: none); unless
    ``progress=False``, each explanation, curve or feature that lasts over a second also shows
    its own bar (images, rate and time left).
    """
    from convlens.report.page import write

    if isinstance(background, torch.Tensor):
        background = Background(background)
    specs = targets_by_image([str(name) for name, _ in sources], target, targets)
    check_request(model, methods, params, target, batch_size, curve_steps, feature_steps,
                  targets=targets, background=background)  # fmt: skip
    params, notes = with_background(methods, params, background)
    folder = check_report_folder(out)
    # per image: each method once per map and once for its class check, the curves; then one
    # step per method for the sanity checks and one per predicted class for the features
    checks = int(class_check)
    total = sum(len(methods) * (_maps(spec) + checks) + 1 + int(features) for spec in specs)
    total += len(methods) * int(sanity)
    staging = make_staging_folder(folder)
    bar = tqdm(total=total, desc="report", unit="step", disable=progress is False, delay=1.0)
    job = _Job(model, list(methods), staging, params, notes, batch_size, seed, curve_steps,
               save_attributions, log, bar, False if progress is False else None,
               class_check)  # fmt: skip
    try:
        document = _run(job, sources, specs, features, feature_steps, sanity)
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
    progress: bool | None  # of each explanation's own bar (the engine's)
    class_check: bool  # compare each map with the map of another class
    refused: list[dict[str, Any]] = field(default_factory=list)

    def explain(self, x: torch.Tensor, method: str, target: Any) -> Explanation:
        """One explanation of ``x`` as the report makes them all."""
        from convlens.api import explain

        return explain(
            self.model, x, method=method, target=target, batch_size=self.batch_size,
            seed=self.seed, progress=self.progress, **self.params.get(method, {}),
        )  # fmt: skip


def _run(
    job: _Job,
    sources: Sequence[tuple[str, Any]],
    specs: list[Any],
    features: bool,
    feature_steps: int,
    sanity: bool,
) -> dict[str, Any]:
    model = job.model
    images: list[dict[str, Any]] = []
    inputs: list[torch.Tensor] = []
    explained: list[Any] = []  # each image's target request
    skipped: list[dict[str, str]] = []
    started = time.perf_counter()
    for index, ((name, source), spec) in enumerate(zip(sources, specs, strict=True)):
        try:
            x = model.inputs(source)
        except (ImageError, OSError, RequestError) as error:  # the image, not a bug: skip it
            reason = first_line(error)
            job.log(f"convlens: skipping {printable(name)}: {printable(reason)}")
            skipped.append({"image": str(name), "reason": reason})
            job.bar.update(len(job.methods) * (_maps(spec) + int(job.class_check)) + 1)
            continue
        stem = file_stem(index, str(name))
        save_picture(_display(model, x), job.out / f"{stem}.png")
        images.append(_explain_image(job, x, str(name), stem, spec))
        job.bar.update(1)
        inputs.append(x)
        explained.append(spec)
    document: dict[str, Any] = {
        "model": model.name,
        "methods": list(job.methods),
        "curve_steps": job.curve_steps,
        "images": images,
        "skipped": skipped,
        "refused": job.refused,
        "sanity": None,
        "features": [],
    }
    if sanity and images:
        document["sanity"] = _sanity(job, images, inputs, explained)
    document["ranking"] = ranking(images, job.methods, seed=job.seed)
    document["ranking_note"] = NOTE
    document["thresholds"] = {"class": CLASS_THRESHOLD, "model": MODEL_THRESHOLD}
    if features and images:
        document["features"] = features_section(
            model, images, torch.cat(inputs), job.out, feature_steps, job.seed, job.bar,
            job.progress,
        )  # fmt: skip
    job.bar.update(job.bar.total - job.bar.n)
    document["seconds"] = time.perf_counter() - started
    return document


def _explain_image(job: _Job, x: torch.Tensor, name: str, stem: str, spec: Any) -> dict[str, Any]:
    """One image's card: its prediction, every method's map(s) with their deletion and
    insertion curves and class check, and (when asked) its attributions file."""
    model = job.model
    probabilities = model.predict(x)[0]

    def described(c: int) -> dict[str, Any]:
        return {"class": c, "label": model.label(c), "probability": float(probabilities[c])}

    best = probabilities.topk(min(TOP, len(probabilities))).indices.tolist()
    entry: dict[str, Any] = {
        "image": name,
        "input": f"{stem}.png",
        "target": describe_target(model, spec),
        "top5": [described(int(c)) for c in best],
        "methods": {},
    }
    entry |= {k: entry["top5"][0][k] for k in ("class", "label", "probability")}
    ranks: list[dict[str, Any] | None] = [None]
    if isinstance(spec, Top):
        order = probabilities.topk(min(spec.k, len(probabilities))).indices.tolist()
        entry["top"] = [{"rank": r, **described(int(c))} for r, c in enumerate(order, 1)]
        ranks = list(entry["top"])
    per_method: dict[str, list[dict[str, Any]]] = {}
    done: list[tuple[dict[str, Any], torch.Tensor, Any]] = []  # record, heat map, target
    arrays: dict[str, Any] = {}  # attributions, when asked
    extras: dict[str, np.ndarray] = {}  # large arrays of the records, kept in an .npz file
    store = _store(extras, f"{stem}_extras.npz")
    for method in job.methods:
        per_method[method] = []
        first: torch.Tensor | None = None  # the first map's heat map, for the class check
        for rank in ranks:
            at = stem if rank is None else f"{stem}_top{rank['rank']}"
            key = method if rank is None else f"{method}@{rank['rank']}"
            record, e = _one_map(job, x, name, method, spec if rank is None else rank, at, key,
                                 store)  # fmt: skip
            per_method[method].append(record)
            if e is not None and rank is ranks[0]:
                first = e.heatmap()[0]
            if e is not None:
                if isinstance(record["target"], int):
                    record["probability"] = float(probabilities[record["target"]])
                done.append((record, e.heatmap()[0], e.targets[0]))
                if job.save_attributions:
                    arrays[key] = e.attribution[0].detach().float().cpu().numpy()
                    record["array"] = key
            job.bar.update(1)
        if job.class_check:
            _class_check(job, x, stem, method, per_method[method][0], first, probabilities,
                         described)  # fmt: skip
            job.bar.update(1)
    job.bar.set_postfix_str(f"{stem}: deletion/insertion")
    if done:
        _curves(job, x, done)
    for method, records in per_method.items():  # with Top: rank 1 first, every map under top
        entry["methods"][method] = records[0] if ranks == [None] else {**records[0], "top": records}
    if arrays:
        entry["attributions"] = f"{stem}_attributions.npz"
        with open(job.out / entry["attributions"], "wb") as file:
            np.savez(file, **arrays)
    if extras:
        entry["extras"] = f"{stem}_extras.npz"
        with open(job.out / entry["extras"], "wb") as file:
            np.savez_compressed(file, **extras)
    return entry


def _store(extras: dict[str, np.ndarray], file: str) -> Callable[[str, np.ndarray], dict[str, Any]]:
    """Where :func:`~convlens.report.checks.plain` keeps the arrays too large for
    ``results.json``: in ``extras`` (written to ``file``), referenced by file and key."""

    def keep(key: str, array: np.ndarray) -> dict[str, Any]:
        extras[key] = array
        return {"npz": file, "key": key, "shape": list(array.shape), "dtype": str(array.dtype)}

    return keep


def _curves(
    job: _Job, x: torch.Tensor, done: list[tuple[dict[str, Any], torch.Tensor, Any]]
) -> None:
    """Deletion and insertion curves (Petsiuk et al. 2018) of every map of one image, in one
    batch each; each record gets both AUCs and the curves as numbers."""
    from convlens.metrics import deletion, insertion

    batch = x.expand(len(done), *x.shape[1:])
    maps = torch.stack([heat for _, heat, _ in done])
    explained = [t for _, _, t in done]
    common = {
        "steps": job.curve_steps,
        "batch_size": job.batch_size,
        "target": explained if all(isinstance(t, int) for t in explained) else None,
        "progress": job.progress,
    }
    removed = deletion(job.model, batch, maps, **common)
    added = insertion(job.model, batch, maps, **common)
    fractions = [float(f) for f in removed.fractions]
    for i, (record, _, _) in enumerate(done):
        record["deletion"] = float(removed.auc[i])
        record["insertion"] = float(added.auc[i])
        record["curves"] = {
            "fractions": fractions,
            "deletion": [float(v) for v in removed.scores[i]],
            "insertion": [float(v) for v in added.scores[i]],
        }


def _class_check(
    job: _Job,
    x: torch.Tensor,
    stem: str,
    method: str,
    first: dict[str, Any],
    heat: torch.Tensor | None,
    probabilities: torch.Tensor,
    described: Callable[[int], dict[str, Any]],
) -> None:
    """The class-sensitivity check of one map (``first``, the rank-1 map with ``Top``) against
    a new map of the middle-ranked other class (:func:`~convlens.report.checks.other_class`).
    Not applied to targets that are not one class."""
    if heat is None:
        return
    target = first["target"]
    if not isinstance(target, int):
        first["class_sensitivity"] = not_applicable(
            "the map explains a channel, a neuron or a contrast, not one class"
        )
        return
    if method in NO_CLASS_CHECK:
        first["class_sensitivity"] = not_applicable(NO_CLASS_CHECK[method])
        return
    chosen, rank = other_class(probabilities, target)
    other = {**described(chosen), "rank": rank}
    job.bar.set_postfix_str(f"{stem}: {method} (class check)")
    started = time.perf_counter()
    try:
        second = job.explain(x, method, chosen).heatmap()[0]
    except RequestError as error:  # the method refuses the other class: recorded, no flag
        reason = f"{method} refused the other class: {first_line(error)}"
        first["class_sensitivity"] = class_sensitivity(heat, None, other, reason)
        return
    first["class_sensitivity"] = class_sensitivity(heat, second, other)
    first["class_sensitivity"]["seconds"] = time.perf_counter() - started


def _sanity(
    job: _Job, images: list[dict[str, Any]], inputs: list[torch.Tensor], specs: list[Any]
) -> dict[str, Any]:
    """The model randomisation test per method on the images it explained (rank 1 with
    ``Top``), each for the target its map explains; each record gets its result."""
    from convlens.targets import check_target_spec

    found: dict[str, Any] = {}
    for method in job.methods:
        job.bar.set_postfix_str(f"sanity: {method}")
        chosen = [i for i, image in enumerate(images) if "refused" not in image["methods"][method]]
        if chosen:
            targets = [
                images[i]["methods"][method]["target"]
                if isinstance(images[i]["methods"][method]["target"], int)
                else check_target_spec(specs[i], 1, job.model.labels)[0]
                for i in chosen
            ]
            x = torch.cat([inputs[i] for i in chosen])
            result = sanity_flags(job.model, method, x, targets, job.params.get(method, {}),
                                  job.seed, job.batch_size)  # fmt: skip
            result["images"] = [images[i]["image"] for i in chosen]
            for j, i in enumerate(chosen if "flags" in result else []):
                record = images[i]["methods"][method]
                record["sanity"] = {
                    "correlation": result["spearman"][j],
                    "ssim": result["ssim"][j],
                    "flag": result["flags"][j],
                }
                if "top" in record:  # the rank-1 card of a Top(k) report shows it too
                    record["top"][0]["sanity"] = record["sanity"]
            found[method] = result
        job.bar.update(1)
    return found


def _one_map(
    job: _Job,
    x: torch.Tensor,
    name: str,
    method: str,
    target: Any,
    stem: str,
    key: str,
    store: Callable[[str, np.ndarray], dict[str, Any]],
) -> tuple[dict[str, Any], Explanation | None]:
    """One method's map of one image for ``target`` (a rank of ``Top``: a dict with its
    ``rank`` and ``class``): its record (pictures saved: the overlay, its |map| and smoothed
    views where the map is speckled, the raw RGB picture of an input-channel attribution), and
    the explanation unless the method refused the image."""
    head = dict(target) if isinstance(target, dict) else {}
    if head.get("rank", 1) > 1 and get_method(method).prediction_only:  # not asked of it
        return {**head, "refused": f"{method} explains the prediction (rank 1) only"}, None
    job.bar.set_postfix_str(f"{stem}: {method}")
    try:
        e = job.explain(x, method, head.get("class", target))
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
    parameters = dict(e.params)
    if method in job.notes:  # the reference set, recorded by where it came from, not as numbers
        parameters["baseline"] = job.notes[method]
    record: dict[str, Any] = {
        **head,
        "file": file,
        "target": summary["targets"][0],
        "label": summary["labels"][0],
        "seconds": summary["seconds"],
        "forwards": summary["forwards"],
        "params": plain(parameters, store, f"{key}/params"),
        "extras": plain(dict(e.extras), store, f"{key}/extras"),
        "views": _views(job, e, stem, method, file),
    }
    if e.attribution.shape[1] == 3:  # the gradient family's own picture (and any RGB map's)
        record["raw"] = f"{stem}_{method}_raw.png"
        save_picture(e.raw_picture(0), job.out / record["raw"])
    if any(e.extras.get("saturated", [])):
        record["note"] = "no explanation: the prediction did not move under any mask (saturated)"
    heat = e.heatmap()[0]
    if float(heat.max()) == float(heat.min()):  # its curves would score the raster order
        record["constant"] = True
        record.setdefault(
            "note",
            f"a constant map (every pixel {float(heat.max()):.3g}): it ranks no pixel above "
            "another, so its curves score nothing of the method and it is left out of the ranking",
        )
    if "superpixels" in e.extras or "anchor" in e.extras:
        record["superpixels"] = f"{stem}_{method}_superpixels.png"
        save_picture(e.superpixels(), job.out / record["superpixels"])
    return record, e


def _views(job: _Job, e: Explanation, stem: str, method: str, file: str) -> list[dict[str, Any]]:
    """The views of the map a card can switch between, each with its picture and the values
    its colour bar's ends stand for (:func:`convlens.viz.map_range`): the signed map, and for
    a speckled map (:meth:`~convlens.Explanation.speckled`) its magnitude and a smoothed map."""
    heat = e.heatmap()[0].numpy()
    shown = ["signed", "abs", "smooth"] if e.speckled(0) else ["signed"]
    views = []
    for view in shown:
        picture = file if view == "signed" else f"{stem}_{method}_{view}.png"
        if view != "signed":
            save_picture(e.overlay(0, view=view), job.out / picture)
        low, high, signed = viz.map_range(viz.view_map(heat, view))
        views.append({"view": view, "file": picture, "low": low, "high": high, "signed": signed})
    return views


def _display(model: Model, x: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(model.to_display(x)[0])
