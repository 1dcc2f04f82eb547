"""Train the bundled shapes CNN (``cl.load_model("shapes-cnn")``) on ``cl.datasets.shapes``.

    python scripts/train_shapes.py [--out src/convlens/data/shapes_cnn.pt]
    python scripts/train_shapes.py --arch examples/nets.py:resnet_small \
        --out examples/resnet_small_shapes.pt

Deterministic on CPU from the seeds below; a few minutes on 2 cores. Writes the weights (a plain
state dict, loadable with ``weights_only=True``) and a JSON file with the settings and the
accuracy on a held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from convlens.datasets import Shapes, shapes
from convlens.zoo import SHAPES_MEAN, SHAPES_STD, ShapesCNN

SETTINGS = {
    "seed": 0,
    "train": {"n": 8000, "seed": 1},
    "validation": {"n": 1000, "seed": 2},
    "epochs": 24,
    "batch_size": 64,
    "lr": 0.002,
}


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(SHAPES_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SHAPES_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(normalise(b)).argmax(1) for b in images.split(256)])
    return float((predicted == labels).double().mean())


def fit(model: nn.Module, train: Shapes, validation: Shapes, settings: dict[str, Any]) -> float:
    """Train ``model`` on ``train`` with Adam and a cosine schedule (``settings``: ``seed``,
    ``epochs``, ``batch_size``, ``lr``; ``flip``, default true: random horizontal flips);
    print the loss and the ``validation`` accuracy after each epoch and return the last
    accuracy. Also used by ``scripts/train_clever_hans.py``."""
    optimiser = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings["epochs"])
    generator = torch.Generator().manual_seed(settings["seed"])
    score = float("nan")
    for epoch in range(settings["epochs"]):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(settings["batch_size"]):
            images = train.images[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # shapes are symmetric
            if settings.get("flip", True):
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = nn.functional.cross_entropy(model(normalise(images)), train.labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        score = accuracy(model, validation.images, validation.labels)
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {score:.4f}")
    return score


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="src/convlens/data/shapes_cnn.pt")
    parser.add_argument(
        "--arch", help="a factory file.py:function to train instead of ShapesCNN (called with "
        "pretrained=False)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(SETTINGS["seed"])
    train = shapes(**SETTINGS["train"])
    validation = shapes(**SETTINGS["validation"])
    if args.arch:
        from convlens.factories import find_factory

        model = find_factory(args.arch)(pretrained=False)
    else:
        model = ShapesCNN()
    start = time.perf_counter()
    score = fit(model, train, validation, SETTINGS)
    record = {
        **SETTINGS,
        "validation_accuracy": score,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "command": "python scripts/train_shapes.py"
        + (f" --arch {args.arch} --out {args.out}" if args.arch else ""),
    }
    save(model, args.out, record)


def save(model: nn.Module, out: str | os.PathLike, record: dict[str, Any], shown: Any = ()) -> None:
    """The weights at ``out`` and ``record`` beside them (``out`` with ``.json``); prints the
    record's keys in ``shown`` and the file's size."""
    out = Path(out)
    torch.save(model.state_dict(), out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    if shown:
        print(json.dumps({k: v for k, v in record.items() if k in shown}, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
