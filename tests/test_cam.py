"""CAM family against captum, the papers' identities, and each paper's formula by hand.

The hand computations below are written from the papers' equations, independently of
convlens: activations A and gradients G of the layer ``conv2`` (after its ReLU, ``act2``) are
taken with plain autograd, then each formula is applied. Tolerance: rtol=1e-4 of the largest
magnitude.
"""

from __future__ import annotations

import captum.attr as ca
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import probe, tiny
from torch import nn

import convlens as cl
from convlens.targets import Channel, Contrast

TARGETS = [0, 3, 1]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the expected value is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def layer_a_g(model, x, targets=TARGETS, layer="act2"):
    """A and G = d y_c / d A at a layer's output, by plain autograd."""
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: store.__setitem__("a", o)
    )
    try:
        out = model(x)
    finally:
        handle.remove()
    score = out[range(len(x)), targets].sum()
    (g,) = torch.autograd.grad(score, store["a"])
    return store["a"].detach(), g


def up(maps):
    return F.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)


def explain(model, method, x, **kwargs):
    return cl.explain(model, x, method=method, target=kwargs.pop("target", TARGETS), **kwargs)


# -- oracles --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mlp", "gap"])
def test_gradcam_equals_captum_layer_gradcam(x, head):
    model = tiny(head=head)
    ours = explain(model, "gradcam", x, layer="act2").attribution
    theirs = ca.LayerGradCam(model, model.act2).attribute(x, target=TARGETS, relu_attributions=True)
    close(ours, ca.LayerAttribution.interpolate(theirs, (8, 8), interpolate_mode="bilinear"))


def test_guided_gradcam_equals_captum(x):
    model = tiny()
    probed = probe(model, x)
    ours = explain(model, "guided_gradcam", x, layer="act2")
    theirs = ca.GuidedGradCam(model, model.act2).attribute(
        x, target=TARGETS, interpolate_mode="bilinear"
    )
    close(ours.attribution, theirs)
    assert ours.attribution.shape == (3, 3, 8, 8) and ours.forwards == probed + 6


# -- identities proven in the papers (GAP + linear head) --------------------------------------


def test_cam_is_gradcam_times_a_positive_factor_on_gap_linear(x):
    """With GAP, dy_c/dA_kij = w_ck / (h w): Grad-CAM = ReLU(CAM) / (h w)."""
    model = tiny(head="gap")
    cam = explain(model, "cam", x, layer="act2").attribution
    gradcam = explain(model, "gradcam", x, layer="act2").attribution
    close(gradcam * 16, cam.clamp(min=0))
    assert (cam < 0).any(), "CAM keeps negative evidence (no ReLU in Zhou et al.)"


def test_hirescam_equals_gradcam_on_gap_linear(x):
    model = tiny(head="gap")
    close(
        explain(model, "hirescam", x, layer="act2").attribution,
        explain(model, "gradcam", x, layer="act2").attribution,
    )


def test_hirescam_differs_from_gradcam_elsewhere(x):
    model = tiny()
    hires = explain(model, "hirescam", x, layer="act2").attribution
    grad = explain(model, "gradcam", x, layer="act2").attribution
    assert not torch.allclose(hires, grad, atol=1e-4)


def test_cam_is_the_classifier_weights_on_the_features(x):
    model = tiny(head="gap")
    a, _ = layer_a_g(model, x)
    w = model.fc.weight.detach()
    expected = up(torch.einsum("bkhw,bk->bhw", a, w[TARGETS]))
    close(explain(model, "cam", x, layer="act2").attribution, expected)
    # the default layer is the last feature map the head reads, act2 (after the ReLU, which
    # is what the global average pooling reads): cam needs no argument
    default = explain(model, "cam", x)
    assert default.layer == "act2"
    close(default.attribution, expected)


def test_cam_refuses_networks_without_a_gap_linear_head(x):
    with pytest.raises(ValueError, match="gradcam"):
        explain(tiny(head="mlp"), "cam", x, layer="act2")
    with pytest.raises(ValueError, match="gradcam"):
        explain(tiny(head="gap"), "cam", x, layer="conv1")  # the head does not pool conv1
    with pytest.raises(ValueError, match="cam explains classes"):
        explain(tiny(head="gap"), "cam", x, layer="act2", target=Channel("conv2", 1))


# -- each variant's formula by hand ------------------------------------------------------------


def test_gradcam_formula(x):
    model = tiny()
    a, g = layer_a_g(model, x)
    alpha = g.mean(dim=(2, 3))
    expected = up(torch.relu((alpha[:, :, None, None] * a).sum(1)))
    close(explain(model, "gradcam", x, layer="act2").attribution, expected)


def test_hirescam_formula(x):
    model = tiny()
    a, g = layer_a_g(model, x)
    expected = up(torch.relu((g * a).sum(1)))  # element-wise, no spatial averaging
    close(explain(model, "hirescam", x, layer="act2").attribution, expected)


def test_gradcam_pp_formula(x):
    model = tiny()
    a, g = layer_a_g(model, x)
    a, g = a.double().numpy(), g.double().numpy()
    expected = np.zeros((3, 4, 4))
    for b in range(3):
        for k in range(a.shape[1]):
            s = a[b, k].sum()
            weight = 0.0
            for i in range(4):
                for j in range(4):
                    d = 2 * g[b, k, i, j] ** 2 + s * g[b, k, i, j] ** 3
                    alpha = g[b, k, i, j] ** 2 / d if d != 0 else 0.0
                    weight += alpha * max(g[b, k, i, j], 0.0)
            expected[b] += weight * a[b, k]
    expected = up(torch.relu(torch.tensor(expected, dtype=torch.float32)))
    close(explain(model, "gradcam_pp", x, layer="act2").attribution, expected)


def test_xgradcam_formula(x):
    model = tiny()
    a, g = layer_a_g(model, x)
    total = a.sum(dim=(2, 3))
    weights = torch.where(total > 0, (a * g).sum(dim=(2, 3)) / total.clamp(min=1e-30), 0.0)
    expected = up(torch.relu((weights[:, :, None, None] * a).sum(1)))
    close(explain(model, "xgradcam", x, layer="act2").attribution, expected)


def test_layercam_formula_and_fusion(x):
    model = tiny()
    a2, g2 = layer_a_g(model, x, layer="act2")
    a1, g1 = layer_a_g(model, x, layer="act1")
    single = up(torch.relu((torch.relu(g2) * a2).sum(1)))
    close(explain(model, "layercam", x, layer="act2").attribution, single)
    shallow = up(torch.relu((torch.relu(g1) * a1).sum(1)))
    scaled = [torch.tanh(2 * m / m.amax(dim=(1, 2, 3), keepdim=True)) for m in (shallow, single)]
    fused = explain(model, "layercam", x, layer=["act1", "act2"])
    close(fused.attribution, torch.maximum(*scaled))
    assert fused.layer == "act1, act2" and fused.params["layer"] == ["act1", "act2"]
    with pytest.raises(ValueError, match="only layercam"):
        explain(model, "gradcam", x, layer=["act1", "act2"])


def test_eigencam_formula(x):
    model = tiny()
    a, _ = layer_a_g(model, x)
    expected = []
    for b in range(3):
        m = a[b].reshape(8, 16).T.double().numpy()  # (positions, channels)
        centred = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = centred @ vt[0]
        total = m.sum(axis=1)
        if (projection * (total - total.mean())).sum() < 0:
            projection = -projection
        expected.append(torch.tensor(projection.reshape(4, 4), dtype=torch.float32))
    close(explain(model, "eigencam", x, layer="act2").attribution, up(torch.stack(expected)))


def test_scorecam_formula(x):
    model = tiny()
    a, _ = layer_a_g(model, x)
    expected = []
    for b, c in enumerate(TARGETS):
        weights = []
        for k in range(a.shape[1]):
            mask = up(a[b : b + 1, k])[0, 0]
            span = mask.max() - mask.min()
            mask = (mask - mask.min()) / span if span > 0 else torch.zeros_like(mask)
            with torch.no_grad():
                weights.append(model(x[b : b + 1] * mask).softmax(-1)[0, c])
        expected.append(torch.relu((torch.stack(weights)[:, None, None] * a[b]).sum(0)))
    probed = probe(model, x)
    ours = explain(model, "scorecam", x, layer="act2")
    close(ours.attribution, up(torch.stack(expected)))
    assert ours.forwards == probed + 3 + 3 * 8  # the clean inputs, then one pass per channel


def test_ablationcam_formula(x):
    model = tiny()
    a, _ = layer_a_g(model, x)

    def head(features):  # the network after act2, written out
        return model.fc2(torch.relu(model.fc1(features.flatten(1))))

    expected = []
    for b, c in enumerate(TARGETS):
        with torch.no_grad():
            y = head(a[b : b + 1])[0, c]
            weights = []
            for k in range(a.shape[1]):
                ablated = a[b : b + 1].clone()
                ablated[:, k] = 0
                weights.append((y - head(ablated)[0, c]) / y)
        expected.append(torch.relu((torch.stack(weights)[:, None, None] * a[b]).sum(0)))
    probed = probe(model, x)
    ours = explain(model, "ablationcam", x, layer="act2")
    close(ours.attribution, up(torch.stack(expected)))
    # the clean inputs, then per input one pass from the layer on (its 8 channels as 8 rows,
    # after an un-ablated row), and one full pass that checks the first channel's row
    assert ours.resolved["ablation"] == "from the layer" and ours.resolved["rows_from_layer"] == 27
    assert ours.forwards == probed + 3 + 3 * 1 + 1


def test_ablation_edits_only_the_last_call_of_a_reused_module(x):
    """In a network that calls one ReLU at several places, the layer is read and ablated at
    its last call (as the bundled model's head `_swish`, also called at its stem)."""
    reused, separate = tiny("reused", head="gap"), tiny("relu", head="gap")
    for method in ("ablationcam", "gradcam", "scorecam", "cam"):
        close(
            explain(reused, method, x, layer="relu").attribution,
            explain(separate, method, x, layer="act2").attribution,
        )


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_cams_do_not_depend_on_batch_size(x, method):
    model = tiny()
    probed = probe(model, x)
    one = explain(model, method, x, layer="act2", batch_size=1)
    many = explain(model, method, x, layer="act2", batch_size=64)
    close(many.attribution, one.attribution, rtol=1e-5)
    assert one.forwards - probed == many.forwards == (27 if method == "scorecam" else 7)


# -- targets, layers -----------------------------------------------------------------------------

GRADIENT_CAMS = ["gradcam", "gradcam_pp", "hirescam", "xgradcam", "layercam"]


def test_contrast_target_is_the_difference_of_two_class_maps(x):
    """Gradients are linear in the score, so for Grad-CAM without the ReLU the map of
    "p rather than q" is the map of p minus the map of q."""
    model = tiny()
    kwargs = {"layer": "act2", "relu": False}
    contrast = explain(model, "gradcam", x, target=Contrast(2, 4), **kwargs).attribution
    p = explain(model, "gradcam", x, target=2, **kwargs).attribution
    q = explain(model, "gradcam", x, target=4, **kwargs).attribution
    close(contrast, p - q)


@pytest.mark.parametrize("method", [*GRADIENT_CAMS, "guided_gradcam"])
def test_gradient_cams_take_contrast_channel_and_neuron_targets(x, method):
    model = tiny()
    logits = model(x)
    best, worst = logits.argmax(1).tolist(), logits.argmin(1).tolist()
    contrast = [Contrast(p, q) for p, q in zip(best, worst, strict=True)]
    extra = {} if method == "guided_gradcam" else {"relu": False}
    plain = explain(model, method, x, target=best, layer="act1", **extra).attribution
    for target in (contrast, Channel("conv2", 3), cl.targets.Neuron("conv2", 3, 1, 1)):
        e = explain(model, method, x, target=target, layer="act1", **extra)
        assert e.attribution.abs().sum() > 0, (method, target)
        assert not torch.allclose(e.attribution, plain), (method, target)


def test_channel_target_gradients_are_those_of_the_unit(x):
    model = tiny()
    store = {}
    hooks = [
        model.act1.register_forward_hook(lambda m, i, o: store.__setitem__("a", o)),
        model.conv2.register_forward_hook(lambda m, i, o: store.__setitem__("u", o)),
    ]
    model(x)
    for h in hooks:
        h.remove()
    (g,) = torch.autograd.grad(store["u"][:, 3].mean(dim=(1, 2)).sum(), store["a"])
    expected = up(torch.relu((g.mean(dim=(2, 3))[:, :, None, None] * store["a"]).sum(1)).detach())
    ours = explain(model, "gradcam", x, target=Channel("conv2", 3), layer="act1")
    close(ours.attribution, expected)


def test_default_layer_is_the_last_feature_map_the_classifier_reads(x):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(4, 5, 1),
        nn.Flatten(),
    ).eval()
    e = cl.explain(model, x, "gradcam", target=1)
    assert e.layer == "3"  # the ReLU the pooling reads; not "5", whose output is 1x1


class Stage(nn.Sequential):
    """Two convolution blocks, as a ResNet stage holds them."""


def test_default_layer_is_taken_at_the_outermost_module_that_returns_it(x):
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # noqa: E731
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("layer4", Stage(block(), block()))
    model.add_module("avgpool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 5))
    model.eval()
    for method in ("gradcam", "cam", "scorecam"):
        e = cl.explain(model, x, method, target=1)
        assert e.layer == "layer4", (method, e.layer)  # not layer4.1.1, the same tensor


@pytest.mark.slow
def test_bundled_model_default_layer_is_the_head(bundled, photos):
    e = cl.explain(bundled, photos["coffee"], "gradcam")
    assert e.layer == "_swish" and e.targets == [967]
    heat = e.heatmap()[0]
    assert heat.shape == (224, 224) and heat.max() > 0
    # the map of the espresso lies on the cup, in the upper middle of the picture
    y, x = divmod(int(heat.argmax()), 224)
    assert 40 < x < 184 and y < 150, (x, y)


def test_unknown_layer_lists_candidates(x):
    with pytest.raises(ValueError, match=r"unknown layer 'conv5'.*conv1, conv2"):
        explain(tiny(), "gradcam", x, layer="conv5")


def test_gradient_methods_refuse_a_layer(x):
    with pytest.raises(TypeError, match="does not take a layer"):
        explain(tiny(), "saliency", x, layer="conv2")


def test_vit_tokens_are_reshaped_to_their_grid_or_by_the_callers_function():
    from zoo import ZOO, zoo_input

    model, x = ZOO["vit"](), zoo_input()
    auto = cl.explain(model, x, "gradcam", target=[1, 2])
    assert auto.layer == "blocks.3.norm1"  # the last block's first norm, as users pick

    def grid(tokens: torch.Tensor) -> torch.Tensor:  # drop the class token, 16 = 4 x 4 patches
        return tokens[:, 1:].reshape(len(tokens), 4, 4, -1).permute(0, 3, 1, 2)

    given = cl.explain(model, x, "gradcam", target=[1, 2], layer="blocks.3.norm1", reshape=grid)
    close(given.attribution, auto.attribution)
    assert auto.attribution.abs().sum() > 0
    with pytest.raises(ValueError, match="reshape must return feature maps"):
        cl.explain(model, x, "gradcam", layer="blocks.3.norm1", target=1, reshape=lambda t: t)


class SwinLike(nn.Module):
    """Swin's layout: patch embedding, then blocks on (B, h, w, C) grids, a final LayerNorm and
    a head that pools over h and w."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 6, 2, stride=2)
        self.block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.GELU())
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch(x).permute(0, 2, 3, 1)  # (B, 4, 4, 6)
        grid = self.norm(grid + self.block(grid))
        return self.head(grid.mean(dim=(1, 2)))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "eigencam"])
def test_swin_grids_are_read_as_b_h_w_c(x, method):
    model = SwinLike().eval()
    auto = cl.explain(model, x, method, target=[1, 2, 3])
    assert auto.layer == "norm"  # the last map the head pools, (B, 4, 4, 6)
    given = cl.explain(model, x, method, target=[1, 2, 3], layer="norm",
                       reshape=lambda t: t.permute(0, 3, 1, 2))  # fmt: skip
    close(auto.attribution, given.attribution)


def test_unit_targets_on_swin_grids_read_the_channel(x):
    from convlens.targets import Channel

    model = SwinLike().eval()

    class Means(nn.Module):  # the norm's channel means, as logits
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            grid = self.net.patch(t).permute(0, 2, 3, 1)
            return self.net.norm(grid + self.net.block(grid)).mean(dim=(1, 2))

    unit = cl.explain(model, x, "saliency", target=Channel("norm", 2))
    cut = cl.explain(Means().eval(), x, "saliency", target=2)
    close(unit.attribution, cut.attribution)
