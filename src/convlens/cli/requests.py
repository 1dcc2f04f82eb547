"""What the user asked for on the command line, parsed and checked: methods, targets, method
parameters, the model spec and its factory options, a targets file and a background set.
Each problem is a :class:`UsageError`, printed as one line with exit status 2."""

from __future__ import annotations

import argparse
import ast
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convlens.files import printable

__all__ = [
    "TARGET_FORMS",
    "UsageError",
    "background_paths",
    "load_model",
    "model_options",
    "numbers",
    "parse_keywords",
    "parse_methods",
    "parse_params",
    "parse_target",
    "read_targets_file",
    "say",
]


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def say(text: str) -> None:
    """A line on stderr, user-supplied names shown with their control characters escaped."""
    from tqdm.auto import tqdm

    tqdm.write(printable(text), file=sys.stderr)


def parse_methods(text: str) -> list[str]:
    from convlens.registry import get_method, list_methods

    if text.strip() == "all":
        return list_methods()
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--methods is empty; give NAME[,NAME...] or 'all'")
    for name in names:
        get_method(name)  # raises with the list of known methods
    return names


TARGET_FORMS = (
    "predicted, INDEX, LABEL, top:K (one map per each of the K most probable classes), "
    "contrast:P,Q (why P rather than Q), channel:LAYER:C or neuron:LAYER:C:Y:X"
)


def parse_target(text: str | None, top: bool = False, what: str = "--target") -> Any:
    """``--target``: one of :data:`TARGET_FORMS` (classes as indices or label names);
    ``top:K`` (a ``report.Top``) only where ``top`` is true (the report); errors start with
    ``what`` and the text."""
    from convlens.targets import Channel, Contrast, Neuron

    def number(part: str) -> int:
        try:
            return int(part)
        except ValueError:
            raise UsageError(f"{what} {text!r}: {part!r} is not an integer") from None

    def label(part: str) -> int | str:
        return int(part) if part.strip().lstrip("-").isdigit() else part

    if text is None or text == "predicted":
        return None
    kind, sep, rest = text.partition(":")
    if sep and kind == "top":
        from convlens.report import Top

        if not top:
            raise UsageError(f"{what} {text!r}: top:K is for `convlens explain` only")
        if not rest.strip().isdigit() or int(rest) < 1:
            raise UsageError(f"{what} {text!r}: K of top:K must be a positive integer")
        return Top(int(rest))
    if sep and kind in ("contrast", "channel", "neuron"):
        parts = rest.split(",") if kind == "contrast" else rest.split(":")
        if kind == "contrast" and len(parts) == 2 and all(parts):
            return Contrast(label(parts[0]), label(parts[1]))
        if kind == "channel" and len(parts) == 2 and parts[0]:
            return Channel(parts[0], number(parts[1]))
        if kind == "neuron" and len(parts) == 4 and parts[0]:
            return Neuron(parts[0], *(number(p) for p in parts[1:]))
        raise UsageError(f"{what} {text!r}: expected {TARGET_FORMS}")
    return label(text)  # a class index, or a label name checked against the model's labels


def _literal(raw: str) -> Any:
    """A ``--param`` value: a Python literal (``32``, ``0.5``, ``True``, ``(1, 2)``), else the
    text itself."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return raw  # not a Python literal ("{[1]: 2}" is a TypeError): the text itself


def parse_keywords(
    items: Sequence[str], function: Any, what: str, reserved: Sequence[str] = ()
) -> dict[str, Any]:
    """``--param name=value`` pairs for ``function`` (a ``features`` function): each name must
    be one of its keyword parameters with a default, other than those the command sets."""
    import inspect

    takes = [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in reserved
    ]
    given: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--param {item!r} must look like name=value")
        if name not in takes:
            raise UsageError(f"{what} takes no parameter {name!r}; it takes {', '.join(takes)}")
        given[name] = _literal(raw)
    return given


def parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param name=value`` pairs, given to each selected method that takes ``name``;
    ``--param method.name=value`` gives one method its own value."""
    from convlens.registry import get_method

    per_method: dict[str, dict[str, Any]] = {name: {} for name in methods}
    scoped: list[tuple[str, str, Any]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r} must look like name=value or method.name=value")
        value = _literal(raw)
        method, dot, name = key.rpartition(".")
        if dot:
            if method not in per_method:
                raise UsageError(f"--param {item!r} names {method!r}, which is not selected")
            if name not in get_method(method).defaults:
                raise UsageError(f"method {method!r} takes no parameter {name!r}")
            scoped.append((method, name, value))
            continue
        takers = [m for m in methods if name in get_method(m).defaults]
        if not takers:
            raise UsageError(f"no selected method takes the parameter {name!r}")
        for m in takers:
            per_method[m][name] = value
    for method, name, value in scoped:  # a method's own value wins over a shared one
        per_method[method][name] = value
    return per_method


def numbers(option: str, text: str | None, kind: type = float) -> list[Any] | None:
    """``--mean 0.5,0.5,0.5`` / ``--input-size 224,192`` as numbers (``None`` when absent)."""
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UsageError(f"{option} {text!r}: expected comma-separated {what}") from None
    return values


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The factory options given on the command line (absent ones left out)."""
    size = numbers("--input-size", getattr(args, "input_size", None), int)
    if size is not None and len(size) not in (1, 2):
        raise UsageError(f"--input-size {args.input_size!r}: give H or H,W")
    options = {
        "weights": getattr(args, "weights", None),
        "labels": getattr(args, "labels", None),
        "input_size": None if size is None else (size[0], size[-1]),
        "mean": numbers("--mean", getattr(args, "mean", None)),
        "std": numbers("--std", getattr(args, "std", None)),
    }
    if options["mean"] is not None or options["std"] is not None:
        counts = [len(options[k]) if options[k] is not None else 3 for k in ("mean", "std")]
        if counts[0] != counts[1] or counts[0] not in (1, 3):
            raise UsageError(
                f"--mean has {counts[0]} and --std {counts[1]} value(s) (3 when not given): give "
                "both, with one value per input channel (3 for RGB, 1 for grayscale)"
            )
    return {key: value for key, value in options.items() if value is not None}


def load_model(args: argparse.Namespace, default: str | None = None) -> Any:
    """The model ``--model`` names (``default`` when absent), with the factory options."""
    import convlens as cl
    from convlens.factories import is_factory

    spec = args.model if args.model is not None else default
    options = model_options(args)
    if options and not is_factory(spec):
        option = "--" + next(iter(options)).replace("_", "-")
        raise UsageError(
            f"{option} is for a factory --model (path/to/file.py:function or "
            f"package.module:function); {spec or 'the bundled model'} carries its own"
        )
    if is_factory(spec):
        return cl.load_model(spec, **options)
    return cl.load_model(spec, trust_code=getattr(args, "trust_code", False))


def read_targets_file(path: str, names: Sequence[str]) -> dict[str, tuple[int, Any]]:
    """``--targets-file``: a CSV with the header ``image,target`` and one row per image, its
    target in any ``--target`` form (a ``contrast:P,Q`` may be left unquoted); an image is
    matched by its path as given (``./`` and ``\\`` aside, as box files are:
    ``convlens.boxes.image_key``), else by its file name. Returns ``{name: (line, target)}``;
    a bad row, an image named twice or by no given image is a one-line error."""
    from convlens.boxes import image_key

    shown = printable(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--targets-file not found: {shown}")
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read --targets-file {shown}: {error}") from None
    reader = csv.reader(lines, strict=True)
    found: dict[str, tuple[int, Any]] = {}
    unknown: list[str] = []
    header = False
    while True:
        try:
            row = next(reader, None)
        except csv.Error as error:
            raise UsageError(f"--targets-file {shown} line {reader.line_num}: {error}") from None
        if row is None:
            break
        where = f"--targets-file {shown} line {reader.line_num}"
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if not header:
            if [cell.lower() for cell in cells] != ["image", "target"]:
                raise UsageError(f"{where}: the first row must be the header image,target")
            header = True
            continue
        if len(cells) < 2 or not cells[0] or not all(cells[1:]):
            raise UsageError(f"{where}: expected IMAGE,TARGET")
        image = cells[0]
        target = parse_target(",".join(cells[1:]), top=True, what=f"{where}: target")
        key = image_key(image)
        by_path = [n for n in names if image_key(n) == key]
        matches = by_path or [n for n in names if Path(image_key(n)).name == key]
        if len(set(matches)) > 1:
            what = (
                ("is the path of", "give each image once")
                if by_path
                else ("is the file name of", "give the path as on the command line")
            )
            raise UsageError(f"{where}: {image!r} {what[0]} {len(set(matches))} given images; "
                             f"{what[1]}")  # fmt: skip
        if not matches:
            unknown.append(image)
        elif matches[0] in found:
            raise UsageError(f"{where}: {image!r} already has a target (line "
                             f"{found[matches[0]][0]})")  # fmt: skip
        else:
            found[matches[0]] = (reader.line_num, target)
    if not header:
        raise UsageError(f"--targets-file {shown} is empty; expected the header image,target")
    if unknown:
        raise UsageError(f"--targets-file {shown} names images that are not given: "
                         + ", ".join(unknown))  # fmt: skip
    return found


def background_paths(
    args: argparse.Namespace, methods: list[str], params: dict[str, dict[str, Any]]
) -> list[str]:
    """``--background``'s folders and files (none without it), checked to hold images, and
    ``--background-size``; DeepSHAP without ``--background`` is refused, and so is a
    ``--background`` that none of ``methods`` takes."""
    from convlens import report

    if not args.background:
        if params.get("deeplift", {}).get("shap") is True:
            raise UsageError(
                "DeepSHAP (deeplift with shap=True) needs a reference set: give --background DIR"
            )
        return []
    if not report.background_users(methods, params):
        raise UsageError(f"--background: {report.unused_background(methods)}")
    if args.background_size < 1:
        raise UsageError("--background-size must be a positive integer")
    report.background_files(args.background)  # each exists, and each folder holds images
    return list(args.background)
