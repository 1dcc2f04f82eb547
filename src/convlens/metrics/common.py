"""What every metric needs: heat maps from any attribution, and boxes per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from convlens.checks import RequestError, RequestTypeError
from convlens.explanation import Explanation

__all__ = ["as_boxes", "heatmaps"]


def heatmaps(attribution: Explanation | Tensor) -> Tensor:
    """(B, H, W) float maps from an :class:`Explanation` (its ``heatmap()``) or a tensor
    (B, H, W), (B, 1, H, W), or (B, C, H, W) (summed over channels, as attributions add up)."""
    if isinstance(attribution, Explanation):
        heat = attribution.heatmap()
    elif isinstance(attribution, Tensor):
        heat = attribution.detach().float().cpu()
        if heat.dim() == 4:
            heat = heat.sum(dim=1)
        if heat.dim() != 3:
            raise RequestError(
                "an attribution must be (B, H, W), (B, 1, H, W) or (B, C, H, W), not "
                f"{tuple(attribution.shape)}"
            )
    else:
        raise RequestTypeError(
            f"expected an Explanation or a tensor, not {type(attribution).__name__}"
        )
    if not torch.isfinite(heat).all():
        raise RequestError("the attribution contains NaN or infinite values")
    return heat


def as_boxes(boxes: Any, n: int) -> list[Tensor]:
    """One (K, 4) tensor of ``(x0, y0, x1, y1)`` boxes per image (right, bottom exclusive).

    Accepts a (B, 4) tensor or array (one box per image), or a list with, per image, one box or
    a list of boxes (an image may show several instances of its class).
    """
    if isinstance(boxes, Tensor) or hasattr(boxes, "shape"):
        table = torch.as_tensor(boxes).float()
        if table.dim() != 2 or table.shape[1] != 4:
            raise RequestError(f"boxes must be (B, 4), not {tuple(table.shape)}")
        per_image = [row[None] for row in table]
    elif isinstance(boxes, Sequence):
        per_image = []
        for item in boxes:
            box = torch.as_tensor(item, dtype=torch.float32)
            per_image.append(box[None] if box.dim() == 1 else box)
    else:
        raise RequestTypeError(f"boxes must be a tensor or a list, not {type(boxes).__name__}")
    if len(per_image) != n:
        raise RequestError(f"got boxes for {len(per_image)} images but {n} maps")
    for box in per_image:
        if box.dim() != 2 or box.shape[1] != 4 or len(box) == 0:
            raise RequestError(f"each image needs boxes of shape (K, 4), not {tuple(box.shape)}")
        if ((box[:, 2] <= box[:, 0]) | (box[:, 3] <= box[:, 1])).any():
            raise RequestError(f"boxes must have x1 > x0 and y1 > y0: {box.tolist()}")
    return per_image
