"""Images that the network likes: activation maximisation and DeepDream.

- :func:`class_model`: Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional
  Networks" (ICLR workshop), section 2: the image I maximising S_c(I) - lambda ||I||^2; with the
  regularisers of Yosinski et al. 2015 (jitter, blur) and Olah, Mordvintsev & Schubert 2017,
  "Feature Visualization" (Distill): small random scaling and rotation, and a decorrelated
  Fourier parametrisation of the image.
- :func:`deep_dream`: Mordvintsev, Olah & Tyka 2015, "Inceptionism" (Google Research blog):
  gradient ascent on a layer's activations over several octaves, with normalised steps and
  jitter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from convlens.baselines import gaussian_blur
from convlens.checks import RequestError
from convlens.engine import session
from convlens.features.common import Features, resolve_layer
from convlens.hooks import capture
from convlens.images import to_pictures
from convlens.model import Model, as_model
from convlens.targets import Class, check_target_spec

__all__ = ["class_model", "deep_dream"]

# Square root of the colour correlation of natural images (Olah et al. 2017), rows R, G, B.
COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION = COLOR_CORRELATION / COLOR_CORRELATION.norm(dim=0).max()


def _normaliser(model: Model) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(model.mean or (0.0,) * model.channels).view(1, -1, 1, 1)
    std = torch.tensor(model.std or (1.0,) * model.channels).view(1, -1, 1, 1)
    return mean, std


class FourierImage(nn.Module):
    """An RGB image in [0, 1] from a spectrum scaled by 1/frequency and decorrelated colours
    (Olah et al. 2017, "Feature Visualization", section "Preconditioning and parametrisation")."""

    def __init__(self, height: int, width: int, generator: torch.Generator, std: float = 0.01):
        super().__init__()
        fy = torch.fft.fftfreq(height)[:, None]
        fx = torch.fft.rfftfreq(width)[None, :]
        frequency = torch.sqrt(fx**2 + fy**2)
        self.register_buffer("scale", 1.0 / frequency.clamp(min=1.0 / max(height, width)))
        shape = (1, 3, height, width // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.randn(shape, generator=generator) * std)
        self.size = (height, width)

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        linear = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        colours = torch.einsum("ij,bjhw->bihw", COLOR_CORRELATION, linear)
        return torch.sigmoid(colours / 4)  # the /4 of Olah et al.'s reference code


class PixelImage(nn.Module):
    """An RGB image in [0, 1] as a sigmoid of free pixels (blank: 0.5 grey; or noise)."""

    def __init__(self, height: int, width: int, generator: torch.Generator, std: float = 0.0):
        super().__init__()
        self.pixels = nn.Parameter(torch.randn(1, 3, height, width, generator=generator) * std)

    def forward(self) -> Tensor:
        return torch.sigmoid(self.pixels)


def _augment(
    x: Tensor, generator: torch.Generator, jitter: int, scale: float, rotate: float
) -> Tensor:
    """Random shift by up to ``jitter`` pixels, scaling by 1 +- ``scale`` and rotation by up
    to ``rotate`` degrees (one resampling, reflected borders)."""
    u = torch.rand(4, generator=generator) * 2 - 1
    height, width = x.shape[-2:]
    angle = math.radians(rotate) * float(u[0])
    zoom = 1 + scale * float(u[1])
    shift = (2 * jitter * float(u[2]) / width, 2 * jitter * float(u[3]) / height)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[[cos, -sin, shift[0]], [sin, cos, shift[1]]]], dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def class_model(
    model: Model | nn.Module,
    target: Any,
    steps: int = 256,
    lr: float = 0.03,
    objective: str = "logit",
    parametrization: str = "fourier",
    init: str = "noise",
    l2: float = 0.0,
    jitter: int | None = None,
    scale: float = 0.1,
    rotate: float = 10.0,
    blur_every: int = 0,
    blur_sigma: float = 0.5,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> Features:
    """The image that maximises ``target``: a class (int or label name, its logit S_c, as in
    Simonyan et al.), or a ``Channel``/``Neuron`` target for an inner unit.

    Args:
        steps, lr: Adam steps and learning rate.
        objective: ``"logit"`` (S_c, as Simonyan et al. and Olah et al. recommend) or
            ``"log_probability"`` (log softmax: also pushes the other classes down, which a
            network whose logits are unbounded may need for the class to become likely).
        parametrization: ``"fourier"`` (decorrelated spectrum, Olah et al.) or ``"pixel"``.
        init: ``"noise"`` or ``"blank"`` (pixel parametrisation only; grey).
        l2: weight of the L2 decay lambda ||I||^2 on the normalised image (Simonyan et al.).
        jitter, scale, rotate: random shift (pixels; default 1/14 of the image side, 16 at
            224), scaling (fraction) and rotation (degrees) at every step; 0 turns one off.
        blur_every, blur_sigma: Gaussian blur of the pixels every n steps (Yosinski et al.).

    ``data``: ``image`` (1, 3, H, W) in the model's input space, ``scores`` (steps + 1,) the
    target's score and ``probabilities`` (steps + 1,) its class probability along the way (for
    class targets).
    """
    wrapped = as_model(model)
    if target is None:
        raise RequestError("class_model needs a target: a class, a label name, Channel or Neuron")
    (goal,) = check_target_spec(target, 1, wrapped.labels)
    height, width = size or wrapped.input_size or (224, 224)
    jitter = round(max(height, width) / 14) if jitter is None else jitter
    generator = torch.Generator().manual_seed(seed)
    if objective not in ("logit", "log_probability"):
        raise RequestError(f"objective must be 'logit' or 'log_probability', not {objective!r}")
    if objective == "log_probability" and not isinstance(goal, Class):
        raise RequestError("objective='log_probability' needs a class target")
    if parametrization == "fourier":
        image: nn.Module = FourierImage(height, width, generator)
    elif parametrization == "pixel":
        if init not in ("noise", "blank"):
            raise RequestError(f"init must be 'noise' or 'blank', not {init!r}")
        image = PixelImage(height, width, generator, std=0.5 if init == "noise" else 0.0)
    else:
        raise RequestError(f"parametrization must be 'fourier' or 'pixel', not {parametrization!r}")
    mean, std = _normaliser(wrapped)
    optimiser = torch.optim.Adam(image.parameters(), lr=lr)
    scores, probabilities = [], []

    def evaluate(x: Tensor, grad: bool = True) -> tuple[Tensor, Tensor | None]:
        step = engine.evaluate(x, [goal], grad=grad)
        if not isinstance(goal, Class):
            return step.scores[0], None
        return step.scores[0], step.output.log_softmax(-1)[0, goal.index]

    with session(wrapped, torch.zeros(1, 3, height, width), progress=False) as engine:
        bar = tqdm(
            range(steps),
            desc="class model",
            delay=0 if progress else 1.0,
            disable=progress is False,
            leave=False,
        )
        for step in bar:
            x = (_augment(image(), generator, jitter, scale, rotate) - mean) / std
            score, log_probability = evaluate(x)
            probability = None if log_probability is None else log_probability.exp()
            scores.append(float(score.detach()))
            if probability is not None:
                probabilities.append(float(probability.detach()))
            gain = score if objective == "logit" else log_probability
            loss = -gain + l2 * x.pow(2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if blur_every and isinstance(image, PixelImage) and (step + 1) % blur_every == 0:
                with torch.no_grad():
                    image.pixels.copy_(gaussian_blur(image.pixels, blur_sigma))
        with torch.no_grad():
            final = (image() - mean) / std
            score, log_probability = evaluate(final, grad=False)
            probability = None if log_probability is None else log_probability.exp()
    scores.append(float(score))
    if probability is not None:
        probabilities.append(float(probability))
    picture = Image.fromarray(to_pictures(final, wrapped.mean, wrapped.std)[0])
    info = {"target": goal.describe(), "steps": steps, "score": scores[-1]}
    data: dict[str, Any] = {"image": final.detach(), "scores": torch.tensor(scores)}
    if probabilities:
        data["probabilities"] = torch.tensor(probabilities)
        info["probability"] = probabilities[-1]
    return Features("class_model", data, picture, info)


def deep_dream(
    model: Model | nn.Module,
    image: Any,
    layer: str | nn.Module | None = None,
    octaves: int = 4,
    octave_scale: float = 1.4,
    steps: int = 10,
    lr: float = 0.02,
    jitter: int = 16,
    seed: int = 0,
    progress: bool | None = None,
) -> Features:
    """DeepDream: amplify what ``layer`` sees in ``image`` (Mordvintsev et al. 2015).

    From the smallest octave up, ``steps`` ascent steps on the mean squared activation of the
    layer, each gradient divided by its mean absolute value, the image shifted by a random
    jitter before each step and shifted back after; the details gained carry to the next,
    larger octave. Pixels stay within the valid [0, 1] RGB range.

    ``data``: ``image`` (1, 3, H, W) in the model's input space; ``objective`` the mean squared
    activation before and after (2,).
    """
    wrapped = as_model(model)
    x = wrapped.inputs(image)[:1]
    name = resolve_layer(wrapped, layer, x)
    module = wrapped.layer(name)
    mean, std = _normaliser(wrapped)
    low, high = ((0 - mean) / std).to(x), ((1 - mean) / std).to(x)
    generator = torch.Generator().manual_seed(seed)

    def objective(v: Tensor) -> Tensor:
        with capture({0: module}) as seen:
            engine.forward(v, grad=torch.is_grad_enabled())
        return seen[0].pow(2).mean()

    with session(wrapped, x, progress=False) as engine:
        with torch.no_grad():
            before = float(objective(x))
        height, width = x.shape[-2:]
        sizes = [
            (max(8, round(height / octave_scale**o)), max(8, round(width / octave_scale**o)))
            for o in reversed(range(octaves))
        ]
        detail = torch.zeros_like(x)
        total = octaves * steps
        bar = tqdm(
            total=total,
            desc="deep dream",
            delay=0 if progress else 1.0,
            disable=progress is False,
            leave=False,
        )
        for size in sizes:
            base = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            grown = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
            current = (base + grown).detach()
            for _ in range(steps):
                dy, dx = (
                    int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator)
                )
                shifted = torch.roll(current, (dy, dx), dims=(-2, -1)).requires_grad_(True)
                (gradient,) = torch.autograd.grad(objective(shifted), shifted)
                gradient = torch.roll(gradient, (-dy, -dx), dims=(-2, -1))
                current = current + lr * gradient / gradient.abs().mean().clamp(min=1e-12)
                current = torch.max(torch.min(current, high), low).detach()
                bar.update(1)
            detail = current - base
        bar.close()
        with torch.no_grad():
            after = float(objective(current))
    picture = Image.fromarray(to_pictures(current, wrapped.mean, wrapped.std)[0])
    info = {"layer": name, "objective_before": before, "objective_after": after}
    data = {"image": current.detach().cpu(), "objective": torch.tensor([before, after])}
    return Features("deep_dream", data, picture, info)
