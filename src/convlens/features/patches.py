"""Receptive fields and maximally activating patches (Zeiler & Fergus 2014, "Visualizing and
Understanding Convolutional Networks", ECCV, section 4 and Fig. 2: the top 9 activations of a
unit over a data set, each shown as its image patch and its deconvnet projection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError, RequestIndexError, pair
from convlens.engine import session
from convlens.features.common import Features, layer_outputs, resolve_layer
from convlens.hooks import override_rectifiers, rules
from convlens.images import to_pictures
from convlens.model import Model, as_model
from convlens.targets import Neuron

__all__ = ["ReceptiveField", "receptive_field", "top_patches"]

POOLS = (nn.MaxPool2d, nn.AvgPool2d)
GLOBAL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)


@dataclass(frozen=True)
class ReceptiveField:
    """Per axis (rows, columns): ``size`` of the field, ``jump`` between neighbouring units,
    and ``offset``, the input coordinate where unit 0's field starts (negative inside the
    padding). ``input_size`` clips boxes to the image."""

    size: tuple[int, int]
    jump: tuple[int, int]
    offset: tuple[int, int]
    input_size: tuple[int, int]

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """The input pixels ``(x0, y0, x1, y1)`` that unit (y, x) sees, clipped to the image."""
        y0 = self.offset[0] + y * self.jump[0]
        x0 = self.offset[1] + x * self.jump[1]
        height, width = self.input_size
        return (
            max(x0, 0),
            max(y0, 0),
            min(x0 + self.size[1], width),
            min(y0 + self.size[0], height),
        )


def _window(module: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """(kernel, stride, padding before, dilation) per axis of a spatial module, else None."""
    if isinstance(module, nn.Conv2d):
        kernel, dilation = pair(module.kernel_size), pair(module.dilation)
        if isinstance(module.padding, str):  # "valid" or "same" (stride 1)
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            padding = (0, 0) if module.padding == "valid" else (total[0] // 2, total[1] // 2)
        else:
            padding = pair(module.padding)
        return kernel, pair(module.stride), padding, dilation
    if isinstance(module, POOLS):
        kernel = pair(module.kernel_size)
        stride = pair(module.stride if module.stride is not None else module.kernel_size)
        dilation = pair(getattr(module, "dilation", 1))
        return kernel, stride, pair(module.padding), dilation
    if isinstance(
        module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
    ):
        left, _, top, _ = module.padding
        return (1, 1), (1, 1), (top, left), (1, 1)
    return None


def receptive_field(
    model: Model | nn.Module, layer: str | nn.Module, input_size: tuple[int, int] | None = None
) -> ReceptiveField:
    """The exact receptive field of the units of ``layer``, from the convolutions, poolings and
    padding modules a forward pass runs before it (in call order).

    Exact for chains of such modules and for residual additions of identity branches (the
    longest path sets the field). A module called several times (a reused ReLU) is taken at
    its last call, where the other feature functions read it. Padding or pooling done with
    ``torch.nn.functional`` calls inside a ``forward`` is not seen. A global pooling or linear
    layer before ``layer`` makes the field the whole image.
    """
    wrapped = as_model(model)
    name = layer if isinstance(layer, str) else wrapped.layer_name(layer)
    target = wrapped.layer(name)
    size = input_size or wrapped.input_size
    if size is None:
        raise RequestError("give input_size=(H, W) for a bare nn.Module")
    calls: list[nn.Module] = []

    def record(module: nn.Module, _args: Any, _out: Any) -> None:
        calls.append(module)

    probe = torch.zeros(1, 3, *size)
    with session(wrapped, probe, progress=False) as engine:
        handles = [m.register_forward_hook(record) for m in wrapped.module.modules()]
        try:
            engine.forward(probe)
        finally:
            for handle in handles:
                handle.remove()
    if target not in calls:
        raise RequestError(f"layer {name!r} is not called in the forward pass")
    # a module called more than once is read at its last call (as ``hooks.capture`` does)
    last = len(calls) - 1 - calls[::-1].index(target)
    calls = calls[: last + 1]
    rf, jump, offset = [1, 1], [1, 1], [0, 0]
    for module in calls:
        if isinstance(module, GLOBAL):
            return ReceptiveField(tuple(size), tuple(size), (0, 0), tuple(size))
        window = _window(module)
        if window is None:
            continue
        kernel, stride, padding, dilation = window
        for axis in range(2):
            offset[axis] -= padding[axis] * jump[axis]
            rf[axis] += (kernel[axis] - 1) * dilation[axis] * jump[axis]
            jump[axis] *= stride[axis]
    return ReceptiveField(tuple(rf), tuple(jump), tuple(offset), tuple(size))


def top_patches(
    model: Model | nn.Module,
    images: Any,
    layer: str | nn.Module | None = None,
    channel: int = 0,
    k: int = 9,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Features:
    """The ``k`` images whose strongest response of ``channel`` in ``layer`` is largest, each
    cropped at that unit's receptive field, with its deconvnet projection (Zeiler & Fergus).

    ``data``: ``values`` (k,) the activations, ``indices`` (k,) the images, ``positions`` (k, 2)
    the units (y, x), ``boxes`` (k, 4) the fields, ``patches`` and ``projections`` (lists of
    (3, h, w) tensors; patches in [0, 1], projections the deconvnet signal on the input).
    """
    wrapped = as_model(model)
    x = wrapped.inputs(images)
    name = resolve_layer(wrapped, layer, x)

    def strongest(out: Tensor) -> Tensor:  # per image: (value, y, x) of the channel's maximum
        if out.dim() != 4:
            raise RequestError(f"layer {name!r} gives {tuple(out.shape)}, not (B, C, h, w)")
        if not 0 <= channel < out.shape[1]:
            raise RequestIndexError(
                f"channel {channel} is out of range for {out.shape[1]} channels"
            )
        value, where = out[:, channel].flatten(1).float().max(dim=1)
        width = out.shape[-1]
        return torch.stack([value, (where // width).float(), (where % width).float()], dim=1)

    best = layer_outputs(wrapped, x, name, batch_size, progress=progress, select=strongest)
    values, positions = best[:, 0], best[:, 1:].long()
    order = torch.argsort(values, descending=True, stable=True)[:k]
    field = receptive_field(wrapped, name, tuple(x.shape[-2:]))
    pictures = torch.from_numpy(wrapped.to_display(x[order])).permute(0, 3, 1, 2).float() / 255
    patches, projections, boxes = [], [], []
    with session(wrapped, x, progress=False) as engine:
        for row, i in enumerate(order.tolist()):
            y, xx = positions[i].tolist()
            box = field.box(y, xx)
            with override_rectifiers(rules.deconvnet, refuse="top_patches' deconvnet projection"):
                step = engine.evaluate(x[i : i + 1], [Neuron(name, channel, y, xx)], grad=True)
            (gradient,) = torch.autograd.grad(step.scores.sum(), step.inputs)
            x0, y0, x1, y1 = box
            boxes.append(box)
            patches.append(pictures[row, :, y0:y1, x0:x1])
            projections.append(gradient[0, :, y0:y1, x0:x1].detach().float().cpu())
    tiles = [Image.fromarray((p * 255).round().byte().permute(1, 2, 0).numpy()) for p in patches]
    tiles += [Image.fromarray(to_pictures(p[None])[0]) for p in projections]
    titles = [f"#{i}: {values[i]:.2f}" for i in order.tolist()] + ["deconvnet"] * len(order)
    picture = viz.grid(tiles, titles, columns=len(order), cell=96, padding=2)
    data = {
        "values": values[order],
        "indices": order,
        "positions": positions[order],
        "boxes": torch.tensor(boxes),
        "patches": patches,
        "projections": projections,
    }
    info = {"layer": name, "channel": channel, "receptive_field": list(field.size)}
    return Features("top_patches", data, picture, info)
