"""Perturbation methods against captum and against their definitions."""

from __future__ import annotations

import captum.attr as ca
import numpy as np
import pytest
import torch
from conftest import probe, tiny
from torch import nn

import convlens as cl
from convlens import viz
from convlens.baselines import make_baseline
from convlens.methods.perturbation import rise_masks, window_starts

TARGETS = [0, 3, 1]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the expected value is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


class SquareSum(nn.Module):
    """Analytic model: class 0 scores the sum of the pixels inside a known square."""

    def __init__(self, top: int = 2, left: int = 4, side: int = 3) -> None:
        super().__init__()
        self.box = (slice(top, top + side), slice(left, left + side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[:, :, self.box[0], self.box[1]].sum(dim=(1, 2, 3))
        return torch.stack([inside, torch.zeros_like(inside)], dim=1)


@pytest.mark.parametrize(("window", "stride"), [(3, 2), (4, 4), (2, 1), (8, 8)])
@pytest.mark.parametrize("baseline", ["zero", "mean", "tensor"])
def test_occlusion_equals_captum(x, window, stride, baseline):
    model = tiny()
    spec = torch.full((1, 3, 8, 8), 0.25) if baseline == "tensor" else baseline
    probed = probe(model, x)
    # captum's Occlusion scores the logit; convlens' default is the paper's class probability
    ours = cl.explain(
        model, x, "occlusion", target=TARGETS, window=window, stride=stride, baseline=spec,
        score="logit",
    )  # fmt: skip
    theirs = ca.Occlusion(model).attribute(
        x,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=make_baseline(spec, x),
        target=TARGETS,
    )
    close(ours.attribution, theirs[:, :1])
    n_windows = len(window_starts(8, window, stride)) ** 2
    assert ours.forwards == probed + 3 + 3 * n_windows


def test_occlusion_finds_the_evidence_of_an_analytic_model():
    x = torch.ones(1, 3, 8, 8)
    e = cl.explain(SquareSum(), x, "occlusion", target=0, window=1, stride=1, score="logit")
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:5, 4:7] = 3.0  # removing one pixel (3 channels of 1) drops the sum by 3
    close(e.attribution, expected)


def test_occlusion_rejects_bad_windows(x):
    with pytest.raises(ValueError, match="larger than the input"):
        cl.explain(tiny(), x, "occlusion", window=9)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        cl.explain(tiny(), x, "occlusion", window=3, stride=0)


def test_rise_masks_follow_the_paper():
    generator = torch.Generator().manual_seed(0)
    masks = rise_masks(generator, 500, grid=4, p=0.3, size=(16, 16))
    assert masks.shape == (500, 1, 16, 16)
    assert masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean().item() - 0.3) < 0.03  # E[M] = p
    smooth = (masks > 0.01) & (masks < 0.99)
    assert smooth.float().mean() > 0.2, "bilinear upsampling gives soft edges"
    again = rise_masks(torch.Generator().manual_seed(0), 500, 4, 0.3, (16, 16))
    chunked = torch.cat(
        [
            rise_masks(g := torch.Generator().manual_seed(0), 200, 4, 0.3, (16, 16)),
            rise_masks(g, 300, 4, 0.3, (16, 16)),
        ]
    )
    assert torch.equal(masks, again) and torch.equal(masks, chunked)


def test_rise_is_the_mask_average_weighted_by_probability(x):
    model = tiny()
    n, grid, p, seed = 40, 3, 0.5, 7
    probed = probe(model, x)
    ours = cl.explain(model, x, "rise", target=TARGETS, n_masks=n, grid=grid, p=p, seed=seed)
    generator = torch.Generator().manual_seed(seed)  # the documented draw order
    expected = []
    for i, c in enumerate(TARGETS):
        masks = rise_masks(generator, n, grid, p, (8, 8))
        with torch.no_grad():
            probability = model(x[i : i + 1] * masks).softmax(-1)[:, c]
        expected.append((probability[:, None, None, None] * masks).sum(0) / (n * p))
    close(ours.attribution, torch.stack(expected), rtol=1e-4)
    assert ours.forwards == probed + 3 + 3 * n


def test_rise_concentrates_on_the_evidence():
    """The class-0 logit grows with how much of the square the mask keeps (probability from
    about 0.01 to 0.99), so RISE must rank the square above the rest of the image."""
    x = torch.ones(1, 3, 8, 8)
    square = SquareSum()

    class Evidence(nn.Module):
        def forward(self, v):
            logit = (square(v)[:, :1] / 27 - 0.5) * 10  # 27 = the square's full sum
            return torch.cat([logit, torch.zeros_like(logit)], dim=1)

    e = cl.explain(Evidence(), x, "rise", target=0, n_masks=800, grid=4, seed=0)
    heat = e.heatmap()[0]
    # RISE carries a constant offset E[f] E[M] / p everywhere; the ranking is what must hold:
    # the square's 9 pixels are the 9 highest.
    top = set(heat.flatten().topk(9).indices.tolist())
    assert top == {row * 8 + col for row in range(2, 5) for col in range(4, 7)}


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_results_do_not_depend_on_batch_size(x, method):
    params = {"occlusion": {"window": 3, "stride": 2}, "rise": {"n_masks": 50, "grid": 3}}
    model = tiny()
    probed = probe(model, x)
    one = cl.explain(model, x, method, batch_size=1, **params[method])
    many = cl.explain(model, x, method, batch_size=64, **params[method])
    close(many.attribution, one.attribution, rtol=1e-5)
    assert one.forwards - probed == many.forwards


# -- LIME and KernelSHAP ---------------------------------------------------------------------

BLOCKS = torch.arange(16).view(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)  # 2x2 cells


def linear_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()


def superpixel_means(x: torch.Tensor) -> torch.Tensor:
    fill = torch.empty_like(x)
    for j in range(16):
        inside = j == BLOCKS
        fill[:, :, inside] = x[:, :, inside].mean(dim=2, keepdim=True)
    return fill


def true_linear_weights(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """For f linear in the input, hiding superpixel j changes f by Σ_{p in j} v_p (x_p - fill_p)."""
    v = model[1].weight[target].view(3, 8, 8)
    contribution = (v * (x[0] - superpixel_means(x)[0])).sum(0)
    return torch.stack([contribution[j == BLOCKS].sum() for j in range(16)]).detach()


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_surrogates_recover_a_model_linear_in_its_superpixels(x, method):
    model, image = linear_model(), x[:1]
    extra = {"alpha": 0.0} if method == "lime" else {}
    e = cl.explain(
        model, image, method, target=2, segmentation=BLOCKS, n_samples=300, score="logit", **extra
    )
    weights = torch.tensor(e.extras["superpixels"][0]["weights"])
    truth = true_linear_weights(model, image, 2)
    assert (weights - truth).abs().max() < 1e-3, (weights - truth).abs().max()
    torch.testing.assert_close(e.attribution[0, 0], truth[BLOCKS], rtol=0, atol=1e-3)
    if method == "lime":
        assert e.extras["superpixels"][0]["r2"] > 0.999999
    else:  # efficiency: the Shapley values add up to f(x) - f(all hidden)
        info = e.extras["superpixels"][0]
        assert abs(weights.sum() - (info["prediction"] - info["base_value"])) < 1e-4


def test_lime_picture_shows_the_top_superpixels(x):
    """Explanation.superpixels shows the k truly most positive superpixels in red and the k
    most negative in blue (the true weights of a model linear in its superpixels)."""
    model, image = linear_model(), x[:1]
    e = cl.explain(
        model, image, "lime", target=2, segmentation=BLOCKS, n_samples=300, score="logit", alpha=0.0
    )
    truth = true_linear_weights(model, image, 2)
    order = torch.argsort(truth, descending=True).tolist()
    positive = [j for j in order if truth[j] > 0][:3]
    negative = [j for j in reversed(order) if truth[j] < 0][:3]
    assert len(positive) == 3 and len(negative) == 3
    expected = viz.superpixel_picture(e._picture(0), BLOCKS, positive, negative)
    assert np.array_equal(np.asarray(e.superpixels(k=3)), np.asarray(expected))
    with pytest.raises(ValueError, match="no superpixels"):
        cl.explain(model, image, "occlusion", window=2, stride=2).superpixels()


def test_superpixel_picture_dims_all_but_the_chosen_superpixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    quadrants = torch.arange(4).view(2, 2).repeat_interleave(8, 0).repeat_interleave(8, 1)
    out = np.asarray(viz.superpixel_picture(image, quadrants, [0], [3])).astype(float)
    img = image.astype(float)
    np.testing.assert_allclose(out[:8, 8:], (0.3 * img[:8, 8:]).round())  # not chosen: dimmed
    np.testing.assert_allclose(out[8:, :8], (0.3 * img[8:, :8]).round())
    np.testing.assert_allclose(out[1:7, 1:7], img[1:7, 1:7])  # positive: as it is inside,
    assert (out[0, :8] == viz.POSITIVE).all() and (out[:8, 7] == viz.POSITIVE).all()  # outlined
    tinted = (0.65 * img[9:15, 9:15] + 0.35 * np.array(viz.NEGATIVE)).round()
    np.testing.assert_allclose(out[9:15, 9:15], tinted)  # negative: tinted blue, outlined
    assert (out[15, 8:] == viz.NEGATIVE).all()
    with pytest.raises(ValueError, match="differ in size"):
        viz.superpixel_picture(image, quadrants[:8], [0])


def test_kernel_shap_agrees_with_captum_on_the_same_samples(x):
    """captum fits a weighted least squares with weight 1e6 on the all-visible and all-hidden
    samples; convlens imposes those two constraints exactly. Fed the same coalitions, the two
    agree to the precision that 1e6 allows."""
    model, image = tiny(), x[:1]
    ours = cl.explain(model, image, "kernel_shap", target=3, segmentation=BLOCKS, n_samples=400)
    info = ours.extras["superpixels"][0]
    samples = info["samples"]

    class SameSamples(ca.KernelShap):
        def kernel_shap_perturb_generator(self, original_inp, **kwargs):
            for row in samples:
                yield row[None].long()

    theirs = SameSamples(model).attribute(
        image,
        baselines=superpixel_means(image),
        target=3,
        feature_mask=BLOCKS[None, None],
        n_samples=400,
    )
    close(ours.attribution, theirs[:, :1], rtol=1e-4)


def test_lime_ranks_superpixels_like_the_lime_package(x):
    from lime import lime_image
    from scipy.stats import spearmanr

    model, image = tiny(), x[1:2]
    target = int(model(image).argmax())

    def classifier(images):
        batch = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
        with torch.no_grad():
            return model(batch).softmax(-1).numpy()

    reference = lime_image.LimeImageExplainer(random_state=0).explain_instance(
        image[0].permute(1, 2, 0).double().numpy(),
        classifier,
        labels=(target,),
        top_labels=None,
        hide_color=None,
        num_samples=2000,
        segmentation_fn=lambda _: BLOCKS.numpy(),
        batch_size=100,
    )
    theirs = dict(reference.local_exp[target])
    ours = cl.explain(model, image, "lime", target=target, segmentation=BLOCKS, n_samples=2000)
    weights = ours.extras["superpixels"][0]["weights"]
    rho = spearmanr(weights, [theirs[j] for j in range(16)]).statistic
    assert rho >= 0.9, rho


def test_weighted_ridge_is_scikit_learns_estimator():
    from sklearn.linear_model import Ridge

    from convlens.methods.perturbation import weighted_ridge

    generator = torch.Generator().manual_seed(0)
    features = (torch.rand(200, 7, generator=generator) < 0.5).double()
    targets = features @ torch.randn(7, generator=generator, dtype=torch.float64) + 0.3
    targets += 0.1 * torch.randn(200, generator=generator, dtype=torch.float64)
    weights = torch.rand(200, generator=generator, dtype=torch.float64)
    coefficients, intercept, r2 = weighted_ridge(features, targets, weights, alpha=1.0)
    reference = Ridge(alpha=1.0).fit(
        features.numpy(), targets.numpy(), sample_weight=weights.numpy()
    )
    np_r2 = reference.score(features.numpy(), targets.numpy(), sample_weight=weights.numpy())
    torch.testing.assert_close(coefficients, torch.tensor(reference.coef_), rtol=1e-8, atol=1e-10)
    assert abs(float(intercept) - reference.intercept_) < 1e-8 and abs(float(r2) - np_r2) < 1e-8


@pytest.mark.parametrize("segmentation", ["slic", "quickshift", "felzenszwalb"])
def test_segmentations_of_a_photo(bundled, photos, segmentation):
    from convlens.methods.perturbation import superpixels

    picture = bundled.to_display(bundled.preprocess(photos["chelsea"]))[0]
    labels = superpixels(picture, segmentation, 50)
    assert labels.shape == (224, 224) and labels.min() == 0
    assert 10 <= int(labels.max()) + 1 <= 400
    with pytest.raises(ValueError, match="unknown segmentation"):
        superpixels(picture, "watershed", 50)
    with pytest.raises(ValueError, match="integers of shape"):
        superpixels(picture, torch.zeros(5, 5, dtype=torch.long), 50)


# -- meaningful perturbation -------------------------------------------------------------------


class BrightSquare(nn.Module):
    """Class 0's logit grows with the brightness of a 4x4 square (rows 6-9, columns 2-5)."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        inside = v[:, :, 6:10, 2:6].mean(dim=(1, 2, 3))
        logit = (inside - 0.5) * 12
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


SQUARE = {row * 16 + col for row in range(6, 10) for col in range(2, 6)}


def bright_square_image() -> torch.Tensor:
    x = torch.full((1, 3, 16, 16), 0.1)
    x[:, :, 6:10, 2:6] = 1.0
    return x


@pytest.mark.parametrize(
    ("game", "perturbation", "area"),
    [
        ("deletion", "constant", None),
        ("preservation", "constant", None),
        ("preservation", "blur", 0.0625),
        ("preservation", "constant", 0.0625),
    ],
)
def test_meaningful_perturbation_finds_the_evidence_square(game, perturbation, area):
    model, image = BrightSquare(), bright_square_image()
    probed = probe(model, image)
    e = cl.explain(
        model,
        image,
        "meaningful_perturbation",
        target=0,
        game=game,
        perturbation=perturbation,
        area=area,
        mask_size=8,
        steps=300,
        blur_sigma=3.0,
    )
    heat = e.heatmap()[0]
    top = set(heat.flatten().topk(16).indices.tolist())  # as many pixels as the square has
    assert len(top & SQUARE) >= 14, len(top & SQUARE)
    if area is not None and perturbation == "blur":  # extremal mask of the square's own area
        assert heat[6:10, 2:6].sum() / heat.sum() > 0.5
    assert e.forwards == probed + 1 + 300 and e.resolved["game"] == game


def test_meaningful_perturbation_noise_follows_the_seed(x):
    model = tiny()
    kwargs = {"perturbation": "noise", "steps": 20, "mask_size": 4, "target": [1, 2, 3]}
    a = cl.explain(model, x, "meaningful_perturbation", seed=1, **kwargs)
    b = cl.explain(model, x, "meaningful_perturbation", seed=1, **kwargs)
    c = cl.explain(model, x, "meaningful_perturbation", seed=2, **kwargs)
    assert a.attribution.abs().sum() > 0
    assert torch.equal(a.attribution, b.attribution) and a.resolved["seed"] == 1
    assert not torch.equal(a.attribution, c.attribution)


def test_meaningful_perturbation_refuses_bad_settings():
    x = bright_square_image()
    with pytest.raises(ValueError, match="game must be"):
        cl.explain(BrightSquare(), x, "meaningful_perturbation", game="hide", steps=2)
    with pytest.raises(ValueError, match="perturbation must be"):
        cl.explain(BrightSquare(), x, "meaningful_perturbation", perturbation="ink", steps=2)
    with pytest.raises(ValueError, match="area must be"):
        cl.explain(BrightSquare(), x, "meaningful_perturbation", area=1.5, steps=2)


# -- anchors ---------------------------------------------------------------------------------------


class TwoTextures(nn.Module):
    """Class 0 exactly when superpixels 5 and 10 (2x2 cells of BLOCKS) keep their texture: a
    filled superpixel shows its mean colour, and its texture (variance) disappears."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        def textured(j: int) -> torch.Tensor:
            return v[:, :, j == BLOCKS].var(dim=2).mean(dim=1) > 0.01

        both = textured(5) & textured(10)
        logit = both.float() * 2 - 1
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def checkerboard() -> torch.Tensor:
    x = torch.zeros(1, 3, 8, 8)
    x[:, :, ::2, ::2] = 1.0
    x[:, :, 1::2, 1::2] = 1.0
    return x


def test_anchors_find_the_two_superpixels_the_model_needs():
    x = checkerboard()
    assert TwoTextures()(x).argmax().item() == 0
    model = TwoTextures()
    probed = probe(model, x)
    e = cl.explain(model, x, "anchors", target=0, segmentation=BLOCKS, seed=0)
    (found,) = e.extras["anchor"]
    assert sorted(found["anchor"]) == [5, 10], found
    assert found["precision"] >= 0.95 and found["coverage"] == 0.25 and found["found"]
    assert e.attribution[0, 0].sum() == 8  # two 2x2 superpixels
    assert e.forwards == probed + 1 + found["samples"]


def test_anchor_search_follows_the_seed():
    """The same seed repeats the search exactly; over several seeds the samples the search
    needed differ (the answer, [5, 10] with precision 1, is the same for every seed)."""
    x, model = checkerboard(), TwoTextures()
    runs = [
        cl.explain(model, x, "anchors", target=0, segmentation=BLOCKS, seed=seed).extras["anchor"][
            0
        ]
        for seed in (0, 0, 1, 2, 3)
    ]
    assert runs[0]["samples"] == runs[1]["samples"]
    assert all(sorted(run["anchor"]) == [5, 10] for run in runs)
    assert len({run["samples"] for run in runs}) > 1
    assert max(run["samples"] for run in runs) < 20000  # decided well before the budget


def test_an_empty_anchor_when_nothing_needs_fixing():
    class Constant(nn.Module):
        def forward(self, v):
            return torch.tensor([[1.0, 0.0]]).expand(len(v), -1)

    e = cl.explain(Constant(), checkerboard(), "anchors", target=0, segmentation=BLOCKS)
    (found,) = e.extras["anchor"]
    assert found["anchor"] == [] and found["coverage"] == 1.0 and found["found"]
    assert found["samples"] < 1000 and e.attribution.sum() == 0


def test_anchors_with_pixels_of_other_images():
    x = checkerboard()
    others = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.05
    e = cl.explain(
        TwoTextures(), x, "anchors", target=0, segmentation=BLOCKS, seed=0, other_images=others
    )
    assert sorted(e.extras["anchor"][0]["anchor"]) == [5, 10]


def test_kl_bounds_bracket_the_mean():
    from convlens.methods.anchors import kl_bounds

    mean = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)
    count = torch.tensor([100.0, 1000.0, 50.0], dtype=torch.float64)
    low, high = kl_bounds(mean, count, level=3.0)
    assert (low <= mean).all() and (high >= mean).all() and (low < high).all()
    wide, _ = kl_bounds(mean, count / 10, level=3.0)
    assert (wide <= low).all()  # fewer samples, wider bounds
