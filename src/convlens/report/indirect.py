"""The report's indirect explanations (``--features``): for each predicted class, what the
network has learned about it, beside the maps of the images.

- the class model image (activation maximisation, Simonyan et al. 2014),
- DeepDream (Mordvintsev et al. 2015) of the class's first image at the patch layer,
- the top patches (Zeiler & Fergus 2014) of the patch layer's channel that contributes most to
  the class on that image (activation x gradient, :func:`convlens.features.channel_contributions`).

The patch layer (:func:`patch_layer`) is the deepest block whose units see at most half of the
input side (:data:`PATCH_SHARE`), computed from the strides, kernel sizes and padding of the
convolutions and poolings on the path (:func:`convlens.features.receptive_field`): deeper
layers (the CAM layer of most networks) see the whole image, and their "top patches" would be
whole images. On the bundled EfficientNet-Lite0 at 224 pixels that is ``_blocks.5`` (83 pixels;
``_blocks.6`` sees 115).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from convlens.engine import session
from convlens.files import printable
from convlens.model import Model

__all__ = ["PATCH_SHARE", "features_section", "patch_layer"]

PATCH_SHARE = 0.5  # the largest receptive field of the patch layer, as a share of the input side
DREAM_OCTAVES = 3
DREAM_STEPS = 10


def _spatial_layers(model: Model, x: Tensor) -> list[str]:
    """Names of the modules that return a (B, C, h, w) tensor with h, w > 1, in the order
    their forward passes end (a container after its children); modules called more than once
    (a shared ReLU) and the model itself are left out."""
    names = {module: name for name, module in model.module.named_modules() if name}
    order: list[Any] = []
    shapes: dict[Any, tuple[int, ...]] = {}

    def record(module: Any, _args: Any, out: Any) -> None:
        order.append(module)
        if isinstance(out, Tensor):
            shapes[module] = tuple(out.shape)

    with session(model, x[:1], progress=False) as engine:
        handles = [m.register_forward_hook(record) for m in names]
        try:
            engine.forward(x[:1])
        finally:
            for handle in handles:
                handle.remove()
    once = [m for m in order if order.count(m) == 1]
    return [
        names[m]
        for m in once
        if len(shapes.get(m, ())) == 4 and shapes[m][-1] > 1 and shapes[m][-2] > 1
    ]


def _outermost(names: list[str]) -> list[str]:
    """The names that lie inside none of the others (``a.b`` lies inside ``a``)."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def patch_layer(model: Model, x: Tensor, share: float = PATCH_SHARE) -> tuple[str, list[int]]:
    """The layer whose top patches are parts of images, and its receptive field (rows,
    columns): the deepest of the outermost layers (blocks and stages, not the modules inside
    them) whose field is at most ``share`` of the input's shorter side. Where the first layer
    beyond that is a block whose own modules reach a larger field still within the limit, the
    deepest of those is taken (one level at a time); a module inside a block is never taken
    for the field of the block before it. The fields only grow along the forward pass, so a
    binary search finds each. Falls back to the CAM layer (whose field is then the whole image
    or more) when no layer is that small."""
    from convlens import features

    limit = share * min(x.shape[-2:])
    size = tuple(int(s) for s in x.shape[-2:])
    spatial = _spatial_layers(model, x)
    fields: dict[str, list[int]] = {}

    def field(name: str) -> list[int]:
        if name not in fields:
            fields[name] = list(features.receptive_field(model, name, size).size)
        return fields[name]

    best: str | None = None
    level = _outermost(spatial)
    while level:
        low, high, found = 0, len(level) - 1, -1
        while low <= high:
            middle = (low + high) // 2
            if max(field(level[middle])) <= limit:
                found, low = middle, middle + 1
            else:
                high = middle - 1
        if found >= 0 and (best is None or max(field(level[found])) > max(field(best))):
            best = level[found]
        if found + 1 >= len(level):
            break
        block = level[found + 1]  # the first layer beyond the limit: look inside it
        level = _outermost([n for n in spatial if n.startswith(block + ".")])
    if best is None:
        name = features.common.resolve_layer(model, None, x[:1])
        return name, field(name)
    return best, field(best)


def features_section(
    model: Model,
    images: list[dict[str, Any]],
    x: Tensor,
    out: Path,
    steps: int,
    seed: int,
    bar: Any,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """For each predicted class (in order of first appearance): its class model image, the
    DeepDream of its first image and the top patches (over the report's images) of the patch
    layer's channel that contributes most to it on that image; the pictures are written to
    ``out`` and their records returned."""
    from convlens import features

    layer, field = patch_layer(model, x)
    entries = []
    classes = list(dict.fromkeys(image["class"] for image in images))
    for c in classes:
        bar.set_postfix_str(printable(f"features of {model.label(c)}"))
        first = next(i for i, image in enumerate(images) if image["class"] == c)
        contributions = features.channel_contributions(model, x[first : first + 1], c, layer)[0]
        channel = int(contributions.argmax())
        synthesis = features.class_model(model, c, steps=steps, seed=seed, progress=progress)
        dream = features.deep_dream(
            model, x[first : first + 1], layer, octaves=DREAM_OCTAVES, steps=DREAM_STEPS,
            seed=seed, progress=progress,
        )  # fmt: skip
        patches = features.top_patches(
            model, x, layer, channel=channel, k=len(x), progress=progress
        )
        stem = f"class_{c}"
        synthesis.save(out / f"{stem}_model.png")
        dream.save(out / f"{stem}_dream.png")
        patches.save(out / f"{stem}_patches.png")
        positive = contributions.clamp(min=0).sum().clamp(min=1e-12)
        entries.append(
            {
                "class": c,
                "label": model.label(c),
                "class_model": f"{stem}_model.png",
                "probability": synthesis.info.get("probability"),  # of the class model image
                "dream": f"{stem}_dream.png",
                "dream_image": images[first]["image"],
                "dream_octaves": DREAM_OCTAVES,
                "dream_steps": DREAM_STEPS,
                "layer": layer,
                "receptive_field": field,
                "input_size": [int(s) for s in x.shape[-2:]],
                "channel": channel,
                "contribution": float(contributions[channel]),
                "share": float(contributions[channel] / positive),
                "patches": f"{stem}_patches.png",
                "patch_values": [float(v) for v in patches.data["values"]],
                "patch_images": [images[int(i)]["image"] for i in patches.data["indices"]],
                "steps": steps,
            }
        )
        bar.update(1)
    return entries
