"""Network dissection: Bau, Zhou, Khosla, Oliva & Torralba 2017, "Network Dissection:
Quantifying Interpretability of Deep Visual Representations" (CVPR, arXiv:1704.05796),
section 2.2.

For each unit k of a layer, T_k is the activation exceeded with probability ``quantile``
(0.005) over every spatial location of the layer's maps on all images (the maps at the layer's
own resolution, as the paper computes "the distribution of individual unit activations"). Each
map is scaled up to the concept masks' resolution by bilinear interpolation (PyTorch's
``align_corners=False``: unit (i, j) is anchored at the centre of its cell of the image, which is
the centre of its receptive field for the usual "same"-padded, strided layers, as the paper
anchors interpolants) and thresholded, M_k = S_k > T_k (the paper writes >=; strict, so that a
unit silent on more than 99.5% of places, whose T_k is 0, selects nothing rather than the whole
image). M_k is compared with each concept's masks L_c by the data-set-wide
IoU_{k,c} = sum |M_k ∩ L_c| / sum |M_k ∪ L_c| (equation 1), the sums over the images that carry
labels of c's category (``annotated``; all images when not given). Each unit is labelled with
its best concept, and is a *detector* of it when that IoU exceeds 0.04; the number of unique
concepts detected is the layer's interpretability (section 2.2, "the number of unique
detectors"). Concepts come from the user as masks, or from a Broden-style folder
(``cl.datasets.read_broden``, :func:`broden_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError, positive_number
from convlens.datasets import Broden, BrodenFolder
from convlens.features.common import Features, layer_outputs, resolve_layer
from convlens.model import Model, as_model

__all__ = ["DETECTOR_IOU", "broden_inputs", "check_concepts", "dissect"]

DETECTOR_IOU = 0.04  # Bau et al. 2017, section 2.2: "we report a detector if IoU > 0.04"
CHUNK = 16  # images whose masks are read (and IoU sums taken) at a time


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


def broden_inputs(model: Model | nn.Module, broden: Broden | BrodenFolder) -> Tensor:
    """``broden``'s images as ``model`` takes them (:meth:`Model.normalise`): scaled to its
    input size and normalised, without cropping, so that the masks stay aligned. A
    :class:`~convlens.datasets.BrodenFolder` is decoded whole: ``dissect(model, None,
    folder)`` reads it chunk by chunk instead."""
    wrapped = as_model(model)
    images = broden.images if isinstance(broden, Broden) else broden.read_images()
    return wrapped.normalise(images, wrapped.input_size)


def _check_annotated(annotated: Mapping[str, Any] | None, names: list[str], n: int) -> Tensor:
    """(N, C) float: which images count for each concept (all, when ``annotated`` is None)."""
    if annotated is None:
        return torch.ones(n, len(names), dtype=torch.float64)
    columns = []
    for name in names:
        if name not in annotated:
            raise RequestError(f"annotated has no entry for concept {name!r}")
        which = torch.as_tensor(annotated[name])
        if which.shape != (n,) or which.dtype != torch.bool:
            raise RequestError(f"annotated[{name!r}] must be ({n},) bool, not {which.dtype} "
                               f"{tuple(which.shape)}")  # fmt: skip
        columns.append(which)
    return torch.stack(columns, dim=1).double()


Reader = Callable[[int, int], Tensor]


def _sources(
    wrapped: Model, images: Any, concept_masks: Any, annotated: Mapping[str, Any] | None
) -> tuple[int, list[str], Reader, Reader, Mapping[str, Any] | None]:
    """The number of images, the concept names, and readers of images ``start:stop`` (model
    inputs) and of their masks ((n, C, h, w) bool), from an input batch and masks, or from a
    Broden record (which may bring its images: ``images=None``)."""
    record = concept_masks if isinstance(concept_masks, (Broden, BrodenFolder)) else None
    if record is not None:
        if annotated is not None:
            raise RequestError("give annotated or a Broden record, not both")
        annotated = record.annotated
    if images is None:
        if record is None:
            raise RequestError("give images (images=None only with a Broden record)")
        raw = record.images if isinstance(record, Broden) else None

        def read_images(start: int, stop: int) -> Tensor:
            chunk = raw[start:stop] if raw is not None else record.read_images(start, stop)
            return wrapped.inputs(wrapped.normalise(chunk, wrapped.input_size))

        n = len(record)
    else:
        x = wrapped.inputs(images)
        n = len(x)

        def read_images(start: int, stop: int) -> Tensor:
            return x[start:stop]

    if isinstance(record, BrodenFolder):
        if not record.concepts:
            raise RequestError("the Broden record has no concepts: no label occurs in its images")
        if len(record) != n:
            raise RequestError(f"the Broden record has {len(record)} images, not {n}")
        return n, record.concepts, read_images, record.read_masks, annotated
    checked = check_concepts(record.masks if record is not None else concept_masks, n)
    names = list(checked)

    def read_masks(start: int, stop: int) -> Tensor:
        return torch.stack([checked[name][start:stop] for name in names], dim=1)

    return n, names, read_images, read_masks, annotated


def _thresholds(maps: Tensor, quantile: float) -> Tensor:
    """T_k (K,): the value exceeded with probability ``quantile`` over every place of every
    image, exactly (kthvalue), a block of units at a time."""
    n_units = maps.shape[1]
    places = maps.shape[0] * maps[0, 0].numel()
    rank = max(1, places - round(quantile * places))  # P(a > T) = quantile
    thresholds = torch.empty(n_units)
    for k in range(0, n_units, 64):
        values = maps[:, k : k + 64].transpose(0, 1).reshape(-1, places)
        thresholds[k : k + 64] = values.kthvalue(rank, dim=1).values
    return thresholds


def dissect(
    model: Model | nn.Module,
    images: Any,
    concept_masks: Mapping[str, Any] | Broden | BrodenFolder,
    layer: str | nn.Module | None = None,
    quantile: float = 0.005,
    batch_size: int | None = None,
    detector_iou: float = DETECTOR_IOU,
    annotated: Mapping[str, Any] | None = None,
) -> Features:
    """Dissect ``layer`` on ``images`` against ``concept_masks`` ({name: (N, H, W) bool}, or a
    Broden record, :class:`~convlens.datasets.Broden` or the lazy
    :class:`~convlens.datasets.BrodenFolder`, whose ``annotated`` is then used; with a record,
    ``images=None`` takes its own images, scaled and normalised for the model).

    ``annotated`` ({name: (N,) bool}): the images that carry labels of each concept's category;
    only they count in its IoU (Bau et al. 2017, equation 1). ``detector_iou``: a unit is a
    detector of its best concept when that IoU exceeds it (0.04 in the paper).

    Memory: the layer's maps of all images at the layer's resolution (float32, what T_k needs
    exactly); the masks are read and the IoU's sums taken image chunk by image chunk, one
    image's upsampled maps at a time.

    ``data``: ``thresholds`` (K,), ``iou`` (K, C), ``best_concept`` (K,) indices into
    ``info["concepts"]``, ``best_iou`` (K,), ``detector`` (K,) bool, ``unique_detectors`` (a
    0-d tensor, the number of distinct concepts that detectors detect). ``info["detectors"]``:
    ``{concept: [units]}``. The picture ranks the units by their best IoU, marks detectors and
    states the count.
    """
    quantile = positive_number("quantile", quantile)
    if quantile >= 1:
        raise RequestError(f"quantile must be in (0, 1), not {quantile}")
    detector_iou = positive_number("detector_iou", detector_iou, zero=True)
    if detector_iou >= 1:
        raise RequestError(f"detector_iou must be in [0, 1), not {detector_iou}")
    wrapped = as_model(model)
    n, names, read_images, read_masks, annotated = _sources(
        wrapped, images, concept_masks, annotated
    )
    counted = _check_annotated(annotated, names, n)  # (N, C): the images that count
    first = read_images(0, 1)
    name = resolve_layer(wrapped, layer, first)
    # the layer's maps of all images, at its own resolution: the one copy kept
    maps = layer_outputs(wrapped, first, name, batch_size, read=(n, read_images))
    if maps.dim() != 4:
        raise RequestError(f"layer {name!r} gives {tuple(maps.shape)}, not (N, K, h, w) maps")
    n_units = maps.shape[1]
    thresholds = _thresholds(maps, quantile)
    # sum_i w_ic |M_k ∩ L_c| by image; sum_i w_ic (|M_k| + |L_c|) from per-image counts
    intersection = torch.zeros(n_units, len(names), dtype=torch.float64)
    fired = torch.zeros(n, n_units, dtype=torch.float64)  # |M_k| of each image
    area = torch.zeros(n, len(names), dtype=torch.float64)  # |L_c| of each image
    for start in range(0, n, CHUNK):
        masks = read_masks(start, min(n, start + CHUNK))  # (b, C, h, w) bool
        for i, concept in enumerate(masks.flatten(2), start=start):
            area[i] = concept.sum(1)
            if not counted[i].any():
                continue
            upsampled = F.interpolate(
                maps[i : i + 1], size=masks.shape[-2:], mode="bilinear", align_corners=False
            )[0]
            active = (upsampled > thresholds.view(-1, 1, 1)).flatten(1)  # (K, HW) bool
            fired[i] = active.sum(1)
            kept = (counted[i] > 0) & (area[i] > 0)
            if kept.any():  # counts below 2^24: exact in float32
                both = active.float() @ concept[kept].float().T  # (K, kept)
                intersection[:, kept] += both.double()  # kept: images that count (weight 1)
    union = fired.T @ counted + (area * counted).sum(0) - intersection
    iou = intersection / union.clamp(min=1)
    best_iou, best = iou.max(dim=1)
    detector = best_iou > detector_iou
    detectors: dict[str, list[int]] = {}
    for k in detector.nonzero().flatten().tolist():
        detectors.setdefault(names[int(best[k])], []).append(k)
    picture = _ranking(best_iou, best, names, name, detector, len(detectors), detector_iou)
    data = {
        "thresholds": thresholds,
        "iou": iou,
        "best_concept": best,
        "best_iou": best_iou,
        "detector": detector,
        "unique_detectors": torch.tensor(len(detectors)),
    }
    info = {
        "layer": name,
        "concepts": names,
        "units": n_units,
        "quantile": quantile,
        "detector_iou": detector_iou,
        "unique_detectors": len(detectors),
        "detectors": detectors,
    }
    return Features("dissect", data, picture, info)


def _ranking(
    best_iou: Tensor,
    best: Tensor,
    names: list[str],
    layer: str,
    detector: Tensor,
    unique: int,
    detector_iou: float,
    top: int = 20,
) -> Any:
    order = torch.argsort(best_iou, descending=True)[:top]
    figure, axes = viz.new_figure((7, 0.3 * len(order) + 1.2))
    labels = [
        f"unit {int(k)}: {names[int(best[k])]}" + (" (detector)" if detector[k] else "")
        for k in order
    ]
    colours = ["tab:orange" if detector[k] else "tab:gray" for k in order]
    axes.barh(range(len(order)), best_iou[order].numpy(), color=colours)
    axes.axvline(detector_iou, color="black", linewidth=0.8, linestyle="--")
    axes.set_yticks(range(len(order)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"IoU with the best concept (detector: IoU > {detector_iou:g}, dashed)")
    detected = int(detector.sum())
    axes.set_title(
        f"network dissection of {layer}: {detected} detector units, {unique} unique concepts",
        fontsize=10,
    )
    return viz.figure_image(figure)
