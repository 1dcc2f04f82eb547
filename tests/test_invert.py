"""Inverted representations (Mahendran & Vedaldi 2015) and Simonyan et al.'s class model
recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny, tiny_input
from test_lifecycle import Exploding, assert_same, prepared_model, snapshot
from torch import nn

import convlens as cl
from convlens import features
from convlens.checks import RequestError
from convlens.features.invert import total_variation

SIZE = 80  # pixels: small enough for a fast test, large enough for the cat's face


def cat(model: cl.Model) -> torch.Tensor:
    """The bundled cat photo at SIZE x SIZE, (3, H, W) in the model's input space."""
    picture = cl.sample_images()["chelsea"].resize((SIZE, SIZE))
    rgb = torch.tensor(np.asarray(picture), dtype=torch.float32).permute(2, 0, 1) / 255
    return (rgb - torch.tensor(model.mean).view(3, 1, 1)) / torch.tensor(model.std).view(3, 1, 1)


def gray_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson r of the channel means of two images."""
    a, b = a.reshape(-1, 3, SIZE, SIZE).mean(1).flatten(), b.reshape(-1, 3, SIZE, SIZE).mean(1)
    a, b = a - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


# -- inversion ---------------------------------------------------------------------------------
def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0, 4.0], [3.0, 5.0, 0.0]]]])
    # pixels with a right and a lower neighbour: (0, 0): 1^2 + 3^2; (0, 1): 3^2 + 4^2
    assert float(total_variation(x, 2)) == 10 + 25
    assert float(total_variation(x, 1)) == pytest.approx(10**0.5 + 5)


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_total_variation_of_steps_of_d_both_ways_is_2_to_the_half_beta_d_to_the_beta(beta):
    """x_ij = d (i + j): every pixel differs by d from its right and its lower neighbour, so
    each of the (H - 1)(W - 1) summed pixels adds (2 d^2)^(beta/2) = 2^(beta/2) d^beta (what
    invert's docstring says of the normalised TV term)."""
    d, height, width = 0.3, 5, 7
    ramp = d * (torch.arange(height).view(-1, 1) + torch.arange(width).view(1, -1))
    x = ramp.expand(1, 3, height, width).double()
    expected = 3 * (height - 1) * (width - 1) * 2 ** (beta / 2) * d**beta
    assert float(total_variation(x, beta)) == pytest.approx(expected)


def test_an_invertible_layer_is_inverted_exactly():
    """Phi = a 1x1 convolution with an invertible matrix: without priors the only minimiser
    is the original."""
    torch.manual_seed(0)
    mix = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        mix.weight.copy_(torch.eye(3).view(3, 3, 1, 1) + 0.3 * torch.randn(3, 3, 1, 1))
    net = nn.Sequential(mix, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    model = cl.wrap(net, input_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    x0 = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    result = features.invert(
        model, x0, "0", steps=200, tv_weight=0, norm_weight=0, parametrization="input"
    )
    assert (result.data["image"] - x0).abs().max() < 0.01
    assert result.data["error"] < 0.01


def test_inversion_of_an_early_layer_looks_like_the_image_and_a_deep_one_less(bundled):
    x0 = cat(bundled)
    before = snapshot(bundled.module)
    early = features.invert(bundled, x0, "_blocks.1", steps=120)
    deep = features.invert(bundled, x0, "_blocks.10", steps=120)
    assert_same(before, snapshot(bundled.module))
    errors = early.data["errors"]
    assert errors.shape == (121,) and errors[-1] < errors[0] / 4
    # measured: error 0.14 early (0.20 at _blocks.10), Pearson r 0.89 early, 0.15 deep, and
    # ||x* - x0|| / ||x0|| 0.45 early, 1.06 deep
    assert early.data["error"] < 0.25
    assert gray_correlation(early.data["image"], x0) > 0.75
    # Mahendran & Vedaldi: deeper layers keep less of the photograph
    assert (
        gray_correlation(deep.data["image"], x0) < gray_correlation(early.data["image"], x0) - 0.3
    )
    far = (deep.data["image"] - x0).norm() / x0.norm()
    assert far > (early.data["image"] - x0).norm() / x0.norm()
    # the error reported is ||Phi(x*) - Phi0|| / ||Phi0||, read here with a plain hook
    seen = []
    handle = bundled.layer("_blocks.1").register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            bundled.module(torch.cat([x0[None], early.data["image"]]))
    finally:
        handle.remove()
    phi0, phi = seen[0]
    assert float(early.data["error"]) == pytest.approx(
        float((phi - phi0).norm() / phi0.norm()), rel=1e-3
    )
    assert early.image.size[0] > early.image.size[1]  # side by side
    assert early.info["layer"] == "_blocks.1"


def test_invert_refusals_leave_the_model_as_it_was(bundled):
    x0 = cat(bundled)
    before = snapshot(bundled.module)
    with pytest.raises(RequestError, match="unknown layer"):
        features.invert(bundled, x0, "_blocks.99", steps=2)
    for steps in (0, -1, 2.5):
        with pytest.raises(RequestError, match="steps"):
            features.invert(bundled, x0, "_blocks.1", steps=steps)
    with pytest.raises(RequestError, match="one image"):
        features.invert(bundled, torch.stack([x0, x0]), "_blocks.1", steps=2)
    with pytest.raises(RequestError, match="parametrization"):
        features.invert(bundled, x0, "_blocks.1", steps=2, parametrization="wavelet")
    with pytest.raises(RequestError, match="tv_weight"):
        features.invert(bundled, x0, "_blocks.1", steps=2, tv_weight=-1)
    assert_same(before, snapshot(bundled.module))


# -- Simonyan et al.'s class model -------------------------------------------------------------
def linear_model() -> tuple[cl.Model, nn.Linear]:
    torch.manual_seed(0)
    linear = nn.Linear(3 * 4 * 5, 3)
    net = nn.Sequential(nn.Flatten(), linear)
    model = cl.wrap(net, input_size=(4, 5), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    return model, linear


def test_simonyan_recipe_is_plain_gradient_ascent_on_the_logit_from_zero():
    """S_c(x) - l2 ||x||^2 with S_c(x) = w.x + b: gradient w - 2 l2 x, so from x = 0 the
    iterate is x_t = w / (2 l2) (1 - (1 - 2 l2 lr)^t); a softmax objective, a start other
    than zero, a transform or momentum would each give another image."""
    model, linear = linear_model()
    lr, l2, steps = 0.2, 0.5, 7
    result = features.class_model(model, 1, steps=steps, lr=lr, l2=l2, recipe="simonyan")
    w = linear.weight[1].detach().view(1, 3, 4, 5)
    expected = w / (2 * l2) * (1 - (1 - 2 * l2 * lr) ** steps)
    assert torch.allclose(result.data["image"], expected, atol=1e-6)
    iterates = [w / (2 * l2) * (1 - (1 - 2 * l2 * lr) ** t) for t in range(steps + 1)]
    logits = torch.tensor([float((w * x).sum() + linear.bias[1].detach()) for x in iterates])
    assert torch.allclose(result.data["scores"], logits, atol=1e-5)
    assert result.info["recipe"] == "simonyan"


def test_simonyan_recipe_refuses_options_that_change_it():
    model, _ = linear_model()
    for option in (
        {"parametrization": "fourier"},
        {"objective": "log_probability"},
        {"jitter": 2},
        {"rotate": 5.0},
        {"init": "noise"},
    ):
        with pytest.raises(RequestError, match="recipe='simonyan' fixes"):
            features.class_model(model, 0, steps=2, recipe="simonyan", **option)
    with pytest.raises(RequestError, match="recipe must be"):
        features.class_model(model, 0, steps=2, recipe="yosinski")
    # the paper's own values are accepted
    features.class_model(model, 0, steps=2, recipe="simonyan", jitter=0, objective="logit")


def test_bad_numbers_are_refused_up_front_in_one_line():
    """Checked before any work, each naming its argument: a negative l2 would reward a large
    image, a negative lr descend, a fractional seed break torch's generator."""
    model, _ = linear_model()
    x0 = torch.zeros(3, 4, 5)
    calls = {
        "l2": lambda: features.class_model(model, 0, steps=2, recipe="simonyan", l2=-5),
        "lr": lambda: features.class_model(model, 0, steps=2, lr=-1),
        "seed": lambda: features.class_model(model, 0, steps=2, seed=1.5),
        "tv_weight": lambda: features.invert(model, x0, "1", steps=2, tv_weight="0.1"),
        "alpha": lambda: features.invert(model, x0, "1", steps=2, alpha=float("nan")),
    }
    calls["seed "] = lambda: features.invert(model, x0, "1", steps=2, seed=1.5)
    calls["lr "] = lambda: features.deep_dream(model, x0, "1", steps=2, lr=0)
    for name, call in calls.items():
        with pytest.raises(RequestError, match=f"^{name.strip()} must be") as error:
            call()
        assert "\n" not in str(error.value)


def test_optimised_images_and_their_progress_bar_have_one_home():
    import importlib

    common = importlib.import_module("convlens.features.common")
    for name in ("invert", "synthesis"):
        module = importlib.import_module(f"convlens.features.{name}")
        for helper in ("make_image", "normaliser", "progress_bar"):
            assert getattr(module, helper, common) is getattr(common, helper), (name, helper)
    synthesis = importlib.import_module("convlens.features.synthesis")
    assert "FourierImage" not in vars(synthesis) or synthesis.FourierImage is common.FourierImage


# -- the model is left as it was ----------------------------------------------------------------
USERS = {
    "invert": lambda m, x: features.invert(m, x[:1], "conv1", steps=3),
    "invert_fourier": lambda m, x: features.invert(
        m, x[:1], "conv2", steps=2, parametrization="fourier"
    ),
    "class_model_simonyan": lambda m, x: features.class_model(
        m, 1, steps=3, size=(8, 8), recipe="simonyan"
    ),
}


@pytest.mark.parametrize("name", USERS)
def test_the_model_is_left_untouched_also_when_it_raises_and_under_no_grad(name):
    model, x = prepared_model(), tiny_input(6)
    x_before, before = x.clone(), snapshot(model)
    USERS[name](model, x)
    assert_same(before, snapshot(model))
    assert torch.equal(x, x_before)
    bomb = Exploding()
    model.conv2 = nn.Sequential(model.conv2, bomb)
    bomb.armed = True
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        USERS[name](model, tiny_input(6))
    assert_same(before, snapshot(model))
    with torch.no_grad():
        USERS[name](tiny("relu6", head="gap"), tiny_input(6))
        assert not torch.is_grad_enabled()


def test_simonyan_recipe_refuses_a_start_where_the_gradient_vanishes():
    """A ReLU before the classifier, all negative at the zero image: the ascent cannot move."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[1].bias.fill_(-1.0)
    model = cl.wrap(net, input_size=(4, 5), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(RequestError, match="gradient is zero"):
        features.class_model(model, 0, steps=3, recipe="simonyan")
