"""Network dissection: Bau, Zhou, Khosla, Oliva & Torralba 2017, "Network Dissection:
Quantifying Interpretability of Deep Visual Representations" (CVPR), section 2.2.

For each unit k of a layer, T_k is the activation exceeded with probability ``quantile``
(0.005) over all images and places; its maps, upsampled bilinearly to the masks' size and
thresholded at T_k, are compared with each concept's masks by
IoU_{k,c} = sum |M_k ∩ L_c| / sum |M_k ∪ L_c| over the data set. A unit is a detector of the
concept with the largest IoU. Concepts come from the user as masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError
from convlens.features.common import Features, layer_outputs, resolve_layer
from convlens.model import Model, as_model

__all__ = ["check_concepts", "dissect"]


def check_concepts(concept_masks: Any, n_images: int | None = None) -> dict[str, Tensor]:
    """``{name: (N, H, W) masks}`` as boolean tensors, or a one-line error naming the concept
    at fault: names must be non-empty strings; masks boolean, or numbers that are all 0 or 1
    (no NaN); every concept's masks of one shape, with ``n_images`` masks when given."""
    if not isinstance(concept_masks, Mapping):
        raise RequestError(
            f"concepts must be a dict {{name: (N, H, W) masks}}, not {type(concept_masks).__name__}"
        )
    if not concept_masks:
        raise RequestError("give at least one concept: {name: masks (N, H, W)}")
    checked: dict[str, Tensor] = {}
    shape = None
    for name, value in concept_masks.items():
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"concept names must be non-empty strings, not {name!r}")
        try:
            masks = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise RequestError(
                f"concept {name!r} is a {type(value).__name__}, not (N, H, W) masks"
            ) from None
        if masks.dim() != 3 or 0 in masks.shape:
            raise RequestError(
                f"concept {name!r} has masks of shape {tuple(masks.shape)}, not (N, H, W)"
            )
        if masks.is_complex() or not (
            masks.dtype == torch.bool or bool(((masks == 0) | (masks == 1)).all())
        ):
            raise RequestError(
                f"concept {name!r} must be boolean masks (or 0 and 1), not {masks.dtype} values "
                "such as NaN or 0.5"
            )
        if shape is not None and masks.shape != shape:
            raise RequestError(
                f"concept {name!r} has masks of shape {tuple(masks.shape)}; the first concept's "
                f"are {tuple(shape)}"
            )
        shape = masks.shape
        if n_images is not None and masks.shape[0] != n_images:
            raise RequestError(
                f"concept {name!r} has {masks.shape[0]} masks; each concept needs one per "
                f"image ({n_images})"
            )
        checked[name] = masks.bool()
    return checked


def dissect(
    model: Model | nn.Module,
    images: Any,
    concept_masks: Mapping[str, Any],
    layer: str | nn.Module | None = None,
    quantile: float = 0.005,
    batch_size: int | None = None,
) -> Features:
    """Dissect ``layer`` on ``images`` against ``concept_masks`` ({name: (N, H, W) bool}).

    ``data``: ``thresholds`` (K,), ``iou`` (K, C), ``best_concept`` (K,) indices into
    ``info["concepts"]``, ``best_iou`` (K,). The picture ranks the units by their best IoU.
    """
    wrapped = as_model(model)
    x = wrapped.inputs(images)
    checked = check_concepts(concept_masks, len(x))
    names = list(checked)
    masks = torch.stack([checked[n] for n in names], dim=1)
    if not 0 < quantile < 1:
        raise RequestError(f"quantile must be in (0, 1), not {quantile}")
    name = resolve_layer(wrapped, layer, x)
    maps = layer_outputs(wrapped, x, name, batch_size)
    if maps.dim() != 4:
        raise RequestError(f"layer {name!r} gives {tuple(maps.shape)}, not (N, K, h, w) maps")
    n_units = maps.shape[1]
    values = maps.transpose(0, 1).reshape(n_units, -1)
    rank = max(1, values.shape[1] - round(quantile * values.shape[1]))  # P(a > T) = quantile
    thresholds = values.kthvalue(rank, dim=1).values
    intersection = torch.zeros(n_units, len(names), dtype=torch.float64)
    union = torch.zeros(n_units, len(names), dtype=torch.float64)
    size = masks.shape[-2:]
    for start in range(0, len(x), 16):
        chunk = maps[start : start + 16]
        upsampled = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
        active = (upsampled > thresholds.view(1, -1, 1, 1)).flatten(2).double()  # (b, K, HW)
        concept = masks[start : start + 16].flatten(2).double()  # (b, C, HW)
        both = torch.einsum("bkp,bcp->kc", active, concept)
        intersection += both
        union += active.sum(dim=(0, 2))[:, None] + concept.sum(dim=(0, 2))[None, :] - both
    iou = intersection / union.clamp(min=1)
    best_iou, best = iou.max(dim=1)
    picture = _ranking(best_iou, best, names, name)
    data = {"thresholds": thresholds, "iou": iou, "best_concept": best, "best_iou": best_iou}
    info = {"layer": name, "concepts": names, "units": n_units, "quantile": quantile}
    return Features("dissect", data, picture, info)


def _ranking(best_iou: Tensor, best: Tensor, names: list[str], layer: str, top: int = 20) -> Any:
    order = torch.argsort(best_iou, descending=True)[:top]
    figure, axes = viz.new_figure((7, 0.3 * len(order) + 1))
    labels = [f"unit {int(k)}: {names[int(best[k])]}" for k in order]
    axes.barh(range(len(order)), best_iou[order].numpy())
    axes.set_yticks(range(len(order)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("IoU with the best concept")
    axes.set_title(f"network dissection of {layer}", fontsize=10)
    return viz.figure_image(figure)
