"""The ``convlens`` command line: the parser and :func:`main` (the commands are in
``convlens.cli.commands``, the parsing of what was asked in ``convlens.cli.requests``).

convlens explain IMAGE... --methods saliency,guided_backprop --target 285 --out DIR
convlens explain --samples --methods all --out demo-output
convlens methods
convlens evaluate --methods all --out evaluation
convlens evaluate photos/*.jpg --model nets.py:resnet50 --boxes boxes.csv --methods gradcam
convlens features class-model --target 281 --out features/
convlens train photos/ --out skin.pt && convlens explain x.jpg --model skin.pt --methods all
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from convlens.checks import RequestError, first_line
from convlens.cli import commands
from convlens.cli.requests import TARGET_FORMS, UsageError
from convlens.files import printable
from convlens.images import ImageError

__all__ = ["UsageError", "build_parser", "main"]


MODEL_OPTIONS = ("weights", "labels", "input_size", "mean", "std")


def model_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--model SPEC`` and the options of a factory model, in their own help section."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", metavar="SPEC",
        help="a bundled name (efficientnet-lite0, shapes-cnn, clever-hans-cnn, snow-cnn), a "
        "checkpoint of `convlens train`, "
        "or a factory path/to/file.py:function or package.module:function returning an "
        f"nn.Module (this runs that code) (default: {default})",
    )  # fmt: skip
    factory_arguments(group, "a factory model's")
    group.add_argument(
        "--trust-code", action="store_true",
        help="load a checkpoint of `convlens train --arch` whose factory lies outside the "
        "checkpoint's folder or is an installed module's function (this runs that code)",
    )  # fmt: skip


def factory_arguments(group: Any, whose: str, labels: bool = True) -> None:
    group.add_argument(
        "--weights", metavar="FILE", help=f"{whose} state dict (read with weights_only=True)"
    )
    if labels:
        group.add_argument(
            "--labels", metavar="FILE", help=f"{whose} class names: one per line, or a JSON list"
        )
    group.add_argument("--input-size", metavar="H[,W]", help="input size in pixels (default 224)")
    group.add_argument(
        "--mean", metavar="R,G,B", help=f"{whose} normalisation mean (default ImageNet's)"
    )
    group.add_argument(
        "--std", metavar="R,G,B", help=f"{whose} normalisation std (default ImageNet's)"
    )


# features kind -> (help, its own options, the default layer); None: it takes no layer
CAM_LAYER = "the CAM layer: the last feature map the classifier reads"
FEATURE_KINDS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "filters": ("the convolution kernels of a layer, as pictures", (), "the first convolution"),
    "activations": ("a layer's feature maps for an image", ("images",), CAM_LAYER),
    "patches": (
        "the image patches that excite one unit most (Zeiler & Fergus 2014)",
        ("images", "channel", "k"),
        CAM_LAYER,
    ),
    "class-model": (
        "an image that maximises a class score (Simonyan et al. 2014)",
        ("target", "steps"),
        None,
    ),
    "dream": ("DeepDream: an image amplifying a layer's features", ("images", "steps"), CAM_LAYER),
    "embedding": (
        "t-SNE of the images' features, and an image's nearest neighbours",
        ("images", "k"),
        "the input of the last nn.Linear",
    ),
    "dissect": (
        "network dissection: units against concept masks (Bau et al. 2017)",
        ("images", "concepts"),
        CAM_LAYER,
    ),
    "tcav": (
        "TCAV: how much a concept moves a class's score (Kim et al. 2018)",
        ("images", "target", "runs", "concept"),
        CAM_LAYER + "; a comma list tests several",
    ),
    "invert": (
        "an image rebuilt from a layer's representation of it (Mahendran & Vedaldi 2015)",
        ("images", "steps"),
        CAM_LAYER,
    ),
}
# features kind -> the function of convlens.features it runs
FEATURE_FUNCTIONS = {
    "filters": "filters",
    "activations": "activations",
    "patches": "top_patches",
    "class-model": "class_model",
    "dream": "deep_dream",
    "embedding": "tsne",
    "dissect": "dissect",
    "tcav": "tcav",
    "invert": "invert",
}


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


def command(subcommands: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A sub-command with ``text`` as its help and description, defaults shown."""
    parser: argparse.ArgumentParser = subcommands.add_parser(
        name, help=text, description=text[:1].upper() + text[1:] + ".",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convlens", description="Explain and interpret convolutional image classifiers.",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    explain = command(subcommands, "explain", "explain predictions on images")
    explain.add_argument("images", nargs="*", help="image files")
    explain.add_argument("--samples", action="store_true", help="also use the bundled photos")
    model_arguments(explain, "efficientnet-lite0")
    explain.add_argument(
        "--methods", default="saliency", help="NAME[,NAME...] or 'all' (see `convlens methods`)"
    )
    explain.add_argument("--target", help=f"what to explain: {TARGET_FORMS}; default predicted")
    explain.add_argument(
        "--targets-file", metavar="CSV",
        help="one target per image: a CSV with the header image,target (an image by its path "
        "as given, else its file name; the target in any --target form); its rows win over "
        "--target, which the images without a row keep",
    )  # fmt: skip
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
        "rise.n_masks=1000 (one method); baseline=mean is the mean image of the --background "
        "set when one is given, else each image's mean colour",
    )
    explain.add_argument(
        "--background", action="append", default=[], metavar="DIR_OR_FILE",
        help="reference images (a folder, searched recursively, or an image file; repeat for "
        "more): the baseline set of DeepSHAP (--param deeplift.shap=True, which needs it) and "
        "gradient_shap, unless a --param gives a baseline",
    )  # fmt: skip
    explain.add_argument(
        "--background-size", type=int, default=32, metavar="K",
        help="images drawn from --background with --seed (all when fewer; default 32)",
    )  # fmt: skip
    explain.add_argument(
        "--save-attributions", action="store_true",
        help="also write each image's attributions (every method) as <image>_attributions.npz, "
        "float32 arrays named by method (method@RANK with top:K)",
    )  # fmt: skip
    explain.add_argument(
        "--features", action="store_true",
        help="add indirect explanations of each predicted class (class model, DeepDream, top "
        "patches)",
    )  # fmt: skip
    explain.add_argument(
        "--sanity", action="store_true",
        help="flag maps that do not depend on the model: the model randomisation test "
        "(Adebayo et al. 2018) per method, one map per layer owning parameters (slow for "
        "perturbation methods)",
    )  # fmt: skip
    explain.add_argument(
        "--curve-steps", type=int, default=20, help="steps of the deletion/insertion curves"
    )
    explain.add_argument(
        "--feature-steps", type=int, default=256, help="optimisation steps of class model images"
    )
    explain.set_defaults(run=commands.run_explain)

    trainer = command(
        subcommands, "train",
        "fine-tune the bundled EfficientNet-Lite0, or your network, on an image folder",
    )  # fmt: skip
    trainer.add_argument("data_dir", help="folder with one sub-folder of images per class")
    trainer.add_argument("--out", default="model.pt", help="checkpoint to write")
    network = trainer.add_argument_group("network (default: the bundled EfficientNet-Lite0)")
    network.add_argument(
        "--arch", metavar="SPEC",
        help="a factory path/to/file.py:function or package.module:function returning the "
        "nn.Module to fine-tune (pretrained weights are its business; this runs that code, and "
        "so does loading the checkpoint)",
    )  # fmt: skip
    network.add_argument(
        "--head", metavar="NAME", help="the classifier module to replace (default: last nn.Linear)"
    )
    factory_arguments(network, "the --arch network's", labels=False)
    network.set_defaults(input_size=None)
    trainer.add_argument("--image-size", type=int, default=224, help=argparse.SUPPRESS)
    trainer.add_argument("--epochs", type=int, default=8)
    trainer.add_argument("--batch-size", type=int, default=16)
    trainer.add_argument("--lr", type=float, default=3e-3, help="learning rate of the head")
    trainer.add_argument("--val-fraction", type=float, default=0.2, help="share per class")
    trainer.add_argument(
        "--fine-tune-all", action="store_true",
        help="also train the backbone (at lr/10); default: only the new head",
    )  # fmt: skip
    trainer.add_argument("--no-augment", action="store_true", help="no random crops/flips")
    trainer.add_argument(
        "--no-class-weights", action="store_true", help="do not weight classes by frequency"
    )
    trainer.add_argument("--seed", type=int, default=0)
    trainer.set_defaults(run=commands.run_train)

    evaluate = command(
        subcommands, "evaluate",
        "score methods on your images (with their boxes), or on synthetic shapes with known "
        "answers",
    )  # fmt: skip
    evaluate.add_argument(
        "images", nargs="*", help="image files (without any: the shapes benchmark, --shapes N)"
    )
    evaluate.add_argument(
        "--boxes", metavar="FILE",
        help="the images' object boxes, in original pixels: a CSV (image,x0,y0,x1,y1[,label]), "
        "a COCO JSON file or a folder of Pascal VOC XML files",
    )  # fmt: skip
    evaluate.add_argument("--methods", default="all", help="NAME[,NAME...] or 'all'")
    model_arguments(evaluate, "efficientnet-lite0; shapes-cnn for the shapes benchmark")
    evaluate.add_argument(
        "--shapes", type=int, metavar="N", default=None,
        help="the shapes benchmark on N synthetic images (the default without images: 16)",
    )  # fmt: skip
    evaluate.add_argument("--images", dest="shapes", type=int, help=argparse.SUPPRESS)
    evaluate.add_argument(
        "--sanity-images", type=int, default=4, help="shapes: images for the randomisation check"
    )
    evaluate.add_argument(
        "--data-seed", type=int, default=1000, help="shapes: seed of the test images"
    )
    evaluate.add_argument(
        "--curve-steps", type=int, default=20, help="images: steps of the deletion/insertion curves"
    )
    evaluate.add_argument("--out", default="evaluation", help="output folder")
    evaluate.add_argument("--batch-size", type=int, default=None, help="images per model call")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of random methods")
    evaluate.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="as for explain"
    )
    evaluate.set_defaults(run=commands.run_evaluate)

    feats = command(subcommands, "features", "what the network has learned (pictures)")
    kinds = feats.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, (text, options, layer) in FEATURE_KINDS.items():
        feature = command(kinds, kind, text)
        if "images" in options:
            feature.add_argument("images", nargs="*", help="image files")
            feature.add_argument("--samples", action="store_true", help="also the bundled photos")
            feature.add_argument("--shapes", type=int, default=0, metavar="N", help="N shapes")
        model_arguments(feature, "efficientnet-lite0")
        if layer is not None:
            feature.add_argument("--layer", help=f"layer name (default: {layer})")
        if "channel" in options:
            feature.add_argument("--channel", type=int, default=0, help="the unit (channel)")
        if "k" in options:
            feature.add_argument("--k", type=int, default=9, help="patches or neighbours shown")
        if "target" in options:
            feature.add_argument("--target", help="class index or label name (required)")
        if "steps" in options:
            feature.add_argument("--steps", type=int, default=None, help="optimisation steps")
        if "concepts" in options:
            feature.add_argument(
                "--concepts", help="a .pt file {name: (N, H, W) bool masks}, or a Broden folder "
                "(index.csv, label.csv, images/: --limit images drawn with --seed, their masks)",
            )  # fmt: skip
            feature.add_argument(
                "--limit", type=int, default=commands.BRODEN_LIMIT, metavar="N",
                help=f"images drawn from a Broden folder (default: {commands.BRODEN_LIMIT})",
            )  # fmt: skip
        if "concept" in options:
            feature.add_argument("--concept", metavar="DIR", help="concept images (required)")
            feature.add_argument("--random", metavar="DIR", help="random images (required)")
        if "runs" in options:
            feature.add_argument("--runs", type=int, default=10, help="CAVs per layer")
        feature.add_argument(
            "--param", action="append", default=[], metavar="NAME=VALUE",
            help=f"a parameter of cl.features.{FEATURE_FUNCTIONS[kind]} (see its docstring)",
        )  # fmt: skip
        feature.add_argument("--seed", type=int, default=0, help="seed of random choices")
        feature.add_argument("--out", default="convlens-features", help="output folder")
        feature.set_defaults(run=commands.run_features)

    auditor = command(
        subcommands, "audit",
        "explain every image of a data set, on this machine or a Ray cluster; rows in Parquet, "
        "SpRAy strategies per class, and a page (index.html) of accuracy, strategies and ranking",
    )  # fmt: skip
    auditor.add_argument(
        "data", nargs="+",
        help="an image folder (class sub-folders give the true labels), a CSV or Parquet file of "
        "image paths (columns path or image, optional label and x0,y0,x1,y1), or image files",
    )  # fmt: skip
    auditor.add_argument("--methods", default="gradcam", help="NAME[,NAME...] or 'all'")
    model_arguments(auditor, "efficientnet-lite0")
    auditor.add_argument("--boxes", metavar="FILE", help="object boxes, as for evaluate")
    auditor.add_argument(
        "--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
        help="run on Ray: a local instance, or the cluster at ADDRESS (ray://HEAD:10001, auto)",
    )  # fmt: skip
    auditor.add_argument("--workers", type=int, default=2, help="Ray workers (model copies)")
    auditor.add_argument(
        "--spray", metavar="METHOD", help="the method whose maps SpRAy clusters (default: first)"
    )
    auditor.add_argument(
        "--curve-steps", type=int, default=100, help="steps of the deletion/insertion curves"
    )
    auditor.add_argument(
        "--save-maps", action="store_true", help="also full-resolution maps, in sharded .npz"
    )
    auditor.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="as for explain"
    )
    auditor.add_argument("--seed", type=int, default=0, help="seed of random methods")
    auditor.add_argument(
        "--out", default="audit", help="output folder (resumable): results.parquet, index.html"
    )
    auditor.set_defaults(run=commands.run_audit)

    methods = command(
        subcommands, "methods",
        "list the explanation methods: family, parameters with defaults, forward passes",
    )  # fmt: skip
    methods.add_argument("--family", help="only this family (gradient, cam, ...)")
    methods.set_defaults(run=commands.run_methods)
    return parser


# What ``main`` prints as one line with exit status 2: the user's request cannot be carried out
# (a bad argument, a missing file, an unreadable image). Anything else is a bug, in convlens or
# in the model, and keeps its traceback.
USAGE_ERRORS = (UsageError, RequestError, FileNotFoundError, ImageError)


class Terminated(BaseException):
    """SIGTERM, raised where the command is so that it cleans up as after Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _end_progress_bars() -> None:
    """Close the progress bars still drawn, so that a message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


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
        _end_progress_bars()
        print(f"convlens: error: {printable(first_line(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print("convlens: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        _end_progress_bars()
        print("convlens: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `convlens methods | head`: the reader left; nothing to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes it at exit)
        return 141
    except BaseException:  # a bug: its traceback starts on a line of its own
        _end_progress_bars()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
