"""The ``convlens`` command line.

convlens explain IMAGE... --methods saliency,guided_backprop --target 285 --out DIR
convlens explain --samples --methods all --out demo-output
convlens methods
convlens evaluate --methods all --out evaluation
convlens features class-model --target 281 --out features/
convlens train photos/ --out skin.pt && convlens explain x.jpg --model skin.pt --methods all
"""

from __future__ import annotations

import argparse
import ast
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convlens.checks import RequestError, positive_int
from convlens.files import check_output, printable, write_atomic
from convlens.images import ImageError

__all__ = ["main"]


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


# What ``main`` prints as one line with exit status 2: the user's request cannot be carried out
# (a bad argument, a missing file, an unreadable image). Anything else is a bug, in convlens or
# in the model, and keeps its traceback.
USAGE_ERRORS = (UsageError, RequestError, FileNotFoundError, ImageError)


class Terminated(BaseException):
    """SIGTERM, raised where the command is so that it cleans up as after Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _say(text: str) -> None:
    """A line on stderr, user-supplied names shown with their control characters escaped."""
    from tqdm.auto import tqdm

    tqdm.write(printable(text), file=sys.stderr)


def _parse_methods(text: str) -> list[str]:
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
    "predicted, INDEX, LABEL, contrast:P,Q (why P rather than Q), channel:LAYER:C or "
    "neuron:LAYER:C:Y:X"
)


def _parse_target(text: str | None) -> Any:
    """``--target``: one of :data:`TARGET_FORMS` (classes as indices or label names)."""
    from convlens.targets import Channel, Contrast, Neuron

    def number(part: str) -> int:
        try:
            return int(part)
        except ValueError:
            raise UsageError(f"--target {text!r}: {part!r} is not an integer") from None

    def label(part: str) -> int | str:
        return int(part) if part.strip().lstrip("-").isdigit() else part

    if text is None or text == "predicted":
        return None
    kind, sep, rest = text.partition(":")
    if sep and kind in ("contrast", "channel", "neuron"):
        parts = rest.split(",") if kind == "contrast" else rest.split(":")
        if kind == "contrast" and len(parts) == 2 and all(parts):
            return Contrast(label(parts[0]), label(parts[1]))
        if kind == "channel" and len(parts) == 2 and parts[0]:
            return Channel(parts[0], number(parts[1]))
        if kind == "neuron" and len(parts) == 4 and parts[0]:
            return Neuron(parts[0], *(number(p) for p in parts[1:]))
        raise UsageError(f"--target {text!r}: expected {TARGET_FORMS}")
    return label(text)  # a class index, or a label name checked against the model's labels


def _parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param name=value`` pairs, given to each selected method that takes ``name``;
    ``--param method.name=value`` gives one method its own value."""
    from convlens.registry import get_method

    per_method: dict[str, dict[str, Any]] = {name: {} for name in methods}
    scoped: list[tuple[str, str, Any]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r} must look like name=value or method.name=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = raw  # not a Python literal ("{[1]: 2}" is a TypeError): the text itself
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


def _explain(args: argparse.Namespace) -> int:
    import convlens as cl
    from convlens import report

    methods = _parse_methods(args.methods)
    params = _parse_params(args.param, methods)
    target = _parse_target(args.target)
    if args.layer is not None:  # the CAM family's layer, unless a --param gave one
        from convlens.registry import get_method

        for method in methods:
            if get_method(method).uses_layer:
                params[method].setdefault("layer", args.layer)
    if not args.images and not args.samples:
        raise UsageError("give image files, or --samples for the bundled photos")
    if args.curve_steps < 2:
        raise UsageError("--curve-steps must be at least 2")
    out = report.check_report_folder(args.out)
    model = cl.load_model(args.model)
    # the whole request, before the first forward pass (explain_images checks it again)
    report.check_request(
        model, methods, params, target, args.batch_size, args.curve_steps, args.feature_steps
    )
    sources: list[tuple[str, Any]] = [(str(path), path) for path in args.images]
    if args.samples:
        sources += list(cl.sample_images().items())
    document = report.explain_images(
        model, sources, methods, out, params=params, target=target,
        batch_size=args.batch_size, seed=args.seed, curve_steps=args.curve_steps,
        features=args.features, feature_steps=args.feature_steps, log=_say,
    )  # fmt: skip
    notes = [f"{len(document[key])} {key}" for key in ("skipped", "refused") if document[key]]
    print(
        printable(
            f"wrote {len(document['images'])} image(s) x {len(methods)} method(s): "
            f"{Path(args.out) / 'index.html'}" + (f" ({', '.join(notes)})" if notes else "")
        )
    )
    return 1 if notes else 0


def _train(args: argparse.Namespace) -> int:
    from convlens.train import train

    train(
        args.data_dir, args.out, epochs=args.epochs, freeze_backbone=not args.fine_tune_all,
        val_fraction=args.val_fraction, batch_size=args.batch_size, lr=args.lr,
        augment=not args.no_augment, balance=not args.no_class_weights,
        image_size=args.image_size, seed=args.seed, log=_say,
    )  # fmt: skip
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import convlens as cl
    from convlens.datasets import shapes
    from convlens.metrics.benchmark import evaluate_methods, markdown_table, model_accuracy
    from convlens.report import check_methods

    methods = _parse_methods(args.methods)
    params = _parse_params(args.param, methods)
    if args.images < 1 or args.sanity_images < 1:
        raise UsageError("--images and --sanity-images must be positive")
    if args.batch_size is not None:
        positive_int("--batch-size", args.batch_size)
    out = check_output(args.out, "folder")
    model = cl.load_model(args.model)
    if model.labels is None or tuple(model.labels) != cl.datasets.SHAPES:
        raise UsageError(f"the benchmark needs a model of the shapes classes, not {model.name}")
    check_methods(model, methods, params)  # before the first forward pass
    data = shapes(args.images, size=model.input_size[0], seed=args.data_seed)
    accuracy = model_accuracy(model, data)
    print(
        printable(
            f"{model.name} on {args.images} shapes images (seed {args.data_seed}): "
            f"accuracy {accuracy:.3f}"
        ),
        file=sys.stderr,
    )
    rows = evaluate_methods(
        model, data, methods, params, sanity_images=min(args.sanity_images, args.images),
        seed=args.seed, batch_size=args.batch_size,
        on_method=lambda name: print(f"  {name}", file=sys.stderr),
    )  # fmt: skip
    table = markdown_table(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "model": model.name,
        "images": args.images,
        "data_seed": args.data_seed,
        "accuracy": accuracy,
        "rows": rows,
    }
    write_atomic(out / "evaluation.json", json.dumps(document, indent=2).encode())
    write_atomic(out / "evaluation.md", (table + "\n").encode())
    _say(f"wrote {out}/evaluation.md and {out}/evaluation.json")
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
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot read --concepts {path}: {message}") from None
    if not isinstance(concepts, dict):
        raise UsageError(
            f"--concepts {path} holds a {type(concepts).__name__}, not {{name: (N, H, W) masks}}"
        )
    try:
        return check_concepts(concepts, n_images)
    except RequestError as error:
        raise UsageError(f"--concepts {path}: {error}") from None


def _features(args: argparse.Namespace) -> int:
    import convlens as cl
    from convlens import features
    from convlens.report.run import check_target

    kind, layer = args.kind, args.layer
    out = check_output(args.out, "folder")
    positive_int("--k", args.k)
    positive_int("--channel", args.channel, minimum=0)
    positive_int("--shapes", args.shapes, minimum=0)
    if args.steps is not None:
        positive_int("--steps", args.steps)
    model = cl.load_model(args.model)
    # the whole request, before the first forward pass
    if layer is not None:
        model.layer(layer)
    if kind == "class-model":
        if args.target is None:
            raise UsageError("class-model needs --target (a class index or label name)")
        check_target(model, _parse_target(args.target))
    if kind == "dissect" and not args.concepts and not args.shapes:
        raise UsageError("dissect needs --concepts FILE.pt ({name: (N, H, W) masks}) or --shapes N")
    if kind == "dissect" and args.concepts:
        _load_concepts(args.concepts)  # its form; the number of masks once images are read
    near = None
    if kind == "filters":
        result = features.filters(model, layer)
    elif kind == "class-model":
        result = features.class_model(
            model, _parse_target(args.target), steps=args.steps or 256, seed=args.seed
        )
    else:
        x, data = _feature_images(args, model)
        if kind == "activations":
            result = features.activations(model, x[:1], layer)
        elif kind == "patches":
            result = features.top_patches(model, x, layer, channel=args.channel, k=args.k)
        elif kind == "dream":
            result = features.deep_dream(
                model, x[:1], layer, steps=args.steps or 10, seed=args.seed
            )
        elif kind == "embedding":
            labels = data.labels if data is not None else None
            result = features.tsne(model, x, labels=labels, layer=layer, seed=args.seed)
            near = features.neighbours(model, x[:1], x, k=min(args.k, len(x)), layer=layer)
        else:  # dissect
            if args.concepts:  # once more, now that the number of images is known
                concepts = _load_concepts(args.concepts, len(x))
            else:  # each shape's masks are one concept
                concepts = {
                    name: data.masks & (data.labels == c).view(-1, 1, 1)
                    for c, name in enumerate(data.classes)
                }
            result = features.dissect(model, x, concepts, layer)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused request writes nothing
    if near is not None:
        near.save(str(out / "neighbours.png"))
    picture = out / f"{kind}.png"
    result.save(str(picture))
    summary = {"kind": kind, "model": model.name, **result.info}
    write_atomic(out / f"{kind}.json", json.dumps(summary, indent=2, default=str).encode())
    print(printable(f"wrote {picture} and {out / (kind + '.json')}"))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from convlens.registry import get_method, list_methods

    for name in list_methods(args.family):
        cls = get_method(name)
        print(f"{name:22s} {cls.family:13s} {cls.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convlens", description="Explain and interpret convolutional image classifiers."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    explain = commands.add_parser("explain", help="explain predictions on images")
    explain.add_argument("images", nargs="*", help="image files")
    explain.add_argument("--samples", action="store_true", help="also use the bundled photos")
    explain.add_argument("--model", help="checkpoint from `convlens train` (default: bundled)")
    explain.add_argument(
        "--methods", default="saliency", help="NAME[,NAME...] or 'all' (see `convlens methods`)"
    )
    explain.add_argument("--target", help=f"what to explain: {TARGET_FORMS}; default predicted")
    explain.add_argument("--layer", help="the layer the CAM family explains (default: the last "
                         "feature map the classifier reads)")  # fmt: skip
    explain.add_argument("--out", default="convlens-output", help="output folder")
    explain.add_argument("--batch-size", type=int, default=None, help="images per model call")
    explain.add_argument("--seed", type=int, default=0, help="seed of random methods")
    explain.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method parameter: steps=32 (every selected method that takes it) or "
        "rise.n_masks=1000 (one method)",
    )
    explain.add_argument(
        "--features", action="store_true",
        help="add indirect explanations of each predicted class (class model, top patches)",
    )  # fmt: skip
    explain.add_argument(
        "--curve-steps", type=int, default=20, help="steps of the deletion/insertion curves"
    )
    explain.add_argument(
        "--feature-steps", type=int, default=256, help="optimisation steps of class model images"
    )
    explain.set_defaults(run=_explain)

    trainer = commands.add_parser(
        "train", help="fine-tune the bundled EfficientNet-Lite0 on an image folder"
    )
    trainer.add_argument("data_dir", help="folder with one sub-folder of images per class")
    trainer.add_argument("--out", default="model.pt", help="checkpoint to write")
    trainer.add_argument("--epochs", type=int, default=8)
    trainer.add_argument("--batch-size", type=int, default=16)
    trainer.add_argument("--lr", type=float, default=3e-3, help="learning rate of the head")
    trainer.add_argument("--val-fraction", type=float, default=0.2, help="share per class")
    trainer.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    trainer.add_argument(
        "--fine-tune-all", action="store_true",
        help="also train the backbone (at lr/10); default: only the new head",
    )  # fmt: skip
    trainer.add_argument("--no-augment", action="store_true", help="no random crops/flips")
    trainer.add_argument(
        "--no-class-weights", action="store_true", help="do not weight classes by frequency"
    )
    trainer.add_argument("--seed", type=int, default=0)
    trainer.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "evaluate", help="score methods on synthetic images with known answers"
    )
    evaluate.add_argument("--methods", default="all", help="NAME[,NAME...] or 'all'")
    evaluate.add_argument("--model", default="shapes-cnn", help="a model of the shapes classes")
    evaluate.add_argument("--images", type=int, default=16, help="number of test images")
    evaluate.add_argument(
        "--sanity-images", type=int, default=4, help="images for the randomisation check"
    )
    evaluate.add_argument("--data-seed", type=int, default=1000, help="seed of the test images")
    evaluate.add_argument("--out", default="evaluation", help="output folder")
    evaluate.add_argument("--batch-size", type=int, default=None, help="images per model call")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of random methods")
    evaluate.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="as for explain"
    )
    evaluate.set_defaults(run=_evaluate)

    feats = commands.add_parser("features", help="what the network has learned (pictures)")
    feats.add_argument("kind", choices=FEATURES)
    feats.add_argument("images", nargs="*", help="image files")
    feats.add_argument("--samples", action="store_true", help="also use the bundled photos")
    feats.add_argument("--shapes", type=int, default=0, metavar="N", help="N synthetic shapes")
    feats.add_argument("--model", help="bundled model name or checkpoint (default: bundled)")
    feats.add_argument("--layer", help="layer name (default: the CAM layer or the first conv)")
    feats.add_argument("--channel", type=int, default=0, help="unit of `patches`")
    feats.add_argument("--k", type=int, default=9, help="patches or neighbours to show")
    feats.add_argument("--target", help="class index or label name of `class-model`")
    feats.add_argument("--steps", type=int, default=None, help="optimisation steps")
    feats.add_argument("--concepts", help="a .pt file {name: (N, H, W) bool masks} for dissect")
    feats.add_argument("--seed", type=int, default=0)
    feats.add_argument("--out", default="convlens-features", help="output folder")
    feats.set_defaults(run=_features)

    methods = commands.add_parser("methods", help="list the explanation methods")
    methods.add_argument("--family", help="only this family (gradient, cam, ...)")
    methods.set_defaults(run=_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    A request that cannot be carried out (:class:`UsageError`, ``convlens.checks.RequestError``,
    a missing file, an unreadable image) is one line on stderr and status 2; any other
    exception is a bug and propagates with its traceback (status 1 from Python).
    """
    args = build_parser().parse_args(argv)
    from convlens.engine import freed_memory_kept

    # SIGTERM ends the command like Ctrl-C does: its temporary files are removed; restored
    # afterwards, so that calling main() (from a test, a notebook) leaves the process as it was
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        # glibc keeps freed memory for reuse while the command runs (2-3x faster model calls);
        # scoped, so that calling main() (from a test, a notebook) leaves the process as it was
        with freed_memory_kept():
            return args.run(args)
    except USAGE_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"convlens: error: {printable(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convlens: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("convlens: terminated", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
