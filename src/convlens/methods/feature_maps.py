"""Feature maps as the CAM family uses them: a layer's output put on its grid, weighted sums
of its channels, and upsampling to the input."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from convlens.checks import RequestError
from convlens.targets import channels_last_grid

__all__ = ["feature_maps", "safe_divide", "upsample", "weighted_sum"]


def feature_maps(t: Tensor, reshape: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A layer's output as feature maps (B, C, h, w): as it is, through ``reshape``, from a
    Swin-style grid (B, h, w, C), or, for tokens (B, N, C) of a vision transformer, the patch
    tokens on their square grid (a leading class token dropped)."""
    if reshape is not None:
        out = reshape(t)
        if not isinstance(out, Tensor) or out.dim() != 4 or len(out) != len(t):
            raise RequestError("reshape must return feature maps (B, C, h, w)")
        return out
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2) if channels_last_grid(t.shape) else t
    b, n, c = t.shape
    side = math.isqrt(n - 1)
    if side * side == n - 1 and side > 0:
        t = t[:, 1:]  # the class token
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise RequestError(
                f"tokens of shape {tuple(t.shape)} do not form a square grid (with or without "
                "a class token); pass reshape=function -> (B, C, h, w)"
            )
    return t.reshape(b, side, side, c).permute(0, 3, 1, 2)


def weighted_sum(activations: Tensor, weights: Tensor) -> Tensor:
    """Σ_k w_k A_k: activations (B, K, h, w) and weights (B, K) give maps (B, h, w)."""
    return torch.einsum("bkhw,bk->bhw", activations, weights)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Maps (B, h, w) bilinearly resized to the input size: (B, 1, H, W)."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 where the denominator is 0."""
    zero = denominator == 0
    return torch.where(
        zero, torch.zeros_like(numerator), numerator / denominator.masked_fill(zero, 1)
    )
