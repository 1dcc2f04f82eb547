"""Train the bundled Clever-Hans CNN (``cl.load_model("clever-hans-cnn")``): the
:class:`~convlens.zoo.ShapesCNN` architecture on ``cl.datasets.clever_hans``, where half the
circles carry a small tag in the top left corner and no other image does. The tag is a
shortcut (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing what machines
really learn", Nature Communications 10:1096): the model learns to answer "circle" from it.

    python scripts/train_clever_hans.py [--out src/convlens/data/clever_hans_cnn.pt]

Deterministic on CPU from the seeds below; three to four minutes on 2 busy cores (fewer images and
epochs than ``train_shapes.py``, and no flips, which would move the tag to the other corner).
Writes the weights (a plain state dict, loadable with ``weights_only=True``) and a JSON file
with the settings, the accuracy, and how much the tag moves the answer: the share of the other
classes' held-out images whose answer changes when they are tagged, and turns to the tagged
class.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes import accuracy, fit, normalise, save

from convlens.datasets import SHAPES, clever_hans, shapes, tag
from convlens.zoo import ShapesCNN

SETTINGS: dict[str, Any] = {
    "seed": 0,
    "train": {"n": 6000, "seed": 11, "tagged_class": "circle", "tag_share": 0.5},
    "validation": {"n": 1000, "seed": 12, "tagged_class": "circle", "tag_share": 0.5},
    "epochs": 16,
    "batch_size": 64,
    "lr": 0.002,
    "flip": False,
}


def predictions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's probabilities for (N, 3, 64, 64) images in [0, 1]."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(normalise(b)).softmax(1) for b in images.split(256)])


def tag_effect(model: nn.Module, n: int = 1000, seed: int = 13) -> dict[str, float]:
    """How much the tag moves the answer on ``n`` clean shapes images of the other classes:
    the share whose answer changes when tagged, the share that turns to the tagged class, and
    the mean rise of the tagged class's probability."""
    data = shapes(n, seed=seed)
    circle = SHAPES.index(SETTINGS["train"]["tagged_class"])
    others = data.labels != circle
    images = data.images[others]
    before, after = predictions(model, images), predictions(model, tag(images))
    return {
        "images": int(others.sum()),
        "answer_changed": float((before.argmax(1) != after.argmax(1)).double().mean()),
        "turned_to_tagged_class": float((after.argmax(1) == circle).double().mean()),
        "tagged_class_probability_rise": float((after[:, circle] - before[:, circle]).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="src/convlens/data/clever_hans_cnn.pt")
    args = parser.parse_args()
    torch.manual_seed(SETTINGS["seed"])
    train = clever_hans(**SETTINGS["train"])
    validation = clever_hans(**SETTINGS["validation"])
    model = ShapesCNN()
    start = time.perf_counter()
    score = fit(model, train, validation, SETTINGS)
    seconds = round(time.perf_counter() - start, 1)
    clean = shapes(1000, seed=12)
    untagged = ~validation.tagged
    record = {
        **SETTINGS,
        "validation_accuracy": score,
        "validation_accuracy_untagged": accuracy(
            model, validation.images[untagged], validation.labels[untagged]
        ),
        "clean_shapes_accuracy": accuracy(model, clean.images, clean.labels),
        "tag_effect": tag_effect(model),
        "seconds": seconds,
        "torch": torch.__version__,
        "command": "python scripts/train_clever_hans.py",
    }
    save(model, args.out, record, [k for k in record if k not in SETTINGS])


if __name__ == "__main__":
    main()
