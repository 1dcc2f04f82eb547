"""What a layer keeps of an image: its representation inverted.

Mahendran & Vedaldi 2015, "Understanding Deep Image Representations by Inverting Them"
(CVPR, arXiv:1412.0035): the image x* whose representation Phi(x*) at a layer is closest to
that of the given image, Phi0 = Phi(x0), under an image prior (their equations 1-3).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError, positive_int, positive_number
from convlens.engine import session
from convlens.features.common import Features, make_image, normaliser, progress_bar, resolve_layer
from convlens.hooks import capture
from convlens.images import to_pictures
from convlens.model import Model, as_model

__all__ = ["invert"]

# Mahendran & Vedaldi's "a": the typical variation between neighbouring pixels, as a fraction
# of the range bound B (their section 3.3 suggests 1%).
TV_FRACTION = 0.01


def total_variation(x: Tensor, beta: float) -> Tensor:
    """R_V^beta(x) = sum_ij ((x_i,j+1 - x_ij)^2 + (x_i+1,j - x_ij)^2)^(beta/2) (their
    equation 2), over each channel, on the pixels that have both neighbours."""
    dh = x[..., :-1, 1:] - x[..., :-1, :-1]
    dv = x[..., 1:, :-1] - x[..., :-1, :-1]
    squared = dh.pow(2) + dv.pow(2)
    return squared.sum() if beta == 2 else squared.clamp(min=1e-12).pow(beta / 2).sum()


def invert(
    model: Model | nn.Module,
    image: Any,
    layer: str | nn.Module | None,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    norm_weight: float = 1.0,
    alpha: float = 6.0,
    beta: float = 2.0,
    parametrization: str = "pixel",
    seed: int = 0,
    progress: bool | None = None,
) -> Features:
    """The image whose representation at ``layer`` matches that of ``image``: Mahendran &
    Vedaldi 2015, equation 3, minimised from noise (``seed``) with Adam::

        ||Phi(x) - Phi0||^2 / ||Phi0||^2
            + norm_weight * ||x||_alpha^alpha / (N B^alpha)
            + tv_weight * R_V^beta(x) / (N (a B)^beta)

    with x the model's normalised input (its N = 3 H W values), Phi the output of ``layer``,
    B the largest |x| of a valid image (the bound of their natural range [-B, B]; 1 for inputs
    normalised to [-1, 1]) and a = 1% (their typical pixel variation relative to B). These are
    the normalisations of the paper's section 3.3: the error term lies in [0, 1) near the
    optimum, the alpha-norm term equals its weight for an image at the edge of the range, and
    for an image whose every pixel differs by a B from both its right and its lower neighbour
    the TV term is 2^(beta/2) times its weight (2 times for beta = 2; a little less, as the
    last row and column, which lack a neighbour, are not summed). Photographs vary more
    than that (about 100 to 500 times for the bundled photos), hence the small default
    ``tv_weight``, measured on the bundled model (the authors' released code raises the TV
    weight tenfold twice towards the deepest layers). Their rescaling sigma of x is not needed: the
    parametrisation keeps x in the model's own working range. The paper minimises with
    momentum gradient descent; Adam is used here (as in ``class_model``).

    Args:
        image: one image: a tensor (3, H, W) or (1, 3, H, W) in the model's input space, or a
            path / PIL image / array that the model preprocesses.
        layer: the layer whose output is inverted (name or module; None: the last feature map).
        steps, lr: Adam steps and learning rate.
        tv_weight, norm_weight: lambda_V^beta and lambda_alpha of the normalised objective.
        alpha, beta: the exponents of the alpha-norm and total-variation priors (the paper's
            6 and 2; beta = 1 is the usual total variation).
        parametrization: ``"pixel"`` (sigmoid of free pixels: always a valid image),
            ``"fourier"`` (decorrelated spectrum of Olah et al. 2017) or ``"input"`` (free
            normalised pixels, bounded only by the alpha-norm, as in the paper).

    ``data``: ``image`` the reconstruction x* (1, 3, H, W) in the model's input space,
    ``original`` x0, ``error`` ||Phi(x*) - Phi0|| / ||Phi0|| reached and ``errors``
    (steps + 1,) that relative error along the way. ``image``: the original and the
    reconstruction side by side.
    """
    wrapped = as_model(model)
    steps = positive_int("steps", steps)
    lr = positive_number("lr", lr)
    tv_weight = positive_number("tv_weight", tv_weight, zero=True)
    norm_weight = positive_number("norm_weight", norm_weight, zero=True)
    alpha, beta = positive_number("alpha", alpha), positive_number("beta", beta)
    seed = positive_int("seed", seed, minimum=0)
    if alpha < 1 or beta < 1:
        raise RequestError(f"alpha and beta must be at least 1, not {alpha} and {beta}")
    if isinstance(image, Tensor) and image.dim() == 3:
        image = image[None]
    x0 = wrapped.inputs(image)
    if len(x0) != 1:
        raise RequestError(f"invert takes one image, not a batch of {len(x0)}")
    if x0.shape[1] != 3:
        raise RequestError(f"invert needs an RGB model input (3 channels), not {x0.shape[1]}")
    name = resolve_layer(wrapped, layer, x0)
    module = wrapped.layer(name)
    mean, std = normaliser(wrapped)
    bound = float(torch.maximum(mean, 1 - mean).div(std).max())
    generator = torch.Generator().manual_seed(seed)
    size = (int(x0.shape[-2]), int(x0.shape[-1]))
    reconstruction = make_image(parametrization, size, wrapped, generator)
    optimiser = torch.optim.Adam(reconstruction.parameters(), lr=lr)

    with session(wrapped, x0, progress=False) as engine:

        def represent(x: Tensor) -> Tensor:
            with capture({0: module}) as seen:
                engine.forward(x, grad=torch.is_grad_enabled())
            if not isinstance(seen.get(0), Tensor):
                raise RequestError(f"layer {name!r} gives no tensor output; invert another layer")
            return seen[0].float()

        with torch.no_grad():
            target = represent(x0)
        energy = target.pow(2).sum()
        if float(energy) == 0:
            raise RequestError(f"layer {name!r} is all zero on this image: nothing to invert")
        errors = []
        bar = progress_bar(steps, "invert", progress)
        for _ in range(steps):
            x = wrapped.normalise(reconstruction())
            loss = (represent(x) - target).pow(2).sum() / energy
            errors.append(float(loss.detach().sqrt()))
            count = x.numel()
            loss = loss + norm_weight * x.abs().pow(alpha).sum() / (count * bound**alpha)
            scale = (TV_FRACTION * bound) ** beta
            loss = loss + tv_weight * total_variation(x, beta) / (count * scale)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bar.update(1)
        bar.close()
        with torch.no_grad():
            final = wrapped.normalise(reconstruction())
            errors.append(float((represent(final) - target).pow(2).sum().div(energy).sqrt()))
    both = to_pictures(torch.cat([x0.cpu(), final]), wrapped.mean, wrapped.std)
    pictures = [Image.fromarray(p) for p in both]
    cell = max(224, *x0.shape[-2:])
    pictures = [p.resize((cell, round(cell * p.height / p.width)), Image.NEAREST) for p in pictures]
    titles = ["original", f"{name}: error {errors[-1]:.3f}"]
    sheet = viz.grid(pictures, titles, columns=2, cell=cell)
    data = {
        "image": final.detach().cpu(),
        "original": x0.detach().cpu(),
        "error": torch.tensor(errors[-1]),
        "errors": torch.tensor(errors),
    }
    info = {"layer": name, "steps": steps, "error": errors[-1], "parametrization": parametrization}
    return Features("invert", data, sheet, info)
