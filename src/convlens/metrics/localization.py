"""Localization: does the map point at the object?

- :func:`pointing_game`: Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop"
  (ECCV): a hit when the map's maximum lies within ``tolerance`` (15) pixels of the object. The
  paper scores, for each object class of an image, that class's map against that class's boxes;
  these functions score the maps and boxes they are given, so give each map its own class's
  boxes (``convlens.report.evaluation`` does, when the boxes carry the model's labels).
- :func:`energy_pointing_game`: Wang et al. 2020, "Score-CAM" (CVPRW), section 4.3: the share
  of the map's positive energy inside the object's box.
- :func:`localization`: Zhou et al. 2016 (CAM, 20% of the maximum) and Selvaraju et al. 2017
  (Grad-CAM, 15%): threshold the map, box the largest connected component, IoU with the
  ground truth; a hit at IoU >= 0.5.
- :func:`localization_error`: Zhou et al. 2016, "Learning Deep Features for Discriminative
  Localization" (CVPR), section 3.1: the ILSVRC top-1 and top-5 localisation error, where a
  prediction is right when its class is right and its map's box has IoU >= 0.5.
- :func:`saliency_segmentation`: Simonyan et al. 2014, "Deep Inside Convolutional Networks",
  section 6: object masks grown from the saliency map's strongest and weakest pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convlens.checks import RequestError
from convlens.explanation import Explanation
from convlens.metrics.common import as_boxes, heatmaps

__all__ = [
    "Localization",
    "LocalizationError",
    "box_iou",
    "energy_pointing_game",
    "heatmap_box",
    "localization",
    "localization_error",
    "paper_threshold",
    "pointing_game",
    "saliency_segmentation",
]

# thresholds of the papers, as a fraction of the map's maximum
THRESHOLDS = {"cam": 0.20}
DEFAULT_THRESHOLD = 0.15


def paper_threshold(method: str | None) -> float:
    """The fraction of the maximum a method's map is thresholded at to box it: 20% for CAM
    (Zhou et al. 2016), 15% for the others (Selvaraju et al. 2017)."""
    return THRESHOLDS.get(method or "", DEFAULT_THRESHOLD)


def _inside(height: int, width: int, boxes: Tensor) -> Tensor:
    """(H, W) bool: pixels inside any of the boxes."""
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    inside = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        inside |= (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return inside


def pointing_game(attribution: Explanation | Tensor, boxes: Any, tolerance: float = 15) -> Tensor:
    """(B,) bool: whether each map's maximum lies within ``tolerance`` pixels of one of the
    image's boxes (Zhang et al. 2016). With several maxima the first in raster order counts."""
    heat = heatmaps(attribution)
    per_image = as_boxes(boxes, len(heat))
    hits = []
    for map_, box in zip(heat, per_image, strict=True):
        y, x = divmod(int(map_.flatten().argmax()), map_.shape[1])
        # distance from the pixel to the box's pixels (x1, y1 exclusive)
        dx = torch.clamp(torch.maximum(box[:, 0] - x, x - (box[:, 2] - 1)), min=0)
        dy = torch.clamp(torch.maximum(box[:, 1] - y, y - (box[:, 3] - 1)), min=0)
        hits.append(bool((torch.hypot(dx, dy) <= tolerance).any()))
    return torch.tensor(hits)


def energy_pointing_game(attribution: Explanation | Tensor, boxes: Any) -> Tensor:
    """(B,) float: the share of each map's positive values that lies inside its boxes
    (Wang et al. 2020). 0 for a map with no positive value."""
    heat = heatmaps(attribution)
    per_image = as_boxes(boxes, len(heat))
    shares = []
    for map_, box in zip(heat, per_image, strict=True):
        energy = map_.clamp(min=0).double()
        total = energy.sum()
        inside = energy[_inside(*map_.shape, box)].sum()
        shares.append(float(inside / total) if total > 0 else 0.0)
    return torch.tensor(shares, dtype=torch.float64)


def box_iou(a: Any, b: Any) -> Tensor:
    """Intersection over union of boxes ``a`` (N, 4) and ``b`` (M, 4): an (N, M) tensor."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 4)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4)
    width = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(
        a[:, None, 0], b[None, :, 0]
    )
    height = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(
        a[:, None, 1], b[None, :, 1]
    )
    overlap = width.clamp(min=0) * height.clamp(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return overlap / (area_a[:, None] + area_b[None, :] - overlap)


def heatmap_box(heatmap: Tensor | np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """The box ``(x0, y0, x1, y1)`` of the largest 8-connected region where the map reaches
    ``threshold`` times its maximum (Zhou et al. 2016). A map with no positive value boxes the
    whole image."""
    from scipy import ndimage

    heat = np.asarray(heatmap, dtype=np.float64)
    height, width = heat.shape
    peak = heat.max()
    if not peak > 0:
        return torch.tensor([0, 0, width, height])
    labels, count = ndimage.label(heat >= threshold * peak, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    rows, cols = np.nonzero(labels == int(sizes.argmax()))
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


@dataclass(frozen=True)
class Localization:
    """Boxes predicted from the maps and how well they match the ground truth.

    ``boxes`` (B, 4); ``iou`` (B,), the best IoU with any of the image's boxes; ``hit`` (B,)
    whether it reaches 0.5; ``hit_rate`` their mean; ``threshold`` the fraction of the maximum.
    """

    boxes: Tensor
    iou: Tensor
    hit: Tensor
    hit_rate: float
    threshold: float


def localization(
    attribution: Explanation | Tensor, boxes: Any, threshold: float | None = None
) -> Localization:
    """Weakly supervised localization: box each map (:func:`heatmap_box`) and compare.

    ``threshold`` defaults to the paper of the method: 20% of the maximum for CAM (Zhou et al.
    2016), 15% otherwise (Selvaraju et al. 2017).
    """
    heat = heatmaps(attribution)
    per_image = as_boxes(boxes, len(heat))
    if threshold is None:
        threshold = paper_threshold(
            attribution.method if isinstance(attribution, Explanation) else None
        )
    _check_threshold(threshold)
    predicted = torch.stack([heatmap_box(map_.numpy(), threshold) for map_ in heat])
    iou = torch.stack(
        [box_iou(p, truth).max() for p, truth in zip(predicted, per_image, strict=True)]
    )
    hit = iou >= 0.5
    return Localization(predicted, iou, hit, float(hit.double().mean()), threshold)


def _check_threshold(threshold: float) -> None:
    if not 0 <= threshold <= 1:
        raise RequestError(
            f"threshold must be a fraction of the maximum in [0, 1], not {threshold}"
        )


@dataclass(frozen=True)
class LocalizationError:
    """ILSVRC-style localisation error (Zhou et al. 2016).

    ``top1`` and ``top5``: the share of images localised wrongly by the most probable class,
    and by every one of the ``k`` most probable; ``correct`` (B, K): whether the j-th predicted
    class is one of the image's and the box of its map overlaps a box of that class with IoU
    >= 0.5; ``iou`` (B, K): that best IoU (0 when the class is not one of the image's);
    ``k``: the classes counted for ``top5`` (5, or all of them with fewer classes);
    ``threshold``: the fraction of the maximum the maps were boxed at.
    """

    top1: float
    top5: float
    correct: Tensor
    iou: Tensor
    k: int
    threshold: float


def localization_error(
    maps: Tensor | Sequence[Sequence[Tensor | None]],
    predicted: Any,
    boxes: Any,
    classes: Sequence[Sequence[int]],
    threshold: float | None = None,
    k: int = 5,
) -> LocalizationError:
    """Top-1 and top-5 localisation error (Zhou et al. 2016, "Learning Deep Features for
    Discriminative Localization", CVPR, section 3.1, the ILSVRC localisation protocol).

    An image is localised by its j-th predicted class when that class is one of the image's
    (the classes of its ground-truth boxes) and the box of the class's map
    (:func:`heatmap_box`: the largest connected region above ``threshold`` of the maximum,
    20% as in the paper by default) has IoU >= 0.5 with a ground-truth box of that class.
    Top-1 error: the share of images not localised by their most probable class; top-5
    error: not localised by any of the ``k`` most probable.

    Args:
        maps: (B, K, H, W), or per image K maps (H, W): the map of each predicted class. A
            class that is not one of the image's needs no map (``None``): it is wrong anyway.
        predicted: (B, K) class indices, the most probable first.
        boxes: per image, its ground-truth boxes (M, 4) (see ``as_boxes``).
        classes: per image, the class of each of its M boxes.
    """
    threshold = paper_threshold("cam") if threshold is None else float(threshold)
    _check_threshold(threshold)
    ranked = torch.as_tensor(predicted).long()
    if ranked.dim() != 2 or ranked.shape[1] == 0:
        raise RequestError(f"predicted must be (B, K) class indices, not {tuple(ranked.shape)}")
    per_image = as_boxes(boxes, len(ranked))
    if len(maps) != len(ranked) or len(classes) != len(ranked):
        raise RequestError(
            f"got {len(maps)} images of maps and {len(classes)} of box classes for "
            f"{len(ranked)} images of predictions"
        )
    iou = torch.zeros(ranked.shape, dtype=torch.float64)
    for b, (truth, wanted) in enumerate(zip(per_image, classes, strict=True)):
        owners = torch.as_tensor(list(wanted), dtype=torch.long).reshape(-1)
        if len(owners) != len(truth):
            raise RequestError(f"image {b} has {len(truth)} boxes but {len(owners)} box classes")
        if len(maps[b]) != ranked.shape[1]:
            raise RequestError(f"image {b} has {len(maps[b])} maps for {ranked.shape[1]} classes")
        for j, c in enumerate(ranked[b].tolist()):
            mine = truth[owners == c]
            if len(mine) == 0:
                continue  # the class is wrong: its map is not read
            if maps[b][j] is None:
                raise RequestError(f"image {b} needs the map of its class {c} (prediction {j})")
            box = heatmap_box(torch.as_tensor(maps[b][j]).detach().cpu().numpy(), threshold)
            iou[b, j] = box_iou(box, mine).max()
    correct = iou >= 0.5
    k = min(k, ranked.shape[1])
    top1 = 1.0 - float(correct[:, 0].double().mean())
    top5 = 1.0 - float(correct[:, :k].any(dim=1).double().mean())
    return LocalizationError(top1, top5, correct, iou, k, threshold)


def saliency_segmentation(
    attribution: Explanation | Tensor,
    images: Any = None,
    foreground: float = 0.95,
    background: float = 0.30,
    beta: float = 130.0,
) -> Tensor:
    """(B, H, W) bool object masks grown from a saliency map (Simonyan et al. 2014, section 6).

    As in the paper, pixels above the ``foreground`` quantile of the map seed the object and
    pixels below the ``background`` quantile seed the background; the rest is labelled by
    colour. The paper uses GraphCut on colour models; here the seeds are propagated by the
    random-walker segmentation of scikit-image (Grady 2006) on the RGB picture. ``images``
    (B, H, W, 3) uint8 defaults to the explanation's display pictures.
    """
    from skimage.segmentation import random_walker

    heat = heatmaps(attribution)
    if images is None:
        if not isinstance(attribution, Explanation):
            raise RequestError("give the images (B, H, W, 3) to segment along with a tensor map")
        images = np.stack([attribution._picture(i) for i in range(len(heat))])
    images = np.asarray(images)
    if images.shape[:3] != tuple(heat.shape):
        raise RequestError(f"images {images.shape} do not match maps {tuple(heat.shape)}")
    if not 0 <= background < foreground <= 1:
        raise RequestError("need 0 <= background < foreground <= 1 (quantiles of the map)")
    masks = []
    for map_, picture in zip(heat.numpy(), images, strict=True):
        seeds = np.zeros(map_.shape, dtype=np.int32)
        seeds[map_ >= np.quantile(map_, foreground)] = 1
        seeds[map_ <= np.quantile(map_, background)] = 2
        if not (seeds == 1).any() or not (seeds == 2).any():
            masks.append(np.zeros(map_.shape, dtype=bool))
            continue
        labels = random_walker(picture.astype(np.float64) / 255, seeds, beta=beta, channel_axis=-1)
        masks.append(labels == 1)
    return torch.from_numpy(np.stack(masks))
