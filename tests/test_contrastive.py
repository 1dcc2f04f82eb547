"""Counterfactual Grad-CAM and Contrast-CAM against hand computations and axioms.

Activations A of the tiny CNN's ``act2`` and the gradients the papers prescribe are taken
with plain autograd (or in closed form for a global-average-pooling + linear head), then each
paper's formula is applied by hand. Counterfactual Grad-CAM (Selvaraju et al. 2017):
ReLU(Σ_k mean_ij(-∂y/∂A_k) A_k). Contrast-CAM (Prabhushankar et al. 2020): the same with the
gradient of J = CE(z, Q), whose logit gradient is softmax(z) - e_Q.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny, tiny_input
from test_lifecycle import assert_same, prepared_model, snapshot

import convlens as cl
from convlens.checks import RequestError
from convlens.targets import Channel, Contrast, Neuron

LAYER = "act2"


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the expected value is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def activations_and_logits(model: torch.nn.Module, x: torch.Tensor):
    """A (a leaf) at ``act2`` and the logits computed from it, by the tiny CNN's own layers."""
    a = model.act2(model.conv2(model.pool(model.act1(model.conv1(x))))).detach()
    a.requires_grad_(True)
    if model.head == "gap":
        return a, model.fc(a.mean(dim=(2, 3)))
    return a, model.fc2(model.act3(model.fc1(a.flatten(1))))


def cam(a: torch.Tensor, g: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Grad-CAM's formula by hand: Σ_k mean_ij(G_k) A_k, rectified, upsampled to 8x8."""
    maps = (g.mean(dim=(2, 3))[:, :, None, None] * a.detach()).sum(dim=1)
    if relu:
        maps = maps.clamp(min=0)
    return F.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)


def explain(model, method, x, **kwargs):
    return cl.explain(model, x, method=method, layer=LAYER, progress=False, **kwargs)


# -- counterfactual Grad-CAM ------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mlp", "gap"])
def test_counterfactual_gradcam_is_the_negated_gradient_map_by_hand(head):
    model, x = tiny(head=head), tiny_input(3)
    targets = [0, 3, 1]
    a, z = activations_and_logits(model, x)
    (g,) = torch.autograd.grad(z[range(3), targets].sum(), a)
    e = explain(model, "counterfactual_gradcam", x, target=targets)
    close(e.attribution, cam(a, -g))
    assert e.targets == targets and e.layer == LAYER
    assert not torch.allclose(e.attribution, cam(a, g))  # the sign matters on this input


def test_counterfactual_of_a_class_is_gradcam_of_the_model_with_that_row_negated():
    """Axiom: y'_c = -y_c when row c of the last linear layer (and its bias) is negated."""
    model, x, c = tiny(), tiny_input(3), 2
    flipped = tiny()
    with torch.no_grad():
        flipped.fc2.weight[c].neg_()
        flipped.fc2.bias[c].neg_()
    counterfactual = explain(model, "counterfactual_gradcam", x, target=c).attribution
    close(counterfactual, explain(flipped, "gradcam", x, target=c).attribution)


def test_unrectified_counterfactual_is_minus_gradcam_for_any_target():
    model, x = tiny(), tiny_input(2)
    for target in (1, Contrast(0, 4), Channel("act2", 3)):
        ours = explain(model, "counterfactual_gradcam", x, target=target, relu=False)
        gradcam = explain(model, "gradcam", x, target=target, relu=False)
        close(ours.attribution, -gradcam.attribution)


# -- Contrast-CAM ---------------------------------------------------------------------------


def test_contrast_cam_of_a_linear_head_has_the_closed_form_loss_gradient():
    """GAP + linear head z = W mean(A) + b: ∂J/∂A_kij = Σ_j (p_j - δ_jQ) W_jk / (h w), so
    α_k = ((softmax(z) - e_Q) W)_k / (h w)."""
    model, x = tiny(head="gap"), tiny_input(3)
    contrast = [0, 4, 1]
    with torch.no_grad():
        a, z = activations_and_logits(model, x)
    h, w = a.shape[-2:]
    dz = z.softmax(dim=1) - F.one_hot(torch.tensor(contrast), 5).float()
    alpha = dz @ model.fc.weight / (h * w)  # (B, K)
    maps = (alpha[:, :, None, None] * a).sum(dim=1).clamp(min=0)
    expected = F.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)
    e = explain(model, "contrast_cam", x, contrast=contrast)
    close(e.attribution, expected)
    assert e.targets == z.argmax(dim=1).tolist()  # P: the prediction
    assert e.resolved["contrast"] == contrast
    assert e.params["contrast"] == contrast


def test_contrast_cam_backpropagates_the_cross_entropy_with_q_as_label():
    """Any head: the gradient of F.cross_entropy(z, Q), by autograd, in Grad-CAM's formula."""
    model, x = tiny(), tiny_input(3)
    a, z = activations_and_logits(model, x)
    q = torch.tensor([3, 1, 4])
    (g,) = torch.autograd.grad(F.cross_entropy(z, q, reduction="sum"), a)
    e = explain(model, "contrast_cam", x, contrast=q.tolist())
    close(e.attribution, cam(a, g))


def test_contrast_cam_is_linear_in_the_class_maps_with_weights_softmax_minus_e_q():
    """∂J/∂A = Σ_j (p_j - δ_jQ) ∂z_j/∂A, and Grad-CAM without ReLU is linear in the gradient:
    the unrectified Contrast-CAM map is Σ_j (p_j - δ_jQ) times gradcam's map of class j."""
    model, x, q = tiny(), tiny_input(1), 2
    probabilities = model(x).softmax(dim=1)[0].detach()
    weights = probabilities - F.one_hot(torch.tensor(q), 5).float()
    expected = sum(
        weights[j] * explain(model, "gradcam", x, target=j, relu=False).attribution
        for j in range(5)
    )
    ours = explain(model, "contrast_cam", x, contrast=q, relu=False).attribution
    close(ours, expected)


def test_contrast_cam_meets_gradcam_of_the_logit_difference_only_when_p_is_certain():
    """J = (y_P - y_Q) + CE(z, P): with softmax(z) ≈ e_P the second term vanishes, and the map
    equals gradcam with target Contrast(P, Q); with an unsure network it differs."""
    x, q = tiny_input(2), 1
    for scale, agrees in ((1.0, False), (1000.0, True)):
        model = tiny()
        with torch.no_grad():
            model.fc2.weight.mul_(scale)
            model.fc2.bias.mul_(scale)
        p = model(x).argmax(dim=1).tolist()
        ours = explain(model, "contrast_cam", x, contrast=q, relu=False).attribution
        difference = explain(model, "gradcam", x, target=[Contrast(c, q) for c in p], relu=False)
        scale_of = difference.attribution.abs().max()
        gap = (ours - difference.attribution).abs().max() / scale_of
        assert (gap < 1e-4) == agrees, (scale, gap)


def test_the_default_contrast_is_each_inputs_second_most_likely_class():
    model, x = tiny(), tiny_input(3, seed=4)
    with torch.no_grad():
        second = model(x).topk(2, dim=1).indices[:, 1].tolist()
    e = explain(model, "contrast_cam", x)
    assert e.resolved["contrast"] == second
    close(e.attribution, explain(model, "contrast_cam", x, contrast=second).attribution)


def test_contrast_takes_label_names_and_explicit_predicted_targets():
    module, x = tiny(), tiny_input(2)
    labels = ["ant", "bee", "cat", "dog", "eel"]
    model = cl.wrap(module, input_size=(8, 8), labels=labels)
    predicted = module(x).argmax(dim=1).tolist()
    named = explain(model, "contrast_cam", x, target=[labels[p] for p in predicted], contrast="dog")
    indexed = explain(module, "contrast_cam", x, contrast=3)
    assert named.resolved["contrast"] == [3, 3] and named.targets == predicted
    torch.testing.assert_close(named.attribution, indexed.attribution)


def test_a_contrast_target_asks_the_same_question():
    model, x = tiny(), tiny_input(2)
    p = model(x).argmax(dim=1).tolist()
    given = explain(model, "contrast_cam", x, target=[Contrast(c, 4) for c in p])
    separate = explain(model, "contrast_cam", x, contrast=4)
    close(given.attribution, separate.attribution)
    assert given.targets == [{"contrast": [c, 4]} for c in p]
    assert given.resolved["contrast"] == [4, 4]


def test_contrast_cam_does_not_depend_on_batch_size():
    model, x = tiny(), tiny_input(3)
    one = explain(model, "contrast_cam", x, contrast=[1, 2, 3], batch_size=1)
    many = explain(model, "contrast_cam", x, contrast=[1, 2, 3], batch_size=3)
    close(one.attribution, many.attribution)
    assert one.resolved["contrast"] == many.resolved["contrast"] == [1, 2, 3]


# -- refusals and the model ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 1}, "predicts class 0, not 1"),
        ({"contrast": 0}, "contrast class 0 is the explained class P"),
        ({"contrast": 5}, "contrast class 5 is out of range: the model has 5 classes"),
        ({"contrast": -1}, "class indices start at 0"),
        ({"contrast": [1, 2, 3]}, "a list of 3 classes but there are 2 inputs"),
        ({"contrast": 1.5}, "contrast must be a class index"),
        ({"contrast": True}, "contrast must be a class index"),
        ({"contrast": "dog"}, "has no labels"),
        ({"target": Contrast(0, 2), "contrast": 2}, "give Q once"),
        ({"target": Contrast(1, 2)}, "predicts class 0, not 1"),
        ({"target": Contrast(0, 0)}, "contrast class 0 is the explained class P"),
        ({"target": Channel("act2", 1)}, "not a Channel target"),
        ({"target": Neuron("act2", 1, 0, 0)}, "not a Neuron target"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_contrast_cam_refuses_in_one_line_and_leaves_the_model_as_it_was(kwargs, message):
    model, x = prepared_model(), tiny_input(2)
    model.head = "mlp"
    model.eval()  # the tiny CNN predicts class 0 for these inputs
    assert model(x).argmax(dim=1).tolist() == [0, 0]
    before = snapshot(model)
    with pytest.raises(RequestError, match=message) as refusal:
        explain(model, "contrast_cam", x, **kwargs)
    assert "\n" not in str(refusal.value)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["counterfactual_gradcam", "contrast_cam"])
def test_explaining_leaves_the_model_as_it_was(method):
    model, x = prepared_model(), tiny_input(3)
    before, x_before = snapshot(model), x.clone()
    e = cl.explain(model, x, method, progress=False)
    assert_same(before, snapshot(model))
    assert torch.equal(x, x_before) and e.attribution.abs().sum() > 0
    assert e.forwards == 3 + 2  # one pass per image, two for the layout probe


def test_both_are_listed_in_the_cam_family():
    names = cl.list_methods(family="cam")
    assert "counterfactual_gradcam" in names and "contrast_cam" in names
    assert cl.get_method("contrast_cam").defaults["contrast"] is None


def test_sanity_explains_each_randomised_models_own_prediction():
    """Model randomisation changes the prediction: Contrast-CAM (prediction only) then maps each
    randomised model's own prediction instead of refusing the trained model's class."""
    model, x = tiny(head="gap"), tiny_input(2)
    result = cl.metrics.sanity(model, x, "contrast_cam")
    assert torch.isfinite(result.spearman).all() and len(result.spearman) > 1
