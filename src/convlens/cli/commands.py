"""The commands: ``explain``, ``train``, ``evaluate``, ``features`` and ``methods``, each a
function of the parsed arguments that returns the exit status."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from convlens.checks import RequestError, first_line, positive_int
from convlens.cli.requests import (
    UsageError,
    background_paths,
    load_model,
    model_options,
    parse_keywords,
    parse_methods,
    parse_params,
    parse_target,
    read_targets_file,
    say,
)
from convlens.files import check_output, printable, write_atomic

__all__ = [
    "FEATURES",
    "run_audit",
    "run_evaluate",
    "run_explain",
    "run_features",
    "run_methods",
    "run_train",
]


def run_explain(args: argparse.Namespace) -> int:
    import convlens as cl
    from convlens import report
    from convlens.report.run import check_target

    methods = parse_methods(args.methods)
    params = parse_params(args.param, methods)
    target = parse_target(args.target, top=True)
    if args.layer is not None:  # the CAM family's layer, unless a --param gave one
        from convlens.registry import get_method

        for method in methods:
            if get_method(method).uses_layer:
                params[method].setdefault("layer", args.layer)
    if not args.images and not args.samples:
        raise UsageError("give image files, or --samples for the bundled photos")
    if args.curve_steps < 2:
        raise UsageError("--curve-steps must be at least 2")
    background = background_paths(args, methods, params)
    sources: list[tuple[str, Any]] = [(str(path), path) for path in args.images]
    if args.samples:
        sources += list(cl.sample_images().items())
    rows = {}
    if args.targets_file is not None:  # its rows win over --target, image by image
        rows = read_targets_file(args.targets_file, [name for name, _ in sources])
    out = report.check_report_folder(args.out)
    model = load_model(args)
    targets = {name: spec for name, (_, spec) in rows.items()}
    for line, spec in rows.values():
        try:
            check_target(model, spec)
        except RequestError as error:
            where = f"--targets-file {printable(args.targets_file)} line {line}"
            raise UsageError(f"{where}: {error}") from None
    reference = None
    if background:  # drawn with --seed; unreadable files are skipped and reported
        reference = report.load_background(
            model, background, args.background_size, args.seed, log=say
        )
    # the whole request, before the first forward pass (explain_images checks it again)
    report.check_request(
        model, methods, params, target, args.batch_size, args.curve_steps, args.feature_steps,
        targets=targets, background=reference,
    )  # fmt: skip
    document = report.explain_images(
        model, sources, methods, out, params=params, target=target,
        batch_size=args.batch_size, seed=args.seed, curve_steps=args.curve_steps,
        features=args.features, feature_steps=args.feature_steps, log=say,
        targets=targets, background=reference, save_attributions=args.save_attributions,
        sanity=args.sanity,
    )  # fmt: skip
    notes = [f"{len(document[key])} {key}" for key in ("skipped", "refused") if document[key]]
    print(
        printable(
            f"wrote {len(document['images'])} image(s) x {len(methods)} method(s): "
            f"{Path(args.out) / 'index.html'}" + (f" ({', '.join(notes)})" if notes else "")
        )
    )
    return 1 if notes else 0


def run_train(args: argparse.Namespace) -> int:
    from convlens.train import train

    options = model_options(args)  # the input size is any network's, the others --arch's
    size = options.pop("input_size", None) or args.image_size
    if args.arch is None and (options or args.head is not None):
        option = "--head" if args.head is not None else "--" + next(iter(options))
        raise UsageError(f"{option} is for --arch SPEC (the bundled Lite0 has its own)")
    train(
        args.data_dir, args.out, epochs=args.epochs, freeze_backbone=not args.fine_tune_all,
        val_fraction=args.val_fraction, batch_size=args.batch_size, lr=args.lr,
        augment=not args.no_augment, balance=not args.no_class_weights, image_size=size,
        seed=args.seed, log=say, arch=args.arch, head=args.head, **options,
    )  # fmt: skip
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    params = parse_params(args.param, methods)
    if args.batch_size is not None:
        positive_int("--batch-size", args.batch_size)
    if args.images:
        return _evaluate_images(args, methods, params)
    if args.boxes is not None:
        raise UsageError("--boxes goes with image files: convlens evaluate IMAGE... --boxes FILE")
    return _evaluate_shapes(args, methods, params)


def _evaluate_images(
    args: argparse.Namespace, methods: list[str], params: dict[str, dict[str, Any]]
) -> int:
    """``convlens evaluate IMAGE... [--boxes FILE]``: the methods on the user's images."""
    from convlens.boxes import check_image_sizes, match_images, read_boxes
    from convlens.report.evaluation import check_evaluation_folder, evaluate_images

    if args.shapes is not None:
        raise UsageError("give image files or --shapes N, not both")
    positive_int("--curve-steps", args.curve_steps, minimum=2)
    sources: list[tuple[str, Any]] = [(str(path), path) for path in args.images]
    boxes = read_boxes(args.boxes) if args.boxes is not None else None
    if boxes is not None:  # before the model loads: a box file of resized copies
        check_image_sizes(boxes, sources, match_images(boxes, [name for name, _ in sources]))
    out = check_evaluation_folder(args.out)
    model = load_model(args)
    document = evaluate_images(
        model, sources, methods, out, boxes=boxes, params=params, batch_size=args.batch_size,
        seed=args.seed, curve_steps=args.curve_steps, log=say,
    )  # fmt: skip
    print((out / "evaluation.md").read_text("utf-8"), end="")
    notes = [f"{len(document[key])} {key}" for key in ("skipped", "refused") if document[key]]
    say(
        f"wrote {printable(args.out)}/index.html, evaluation.md and evaluation.json"
        + (f" ({', '.join(notes)})" if notes else "")
    )
    return 1 if notes else 0


def _evaluate_shapes(
    args: argparse.Namespace, methods: list[str], params: dict[str, dict[str, Any]]
) -> int:
    """``convlens evaluate [--shapes N]``: the benchmark on synthetic shapes."""
    import convlens as cl
    from convlens.datasets import shapes
    from convlens.metrics.benchmark import evaluate_methods, markdown_table, model_accuracy
    from convlens.report import check_methods

    count = args.shapes if args.shapes is not None else 16
    if count < 1 or args.sanity_images < 1:
        raise UsageError("--shapes and --sanity-images must be positive")
    out = check_output(args.out, "folder")
    model = load_model(args, default="shapes-cnn")
    if model.labels is None or tuple(model.labels) != cl.datasets.SHAPES:
        raise UsageError(f"the benchmark needs a model of the shapes classes, not {model.name}")
    check_methods(model, methods, params)  # before the first forward pass
    data = shapes(count, size=model.input_size[0], seed=args.data_seed)
    accuracy = model_accuracy(model, data)
    say(f"{model.name} on {count} shapes images (seed {args.data_seed}): accuracy {accuracy:.3f}")
    rows = evaluate_methods(
        model, data, methods, params, sanity_images=min(args.sanity_images, count),
        seed=args.seed, batch_size=args.batch_size, on_method=lambda name: say(f"  {name}"),
    )  # fmt: skip
    table = markdown_table(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "model": model.name,
        "images": count,
        "data_seed": args.data_seed,
        "accuracy": accuracy,
        "rows": rows,
    }
    write_atomic(out / "evaluation.json", json.dumps(document, indent=2).encode())
    write_atomic(out / "evaluation.md", (table + "\n").encode())
    say(f"wrote {out}/evaluation.md and {out}/evaluation.json")
    return 0


FEATURES = ("filters", "activations", "patches", "class-model", "dream", "embedding", "dissect")


def _feature_images(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    """The images a features command works on (a model input batch) and their shapes data."""
    import torch

    import convlens as cl

    if args.shapes:
        from convlens.datasets import shapes
        from convlens.metrics.benchmark import model_inputs

        data = shapes(args.shapes, size=model.input_size[0], seed=args.seed)
        return model_inputs(model, data), data
    sources: list[Any] = [str(path) for path in args.images]
    if args.samples:
        sources += list(cl.sample_images().values())
    if not sources:
        raise UsageError("give image files, --samples or --shapes N")
    return torch.cat([model.inputs(source) for source in sources]), None


def _load_concepts(path: str, n_images: int | None = None) -> Any:
    """The ``--concepts`` file: ``{name: (N, H, W) masks}`` saved with ``torch.save``, checked
    (with ``n_images`` masks per concept when given)."""
    import torch

    from convlens.features.dissect import check_concepts

    if not Path(path).is_file():
        raise FileNotFoundError(f"concepts file not found: {path}")
    try:
        concepts = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure: the file is not what was asked for
        message = first_line(error)
        raise UsageError(f"cannot read --concepts {path}: {message}") from None
    if not isinstance(concepts, dict):
        raise UsageError(
            f"--concepts {path} holds a {type(concepts).__name__}, not {{name: (N, H, W) masks}}"
        )
    try:
        return check_concepts(concepts, n_images)
    except RequestError as error:
        raise UsageError(f"--concepts {path}: {error}") from None


def _folder_images(args: argparse.Namespace, option: str, model: Any) -> Any:
    """The images of ``--concept DIR`` or ``--random DIR`` (tcav), as a model input batch."""
    import torch

    from convlens import report

    folder = getattr(args, option)
    if folder is None:
        raise UsageError(f"tcav needs --{option} DIR (a folder of images)")
    if not Path(folder).is_dir():
        raise UsageError(f"--{option} {printable(folder)} is not a folder")
    try:
        files = report.background_files([folder])
    except RequestError:  # its wording names the "background"
        raise UsageError(f"--{option} {printable(folder)} holds no images") from None
    return torch.cat([model.inputs(str(path)) for path in files])


BRODEN_LIMIT = 1000  # the default --limit: images the dissect command draws from a Broden folder


def _read_broden(args: argparse.Namespace, model: Any) -> Any:
    """``--concepts DIR``, a Broden-style folder: ``--limit`` images drawn with ``--seed``, as
    a lazy record (``cl.datasets.read_broden``) that brings its images (None for the batch);
    None for a file."""
    from convlens.datasets import read_broden

    if not Path(args.concepts).is_dir():
        return None
    if args.images or args.samples or args.shapes:
        folder = printable(args.concepts)
        raise UsageError(f"--concepts {folder} is a Broden folder: it brings its own images")
    try:
        broden = read_broden(args.concepts, limit=args.limit, seed=args.seed, lazy=True)
    except RequestError as error:
        raise UsageError(f"--concepts {printable(args.concepts)}: {first_line(error)}") from None
    return None, broden


# what a features command sets itself, not open to --param
FEATURE_RESERVED = (
    "layer", "channel", "k", "seed", "labels", "progress", "concept_masks", "target", "runs"
)  # fmt: skip


def run_features(args: argparse.Namespace) -> int:
    from convlens import features
    from convlens.cli import FEATURE_FUNCTIONS
    from convlens.report.run import check_target

    kind, layer = args.kind, getattr(args, "layer", None)
    function = getattr(features, FEATURE_FUNCTIONS[kind])
    out = check_output(args.out, "folder")
    params = parse_keywords(args.param, function, f"features {kind}", FEATURE_RESERVED)
    for option in ("k", "channel", "shapes", "steps", "runs", "limit"):
        value = getattr(args, option, None)
        if value is not None:
            least = {"channel": 0, "shapes": 0, "runs": 2}.get(option, 1)
            positive_int(f"--{option}", value, minimum=least)
    if getattr(args, "steps", None) is not None:
        if "steps" in params:
            raise UsageError("give --steps or --param steps=..., not both")
        params["steps"] = args.steps
    model = load_model(args)
    # the whole request, before the first forward pass
    if kind == "tcav" and layer is not None:
        layer = [name.strip() for name in layer.split(",")]
    for name in [layer] if isinstance(layer, str) else layer or []:
        model.layer(name)
    if kind in ("class-model", "tcav"):
        if args.target is None:
            raise UsageError(f"{kind} needs --target (a class index or label name)")
        check_target(model, parse_target(args.target))
    if kind == "tcav":
        examples = {option: _folder_images(args, option, model) for option in ("concept", "random")}
    if kind == "dissect" and not args.concepts and not args.shapes:
        raise UsageError("dissect needs --concepts FILE.pt or BRODEN_FOLDER, or --shapes N")
    broden = _read_broden(args, model) if kind == "dissect" and args.concepts else None
    if kind == "dissect" and args.concepts and broden is None:
        _load_concepts(args.concepts)  # its form; the number of masks once images are read
    near = None
    if kind == "filters":
        result = features.filters(model, layer, **params)
    elif kind == "class-model":
        result = features.class_model(model, parse_target(args.target), seed=args.seed, **params)
    else:
        x, data = broden if broden is not None else _feature_images(args, model)
        if kind == "activations":
            result = features.activations(model, x[:1], layer, **params)
        elif kind == "patches":
            result = features.top_patches(model, x, layer, channel=args.channel, k=args.k, **params)
        elif kind == "dream":
            result = features.deep_dream(model, x[:1], layer, seed=args.seed, **params)
        elif kind == "invert":
            result = features.invert(model, x[:1], layer, seed=args.seed, **params)
        elif kind == "tcav":
            result = features.tcav(
                model, x, examples["concept"], examples["random"], layer,
                parse_target(args.target), runs=args.runs, seed=args.seed, **params,
            )  # fmt: skip
        elif kind == "embedding":
            labels = data.labels if data is not None else None
            result = features.tsne(model, x, labels=labels, layer=layer, seed=args.seed, **params)
            near = features.neighbours(model, x[:1], x, k=min(args.k, len(x)), layer=layer)
        else:  # dissect
            if broden is not None:  # a Broden folder's masks, and which images are labelled
                concepts = data
            elif args.concepts:  # once more, now that the number of images is known
                concepts = _load_concepts(args.concepts, len(x))
            else:  # each shape's masks are one concept
                concepts = {
                    name: data.masks & (data.labels == c).view(-1, 1, 1)
                    for c, name in enumerate(data.classes)
                }
            result = features.dissect(model, x, concepts, layer, **params)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused request writes nothing
    if near is not None:
        near.save(str(out / "neighbours.png"))
    picture = out / f"{kind}.png"
    result.save(str(picture))
    summary = {"kind": kind, "model": model.name, "params": params, **result.info}
    write_atomic(out / f"{kind}.json", json.dumps(summary, indent=2, default=str).encode())
    print(printable(f"wrote {picture} and {out / (kind + '.json')}"))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """``convlens audit DATA``: every image of a data set explained, rows in Parquet."""
    from convlens import audit

    methods = parse_methods(args.methods)
    params = parse_params(args.param, methods)
    chosen = args.spray or methods[0]
    if chosen not in methods:
        raise UsageError(f"--spray {chosen}: not one of the selected --methods")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    data: Any = args.data[0] if len(args.data) == 1 else list(args.data)
    if len(args.data) == 1 and Path(args.data[0]).suffix.lower() not in (".csv", ".parquet"):
        data = args.data[0] if Path(args.data[0]).is_dir() else [args.data[0]]
    model = load_model(args)
    engine = "ray" if args.ray is not None else "local"
    address = args.ray if isinstance(args.ray, str) else None
    results = audit.run(
        model, data, methods, args.out, engine, params=params, boxes=args.boxes,
        seed=args.seed, steps=args.curve_steps, save_maps=args.save_maps, address=address,
        workers=args.workers, spray=chosen,
    )  # fmt: skip
    summary = json.loads((Path(args.out) / "strategies.json").read_text())
    found = [
        f"{c['label']}: {c['n_clusters']} strategies {c['sizes']}"
        for c in summary["classes"]
        if "n_clusters" in c
    ]
    say(f"SpRAy on {chosen} maps: " + ("; ".join(found) or "no class with enough maps"))
    print(printable(f"wrote {results} and {Path(args.out) / 'index.html'}"))
    return 0


def run_methods(args: argparse.Namespace) -> int:
    import textwrap

    from convlens.registry import get_method, list_methods

    indent = " " * 37
    for name in list_methods(args.family):
        cls = get_method(name)
        print(f"{name:22s} {cls.family:13s} {cls.description}")
        given = ", ".join(f"{key}={value!r}" for key, value in cls.defaults.items()) or "none"
        for line in (f"parameters: {given}", f"forward passes per image: {cls.passes}"):
            print(textwrap.fill(line, 100, initial_indent=indent, subsequent_indent=indent + "  "))
    return 0
