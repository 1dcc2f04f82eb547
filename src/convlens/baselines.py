"""Reference inputs ("baselines") shared by integrated gradients, occlusion, LIME and the metrics.

``"zero"`` is the all-zero tensor in the model's input space (for a normalised model: the
dataset's mean colour), ``"mean"`` each image's per-channel mean, ``"blur"`` a Gaussian blur of
the image (Sturmfels et al. 2020, "Visualizing the Impact of Feature Attribution Baselines",
Distill), and a tensor is used as given (broadcast to the input's shape).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from convlens.checks import RequestError, finite

__all__ = ["BaselineSpec", "check_baseline", "gaussian_blur", "make_baseline"]

BaselineSpec = str | float | Tensor

BASELINES = ("zero", "mean", "blur")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (B, C, H, W) batch with reflected borders."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def check_baseline(spec: object, name: str = "baseline", extra: tuple[str, ...] = ()) -> None:
    """Refuse, by ``name``, a baseline that :func:`make_baseline` (or the method's own
    ``extra`` names) cannot make: an unknown name, a non-finite number or tensor."""
    if isinstance(spec, Tensor):
        if not bool(torch.isfinite(spec).all()):
            raise RequestError(f"the {name} tensor contains NaN or infinite values")
        return
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        finite(name, spec)
        return
    if isinstance(spec, str) and spec in (*BASELINES, *extra):
        return
    known = ", ".join((*BASELINES, *extra))
    raise RequestError(f"unknown {name} {spec!r}; expected one of {known}, a number or a tensor")


def make_baseline(spec: BaselineSpec, x: Tensor, blur_sigma: float | None = None) -> Tensor:
    """The baseline for a batch ``x`` of shape (B, C, H, W), with the same shape.

    Args:
        spec: ``"zero"``, ``"mean"``, ``"blur"``, a number, or a tensor broadcastable to ``x``.
        x: the inputs.
        blur_sigma: Gaussian sigma in pixels for ``"blur"`` (default: 1/20 of the image side).
    """
    if isinstance(spec, Tensor):
        baseline = spec.detach().to(device=x.device, dtype=x.dtype)
        try:
            baseline = baseline.expand_as(x) if baseline.dim() <= x.dim() else baseline
        except RuntimeError:
            baseline = None  # type: ignore[assignment]
        if baseline is None or baseline.shape != x.shape:
            raise RequestError(
                f"baseline tensor of shape {tuple(spec.shape)} does not broadcast to the input "
                f"shape {tuple(x.shape)}"
            )
        if not torch.isfinite(baseline).all():
            raise RequestError("the baseline tensor contains NaN or infinite values")
        return baseline.clone()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.full_like(x, float(spec))
    if spec == "zero":
        return torch.zeros_like(x)
    if spec == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if spec == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(x.shape[-2:]) / 20
        return gaussian_blur(x, sigma)
    raise RequestError(
        f"unknown baseline {spec!r}; expected one of {', '.join(BASELINES)}, a number or a tensor"
    )
