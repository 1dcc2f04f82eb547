"""Generic checks run over every registered method: explaining leaves the model exactly as it
was (also when the method fails), the input is not modified, results do not depend on
``batch_size``, and the same seed gives the same result bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import probe, tiny, tiny_input
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import convlens as cl

# Small settings so the suite stays fast; every method must accept these.
FAST: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 6},
    "smoothgrad": {"n_samples": 5},
    "cam": {"layer": "act2"},  # the layer the GAP head pools (the default conv2 is refused)
    "occlusion": {"window": 3, "stride": 2},
    "rise": {"n_masks": 12, "grid": 3},
    "lime": {"n_samples": 30, "n_segments": 8},
    "kernel_shap": {"n_samples": 30, "n_segments": 8},
    "meaningful_perturbation": {"steps": 3, "mask_size": 4, "game": "preservation"},
    "anchors": {"n_segments": 8, "n_samples": 256, "batch": 16},
}


# Random methods whose answer cannot depend on the seed on this suite's tiny model, and why
# (each is checked for seed dependence in its own test file instead).
SEED_BLIND_HERE = {
    "anchors": "every perturbation keeps the tiny CNN's class: each anchor has precision 1",
}


def fast(method: str) -> dict[str, Any]:
    return dict(FAST.get(method, {}))


# Methods whose target must be each input's predicted class (Contrast-CAM's P is the network's
# prediction): the generic tests give them target=None (the predictions) instead of fixed ones.
PREDICTION_ONLY = {name for name in cl.list_methods() if cl.get_method(name).prediction_only}


def classes(method: str, wanted: list[int]) -> list[int] | None:
    """The generic tests' target for ``method``: ``wanted``, or the predicted classes."""
    return None if method in PREDICTION_ONLY else wanted


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything explaining could touch: parameters, buffers, flags, grads and hook dicts."""
    state: dict[str, Any] = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {},
        "attributes": {k: sorted(vars(m)) for k, m in model.named_modules()},
    }
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if "hook" in attribute and isinstance(value, dict):
                state["hooks"][(name, attribute)] = list(value.items())
    return state


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["attributes"] == after["attributes"]
    for key, value in before["params"].items():
        assert torch.equal(value, after["params"][key]), key
    for key, value in before["grad"].items():
        other = after["grad"][key]
        assert (value is None and other is None) or torch.equal(value, other), key
    assert not _get_current_function_mode_stack(), "a TorchFunctionMode was left active"
    assert torch.is_grad_enabled()


def prepared_model() -> nn.Module:
    """A model in a state worth preserving: mixed flags, a user hook, existing grads."""
    model = tiny("relu6", head="gap")  # every method, CAM included, applies to it
    model.train()
    model.fc2.eval()
    model.conv1.weight.requires_grad_(False)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 0.5)
    model.conv2.register_forward_hook(lambda *args: None)
    return model


class Exploding(nn.Module):
    """Raises during the forward pass once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("method", cl.list_methods())
def test_model_and_input_untouched(method):
    model = prepared_model()
    x = tiny_input()
    x_before = x.clone()
    before = snapshot(model)
    e = cl.explain(model, x, method=method, target=classes(method, [1, 2, 3]), **fast(method))
    assert_same(before, snapshot(model))
    assert torch.equal(x, x_before)
    assert e.attribution.dtype == torch.float32 and e.attribution.device.type == "cpu"
    assert e.attribution.shape[0] == 3 and e.attribution.shape[-2:] == x.shape[-2:]
    assert torch.isfinite(e.attribution).all() and e.attribution.abs().sum() > 0
    assert (
        (method in PREDICTION_ONLY or e.targets == [1, 2, 3]) and e.forwards > 0 and e.seconds > 0
    )
    for key, value in cl.get_method(method).defaults.items():
        assert key in e.params, f"default {key}={value!r} is not recorded"
    assert e.heatmap().shape == (3, 8, 8)


@pytest.mark.parametrize("method", cl.list_methods())
def test_explaining_inside_no_grad_works_and_keeps_it(method):
    """Inference code often runs under torch.no_grad(); explaining there must work the same."""
    model, x = tiny("relu6", head="gap"), tiny_input(2)
    expected = cl.explain(
        model, x, method=method, target=classes(method, [0, 1]), seed=3, **fast(method)
    )
    with torch.no_grad():
        e = cl.explain(
            model, x, method=method, target=classes(method, [0, 1]), seed=3, **fast(method)
        )
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(e.attribution, expected.attribution)


@pytest.mark.parametrize("method", cl.list_methods())
def test_model_untouched_after_invalid_target(method):
    model = prepared_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        cl.explain(model, tiny_input(), method=method, target=99, **fast(method))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", cl.list_methods())
def test_model_untouched_when_a_module_raises(method):
    model = prepared_model()
    bomb = Exploding()
    model.conv2 = nn.Sequential(model.conv2, bomb)
    bomb.armed = True
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        cl.explain(model, tiny_input(), method=method, target=0, **fast(method))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", cl.list_methods())
def test_batch_size_does_not_change_the_result(method):
    model, x = tiny(head="gap"), tiny_input(2)
    probed = probe(model, x)
    one = cl.explain(model, x, method=method, batch_size=1, **fast(method))
    many = cl.explain(model, x, method=method, batch_size=64, **fast(method))
    scale = one.attribution.abs().max().item()
    torch.testing.assert_close(many.attribution, one.attribution, rtol=1e-5, atol=1e-5 * scale)
    assert one.forwards - probed == many.forwards


@pytest.mark.parametrize("method", cl.list_methods())
def test_same_seed_same_result_bit_for_bit(method):
    model, x = tiny(head="gap"), tiny_input(2)
    a = cl.explain(model, x, method=method, seed=3, **fast(method))
    b = cl.explain(model, x, method=method, seed=3, **fast(method))
    assert torch.equal(a.attribution, b.attribution)
    if cl.get_method(method).random and method not in SEED_BLIND_HERE:
        # another seed draws other samples: the map changes, or (for a discrete answer such as
        # an anchor) at least the estimates recorded with it do
        c = cl.explain(model, x, method=method, seed=4, **fast(method))
        assert not torch.equal(a.attribution, c.attribution) or (
            a.summary()["extras"] != c.summary()["extras"]
        )


@pytest.mark.parametrize("method", cl.list_methods())
def test_unknown_parameter_is_refused_with_the_valid_ones(method):
    with pytest.raises(TypeError, match="unknown parameter"):
        cl.explain(tiny(head="gap"), tiny_input(1), method=method, no_such_knob=1)


def test_every_method_has_a_paper_and_description():
    for name in cl.list_methods():
        cls = cl.get_method(name)
        assert (
            cls.description
            and cls.__doc__
            and any(str(year) in cls.__doc__ for year in range(2009, 2030))
        ), name


# -- metrics and features leave the model as they found it too ---------------------------------


def _masks(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "left": torch.zeros(len(x), 8, 8, dtype=torch.bool).index_fill_(2, torch.arange(4), True)
    }


HEAT = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(0))
USERS_OF_THE_MODEL = {
    "deletion": lambda m, x: cl.metrics.deletion(m, x, HEAT, steps=4),
    "insertion": lambda m, x: cl.metrics.insertion(m, x, HEAT, steps=4),
    "region_perturbation": lambda m, x: cl.metrics.region_perturbation(m, x, HEAT, patch=4),
    "sanity": lambda m, x: cl.metrics.sanity(m, x[:2], "saliency"),
    "activations": lambda m, x: cl.features.activations(m, x[:1], "conv1"),
    "top_patches": lambda m, x: cl.features.top_patches(m, x, "conv1", channel=1, k=2),
    "channel_contributions": lambda m, x: cl.features.channel_contributions(m, x, 1, "conv2"),
    "receptive_field": lambda m, x: cl.features.receptive_field(m, "conv1", (8, 8)),
    "class_model": lambda m, x: cl.features.class_model(m, 1, steps=3, size=(8, 8), jitter=1),
    "deep_dream": lambda m, x: cl.features.deep_dream(m, x[:1], "conv1", octaves=1, steps=2),
    "embed": lambda m, x: cl.features.embed(m, x),
    "neighbours": lambda m, x: cl.features.neighbours(m, x[:1], x, k=2),
    "tsne": lambda m, x: cl.features.tsne(m, x, thumbnails=0),
    "dissect": lambda m, x: cl.features.dissect(m, x, _masks(x), "conv1"),
}


@pytest.mark.parametrize("name", USERS_OF_THE_MODEL)
def test_metrics_and_features_leave_the_model_untouched(name):
    model, x = prepared_model(), tiny_input(6)
    x_before, before = x.clone(), snapshot(model)
    USERS_OF_THE_MODEL[name](model, x)
    assert_same(before, snapshot(model))
    assert torch.equal(x, x_before)
    assert cl.features.filters(model).data["weight"].shape == (6, 3, 3, 3)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", USERS_OF_THE_MODEL)
def test_metrics_and_features_leave_the_model_untouched_when_it_raises(name):
    model = prepared_model()
    bomb = Exploding()
    model.conv2 = nn.Sequential(model.conv2, bomb)
    bomb.armed = True
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        USERS_OF_THE_MODEL[name](model, tiny_input(6))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", USERS_OF_THE_MODEL)
def test_metrics_and_features_work_inside_no_grad(name):
    with torch.no_grad():
        USERS_OF_THE_MODEL[name](tiny("relu6", head="gap"), tiny_input(6))
        assert not torch.is_grad_enabled()
