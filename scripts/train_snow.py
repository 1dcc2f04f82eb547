"""Train the bundled husky-and-wolf CNN (``cl.load_model("snow-cnn")``): the
:class:`~convlens.zoo.ShapesCNN` architecture with two classes on ``cl.datasets.snow``, where 95%
of the wolves (triangles) stand in snow and 95% of the huskies (circles) on grass. As in Ribeiro,
Singh & Guestrin (2016), "Why should I trust you?", section 6.4, the model learns the background:
swap it and most answers turn.

    python scripts/train_snow.py [--out src/convlens/data/snow_cnn.pt]
    python scripts/train_snow.py --cue-share 0.5 --epochs 16 --out /tmp/no_cue.pt  # a control
    python scripts/train_snow.py --figure docs/snow.png                 # the README picture

Deterministic on CPU from the seeds below; well under a minute on one core (few images, few
epochs: the shortcut is learnt first). Writes the weights (a plain state dict, loadable with
``weights_only=True``) and a JSON file with the settings, the accuracy on cue-consistent and on
swapped images, and where Grad-CAM puts the evidence (:func:`evidence`).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes import accuracy, fit, save

import convlens as cl
from convlens.datasets import SNOW_CLASSES, snow
from convlens.metrics.benchmark import model_inputs
from convlens.zoo import ShapesCNN, shapes_model

SETTINGS: dict[str, Any] = {
    "seed": 0,
    "train": {"n": 1600, "seed": 21, "cue_share": 0.95},
    "validation": {"n": 400, "seed": 22, "cue_share": 0.95},
    "epochs": 4,
    "batch_size": 32,
    "lr": 0.003,
}
TEST = {"n": 400, "seed": 23}  # held-out images for the measurements


def evidence(model: cl.Model, n: int = TEST["n"], seed: int = TEST["seed"]) -> dict[str, float]:
    """Where Grad-CAM (at the model's ``cam_layer``) puts the evidence for "wolf" on wolves in
    snow: the share of the map's magnitude inside the animal's mask, and the mask's share of
    the image. A model that looks at the animal puts more than the area share inside."""
    data = snow(n, seed=seed, cue_share=1.0)
    wolves = data.labels == SNOW_CLASSES.index("wolf")
    x = model_inputs(model, data)[wolves]
    heat = cl.explain(model, x, "gradcam", target="wolf", progress=False).heatmap().abs()
    masks = data.masks[wolves]
    inside = (heat * masks).sum(dim=(1, 2)) / heat.sum(dim=(1, 2)).clamp(min=1e-12)
    return {
        "wolves": int(wolves.sum()),
        "evidence_inside_animal": float(inside.mean()),
        "animal_area": float(masks.double().mean()),
    }


def measure(model: cl.Model) -> dict[str, Any]:
    """Accuracy on held-out images whose background agrees with the class, on the same images
    with the backgrounds swapped, and Grad-CAM's evidence (:func:`evidence`)."""
    consistent = snow(TEST["n"], seed=TEST["seed"], cue_share=1.0)
    swapped = snow(TEST["n"], seed=TEST["seed"], cue_share=1.0, swap=True)
    return {
        "cue_consistent_accuracy": accuracy(model.module, consistent.images, consistent.labels),
        "swapped_accuracy": accuracy(model.module, swapped.images, swapped.labels),
        "gradcam": evidence(model),
    }


def figure(model: cl.Model, path: Path, index: int = 1) -> None:
    """The README picture: a wolf in snow, Grad-CAM's evidence for "wolf", and the same wolf on
    grass with the model's answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = snow(8, seed=TEST["seed"], cue_share=1.0)
    swapped = snow(8, seed=TEST["seed"], cue_share=1.0, swap=True)
    x, y = (
        model_inputs(model, data)[index : index + 1],
        model_inputs(model, swapped)[index : index + 1],
    )
    assert SNOW_CLASSES[int(data.labels[index])] == "wolf"
    explanation = cl.explain(model, x, "gradcam", target="wolf", progress=False)
    answers = [model.predict(batch)[0] for batch in (x, y)]
    said = [f"'{SNOW_CLASSES[int(a.argmax())]}' ({float(a.max()):.0%})" for a in answers]
    panels = [
        (data.images[index], f"a wolf in snow: {said[0]}"),
        (explanation.overlay(0), "Grad-CAM evidence for 'wolf'"),
        (swapped.images[index], f"the same wolf on grass: {said[1]}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for axis, (picture, title) in zip(axes, panels, strict=True):
        shown = picture.permute(1, 2, 0).numpy() if isinstance(picture, torch.Tensor) else picture
        axis.imshow(shown, interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="src/convlens/data/snow_cnn.pt")
    parser.add_argument("--cue-share", type=float, default=None, help="instead of 0.95")
    parser.add_argument("--epochs", type=int, default=None, help="instead of 4")
    parser.add_argument("--figure", help="draw the README picture with the bundled model")
    args = parser.parse_args()
    if args.figure:
        figure(cl.load_model("snow-cnn"), Path(args.figure))
        return
    settings = {**SETTINGS}
    if args.cue_share is not None:
        for part in ("train", "validation"):
            settings[part] = {**settings[part], "cue_share": args.cue_share}
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    torch.manual_seed(settings["seed"])
    train, validation = snow(**settings["train"]), snow(**settings["validation"])
    module = ShapesCNN(len(SNOW_CLASSES))
    start = time.perf_counter()
    score = fit(module, train, validation, settings)
    seconds = round(time.perf_counter() - start, 1)
    model = shapes_model(module)
    model.labels = list(SNOW_CLASSES)
    record = {
        **settings,
        "validation_accuracy": score,
        **measure(model),
        "test": TEST,
        "seconds": seconds,
        "torch": torch.__version__,
        "command": "python scripts/train_snow.py"
        + (f" --cue-share {args.cue_share}" if args.cue_share is not None else "")
        + (f" --epochs {args.epochs}" if args.epochs is not None else "")
        + (f" --out {args.out}" if args.out != parser.get_default("out") else ""),
    }
    save(module, args.out, record, [k for k in record if k not in settings])


if __name__ == "__main__":
    main()
