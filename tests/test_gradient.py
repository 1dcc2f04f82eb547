"""Gradient family against captum (the oracle) and against the papers' definitions.

Tolerance: ``rtol=1e-4`` relative to each attribution's largest magnitude (``atol`` scaled
by it), float32 throughout.
"""

from __future__ import annotations

import captum.attr as ca
import pytest
import torch
from conftest import probe, tiny, tiny_input
from torch import nn

import convlens as cl
from convlens.baselines import make_baseline
from convlens.hooks import override_rectifiers, rules

TARGETS = [0, 3, 1]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the oracle returned all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def explain(model, x, method, **kwargs):
    return cl.explain(model, x, method=method, target=kwargs.pop("target", TARGETS), **kwargs)


@pytest.mark.parametrize("absolute", [True, False])
def test_saliency_equals_captum(x, absolute):
    model = tiny()
    ours = explain(model, x, "saliency", absolute=absolute).attribution
    theirs = ca.Saliency(model).attribute(x, target=TARGETS, abs=absolute)
    close(ours, theirs)
    heat = explain(model, x, "saliency").heatmap()
    close(heat, theirs.abs().amax(dim=1))  # Simonyan et al.: max |g| over channels


def test_input_x_gradient_equals_captum(x):
    model = tiny()
    close(
        explain(model, x, "input_x_gradient").attribution,
        ca.InputXGradient(model).attribute(x, target=TARGETS),
    )


@pytest.mark.parametrize(
    ("ours", "oracle"), [("deconvnet", ca.Deconvolution), ("guided_backprop", ca.GuidedBackprop)]
)
def test_modified_backprop_equals_captum_on_relu_modules(x, ours, oracle):
    model = tiny("relu")
    expected = oracle(model).attribute(x, target=TARGETS)
    plain = ca.Saliency(model).attribute(x, target=TARGETS, abs=False)
    assert not torch.allclose(expected, plain), "the rule must matter on this input"
    close(explain(model, x, ours).attribution, expected)


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop", "saliency"])
@pytest.mark.parametrize("variant", ["relu_inplace", "functional", "reused"])
def test_rectifier_overrides_see_every_way_of_writing_relu(x, method, variant):
    """Guided backprop etc. on F.relu / in-place / reused modules equal the nn.ReLU network."""
    expected = explain(tiny("relu"), x, method).attribution
    close(explain(tiny(variant), x, method).attribution, expected)


def test_guided_backprop_on_relu6_equals_captum_on_relu_then_hardtanh():
    """captum ignores ReLU6 (it would return the plain gradient); on the same function written
    as nn.ReLU + nn.Hardtanh(0, 6) it applies the guided rule, and convlens must agree."""
    x = tiny_input(scale=4.0)  # large enough that some units pass 6
    relu6, rewritten = tiny("relu6"), tiny("relu_hardtanh")
    assert (relu6.conv1(x) > 6).any()
    expected = ca.GuidedBackprop(rewritten).attribute(x, target=TARGETS)
    captum_on_relu6 = ca.GuidedBackprop(relu6).attribute(x, target=TARGETS)
    plain = ca.Saliency(relu6).attribute(x, target=TARGETS, abs=False)
    close(captum_on_relu6, plain)  # the oracle's blind spot, shown
    ours = explain(relu6, x, "guided_backprop").attribution
    close(ours, expected)
    assert not torch.allclose(ours, plain, atol=1e-6)


def test_deconvnet_ignores_forward_values_at_relu6():
    """Zeiler & Fergus: the backward signal is rectified at each ReLU/ReLU6 whatever the input,
    so for conv -> ReLU6 -> linear the result is conv^T relu(W^T e_c), the same for any x."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    linear = nn.Linear(4 * 8 * 8, 5)
    model = nn.Sequential(conv, nn.ReLU6(), nn.Flatten(), linear).eval()
    a, b = tiny_input(2, seed=3, scale=10.0), tiny_input(2, seed=4, scale=0.1)
    signal = linear.weight[2].clamp(min=0).view(1, 4, 8, 8).expand(2, -1, -1, -1)
    expected = torch.nn.functional.conv_transpose2d(signal, conv.weight, padding=1).detach()
    for inputs in (a, b):
        close(cl.explain(model, inputs, "deconvnet", target=2).attribution, expected)


@pytest.mark.parametrize(
    "integration", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integrated_gradients_equals_captum(x, integration):
    model = tiny()
    ours = explain(model, x, "integrated_gradients", steps=20, integration=integration)
    theirs = ca.IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=TARGETS, n_steps=20, method=integration
    )
    close(ours.attribution, theirs)


def test_integrated_gradients_trapezoid_departs_from_captum_where_captum_is_wrong(x):
    """captum's trapezoid rule samples linspace(0, 1, n) (spacing 1/(n-1)) but weighs the
    points with 1/n (ends halved), so its weights sum to (n-1)/n, not 1, and it understates
    the integral by that factor. convlens uses the spacing 1/(n-1): exactly n/(n-1) times
    captum, and closer to completeness."""
    model, n = tiny(), 20
    ours = explain(model, x, "integrated_gradients", steps=n, integration="riemann_trapezoid")
    theirs = ca.IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=TARGETS, n_steps=n, method="riemann_trapezoid"
    )
    close(ours.attribution, theirs * n / (n - 1))
    truth = (model(x)[range(3), TARGETS] - model(torch.zeros_like(x))[range(3), TARGETS]).detach()
    our_gap = (ours.attribution.sum(dim=(1, 2, 3)) - truth).abs()
    their_gap = (theirs.sum(dim=(1, 2, 3)) - truth).abs()
    assert (our_gap < their_gap).all()


@pytest.mark.parametrize("baseline", ["blur", "mean", "tensor"])
def test_integrated_gradients_baselines_equal_captum(x, baseline):
    model = tiny()
    reference = torch.full_like(x[:1], 0.3) if baseline == "tensor" else None
    spec = reference if baseline == "tensor" else baseline
    ours = explain(model, x, "integrated_gradients", steps=16, baseline=spec)
    expected_baseline = make_baseline(spec, x)
    theirs = ca.IntegratedGradients(model).attribute(
        x, baselines=expected_baseline, target=TARGETS, n_steps=16
    )
    close(ours.attribution, theirs)


def test_integrated_gradients_completeness_gap_is_reported_and_shrinks(x):
    model = tiny()
    probed = probe(model, x)
    coarse = explain(model, x, "integrated_gradients", steps=4, integration="riemann_left")
    fine = explain(model, x, "integrated_gradients", steps=512)
    scores = model(x)[range(3), TARGETS] - model(torch.zeros_like(x))[range(3), TARGETS]
    for e in (coarse, fine):
        gap = e.attribution.sum(dim=(1, 2, 3)) - scores.detach()
        close(torch.tensor(e.extras["completeness_gap"]), gap, rtol=1e-3)
    assert max(map(abs, fine.extras["completeness_gap"])) < 1e-3
    assert max(map(abs, coarse.extras["completeness_gap"])) > 1e-3
    assert coarse.forwards == probed + 3 * 4 + 6  # steps per input + inputs and baselines
    assert fine.forwards == 3 * 512 + 6


@pytest.mark.parametrize("base", ["saliency", "guided_backprop", "input_x_gradient"])
def test_smoothgrad_is_the_average_over_the_same_noise(x, base):
    model = tiny()
    n, noise, seed = 7, 0.2, 5
    ours = explain(model, x, "smoothgrad", base=base, n_samples=n, noise=noise, seed=seed)
    generator = torch.Generator().manual_seed(seed)  # the documented draw order
    expected = []
    for i, target in enumerate(TARGETS):
        sigma = noise * (x[i].max() - x[i].min())
        noisy = torch.stack(
            [x[i] + sigma * torch.randn(x.shape[1:], generator=generator) for _ in range(n)]
        )
        runs = cl.explain(model, noisy, method=base, target=[target] * n).attribution
        expected.append(runs.mean(dim=0))
    close(ours.attribution, torch.stack(expected))
    assert ours.params["base"] == base and ours.params["seed"] == seed
    assert ours.reduction == cl.get_method(base).reduction


def test_smoothgrad_rejects_a_non_gradient_base(x):
    with pytest.raises(ValueError, match="wraps a gradient method"):
        explain(tiny(), x, "smoothgrad", base="smoothgrad")


def test_rule_context_is_local():
    model = tiny("functional")
    x = tiny_input(1).requires_grad_()
    with override_rectifiers(rules.guided):
        model(x)[0, 1].backward()
    guided = x.grad.clone()
    x.grad = None
    model(x)[0, 1].backward()  # outside the block: the true gradient again
    expected = ca.Saliency(tiny("relu")).attribute(x.detach(), target=1, abs=False)
    close(x.grad, expected)
    assert not torch.allclose(guided, x.grad)


# -- the bundled EfficientNet-Lite0 (ReLU6, residual additions) ---------------------------


def _relu6_rewritten(module: nn.Module) -> nn.Module:
    """A copy where every ReLU6 becomes nn.ReLU followed by nn.Hardtanh(0, 6)."""
    import copy

    clone = copy.deepcopy(module)
    for parent in clone.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 6.0)))
    return clone


@pytest.fixture(scope="module")
def chelsea(bundled, photos):
    return bundled.preprocess(photos["chelsea"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_bundled_model_simple_gradients_equal_captum(bundled, chelsea, method):
    oracle = {"saliency": ca.Saliency, "input_x_gradient": ca.InputXGradient}[method]
    ours = cl.explain(bundled, chelsea, method=method, target=285).attribution
    close(ours, oracle(bundled.module).attribute(chelsea, target=285))


@pytest.mark.slow
def test_bundled_model_integrated_gradients_equals_captum(bundled, chelsea):
    ours = cl.explain(bundled, chelsea, "integrated_gradients", target=285, steps=24)
    theirs = ca.IntegratedGradients(bundled.module).attribute(
        chelsea, baselines=torch.zeros_like(chelsea), target=285, n_steps=24
    )
    close(ours.attribution, theirs, rtol=1e-3)


@pytest.mark.slow
def test_bundled_model_guided_backprop_sees_relu6(bundled, chelsea):
    ours = cl.explain(bundled, chelsea, "guided_backprop", target=285).attribution
    plain = ca.Saliency(bundled.module).attribute(chelsea, target=285, abs=False)
    captum_blind = ca.GuidedBackprop(bundled.module).attribute(chelsea, target=285)
    close(captum_blind, plain)  # captum does not know ReLU6: the plain gradient
    assert not torch.allclose(ours, plain, atol=1e-3 * plain.abs().max().item())
    rewritten = _relu6_rewritten(bundled.module).eval()
    close(ours, ca.GuidedBackprop(rewritten).attribute(chelsea, target=285))
