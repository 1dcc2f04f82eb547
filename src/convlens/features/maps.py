"""Filters and activation maps: the first things to look at (Zeiler & Fergus 2014, "Visualizing
and Understanding Convolutional Networks", ECCV; Yosinski et al. 2015, "Understanding Neural
Networks Through Deep Visualization", ICML workshop)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from convlens import viz
from convlens.checks import RequestError
from convlens.engine import session
from convlens.features.common import Features, gray_tiles, layer_outputs, resolve_layer
from convlens.model import Model, as_model
from convlens.targets import check_target_spec

__all__ = ["activations", "channel_contributions", "filters"]


def filters(
    model: Model | nn.Module, layer: str | nn.Module | None = None, max_filters: int = 64
) -> Features:
    """The kernels of a convolution (the first one by default).

    Kernels that read 3 channels (an RGB input layer) are drawn as colour tiles, all scaled by
    one common range around zero so that their colours compare; deeper kernels are drawn as
    grayscale tiles, one row per output channel and one tile per input channel (at most 16),
    each scaled to its own range. ``data["weight"]`` is the (out, in, kh, kw) weight.
    """
    wrapped = as_model(model)
    name = resolve_layer(wrapped, layer, default="first")
    module = wrapped.layer(name)
    if not isinstance(module, nn.Conv2d):
        raise RequestError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d")
    weight = module.weight.detach().float().cpu()
    shown = weight[:max_filters]
    cell = 48
    if weight.shape[1] == 3:
        scale = shown.abs().max().clamp(min=1e-12)
        tiles = []
        for kernel in shown:
            rgb = ((kernel / scale + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
            tiles.append(
                Image.fromarray(np.ascontiguousarray(rgb)).resize((cell, cell), Image.NEAREST)
            )
        picture = viz.grid(
            tiles, [str(i) for i in range(len(tiles))], columns=8, cell=cell, padding=2
        )
    else:
        per_row = min(weight.shape[1], 16)
        slices = shown[:, :per_row].reshape(-1, *weight.shape[-2:])
        picture = gray_tiles(slices, columns=per_row, cell=cell // 2)
    info = {"layer": name, "shape": list(weight.shape), "shown": len(shown)}
    return Features("filters", {"weight": weight}, picture, info)


def activations(
    model: Model | nn.Module,
    image: Any,
    layer: str | nn.Module | None = None,
    max_channels: int = 64,
) -> Features:
    """The feature maps of ``layer`` for one image, strongest channels (by mean activation)
    first. ``data["activations"]`` is (C, h, w); ``data["order"]`` the channels as drawn."""
    wrapped = as_model(model)
    x = wrapped.inputs(image)[:1]
    name = resolve_layer(wrapped, layer, x)
    maps = layer_outputs(wrapped, x, name)[0]
    if maps.dim() != 3:
        raise RequestError(f"layer {name!r} gives {tuple(maps.shape)}, not (C, h, w) feature maps")
    order = torch.argsort(maps.mean(dim=(1, 2)), descending=True)
    shown = order[:max_channels]
    titles = [f"{int(c)}: {maps[c].mean():.2f}" for c in shown]
    picture = gray_tiles(maps[shown], columns=8, cell=64, titles=titles)
    info = {"layer": name, "shape": list(maps.shape), "strongest": shown[:8].tolist()}
    return Features("activations", {"activations": maps, "order": order}, picture, info)


def channel_contributions(
    model: Model | nn.Module, x: Any, target: int, layer: str | nn.Module | None = None
) -> torch.Tensor:
    """How much each channel of ``layer`` (the CAM layer by default) contributes to the class
    score ``target``: activation x gradient summed over space, (B, C). For a network ending in
    global average pooling and a linear layer this is exactly w_kc * GAP(A_k), the class score
    split by channel (Zhou et al. 2016); otherwise its first-order (Taylor) estimate."""
    wrapped = as_model(model)
    inputs = wrapped.inputs(x)
    module = wrapped.layer(resolve_layer(wrapped, layer, inputs))
    targets = check_target_spec(target, len(inputs), wrapped.labels)
    parts = []
    with session(wrapped, inputs, progress=False) as engine:
        for start, stop in engine.chunks(len(inputs)):
            step = engine.evaluate(inputs[start:stop], targets[start:stop], {0: module}, grad=True)
            (gradient,) = torch.autograd.grad(step.scores.sum(), step.captured[0])
            parts.append((step.captured[0].detach() * gradient).flatten(2).sum(2).cpu())
    return torch.cat(parts)
