"""Checks of a report request, all made before its first forward pass: the methods and their
parameters, the target, the numbers and the folder the report goes to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from convlens.checks import RequestError, positive_int
from convlens.files import check_output, printable
from convlens.model import Model
from convlens.report.inputs import Background, Top, with_background

__all__ = ["REPORT_FILES", "check_methods", "check_report_folder", "check_request", "check_target"]

# the files that make a folder a convlens report, which a new report may replace
REPORT_FILES = ("index.html", "results.json")


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
    from convlens.targets import check_classes, check_target_spec, layer_of

    if isinstance(target, Top):
        if model.labels is not None and target.k > len(model.labels):
            raise RequestError(
                f"top:{target.k} asks for more classes than the model has ({len(model.labels)})"
            )
        return
    for item in check_target_spec(target, 1, model.labels):
        check_classes(item, model.labels)
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
