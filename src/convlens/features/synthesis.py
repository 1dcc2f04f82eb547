"""Images that the network likes: activation maximisation and DeepDream.

- :func:`class_model`: Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional
  Networks" (ICLR workshop), section 2: the image I maximising S_c(I) - lambda ||I||^2; with the
  regularisers of Yosinski et al. 2015 (jitter, blur) and Olah, Mordvintsev & Schubert 2017,
  "Feature Visualization" (Distill): small random scaling and rotation, and a decorrelated
  Fourier parametrisation of the image (``recipe="olah"``, the default); ``recipe="simonyan"``
  is the paper's own procedure: plain gradient ascent from the zero image, no transforms.
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

from convlens.baselines import gaussian_blur
from convlens.checks import RequestError, positive_int, positive_number
from convlens.engine import session
from convlens.features.common import (
    Features,
    InputImage,
    PixelImage,
    make_image,
    normaliser,
    progress_bar,
    resolve_layer,
)
from convlens.hooks import capture
from convlens.images import to_pictures
from convlens.model import Model, as_model
from convlens.targets import Class, check_target_spec

__all__ = ["class_model", "deep_dream"]


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


# Simonyan et al. give no step size or lambda; with these the bundled EfficientNet-Lite0 is sure
# of its class (tabby, 281: p > 0.99 after 64 steps at 112 px) and the image stays near the
# valid range.
SIMONYAN_LR = 0.1
SIMONYAN_L2 = 1e-3

# The two recipes of class_model: each option's default; ``FIXED`` lists the options that
# define Simonyan et al.'s procedure (an explicit other value is refused, not overridden).
RECIPES: dict[str, dict[str, Any]] = {
    "olah": {
        "lr": 0.03,
        "objective": "logit",
        "parametrization": "fourier",
        "init": "noise",
        "l2": 0.0,
        "jitter": None,  # 1/14 of the image side
        "scale": 0.1,
        "rotate": 10.0,
        "blur_every": 0,
        "optimiser": "adam",
    },
    "simonyan": {
        "lr": SIMONYAN_LR,
        "objective": "logit",
        "parametrization": "input",
        "init": "blank",
        "l2": SIMONYAN_L2,
        "jitter": 0,
        "scale": 0.0,
        "rotate": 0.0,
        "blur_every": 0,
        "optimiser": "gradient",
    },
}
FIXED = {
    "olah": (),
    "simonyan": ("objective", "parametrization", "init", "jitter", "scale", "rotate", "blur_every"),
}


def _recipe(recipe: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``recipe`` with the options given (not None) in place of its defaults;
    an option that would change what the recipe defines is a one-line error."""
    if recipe not in RECIPES:
        raise RequestError(f"recipe must be one of {', '.join(map(repr, RECIPES))}, not {recipe!r}")
    settings = dict(RECIPES[recipe])
    for name, value in given.items():
        if value is None:
            continue
        if name in FIXED[recipe] and value != settings[name]:
            raise RequestError(
                f"recipe={recipe!r} fixes {name}={settings[name]!r} (the paper's procedure), "
                f"not {value!r}; leave {name} out, or use recipe='olah' to choose it"
            )
        settings[name] = value
    return settings


def _moves(image: nn.Module) -> bool:
    """Whether any gradient of the image's parameters is non-zero."""
    return any(p.grad is not None and bool(p.grad.any()) for p in image.parameters())


def class_model(
    model: Model | nn.Module,
    target: Any,
    steps: int = 256,
    lr: float | None = None,
    objective: str | None = None,
    parametrization: str | None = None,
    init: str | None = None,
    l2: float | None = None,
    jitter: int | None = None,
    scale: float | None = None,
    rotate: float | None = None,
    blur_every: int | None = None,
    blur_sigma: float = 0.5,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    recipe: str = "olah",
) -> Features:
    """The image that maximises ``target``: a class (int or label name, its logit S_c, as in
    Simonyan et al.), or a ``Channel``/``Neuron`` target for an inner unit.

    Args:
        recipe: ``"olah"`` (default): Adam on a Fourier-parametrised image with jitter, scaling
            and rotation (Olah et al. 2017). ``"simonyan"``: Simonyan et al. 2014, section 2,
            arg max_I S_c(I) - l2 ||I||^2 by plain gradient ascent
            (I <- I + lr * gradient) from the zero image, where I is the model's normalised
            input (zero = the mean image); no transforms, no blur, no Fourier parametrisation.
            A recipe sets the defaults of the options below (``None`` = the recipe's); under
            ``"simonyan"`` an explicit ``objective``, ``parametrization``, ``init``,
            ``jitter``, ``scale``, ``rotate`` or ``blur_every`` other than the paper's is an
            error, while ``steps``, ``lr`` and ``l2`` are free. A network whose score has no
            gradient at the zero image (all ReLUs off there) is refused.
        steps, lr: optimisation steps and learning rate (Adam for ``"olah"``, default 0.03;
            plain gradient steps for ``"simonyan"``, default 0.1).
        objective: ``"logit"`` (S_c, as Simonyan et al. and Olah et al. recommend) or
            ``"log_probability"`` (log softmax: also pushes the other classes down, which a
            network whose logits are unbounded may need for the class to become likely).
        parametrization: ``"fourier"`` (decorrelated spectrum, Olah et al.), ``"pixel"``
            (sigmoid of free pixels) or ``"input"`` (free pixels of the normalised input).
        init: ``"noise"`` or ``"blank"`` (pixel and input parametrisations only).
        l2: weight of the L2 decay lambda ||I||^2 on the normalised image (Simonyan et al.;
            default 0 for ``"olah"``, 1e-3 for ``"simonyan"``).
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
    steps = positive_int("steps", steps)
    given = {"lr": lr, "objective": objective, "parametrization": parametrization, "init": init}
    given |= {"l2": l2, "jitter": jitter, "scale": scale, "rotate": rotate}
    settings = _recipe(recipe, given | {"blur_every": blur_every})
    settings["lr"] = positive_number("lr", settings["lr"])
    settings["l2"] = positive_number("l2", settings["l2"], zero=True)  # < 0 rewards a big image
    seed = positive_int("seed", seed, minimum=0)
    height, width = size or wrapped.input_size or (224, 224)
    jitter = settings["jitter"]
    jitter = round(max(height, width) / 14) if jitter is None else jitter
    scale, rotate, blur_every = settings["scale"], settings["rotate"], settings["blur_every"]
    generator = torch.Generator().manual_seed(seed)
    objective = settings["objective"]
    if objective not in ("logit", "log_probability"):
        raise RequestError(f"objective must be 'logit' or 'log_probability', not {objective!r}")
    if objective == "log_probability" and not isinstance(goal, Class):
        raise RequestError("objective='log_probability' needs a class target")
    image = make_image(
        settings["parametrization"], (height, width), wrapped, generator, settings["init"]
    )
    if settings["optimiser"] == "adam":
        optimiser: torch.optim.Optimizer = torch.optim.Adam(image.parameters(), lr=settings["lr"])
    else:  # plain gradient steps
        optimiser = torch.optim.SGD(image.parameters(), lr=settings["lr"])
    l2 = settings["l2"]
    scores, probabilities = [], []

    def evaluate(x: Tensor, grad: bool = True) -> tuple[Tensor, Tensor | None]:
        step = engine.evaluate(x, [goal], grad=grad)
        if not isinstance(goal, Class):
            return step.scores[0], None
        return step.scores[0], step.output.log_softmax(-1)[0, goal.index]

    with session(wrapped, torch.zeros(1, 3, height, width), progress=False) as engine:
        bar = progress_bar(steps, "class model", progress)
        for step in range(steps):
            picture = image()
            if jitter or scale or rotate:
                picture = _augment(picture, generator, jitter, scale, rotate)
            x = wrapped.normalise(picture)
            score, log_probability = evaluate(x)
            probability = None if log_probability is None else log_probability.exp()
            scores.append(float(score.detach()))
            if probability is not None:
                probabilities.append(float(probability.detach()))
            gain = score if objective == "logit" else log_probability
            loss = -gain + l2 * x.pow(2).sum()
            optimiser.zero_grad()
            loss.backward()
            if step == 0 and recipe == "simonyan" and not _moves(image):
                raise RequestError(
                    "class_model recipe='simonyan': the score's gradient is zero at the zero "
                    "(mean) image, so gradient ascent cannot start; use recipe='olah'"
                )
            optimiser.step()
            blurred = isinstance(image, (PixelImage, InputImage))
            if blur_every and blurred and (step + 1) % blur_every == 0:
                with torch.no_grad():
                    image.pixels.copy_(gaussian_blur(image.pixels, blur_sigma))
            bar.update(1)
        bar.close()
        with torch.no_grad():
            final = wrapped.normalise(image())
            score, log_probability = evaluate(final, grad=False)
            probability = None if log_probability is None else log_probability.exp()
    scores.append(float(score))
    if probability is not None:
        probabilities.append(float(probability))
    picture = Image.fromarray(to_pictures(final, wrapped.mean, wrapped.std)[0])
    info = {"target": goal.describe(), "steps": steps, "score": scores[-1], "recipe": recipe}
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
    lr, seed = positive_number("lr", lr), positive_int("seed", seed, minimum=0)
    x = wrapped.inputs(image)[:1]
    name = resolve_layer(wrapped, layer, x)
    module = wrapped.layer(name)
    mean, std = normaliser(wrapped)
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
        bar = progress_bar(total, "deep dream", progress)
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
