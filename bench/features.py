"""Indirect explanations on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench features [--out bench-features]

Seconds of each ``cl.features`` function (one run each; ``class_model`` is the 256-step
default), with the work it did, and the pictures written to ``--out``. Inputs: the four bundled
photos, and for the collection functions 32 views of them (flips and crops).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import convlens as cl
from convlens import features

from .common import table


def views(model: cl.Model) -> torch.Tensor:
    """32 model inputs: each bundled photo, flipped, and cropped at three zooms."""
    x = model.preprocess(list(cl.sample_images().values()))
    out = []
    for zoom in (1.0, 0.8, 0.65, 0.5):
        side = round(x.shape[-1] * zoom)
        start = (x.shape[-1] - side) // 2
        crop = x[..., start : start + side, start : start + side]
        crop = torch.nn.functional.interpolate(crop, size=x.shape[-2:], mode="bilinear")
        out += [crop, crop.flip(-1)]
    return torch.cat(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench features")
    parser.add_argument("--out", default="bench-features")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = cl.load_model()
    chelsea = model.preprocess(cl.sample_images()["chelsea"])
    many = views(model)
    rgb = torch.from_numpy(model.to_display(many)).float() / 255
    concepts = {  # colour concepts, enough to time the dissection
        "bright": rgb.mean(-1) > 0.7,
        "dark": rgb.mean(-1) < 0.2,
        "reddish": (rgb[..., 0] > rgb[..., 1] + 0.15) & (rgb[..., 0] > rgb[..., 2] + 0.15),
    }
    jobs = {
        "filters": lambda: features.filters(model),
        "activations": lambda: features.activations(model, chelsea, "_blocks.5"),
        "top_patches (32 images)": lambda: features.top_patches(
            model, many, "_blocks.5", channel=3, k=9, progress=False
        ),
        "class_model (256 steps)": lambda: features.class_model(model, "tabby", progress=False),
        "deep_dream (4 octaves x 10)": lambda: features.deep_dream(
            model, chelsea, "_blocks.8", progress=False
        ),
        "embed (32 images)": lambda: features.embed(model, many),
        "neighbours (32 images)": lambda: features.neighbours(model, chelsea, many, k=5),
        "tsne (32 images)": lambda: features.tsne(model, many, perplexity=8),
        "dissect (32 images, 3 concepts)": lambda: features.dissect(
            model, many, concepts, "_blocks.5"
        ),
    }
    rows = []
    for name, job in jobs.items():
        start = time.perf_counter()
        result = job()
        seconds = time.perf_counter() - start
        picture = out / f"{name.split()[0]}.png"
        result.save(str(picture))
        rows.append({"function": name, "seconds": seconds, "picture": str(picture)})
        print(f"{name}: {seconds:.2f} s", flush=True)
    print()
    print(table(rows, ["function", "seconds", "picture"]))
    return 0
